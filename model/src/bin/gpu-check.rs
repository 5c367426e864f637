//! GPU checks of the model crate: the CUDA path against the CPU path on a small random model
//! (forward, backward, greedy generation), then timings. Run on the GPU machine:
//!
//!     LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib ./gpu/gpu-check
//!
//! Prints one table; exits non-zero when a check fails.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use model::config::{Architecture, ModelConfig, RopeScaling};
use model::generate::{generate, GenerationConfig};
use model::logprobs::sequence_logprobs;
use model::sampling::SamplingParams;
use model::{forward, init, Batch, Weights};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn config() -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Qwen2,
        vocab_size: 2048,
        hidden_size: 256,
        intermediate_size: 704,
        num_hidden_layers: 4,
        num_attention_heads: 8,
        num_key_value_heads: 2,
        head_dim: 32,
        rms_norm_eps: 1e-6,
        rope_theta: 1e6,
        rope_scaling: RopeScaling::Default,
        max_position_embeddings: 4096,
        tie_word_embeddings: false,
        qkv_bias: true,
        bos_token_id: None,
        eos_token_ids: vec![],
        pad_token_id: None,
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    let d = (a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?
        - b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)?;
    Ok(d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn max_abs(a: &Tensor) -> Result<f32> {
    Ok(a.to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?)
}

/// A padded batch of `b` rows of up to `t` tokens (every other row shorter, right-padded).
fn batch_rows(b: usize, t: usize, vocab: u32) -> (Vec<Vec<u32>>, Vec<Vec<u8>>) {
    let mut rng = model::rng::Rng::new(1);
    let ids = (0..b)
        .map(|_| (0..t).map(|_| rng.below(vocab as u64) as u32).collect())
        .collect();
    let mask = (0..b)
        .map(|i| {
            (0..t)
                .map(|j| u8::from(i % 2 == 0 || j < t * 3 / 4))
                .collect()
        })
        .collect();
    (ids, mask)
}

fn loss_and_grads(
    w: &Weights,
    ids: &[Vec<u32>],
    mask: &[Vec<u8>],
) -> Result<(f32, Vec<(String, Tensor)>)> {
    let (vars, trainable) = w.to_vars()?;
    let lp = sequence_logprobs(&trainable, ids, mask, mask, 1.0)?;
    let loss = (lp.logprobs.sum_all()?.neg()? / lp.mask.sum_all()?.to_scalar::<f32>()? as f64)?;
    let grads = loss.backward()?;
    let mut out = Vec::new();
    for (name, v) in vars {
        let g = grads
            .get(v.as_tensor())
            .ok_or(format!("no gradient for {name}"))?;
        out.push((name, g.clone()));
    }
    Ok((loss.to_scalar::<f32>()?, out))
}

fn time<T>(reps: usize, mut f: impl FnMut() -> Result<T>, device: &Device) -> Result<f64> {
    f()?; // warm-up
    device.synchronize()?;
    let start = Instant::now();
    for _ in 0..reps {
        f()?;
    }
    device.synchronize()?;
    Ok(start.elapsed().as_secs_f64() / reps as f64)
}

fn main() -> Result<()> {
    let gpu = Device::new_cuda(0)?;
    let cpu = Device::Cpu;
    let c = config();
    let w_cpu = init::random_weights(&c, 0.05, 0, &cpu)?;
    let w_gpu = w_cpu.to(DType::F32, &gpu)?;
    let mut rows: Vec<(String, String, bool)> = Vec::new();
    let mut check = |name: &str, value: String, ok: bool| rows.push((name.to_string(), value, ok));

    // forward, f32 and bf16
    let (ids, mask) = batch_rows(4, 96, c.vocab_size as u32);
    let lc = forward(&w_cpu, &Batch::new(&ids, &mask, &cpu)?, None)?;
    let lg = forward(&w_gpu, &Batch::new(&ids, &mask, &gpu)?, None)?;
    let d = max_abs_diff(&lc, &lg)?;
    check("forward f32 max|Δlogit|", format!("{d:.2e}"), d < 1e-3);
    let w_bf16 = w_cpu.to(DType::BF16, &gpu)?;
    let lb = forward(&w_bf16, &Batch::new(&ids, &mask, &gpu)?, None)?;
    let rel = max_abs_diff(&lc, &lb)? / max_abs(&lc)?;
    check(
        "forward bf16 rel max|Δlogit|",
        format!("{rel:.2e}"),
        rel < 5e-2,
    );

    // backward
    let (loss_c, gc) = loss_and_grads(&w_cpu, &ids, &mask)?;
    let (loss_g, gg) = loss_and_grads(&w_gpu, &ids, &mask)?;
    check(
        "loss cpu / gpu",
        format!("{loss_c:.6} / {loss_g:.6}"),
        (loss_c - loss_g).abs() < 1e-4,
    );
    let mut worst = (0f32, String::new());
    for ((name, a), (_, b)) in gc.iter().zip(&gg) {
        let rel = max_abs_diff(a, b)? / max_abs(a)?.max(1e-12);
        if rel > worst.0 {
            worst = (rel, name.clone());
        }
    }
    check(
        &format!("grads: worst rel diff ({} tensors)", gc.len()),
        format!("{:.2e} ({})", worst.0, worst.1),
        worst.0 < 1e-3,
    );

    // greedy generation
    let prompts: Vec<Vec<u32>> = ids
        .iter()
        .take(4)
        .map(|r| r[..16 + 8 * (r[0] as usize % 3)].to_vec())
        .collect();
    let cfg = GenerationConfig {
        max_new_tokens: 32,
        sampling: SamplingParams::greedy(),
        ..Default::default()
    };
    let oc = generate(&w_cpu.detach(), &prompts, &cfg, None)?;
    let og = generate(&w_gpu.detach(), &prompts, &cfg, None)?;
    let same = oc
        .iter()
        .zip(&og)
        .filter(|(a, b)| a.tokens == b.tokens)
        .count();
    check(
        "greedy 32 tokens, rows identical",
        format!("{same}/{}", oc.len()),
        same == oc.len(),
    );

    // timings
    let mut timings = Vec::new();
    for (label, w) in [("f32", &w_gpu), ("bf16", &w_bf16)] {
        for (b, t) in [(4, 256), (8, 512)] {
            let (ids, mask) = batch_rows(b, t, c.vocab_size as u32);
            let fwd = time(
                5,
                || Ok(forward(w, &Batch::new(&ids, &mask, &gpu)?, None)?),
                &gpu,
            )?;
            let step = time(3, || loss_and_grads(w, &ids, &mask), &gpu)?;
            timings.push(format!(
                "{label:>5} B={b} T={t}: forward {:.1} ms, forward+backward {:.1} ms ({:.0} tok/s)",
                fwd * 1e3,
                step * 1e3,
                (b * t) as f64 / step
            ));
        }
        let prompts: Vec<Vec<u32>> = (0..32).map(|i| vec![(i % 100) as u32 + 1; 64]).collect();
        let gen_cfg = GenerationConfig {
            max_new_tokens: 64,
            sampling: SamplingParams::default(),
            ..Default::default()
        };
        let start = Instant::now();
        let out = generate(&w.detach(), &prompts, &gen_cfg, None)?;
        let n: usize = out.iter().map(|c| c.tokens.len()).sum();
        timings.push(format!(
            "{label:>5} generate B=32, 64+64 tokens: {:.0} new tok/s",
            n as f64 / start.elapsed().as_secs_f64()
        ));
    }

    println!(
        "\nferrite model gpu-check ({} parameters)",
        c.num_parameters()
    );
    println!("{:<44} {:<28} result", "check", "value");
    let mut failed = 0;
    for (name, value, ok) in &rows {
        println!("{name:<44} {value:<28} {}", if *ok { "ok" } else { "FAIL" });
        failed += usize::from(!ok);
    }
    println!();
    for t in timings {
        println!("{t}");
    }
    if failed > 0 {
        return Err(format!("{failed} GPU checks failed").into());
    }
    Ok(())
}
