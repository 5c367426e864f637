//! Made-up RL steps for benchmarks: the shapes of a GRPO step's batch, random tokens.

use model::rng::Rng;

use crate::step::Sequence;

/// `prompts` groups of `group` completions of random tokens (ids 4 and up, below `vocab`):
/// prompts of 40–120 tokens, completions of 8–512 tokens uniform in the logarithm (many short,
/// a few long, as an RL step's completions end), advantages ±1 and behaviour log-probs of −2.
pub fn rl_like_step(prompts: usize, group: usize, vocab: u32, seed: u64) -> Vec<Sequence> {
    let mut rng = Rng::new(seed);
    let tokens = |rng: &mut Rng, n: usize| -> Vec<u32> {
        (0..n)
            .map(|_| 4 + rng.below(u64::from(vocab.max(5) - 4)) as u32)
            .collect()
    };
    let mut out = Vec::with_capacity(prompts * group);
    for _ in 0..prompts {
        let length = 40 + rng.below(81) as usize;
        let prompt = tokens(&mut rng, length);
        for _ in 0..group {
            let n = (8f64.ln() + rng.uniform() * 64f64.ln()).exp() as usize;
            let completion = tokens(&mut rng, n);
            let advantage = if rng.uniform() < 0.5 { -1.0 } else { 1.0 };
            out.push(Sequence::new(
                prompt.clone(),
                completion,
                vec![-2.0; n],
                advantage,
            ));
        }
    }
    out
}

/// The keys the packed attention's forward visits for `seqs` in micro-batches of `budget`
/// tokens, each packed into one row ([`model::attention::varlen_work`], summed): with the
/// query tiles' two spans, from each tile's first key on, and the keys some row of a tile sees.
pub fn packed_attention_keys(seqs: &[Sequence], budget: usize) -> crate::error::Result<[usize; 3]> {
    use crate::step::{micro_batches, pack, packing_rows, set_pack_rows};
    let was = packing_rows();
    set_pack_rows(true);
    let work = (|| {
        let mut sum = [0usize; 3];
        for range in micro_batches(seqs, budget) {
            let packed = pack(&seqs[range], &candle_core::Device::Cpu)?;
            if let Some(row) = packed.packed() {
                let n = row.segments.iter().map(|s| s.len).sum();
                let work =
                    model::attention::varlen_work(&row.segments, n, model::launch::FLASH_KEYS);
                for (s, w) in sum.iter_mut().zip(work) {
                    *s += w;
                }
            }
        }
        Ok(sum)
    })();
    set_pack_rows(was);
    work
}

/// What [`compare_layouts`] measured for one layout: seconds a step and positions run.
#[derive(Debug, Clone, Copy)]
pub struct LayoutRun {
    pub seconds: f64,
    pub positions: usize,
}

/// The layouts [`compare_layouts`] runs, in its order: padded rows as they come, padded rows by
/// length ([`crate::step::set_order_by_length`]), and packed into one row
/// ([`crate::step::set_pack_rows`]).
pub const LAYOUTS: [&str; 3] = ["padded as they come", "padded by length", "packed"];

/// `(pack, order by length)` for each of [`LAYOUTS`].
const SWITCHES: [(bool, bool); 3] = [(false, false), (false, true), (true, true)];

/// GRPO steps (DAPO's loss) of `policy` (reading `opt`'s `Var`s) on `seqs` in micro-batches of
/// `budget` tokens, in each of [`LAYOUTS`] in turn, `reps` rounds after a warm-up round: the
/// mean seconds a step and the positions each runs. Leaves packing and ordering as they were.
pub fn compare_layouts(
    policy: &model::Weights,
    opt: &mut crate::optim::AdamW,
    seqs: &[Sequence],
    budget: usize,
    reps: usize,
) -> crate::error::Result<[LayoutRun; 3]> {
    use crate::step::{
        by_length, ordering_by_length, packing_rows, policy_step, set_order_by_length,
        set_pack_rows, step_positions, StepConfig,
    };
    let cfg = StepConfig {
        loss: crate::grpo::PolicyLossConfig {
            aggregation: crate::grpo::Aggregation::Dapo,
            ..Default::default()
        },
        micro_batch_tokens: budget,
        temperature: 1.0,
        max_completion_length: seqs.iter().map(|s| s.completion.len()).max().unwrap_or(1),
        value: None,
    };
    let was = (packing_rows(), ordering_by_length());
    let set = |(pack, order): (bool, bool)| {
        set_pack_rows(pack);
        set_order_by_length(order);
    };
    let positions = SWITCHES.map(|switches| {
        set(switches);
        let sorted = by_length(seqs, budget).map(|order| crate::step::reordered(seqs, &order));
        step_positions(sorted.as_deref().unwrap_or(seqs), budget)
    });
    let mut seconds = [0f64; 3];
    let mut run = || -> crate::error::Result<()> {
        for rep in 0..=reps {
            for (k, switches) in SWITCHES.into_iter().enumerate() {
                set(switches);
                let start = std::time::Instant::now();
                policy_step(policy, None, None, opt, seqs, &cfg, 1e-7)?;
                if rep > 0 {
                    // the first round is a warm-up
                    seconds[k] += start.elapsed().as_secs_f64() / reps as f64;
                }
            }
        }
        Ok(())
    };
    let done = run();
    set(was);
    done?;
    Ok([0, 1, 2].map(|k| LayoutRun {
        seconds: seconds[k],
        positions: positions[k],
    }))
}
