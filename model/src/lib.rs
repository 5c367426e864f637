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
//! - [`forward`]: the decoder itself, with an optional KV cache; long sequences take
//!   [`attention`], which keeps no attention probabilities for the backward; its projections
//!   are [`linear`]'s product, whose backward writes each weight's gradient in its own layout.
//! - [`checkpoint`]: optional per-layer activation checkpointing of training forwards.
//! - [`logprobs`]: per-token log-probs and entropies of given completions, through [`head`]:
//!   the output layer fused with log-softmax, in chunks of rows.
//! - [`sampling`], [`generate`], [`rng`]: seeded sampling and batched generation.
//! - [`ops`]: the fused CPU kernels and (feature `cuda`) `cuda`'s launchers of
//!   `kernels/ferrite.cu`, with the launch geometry in [`launch`] (shared with the kernels' CPU
//!   emulation tests) and the kernels' parameter lists in [`signatures`] (each launch's
//!   arguments are checked against them).

pub mod attach;
pub mod attention;
pub mod builtin;
pub mod checkpoint;
pub mod config;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod forward;
pub mod generate;
pub mod gguf;
pub mod head;
pub mod init;
pub mod kv_cache;
pub mod launch;
pub mod linear;
pub mod logprobs;
pub mod lora;
pub mod ops;
pub mod rng;
pub mod sampling;
pub mod signatures;
#[cfg(test)]
mod test_util;
pub mod tokenizer;
pub mod weights;

pub use config::{Architecture, ModelConfig};
pub use error::{ModelError, Result};
pub use forward::{forward, Batch};
pub use weights::Weights;

/// Process-wide tuning for candle on the CPU, done once at start-up before any thread starts:
/// glibc keeps freed buffers (`tune_allocator`), and [`pin_thread_count`].
pub fn tune_process() {
    tune_allocator();
    pin_thread_count();
}

/// Keeps freed tensor buffers in the process instead of returning them to the kernel after
/// every op: candle allocates a fresh buffer per op, and glibc's defaults turn each large one
/// into an mmap / munmap pair with page faults on first touch (measured: 13% of a CPU train
/// step). A no-op off glibc.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_TOP_PAD: i32 = -2;
        const M_MMAP_THRESHOLD: i32 = -3;
        // SAFETY: mallopt only changes allocator tuning parameters; called before threads start.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, i32::MAX);
            mallopt(M_TRIM_THRESHOLD, i32::MAX);
            mallopt(M_TOP_PAD, 256 << 20);
        }
    }
}

/// candle asks for its thread count before every CPU matmul, and unless `RAYON_NUM_THREADS` is
/// set, on Linux machines whose cores all have the same capacity that means counting physical
/// cores by reading and parsing `/proc/cpuinfo` again (`num_cpus::get_physical`, uncached).
/// Measured on the default run (2 cores): some 470 reads a second per thread, and its 60 RL
/// steps took 41 s instead of 28 s. This resolves candle's count once and fixes it in
/// `RAYON_NUM_THREADS`, which candle reads first; rayon's global pool is built beforehand so
/// that it keeps its own default (logical CPUs). A count the user set is left alone.
/// Call once at start-up, before any thread starts.
pub fn pin_thread_count() {
    let set = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .is_some_and(|n| n > 0);
    if set {
        return;
    }
    // Fails only when the global pool already exists, which is just as good.
    let _ = rayon::ThreadPoolBuilder::new().build_global();
    let n = candle_core::utils::get_num_threads();
    // SAFETY (for editions where set_var is unsafe): no other thread reads the environment yet.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
}
