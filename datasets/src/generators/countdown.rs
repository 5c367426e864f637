//! Countdown (TinyZero's task): reach a target from 3–4 numbers with + − × ÷, each number used
//! once. Every generated instance is solvable: the target is the value of a random expression
//! over the numbers that stays a positive integer at every step.

use serde_json::{json, Map};

use super::Generator;
use crate::record::{Message, Prompt, Record};
use crate::rng::Stream;

#[derive(Debug, Clone, PartialEq)]
pub struct Countdown {
    /// 3 or 4 numbers.
    pub min_numbers: u32,
    pub max_numbers: u32,
    /// Numbers are drawn from `1..=max_number`.
    pub max_number: i64,
    /// Largest target.
    pub max_target: i64,
}

impl Default for Countdown {
    fn default() -> Self {
        Countdown {
            min_numbers: 3,
            max_numbers: 4,
            max_number: 99,
            max_target: 999,
        }
    }
}

impl Countdown {
    /// Difficulty 1 = three small numbers; 2 = three up to 99; 3+ = four up to 99.
    pub fn with_difficulty(level: u32) -> Self {
        match level {
            0 | 1 => Countdown {
                min_numbers: 3,
                max_numbers: 3,
                max_number: 20,
                max_target: 100,
            },
            2 => Countdown {
                min_numbers: 3,
                max_numbers: 3,
                ..Countdown::default()
            },
            _ => Countdown {
                min_numbers: 4,
                max_numbers: 4,
                ..Countdown::default()
            },
        }
    }
}

/// TinyZero's qwen-instruct prompt.
pub fn prompt(nums: &[i64], target: i64) -> Vec<Message> {
    let list = nums
        .iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    vec![
        Message {
            role: "system".into(),
            content: "You are a helpful assistant. You first think about the reasoning process in the mind and then provide the user with the answer.".into(),
        },
        Message {
            role: "user".into(),
            content: format!(
                "Using the numbers [{list}], create an equation that equals {target}. You can use basic arithmetic operations (+, -, *, /) and each number can only be used once. Show your work in <think> </think> tags. And return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
            ),
        },
    ]
}

impl Generator for Countdown {
    fn name(&self) -> &'static str {
        "countdown"
    }

    fn generate(&self, seed: u64, split: u64, index: u64) -> Record {
        let mut attempt = 0u64;
        loop {
            let mut rng = Stream::new(seed, 0xC0DE ^ split, index.wrapping_mul(1 << 20) ^ attempt);
            attempt += 1;
            let n = rng.range(
                self.min_numbers as i64,
                self.max_numbers.max(self.min_numbers) as i64,
            ) as usize;
            let nums: Vec<i64> = (0..n).map(|_| rng.range(1, self.max_number)).collect();
            // combine in a random order with random operators, keeping positive integers
            let mut order: Vec<usize> =
                rng.permutation(n).into_iter().map(|i| i as usize).collect();
            let first = order.remove(0);
            let (mut value, mut expr) = (nums[first], nums[first].to_string());
            let mut ok = true;
            for i in order {
                let x = nums[i];
                let choices: Vec<char> = ['+', '-', '*', '/']
                    .into_iter()
                    .filter(|op| match op {
                        '-' => value > x,
                        '/' => value % x == 0,
                        _ => true,
                    })
                    .collect();
                let op = *rng.pick(&choices);
                value = match op {
                    '+' => value + x,
                    '-' => value - x,
                    '*' => value * x,
                    _ => value / x,
                };
                expr = format!("({expr} {op} {x})");
                if value <= 0 || value > self.max_target {
                    ok = false;
                    break;
                }
            }
            if !ok {
                continue;
            }
            let mut metadata = Map::new();
            metadata.insert("task".into(), json!("countdown"));
            metadata.insert("target".into(), json!(value));
            metadata.insert("nums".into(), json!(nums));
            metadata.insert("solution".into(), json!(expr));
            return Record {
                id: index,
                prompt: Prompt::Messages(prompt(&nums, value)),
                answer: Some(value.to_string()),
                chosen: None,
                rejected: None,
                metadata,
            };
        }
    }
}
