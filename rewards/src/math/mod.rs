//! Math answers: extract the final answer, normalise it, and decide equivalence with the gold
//! answer numerically (exact rationals where possible), structurally (sets, tuples,
//! intervals) and symbolically (identity testing at random points), saying why when not equal.

pub mod expr;
pub mod extract;
pub mod normalize;
pub mod number;

use crate::budget::Budget;
use expr::{eval, parse_answer, variables, Answer, Expr};
use number::Num;

/// Relative tolerance for answers that are not exact rationals.
pub const REL_TOL: f64 = 1e-6;

#[derive(Debug, Clone, PartialEq)]
pub struct MathVerdict {
    pub correct: bool,
    /// The answer found in the completion, if any.
    pub predicted: Option<String>,
    pub gold: String,
    /// Why the answers are (not) equal.
    pub reason: String,
}

/// Scores a completion against a gold answer (a bare answer, a GSM8K solution with `####`, or
/// a MATH solution with `\boxed{}`).
pub fn verify(completion: &str, gold: &str) -> MathVerdict {
    let mut budget = Budget::default();
    let gold_answer = extract::extract_answer(gold).map_or_else(
        || gold.trim().to_string(),
        |e| {
            if e.rule == "last_number" && gold.trim().len() > e.answer.len() + 16 {
                e.answer // a worked solution ending in a number
            } else if e.rule == "last_number" {
                gold.trim().to_string() // a bare gold answer like "x+1" or "\frac12"
            } else {
                e.answer
            }
        },
    );
    let Some(found) = extract::extract_answer(completion) else {
        return MathVerdict {
            correct: false,
            predicted: None,
            gold: gold_answer,
            reason: "no answer found in the completion".into(),
        };
    };
    let (correct, reason) = match answers_equal(&gold_answer, &found.answer, &mut budget) {
        Ok(()) => (true, format!("equal ({} rule)", found.rule)),
        Err(why) => (false, why),
    };
    MathVerdict {
        correct,
        predicted: Some(found.answer),
        gold: gold_answer,
        reason,
    }
}

/// Majority voting (maj@k) over the answers extracted from k completions: the answers are grouped
/// by [`answers_equal`] (so `1/2`, `0.5` and `\frac{1}{2}` vote together, where a string vote
/// would split them), and the index of the first answer of the largest group is returned (ties
/// go to the group that appeared first); None when no completion has an answer.
pub fn majority(answers: &[Option<&str>]) -> Option<usize> {
    // (first index, size) of each group, in order of appearance
    let mut groups: Vec<(usize, usize)> = Vec::new();
    for (i, a) in answers.iter().enumerate() {
        let Some(a) = a else { continue };
        let same = groups.iter_mut().find(|(first, _)| {
            let rep = answers[*first].unwrap_or_default();
            answers_equal(rep, a, &mut Budget::default()).is_ok()
        });
        match same {
            Some(g) => g.1 += 1,
            None => groups.push((i, 1)),
        }
    }
    groups
        .iter()
        .fold(None, |best: Option<(usize, usize)>, &g| match best {
            Some(b) if b.1 >= g.1 => Some(b),
            _ => Some(g),
        })
        .map(|(first, _)| first)
}

/// Whether two answer strings denote the same answer; `Err` says why not.
pub fn answers_equal(gold: &str, predicted: &str, budget: &mut Budget) -> Result<(), String> {
    const MAX_LEN: usize = 2000;
    if gold.len() > MAX_LEN || predicted.len() > MAX_LEN {
        return Err(format!("answer longer than {MAX_LEN} bytes"));
    }
    let g = normalize::normalize(gold);
    let p = normalize::normalize(predicted);
    if g.text == p.text && g.percent == p.percent {
        return Ok(());
    }
    if g.text.eq_ignore_ascii_case(&p.text) && g.text.chars().all(|c| c.is_alphabetic()) {
        return Ok(()); // a choice letter or a word, case aside
    }
    let ga = parse_answer(&g.text, budget)
        .map_err(|e| format!("cannot parse gold {:?}: {e}", g.text))?;
    let pa = parse_answer(&p.text, budget)
        .map_err(|e| format!("cannot parse predicted {:?}: {e}", p.text))?;
    // a percent on one side only: 50% matches 50 and 0.5
    let scales: &[Num] = if g.percent != p.percent {
        &[Num::Exact(1, 1), Num::Exact(1, 100)]
    } else {
        &[Num::Exact(1, 1)]
    };
    let mut last = String::new();
    for &scale in scales {
        let (ga, pa) = if p.percent && !g.percent {
            (ga.clone(), scaled(&pa, scale))
        } else {
            (scaled(&ga, scale), pa.clone())
        };
        match answer_eq(&ga, &pa, budget) {
            Ok(()) => return Ok(()),
            Err(e) => last = e,
        }
    }
    Err(format!(
        "gold {:?} ≠ predicted {:?}: {last}",
        g.text, p.text
    ))
}

fn scaled(a: &Answer, s: Num) -> Answer {
    if s == Num::Exact(1, 1) {
        return a.clone();
    }
    match a {
        Answer::Scalar(e) => Answer::Scalar(Expr::Mul(Box::new(e.clone()), Box::new(Expr::Num(s)))),
        other => other.clone(),
    }
}

fn answer_eq(g: &Answer, p: &Answer, budget: &mut Budget) -> Result<(), String> {
    match (g, p) {
        (Answer::Scalar(a), Answer::Scalar(b)) => expr_eq(a, b, budget),
        // "x = 5" against "5" (the normaliser strips simple ones; this catches the rest)
        (Answer::Scalar(a), Answer::Equation(_, b))
        | (Answer::Equation(_, b), Answer::Scalar(a)) => expr_eq(a, b, budget),
        (Answer::Equation(l1, r1), Answer::Equation(l2, r2)) => {
            let d1 = Expr::Sub(Box::new(l1.clone()), Box::new(r1.clone()));
            let d2 = Expr::Sub(Box::new(l2.clone()), Box::new(r2.clone()));
            expr_eq(l1, l2, budget)
                .and_then(|_| expr_eq(r1, r2, budget))
                .or_else(|_| expr_eq(&d1, &d2, budget))
                .or_else(|_| expr_eq(&d1, &Expr::Neg(Box::new(d2)), budget))
        }
        (Answer::Set(a), Answer::Set(b)) => set_eq(a, b, budget),
        // a bare list against a braced or bracketed one: compare as sets
        (Answer::Set(a), Answer::Bracketed(_, b, _))
        | (Answer::Bracketed(_, b, _), Answer::Set(a)) => set_eq(a, b, budget),
        (Answer::Bracketed(o1, a, c1), Answer::Bracketed(o2, b, c2)) => {
            if (o1, c1) != (o2, c2) {
                return Err(format!("brackets {o1}{c1} vs {o2}{c2}"));
            }
            if a.len() != b.len() {
                return Err(format!("{} elements vs {}", a.len(), b.len()));
            }
            a.iter().zip(b).try_for_each(|(x, y)| expr_eq(x, y, budget))
        }
        _ => Err("different kinds of answer".into()),
    }
}

fn set_eq(a: &[Expr], b: &[Expr], budget: &mut Budget) -> Result<(), String> {
    if a.len() != b.len() {
        return Err(format!("{} elements vs {}", a.len(), b.len()));
    }
    let mut used = vec![false; b.len()];
    for x in a {
        let hit = (0..b.len()).find(|&j| !used[j] && expr_eq(x, &b[j], budget).is_ok());
        match hit {
            Some(j) => used[j] = true,
            None => return Err("an element of the gold set is missing".into()),
        }
    }
    Ok(())
}

/// Numeric equality, or for expressions with variables, equality at random points.
pub fn expr_eq(a: &Expr, b: &Expr, budget: &mut Budget) -> Result<(), String> {
    let mut vars = Vec::new();
    variables(a, &mut vars);
    variables(b, &mut vars);
    if vars.is_empty() {
        let x = eval(a, &[], budget)?;
        let y = eval(b, &[], budget)?;
        if x.to_f64().is_infinite()
            && y.to_f64().is_infinite()
            && x.to_f64().signum() == y.to_f64().signum()
        {
            return Ok(());
        }
        if !x.is_finite() || !y.is_finite() {
            return Err("value out of range".into());
        }
        return if x.approx_eq(y, REL_TOL)
            || decimal_approximation(x, y)
                && Num::Approx(x.to_f64()).approx_eq(Num::Approx(y.to_f64()), REL_TOL)
        {
            Ok(())
        } else {
            Err(format!("{} ≠ {}", show(x), show(y)))
        };
    }
    // identity testing: agree at 8 pseudo-random points (seeded, so verdicts are stable)
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let mut agreed = 0;
    for _ in 0..8 {
        let env: Vec<(char, f64)> = vars
            .iter()
            .map(|&v| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (v, 0.3 + (state % 10_000) as f64 / 10_000.0 * 2.7)
            })
            .collect();
        let (Ok(x), Ok(y)) = (eval(a, &env, budget), eval(b, &env, budget)) else {
            continue; // a pole or a domain edge: try another point
        };
        if !x.is_finite() || !y.is_finite() {
            continue;
        }
        if !Num::Approx(x.to_f64()).approx_eq(Num::Approx(y.to_f64()), 1e-7) {
            return Err(format!("differ at {env:?}: {} vs {}", show(x), show(y)));
        }
        agreed += 1;
    }
    if agreed >= 3 {
        Ok(())
    } else {
        Err("could not evaluate the expressions".into())
    }
}

/// Whether one side is a rational with no finite decimal expansion (1/3) and the other a
/// decimal literal (0.3333333333): then a decimal within tolerance is accepted. Two integers or
/// two terminating decimals must match exactly.
fn decimal_approximation(x: Num, y: Num) -> bool {
    let terminating = |d: i128| {
        let mut d = d;
        for p in [2, 5] {
            while d % p == 0 {
                d /= p;
            }
        }
        d == 1
    };
    match (x, y) {
        (Num::Exact(_, a), Num::Exact(_, b)) => terminating(a) != terminating(b),
        _ => false,
    }
}

fn show(n: Num) -> String {
    match n {
        Num::Exact(a, 1) => a.to_string(),
        Num::Exact(a, b) => format!("{a}/{b}"),
        Num::Approx(x) => format!("{x}"),
    }
}

/// Partial credit for a numeric answer (see `PartKind::DigitMatch`): the extracted answer and
/// the gold one compared character by character from the right, over the longer length.
pub fn digit_match(completion: &str, gold: &str) -> f32 {
    let Some(found) = extract::extract_answer(completion) else {
        return 0.0;
    };
    let (a, b): (Vec<char>, Vec<char>) = (
        found.answer.trim().chars().collect(),
        gold.trim().chars().collect(),
    );
    let longer = a.len().max(b.len());
    if longer == 0 {
        return 0.0;
    }
    let same = a
        .iter()
        .rev()
        .zip(b.iter().rev())
        .filter(|(x, y)| x == y)
        .count();
    same as f32 / longer as f32
}

#[cfg(test)]
mod digit_tests {
    use super::digit_match;

    #[test]
    fn digits_match_from_the_right_over_the_longer_answer() {
        assert_eq!(digit_match("57", "57"), 1.0);
        assert_eq!(digit_match("47", "57"), 0.5);
        assert_eq!(digit_match("157", "57"), 2.0 / 3.0);
        assert_eq!(digit_match("7", "57"), 0.5);
        assert_eq!(digit_match("75", "57"), 0.0);
        assert_eq!(digit_match("no number", "57"), 0.0);
        assert_eq!(digit_match("the answer is 108", "108"), 1.0);
    }
}

#[cfg(test)]
mod majority_tests {
    use super::majority;

    #[test]
    fn equivalent_answers_vote_together_and_ties_go_to_the_first_group() {
        // 1/2, 0.5 and \frac{1}{2} are one group of three against two 3s
        let votes = [
            Some("3"),
            Some("1/2"),
            Some("3"),
            Some("0.5"),
            Some("\\frac{1}{2}"),
        ];
        assert_eq!(majority(&votes), Some(1));
        // two against two: the group seen first
        assert_eq!(
            majority(&[Some("7"), Some("8"), Some("8"), Some("7")]),
            Some(0)
        );
        // completions without an answer do not vote
        assert_eq!(majority(&[None, Some("4"), None]), Some(1));
        assert_eq!(majority(&[None, None]), None);
        assert_eq!(majority(&[]), None);
    }
}
