//! The rollout worker pool: compute threads that take prompts from a shared feed, generate
//! `group_size` completions per prompt with the newest verified weights, score them, and send
//! one Arrow record batch per group down a bounded channel.
//!
//! A group's sampling streams depend only on the run seed and its `group_id`, and by default
//! every group is generated alone (one prompt, `group_size` rows, no padding), so a group's
//! completions do not depend on which worker made them or when: with `max_staleness = 0` a run
//! is reproducible. With `groups_per_batch` > 1 a worker batches the groups it may start at once
//! and refills the batch as its rows finish (continuous batching across groups), each group
//! still from its own streams: the same completions up to the rounding of the batch shape.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use crossbeam_channel::Sender;
use datasets::{Cursor, Loader, Record};
use model::error::Regrow;
use model::generate::{
    generate_prompts, generate_stream, Completion, Decoded, FinishReason, GenerationConfig, Prompt,
    Room,
};
use model::{ModelError, Weights};
use serde::{Deserialize, Serialize};

use crate::policy::{Admission, PolicyStore, Snapshot, WorkerPolicy};
use crate::schema::{to_batch, Finish, Sample};
use crate::task::{EntropyReward, Task};

/// Where the prompt feed stands, as a checkpoint stores it: the first group the learner has
/// not consumed, and the data cursor before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FeedState {
    pub cursor: Cursor,
    pub next_group: u64,
}

/// Hands out prompts in the loader's order, one `group_id` per draw.
pub struct Feed {
    loader: Loader,
    next_group: u64,
    /// Groups handed out and not yet consumed, with the cursor before each.
    pending: BTreeMap<u64, Cursor>,
}

impl Feed {
    pub fn new(mut loader: Loader, state: FeedState) -> Self {
        loader.seek(state.cursor);
        Feed {
            loader,
            next_group: state.next_group,
            pending: BTreeMap::new(),
        }
    }

    pub fn next_group(&mut self) -> datasets::Result<(u64, Record)> {
        let before = self.loader.cursor();
        let record = self.loader.next_record()?;
        let id = self.next_group;
        self.next_group += 1;
        self.pending.insert(id, before);
        Ok((id, record))
    }

    /// The learner consumed (or dropped) a group.
    pub fn done(&mut self, group_id: u64) {
        self.pending.remove(&group_id);
    }

    /// The feed behind `feed`'s lock, also where a thread panicked while holding it (a bug
    /// in a worker, say): the learner still saves the run's checkpoint. What the lock guards is
    /// consistent at every point such a panic can leave it: a draw records its group as
    /// pending only once its record is read, and [`Feed::state`] resumes from the first
    /// pending group's cursor, so at worst a prompt is drawn again.
    pub fn locked(feed: &Mutex<Feed>) -> MutexGuard<'_, Feed> {
        feed.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Resuming here regenerates every group not yet consumed.
    pub fn state(&self) -> FeedState {
        match self.pending.first_key_value() {
            Some((&group, &cursor)) => FeedState {
                cursor,
                next_group: group,
            },
            None => FeedState {
                cursor: self.loader.cursor(),
                next_group: self.next_group,
            },
        }
    }
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub workers: usize,
    pub group_size: usize,
    /// Sampling settings; the seed is replaced per group.
    pub generation: GenerationConfig,
    pub seed: u64,
    /// EM-RL: reward each completion by its own (negative) entropy instead of the verifier; the
    /// verifier's total is kept as the reward part `verifier`.
    pub entropy_reward: EntropyReward,
    /// The groups a worker's batch holds (1: each group alone). Above 1 a worker starts as many
    /// as the admission lets it start at once, up to that many, and keeps the batch full: the
    /// rows that finish are refilled with the next groups it may start under the same version
    /// (`stream_groups`). Each group samples from its own streams either way; a larger batch
    /// keeps a GPU busy, at the price of the float rounding of other batch shapes, so that a
    /// run is reproducible only with 1.
    pub groups_per_batch: usize,
    /// ReMax (verl's `adv_estimator = "remax"`): each group also decodes its prompt greedily,
    /// as one more row of its batch ([`rows_of`]), scored as the samples are; its reward and
    /// correctness join every sample of the group as the reward parts `greedy_reward` and
    /// `greedy_correct` (the baseline; the greedy completion itself is not trained on).
    pub greedy_baseline: bool,
}

/// One scored group.
#[derive(Debug, Clone)]
pub struct Rollout {
    pub batch: RecordBatch,
    pub worker: usize,
    /// Generation and scoring time of the group.
    pub seconds: f64,
    /// Completion tokens generated.
    pub tokens: usize,
    /// Which of its worker's generations made the group (counted per worker): groups
    /// generated together share it.
    pub generation: u64,
}

/// What workers send to the learner.
#[derive(Debug)]
pub enum Event {
    Rollout(Rollout),
    /// A group that could not be generated (counted, its quota returned).
    Failed {
        group_id: u64,
        error: String,
    },
    /// The feed cannot go on (e.g. too many bad rows), or a worker panicked: the run must stop.
    Fatal(String),
    /// What one of a worker's generations decoded (sent after its groups): how full its
    /// batches ran.
    Decoded(Decoded),
}

/// Why a group could not be generated.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutError {
    pub message: String,
    /// The device ran out of memory: the group may fit once other work (the learner's step, the
    /// other workers' groups) has freed some.
    pub out_of_memory: bool,
}

impl std::fmt::Display for RolloutError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl RolloutError {
    fn other(e: impl std::fmt::Display) -> Self {
        RolloutError {
            message: e.to_string(),
            out_of_memory: false,
        }
    }

    fn generation(e: ModelError) -> Self {
        RolloutError {
            out_of_memory: e.is_out_of_memory(),
            message: e.to_string(),
        }
    }
}

/// The waits before each new try of a group that ran out of device memory: 0.1 s doubling to
/// 3.2 s, about 12 s in all, longer than a learner step holds its peak.
pub const OUT_OF_MEMORY_WAITS: [f64; 8] = [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 3.2, 3.2];

/// `generate_group()`, tried again after each of [`OUT_OF_MEMORY_WAITS`] while it runs out of
/// device memory (and `stop` is not set): a worker beside the learner on one GPU would otherwise
/// drop every group it starts while the learner's step holds the memory. Other errors, and the
/// last out-of-memory one, are the group's failure.
pub fn retry_out_of_memory<T>(
    stop: &AtomicBool,
    wait: impl FnMut(Duration),
    generate_group: impl FnMut() -> Result<T, RolloutError>,
) -> Result<T, RolloutError> {
    after_out_of_memory_waits(stop, wait, |e| e.out_of_memory, generate_group).map_err(|e| {
        if e.out_of_memory && !stop.load(Ordering::SeqCst) {
            RolloutError {
                message: format!(
                    "{} (out of device memory in {} tries)",
                    e.message,
                    OUT_OF_MEMORY_WAITS.len() + 1
                ),
                ..e
            }
        } else {
            e
        }
    })
}

/// `attempt()`, tried again after each of [`OUT_OF_MEMORY_WAITS`] while its error
/// `is_out_of_memory` and `stop` is not set; otherwise its result, the last error included.
pub fn after_out_of_memory_waits<T, E>(
    stop: &AtomicBool,
    mut wait: impl FnMut(Duration),
    is_out_of_memory: impl Fn(&E) -> bool,
    mut attempt: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    let mut waits = OUT_OF_MEMORY_WAITS.iter();
    loop {
        match attempt() {
            Err(e) if is_out_of_memory(&e) && !stop.load(Ordering::SeqCst) => match waits.next() {
                Some(&s) => wait(Duration::from_secs_f64(s)),
                None => return Err(e),
            },
            done => return done,
        }
    }
}

/// One result per group of `groups`, from `generate` (which generates a batch of them, or fails
/// them all). A batch that fails is split in halves, recursively: one that ran out of device
/// memory may fit so, and a group whose generation fails (a prompt token past the vocabulary,
/// say) then fails alone, not with the groups beside it. A single group that runs out of memory
/// is tried again after waits ([`retry_out_of_memory`]).
pub fn generate_fitting<G, R>(
    stop: &AtomicBool,
    wait: &mut impl FnMut(Duration),
    groups: &[G],
    generate: &mut impl FnMut(&[G]) -> Result<Vec<Result<R, RolloutError>>, RolloutError>,
) -> Vec<Result<R, RolloutError>> {
    let all = if groups.len() > 1 {
        match generate(groups) {
            Err(_) => {
                let (a, b) = groups.split_at(groups.len() / 2);
                let mut out = generate_fitting(stop, wait, a, generate);
                out.extend(generate_fitting(stop, wait, b, generate));
                return out;
            }
            other => other,
        }
    } else {
        retry_out_of_memory(stop, &mut *wait, || generate(groups))
    };
    all.unwrap_or_else(|e| groups.iter().map(|_| Err(e.clone())).collect())
}

/// The seed of a group's sampling streams.
pub fn group_seed(seed: u64, group_id: u64) -> u64 {
    datasets::rng::mix(seed, 0x6E0, group_id)
}

/// Generates and scores one group under `w` (detached weights of `version`).
pub fn rollout_group(
    task: &Task,
    w: &Weights,
    version: u64,
    group_id: u64,
    record: &Record,
    cfg: &PoolConfig,
) -> Result<Vec<Sample>, RolloutError> {
    let (mut out, _) = rollout_groups(task, w, version, &[(group_id, record.clone())], cfg)?;
    out.pop().expect("one group in, one out")
}

/// Each group's samples, or why that group failed.
pub type GroupResults = Vec<Result<Vec<Sample>, RolloutError>>;

/// Generates `groups` in one batch under `w` (detached weights of `version`), each from its own
/// sampling streams (`group_seed`, row), and scores them: each group's samples, or why that group
/// failed (its prompt), and what the generation decoded. The error is generation's, which fails
/// them all.
pub fn rollout_groups(
    task: &Task,
    w: &Weights,
    version: u64,
    groups: &[(u64, Record)],
    cfg: &PoolConfig,
) -> Result<(GroupResults, Decoded), RolloutError> {
    let prompts: Vec<Result<Vec<u32>, RolloutError>> = groups
        .iter()
        .map(|(_, record)| task.prompt_ids(record).map_err(RolloutError::other))
        .collect();
    // the rows of the groups whose prompts are good, each with its stream (and ReMax's greedy
    // row last)
    let mut rows = Vec::new();
    for ((group_id, _), prompt) in groups.iter().zip(&prompts) {
        if let Ok(prompt) = prompt {
            rows.extend((0..rows_of(cfg)).map(|k| group_row(cfg, *group_id, prompt, k)));
        }
    }
    let mut completions: Vec<Option<Completion>> = vec![None; rows.len()];
    let slots = rows.len();
    let decoded = generate_prompts(
        w,
        rows,
        &cfg.generation,
        Some(&task.tokenizer),
        slots,
        |i, c| {
            completions[i] = Some(c);
            Ok(())
        },
    )
    .map_err(RolloutError::generation)?;
    let mut completions = completions.into_iter().flatten();
    let results = groups
        .iter()
        .zip(prompts)
        .map(|((group_id, record), prompt)| {
            // a group whose prompt failed has no rows among the completions
            let prompt = prompt?;
            let rows = completions.by_ref().take(rows_of(cfg)).collect();
            Ok(score_group(
                task, version, *group_id, record, &prompt, rows, cfg,
            ))
        })
        .collect();
    Ok((results, decoded))
}

/// The rows a group generates: `group_size` samples, and with ReMax its greedy completion.
fn rows_of(cfg: &PoolConfig) -> usize {
    cfg.group_size + usize::from(cfg.greedy_baseline)
}

/// Row `k` of a group: a sample from the group's stream `k`, or (`k = group_size`) ReMax's
/// greedy completion of its prompt.
fn group_row(cfg: &PoolConfig, group_id: u64, prompt: &[u32], k: usize) -> Prompt {
    Prompt {
        ids: prompt.to_vec(),
        stream: (group_seed(cfg.seed, group_id), k as u64),
        greedy: k == cfg.group_size,
    }
}

/// One group's rows ([`rows_of`]) scored into samples; ReMax's greedy row, last, scored as
/// the samples are, adds its reward and correctness to each as the reward parts
/// `greedy_reward` and `greedy_correct`.
fn score_group(
    task: &Task,
    version: u64,
    group_id: u64,
    record: &Record,
    prompt: &[u32],
    mut rows: Vec<Completion>,
    cfg: &PoolConfig,
) -> Vec<Sample> {
    let reference = task.reference(record);
    let baseline = match cfg.greedy_baseline {
        true => rows.pop().map(|c| {
            let scored = task.score(&c.text.unwrap_or_default(), c.tokens.len(), &reference);
            (
                scored.total,
                f32::from(u8::from(scored.correct == Some(true))),
            )
        }),
        false => None,
    };
    rows.into_iter()
        .enumerate()
        .map(|(k, c)| {
            let text = c.text.unwrap_or_default();
            let scored = task.score(&text, c.tokens.len(), &reference);
            let finish = if !scored.failures.is_empty() {
                Finish::Error
            } else {
                match c.finish {
                    FinishReason::Stop => Finish::Stop,
                    FinishReason::Length => Finish::Length,
                }
            };
            let mut parts = scored.parts;
            parts.push((
                "correct".into(),
                f32::from(u8::from(scored.correct == Some(true))),
            ));
            let reward = match cfg.entropy_reward.reward(&c.logprobs, &c.entropies) {
                Some(r) => {
                    parts.push(("verifier".into(), scored.total));
                    r
                }
                None => scored.total,
            };
            if let Some((reward, correct)) = baseline {
                parts.push(("greedy_reward".into(), reward));
                parts.push(("greedy_correct".into(), correct));
            }
            Sample {
                sample_id: group_id * cfg.group_size as u64 + k as u64,
                prompt_id: record.id,
                group_id,
                policy_version: version,
                prompt_ids: prompt.to_vec(),
                completion_ids: c.tokens,
                behavior_logprobs: c.logprobs,
                finish,
                reward,
                reward_parts: parts,
                completion_text: text,
            }
        })
        .collect()
}

/// Running rollout workers.
pub struct Pool {
    handles: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    admission: Arc<Admission>,
}

impl Pool {
    pub fn spawn(
        cfg: PoolConfig,
        task: Arc<Task>,
        feed: Arc<Mutex<Feed>>,
        store: Arc<PolicyStore<Weights>>,
        admission: Arc<Admission>,
        sender: Sender<Event>,
    ) -> Pool {
        let stop = Arc::new(AtomicBool::new(false));
        let handles = (0..cfg.workers.max(1))
            .map(|worker| {
                let (cfg, task, feed, store, admission, sender, stop) = (
                    cfg.clone(),
                    task.clone(),
                    feed.clone(),
                    store.clone(),
                    admission.clone(),
                    sender.clone(),
                    stop.clone(),
                );
                std::thread::Builder::new()
                    .name(format!("rollout-{worker}"))
                    .spawn(move || {
                        guarded(worker, &sender, || {
                            work(
                                worker, &cfg, &task, &feed, &store, &admission, &sender, &stop,
                            )
                        })
                    })
                    .expect("spawn a rollout worker")
            })
            .collect();
        Pool {
            handles,
            stop,
            admission,
        }
    }

    /// Stops the workers after their current group and waits for them. The receiver should be
    /// dropped (or drained) first so that no worker waits on a full channel.
    pub fn stop(self) {
        self.stop.store(true, Ordering::SeqCst);
        self.admission.stop();
        for h in self.handles {
            let _ = h.join();
        }
    }
}

/// Runs worker `index`'s `work`. A panic in it (a bug) becomes an [`Event::Fatal`], so the
/// learner ends the run (saving the steps done) rather than wait for the groups the worker
/// had drawn, whose quota it would never return.
pub fn guarded(index: usize, sender: &Sender<Event>, work: impl FnOnce()) {
    if let Err(payload) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)) {
        let message = panic_message(&*payload);
        let _ = sender.send(Event::Fatal(format!(
            "rollout worker {index} panicked: {message}"
        )));
    }
}

/// The message a panic carries (its payload's text).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    match (
        payload.downcast_ref::<&str>(),
        payload.downcast_ref::<String>(),
    ) {
        (Some(s), _) => s.to_string(),
        (_, Some(s)) => s.clone(),
        _ => "no message".into(),
    }
}

/// Batches that fitted after a worker's batches were halved for want of device memory, before
/// one tries twice as many groups again (doubled after each try that runs out).
pub const PROBE_BATCHES: usize = 16;

/// How many groups a worker's streamed batch holds (`rollout.groups_per_batch`, halved while
/// batches run out of device memory, down to one group; see [`Regrow`]), so that a shortage
/// beside the learner neither fails every batch nor keeps the batches small once it has passed.
pub fn batch_groups(groups_per_batch: usize) -> Regrow<usize> {
    Regrow::new(groups_per_batch.max(1), PROBE_BATCHES)
}

/// Twice `groups` groups, up to `most`; None at `most`.
fn more_groups(groups: usize, most: usize) -> Option<usize> {
    (groups < most).then(|| (2 * groups).min(most))
}

/// What a worker shares with the pool, and where its groups go.
struct Worker<'a> {
    index: usize,
    cfg: &'a PoolConfig,
    task: &'a Task,
    feed: &'a Mutex<Feed>,
    admission: &'a Admission,
    sender: &'a Sender<Event>,
    stop: &'a AtomicBool,
    /// The worker's generations so far.
    generations: u64,
}

impl Worker<'_> {
    /// Sends a group's samples to the learner, or its failure (the group is done with and its
    /// quota returned). False once the learner no longer listens.
    fn send(&self, group_id: u64, result: Result<Vec<Sample>, RolloutError>, seconds: f64) -> bool {
        let event = match result.and_then(|samples| {
            let tokens = samples.iter().map(|s| s.completion_ids.len()).sum();
            to_batch(&samples)
                .map(|batch| (batch, tokens))
                .map_err(RolloutError::other)
        }) {
            Ok((batch, tokens)) => Event::Rollout(Rollout {
                batch,
                worker: self.index,
                seconds,
                tokens,
                generation: self.generations,
            }),
            Err(error) => {
                Feed::locked(self.feed).done(group_id);
                self.admission.release(self.cfg.group_size);
                Event::Failed {
                    group_id,
                    error: error.message,
                }
            }
        };
        self.sender.send(event).is_ok()
    }

    /// Sends generated `groups`' results, each timed at its share of `seconds`, then what
    /// their generations decoded. False once the learner no longer listens.
    fn send_generated(
        &self,
        groups: &[(u64, Record)],
        results: GroupResults,
        seconds: f64,
        decoded: Decoded,
    ) -> bool {
        let share = seconds / groups.len().max(1) as f64;
        groups
            .iter()
            .zip(results)
            .all(|((group_id, _), result)| self.send(*group_id, result, share))
            && self.sender.send(Event::Decoded(decoded)).is_ok()
    }

    /// The next group from the feed; on the feed's error, tells the learner the run must stop.
    fn draw(&self) -> Option<(u64, Record)> {
        match Feed::locked(self.feed).next_group() {
            Ok(group) => Some(group),
            Err(e) => {
                let _ = self.sender.send(Event::Fatal(e.to_string()));
                None
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn work(
    index: usize,
    cfg: &PoolConfig,
    task: &Task,
    feed: &Mutex<Feed>,
    store: &PolicyStore<Weights>,
    admission: &Admission,
    sender: &Sender<Event>,
    stop: &AtomicBool,
) {
    let mut worker = Worker {
        index,
        cfg,
        task,
        feed,
        admission,
        sender,
        stop,
        generations: 0,
    };
    let mut policy = WorkerPolicy::new(store);
    let checksum = |w: &Weights| w.checksum().unwrap_or(0);
    let mut batch = batch_groups(cfg.groups_per_batch);
    while !stop.load(Ordering::SeqCst) {
        if admission
            .admit(cfg.group_size, Duration::from_millis(200))
            .is_none()
        {
            continue;
        }
        // as many more groups as may start now, up to the batch
        batch.grow(|groups| more_groups(groups, cfg.groups_per_batch));
        let mut admitted = 1;
        while admitted < batch.size() && admission.admit(cfg.group_size, Duration::ZERO).is_some() {
            admitted += 1;
        }
        let Some(groups) = (0..admitted)
            .map(|_| worker.draw())
            .collect::<Option<Vec<_>>>()
        else {
            return;
        };
        worker.generations += 1;
        let listening = match policy.refresh(store, checksum) {
            Ok(_) if cfg.groups_per_batch > 1 => {
                let streamed = stream_groups(&worker, policy.snapshot(), groups, batch.size());
                match streamed {
                    Streamed::Generated => batch.fitted(),
                    Streamed::OutOfMemory if !batch.ran_out() => {
                        batch.set((batch.size() / 2).max(1));
                    }
                    _ => {}
                }
                streamed != Streamed::Closed
            }
            Ok(_) => {
                let start = Instant::now();
                let (results, decoded) = generate_counted(&worker, policy.snapshot(), &groups);
                let seconds = start.elapsed().as_secs_f64();
                worker.send_generated(&groups, results, seconds, decoded)
            }
            Err(e) => groups
                .iter()
                .all(|(group_id, _)| worker.send(*group_id, Err(RolloutError::other(&e)), 0.0)),
        };
        if !listening {
            return;
        }
    }
}

/// [`generate_fitting`] of `groups` under `snap` (in halves where a batch fails, a single group
/// tried again after out-of-memory waits): each group's result, and what its generations
/// decoded together.
fn generate_counted(
    w: &Worker,
    snap: &Snapshot<Weights>,
    groups: &[(u64, Record)],
) -> (GroupResults, Decoded) {
    let mut decoded = Decoded::default();
    let results = generate_fitting(w.stop, &mut std::thread::sleep, groups, &mut |part| {
        let (results, d) = rollout_groups(w.task, &snap.weights, snap.version, part, w.cfg)?;
        decoded += d;
        Ok(results)
    });
    (results, decoded)
}

/// A group under way in a streamed batch.
struct InFlight {
    group_id: u64,
    record: Record,
    prompt: Vec<u32>,
    /// Its rows' completions ([`rows_of`]), as they finish.
    rows: Vec<Option<Completion>>,
}

/// The groups of one streamed batch and the rows handed to the generation.
struct StreamState {
    groups: Vec<Option<InFlight>>,
    /// Rows not yet handed out: (group, row).
    waiting: VecDeque<(usize, usize)>,
    /// The (group, row) of each prompt handed out, in order.
    handed: Vec<(usize, usize)>,
    /// When the last group was sent: each group is timed from there.
    last: Instant,
    /// The learner stopped listening, or the feed failed.
    closed: bool,
}

/// How a streamed batch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Streamed {
    Generated,
    /// It ran out of device memory (its unfinished groups were then generated in halves).
    OutOfMemory,
    /// It failed otherwise (likewise).
    Failed,
    /// The learner no longer listens, or the feed failed: the worker stops.
    Closed,
}

/// Generates `groups` in one continuously batched generation of `groups_in_batch ×
/// group_size` rows under `snap`, and refills it: once a group's worth of rows have finished, the
/// next waiting rows take their slots (a group's rows in one prefill of its prompt), and when
/// none wait, another group is admitted while the quota allows and no newer
/// policy has been published (a batch never outlives its version; see
/// [`Admission::admit_under`]). Each group is scored and sent once its last row finishes, timed
/// from the group sent before it. If the generation fails, the groups it left unfinished go
/// through [`generate_fitting`] (in halves, a single group tried again after out-of-memory
/// waits).
fn stream_groups(
    w: &Worker,
    snap: &Snapshot<Weights>,
    groups: Vec<(u64, Record)>,
    groups_in_batch: usize,
) -> Streamed {
    let cfg = w.cfg;
    let state = std::cell::RefCell::new(StreamState {
        groups: Vec::new(),
        waiting: Default::default(),
        handed: Vec::new(),
        last: Instant::now(),
        closed: false,
    });
    // a group's prompt, or its failure sent at once
    let add = |st: &mut StreamState, (group_id, record): (u64, Record)| match w
        .task
        .prompt_ids(&record)
    {
        Ok(prompt) => {
            let g = st.groups.len();
            st.waiting.extend((0..rows_of(cfg)).map(|k| (g, k)));
            st.groups.push(Some(InFlight {
                group_id,
                record,
                prompt,
                rows: vec![None; rows_of(cfg)],
            }));
        }
        Err(e) => st.closed |= !w.send(group_id, Err(RolloutError::other(e)), 0.0),
    };
    for group in groups {
        add(&mut state.borrow_mut(), group);
    }
    let next_prompt = || {
        let mut st = state.borrow_mut();
        loop {
            if let Some((g, k)) = st.waiting.pop_front() {
                st.handed.push((g, k));
                let group = st.groups[g].as_ref().expect("a waiting row's group");
                return Some(group_row(cfg, group.group_id, &group.prompt, k));
            }
            if st.closed
                || w.stop.load(Ordering::SeqCst)
                || !w.admission.admit_under(cfg.group_size, snap.version)
            {
                return None;
            }
            match w.draw() {
                Some(group) => add(&mut st, group),
                None => {
                    st.closed = true;
                    return None;
                }
            }
        }
    };
    let on_done = |i: usize, c: Completion| {
        let mut st = state.borrow_mut();
        let (g, k) = st.handed[i];
        let group = st.groups[g].as_mut().expect("a running row's group");
        group.rows[k] = Some(c);
        if group.rows.iter().all(Option::is_some) {
            let group = st.groups[g].take().expect("checked");
            let samples = score_group(
                w.task,
                snap.version,
                group.group_id,
                &group.record,
                &group.prompt,
                group.rows.into_iter().flatten().collect(),
                cfg,
            );
            let seconds = st.last.elapsed().as_secs_f64();
            st.last = Instant::now();
            if !w.send(group.group_id, Ok(samples), seconds) {
                st.closed = true;
                return Err(model::ModelError::Generation(
                    "the learner stopped taking rollouts".into(),
                ));
            }
        }
        Ok(())
    };
    let room = Room {
        slots: groups_in_batch * rows_of(cfg),
        longest: 0,
        refills: true,
        refill_rows: rows_of(cfg),
    };
    let generated = generate_stream(
        &snap.weights,
        &cfg.generation,
        Some(&w.task.tokenizer),
        room,
        next_prompt,
        on_done,
    );
    let st = state.into_inner();
    if st.closed {
        return Streamed::Closed;
    }
    let ended = match generated {
        Ok(decoded) => {
            if w.sender.send(Event::Decoded(decoded)).is_err() {
                return Streamed::Closed;
            }
            return Streamed::Generated;
        }
        Err(e) if e.is_out_of_memory() => Streamed::OutOfMemory,
        Err(_) => Streamed::Failed,
    };
    let unfinished: Vec<(u64, Record)> = st
        .groups
        .into_iter()
        .flatten()
        .map(|g| (g.group_id, g.record))
        .collect();
    let (results, decoded) = generate_counted(w, snap, &unfinished);
    let seconds = st.last.elapsed().as_secs_f64();
    if w.send_generated(&unfinished, results, seconds, decoded) {
        ended
    } else {
        Streamed::Closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oom(n: usize) -> RolloutError {
        RolloutError {
            message: format!("out of memory {n}"),
            out_of_memory: true,
        }
    }

    #[test]
    fn a_batch_grows_by_doubling_up_to_groups_per_batch() {
        assert_eq!(more_groups(1, 8), Some(2));
        assert_eq!(more_groups(3, 4), Some(4));
        assert_eq!(more_groups(4, 4), None);
        assert_eq!(batch_groups(0).size(), 1, "at least a group");
    }

    #[test]
    fn a_failed_batch_is_split_and_a_single_group_out_of_memory_waits() {
        // room for two groups a batch, none with group 6; group 5 runs out twice alone as well;
        // group 2 fails every batch it is in, for another reason
        let stop = AtomicBool::new(false);
        let mut batches = Vec::new();
        let mut fives = 0;
        let mut waits = 0;
        let groups: Vec<usize> = (0..7).collect();
        let out = generate_fitting(
            &stop,
            &mut |_| waits += 1,
            &groups,
            &mut |part: &[usize]| {
                batches.push(part.to_vec());
                if part == [5] {
                    fives += 1;
                }
                if part.len() > 2 || part.contains(&6) || (part == [5] && fives <= 2) {
                    return Err(oom(part.len()));
                }
                if part.contains(&2) {
                    return Err(RolloutError::other("a token past the vocabulary"));
                }
                Ok(part.iter().map(|&g| Ok(10 * g)).collect())
            },
        );
        let got: Vec<Result<usize, bool>> = out
            .into_iter()
            .map(|r| r.map_err(|e| e.out_of_memory))
            .collect();
        assert_eq!(
            got,
            vec![Ok(0), Ok(10), Err(false), Ok(30), Ok(40), Ok(50), Err(true)]
        );
        // 0..7 → [0, 1, 2] → [0], [1, 2] → [1], [2] (once); [3, 4, 5, 6] → [3, 4], [5, 6] →
        // [5] (three tries), [6] (nine)
        let split: Vec<Vec<usize>> = vec![
            vec![0, 1, 2, 3, 4, 5, 6],
            vec![0, 1, 2],
            vec![0],
            vec![1, 2],
            vec![1],
            vec![2],
            vec![3, 4, 5, 6],
            vec![3, 4],
            vec![5, 6],
        ];
        assert_eq!(&batches[..9], &split[..]);
        assert_eq!(batches.len(), 9 + 3 + 9);
        assert_eq!(waits, 2 + 8);
    }

    #[test]
    fn a_group_out_of_memory_is_tried_again_after_waits_and_other_errors_are_not() {
        let stop = AtomicBool::new(false);
        let mut waited = Vec::new();
        let mut tries = 0;
        let r = retry_out_of_memory(
            &stop,
            |d| waited.push(d.as_secs_f64()),
            || {
                tries += 1;
                if tries < 3 {
                    Err(oom(tries))
                } else {
                    Ok(tries)
                }
            },
        );
        assert_eq!(r, Ok(3));
        assert_eq!(waited, vec![0.1, 0.2]);

        let mut tries = 0;
        let r: Result<(), _> = retry_out_of_memory(
            &stop,
            |_| {},
            || {
                tries += 1;
                Err(RolloutError::other("a bad prompt"))
            },
        );
        assert_eq!(
            (tries, r.unwrap_err().message.as_str()),
            (1, "a bad prompt")
        );

        let mut waited = 0.0;
        let mut tries = 0;
        let e = retry_out_of_memory(
            &stop,
            |d| waited += d.as_secs_f64(),
            || -> Result<(), _> {
                tries += 1;
                Err(oom(tries))
            },
        )
        .unwrap_err();
        assert_eq!(tries, 9);
        assert!((waited - 12.7).abs() < 1e-9, "{waited}");
        assert!(
            e.out_of_memory && e.message == "out of memory 9 (out of device memory in 9 tries)"
        );

        // a pool that stops does not wait
        stop.store(true, Ordering::SeqCst);
        let mut tries = 0;
        let r: Result<(), _> = retry_out_of_memory(
            &stop,
            |_| panic!("waited"),
            || {
                tries += 1;
                Err(oom(tries))
            },
        );
        assert_eq!((tries, r.is_err()), (1, true));
    }
}
