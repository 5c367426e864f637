//! Knights and knaves with Logic-RL's semantics (`verl/utils/reward_score/kk.py`, as in the
//! AR-Lopti repository): format +1 / −1, answer +2 / −1.5 / −2; totals 3 (correct), −0.5
//! (wrong), −1 (format ok, answer unparseable), −3 (bad format). Accuracy counts reward = 3.

use std::sync::OnceLock;

use regex::Regex;

pub const CORRECT: f32 = 3.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Knight,
    Knave,
}

#[derive(Debug, Clone, PartialEq)]
pub struct KkScore {
    pub reward: f32,
    pub format_ok: bool,
    /// `None` when the answer could not be parsed.
    pub assignment: Option<Vec<(String, Role)>>,
    pub reason: String,
}

/// Parses a `solution_text_format` such as "(1) Zoey is a knave\n(2) Liam is a knight".
pub fn parse_solution(text: &str) -> Option<Vec<(String, Role)>> {
    static LINE: OnceLock<Regex> = OnceLock::new();
    let line = LINE.get_or_init(|| {
        Regex::new(r"(?i)^\s*(?:\(\d+\)\s*)?(.+?)\s+is\s+a\s+(knight|knave)\b").expect("valid")
    });
    let mut out = Vec::new();
    for l in text.lines().filter(|l| !l.trim().is_empty()) {
        let c = line.captures(l)?;
        let role = if c[2].eq_ignore_ascii_case("knight") {
            Role::Knight
        } else {
            Role::Knave
        };
        out.push((c[1].trim().to_string(), role));
    }
    (!out.is_empty()).then_some(out)
}

/// Exactly one each of `<think>`, `</think>`, `<answer>`, `</answer>`, in that order.
pub fn tags_in_order(text: &str) -> bool {
    let tags = ["<think>", "</think>", "<answer>", "</answer>"];
    let mut last = None;
    for t in tags {
        if text.matches(t).count() != 1 {
            return false;
        }
        let pos = text.find(t);
        if pos <= last {
            return false;
        }
        last = pos;
    }
    true
}

/// Scores `response`: the text after the assistant marker, which starts with the `<think>` the
/// prompt ends with (the caller prepends it when the prompt holds it).
pub fn score(response: &str, solution: &[(String, Role)]) -> KkScore {
    let text = crate::countdown::after_assistant(response);
    let format_ok = tags_in_order(text);
    static ANSWER: OnceLock<Regex> = OnceLock::new();
    let answer = ANSWER.get_or_init(|| Regex::new(r"(?s)<answer>(.*?)</answer>").expect("valid"));
    let parsed = answer
        .captures_iter(text)
        .last()
        .and_then(|m| parse_answer(&m[1], solution));
    let format_score = if format_ok { 1.0 } else { -1.0 };
    let (answer_score, reason) = match (&parsed, format_ok) {
        (_, false) => (-2.0, "bad format".to_string()),
        (None, true) => (-2.0, "answer could not be parsed".to_string()),
        (Some(a), true) if a.as_slice() == solution => (2.0, "correct".to_string()),
        (Some(_), true) => (-1.5, "wrong assignment".to_string()),
    };
    KkScore {
        reward: format_score + answer_score,
        format_ok,
        assignment: parsed,
        reason,
    }
}

/// Logic-RL's `parse_model_answer`: the counts of "knight" and "knave" must total the number of
/// people, and every name must appear as "NAME is a knight|knave".
fn parse_answer(answer: &str, solution: &[(String, Role)]) -> Option<Vec<(String, Role)>> {
    let lower = answer.to_lowercase();
    if lower.matches("knight").count() + lower.matches("knave").count() != solution.len() {
        return None;
    }
    solution
        .iter()
        .map(|(name, _)| {
            let re = Regex::new(&format!(
                r"(?i)\b{}\b\s+is\s+a\s+\b(knight|knave)\b",
                regex::escape(name)
            ))
            .ok()?;
            let c = re.captures(answer)?;
            let role = if c[1].eq_ignore_ascii_case("knight") {
                Role::Knight
            } else {
                Role::Knave
            };
            Some((name.clone(), role))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn solution() -> Vec<(String, Role)> {
        parse_solution("(1) Zoey is a knave\n(2) Liam is a knight\n(3) Mason is a knight").unwrap()
    }

    #[test]
    fn logic_rl_reward_levels() {
        let s = solution();
        let good = "<think>Zoey lies.</think> <answer>(1) Zoey is a knave\n(2) Liam is a knight\n(3) Mason is a knight</answer>";
        assert_eq!(score(good, &s).reward, 3.0);
        let wrong = "<think>hm</think><answer>(1) Zoey is a knight\n(2) Liam is a knight\n(3) Mason is a knight</answer>";
        assert_eq!(score(wrong, &s).reward, -0.5);
        let unparsed = "<think>hm</think><answer>Zoey and Liam are knights</answer>";
        assert_eq!(score(unparsed, &s).reward, -1.0);
        let bad =
            "<answer>(1) Zoey is a knave\n(2) Liam is a knight\n(3) Mason is a knight</answer>";
        assert_eq!(score(bad, &s).reward, -3.0);
        let twice = format!(
            "<think>a</think><think>b</think>{}",
            &good[good.find("<answer>").unwrap()..]
        );
        assert_eq!(score(&twice, &s).reward, -3.0);
        let out_of_order = "<answer>x</answer><think>y</think>";
        assert!(!tags_in_order(out_of_order));
        // extra mentions of "knight" break the count rule, as in Logic-RL
        let chatty = "<think>x</think><answer>(1) Zoey is a knave (not a knight)\n(2) Liam is a knight\n(3) Mason is a knight</answer>";
        assert_eq!(score(chatty, &s).reward, -1.0);
    }
}
