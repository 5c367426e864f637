//! Countdown with TinyZero's semantics (`verl/utils/reward_score/countdown.py`): the equation in
//! the last `<answer>` of the last line must use every given number exactly once, only
//! `+ - * / ( )`, and evaluate to the target. Rewards 1.0 / 0.1 (format) / 0.0.
//! Our own evaluator replaces Python's `eval`; division by zero fails (0.1).

use std::sync::OnceLock;

use regex::Regex;

use crate::budget::{Budget, Exceeded};

pub const CORRECT: f32 = 1.0;
pub const FORMAT: f32 = 0.1;

#[derive(Debug, Clone, PartialEq)]
pub struct CountdownScore {
    pub reward: f32,
    pub equation: Option<String>,
    pub reason: String,
}

/// The text after the last `Assistant:` / `<|im_start|>assistant` marker, if any.
pub fn after_assistant(text: &str) -> &str {
    if let Some(i) = text.find("Assistant:") {
        return &text[i + "Assistant:".len()..];
    }
    if let Some(i) = text.find("<|im_start|>assistant") {
        return &text[i + "<|im_start|>assistant".len()..];
    }
    text
}

pub fn score(completion: &str, target: i64, nums: &[i64]) -> CountdownScore {
    let fail = |reward, equation: Option<String>, reason: String| CountdownScore {
        reward,
        equation,
        reason,
    };
    let text = after_assistant(completion);
    let last_line = text.rsplit('\n').next().unwrap_or("");
    static ANSWER: OnceLock<Regex> = OnceLock::new();
    let answer = ANSWER.get_or_init(|| Regex::new(r"<answer>(.*?)</answer>").expect("valid"));
    let Some(m) = answer.captures_iter(last_line).last() else {
        return fail(0.0, None, "no <answer> on the last line".into());
    };
    let equation = m[1].trim().to_string();
    static INT: OnceLock<Regex> = OnceLock::new();
    let int = INT.get_or_init(|| Regex::new(r"\d+").expect("valid"));
    let mut used: Vec<i64> = Vec::new();
    for d in int.find_iter(&equation) {
        match d.as_str().parse() {
            Ok(x) => used.push(x),
            Err(_) => {
                let why = format!("number {} too large", d.as_str());
                return fail(FORMAT, Some(equation.clone()), why);
            }
        }
    }
    let (mut a, mut b) = (used.clone(), nums.to_vec());
    a.sort_unstable();
    b.sort_unstable();
    if a != b {
        return fail(
            FORMAT,
            Some(equation),
            format!("numbers used {used:?}, given {nums:?}"),
        );
    }
    if !equation
        .chars()
        .all(|c| c.is_ascii_digit() || "+-*/(). \t".contains(c))
    {
        return fail(
            FORMAT,
            Some(equation),
            "characters other than digits, + - * / ( )".into(),
        );
    }
    match evaluate(&equation, &mut Budget::default()) {
        Ok(v) if (v - target as f64).abs() < 1e-5 => CountdownScore {
            reward: CORRECT,
            equation: Some(equation),
            reason: "correct".into(),
        },
        Ok(v) => fail(
            FORMAT,
            Some(equation),
            format!("evaluates to {v}, target {target}"),
        ),
        Err(e) => fail(FORMAT, Some(equation), e),
    }
}

/// Evaluates `+ - * / ( )` over non-negative decimal literals in f64, as Python does.
pub fn evaluate(expr: &str, budget: &mut Budget) -> Result<f64, String> {
    let toks: Vec<char> = expr.chars().filter(|c| !c.is_whitespace()).collect();
    let mut p = Eval {
        toks: &toks,
        pos: 0,
        depth: 0,
        budget,
    };
    let v = p.sum()?;
    if p.pos != toks.len() {
        return Err(format!("unexpected {:?}", toks[p.pos]));
    }
    Ok(v)
}

struct Eval<'a> {
    toks: &'a [char],
    pos: usize,
    depth: usize,
    budget: &'a mut Budget,
}

impl Eval<'_> {
    fn step(&mut self) -> Result<(), String> {
        self.budget
            .spend(1)
            .map_err(|Exceeded| "work budget exceeded".to_string())
    }

    fn sum(&mut self) -> Result<f64, String> {
        self.depth += 1;
        if self.depth > 200 {
            return Err("nested too deeply".into());
        }
        let mut v = self.product()?;
        while let Some(&c) = self.toks.get(self.pos) {
            self.step()?;
            match c {
                '+' => {
                    self.pos += 1;
                    v += self.product()?;
                }
                '-' => {
                    self.pos += 1;
                    v -= self.product()?;
                }
                _ => break,
            }
        }
        self.depth -= 1;
        Ok(v)
    }

    fn product(&mut self) -> Result<f64, String> {
        let mut v = self.unary()?;
        while let Some(&c) = self.toks.get(self.pos) {
            self.step()?;
            match c {
                '*' => {
                    self.pos += 1;
                    v *= self.unary()?;
                }
                '/' => {
                    self.pos += 1;
                    let d = self.unary()?;
                    if d == 0.0 {
                        return Err("division by zero".into());
                    }
                    v /= d;
                }
                _ => break,
            }
        }
        Ok(v)
    }

    fn unary(&mut self) -> Result<f64, String> {
        self.step()?;
        match self.toks.get(self.pos) {
            Some('-') => {
                self.pos += 1;
                self.depth += 1;
                if self.depth > 200 {
                    return Err("nested too deeply".into());
                }
                let v = -self.unary()?;
                self.depth -= 1;
                Ok(v)
            }
            Some('+') => {
                self.pos += 1;
                self.unary()
            }
            Some('(') => {
                self.pos += 1;
                let v = self.sum()?;
                if self.toks.get(self.pos) != Some(&')') {
                    return Err("unbalanced parentheses".into());
                }
                self.pos += 1;
                Ok(v)
            }
            Some(c) if c.is_ascii_digit() || *c == '.' => {
                let start = self.pos;
                while self
                    .toks
                    .get(self.pos)
                    .is_some_and(|c| c.is_ascii_digit() || *c == '.')
                {
                    self.pos += 1;
                }
                let s: String = self.toks[start..self.pos].iter().collect();
                s.parse::<f64>().map_err(|_| format!("bad number {s:?}"))
            }
            Some(c) => Err(format!("unexpected {c:?}")),
            None => Err("unexpected end".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tinyzero_rewards() {
        let nums = [79, 17, 60];
        assert_eq!(
            score(
                "<think>...</think>\n<answer> 79 - (60 - 17) </answer>",
                36,
                &nums
            )
            .reward,
            1.0
        );
        assert_eq!(
            score("<answer>79 + 17 - 60</answer>", 36, &nums).reward,
            1.0
        );
        // the answer must be on the last line
        assert_eq!(
            score("<answer>79 + 17 - 60</answer>\nthanks", 36, &nums).reward,
            0.0
        );
        // a number missing or repeated: format score
        assert_eq!(score("<answer>79 - 43</answer>", 36, &nums).reward, 0.1);
        assert_eq!(
            score("<answer>79 + 17 - 60 + 0</answer>", 36, &nums).reward,
            0.1
        );
        // wrong value, bad characters, division by zero
        assert_eq!(
            score("<answer>79 + 17 + 60</answer>", 36, &nums).reward,
            0.1
        );
        assert_eq!(
            score("<answer>79 + 17 - 60 = 36</answer>", 36, &nums).reward,
            0.1
        );
        assert_eq!(
            score(
                "<answer>79 / (60 - 60) + 17</answer>",
                36,
                &[79, 60, 60, 17]
            )
            .reward,
            0.1
        );
        assert_eq!(score("no answer", 36, &nums).reward, 0.0);
        // exact float semantics: 1/3*3 is within 1e-5 of 1
        assert_eq!(
            score("<answer>(1 / 3) * 3</answer>", 1, &[1, 3, 3]).reward,
            1.0
        );
        assert_eq!(
            score("Assistant: <answer>2*3</answer>", 6, &[2, 3]).reward,
            1.0
        );
    }
}
