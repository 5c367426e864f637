//! `ferrite gpu-check` (feature `cuda`): every GPU check and benchmark of ferrite, for one call
//! on the GPU machine (`scripts/gpu-check.sh` runs it beside PyTorch's anchor, prints the
//! ratios, then runs the built-in experiment with `model.device = "cuda"`):
//!
//!     LD_LIBRARY_PATH=/usr/local/cuda-13.0/targets/x86_64-linux/lib ./gpu/ferrite gpu-check [checks|bench|all|jit]
//!
//! `checks`: each fused CUDA kernel (RMSNorm, RoPE, SwiGLU, masked softmax, log-prob + entropy,
//! the chunked output layer, the token embedding, the row selection and its scatter) against the
//! composed ops on fresh random inputs, forward and backward, f32 and bf16; the device sampler against the host's (temperature, top-k, top-p);
//! decode attention against the composed ops; the fused AdamW against the
//! composed update; then a small model's GPU forward, backward (f32 and bf16) and greedy
//! generation against the CPU path; then running out of device memory (recognised, and a
//! learner step that runs again in pieces). `bench`: the Qwen2.5-0.5B shape — learner tokens/s and peak
//! device memory at B=8, T=1024 with a per-phase and per-kernel split, generation tokens/s at
//! B=64 and B=256 (128-token prompts, 256 new tokens), and the sampler's time per decode step at
//! B=256. Each section prints its rows, lines and JSON lines (one per measurement) as it ends, and
//! the whole table again at the end; fails when a check fails. `GPU_CHECK_DEVICE=cpu ferrite gpu-check checks`
//! dry-runs the checks' own code on the CPU (the kernel checks then fail: there are no kernels).
//! `GPU_CHECK_ONLY=model,optimizer` runs only the sections whose names contain one of the words.
//! `jit`: compiles every kernel module (ferrite's and candle's) for the GPU into the driver's
//! compute cache, in parallel, and prints each module's seconds. `glue` (also the first section
//! of `checks`): each launcher of `model::cuda` against the CPU path, needing no kernel but
//! ferrite's, so that `scripts/fake-gpu.sh` runs it on the CPU.

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use learner::optim::{AdamW, AdamWConfig};
use model::config::{Architecture, ModelConfig, RopeScaling};
use model::generate::{generate, GenerationConfig};
use model::logprobs::sequence_logprobs;
use model::sampling::SamplingParams;
use model::{forward, init, ops, Batch, Weights};

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

/// The largest of `xs` (0 for none), and NaN where one of them is: `f32::max` and candle's `max`
/// pass over a NaN, which made a check whose output held NaNs (memory a kernel never wrote, say)
/// read as close as its finite elements.
fn nan_max(xs: impl IntoIterator<Item = f64>) -> f64 {
    xs.into_iter().fold(0.0, |m, x| {
        if m.is_nan() || x.is_nan() {
            f64::NAN
        } else {
            m.max(x)
        }
    })
}

/// A tensor's elements in f32, on the host.
fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    let t = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// max|a| over a tensor's elements, NaN where one is NaN.
fn max_abs(a: &Tensor) -> Result<f32> {
    Ok(nan_max(host_f32(a)?.into_iter().map(|x| f64::from(x.abs()))) as f32)
}

/// `max|a − b|`, `max|a|` and `max|b|` over the elements, from one host copy of each: NaN where
/// one holds a NaN (equal infinities, a mask's, differ by 0; an infinity against a finite value
/// by infinity).
fn compare(a: &Tensor, b: &Tensor) -> Result<[f32; 3]> {
    if a.dims() != b.dims() {
        return Err(format!("shape {:?} against {:?}", a.dims(), b.dims()).into());
    }
    let (a, b) = (host_f32(a)?, host_f32(b)?);
    let d = a
        .iter()
        .zip(&b)
        .map(|(&x, &y)| if x == y { 0.0 } else { f64::from(x - y).abs() });
    let largest = |v: &[f32]| nan_max(v.iter().map(|x| f64::from(x.abs()))) as f32;
    Ok([nan_max(d) as f32, largest(&a), largest(&b)])
}

/// max|a − b| (see [`compare`]).
fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok(compare(a, b)?[0])
}

/// The largest of the per-tensor `max|a − b| / max|a|` over two gradient lists, and its name.
fn worst_rel(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> Result<(f32, String)> {
    let mut worst = (0f32, String::new());
    for ((name, a), (_, b)) in a.iter().zip(b) {
        let [d, scale, _] = compare(a, b)?;
        let rel = d / scale.max(1e-12);
        if !worst.0.is_nan() && (rel.is_nan() || rel > worst.0) {
            worst = (rel, name.clone());
        }
    }
    Ok(worst)
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
    let grads = gradients(&loss, vars)?;
    Ok((loss.to_scalar::<f32>()?, grads))
}

/// The gradient of `loss` for each of `vars`, by name; an error for one it did not reach.
fn gradients(loss: &Tensor, vars: Vec<(String, Var)>) -> Result<Vec<(String, Tensor)>> {
    let grads = model::checkpoint::backward(loss)?;
    let mut out = Vec::new();
    for (name, v) in vars {
        let g = grads
            .get(v.as_tensor())
            .ok_or(format!("no gradient for {name}"))?;
        out.push((name, g.clone()));
    }
    Ok(out)
}

/// The device sampler against the host's (`model::sampling::draw`, f64) on the same logits and
/// uniforms: temperature 0.7, top-k 50, top-p 0.9, both, and greedy.
fn sampling_checks(gpu: &Device, rows: &mut Vec<(String, String, bool)>) -> Result<()> {
    let (b, v) = (64usize, 151_936usize);
    let mut rng = model::rng::Rng::new(5);
    let u: Vec<f32> = (0..b).map(|_| rng.uniform() as f32).collect();
    // f32 logits, and bf16 and f16 ones read as a 16-bit output layer writes them (the host draws
    // from the same values widened)
    for dtype in KERNEL_DTYPES {
        let z = randn(&[b, v], 42, 3.0, dtype, gpu)?;
        let host = z
            .to_dtype(DType::F32)?
            .to_device(&Device::Cpu)?
            .to_vec2::<f32>()?;
        sampler_rows(&z, &host, &u, dtype, rows)?;
    }
    Ok(())
}

/// The device sampler on `z` against the host's draw on its values `host`, one row per case.
fn sampler_rows(
    z: &Tensor,
    host: &[Vec<f32>],
    u: &[f32],
    dtype: DType,
    rows: &mut Vec<(String, String, bool)>,
) -> Result<()> {
    let b = host.len();
    for (name, temperature, top_k, top_p) in [
        ("T=0.7", 0.7f32, 0usize, 1.0f32),
        ("T=1 top-k 50", 1.0, 50, 1.0),
        ("T=1 top-p 0.9", 1.0, 0, 0.9),
        ("T=0.8 top-k 200 top-p 0.5", 0.8, 200, 0.5),
        ("greedy", 0.0, 0, 1.0),
    ] {
        let p = SamplingParams {
            temperature,
            top_k,
            top_p,
        };
        let drawn = model::cuda::sample_rows(z, u, &p)?;
        let (mut same, mut worst) = (0, 0f64);
        for (i, row) in host.iter().enumerate() {
            let (want, lp, h) = model::sampling::draw(row, u[i] as f64, &p);
            let (id, glp, gh) = drawn[i];
            if id as usize == want {
                same += 1;
                worst = nan_max([worst, (glp as f64 - lp).abs(), (gh as f64 - h).abs()]);
            }
        }
        rows.push((
            format!(
                "sample {name} [64, 151936] {dtype:?}: same token / worst |Δ log-prob, entropy|"
            ),
            format!("{same}/{b}, {worst:.1e}"),
            same >= b - 1 && worst < 1e-3,
        ));
    }
    Ok(())
}

/// The greedy generation of the model checks: 32 new tokens.
fn greedy_32() -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: 32,
        sampling: SamplingParams::greedy(),
        ..Default::default()
    }
}

/// What [`f32_rows`] computed, for the rows that hold other copies against it.
struct F32Run {
    /// The CPU's logits, loss and gradients.
    logits: Tensor,
    loss: f32,
    grads: Vec<(String, Tensor)>,
    /// The GPU copy's gradients.
    gpu_grads: Vec<(String, Tensor)>,
}

/// A CPU model and its f32 copy on the GPU on one batch: the rows `{prefix}forward f32
/// max|Δlogit|`, `{prefix}loss cpu / gpu` and `{prefix}grads: worst rel diff`.
fn f32_rows(
    prefix: &str,
    w_cpu: &Weights,
    w_gpu: &Weights,
    ids: &[Vec<u32>],
    mask: &[Vec<u8>],
    check: &mut dyn FnMut(&str, String, bool),
) -> Result<F32Run> {
    let lc = forward(w_cpu, &Batch::new(ids, mask, &Device::Cpu)?, None)?;
    let lg = forward(
        w_gpu,
        &Batch::new(ids, mask, w_gpu.embed_tokens.device())?,
        None,
    )?;
    let d = max_abs_diff(&lc, &lg)?;
    check(
        &format!("{prefix}forward f32 max|Δlogit|"),
        format!("{d:.2e}"),
        d < 1e-3,
    );
    let (loss_c, gc) = loss_and_grads(w_cpu, ids, mask)?;
    let (loss_g, gg) = loss_and_grads(w_gpu, ids, mask)?;
    check(
        &format!("{prefix}loss cpu / gpu"),
        format!("{loss_c:.6} / {loss_g:.6}"),
        (loss_c - loss_g).abs() < 1e-4,
    );
    let worst = worst_rel(&gc, &gg)?;
    check(
        &format!("{prefix}grads: worst rel diff ({} tensors)", gc.len()),
        format!("{:.2e} ({})", worst.0, worst.1),
        worst.0 < 1e-3,
    );
    Ok(F32Run {
        logits: lc,
        loss: loss_c,
        grads: gc,
        gpu_grads: gg,
    })
}

/// Greedy completions ([`greedy_32`]) of `prompts` from `w_cpu` against each labelled GPU copy
/// of `on_gpu`: a row each, `{prefix}greedy 32 tokens{label}, rows identical`; the GPU copies'
/// completions, in order.
fn greedy_rows(
    prefix: &str,
    w_cpu: &Weights,
    on_gpu: &[(&str, Weights)],
    prompts: &[Vec<u32>],
    check: &mut dyn FnMut(&str, String, bool),
) -> Result<Vec<Vec<model::generate::Completion>>> {
    let cfg = greedy_32();
    let oc = generate(&w_cpu.detach(), prompts, &cfg, None)?;
    let mut out = Vec::new();
    for (label, w) in on_gpu {
        let og = generate(w, prompts, &cfg, None)?;
        let same = oc
            .iter()
            .zip(&og)
            .filter(|(a, b)| a.tokens == b.tokens)
            .count();
        check(
            &format!("{prefix}greedy 32 tokens{label}, rows identical"),
            format!("{same}/{}", oc.len()),
            same == oc.len(),
        );
        out.push(og);
    }
    Ok(out)
}

/// A small Qwen3 (each query and key head RMS-normed before the rotation; head_dim 128, twice
/// hidden / heads, as in the Qwen3 models: the flash kernels' D = 128 in bf16) on the GPU against
/// the CPU: forward (f32, bf16), loss and gradients (f32), and greedy generation, whose decode
/// steps norm the heads in the fused q/k/v epilogue and attention (`decode_qkv_attention`).
fn qwen3_checks(gpu: &Device, rows: &mut Vec<(String, String, bool)>) -> Result<()> {
    let cpu = Device::Cpu;
    let c = ModelConfig {
        architecture: Architecture::Qwen3,
        hidden_size: 256,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        head_dim: 128,
        tie_word_embeddings: true,
        qkv_bias: false,
        ..config()
    };
    let w_cpu = init::random_weights(&c, 0.05, 3, &cpu)?;
    // the norms away from their init of ones, so that a dropped norm shows
    let mut named = w_cpu.named();
    for (name, t) in named.iter_mut() {
        if name.ends_with("_norm.weight") {
            let v: Vec<f32> = (0..t.elem_count())
                .map(|i| 1.0 + 0.3 * (i as f32 * 0.37).sin())
                .collect();
            *t = Tensor::from_vec(v, t.shape(), &cpu)?;
        }
    }
    let w_cpu = Weights::from_named(&c, &named)?;
    let w_gpu = w_cpu.to(DType::F32, gpu)?;
    let mut check = |name: &str, value: String, ok: bool| rows.push((name.to_string(), value, ok));
    let (ids, mask) = batch_rows(4, 96, c.vocab_size as u32);
    let lc = f32_rows("qwen3 ", &w_cpu, &w_gpu, &ids, &mask, &mut check)?.logits;
    let w_bf16 = w_cpu.to(DType::BF16, gpu)?;
    let l16 = forward(&w_bf16, &Batch::new(&ids, &mask, gpu)?, None)?;
    let rel = max_abs_diff(&lc, &l16)? / max_abs(&lc)?;
    check(
        "qwen3 forward bf16 max|Δlogit| / max|logit|",
        format!("{rel:.2e}"),
        rel < 5e-2,
    );
    let prompts: Vec<Vec<u32>> = ids.iter().map(|r| r[..16].to_vec()).collect();
    let on_gpu = [("", w_gpu.detach()), (", packed weights", w_gpu.packed()?)];
    greedy_rows("qwen3 ", &w_cpu, &on_gpu, &prompts, &mut check)?;
    Ok(())
}

/// The small model's GPU forward (f32, bf16), backward and greedy generation against the CPU.
fn model_checks(gpu: &Device, rows: &mut Vec<(String, String, bool)>) -> Result<()> {
    let cpu = Device::Cpu;
    let c = config();
    let w_cpu = init::random_weights(&c, 0.05, 0, &cpu)?;
    let w_gpu = w_cpu.to(DType::F32, gpu)?;
    let mut check = |name: &str, value: String, ok: bool| rows.push((name.to_string(), value, ok));

    // forward and backward, f32
    let (ids, mask) = batch_rows(4, 96, c.vocab_size as u32);
    let F32Run {
        logits: lc,
        loss: loss_c,
        grads: gc,
        gpu_grads: gg,
    } = f32_rows("", &w_cpu, &w_gpu, &ids, &mask, &mut check)?;
    let w_bf16 = w_cpu.to(DType::BF16, gpu)?;
    // 16-bit weights, what a CUDA run trains (bf16, f16; at this model's D = 32 no flash kernel
    // applies): logits, loss and gradients near the f32 CPU ones, within tolerances
    // of each dtype's (the grads' 0.15 in bf16: the CPU's bf16 composed ops read 5.0e-2)
    let mut grads16 = Vec::new();
    for (w16, [forward_tol, loss_tol, grads_tol]) in [
        (w_bf16.clone(), [5e-2, 2e-2, 0.15]),
        (w_cpu.to(DType::F16, gpu)?, [1e-2, 5e-3, 0.05]),
    ] {
        let name = format!("{:?}", w16.embed_tokens.dtype()).to_lowercase();
        let l16 = forward(&w16, &Batch::new(&ids, &mask, gpu)?, None)?;
        let rel = max_abs_diff(&lc, &l16)? / max_abs(&lc)?;
        check(
            &format!("forward {name} rel max|Δlogit|"),
            format!("{rel:.2e}"),
            rel < forward_tol,
        );
        let (loss16, g16) = loss_and_grads(&w16, &ids, &mask)?;
        check(
            &format!("loss cpu f32 / gpu {name}"),
            format!("{loss_c:.4} / {loss16:.4}"),
            ((loss_c - loss16) / loss_c).abs() < loss_tol,
        );
        let worst = worst_rel(&gc, &g16)?;
        check(
            &format!("grads {name}: worst rel diff"),
            format!("{:.2e} ({})", worst.0, worst.1),
            worst.0 < grads_tol,
        );
        grads16.push(g16);
    }
    let gb = &grads16[0];

    // the same gradients on the GPU with every layer recomputed in the backward
    model::checkpoint::set_enabled(true);
    let checkpointed = loss_and_grads(&w_gpu, &ids, &mask);
    model::checkpoint::set_enabled(false);
    let (_, gk) = checkpointed?;
    let (worst, _) = worst_rel(&gg, &gk)?;
    check(
        "grads with layer checkpointing vs without (gpu)",
        format!("{worst:.2e}"),
        worst < 1e-4,
    );

    // the same gradients through the chunked attention (its row kernels between the matmuls),
    // in chunks of 8 query rows, f32 and bf16
    let budget = model::attention::chunk_elements();
    let calls = model::attention::chunked_calls();
    model::attention::set_chunk_elements(4 * c.num_attention_heads * 96 * 8);
    let chunked = loss_and_grads(&w_gpu, &ids, &mask)
        .and_then(|f32_grads| Ok((f32_grads, loss_and_grads(&w_bf16, &ids, &mask)?)));
    model::attention::set_chunk_elements(budget);
    let ((_, gk), (_, gkb)) = chunked?;
    let taken = model::attention::chunked_calls() > calls;
    let (worst, _) = worst_rel(&gg, &gk)?;
    check(
        "grads with chunked attention vs whole (gpu f32)",
        format!("{worst:.2e}"),
        taken && worst < 1e-4,
    );
    let (worst, _) = worst_rel(gb, &gkb)?;
    check(
        "grads with chunked attention vs whole (gpu bf16)",
        format!("{worst:.2e}"),
        taken && worst < 0.1,
    );

    // a model of D = 64 heads, which the flash kernels take: its bf16 and f16 forward (no graph:
    // the prefill's path) and gradients (the attention chunked, as the learner's is) with them,
    // against the CPU's f32 and against the GPU without them
    let c64 = ModelConfig {
        num_attention_heads: 4,
        head_dim: 64,
        ..config()
    };
    let w64 = init::random_weights(&c64, 0.05, 0, &cpu)?;
    let w64_bf16 = w64.to(DType::BF16, gpu)?;
    let l64 = forward(&w64, &Batch::new(&ids, &mask, &cpu)?, None)?;
    let (_, g64) = loss_and_grads(&w64, &ids, &mask)?;
    // tolerances: the forward's, the gradients' against the CPU's and against chunked attention
    for (w16, [forward_tol, cpu_tol, chunked_tol]) in [
        (w64_bf16.clone(), [5e-2, 0.15, 0.1]),
        (w64.to(DType::F16, gpu)?, [1e-2, 0.05, 0.05]),
    ] {
        let name = format!("{:?}", w16.embed_tokens.dtype()).to_lowercase();
        let calls = ops::flash_calls();
        let l16 = forward(&w16, &Batch::new(&ids, &mask, gpu)?, None)?;
        let taken = ops::flash_calls() > calls;
        let rel = max_abs_diff(&l64, &l16)? / max_abs(&l64)?;
        check(
            &format!("forward {name}, flash attention (D=64), rel max|Δlogit|"),
            format!("{rel:.2e}"),
            taken && rel < forward_tol,
        );
        let budget = model::attention::chunk_elements();
        model::attention::set_chunk_elements(4 * c64.num_attention_heads * 96 * 8);
        let calls = ops::flash_calls();
        let flash = loss_and_grads(&w16, &ids, &mask);
        let taken = ops::flash_calls() > calls;
        ops::set_flash_attention(false);
        let without = loss_and_grads(&w16, &ids, &mask);
        ops::set_flash_attention(true);
        model::attention::set_chunk_elements(budget);
        let ((_, g64f), (_, g64w)) = (flash?, without?);
        let worst = worst_rel(&g64, &g64f)?;
        check(
            &format!("grads {name}, flash attention (D=64) vs cpu f32"),
            format!("{:.2e} ({})", worst.0, worst.1),
            taken && worst.0 < cpu_tol,
        );
        let worst = worst_rel(&g64w, &g64f)?;
        check(
            &format!("grads {name}, flash attention (D=64) vs chunked (gpu)"),
            format!("{:.2e} ({})", worst.0, worst.1),
            taken && worst.0 < chunked_tol,
        );
    }

    // the same step twice gives the same bits: no float is added atomically across blocks
    // (RMSNorm's weight gradient is summed over its blocks in a fixed order, the flash backward
    // has no atomics), so a run repeats itself and a resumed one its lost steps
    let w64_gpu = w64.to(DType::F32, gpu)?;
    for w in [&w64_gpu, &w64_bf16, &w_gpu, &w_bf16] {
        let d = w.config.head_dim;
        let dtype = format!("{:?}", w.embed_tokens.dtype()).to_lowercase();
        let ((loss_a, a), (loss_b, b)) = (
            loss_and_grads(w, &ids, &mask)?,
            loss_and_grads(w, &ids, &mask)?,
        );
        let mut differ = 0;
        for ((_, a), (_, b)) in a.iter().zip(&b) {
            differ += usize::from(max_abs_diff(a, b)? != 0.0);
        }
        check(
            &format!("{dtype} loss and grads (D={d}) twice: tensors that differ in a bit"),
            format!("{differ} of {} (loss {loss_a} / {loss_b})", a.len()),
            differ == 0 && loss_a.to_bits() == loss_b.to_bits(),
        );
    }

    // a learner's attention of a few scores (under a chunk's) takes the flash kernels too: the
    // log-probs with a graph are those of a forward without one, to the bit
    let (_, trainable) = w64_bf16.to_vars()?;
    let calls = ops::flash_calls();
    let with_graph = sequence_logprobs(&trainable, &ids, &mask, &mask, 1.0)?.logprobs;
    let taken = ops::flash_calls() > calls;
    let without = sequence_logprobs(&w64_bf16.detach(), &ids, &mask, &mask, 1.0)?.logprobs;
    let d = max_abs_diff(&with_graph, &without)?;
    check(
        "log-probs bf16 with a graph vs without (flash attention both, D=64), max|Δ|",
        format!("{d:.2e}"),
        taken && d == 0.0,
    );

    // the training–inference log-prob gap: what a worker's generation records (the KV cache and
    // the decode kernels, from a packed snapshot in bf16) against what the learner computes for
    // the same tokens (the weights in a graph), f32 and bf16
    let prompts: Vec<Vec<u32>> = ids
        .iter()
        .map(|r| r[..16 + r[1] as usize % 24].to_vec())
        .collect();
    let gaps = [
        ("f32", w_gpu.detach(), w_gpu.clone(), 1e-3),
        (
            "bf16 packed snapshot, D=64",
            w64_bf16.packed()?,
            w64_bf16.clone(),
            0.1,
        ),
    ];
    for (label, w_gen, w_learn, tolerance) in gaps {
        let (worst, mean, n) = behaviour_vs_learner(&w_gen, &w_learn, &prompts)?;
        check(
            &format!("behaviour vs learner log-probs, {label}: max|Δ| (mean)"),
            format!("{worst:.2e} ({mean:.1e}, {n} tokens)"),
            n > 0 && worst < tolerance,
        );
    }
    // the same model with its output layer ×10, so that its logits are about a trained
    // model's (bf16 rounds a logit of 8 to 16 by up to 0.03), with the logits rounded to bf16
    // and in f32 (`model.f32_logits`, both sides)
    let mut named = w64.named();
    let head = named.get("lm_head.weight").ok_or("no lm_head.weight")? * 10.0;
    named.insert("lm_head.weight".into(), head?);
    let peaked = Weights::from_named(&c64, &named)?.to(DType::BF16, gpu)?;
    // and in f16 (`model.dtype = "f16"`: 3 more mantissa bits than bf16)
    let peaked16 = Weights::from_named(&c64, &named)?.to(DType::F16, gpu)?;
    let (worst, mean, n) = behaviour_vs_learner(&peaked16.packed()?, &peaked16, &prompts)?;
    check(
        "behaviour vs learner log-probs, f16 packed snapshot, D=64, output layer ×10, f16 logits: max|Δ| (mean)",
        format!("{worst:.2e} ({mean:.1e}, {n} tokens)"),
        n > 0 && worst < 0.5,
    );
    for f32_logits in [false, true] {
        let (worst, mean, n) = model::head::with_f32_logits(f32_logits, || {
            behaviour_vs_learner(&peaked.packed()?, &peaked, &prompts)
        })?;
        let logits = if f32_logits { "f32" } else { "bf16" };
        check(
            &format!(
                "behaviour vs learner log-probs, bf16 packed snapshot, D=64, output layer ×10, {logits} logits: max|Δ| (mean)"
            ),
            format!("{worst:.2e} ({mean:.1e}, {n} tokens)"),
            n > 0 && worst < 0.5,
        );
    }

    // shared prompts: two 40-token prompts run once for the three 8-token completions of each
    let comp = |k: usize| &ids[2 + k % 2][8 * k..8 * k + 8];
    let whole: Vec<Vec<u32>> = (0..6)
        .map(|k| ids[k / 3][..40].iter().chain(comp(k)).copied().collect())
        .collect();
    let ones = vec![vec![1u8; 48]; 6];
    let scored: Vec<Vec<u8>> = (0..6)
        .map(|_| (0..48).map(|j| u8::from(j >= 40)).collect())
        .collect();
    let heads: Vec<Vec<u32>> = ids[..2].iter().map(|r| r[..39].to_vec()).collect();
    let own: Vec<Vec<u32>> = (0..6)
        .map(|k| {
            std::iter::once(ids[k / 3][39])
                .chain(comp(k).iter().copied())
                .collect()
        })
        .collect();
    let own_mask = vec![vec![1u8; 9]; 6];
    let own_scored: Vec<Vec<u8>> = (0..6)
        .map(|_| (0..9).map(|j| u8::from(j >= 1)).collect())
        .collect();
    let shared = model::forward::SharedPrompts::new(
        &heads,
        &vec![vec![1u8; 39]; 2],
        &[0, 0, 0, 1, 1, 1],
        &own,
        &own_mask,
        gpu,
    )?;
    // f32, and bf16 in a graph as the learner runs it (flash attention at D=64, the prompts'
    // keys read before the rows' own)
    let (_, w64_graph) = w64_bf16.to_vars()?;
    for (label, w, bound) in [
        ("gpu", &w_gpu, 1e-4),
        ("gpu bf16 in a graph, D=64", &w64_graph, 0.1),
    ] {
        let calls = ops::flash_calls();
        let lw = sequence_logprobs(w, &whole, &ones, &scored, 1.0)?.logprobs; // [6, 47]
        let ls = model::logprobs::shared_prompt_logprobs(w, &shared, &own, &own_scored, 1.0)?;
        let ls = ls.logprobs; // [6, 8]
        let flash = ops::flash_calls() > calls;
        let d = max_abs_diff(&lw.narrow(1, 39, 8)?, &ls)?;
        let size = max_abs(&ls)?;
        check(
            &format!("shared prompts vs whole rows, max|Δ log-prob| ({label})"),
            format!("{d:.2e} of {size:.1}"),
            d < bound && size > 0.1 && flash == (w.embed_tokens.dtype() == DType::BF16),
        );
    }

    // packed: the same rows end to end in one row (each prompt head once, its three rows after
    // it), against the whole rows, log-probs and the weights' gradients of their sum, f32 and bf16
    // in a graph (each row's attention through the flash kernels at D=64, forward and backward)
    let mut tokens = Vec::new();
    let mut segments = Vec::new();
    let mut starts = Vec::new();
    for (p, head) in heads.iter().enumerate() {
        let at = tokens.len();
        segments.push(model::forward::Segment {
            start: at,
            len: head.len(),
            prefix: None,
        });
        tokens.extend_from_slice(head);
        for row in &own[3 * p..3 * p + 3] {
            starts.push(tokens.len());
            segments.push(model::forward::Segment {
                start: tokens.len(),
                len: row.len(),
                prefix: Some((at, head.len())),
            });
            tokens.extend_from_slice(row);
        }
    }
    let packed = model::forward::PackedRows::new(&tokens, &segments, gpu)?;
    let w64_f32 = w64.to(DType::F32, gpu)?;
    for (label, w, bound, grad_bound) in [
        ("f32, D=64", &w64_f32, 1e-4, 1e-3),
        ("bf16 in a graph, D=64", &w64_bf16, 0.1, 0.1),
    ] {
        let summed = |packed_rows: bool| -> Result<(Tensor, Vec<(String, Tensor)>)> {
            let (vars, trainable) = w.to_vars()?;
            let (lp, mask) = if packed_rows {
                let lp = model::logprobs::packed_logprobs(
                    &trainable,
                    &packed,
                    &own,
                    &own_scored,
                    &starts,
                    1.0,
                    false,
                )?;
                (lp.logprobs, lp.mask)
            } else {
                let lp = sequence_logprobs(&trainable, &whole, &ones, &scored, 1.0)?;
                (lp.logprobs.narrow(1, 39, 8)?, lp.mask.narrow(1, 39, 8)?)
            };
            let loss = (lp.to_dtype(DType::F32)? * mask)?.sum_all()?;
            Ok((lp, gradients(&loss, vars)?))
        };
        let calls = (ops::flash_calls(), model::attention::packed_calls());
        let (lp_packed, g_packed) = summed(true)?;
        let ran = (
            ops::flash_calls() > calls.0,
            model::attention::packed_calls() > calls.1,
        );
        let (lp_whole, g_whole) = summed(false)?;
        let d = max_abs_diff(&lp_whole, &lp_packed)?;
        let (worst, name) = worst_rel(&g_whole, &g_packed)?;
        let flash_expected = w.embed_tokens.dtype() == DType::BF16;
        check(
            &format!("packed rows vs whole rows, max|Δ log-prob|, worst rel Δ gradient ({label})"),
            format!(
                "{d:.2e} of {:.1}; {worst:.2e} ({name})",
                max_abs(&lp_whole)?
            ),
            d < bound && worst < grad_bound && ran.1 && ran.0 == flash_expected,
        );
    }

    // greedy generation
    let prompts: Vec<Vec<u32>> = ids
        .iter()
        .take(4)
        .map(|r| r[..16 + 8 * (r[0] as usize % 3)].to_vec())
        .collect();
    // packed weights (a rollout snapshot's): one q/k/v and one gate/up matmul per layer
    let on_gpu = [("", w_gpu.detach()), (", packed weights", w_gpu.packed()?)];
    let og = greedy_rows("", &w_cpu, &on_gpu, &prompts, &mut check)?.swap_remove(0);
    let cfg = greedy_32();

    // continuous batching on the GPU: two slots for the four prompts give the same rows
    let mut oc2: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    model::generate::generate_continuous(&w_gpu.detach(), &prompts, &cfg, None, 2, |i, c| {
        oc2[i] = c.tokens;
        Ok(())
    })?;
    let same = og.iter().zip(&oc2).filter(|(a, b)| &a.tokens == *b).count();
    check(
        "greedy, 2 slots (continuous batching) vs one batch, rows identical",
        format!("{same}/{}", og.len()),
        same == og.len(),
    );

    // a stream of prompts in 2 slots (the rollout workers' refills): an 80-token prompt after
    // short ones moves the running rows up in the cache and grows it. A third of the tokens
    // stop a row, so that the rows finish at different steps.
    let stream: Vec<Vec<u32>> = [(0, 4), (1, 6), (2, 5), (3, 80), (0, 7), (1, 3)]
        .iter()
        .map(|&(r, n)| ids[r][..n].to_vec())
        .collect();
    let cfg = GenerationConfig {
        stop_token_ids: (0..c.vocab_size as u32).step_by(3).collect(),
        ..cfg
    };
    let w_stream = w_gpu.detach();
    let whole = generate(&w_stream, &stream, &cfg, None)?;
    let mut streamed: Vec<Option<Vec<u32>>> = vec![None; stream.len()];
    let mut waiting = stream.iter();
    let room = model::generate::Room {
        slots: 2,
        longest: 0,
        refills: true,
        refill_rows: 1,
    };
    model::generate::generate_stream(
        &w_stream,
        &cfg,
        None,
        room,
        || {
            waiting.next().map(|p| model::generate::Prompt {
                ids: p.clone(),
                stream: (0, 0),
                greedy: false,
            })
        },
        |i, c| {
            streamed[i] = Some(c.tokens);
            Ok(())
        },
    )?;
    let same = whole
        .iter()
        .zip(&streamed)
        .filter(|(a, b)| b.as_ref() == Some(&a.tokens))
        .count();
    let lengths: Vec<usize> = whole.iter().map(|c| c.tokens.len()).collect();
    check(
        "greedy, a stream of prompts in 2 slots (rows moved up, cache grown) vs one batch, rows \
         identical",
        format!("{same}/{}, lengths {lengths:?}", whole.len()),
        same == whole.len(),
    );

    Ok(())
}

/// Completions sampled at temperature 1 from `w_gen` (the KV cache and the decode kernels),
/// their behaviour log-probs against the learner's for the same tokens (`w_learn`'s weights in a
/// graph, as a step computes them): the largest and the mean |Δ|, and the tokens compared.
fn behaviour_vs_learner(
    w_gen: &Weights,
    w_learn: &Weights,
    prompts: &[Vec<u32>],
) -> Result<(f32, f32, usize)> {
    let cfg = GenerationConfig {
        max_new_tokens: 24,
        sampling: SamplingParams {
            temperature: 1.0,
            ..Default::default()
        },
        seed: 7,
        ..Default::default()
    };
    let (_, trainable) = w_learn.to_vars()?;
    let tokens = model::logprobs::behaviour_and_learners(w_gen, &[&trainable], prompts, &cfg)?;
    let gaps: Vec<f32> = tokens.iter().map(|t| (t[1] - t[0]).abs()).collect();
    let n = gaps.len();
    let worst = nan_max(gaps.iter().map(|&d| d as f64)) as f32;
    Ok((worst, gaps.iter().sum::<f32>() / n.max(1) as f32, n))
}

/// Random normal tensor of `shape` on `device` in `dtype` (drawn in f32 on the CPU).
fn randn(shape: &[usize], seed: u64, scale: f64, dtype: DType, device: &Device) -> Result<Tensor> {
    let mut rng = model::rng::Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| (rng.normal() * scale) as f32).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?)
}

/// Output and input gradients of `op` under the upstream gradient `u` (a fixed random tensor).
fn value_and_grads(
    inputs: &[Tensor],
    grad_of: &[bool],
    op: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    u_seed: u64,
) -> Result<(Tensor, Vec<Option<Tensor>>)> {
    let vars: Vec<Var> = inputs
        .iter()
        .map(Var::from_tensor)
        .collect::<std::result::Result<_, _>>()?;
    let ts: Vec<Tensor> = vars
        .iter()
        .zip(grad_of)
        .map(|(v, g)| {
            if *g {
                v.as_tensor().clone()
            } else {
                v.as_tensor().detach()
            }
        })
        .collect();
    let y = op(&ts)?;
    let u = randn(y.dims(), u_seed, 1.0, DType::F32, y.device())?;
    let grads = (y.to_dtype(DType::F32)? * u)?.sum_all()?.backward()?;
    let gs = vars
        .iter()
        .zip(grad_of)
        .map(|(v, g)| {
            if *g {
                grads.get(v.as_tensor()).cloned()
            } else {
                None
            }
        })
        .collect();
    Ok((y, gs))
}

/// Relative max difference of `a` from the reference `b`.
fn rel(a: &Tensor, b: &Tensor) -> Result<f32> {
    let [d, _, scale] = compare(a, b)?;
    Ok(d / scale.max(1e-12))
}

type Op = Box<dyn Fn(&[Tensor]) -> Result<Tensor>>;

/// A fused op and its composed reference on inputs of the given shapes.
struct Case {
    name: &'static str,
    shapes: Vec<Vec<usize>>,
    grad_of: Vec<bool>,
    fused: Op,
    reference: Op,
}

/// Each fused kernel against its composed reference on fresh random inputs, forward and backward.
/// The reference runs in f32 on the GPU from the same (rounded) inputs; bf16 kernels get bf16
/// tolerances.
fn kernel_checks(gpu: &Device, rows: &mut Vec<(String, String, bool)>) -> Result<()> {
    let (b, h, t, d) = (2, 4, 37, 64);
    let bias = {
        // causal mask with padding: row 1 has its last 5 keys masked
        let mut v = vec![0f32; b * t * t];
        for bi in 0..b {
            for i in 0..t {
                for j in 0..t {
                    if j > i || (bi == 1 && j >= t - 5 && i < t - 5) {
                        v[(bi * t + i) * t + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        Tensor::from_vec(v, (b, 1, 1, t, t), &Device::Cpu)?.to_device(gpu)?
    };
    let (b1, b2) = (bias.clone(), bias);
    let targets: Vec<u32> = (0..96u32).map(|i| (i * 7919) % 151_936).collect();
    let targets = Tensor::new(targets.as_slice(), gpu)?;
    let (t1, t2) = (targets.clone(), targets.clone());
    let lp_plus_h = |(lp, h): (Tensor, Tensor)| -> Result<Tensor> { Ok((lp + (h * 0.37)?)?) };
    let cases = [
        Case {
            name: "rms_norm [3·37, 896]",
            shapes: vec![vec![3, 37, 896], vec![896]],
            grad_of: vec![true, true],
            fused: Box::new(|x| Ok(ops::rms_norm(&x[0], &x[1], 1e-6)?)),
            reference: Box::new(|x| Ok(ops::composed::rms_norm(&x[0], &x[1], 1e-6)?)),
        },
        Case {
            name: "rope [2, 4, 37, 64]",
            shapes: vec![vec![b, h, t, d], vec![b, 1, t, d], vec![b, 1, t, d]],
            grad_of: vec![true, false, false],
            fused: Box::new(|x| Ok(ops::rope(&x[0], &x[1], &x[2])?)),
            reference: Box::new(|x| Ok(ops::composed::rope(&x[0], &x[1], &x[2])?)),
        },
        Case {
            // a projection's rows read in place, the backward writing dy in their order
            name: "rope of a projection's heads [2, 37, 4·64] → [2, 4, 37, 64]",
            shapes: vec![vec![b, t, h * d], vec![b, 1, t, d], vec![b, 1, t, d]],
            grad_of: vec![true, false, false],
            fused: Box::new(move |x| Ok(ops::rope_heads(&x[0], h, &x[1], &x[2])?)),
            reference: Box::new(move |x| {
                let heads = x[0].reshape((b, t, h, d))?.transpose(1, 2)?;
                Ok(ops::composed::rope(&heads, &x[1], &x[2])?)
            }),
        },
        Case {
            // k's rows of a packed q/k/v projection: a row stride of (4 + 2·1)·64
            name: "rope of a packed projection's k heads [2, 37, (4+1+1)·64] → [2, 1, 37, 64]",
            shapes: vec![vec![b, t, (h + 2) * d], vec![b, 1, t, d], vec![b, 1, t, d]],
            grad_of: vec![true, false, false],
            fused: Box::new(move |x| {
                Ok(ops::rope_heads(
                    &x[0].narrow(2, h * d, d)?,
                    1,
                    &x[1],
                    &x[2],
                )?)
            }),
            reference: Box::new(move |x| {
                let k = x[0].narrow(2, h * d, d)?.reshape((b, t, 1, d))?;
                Ok(ops::composed::rope(&k.transpose(1, 2)?, &x[1], &x[2])?)
            }),
        },
        Case {
            name: "swiglu [74, 4864]",
            shapes: vec![vec![74, 4864], vec![74, 4864]],
            grad_of: vec![true, true],
            fused: Box::new(|x| Ok(ops::swiglu(&x[0], &x[1])?)),
            reference: Box::new(|x| Ok((x[0].silu()? * &x[1])?)),
        },
        Case {
            name: "bias add [3·37, 896] + [896]",
            shapes: vec![vec![3, 37, 896], vec![896]],
            grad_of: vec![true, true],
            fused: Box::new(|x| Ok(ops::bias_add(&x[0], &x[1])?)),
            reference: Box::new(|x| Ok(x[0].broadcast_add(&x[1])?)),
        },
        Case {
            name: "masked softmax [2, 2, 2, 37, 37]",
            shapes: vec![vec![b, 2, 2, t, t]],
            grad_of: vec![true],
            fused: Box::new(move |x| Ok(ops::masked_softmax(&x[0], &b1, 0.125)?)),
            reference: Box::new(move |x| Ok(ops::composed::masked_softmax(&x[0], &b2, 0.125)?)),
        },
        Case {
            name: "softmax [5, 1000]",
            shapes: vec![vec![5, 1000]],
            grad_of: vec![true],
            fused: Box::new(|x| Ok(ops::softmax_last_dim(&x[0])?)),
            reference: Box::new(|x| {
                Ok(ops::composed::softmax_last_dim(
                    &x[0].to_dtype(DType::F32)?,
                )?)
            }),
        },
        Case {
            name: "log-prob + entropy at T=0.7 [96, 151936]",
            shapes: vec![vec![96, 151_936]],
            grad_of: vec![true],
            fused: Box::new(move |x| lp_plus_h(ops::logprob_and_entropy(&x[0], &t1, 0.7)?)),
            reference: Box::new(move |x| {
                let z = (x[0].to_dtype(DType::F32)? / 0.7)?;
                lp_plus_h((
                    ops::composed::logprob_gather(&z, &t2)?,
                    ops::composed::entropy(&z)?,
                ))
            }),
        },
        // two weight-gradient groups: 2 chunks of 40 rows, then one of 16; the logits
        // recomputed by the backward (the learner's shape keeps them: see the bench)
        output_layer_case(
            "output layer, chunks of 40, groups of 80 [96, 896]·[151936, 896]ᵀ",
            false,
            &targets,
        ),
        // the logits kept by the forward (in one matmul) and overwritten by dz in place
        output_layer_case(
            "output layer, logits kept [96, 896]·[151936, 896]ᵀ",
            true,
            &targets,
        ),
    ];
    for (k, case) in cases.iter().enumerate() {
        for dtype in KERNEL_DTYPES {
            if let Err(e) = kernel_case(gpu, case, k, dtype, rows) {
                rows.push((
                    format!("{} {dtype:?}", case.name),
                    format!("error: {e}"),
                    false,
                ));
            }
        }
    }
    Ok(())
}

/// The chunked output layer at `[96, 896]·[151936, 896]ᵀ`, temperature 0.7, in chunks of 40 rows
/// and weight-gradient groups of 80, its logits kept or recomputed by the backward, against
/// autograd through the whole f32 logits.
fn output_layer_case(name: &'static str, keep_logits: bool, targets: &Tensor) -> Case {
    let (t1, t2) = (targets.clone(), targets.clone());
    let lp_plus_h = |(lp, h): (Tensor, Tensor)| -> Result<Tensor> { Ok((lp + (h * 0.37)?)?) };
    Case {
        name,
        shapes: vec![vec![96, 896], vec![151_936, 896]],
        grad_of: vec![true, true],
        fused: Box::new(move |x| {
            let chunking = model::head::Chunking {
                rows: 40,
                group: 80,
                keep_logits,
            };
            lp_plus_h(model::head::output_logprobs_with(
                &x[0], &x[1], &t1, 0.7, chunking,
            )?)
        }),
        reference: Box::new(move |x| {
            let z = (model::forward::linear(&x[0], &x[1], None)?.to_dtype(DType::F32)? / 0.7)?;
            lp_plus_h((
                ops::composed::logprob_gather(&z, &t2)?,
                ops::composed::entropy(&z)?,
            ))
        }),
    }
}

/// One case at one dtype: the forward and every input gradient against the reference.
fn kernel_case(
    gpu: &Device,
    case: &Case,
    k: usize,
    dtype: DType,
    rows: &mut Vec<(String, String, bool)>,
) -> Result<()> {
    // the output layer's inputs at a scale that gives logits of a real model's spread (std ≈ 7.5
    // rather than 30, where bf16's rounding of the logits alone moves the gradients by 20%)
    let scale = if case.name.starts_with("rms") {
        2.0
    } else if case.name.starts_with("output layer") {
        0.5
    } else {
        1.0
    };
    let inputs: Vec<Tensor> = case
        .shapes
        .iter()
        .enumerate()
        .map(|(i, s)| randn(s, 100 * k as u64 + i as u64, scale, dtype, gpu))
        .collect::<Result<_>>()?;
    let reference_inputs: Vec<Tensor> = inputs
        .iter()
        .map(|x| x.to_dtype(DType::F32))
        .collect::<std::result::Result<_, _>>()?;
    let (y, g) = value_and_grads(&inputs, &case.grad_of, &*case.fused, 7)?;
    let (yr, gr) = value_and_grads(&reference_inputs, &case.grad_of, &*case.reference, 7)?;
    let tol = if dtype == DType::F32 { 2e-5 } else { 2e-2 };
    let e = rel(&y, &yr)?;
    rows.push((
        format!("{} {dtype:?} forward", case.name),
        format!("{e:.2e}"),
        e < tol,
    ));
    for (i, (a, r)) in g.iter().zip(&gr).enumerate() {
        if let (Some(a), Some(r)) = (a, r) {
            let e = rel(a, r)?;
            rows.push((
                format!("{} {dtype:?} grad {i}", case.name),
                format!("{e:.2e}"),
                e < tol * 10.0,
            ));
        }
    }
    Ok(())
}

/// The residual add fused with the RMSNorm after it (forward only, where no gradient is taken)
/// against candle's add and the composed RMSNorm in f32.
fn add_rms_norm_checks(gpu: &Device, rows: &mut Vec<(String, String, bool)>) -> Result<()> {
    for dtype in KERNEL_DTYPES {
        let x = randn(&[3, 37, 896], 41, 2.0, dtype, gpu)?;
        let r = randn(&[3, 37, 896], 42, 2.0, dtype, gpu)?;
        let w = randn(&[896], 43, 1.0, dtype, gpu)?;
        let (sum, y) = ops::add_rms_norm(&x, &r, &w, 1e-6)?;
        let name = format!("add + rms_norm, no gradient [3·37, 896] {dtype:?}");
        let e = max_abs_diff(&sum, &(&x + &r)?)?;
        rows.push((format!("{name} sum"), format!("{e:.1e}"), e == 0.0));
        let [s32, w32] = [&sum, &w].map(|t| t.to_dtype(DType::F32));
        let want = ops::composed::rms_norm(&s32?, &w32?, 1e-6)?;
        let e = rel(&y, &want)?;
        let tol = if dtype == DType::F32 { 2e-5 } else { 2e-2 };
        rows.push((format!("{name} norm"), format!("{e:.2e}"), e < tol));
    }
    Ok(())
}

/// SwiGLU of a packed gate/up projection (forward only, where no gradient is taken) against the
/// SwiGLU kernel on its two halves (bit for bit) and the composed op in f32.
fn swiglu_packed_checks(gpu: &Device, rows: &mut Vec<(String, String, bool)>) -> Result<()> {
    let n = 4864;
    for dtype in KERNEL_DTYPES {
        let gu = randn(&[3, 37, 2 * n], 44, 2.0, dtype, gpu)?;
        let (gate, up) = (gu.narrow(2, 0, n)?, gu.narrow(2, n, n)?);
        let y = ops::swiglu_packed(&gu)?;
        let name = format!("swiglu of a packed gate/up, no gradient [3·37, 2·{n}] {dtype:?}");
        let e = max_abs_diff(&y, &ops::swiglu(&gate, &up)?)?;
        rows.push((format!("{name} vs halves"), format!("{e:.1e}"), e == 0.0));
        let [g32, u32_] = [&gate, &up].map(|t| t.to_dtype(DType::F32));
        let want = (g32?.silu()? * u32_?)?;
        let e = rel(&y, &want)?;
        let tol = if dtype == DType::F32 { 2e-5 } else { 2e-2 };
        rows.push((name, format!("{e:.2e}"), e < tol));
    }
    Ok(())
}

/// The token embedding (its backward: each distinct token's rows summed) and the log-probs' row
/// selection and scatter against candle's `index_select` / `index_add`, forward and backward, at
/// the learner's widths: 8,192 ids over 5,000 distinct tokens into Qwen2.5-0.5B's table, and 6,000
/// of 8,192 rows.
fn embedding_checks(gpu: &Device, rows: &mut Vec<(String, String, bool)>) -> Result<()> {
    let (v, h, n) = (151_936usize, 896usize, 8192usize);
    let ids: Vec<u32> = (0..n as u32).map(|i| (i * 7919) % 5000 * 30).collect();
    // a padded batch: the last 3,000 positions hold one padding token (split over 47 blocks)
    let padded: Vec<u32> = (0..n)
        .map(|i| if i < 5192 { ids[i] } else { 151_643 })
        .collect();
    let padded_t = Tensor::new(padded.as_slice(), gpu)?;
    let (d1, d2) = (padded_t.clone(), padded_t);
    let picked: Vec<u32> = (0..n as u32).filter(|i| i % 4 != 1).collect();
    let ids_t = Tensor::new(ids.as_slice(), gpu)?;
    let picked_t = Tensor::new(picked.as_slice(), gpu)?;
    let m = picked.len();
    let (i1, i2, p1, p2, p3) = (
        ids_t.clone(),
        ids_t,
        picked.clone(),
        picked.clone(),
        picked_t.clone(),
    );
    let p4 = picked_t;
    let cases = [
        Case {
            name: "embedding [151936, 896] ← 8192 ids",
            shapes: vec![vec![v, h]],
            grad_of: vec![true],
            fused: Box::new(move |x| Ok(ops::embedding(&x[0], &i1)?)),
            reference: Box::new(move |x| Ok(x[0].index_select(&i2, 0)?)),
        },
        Case {
            name: "embedding [151936, 896] ← 8192 ids, 3000 of one padding id",
            shapes: vec![vec![v, h]],
            grad_of: vec![true],
            fused: Box::new(move |x| Ok(ops::embedding(&x[0], &d1)?)),
            reference: Box::new(move |x| Ok(x[0].index_select(&d2, 0)?)),
        },
        Case {
            name: "select rows [8192, 896] → 6144",
            shapes: vec![vec![n, h]],
            grad_of: vec![true],
            fused: Box::new(move |x| Ok(ops::select_rows(&x[0], &p1)?)),
            reference: Box::new(move |x| Ok(x[0].index_select(&p3, 0)?)),
        },
        Case {
            name: "scatter rows [6144, 2] → [8192, 2]",
            shapes: vec![vec![m, 2]],
            grad_of: vec![true],
            fused: Box::new(move |x| Ok(ops::scatter_rows(&x[0], &p2, n)?)),
            reference: Box::new(move |x| {
                Ok(Tensor::zeros((n, 2), x[0].dtype(), x[0].device())?.index_add(&p4, &x[0], 0)?)
            }),
        },
    ];
    for (k, case) in cases.iter().enumerate() {
        for dtype in KERNEL_DTYPES {
            if let Err(e) = kernel_case(gpu, case, 50 + k, dtype, rows) {
                rows.push((
                    format!("{} {dtype:?}", case.name),
                    format!("error: {e}"),
                    false,
                ));
            }
        }
    }
    Ok(())
}

/// The decode attention kernel against the composed ops (f32 probabilities) on a KV cache view:
/// B=64 rows, Qwen2.5-0.5B's 2 KV heads of 7 query heads and D=64, 300 of 400 slots filled, row 1
/// left-padded. On the CPU (dry run) the kernel does not apply and the row says so.
fn decode_attention_checks(gpu: &Device, rows: &mut Vec<(String, String, bool)>) -> Result<()> {
    let (b, hkv, g, d, s, cap) = (64, 2, 7, 64, 300, 400);
    let bias: Vec<f32> = (0..b * s)
        .map(|i| if i / s == 1 && i % s < 9 { -1e9 } else { 0.0 })
        .collect();
    let bias = Tensor::from_vec(bias, (b, 1, 1, 1, s), &Device::Cpu)?.to_device(gpu)?;
    let scale = 1.0 / (d as f64).sqrt();
    for dtype in KERNEL_DTYPES {
        let q = randn(&[b, hkv, g, d], 61, 1.0, dtype, gpu)?;
        let k = randn(&[b, hkv, cap, d], 62, 1.0, dtype, gpu)?.narrow(2, 0, s)?;
        let v = randn(&[b, hkv, cap, d], 63, 1.0, dtype, gpu)?.narrow(2, 0, s)?;
        let name = format!("decode attention [64, 2, 7, 64] S=300 of 400 {dtype:?}");
        let Some(y) = ops::decode_attention(&q, &k, &v, &bias, scale)? else {
            rows.push((name, "kernel not taken".into(), false));
            continue;
        };
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        let scores = f(&q)?.matmul(&f(&k)?.t()?)?.reshape((b, hkv, g, 1, s))?;
        let p = ops::composed::masked_softmax(&scores, &bias, scale)?.reshape((b, hkv, g, s))?;
        let want = p.matmul(&f(&v)?.contiguous()?)?;
        let e = rel(&f(&y)?, &want)?;
        let tol = if dtype == DType::F32 { 2e-5 } else { 2e-2 };
        rows.push((name, format!("{e:.2e}"), e < tol));
    }
    Ok(())
}

/// The flash attention kernel against the composed ops (f32 probabilities) from the same bf16
/// or f16 inputs: Qwen2.5-0.5B's heads over 300 rows; 200 rows after a 100-slot prompt, read from
/// a cache view of 400 slots; D = 128. Row 1 is left-padded (its first 9 keys masked, except for
/// the rows that would then see no key at all: garbage rows, computed differently by each).
fn flash_attention_checks(gpu: &Device, rows: &mut Vec<(String, String, bool)>) -> Result<()> {
    for (seed, (b, hkv, g, t, s, cap, d), dtype) in [
        (2, 2, 7, 300, 300, 300, 64),
        (2, 2, 7, 200, 300, 400, 64),
        (2, 2, 4, 300, 300, 300, 128),
    ]
    .into_iter()
    .enumerate()
    .flat_map(|(i, case)| [DType::BF16, DType::F16].map(|dtype| (i, case, dtype)))
    {
        let bias = padded_causal_bias(b, t, s, 9)?.to_device(gpu)?;
        // 0 on the query rows that see no valid key (padding queries, whose output is never
        // read and whose upstream gradient is 0 in training): both sides' outputs, token-major
        // [B, T, Hq·D], are multiplied by it, so those rows are neither compared nor given an
        // upstream gradient
        let sees: Vec<f32> = (0..b * t)
            .map(|i| {
                let (bi, row) = (i / t, i % t);
                f32::from(u8::from(bi != 1 || s - t + row >= 9))
            })
            .collect();
        let sees = Tensor::from_vec(sees, (b, t, 1), &Device::Cpu)?.to_device(gpu)?;
        let seen =
            |y: Tensor| -> Result<Tensor> { Ok(y.broadcast_mul(&sees.to_dtype(y.dtype())?)?) };
        let seed = 90 + 3 * seed as u64;
        let q = randn(&[b, hkv, g * t, d], seed, 1.0, dtype, gpu)?;
        let k = randn(&[b, hkv, cap, d], seed + 1, 1.0, dtype, gpu)?.narrow(2, 0, s)?;
        let v = randn(&[b, hkv, cap, d], seed + 2, 1.0, dtype, gpu)?.narrow(2, 0, s)?;
        let scale = 1.0 / (d as f64).sqrt();
        let name = format!("flash attention [{b}, {hkv}, {g}·{t}, {d}] S={s} of {cap} {dtype:?}");
        let Some((y, _)) = ops::flash_attention(&q, &k, &v, &bias, scale)? else {
            rows.push((name, "kernel not taken".into(), false));
            continue;
        };
        let f = |t: &Tensor| t.to_dtype(DType::F32);
        let reference = |x: &[Tensor]| -> Result<Tensor> {
            let scores = x[0].matmul(&x[1].t()?)?.reshape((b, hkv, g, t, s))?;
            let p = ops::composed::masked_softmax(&scores, &bias, scale)?;
            let y = p.reshape((b, hkv, g * t, s))?.matmul(&x[2])?; // [B, Hkv, G·T, D]
            seen(model::attention::token_major(&y, t)?)
        };
        let (k, v) = (k.contiguous()?, v.contiguous()?);
        let want = reference(&[f(&q)?, f(&k)?, f(&v)?])?;
        let e = rel(&f(&seen(y)?)?, &want)?;
        rows.push((name.clone(), format!("{e:.2e}"), e < 2e-2));
        if model::launch::flash_attention_backward_kernels(d, dtype).is_none() {
            continue;
        }
        // the backward through attention::attention (the flash kernels) against
        // autograd through the composed ops in f32
        let inputs = [q, k, v];
        let flash = |x: &[Tensor]| -> Result<Tensor> {
            seen(model::attention::attention(
                &x[0], &x[1], &x[2], &bias, scale, 64,
            )?)
        };
        let (_, got) = value_and_grads(&inputs, &[true; 3], &flash, seed + 5)?;
        let f32_inputs = [f(&inputs[0])?, f(&inputs[1])?, f(&inputs[2])?];
        let (_, want) = value_and_grads(&f32_inputs, &[true; 3], &reference, seed + 5)?;
        for (grad, (a, w)) in ["dq", "dk", "dv"].iter().zip(got.iter().zip(&want)) {
            let (Some(a), Some(w)) = (a, w) else {
                rows.push((format!("{name} {grad}"), "no gradient".into(), false));
                continue;
            };
            let e = rel(&f(a)?, w)?;
            rows.push((format!("{name} {grad}"), format!("{e:.2e}"), e < 3e-2));
        }
    }
    Ok(())
}

/// The attention bias `[B, 1, 1, T, S]` (on the CPU) of `t` query rows after `s − t` cached
/// slots: causal, and batch row 1 left-padded by `pad` slots (keys masked for every row), −1e9
/// where masked.
fn padded_causal_bias(b: usize, t: usize, s: usize, pad: usize) -> Result<Tensor> {
    let bias: Vec<f32> = (0..b * t * s)
        .map(|i| {
            let (bi, row, key) = (i / (t * s), (i / s) % t, i % s);
            if key > s - t + row || (bi == 1 && key < pad) {
                -1e9
            } else {
                0.0
            }
        })
        .collect();
    Ok(Tensor::from_vec(bias, (b, 1, 1, t, s), &Device::Cpu)?)
}

/// The attention bias built on the device from the key slots' flags against the host's: 8 rows of
/// 1024 queries, a third of each row's slots padding (right-padded), and 40 queries after 300
/// cached slots with left padding.
fn attention_bias_checks(gpu: &Device, rows: &mut Vec<(String, String, bool)>) -> Result<()> {
    for (b, t, q_offset) in [(8usize, 1024usize, 0usize), (4, 40, 300)] {
        let s = q_offset + t;
        let valid: Vec<Vec<bool>> = (0..b)
            .map(|r| {
                (0..s)
                    .map(|j| {
                        if q_offset == 0 {
                            j < 2 * s / 3
                        } else {
                            j >= 7 * r
                        }
                    })
                    .collect()
            })
            .collect();
        let device = ops::attention_bias(&valid, t, q_offset, -1e9, gpu)?;
        let host = ops::attention_bias(&valid, t, q_offset, -1e9, &Device::Cpu)?;
        let d = max_abs_diff(&device.to_device(&Device::Cpu)?, &host)?;
        rows.push((
            format!("attention bias [{b}, 1, 1, {t}, {s}] from flags"),
            format!("{d:.1e}"),
            d == 0.0,
        ));
    }
    // a decode step's, from each row's first slot: B=256 at slot 383
    let starts: Vec<usize> = (0..256).map(|r| (r * 37) % 384).collect();
    let device = ops::decode_bias(&starts, 384, -1e9, gpu)?;
    let host = ops::decode_bias(&starts, 384, -1e9, &Device::Cpu)?;
    let d = max_abs_diff(&device.to_device(&Device::Cpu)?, &host)?;
    rows.push((
        "decode bias [256, 1, 1, 1, 384] from starts".into(),
        format!("{d:.1e}"),
        d == 0.0,
    ));
    Ok(())
}

/// The decode step's fused q/k/v epilogue (biases, rotary embedding, the cache write in place)
/// against the composed ops on the GPU: Qwen2.5-0.5B's heads at B=64, slot 300 of 400, with
/// and without biases.
fn decode_qkv_checks(gpu: &Device, rows: &mut Vec<(String, String, bool)>) -> Result<()> {
    let (b, hq, hkv, d, cap, slot) = (64, 14, 2, 64, 400, 300);
    for dtype in KERNEL_DTYPES {
        let r = |shape: &[usize], seed| randn(shape, seed, 1.0, dtype, gpu);
        let (q, k, v) = (
            r(&[b, 1, hq * d], 71)?,
            r(&[b, 1, hkv * d], 72)?,
            r(&[b, 1, hkv * d], 73)?,
        );
        let (qb, kb, vb) = (r(&[hq * d], 74)?, r(&[hkv * d], 75)?, r(&[hkv * d], 76)?);
        let (cos, sin) = (r(&[b, 1, 1, d], 77)?, r(&[b, 1, 1, d], 78)?);
        // one packed matmul's output [B, 1, (Hq + 2·Hkv)·D], read through column slices
        let qkv = Tensor::cat(&[&q, &k, &v], 2)?;
        let (nq, nkv) = (hq * d, hkv * d);
        let slices = [
            qkv.narrow(2, 0, nq)?,
            qkv.narrow(2, nq, nkv)?,
            qkv.narrow(2, nq + nkv, nkv)?,
        ];
        for (with_bias, packed) in [(true, false), (false, false), (true, true)] {
            let biases = if with_bias { ", biases" } else { "" };
            let layout = if packed { ", packed" } else { "" };
            let name =
                format!("decode q/k/v [64, 14 + 2·2, 64] slot 300/400 {dtype:?}{biases}{layout}");
            let (k_cache, v_cache) = (r(&[b, hkv, cap, d], 79)?, r(&[b, hkv, cap, d], 80)?);
            let bias = with_bias.then_some([&qb, &kb, &vb]);
            let [qi, ki, vi] = if packed {
                &slices
            } else {
                &[q.clone(), k.clone(), v.clone()]
            };
            let Some(y) = ops::decode_qkv(
                qi, ki, vi, bias, &cos, &sin, &k_cache, &v_cache, slot, None, None,
            )?
            else {
                rows.push((name, "kernel not taken".into(), false));
                continue;
            };
            // composed: the bias adds in the dtype, rope, the slot of a fresh copy of the cache
            let add = |x: &Tensor, bias: &Tensor, heads: usize| -> Result<Tensor> {
                let x = if with_bias {
                    x.broadcast_add(bias)?
                } else {
                    x.clone()
                };
                Ok(x.reshape((b, 1, heads, d))?.transpose(1, 2)?.contiguous()?)
            };
            let rot = |x: Tensor| ops::composed::rope(&x, &cos, &sin);
            let want_q = rot(add(&q, &qb, hq)?)?;
            // the same seeds: the caches as they were before the kernel wrote them
            let (want_k, want_v) = (r(&[b, hkv, cap, d], 79)?, r(&[b, hkv, cap, d], 80)?);
            want_k.slice_set(&rot(add(&k, &kb, hkv)?)?, 2, slot)?;
            want_v.slice_set(&add(&v, &vb, hkv)?, 2, slot)?;
            let f = |t: &Tensor| t.to_dtype(DType::F32);
            let e = nan_max(
                [
                    rel(&f(&y.reshape((b, hq, 1, d))?)?, &f(&want_q)?)?,
                    rel(&f(&k_cache)?, &f(&want_k)?)?,
                    rel(&f(&v_cache)?, &f(&want_v)?)?,
                ]
                .map(f64::from),
            ) as f32;
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
            rows.push((name, format!("{e:.2e}"), e < tol));
        }
    }
    Ok(())
}

/// The decode step's q/k/v epilogue and attention in one launch against the two launches it
/// replaces (the epilogue, then decode attention over the cache it wrote), on a packed matmul's
/// column slices with biases: the attention output and the caches, at Qwen2.5-0.5B's heads
/// (D = 64, the `_d64` entry) and at D = 128, B=64, slot 300 of 400, batch row 1 left-padded.
fn decode_qkv_attention_checks(gpu: &Device, rows: &mut Vec<(String, String, bool)>) -> Result<()> {
    let (b, cap, slot) = (64, 400, 300);
    let s = slot + 1;
    let bias: Vec<f32> = (0..b * s)
        .map(|i| if i / s == 1 && i % s < 9 { -1e9 } else { 0.0 })
        .collect();
    let bias = Tensor::from_vec(bias, (b, 1, 1, 1, s), &Device::Cpu)?.to_device(gpu)?;
    for (hq, hkv, d) in [(14, 2, 64), (8, 2, 128)] {
        let scale = 1.0 / (d as f64).sqrt();
        for dtype in KERNEL_DTYPES {
            let r = |shape: &[usize], seed| randn(shape, seed, 1.0, dtype, gpu);
            let qkv = r(&[b, 1, (hq + 2 * hkv) * d], 81)?;
            let (nq, nkv) = (hq * d, hkv * d);
            let (q, k, v) = (
                qkv.narrow(2, 0, nq)?,
                qkv.narrow(2, nq, nkv)?,
                qkv.narrow(2, nq + nkv, nkv)?,
            );
            let (qb, kb, vb) = (r(&[nq], 82)?, r(&[nkv], 83)?, r(&[nkv], 84)?);
            let (cos, sin) = (r(&[b, 1, 1, d], 85)?, r(&[b, 1, 1, d], 86)?);
            let biases = Some([&qb, &kb, &vb]);
            let name = format!(
                "decode q/k/v + attention [64, {hq} + 2·{hkv}, {d}] slot 300/400 {dtype:?}"
            );
            // two launches, then one, each on its own copy of the caches
            let caches = || -> Result<(Tensor, Tensor)> {
                Ok((r(&[b, hkv, cap, d], 87)?, r(&[b, hkv, cap, d], 88)?))
            };
            let (k2, v2) = caches()?;
            let q2 = ops::decode_qkv(&q, &k, &v, biases, &cos, &sin, &k2, &v2, slot, None, None)?;
            let (k1, v1) = caches()?;
            let attend = Some((&bias, scale));
            let y1 = ops::decode_qkv(&q, &k, &v, biases, &cos, &sin, &k1, &v1, slot, attend, None)?;
            let (Some(q2), Some(y1)) = (q2, y1) else {
                rows.push((name, "kernel not taken".into(), false));
                continue;
            };
            let q2 = q2.reshape((b, hkv, hq / hkv, d))?;
            let (kf, vf) = (k2.narrow(2, 0, s)?, v2.narrow(2, 0, s)?);
            let Some(y2) = ops::decode_attention(&q2, &kf, &vf, &bias, scale)? else {
                rows.push((name, "decode attention not taken".into(), false));
                continue;
            };
            let e = rel(&y1, &y2)?;
            let caches_equal = max_abs_diff(&k1, &k2)? == 0.0 && max_abs_diff(&v1, &v2)? == 0.0;
            let value = format!("{e:.1e}, caches equal: {caches_equal}");
            let tol = if dtype == DType::F32 { 1e-6 } else { 1e-2 };
            rows.push((name, value, e < tol && caches_equal));
        }
    }
    decode_qk_norm_checks(gpu, &bias, rows)
}

/// Qwen3's shape (16 query heads, 8 KV heads, D = 128) with q/k norms: the fused epilogue and
/// attention, which norms each head itself, against the heads biased and normed by the RMSNorm
/// kernel, then the unfused epilogue (no biases: added) and the decode attention. Within
/// tolerance, not to the bit: the two sum a head's squares in different orders.
fn decode_qk_norm_checks(
    gpu: &Device,
    bias: &Tensor,
    rows: &mut Vec<(String, String, bool)>,
) -> Result<()> {
    let (b, cap, slot, eps) = (64, 400, 300, 1e-6);
    let (hq, hkv, d) = (16, 8, 128);
    let (nq, nkv, scale) = (hq * d, hkv * d, 1.0 / (d as f64).sqrt());
    for dtype in KERNEL_DTYPES {
        let r = |shape: &[usize], seed| randn(shape, seed, 1.0, dtype, gpu);
        let qkv = r(&[b, 1, nq + 2 * nkv], 91)?;
        let (q, k, v) = (
            qkv.narrow(2, 0, nq)?,
            qkv.narrow(2, nq, nkv)?,
            qkv.narrow(2, nq + nkv, nkv)?,
        );
        let (qb, kb, vb) = (r(&[nq], 92)?, r(&[nkv], 93)?, r(&[nkv], 94)?);
        let (qn, kn) = ((r(&[d], 95)? * 0.3)?.affine(1.0, 1.0)?, r(&[d], 96)?);
        let (cos, sin) = (r(&[b, 1, 1, d], 97)?, r(&[b, 1, 1, d], 98)?);
        let caches = || -> Result<(Tensor, Tensor)> {
            Ok((r(&[b, hkv, cap, d], 99)?, r(&[b, hkv, cap, d], 100)?))
        };
        let name =
            format!("decode q/k/v + attention, q/k norms [64, {hq} + 2·{hkv}, {d}] {dtype:?}");
        // the heads biased, then normed by the RMSNorm kernel, each over its D
        let normed = |x: &Tensor, bias: &Tensor, w: &Tensor, n: usize| -> Result<Tensor> {
            let x = x.broadcast_add(bias)?.reshape((b, 1, n, d))?;
            Ok(ops::rms_norm(&x, w, eps)?.reshape((b, 1, n * d))?)
        };
        let (q2, k2) = (normed(&q, &qb, &qn, hq)?, normed(&k, &kb, &kn, hkv)?);
        let v2 = v.broadcast_add(&vb)?;
        let (kc2, vc2) = caches()?;
        let unfused = ops::decode_qkv(
            &q2, &k2, &v2, None, &cos, &sin, &kc2, &vc2, slot, None, None,
        )?;
        let (kc1, vc1) = caches()?;
        let attend = Some((bias, scale));
        let norm = Some(([&qn, &kn], eps));
        let fused = ops::decode_qkv(
            &q,
            &k,
            &v,
            Some([&qb, &kb, &vb]),
            &cos,
            &sin,
            &kc1,
            &vc1,
            slot,
            attend,
            norm,
        )?;
        let (Some(q_rot), Some(y1)) = (unfused, fused) else {
            rows.push((name, "kernel not taken".into(), false));
            continue;
        };
        let s = slot + 1;
        let q_rot = q_rot.reshape((b, hkv, hq / hkv, d))?;
        let (kf, vf) = (kc2.narrow(2, 0, s)?, vc2.narrow(2, 0, s)?);
        let Some(y2) = ops::decode_attention(&q_rot, &kf, &vf, bias, scale)? else {
            rows.push((name, "decode attention not taken".into(), false));
            continue;
        };
        let (e, ek) = (rel(&y1, &y2)?, rel(&kc1, &kc2)?);
        let values_equal = max_abs_diff(&vc1, &vc2)? == 0.0;
        let tol = if dtype == DType::F32 { 1e-5 } else { 2e-2 };
        rows.push((
            name,
            format!("{e:.1e}, key cache {ek:.1e}, value cache equal: {values_equal}"),
            e < tol && ek < tol && values_equal,
        ));
    }
    Ok(())
}

/// The multi-tensor AdamW and gradient-norm kernels against the composed update on the GPU:
/// three steps on a bf16 and an f16 matrix (through their f32 masters; the loss scaled for the
/// f16 one), an f32 vector and an f32 matrix of three chunks, with weight decay and clipping.
/// The dtypes ferrite's kernels have entry points for (the flash kernels bf16 only).
const KERNEL_DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

fn optimizer_checks(gpu: &Device, rows: &mut Vec<(String, String, bool)>) -> Result<()> {
    let shapes: [(&[usize], DType); 4] = [
        (&[64, 96], DType::BF16),
        (&[64, 96], DType::F16),
        (&[96], DType::F32),
        (&[300, 500], DType::F32),
    ];
    let run = |kernels: bool| -> Result<(Vec<Tensor>, Vec<f64>)> {
        ops::set_cuda_kernels(kernels);
        let vars = shapes
            .iter()
            .enumerate()
            .map(|(i, (shape, dtype))| {
                Ok(Var::from_tensor(&randn(
                    shape, i as u64, 1.0, *dtype, gpu,
                )?)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let config = AdamWConfig {
            weight_decay: 0.1,
            max_grad_norm: Some(1.0),
            // (scaled gradients of N(0, 1) entries stay well inside f16's range)
            initial_loss_scale: 1024.0,
            ..Default::default()
        };
        let named = vars
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("p{i}"), v.clone()))
            .collect();
        let mut opt = AdamW::new(named, config)?;
        let mut norms = Vec::new();
        for k in 0..3u64 {
            let mut loss = Tensor::zeros((), DType::F32, gpu)?;
            for (i, (v, (shape, _))) in vars.iter().zip(&shapes).enumerate() {
                let g = randn(shape, 10 * (i as u64 + 1) + k, 1.0, DType::F32, gpu)?;
                loss = (loss + (v.as_tensor().to_dtype(DType::F32)? * g)?.sum_all()?)?;
            }
            opt.backward(&loss)?;
            norms.push(opt.step(1e-2)?.grad_norm);
        }
        Ok((vars.iter().map(|v| v.as_tensor().clone()).collect(), norms))
    };
    let fused = run(true);
    let composed = run(false);
    ops::set_cuda_kernels(true);
    let ((fused, fused_norms), (composed, composed_norms)) = (fused?, composed?);
    for (name, (x, y)) in [
        "bf16 [64, 96]",
        "f16 [64, 96]",
        "f32 [96]",
        "f32 [300, 500]",
    ]
    .iter()
    .zip(fused.iter().zip(&composed))
    {
        let e = rel(x, y)?;
        let tol = if x.dtype() == DType::F32 { 1e-5 } else { 1e-2 };
        rows.push((
            format!("AdamW fused vs composed, 3 steps, {name}"),
            format!("{e:.2e}"),
            e < tol,
        ));
    }
    let e = fused_norms
        .iter()
        .zip(&composed_norms)
        .map(|(a, b)| (a - b).abs() / b);
    let e = nan_max(e);
    rows.push((
        "gradient norm, multi-tensor vs composed, rel".into(),
        format!("{e:.2e}"),
        e < 1e-5,
    ));
    Ok(())
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

/// Device memory in use (total − free, CUDA context included), sampled every millisecond on its
/// own thread while `f` runs; returns `f`'s result and the peak in bytes.
fn peak_memory<T>(gpu: &Device, f: impl FnOnce() -> Result<T>) -> Result<(T, usize)> {
    let Device::Cuda(dev) = gpu else {
        return Err("not a CUDA device".into());
    };
    let ctx = dev.cuda_stream().context().clone();
    let used = move || {
        ctx.mem_get_info()
            .map(|(free, total)| total - free)
            .unwrap_or(0)
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (stop, used) = (stop.clone(), used.clone());
        std::thread::spawn(move || {
            let mut peak = used();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(used());
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            peak.max(used())
        })
    };
    let out = f();
    gpu.synchronize()?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().map_err(|_| "memory sampler panicked")?;
    Ok((out?, peak))
}

fn qwen05b() -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Qwen2,
        vocab_size: 151_936,
        hidden_size: 896,
        intermediate_size: 4864,
        num_hidden_layers: 24,
        num_attention_heads: 14,
        num_key_value_heads: 2,
        head_dim: 64,
        rms_norm_eps: 1e-6,
        rope_theta: 1e6,
        rope_scaling: RopeScaling::Default,
        max_position_embeddings: 4096,
        tie_word_embeddings: true,
        qkv_bias: true,
        bos_token_id: None,
        eos_token_ids: vec![],
        pad_token_id: None,
    }
}

const GIB: f64 = (1u64 << 30) as f64;

/// A learner step's measurement: seconds per step, its phases (forward + log-probs, backward,
/// AdamW), and its peak memory in GiB: allocated (the memory pool's high watermark, as
/// torch_anchor.py's `max_memory_allocated`, the weights it trains included; None without
/// memory pools) and the device's use above `baseline` (what the pool keeps free included).
struct LearnerStep {
    secs: f64,
    phases: [f64; 3],
    allocated_gib: Option<f64>,
    device_gib: f64,
    /// f16 weights: the loss scale after the steps (an overflowing one is skipped here).
    loss_scale: Option<learner::scaler::LossScale>,
}

/// A [`LearnerStep`] on 16-bit weights with f32 moments and master.
///
/// The step is the learner's own calls (`AdamW::backward`, `AdamW::step`) on torch_anchor.py's
/// loss, the mean log-prob. The headline time runs steps back to back with no synchronization
/// but at the end, as torch_anchor.py's loop does; the phase split comes from separate steps
/// synchronized after each phase (their sum exceeds the headline by the host's idle gaps).
fn learner_bench(
    gpu: &Device,
    w: &Weights,
    b: usize,
    t: usize,
    baseline: usize,
) -> Result<LearnerStep> {
    // what earlier benches left in the memory pool goes back first, so that the peak is this
    // step's
    model::cuda::release_cached(gpu)?;
    model::cuda::reset_peak_allocated(gpu)?;
    let (vars, trainable) = w.to_vars()?;
    let mut opt = AdamW::new(vars, AdamWConfig::default())?;
    let (ids, _) = batch_rows(b, t, w.config.vocab_size as u32);
    let mask: Vec<Vec<u8>> = ids.iter().map(|r| vec![1; r.len()]).collect();
    // the loss's denominator, the scored tokens, read back once (the first step)
    let mut scored: Option<f64> = None;
    // one step; with `phases`, the device synchronized after each phase and the phases' seconds
    // returned (forward + log-probs, backward, AdamW), otherwise zeros
    let mut step = |phases: bool| -> Result<[f64; 3]> {
        let mut marks = vec![Instant::now()];
        let mark = |marks: &mut Vec<Instant>| -> Result<()> {
            if phases {
                gpu.synchronize()?;
                marks.push(Instant::now());
            }
            Ok(())
        };
        let lp = sequence_logprobs(&trainable, &ids, &mask, &mask, 1.0)?;
        let n = match scored {
            Some(n) => n,
            None => *scored.insert(lp.mask.sum_all()?.to_scalar::<f32>()? as f64),
        };
        let loss = (lp.logprobs.sum_all()?.neg()? / n)?;
        mark(&mut marks)?;
        if opt.backward(&loss)?.1.is_none() {
            return Err("the loss is not finite".into());
        }
        mark(&mut marks)?;
        opt.step(1e-6)?;
        mark(&mut marks)?;
        Ok(match phases {
            true => [1, 2, 3].map(|k| (marks[k] - marks[k - 1]).as_secs_f64()),
            false => [0.0; 3],
        })
    };
    let (_, peak) = peak_memory(gpu, || {
        step(false)?;
        step(false)
    })?;
    let reps = 5;
    gpu.synchronize()?;
    let start = Instant::now();
    for _ in 0..reps {
        step(false)?;
    }
    gpu.synchronize()?;
    let secs = start.elapsed().as_secs_f64() / reps as f64;
    let split_reps = 3;
    let mut phases = [0f64; 3];
    for _ in 0..split_reps {
        let p = step(true)?;
        (0..3).for_each(|k| phases[k] += p[k] / split_reps as f64);
    }
    Ok(LearnerStep {
        secs,
        phases,
        allocated_gib: model::cuda::peak_allocated(gpu)?.map(|b| b as f64 / GIB),
        device_gib: peak.saturating_sub(baseline) as f64 / GIB,
        loss_scale: opt.loss_scale(),
    })
}

/// A generation run: its seconds, the tokens it made, and per decode step (its `n` steps, the
/// prefill included) the launches of ferrite's own kernels and the matmuls (cuBLAS launches).
struct Generated {
    secs: f64,
    tokens: usize,
    kernels_per_step: f64,
    matmuls_per_step: f64,
}

impl Generated {
    /// Tokens/s, the time per step and its launches.
    fn summary(&self, n: usize) -> String {
        format!(
            "{:.0} tok/s, {:.2} ms per step, {:.0} ferrite kernels + {:.0} matmuls per step",
            self.tokens as f64 / self.secs,
            self.secs * 1e3 / n as f64,
            self.kernels_per_step,
            self.matmuls_per_step
        )
    }
}

/// Samples `n` new tokens (T = 1) for `b` random `p`-token prompts.
fn generation_bench(gpu: &Device, w: &Weights, b: usize, p: usize, n: usize) -> Result<Generated> {
    let (prompts, _) = batch_rows(b, p, w.config.vocab_size as u32);
    let cfg = GenerationConfig {
        max_new_tokens: n,
        sampling: SamplingParams::default(),
        ..Default::default()
    };
    let detached = w.detach();
    let warm = GenerationConfig {
        max_new_tokens: 8,
        ..cfg.clone()
    };
    // warmed up on two of the prompts (the one at B=1): the kernels loaded, the pool grown
    generate(&detached, &prompts[..b.min(2)], &warm, None)?;
    gpu.synchronize()?;
    let (kernels, matmuls) = (model::cuda::kernel_launches(), forward::linear_calls());
    let start = Instant::now();
    let out = generate(&detached, &prompts, &cfg, None)?;
    gpu.synchronize()?;
    let per_step = |count: f64| count / n as f64;
    Ok(Generated {
        secs: start.elapsed().as_secs_f64(),
        tokens: out.iter().map(|c| c.tokens.len()).sum(),
        kernels_per_step: per_step((model::cuda::kernel_launches() - kernels) as f64),
        matmuls_per_step: per_step((forward::linear_calls() - matmuls) as f64),
    })
}

/// Device memory in use (total − free, the CUDA context included); 0 off CUDA.
fn used_memory(gpu: &Device) -> usize {
    match gpu {
        Device::Cuda(dev) => dev
            .cuda_stream()
            .context()
            .mem_get_info()
            .map(|(free, total)| total - free)
            .unwrap_or(0),
        _ => 0,
    }
}

/// The learner step on the Qwen2.5-0.5B shape (bf16 weights, f32 AdamW moments) at B=8, T=1024,
/// the measurement torch_anchor.py makes, in the `variants` given: (label, CUDA kernels, flash
/// attention, layer checkpointing). The first with kernels and flash attention and no
/// checkpointing is the headline step whose time the kernel table splits.
fn learner_benches(
    gpu: &Device,
    w: &Weights,
    baseline: usize,
    variants: &[(&str, bool, bool, bool)],
    r: &mut Report,
) -> Result<()> {
    let (b, t) = (8usize, 1024usize);
    let dtype = format!("{:?}", w.embed_tokens.dtype()).to_lowercase();
    for &(label, kernels, flash, checkpoint) in variants {
        ops::set_cuda_kernels(kernels);
        ops::set_flash_attention(flash);
        model::checkpoint::set_enabled(checkpoint);
        match learner_bench(gpu, w, b, t, baseline) {
            Ok(m) => {
                let [forward, backward, adamw] = m.phases.map(|x| x * 1e3);
                if kernels && flash && !checkpoint && r.step.is_none() {
                    r.step = Some((m.secs, m.phases));
                }
                let (tok_s, allocated) = ((b * t) as f64 / m.secs, m.allocated_gib);
                let alloc_text = allocated.map_or("?".into(), |g| format!("{g:.1}"));
                r.lines.push(format!(
                    "learner B={b} T={t} {dtype}, {label}: {tok_s:.0} tok/s, {:.0} ms/step (synchronized phases: forward + log-probs {forward:.0}, backward {backward:.0}, AdamW {adamw:.0}), peak allocated {alloc_text} GiB, device use {:.1} GiB above the context{}",
                    m.secs * 1e3,
                    m.device_gib,
                    m.loss_scale.map_or(String::new(), |s| format!(
                        ", loss scale {} after {} overflows (each a skipped step here)",
                        s.scale, s.overflows
                    )),
                ));
                let alloc_json = allocated.map_or("null".into(), |g| g.to_string());
                r.json.push(format!(
                    r#"{{"kind": "learner", "variant": "{label}", "B": {b}, "T": {t}, "step_s": {}, "tok_s": {tok_s}, "alloc_gib": {alloc_json}, "peak_gib": {}}}"#,
                    m.secs, m.device_gib
                ));
            }
            Err(e) => r
                .lines
                .push(format!("learner B={b} T={t} {dtype}, {label}: error: {e}")),
        }
    }
    model::checkpoint::set_enabled(false);
    ops::set_cuda_kernels(true);
    ops::set_flash_attention(true);
    Ok(())
}

/// A GRPO step on an RL-like batch (`learner::synthetic::rl_like_step`: 16 prompts of 40–120
/// tokens × 8 completions of 8–512) in micro-batches of 8,192 tokens, in each of
/// `learner::synthetic::LAYOUTS` (padded as they come, padded by length, packed): completion
/// tokens/s and positions run (packed is what a CUDA run in bf16 takes by default).
fn learner_order_bench(w: &Weights, r: &mut Report) -> Result<()> {
    let (vars, trainable) = w.to_vars()?;
    let mut opt = AdamW::new(vars, AdamWConfig::default())?;
    let seqs = learner::synthetic::rl_like_step(16, 8, w.config.vocab_size as u32, 3);
    let tokens: usize = seqs.iter().map(|s| s.completion.len()).sum();
    let runs = learner::synthetic::compare_layouts(&trainable, &mut opt, &seqs, 8192, 2)?;
    let each: Vec<String> = runs
        .iter()
        .zip(learner::synthetic::LAYOUTS)
        .map(|(run, label)| {
            format!(
                "{label} {:.0} tok/s ({} positions, {:.2}×)",
                tokens as f64 / run.seconds,
                run.positions,
                runs[0].seconds / run.seconds
            )
        })
        .collect();
    r.lines.push(format!(
        "learner GRPO step bf16, RL-like lengths ({} rows, {tokens} completion tokens, micro-batches \
         of 8192): {}",
        seqs.len(),
        each.join(", ")
    ));
    let [given, sorted, packed] = runs;
    r.json.push(format!(
        r#"{{"kind": "learner_layout", "tokens": {tokens}, "given_s": {}, "sorted_s": {}, "packed_s": {}, "given_positions": {}, "sorted_positions": {}, "packed_positions": {}}}"#,
        given.seconds, sorted.seconds, packed.seconds, given.positions, sorted.positions, packed.positions
    ));
    Ok(())
}

/// Each fused kernel's forward + backward time against its composed reference at the learner's
/// shapes (B=8, T=1024, Qwen2.5-0.5B's widths).
fn kernel_timings(gpu: &Device, r: &mut Report) -> Result<()> {
    let lines = &mut r.lines;
    let (b, t) = (8usize, 1024usize);
    // each fused kernel against its composed reference at the learner's shapes (forward + backward)
    let nt = b * t;
    let causal: Vec<f32> = (0..b * t * t)
        .map(|i| if i % t > (i / t) % t { -1e9 } else { 0.0 })
        .collect();
    let causal = Tensor::from_vec(causal, (b, 1, 1, t, t), &Device::Cpu)?.to_device(gpu)?;
    let (c1, c2, causal_bias) = (causal.clone(), causal.clone(), causal);
    let chunk = model::attention::chunk_rows(b, 14, t);
    let targets: Vec<u32> = (0..nt as u32).map(|i| (i * 7919) % 151_936).collect();
    let targets = Tensor::new(targets.as_slice(), gpu)?;
    let (t1, t2) = (targets.clone(), targets);
    let lp_plus_h = |(lp, h): (Tensor, Tensor)| -> Result<Tensor> { Ok((lp + (h * 0.37)?)?) };
    let ids: Vec<u32> = (0..nt as u32).map(|i| (i * 104_729) % 151_936).collect();
    let e1 = Tensor::new(ids.as_slice(), gpu)?;
    let e2 = e1.clone();
    // a third of the batch one padding token, as right-padded rollouts make it
    let padded: Vec<u32> = (0..nt)
        .map(|i| if i % t < 2 * t / 3 { ids[i] } else { 151_643 })
        .collect();
    let e3 = Tensor::new(padded.as_slice(), gpu)?;
    let e4 = e3.clone();
    let r1: Vec<u32> = (0..nt as u32).filter(|i| i % 4 != 1).collect();
    let r2 = Tensor::new(r1.as_slice(), gpu)?;
    let kernel_cases = [
        Case {
            name: "rms_norm [8192, 896]",
            shapes: vec![vec![nt, 896], vec![896]],
            grad_of: vec![true, true],
            fused: Box::new(|x| Ok(ops::rms_norm(&x[0], &x[1], 1e-6)?)),
            reference: Box::new(|x| Ok(ops::composed::rms_norm(&x[0], &x[1], 1e-6)?)),
        },
        Case {
            name: "rope [8, 14, 1024, 64]",
            shapes: vec![vec![b, 14, t, 64], vec![b, 1, t, 64], vec![b, 1, t, 64]],
            grad_of: vec![true, false, false],
            fused: Box::new(|x| Ok(ops::rope(&x[0], &x[1], &x[2])?)),
            reference: Box::new(|x| Ok(ops::composed::rope(&x[0], &x[1], &x[2])?)),
        },
        Case {
            // q's bias; the backward's column sums are what differ from candle's
            name: "bias add [8192, 896] + [896]",
            shapes: vec![vec![nt, 896], vec![896]],
            grad_of: vec![true, true],
            fused: Box::new(|x| Ok(ops::bias_add(&x[0], &x[1])?)),
            reference: Box::new(|x| Ok(x[0].broadcast_add(&x[1])?)),
        },
        Case {
            name: "swiglu [8192, 4864]",
            shapes: vec![vec![nt, 4864], vec![nt, 4864]],
            grad_of: vec![true, true],
            fused: Box::new(|x| Ok(ops::swiglu(&x[0], &x[1])?)),
            reference: Box::new(|x| Ok((x[0].silu()? * &x[1])?)),
        },
        Case {
            // one layer's attention: chunked against whole probabilities kept for autograd
            name: "attention [8, 14, 1024, 64], 2 KV heads",
            shapes: vec![vec![b, 2, 7 * t, 64], vec![b, 2, t, 64], vec![b, 2, t, 64]],
            grad_of: vec![true, true, true],
            fused: Box::new(move |x| {
                Ok(model::attention::attention(
                    &x[0], &x[1], &x[2], &c1, 0.125, chunk,
                )?)
            }),
            reference: Box::new(move |x| {
                let scores = x[0].matmul(&x[1].t()?)?.reshape((b, 2, 7, t, t))?;
                let p = ops::composed::masked_softmax(&scores, &c2, 0.125)?;
                let y = p
                    .to_dtype(DType::BF16)?
                    .reshape((b, 2, 7 * t, t))?
                    .matmul(&x[2])?;
                Ok(model::attention::token_major(&y, t)?)
            }),
        },
        Case {
            // the learner's output layer: in bf16 its logits kept whole (2.3 GiB), turned into dz
            // in place, one dW matmul; in f32 recomputed in chunks of 220 rows, dW per group of 8
            // chunks; against autograd through the whole f32 logits (5 GB at this shape)
            name: "output layer [8192, 896]·[151936, 896]ᵀ",
            shapes: vec![vec![nt, 896], vec![151_936, 896]],
            grad_of: vec![true, true],
            fused: Box::new(move |x| {
                let chunk = model::head::chunk_rows(151_936);
                lp_plus_h(model::head::output_logprobs(&x[0], &x[1], &t1, 1.0, chunk)?)
            }),
            reference: Box::new(move |x| {
                let z = model::forward::linear(&x[0], &x[1], None)?.to_dtype(DType::F32)?;
                lp_plus_h((
                    ops::composed::logprob_gather(&z, &t2)?,
                    ops::composed::entropy(&z)?,
                ))
            }),
        },
        Case {
            // the step's first op: its backward is the embedding table's gradient
            name: "embedding [151936, 896] ← 8192 ids",
            shapes: vec![vec![151_936, 896]],
            grad_of: vec![true],
            fused: Box::new(move |x| Ok(ops::embedding(&x[0], &e1)?)),
            reference: Box::new(move |x| Ok(x[0].index_select(&e2, 0)?)),
        },
        Case {
            name: "embedding [151936, 896] ← 8192 ids, a third one padding id",
            shapes: vec![vec![151_936, 896]],
            grad_of: vec![true],
            fused: Box::new(move |x| Ok(ops::embedding(&x[0], &e3)?)),
            reference: Box::new(move |x| Ok(x[0].index_select(&e4, 0)?)),
        },
        Case {
            // the scored rows (three in four here) before the output layer
            name: "select rows [8192, 896] → 6144",
            shapes: vec![vec![nt, 896]],
            grad_of: vec![true],
            fused: Box::new(move |x| Ok(ops::select_rows(&x[0], &r1)?)),
            reference: Box::new(move |x| Ok(x[0].index_select(&r2, 0)?)),
        },
    ];
    let mut fused: Vec<(&str, f64)> = Vec::new(); // the fused ops' seconds, by case name
    for Case {
        name,
        shapes,
        grad_of,
        fused: op,
        reference,
    } in &kernel_cases
    {
        // the fused op's time stands even if the composed one fails (the output layer's
        // reference holds several 5 GB f32 logit tensors: out of memory on an 80 GB card)
        let timed = || -> Result<(f64, Result<f64>)> {
            let inputs: Vec<Tensor> = shapes
                .iter()
                .enumerate()
                .map(|(i, s)| randn(s, i as u64, 1.0, DType::BF16, gpu))
                .collect::<Result<_>>()?;
            let tf = time(5, || value_and_grads(&inputs, grad_of, &**op, 1), gpu)?;
            let tr = time(
                5,
                || value_and_grads(&inputs, grad_of, &**reference, 1),
                gpu,
            );
            Ok((tf, tr))
        };
        let outcome = timed();
        if let Ok((tf, _)) = &outcome {
            fused.push((*name, *tf));
        }
        lines.push(match outcome {
            Ok((tf, Ok(tr))) => format!(
                "kernel {name} bf16 forward+backward: fused {:.2} ms, composed {:.2} ms ({:.1}x)",
                tf * 1e3,
                tr * 1e3,
                tr / tf
            ),
            Ok((tf, Err(e))) => format!(
                "kernel {name} bf16 forward+backward: fused {:.2} ms, composed: error: {e}",
                tf * 1e3
            ),
            Err(e) => format!("kernel {name}: error: {e}"),
        });
    }

    // the attention, the flash kernels against the chunked attention they replace: the forward
    // alone (the old policy's and the reference model's log-probs, a prefill), and with the
    // backward
    let attention_timing = || -> Result<String> {
        let r = |shape: &[usize], seed| randn(shape, seed, 1.0, DType::BF16, gpu);
        let inputs = [
            r(&[b, 2, 7 * t, 64], 31)?,
            r(&[b, 2, t, 64], 32)?,
            r(&[b, 2, t, 64], 33)?,
        ];
        let op = |x: &[Tensor]| -> Result<Tensor> {
            let a = model::attention::attention(&x[0], &x[1], &x[2], &causal_bias, 0.125, chunk);
            Ok(a?)
        };
        let forward = || op(&inputs);
        let both = || value_and_grads(&inputs, &[true; 3], &op, 1);
        let flash = (time(5, forward, gpu)?, time(5, both, gpu)?);
        ops::set_flash_attention(false);
        let chunked = time(5, forward, gpu).and_then(|f| Ok((f, time(5, both, gpu)?)));
        ops::set_flash_attention(true);
        let chunked = chunked?;
        // forward: two products over the causal half of the scores, 2·B·Hq·T²·D FLOPs; the
        // flash backward makes seven (S and dP twice), the chunked one five
        let flops = 2.0 * (b * 14 * t * t * 64) as f64;
        Ok(format!(
            "attention [8, 14, 1024, 64] bf16: forward flash {:.2} ms ({:.0} TFLOP/s), chunked {:.2} ms ({:.1}x); forward+backward flash {:.2} ms ({:.0} TFLOP/s), chunked {:.2} ms ({:.1}x)",
            flash.0 * 1e3,
            flops / flash.0 / 1e12,
            chunked.0 * 1e3,
            chunked.0 / flash.0,
            flash.1 * 1e3,
            4.5 * flops / flash.1 / 1e12,
            chunked.1 * 1e3,
            chunked.1 / flash.1
        ))
    };
    lines.push(attention_timing().unwrap_or_else(|e| format!("attention: error: {e}")));

    // a batch's attention bias: built on the device from B·S flags, or on the host and uploaded
    let bias_timing = || -> Result<String> {
        let valid = vec![(0..t).map(|j| j < 2 * t / 3).collect::<Vec<bool>>(); b];
        let build = || Ok(ops::attention_bias(&valid, t, 0, -1e9, gpu)?);
        let device = time(5, build, gpu)?;
        ops::set_cuda_kernels(false);
        let host = time(5, build, gpu);
        ops::set_cuda_kernels(true);
        let host = host?;
        Ok(format!(
            "attention bias [8, 1, 1, 1024, 1024]: on the device {:.3} ms, on the host and uploaded {:.2} ms ({:.0}x)",
            device * 1e3,
            host * 1e3,
            host / device
        ))
    };
    lines.push(bias_timing().unwrap_or_else(|e| format!("attention bias: error: {e}")));

    // the matmuls of one decoder layer, forward + backward: with 24 layers and the output layer,
    // most of the step's FLOPs. As the learner multiplies them (q, k and v in one matmul of their
    // concatenated matrices, `forward::packed_qkv`; o, gate, up, down) and with q, k and v apart,
    // as it did before: the pair says what packing them is worth on this card. o reads h here
    // (in the model it reads the attention's output, of the same shape), so that both variants
    // end in the same output: the o/MLP sum beside the q, k and v columns.
    let (hd, kv, ff) = (896usize, 128usize, 4864usize);
    let layer = |packed: bool| {
        move |x: &[Tensor]| -> Result<Tensor> {
            let lin = |a: &Tensor, w: &Tensor| model::forward::linear(a, w, None);
            let h = &x[0];
            let qkv = match packed {
                true => vec![lin(h, &Tensor::cat(&[&x[1], &x[2], &x[3]], 0)?)?],
                false => vec![lin(h, &x[1])?, lin(h, &x[2])?, lin(h, &x[3])?],
            };
            let mlp = lin(&(lin(h, &x[5])? * lin(h, &x[6])?)?, &x[7])?;
            let mut out = vec![(lin(h, &x[4])? + mlp)?];
            out.extend(qkv);
            Ok(Tensor::cat(&out, 1)?)
        }
    };
    let shapes = [
        vec![nt, hd],
        vec![hd, hd],
        vec![kv, hd],
        vec![kv, hd],
        vec![hd, hd],
        vec![ff, hd],
        vec![ff, hd],
        vec![hd, ff],
    ];
    let matmuls = |packed: bool| -> Result<f64> {
        let inputs: Vec<Tensor> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| randn(s, 20 + i as u64, 0.03, DType::BF16, gpu))
            .collect::<Result<_>>()?;
        let op = layer(packed);
        time(5, || value_and_grads(&inputs, &[true; 8], &op, 1), gpu)
    };
    let flops = 6.0 * nt as f64 * (hd * (2 * hd + 2 * kv + 3 * ff)) as f64;
    let (packed, apart) = (matmuls(true), matmuls(false));
    lines.push(match (&packed, &apart) {
        (Ok(secs), Ok(apart)) => format!(
            "one layer's matmuls [8192, 896] bf16 forward+backward, q/k/v in one: {:.2} ms ({:.0} TFLOP/s; x24 layers = {:.0} ms a step); q/k/v apart: {:.2} ms ({:.0} TFLOP/s), packed {:.2}x",
            secs * 1e3,
            flops / secs / 1e12,
            24.0 * secs * 1e3,
            apart * 1e3,
            flops / apart / 1e12,
            apart / secs
        ),
        (Err(e), _) | (_, Err(e)) => format!("one layer's matmuls: error: {e}"),
    });
    if let Ok(secs) = packed {
        fused.push(("matmuls", secs));
    }
    let step = r.step;
    r.lines.push(step_budget(&fused, step));
    Ok(())
}

/// Where the learner step's time goes, by the kernels' own timings at its shapes: 24 layers of
/// two RMSNorms, RoPE on q and k (k has 2 of q's 14 heads), SwiGLU, the q/k/v bias (one add,
/// 1,152 wide to the timed 896), attention and the matmuls (q/k/v in one), then the output layer, the
/// embedding and the row selection, against the step measured whole (`step`: seconds and its
/// forward / backward / AdamW phases); what is left is the ops without a timing of their own
/// (residual adds, casts, transposes, the loss) and the gaps between launches.
fn step_budget(fused: &[(&str, f64)], step: Option<(f64, [f64; 3])>) -> String {
    let ms = |prefix: &str| {
        fused
            .iter()
            .find(|(name, _)| name.starts_with(prefix))
            .map(|(_, secs)| secs * 1e3)
    };
    let parts = [
        ("norms", ms("rms_norm").map(|x| 2.0 * x)),
        ("rope", ms("rope").map(|x| x * 16.0 / 14.0)),
        ("swiglu", ms("swiglu")),
        (
            "biases",
            ms("bias add").map(|x| x * (896.0 + 2.0 * 128.0) / 896.0),
        ),
        ("attention", ms("attention")),
        ("matmuls", ms("matmuls")),
    ];
    let once = [
        ("output layer", ms("output layer")),
        ("embedding", ms("embedding")),
        ("row selection", ms("select rows")),
    ];
    let known = |xs: &[(&str, Option<f64>)]| -> String {
        xs.iter()
            .map(|(name, x)| match x {
                Some(x) => format!("{name} {x:.2}"),
                None => format!("{name} ?"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let layer: f64 = parts.iter().filter_map(|(_, x)| *x).sum();
    let total = 24.0 * layer + once.iter().filter_map(|(_, x)| *x).sum::<f64>();
    let mut line = format!(
        "learner step by the kernel timings: 24 layers x {layer:.2} ms ({}) + {} = {total:.0} ms",
        known(&parts),
        known(&once)
    );
    if let Some((secs, [_, _, adamw])) = step {
        let measured = secs * 1e3;
        line += &format!(
            "; measured {measured:.0} ms, of which AdamW {:.0}; the rest, {:.0} ms, is ops without a timing here and launch gaps",
            adamw * 1e3,
            measured - adamw * 1e3 - total
        );
    }
    line
}

/// The device sampler's time per decode step at the widest decode batch (B=256).
fn sampler_timing(gpu: &Device, lines: &mut Vec<String>) -> Result<()> {
    let c = qwen05b();
    // the sampler at the widest decode batch: full softmax, top-k, top-p, both; on f32 logits
    // and on bf16 ones (what a bf16 model's decode step samples from)
    let (rows, v) = (256usize, c.vocab_size);
    let u: Vec<f32> = (0..rows).map(|i| (i as f32 + 0.5) / rows as f32).collect();
    for dtype in [DType::F32, DType::BF16] {
        let z = randn(&[rows, v], 9, 3.0, dtype, gpu)?;
        let mut out = format!("sampler [{rows}, {v}] {dtype:?}:");
        for (name, top_k, top_p) in [
            ("T=1", 0usize, 1.0f32),
            ("top-k 50", 50, 1.0),
            ("top-p 0.9", 0, 0.9),
            ("top-k 50 + top-p 0.9", 50, 0.9),
        ] {
            let p = SamplingParams {
                temperature: 1.0,
                top_k,
                top_p,
            };
            let secs = time(5, || Ok(model::cuda::sample_rows(&z, &u, &p)?), gpu)?;
            out += &format!(" {name} {:.2} ms,", secs * 1e3);
        }
        lines.push(out.trim_end_matches(',').to_string());
    }
    Ok(())
}

/// Generation on the Qwen2.5-0.5B shape: B=64 and B=256, 128-token prompts, 256 new tokens (HF
/// `generate`'s measurement in torch_anchor.py), on packed weights as a rollout worker's snapshot
/// has them.
fn generation_benches(gpu: &Device, w: &Weights, r: &mut Report) -> Result<()> {
    let (p, n) = (128usize, 256usize);
    let w = &w.packed()?;
    for gb in [64usize, 256] {
        match generation_bench(gpu, w, gb, p, n) {
            Ok(run) => {
                r.lines.push(format!(
                    "generate B={gb}, {p}-token prompts, {n} new: {} ({} tokens in {:.1} s, the prefill included)",
                    run.summary(n),
                    run.tokens,
                    run.secs
                ));
                r.json.push(format!(
                    r#"{{"kind": "rollout", "B": {gb}, "P": {p}, "N": {n}, "s": {}, "gen_tok_s": {}}}"#,
                    run.secs,
                    run.tokens as f64 / run.secs
                ));
            }
            Err(e) => r.lines.push(format!("generate B={gb}: error: {e}")),
        }
    }
    Ok(())
}

/// Runs `f` on a second device of GPU 0 as candle opens it (`Device::new_cuda`: cudarc's
/// events on, and the memory pool handing its free memory back at every synchronization), with
/// `w` copied there, then puts back `model::cuda::open`'s pool setting: what that setting and
/// the events cost, measured on the same card in the same call. `f` also gets the memory in use
/// before the copy: the baseline of a peak that, like the other variants', counts one copy of
/// the weights.
fn with_candle_defaults<T>(
    w: &Weights,
    f: impl FnOnce(&Device, &Weights, usize) -> Result<T>,
) -> Result<T> {
    let plain = Device::new_cuda(0)?;
    let before = used_memory(&plain);
    let w = w.to(w.embed_tokens.dtype(), &plain)?;
    model::cuda::keep_freed_memory(&plain, false)?;
    let out = f(&plain, &w, before);
    model::cuda::keep_freed_memory(&plain, true)?;
    drop(w);
    model::cuda::release_cached(&plain)?;
    out
}

/// Generation beside the headline, on packed weights as it is: B=1 with the kernels, whose step
/// time is the floor a decode step costs when the GPU has almost nothing to do (the launches and
/// the host's work: if B=64's step is not much longer, generation is launch-bound); B=64 on
/// unpacked weights (what one q/k/v and one gate/up matmul per layer gain); B=64 on candle's
/// device defaults (what `model::cuda::open`'s settings gain); and B=64 with the composed ops
/// (kernels off: what decode attention, the sampler and the norms gain).
fn generation_variants(gpu: &Device, w: &Weights, r: &mut Report) -> Result<()> {
    let (p, n) = (128usize, 256usize);
    let unpacked = generation_bench(gpu, w, 64, p, n);
    let w = &w.packed()?;
    // one line per variant: tokens/s, the time per step and its launches (the prefill included)
    let line = |label: &str, run: Result<Generated>| match run {
        Ok(run) => format!("generate {label}: {}", run.summary(n)),
        Err(e) => format!("generate {label}: error: {e}"),
    };
    let floor = generation_bench(gpu, w, 1, p, n);
    r.lines.push(line("B=1 (the launch and host floor)", floor));
    r.lines.push(line(
        "B=64 on unpacked weights (three q/k/v and two gate/up matmuls per layer)",
        unpacked,
    ));
    let plain = with_candle_defaults(w, |plain, w, _| generation_bench(plain, w, 64, p, n));
    r.lines.push(line(
        "B=64 on candle's device defaults (cudarc events, the pool emptied at each sync)",
        plain,
    ));
    ops::set_cuda_kernels(false);
    let composed = generation_bench(gpu, w, 64, p, n);
    ops::set_cuda_kernels(true);
    r.lines
        .push(line("B=64 with the composed ops (kernels off)", composed));
    Ok(())
}

/// A worker's rollouts three ways, on the same 16 groups of 8 rows (128-token prompts, up to 256
/// new tokens, every 128th token a stop, so that a random model's completions end at varied
/// lengths, about 128 tokens on average): each group alone (`rollout.groups_per_batch = 1`);
/// batches of 4 groups that shrink as their rows finish (what `groups_per_batch = 4` did before
/// refills); and one stream of 32 slots refilled a group's 8 rows at a time as rows finish
/// (`groups_per_batch = 4` now,
/// `generate_stream`). Each row samples from its group's stream in all three, so they generate
/// the same tokens up to the rounding of the batch shapes: tokens/s is the comparison.
fn rollout_batching(gpu: &Device, w: &Weights, r: &mut Report) -> Result<()> {
    let (groups, group_size, per_batch, p, n) = (16usize, 8usize, 4usize, 128usize, 256usize);
    let w = &w.packed()?;
    let vocab = w.config.vocab_size as u32;
    let (prompts, _) = batch_rows(groups, p, vocab);
    let cfg = GenerationConfig {
        max_new_tokens: n,
        sampling: SamplingParams::default(),
        stop_token_ids: (0..vocab).step_by(128).collect(),
        ..Default::default()
    };
    // the rows of groups `g0..g1`, each with its group's stream
    let rows = |g0: usize, g1: usize| -> (Vec<Vec<u32>>, Vec<(u64, u64)>) {
        (g0..g1)
            .flat_map(|g| (0..group_size).map(move |k| (g, k)))
            .map(|(g, k)| (prompts[g].clone(), (g as u64, k as u64)))
            .unzip()
    };
    let batched = |per: usize| -> Result<usize> {
        let mut tokens = 0;
        for g0 in (0..groups).step_by(per) {
            let (rows, streams) = rows(g0, (g0 + per).min(groups));
            let slots = rows.len();
            model::generate::generate_continuous_streams(
                w,
                &rows,
                &streams,
                &cfg,
                None,
                slots,
                |_, c| {
                    tokens += c.tokens.len();
                    Ok(())
                },
            )?;
        }
        Ok(tokens)
    };
    let streamed = || -> Result<usize> {
        let (rows, streams) = rows(0, groups);
        let mut waiting = rows.into_iter().zip(streams);
        let mut tokens = 0;
        let room = model::generate::Room {
            slots: per_batch * group_size,
            longest: p,
            refills: true,
            refill_rows: group_size,
        };
        model::generate::generate_stream(
            w,
            &cfg,
            None,
            room,
            || {
                waiting.next().map(|(ids, stream)| model::generate::Prompt {
                    ids,
                    stream,
                    greedy: false,
                })
            },
            |_, c| {
                tokens += c.tokens.len();
                Ok(())
            },
        )?;
        Ok(tokens)
    };
    // warmed up: the kernels loaded and the pool grown for the largest batch
    batched(per_batch)?;
    let mut run = |label: &str, f: &dyn Fn() -> Result<usize>| -> Result<()> {
        gpu.synchronize()?;
        let start = Instant::now();
        let tokens = f()?;
        gpu.synchronize()?;
        let secs = start.elapsed().as_secs_f64();
        r.lines.push(format!(
            "rollouts, {groups} groups of {group_size}, {label}: {:.0} tok/s ({tokens} tokens in {secs:.2} s)",
            tokens as f64 / secs
        ));
        r.json.push(format!(
            r#"{{"kind": "rollout_batching", "variant": "{label}", "tokens": {tokens}, "s": {secs}}}"#
        ));
        Ok(())
    };
    run("each group alone", &|| batched(1))?;
    run(&format!("{per_batch} groups a batch, shrinking"), &|| {
        batched(per_batch)
    })?;
    run(
        &format!(
            "{} slots refilled {group_size} rows at a time",
            per_batch * group_size
        ),
        &streamed,
    )
}

/// `what`: `checks`, `bench` or `all`.
pub fn main(what: &str) -> anyhow::Result<()> {
    run(what).map_err(|e| anyhow::anyhow!("{e}"))
}

/// `jit`: compiles every kernel module for the GPU into the driver's compute cache
/// ([`model::cuda::compile_modules`]), so that the processes after it load them at once;
/// `scripts/gpu-check.sh` runs it beside PyTorch's anchor.
fn jit(gpu: &Device) -> Result<()> {
    let start = Instant::now();
    let modules = model::cuda::compile_modules(gpu)?;
    if modules.is_empty() {
        println!("no CUDA device: no kernel modules to compile");
        return Ok(());
    }
    let wall = start.elapsed().as_secs_f64();
    for (name, bytes, secs) in &modules {
        println!(
            "compiled {name:<16} {:>6.2} MB of PTX in {secs:5.1} s",
            *bytes as f64 / 1e6
        );
    }
    let serial: f64 = modules.iter().map(|m| m.2).sum();
    println!(
        "compiled {} kernel modules in {wall:.1} s (their threads' sum {serial:.1} s)",
        modules.len()
    );
    Ok(())
}

type Rows = Vec<(String, String, bool)>;

// ---------------------------------------------------------------- running out of memory

/// Running out of device memory. A tensor larger than the device fails with an error that
/// `model::error::out_of_memory` recognises, and the device works after it. Then a policy step of
/// the checks' model (bf16, 8 sequences of 256 tokens, one micro-batch) is run beside a ballast
/// that leaves it room for half of the way from what one sequence needs to what the whole needs,
/// as measured: it must run out of memory, run again in pieces (`learner::fit`) and make the
/// step it makes whole (its loss and gradient norm, within bf16's rounding).
fn memory_checks(gpu: &Device, rows: &mut Rows) -> Result<()> {
    use learner::fit::with_room;
    use learner::step::{policy_step, Sequence, StepConfig, StepMetrics};
    let Device::Cuda(dev) = gpu else {
        return Err("needs a CUDA device: the CPU's allocations abort when they fail".into());
    };
    let mut check = |name: &str, value: String, ok: bool| rows.push((name.to_string(), value, ok));
    let mib = |bytes: u64| bytes as f64 / (1u64 << 20) as f64;

    let (_, total) = dev.cuda_stream().context().mem_get_info()?;
    let huge = Tensor::zeros(total + (1 << 30), DType::U8, gpu);
    let (value, ok) = match &huge {
        Ok(_) => ("allocated".to_string(), false),
        Err(e) => {
            let text = e.to_string();
            (
                text.lines().next().unwrap_or("").to_string(),
                model::error::out_of_memory(e),
            )
        }
    };
    check(
        "a tensor 1 GiB larger than the device: recognised",
        value,
        ok,
    );
    drop(huge);
    let sum = Tensor::arange(0f32, 4.0, gpu)?
        .sum_all()?
        .to_scalar::<f32>()?;
    check(
        "the device after it: Σ [0, 1, 2, 3]",
        format!("{sum}"),
        sum == 6.0,
    );

    let c = config();
    let base = init::random_weights(&c, 0.05, 0, &Device::Cpu)?.to(DType::BF16, gpu)?;
    let mut rng = model::rng::Rng::new(7);
    let mut ids = |n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| rng.below(c.vocab_size as u64) as u32)
            .collect()
    };
    let seqs: Vec<Sequence> = (0..8)
        .map(|i| {
            let sign = if i % 2 == 0 { 1.0 } else { -1.0 };
            Sequence::new(ids(32), ids(224), vec![-7.0; 224], sign)
        })
        .collect();
    let cfg = StepConfig {
        loss: Default::default(),
        micro_batch_tokens: 8 * 256,
        temperature: 1.0,
        max_completion_length: 224,
        value: None,
    };
    let fresh = || -> Result<(Weights, AdamW)> {
        let (vars, w) = base.to_vars()?;
        Ok((w, AdamW::new(vars, AdamWConfig::default())?))
    };
    let allocated = || -> Result<u64> {
        Ok(model::cuda::peak_allocated(gpu)?.ok_or("the GPU has no memory pool")?)
    };
    // what a step allocates beyond what is held before it: whole, and a sequence a piece
    let need = |room: Option<usize>| -> Result<(StepMetrics, u64)> {
        let (w, mut opt) = fresh()?;
        model::cuda::release_cached(gpu)?;
        model::cuda::reset_peak_allocated(gpu)?;
        let before = allocated()?;
        let mut step = || policy_step(&w, None, None, &mut opt, &seqs, &cfg, 1e-3);
        let m = match room {
            Some(tokens) => with_room(tokens, step)?,
            None => step()?,
        };
        gpu.synchronize()?;
        Ok((m, allocated()? - before))
    };
    let (whole, need_whole) = need(None)?;
    let (_, need_piece) = need(Some(256))?;
    let room = need_piece + (need_whole.saturating_sub(need_piece)) / 2;
    let sizes = format!(
        "whole {:.1} MiB, a sequence {:.1}, room {:.1}",
        mib(need_whole),
        mib(need_piece),
        mib(room)
    );
    if need_whole < need_piece + (16 << 20) {
        check("a step beside a ballast: sizes apart", sizes, false);
        return Ok(());
    }
    let (w, mut opt) = fresh()?;
    model::cuda::release_cached(gpu)?;
    let (free, _) = dev.cuda_stream().context().mem_get_info()?;
    let ballast_bytes = (free as u64).saturating_sub(room) as usize;
    // SAFETY: never read or written, only held
    let ballast = unsafe { dev.alloc::<u8>(ballast_bytes)? };
    let result = policy_step(&w, None, None, &mut opt, &seqs, &cfg, 1e-3);
    gpu.synchronize()?;
    drop(ballast);
    let name = "a step beside a ballast: runs again in pieces";
    match result {
        Ok(m) => {
            let fit = opt.fit();
            let loss = ((m.loss - whole.loss) / whole.loss).abs();
            let norm = ((m.grad_norm - whole.grad_norm) / whole.grad_norm).abs();
            check(
                name,
                format!(
                    "{} retries, pieces of {:?} tokens{}; rel Δloss {loss:.1e}, Δ|g| {norm:.1e}; {sizes}",
                    m.memory_retries,
                    fit.piece_tokens,
                    if fit.checkpointed { ", checkpointed" } else { "" },
                ),
                m.memory_retries >= 1 && fit.piece_tokens.is_some() && loss < 2e-2 && norm < 5e-2,
            );
        }
        Err(e) => check(name, format!("{e}; {sizes}"), false),
    }
    Ok(())
}

/// What the sections found: check rows, bench lines and JSON lines. Each section's part is
/// printed as soon as it ends, so that a run cut short (a hung kernel, the device call's time
/// limit) still shows everything before; the whole table is printed again at the end.
#[derive(Default)]
struct Report {
    rows: Rows,
    lines: Vec<String>,
    json: Vec<String>,
    /// The learner step with the kernels: seconds, and its phases (forward, backward, AdamW).
    step: Option<(f64, [f64; 3])>,
}

impl Report {
    /// Prints the whole table and the lines again; an error when a check failed.
    fn finish(&self) -> Result<()> {
        println!("\nferrite gpu-check");
        println!("{:<64} {:<24} result", "check", "value");
        print_rows(&self.rows);
        println!();
        self.lines.iter().for_each(|l| println!("{l}"));
        if self.rows.is_empty() && self.lines.is_empty() {
            let only = std::env::var("GPU_CHECK_ONLY").unwrap_or_default();
            return Err(format!("no section ran: GPU_CHECK_ONLY = {only:?} names none").into());
        }
        let failed = self.rows.iter().filter(|(_, _, ok)| !ok).count();
        if failed > 0 {
            return Err(format!("{failed} GPU checks failed").into());
        }
        Ok(())
    }

    /// Runs one section; its error or panic becomes a FAIL row and the next section still runs
    /// (a CUDA fault may leave the context unusable: the later sections then fail fast).
    fn section(&mut self, name: &str, f: impl FnOnce(&mut Report) -> Result<()>) {
        // GPU_CHECK_ONLY=word,word: only the sections whose names contain one of the words (set
        // but empty, as `GPU_CHECK_ONLY=$WORDS` with WORDS unset leaves it: every section, not
        // none, which would print an empty table that reads as a pass)
        let only = std::env::var("GPU_CHECK_ONLY").unwrap_or_default();
        let words: Vec<&str> = only
            .split(',')
            .map(str::trim)
            .filter(|w| !w.is_empty())
            .collect();
        if !words.is_empty() && !words.iter().any(|w| name.contains(w)) {
            return;
        }
        let (rows, lines, json) = (self.rows.len(), self.lines.len(), self.json.len());
        let start = Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self)));
        let failure = match outcome {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(format!("error: {e}")),
            Err(panic) => Some(format!(
                "panic: {}",
                panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("(no message)")
            )),
        };
        if let Some(failure) = failure {
            self.rows.push((name.to_string(), failure, false));
        }
        println!("-- {name} ({:.1} s)", start.elapsed().as_secs_f64());
        print_rows(&self.rows[rows..]);
        self.lines[lines..].iter().for_each(|l| println!("{l}"));
        self.json[json..].iter().for_each(|j| println!("{j}"));
        use std::io::Write;
        std::io::stdout().flush().ok();
    }
}

fn print_rows(rows: &[(String, String, bool)]) {
    for (name, value, ok) in rows {
        println!("{name:<64} {value:<24} {}", if *ok { "ok" } else { "FAIL" });
    }
}

fn run(what: &str) -> Result<()> {
    if !matches!(what, "checks" | "bench" | "all" | "jit" | "glue") {
        return Err(format!("ferrite gpu-check [checks|bench|all|jit|glue], not {what}").into());
    }
    // a dry run of the checks' own code on the CPU (no kernels), before spending GPU time
    let gpu = match std::env::var("GPU_CHECK_DEVICE").as_deref() {
        Ok("cpu") => Device::Cpu,
        _ => model::cuda::open(0)?,
    };
    if what == "jit" {
        return jit(&gpu);
    }
    let mut r = Report::default();
    if what == "glue" {
        r.section("glue checks", |r| glue_checks(&gpu, &mut r.rows));
        return r.finish();
    }
    if what != "bench" {
        r.section("glue checks", |r| glue_checks(&gpu, &mut r.rows));
        r.section("kernel checks", |r| {
            kernel_checks(&gpu, &mut r.rows)?;
            add_rms_norm_checks(&gpu, &mut r.rows)?;
            swiglu_packed_checks(&gpu, &mut r.rows)
        });
        r.section("embedding checks", |r| embedding_checks(&gpu, &mut r.rows));
        r.section("sampling checks", |r| sampling_checks(&gpu, &mut r.rows));
        r.section("optimizer checks", |r| optimizer_checks(&gpu, &mut r.rows));
        r.section("decode attention checks", |r| {
            decode_attention_checks(&gpu, &mut r.rows)
        });
        r.section("flash attention checks", |r| {
            flash_attention_checks(&gpu, &mut r.rows)?;
            attention_bias_checks(&gpu, &mut r.rows)
        });
        r.section("decode q/k/v checks", |r| {
            decode_qkv_checks(&gpu, &mut r.rows)?;
            decode_qkv_attention_checks(&gpu, &mut r.rows)
        });
        r.section("model checks", |r| model_checks(&gpu, &mut r.rows));
        r.section("qwen3 checks", |r| qwen3_checks(&gpu, &mut r.rows));
        r.section("memory checks", |r| memory_checks(&gpu, &mut r.rows));
    }
    if what != "checks" {
        let c = qwen05b();
        let baseline = used_memory(&gpu);
        let mut w = None;
        r.section("Qwen2.5-0.5B-shape weights", |_| {
            w = Some(init::random_weights(&c, 0.02, 0, &Device::Cpu)?.to(DType::BF16, &gpu)?);
            Ok(())
        });
        // the issue's two figures first, then what explains them: a device call cut short by
        // its time limit still has the headline
        if let Some(w) = &w {
            r.section("learner bench", |r| {
                learner_benches(&gpu, w, baseline, &[("CUDA kernels", true, true, false)], r)
            });
            r.section("generation bench", |r| generation_benches(&gpu, w, r));
            r.section("learner variants", |r| {
                let variants = [
                    ("CUDA kernels, chunked attention", true, false, false),
                    ("composed ops", false, false, false),
                    ("CUDA kernels + layer checkpointing", true, true, true),
                ];
                learner_benches(&gpu, w, baseline, &variants, r)?;
                // what f32 logits (`model.f32_logits`) cost: the backward recomputes its logits
                let label = [("CUDA kernels, f32 logits", true, true, false)];
                model::head::with_f32_logits(true, || {
                    learner_benches(&gpu, w, baseline, &label, r)
                })?;
                // `model.dtype = "f16"`: the kernels' f16 entry points, the loss scaled
                let w16 = w.to(DType::F16, &gpu)?;
                let label = [("CUDA kernels, loss scaled", true, true, false)];
                learner_benches(&gpu, &w16, baseline, &label, r)?;
                drop(w16);
                learner_order_bench(w, r)?;
                // what model::cuda::open's device settings gain, against candle's own
                with_candle_defaults(w, |plain, w, before| {
                    let label = [("CUDA kernels, candle's device defaults", true, true, false)];
                    learner_benches(plain, w, before, &label, r)
                })
            });
            r.section("kernel timings", |r| kernel_timings(&gpu, r));
            r.section("sampler timing", |r| sampler_timing(&gpu, &mut r.lines));
            r.section("generation variants", |r| generation_variants(&gpu, w, r));
            r.section("rollout batching", |r| rollout_batching(&gpu, w, r));
        }
    }
    r.finish()
}

// ---------------------------------------------------------------- glue

/// `glue`: every launcher of `model::cuda` that needs no kernel but ferrite's own, on `gpu`,
/// against the CPU path on the same inputs (f32, and bf16 where the kernel is bf16 only): each
/// op's forward through candle's custom-op dispatch and its backward launcher called directly,
/// the reference through autograd on the CPU. It reads only copies and ferrite's kernels on the
/// device, so it runs under `scripts/fake-gpu.sh` (the kernels in the CPU emulator), where it
/// checks the launchers' argument lists, offsets and geometry before a GPU is lent; on a GPU it
/// is one more check of the same. Small shapes: the emulator runs a fiber per CUDA thread.
fn glue_checks(gpu: &Device, rows: &mut Rows) -> Result<()> {
    let cpu = Device::Cpu;
    let x = randn(&[3, 37, 96], 201, 2.0, DType::F32, &cpu)?;
    let w = randn(&[96], 202, 1.0, DType::F32, &cpu)?;
    glue_case(
        rows,
        gpu,
        "rms_norm [3, 37, 96]",
        &[&x, &w],
        &|t| Ok(ops::rms_norm(&t[0], &t[1], 1e-6)?),
        &|t, u| {
            let (dx, dw) = model::cuda::rms_norm_bwd(&t[0], &t[1], u, 1e-6)?;
            Ok(vec![dx, dw])
        },
    )?;
    let r = randn(&[3, 37, 96], 203, 2.0, DType::F32, &cpu)?;
    let (sum, y) = ops::add_rms_norm(
        &x.to_device(gpu)?,
        &r.to_device(gpu)?,
        &w.to_device(gpu)?,
        1e-6,
    )?;
    let (want_sum, want_y) = ops::add_rms_norm(&x, &r, &w, 1e-6)?;
    glue_row(rows, "add + rms_norm [3, 37, 96]: sum", &sum, &want_sum)?;
    glue_row(rows, "add + rms_norm [3, 37, 96]: y", &y, &want_y)?;

    // the output layer's f32 logits from bf16 states and weight, against the widened product
    let h = randn(&[37, 96], 206, 1.0, DType::BF16, &cpu)?;
    let v = randn(&[300, 96], 207, 1.0, DType::BF16, &cpu)?;
    let got = model::cuda::matmul_t_f32(&h.to_device(gpu)?, &v.to_device(gpu)?)?;
    let want = h
        .to_dtype(DType::F32)?
        .matmul(&v.to_dtype(DType::F32)?.t()?)?;
    let name = format!("matmul_t_f32 [37, 96]·[300, 96]ᵀ bf16 -> {:?}", got.dtype());
    glue_row_tol(rows, &name, &got, &want, 1e-5)?;

    let a = randn(&[37, 160], 204, 1.0, DType::F32, &cpu)?;
    let b = randn(&[37, 160], 205, 1.0, DType::F32, &cpu)?;
    glue_case(
        rows,
        gpu,
        "swiglu [37, 160]",
        &[&a, &b],
        &|t| Ok(ops::swiglu(&t[0], &t[1])?),
        &|t, u| {
            let (da, db) = model::cuda::swiglu_bwd(&t[0], &t[1], u)?;
            Ok(vec![da, db])
        },
    )?;
    let gu = Tensor::cat(&[&a, &b], 1)?;
    let got = ops::swiglu_packed(&gu.to_device(gpu)?)?;
    glue_row(
        rows,
        "swiglu of a packed [37, 2·160]",
        &got,
        &ops::swiglu(&a, &b)?,
    )?;

    let q = randn(&[2, 4, 37, 64], 206, 1.0, DType::F32, &cpu)?;
    let cos = randn(&[2, 1, 37, 64], 207, 1.0, DType::F32, &cpu)?;
    let sin = randn(&[2, 1, 37, 64], 208, 1.0, DType::F32, &cpu)?;
    let (cg, sg) = (cos.to_device(gpu)?, sin.to_device(gpu)?);
    glue_case(
        rows,
        gpu,
        "rope [2, 4, 37, 64]",
        &[&q],
        &|t| {
            let (c, s) = match t[0].device() {
                Device::Cpu => (cos.clone(), sin.clone()),
                _ => (cg.clone(), sg.clone()),
            };
            Ok(ops::rope(&t[0], &c, &s)?)
        },
        &|_, u| Ok(vec![model::cuda::rope_bwd(u, &cg, &sg)?]),
    )?;

    let bias = randn(&[96], 209, 1.0, DType::F32, &cpu)?;
    let got = ops::bias_add(&x.to_device(gpu)?, &bias.to_device(gpu)?)?;
    glue_row(
        rows,
        "bias add [3, 37, 96] + [96]",
        &got,
        &ops::bias_add(&x, &bias)?,
    )?;

    let z = randn(&[5, 300], 210, 1.0, DType::F32, &cpu)?;
    let p = ops::softmax_last_dim(&z.to_device(gpu)?)?;
    glue_row(rows, "softmax [5, 300]", &p, &ops::softmax_last_dim(&z)?)?;
    let u = randn(&[5, 300], 211, 1.0, DType::F32, &cpu)?;
    let got = ops::masked_softmax_backward(&p, &u.to_device(gpu)?, 0.5)?;
    let want = ops::masked_softmax_backward(&ops::softmax_last_dim(&z)?, &u, 0.5)?;
    glue_row(rows, "softmax backward [5, 300]", &got, &want)?;

    // scores [B, Hkv, G, T, S] with a causal mask, batch row 1 left-padded by 3 keys
    let (bb, t, s) = (2, 9, 12);
    let mask = padded_causal_bias(bb, t, s, 3)?;
    let scores = randn(&[bb, 2, 3, t, s], 212, 1.0, DType::F32, &cpu)?;
    let (mg, sg5) = (mask.to_device(gpu)?, scores.to_device(gpu)?);
    let got = ops::masked_softmax(&sg5, &mg, 0.125)?;
    glue_row(
        rows,
        "masked softmax [2, 2, 3, 9, 12]",
        &got,
        &ops::masked_softmax(&scores, &mask, 0.125)?,
    )?;
    let got = ops::attention_probs(&sg5, &mg, 0.125)?;
    let want = ops::attention_probs(&scores, &mask, 0.125)?;
    glue_row(rows, "attention probs [2, 2, 3, 9, 12]", &got, &want)?;
    let dp = randn(&[bb, 2, 3, t, s], 213, 1.0, DType::F32, &cpu)?;
    let (gp, gds) = ops::attention_probs_backward(&sg5, &mg, &dp.to_device(gpu)?, 0.125)?;
    let (wp, wds) = ops::attention_probs_backward(&scores, &mask, &dp, 0.125)?;
    glue_row(
        rows,
        "attention probs backward [2, 2, 3, 9, 12]: p",
        &gp,
        &wp,
    )?;
    glue_row(
        rows,
        "attention probs backward [2, 2, 3, 9, 12]: ds",
        &gds,
        &wds,
    )?;

    let logits = randn(&[24, 5000], 214, 3.0, DType::F32, &cpu)?;
    let targets: Vec<u32> = (0..24u32).map(|i| (i * 977) % 5000).collect();
    let targets = Tensor::new(targets.as_slice(), &cpu)?;
    let (lg, tg) = (logits.to_device(gpu)?, targets.to_device(gpu)?);
    let got = ops::logprob_entropy_stats(&lg, &tg, 0.7)?;
    let want = ops::logprob_entropy_stats(&logits, &targets, 0.7)?;
    glue_row(rows, "log-prob + entropy at T=0.7 [24, 5000]", &got, &want)?;
    let g3 = randn(&[24, 3], 215, 1.0, DType::F32, &cpu)?;
    let got = ops::logprob_entropy_backward(&lg, &tg, &got, &g3.to_device(gpu)?, 0.7, None)?;
    let want = ops::logprob_entropy_backward(&logits, &targets, &want, &g3, 0.7, None)?;
    glue_row(rows, "log-prob + entropy backward [24, 5000]", &got, &want)?;

    let table = randn(&[50, 96], 216, 1.0, DType::F32, &cpu)?;
    let ids: Vec<u32> = (0..40u32).map(|i| (i * 13) % 50).collect();
    let ids = Tensor::new(ids.as_slice(), &cpu)?.reshape((4, 10))?;
    let got = ops::embedding(&table.to_device(gpu)?, &ids.to_device(gpu)?)?;
    glue_row(
        rows,
        "embedding [50, 96] at [4, 10]",
        &got,
        &ops::embedding(&table, &ids)?,
    )?;
    let picked = [1u32, 4, 5, 17, 30, 49];
    let got = ops::select_rows(&table.to_device(gpu)?, &picked)?;
    let want = ops::select_rows(&table, &picked)?;
    glue_row(rows, "row selection of 6 of [50, 96]", &got, &want)?;
    let got = ops::scatter_rows(&want.to_device(gpu)?, &picked, 50)?;
    glue_row(
        rows,
        "row scatter of 6 into [50, 96]",
        &got,
        &ops::scatter_rows(&want, &picked, 50)?,
    )?;

    let got = model::cuda::sum_squares(&[&x.to_device(gpu)?, &table.to_device(gpu)?])?;
    let want = (x.sqr()?.sum_all()?.to_scalar::<f32>()?
        + table.sqr()?.sum_all()?.to_scalar::<f32>()?) as f64;
    let e = ((got - want) / want).abs() as f32;
    rows.push((
        "glue: sum of squares of two tensors".into(),
        format!("{e:.2e}"),
        e < 1e-5,
    ));

    glue_attention(gpu, rows)
}

/// Decode attention over a cache view, and flash attention (bf16) forward and backward, against
/// the composed ops on the CPU in f32.
fn glue_attention(gpu: &Device, rows: &mut Rows) -> Result<()> {
    let cpu = Device::Cpu;
    let composed = |q: &Tensor,
                    k: &Tensor,
                    v: &Tensor,
                    bias: &Tensor,
                    shape: (usize, usize, usize, usize, usize),
                    scale: f64|
     -> Result<Tensor> {
        let (b, hkv, g, t, s) = shape;
        let scores = q.matmul(&k.t()?)?.reshape((b, hkv, g, t, s))?;
        let p = ops::composed::masked_softmax(&scores, bias, scale)?;
        Ok(p.reshape((b, hkv, g * t, s))?.matmul(&v.contiguous()?)?)
    };
    let (b, hkv, g, d, s, cap) = (3, 2, 7, 64, 40, 50);
    let bias: Vec<f32> = (0..b * s)
        .map(|i| if i / s == 1 && i % s < 5 { -1e9 } else { 0.0 })
        .collect();
    let bias = Tensor::from_vec(bias, (b, 1, 1, 1, s), &cpu)?;
    let scale = 1.0 / (d as f64).sqrt();
    let q = randn(&[b, hkv, g, d], 220, 1.0, DType::F32, &cpu)?;
    let kc = randn(&[b, hkv, cap, d], 221, 1.0, DType::F32, &cpu)?;
    let vc = randn(&[b, hkv, cap, d], 222, 1.0, DType::F32, &cpu)?;
    let (kg, vg) = (
        kc.to_device(gpu)?.narrow(2, 0, s)?,
        vc.to_device(gpu)?.narrow(2, 0, s)?,
    );
    let name = "decode attention [3, 2, 7, 64] S=40 of 50";
    match ops::decode_attention(&q.to_device(gpu)?, &kg, &vg, &bias.to_device(gpu)?, scale)? {
        Some(y) => {
            let want = composed(
                &q,
                &kc.narrow(2, 0, s)?,
                &vc.narrow(2, 0, s)?,
                &bias,
                (b, hkv, g, 1, s),
                scale,
            )?;
            glue_row(rows, name, &y, &want.reshape((b, hkv, g, d))?)?;
        }
        None => rows.push((format!("glue: {name}"), "kernel not taken".into(), false)),
    }

    // 70 rows after a 5-slot prompt, causal, batch row 1 left-padded by 3 slots (every row sees
    // a key: the kernel, as the model, takes padding as keys masked for every row)
    let (b, hkv, g, t, s, cap) = (2, 2, 2, 70, 75, 80);
    let bias = padded_causal_bias(b, t, s, 3)?;
    let bf = |x: Tensor| -> Result<Tensor> { Ok(x.to_dtype(DType::BF16)?.to_dtype(DType::F32)?) };
    let q = bf(randn(&[b, hkv, g * t, d], 223, 1.0, DType::F32, &cpu)?)?;
    let kc = bf(randn(&[b, hkv, cap, d], 224, 1.0, DType::F32, &cpu)?)?;
    let vc = bf(randn(&[b, hkv, cap, d], 225, 1.0, DType::F32, &cpu)?)?;
    let on = |x: &Tensor| -> Result<Tensor> { Ok(x.to_dtype(DType::BF16)?.to_device(gpu)?) };
    let (qg, kg, vg, bg) = (
        on(&q)?,
        on(&kc)?.narrow(2, 0, s)?,
        on(&vc)?.narrow(2, 0, s)?,
        bias.to_device(gpu)?,
    );
    let name = "flash attention [2, 2, 2·70, 64] S=75 of 80 BF16";
    let Some((y, lse)) = ops::flash_attention(&qg, &kg, &vg, &bg, scale)? else {
        rows.push((format!("glue: {name}"), "kernel not taken".into(), false));
        return Ok(());
    };
    let shape = (b, hkv, g, t, s);
    let vars = [
        &q,
        &kc.narrow(2, 0, s)?.contiguous()?,
        &vc.narrow(2, 0, s)?.contiguous()?,
    ]
    .map(Var::from_tensor);
    let vars: Vec<Var> = vars.into_iter().collect::<std::result::Result<_, _>>()?;
    let want = composed(
        vars[0].as_tensor(),
        vars[1].as_tensor(),
        vars[2].as_tensor(),
        &bias,
        shape,
        scale,
    )?;
    // the kernel's output and its gradient are token-major, [B, T, Hq·D]
    let want = model::attention::token_major(&want, t)?;
    glue_row_tol(rows, name, &y, &want, 2e-2)?;
    let dy = bf(randn(&[b, t, hkv * g * d], 226, 1.0, DType::F32, &cpu)?)?;
    let grads = (&want * &dy)?.sum_all()?.backward()?;
    let mask = ops::FlashMask::Bias(&bg);
    match ops::flash_attention_backward(&qg, &kg, &vg, mask, &y, &on(&dy)?, &lse, scale)? {
        Some((dq, dk, dv)) => {
            for (what, (got, var)) in ["dq", "dk", "dv"]
                .iter()
                .zip([dq, dk, dv].iter().zip(&vars))
            {
                let want = grads.get(var.as_tensor()).ok_or("no reference gradient")?;
                glue_row_tol(rows, &format!("{name} {what}"), got, want, 3e-2)?;
            }
        }
        None => rows.push((
            format!("glue: {name} backward"),
            "kernel not taken".into(),
            false,
        )),
    }
    Ok(())
}

/// A backward launcher under test: the device inputs and the upstream gradient → the inputs'
/// gradients.
type BackwardLauncher<'a> = dyn Fn(&[Tensor], &Tensor) -> Result<Vec<Tensor>> + 'a;

/// One op on `gpu` against the CPU: its forward (`op`, on the inputs moved to `gpu`) and its
/// backward launcher (`grads`, given the device inputs and the upstream gradient) against
/// autograd through `op` on the CPU.
fn glue_case(
    rows: &mut Rows,
    gpu: &Device,
    name: &str,
    inputs: &[&Tensor],
    op: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    grads: &BackwardLauncher<'_>,
) -> Result<()> {
    let on_gpu: Vec<Tensor> = inputs
        .iter()
        .map(|x| x.to_device(gpu))
        .collect::<std::result::Result<_, _>>()?;
    let y = op(&on_gpu)?;
    let inputs: Vec<Tensor> = inputs.iter().map(|&x| x.clone()).collect();
    const UPSTREAM_SEED: u64 = 7;
    let (want, want_grads) =
        value_and_grads(&inputs, &vec![true; inputs.len()], op, UPSTREAM_SEED)?;
    glue_row(rows, &format!("{name} forward"), &y, &want)?;
    // the upstream gradient value_and_grads drew
    let u = randn(y.dims(), UPSTREAM_SEED, 1.0, DType::F32, gpu)?;
    for (i, (got, want)) in grads(&on_gpu, &u)?.iter().zip(&want_grads).enumerate() {
        let want = want.as_ref().ok_or("no reference gradient")?;
        glue_row(rows, &format!("{name} grad {i}"), got, want)?;
    }
    Ok(())
}

/// A glue row: `got` (on any device) against `want` (on the CPU), relative to `want`'s largest
/// magnitude, within f32 rounding.
fn glue_row(rows: &mut Rows, name: &str, got: &Tensor, want: &Tensor) -> Result<()> {
    glue_row_tol(rows, name, got, want, 1e-4)
}

fn glue_row_tol(rows: &mut Rows, name: &str, got: &Tensor, want: &Tensor, tol: f32) -> Result<()> {
    let f = |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?) };
    let (got, want) = (f(got)?, f(want)?);
    if got.dims() != want.dims() {
        rows.push((
            format!("glue: {name}"),
            format!("shape {:?}, not {:?}", got.dims(), want.dims()),
            false,
        ));
        return Ok(());
    }
    let e = rel(&got, &want)?;
    rows.push((format!("glue: {name}"), format!("{e:.2e}"), e < tol));
    Ok(())
}
