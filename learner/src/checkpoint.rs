//! Checkpoints: a directory transformers loads as it is (`config.json`,
//! `generation_config.json`, `model.safetensors`, tokenizer files) with the trainer state beside
//! it (optimizer moments, data cursor, step, policy version, the run's config).
//!
//! A checkpoint is written into a hidden temporary directory, every file synced, then renamed
//! into place: a crash at any moment leaves either the whole checkpoint or none of it.

use std::path::{Path, PathBuf};

use candle_core::DType;
use model::tokenizer::Tokenizer;
use model::Weights;
use rollout::pool::FeedState;
use serde::{Deserialize, Serialize};

use crate::error::{LearnerError, Result};
use crate::optim::AdamW;

pub const STATE_FILE: &str = "trainer_state.json";

/// Everything besides weights and optimizer moments that a resumed run needs. The sampling RNG
/// streams are counter-based (a group's seed is `(seed, group_id)`, an evaluation's
/// `(seed, step)`), so the counters here are their whole state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done in the RL stage.
    pub step: u64,
    pub policy_version: u64,
    /// The prompt feed: data cursor and next group id.
    pub feed: FeedState,
    pub seed: u64,
    /// Samples (rows) produced so far, for the logs.
    pub samples_seen: u64,
    /// The adaptive KL controller's current β (token-reward KL penalty).
    #[serde(default)]
    pub kl_coef: Option<f64>,
    /// BCO-pair's running mean of the implicit reward ([`crate::coupled::RunningMean`]).
    #[serde(default)]
    pub bco_reward_mean: Option<crate::coupled::RunningMean>,
}

fn io(path: &Path, e: std::io::Error) -> LearnerError {
    LearnerError::Invalid(format!("{}: {e}", path.display()))
}

fn sync_tree(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| io(dir, e))? {
        let path = entry.map_err(|e| io(dir, e))?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else if path.is_file() {
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| io(&path, e))?;
        }
    }
    Ok(())
}

/// Writes more files into a checkpoint before it is committed (a critic, a value head).
pub type Extra<'a> = &'a dyn Fn(&Path) -> Result<()>;

/// Writes `root/name` atomically. `files` are extra text files (the resolved config); `extra`
/// writes anything else into the checkpoint directory before it is synced and renamed.
#[allow(clippy::too_many_arguments)]
pub fn save(
    root: &Path,
    name: &str,
    weights: &Weights,
    tokenizer: &Tokenizer,
    optimizer: Option<&AdamW>,
    state: &TrainerState,
    files: &[(&str, &str)],
    extra: Option<Extra>,
) -> Result<PathBuf> {
    std::fs::create_dir_all(root).map_err(|e| io(root, e))?;
    let tmp = root.join(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io(&tmp, e))?;
    }
    // f32 on disk; parameters trained in bf16 from the optimizer's f32 master
    let weights = match optimizer {
        Some(opt) => opt.master_weights(weights)?,
        None => weights.clone(),
    };
    // with LoRA: the merged model (what transformers loads alone) and, in a directory of its
    // own, the adapter (PEFT's files, what a resumed run reads back onto its frozen base). Beside
    // the model, transformers would find `adapter_config.json` and apply the adapter again.
    if weights.lora_config().is_some() {
        weights.save_adapter(&tmp.join(model::lora::ADAPTER_DIR), DType::F32, None)?;
    }
    weights
        .merged_as(Some(DType::F32))?
        .save_dir(&tmp, DType::F32, 4 << 30)?;
    tokenizer.save_dir(&tmp)?;
    if let Some(opt) = optimizer {
        opt.save(&tmp)?;
    }
    let state_json = serde_json::to_string_pretty(state).expect("state serializes");
    std::fs::write(tmp.join(STATE_FILE), state_json).map_err(|e| io(&tmp, e))?;
    for (file, text) in files {
        std::fs::write(tmp.join(file), text).map_err(|e| io(&tmp, e))?;
    }
    if let Some(extra) = extra {
        extra(&tmp)?;
    }
    sync_tree(&tmp)?;
    let dest = root.join(name);
    if dest.exists() {
        std::fs::remove_dir_all(&dest).map_err(|e| io(&dest, e))?;
    }
    std::fs::rename(&tmp, &dest).map_err(|e| io(&dest, e))?;
    if let Ok(d) = std::fs::File::open(root) {
        let _ = d.sync_all();
    }
    Ok(dest)
}

pub fn step_name(step: u64) -> String {
    format!("step-{step:06}")
}

/// Complete `step-N` checkpoints under `root`, oldest first.
pub fn list(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok(out);
    };
    for entry in entries {
        let path = entry.map_err(|e| io(root, e))?.path();
        let step = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(step) = step {
            if path.join(STATE_FILE).is_file() {
                out.push((step, path));
            }
        }
    }
    out.sort();
    Ok(out)
}

pub fn load_state(dir: &Path) -> Result<TrainerState> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| io(&path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| LearnerError::Invalid(format!("{}: {e}", path.display())))
}

/// Removes all but the newest `keep` step checkpoints (0 keeps all).
pub fn prune(root: &Path, keep: usize) -> Result<()> {
    if keep == 0 {
        return Ok(());
    }
    let all = list(root)?;
    for (_, path) in all.iter().take(all.len().saturating_sub(keep)) {
        std::fs::remove_dir_all(path).map_err(|e| io(path, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::AdamWConfig;
    use candle_core::Device;

    #[test]
    fn a_checkpoint_round_trips_and_half_written_ones_are_ignored() {
        let root = std::env::temp_dir().join(format!("ferrite-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let config = model::builtin::tiny_config(16, 1);
        let w = model::init::random_weights(&config, 0.02, 1, &Device::Cpu).unwrap();
        let (vars, wv) = w.to_vars().unwrap();
        let opt = AdamW::new(vars, AdamWConfig::default()).unwrap();
        let tok = model::builtin::char_tokenizer().unwrap();
        let state = TrainerState {
            step: 3,
            policy_version: 3,
            feed: FeedState {
                cursor: datasets::Cursor {
                    epoch: 0,
                    position: 24,
                },
                next_group: 24,
            },
            seed: 7,
            samples_seen: 192,
            kl_coef: None,
            bco_reward_mean: None,
        };
        let dir = save(
            &root,
            &step_name(3),
            &wv,
            &tok,
            Some(&opt),
            &state,
            &[("config.toml", "x = 1")],
            Some(&|d: &Path| {
                std::fs::create_dir_all(d.join("critic")).unwrap();
                std::fs::write(d.join("critic/extra.txt"), "critic").unwrap();
                Ok(())
            }),
        )
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("critic/extra.txt")).unwrap(),
            "critic"
        );
        // an interrupted later checkpoint: only its temporary directory exists
        std::fs::create_dir_all(root.join(".step-000006.tmp")).unwrap();
        std::fs::create_dir_all(root.join("step-000009")).unwrap(); // no trainer state: incomplete
        let found = list(&root).unwrap();
        assert_eq!(found, vec![(3, dir.clone())]);
        assert_eq!(load_state(&dir).unwrap(), state);
        let back = Weights::load_dir(&dir, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(back.checksum().unwrap(), w.checksum().unwrap());
        let _ = std::fs::remove_dir_all(&root);
    }
}
