//! One policy-gradient optimizer step over a batch of completions: micro-batches by a token
//! budget, the GRPO-family loss with the step's denominators, gradient accumulation, AdamW.

use std::ops::Range;
use std::time::Instant;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use candle_core::{Device, Tensor};
use model::forward::{PackedRows, Segment, SharedPrompts};
use model::logprobs::{
    packed_logprobs, sequence_logprobs, shared_prompt_logprobs, unpack_rows, SequenceLogprobs,
};
use model::Weights;

use crate::covariance;
use crate::error::{LearnerError, Result};
use crate::fit::{fitted, padded_tokens};
use crate::grpo::{policy_loss, PolicyInputs, PolicyLossConfig, PolicyStats, StepTotals};
use crate::optim::AdamW;
use crate::ppo::{value_loss, ValueHead, ValueStats};

/// One completion to learn from.
#[derive(Debug, Clone, PartialEq)]
pub struct Sequence {
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
    /// Log-prob of each completion token under the old policy: the one that sampled it, or, with
    /// a behaviour correction ([`crate::correction`]), the learner's at the start of the step.
    pub behavior_logprobs: Vec<f32>,
    /// One advantage per completion token.
    pub advantages: Vec<f32>,
    /// Where KL and entropy count (Lopti's active group); None: every completion token.
    pub active: Option<Vec<bool>>,
    /// PPO: the value targets and the values at rollout, one per completion token.
    pub values: Option<ValueTargets>,
    /// Left out of the policy loss (TRL's `mask_truncated_completions`: a completion cut at the
    /// length limit): its tokens carry no policy-gradient, KL or entropy term and leave the
    /// statistics and BNPO's per-micro-batch denominator, but still count in the step's
    /// sequences and tokens (the GRPO, DAPO and Dr. GRPO denominators), as in TRL, where the
    /// mask is applied after `num_items_in_batch` is taken. A value loss keeps them.
    pub masked: bool,
    /// One detached importance weight per completion token that multiplies its policy term
    /// ([`crate::correction`]: `π_prox / π_behav`, truncated or masked); None: 1.
    pub importance_weights: Option<Vec<f32>>,
    /// The sampler's log-probs where a behaviour correction replaced `behavior_logprobs` with
    /// the learner's (off-policy sequence masking compares with them); None: those are the
    /// sampler's.
    pub sampler_logprobs: Option<Vec<f32>>,
    /// The completion tokens Clip-Cov or KL-Cov picked in this optimizer step
    /// ([`crate::covariance::select`], which [`update`] runs); None: none.
    pub covariance_selected: Option<Vec<bool>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ValueTargets {
    pub returns: Vec<f32>,
    pub old_values: Vec<f32>,
}

impl Sequence {
    /// A sequence whose every token carries the same advantage.
    pub fn new(
        prompt: Vec<u32>,
        completion: Vec<u32>,
        behavior_logprobs: Vec<f32>,
        advantage: f32,
    ) -> Self {
        let n = completion.len();
        Sequence {
            prompt,
            completion,
            behavior_logprobs,
            advantages: vec![advantage; n],
            active: None,
            values: None,
            masked: false,
            importance_weights: None,
            sampler_logprobs: None,
            covariance_selected: None,
        }
    }
}

/// PPO's critic loss inside the policy step (a value head on the policy trunk).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ValueLossConfig {
    pub vf_coef: f64,
    pub clip: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StepConfig {
    pub loss: PolicyLossConfig,
    /// Padded tokens (rows × longest row) per micro-batch.
    pub micro_batch_tokens: usize,
    /// The sampling temperature: log-probs are computed at it, as the behaviour log-probs were.
    pub temperature: f64,
    /// Dr. GRPO's `L_max`.
    pub max_completion_length: usize,
    /// The value loss of a shared value head (None: no critic in this step).
    pub value: Option<ValueLossConfig>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct StepMetrics {
    pub loss: f64,
    pub policy: PolicyStats,
    pub value: ValueStats,
    pub value_loss: f64,
    pub grad_norm: f64,
    /// Optimizer steps taken (several with mini-batches, epochs or Lopti).
    pub optimizer_steps: usize,
    pub skipped: bool,
    pub micro_batches: usize,
    /// Times the step ran again after running out of device memory ([`crate::fit`]).
    pub memory_retries: usize,
    pub tokens: usize,
    pub seconds: f64,
}

/// Splits sequences into micro-batches that hold at most `budget` tokens ([`tokens_of`]: packed,
/// or padded rows; a sequence longer than the budget gets a micro-batch of its own).
pub fn micro_batches(seqs: &[Sequence], budget: usize) -> Vec<Range<usize>> {
    crate::fit::by_cost(&tokens_of(seqs), 0..seqs.len(), budget)
}

/// The tokens a micro-batch of `seqs[range]` holds on the device: [`packed_tokens`] when rows
/// are packed ([`set_pack_rows`]), its rows padded to the longest otherwise.
pub fn tokens_of(seqs: &[Sequence]) -> impl Fn(Range<usize>) -> usize {
    let (lengths, packed) = (
        row_lengths(seqs),
        packing_rows().then(|| PackedCost::new(seqs)),
    );
    move |r| match &packed {
        Some(cost) => cost.tokens(r),
        None => padded_tokens(&lengths, 1, r),
    }
}

/// Each sequence's row length: prompt and completion tokens.
pub(crate) fn row_lengths(seqs: &[Sequence]) -> Vec<usize> {
    seqs.iter()
        .map(|s| s.prompt.len() + s.completion.len())
        .collect()
}

static SHARE_PROMPTS: AtomicBool = AtomicBool::new(true);

/// Whether micro-batches run each distinct prompt through the trunk once for all the rows that
/// continue it (on by default; see [`model::forward::SharedPrompts`]). Off, every row runs its
/// prompt again. Both give the same log-probs and gradients up to float rounding.
pub fn set_share_prompts(on: bool) {
    SHARE_PROMPTS.store(on, Ordering::Relaxed);
}

static PACK_ROWS: AtomicBool = AtomicBool::new(true);

/// Whether a micro-batch lays its sequences end to end in one row with no padding (on by
/// default; see [`model::forward::PackedRows`]): a prompt that several of its sequences continue
/// runs once, before them, and each sequence attends to that prompt and to itself only. Off, its
/// rows are padded to the longest (sharing prompts as [`set_share_prompts`] says). Both give the
/// same numbers up to float rounding.
pub fn set_pack_rows(on: bool) {
    PACK_ROWS.store(on, Ordering::Relaxed);
}

/// Whether micro-batches pack their rows ([`set_pack_rows`]).
pub fn packing_rows() -> bool {
    PACK_ROWS.load(Ordering::Relaxed)
}

static ORDER_BY_LENGTH: AtomicBool = AtomicBool::new(true);
static ORDERED: AtomicUsize = AtomicUsize::new(0);

/// Whether a step may take its sequences shortest first when that pads fewer tokens (on by
/// default; see [`by_length`]). Off, its micro-batches take them in the order they come. Either
/// way gives the same numbers up to float rounding (BNPO's per-micro-batch denominators aside).
pub fn set_order_by_length(on: bool) {
    ORDER_BY_LENGTH.store(on, Ordering::Relaxed);
}

/// Whether steps may take their sequences by length ([`set_order_by_length`]).
pub fn ordering_by_length() -> bool {
    ORDER_BY_LENGTH.load(Ordering::Relaxed)
}

/// How many steps (and no-grad passes) of this process took their sequences by length.
pub fn ordered_by_length() -> usize {
    ORDERED.load(Ordering::Relaxed)
}

/// The token positions a micro-batch's forward runs, padding included, as [`pack`] lays it out:
/// packed ([`packed_tokens`]); or padded, each distinct prompt once (less its last token) and
/// each row's last prompt token and completion when the rows share prompts, every row whole
/// otherwise.
pub fn forward_positions(seqs: &[Sequence]) -> usize {
    if packing_rows() {
        return packed_tokens(seqs);
    }
    match distinct_prompts(seqs) {
        Some((prompts, _)) => {
            let prompt = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
            let row = seqs.iter().map(|s| 1 + s.completion.len()).max();
            prompts.len() * prompt + seqs.len() * row.unwrap_or(0)
        }
        None => crate::fit::padded_tokens(&row_lengths(seqs), 1, 0..seqs.len()),
    }
}

/// The positions the forwards of `seqs` run in micro-batches of `budget` padded tokens, in the
/// order given.
pub fn step_positions(seqs: &[Sequence], budget: usize) -> usize {
    micro_batches(seqs, budget)
        .into_iter()
        .map(|r| forward_positions(&seqs[r]))
        .sum()
}

/// The order in which a step's micro-batches of `budget` padded tokens take `seqs`: shortest
/// first (ties as they come), by completion or by whole row, where that runs fewer positions
/// ([`step_positions`]) than the order they come in; None to keep that order. RL completions of
/// one prompt end at very different lengths, so micro-batches of a group's rows, as they come,
/// pad most rows to the group's longest; by length, rows of like lengths share micro-batches, at
/// the cost of running a prompt in each micro-batch its rows land in. The cost of each order is
/// counted, and the cheapest taken.
pub fn by_length(seqs: &[Sequence], budget: usize) -> Option<Vec<usize>> {
    let rows = row_lengths(seqs);
    let keys: [&dyn Fn(usize) -> usize; 2] = [&|i| seqs[i].completion.len(), &|i| rows[i]];
    cheapest_order(seqs.len(), &keys, |order| match order {
        Some(order) => step_positions(&reordered(seqs, order), budget),
        None => step_positions(seqs, budget),
    })
}

/// Of `n` items in the order they come and sorted by each of `keys` (stable: ties as they
/// come), the order whose micro-batches run the fewest positions (`positions(None)` for the
/// order they come in, `positions(Some(order))` for another); None when that is the order they
/// come in, or when ordering by length is off ([`set_order_by_length`]).
pub(crate) fn cheapest_order(
    n: usize,
    keys: &[&dyn Fn(usize) -> usize],
    positions: impl Fn(Option<&[usize]>) -> usize,
) -> Option<Vec<usize>> {
    if !ORDER_BY_LENGTH.load(Ordering::Relaxed) {
        return None;
    }
    let mut best: Option<(usize, Vec<usize>)> = None;
    let given = positions(None);
    for key in keys {
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| key(i));
        let cost = positions(Some(&order));
        if cost < best.as_ref().map_or(given, |b| b.0) {
            best = Some((cost, order));
        }
    }
    best.map(|(_, order)| {
        ORDERED.fetch_add(1, Ordering::Relaxed);
        order
    })
}

/// Items that came in order `order` put back in the order they came: item `k` goes to
/// `order[k]`.
pub(crate) fn in_given_order<T: Default>(items: Vec<T>, order: &[usize]) -> Vec<T> {
    let mut given: Vec<T> = std::iter::repeat_with(T::default)
        .take(items.len())
        .collect();
    for (item, &i) in items.into_iter().zip(order) {
        given[i] = item;
    }
    given
}

/// `items[order[0]], items[order[1]], …`
pub fn reordered<T: Clone>(items: &[T], order: &[usize]) -> Vec<T> {
    order.iter().map(|&i| items[i].clone()).collect()
}

/// `seqs` in the order its micro-batches of `budget` padded tokens take them ([`by_length`]),
/// and that order (None: as they come).
pub(crate) fn step_order(
    seqs: &[Sequence],
    budget: usize,
) -> (std::borrow::Cow<'_, [Sequence]>, Option<Vec<usize>>) {
    match by_length(seqs, budget) {
        Some(order) => (reordered(seqs, &order).into(), Some(order)),
        None => (seqs.into(), None),
    }
}

/// The inputs of a micro-batch, its rows `[B, T]` and `[B, T−1]` tensors aligned with its
/// log-probs.
///
/// When a row shares its prompt, it holds the prompt's last token and the completion, and the
/// rest of the prompt runs once for all the rows that continue it; otherwise a row is prompt +
/// completion. The rows run through the trunk as `layout` says.
pub(crate) struct Packed {
    pub(crate) ids: Vec<Vec<u32>>,
    pub(crate) attention: Vec<Vec<u8>>,
    pub(crate) loss_mask: Vec<Vec<u8>>,
    /// The prompt tokens at the start of each row (all of them, or the last one when shared).
    prompt_len: Vec<usize>,
    layout: Layout,
    old: Tensor,
    advantages: Tensor,
    /// 1 on active completion tokens (KL and entropy; Lopti's group)
    active: Tensor,
    /// 0 on the rows of masked sequences ([`Sequence::masked`]), 1 elsewhere; None: none masked.
    kept: Option<Tensor>,
    /// The importance weights ([`Sequence::importance_weights`]; 1 where a sequence has none);
    /// None: no sequence has any.
    importance_weights: Option<Tensor>,
    /// The sampler's log-probs ([`Sequence::sampler_logprobs`]; `old`'s where a sequence has
    /// none); None: no sequence has any.
    sampler: Option<Tensor>,
    /// 1 on the tokens of [`Sequence::covariance_selected`]; None: no sequence has any.
    selected: Option<Tensor>,
    returns: Tensor,
    old_values: Tensor,
}

/// How a micro-batch's rows run through the trunk.
enum Layout {
    /// As padded rows (every row whole).
    Padded,
    /// As padded rows after their shared prompts (every row shares its prompt).
    Shared(SharedPrompts),
    /// End to end in one row, row `r` from `starts[r]`.
    Packed { row: PackedRows, starts: Vec<usize> },
}

impl Packed {
    /// The one row the micro-batch runs as, when packed.
    pub(crate) fn packed(&self) -> Option<&PackedRows> {
        match &self.layout {
            Layout::Packed { row, .. } => Some(row),
            _ => None,
        }
    }

    /// Log-probs and entropies of the completion tokens under `w`, `[B, T−1]`; the hidden
    /// states too when packed only `with_hidden` (the other layouts always have them).
    pub(crate) fn logprobs(
        &self,
        w: &Weights,
        temperature: f64,
        with_hidden: bool,
    ) -> Result<SequenceLogprobs> {
        let (ids, mask) = (&self.ids, &self.loss_mask);
        Ok(match &self.layout {
            Layout::Padded => sequence_logprobs(w, ids, &self.attention, mask, temperature)?,
            Layout::Shared(s) => shared_prompt_logprobs(w, s, ids, mask, temperature)?,
            Layout::Packed { row, starts } => {
                packed_logprobs(w, row, ids, mask, starts, temperature, with_hidden)?
            }
        })
    }

    /// `[B, T−1, H]` final hidden states (position t predicts token t+1).
    fn trunk(&self, w: &Weights) -> Result<Tensor> {
        let t = self.ids.first().map_or(1, Vec::len);
        let hidden = match &self.layout {
            Layout::Shared(s) => model::forward::hidden_states_shared(w, s)?,
            Layout::Padded => {
                let device = w.embed_tokens.device();
                let batch = model::forward::Batch::new(&self.ids, &self.attention, device)?;
                model::forward::hidden_states(w, &batch, None)?
            }
            Layout::Packed { row, starts } => {
                let hidden = model::forward::hidden_states_packed(w, row)?; // [1, N, H]
                let lens: Vec<usize> = self
                    .attention
                    .iter()
                    .map(|a| a.iter().filter(|&&m| m != 0).count())
                    .collect();
                return Ok(unpack_rows(&hidden.squeeze(0)?, starts, &lens, t - 1)?);
            }
        };
        Ok(hidden.narrow(1, 0, t - 1)?)
    }
}

/// The tokens of `seqs` packed into one row as [`pack`] lays them out: each prompt that several
/// of them continue once (less its last token), those rows' last prompt token and completion,
/// and every other row whole. No padding.
pub fn packed_tokens(seqs: &[Sequence]) -> usize {
    PackedCost::new(seqs).tokens(0..seqs.len())
}

/// [`packed_tokens`] of any range of a step's sequences, each prompt hashed once for the step
/// (micro-batches are cut by growing a range a sequence at a time).
pub(crate) struct PackedCost {
    /// The prompt head each sequence may share (an index into `head_len`); None: it runs whole.
    head: Vec<Option<usize>>,
    head_len: Vec<usize>,
    /// Each sequence's row: prompt and completion, or its last prompt token and completion.
    whole: Vec<usize>,
    shared: Vec<usize>,
}

impl PackedCost {
    pub(crate) fn new(seqs: &[Sequence]) -> Self {
        let share = SHARE_PROMPTS.load(Ordering::Relaxed);
        let mut ids: HashMap<&[u32], usize> = HashMap::new();
        let mut head_len = Vec::new();
        let head = seqs
            .iter()
            .map(|s| {
                let eligible = share && may_share(s);
                eligible.then(|| {
                    *ids.entry(head(s)).or_insert_with(|| {
                        head_len.push(head(s).len());
                        head_len.len() - 1
                    })
                })
            })
            .collect();
        PackedCost {
            head,
            head_len,
            whole: seqs
                .iter()
                .map(|s| s.prompt.len() + s.completion.len())
                .collect(),
            shared: seqs.iter().map(|s| 1 + s.completion.len()).collect(),
        }
    }

    /// The tokens of `range`'s sequences packed into one row.
    pub(crate) fn tokens(&self, range: Range<usize>) -> usize {
        let mut rows: HashMap<usize, usize> = HashMap::new();
        for h in self.head[range.clone()].iter().flatten() {
            *rows.entry(*h).or_default() += 1;
        }
        let shared = |h: &Option<usize>| h.is_some_and(|h| rows[&h] >= 2);
        let heads: usize = rows
            .iter()
            .filter(|(_, &n)| n >= 2)
            .map(|(&h, _)| self.head_len[h])
            .sum();
        let own: usize = range
            .map(|i| match shared(&self.head[i]) {
                true => self.shared[i],
                false => self.whole[i],
            })
            .sum();
        heads + own
    }

    /// The head each sequence shares in one packed row of them all (an id; the same for the
    /// rows that continue the same head): those that at least two of them continue.
    fn shared_heads(&self) -> Vec<Option<usize>> {
        let mut rows = vec![0usize; self.head_len.len()];
        for &h in self.head.iter().flatten() {
            rows[h] += 1;
        }
        self.head
            .iter()
            .map(|h| h.filter(|&h| rows[h] >= 2))
            .collect()
    }
}

/// Whether a sequence may share its prompt's head ([`head`]) with others: a prompt of 2 tokens
/// or more, and a completion (a row that shares holds the prompt's last token and the
/// completion).
fn may_share(s: &Sequence) -> bool {
    s.prompt.len() >= 2 && !s.completion.is_empty()
}

/// A sequence's prompt less its last token: what rows continuing the same prompt share.
fn head(s: &Sequence) -> &[u32] {
    &s.prompt[..s.prompt.len().saturating_sub(1)]
}

/// The distinct prompts of `seqs` without their last token, and the one each sequence
/// continues; None when sharing is off or would save little.
fn distinct_prompts(seqs: &[Sequence]) -> Option<(Vec<&[u32]>, Vec<usize>)> {
    if !SHARE_PROMPTS.load(Ordering::Relaxed) || seqs.iter().any(|s| !may_share(s)) {
        return None;
    }
    let mut index: HashMap<&[u32], usize> = HashMap::new();
    let mut distinct: Vec<&[u32]> = Vec::new();
    let rows: Vec<usize> = seqs
        .iter()
        .map(|s| {
            let head = &s.prompt[..s.prompt.len() - 1];
            *index.entry(head).or_insert_with(|| {
                distinct.push(head);
                distinct.len() - 1
            })
        })
        .collect();
    // at least two rows per prompt on average: a stray repeated prompt (a supervised batch)
    // saves too little to pay for the gather of its keys and values
    (2 * distinct.len() <= seqs.len()).then_some((distinct, rows))
}

/// `rows` right-padded with zeros to the longest, and their masks (1 on real tokens).
fn right_padded(rows: &[&[u32]]) -> (Vec<Vec<u32>>, Vec<Vec<u8>>) {
    let t = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    rows.iter()
        .map(|r| {
            let ids = r.iter().copied().chain(std::iter::repeat(0)).take(t);
            (
                ids.collect(),
                (0..t).map(|i| u8::from(i < r.len())).collect(),
            )
        })
        .unzip()
}

/// The prompt tokens a row starts with: all of them, or only the last when prompts are shared.
fn row_prompt(s: &Sequence, shared: bool) -> &[u32] {
    match shared {
        true => &s.prompt[s.prompt.len().saturating_sub(1)..],
        false => &s.prompt,
    }
}

pub(crate) fn pack(seqs: &[Sequence], device: &Device) -> Result<Packed> {
    crate::fit::room_for(tokens_of(seqs)(0..seqs.len()))?;
    let packing = packing_rows();
    // which rows share their prompt: in a packed row, those whose prompt another row continues;
    // padded, all of them or none
    let (heads, distinct) = match packing {
        true => (PackedCost::new(seqs).shared_heads(), None),
        false => (vec![None; seqs.len()], distinct_prompts(seqs)),
    };
    let shares = match &distinct {
        Some(_) => vec![true; seqs.len()],
        None => heads.iter().map(Option::is_some).collect(),
    };
    let t = seqs
        .iter()
        .zip(&shares)
        .map(|(s, &shared)| row_prompt(s, shared).len() + s.completion.len())
        .max()
        .unwrap_or(0);
    let mut ids = Vec::new();
    let mut attention = Vec::new();
    let mut loss_mask = Vec::new();
    let mut prompt_len = Vec::new();
    let cells = seqs.len() * t.saturating_sub(1);
    let (mut old, mut adv, mut active) = (vec![0f32; cells], vec![0f32; cells], vec![0f32; cells]);
    let (mut returns, mut old_values) = (vec![0f32; cells], vec![0f32; cells]);
    let weighted = seqs.iter().any(|s| s.importance_weights.is_some());
    let mut weights = vec![1f32; if weighted { cells } else { 0 }];
    let resampled = seqs.iter().any(|s| s.sampler_logprobs.is_some());
    let mut sampler = vec![0f32; if resampled { cells } else { 0 }];
    let picked = seqs.iter().any(|s| s.covariance_selected.is_some());
    let mut selected = vec![0f32; if picked { cells } else { 0 }];
    for (r, s) in seqs.iter().enumerate() {
        let n = s.completion.len();
        let lengths_ok = s.behavior_logprobs.len() == n
            && s.advantages.len() == n
            && s.active.as_ref().is_none_or(|a| a.len() == n)
            && s.importance_weights.as_ref().is_none_or(|w| w.len() == n)
            && s.sampler_logprobs.as_ref().is_none_or(|l| l.len() == n)
            && s.covariance_selected.as_ref().is_none_or(|c| c.len() == n)
            && s.values
                .as_ref()
                .is_none_or(|v| v.returns.len() == n && v.old_values.len() == n);
        if !lengths_ok || s.prompt.is_empty() {
            return Err(LearnerError::Invalid(
                "a sequence needs a prompt and one behaviour log-prob, advantage (and active flag, return, value, importance weight, sampler log-prob, covariance flag) per completion token".into(),
            ));
        }
        let prompt = row_prompt(s, shares[r]);
        let pl = prompt.len();
        let n = pl + s.completion.len();
        let mut row: Vec<u32> = prompt.iter().chain(&s.completion).copied().collect();
        row.resize(t, 0);
        ids.push(row);
        attention.push((0..t).map(|i| u8::from(i < n)).collect());
        loss_mask.push((0..t).map(|i| u8::from(i >= pl && i < n)).collect());
        prompt_len.push(pl);
        for (j, &lp) in s.behavior_logprobs.iter().enumerate() {
            let at = r * (t - 1) + pl + j - 1; // position predicting completion token j
            old[at] = lp;
            adv[at] = s.advantages[j];
            active[at] = f32::from(u8::from(s.active.as_ref().is_none_or(|a| a[j])));
            if let Some(v) = &s.values {
                returns[at] = v.returns[j];
                old_values[at] = v.old_values[j];
            }
            if let Some(w) = &s.importance_weights {
                weights[at] = w[j];
            }
            if resampled {
                sampler[at] = s.sampler_logprobs.as_ref().map_or(lp, |l| l[j]);
            }
            if let Some(c) = &s.covariance_selected {
                selected[at] = f32::from(u8::from(c[j]));
            }
        }
    }
    let layout = match distinct {
        _ if packing => packed_row(seqs, &heads, &ids, &prompt_len, device)?,
        Some((prompts, rows)) => {
            let (prompts, mask) = right_padded(&prompts);
            Layout::Shared(SharedPrompts::new(
                &prompts, &mask, &rows, &ids, &attention, device,
            )?)
        }
        None => Layout::Padded,
    };
    let b = seqs.len();
    let tensor = |v: Vec<f32>| Tensor::from_vec(v, (b, t - 1), device);
    let kept = match seqs.iter().any(|s| s.masked) {
        true => {
            let rows = seqs.iter().map(|s| f32::from(u8::from(!s.masked)));
            let rows = Tensor::from_vec(rows.collect::<Vec<_>>(), (b, 1), device)?;
            Some(rows.broadcast_as((b, t - 1))?.contiguous()?)
        }
        false => None,
    };
    Ok(Packed {
        ids,
        attention,
        loss_mask,
        prompt_len,
        layout,
        old: tensor(old)?,
        advantages: tensor(adv)?,
        active: tensor(active)?,
        kept,
        importance_weights: weighted.then(|| tensor(weights)).transpose()?,
        sampler: resampled.then(|| tensor(sampler)).transpose()?,
        selected: picked.then(|| tensor(selected)).transpose()?,
        returns: tensor(returns)?,
        old_values: tensor(old_values)?,
    })
}

/// The rows `ids` (right-padded) of `seqs` end to end in one row: each shared prompt head
/// (`heads`: [`PackedCost::shared_heads`]), then the rows that continue it (each after it),
/// every other row alone, in the order the rows first come. A row holds its prompt and
/// completion (`prompt_len[r]` prompt tokens: 1 when shared).
fn packed_row(
    seqs: &[Sequence],
    heads: &[Option<usize>],
    ids: &[Vec<u32>],
    prompt_len: &[usize],
    device: &Device,
) -> Result<Layout> {
    let mut rows_of: HashMap<usize, Vec<usize>> = HashMap::new();
    for (r, h) in heads.iter().enumerate() {
        if let Some(h) = h {
            rows_of.entry(*h).or_default().push(r);
        }
    }
    let mut tokens = Vec::new();
    let mut segments = Vec::new();
    let mut starts = vec![None; seqs.len()];
    for r in 0..seqs.len() {
        if starts[r].is_some() {
            continue;
        }
        // a shared head comes before the first row that continues it, then all those rows
        let (prefix, rows) = match heads[r] {
            Some(h) => {
                let (start, head) = (tokens.len(), head(&seqs[r]));
                segments.push(Segment {
                    start,
                    len: head.len(),
                    prefix: None,
                });
                tokens.extend_from_slice(head);
                (Some((start, head.len())), &rows_of[&h][..])
            }
            None => (None, std::slice::from_ref(&r)),
        };
        for &row in rows {
            let len = prompt_len[row] + seqs[row].completion.len();
            starts[row] = Some(tokens.len());
            segments.push(Segment {
                start: tokens.len(),
                len,
                prefix,
            });
            tokens.extend_from_slice(&ids[row][..len]);
        }
    }
    Ok(Layout::Packed {
        row: PackedRows::new(&tokens, &segments, device)?,
        starts: starts.into_iter().map(|s| s.unwrap_or(0)).collect(),
    })
}

/// One optimizer step of the policy on `seqs`. `policy` must read the optimizer's `Var`s;
/// `reference` (detached) is needed when the loss has a KL term; `head` (whose `Var`s the
/// optimizer also holds) adds PPO's value loss when `cfg.value` is set.
pub fn policy_step(
    policy: &Weights,
    reference: Option<&Weights>,
    head: Option<&ValueHead>,
    opt: &mut AdamW,
    seqs: &[Sequence],
    cfg: &StepConfig,
    lr: f64,
) -> Result<StepMetrics> {
    let start = Instant::now();
    let device = policy.embed_tokens.device().clone();
    let (seqs, _) = step_order(seqs, cfg.micro_batch_tokens);
    let seqs = &seqs[..];
    let tokens: usize = seqs.iter().map(|s| s.completion.len()).sum();
    let tokens_of = tokens_of(seqs);
    let mut m = fitted(
        opt,
        seqs.len(),
        &tokens_of,
        cfg.micro_batch_tokens,
        |opt, plan| {
            let totals = StepTotals {
                sequences: seqs.len(),
                tokens: tokens as f64,
                micro_batches: plan.micro_batches(),
                max_completion_length: cfg.max_completion_length,
            };
            let mut m = StepMetrics {
                micro_batches: plan.micro_batches(),
                tokens,
                optimizer_steps: 1,
                memory_retries: plan.retries,
                ..Default::default()
            };
            for piece in plan.pieces() {
                // BNPO's denominator, when the piece is part of a micro-batch
                let valid = piece.part_of.as_ref().map(|micro| {
                    let s = seqs[micro.clone()].iter().filter(|s| !s.masked);
                    s.map(|s| s.completion.len() as f64).sum()
                });
                let mb = &seqs[piece.range.clone()];
                let inputs = PieceInputs {
                    policy,
                    reference,
                    head,
                    cfg,
                    totals: &totals,
                    micro_batch_valid: valid,
                    device: &device,
                };
                if !policy_piece(&inputs, opt, mb, &mut m)? {
                    m.skipped = true;
                    return Ok(m);
                }
            }
            Ok(m)
        },
    )?;
    if !m.skipped {
        let s = opt.step(lr)?;
        m.grad_norm = s.grad_norm;
        m.skipped = s.skipped;
    }
    m.seconds = start.elapsed().as_secs_f64();
    Ok(m)
}

/// What every piece of a policy step reads.
struct PieceInputs<'a> {
    policy: &'a Weights,
    reference: Option<&'a Weights>,
    head: Option<&'a ValueHead>,
    cfg: &'a StepConfig,
    totals: &'a StepTotals,
    /// The valid tokens of the micro-batch the piece is part of (None: the piece is the whole).
    micro_batch_valid: Option<f64>,
    device: &'a Device,
}

/// Accumulates the policy (and value) loss's gradient of `mb`, a micro-batch or a piece of one,
/// and its statistics into `m`. Returns false when the loss was not finite: the step's gradient
/// is dropped, and `m.loss` is that loss.
fn policy_piece(
    x: &PieceInputs,
    opt: &mut AdamW,
    mb: &[Sequence],
    m: &mut StepMetrics,
) -> Result<bool> {
    let PieceInputs {
        policy,
        reference,
        head,
        cfg,
        totals,
        micro_batch_valid,
        device,
    } = *x;
    let p = pack(mb, device)?;
    let lp = p.logprobs(policy, cfg.temperature, cfg.value.is_some())?;
    let reference_lp = match (reference, cfg.loss.kl_coef != 0.0) {
        (Some(r), true) => Some(p.logprobs(r, cfg.temperature, false)?.logprobs.detach()),
        (None, true) => {
            return Err(LearnerError::Invalid(
                "a KL term needs reference weights".into(),
            ))
        }
        _ => None,
    };
    let policy_mask = match &p.kept {
        Some(kept) => (&lp.mask * kept)?,
        None => lp.mask.clone(),
    };
    let inputs = PolicyInputs {
        logprobs: &lp.logprobs,
        old_logprobs: &p.old,
        advantages: &p.advantages,
        mask: &policy_mask,
        ref_logprobs: reference_lp.as_ref(),
        entropy: Some(&lp.entropy),
        importance_weights: p.importance_weights.as_ref(),
        sampler_logprobs: p.sampler.as_ref(),
        covariance_selected: p.selected.as_ref(),
        kl_entropy_mask: Some(&(&p.active * &policy_mask)?),
        micro_batch_valid,
    };
    let (mut loss, stats) = policy_loss(&inputs, &cfg.loss, totals)?;
    let mut value_stats = None;
    if let Some(vc) = cfg.value {
        let head =
            head.ok_or_else(|| LearnerError::Invalid("a value loss needs a value head".into()))?;
        let hidden = lp.hidden.as_ref().ok_or_else(|| {
            LearnerError::Invalid("the policy's hidden states for its value head".into())
        })?;
        let values = head.values(hidden)?; // [B, T−1]
        let mask = (&p.active * &lp.mask)?;
        let (vl, vs) = value_loss(
            &values,
            &p.old_values,
            &p.returns,
            &mask,
            vc.clip,
            totals.tokens,
        )?;
        loss = (loss + (vl * vc.vf_coef)?)?;
        value_stats = Some(vs);
    }
    let (value, missing) = opt.backward(&loss)?;
    let Some(missing) = missing else {
        m.loss = value;
        return Ok(false);
    };
    m.loss += value;
    if !missing.is_empty() && mb.iter().flat_map(|s| &s.advantages).any(|&a| a != 0.0) {
        return Err(LearnerError::Invalid(format!(
            "no gradient reached {}",
            missing.join(", ")
        )));
    }
    // the statistics of an accumulated micro-batch, read back once its backward is queued
    m.policy = m.policy.merge(&stats.read()?);
    if let Some(pending) = value_stats {
        let (vl, vs) = pending.read()?;
        m.value_loss += vl;
        m.value = m.value.merge(&vs);
    }
    Ok(true)
}

/// How one RL step's batch becomes optimizer steps: PPO epochs over mini-batches, and Lopti's
/// two passes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateConfig {
    pub epochs: usize,
    /// Mini-batches per epoch (each one optimizer step); 1: the whole batch at once.
    pub mini_batches: usize,
    /// Lopti's threshold η (None: one pass over every token).
    pub lopti_eta: Option<f64>,
    /// Seeds Clip-Cov's draws: each optimizer step draws from the stream of this seed and the
    /// optimizer's step count, so a resumed run draws the same tokens.
    pub seed: u64,
    /// TRL's `top_entropy_quantile` ρ (Wang et al. 2025, "Beyond the 80/20 Rule"): each
    /// optimizer step keeps the policy term of its tokens whose entropy under the current policy
    /// is at least the (1 − ρ) quantile of its valid tokens' ([`high_entropy`]), at the cost of
    /// one forward without gradient; 1: every token (off).
    pub top_entropy_quantile: f64,
}

impl Default for UpdateConfig {
    fn default() -> Self {
        UpdateConfig {
            epochs: 1,
            mini_batches: 1,
            lopti_eta: None,
            top_entropy_quantile: 1.0,
            seed: 0,
        }
    }
}

/// Lopti's two passes (spec §1.4): the first keeps the advantages of the low-probability tokens
/// (`π_old < η`) and zeroes the rest; the second the reverse. KL, entropy and value terms are
/// restricted to the active group; the behaviour log-probs and the denominators are unchanged.
pub fn lopti_passes(seqs: &[Sequence], eta: f64) -> [Vec<Sequence>; 2] {
    let pass = |first: bool| -> Vec<Sequence> {
        seqs.iter()
            .map(|s| {
                let low = crate::advantages::lopti_first(&s.behavior_logprobs, eta);
                let active: Vec<bool> = low
                    .iter()
                    .zip(s.active.as_deref().unwrap_or(&vec![true; low.len()]))
                    .map(|(&l, &a)| a && (l == first))
                    .collect();
                Sequence {
                    advantages: s
                        .advantages
                        .iter()
                        .zip(&low)
                        .map(|(&a, &l)| if l == first { a } else { 0.0 })
                        .collect(),
                    active: Some(active),
                    ..s.clone()
                }
            })
            .collect()
    };
    [pass(true), pass(false)]
}

/// The whole update of one RL step: for each Lopti pass (one without Lopti), `epochs` passes
/// over `mini_batches` contiguous mini-batches, each one optimizer step (Clip-Cov and KL-Cov
/// pick their tokens in each, [`covariance::select`]). The metrics are means
/// over the optimizer steps, except the loss, which sums the Lopti passes (their losses add up to
/// the one-pass loss).
#[allow(clippy::too_many_arguments)]
pub fn update(
    policy: &Weights,
    reference: Option<&Weights>,
    head: Option<&ValueHead>,
    opt: &mut AdamW,
    seqs: &[Sequence],
    step: &StepConfig,
    up: &UpdateConfig,
    lr: f64,
) -> Result<StepMetrics> {
    let start = Instant::now();
    let passes: Vec<Vec<Sequence>> = match up.lopti_eta {
        // a group without tokens makes no optimizer step (it would only apply weight decay)
        Some(eta) => lopti_passes(seqs, eta)
            .into_iter()
            .filter(|pass| {
                pass.iter()
                    .flat_map(|s| s.active.iter().flatten())
                    .any(|&a| a)
            })
            .collect(),
        None => vec![seqs.to_vec()],
    };
    if passes.is_empty() {
        return Err(LearnerError::Invalid("an update without tokens".into()));
    }
    let per = seqs.len().div_ceil(up.mini_batches.max(1)).max(1);
    let mut all: Vec<StepMetrics> = Vec::new();
    for pass in &passes {
        for _ in 0..up.epochs.max(1) {
            for chunk in pass.chunks(per) {
                let mut rng = model::rng::Rng::stream(up.seed, opt.steps());
                let marked: Vec<Sequence>;
                let chunk = match covariance::select(chunk, step.loss.surrogate, &mut rng) {
                    Some(flags) => {
                        marked = chunk
                            .iter()
                            .zip(flags)
                            .map(|(s, f)| Sequence {
                                covariance_selected: Some(f),
                                ..s.clone()
                            })
                            .collect();
                        &marked[..]
                    }
                    None => chunk,
                };
                let focused: Vec<Sequence>;
                let chunk = match up.top_entropy_quantile < 1.0 {
                    true => {
                        focused = entropy_focused(policy, chunk, step, up.top_entropy_quantile)?;
                        &focused[..]
                    }
                    false => chunk,
                };
                all.push(policy_step(policy, reference, head, opt, chunk, step, lr)?);
            }
        }
    }
    let n = all.len() as f64;
    let per_pass = n / passes.len() as f64;
    let mean = |f: &dyn Fn(&StepMetrics) -> f64| all.iter().map(f).sum::<f64>() / n;
    Ok(StepMetrics {
        loss: all.iter().map(|m| m.loss).sum::<f64>() / per_pass,
        value_loss: all.iter().map(|m| m.value_loss).sum::<f64>() / per_pass,
        policy: all
            .iter()
            .fold(PolicyStats::default(), |s, m| s.merge(&m.policy)),
        value: all
            .iter()
            .fold(ValueStats::default(), |s, m| s.merge(&m.value)),
        grad_norm: mean(&|m| m.grad_norm),
        skipped: all.iter().any(|m| m.skipped),
        micro_batches: all.iter().map(|m| m.micro_batches).sum(),
        memory_retries: all.iter().map(|m| m.memory_retries).sum(),
        tokens: seqs.iter().map(|s| s.completion.len()).sum(),
        optimizer_steps: all.len(),
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// `seqs` with the policy term of their low-entropy tokens weighted 0 (in
/// [`Sequence::importance_weights`], which multiply it as TRL's entropy mask does, after the
/// off-policy mask): the tokens kept are those [`high_entropy`] picks from the entropies under
/// `policy` at the step's temperature.
fn entropy_focused(
    policy: &Weights,
    seqs: &[Sequence],
    step: &StepConfig,
    top: f64,
) -> Result<Vec<Sequence>> {
    let device = policy.embed_tokens.device().clone();
    let w = policy.detach();
    let entropies = per_completion_token(seqs, step.micro_batch_tokens, &device, |p| {
        Ok(p.logprobs(&w, step.temperature, false)?.entropy)
    })?;
    let valid: Vec<bool> = seqs.iter().map(|s| !s.masked).collect();
    let keep = high_entropy(&entropies, &valid, top);
    Ok(seqs
        .iter()
        .zip(keep)
        .map(|(s, k)| {
            let w = (0..s.completion.len())
                .map(|j| {
                    let w = s.importance_weights.as_ref().map_or(1.0, |w| w[j]);
                    if k[j] {
                        w
                    } else {
                        0.0
                    }
                })
                .collect();
            Sequence {
                importance_weights: Some(w),
                ..s.clone()
            }
        })
        .collect())
}

/// TRL's `get_high_entropy_mask` with `top_entropy_quantile` = `top`: each token whose entropy
/// is at least the `1 − top` quantile of the entropies of the `valid` sequences' tokens
/// (`torch.quantile`: linear interpolation between the sorted values). Every token when no
/// sequence is valid.
pub fn high_entropy(entropies: &[Vec<f32>], valid: &[bool], top: f64) -> Vec<Vec<bool>> {
    let mut pool: Vec<f32> = entropies
        .iter()
        .zip(valid)
        .filter(|(_, &v)| v)
        .flat_map(|(e, _)| e.iter().copied())
        .collect();
    if pool.is_empty() {
        return entropies.iter().map(|e| vec![true; e.len()]).collect();
    }
    pool.sort_by(f32::total_cmp);
    let at = (1.0 - top).clamp(0.0, 1.0) * (pool.len() - 1) as f64;
    let (lo, hi) = (at.floor() as usize, at.ceil() as usize);
    let (a, b) = (f64::from(pool[lo]), f64::from(pool[hi]));
    let threshold = a + (b - a) * (at - lo as f64);
    entropies
        .iter()
        .map(|e| e.iter().map(|&h| f64::from(h) >= threshold).collect())
        .collect()
}

/// A per-position quantity `[B, T−1]` of packed micro-batches, cut to each sequence's
/// completion tokens (detached).
fn per_completion_token(
    seqs: &[Sequence],
    micro_batch_tokens: usize,
    device: &Device,
    f: impl Fn(&Packed) -> Result<Tensor>,
) -> Result<Vec<Vec<f32>>> {
    let (seqs, order) = step_order(seqs, micro_batch_tokens);
    let seqs = &seqs[..];
    let mut out = Vec::with_capacity(seqs.len());
    let mut run = |range: std::ops::Range<usize>| -> Result<Vec<Vec<f32>>> {
        let mb = &seqs[range];
        let p = pack(mb, device)?;
        let rows = f(&p)?.detach().to_vec2::<f32>()?;
        let cut = mb
            .iter()
            .zip(rows)
            .zip(&p.prompt_len)
            .map(|((s, row), pl)| {
                let at = pl - 1;
                row[at..at + s.completion.len()].to_vec()
            });
        Ok(cut.collect())
    };
    for range in micro_batches(seqs, micro_batch_tokens) {
        // no gradient: a micro-batch that does not fit in device memory runs in halves
        out.extend(crate::fit::halving(range, &mut run)?);
    }
    // back in the order the sequences came in
    Ok(match order {
        Some(order) => in_given_order(out, &order),
        None => out,
    })
}

/// Values `V(s_t)` of every completion token under `w` and `head` (detached), one vector per
/// sequence: the rollout values PPO's GAE and value clipping start from.
pub fn predict_values(
    w: &Weights,
    head: &ValueHead,
    seqs: &[Sequence],
    micro_batch_tokens: usize,
) -> Result<Vec<Vec<f32>>> {
    let device = w.embed_tokens.device().clone();
    per_completion_token(seqs, micro_batch_tokens, &device, |p| {
        head.values(&p.trunk(w)?)
    })
}

/// Log-probs of every completion token under `w` (detached) at `temperature`, one vector per
/// sequence (reference log-probs for a KL penalty in the reward).
pub fn token_logprobs(
    w: &Weights,
    seqs: &[Sequence],
    micro_batch_tokens: usize,
    temperature: f64,
) -> Result<Vec<Vec<f32>>> {
    let device = w.embed_tokens.device().clone();
    per_completion_token(seqs, micro_batch_tokens, &device, |p| {
        Ok(p.logprobs(w, temperature, false)?.logprobs)
    })
}

/// One optimizer step of a separate critic (its own trunk `critic`, `head` and optimizer) on the
/// clipped value loss, token mean over the batch.
pub fn critic_step(
    critic: &Weights,
    head: &ValueHead,
    opt: &mut AdamW,
    seqs: &[Sequence],
    micro_batch_tokens: usize,
    clip: Option<f64>,
    lr: f64,
) -> Result<(f64, ValueStats, f64)> {
    let device = critic.embed_tokens.device().clone();
    let (seqs, _) = step_order(seqs, micro_batch_tokens);
    let seqs = &seqs[..];
    let tokens: f64 = seqs.iter().map(|s| s.completion.len() as f64).sum();
    let tokens_of = tokens_of(seqs);
    let (loss_sum, stats, finite) = fitted(
        opt,
        seqs.len(),
        &tokens_of,
        micro_batch_tokens,
        |opt, plan| {
            let mut loss_sum = 0.0;
            let mut stats = ValueStats::default();
            for piece in plan.pieces() {
                let p = pack(&seqs[piece.range.clone()], &device)?;
                let values = head.values(&p.trunk(critic)?)?;
                let mask = loss_mask_tensor(&p, &device)?;
                let (loss, pending) =
                    value_loss(&values, &p.old_values, &p.returns, &mask, clip, tokens)?;
                let (v, done) = opt.backward(&loss)?;
                if done.is_none() {
                    return Ok((v, stats, false));
                }
                let (_, s) = pending.read()?;
                loss_sum += v;
                stats = stats.merge(&s);
            }
            Ok((loss_sum, stats, true))
        },
    )?;
    if !finite {
        return Ok((loss_sum, stats, f64::NAN));
    }
    let s = opt.step(lr)?;
    Ok((loss_sum, stats, s.grad_norm))
}

/// `[B, T−1]` f32 mask of the completion tokens (aligned with the shifted log-probs).
fn loss_mask_tensor(p: &Packed, device: &Device) -> Result<Tensor> {
    let rows: Vec<f32> = p
        .loss_mask
        .iter()
        .flat_map(|row| row[1..].iter().map(|&m| f32::from(m)))
        .collect();
    let b = p.loss_mask.len();
    let t = p.loss_mask.first().map_or(1, Vec::len);
    Ok(Tensor::from_vec(rows, (b, t - 1), device)?)
}
