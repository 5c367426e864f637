//! Multi-digit arithmetic: `a op b op c ...` with integer operands; the gold answer is the exact
//! integer value (precedence as usual: × before + and −).

use serde_json::{json, Map};

use super::Generator;
use crate::record::{Prompt, Record};
use crate::rng::Stream;

#[derive(Debug, Clone, PartialEq)]
pub struct Arithmetic {
    /// Digits per operand, drawn from `1..=max_digits`.
    pub max_digits: u32,
    /// Operands per problem, drawn from `2..=max_operands`.
    pub max_operands: u32,
    /// Operators to draw from, among `+`, `-`, `*`.
    pub operators: Vec<char>,
}

impl Arithmetic {
    /// Difficulty 1..: more digits and operands as it grows.
    pub fn with_difficulty(level: u32) -> Self {
        let level = level.max(1);
        Arithmetic {
            max_digits: level.min(6),
            max_operands: 2 + level / 2,
            operators: if level == 1 {
                vec!['+', '-']
            } else {
                vec!['+', '-', '*']
            },
        }
    }
}

impl Default for Arithmetic {
    fn default() -> Self {
        Arithmetic::with_difficulty(2)
    }
}

/// Evaluates `+ - *` left to right with × binding tighter, exactly (i128).
pub fn evaluate(operands: &[i64], operators: &[char]) -> i128 {
    let mut terms: Vec<i128> = vec![operands[0] as i128];
    let mut signs: Vec<i128> = vec![1];
    for (op, &x) in operators.iter().zip(&operands[1..]) {
        match op {
            '*' => *terms.last_mut().expect("non-empty") *= x as i128,
            '+' => {
                terms.push(x as i128);
                signs.push(1);
            }
            _ => {
                terms.push(x as i128);
                signs.push(-1);
            }
        }
    }
    terms.iter().zip(&signs).map(|(t, s)| t * s).sum()
}

impl Generator for Arithmetic {
    fn name(&self) -> &'static str {
        "arithmetic"
    }

    fn generate(&self, seed: u64, split: u64, index: u64) -> Record {
        let mut rng = Stream::new(seed, 0xA217 ^ split, index);
        let n = rng.range(2, self.max_operands.max(2) as i64) as usize;
        let operands: Vec<i64> = (0..n)
            .map(|_| {
                let digits = rng.range(1, self.max_digits.max(1) as i64) as u32;
                rng.range(
                    if digits == 1 {
                        0
                    } else {
                        10i64.pow(digits - 1)
                    },
                    10i64.pow(digits) - 1,
                )
            })
            .collect();
        let ops: Vec<char> = (1..n).map(|_| *rng.pick(&self.operators)).collect();
        let mut expr = operands[0].to_string();
        for (op, x) in ops.iter().zip(&operands[1..]) {
            expr.push_str(&format!(" {op} {x}"));
        }
        let value = evaluate(&operands, &ops);
        let mut metadata = Map::new();
        metadata.insert("task".into(), json!("arithmetic"));
        metadata.insert("expression".into(), json!(expr));
        Record {
            id: index,
            prompt: Prompt::Text(format!(
                "Compute {expr}. Think step by step, then give the final answer as \\boxed{{N}}."
            )),
            answer: Some(value.to_string()),
            chosen: None,
            rejected: None,
            metadata,
        }
    }
}
