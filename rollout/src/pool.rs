//! The rollout worker pool: compute threads that take prompts from a shared feed, generate
//! `group_size` completions per prompt with the newest verified weights, score them, and send
//! one Arrow record batch per group down a bounded channel.
//!
//! A group's sampling seed depends only on the run seed and its `group_id`, and every group is
//! generated alone (one prompt, `group_size` rows, no padding), so a group's completions do not
//! depend on which worker made them or when: with `max_staleness = 0` a run is reproducible.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use crossbeam_channel::Sender;
use datasets::{Cursor, Loader, Record};
use model::generate::{generate, FinishReason, GenerationConfig};
use model::Weights;
use serde::{Deserialize, Serialize};

use crate::policy::{Admission, PolicyStore, WorkerPolicy};
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
    /// The feed cannot go on (e.g. too many bad rows): the run must stop.
    Fatal(String),
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
) -> Result<Vec<Sample>, String> {
    let prompt = task.prompt_ids(record).map_err(|e| e.to_string())?;
    let prompts = vec![prompt.clone(); cfg.group_size];
    let gen = GenerationConfig {
        seed: group_seed(cfg.seed, group_id),
        ..cfg.generation.clone()
    };
    let completions =
        generate(w, &prompts, &gen, Some(&task.tokenizer)).map_err(|e| e.to_string())?;
    let gold = task.gold(record);
    Ok(completions
        .into_iter()
        .enumerate()
        .map(|(k, c)| {
            let text = c.text.unwrap_or_default();
            let scored = task.score(&text, c.tokens.len(), &gold);
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
            Sample {
                sample_id: group_id * cfg.group_size as u64 + k as u64,
                prompt_id: record.id,
                group_id,
                policy_version: version,
                prompt_ids: prompt.clone(),
                completion_ids: c.tokens,
                behavior_logprobs: c.logprobs,
                finish,
                reward,
                reward_parts: parts,
                completion_text: text,
            }
        })
        .collect())
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
                        work(
                            worker, &cfg, &task, &feed, &store, &admission, &sender, &stop,
                        )
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

#[allow(clippy::too_many_arguments)]
fn work(
    worker: usize,
    cfg: &PoolConfig,
    task: &Task,
    feed: &Mutex<Feed>,
    store: &PolicyStore<Weights>,
    admission: &Admission,
    sender: &Sender<Event>,
    stop: &AtomicBool,
) {
    let mut policy = WorkerPolicy::new(store);
    let checksum = |w: &Weights| w.checksum().unwrap_or(0);
    while !stop.load(Ordering::SeqCst) {
        if admission
            .admit(cfg.group_size, Duration::from_millis(200))
            .is_none()
        {
            continue;
        }
        let next = feed.lock().expect("feed lock").next_group();
        let (group_id, record) = match next {
            Ok(x) => x,
            Err(e) => {
                let _ = sender.send(Event::Fatal(e.to_string()));
                return;
            }
        };
        let start = Instant::now();
        let result = match policy.refresh(store, checksum) {
            Ok(_) => {
                let snap = policy.snapshot();
                rollout_group(task, &snap.weights, snap.version, group_id, &record, cfg)
            }
            Err(e) => Err(e.to_string()),
        };
        let event = match result.and_then(|samples| {
            let tokens = samples.iter().map(|s| s.completion_ids.len()).sum();
            to_batch(&samples)
                .map(|batch| (batch, tokens))
                .map_err(|e| e.to_string())
        }) {
            Ok((batch, tokens)) => Event::Rollout(Rollout {
                batch,
                worker,
                seconds: start.elapsed().as_secs_f64(),
                tokens,
            }),
            Err(error) => {
                feed.lock().expect("feed lock").done(group_id);
                admission.release(cfg.group_size);
                Event::Failed { group_id, error }
            }
        };
        if sender.send(event).is_err() {
            return;
        }
    }
}
