//! The built-in experiment: SFT warm start, then GRPO, on two-digit addition, on the CPU.

use std::time::Instant;

use anyhow::Context;
use candle_core::Device;
use datasets::generators::{arithmetic::Arithmetic, Generator};
use datasets::Record;
use learner::grpo::{group_advantages, PolicyLossConfig, ScaleRewards};
use learner::optim::{AdamW, AdamWConfig};
use learner::sft::sft_step;
use learner::step::{policy_step, Sequence, StepConfig};
use model::generate::{generate, GenerationConfig};
use model::sampling::SamplingParams;
use model::tokenizer::{Message, Tokenizer};
use model::{builtin, init, Weights};

#[derive(Debug, Clone, clap::Args)]
pub struct Options {
    /// Seed of the model initialisation, the data and the sampling.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Supervised warm-start steps (32 examples each).
    #[arg(long, default_value_t = 700)]
    pub sft_steps: usize,
    /// GRPO steps.
    #[arg(long, default_value_t = 60)]
    pub grpo_steps: usize,
    /// GRPO learning rate (AdamW, constant).
    #[arg(long, default_value_t = 1e-4)]
    pub grpo_lr: f64,
    /// Prompts per GRPO step.
    #[arg(long, default_value_t = 16)]
    pub prompts_per_step: usize,
    /// Completions per prompt.
    #[arg(long, default_value_t = 8)]
    pub group_size: usize,
    /// Held-out problems for accuracy.
    #[arg(long, default_value_t = 200)]
    pub eval_size: u64,
    #[arg(long, default_value_t = 128)]
    pub hidden: usize,
    #[arg(long, default_value_t = 4)]
    pub layers: usize,
}

impl Options {
    pub fn parse_from<I: IntoIterator<Item = &'static str>>(args: I) -> Self {
        #[derive(clap::Parser)]
        struct Wrapper {
            #[command(flatten)]
            options: Options,
        }
        <Wrapper as clap::Parser>::parse_from(args).options
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub accuracy_initial: f64,
    pub accuracy_sft: f64,
    pub accuracy_rl: f64,
    pub seconds: f64,
}

const EOS: u32 = 2;
const MAX_NEW: usize = 8;

fn prompt_ids(tok: &Tokenizer, r: &Record) -> anyhow::Result<Vec<u32>> {
    let expr = r.metadata["expression"]
        .as_str()
        .context("arithmetic record without expression")?;
    let text = tok.apply_chat_template(&[Message::new("user", &format!("{expr}="))], true)?;
    Ok(tok.encode(&text, false)?)
}

fn reward(text: Option<&str>, gold: Option<&str>) -> f32 {
    match (text, gold) {
        (Some(t), Some(g)) => f32::from(u8::from(rewards::math::verify(t, g).correct)),
        _ => 0.0,
    }
}

/// Greedy accuracy on the held-out split.
pub fn accuracy(w: &Weights, tok: &Tokenizer, eval: &[Record]) -> anyhow::Result<f64> {
    let prompts = eval
        .iter()
        .map(|r| prompt_ids(tok, r))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let cfg = GenerationConfig {
        max_new_tokens: MAX_NEW,
        sampling: SamplingParams::greedy(),
        stop_token_ids: vec![EOS],
        ..Default::default()
    };
    let out = generate(&w.detach(), &prompts, &cfg, Some(tok))?;
    let right: f32 = out
        .iter()
        .zip(eval)
        .map(|(c, r)| reward(c.text.as_deref(), r.answer.as_deref()))
        .sum();
    Ok(right as f64 / eval.len().max(1) as f64)
}

pub fn run(o: &Options) -> anyhow::Result<Summary> {
    let start = Instant::now();
    let tok = builtin::char_tokenizer()?;
    let config = builtin::tiny_config(o.hidden, o.layers);
    let task = Arithmetic {
        max_digits: 2,
        max_operands: 2,
        operators: vec!['+'],
    };
    let eval: Vec<Record> = (0..o.eval_size)
        .map(|i| task.generate(o.seed, 1, i))
        .collect();
    let base = init::random_weights(&config, 0.02, o.seed, &Device::Cpu)?;
    let (vars, w) = base.to_vars()?;
    let mut opt = AdamW::new(
        vars,
        AdamWConfig {
            weight_decay: 0.01,
            ..Default::default()
        },
    )?;
    let accuracy_initial = accuracy(&w, &tok, &eval)?;
    println!(
        "built-in experiment: {} parameters, two-digit addition; held-out accuracy {accuracy_initial:.3}",
        config.num_parameters()
    );
    let mut next = 0u64;
    for step in 0..o.sft_steps {
        let mut batch = Vec::with_capacity(32);
        for _ in 0..32 {
            let r = task.generate(o.seed, 0, next);
            next += 1;
            let mut completion = tok.encode(r.answer.as_deref().unwrap_or_default(), false)?;
            completion.push(EOS);
            batch.push((prompt_ids(&tok, &r)?, completion));
        }
        let lr = 3e-3 * (1.0 - step as f64 / o.sft_steps as f64).max(0.1);
        let m = sft_step(&w, &mut opt, &batch, 8192, lr)?;
        if step % 100 == 0 || step + 1 == o.sft_steps {
            println!(
                "sft {step:4}/{}: loss {:.3} ({:.0} s)",
                o.sft_steps,
                m.loss,
                start.elapsed().as_secs_f64()
            );
        }
    }
    let accuracy_sft = accuracy(&w, &tok, &eval)?;
    println!("after SFT: held-out accuracy {accuracy_sft:.3}");
    let step_cfg = StepConfig {
        loss: PolicyLossConfig::default(),
        micro_batch_tokens: 8192,
        temperature: 1.0,
        max_completion_length: MAX_NEW,
    };
    let g = o.group_size;
    for step in 0..o.grpo_steps {
        let records: Vec<Record> = (0..o.prompts_per_step)
            .map(|_| {
                let r = task.generate(o.seed, 0, next);
                next += 1;
                r
            })
            .collect();
        let mut prompts = Vec::new();
        for r in &records {
            let p = prompt_ids(&tok, r)?;
            prompts.extend(std::iter::repeat_n(p, g));
        }
        let gen_cfg = GenerationConfig {
            max_new_tokens: MAX_NEW,
            sampling: SamplingParams::default(),
            stop_token_ids: vec![EOS],
            seed: o.seed ^ (step as u64 + 1) << 20,
            ..Default::default()
        };
        let out = generate(&w.detach(), &prompts, &gen_cfg, Some(&tok))?;
        let rewards: Vec<f32> = out
            .iter()
            .enumerate()
            .map(|(k, c)| reward(c.text.as_deref(), records[k / g].answer.as_deref()))
            .collect();
        let groups: Vec<u64> = (0..out.len() as u64).map(|k| k / g as u64).collect();
        let advantages = group_advantages(&rewards, &groups, ScaleRewards::Group, 1e-4);
        let seqs: Vec<Sequence> = out
            .iter()
            .zip(&prompts)
            .zip(&advantages)
            .map(|((c, p), &a)| Sequence {
                prompt: p.clone(),
                completion: c.tokens.clone(),
                behavior_logprobs: c.logprobs.clone(),
                advantage: a,
            })
            .collect();
        let m = policy_step(&w, None, &mut opt, &seqs, &step_cfg, o.grpo_lr)?;
        if step % 10 == 0 || step + 1 == o.grpo_steps {
            let mean = rewards.iter().sum::<f32>() / rewards.len().max(1) as f32;
            println!(
                "grpo {step:3}/{}: reward {mean:.3}, clip {:.3}/{:.3}, grad norm {:.2} ({:.0} s)",
                o.grpo_steps,
                m.policy.clip_low_frac,
                m.policy.clip_high_frac,
                m.grad_norm,
                start.elapsed().as_secs_f64()
            );
        }
    }
    let accuracy_rl = accuracy(&w, &tok, &eval)?;
    Ok(Summary {
        accuracy_initial,
        accuracy_sft,
        accuracy_rl,
        seconds: start.elapsed().as_secs_f64(),
    })
}
