//! lm-evaluation-harness 0.4.13's task functions, reproduced exactly: wikitext's detokenizer and
//! word count, gsm8k's filters and exact_match, Python's `str.capitalize` (hellaswag) and
//! `random.Random(seed).sample` (few-shot selection).

use regex::Regex;
use std::sync::LazyLock;

/// Python's `\s` (and `str.isspace`): Unicode White_Space plus \x1c–\x1f.
const PY_SPACE: &str = r"[\s\x1c-\x1f]";

fn re(pattern: &str) -> Regex {
    Regex::new(&pattern.replace(r"\s", PY_SPACE)).expect("valid regex")
}

/// lm-eval's `wikitext_detokenizer` (tasks/wikitext/preprocess_wikitext.py), step by step.
pub fn wikitext_detokenizer(page: &str) -> String {
    static BRACKETS: LazyLock<[(Regex, &str); 5]> = LazyLock::new(|| {
        [
            (re(r"\(\s*([^\)]*?)\s*\)"), "(${1})"),
            (re(r"\[\s*([^\]]*?)\s*\]"), "[${1}]"),
            (re(r"\{\s*([^}]*?)\s*\}"), "{${1}}"),
            (re(r#""\s*([^"]*?)\s*""#), "\"${1}\""),
            (re(r"'\s*([^']*?)\s*'"), "'${1}'"),
        ]
    });
    let mut s = page.replace("s '", "s'");
    // re.sub(r"/' [0-9]/", r"/'[0-9]/", s): literal slashes, as written upstream.
    static SLASH: LazyLock<Regex> = LazyLock::new(|| re(r"/' [0-9]/"));
    s = SLASH.replace_all(&s, "/'[0-9]/").into_owned();
    for (a, b) in [
        (" @-@ ", "-"),
        (" @,@ ", ","),
        (" @.@ ", "."),
        (" : ", ": "),
        (" ; ", "; "),
        (" . ", ". "),
        (" ! ", "! "),
        (" ? ", "? "),
        (" , ", ", "),
    ] {
        s = s.replace(a, b);
    }
    for (r, to) in BRACKETS.iter() {
        s = r.replace_all(&s, *to).into_owned();
    }
    for (a, b) in [
        ("= = = =", "===="),
        ("= = =", "==="),
        ("= =", "=="),
        (" \u{b0} ", "\u{b0}"),
        (" \n", "\n"),
        ("\n ", "\n"),
        (" N ", " 1 "),
        (" 's", "'s"),
    ] {
        s = s.replace(a, b);
    }
    s
}

/// `len(re.split(r"\s+", text))`: one more than the runs of whitespace.
pub fn word_count(text: &str) -> usize {
    let (mut runs, mut in_space) = (0usize, false);
    for c in text.chars() {
        let sp = crate::score::py_space(c);
        runs += usize::from(sp && !in_space);
        in_space = sp;
    }
    1 + runs
}

/// gsm8k's filter fallback.
pub const INVALID: &str = "[invalid]";

/// RegexFilter + take_first: the `group_select`-th match (negative from the end) of `regex`,
/// its first non-empty group, stripped; `[invalid]` when nothing matches.
fn regex_filter(regex: &Regex, text: &str, group_select: isize) -> String {
    let all: Vec<regex::Captures> = regex.captures_iter(text).collect();
    let i = if group_select < 0 {
        all.len() as isize + group_select
    } else {
        group_select
    };
    let Some(c) = usize::try_from(i).ok().and_then(|i| all.get(i)) else {
        return INVALID.to_string();
    };
    let m = if c.len() > 2 {
        // findall with several groups gives tuples: the first non-empty group.
        (1..c.len())
            .filter_map(|g| c.get(g).map(|m| m.as_str()))
            .find(|m| !m.is_empty())
    } else {
        Some(c.get(1).map_or(c.get(0).unwrap().as_str(), |m| m.as_str()))
    };
    m.map_or(INVALID.to_string(), |m| {
        m.trim_matches(crate::score::py_space).to_string()
    })
}

/// gsm8k's `strict-match`: the first `#### (\-?[0-9\.\,]+)`.
pub fn gsm8k_strict(text: &str) -> String {
    static R: LazyLock<Regex> = LazyLock::new(|| re(r"#### (\-?[0-9\.\,]+)"));
    regex_filter(&R, text, 0)
}

/// gsm8k's `flexible-extract`: the last `(-?[$0-9.,]{2,})|(-?[0-9]+)`.
pub fn gsm8k_flexible(text: &str) -> String {
    static R: LazyLock<Regex> = LazyLock::new(|| re(r"(-?[$0-9.,]{2,})|(-?[0-9]+)"));
    regex_filter(&R, text, -1)
}

/// gsm8k's exact_match: `regexes_to_ignore` [",", "\$", "(?s).*#### ", "\.$"] removed from
/// both sides in that order, then `ignore_case`. Python's `$` also matches before a final
/// newline, which Rust's does not, so the last one is done by hand.
pub fn gsm8k_normalize(s: &str) -> String {
    static ALL_BEFORE: LazyLock<Regex> = LazyLock::new(|| re(r"(?s).*#### "));
    // Each step's results go through np.array, whose unicode dtype drops trailing NULs.
    let np = |s: String| s.trim_end_matches('\0').to_string();
    let s = np(s.replace(',', ""));
    let s = np(s.replace('$', ""));
    let mut s = np(ALL_BEFORE.replace_all(&s, "").into_owned());
    if s.ends_with(".\n") {
        s.remove(s.len() - 2);
    } else if s.ends_with('.') {
        s.pop();
    }
    np(s).to_lowercase()
}

pub fn gsm8k_exact_match(prediction: &str, reference: &str) -> bool {
    gsm8k_normalize(prediction) == gsm8k_normalize(reference)
}

/// Characters whose Python `str.title()` differs from `str.upper()` (Python 3.11, Unicode
/// 14), made by: `[(c, chr(c).title()) for c in range(0x110000) if chr(c).title() !=
/// chr(c).upper()]` (surrogates skipped).
const TITLECASE: &[(char, &str)] = &[
    ('\u{DF}', "\u{53}\u{73}"),
    ('\u{1C4}', "\u{1C5}"),
    ('\u{1C5}', "\u{1C5}"),
    ('\u{1C6}', "\u{1C5}"),
    ('\u{1C7}', "\u{1C8}"),
    ('\u{1C8}', "\u{1C8}"),
    ('\u{1C9}', "\u{1C8}"),
    ('\u{1CA}', "\u{1CB}"),
    ('\u{1CB}', "\u{1CB}"),
    ('\u{1CC}', "\u{1CB}"),
    ('\u{1F1}', "\u{1F2}"),
    ('\u{1F2}', "\u{1F2}"),
    ('\u{1F3}', "\u{1F2}"),
    ('\u{587}', "\u{535}\u{582}"),
    ('\u{10D0}', "\u{10D0}"),
    ('\u{10D1}', "\u{10D1}"),
    ('\u{10D2}', "\u{10D2}"),
    ('\u{10D3}', "\u{10D3}"),
    ('\u{10D4}', "\u{10D4}"),
    ('\u{10D5}', "\u{10D5}"),
    ('\u{10D6}', "\u{10D6}"),
    ('\u{10D7}', "\u{10D7}"),
    ('\u{10D8}', "\u{10D8}"),
    ('\u{10D9}', "\u{10D9}"),
    ('\u{10DA}', "\u{10DA}"),
    ('\u{10DB}', "\u{10DB}"),
    ('\u{10DC}', "\u{10DC}"),
    ('\u{10DD}', "\u{10DD}"),
    ('\u{10DE}', "\u{10DE}"),
    ('\u{10DF}', "\u{10DF}"),
    ('\u{10E0}', "\u{10E0}"),
    ('\u{10E1}', "\u{10E1}"),
    ('\u{10E2}', "\u{10E2}"),
    ('\u{10E3}', "\u{10E3}"),
    ('\u{10E4}', "\u{10E4}"),
    ('\u{10E5}', "\u{10E5}"),
    ('\u{10E6}', "\u{10E6}"),
    ('\u{10E7}', "\u{10E7}"),
    ('\u{10E8}', "\u{10E8}"),
    ('\u{10E9}', "\u{10E9}"),
    ('\u{10EA}', "\u{10EA}"),
    ('\u{10EB}', "\u{10EB}"),
    ('\u{10EC}', "\u{10EC}"),
    ('\u{10ED}', "\u{10ED}"),
    ('\u{10EE}', "\u{10EE}"),
    ('\u{10EF}', "\u{10EF}"),
    ('\u{10F0}', "\u{10F0}"),
    ('\u{10F1}', "\u{10F1}"),
    ('\u{10F2}', "\u{10F2}"),
    ('\u{10F3}', "\u{10F3}"),
    ('\u{10F4}', "\u{10F4}"),
    ('\u{10F5}', "\u{10F5}"),
    ('\u{10F6}', "\u{10F6}"),
    ('\u{10F7}', "\u{10F7}"),
    ('\u{10F8}', "\u{10F8}"),
    ('\u{10F9}', "\u{10F9}"),
    ('\u{10FA}', "\u{10FA}"),
    ('\u{10FD}', "\u{10FD}"),
    ('\u{10FE}', "\u{10FE}"),
    ('\u{10FF}', "\u{10FF}"),
    ('\u{1F80}', "\u{1F88}"),
    ('\u{1F81}', "\u{1F89}"),
    ('\u{1F82}', "\u{1F8A}"),
    ('\u{1F83}', "\u{1F8B}"),
    ('\u{1F84}', "\u{1F8C}"),
    ('\u{1F85}', "\u{1F8D}"),
    ('\u{1F86}', "\u{1F8E}"),
    ('\u{1F87}', "\u{1F8F}"),
    ('\u{1F88}', "\u{1F88}"),
    ('\u{1F89}', "\u{1F89}"),
    ('\u{1F8A}', "\u{1F8A}"),
    ('\u{1F8B}', "\u{1F8B}"),
    ('\u{1F8C}', "\u{1F8C}"),
    ('\u{1F8D}', "\u{1F8D}"),
    ('\u{1F8E}', "\u{1F8E}"),
    ('\u{1F8F}', "\u{1F8F}"),
    ('\u{1F90}', "\u{1F98}"),
    ('\u{1F91}', "\u{1F99}"),
    ('\u{1F92}', "\u{1F9A}"),
    ('\u{1F93}', "\u{1F9B}"),
    ('\u{1F94}', "\u{1F9C}"),
    ('\u{1F95}', "\u{1F9D}"),
    ('\u{1F96}', "\u{1F9E}"),
    ('\u{1F97}', "\u{1F9F}"),
    ('\u{1F98}', "\u{1F98}"),
    ('\u{1F99}', "\u{1F99}"),
    ('\u{1F9A}', "\u{1F9A}"),
    ('\u{1F9B}', "\u{1F9B}"),
    ('\u{1F9C}', "\u{1F9C}"),
    ('\u{1F9D}', "\u{1F9D}"),
    ('\u{1F9E}', "\u{1F9E}"),
    ('\u{1F9F}', "\u{1F9F}"),
    ('\u{1FA0}', "\u{1FA8}"),
    ('\u{1FA1}', "\u{1FA9}"),
    ('\u{1FA2}', "\u{1FAA}"),
    ('\u{1FA3}', "\u{1FAB}"),
    ('\u{1FA4}', "\u{1FAC}"),
    ('\u{1FA5}', "\u{1FAD}"),
    ('\u{1FA6}', "\u{1FAE}"),
    ('\u{1FA7}', "\u{1FAF}"),
    ('\u{1FA8}', "\u{1FA8}"),
    ('\u{1FA9}', "\u{1FA9}"),
    ('\u{1FAA}', "\u{1FAA}"),
    ('\u{1FAB}', "\u{1FAB}"),
    ('\u{1FAC}', "\u{1FAC}"),
    ('\u{1FAD}', "\u{1FAD}"),
    ('\u{1FAE}', "\u{1FAE}"),
    ('\u{1FAF}', "\u{1FAF}"),
    ('\u{1FB2}', "\u{1FBA}\u{345}"),
    ('\u{1FB3}', "\u{1FBC}"),
    ('\u{1FB4}', "\u{386}\u{345}"),
    ('\u{1FB7}', "\u{391}\u{342}\u{345}"),
    ('\u{1FBC}', "\u{1FBC}"),
    ('\u{1FC2}', "\u{1FCA}\u{345}"),
    ('\u{1FC3}', "\u{1FCC}"),
    ('\u{1FC4}', "\u{389}\u{345}"),
    ('\u{1FC7}', "\u{397}\u{342}\u{345}"),
    ('\u{1FCC}', "\u{1FCC}"),
    ('\u{1FF2}', "\u{1FFA}\u{345}"),
    ('\u{1FF3}', "\u{1FFC}"),
    ('\u{1FF4}', "\u{38F}\u{345}"),
    ('\u{1FF7}', "\u{3A9}\u{342}\u{345}"),
    ('\u{1FFC}', "\u{1FFC}"),
    ('\u{FB00}', "\u{46}\u{66}"),
    ('\u{FB01}', "\u{46}\u{69}"),
    ('\u{FB02}', "\u{46}\u{6C}"),
    ('\u{FB03}', "\u{46}\u{66}\u{69}"),
    ('\u{FB04}', "\u{46}\u{66}\u{6C}"),
    ('\u{FB05}', "\u{53}\u{74}"),
    ('\u{FB06}', "\u{53}\u{74}"),
    ('\u{FB13}', "\u{544}\u{576}"),
    ('\u{FB14}', "\u{544}\u{565}"),
    ('\u{FB15}', "\u{544}\u{56B}"),
    ('\u{FB16}', "\u{54E}\u{576}"),
    ('\u{FB17}', "\u{544}\u{56D}"),
];

/// Python's `str.capitalize`: the first character in title case, the rest in lower case.
pub fn py_capitalize(s: &str) -> String {
    let mut it = s.chars();
    let Some(first) = it.next() else {
        return String::new();
    };
    let head = match TITLECASE.binary_search_by(|(c, _)| c.cmp(&first)) {
        Ok(i) => TITLECASE[i].1.to_string(),
        Err(_) => first.to_uppercase().collect(),
    };
    head + &it.as_str().to_lowercase()
}

/// Python's `random.Random(seed)` for an integer seed, and the parts of it lm-eval's few-shot
/// sampler uses: `sample(range(n), k)` exactly as CPython 3.11 draws it.
pub struct PyRandom(rand_mt::Mt);

impl PyRandom {
    pub fn new(seed: u32) -> PyRandom {
        // init_by_array with the seed's 32-bit words (one word for a seed < 2^32).
        PyRandom(rand_mt::Mt::new_with_key([seed]))
    }

    fn getrandbits(&mut self, k: u32) -> u32 {
        self.0.next_u32() >> (32 - k)
    }

    /// `_randbelow_with_getrandbits`.
    fn randbelow(&mut self, n: usize) -> usize {
        let k = usize::BITS - n.leading_zeros();
        loop {
            let r = self.getrandbits(k) as usize;
            if r < n {
                return r;
            }
        }
    }

    /// `random.sample(range(n), k)`: indices, in CPython's order (a pool for small
    /// populations, a set of drawn indices for large ones).
    pub fn sample(&mut self, n: usize, k: usize) -> Vec<usize> {
        assert!(k <= n, "sample larger than population");
        let mut setsize = 21usize;
        if k > 5 {
            // 4 ** ceil(log(k * 3, 4)), with Python's float log.
            setsize += 4usize.pow(((k * 3) as f64).log(4.0).ceil() as u32);
        }
        if n <= setsize {
            let mut pool: Vec<usize> = (0..n).collect();
            (0..k)
                .map(|i| {
                    let j = self.randbelow(n - i);
                    let x = pool[j];
                    pool[j] = pool[n - i - 1];
                    x
                })
                .collect()
        } else {
            let mut seen = std::collections::HashSet::new();
            (0..k)
                .map(|_| loop {
                    let j = self.randbelow(n);
                    if seen.insert(j) {
                        return j;
                    }
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_random_sample() {
        // Python 3.11: r = random.Random(1234); r.sample(range(8), 3) twice; and
        // random.Random(1234).sample(range(10), 3) (lm-eval's verified draws).
        let mut r = PyRandom::new(1234);
        assert_eq!(r.sample(8, 3), vec![7, 0, 6]);
        assert_eq!(r.sample(8, 3), vec![1, 6, 4]);
        assert_eq!(PyRandom::new(1234).sample(10, 3), vec![7, 1, 0]);
        // Both of CPython's branches (pool, then set for a large population), one stream.
        let mut r = PyRandom::new(1234);
        assert_eq!(r.sample(100, 5), vec![99, 56, 14, 0, 11]);
        assert_eq!(r.sample(7473, 5), vec![7462, 6610, 4769, 286, 5501]);
    }

    #[test]
    fn gsm8k_filters_and_exact_match_are_lm_evals() {
        // fixtures/eval/gsm8k_filters.json: crafted outputs through lm-eval 0.4.13's own
        // RegexFilter/TakeFirst pipelines and exact_match (scripts/make_eval_reference.py).
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/fixtures/eval/gsm8k_filters.json"
        ))
        .unwrap();
        let r: serde_json::Value = serde_json::from_str(&text).unwrap();
        let cases = r["cases"].as_array().unwrap();
        assert!(cases.len() >= 32);
        for c in cases {
            let (out, gold) = (c["output"].as_str().unwrap(), c["gold"].as_str().unwrap());
            let (s, f) = (gsm8k_strict(out), gsm8k_flexible(out));
            assert_eq!(s, c["strict"].as_str().unwrap(), "strict of {out:?}");
            assert_eq!(f, c["flexible"].as_str().unwrap(), "flexible of {out:?}");
            assert_eq!(
                gsm8k_exact_match(&s, gold) as u64,
                c["strict_match"].as_u64().unwrap(),
                "{out:?} vs {gold:?}"
            );
            assert_eq!(
                gsm8k_exact_match(&f, gold) as u64,
                c["flexible_match"].as_u64().unwrap(),
                "{out:?} vs {gold:?}"
            );
        }
    }

    #[test]
    fn capitalize_is_pythons() {
        assert_eq!(py_capitalize("straße IST groß"), "Straße ist groß");
        assert_eq!(py_capitalize("ßa"), "Ssa");
        assert_eq!(py_capitalize("ǆemal"), "ǅemal");
        assert_eq!(py_capitalize("ΟΔΟΣ"), "Οδος");
        assert_eq!(py_capitalize(""), "");
    }
}
