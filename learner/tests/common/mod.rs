//! Helpers shared by the learner's test binaries (each uses some of them).
#![allow(dead_code)]

use candle_core::Tensor;
use learner::step::Sequence;

/// One sequence per completion length in `lengths` (each of token 50, no advantage) on the prompt
/// of tokens `prompt`: a GRPO group's shape.
pub fn group(prompt: std::ops::Range<u32>, lengths: &[usize]) -> Vec<Sequence> {
    let p: Vec<u32> = prompt.collect();
    lengths
        .iter()
        .map(|&n| Sequence::new(p.clone(), vec![50; n], vec![0.0; n], 0.0))
        .collect()
}

/// The largest absolute difference between two tensors of one shape.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
