//! Random initialisation from our own seeded RNG, as transformers initialises these models:
//! linear and embedding weights ~ N(0, initializer_range²), biases 0, norm weights 1.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};

use crate::config::ModelConfig;
use crate::error::Result;
use crate::rng::Rng;
use crate::weights::{parameter_shapes, Weights};

pub fn random_weights(c: &ModelConfig, std: f64, seed: u64, device: &Device) -> Result<Weights> {
    let mut rng = Rng::new(seed);
    let mut named = BTreeMap::new();
    for (name, shape) in parameter_shapes(c) {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if name.ends_with("norm.weight") {
            vec![1.0; n]
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            (0..n).map(|_| (rng.normal() * std) as f32).collect()
        };
        named.insert(name, Tensor::from_vec(data, shape, device)?);
    }
    Weights::from_named(c, &named)
}
