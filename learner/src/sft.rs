//! Supervised fine-tuning: cross-entropy on gold completions (prompt tokens masked), averaged
//! over the completion tokens of the whole step.

use candle_core::Tensor;
use model::Weights;

use crate::error::{LearnerError, Result};
use crate::fit::fitted;
use crate::optim::AdamW;
use crate::step::{pack, step_order, tokens_of, Sequence};

#[derive(Debug, Clone, PartialEq, Default)]
pub struct SftMetrics {
    /// Mean negative log-likelihood per completion token.
    pub loss: f64,
    pub tokens: usize,
    pub grad_norm: f64,
    pub skipped: bool,
    /// Times the step ran again after running out of device memory ([`crate::fit`]).
    pub memory_retries: usize,
}

/// One optimizer step of supervised fine-tuning on `(prompt, completion)` pairs.
pub fn sft_step(
    w: &Weights,
    opt: &mut AdamW,
    examples: &[(Vec<u32>, Vec<u32>)],
    micro_batch_tokens: usize,
    lr: f64,
) -> Result<SftMetrics> {
    let tokens: usize = examples.iter().map(|(_, c)| c.len()).sum();
    if tokens == 0 {
        return Err(LearnerError::Invalid(
            "SFT examples without completion tokens".into(),
        ));
    }
    // the policy step's packing: rows × longest row within the budget, prompt tokens masked
    let seqs: Vec<Sequence> = examples
        .iter()
        .map(|(p, c)| Sequence::new(p.clone(), c.clone(), vec![0.0; c.len()], 0.0))
        .collect();
    // shortest first where that pads fewer tokens: the loss is the whole step's token mean
    let (seqs, _) = step_order(&seqs, micro_batch_tokens);
    let device = w.embed_tokens.device().clone();
    let mut m = fitted(
        opt,
        seqs.len(),
        &tokens_of(&seqs),
        micro_batch_tokens,
        |opt, plan| {
            let mut m = SftMetrics {
                tokens,
                memory_retries: plan.retries,
                ..Default::default()
            };
            for piece in plan.pieces() {
                let p = pack(&seqs[piece.range.clone()], &device)?;
                let lp = p.logprobs(w, 1.0, false)?;
                let loss: Tensor = (lp.logprobs.sum_all()?.neg()? / tokens as f64)?;
                let (value, done) = opt.backward(&loss)?;
                if done.is_none() {
                    m.skipped = true;
                    m.loss = value;
                    return Ok(m);
                }
                m.loss += value;
            }
            Ok(m)
        },
    )?;
    if !m.skipped {
        let s = opt.step(lr)?;
        m.grad_norm = s.grad_norm;
        m.skipped = s.skipped;
    }
    Ok(m)
}
