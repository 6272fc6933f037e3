//! Chat templates rendered with MiniJinja, with the Python-compatible methods and the extra
//! functions that Hugging Face templates use (`raise_exception`, `strftime_now`).

use anyhow::{anyhow, Result};
use minijinja::{context, Environment, Error, ErrorKind, Value};

/// Instructions a template may spend on one rendering. Real templates use a few thousand; a
/// template with runaway loops stops with an error instead of hanging with memory growing.
const FUEL: u64 = 5_000_000;

/// Marks the start and end of a `{% generation %}` block in the rendered text (private-use
/// characters, removed again before the text is returned).
const GEN_START: char = '\u{F8F0}';
const GEN_END: char = '\u{F8F1}';

/// A rendered conversation: the text, and the byte ranges that the template marked as the
/// assistant's own output with `{% generation %}` … `{% endgeneration %}` (TRL's
/// `assistant_only_loss`, transformers' `return_assistant_tokens_mask`).
#[derive(Clone, Debug, PartialEq)]
pub struct Rendered {
    pub text: String,
    pub generation: Vec<(usize, usize)>,
}

/// True when the template marks assistant output with `{% generation %}` blocks.
pub fn has_generation_markers(template: &str) -> bool {
    generation_tag().is_match(template)
}

/// `{% generation %}` / `{% endgeneration %}`, with whitespace control; compiled once.
fn generation_tag() -> &'static regex::Regex {
    static TAG: std::sync::LazyLock<regex::Regex> = std::sync::LazyLock::new(|| {
        regex::Regex::new(r"\{%(-?)\s*(end)?generation\s*(-?)%\}").expect("valid regex")
    });
    &TAG
}

/// Render `template` for `messages` (a JSON array of `{role, content}`).
pub fn render(
    template: &str,
    messages: &serde_json::Value,
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> Result<String> {
    Ok(render_spans(
        template,
        messages,
        add_generation_prompt,
        bos_token,
        eos_token,
    )?
    .text)
}

/// Render as transformers' `apply_chat_template` does: Jinja with `trim_blocks` and
/// `lstrip_blocks`, Python's string methods, `raise_exception`, and `{% generation %}` blocks
/// (which plain Jinja does not know; here they become a filter block around their output, so
/// whitespace control is that of a block tag, as in transformers' AssistantTracker).
pub fn render_spans(
    template: &str,
    messages: &serde_json::Value,
    add_generation_prompt: bool,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> Result<Rendered> {
    let source = generation_tag().replace_all(template, |c: &regex::Captures| {
        let (l, r) = (&c[1], &c[3]);
        if c.get(2).is_some() {
            format!("{{%{l} endfilter {r}%}}")
        } else {
            format!("{{%{l} filter cf_generation {r}%}}")
        }
    });
    let mut env = Environment::new();
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| anyhow!("chat template: {e}"))?,
    );
    env.set_fuel(Some(FUEL));
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |_fmt: String| -> String { String::new() });
    env.add_filter("cf_generation", |s: String| -> String {
        format!("{GEN_START}{s}{GEN_END}")
    });
    env.add_template("chat", &source)
        .map_err(|e| anyhow!("chat template: {e}"))?;
    let tmpl = env
        .get_template("chat")
        .map_err(|e| anyhow!("chat template: {e}"))?;
    let raw = tmpl
        .render(context! {
            messages => Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => bos_token.unwrap_or(""),
            eos_token => eos_token.unwrap_or(""),
        })
        .map_err(|e| match e.kind() {
            ErrorKind::OutOfFuel => {
                anyhow!("chat template: rendering took more than {FUEL} steps (runaway loops?)")
            }
            _ => anyhow!("chat template: {e}"),
        })?;
    let (mut text, mut generation, mut open) =
        (String::with_capacity(raw.len()), Vec::new(), Vec::new());
    for c in raw.chars() {
        match c {
            GEN_START => open.push(text.len()),
            GEN_END => {
                let s = open.pop().unwrap_or(0);
                if text.len() > s {
                    generation.push((s, text.len()));
                }
            }
            c => text.push(c),
        }
    }
    generation.sort_unstable();
    Ok(Rendered { text, generation })
}

/// The text a template puts before a user message's content: the opening of an empty user
/// turn, from which Magpie-style sampling starts.
pub fn user_turn_opening(
    template: &str,
    bos_token: Option<&str>,
    eos_token: Option<&str>,
) -> Result<String> {
    const MARK: &str = "\u{1}CF_USER_CONTENT\u{1}";
    let messages = serde_json::json!([{"role": "user", "content": MARK}]);
    let text = render(template, &messages, false, bos_token, eos_token)?;
    let cut = text.find(MARK).ok_or_else(|| {
        anyhow!("chat template: the user message does not appear in the rendering")
    })?;
    Ok(text[..cut].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_renders_and_opens_a_user_turn() {
        let m = serde_json::json!([{"role": "user", "content": "hi"}]);
        assert_eq!(
            render(CHATML, &m, true, None, None).unwrap(),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            user_turn_opening(CHATML, None, None).unwrap(),
            "<|im_start|>user\n"
        );
    }

    #[test]
    fn generation_blocks_give_spans_and_hf_whitespace_rules_hold() {
        let t = "{% for m in messages %}\n{% if m['role'] == 'assistant' %}\n{%- generation %}[{{ m['content'] }}]{% endgeneration -%}\n{% else %}\n<{{ m['content'] }}>\n{% endif %}\n{% endfor %}";
        assert!(has_generation_markers(t) && !has_generation_markers(CHATML));
        let m = serde_json::json!([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]);
        let r = render_spans(t, &m, false, None, None).unwrap();
        // trim_blocks drops the newline after a block tag, lstrip_blocks the indentation before.
        assert_eq!(r.text, "<q>\n[a]");
        assert_eq!(r.generation, vec![(4, 7)]);
        assert_eq!(&r.text[4..7], "[a]");
    }

    #[test]
    fn runaway_templates_stop() {
        let t = "{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}";
        let e = render(t, &serde_json::json!([]), false, None, None).unwrap_err();
        assert!(e.to_string().contains("more than"), "{e}");
    }

    #[test]
    fn python_methods_and_raise_exception_work() {
        let t = "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}{{ m['content'].strip() }}{% endfor %}";
        let ok = render(
            t,
            &serde_json::json!([{"role": "user", "content": "  x "}]),
            false,
            Some("<s>"),
            None,
        )
        .unwrap();
        assert_eq!(ok, "<s>x");
        let e = render(
            t,
            &serde_json::json!([{"role": "system", "content": "x"}]),
            false,
            None,
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("no system"), "{e}");
    }
}
