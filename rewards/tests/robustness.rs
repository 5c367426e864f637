//! Rewards are total and bounded: arbitrary and pathological completions never panic and finish
//! in bounded time; the Countdown evaluator agrees with exact rational arithmetic.

use std::time::{Duration, Instant};

use proptest::prelude::*;
use rewards::knights::{parse_solution, Role};
use rewards::{countdown, knights, math, Gold, Part, PartKind, RewardSpec, Sample};

fn spec() -> RewardSpec {
    RewardSpec {
        parts: vec![
            Part {
                name: "answer".into(),
                kind: PartKind::MathAnswer,
                weight: 1.0,
            },
            Part {
                name: "format".into(),
                kind: PartKind::TagFormat {
                    think_in_prompt: true,
                },
                weight: 0.1,
            },
        ],
    }
}

fn solution() -> Vec<(String, Role)> {
    parse_solution("(1) Ava is a knight\n(2) Ben is a knave").unwrap()
}

/// Scores with every verifier and returns the slowest call.
fn score_all(text: &str) -> Duration {
    let mut worst = Duration::ZERO;
    let mut time = |f: &dyn Fn()| {
        let t = Instant::now();
        f();
        worst = worst.max(t.elapsed());
    };
    time(&|| {
        let v = math::verify(text, "#### 42");
        assert!(!v.correct || v.predicted.is_some());
    });
    time(&|| {
        let r = countdown::score(text, 24, &[4, 6, 1]).reward;
        assert!([0.0, 0.1, 1.0].contains(&r));
    });
    time(&|| {
        let r = knights::score(text, &solution()).reward;
        assert!([3.0, -0.5, -1.0, -3.0].contains(&r));
    });
    time(&|| {
        let gold = Gold::Math("\\frac{1}{2}".into());
        let s = spec().score(&Sample {
            completion: text,
            completion_tokens: 10,
            gold: &gold,
            context: "{}",
        });
        assert!(s.total.is_finite() && s.failures.is_empty());
    });
    worst
}

/// Generous: a verifier's budget is 200 ms; a debug build on a loaded 2-core machine is slow.
const BOUND: Duration = Duration::from_secs(3);

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_strings(s in "\\PC{0,400}") {
        prop_assert!(score_all(&s) < BOUND);
    }

    #[test]
    fn answer_shaped_strings(s in "(\\\\boxed\\{|\\\\frac|\\{|\\}|\\^|[0-9]{1,4}|[+*/()=,.-]|x|\\\\sqrt|<answer>|</answer>|#### |\\\\%|\\$){0,60}") {
        prop_assert!(score_all(&s) < BOUND);
    }
}

#[test]
fn pathological_completions_fail_in_bounded_time() {
    let ten_mb = "the answer might be 7 ".repeat(10 * 1024 * 1024 / 22);
    let nested_braces = format!("\\boxed{{{}7{}}}", "{".repeat(100_000), "}".repeat(100_000));
    let nested_parens = format!(
        "<answer>{}4+6+1{}</answer>",
        "(".repeat(100_000),
        ")".repeat(100_000)
    );
    let deep_frac = format!(
        "\\boxed{{{}1{}}}",
        "\\frac{1}{".repeat(20_000),
        "}".repeat(20_000)
    );
    let cases = [
        ten_mb.as_str(),
        nested_braces.as_str(),
        nested_parens.as_str(),
        deep_frac.as_str(),
        "\\boxed{10^{10^{10}}}",
        "\\boxed{2^{2^{2^{2^{2^{2}}}}}}",
        "\\boxed{99999999999999999999999999999999999999999999!}",
        "<answer>999999999999999999999999999999 * 4 * 6 * 1</answer>",
    ];
    for c in cases {
        let worst = score_all(c);
        assert!(worst < BOUND, "{} bytes took {worst:?}", c.len());
    }
    assert!(!math::verify("\\boxed{10^{10^{10}}}", "#### 42").correct);
    assert_eq!(countdown::score(&nested_parens, 11, &[4, 6, 1]).reward, 0.1);
}

/// An exact rational evaluator for the test, independent of the crate's.
#[derive(Debug, Clone)]
enum E {
    N(i64),
    Op(Box<E>, char, Box<E>),
}

impl E {
    fn text(&self) -> String {
        match self {
            E::N(n) => n.to_string(),
            E::Op(a, op, b) => format!("({} {op} {})", a.text(), b.text()),
        }
    }

    /// `Some((num, den))`, or `None` on division by zero.
    fn exact(&self) -> Option<(i128, i128)> {
        match self {
            E::N(n) => Some((*n as i128, 1)),
            E::Op(a, op, b) => {
                let (p, q) = a.exact()?;
                let (r, s) = b.exact()?;
                let (n, d) = match op {
                    '+' => (p * s + r * q, q * s),
                    '-' => (p * s - r * q, q * s),
                    '*' => (p * r, q * s),
                    _ => {
                        if r == 0 {
                            return None;
                        }
                        (p * s, q * r)
                    }
                };
                let g = gcd(n, d);
                Some((n / g, d / g))
            }
        }
    }
}

fn gcd(a: i128, b: i128) -> i128 {
    if b == 0 {
        a.abs().max(1)
    } else {
        gcd(b, a % b)
    }
}

fn expr() -> impl Strategy<Value = E> {
    let leaf = (0i64..=12).prop_map(E::N);
    leaf.prop_recursive(4, 16, 2, |inner| {
        (
            inner.clone(),
            prop::sample::select(vec!['+', '-', '*', '/']),
            inner,
        )
            .prop_map(|(a, op, b)| E::Op(Box::new(a), op, Box::new(b)))
    })
}

proptest! {
    #[test]
    fn countdown_evaluator_agrees_with_exact_rationals(e in expr()) {
        let ours = countdown::evaluate(&e.text(), &mut rewards::budget::Budget::default());
        match e.exact() {
            Some((n, d)) => {
                let exact = n as f64 / d as f64;
                let v = ours.expect("no division by zero, so it evaluates");
                prop_assert!((v - exact).abs() <= 1e-9 * exact.abs().max(1.0), "{} = {v}, exactly {n}/{d}", e.text());
            }
            None => prop_assert!(ours.is_err(), "{} divides by zero", e.text()),
        }
    }
}
