//! Helpers of the crate's unit tests: seeded random tensors and relative differences.

use candle_core::{Device, Tensor};

/// A CPU f32 tensor of `shape` drawn from N(0, scale²) with the crate's seeded RNG.
pub fn random(shape: &[usize], seed: u64, scale: f64) -> Tensor {
    let mut rng = crate::rng::Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| (rng.normal() * scale) as f32).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// `max |a − b| / max |b|`.
pub fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let max_abs = |t: &Tensor| {
        t.abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    max_abs(&(a - b).unwrap()) / max_abs(b).max(1e-12)
}
