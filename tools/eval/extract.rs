//! Answers from generated text, and the sampling metrics.
//!
//! - strict: the last `\boxed{...}` (balanced braces), else `#### n` (GSM8K's format);
//! - flexible: as strict, else the last number in the text (lm-eval's gsm8k flexible-extract
//!   takes the last match of `(-?[$0-9.,]{2,})|(-?[0-9]+)`).
//!
//! Answers are compared after normalisation: `$`, `,` thousands separators, spaces and a final
//! `.` removed, `\left`/`\right`/`\!` dropped; two numbers are equal when their values are.

/// The content of the last `\boxed{...}` (or `\fbox{...}`), braces balanced.
pub fn last_boxed(text: &str) -> Option<String> {
    let start = text.rfind("\\boxed").or_else(|| text.rfind("\\fbox"))?;
    let rest = &text[start..];
    let open = rest.find('{')?;
    let mut depth = 0;
    for (i, c) in rest[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(rest[open + 1..open + i].to_string());
                }
            }
            _ => {}
        }
    }
    None
}

/// The number after the last `####`.
pub fn hashes(text: &str) -> Option<String> {
    let after = &text[text.rfind("####")? + 4..];
    let t = after.trim_start();
    let end = t
        .find(|c: char| !(c.is_ascii_digit() || matches!(c, '-' | '.' | ',' | '$')))
        .unwrap_or(t.len());
    let n = t[..end].trim_end_matches(['.', ',']);
    (!n.is_empty() && n.chars().any(|c| c.is_ascii_digit())).then(|| n.to_string())
}

/// The last number in the text: lm-eval's flexible `(-?[$0-9.,]{2,})|(-?[0-9]+)`.
pub fn last_number(text: &str) -> Option<String> {
    let b = text.as_bytes();
    let mut i = 0;
    let mut last = None;
    while i < b.len() {
        let neg = b[i] == b'-';
        let s = if neg { i + 1 } else { i };
        let mut j = s;
        while j < b.len() && (b[j].is_ascii_digit() || matches!(b[j], b'$' | b'.' | b',')) {
            j += 1;
        }
        // Bytes, not str: i may sit inside a multi-byte character; a match is all ASCII.
        let run = &b[s..j];
        let has_digit = run.iter().any(|c| c.is_ascii_digit());
        if (run.len() >= 2 && has_digit) || (run.len() == 1 && b[s].is_ascii_digit()) {
            last = Some(String::from_utf8_lossy(&b[i..j]).into_owned());
            i = j;
        } else {
            i += 1;
        }
    }
    last
}

pub fn strict(text: &str) -> Option<String> {
    last_boxed(text).or_else(|| hashes(text))
}

pub fn flexible(text: &str) -> Option<String> {
    strict(text).or_else(|| last_number(text))
}

pub fn normalize(a: &str) -> String {
    let mut s = a.trim().to_string();
    for junk in ["\\left", "\\right", "\\!", "$", " "] {
        s = s.replace(junk, "");
    }
    // Thousands separators: a comma followed by three digits.
    let mut out = String::new();
    let chars: Vec<char> = s.chars().collect();
    for (i, &c) in chars.iter().enumerate() {
        if c == ','
            && i > 0
            && chars[i - 1].is_ascii_digit()
            && chars.len() >= i + 4
            && chars[i + 1..i + 4].iter().all(char::is_ascii_digit)
            && chars.get(i + 4).is_none_or(|c| !c.is_ascii_digit())
        {
            continue;
        }
        out.push(c);
    }
    out.trim_end_matches('.').to_string()
}

pub fn same_answer(a: &str, b: &str) -> bool {
    let (a, b) = (normalize(a), normalize(b));
    match (a.parse::<f64>(), b.parse::<f64>()) {
        (Ok(x), Ok(y)) => (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0),
        _ => a == b,
    }
}

/// Unbiased pass@k from n samples of which c are correct: 1 − C(n−c, k)/C(n, k).
pub fn pass_at_k(n: usize, c: usize, k: usize) -> f64 {
    if n - c < k {
        return 1.0;
    }
    // Π_{i=n−c+1}^{n} (1 − k/i), the numerically stable form.
    1.0 - ((n - c + 1)..=n)
        .map(|i| 1.0 - k as f64 / i as f64)
        .product::<f64>()
}

/// Majority vote over the first k extracted answers (ties: the earliest), and whether it is right.
pub fn maj_at_k(answers: &[Option<String>], k: usize, gold: &str) -> bool {
    let mut best: Option<(&str, usize, usize)> = None;
    let first: Vec<&str> = answers
        .iter()
        .take(k)
        .flatten()
        .map(String::as_str)
        .collect();
    for (i, a) in first.iter().enumerate() {
        let count = first.iter().filter(|b| same_answer(a, b)).count();
        if best.is_none_or(|(_, c, _)| count > c) {
            best = Some((a, count, i));
        }
    }
    best.is_some_and(|(a, _, _)| same_answer(a, gold))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hard_cases() {
        // (text, strict, flexible)
        let cases: [(&str, Option<&str>, Option<&str>); 10] = [
            (
                "so \\boxed{\\frac{1}{2}} and",
                Some("\\frac{1}{2}"),
                Some("\\frac{1}{2}"),
            ),
            (
                "\\boxed{3} first, then \\boxed{x^{2}+1}",
                Some("x^{2}+1"),
                Some("x^{2}+1"),
            ),
            (
                "Natalia sold 48/2 = 24 clips.\n#### 72",
                Some("72"),
                Some("72"),
            ),
            ("#### $1,234.", Some("$1,234"), Some("$1,234")),
            ("The answer is 42.", None, Some("42.")),
            ("costs $18 and then -3 more", None, Some("-3")),
            ("no numbers here", None, None),
            ("\\boxed{unclosed", None, None),
            ("#### -7\nThe end", Some("-7"), Some("-7")),
            ("version 2 of 3", None, Some("3")),
        ];
        assert_eq!(
            last_number("é-€ 5€é").as_deref(),
            Some("5"),
            "multi-byte text around numbers"
        );
        for (t, s, f) in cases {
            assert_eq!(strict(t).as_deref(), s, "strict {t:?}");
            assert_eq!(flexible(t).as_deref(), f, "flexible {t:?}");
        }
    }

    #[test]
    fn answers_compare_after_normalisation() {
        assert!(same_answer("$1,234.", "1234"));
        assert!(same_answer("42.0", "42"));
        assert!(same_answer("\\left( 3, 4 \\right)", "(3,4)"));
        assert!(!same_answer("1,5", "15"));
        assert!(!same_answer("41", "42"));
    }

    #[test]
    fn pass_at_k_matches_the_closed_form() {
        fn choose(n: u64, k: u64) -> f64 {
            (0..k).map(|i| (n - i) as f64 / (i + 1) as f64).product()
        }
        for (n, c, k) in [
            (10, 3, 1),
            (10, 3, 5),
            (20, 0, 4),
            (16, 16, 8),
            (16, 1, 16),
            (100, 37, 10),
        ] {
            let closed = 1.0 - choose((n - c) as u64, k as u64) / choose(n as u64, k as u64);
            assert!(
                (pass_at_k(n, c, k) - closed).abs() < 1e-12,
                "n={n} c={c} k={k}"
            );
        }
        assert!((pass_at_k(10, 3, 1) - 0.3).abs() < 1e-15);
    }

    #[test]
    fn majority_vote() {
        let a = |v: &[&str]| v.iter().map(|s| Some(s.to_string())).collect::<Vec<_>>();
        assert!(maj_at_k(&a(&["3", "4", "4.0", "3", "4"]), 5, "4"));
        assert!(maj_at_k(&a(&["3", "4"]), 2, "3"), "ties go to the earliest");
        assert!(!maj_at_k(&[None, None], 2, "3"));
    }
}
