//! Task data: records in cf-eval's layouts, or the published column layouts of standard tasks
//! mapped by a preset (the transformations lm-evaluation-harness's task configs apply).

use anyhow::{anyhow, bail, Context, Result};
use cf_common::record::{self, ReadOptions, Record};
use serde_json::Value;

/// A multiple-choice question as loglikelihood requests: each choice is a (context,
/// continuation) pair.
#[derive(Clone, Debug)]
pub struct McDoc {
    pub requests: Vec<(String, String)>,
    /// What lm-eval calls the choices (their lengths normalise acc_norm).
    pub choices: Vec<String>,
    pub gold: usize,
}

/// A problem with a reference answer, answered by generation.
#[derive(Clone, Debug)]
pub struct GenDoc {
    /// lm-eval's doc_to_text (the question, without few-shot examples).
    pub prompt: String,
    /// lm-eval's doc_to_target: the reference (for gsm8k the whole solution, "... #### 72",
    /// which exact_match reduces to its final answer), also the few-shot examples' answer.
    pub answer: String,
}

/// A document scored by rolling log-likelihood: the text scored, and the text whose words and
/// bytes are counted (wikitext: the detokenized page is scored, the original counted).
#[derive(Clone, Debug)]
pub struct PplDoc {
    pub scored: String,
    pub counted: String,
}

pub enum Task {
    MultipleChoice(Vec<McDoc>),
    Perplexity(Vec<PplDoc>),
    Generative(Vec<GenDoc>),
}

/// How records map to a task.
#[derive(Clone, Debug, Default)]
pub struct Fields {
    pub context: String,
    pub choices: String,
    pub gold: String,
    pub delimiter: String,
}

pub const PRESETS: [&str; 12] = [
    "arc_easy",
    "arc_challenge",
    "hellaswag",
    "piqa",
    "sciq",
    "openbookqa",
    "boolq",
    "copa",
    "winogrande",
    "gsm8k",
    "math500",
    "wikitext",
];

fn s<'a>(r: &'a Record, k: &str) -> Result<&'a str> {
    r.get(k)
        .and_then(Value::as_str)
        .ok_or_else(|| anyhow!("field \"{k}\" is missing or not text"))
}

fn strs(v: Option<&Value>, what: &str) -> Result<Vec<String>> {
    v.and_then(Value::as_array)
        .ok_or_else(|| anyhow!("field \"{what}\" is missing or not a list"))?
        .iter()
        .map(|x| {
            x.as_str()
                .map(String::from)
                .ok_or_else(|| anyhow!("\"{what}\" holds a non-text item"))
        })
        .collect()
}

fn index_of(labels: &[String], key: &str) -> Result<usize> {
    labels
        .iter()
        .position(|l| l == key.trim())
        .ok_or_else(|| anyhow!("answer key {key:?} is not among the labels {labels:?}"))
}

fn int(v: Option<&Value>, what: &str) -> Result<usize> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| x as usize),
        Some(Value::String(s)) => s.trim().parse().ok(),
        Some(Value::Bool(b)) => Some(*b as usize),
        _ => None,
    }
    .ok_or_else(|| anyhow!("field \"{what}\" is missing or not an index"))
}

/// lm-eval's hellaswag `preprocess`: strip, " [title]" → ". ", remove every `[...]` (the
/// non-greedy `\[.*?\]`: an unmatched `[` stays), then "  " → " ".
fn hellaswag_clean(t: &str) -> String {
    let t = t.trim().replace(" [title]", ". ");
    let mut out = String::new();
    let mut rest = t.as_str();
    while let Some(open) = rest.find('[') {
        match rest[open..].find(']') {
            Some(close) => {
                out.push_str(&rest[..open]);
                rest = &rest[open + close + 1..];
            }
            None => break,
        }
    }
    out.push_str(rest);
    out.replace("  ", " ")
}

fn mc(context: String, choices: Vec<String>, gold: usize, delim: &str) -> McDoc {
    let requests = choices
        .iter()
        .map(|c| (context.clone(), format!("{delim}{c}")))
        .collect();
    McDoc {
        requests,
        choices,
        gold,
    }
}

/// One record through a preset.
fn preset_doc(preset: &str, r: &Record) -> Result<Task1> {
    let labels_of = |r: &Record| -> Result<(Vec<String>, Vec<String>)> {
        let c = r
            .get("choices")
            .ok_or_else(|| anyhow!("field \"choices\" is missing"))?;
        Ok((
            strs(c.get("text"), "choices.text")?,
            strs(c.get("label"), "choices.label")?,
        ))
    };
    Ok(match preset {
        "arc_easy" | "arc_challenge" => {
            let (text, labels) = labels_of(r)?;
            let gold = index_of(&labels, s(r, "answerKey")?)?;
            Task1::Mc(mc(
                format!("Question: {}\nAnswer:", s(r, "question")?),
                text,
                gold,
                " ",
            ))
        }
        "openbookqa" => {
            let (text, labels) = labels_of(r)?;
            let gold = index_of(&labels, s(r, "answerKey")?)?;
            Task1::Mc(mc(s(r, "question_stem")?.to_string(), text, gold, " "))
        }
        "hellaswag" => {
            let ctx = format!(
                "{} {}",
                s(r, "ctx_a")?,
                crate::lmeval::py_capitalize(s(r, "ctx_b")?)
            );
            let query = hellaswag_clean(&format!("{}: {ctx}", s(r, "activity_label")?));
            let endings = strs(r.get("endings"), "endings")?
                .iter()
                .map(|e| hellaswag_clean(e))
                .collect();
            Task1::Mc(mc(query, endings, int(r.get("label"), "label")?, " "))
        }
        "piqa" => Task1::Mc(mc(
            format!("Question: {}\nAnswer:", s(r, "goal")?),
            vec![s(r, "sol1")?.to_string(), s(r, "sol2")?.to_string()],
            int(r.get("label"), "label")?,
            " ",
        )),
        "sciq" => Task1::Mc(mc(
            format!(
                "{}\nQuestion: {}\nAnswer:",
                s(r, "support")?.trim_start(),
                s(r, "question")?
            ),
            vec![
                s(r, "distractor1")?.into(),
                s(r, "distractor2")?.into(),
                s(r, "distractor3")?.into(),
                s(r, "correct_answer")?.into(),
            ],
            3,
            " ",
        )),
        "boolq" => Task1::Mc(mc(
            format!(
                "{}\nQuestion: {}?\nAnswer:",
                s(r, "passage")?,
                s(r, "question")?
            ),
            vec!["no".into(), "yes".into()],
            int(r.get("label").or(r.get("answer")), "label")?,
            " ",
        )),
        "copa" => {
            let connector = match s(r, "question")? {
                "cause" => "because",
                "effect" => "therefore",
                q => bail!("copa: question {q:?} is neither cause nor effect"),
            };
            // Python's premise.strip()[:-1]: drop the last character (the full stop).
            let mut premise = s(r, "premise")?.trim().chars();
            premise.next_back();
            let premise = premise.as_str();
            // lm-eval's convert_choice, with the leading space its doc_to_choice adds: with the
            // default " " delimiter the continuation starts with two spaces, as lm-eval scores it.
            let lower = |c: &str| -> String {
                let mut it = c.chars();
                it.next()
                    .map(|f| format!(" {}{}", f.to_lowercase(), it.as_str()))
                    .unwrap_or_default()
            };
            Task1::Mc(mc(
                format!("{premise} {connector}"),
                vec![lower(s(r, "choice1")?), lower(s(r, "choice2")?)],
                int(r.get("label"), "label")?,
                " ",
            ))
        }
        "winogrande" => {
            let sentence = s(r, "sentence")?;
            let idx = sentence
                .find('_')
                .ok_or_else(|| anyhow!("winogrande: the sentence has no _"))?;
            let contexts: Vec<String> = [s(r, "option1")?, s(r, "option2")?]
                .iter()
                .map(|o| format!("{}{o}", &sentence[..idx]))
                .collect();
            let cont = sentence[idx + 1..].trim().to_string();
            let gold = int(r.get("answer"), "answer")?
                .checked_sub(1)
                .ok_or_else(|| anyhow!("winogrande: answer must be 1 or 2"))?;
            Task1::Mc(McDoc {
                requests: contexts
                    .iter()
                    .map(|c| (c.clone(), format!(" {cont}")))
                    .collect(),
                choices: contexts,
                gold,
            })
        }
        "gsm8k" => Task1::Gen(GenDoc {
            prompt: format!("Question: {}\nAnswer:", s(r, "question")?),
            answer: s(r, "answer")?.to_string(),
        }),
        "math500" => Task1::Gen(GenDoc {
            prompt: s(r, "problem")?.to_string(),
            answer: s(r, "answer")?.to_string(),
        }),
        "wikitext" => {
            let page = s(r, "page").or_else(|_| s(r, "text"))?;
            Task1::Ppl(PplDoc {
                scored: crate::lmeval::wikitext_detokenizer(page),
                counted: page.to_string(),
            })
        }
        other => bail!("unknown preset {other:?} (known: {})", PRESETS.join(", ")),
    })
}

enum Task1 {
    Mc(McDoc),
    Gen(GenDoc),
    Ppl(PplDoc),
}

/// A record in cf-eval's own layouts: {context, choices, gold} (names from `fields`),
/// {contexts, continuation, gold} (partial scoring), {text} (perplexity), {prompt|question, answer}.
fn plain_doc(r: &Record, f: &Fields) -> Result<Task1> {
    if r.contains_key("contexts") && r.contains_key("continuation") {
        let contexts = strs(r.get("contexts"), "contexts")?;
        let cont = s(r, "continuation")?;
        let gold = int(r.get(&f.gold), &f.gold)?;
        return Ok(Task1::Mc(McDoc {
            requests: contexts
                .iter()
                .map(|c| (c.clone(), format!("{}{cont}", f.delimiter)))
                .collect(),
            choices: contexts,
            gold,
        }));
    }
    if r.contains_key(&f.choices) {
        let choices = strs(r.get(&f.choices), &f.choices)?;
        let context = r
            .get(&f.context)
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("field \"{}\" is missing or not text", f.context))?;
        let gold = match r.get(&f.gold) {
            Some(Value::String(g)) if g.parse::<usize>().is_err() => index_of(&choices, g)?,
            g => int(g, &f.gold)?,
        };
        return Ok(Task1::Mc(mc(
            context.to_string(),
            choices,
            gold,
            &f.delimiter,
        )));
    }
    if let (Some(p), Some(a)) = (
        r.get("prompt")
            .or(r.get("question"))
            .or(r.get("problem"))
            .and_then(Value::as_str),
        r.get("answer"),
    ) {
        let answer = match a {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        return Ok(Task1::Gen(GenDoc {
            prompt: p.to_string(),
            answer,
        }));
    }
    if let Some(t) = r.get("text").and_then(Value::as_str) {
        return Ok(Task1::Ppl(PplDoc {
            scored: t.to_string(),
            counted: t.to_string(),
        }));
    }
    bail!(
        "cannot tell the task: expected \"{}\"/\"{}\"/\"{}\" (multiple choice), contexts/continuation, prompt/answer, or text",
        f.context, f.choices, f.gold
    )
}

/// Read a task file; every record must be of one kind.
pub fn load(
    path: &str,
    preset: Option<&str>,
    fields: &Fields,
    limit: Option<usize>,
) -> Result<Task> {
    let reader = record::open(Some(path), ReadOptions::default())?;
    let (mut mcs, mut gens, mut ppl) = (Vec::new(), Vec::new(), Vec::new());
    for r in reader {
        if limit.is_some_and(|l| mcs.len() + gens.len() + ppl.len() >= l) {
            break;
        }
        let (loc, rec) = r?;
        let doc = match preset {
            Some(p) => preset_doc(p, &rec),
            None => plain_doc(&rec, fields),
        }
        .with_context(|| loc.to_string())?;
        match doc {
            Task1::Mc(d) => {
                if d.gold >= d.requests.len() {
                    bail!(
                        "{loc}: gold {} is not among the {} choices",
                        d.gold,
                        d.requests.len()
                    );
                }
                mcs.push(d)
            }
            Task1::Gen(d) => gens.push(d),
            Task1::Ppl(d) => ppl.push(d),
        }
        if [!mcs.is_empty(), !gens.is_empty(), !ppl.is_empty()]
            .iter()
            .filter(|&&x| x)
            .count()
            > 1
        {
            bail!("{loc}: this record is of another kind of task than the ones before it");
        }
    }
    Ok(if !mcs.is_empty() {
        Task::MultipleChoice(mcs)
    } else if !gens.is_empty() {
        Task::Generative(gens)
    } else if !ppl.is_empty() {
        Task::Perplexity(ppl)
    } else {
        bail!("{path}: no records")
    })
}
