//! The decoder that ferrite trains and samples from: Qwen2 and Llama families.
//!
//! One set of weights serves both uses. [`forward`] is the training forward: every op is a
//! composed candle op with a backward (candle-nn's fused kernels silently drop gradients).
//! [`generate`] runs the same forward over detached weights with a preallocated KV cache.
//!
//! - [`config`]: Hugging Face `config.json` / `generation_config.json`.
//! - [`weights`]: safetensors in HF layout (single or sharded, f32 / bf16 / f16), load and save.
//! - [`gguf`]: import of llama.cpp GGUF files (dequantized, HF names, Q/K rows un-permuted).
//! - [`tokenizer`]: `tokenizer.json` and the chat template of `tokenizer_config.json`.
//! - [`forward`]: the decoder itself, with an optional KV cache.
//! - [`logprobs`]: per-token log-probs and entropies of given completions.
//! - [`sampling`], [`generate`], [`rng`]: seeded sampling and batched generation.

pub mod config;
pub mod error;
pub mod forward;
pub mod generate;
pub mod gguf;
pub mod init;
pub mod kv_cache;
pub mod logprobs;
pub mod ops;
pub mod rng;
pub mod sampling;
pub mod tokenizer;
pub mod weights;

pub use config::{Architecture, ModelConfig};
pub use error::{ModelError, Result};
pub use forward::{forward, Batch};
pub use weights::Weights;
