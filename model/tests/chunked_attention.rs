//! The chunked attention (no probabilities kept for the backward) against transformers: the
//! golden logits and gradients of tests/golden_tiny.rs with a budget of 8 scores per chunk, so
//! that every layer's attention is chunked, one query row at a time. Its own test binary: the
//! budget is process-wide.

mod common;

use common::*;

#[test]
fn chunked_attention_matches_transformers() {
    model::attention::set_chunk_elements(8);
    for name in ["tiny-qwen2", "tiny-llama", "tiny-qwen3"] {
        check_padded_batch_logits(name);
        check_logprob_loss_gradients(name);
    }
    assert!(
        model::attention::chunked_calls() >= 4,
        "the attention was not chunked"
    );
}
