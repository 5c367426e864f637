//! A decode step's matmuls, counted by `forward::linear_calls`: a packed layer multiplies once for
//! q/k/v and once for gate/up (4 products per layer), an unpacked one once for q/k/v (its matrices
//! concatenated for the call, `forward::packed_qkv`) and apart for gate and up (5). One test in
//! its own binary: the count is process-wide.

mod common;

use candle_core::{DType, Device};
use common::*;
use model::kv_cache::KvCache;
use model::{forward, Batch};

#[test]
fn a_packed_layer_multiplies_four_times_per_decode_step_an_unpacked_one_five() {
    for (name, w) in both_layouts("tiny-qwen2") {
        let layers = w.layers.len();
        let mut cache = KvCache::new(&w.config, 2, 8, DType::F32, &Device::Cpu).unwrap();
        let prompt = Batch::new(
            &[vec![3, 4, 5], vec![6, 7, 8]],
            &[vec![1; 3], vec![1; 3]],
            &Device::Cpu,
        )
        .unwrap();
        let w = w.detach();
        forward(&w, &prompt, Some(&mut cache)).unwrap();
        let before = forward::linear_calls();
        let step = Batch::decode(&[9, 10], &[0, 0], cache.len(), &Device::Cpu).unwrap();
        forward(&w, &step, Some(&mut cache)).unwrap();
        let per_layer = if name.contains("packed") { 4 } else { 5 };
        // and the output layer's one
        assert_eq!(
            forward::linear_calls() - before,
            per_layer * layers + 1,
            "{name}"
        );
    }
}
