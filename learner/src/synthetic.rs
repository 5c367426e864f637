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

/// What [`compare_orders`] measured for one order: seconds a step and positions run.
#[derive(Debug, Clone, Copy)]
pub struct OrderRun {
    pub seconds: f64,
    pub positions: usize,
}

/// GRPO steps (DAPO's loss) of `policy` (reading `opt`'s `Var`s) on `seqs` in micro-batches of
/// `budget` padded tokens, the sequences as they come and then by length
/// ([`crate::step::set_order_by_length`]), alternately, `reps` of each after one warm-up each:
/// the mean seconds a step and the positions each order runs. Leaves ordering on.
pub fn compare_orders(
    policy: &model::Weights,
    opt: &mut crate::optim::AdamW,
    seqs: &[Sequence],
    budget: usize,
    reps: usize,
) -> crate::error::Result<[OrderRun; 2]> {
    use crate::step::{by_length, policy_step, set_order_by_length, step_positions, StepConfig};
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
    set_order_by_length(true);
    let sorted = by_length(seqs, budget).map(|order| crate::step::reordered(seqs, &order));
    let positions = [
        step_positions(seqs, budget),
        step_positions(sorted.as_deref().unwrap_or(seqs), budget),
    ];
    let mut seconds = [0f64; 2];
    for rep in 0..=reps {
        for (k, order) in [false, true].into_iter().enumerate() {
            set_order_by_length(order);
            let start = std::time::Instant::now();
            policy_step(policy, None, None, opt, seqs, &cfg, 1e-7)?;
            if rep > 0 {
                // the first of each is a warm-up
                seconds[k] += start.elapsed().as_secs_f64() / reps as f64;
            }
        }
    }
    set_order_by_length(true);
    Ok([0, 1].map(|k| OrderRun {
        seconds: seconds[k],
        positions: positions[k],
    }))
}
