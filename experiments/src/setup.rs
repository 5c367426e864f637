//! From a config to the things a run needs: the model and tokenizer, the task (prompt rendering
//! and reward), the train loader and the held-out records.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use datasets::fields::Fields;
use datasets::order::{Source, SourceOptions, Split};
use datasets::report::BadRowPolicy;
use datasets::{Loader, Record};
use model::generate::GenerationConfig;
use model::sampling::SamplingParams;
use model::tokenizer::Tokenizer;
use model::{builtin, init, Weights};
use rewards::command::Command;
use rewards::compose::{Part, PartKind, RewardSpec};
use rewards::format::CosineRewards;
use rollout::task::Task;

use crate::config::{Config, DeviceSpec};

/// The device and compute dtype that `model.device` and `model.dtype` ask for; sets the
/// process's switches from `model.cuda_kernels`, `model.flash_attention` and `model.f32_logits`.
pub fn placement(c: &Config) -> anyhow::Result<(Device, DType)> {
    model::ops::set_cuda_kernels(c.model.cuda_kernels);
    model::ops::set_flash_attention(c.model.flash_attention);
    model::head::set_f32_logits(c.model.f32_logits);
    Ok((device(c.model.device_spec()?)?, c.model.compute_dtype()?))
}

fn device(spec: DeviceSpec) -> anyhow::Result<Device> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(n) => cuda(n),
        #[cfg(not(feature = "cuda"))]
        DeviceSpec::Cuda(n) => bail!(
            "model.device = \"cuda:{n}\": this binary was built without CUDA; build it with \
             `cargo build --release --features cuda` (see README) or set model.device = \"cpu\""
        ),
    }
}

/// One candle device per CUDA ordinal for the whole process (`model::cuda::open`: no cudarc
/// events, freed memory kept in the pool): each opened device is a distinct device to candle
/// (its own id, stream and cuBLAS handle), and tensors of two of them cannot meet in one op — a
/// resumed checkpoint would not combine with the reference model.
#[cfg(feature = "cuda")]
fn cuda(n: usize) -> anyhow::Result<Device> {
    static DEVICES: std::sync::Mutex<Vec<(usize, Device)>> = std::sync::Mutex::new(Vec::new());
    let mut devices = DEVICES.lock().expect("the CUDA device list");
    if let Some((_, d)) = devices.iter().find(|(m, _)| *m == n) {
        return Ok(d.clone());
    }
    let d = model::cuda::open(n).with_context(|| {
        format!("model.device = \"cuda:{n}\": no such CUDA device, or the driver failed")
    })?;
    devices.push((n, d.clone()));
    Ok(d)
}

/// Weights loaded on the run's device in its compute dtype (checkpoints of a run).
pub fn load_weights(c: &Config, dir: &Path) -> anyhow::Result<Weights> {
    let (device, dtype) = placement(c)?;
    Weights::load_dir(dir, dtype, &device).with_context(|| dir.display().to_string())
}

/// The model named by `model.path` (`builtin:tiny` or `builtin:tiny-qwen3`, an HF directory, or
/// a `.gguf` file), on the device and in the dtype of `model.device` and `model.dtype`.
pub fn load_model(c: &Config) -> anyhow::Result<(Weights, Tokenizer)> {
    let m = &c.model;
    let (device, dtype) = placement(c)?;
    let builtin = match m.path.as_str() {
        "builtin:tiny" => Some(builtin::tiny_config(m.hidden, m.layers)),
        "builtin:tiny-qwen3" => Some(builtin::tiny_qwen3_config(m.hidden, m.layers)),
        _ => None,
    };
    let (weights, mut tokenizer) = if let Some(config) = builtin {
        // drawn on the host by our seeded RNG, so that every device starts from the same model
        let w = init::random_weights(&config, 0.02, c.run.seed, &Device::Cpu)?;
        (w.to(dtype, &device)?, builtin::char_tokenizer()?)
    } else if let Some(other) = m.path.strip_prefix("builtin:") {
        bail!(
            "model.path = \"builtin:{other}\": the built-in models are `builtin:tiny` and \
             `builtin:tiny-qwen3`"
        );
    } else {
        load_path(Path::new(&m.path), dtype, &device)
            .with_context(|| format!("model.path = {}", m.path))?
    };
    if let Some(t) = &m.chat_template {
        let text =
            std::fs::read_to_string(t).with_context(|| format!("model.chat_template = {t}"))?;
        tokenizer.set_chat_template(Some(text));
    }
    Ok((weights, tokenizer))
}

/// A model and its tokenizer from an HF directory (a ferrite checkpoint is one) or a `.gguf` file.
fn load_path(path: &Path, dtype: DType, device: &Device) -> anyhow::Result<(Weights, Tokenizer)> {
    if path.extension().is_some_and(|e| e == "gguf") {
        let g = model::gguf::load(path, dtype, device)?;
        Ok((g.weights, g.tokenizer))
    } else if path.is_dir() {
        Ok((
            Weights::load_dir(path, dtype, device)?,
            Tokenizer::from_dir(path)?,
        ))
    } else {
        bail!("neither `builtin:tiny`, an HF model directory, nor a .gguf file")
    }
}

/// A checkpoint directory, or a run directory (its newest checkpoint).
pub fn resolve_checkpoint(path: &Path) -> anyhow::Result<PathBuf> {
    if path.join("config.json").is_file() {
        return Ok(path.to_path_buf());
    }
    if let Some((_, newest)) = learner::checkpoint::list(&path.join("checkpoints"))?.pop() {
        return Ok(newest);
    }
    bail!(
        "{}: neither a checkpoint nor a run directory with checkpoints",
        path.display()
    )
}

/// Where a run's teacher is pinned: `teacher.json` in the run directory.
const TEACHER_PIN: &str = "teacher.json";

/// The checkpoint a run's teacher resolved to when the run started, and the size and
/// modification time of each of its weight files: a resumed run distills from that one even
/// when `distill.teacher` (a run directory) now resolves to a newer checkpoint, and refuses it
/// when its files changed.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct TeacherPin {
    path: PathBuf,
    /// (file name, bytes, modified: nanoseconds since the epoch)
    files: Vec<(String, u64, u128)>,
}

impl TeacherPin {
    fn of(path: &Path) -> anyhow::Result<TeacherPin> {
        let weight_files: Vec<PathBuf> = if path.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(path)?
                .map(|e| e.map(|e| e.path()))
                .collect::<Result<_, _>>()?;
            v.retain(|p| p.extension().is_some_and(|e| e == "safetensors"));
            v.sort();
            v
        } else {
            vec![path.to_path_buf()]
        };
        let files = weight_files
            .iter()
            .map(|f| -> anyhow::Result<(String, u64, u128)> {
                let m = std::fs::metadata(f).with_context(|| f.display().to_string())?;
                let modified = m.modified()?.duration_since(std::time::UNIX_EPOCH)?;
                let name = f.file_name().map(|n| n.to_string_lossy().into_owned());
                Ok((name.unwrap_or_default(), m.len(), modified.as_nanos()))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(TeacherPin {
            path: path.to_path_buf(),
            files,
        })
    }
}

/// The teacher's checkpoint for a run in `run`: on a resume the one pinned when the run started
/// (checked unchanged), otherwise `resolved` and its pin, which [`load_teacher`] writes once the
/// teacher has loaded and passed its checks.
fn pinned_teacher(
    resolved: PathBuf,
    run: &Path,
    resume: bool,
) -> anyhow::Result<(PathBuf, Option<TeacherPin>)> {
    let file = run.join(TEACHER_PIN);
    if resume && file.is_file() {
        let pin: TeacherPin = serde_json::from_str(&std::fs::read_to_string(&file)?)
            .with_context(|| file.display().to_string())?;
        if pin.path != resolved {
            tracing::info!(
                pinned = %pin.path.display(),
                now = %resolved.display(),
                "the resumed run keeps the teacher it started with"
            );
        }
        let now = TeacherPin::of(&pin.path)
            .with_context(|| format!("the run's teacher {}", pin.path.display()))?;
        if now != pin {
            bail!(
                "the run's teacher {} changed since the run started (its weight files differ \
                 from {}): resuming would distill from another model",
                pin.path.display(),
                file.display()
            );
        }
        return Ok((pin.path, None));
    }
    let pin = TeacherPin::of(&resolved)?;
    Ok((resolved, Some(pin)))
}

/// On-policy distillation's teacher (`distill.teacher`; None when off) on the run's device, in
/// its dtype. Its tokenizer must be the student's, token for token, and its output layer must
/// cover every id the student can sample. With `run` (the run directory and whether it
/// resumes), the checkpoint is pinned there ([`TeacherPin`]).
pub fn load_teacher(
    c: &Config,
    student: &Tokenizer,
    student_vocab: usize,
    run: Option<(&Path, bool)>,
) -> anyhow::Result<Option<Weights>> {
    let name = &c.distill.teacher;
    if name.is_empty() {
        return Ok(None);
    }
    let at = || format!("distill.teacher = {name}");
    if name.starts_with("builtin:") {
        bail!(
            "{}: a teacher must be a trained model (an HF directory, a .gguf file, a checkpoint \
             or a run directory)",
            at()
        );
    }
    let path = Path::new(name);
    let path = if path.extension().is_some_and(|e| e == "gguf") {
        path.to_path_buf()
    } else {
        resolve_checkpoint(path).with_context(at)?
    };
    let (path, pin) = match run {
        Some((dir, resume)) => pinned_teacher(path, dir, resume).with_context(at)?,
        None => (path, None),
    };
    let (device, dtype) = placement(c)?;
    let (weights, tokenizer) = load_path(&path, dtype, &device).with_context(at)?;
    same_vocabulary(student, &tokenizer).with_context(at)?;
    if weights.config.vocab_size < student_vocab {
        bail!(
            "{}: its output layer has {} rows, the student's {}: a token the student samples \
             past row {} would have no teacher log-prob",
            at(),
            weights.config.vocab_size,
            student_vocab,
            weights.config.vocab_size
        );
    }
    if let (Some(pin), Some((dir, _))) = (pin, run) {
        let json = serde_json::to_string_pretty(&pin)?;
        std::fs::write(dir.join(TEACHER_PIN), json)?;
    }
    tracing::info!(
        teacher = %path.display(),
        parameters = weights.config.num_parameters(),
        hidden = weights.config.hidden_size,
        layers = weights.config.num_hidden_layers,
        "on-policy distillation's teacher"
    );
    Ok(Some(weights))
}

/// The two tokenizers map the same tokens to the same ids.
fn same_vocabulary(student: &Tokenizer, teacher: &Tokenizer) -> anyhow::Result<()> {
    let s = student.inner().get_vocab(true);
    let t = teacher.inner().get_vocab(true);
    if s == t {
        return Ok(());
    }
    let first = s
        .iter()
        .filter(|(token, id)| t.get(*token) != Some(id))
        .min_by_key(|(_, id)| **id)
        .map(|(token, id)| {
            format!("; the student's token {token:?} (id {id}) is not the teacher's")
        })
        .unwrap_or_default();
    bail!(
        "the teacher's tokenizer is not the student's ({} tokens against {}{first}): its log-probs \
         would score other tokens",
        t.len(),
        s.len()
    )
}

pub fn reward_spec(c: &Config) -> RewardSpec {
    let parts = c
        .reward
        .parts
        .iter()
        .map(|p| Part {
            name: p.name.clone(),
            weight: p.weight,
            kind: match p.kind.as_str() {
                "math" => PartKind::MathAnswer,
                "digits" => PartKind::DigitMatch,
                "countdown" => PartKind::Countdown,
                "knights_knaves" => PartKind::KnightsKnaves {
                    think_in_prompt: p.think_in_prompt,
                },
                "format" => PartKind::TagFormat {
                    think_in_prompt: p.think_in_prompt,
                },
                "cosine" => PartKind::Cosine {
                    rewards: CosineRewards {
                        min_wrong: p.min_value_wrong,
                        max_wrong: p.max_value_wrong,
                        min_correct: p.min_value_correct,
                        max_correct: p.max_value_correct,
                        max_chars: p.max_chars,
                    },
                    think_in_prompt: p.think_in_prompt,
                },
                "repetition" => PartKind::Repetition {
                    ngram_size: p.ngram_size,
                    max_penalty: p.max_penalty,
                },
                "command" => PartKind::Command(Arc::new(Command::new(
                    p.command.clone(),
                    Duration::from_millis(p.timeout_ms),
                ))),
                _ => PartKind::Overlong {
                    max_tokens: if p.max_tokens == 0 {
                        c.rollout.max_new_tokens
                    } else {
                        p.max_tokens
                    },
                    cache_tokens: p.cache_tokens,
                },
            },
        })
        .collect();
    RewardSpec { parts }
}

/// The task of `c`, its external reward programs started (an error if one cannot start).
pub fn task(c: &Config, mut tokenizer: Tokenizer) -> anyhow::Result<Task> {
    tokenizer.set_template_kwargs(c.model.chat_template_kwargs.clone());
    let reward = reward_spec(c);
    for part in &reward.parts {
        if let PartKind::Command(program) = &part.kind {
            program
                .start()
                .map_err(|e| anyhow::anyhow!("reward part `{}`: {e}", part.name))?;
        }
    }
    Ok(Task {
        tokenizer,
        prompt_template: c.data.prompt_template.clone().filter(|t| !t.is_empty()),
        system_prompt: c.data.system_prompt.clone().filter(|t| !t.is_empty()),
        reward,
    })
}

/// Token ids generation stops at: the tokenizer's end-of-sequence token and `<|im_end|>`.
pub fn stop_ids(tokenizer: &Tokenizer) -> Vec<u32> {
    let mut ids: Vec<u32> = [tokenizer.eos_token(), Some(builtin::IM_END)]
        .into_iter()
        .flatten()
        .filter_map(|t| tokenizer.token_to_id(t))
        .collect();
    ids.dedup();
    ids
}

pub fn generation(c: &Config, tokenizer: &Tokenizer) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: c.rollout.max_new_tokens,
        sampling: SamplingParams {
            temperature: c.rollout.temperature,
            top_k: c.rollout.top_k,
            top_p: c.rollout.top_p,
        },
        stop_token_ids: stop_ids(tokenizer),
        stop_strings: c.rollout.stop.clone(),
        seed: c.run.seed,
    }
}

fn open(c: &Config, spec: &str, split: Split) -> anyhow::Result<Source> {
    open_with(c, spec, split, Fields::default())
}

/// Every record of a preference file (`prompt`, `chosen`, `rejected`), in file order.
pub fn preference_records(c: &Config, path: &str) -> anyhow::Result<Vec<Record>> {
    records_with(c, path, Fields::preference())
}

/// Every record of an unpaired preference file (KTO: TRL's `prompt`, `completion`, `label`, or
/// rows with `chosen` and / or `rejected`), in file order.
pub fn unpaired_records(c: &Config, path: &str) -> anyhow::Result<Vec<Record>> {
    records_with(c, path, Fields::unpaired())
}

fn records_with(c: &Config, path: &str, fields: Fields) -> anyhow::Result<Vec<Record>> {
    let source = open_with(
        &Config {
            data: crate::config::DataConfig {
                test_fraction: 0.0,
                ..c.data.clone()
            },
            ..c.clone()
        },
        path,
        Split::Train,
        fields,
    )?;
    let n = source
        .records_per_epoch()
        .context("a preference file has a known length")?;
    let mut loader = Loader::new(source, 0, false, 1024)?;
    Ok(loader.take(n as usize)?)
}

fn open_with(c: &Config, spec: &str, split: Split, fields: Fields) -> anyhow::Result<Source> {
    let opts = SourceOptions {
        fields: {
            let mut f = fields;
            if !c.data.prompt_field.is_empty() {
                f.prompt.insert(0, c.data.prompt_field.clone());
            }
            if !c.data.answer_field.is_empty() {
                f.answer.insert(0, c.data.answer_field.clone());
            }
            f
        },
        policy: BadRowPolicy {
            max_fraction: c.data.max_bad_fraction,
        },
        split,
        test_fraction: c.data.test_fraction,
        difficulty: c.data.difficulty,
        ..SourceOptions::default()
    };
    Source::open(spec, &opts).with_context(|| format!("data source {spec}"))
}

pub fn train_loader(c: &Config) -> anyhow::Result<Loader> {
    let source = open(c, &c.data.train, Split::Train)?;
    if let Some(report) = source.report() {
        if report.bad_rows > 0 {
            tracing::warn!("{}", report);
        }
    }
    Ok(Loader::new(source, c.run.seed, c.data.shuffle, 1024)?)
}

/// The first `eval_size` records of the held-out split (the same for every seed of a run
/// family: the split does not depend on the run's seed).
pub fn eval_records(c: &Config) -> anyhow::Result<Vec<Record>> {
    let spec = if c.data.eval.is_empty() {
        &c.data.train
    } else {
        &c.data.eval
    };
    let source = open(c, spec, Split::Test)?;
    let n = source
        .records_per_epoch()
        .map_or(c.data.eval_size as u64, |n| n.min(c.data.eval_size as u64));
    let mut loader = Loader::new(source, 0, false, 1024)?;
    Ok(loader.take(n as usize)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(sets: &[&str]) -> Config {
        Config::default_with(sets).unwrap()
    }

    /// bf16 on the CPU: the built-in model is the f32 one rounded, whatever the dtype.
    #[test]
    fn the_model_loads_in_the_configured_dtype() {
        let (f32s, _) = load_model(&with(&["model.layers=1"])).unwrap();
        let (bf16s, _) = load_model(&with(&["model.layers=1", "model.dtype=bf16"])).unwrap();
        assert_eq!(f32s.embed_tokens.dtype(), DType::F32);
        assert_eq!(bf16s.embed_tokens.dtype(), DType::BF16);
        let rounded = f32s.embed_tokens.to_dtype(DType::BF16).unwrap();
        let diff = (rounded.to_dtype(DType::F32).unwrap()
            - bf16s.embed_tokens.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
        assert_eq!(diff, 0.0);
    }

    /// The config's cosine and repetition parts become the verifier's, their keys carried over.
    #[test]
    fn shaped_reward_parts_reach_the_verifier() {
        let text = "[[reward.parts]]\nname = \"len\"\nkind = \"cosine\"\nmax_chars = 8\n\
                    min_value_correct = 0.25\n[[reward.parts]]\nname = \"rep\"\n\
                    kind = \"repetition\"\nngram_size = 1\nmax_penalty = -0.5\nweight = 0.2";
        let spec = reward_spec(&Config::from_toml(text, "test").unwrap());
        let cosine = rewards::format::CosineRewards {
            max_chars: 8,
            min_correct: 0.25,
            ..Default::default()
        };
        assert_eq!(
            spec.parts
                .iter()
                .map(|p| (p.kind.clone(), p.weight))
                .collect::<Vec<_>>(),
            vec![
                (
                    PartKind::Cosine {
                        rewards: cosine,
                        think_in_prompt: false
                    },
                    1.0
                ),
                (
                    PartKind::Repetition {
                        ngram_size: 1,
                        max_penalty: -0.5
                    },
                    0.2
                ),
            ]
        );
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_in_a_cpu_build_says_how_to_get_it() {
        let e = format!(
            "{:#}",
            placement(&with(&["model.device=cuda:0"])).unwrap_err()
        );
        assert!(
            e.contains("model.device") && e.contains("--features cuda"),
            "{e}"
        );
    }
}
