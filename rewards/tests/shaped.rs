//! Open-R1's cosine-scaled reward and n-gram repetition penalty against its formulas
//! (scripts/make_reward_fixtures.py writes tests/data/shaped.json), and both as reward parts.

use rewards::compose::{Gold, Part, PartKind, RewardSpec, Sample};
use rewards::format::{cosine_scaled, repetition_penalty, CosineRewards};
use serde_json::Value;

fn fixture() -> Value {
    serde_json::from_str(include_str!("data/shaped.json")).unwrap()
}

#[test]
fn cosine_scaled_reward_matches_open_r1() {
    let f = fixture();
    let cases = f["cosine"].as_array().unwrap();
    assert_eq!(cases.len(), 60);
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let p: Vec<f64> = serde_json::from_value(c["params"].clone()).unwrap();
        let r = CosineRewards {
            min_wrong: p[0],
            max_wrong: p[1],
            min_correct: p[2],
            max_correct: p[3],
            max_chars: p[4] as usize,
        };
        let correct = c["correct"].as_bool().unwrap();
        let got = cosine_scaled(text.chars().count(), correct, &r);
        let want = c["reward"].as_f64().unwrap();
        assert!(
            (f64::from(got) - want).abs() < 1e-6,
            "{text:?} {p:?} correct {correct}: {got} vs {want}"
        );
    }
}

#[test]
fn repetition_penalty_matches_open_r1() {
    let f = fixture();
    let cases = f["repetition"].as_array().unwrap();
    assert_eq!(cases.len(), 40);
    let mut nonzero = 0;
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let n = c["ngram_size"].as_u64().unwrap() as usize;
        let penalty = c["max_penalty"].as_f64().unwrap();
        let got = repetition_penalty(text, n, penalty);
        let want = c["reward"].as_f64().unwrap();
        assert!(
            (f64::from(got) - want).abs() < 1e-6,
            "{text:?} n {n}: {got} vs {want}"
        );
        nonzero += usize::from(want != 0.0);
    }
    assert!(nonzero >= 20, "{nonzero}");
}

/// As parts of a reward: the cosine part judges the answer as the math part does, sets the
/// accuracy, and pays a short right answer more than a long one and a long wrong one more than a
/// short one; the repetition part counts the completion's repeated n-grams; a gold answer no
/// verifier reads is a recorded failure.
#[test]
fn cosine_and_repetition_parts_score_completions() {
    let spec = RewardSpec {
        parts: vec![
            Part {
                name: "cosine".into(),
                kind: PartKind::Cosine {
                    rewards: CosineRewards {
                        max_chars: 100,
                        ..Default::default()
                    },
                    think_in_prompt: false,
                },
                weight: 1.0,
            },
            Part {
                name: "repetition".into(),
                kind: PartKind::Repetition {
                    ngram_size: 2,
                    max_penalty: -1.0,
                },
                weight: 0.5,
            },
        ],
    };
    let gold = Gold::Math("42".into());
    let score = |completion: &str| {
        spec.score(&Sample {
            completion,
            completion_tokens: 0,
            gold: &gold,
            context: "{}",
        })
    };
    let short_right = score("42");
    let long_right = score(&format!("{} so 42", "think ".repeat(12)));
    let short_wrong = score("41");
    let long_wrong = score(&format!("{} so 41", "think ".repeat(12)));
    assert_eq!(short_right.correct, Some(true));
    assert_eq!(short_wrong.correct, Some(false));
    let part = |s: &rewards::compose::Scored, i: usize| s.parts[i].1;
    assert!(part(&short_right, 0) > part(&long_right, 0));
    assert!(part(&long_right, 0) > 0.5 && part(&short_right, 0) <= 1.0);
    assert!(part(&long_wrong, 0) > part(&short_wrong, 0));
    assert!(part(&short_wrong, 0) >= -1.0 && part(&long_wrong, 0) < -0.5);
    // the 13 word pairs of "think ×12 so 42" are 3 distinct ones: −(1 − 3/13)
    let want = -(1.0 - 3.0 / 13.0);
    assert!(
        (part(&long_right, 1) - want).abs() < 1e-6,
        "{}",
        part(&long_right, 1)
    );
    assert_eq!(part(&short_right, 1), 0.0);
    let total = part(&long_right, 0) + 0.5 * part(&long_right, 1);
    assert!((long_right.total - total).abs() < 1e-6);
    let none = spec.score(&Sample {
        completion: "42",
        completion_tokens: 1,
        gold: &Gold::None,
        context: "{}",
    });
    assert_eq!(none.failures.len(), 1);
    assert_eq!(none.failures[0].0, "cosine");
}
