//! A corpus of malformed inputs and faults, across the five tools. Each case asserts: exit 2
//! (or the stated code), exactly one line on stderr, `TOOL: error: ` and the place (file:line,
//! field, flag or file) in it, no panic, nothing on stdout, and no output or temporary file
//! left behind.

use crate::util::*;
use serde_json::json;
use std::path::Path;

struct Case {
    tool: &'static str,
    args: Vec<String>,
    stdin: Option<Vec<u8>>,
    needle: String,
}

fn case(tool: &'static str, args: &[&str], needle: &str) -> Case {
    Case {
        tool,
        args: args.iter().map(|s| s.to_string()).collect(),
        stdin: None,
        needle: needle.to_string(),
    }
}

/// The files the cases read: good and bad records, and broken copies of the llama fixture.
fn setup(d: &Path) {
    let w = |name: &str, bytes: &[u8]| std::fs::write(d.join(name), bytes).unwrap();
    w(
        "good.jsonl",
        b"{\"text\": \"The cat sees the moon.\"}\n{\"text\": \"Seven birds.\"}\n",
    );
    w(
        "prompts.jsonl",
        b"{\"prompt\": \"The cat\"}\n{\"prompt\": \"A dog\"}\n",
    );
    w(
        "mc.jsonl",
        b"{\"context\": \"The cat sees the\", \"choices\": [\"moon\", \"sea\"], \"gold\": 0}\n",
    );
    w("notjson.jsonl", b"{\"text\": \"ok\"}\n{\"text\": oops}\n");
    w("array.jsonl", b"{\"text\": \"ok\"}\n[1, 2]\n");
    w(
        "number.jsonl",
        b"{\"text\": \"ok\"}\n{\"text\": \"ok\"}\n42\n",
    );
    w(
        "cut.jsonl",
        b"{\"text\": \"ok\"}\n{\"text\": \"unterminated\n",
    );
    w(
        "utf8.jsonl",
        b"{\"text\": \"ok\"}\n{\"text\": \"\xff\xfe\"}\n",
    );
    w("empty.jsonl", b"");
    w("fake.parquet", b"PAR1 this is not parquet PAR1");
    w("short.parquet", b"PAR1");
    w(
        "noext",
        b"\x00\x01garbage that is neither JSONL nor Parquet",
    );
    w("wrongtype.jsonl", b"{\"text\": \"ok\"}\n{\"text\": 5}\n");
    w(
        "ids.jsonl",
        b"{\"token_ids\": [5, 6]}\n{\"token_ids\": [5, 999999]}\n",
    );
    w(
        "neg_ids.jsonl",
        b"{\"token_ids\": [5, 6]}\n{\"token_ids\": [5, -3]}\n",
    );
    w(
        "str_ids.jsonl",
        b"{\"token_ids\": [5, 6]}\n{\"token_ids\": \"5 6\"}\n",
    );
    w(
        "nan_logprob.jsonl",
        b"{\"token_ids\": [5, 6], \"logprob\": \"x\"}\n",
    );
    w("mc_badgold.jsonl", b"{\"context\": \"a\", \"choices\": [\"x\", \"y\"], \"gold\": 0}\n{\"context\": \"b\", \"choices\": [\"x\"], \"gold\": 3}\n");
    w(
        "mc_nochoices.jsonl",
        b"{\"context\": \"a\", \"choices\": \"x\", \"gold\": 0}\n",
    );
    w(
        "mc_mixed.jsonl",
        b"{\"context\": \"a\", \"choices\": [\"x\"], \"gold\": 0}\n{\"text\": \"t\"}\n",
    );
    w(
        "mc_goldstr.jsonl",
        b"{\"context\": \"a\", \"choices\": [\"x\", \"y\"], \"gold\": \"z\"}\n",
    );
    w(
        "train_nothing.jsonl",
        b"{\"text\": \"ok\"}\n{\"question\": \"?\"}\n",
    );
    w(
        "train_badweight.jsonl",
        b"{\"text\": \"ok\", \"weight\": -1}\n",
    );
    w("train_badmsgs.jsonl", b"{\"messages\": \"hi\"}\n");
    w(
        "train_pc_mixed.jsonl",
        b"{\"prompt\": \"a\", \"completion\": [{\"role\": \"assistant\", \"content\": \"b\"}]}\n",
    );
    w(
        "train_sharegpt.jsonl",
        b"{\"conversations\": [{\"from\": \"alien\", \"value\": \"x\"}]}\n",
    );
    w("prompts_bad.jsonl", b"{\"prompt\": 5}\n");
    w("gsm_noanswer.jsonl", b"{\"question\": \"2+2?\"}\n");
    w("arc_badkey.jsonl", &(json!({"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "C"}).to_string() + "\n").into_bytes());
    w(
        "hs_nolabel.jsonl",
        &(json!({"activity_label": "x", "ctx_a": "a", "ctx_b": "b", "endings": ["c"]}).to_string()
            + "\n")
            .into_bytes(),
    );
    w(
        "copa_bad.jsonl",
        &(json!({"premise": "p.", "choice1": "a", "choice2": "b", "question": "why", "label": 0})
            .to_string()
            + "\n")
            .into_bytes(),
    );
    w(
        "wg_bad.jsonl",
        &(json!({"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"})
            .to_string()
            + "\n")
            .into_bytes(),
    );
    w("bad.toml", b"lr = \"fast\"\n");
    w("unknown.toml", b"learning_rate = 1\n");
    w("broken.toml", b"lr = = 1\n");
    w(
        "loop.jinja",
        b"{% for a in range(100000) %}{% for b in range(100000) %}x{% endfor %}{% endfor %}",
    );
    w("syntax.jinja", b"{% for m in messages %}{{ m['content'] }");
    w("chat.jsonl", b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}\n");
    // Broken models: copies of the llama fixture with one thing wrong.
    let fx = fixture("llama");
    let model = |name: &str, edit: &dyn Fn(&Path)| {
        let m = d.join(name);
        std::fs::create_dir_all(&m).unwrap();
        for e in std::fs::read_dir(&fx).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), m.join(e.file_name())).unwrap();
        }
        edit(&m);
    };
    let cfg = |m: &Path, f: &dyn Fn(&mut serde_json::Value)| {
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(m.join("config.json")).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(m.join("config.json"), v.to_string()).unwrap();
    };
    model("m_noconfig", &|m| {
        std::fs::remove_file(m.join("config.json")).unwrap()
    });
    model("m_badconfig", &|m| {
        std::fs::write(m.join("config.json"), "{not json").unwrap()
    });
    model("m_arch", &|m| cfg(m, &|v| v["model_type"] = json!("gpt2")));
    model("m_act", &|m| cfg(m, &|v| v["hidden_act"] = json!("gelu")));
    model("m_heads", &|m| {
        cfg(m, &|v| v["num_key_value_heads"] = json!(3))
    });
    model("m_yarn", &|m| {
        cfg(m, &|v| {
            v["rope_parameters"] = json!({"rope_type": "yarn", "factor": 4.0})
        })
    });
    model("m_yarn_old", &|m| {
        cfg(m, &|v| {
            v["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0})
        })
    });
    model("m_llama3_missing", &|m| {
        cfg(m, &|v| {
            v["rope_parameters"] = json!({"rope_type": "llama3", "factor": 8.0})
        })
    });
    model("m_vocab", &|m| cfg(m, &|v| v["vocab_size"] = json!(10)));
    model("m_hidden", &|m| cfg(m, &|v| v["hidden_size"] = json!(96)));
    model("m_notok", &|m| {
        std::fs::remove_file(m.join("tokenizer.json")).unwrap()
    });
    model("m_badtok", &|m| {
        std::fs::write(m.join("tokenizer.json"), "{}").unwrap()
    });
    model("m_badtc", &|m| {
        std::fs::write(m.join("tokenizer_config.json"), "{bad").unwrap()
    });
    model("m_bostok", &|m| {
        std::fs::write(
            m.join("tokenizer_config.json"),
            "{\"bos_token\": \"<nope>\"}",
        )
        .unwrap()
    });
    model("m_noweights", &|m| {
        std::fs::remove_file(m.join("model.safetensors")).unwrap()
    });
    model("m_bin", &|m| {
        std::fs::remove_file(m.join("model.safetensors")).unwrap();
        std::fs::write(m.join("pytorch_model.bin"), b"pickle").unwrap();
    });
    model("m_badst", &|m| {
        std::fs::write(
            m.join("model.safetensors"),
            b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json",
        )
        .unwrap()
    });
    model("m_truncst", &|m| {
        let b = std::fs::read(m.join("model.safetensors")).unwrap();
        std::fs::write(m.join("model.safetensors"), &b[..b.len() / 2]).unwrap();
    });
    model("m_badgen", &|m| {
        std::fs::write(m.join("generation_config.json"), "[oops").unwrap()
    });
    // An 8B-wide, 4000-layer config (~3 TB in f32): more memory than any machine running the
    // tests has, said before any weight is read.
    model("m_huge", &|m| {
        cfg(m, &|v| {
            v["hidden_size"] = json!(4096);
            v["intermediate_size"] = json!(14336);
            v["num_hidden_layers"] = json!(4000);
            v["num_attention_heads"] = json!(32);
            v["num_key_value_heads"] = json!(8);
            v["vocab_size"] = json!(128256);
        })
    });
    model("m_loop", &|m| {
        std::fs::copy(d.join("loop.jinja"), m.join("chat_template.jinja"))
            .map(drop)
            .unwrap()
    });
}

fn cases(d: &Path) -> Vec<Case> {
    let fx = fixture("llama");
    let fx = fx.to_str().unwrap();
    let mut v = Vec::new();
    // Bad records, read by every tool that reads records.
    let bad_records = [
        ("notjson.jsonl", "notjson.jsonl:2"),
        ("array.jsonl", "array.jsonl:2"),
        ("number.jsonl", "number.jsonl:3"),
        ("cut.jsonl", "cut.jsonl:2"),
        ("utf8.jsonl", "utf8.jsonl:2"),
        ("fake.parquet", "fake.parquet"),
        ("short.parquet", "short.parquet"),
        ("noext", "noext"),
    ];
    for (f, needle) in bad_records {
        v.push(case("cf-mix", &[f, "-o", "OUT.jsonl"], needle));
        v.push(case(
            "cf-kl",
            &["--base", fx, "--model", fx, f, "--per-record", "OUT.jsonl"],
            needle,
        ));
        v.push(case(
            "cf-train",
            &["--model", fx, f, "-o", "OUTDIR"],
            needle,
        ));
        v.push(case(
            "cf-eval",
            &["--model", fx, "--task", f, "-o", "OUT.json"],
            needle,
        ));
        v.push(case(
            "cf-sample",
            &["--model", fx, "--prompts", f, "-o", "OUT.jsonl"],
            needle,
        ));
    }
    // Records of the right syntax but the wrong content, per tool.
    for (tool, args, needle) in [
        (
            "cf-kl",
            vec!["--base", fx, "--model", fx, "ids.jsonl"],
            "ids.jsonl:2",
        ),
        (
            "cf-kl",
            vec!["--base", fx, "--model", fx, "neg_ids.jsonl"],
            "neg_ids.jsonl:2",
        ),
        (
            "cf-kl",
            vec!["--base", fx, "--model", fx, "str_ids.jsonl"],
            "str_ids.jsonl:2",
        ),
        (
            "cf-kl",
            vec!["--model", fx, "nan_logprob.jsonl"],
            "nan_logprob.jsonl:1",
        ),
        ("cf-kl", vec!["--model", fx, "good.jsonl"], "good.jsonl:1"),
        (
            "cf-kl",
            vec!["--base", fx, "--model", fx, "empty.jsonl"],
            "empty.jsonl",
        ),
        (
            "cf-train",
            vec!["--model", fx, "ids.jsonl", "-o", "OUTDIR"],
            "ids.jsonl:2",
        ),
        (
            "cf-train",
            vec!["--model", fx, "wrongtype.jsonl", "-o", "OUTDIR"],
            "wrongtype.jsonl:2",
        ),
        (
            "cf-train",
            vec!["--model", fx, "train_nothing.jsonl", "-o", "OUTDIR"],
            "train_nothing.jsonl:2",
        ),
        (
            "cf-train",
            vec!["--model", fx, "train_badweight.jsonl", "-o", "OUTDIR"],
            "train_badweight.jsonl:1",
        ),
        (
            "cf-train",
            vec!["--model", fx, "train_badmsgs.jsonl", "-o", "OUTDIR"],
            "train_badmsgs.jsonl:1",
        ),
        (
            "cf-train",
            vec!["--model", fx, "train_pc_mixed.jsonl", "-o", "OUTDIR"],
            "train_pc_mixed.jsonl:1",
        ),
        (
            "cf-train",
            vec!["--model", fx, "train_sharegpt.jsonl", "-o", "OUTDIR"],
            "train_sharegpt.jsonl:1",
        ),
        (
            "cf-train",
            vec!["--model", fx, "empty.jsonl", "-o", "OUTDIR"],
            "empty.jsonl",
        ),
        (
            "cf-train",
            vec!["--model", fx, "chat.jsonl", "-o", "OUTDIR"],
            "chat.jsonl:1",
        ),
        (
            "cf-train",
            vec![
                "--model",
                fx,
                "chat.jsonl",
                "-o",
                "OUTDIR",
                "--chat-template",
                "loop.jinja",
            ],
            "loop.jinja",
        ),
        (
            "cf-train",
            vec![
                "--model",
                fx,
                "chat.jsonl",
                "-o",
                "OUTDIR",
                "--chat-template",
                "syntax.jinja",
            ],
            "syntax.jinja",
        ),
        (
            "cf-train",
            vec![
                "--model",
                fx,
                "chat.jsonl",
                "-o",
                "OUTDIR",
                "--chat-template",
                "missing.jinja",
            ],
            "missing.jinja",
        ),
        (
            "cf-eval",
            vec!["--model", fx, "--task", "mc_badgold.jsonl"],
            "mc_badgold.jsonl:2",
        ),
        (
            "cf-eval",
            vec!["--model", fx, "--task", "mc_nochoices.jsonl"],
            "mc_nochoices.jsonl:1",
        ),
        (
            "cf-eval",
            vec!["--model", fx, "--task", "mc_mixed.jsonl"],
            "mc_mixed.jsonl:2",
        ),
        (
            "cf-eval",
            vec!["--model", fx, "--task", "mc_goldstr.jsonl"],
            "mc_goldstr.jsonl:1",
        ),
        (
            "cf-eval",
            vec!["--model", fx, "--task", "empty.jsonl"],
            "empty.jsonl",
        ),
        (
            "cf-eval",
            vec!["--model", fx, "--task", "gsm8k:gsm_noanswer.jsonl"],
            "gsm_noanswer.jsonl:1",
        ),
        (
            "cf-eval",
            vec!["--model", fx, "--task", "arc_easy:arc_badkey.jsonl"],
            "arc_badkey.jsonl:1",
        ),
        (
            "cf-eval",
            vec!["--model", fx, "--task", "hellaswag:hs_nolabel.jsonl"],
            "hs_nolabel.jsonl:1",
        ),
        (
            "cf-eval",
            vec!["--model", fx, "--task", "copa:copa_bad.jsonl"],
            "copa_bad.jsonl:1",
        ),
        (
            "cf-eval",
            vec!["--model", fx, "--task", "winogrande:wg_bad.jsonl"],
            "wg_bad.jsonl:1",
        ),
        (
            "cf-eval",
            vec!["--model", fx, "--task", "missing.jsonl"],
            "missing.jsonl",
        ),
        (
            "cf-eval",
            vec![
                "--model",
                fx,
                "--task",
                "mc_badgold.jsonl",
                "--compare",
                "missing.json",
            ],
            "missing.json",
        ),
        (
            "cf-eval",
            vec![
                "--model",
                fx,
                "--task",
                "mc_badgold.jsonl",
                "--compare",
                "good.jsonl",
            ],
            "good.jsonl",
        ),
        (
            "cf-sample",
            vec![
                "--model",
                fx,
                "--prompts",
                "prompts_bad.jsonl",
                "-o",
                "OUT.jsonl",
            ],
            "prompts_bad.jsonl:1",
        ),
        (
            "cf-sample",
            vec!["--model", fx, "--prompts", "empty.jsonl", "-o", "OUT.jsonl"],
            "empty.jsonl",
        ),
        (
            "cf-mix",
            vec!["missing.jsonl", "-o", "OUT.jsonl"],
            "missing.jsonl",
        ),
        (
            "cf-mix",
            vec!["a:good.jsonl=1", "e:empty.jsonl=1", "-o", "OUT.jsonl"],
            "source e",
        ),
    ] {
        v.push(case(tool, &args, needle));
    }
    // Broken model folders, for every tool that loads a model.
    let models = [
        ("m_noconfig", "config.json"),
        ("m_badconfig", "config.json"),
        ("m_arch", "gpt2"),
        ("m_act", "gelu"),
        ("m_heads", "num_key_value_heads"),
        ("m_yarn", "rope_parameters"),
        ("m_yarn_old", "rope_scaling"),
        ("m_llama3_missing", "rope_parameters.low_freq_factor"),
        ("m_vocab", "vocab_size"),
        ("m_hidden", "shape"),
        ("m_notok", "tokenizer.json"),
        ("m_badtok", "tokenizer.json"),
        ("m_badtc", "tokenizer_config.json"),
        ("m_bostok", "<nope>"),
        ("m_noweights", "m_noweights"),
        ("m_bin", "pytorch_model.bin"),
        ("m_badst", "model.safetensors"),
        ("m_truncst", "model.safetensors"),
        ("m_badgen", "generation_config.json"),
        ("no-such-dir/model", "no-such-dir/model"),
        ("m_huge", "of memory and"),
    ];
    for (m, needle) in models {
        v.push(case(
            "cf-sample",
            &["--model", m, "-n", "1", "-o", "OUT.jsonl"],
            needle,
        ));
        v.push(case(
            "cf-kl",
            &[
                "--base",
                m,
                "--model",
                fx,
                "good.jsonl",
                "--per-record",
                "OUT.jsonl",
            ],
            needle,
        ));
        v.push(case(
            "cf-eval",
            &["--model", m, "--task", "mc.jsonl", "-o", "OUT.json"],
            needle,
        ));
        v.push(case(
            "cf-train",
            &["--model", m, "good.jsonl", "-o", "OUTDIR"],
            needle,
        ));
    }
    v.push(case(
        "cf-sample",
        &["--model", "m_loop", "--chat", "-n", "1", "-o", "OUT.jsonl"],
        "chat_template.jinja",
    ));
    // Flags: each names itself. Negative values are values (no `=` needed).
    for (tool, args, needle) in [
        (
            "cf-sample",
            vec!["--model", fx, "--temperature", "-1"],
            "--temperature",
        ),
        (
            "cf-sample",
            vec!["--model", fx, "--temperature", "nan"],
            "--temperature",
        ),
        ("cf-sample", vec!["--model", fx, "--top-p", "0"], "--top-p"),
        (
            "cf-sample",
            vec!["--model", fx, "--top-p", "1.5"],
            "--top-p",
        ),
        ("cf-sample", vec!["--model", fx, "--top-k", "0"], "--top-k"),
        (
            "cf-sample",
            vec!["--model", fx, "--min-p", "-0.1"],
            "--min-p",
        ),
        (
            "cf-sample",
            vec!["--model", fx, "--max-tokens", "0"],
            "--max-tokens",
        ),
        (
            "cf-sample",
            vec!["--model", fx, "--max-tokens", "1000"],
            "--max-tokens",
        ),
        (
            "cf-sample",
            vec!["--model", fx, "--batch-size", "0"],
            "--batch-size",
        ),
        (
            "cf-sample",
            vec!["--model", fx, "--shard", "0/4"],
            "--shard 0/4",
        ),
        (
            "cf-sample",
            vec!["--model", fx, "--shard", "5/4"],
            "--shard 5/4",
        ),
        (
            "cf-sample",
            vec!["--model", fx, "--shard", "x"],
            "--shard x",
        ),
        (
            "cf-sample",
            vec![
                "--model",
                fx,
                "-n",
                "18446744073709551615",
                "--prompts",
                "prompts.jsonl",
            ],
            "-n 18446744073709551615 times 2 prompts",
        ),
        (
            "cf-sample",
            vec!["--model", fx, "--prefix-ids", "1,x"],
            "--prefix-ids",
        ),
        (
            "cf-sample",
            vec!["--model", fx, "--prefix-ids", "999999"],
            "--prefix-ids",
        ),
        (
            "cf-sample",
            vec!["--model", fx, "--dtype", "f8"],
            "--dtype f8",
        ),
        (
            "cf-sample",
            vec!["--model", fx, "--device", "tpu"],
            "--device tpu",
        ),
        ("cf-sample", vec!["--model", fx, "--seed", "abc"], "--seed"),
        ("cf-sample", vec!["--model", fx, "--bogus"], "--bogus"),
        ("cf-sample", vec!["-n", "1"], "--model"),
        ("cf-sample", vec!["--model", fx, "-o", "OUT.txt"], "OUT.txt"),
        ("cf-sample", vec!["--model", fx, "--chat"], "chat template"),
        ("cf-mix", vec!["good.jsonl=-1"], "good.jsonl=-1"),
        ("cf-mix", vec!["good.jsonl=n:x"], "good.jsonl=n:x"),
        ("cf-mix", vec!["good.jsonl=per:abc"], "per:abc"),
        ("cf-mix", vec!["a:good.jsonl", "a:good.jsonl"], "\"a\""),
        (
            "cf-mix",
            vec!["a:good.jsonl=1", "b:good.jsonl=all"],
            "share",
        ),
        ("cf-mix", vec!["good.jsonl=n:1000000000000"], "records"),
        (
            "cf-mix",
            vec!["good.jsonl=1", "--total", "100000000000"],
            "records",
        ),
        ("cf-mix", vec!["good.jsonl=1", "--total", "-5"], "--total"),
        (
            "cf-mix",
            vec!["good.jsonl", "--weight", "good=nan"],
            "--weight good=nan",
        ),
        (
            "cf-mix",
            vec!["good.jsonl", "--weight", "other=1"],
            "--weight other",
        ),
        (
            "cf-mix",
            vec!["good.jsonl", "--map", "noequals"],
            "--map noequals",
        ),
        (
            "cf-mix",
            vec!["good.jsonl", "--by", "tokens"],
            "--tokenizer",
        ),
        ("cf-mix", vec!["good.jsonl", "-o", "OUT.csv"], "OUT.csv"),
        ("cf-mix", vec!["good.jsonl", "--seed", "-1"], "--seed"),
        (
            "cf-kl",
            vec![
                "--base",
                fx,
                "--model",
                fx,
                "good.jsonl",
                "--batch-size",
                "0",
            ],
            "--batch-size",
        ),
        (
            "cf-kl",
            vec!["--base", fx, "--model", fx, "good.jsonl", "--max", "nan"],
            "--max",
        ),
        (
            "cf-kl",
            vec!["--base", fx, "--model", fx, "good.jsonl", "--dtype", "int8"],
            "--dtype int8",
        ),
        ("cf-kl", vec!["--base", fx, "good.jsonl"], "--model"),
        (
            "cf-kl",
            vec![
                "--base",
                fx,
                "--model",
                fx,
                "good.jsonl",
                "--per-record",
                "OUT.txt",
            ],
            "OUT.txt",
        ),
        (
            "cf-train",
            vec!["--model", fx, "good.jsonl", "-o", "OUTDIR", "--lr", "0"],
            "--lr",
        ),
        (
            "cf-train",
            vec!["--model", fx, "good.jsonl", "-o", "OUTDIR", "--lr", "-1"],
            "--lr",
        ),
        (
            "cf-train",
            vec![
                "--model",
                fx,
                "good.jsonl",
                "-o",
                "OUTDIR",
                "--max-grad-norm",
                "-1",
            ],
            "--max-grad-norm",
        ),
        (
            "cf-train",
            vec![
                "--model",
                fx,
                "good.jsonl",
                "-o",
                "OUTDIR",
                "--weight-decay",
                "-1",
            ],
            "--weight-decay",
        ),
        (
            "cf-train",
            vec![
                "--model",
                fx,
                "good.jsonl",
                "-o",
                "OUTDIR",
                "--batch-tokens",
                "0",
            ],
            "--batch-tokens",
        ),
        (
            "cf-train",
            vec![
                "--model",
                fx,
                "good.jsonl",
                "-o",
                "OUTDIR",
                "--batch-size",
                "0",
            ],
            "--batch-size",
        ),
        (
            "cf-train",
            vec![
                "--model",
                fx,
                "good.jsonl",
                "-o",
                "OUTDIR",
                "--adam-beta1",
                "1",
            ],
            "--adam-beta1",
        ),
        (
            "cf-train",
            vec![
                "--model",
                fx,
                "good.jsonl",
                "-o",
                "OUTDIR",
                "--adam-eps",
                "0",
            ],
            "--adam-eps",
        ),
        (
            "cf-train",
            vec![
                "--model",
                fx,
                "good.jsonl",
                "-o",
                "OUTDIR",
                "--warmup-ratio",
                "2",
            ],
            "--warmup-ratio",
        ),
        (
            "cf-train",
            vec![
                "--model",
                fx,
                "good.jsonl",
                "-o",
                "OUTDIR",
                "--lora-rank",
                "0",
            ],
            "--lora-rank",
        ),
        (
            "cf-train",
            vec![
                "--model",
                fx,
                "good.jsonl",
                "-o",
                "OUTDIR",
                "--lora-dropout",
                "1",
            ],
            "--lora-dropout",
        ),
        (
            "cf-train",
            vec![
                "--model",
                fx,
                "good.jsonl",
                "-o",
                "OUTDIR",
                "--lora-rank",
                "4",
                "--lora-targets",
                "q_proj,bogus",
            ],
            "bogus",
        ),
        (
            "cf-train",
            vec!["--model", fx, "good.jsonl", "-o", "OUTDIR", "--merge"],
            "--merge",
        ),
        (
            "cf-train",
            vec![
                "--model",
                fx,
                "good.jsonl",
                "-o",
                "OUTDIR",
                "--max-steps",
                "0",
            ],
            "--max-steps",
        ),
        (
            "cf-train",
            vec![
                "--model",
                fx,
                "good.jsonl",
                "-o",
                "OUTDIR",
                "--weight",
                "x=1",
            ],
            "--weight x",
        ),
        (
            "cf-train",
            vec![
                "--model",
                fx,
                "good.jsonl",
                "-o",
                "OUTDIR",
                "--exact-kl",
                "nope",
            ],
            "--exact-kl nope",
        ),
        (
            "cf-train",
            vec!["--model", fx, "good.jsonl", "-o", "OUTDIR", "--resume"],
            "--resume",
        ),
        (
            "cf-train",
            vec![
                "--model",
                fx,
                "good.jsonl",
                "-o",
                "OUTDIR",
                "--resume-from",
                "nowhere",
            ],
            "nowhere",
        ),
        (
            "cf-train",
            vec![
                "--model",
                fx,
                "good.jsonl",
                "-o",
                "OUTDIR",
                "--config",
                "bad.toml",
            ],
            "bad.toml",
        ),
        (
            "cf-train",
            vec![
                "--model",
                fx,
                "good.jsonl",
                "-o",
                "OUTDIR",
                "--config",
                "unknown.toml",
            ],
            "unknown.toml",
        ),
        (
            "cf-train",
            vec![
                "--model",
                fx,
                "good.jsonl",
                "-o",
                "OUTDIR",
                "--config",
                "broken.toml",
            ],
            "broken.toml",
        ),
        (
            "cf-train",
            vec![
                "--model",
                fx,
                "good.jsonl",
                "-o",
                "OUTDIR",
                "--config",
                "missing.toml",
            ],
            "missing.toml",
        ),
        (
            "cf-train",
            vec![
                "--model",
                fx,
                "good.jsonl",
                "-o",
                "OUTDIR",
                "--save-dtype",
                "f8",
            ],
            "--save-dtype",
        ),
        ("cf-train", vec!["--model", fx, "good.jsonl"], "--output"),
        (
            "cf-eval",
            vec!["--model", fx, "--task", "mc_badgold.jsonl", "-n", "0"],
            "-n",
        ),
        (
            "cf-eval",
            vec![
                "--model",
                fx,
                "--task",
                "gsm8k:gsm_noanswer.jsonl",
                "-n",
                "4",
            ],
            "-n 4",
        ),
        (
            "cf-eval",
            vec!["--model", fx, "--task", "good.jsonl", "--preset", "mmlu"],
            "--preset mmlu",
        ),
        (
            "cf-eval",
            vec!["--model", fx, "--task", "good.jsonl", "--temperature", "-1"],
            "--temperature",
        ),
        (
            "cf-eval",
            vec!["--model", fx, "--task", "good.jsonl", "--num-fewshot", "3"],
            "--num-fewshot",
        ),
        (
            "cf-eval",
            vec![
                "--model",
                fx,
                "--task",
                "good.jsonl",
                "--add-bos-token=maybe",
            ],
            "--add-bos-token",
        ),
        (
            "cf-eval",
            vec![
                "--model",
                fx,
                "--task",
                "good.jsonl",
                "--log-samples",
                "OUT.txt",
            ],
            "OUT.txt",
        ),
        ("cf-eval", vec!["--model", fx], "--task"),
    ] {
        v.push(case(tool, &args, needle));
    }
    let _ = d;
    v
}

#[test]
fn malformed_inputs_and_faults_are_one_line_errors() {
    let d = tempfile::tempdir().unwrap();
    setup(d.path());
    let all = cases(d.path());
    assert!(all.len() >= 150, "{} cases", all.len());
    let mut failures = Vec::new();
    for c in &all {
        let args: Vec<&str> = c.args.iter().map(String::as_str).collect();
        let r = run(c.tool, &args, d.path(), c.stdin.as_deref());
        let cmd = format!("{} {}", c.tool, c.args.join(" "));
        let lines: Vec<&str> = r
            .stderr
            .lines()
            .filter(|l| !l.contains(": warning: "))
            .collect();
        let leftovers: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.ends_with(".tmp") || n.starts_with("OUT"))
            .collect();
        let problem = if r.code != 2 {
            Some(format!("exit {}", r.code))
        } else if lines.len() != 1 {
            Some(format!("{} lines on stderr", lines.len()))
        } else if !lines[0].starts_with(&format!("{}: error: ", c.tool)) {
            Some("no `TOOL: error:` prefix".into())
        } else if !lines[0].contains(&c.needle) {
            Some(format!("does not name {:?}", c.needle))
        } else if r.stderr.contains("panicked") || !r.stdout.is_empty() {
            Some("a panic or output on stdout".into())
        } else if !leftovers.is_empty() {
            Some(format!("left {leftovers:?}"))
        } else {
            None
        };
        if let Some(p) = problem {
            failures.push(format!("{cmd}\n    {p}\n    stderr: {}", r.stderr.trim()));
        }
        for l in leftovers {
            let p = d.path().join(l);
            let _ = std::fs::remove_file(&p).or_else(|_| std::fs::remove_dir_all(&p));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases fail:\n{}",
        failures.len(),
        all.len(),
        failures.join("\n")
    );
}
