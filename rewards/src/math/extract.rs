//! Finding the final answer in a completion (or a gold solution).
//!
//! In order: the last `\boxed{...}` / `\fbox{...}` (nested braces), GSM8K's `#### N`, the last
//! `<answer>...</answer>`, "the (final) answer is ...", else the last number.

use std::sync::OnceLock;

use regex::Regex;

/// Completions longer than this are searched only in their tail (answers come last).
const SCAN_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extracted {
    pub answer: String,
    /// Which rule found it: "boxed", "gsm8k", "answer_tag", "the_answer_is", "last_number".
    pub rule: &'static str,
}

fn tail(s: &str) -> &str {
    if s.len() <= SCAN_BYTES {
        return s;
    }
    let mut start = s.len() - SCAN_BYTES;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// The content of the last `\boxed{...}` or `\fbox{...}` (or `\boxed 5`), braces matched.
pub fn last_boxed(s: &str) -> Option<String> {
    let start = [s.rfind("\\boxed"), s.rfind("\\fbox")]
        .into_iter()
        .flatten()
        .max()?;
    let cmd_len = if s[start..].starts_with("\\boxed") {
        6
    } else {
        5
    };
    let rest = &s[start + cmd_len..];
    if let Some(after_space) = rest.strip_prefix(' ') {
        // `\boxed 5`: up to the next space or `$`
        let end = after_space
            .find(['$', ' ', '\n'])
            .unwrap_or(after_space.len());
        return Some(after_space[..end].to_string()).filter(|a| !a.is_empty());
    }
    let body = rest.strip_prefix('{')?;
    let mut depth = 1usize;
    for (i, c) in body.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(body[..i].to_string());
                }
            }
            _ => {}
        }
    }
    None // unbalanced
}

fn re(cell: &'static OnceLock<Regex>, pattern: &str) -> &'static Regex {
    cell.get_or_init(|| Regex::new(pattern).expect("valid pattern"))
}

pub fn extract_answer(text: &str) -> Option<Extracted> {
    let s = tail(text);
    let found = |answer: String, rule| {
        Some(Extracted {
            answer: answer.trim().to_string(),
            rule,
        })
    };
    if let Some(b) = last_boxed(s) {
        return found(b, "boxed");
    }
    if let Some(i) = s.rfind("####") {
        let line = s[i + 4..].lines().next().unwrap_or("").trim();
        if !line.is_empty() {
            return found(line.to_string(), "gsm8k");
        }
    }
    static TAG: OnceLock<Regex> = OnceLock::new();
    if let Some(m) = re(&TAG, r"(?s)<answer>(.*?)</answer>")
        .captures_iter(s)
        .last()
    {
        return found(m[1].to_string(), "answer_tag");
    }
    static IS: OnceLock<Regex> = OnceLock::new();
    let is = re(&IS, r"(?i)(?:final answer|the answer)\s*(?:is|:)\s*:?");
    if let Some(m) = is.find_iter(s).last() {
        // the rest of the line after the last marker ("Final Answer: The final answer is 10.")
        let mut a = s[m.end()..].lines().next().unwrap_or("").trim().to_string();
        // the sentence ends at ". " or a final "." (not a decimal point)
        if let Some(i) = a.find(". ") {
            a.truncate(i);
        }
        let a = a.trim_end_matches(['.', '!']).to_string();
        if !a.is_empty() {
            return found(a, "the_answer_is");
        }
    }
    static NUMBER: OnceLock<Regex> = OnceLock::new();
    let number = re(&NUMBER, r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+");
    number
        .find_iter(s)
        .last()
        .and_then(|m| found(m.as_str().trim_end_matches(',').to_string(), "last_number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_in_order() {
        let e = |s: &str| extract_answer(s).map(|x| (x.answer, x.rule));
        assert_eq!(
            e("so \\boxed{\\frac{1}{2}} and \\boxed{3}"),
            Some(("3".into(), "boxed"))
        );
        assert_eq!(
            e("x = \\boxed{\\frac{a^{2}}{b}}."),
            Some(("\\frac{a^{2}}{b}".into(), "boxed"))
        );
        assert_eq!(e("She has 18 left.\n#### 18"), Some(("18".into(), "gsm8k")));
        assert_eq!(
            e("<answer> 42 </answer>"),
            Some(("42".into(), "answer_tag"))
        );
        assert_eq!(
            e("The answer is 3.5."),
            Some(("3.5".into(), "the_answer_is"))
        );
        assert_eq!(
            e("we get 12 then 1,000 apples"),
            Some(("1,000".into(), "last_number"))
        );
        assert_eq!(e("no digits here"), None);
        assert_eq!(e("\\boxed{unbalanced"), None);
    }
}
