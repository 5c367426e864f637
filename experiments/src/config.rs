//! The experiment config: TOML with defaults for every key, presets in `experiments/configs/`,
//! `--set section.key=value` overrides. An unknown key or a bad value is an error that names it
//! (and the nearest valid key).

use anyhow::{bail, Context};
use candle_core::DType;
use learner::advantages::EntropyReward;
use learner::correction::BehaviourCorrection;
use learner::dpo::DpoLoss;
use learner::grpo::{Aggregation, KlEstimator, RatioLevel, ScaleRewards};
use learner::kto::{KtoConfig, KtoLoss};
use learner::schedule::Schedule;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub run: RunConfig,
    pub model: ModelSection,
    pub data: DataConfig,
    pub reward: RewardConfig,
    pub sft: SftConfig,
    pub rollout: RolloutConfig,
    pub algorithm: AlgorithmConfig,
    pub optimizer: OptimizerConfig,
    pub lora: LoraSection,
    pub distill: DistillSection,
    pub sweep: SweepConfig,
}

/// LoRA for the RL stage (PEFT's `LoraConfig`): with `rank > 0` the RL start's weights are
/// frozen and adapters of that rank on `targets` train (see `model::lora`); the warm start
/// trains every weight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSection {
    /// 0: full fine-tuning.
    pub rank: usize,
    /// The update is scaled by `alpha / rank`.
    pub alpha: f64,
    pub targets: Vec<model::lora::Target>,
}

impl Default for LoraSection {
    fn default() -> Self {
        LoraSection {
            rank: 0,
            alpha: 16.0,
            targets: model::lora::Target::ALL.to_vec(),
        }
    }
}

impl LoraSection {
    /// The adapters' configuration, None for full fine-tuning.
    pub fn config(&self) -> Option<model::lora::LoraConfig> {
        let c = model::lora::LoraConfig::new(self.rank, self.alpha, self.targets.clone());
        (self.rank > 0).then_some(c)
    }
}

/// On-policy distillation (Thinking Machines' tinker cookbook; slime's `--use-opd`,
/// `--opd-kl-coef`): a frozen teacher scores every completion token the student sampled, and the
/// token's advantage, after the estimator's, gains `−kl_coef · (log π_old − log π_teacher)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistillSection {
    /// An HF model directory, a `.gguf` file, a ferrite checkpoint, or a run directory (its
    /// newest checkpoint), with the student's tokenizer; empty: off.
    pub teacher: String,
    /// 0: the teacher's reverse KL is logged (`opd_reverse_kl`), not trained on.
    pub kl_coef: f64,
    /// The teacher's term alone: the estimator's advantages are left out (the rewards are still
    /// computed and logged); tinker's and slime's pure distillation.
    pub pure: bool,
}

impl Default for DistillSection {
    fn default() -> Self {
        DistillSection {
            teacher: String::new(),
            kl_coef: 1.0,
            pure: false,
        }
    }
}

/// `ferrite sweep`: every variant (a list of `--set` overrides) for every seed; the variants of
/// a seed share one warm start and one data order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SweepConfig {
    pub seeds: Vec<u64>,
    pub variants: Vec<Variant>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    pub name: String,
    #[serde(default)]
    pub set: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    pub name: String,
    pub seed: u64,
    /// RL optimizer steps.
    pub steps: u64,
    /// Checkpoint every this many RL steps (0: only at the end).
    pub checkpoint_every: u64,
    /// Step checkpoints kept (0: all).
    pub keep_checkpoints: usize,
    /// Evaluate every this many RL steps (0: only before and after).
    pub eval_every: u64,
    /// Measure every checkpoint's update against the RL start as it is written
    /// (`subnetwork.parquet`, masks in `subnetwork/`, `subnetwork.png`).
    pub track_subnetwork: bool,
    /// `|Δ| ≤ tol` counts as unchanged (Mukherjee et al.: 1e-5).
    pub subnetwork_tol: f64,
    /// Runs go to `output_dir/name-<time>` unless `--out` names the directory.
    pub output_dir: String,
    /// Mirror the step tables into TensorBoard event files (`tensorboard/` in the run directory;
    /// `tensorboard --logdir runs`).
    pub tensorboard: bool,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            name: "default".into(),
            seed: 0,
            steps: 60,
            checkpoint_every: 20,
            keep_checkpoints: 2,
            eval_every: 20,
            track_subnetwork: true,
            subnetwork_tol: 1e-5,
            output_dir: "runs".into(),
            tensorboard: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// `builtin:tiny` (random init, the built-in character tokenizer; `builtin:tiny-qwen3` the
    /// same in the Qwen3 architecture), an HF directory, or a `.gguf` file.
    pub path: String,
    /// Size of `builtin:tiny`.
    pub hidden: usize,
    pub layers: usize,
    /// A Jinja chat template file that replaces the model's.
    pub chat_template: Option<String>,
    /// Extra variables of the chat template, as the keyword arguments of transformers'
    /// `apply_chat_template` (TRL's `chat_template_kwargs`): `{ enable_thinking = false }` for
    /// Qwen3's template, whose generation prompt then closes an empty `<think>` block.
    pub chat_template_kwargs: serde_json::Map<String, serde_json::Value>,
    /// Where the policy (and its rollouts, reference and critic) runs: `cpu`, `cuda` or
    /// `cuda:N` (CUDA needs a binary built with `--features cuda`).
    pub device: String,
    /// Compute dtype of the weights: `auto` (f32 on the CPU, bf16 on CUDA), `f32` or `bf16`.
    /// The optimizer keeps f32 master weights and moments either way.
    pub dtype: String,
    /// On CUDA: ferrite's fused kernels (`true`), or candle's composed ops for every op they
    /// replace (`false`: slower, a way round a kernel that misbehaves on some card).
    pub cuda_kernels: bool,
    /// On CUDA in bf16: attention over a batch of rows by the flash kernels (`true`), or the
    /// chunked attention (`false`).
    pub flash_attention: bool,
    /// In bf16: the output layer's logits in f32, from the matmul's f32 accumulator, in the
    /// sampler and the learner (`true`), or rounded to bf16 (`false`). f32 logits narrow the
    /// gap between the sampler's log-probs and the learner's; the learner's backward then
    /// recomputes its logits rather than keep them.
    pub f32_logits: bool,
}

/// Where a run's model lives, parsed from `model.device`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    /// The CUDA device of this ordinal.
    Cuda(usize),
}

impl ModelSection {
    pub fn device_spec(&self) -> anyhow::Result<DeviceSpec> {
        let d = self.device.trim().to_ascii_lowercase();
        match d.as_str() {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(0)),
            _ => match d.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceSpec::Cuda(n)),
                _ => bail!(
                    "model.device = {:?}: `cpu`, `cuda` or `cuda:N` (N the device ordinal)",
                    self.device
                ),
            },
        }
    }

    /// The dtype the weights compute in (`dtype`, with `auto` resolved by the device: f32 on the
    /// CPU, bf16 elsewhere).
    pub fn compute_dtype(&self) -> anyhow::Result<DType> {
        match self.dtype.as_str() {
            "auto" if self.device_spec()? == DeviceSpec::Cpu => Ok(DType::F32),
            "auto" => Ok(DType::BF16),
            "f32" | "float32" => Ok(DType::F32),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "f16" | "float16" | "fp16" => Ok(DType::F16),
            other => bail!("model.dtype = {other:?}: `auto`, `f32`, `bf16` or `f16`"),
        }
    }
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection {
            path: "builtin:tiny".into(),
            hidden: 128,
            layers: 4,
            chat_template: None,
            chat_template_kwargs: serde_json::Map::new(),
            device: "cpu".into(),
            dtype: "auto".into(),
            cuda_kernels: true,
            flash_attention: true,
            f32_logits: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// `builtin:addition`, `builtin:arithmetic`, `builtin:countdown`, `builtin:knights_knaves`,
    /// or a `.jsonl` / `.parquet` file.
    pub train: String,
    /// The held-out source (its test split); empty: the train source.
    pub eval: String,
    pub eval_size: usize,
    /// Samples per held-out prompt for pass@1 and pass@k (greedy accuracy is measured too).
    pub eval_samples: usize,
    /// Sequences decoding at once in evaluation (continuous batching: a finished one's row
    /// takes the next prompt; bounds the KV cache).
    pub eval_batch: usize,
    /// Difficulty of a built-in generator (0: its default).
    pub difficulty: u32,
    pub shuffle: bool,
    pub test_fraction: f64,
    /// The user message from the record's fields (`{prompt}`, `{answer}`, `{metadata_key}`).
    pub prompt_template: Option<String>,
    pub system_prompt: Option<String>,
    /// Field names tried first for the prompt and the answer (beside the usual ones).
    pub prompt_field: String,
    pub answer_field: String,
    /// Largest fraction of malformed rows tolerated (skipped and counted).
    pub max_bad_fraction: f64,
}

impl Default for DataConfig {
    fn default() -> Self {
        DataConfig {
            train: "builtin:addition".into(),
            eval: String::new(),
            eval_size: 1000,
            eval_samples: 4,
            eval_batch: 64,
            difficulty: 0,
            shuffle: true,
            test_fraction: 0.1,
            prompt_template: Some("{expression}=".into()),
            system_prompt: None,
            prompt_field: String::new(),
            answer_field: String::new(),
            max_bad_fraction: 0.01,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardPart {
    pub name: String,
    /// `math`, `digits`, `countdown`, `knights_knaves`, `format`, `overlong`, `cosine`,
    /// `repetition`, `command`.
    pub kind: String,
    #[serde(default = "one")]
    pub weight: f32,
    #[serde(default)]
    pub think_in_prompt: bool,
    #[serde(default)]
    pub max_tokens: usize,
    #[serde(default)]
    pub cache_tokens: usize,
    /// `cosine` (Open-R1's `get_cosine_scaled_reward`): the length scale in characters and the
    /// ends of the scale for wrong and right answers (its defaults 1000, −1, −0.5, 0.5, 1).
    #[serde(default = "thousand")]
    pub max_chars: usize,
    #[serde(default = "minus_one")]
    pub min_value_wrong: f64,
    #[serde(default = "minus_half")]
    pub max_value_wrong: f64,
    #[serde(default = "half")]
    pub min_value_correct: f64,
    #[serde(default = "one_f64")]
    pub max_value_correct: f64,
    /// `repetition` (Open-R1's `get_repetition_penalty_reward`): the n-gram size and the penalty
    /// of a text made of one repeated n-gram (≤ 0; its defaults 3 and −1).
    #[serde(default = "three")]
    pub ngram_size: usize,
    #[serde(default = "minus_one")]
    pub max_penalty: f64,
    /// `command` (an external program, `rewards::command`): the program and its arguments (run
    /// in ferrite's working directory), and how long one answer may take before the program is
    /// stopped and the completion's part fails.
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default = "ten_seconds")]
    pub timeout_ms: u64,
}

fn ten_seconds() -> u64 {
    10_000
}

fn one() -> f32 {
    1.0
}

fn one_f64() -> f64 {
    1.0
}

fn half() -> f64 {
    0.5
}

fn minus_half() -> f64 {
    -0.5
}

fn minus_one() -> f64 {
    -1.0
}

fn three() -> usize {
    3
}

fn thousand() -> usize {
    1000
}

impl RewardPart {
    /// A part of `kind` named `name`, every other key at its default.
    pub fn new(name: &str, kind: &str) -> RewardPart {
        RewardPart {
            name: name.into(),
            kind: kind.into(),
            weight: 1.0,
            think_in_prompt: false,
            max_tokens: 0,
            cache_tokens: 0,
            max_chars: thousand(),
            min_value_wrong: minus_one(),
            max_value_wrong: minus_half(),
            min_value_correct: half(),
            max_value_correct: one_f64(),
            ngram_size: three(),
            max_penalty: minus_one(),
            command: Vec::new(),
            timeout_ms: ten_seconds(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RewardConfig {
    pub parts: Vec<RewardPart>,
}

impl Default for RewardConfig {
    fn default() -> Self {
        RewardConfig {
            parts: vec![RewardPart::new("answer", "math")],
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SftConfig {
    /// Supervised warm-start steps before RL (0: none).
    pub steps: u64,
    pub batch_size: usize,
    pub lr: f64,
    /// The linear decay stops at this fraction of `lr`.
    pub min_lr_ratio: f64,
    /// The gold completion from the record's fields.
    pub completion_template: String,
}

impl Default for SftConfig {
    fn default() -> Self {
        SftConfig {
            steps: 700,
            batch_size: 32,
            lr: 3e-3,
            min_lr_ratio: 0.1,
            completion_template: "{answer}".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RolloutConfig {
    pub workers: usize,
    pub prompts_per_step: usize,
    pub group_size: usize,
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    /// Policy versions the workers may run ahead (0: synchronous).
    pub max_staleness: u64,
    /// Stop strings beside the tokenizer's end-of-sequence token.
    pub stop: Vec<String>,
    /// Groups the channel to the learner holds.
    pub channel_capacity: usize,
    /// The groups a worker's batch holds (`groups_per_batch × group_size` rows): it starts as
    /// many as it may at once, up to that many, and above 1 it refills the rows that finish
    /// with the next groups it may start under the same policy version. On a GPU a decode step
    /// of many rows costs about what one of a few does. 1 keeps a run reproducible; larger
    /// batches change the float rounding of the sampled rows. 0 (the default) is `auto`, resolved
    /// by the device ([`Config::groups_per_batch`]).
    pub groups_per_batch: usize,
}

impl Default for RolloutConfig {
    fn default() -> Self {
        RolloutConfig {
            workers: 2,
            prompts_per_step: 16,
            group_size: 8,
            max_new_tokens: 8,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            max_staleness: 0,
            stop: Vec::new(),
            channel_capacity: 64,
            groups_per_batch: 0,
        }
    }
}

/// The policy-gradient surrogate of the GRPO family, RLOO, REINFORCE++ and PPO.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PolicyLoss {
    /// PPO's clipped surrogate (`clip_low`, `clip_high`, `dual_clip`).
    #[default]
    Clip,
    /// CISPO: `−sg(min(r, cispo_max))·A·log π` (MiniMax-M1; TRL's `loss_type = "cispo"`).
    Cispo,
    /// SAPO: `−σ(τ·(r − 1))·(4/τ)·A`, τ = `sapo_tau_pos` or `sapo_tau_neg` by the advantage's
    /// sign (TRL's `loss_type = "sapo"`).
    Sapo,
    /// Clip-Cov (verl's `policy_loss = "clip_cov"`): the clipped surrogate; `clip_cov_ratio` of
    /// each optimizer step's tokens, drawn among those whose covariance of log-prob and advantage
    /// lies in (`clip_cov_lb`, `clip_cov_ub`), lose their gradient.
    #[serde(rename = "clip_cov")]
    ClipCov,
    /// KL-Cov (verl's `policy_loss = "kl_cov"`): the unclipped surrogate, and a penalty
    /// `kl_cov_coef·|log π − log π_old|` on the `kl_cov_ratio` of the tokens of the largest
    /// covariance.
    #[serde(rename = "kl_cov")]
    KlCov,
    /// DPPO-Binary-TV (verl's `policy_loss = "dppo_tv"`): `−A·sg(min(r, dppo_cap))·log π` on
    /// the tokens whose probability rose by at most `dppo_high` (A > 0) or fell by at most
    /// `dppo_low` (A ≤ 0) since they were sampled.
    #[serde(rename = "dppo_tv")]
    DppoTv,
    /// DPPO-Binary-KL (verl's `"dppo_kl"`): the same with the binary KL of the token's
    /// probability in place of the difference.
    #[serde(rename = "dppo_kl")]
    DppoKl,
    /// GMPO (verl's `policy_loss = "geo_mean"`): `−Ā·exp(mean_t clipped log r_t)` per sequence,
    /// each token's log-ratio clipped to [−`clip_low`, `clip_high`] (log space, as verl reads
    /// them; the paper's range is 0.4 each) by its advantage's sign.
    #[serde(rename = "geo_mean")]
    GeoMean,
    /// GPG (verl's `"gpg"`): `−A·log π`, no ratio and no clip.
    Gpg,
}

impl PolicyLoss {
    /// The name a config gives it (`"clip_cov"`), quoted.
    pub fn name(self) -> String {
        toml::Value::try_from(self).map_or_else(|_| format!("{self:?}"), |v| v.to_string())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlgorithmConfig {
    /// `grpo` (the GRPO family; GSPO with `ratio = "sequence"`), `rloo`, `reinforce_pp`,
    /// `reinforce_pp_baseline`, `ppo` (GAE over a critic), `gdpo` (GRPO's normalisation per
    /// reward part, the parts summed by weight and whitened), `grpo_passk` (only each group's
    /// best response learns, `r_max − r_second`), `opo` (`r` − the group's length-weighted mean
    /// reward), `remax` (`r` − the reward of the prompt's greedy completion, which the workers
    /// generate beside each group), `dpo` (preference pairs) or `kto` (unpaired desirable /
    /// undesirable examples).
    pub name: String,
    pub scale_rewards: ScaleRewards,
    pub std_eps: f64,
    pub loss_aggregation: Aggregation,
    pub ratio: RatioLevel,
    /// `clip` (PPO's clipped surrogate), `cispo`, `sapo`, `clip_cov`, `kl_cov`, `dppo_tv`,
    /// `dppo_kl`, `geo_mean` (GMPO) or `gpg`.
    pub policy_loss: PolicyLoss,
    /// CISPO's cap on the importance weight (ScaleRL's and TRL's recommended 5.0).
    pub cispo_max: f64,
    /// SAPO's gate temperatures for positive and other advantages (TRL's
    /// `sapo_temperature_pos` 1.0 and `sapo_temperature_neg` 1.05).
    pub sapo_tau_pos: f64,
    pub sapo_tau_neg: f64,
    /// Clip-Cov's share of the tokens and covariance band (verl's `clip_cov_ratio` 2e-4,
    /// `clip_cov_lb` 1, `clip_cov_ub` 5).
    pub clip_cov_ratio: f64,
    pub clip_cov_lb: f64,
    pub clip_cov_ub: f64,
    /// KL-Cov's share of the tokens and penalty coefficient (verl's `kl_cov_ratio` 2e-4 and
    /// `ppo_kl_coef` 1).
    pub kl_cov_ratio: f64,
    pub kl_cov_coef: f64,
    /// DPPO's trust region for tokens of negative and positive advantage, and the cap on its
    /// detached ratio (verl reads the two from `clip_ratio_low` / `clip_ratio_high`, 0.2 by
    /// default, and the cap from `clip_ratio_c`, 3.0).
    pub dppo_low: f64,
    pub dppo_high: f64,
    pub dppo_cap: f64,
    pub clip_low: f64,
    pub clip_high: f64,
    pub dual_clip: Option<f64>,
    pub kl_coef: f64,
    pub kl_estimator: KlEstimator,
    pub entropy_coef: f64,
    /// Advantage Reweighting α (0: off): `Â ← (α·π_old + 1 − α)·Â`.
    pub ar_alpha: f64,
    /// Lopti's threshold η: low-probability tokens (`π_old < η`) are updated first, then the rest
    /// (negative: the reversed order). None: off.
    pub lopti_eta: Option<f64>,
    /// DAPO's dynamic sampling (verl's `algorithm.filter_groups`): a group whose rewards are
    /// all equal is dropped on arrival and counted, and the workers draw more prompts under the
    /// same policy version until the step has `prompts_per_step` groups with a signal.
    pub filter_groups: bool,
    /// With `filter_groups`: a step that still lacks groups after filtering out more than
    /// `(this − 1) × prompts_per_step` of them ends the run with an error (verl's
    /// `max_num_gen_batches`; 0: no limit, which never ends on data the model always solves).
    pub filter_groups_max_batches: usize,
    /// TRL's `mask_truncated_completions` (DAPO's overlong filtering): a completion cut at
    /// `max_new_tokens` keeps its reward in the advantages of its group but leaves the policy
    /// loss (see `learner::step::Sequence::masked`).
    pub mask_truncated: bool,
    /// Correction of the sampler's log-probs (TRL's `vllm_importance_sampling_mode`, AReaL's
    /// decoupled PPO): `none`, or `token_truncate`, `token_mask`, `sequence_truncate`,
    /// `sequence_mask`: the learner recomputes the log-probs at the start of each step, clips
    /// against them, and weights each token's policy term by `π_prox / π_behav` bounded at
    /// `behaviour_cap` (see `learner::correction`).
    pub behaviour_correction: BehaviourCorrection,
    /// The cap of the correction's importance weight (TRL's `vllm_importance_sampling_cap`).
    pub behaviour_cap: f64,
    /// M2PO's threshold τ (AReaL's `m2_threshold`, the paper's 0.04), with a behaviour
    /// correction: the tokens of the largest `(log π_prox − log π_behav)²` leave the policy term
    /// until the mean of the rest is below τ (`learner::correction::m2_kept`). None: off.
    pub m2_threshold: Option<f64>,
    /// Off-policy sequence masking δ (DeepSeek-V3.2; TRL's `off_policy_mask_threshold`): the
    /// tokens of negative advantage in a sequence whose mean `log π_sampler − log π_θ` exceeds δ
    /// leave the policy loss. None: off.
    pub off_policy_mask: Option<f64>,
    /// TRL's `top_entropy_quantile` ρ ("Beyond the 80/20 Rule", Wang et al. 2025): each
    /// optimizer step trains the policy term of only its tokens whose entropy under the current
    /// policy is in the top ρ of the step's tokens (one extra forward without gradient per
    /// optimizer step); 1: every token. KL and entropy terms keep every token.
    pub top_entropy_quantile: f64,
    /// Passes over each step's batch, and optimizer steps per pass.
    pub epochs: usize,
    pub mini_batches: usize,
    /// EM-RL: `token` or `sequence` negative-entropy rewards replace the verifier's.
    pub entropy_reward: EntropyReward,
    /// k1 KL penalty in the token rewards (PPO, REINFORCE++): `r_t = −β·KL_t`, score at the end.
    pub reward_kl_coef: f64,
    /// Adaptive KL controller target (None: fixed `reward_kl_coef`) and horizon.
    pub kl_target: Option<f64>,
    pub kl_horizon: f64,
    /// Discount and GAE λ (PPO, REINFORCE++).
    pub gamma: f64,
    pub lambda: f64,
    /// PPO: whiten the advantages over the batch.
    pub whiten_advantages: bool,
    /// PPO critic: `head` (a value head on the policy trunk, one optimizer) or `separate` (its own
    /// trunk initialised from the policy, its own optimizer and `critic_lr`).
    pub critic: String,
    pub critic_lr: f64,
    pub vf_coef: f64,
    /// Value clipping range (None: unclipped).
    pub value_clip: Option<f64>,
    /// DPO: loss (`sigmoid`, `ipo`, `robust`, `hinge`, `exo_pair`, `nca_pair`, `sppo_hard`,
    /// `apo_zero`, `apo_down`, `discopop`, `simpo`, and the step-coupled `aot`, `aot_pair`,
    /// `bco_pair`), β, label smoothing ε.
    pub dpo_loss: DpoLoss,
    pub dpo_beta: f64,
    pub label_smoothing: f64,
    /// SimPO's target margin γ.
    pub simpo_gamma: f64,
    /// DiscoPOP's temperature τ.
    pub discopop_tau: f64,
    /// RPO: α × the chosen completions' negative log-likelihood joins any DPO loss (0: off).
    pub rpo_alpha: f64,
    /// KTO (`name = "kto"`, TRL's `KTOTrainer`): `kto` or `apo_zero_unpaired`; β is
    /// `dpo_beta`. The weights of desirable and undesirable examples' losses (TRL's
    /// `desirable_weight`, `undesirable_weight`).
    pub kto_loss: KtoLoss,
    pub desirable_weight: f64,
    pub undesirable_weight: f64,
    /// DPO: pairs per optimizer step (KTO: examples).
    pub dpo_pairs_per_step: usize,
    /// DPO: a JSONL or Parquet file of `prompt`, `chosen`, `rejected` (KTO: also TRL's unpaired
    /// `prompt`, `completion`, `label`); empty: build the pairs from the warm-started model's own
    /// samples on the train prompts, ranked by the verifier (KTO: every sample, desirable where
    /// the verifier judged it correct).
    pub preferences: String,
    /// DPO self-built pairs: prompts sampled (each `rollout.group_size` times).
    pub preference_prompts: usize,
}

impl AlgorithmConfig {
    /// ReMax: each group also decodes its prompt greedily, for the baseline.
    pub fn greedy_baseline(&self) -> bool {
        self.name == "remax"
    }
}

impl Default for AlgorithmConfig {
    fn default() -> Self {
        AlgorithmConfig {
            name: "grpo".into(),
            scale_rewards: ScaleRewards::Group,
            std_eps: 1e-4,
            loss_aggregation: Aggregation::Dapo,
            ratio: RatioLevel::Token,
            policy_loss: PolicyLoss::Clip,
            cispo_max: 5.0,
            sapo_tau_pos: 1.0,
            sapo_tau_neg: 1.05,
            clip_cov_ratio: 2e-4,
            clip_cov_lb: 1.0,
            clip_cov_ub: 5.0,
            kl_cov_ratio: 2e-4,
            kl_cov_coef: 1.0,
            dppo_low: 0.2,
            dppo_high: 0.2,
            dppo_cap: 3.0,
            clip_low: 0.2,
            clip_high: 0.28,
            dual_clip: None,
            kl_coef: 0.0,
            kl_estimator: KlEstimator::K3,
            entropy_coef: 0.0,
            ar_alpha: 0.0,
            lopti_eta: None,
            filter_groups: false,
            filter_groups_max_batches: 10,
            mask_truncated: false,
            behaviour_correction: BehaviourCorrection::None,
            behaviour_cap: 3.0,
            m2_threshold: None,
            off_policy_mask: None,
            top_entropy_quantile: 1.0,
            epochs: 1,
            mini_batches: 1,
            entropy_reward: EntropyReward::None,
            reward_kl_coef: 0.0,
            kl_target: None,
            kl_horizon: 10000.0,
            gamma: 1.0,
            lambda: 0.95,
            whiten_advantages: true,
            critic: "head".into(),
            critic_lr: 1e-4,
            vf_coef: 0.1,
            value_clip: Some(0.2),
            dpo_loss: DpoLoss::Sigmoid,
            dpo_beta: 0.1,
            label_smoothing: 0.0,
            simpo_gamma: 0.5,
            discopop_tau: 0.05,
            rpo_alpha: 0.0,
            kto_loss: KtoLoss::Kto,
            desirable_weight: 1.0,
            undesirable_weight: 1.0,
            dpo_pairs_per_step: 64,
            preferences: String::new(),
            preference_prompts: 512,
        }
    }
}

/// A switch whose default the device decides: `"auto"`, `true` or `false` in TOML.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoBool {
    Auto,
    Set(bool),
}

impl Serialize for AutoBool {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            AutoBool::Auto => s.serialize_str("auto"),
            AutoBool::Set(on) => s.serialize_bool(*on),
        }
    }
}

impl<'de> Deserialize<'de> for AutoBool {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bool(bool),
            Word(String),
        }
        match Raw::deserialize(d) {
            Ok(Raw::Bool(on)) => Ok(AutoBool::Set(on)),
            Ok(Raw::Word(w)) if w == "auto" => Ok(AutoBool::Auto),
            _ => Err(serde::de::Error::custom(
                "expected `\"auto\"`, `true` or `false`",
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerConfig {
    pub lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Global gradient-norm clip (0: off).
    pub grad_clip: f64,
    pub schedule: Schedule,
    pub warmup_steps: u64,
    pub micro_batch_tokens: usize,
    /// Per-layer activation checkpointing: keep each layer's input only and recompute the
    /// layer in the backward (less memory, about one more forward of compute).
    pub activation_checkpointing: bool,
    /// Run each distinct prompt of a micro-batch through the model once for all the
    /// completions that continue it (a GRPO group's), instead of once per completion.
    pub share_prompts: bool,
    /// Let a step's micro-batches take its sequences shortest first where that pads fewer
    /// tokens than the order they come in (`learner::step::by_length`).
    pub order_by_length: bool,
    /// Lay a micro-batch's sequences end to end in one row with no padding, each prompt that
    /// several of them continue once (`learner::step::set_pack_rows`): `auto` (on the CPU, and on
    /// CUDA in bf16 or f16, where one flash kernel launch takes the packed row; not on CUDA in f32, where
    /// each sequence's attention would be its own launches), `true` or `false`.
    pub pack_rows: AutoBool,
    /// Subnetwork-only RL: a `*.masks.safetensors` of `ferrite analyze subnetwork`; only the
    /// parameters it marks changed are trained (gradient and update, weight decay included).
    pub subnetwork_mask: String,
    /// Which of its masks: `tol` (|Δ| > tol) or `bf16` (bitwise).
    pub subnetwork_mask_kind: String,
    /// With `model.dtype = "f16"`: the loss scale at the start (`learner::scaler`; it halves
    /// when a scaled gradient overflows and the step runs again).
    pub loss_scale: f64,
    /// With `model.dtype = "f16"`: finite steps in a row after which the loss scale doubles.
    pub loss_scale_window: u64,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        OptimizerConfig {
            lr: 1e-4,
            weight_decay: 0.01,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            grad_clip: 1.0,
            schedule: Schedule::Constant,
            warmup_steps: 0,
            micro_batch_tokens: 8192,
            activation_checkpointing: false,
            share_prompts: true,
            order_by_length: true,
            pack_rows: AutoBool::Auto,
            subnetwork_mask: String::new(),
            subnetwork_mask_kind: "tol".into(),
            loss_scale: learner::scaler::INITIAL,
            loss_scale_window: learner::scaler::GROWTH_INTERVAL,
        }
    }
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// serde says "unknown field `x`, expected one of `a`, `b`": add the nearest valid key.
fn explain(message: &str) -> String {
    let Some(rest) = message.split("unknown field `").nth(1) else {
        return message.to_string();
    };
    let key = rest.split('`').next().unwrap_or_default();
    let valid: Vec<&str> = rest
        .split("expected ")
        .nth(1)
        .unwrap_or_default()
        .split('`')
        .skip(1)
        .step_by(2)
        .collect();
    match valid.iter().min_by_key(|v| edit_distance(key, v)) {
        Some(best) => format!("{message}\n  unknown key `{key}`: did you mean `{best}`?"),
        None => message.to_string(),
    }
}

impl Config {
    pub fn from_toml(text: &str, origin: &str) -> anyhow::Result<Config> {
        let value: toml::Table = toml::from_str(text)
            .map_err(|e| anyhow::anyhow!("{origin}: {}", e.message().trim()))?;
        Self::from_table(value, origin)
    }

    fn from_table(table: toml::Table, origin: &str) -> anyhow::Result<Config> {
        let c: Config = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| anyhow::anyhow!("{origin}: {}", explain(e.message())))?;
        c.validate().with_context(|| origin.to_string())?;
        Ok(c)
    }

    /// The default config with `section.key=value` overrides (for tests).
    #[cfg(test)]
    pub fn default_with(sets: &[&str]) -> anyhow::Result<Config> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Config::default().with_overrides(&sets)
    }

    /// Applies `section.key=value` overrides (the value as TOML; a bare word is a string).
    pub fn with_overrides(&self, sets: &[String]) -> anyhow::Result<Config> {
        if sets.is_empty() {
            return Ok(self.clone());
        }
        let mut table = toml::Table::try_from(self).context("config to TOML")?;
        for set in sets {
            let (path, raw) = set
                .split_once('=')
                .with_context(|| format!("--set {set}: expected section.key=value"))?;
            let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(raw.to_string()));
            let keys: Vec<&str> = path.trim().split('.').collect();
            let (last, parents) = keys.split_last().expect("split yields one");
            let mut at = &mut table;
            for k in parents {
                at = at
                    .entry(k.to_string())
                    .or_insert_with(|| toml::Value::Table(Default::default()))
                    .as_table_mut()
                    .with_context(|| format!("--set {set}: `{k}` is not a section"))?;
            }
            at.insert(last.to_string(), value);
        }
        Self::from_table(table, "--set")
    }

    /// The scheduled learning rate at an RL step for a base rate (`optimizer.lr`, a critic's).
    pub fn lr_at(&self, base: f64, step: u64) -> f64 {
        learner::schedule::learning_rate(
            base,
            self.optimizer.schedule,
            step,
            self.optimizer.warmup_steps,
            self.run.steps,
        )
    }

    /// Whether the run trains on preference data (DPO, KTO) rather than on its rollouts.
    pub fn preference_stage(&self) -> bool {
        matches!(self.algorithm.name.as_str(), "dpo" | "kto")
    }

    /// KTO's loss as the config sets it (β is `dpo_beta`).
    pub fn kto(&self) -> KtoConfig {
        let a = &self.algorithm;
        KtoConfig {
            loss: a.kto_loss,
            beta: a.dpo_beta,
            desirable_weight: a.desirable_weight,
            undesirable_weight: a.undesirable_weight,
        }
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the config serializes")
    }

    /// Whether a learner step packs its micro-batches' rows (`optimizer.pack_rows`), `auto`
    /// resolved by the device: on the CPU, and on CUDA in bf16 or f16, where the `_varlen` flash
    /// kernels take a packed row in one launch each way; off on CUDA in f32, where the flash kernels do
    /// not apply and each sequence's attention would be its own few launches, so that a step of
    /// many short sequences would spend more on launches than packing saves.
    pub fn pack_rows(&self) -> anyhow::Result<bool> {
        Ok(match self.optimizer.pack_rows {
            AutoBool::Auto => {
                self.model.device_spec()? == DeviceSpec::Cpu
                    || self.model.compute_dtype()? != DType::F32
            }
            AutoBool::Set(on) => on,
        })
    }

    /// The groups a rollout worker's batch holds: `rollout.groups_per_batch`, or for 0 (`auto`)
    /// by the device. On the CPU 1: each group alone, so a run is reproducible bit for bit, and a
    /// CPU decode step costs in proportion to its rows anyway. On CUDA a worker's share of the
    /// groups the staleness bound lets start at once, ⌈(1 + max_staleness) · prompts_per_step /
    /// workers⌉ (8 for the defaults): a GPU decode step of 64 rows costs about what one of 8
    /// does, and a batch that runs out of device memory halves itself (`rollout::pool`).
    pub fn groups_per_batch(&self) -> anyhow::Result<usize> {
        let r = &self.rollout;
        Ok(match (r.groups_per_batch, self.model.device_spec()?) {
            (0, DeviceSpec::Cpu) => 1,
            (0, _) => {
                let quota = (1 + r.max_staleness as usize) * r.prompts_per_step;
                quota.div_ceil(r.workers.max(1))
            }
            (n, _) => n,
        })
    }

    /// The same config with the model on the host in f32: offline analyses of a run's
    /// checkpoints (subnetwork, AlphaRL) do their arithmetic there, and the run's own device
    /// may be absent on the machine that analyses it.
    pub fn on_host(mut self) -> Config {
        self.model.device = "cpu".into();
        self.model.dtype = "f32".into();
        self
    }

    fn validate(&self) -> anyhow::Result<()> {
        self.model.compute_dtype()?; // parses the device too
        let l = &self.lora;
        if l.rank > 0 {
            if !(l.alpha.is_finite() && l.alpha > 0.0) || l.targets.is_empty() {
                bail!(
                    "lora.alpha = {}, lora.targets = {:?}: a positive alpha and at least one target",
                    l.alpha,
                    l.targets
                );
            }
            if !self.optimizer.subnetwork_mask.is_empty() {
                bail!(
                    "lora.rank = {}: not with optimizer.subnetwork_mask, which masks full weights",
                    l.rank
                );
            }
        }
        self.pack_rows()?;
        self.validate_distill()?;
        let r = &self.rollout;
        // ReMax's baseline is the greedy completion: one sample a prompt is its original setting
        if r.group_size < 2 && !(r.group_size == 1 && self.algorithm.name == "remax") {
            bail!(
                "rollout.group_size = {}: GRPO needs at least 2 (ReMax at least 1)",
                r.group_size
            );
        }
        if r.prompts_per_step == 0 || r.max_new_tokens == 0 || r.workers == 0 {
            bail!("rollout.prompts_per_step, max_new_tokens and workers must be positive");
        }
        if r.temperature.is_nan() || r.temperature <= 0.0 {
            bail!("rollout.temperature = {}: must be positive", r.temperature);
        }
        if !(r.top_p > 0.0 && r.top_p <= 1.0) {
            bail!("rollout.top_p = {}: must be in (0, 1] (1: off)", r.top_p);
        }
        if self.run.subnetwork_tol.is_nan() || self.run.subnetwork_tol < 0.0 {
            bail!(
                "run.subnetwork_tol = {}: must be 0 or positive",
                self.run.subnetwork_tol
            );
        }
        let a = &self.algorithm;
        const NAMES: [&str; 11] = [
            "grpo",
            "rloo",
            "remax",
            "reinforce_pp",
            "reinforce_pp_baseline",
            "ppo",
            "dpo",
            "gdpo",
            "grpo_passk",
            "opo",
            "kto",
        ];
        if !NAMES.contains(&a.name.as_str()) {
            bail!("algorithm.name = {:?}: one of {}", a.name, NAMES.join(", "));
        }
        if a.name == "gdpo" && a.entropy_reward != EntropyReward::None {
            bail!(
                "algorithm.name = \"gdpo\" normalises the verifier's reward parts; \
                 entropy_reward replaces the verifier's reward: not both"
            );
        }
        if a.name == "remax" && (a.entropy_reward != EntropyReward::None || a.filter_groups) {
            bail!(
                "algorithm.name = \"remax\" takes the verifier's reward of the greedy completion \
                 as each sample's baseline: not with entropy_reward (which replaces the samples' \
                 reward) nor filter_groups (a group whose samples all score alike still learns \
                 against its greedy completion)"
            );
        }
        if !(0.0..=1.0).contains(&a.ar_alpha) {
            bail!("algorithm.ar_alpha = {}: must lie in [0, 1]", a.ar_alpha);
        }
        if let Some(eta) = a.lopti_eta {
            if eta == 0.0 || eta.abs() >= 1.0 || eta.is_nan() {
                bail!("algorithm.lopti_eta = {eta}: must lie in (−1, 0) or (0, 1)");
            }
        }
        let positive = |x: f64| x.is_finite() && x > 0.0;
        if a.policy_loss == PolicyLoss::Cispo && !positive(a.cispo_max) {
            bail!("algorithm.cispo_max = {}: must be positive", a.cispo_max);
        }
        if a.policy_loss == PolicyLoss::Sapo
            && !(positive(a.sapo_tau_pos) && positive(a.sapo_tau_neg))
        {
            bail!(
                "algorithm.sapo_tau_pos = {}, sapo_tau_neg = {}: must be positive",
                a.sapo_tau_pos,
                a.sapo_tau_neg
            );
        }
        let share = |x: f64| x > 0.0 && x <= 1.0;
        if a.policy_loss == PolicyLoss::ClipCov
            && !(share(a.clip_cov_ratio) && a.clip_cov_lb < a.clip_cov_ub)
        {
            bail!(
                "algorithm.clip_cov_ratio = {}, clip_cov_lb = {}, clip_cov_ub = {}: the ratio \
                 must lie in (0, 1] and the band be lb < ub",
                a.clip_cov_ratio,
                a.clip_cov_lb,
                a.clip_cov_ub
            );
        }
        if a.policy_loss == PolicyLoss::KlCov
            && !(share(a.kl_cov_ratio) && a.kl_cov_coef.is_finite() && a.kl_cov_coef >= 0.0)
        {
            bail!(
                "algorithm.kl_cov_ratio = {}, kl_cov_coef = {}: the ratio must lie in (0, 1] \
                 and the coefficient be ≥ 0",
                a.kl_cov_ratio,
                a.kl_cov_coef
            );
        }
        if matches!(a.policy_loss, PolicyLoss::DppoTv | PolicyLoss::DppoKl)
            && !(positive(a.dppo_low) && positive(a.dppo_high) && positive(a.dppo_cap))
        {
            bail!(
                "algorithm.dppo_low = {}, dppo_high = {}, dppo_cap = {}: must be positive",
                a.dppo_low,
                a.dppo_high,
                a.dppo_cap
            );
        }
        let token_level = [
            PolicyLoss::ClipCov,
            PolicyLoss::KlCov,
            PolicyLoss::DppoTv,
            PolicyLoss::DppoKl,
        ];
        if token_level.contains(&a.policy_loss) && a.ratio == RatioLevel::Sequence {
            bail!(
                "algorithm.policy_loss = {} judges single tokens (verl's is token-level): not \
                 with ratio = \"sequence\"",
                a.policy_loss.name()
            );
        }
        let preference = self.preference_stage();
        let sequence_level = [PolicyLoss::GeoMean, PolicyLoss::Gpg];
        if sequence_level.contains(&a.policy_loss) && a.ratio == RatioLevel::Sequence {
            bail!(
                "algorithm.policy_loss = {}: GMPO's ratio is its own sequence-level geometric \
                 mean and GPG has no ratio: not with ratio = \"sequence\"",
                a.policy_loss.name()
            );
        }
        if a.policy_loss == PolicyLoss::GeoMean
            && (a.loss_aggregation != Aggregation::Grpo
                || a.behaviour_correction != BehaviourCorrection::None
                || a.top_entropy_quantile != 1.0)
        {
            bail!(
                "algorithm.policy_loss = \"geo_mean\" averages its per-sequence terms over the \
                 sequences (verl's GMPO): it needs loss_aggregation = \"grpo\", and no \
                 behaviour_correction or top_entropy_quantile (per-token weights, which GMPO \
                 would aggregate by a geometric mean ferrite does not compute)"
            );
        }
        if a.policy_loss != PolicyLoss::Clip && (a.dual_clip.is_some() || preference) {
            bail!(
                "algorithm.policy_loss = {} replaces the clipped surrogate: no dual_clip with \
                 it, and DPO and KTO have no surrogate",
                a.policy_loss.name()
            );
        }
        let corrected = a.behaviour_correction != BehaviourCorrection::None;
        let focused = a.top_entropy_quantile != 1.0;
        let rollout_only =
            a.filter_groups || a.mask_truncated || a.off_policy_mask.is_some() || focused;
        if (rollout_only || corrected) && preference {
            bail!(
                "algorithm.filter_groups, mask_truncated, behaviour_correction, off_policy_mask \
                 and top_entropy_quantile: DPO and KTO train on preference data, not on groups \
                 of rollouts; they are for the policy-gradient methods"
            );
        }
        if !(a.top_entropy_quantile > 0.0 && a.top_entropy_quantile <= 1.0) {
            bail!(
                "algorithm.top_entropy_quantile = {}: must lie in (0, 1] (1: every token)",
                a.top_entropy_quantile
            );
        }
        if a.name == "kto" && (a.dpo_loss != DpoLoss::Sigmoid || a.rpo_alpha != 0.0) {
            bail!(
                "algorithm.dpo_loss and rpo_alpha are DPO's; KTO's loss is algorithm.kto_loss \
                 (`kto` or `apo_zero_unpaired`)"
            );
        }
        if a.name != "kto" && a.kto_loss != KtoLoss::Kto {
            bail!("algorithm.kto_loss is KTO's: set algorithm.name = \"kto\" with it");
        }
        if !(positive(a.desirable_weight) && positive(a.undesirable_weight)) {
            bail!(
                "algorithm.desirable_weight = {}, undesirable_weight = {}: must be positive",
                a.desirable_weight,
                a.undesirable_weight
            );
        }
        if a.off_policy_mask.is_some_and(|d| !d.is_finite()) {
            bail!("algorithm.off_policy_mask must be a finite threshold");
        }
        if let Some(tau) = a.m2_threshold {
            if !(corrected && tau.is_finite() && tau > 0.0) {
                bail!(
                    "algorithm.m2_threshold = {tau}: M2PO compares the learner's recomputed \
                     log-probs with the sampler's, so it needs a behaviour_correction, and a \
                     positive threshold"
                );
            }
        }
        if corrected && !(a.behaviour_cap.is_finite() && a.behaviour_cap > 0.0) {
            bail!(
                "algorithm.behaviour_cap = {}: must be positive",
                a.behaviour_cap
            );
        }
        if a.epochs == 0 || a.mini_batches == 0 || a.dpo_pairs_per_step == 0 {
            bail!("algorithm.epochs, mini_batches and dpo_pairs_per_step must be positive");
        }
        let kind = &self.optimizer.subnetwork_mask_kind;
        if kind != "tol" && kind != "bf16" {
            bail!("optimizer.subnetwork_mask_kind = {kind:?}: `tol` or `bf16`");
        }
        if a.critic != "head" && a.critic != "separate" {
            bail!("algorithm.critic = {:?}: `head` or `separate`", a.critic);
        }
        if a.kl_target.is_some_and(|t| t <= 0.0) || a.kl_horizon <= 0.0 {
            bail!("algorithm.kl_target and kl_horizon must be positive");
        }
        if !(0.0..=1.0).contains(&a.gamma) || !(0.0..=1.0).contains(&a.lambda) {
            bail!("algorithm.gamma and lambda must lie in [0, 1]");
        }
        if a.dpo_beta <= 0.0 || !(0.0..0.5).contains(&a.label_smoothing) {
            bail!("algorithm.dpo_beta must be positive and label_smoothing in [0, 0.5)");
        }
        if !(a.simpo_gamma.is_finite()
            && positive(a.discopop_tau)
            && a.rpo_alpha.is_finite()
            && a.rpo_alpha >= 0.0)
        {
            bail!(
                "algorithm.simpo_gamma = {}, discopop_tau = {}, rpo_alpha = {}: a finite γ, a \
                 positive τ and α ≥ 0",
                a.simpo_gamma,
                a.discopop_tau,
                a.rpo_alpha
            );
        }
        if self.optimizer.lr.is_nan()
            || self.optimizer.lr < 0.0
            || self.optimizer.micro_batch_tokens == 0
        {
            bail!("optimizer.lr must be ≥ 0 and optimizer.micro_batch_tokens positive");
        }
        let o = &self.optimizer;
        if !(o.loss_scale.is_finite() && o.loss_scale >= 1.0) || o.loss_scale_window == 0 {
            bail!(
                "optimizer.loss_scale = {}, loss_scale_window = {}: the scale must be at least 1 \
                 and the window positive",
                o.loss_scale,
                o.loss_scale_window
            );
        }
        for p in &self.reward.parts {
            if ![
                "math",
                "digits",
                "countdown",
                "knights_knaves",
                "format",
                "overlong",
                "cosine",
                "repetition",
                "command",
            ]
            .contains(&p.kind.as_str())
            {
                bail!(
                    "reward part `{}`: kind {:?} is not one of math, digits, countdown, \
                     knights_knaves, format, overlong, cosine, repetition, command",
                    p.name,
                    p.kind
                );
            }
            // a program exactly where the kind is `command`
            if (p.kind == "command") == p.command.is_empty() || p.timeout_ms == 0 {
                bail!(
                    "reward part `{}`: kind = \"command\" needs its program in `command` \
                     (e.g. [\"python3\", \"verify.py\"]), no other kind takes one, and \
                     timeout_ms must be positive",
                    p.name
                );
            }
            let ends = [
                p.min_value_wrong,
                p.max_value_wrong,
                p.min_value_correct,
                p.max_value_correct,
            ];
            if p.kind == "cosine" && (p.max_chars == 0 || !ends.iter().all(|x| x.is_finite())) {
                bail!(
                    "reward part `{}`: max_chars = {} must be positive and the four values \
                     finite",
                    p.name,
                    p.max_chars
                );
            }
            if p.kind == "repetition"
                && (p.ngram_size == 0 || !(p.max_penalty.is_finite() && p.max_penalty <= 0.0))
            {
                bail!(
                    "reward part `{}`: ngram_size = {}, max_penalty = {}: the size must be \
                     positive and the penalty ≤ 0",
                    p.name,
                    p.ngram_size,
                    p.max_penalty
                );
            }
        }
        Ok(())
    }

    fn validate_distill(&self) -> anyhow::Result<()> {
        let (d, a) = (&self.distill, &self.algorithm);
        if d.teacher.is_empty() {
            if d.pure {
                bail!("distill.pure = true: distillation needs a teacher (distill.teacher)");
            }
            return Ok(());
        }
        if !(d.kl_coef.is_finite() && d.kl_coef >= 0.0) || (d.pure && d.kl_coef == 0.0) {
            bail!(
                "distill.kl_coef = {}: must be positive (or 0 without distill.pure: the teacher's \
                 reverse KL logged, not trained on)",
                d.kl_coef
            );
        }
        if self.preference_stage() {
            bail!(
                "distill.teacher: DPO and KTO train on preference data; on-policy distillation \
                 scores the student's own rollouts (a policy-gradient method)"
            );
        }
        if d.pure && (a.filter_groups || a.name == "ppo") {
            bail!(
                "distill.pure = true leaves the task's advantages out: not with \
                 algorithm.filter_groups (which drops groups by their rewards) or PPO (whose \
                 critic learns the rewards' returns)"
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_name_the_nearest_valid_one() {
        let e = Config::from_toml("[optimizer]\nlrr = 1e-5\n", "x.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("`lrr`") && e.contains("did you mean `lr`"),
            "{e}"
        );
        let e = Config::from_toml("[rollouts]\n", "x.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean `rollout`"), "{e}");
        let e = Config::from_toml("[algorithm]\nloss_aggregation = \"mean\"\n", "x.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("mean"), "{e}");
        let luspo = Config::from_toml(
            "[algorithm]\nloss_aggregation = \"seq_sum\"\nratio = \"sequence\"\n",
            "x.toml",
        )
        .unwrap();
        assert_eq!(luspo.algorithm.loss_aggregation, Aggregation::SeqSum);
    }

    #[test]
    fn overrides_apply_and_are_checked() {
        let c = Config::default()
            .with_overrides(&[
                "optimizer.lr=3e-4".into(),
                "run.name=probe".into(),
                "rollout.max_staleness=1".into(),
            ])
            .unwrap();
        assert_eq!(c.optimizer.lr, 3e-4);
        assert_eq!(c.run.name, "probe");
        assert_eq!(c.rollout.max_staleness, 1);
        assert!(Config::default()
            .with_overrides(&["rollout.group_size=1".into()])
            .is_err());
        let e = Config::default()
            .with_overrides(&["rollout.grup_size=4".into()])
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean `group_size`"), "{e}");
        // the resolved config round-trips
        let back = Config::from_toml(&c.to_toml(), "resolved").unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn groups_per_batch_auto_is_one_on_the_cpu_and_a_workers_share_of_the_quota_on_cuda() {
        let gpb = |set: &[&str]| {
            Config::default_with(set)
                .unwrap()
                .groups_per_batch()
                .unwrap()
        };
        assert_eq!(gpb(&[]), 1, "the CPU: each group alone");
        // 16 prompts a step, 2 workers: 8 groups each; one step of staleness doubles the quota
        assert_eq!(gpb(&["model.device=cuda"]), 8);
        assert_eq!(gpb(&["model.device=cuda", "rollout.max_staleness=1"]), 16);
        assert_eq!(gpb(&["model.device=cuda", "rollout.workers=3"]), 6);
        assert_eq!(gpb(&["model.device=cuda", "rollout.groups_per_batch=1"]), 1);
        assert_eq!(gpb(&["rollout.groups_per_batch=4"]), 4);
    }

    #[test]
    fn chat_template_kwargs_come_from_a_table_or_a_set_and_round_trip() {
        let set =
            Config::default_with(&["model.chat_template_kwargs.enable_thinking=false"]).unwrap();
        let toml = "[model.chat_template_kwargs]\nenable_thinking = false\n";
        let file = Config::from_toml(toml, "test").unwrap();
        for c in [&set, &file] {
            assert_eq!(
                c.model.chat_template_kwargs.get("enable_thinking"),
                Some(&serde_json::Value::Bool(false))
            );
            assert_eq!(&Config::from_toml(&c.to_toml(), "resolved").unwrap(), c);
        }
        assert!(Config::default().model.chat_template_kwargs.is_empty());
    }

    #[test]
    fn pack_rows_auto_packs_but_on_cuda_in_f32_and_a_bad_value_is_an_error() {
        let pack = |set: &[&str]| Config::default_with(set).unwrap().pack_rows().unwrap();
        assert!(pack(&[]), "the CPU packs");
        assert!(pack(&["model.device=cuda"]), "CUDA in bf16 (auto) packs");
        assert!(!pack(&["model.device=cuda", "model.dtype=f32"]));
        assert!(pack(&["model.device=cuda", "model.dtype=f16"]));
        assert!(pack(&["model.device=cuda", "optimizer.pack_rows=true"]));
        assert!(!pack(&["optimizer.pack_rows=false"]));
        let e = Config::default_with(&["optimizer.pack_rows=yes"]).unwrap_err();
        assert!(
            format!("{e:#}").contains(r#"expected `"auto"`, `true` or `false`"#),
            "{e:#}"
        );
        // the resolved config round-trips, `auto` and a set value alike
        for set in [&[][..], &["optimizer.pack_rows=false"]] {
            let c = Config::default_with(set).unwrap();
            assert_eq!(Config::from_toml(&c.to_toml(), "resolved").unwrap(), c);
        }
    }

    #[test]
    fn the_device_and_dtype_are_parsed_and_checked() {
        let with = Config::default_with;
        let c = with(&[]).unwrap();
        assert_eq!(c.model.device_spec().unwrap(), DeviceSpec::Cpu);
        let dtype = |c: &Config| c.model.compute_dtype().unwrap();
        assert_eq!(dtype(&c), DType::F32, "auto is f32 on the CPU");
        let c = with(&["model.device=cuda"]).unwrap();
        assert_eq!(c.model.device_spec().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!(dtype(&c), DType::BF16, "auto is bf16 on CUDA");
        let c = with(&["model.device=cuda:3", "model.dtype=f32"]).unwrap();
        assert_eq!(c.model.device_spec().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!(dtype(&c), DType::F32);
        assert_eq!(dtype(&with(&["model.dtype=bf16"]).unwrap()), DType::BF16);
        assert_eq!(dtype(&with(&["model.dtype=fp16"]).unwrap()), DType::F16);
        for (set, key) in [
            ("model.device=tpu", "model.device"),
            ("model.device=cuda:x", "model.device"),
            ("model.dtype=fp8", "model.dtype"),
            ("optimizer.loss_scale=0.5", "optimizer.loss_scale"),
            ("optimizer.loss_scale_window=0", "loss_scale_window"),
        ] {
            let e = format!("{:#}", with(&[set]).unwrap_err());
            assert!(e.contains(key), "{set}: {e}");
        }
        // analyses of a CUDA run's checkpoints happen on the host
        let c = with(&["model.device=cuda:1"]).unwrap().on_host();
        assert_eq!(c.model.device_spec().unwrap(), DeviceSpec::Cpu);
        assert_eq!(dtype(&c), DType::F32);
    }

    #[test]
    fn algorithm_settings_are_checked() {
        let bad = |set: &str| format!("{:#}", Config::default_with(&[set]).unwrap_err());
        assert!(bad("algorithm.name=ppoo").contains("one of grpo, rloo"));
        assert!(bad("algorithm.lopti_eta=0.0").contains("lopti_eta"));
        assert!(bad("algorithm.ar_alpha=1.5").contains("ar_alpha"));
        assert!(bad("algorithm.critic=shared").contains("critic"));
        assert!(bad("algorithm.label_smoothing=0.5").contains("label_smoothing"));
        assert!(bad("algorithm.dpo_loss=kto").contains("kto"));
        assert!(bad("algorithm.discopop_tau=0").contains("discopop_tau"));
        assert!(bad("algorithm.rpo_alpha=-1").contains("rpo_alpha"));
        let simpo = Config::default_with(&["algorithm.dpo_loss=simpo", "algorithm.rpo_alpha=1"]);
        let a = simpo.unwrap().algorithm;
        assert_eq!(
            (a.dpo_loss, a.simpo_gamma, a.rpo_alpha),
            (DpoLoss::Simpo, 0.5, 1.0)
        );
        assert!(bad("algorithm.entropy_reward=tokens").contains("tokens"));
        let e = format!(
            "{:#}",
            Config::default_with(&["algorithm.name=gdpo", "algorithm.entropy_reward=token"])
                .unwrap_err()
        );
        assert!(e.contains("gdpo") && e.contains("entropy_reward"), "{e}");
        // ReMax: one sample a prompt is enough (GRPO needs two); no reward it cannot baseline
        let both = |set: &[&str]| format!("{:#}", Config::default_with(set).unwrap_err());
        assert!(bad("rollout.group_size=1").contains("at least 2"));
        let one = Config::default_with(&["algorithm.name=remax", "rollout.group_size=1"]);
        assert_eq!(one.unwrap().rollout.group_size, 1);
        for other in [
            "algorithm.entropy_reward=token",
            "algorithm.filter_groups=true",
        ] {
            let e = both(&["algorithm.name=remax", other]);
            assert!(e.contains("greedy completion"), "{other}: {e}");
        }
        // KTO: its own loss and weights; DPO's loss keys are refused with it, and its with others
        let e = both(&["algorithm.name=kto", "algorithm.dpo_loss=ipo"]);
        assert!(e.contains("kto_loss"), "{e}");
        assert!(both(&["algorithm.name=kto", "algorithm.rpo_alpha=1"]).contains("rpo_alpha"));
        assert!(bad("algorithm.kto_loss=apo_zero_unpaired").contains("name = \"kto\""));
        assert!(bad("algorithm.kto_loss=bco").contains("bco"));
        assert!(bad("algorithm.desirable_weight=0").contains("desirable_weight"));
        assert!(bad("algorithm.undesirable_weight=nan").contains("undesirable_weight"));
        let e = both(&["algorithm.name=kto", "algorithm.mask_truncated=true"]);
        assert!(e.contains("preference data"), "{e}");
        let kto = Config::default_with(&[
            "algorithm.name=kto",
            "algorithm.kto_loss=apo_zero_unpaired",
            "algorithm.desirable_weight=1.33",
            "algorithm.dpo_beta=0.2",
        ])
        .unwrap();
        assert!(kto.preference_stage());
        assert_eq!(
            kto.kto(),
            KtoConfig {
                loss: KtoLoss::ApoZeroUnpaired,
                beta: 0.2,
                desirable_weight: 1.33,
                undesirable_weight: 1.0,
            }
        );
        assert!(bad("rollout.top_p=0.0").contains("rollout.top_p"));
        assert!(bad("rollout.top_p=1.5").contains("rollout.top_p"));
        assert!(bad("rollout.workers=0").contains("workers"));
        let ok = Config::default_with(&[
            "algorithm.name=ppo",
            "algorithm.lopti_eta=-0.5",
            "algorithm.ar_alpha=0.3",
            "algorithm.entropy_reward=token",
            "algorithm.dpo_loss=ipo",
            "algorithm.filter_groups=true",
        ])
        .unwrap();
        assert_eq!(ok.algorithm.lopti_eta, Some(-0.5));
        assert!(ok.algorithm.filter_groups);
        // an option and what it is combined with: the config, or its error as printed
        let both = |option: &str, with: &str| Config::default_with(&[option, with]);
        let both_err = |option: &str, with: &str| format!("{:#}", both(option, with).unwrap_err());
        for set in [
            "algorithm.filter_groups=true",
            "algorithm.mask_truncated=true",
        ] {
            let e = both_err("algorithm.name=dpo", set);
            assert!(e.contains("not on groups of rollouts"), "{e}");
        }
        // the shaped reward parts: parsed with Open-R1's defaults, bad values refused
        let parts = |body: &str| {
            Config::from_toml(&format!("[[reward.parts]]\nname = \"p\"\n{body}"), "test")
        };
        let c = parts("kind = \"cosine\"\nmax_chars = 64").unwrap();
        let p = &c.reward.parts[0];
        assert_eq!(
            (
                p.max_chars,
                p.min_value_wrong,
                p.max_value_correct,
                p.ngram_size
            ),
            (64, -1.0, 1.0, 3)
        );
        let err = |body: &str| format!("{:#}", parts(body).unwrap_err());
        assert!(err("kind = \"cosine\"\nmax_chars = 0").contains("max_chars"));
        assert!(err("kind = \"repetition\"\nmax_penalty = 0.5").contains("penalty ≤ 0"));
        assert!(err("kind = \"repetition\"\nngram_size = 0").contains("ngram_size"));
        assert!(err("kind = \"cosines\"").contains("cosine, repetition"));
        // an external program: its argv and deadline; a program only where the kind takes one
        let c = parts("kind = \"command\"\ncommand = [\"python3\", \"v.py\"]").unwrap();
        let p = &c.reward.parts[0];
        assert_eq!((p.command.len(), p.timeout_ms), (2, 10_000));
        for bad in [
            "kind = \"command\"",
            "kind = \"command\"\ncommand = [\"x\"]\ntimeout_ms = 0",
            "kind = \"math\"\ncommand = [\"x\"]",
        ] {
            assert!(err(bad).contains("needs its program"), "{bad}");
        }
        let clip_cov = "algorithm.policy_loss=clip_cov";
        assert!(both_err(clip_cov, "algorithm.clip_cov_ratio=0").contains("clip_cov_ratio"));
        assert!(both_err(clip_cov, "algorithm.clip_cov_ub=0.5").contains("lb < ub"));
        assert!(both_err(clip_cov, "algorithm.ratio=sequence").contains("token-level"));
        let dppo = "algorithm.policy_loss=dppo_kl";
        assert!(both_err(dppo, "algorithm.ratio=sequence").contains("token-level"));
        assert!(both_err(dppo, "algorithm.dppo_low=0").contains("dppo_low"));
        assert!(
            both_err("algorithm.policy_loss=dppo_tv", "algorithm.dppo_cap=-1").contains("dppo_cap")
        );
        let c = both(dppo, "algorithm.dppo_high=0.05").unwrap().algorithm;
        assert_eq!(
            (c.policy_loss, c.dppo_low, c.dppo_high, c.dppo_cap),
            (PolicyLoss::DppoKl, 0.2, 0.05, 3.0)
        );
        let e = both_err(clip_cov, "algorithm.dual_clip=3.0");
        assert!(e.contains("dual_clip") && e.contains("\"clip_cov\""), "{e}");
        let kl_cov = "algorithm.policy_loss=kl_cov";
        assert!(both_err(kl_cov, "algorithm.kl_cov_ratio=1.5").contains("kl_cov_ratio"));
        assert!(both_err(kl_cov, "algorithm.kl_cov_coef=-1").contains("kl_cov_coef"));
        let c = both(kl_cov, "algorithm.kl_cov_ratio=0.002")
            .unwrap()
            .algorithm;
        assert_eq!(
            (c.policy_loss, c.kl_cov_ratio, c.kl_cov_coef),
            (PolicyLoss::KlCov, 0.002, 1.0)
        );
        let cispo = "algorithm.policy_loss=cispo";
        assert!(both_err(cispo, "algorithm.dual_clip=3.0").contains("dual_clip"));
        assert!(both_err(cispo, "algorithm.cispo_max=0").contains("cispo_max"));
        assert!(both_err(cispo, "algorithm.name=dpo").contains("DPO"));
        let c = both(cispo, "algorithm.cispo_max=4.0").unwrap();
        assert_eq!(
            (c.algorithm.policy_loss, c.algorithm.cispo_max),
            (PolicyLoss::Cispo, 4.0)
        );
        let sapo = "algorithm.policy_loss=sapo";
        assert!(both_err(sapo, "algorithm.sapo_tau_neg=0").contains("sapo_tau_neg"));
        assert!(both_err(sapo, "algorithm.dual_clip=3.0").contains("dual_clip"));
        let c = both(sapo, "algorithm.sapo_tau_pos=2.0").unwrap();
        assert_eq!(
            (
                c.algorithm.policy_loss,
                c.algorithm.sapo_tau_pos,
                c.algorithm.sapo_tau_neg
            ),
            (PolicyLoss::Sapo, 2.0, 1.05)
        );
        assert!(bad("algorithm.policy_loss=vespo").contains("vespo"));
        // GMPO: its own sequence mean, so the GRPO aggregation and no per-token correction
        let gmpo = "algorithm.policy_loss=geo_mean";
        assert!(bad(gmpo).contains("loss_aggregation = \"grpo\""));
        let grpo_agg = "algorithm.loss_aggregation=grpo";
        let c = both(gmpo, grpo_agg).unwrap();
        assert_eq!(c.algorithm.policy_loss, PolicyLoss::GeoMean);
        let e = format!(
            "{:#}",
            Config::default_with(&[
                gmpo,
                grpo_agg,
                "algorithm.behaviour_correction=token_truncate"
            ])
            .unwrap_err()
        );
        assert!(e.contains("behaviour_correction"), "{e}");
        let e = format!(
            "{:#}",
            Config::default_with(&[gmpo, grpo_agg, "algorithm.ratio=sequence"]).unwrap_err()
        );
        assert!(e.contains("ratio = \"sequence\""), "{e}");
        assert!(both_err("algorithm.policy_loss=gpg", "algorithm.ratio=sequence").contains("gpg"));
        assert!(bad("algorithm.top_entropy_quantile=0").contains("top_entropy_quantile"));
        assert!(bad("algorithm.top_entropy_quantile=1.5").contains("(0, 1]"));
        let e = both_err("algorithm.top_entropy_quantile=0.2", "algorithm.name=kto");
        assert!(e.contains("top_entropy_quantile"), "{e}");
        let e = format!(
            "{:#}",
            Config::default_with(&[gmpo, grpo_agg, "algorithm.top_entropy_quantile=0.2"])
                .unwrap_err()
        );
        assert!(e.contains("top_entropy_quantile"), "{e}");
        assert!(
            both_err("algorithm.policy_loss=gpg", "algorithm.dual_clip=3").contains("dual_clip")
        );
        let lora = "lora.rank=8";
        let c = both(lora, "lora.targets=[\"v_proj\", \"q_proj\", \"q_proj\"]").unwrap();
        let lc = c.lora.config().unwrap();
        assert_eq!((lc.rank, lc.alpha, lc.scale()), (8, 16.0, 2.0));
        assert_eq!(lc.targets, [model::lora::Target::Q, model::lora::Target::V]);
        assert_eq!(Config::default().lora.config(), None);
        assert!(both_err(lora, "lora.alpha=0").contains("lora.alpha"));
        assert!(both_err(lora, "lora.targets=[]").contains("target"));
        assert!(both_err(lora, "lora.targets=[\"lm_head\"]").contains("lm_head"));
        let mask = "optimizer.subnetwork_mask=m.masks.safetensors";
        assert!(both_err(lora, mask).contains("subnetwork_mask"));
        assert!(both(lora, "algorithm.name=dpo").is_ok());
        let corrected = "algorithm.behaviour_correction=sequence_mask";
        let c = both(corrected, "algorithm.behaviour_cap=2.0").unwrap();
        assert_eq!(
            (c.algorithm.behaviour_correction, c.algorithm.behaviour_cap),
            (BehaviourCorrection::SequenceMask, 2.0)
        );
        assert!(both_err(corrected, "algorithm.behaviour_cap=0").contains("behaviour_cap"));
        assert!(both_err(corrected, "algorithm.name=dpo").contains("DPO"));
        assert!(bad("algorithm.behaviour_correction=tis").contains("tis"));
        // M2PO compares the recomputed log-probs with the sampler's: only with a correction
        let m2 = both(corrected, "algorithm.m2_threshold=0.04").unwrap();
        assert_eq!(m2.algorithm.m2_threshold, Some(0.04));
        assert!(bad("algorithm.m2_threshold=0.04").contains("needs a behaviour_correction"));
        assert!(both_err(corrected, "algorithm.m2_threshold=0").contains("m2_threshold"));
        let masked = Config::default_with(&["algorithm.off_policy_mask=0.5"]).unwrap();
        assert_eq!(masked.algorithm.off_policy_mask, Some(0.5));
        let e = both_err("algorithm.off_policy_mask=0.5", "algorithm.name=dpo");
        assert!(e.contains("off_policy_mask"), "{e}");
        let teacher = "distill.teacher=runs/teacher";
        let c = both(teacher, "distill.kl_coef=0.5").unwrap();
        assert_eq!(
            (
                c.distill.teacher.as_str(),
                c.distill.kl_coef,
                c.distill.pure
            ),
            ("runs/teacher", 0.5, false)
        );
        assert!(both(teacher, "distill.pure=true").is_ok());
        assert!(both_err(teacher, "distill.kl_coef=-1").contains("kl_coef"));
        assert!(both(teacher, "distill.kl_coef=0").is_ok());
        let pure = Config::default_with(&[teacher, "distill.pure=true", "distill.kl_coef=0"]);
        assert!(format!("{:#}", pure.unwrap_err()).contains("kl_coef"));
        assert!(both_err(teacher, "algorithm.name=dpo").contains("DPO"));
        assert!(bad("distill.pure=true").contains("needs a teacher"));
        let pure = Config::default_with(&[teacher, "distill.pure=true", "algorithm.name=ppo"]);
        assert!(format!("{:#}", pure.unwrap_err()).contains("PPO"));
        let pure = [teacher, "distill.pure=true", "algorithm.filter_groups=true"];
        let e = format!("{:#}", Config::default_with(&pure).unwrap_err());
        assert!(e.contains("filter_groups"), "{e}");
        assert_eq!(Config::from_toml(&ok.to_toml(), "resolved").unwrap(), ok);
    }

    /// `configs/default.toml` is what the README says it is: the built-in default, every key
    /// written out.
    #[test]
    fn the_default_preset_is_the_built_in_default_with_every_key_shown() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/default.toml");
        let text = std::fs::read_to_string(path).unwrap();
        assert_eq!(
            Config::from_toml(&text, "default.toml").unwrap(),
            Config::default()
        );
        // section.key paths (an array of tables by its first table's keys)
        fn keys(t: &toml::Table, at: &str, out: &mut Vec<String>) {
            for (k, v) in t {
                let path = format!("{at}{k}");
                match v {
                    toml::Value::Table(inner) => keys(inner, &format!("{path}."), out),
                    toml::Value::Array(a) => match a.first() {
                        Some(toml::Value::Table(inner)) => keys(inner, &format!("{path}."), out),
                        _ => out.push(path),
                    },
                    _ => out.push(path),
                }
            }
        }
        let (mut shown, mut all) = (Vec::new(), Vec::new());
        keys(&text.parse().unwrap(), "", &mut shown);
        keys(&Config::default().to_toml().parse().unwrap(), "", &mut all);
        let missing: Vec<&String> = all.iter().filter(|k| !shown.contains(k)).collect();
        assert!(missing.is_empty(), "default.toml does not show {missing:?}");
    }

    #[test]
    fn every_shipped_preset_parses_and_its_sweep_variants_apply() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let mut seen = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let c = Config::from_toml(
                &std::fs::read_to_string(&p).unwrap(),
                &p.display().to_string(),
            )
            .unwrap_or_else(|e| panic!("{}: {e:#}", p.display()));
            for v in &c.sweep.variants {
                c.with_overrides(&v.set)
                    .unwrap_or_else(|e| panic!("{} variant {}: {e:#}", p.display(), v.name));
            }
            seen += 1;
        }
        assert!(seen >= 5);
    }
}
