//! Exploration for the default run: can the built-in tiny model learn arithmetic on this CPU in
//! a couple of minutes by SFT, and does GRPO then raise held-out accuracy?
//!
//!     cargo run --release -p ferrite-learner --example explore_arith -- [SFT_STEPS] [RL_STEPS] [HIDDEN] [LAYERS]

use std::time::Instant;

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

fn prompt_ids(tok: &Tokenizer, r: &Record) -> Vec<u32> {
    let expr = r.metadata["expression"].as_str().unwrap();
    let text = tok
        .apply_chat_template(&[Message::new("user", &format!("{expr}="))], true)
        .unwrap();
    tok.encode(&text, false).unwrap()
}

fn accuracy(w: &Weights, tok: &Tokenizer, eval: &[Record]) -> f64 {
    let prompts: Vec<Vec<u32>> = eval.iter().map(|r| prompt_ids(tok, r)).collect();
    let cfg = GenerationConfig {
        max_new_tokens: 8,
        sampling: SamplingParams::greedy(),
        stop_token_ids: vec![2],
        ..Default::default()
    };
    let out = generate(&w.detach(), &prompts, &cfg, Some(tok)).unwrap();
    let right = out
        .iter()
        .zip(eval)
        .filter(|(c, r)| c.text.as_deref().map(str::trim) == r.answer.as_deref())
        .count();
    right as f64 / eval.len() as f64
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    model::tune_allocator();
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    let (sft_steps, rl_steps) = (
        args.first().copied().unwrap_or(300),
        args.get(1).copied().unwrap_or(30),
    );
    let (hidden, layers) = (
        args.get(2).copied().unwrap_or(128),
        args.get(3).copied().unwrap_or(4),
    );
    let tok = builtin::char_tokenizer()?;
    let cfg = builtin::tiny_config(hidden, layers);
    let ops: Vec<char> = std::env::var("OPS")
        .unwrap_or("+-".into())
        .chars()
        .collect();
    let digits: u32 = std::env::var("DIGITS").map_or(2, |d| d.parse().unwrap());
    let gen = Arithmetic {
        max_digits: digits,
        max_operands: 2,
        operators: ops,
    };
    let eval: Vec<Record> = (0..200).map(|i| gen.generate(0, 1, i)).collect();
    let base = init::random_weights(&cfg, 0.02, 0, &Device::Cpu)?;
    let (vars, w) = base.to_vars()?;
    let mut opt = AdamW::new(
        vars,
        AdamWConfig {
            weight_decay: 0.01,
            ..Default::default()
        },
    )?;
    println!(
        "{} parameters; accuracy before SFT {:.3}",
        cfg.num_parameters(),
        accuracy(&w, &tok, &eval)
    );
    let start = Instant::now();
    let mut next = 0u64;
    for step in 0..sft_steps {
        let batch: Vec<(Vec<u32>, Vec<u32>)> = (0..32)
            .map(|_| {
                let r = gen.generate(0, 0, next);
                next += 1;
                let mut c = tok.encode(r.answer.as_deref().unwrap(), false).unwrap();
                c.push(2);
                (prompt_ids(&tok, &r), c)
            })
            .collect();
        let lr = 3e-3 * (1.0 - step as f64 / sft_steps as f64).max(0.1);
        let m = sft_step(&w, &mut opt, &batch, 8192, lr)?;
        if step % 50 == 0 || step + 1 == sft_steps {
            println!(
                "sft {step:4} loss {:.3} ({:.0} s)",
                m.loss,
                start.elapsed().as_secs_f64()
            );
        }
    }
    let after_sft = accuracy(&w, &tok, &eval);
    println!(
        "accuracy after SFT {after_sft:.3} ({:.0} s)",
        start.elapsed().as_secs_f64()
    );
    let mut rl_opt = opt;
    let step_cfg = StepConfig {
        loss: PolicyLossConfig::default(),
        micro_batch_tokens: 8192,
        temperature: 1.0,
        max_completion_length: 8,
    };
    let start = Instant::now();
    for step in 0..rl_steps {
        let records: Vec<Record> = (0..16)
            .map(|_| {
                let r = gen.generate(0, 0, next);
                next += 1;
                r
            })
            .collect();
        let prompts: Vec<Vec<u32>> = records
            .iter()
            .flat_map(|r| std::iter::repeat_n(prompt_ids(&tok, r), 8))
            .collect();
        let gcfg = GenerationConfig {
            max_new_tokens: 8,
            sampling: SamplingParams::default(),
            stop_token_ids: vec![2],
            seed: step as u64,
            ..Default::default()
        };
        let out = generate(&w.detach(), &prompts, &gcfg, Some(&tok))?;
        let rewards: Vec<f32> = out
            .iter()
            .enumerate()
            .map(|(k, c)| {
                f32::from(u8::from(
                    c.text.as_deref().map(str::trim) == records[k / 8].answer.as_deref(),
                ))
            })
            .collect();
        let groups: Vec<u64> = (0..out.len() as u64).map(|k| k / 8).collect();
        let adv = group_advantages(&rewards, &groups, ScaleRewards::Group, 1e-4);
        let seqs: Vec<Sequence> = out
            .iter()
            .zip(&prompts)
            .zip(&adv)
            .map(|((c, p), &a)| Sequence {
                prompt: p.clone(),
                completion: c.tokens.clone(),
                behavior_logprobs: c.logprobs.clone(),
                advantage: a,
            })
            .collect();
        let m = policy_step(&w, None, &mut rl_opt, &seqs, &step_cfg, 1e-4)?;
        let mean = rewards.iter().sum::<f32>() / rewards.len() as f32;
        if step % 5 == 0 || step + 1 == rl_steps {
            println!(
                "rl {step:3} reward {mean:.3} loss {:.4} grad {:.3} ({:.0} s)",
                m.loss,
                m.grad_norm,
                start.elapsed().as_secs_f64()
            );
        }
    }
    println!(
        "accuracy after RL {:.3} (after SFT {after_sft:.3}; RL {:.0} s)",
        accuracy(&w, &tok, &eval),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
