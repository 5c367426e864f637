//! Every generator's gold answer scores as correct under the verifiers of `rewards`, and
//! perturbed answers as incorrect; records are deterministic in (seed, split, index).

use datasets::generators::{
    arithmetic::Arithmetic, countdown::Countdown, knights::KnightsKnaves, Generator,
};
use proptest::prelude::*;
use rewards::knights::{parse_solution, Role};
use rewards::{countdown, knights, math};

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn arithmetic_gold_is_correct_and_off_by_one_is_not(seed in 0u64..1000, index in 0u64..10_000, level in 1u32..6) {
        let g = Arithmetic::with_difficulty(level);
        let r = g.generate(seed, 0, index);
        let gold = r.answer.clone().unwrap();
        let right = math::verify(&format!("So the result is \\boxed{{{gold}}}."), &gold).correct;
        prop_assert!(right);
        let value: i128 = gold.parse().unwrap();
        let off_by_one = math::verify(&format!("\\boxed{{{}}}", value + 1), &gold).correct;
        prop_assert!(!off_by_one);
        // the expression in the prompt evaluates to the gold answer (checked by the math verifier)
        let expr = r.metadata["expression"].as_str().unwrap().replace('*', "\\times");
        let evaluated = math::verify(&format!("\\boxed{{{expr}}}"), &gold).correct;
        prop_assert!(evaluated, "{} vs {}", expr, gold);
        prop_assert_eq!(g.generate(seed, 0, index), r);
    }

    #[test]
    fn countdown_solution_scores_one_and_wrong_targets_do_not(seed in 0u64..1000, index in 0u64..10_000, level in 1u32..4) {
        let g = Countdown::with_difficulty(level);
        let r = g.generate(seed, 0, index);
        let target = r.metadata["target"].as_i64().unwrap();
        let nums: Vec<i64> = serde_json::from_value(r.metadata["nums"].clone()).unwrap();
        let solution = r.metadata["solution"].as_str().unwrap();
        let completion = format!("<think>I combine them.</think>\n<answer>{solution}</answer>");
        prop_assert_eq!(countdown::score(&completion, target, &nums).reward, 1.0, "{} = {}", solution, target);
        prop_assert_eq!(countdown::score(&completion, target + 1, &nums).reward, 0.1);
        let mut fewer = nums.clone();
        fewer.push(1);
        prop_assert_eq!(countdown::score(&completion, target, &fewer).reward, 0.1);
        let asks = r.prompt.messages()[1].content.contains(&format!("equals {target}"));
        prop_assert!(asks);
    }

    #[test]
    fn knights_solution_scores_three_and_a_flipped_role_does_not(seed in 0u64..1000, index in 0u64..10_000, people in 2u32..9) {
        let g = KnightsKnaves::with_people(people);
        let r = g.generate(seed, 0, index);
        let answer = r.answer.clone().unwrap();
        let solution = parse_solution(&answer).unwrap();
        prop_assert_eq!(solution.len(), people as usize);
        let good = format!("<think>Consider each claim.</think>\n<answer>{answer}</answer>");
        prop_assert_eq!(knights::score(&good, &solution).reward, 3.0);
        let (name, role) = &solution[0];
        let flipped = match role { Role::Knight => "knave", Role::Knave => "knight" };
        let wrong_answer = answer.replacen(
            &format!("{name} is a {}", if *role == Role::Knight { "knight" } else { "knave" }),
            &format!("{name} is a {flipped}"),
            1,
        );
        let wrong = format!("<think>x</think><answer>{wrong_answer}</answer>");
        prop_assert_eq!(knights::score(&wrong, &solution).reward, -0.5);
        let quiz = &r.prompt.messages()[1].content;
        for (n, _) in &solution {
            prop_assert!(quiz.contains(n.as_str()));
        }
    }
}

#[test]
fn seeds_and_splits_give_different_records() {
    let g = KnightsKnaves::default();
    assert_ne!(g.generate(1, 0, 5), g.generate(2, 0, 5));
    assert_ne!(g.generate(1, 0, 5), g.generate(1, 1, 5));
    assert_ne!(g.generate(1, 0, 5), g.generate(1, 0, 6));
}
