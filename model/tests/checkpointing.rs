//! Per-layer activation checkpointing against transformers: the golden logits and gradients of
//! tests/golden_tiny.rs with every layer recomputed in the backward, on its own and with the
//! chunked attention inside the recomputed layers. Its own test binary: both switches are
//! process-wide.

mod common;

use common::*;

#[test]
fn checkpointed_layers_match_transformers() {
    model::checkpoint::set_enabled(true);
    for name in ["tiny-qwen2", "tiny-llama", "tiny-qwen3"] {
        check_padded_batch_logits(name);
        let before = model::checkpoint::recomputed_layers();
        check_logprob_loss_gradients(name);
        assert!(
            model::checkpoint::recomputed_layers() > before,
            "{name}: no layer was recomputed"
        );
    }
    model::attention::set_chunk_elements(8);
    let before = model::attention::chunked_calls();
    check_logprob_loss_gradients("tiny-qwen2");
    assert!(model::attention::chunked_calls() > before);
}
