#!/usr/bin/env python3
"""lm-evaluation-harness reference for cf-eval.

    OMP_NUM_THREADS=1 python3 scripts/make_eval_reference.py      # writes fixtures/eval/

Needs the releases pinned in scripts/requirements.txt: lm_eval 0.4.13, transformers 5.24,
torch 2.15, datasets 5.2 (CPU; about 20 seconds). Everything is run by lm-eval itself, in float32
on CPU with batch size 1, through local YAML tasks (dataset_path: json) written to a temporary
folder; the model paths and data files are given relative to the repository root, which is made
the working directory, so no machine path ends up in the references (lm_eval_results.json aside).
lm-eval's max_length for the fixtures is their max_position_embeddings, 128. Every output but
lm_eval_results.json is byte-identical from run to run.

Task files (inputs, in cf-eval's record layouts):

  mc.jsonl          {"context", "choices", "gold"}: multiple choice by log-likelihood; contexts
                    with trailing spaces (lm-eval moves them onto the continuation), an empty one;
  wino.jsonl        {"contexts", "continuation", "gold"}: Winogrande-style partial scoring;
  long_mc.jsonl     {"context", "choices", "gold"}: context + continuation of max-1, max, max+1,
                    max+2, round(1.4 max) and 2 max+1 tokens (llama tokenizer, lm-eval's default
                    BOS; every choice of a document has the same count);
  long_ppl.jsonl    {"page"}: rolling log-likelihood documents of max-1, max, max+1, max+2,
                    round(1.4 max) and 2 max+1 tokens as lm-eval encodes them for rolling (llama,
                    default: BOS included);
  wikitext.jsonl    {"page"}: raw wikitext-style pages (" @-@ ", " 's", "( x )", ...);
  gsm8k_test.jsonl, gsm8k_train.jsonl  {"question", "answer"} in GSM8K's format ("#### N").

References (outputs):

  reference-llama.json, reference-qwen2.json      mc + wino, lm-eval's default (add_bos_token
                                                  not passed);
  reference-llama-bos-true.json, reference-llama-bos-false.json, reference-olmo2-bos-true.json
                                                  the same with add_bos_token=True / False.
      Each: {"lm_eval_version", "model", "add_bos_token", "tasks": {"cf_mc": {"acc", "acc_stderr",
      "acc_norm", "acc_norm_stderr", "loglikelihoods": [[per choice] per doc], "is_greedy",
      "results": lm-eval's results entry verbatim}, "cf_wino": {...}}}.
  reference-long.json    long_mc and long_ppl on llama (default BOS), long_ppl also with
                         add_bos_token=False; token counts as lm-eval's own tok_encode gives them.
  reference-wikitext.json  lm-eval's wikitext task (its preprocess_wikitext, imported) on llama:
                         per page the detokenized text (what is scored), words and bytes (of the
                         raw page), rolling_tokens (tok_encode of the target, BOS included),
                         log-likelihood; the three metrics.
  reference-gsm8k.json   lm-eval's gsm8k task (its YAML, with local data and max_gen_toks 16) on
                         llama, greedy, 0-, 3- and 5-shot (5 = the YAML's own num_fewshot): per doc
                         the prompt, generation arguments, raw generation (resps), both filters'
                         output and exact_match, prompt_tokens and the input_ids lm-eval's
                         tok_batch_encode keeps (the last max_length - 16); the task metrics.
  fewshot.json           the 3- and 5-shot prompts of those runs (fewshot seed 1234) and the train
                         documents they hold, in order (found by matching).
  gsm8k_filters.json     crafted generations through gsm8k's own filter pipelines (strict-match,
                         flexible-extract) and its process_results (exact_match with its kwargs).
  hellaswag.json         lm_eval.tasks.hellaswag.utils.process_docs on crafted documents.
  lm_eval_results.json   the results file lm-eval wrote (--output_path layout) for the llama
                         default run, verbatim: its date, timings, environment, git_hash (this
                         repository's commit), config_source (the temporary task folder) and
                         one function address vary by run and machine.
"""
import copy
import glob
import json
import os
import random
import shutil
import sys
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A private datasets cache: nothing stale from an earlier run of these same file names.
_CACHE = tempfile.mkdtemp(prefix="cf-eval-ref-cache-")
os.environ["HF_DATASETS_CACHE"] = _CACHE

import datasets  # noqa: E402
import lm_eval  # noqa: E402
import lm_eval.tasks  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.loggers import EvaluationTracker  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_process_docs  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, ".."))
OUT_REL = os.path.join("fixtures", "eval")
OUT = os.path.join(ROOT, OUT_REL)
TASKS_DIR = os.path.dirname(lm_eval.tasks.__file__)
VERSION = "0.4.13"
MAX = 128  # the fixtures' max_position_embeddings = lm-eval's max_length

MC = [
    {"context": "Question: what is 2 plus 2?\nAnswer:", "choices": ["4", "5", "22"], "gold": 0},
    {"context": "The cat sees the", "choices": ["moon", "sea", "red house", "number 42"], "gold": 0},
    {"context": "Fact 7: a robot is older than ", "choices": ["the river", "my friend"], "gold": 1},
    {"context": "", "choices": ["Question", "Answer", "Fact"], "gold": 2},
    {"context": "Question: what is 10 plus 31?\nAnswer: ", "choices": ["41", "14", "4 1"], "gold": 0},
    {"context": "Seven birds follow", "choices": ["green fields", "the sea", "three apples"], "gold": 1},
    {"context": "A dog likes", "choices": ["the moon.", "a red house.", "three apples."], "gold": 2},
    {"context": "The old king paints", "choices": ["the number 42", "green fields"], "gold": 0},
]

WINO = [
    {"contexts": ["The cat is older than the dog because the cat", "The cat is older than the dog because the dog"], "continuation": "was born first.", "gold": 0},
    {"contexts": ["My friend follows the robot since my friend", "My friend follows the robot since the robot"], "continuation": "knows the way.", "gold": 1},
    {"contexts": ["Seven birds see the moon but the moon", "Seven birds see the moon but the birds"], "continuation": "fly away.", "gold": 1},
]

# Long inputs: token counts (llama, lm-eval default BOS) around and beyond max_length.
LONG_COUNTS = [MAX - 1, MAX, MAX + 1, MAX + 2, round(1.4 * MAX), 2 * MAX + 1]
LONG_CHOICES = ["the moon", "the river", "the sea."]  # 4 tokens each after " " on llama
MC_FILLER = ("The cat sees the moon. A dog likes three apples. Seven birds follow the sea. "
             "My friend is older than the old king, and the robot paints green fields. ")
PPL_FILLER = ("Seven birds follow the sea.\nThe old king paints the number 42 on a red house;  "
              "my friend, a robot, likes three apples.\n\nThe cat sees the moon. ")

WIKITEXT = [
    " = Valkyria Chronicles III = \n \n Senjō no Valkyria 3 : Unrecorded Chronicles is a "
    "tactical role @-@ playing video game . It 's the third game in the series , released in "
    "2011 for 1 @,@ 000 @.@ 5 yen . \n",
    " = = Gameplay = = \n The cat @-@ dog sees the moon . It 's fine ( really ) . My friend "
    "said \" hello there \" and left ; the robot 's \" old \" king paints [ green ] fields , "
    "costing $ 3 @.@ 50 each at 20 ° C . \n = = = Plot = = = \n Seven birds follow the sea : "
    "they fly 1 @,@ 200 km , north @-@ east ! Is it N years ? Yes . \n \n",
    " = Robot = \n The robots ' king is older than the sea . \n",
]

GSM8K_TRAIN = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?", "answer": "Tom has 3 + 4 = <<3+4=7>>7 apples.\n#### 7"},
    {"question": "A box holds 12 eggs. How many eggs are in 2 boxes?", "answer": "2 boxes hold 2 * 12 = <<2*12=24>>24 eggs.\n#### 24"},
    {"question": "Sara reads 5 pages a day. How many pages in 6 days?", "answer": "She reads 5 * 6 = <<5*6=30>>30 pages.\n#### 30"},
    {"question": "A shirt costs $15 and pants cost $25. What is the total?", "answer": "The total is 15 + 25 = $<<15+25=40>>40.\n#### 40"},
    {"question": "There are 9 birds and 4 fly away. How many remain?", "answer": "9 - 4 = <<9-4=5>>5 birds remain.\n#### 5"},
    {"question": "Ann has 100 dollars and spends 35. How much is left?", "answer": "100 - 35 = <<100-35=65>>65\n#### 65"},
    {"question": "A car travels 60 miles per hour for 3 hours. How far does it go?", "answer": "It goes 60 * 3 = <<60*3=180>>180 miles.\n#### 180"},
    {"question": "Split 48 cookies among 6 kids. How many each?", "answer": "Each kid gets 48 / 6 = <<48/6=8>>8 cookies.\n#### 8"},
    {"question": "A farm has 1,000 hens and buys 250 more. How many hens?", "answer": "1,000 + 250 = <<1000+250=1250>>1,250 hens.\n#### 1,250"},
    {"question": "The temperature was 2 degrees and fell by 5. What is it now?", "answer": "2 - 5 = <<2-5=-3>>-3 degrees.\n#### -3"},
]

GSM8K_TEST = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"},
    {"question": "What is 1,000 plus 2?", "answer": "1,000 + 2 = <<1000+2=1002>>1,002\n#### 1,002"},
    {"question": "A baker starts the morning with 3 trays of 12 rolls. During the day she sells 17 rolls to the school, 9 rolls to the cafe on the corner, "
                 "gives 2 rolls to her neighbour, drops 1 roll on the floor and eats 1 roll herself at lunch. In the evening her brother brings back 4 rolls "
                 "that the school did not need. How many rolls does she have at the end of the day?",
     "answer": "She starts with 3 * 12 = <<3*12=36>>36 rolls.\nShe loses 17 + 9 + 2 + 1 + 1 = <<17+9+2+1+1=30>>30 rolls.\nShe ends with 36 - 30 + 4 = <<36-30+4=10>>10 rolls.\n#### 10"},
    # The fixture's greedy zero-shot output holds a lone "7": one flexible-extract match.
    {"question": "It is 10 degrees and the temperature drops 3 degrees. What is it now?", "answer": "10 - 3 = <<10-3=7>>7 degrees.\n#### 7"},
]

# Crafted generations for gsm8k's filters and exact_match: (output, gold answer field).
FILTER_CASES = [
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "Natalia sold 24 + 48 = <<24+48=72>>72 clips.\n#### 72"),
    ("#### 72", "#### 72"),
    ("#### $1,002.", "1,000 + 2 = <<1000+2=1002>>1,002\n#### 1,002"),
    ("#### 1,002", "#### 1002"),
    ("#### -3", "#### -3"),
    ("#### - 3", "#### -3"),
    ("#### \u22123", "#### -3"),
    ("The answer is 72.", "#### 72"),
    ("72\n", "#### 72"),
    ("72", "#### 72."),
    ("I do not know.", "#### 5"),
    ("", "#### 5"),
    ("First 3 apples, then 4 more, so 3 + 4 = 7 apples in total.", "#### 7"),
    ("3 + 4 = 7, so 7 * 2 = 14", "#### 14"),
    ("#### 7 2", "#### 72"),
    ("1,000,000", "#### 1000000"),
    ("It costs $5", "#### 5"),
    ("$5", "#### 5"),
    ("3.50", "#### 3.5"),
    ("The price is $3.50.", "#### 3.50"),
    (".5", "#### 0.5"),
    ("The answer is 18.", "#### 18"),
    ("#### 5\n#### 6", "#### 6"),
    ("#### 5 and later #### 6", "#### 5"),
    ("#### 12\n", "#### 12"),
    ("#### 12\nQuestion: what next?", "#### 12"),
    ("####72", "#### 72"),
    ("#### 42.0", "#### 42"),
    ("#### 08", "#### 8"),
    ("#### ...", "#### 5"),
    ("#### 1,2,3", "#### 123"),
    ("The answer is -5 degrees", "#### -5"),
    ("100%", "#### 100"),
    ("1/2 of it", "#### 0.5"),
    ("#### \uff17\uff12", "#### 72"),
    ("so 2.5.", "#### 2.5"),
    ("no number at all", "#### [INVALID]"),
    ("#### 5", "#### 5\u0000"),
    ("#### 72", "#### 72.\n"),
    ("#### 72", "She earns 6 * 12 = $<<6*12=72>>72.\n#### $72"),
    ("Answer: 9 \n#### 9. ", "#### 9"),
    ("- 7", "#### -7"),
]

# hellaswag: process_docs on crafted docs (label is a string in the HF dataset).
HELLASWAG = [
    {"activity_label": "Cooking", "ctx_a": "A man cuts onions.", "ctx_b": "he [header] then", "endings": ["cries [title] a lot", "sings a [b] c [unclosed d"], "label": "0"},
    {"activity_label": "Walking", "ctx_a": "A woman walks.", "ctx_b": "\u00dfie geht weiter", "endings": ["to the park.", "home."], "label": "1"},
    {"activity_label": "Digraphs", "ctx_a": "A sign reads.", "ctx_b": "\u01c6ungla and \u01c5ungla and \u01c4UNGLA", "endings": ["ok.", "no."], "label": "0"},
    {"activity_label": "Apostrophe", "ctx_a": "Dutch words.", "ctx_b": "\u0149 is a letter", "endings": ["yes", "no"], "label": "1"},
    {"activity_label": "Ligature", "ctx_a": "At the pond.", "ctx_b": "\ufb01sh swim \ufb02at", "endings": ["fast.", "slow."], "label": "0"},
    {"activity_label": "Turkish", "ctx_a": "In the city.", "ctx_b": "\u0130stanbul and \u0130ZM\u0130R are BIG", "endings": ["\u0130t is.", "it is not."], "label": "0"},
    {"activity_label": "Greek", "ctx_a": "A word.", "ctx_b": "\u039f\u0394\u039f\u03a3 \u039a\u0391\u0399 \u039b\u039f\u0393\u039f\u03a3. \u03a3 \u039f\u03a3\u039f\u03a3", "endings": ["\u039f\u0394\u039f\u03a3", "\u03c3\u03bf\u03c6\u03bf\u03c2"], "label": "1"},
    {"activity_label": "Sports", "ctx_a": "The NBA game starts.", "ctx_b": "THE PLAYERS RUN to the NBA court", "endings": ["and SCORE.", "and Miss."], "label": "0"},
    {"activity_label": "Empty", "ctx_a": "A man stands.", "ctx_b": "", "endings": ["He sits.", " He  runs . "], "label": "1"},
    {"activity_label": "How to cook rice", "ctx_a": "[title] Rinse the rice. [step] Put it in a pot.", "ctx_b": "then [title] boil water", "endings": ["[title] Add salt. [step] Stir.", "Wait [title] and eat."], "label": "0"},
    {"activity_label": "Brackets", "ctx_a": "A [a [b] c] d and [x\ny] z.", "ctx_b": "[unmatched starts", "endings": ["one [two] three [four", "a ] b [ c ] d", "[][]"], "label": "2"},
    {"activity_label": "Spaces", "ctx_a": "  Leading  and   triple   spaces.  ", "ctx_b": "  spaced  out  ", "endings": ["  two  spaces  ", "a    four", "tab\there"], "label": "1"},
    {"activity_label": "", "ctx_a": "", "ctx_b": "x", "endings": ["y"], "label": "0"},
]

YAML_MC = """task: cf_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
  - metric: acc_norm
"""

YAML_WINO = """task: cf_wino
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: gold
doc_to_choice: contexts
doc_to_target: continuation
metric_list:
  - metric: acc
"""

YAML_LONG_PPL = """task: cf_long_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: "{{{{page}}}}"
process_results: !function preprocess_wikitext.process_results
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""

# lm-eval's own wikitext functions, imported (the YAML's !function needs a file beside it).
PREPROCESS_WIKITEXT = (
    "from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer  # noqa: F401\n"
)


def replace_once(text, old, new):
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times"
    return text.replace(old, new)


def data_files(**splits):
    return "dataset_path: json\ndataset_kwargs:\n  data_files:\n" + "".join(
        f"    {k}: {v}\n" for k, v in splits.items())


def wikitext_yaml(path):
    y = open(os.path.join(TASKS_DIR, "wikitext", "wikitext.yaml")).read()
    y = replace_once(y, "task: wikitext\n", "task: cf_wikitext\n")
    return replace_once(
        y, "dataset_path: EleutherAI/wikitext_document_level\ndataset_name: wikitext-2-raw-v1\n",
        data_files(train=path, validation=path, test=path))


def gsm8k_yaml(train, test):
    y = open(os.path.join(TASKS_DIR, "gsm8k", "gsm8k.yaml")).read()
    y = replace_once(y, "task: gsm8k\n", "task: cf_gsm8k\n")
    y = replace_once(y, "dataset_path: openai/gsm8k\ndataset_name: main\n", data_files(train=train, test=test))
    return replace_once(y, "  temperature: 0.0\n", "  temperature: 0.0\n  max_gen_toks: 16\n")


def write_jsonl(name, rows):
    with open(os.path.join(OUT, name), "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return os.path.join(OUT_REL, name)


def dump(name, obj):
    with open(os.path.join(OUT, name), "w") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")


def model_args(model, bos):
    a = {"pretrained": os.path.join("fixtures", "models", model), "dtype": "float32"}
    if bos is not None:
        a["add_bos_token"] = bos
    return a


def evaluate(tm, model, bos, tasks, num_fewshot=None, tracker=None):
    return lm_eval.simple_evaluate(
        model="hf", model_args=model_args(model, bos), tasks=tasks, task_manager=tm,
        num_fewshot=num_fewshot, log_samples=True, batch_size=1, device="cpu",
        evaluation_tracker=tracker)


def samples_of(res, task, filt=None):
    s = [x for x in res["samples"][task] if filt is None or x["filter"] == filt]
    return sorted(s, key=lambda x: x["doc_id"])


def mc_reference(res, task):
    r = res["results"][task]
    s = samples_of(res, task)
    return {
        "acc": r["acc,none"],
        "acc_stderr": r["acc_stderr,none"],
        "acc_norm": r.get("acc_norm,none"),
        "acc_norm_stderr": r.get("acc_norm_stderr,none"),
        "loglikelihoods": [[float(x[0]) for x in d["filtered_resps"]] for d in s],
        "is_greedy": [[bool(x[1]) for x in d["filtered_resps"]] for d in s],
        "results": r,
    }


def ppl_reference(res, task):
    r = res["results"][task]
    docs = []
    for d in samples_of(res, task):
        docs.append({
            "loglikelihood": float(d["filtered_resps"][0] if isinstance(d["filtered_resps"], list) else d["filtered_resps"]),
            "target": d["target"],
            "words": d["word_perplexity"][1],
            "bytes": d["byte_perplexity"][1],
        })
    return {
        "word_perplexity": r["word_perplexity,none"],
        "byte_perplexity": r["byte_perplexity,none"],
        "bits_per_byte": r["bits_per_byte,none"],
        "loglikelihoods": [d["loglikelihood"] for d in docs],
        "docs": docs,
        "results": r,
    }


def reference_header(model, bos):
    return {"lm_eval_version": VERSION, "model": model, "add_bos_token": bos}


# ---------------------------------------------------------------- long inputs

def long_mc_docs(lm):
    """Contexts: a prefix of MC_FILLER (repeated), trimmed character by character until
    context + " " + choice is the wanted number of tokens for every choice."""
    filler = MC_FILLER * 8
    docs, counts = [], []
    start = 0
    for i, want in enumerate(LONG_COUNTS):
        found = None
        for n in range(1, len(filler) - start):
            ctx = filler[start:start + n].rstrip()
            if not ctx:
                continue
            lens = [len(lm.tok_encode(ctx + " " + c)) for c in LONG_CHOICES]
            if all(x == want for x in lens):
                found = ctx
                break
            if min(lens) > want:
                break
        assert found is not None, f"no context of {want} tokens"
        pairs = [lm._encode_pair(found, " " + c) for c in LONG_CHOICES]
        docs.append({"context": found, "choices": list(LONG_CHOICES), "gold": i % len(LONG_CHOICES)})
        counts.append({"target": want, "whole": want,
                       "context": [len(p[0]) for p in pairs],
                       "continuation": [len(p[1]) for p in pairs]})
        start = (start + 23) % len(MC_FILLER)  # vary the text a little between documents
    return docs, counts


def long_ppl_docs(lm):
    filler = PPL_FILLER * 8
    docs = []
    start = 0
    for want in LONG_COUNTS:
        found = None
        for n in range(1, len(filler) - start):
            page = filler[start:start + n]
            k = len(lm.tok_encode(page))
            if k == want:
                found = page
                break
            if k > want:
                break
        assert found is not None, f"no page of {want} tokens"
        docs.append({"page": found})
        start = (start + 31) % len(PPL_FILLER)
    return docs


def rolling_counts(lm, pages):
    return [len(lm.tok_encode(p["page"])) for p in pages]


# ---------------------------------------------------------------- gsm8k

def gsm8k_run(res, task):
    strict = {d["doc_id"]: d for d in samples_of(res, task, "strict-match")}
    flex = {d["doc_id"]: d for d in samples_of(res, task, "flexible-extract")}
    docs = []
    for i in sorted(strict):
        s, f = strict[i], flex[i]
        assert s["arguments"] == f["arguments"] and s["resps"] == f["resps"]
        (args,) = s["arguments"]
        docs.append({
            "doc_id": i,
            "target": s["target"],
            "prompt": args[0],
            "gen_kwargs": args[1],
            "resps": s["resps"][0][0],
            "filtered_resps": {"strict-match": s["filtered_resps"][0], "flexible-extract": f["filtered_resps"][0]},
            "exact_match": {"strict-match": s["exact_match"], "flexible-extract": f["exact_match"]},
        })
    r = res["results"][task]
    return {
        "n_shot": res["n-shot"][task],
        "metrics": {k: v for k, v in r.items() if k.startswith("exact_match")},
        "docs": docs,
        "results": r,
    }


def shots_in(prompt, train):
    """The train documents of a few-shot prompt, in order, by matching their rendered turns."""
    turns = prompt.split("\n\n")[:-1] if prompt.count("Question: ") > 1 else []
    idx = []
    for t in turns:
        hits = [j for j, d in enumerate(train) if t == f"Question: {d['question']}\nAnswer: {d['answer']}"]
        assert len(hits) == 1, t
        idx.append(hits[0])
    return idx


# ---------------------------------------------------------------- filters, hellaswag

def gsm8k_filter_cases(tm):
    task = tm.load("cf_gsm8k")["tasks"]["cf_gsm8k"]
    names = [f.name for f in task._filters]
    assert names == ["strict-match", "flexible-extract"], names
    docs = [{"question": "Q?", "answer": gold} for _, gold in FILTER_CASES]
    instances = [
        Instance("generate_until", doc, ("Question: Q?\nAnswer:", {}), 0, ("cf_gsm8k", i, 1), resps=[out])
        for i, ((out, _), doc) in enumerate(zip(FILTER_CASES, docs))
    ]
    for f in task._filters:
        f.apply(instances)
    rows = []
    for (out, gold), doc, inst in zip(FILTER_CASES, docs, instances):
        row = {"output": out, "gold": gold}
        for key, short in [("strict-match", "strict"), ("flexible-extract", "flexible")]:
            filtered = inst.filtered_resps[key]
            row[short] = filtered
            m = task.process_results(doc, [filtered])
            row[short + "_match"] = int(m["exact_match"])
        rows.append(row)
    return {
        "lm_eval_version": VERSION,
        "filter_list": task.config.filter_list,
        "exact_match_kwargs": task._metric_fn_kwargs["exact_match"],
        "cases": rows,
    }


def hellaswag_cases():
    ds = datasets.Dataset.from_list(HELLASWAG)
    out = hellaswag_process_docs(ds)
    return {
        "lm_eval_version": VERSION,
        "cases": [{"doc": d, "query": o["query"], "choices": o["choices"], "gold": o["gold"]}
                  for d, o in zip(HELLASWAG, out)],
    }


# ---------------------------------------------------------------- main

def main():
    os.chdir(ROOT)
    os.makedirs(OUT, exist_ok=True)
    p = {
        "mc": write_jsonl("mc.jsonl", MC),
        "wino": write_jsonl("wino.jsonl", WINO),
        "wikitext": write_jsonl("wikitext.jsonl", [{"page": t} for t in WIKITEXT]),
        "gsm8k_train": write_jsonl("gsm8k_train.jsonl", GSM8K_TRAIN),
        "gsm8k_test": write_jsonl("gsm8k_test.jsonl", GSM8K_TEST),
    }

    # Token counts as lm-eval's HFLM encodes them (llama, default BOS and add_bos_token=False).
    counter = HFLM(pretrained=model_args("llama", None)["pretrained"], dtype="float32", device="cpu")
    counter_nobos = HFLM(pretrained=model_args("llama", None)["pretrained"], dtype="float32", device="cpu", add_bos_token=False)
    assert counter.max_length == MAX
    long_mc, long_mc_counts = long_mc_docs(counter)
    long_ppl = long_ppl_docs(counter)
    p["long_mc"] = write_jsonl("long_mc.jsonl", long_mc)
    p["long_ppl"] = write_jsonl("long_ppl.jsonl", long_ppl)
    ppl_counts = {"default": rolling_counts(counter, long_ppl), "false": rolling_counts(counter_nobos, long_ppl)}
    assert ppl_counts["default"] == LONG_COUNTS, ppl_counts

    # A fixed folder, so that the results file's config_source paths are the same every run.
    tasks = os.path.join(tempfile.gettempdir(), "cf-eval-reference-tasks")
    shutil.rmtree(tasks, ignore_errors=True)
    os.makedirs(tasks)
    try:
        w = lambda name, text: open(os.path.join(tasks, name), "w").write(text)  # noqa: E731
        w("cf_mc.yaml", YAML_MC.format(path=p["mc"]))
        w("cf_wino.yaml", YAML_WINO.format(path=p["wino"]))
        w("cf_long_mc.yaml", YAML_MC.replace("task: cf_mc", "task: cf_long_mc").format(path=p["long_mc"]))
        w("cf_long_ppl.yaml", YAML_LONG_PPL.format(path=p["long_ppl"]))
        w("preprocess_wikitext.py", PREPROCESS_WIKITEXT)
        w("cf_wikitext.yaml", wikitext_yaml(p["wikitext"]))
        w("cf_gsm8k.yaml", gsm8k_yaml(p["gsm8k_train"], p["gsm8k_test"]))
        tm = TaskManager(include_path=tasks)

        # 1. mc + wino under each BOS setting; the llama default run also does every other task
        #    (gsm8k at its YAML's 5 shots) and writes lm-eval's results file.
        out_dir = tempfile.mkdtemp(prefix="cf-eval-ref-out-")
        tracker = EvaluationTracker(output_path=out_dir)
        main_tasks = ["cf_mc", "cf_wino", "cf_long_mc", "cf_long_ppl", "cf_wikitext", "cf_gsm8k"]
        res_main = evaluate(tm, "llama", None, main_tasks, tracker=tracker)
        saved = copy.deepcopy(res_main)
        samples = saved.pop("samples")
        tracker.save_results_aggregated(results=saved, samples=samples)
        (results_file,) = glob.glob(os.path.join(out_dir, "*", "results_*.json"))
        shutil.copyfile(results_file, os.path.join(OUT, "lm_eval_results.json"))
        shutil.rmtree(out_dir)

        runs = {("llama", None): res_main}
        for model, bos in [("qwen2", None), ("llama", True), ("llama", False), ("olmo2", True)]:
            extra = ["cf_long_ppl"] if (model, bos) == ("llama", False) else []
            runs[(model, bos)] = evaluate(tm, model, bos, ["cf_mc", "cf_wino"] + extra)
        for (model, bos), res in runs.items():
            ref = reference_header(model, bos)
            ref["tasks"] = {t: mc_reference(res, t) for t in ["cf_mc", "cf_wino"]}
            name = f"reference-{model}.json" if bos is None else f"reference-{model}-bos-{str(bos).lower()}.json"
            dump(name, ref)
            print(name, {t: (v["acc"], v["acc_norm"]) for t, v in ref["tasks"].items()})

        # 2. long inputs.
        long_ref = {
            "lm_eval_version": VERSION, "model": "llama", "max_length": MAX,
            "long_mc": {"token_counts": long_mc_counts,
                        "bos-default": mc_reference(res_main, "cf_long_mc")},
            "long_ppl": {"token_counts": ppl_counts,
                         "bos-default": ppl_reference(res_main, "cf_long_ppl"),
                         "bos-false": ppl_reference(runs[("llama", False)], "cf_long_ppl")},
        }
        dump("reference-long.json", long_ref)

        # 3. wikitext.
        wiki = ppl_reference(res_main, "cf_wikitext")
        for d, page in zip(wiki["docs"], WIKITEXT):
            d["page"] = page
            d["rolling_tokens"] = len(counter.tok_encode(d["target"]))
        wiki_ref = {"lm_eval_version": VERSION, "model": "llama", "add_bos_token": None, **wiki}
        wiki_ref["detokenized"] = [d["target"] for d in wiki["docs"]]
        dump("reference-wikitext.json", wiki_ref)

        # 4./6. gsm8k at 0 and 3 shots (5 shots came with the main run).
        res0 = evaluate(tm, "llama", None, ["cf_gsm8k"], num_fewshot=0)
        res3 = evaluate(tm, "llama", None, ["cf_gsm8k"], num_fewshot=3)
        gsm = {"lm_eval_version": VERSION, "model": "llama", "add_bos_token": None,
               "max_length": MAX, "max_gen_toks": 16, "runs": {}}
        fewshot = {"lm_eval_version": VERSION, "fewshot_seed": 1234, "runs": {}}
        for n, res in [(0, res0), (3, res3), (5, res_main)]:
            run = gsm8k_run(res, "cf_gsm8k")
            assert run["n_shot"] == n, (run["n_shot"], n)
            for d in run["docs"]:
                # The prompt as lm-eval's generate_until encodes it: default special tokens,
                # then the last max_length - max_gen_toks ids.
                d["prompt_tokens"] = len(counter.tok_encode(d["prompt"]))
                ids, _ = counter.tok_batch_encode([d["prompt"]], left_truncate_len=MAX - 16)
                d["input_ids"] = ids[0].tolist()
            gsm["runs"][str(n)] = run
            if n:
                rnd = random.Random(1234)
                docs = []
                for d in run["docs"]:
                    shots = shots_in(d["prompt"], GSM8K_TRAIN)
                    # lm-eval's default sampler: one Random(1234) per task, sample(pool, n) per doc.
                    assert shots == rnd.sample(range(len(GSM8K_TRAIN)), n), shots
                    docs.append({"doc_id": d["doc_id"], "train_indices": shots, "prompt": d["prompt"]})
                fewshot["runs"][str(n)] = docs
        dump("reference-gsm8k.json", gsm)
        dump("fewshot.json", fewshot)

        # 5. gsm8k's filters and exact_match on crafted generations.
        dump("gsm8k_filters.json", gsm8k_filter_cases(tm))

        # 7. hellaswag process_docs.
        dump("hellaswag.json", hellaswag_cases())
    finally:
        shutil.rmtree(tasks, ignore_errors=True)
        shutil.rmtree(_CACHE, ignore_errors=True)

    print("long_mc whole counts:", [c["whole"] for c in long_mc_counts])
    print("long_ppl rolling counts:", ppl_counts)
    print("gsm8k prompt tokens:", {n: [d["prompt_tokens"] for d in r["docs"]] for n, r in gsm["runs"].items()})


if __name__ == "__main__":
    sys.exit(main())
