//! Batched generation with a preallocated KV cache.
//!
//! Prompts of unequal length are left-padded into one batch; every sequence keeps its own
//! rotary positions and key mask, so a padded batch generates what each prompt would alone.
//! Each sequence draws from its own RNG stream (`seed`, index), so a completion does not
//! depend on which other prompts share its batch.

use candle_core::{DType, Tensor};

use crate::error::{ModelError, Result};
use crate::forward::{hidden_states, positions_of, Batch};
use crate::kv_cache::KvCache;
use crate::rng::Rng;
use crate::sampling::{draw, SamplingParams};
use crate::tokenizer::Tokenizer;
use crate::weights::Weights;

#[derive(Debug, Clone)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops after emitting one of these (the token is kept in the completion).
    pub stop_token_ids: Vec<u32>,
    /// Generation stops once the decoded completion contains one of these; the text is cut
    /// before it, the tokens are kept up to the one that completed it. Needs a tokenizer.
    pub stop_strings: Vec<String>,
    pub seed: u64,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_new_tokens: 64,
            sampling: SamplingParams::default(),
            stop_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            seed: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_new_tokens` reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub tokens: Vec<u32>,
    /// Log-prob of each token under the distribution it was sampled from.
    pub logprobs: Vec<f32>,
    /// Entropy of the full next-token distribution (at the sampling temperature) at each step.
    pub entropies: Vec<f32>,
    pub finish: FinishReason,
    /// Decoded text without special tokens, cut before a stop string (with a tokenizer).
    pub text: Option<String>,
}

/// Generates one completion per prompt, all prompts in one batch (continuous batching with a
/// slot for every prompt: the batch shrinks as its sequences finish). `w` should be detached
/// (see [`Weights::detach`]).
pub fn generate(
    w: &Weights,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    tokenizer: Option<&Tokenizer>,
) -> Result<Vec<Completion>> {
    let mut out: Vec<Option<Completion>> = vec![None; prompts.len()];
    generate_continuous(w, prompts, cfg, tokenizer, prompts.len(), |i, c| {
        out[i] = Some(c);
        Ok(())
    })?;
    Ok(out.into_iter().flatten().collect())
}

/// A sequence decoding in one slot of the batch.
struct Row {
    prompt: usize,
    /// First cache slot of the sequence (earlier slots belong to padding or to the sequence
    /// that had the slot before).
    start: usize,
    rng: Rng,
    /// Decoded greedily ([`Prompt::greedy`]).
    greedy: bool,
    completion: Completion,
}

/// [`generate_continuous_streams`] with prompt `i` drawing from the stream `(cfg.seed, i)`.
pub fn generate_continuous<F>(
    w: &Weights,
    prompts: &[Vec<u32>],
    cfg: &GenerationConfig,
    tokenizer: Option<&Tokenizer>,
    slots: usize,
    on_done: F,
) -> Result<Decoded>
where
    F: FnMut(usize, Completion) -> Result<()>,
{
    let streams: Vec<(u64, u64)> = (0..prompts.len() as u64).map(|i| (cfg.seed, i)).collect();
    generate_continuous_streams(w, prompts, &streams, cfg, tokenizer, slots, on_done)
}

/// Continuous batching over a fixed list of prompts: at most `slots` sequences decode together.
/// When one finishes, `on_done(prompt index, completion)` receives it and the next waiting
/// prompt is prefilled into its slot, so the batch stays full until the prompts run out; then
/// it shrinks. Prompt `i` draws from the stream `streams[i]` (a seed and an index; `cfg.seed`
/// is not read) whatever its slot or neighbours, so the completions are those of [`generate`]
/// for any `slots`, and several groups' prompts batched together sample what each group
/// samples alone (up to the float rounding of differently shaped matmuls).
pub fn generate_continuous_streams<F>(
    w: &Weights,
    prompts: &[Vec<u32>],
    streams: &[(u64, u64)],
    cfg: &GenerationConfig,
    tokenizer: Option<&Tokenizer>,
    slots: usize,
    on_done: F,
) -> Result<Decoded>
where
    F: FnMut(usize, Completion) -> Result<()>,
{
    if streams.len() != prompts.len() {
        return Err(ModelError::Generation(format!(
            "{} sampling streams for {} prompts",
            streams.len(),
            prompts.len()
        )));
    }
    let prompts = prompts.iter().zip(streams).map(|(ids, &stream)| Prompt {
        ids: ids.clone(),
        stream,
        greedy: false,
    });
    generate_prompts(w, prompts.collect(), cfg, tokenizer, slots, on_done)
}

/// [`generate_continuous_streams`] of prompts that may be decoded greedily ([`Prompt::greedy`]).
pub fn generate_prompts<F>(
    w: &Weights,
    prompts: Vec<Prompt>,
    cfg: &GenerationConfig,
    tokenizer: Option<&Tokenizer>,
    slots: usize,
    on_done: F,
) -> Result<Decoded>
where
    F: FnMut(usize, Completion) -> Result<()>,
{
    if prompts.is_empty() {
        return Ok(Decoded::default());
    }
    let room = Room {
        slots: slots.clamp(1, prompts.len()),
        longest: prompts.iter().map(|p| p.ids.len()).max().unwrap_or(0),
        refills: slots < prompts.len(),
        refill_rows: 1,
    };
    let mut waiting = prompts.into_iter();
    generate_stream(w, cfg, tokenizer, room, || waiting.next(), on_done)
}

/// A prompt for [`generate_stream`] and the sampling stream it draws from (a seed and an
/// index).
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    pub ids: Vec<u32>,
    pub stream: (u64, u64),
    /// Decoded greedily whatever `cfg.sampling` says, drawing nothing from its stream (ReMax's
    /// baseline row beside its group's sampled rows, in the same batch).
    pub greedy: bool,
}

/// What a generation decoded: its decode steps and the rows they decoded (the prefills not
/// counted). `rows / steps` is how full its batches ran.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Decoded {
    pub steps: usize,
    pub rows: usize,
}

impl std::ops::AddAssign for Decoded {
    fn add_assign(&mut self, other: Decoded) {
        self.steps += other.steps;
        self.rows += other.rows;
    }
}

/// How [`generate_stream`] sizes its batch and KV cache.
#[derive(Debug, Clone, Copy)]
pub struct Room {
    /// The most sequences that decode together.
    pub slots: usize,
    /// The longest prompt expected (a longer one grows the cache when it comes).
    pub longest: usize,
    /// Whether prompts may come after the first `slots`: the cache then holds twice a
    /// sequence's span, so that refilled rows can run past the first ones before it is
    /// compacted.
    pub refills: bool,
    /// Free slots are refilled once at least this many are free, this many at a time (a
    /// rollout group's rows: one prefill of their shared prompt where the rows would each have
    /// had their own, each a forward's worth of launches on a GPU). 1: as soon as one is free.
    pub refill_rows: usize,
}

/// Continuous batching over prompts that `next_prompt` hands out as slots free up: the first
/// `room.slots` are prefilled together; when a sequence finishes, `on_done(i, completion)`
/// receives it (`i` counts the prompts in the order they were handed out) and the next prompt
/// is prefilled into its slot. Once `next_prompt` returns `None` it is not asked again, and the
/// batch shrinks as its sequences finish. Each prompt draws from its own stream whatever its
/// slot or neighbours.
///
/// Cache layout: every row is left-aligned to the shared length `L`; a row's sequence fills
/// `[start, L)`. A new prompt's prefill is written to end at `L` (a prompt longer than `L`
/// first moves the rows up), and when the cache is full the rows are moved down to the shortest
/// common length (once every `longest prompt + max_new_tokens` steps at most).
pub fn generate_stream<P, F>(
    w: &Weights,
    cfg: &GenerationConfig,
    tokenizer: Option<&Tokenizer>,
    room: Room,
    mut next_prompt: P,
    mut on_done: F,
) -> Result<Decoded>
where
    P: FnMut() -> Option<Prompt>,
    F: FnMut(usize, Completion) -> Result<()>,
{
    if !cfg.stop_strings.is_empty() && tokenizer.is_none() {
        return Err(ModelError::Generation(
            "stop strings need a tokenizer".into(),
        ));
    }
    let vocab = w.config.vocab_size as u32;
    let check = |p: &Prompt| {
        if p.ids.is_empty() {
            return Err(ModelError::Generation("empty prompt".into()));
        }
        match p.ids.iter().find(|&&id| id >= vocab) {
            Some(bad) => Err(ModelError::Generation(format!(
                "prompt token {bad} ≥ vocab size {vocab}"
            ))),
            None => Ok(()),
        }
    };
    // up to `n` prompts, checked; fewer once `next_prompt` runs out
    let mut exhausted = false;
    let mut pull = |n: usize| -> Result<Vec<Prompt>> {
        let mut out = Vec::new();
        while out.len() < n && !exhausted {
            match next_prompt() {
                Some(p) => {
                    check(&p)?;
                    out.push(p);
                }
                None => exhausted = true,
            }
        }
        Ok(out)
    };
    let empty = || Completion {
        tokens: Vec::new(),
        logprobs: Vec::new(),
        entropies: Vec::new(),
        finish: FinishReason::Length,
        text: None,
    };
    if cfg.max_new_tokens == 0 {
        let mut i = 0;
        while !pull(1)?.is_empty() {
            on_done(i, finished(empty(), cfg, tokenizer)?)?;
            i += 1;
        }
        return Ok(Decoded::default());
    }
    let first = pull(room.slots.max(1))?;
    if first.is_empty() {
        return Ok(Decoded::default());
    }
    let device = w.embed_tokens.device().clone();
    let mut longest = first
        .iter()
        .map(|p| p.ids.len())
        .fold(room.longest, usize::max);
    // Refilled slots need room to run past the first sequences: twice the span, compacted
    // when full.
    let capacity = |longest: usize| {
        let span = longest + cfg.max_new_tokens;
        if room.refills {
            2 * span
        } else {
            span
        }
    };

    // Prompt `i`'s row, its prefill ending at cache slot `end`.
    let admit = |i: usize, p: &Prompt, end: usize| Row {
        prompt: i,
        start: end - p.ids.len(),
        rng: Rng::stream(p.stream.0, p.stream.1),
        greedy: p.greedy,
        completion: empty(),
    };
    let ids: Vec<&[u32]> = first.iter().map(|p| p.ids.as_slice()).collect();
    let (mut logits, mut cache) = prefill(w, &ids, longest, capacity(longest))?;
    let mut rows: Vec<Option<Row>> = first
        .iter()
        .enumerate()
        .map(|(i, p)| Some(admit(i, p, longest)))
        .collect();
    let mut next = first.len();
    let mut decoded = Decoded::default();
    // The rows that `logits` holds, in order.
    let mut fresh: Vec<usize> = (0..rows.len()).collect();
    loop {
        // `fresh` is sorted: the streams of its rows, in its order, and which are greedy
        let (mut rngs, greedy): (Vec<Option<&mut Rng>>, Vec<bool>) = rows
            .iter_mut()
            .enumerate()
            .filter(|(r, _)| fresh.binary_search(r).is_ok())
            .map(|(_, row)| match row {
                Some(row) => (Some(&mut row.rng), row.greedy),
                None => (None, false),
            })
            .unzip();
        let drawn = sample_mixed(&logits, &cfg.sampling, &mut rngs, &greedy)?;
        for (&r, (token, logprob, entropy)) in fresh.iter().zip(drawn) {
            let Some(row) = rows[r].as_mut() else {
                continue;
            };
            let c = &mut row.completion;
            c.tokens.push(token);
            c.logprobs.push(logprob);
            c.entropies.push(entropy);
            if stops(c, cfg, tokenizer)? {
                c.finish = FinishReason::Stop;
            } else if c.tokens.len() < cfg.max_new_tokens {
                continue;
            }
            let row = rows[r].take().expect("live row");
            on_done(row.prompt, finished(row.completion, cfg, tokenizer)?)?;
        }

        // Refill free slots from the waiting prompts, `refill_rows` at a time; their first
        // tokens are drawn next.
        let free: Vec<usize> = (0..rows.len()).filter(|&r| rows[r].is_none()).collect();
        let step = room.refill_rows.clamp(1, rows.len());
        let new = if free.len() < step {
            Vec::new()
        } else {
            pull(free.len() / step * step)?
        };
        if !new.is_empty() {
            let free = &free[..new.len()];
            let width = new.iter().map(|p| p.ids.len()).max().unwrap_or(0);
            if width > longest {
                longest = width;
                cache.reserve(capacity(longest))?;
            }
            if width > cache.len() {
                // the rows move up to end at `width`: room for the prompts' prefill
                realign(&mut cache, &mut rows, width)?;
            }
            let ids: Vec<&[u32]> = new.iter().map(|p| p.ids.as_slice()).collect();
            let fill;
            (logits, fill) = prefill(w, &ids, width, width)?;
            cache.write_rows(&fill, free)?;
            for (&r, p) in free.iter().zip(&new) {
                rows[r] = Some(admit(next, p, cache.len()));
                next += 1;
            }
            fresh = free.to_vec();
            continue;
        }
        let live: Vec<usize> = (0..rows.len()).filter(|&r| rows[r].is_some()).collect();
        if live.is_empty() {
            return Ok(decoded);
        }
        // No prompt waits: drop the finished slots once they are half the batch.
        if 2 * live.len() <= rows.len() {
            cache.select_rows(&live)?;
            rows = live.iter().map(|&r| rows[r].take()).collect();
        }
        if cache.len() == cache.capacity() {
            compact(&mut cache, &mut rows, longest)?;
        }

        // Decode one token for every row (free rows feed a dummy token that is never read).
        let l = cache.len();
        let (ids, starts): (Vec<u32>, Vec<usize>) = rows
            .iter()
            .map(|row| {
                row.as_ref().map_or((0, l), |row| {
                    (*row.completion.tokens.last().expect("sampled"), row.start)
                })
            })
            .unzip();
        let batch = Batch::decode(&ids, &starts, l, &device)?;
        logits = last_logits(w, &batch, &mut cache)?;
        fresh = (0..rows.len()).collect();
        decoded += Decoded {
            steps: 1,
            rows: live.len(),
        };
    }
}

/// Prefills `prompts`, left-padded to `width`, into a new cache of `capacity` slots a row: the
/// last logits `[k, V]` and the cache. Identical prompts (a GRPO group's) are prefilled once and
/// their rows copied.
fn prefill(
    w: &Weights,
    prompts: &[&[u32]],
    width: usize,
    capacity: usize,
) -> Result<(Tensor, KvCache)> {
    let device = w.embed_tokens.device();
    let mut distinct: Vec<&[u32]> = Vec::new();
    let copy_of: Vec<usize> = prompts
        .iter()
        .map(|p| {
            distinct.iter().position(|d| d == p).unwrap_or_else(|| {
                distinct.push(p);
                distinct.len() - 1
            })
        })
        .collect();
    if distinct.len() < prompts.len() {
        let (logits, mut cache) = prefill(w, &distinct, width, capacity)?; // [P, V]
        cache.select_rows(&copy_of)?;
        let copy_of: Vec<u32> = copy_of.iter().map(|&i| i as u32).collect();
        let copy_of = Tensor::from_vec(copy_of, prompts.len(), device)?;
        return Ok((logits.index_select(&copy_of, 0)?, cache)); // [k, V]
    }
    let mut ids = Vec::with_capacity(prompts.len());
    let mut positions = Vec::with_capacity(prompts.len());
    let mut key_valid = Vec::with_capacity(prompts.len());
    for p in prompts {
        let pad = width - p.len();
        let valid: Vec<bool> = (0..width).map(|j| j >= pad).collect();
        positions.push(positions_of(&valid, 0));
        ids.push(
            std::iter::repeat_n(0, pad)
                .chain(p.iter().copied())
                .collect::<Vec<u32>>(),
        );
        key_valid.push(valid);
    }
    let batch = Batch::from_parts(&ids, &positions, &key_valid, 0, width, device)?;
    let dtype = w.embed_tokens.dtype();
    let mut cache = KvCache::new(&w.config, prompts.len(), capacity, dtype, device)?;
    let logits = last_logits(w, &batch, &mut cache)?;
    Ok((logits, cache))
}

/// Moves every row's sequence down so that the longest ends at the shortest length that still
/// holds it (and any prompt): room for the next decode steps without a larger buffer.
fn compact(cache: &mut KvCache, rows: &mut [Option<Row>], longest: usize) -> Result<()> {
    let l = cache.len();
    let new_len = rows
        .iter()
        .flatten()
        .map(|row| l - row.start)
        .max()
        .unwrap_or(0)
        .max(longest);
    realign(cache, rows, new_len)
}

/// Moves every row's sequence to end at slot `len`, the cache's new length (down to compact
/// it, up to make room for a longer prompt).
fn realign(cache: &mut KvCache, rows: &mut [Option<Row>], len: usize) -> Result<()> {
    let l = cache.len();
    for (r, row) in rows.iter_mut().enumerate() {
        if let Some(row) = row {
            let n = l - row.start;
            cache.move_slots(r, row.start, len - n, n)?;
            row.start = len - n;
        }
    }
    cache.set_len(len)
}

/// Whether the last token ended the completion: a stop id, or a stop string in the text.
fn stops(c: &Completion, cfg: &GenerationConfig, tokenizer: Option<&Tokenizer>) -> Result<bool> {
    let token = *c.tokens.last().expect("a token");
    if cfg.stop_token_ids.contains(&token) {
        return Ok(true);
    }
    if cfg.stop_strings.is_empty() {
        return Ok(false);
    }
    completes_a_stop_string(&c.tokens, &cfg.stop_strings, tokenizer.expect("checked"))
}

/// Whether the text of `tokens` holds one of `stop_strings`, given that the text of all but the
/// last token did not (generation checks after every token): what decoding all of `tokens`
/// would say, from the text of a tail of them long enough to hold any occurrence the last token
/// completes (the longest stop string and the last token's text, with a margin for the tail's
/// first characters: a partial UTF-8 sequence, a stripped leading space). A hit in the tail is
/// confirmed on the whole text. Decoding the whole completion at every token instead costs
/// O(n²) tokens a row: 134M token decodes for 256 rows of 1,024 tokens.
pub fn completes_a_stop_string(
    tokens: &[u32],
    stop_strings: &[String],
    tokenizer: &Tokenizer,
) -> Result<bool> {
    let Some(&last) = tokens.last() else {
        return Ok(stop_strings.iter().any(String::is_empty));
    };
    let hit = |text: &str| stop_strings.iter().any(|s| text.contains(s.as_str()));
    let longest = stop_strings.iter().map(String::len).max().unwrap_or(0);
    let need = longest + tokenizer.decode(&[last], true)?.len() + 8; // bytes of tail text
    let n = tokens.len();
    let mut w = (longest + 8).min(n);
    let tail = loop {
        let text = tokenizer.decode(&tokens[n - w..], true)?;
        if w == n || text.len() >= need {
            break text;
        }
        w = (2 * w).min(n);
    };
    if !hit(&tail) {
        return Ok(false);
    }
    Ok(w == n || hit(&tokenizer.decode(tokens, true)?))
}

/// Adds the decoded text (cut before the first stop string) when there is a tokenizer.
fn finished(
    mut c: Completion,
    cfg: &GenerationConfig,
    tokenizer: Option<&Tokenizer>,
) -> Result<Completion> {
    if let Some(tok) = tokenizer {
        let mut text = tok.decode(&c.tokens, true)?;
        if let Some(cut) = cfg
            .stop_strings
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            text.truncate(cut);
        }
        c.text = Some(text);
    }
    Ok(c)
}

/// Runs the forward with the cache and returns each row's last-position logits `[B, V]` in the
/// weights' dtype or f32 ([`crate::head::logits`]), on the model's device (the output layer runs
/// on the last position only).
fn last_logits(w: &Weights, batch: &Batch, cache: &mut KvCache) -> Result<Tensor> {
    let hidden = hidden_states(w, batch, Some(cache))?; // [B, T, H]
    let t = hidden.dim(1)?;
    let last = hidden.narrow(1, t - 1, 1)?; // [B, 1, H]
    crate::head::logits(&last.squeeze(1)?, w.output_weight()) // [B, V]
}

/// [`sample_rows`] where the `greedy` rows (ReMax's baseline rows) are decoded greedily: their
/// logits go through it apart, under greedy settings, and draw nothing from their streams.
fn sample_mixed(
    logits: &Tensor,
    p: &SamplingParams,
    rngs: &mut [Option<&mut Rng>],
    greedy: &[bool],
) -> Result<Vec<(u32, f32, f32)>> {
    if p.is_greedy() || !greedy.contains(&true) {
        return sample_rows(logits, p, rngs);
    }
    let mut out = vec![(0, 0.0, 0.0); greedy.len()];
    let mut part = |rows: Vec<usize>, p: &SamplingParams, rngs: &mut [Option<&mut Rng>]| {
        if rows.is_empty() {
            return Ok(());
        }
        let at: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let at = Tensor::new(at.as_slice(), logits.device())?;
        let drawn = sample_rows(&logits.index_select(&at, 0)?, p, rngs)?;
        for (r, d) in rows.into_iter().zip(drawn) {
            out[r] = d;
        }
        Ok::<(), ModelError>(())
    };
    let (mut g_rngs, mut s_rngs): (Vec<_>, Vec<_>) = (Vec::new(), Vec::new());
    let (mut g_rows, mut s_rows) = (Vec::new(), Vec::new());
    for (r, (rng, &g)) in rngs.iter_mut().zip(greedy).enumerate() {
        match g {
            true => (g_rows.push(r), g_rngs.push(rng.as_deref_mut())),
            false => (s_rows.push(r), s_rngs.push(rng.as_deref_mut())),
        };
    }
    part(s_rows, p, &mut s_rngs)?;
    part(g_rows, &SamplingParams::greedy(), &mut g_rngs)?;
    Ok(out)
}

/// `(token, log-prob, entropy)` for every row of `logits [B, V]` (rows without a stream get a
/// placeholder and draw nothing), as [`draw`] defines them. On a CUDA device with the kernels on
/// the rows are sampled there and only the results cross to the host; otherwise the logits come
/// to the host. Both
/// consume one uniform per row and step from the row's stream (none when greedy) and pick the
/// same token for it, up to f32 rounding at the boundaries.
fn sample_rows(
    logits: &Tensor,
    p: &SamplingParams,
    rngs: &mut [Option<&mut Rng>],
) -> Result<Vec<(u32, f32, f32)>> {
    let u: Vec<f64> = rngs
        .iter_mut()
        .map(|rng| match rng {
            Some(rng) if !p.is_greedy() => rng.uniform(),
            _ => 0.0,
        })
        .collect();
    #[cfg(feature = "cuda")]
    if logits.device().is_cuda() && crate::ops::cuda_kernels() {
        let u: Vec<f32> = u.iter().map(|&u| u as f32).collect();
        // the kernel reads f32, bf16 or f16 logits as they are; others are widened first
        let logits = match crate::ops::kernel_dtype(logits.dtype()) {
            true => logits.clone(),
            false => logits.to_dtype(DType::F32)?,
        };
        return Ok(crate::cuda::sample_rows(&logits, &u, p)?);
    }
    let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    Ok(rows
        .iter()
        .zip(&u)
        .zip(rngs.iter())
        .map(|((row, &u), rng)| {
            if rng.is_none() {
                return (0, 0.0, 0.0);
            }
            let (token, logprob, entropy) = draw(row, u, p);
            (token as u32, logprob as f32, entropy as f32)
        })
        .collect())
}
