//! Gathers the rollout workers' groups into one training batch per step: whole groups only,
//! rows older than the staleness bound counted and dropped (never trained on), groups ordered
//! by `group_id` so that a step does not depend on which worker finished first.
//!
//! With group filtering (DAPO's dynamic sampling: verl's `algorithm.filter_groups`, OpenRLHF's
//! dynamic filtering) a group whose rewards are all equal (every completion right, or every one
//! wrong) is dropped on arrival and counted: its advantages are zero in every group-relative
//! estimator, so it would only dilute the step. Its samples' quota goes back to the admission,
//! so the workers draw the next prompts under the same policy version until the step has
//! `groups_per_step` groups that carry a signal.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use model::generate::Decoded;
use rollout::policy::Admission;
use rollout::pool::Event;
use rollout::schema::{from_batch, Sample};

use crate::error::{LearnerError, Result};

/// The groups of one step and what it took to get them.
#[derive(Debug, Default)]
pub struct StepBatch {
    /// `groups_per_step` groups in `group_id` order.
    pub groups: Vec<Vec<Sample>>,
    /// The same groups as the workers sent them (for the rollout log).
    pub batches: Vec<RecordBatch>,
    /// Rows dropped as too stale while gathering this step.
    pub dropped_rows: usize,
    /// Groups with equal rewards dropped while gathering this step (group filtering).
    pub filtered_groups: usize,
    /// Groups the workers failed to generate.
    pub failed_groups: usize,
    pub failures: Vec<String>,
    /// Ids of every group consumed or dropped (the feed forgets them).
    pub finished_groups: Vec<u64>,
    /// Seconds the learner waited for rollouts.
    pub wait_seconds: f64,
    /// Worker-seconds spent generating the groups used and filtered, and the completion tokens
    /// they hold.
    pub rollout_seconds: f64,
    pub rollout_tokens: usize,
    /// What the workers' generations that ended while this step gathered its groups decoded.
    pub decoded: Decoded,
}

impl StepBatch {
    /// A group generated and done with (trained on or filtered): the feed forgets it, and its
    /// generation counts in the step's rollout time and tokens.
    fn generated(&mut self, group_id: u64, seconds: f64, tokens: usize) {
        self.finished_groups.push(group_id);
        self.rollout_seconds += seconds;
        self.rollout_tokens += tokens;
    }

    /// The share of groups with all rewards equal (TRL's `frac_reward_zero_std`) among those
    /// the step trained on and those it filtered out.
    pub fn zero_std_frac(&self) -> f64 {
        let equal = self.groups.iter().filter(|g| equal_rewards(g)).count();
        let all = self.groups.len() + self.filtered_groups;
        (equal + self.filtered_groups) as f64 / all.max(1) as f64
    }

    /// Rows by staleness `learner_version − policy_version`.
    pub fn staleness_histogram(&self, learner_version: u64, max: u64) -> Vec<usize> {
        let mut h = vec![0; max as usize + 1];
        for s in self.groups.iter().flatten() {
            let d = learner_version.saturating_sub(s.policy_version).min(max);
            h[d as usize] += 1;
        }
        h
    }
}

/// A group received and not yet used, with its generation seconds and tokens.
struct Ready {
    samples: Vec<Sample>,
    batch: RecordBatch,
    seconds: f64,
    tokens: usize,
}

/// Whether a group carries no signal for a group-relative advantage: at least two samples, all
/// with the same reward (verl keeps a group of one).
pub fn equal_rewards(group: &[Sample]) -> bool {
    group.len() > 1 && group.iter().all(|s| s.reward == group[0].reward)
}

/// Group filtering: where dropped groups return their quota, and how many may be dropped while
/// gathering one step before the run stops.
struct Filter {
    admission: Arc<Admission>,
    /// Filtered groups that end the run while a step still lacks groups (None: no limit).
    max_filtered: Option<usize>,
}

/// Buffers groups between steps (workers may run ahead by `max_staleness` versions).
pub struct Collector {
    receiver: Receiver<Event>,
    max_staleness: u64,
    groups_per_step: usize,
    /// Groups received and not yet used, by id.
    ready: BTreeMap<u64, Ready>,
    /// How long to wait for a group before reporting the workers stuck.
    pub timeout: Duration,
    /// Groups that failed since the last one generated.
    failed_in_a_row: usize,
    /// How many failed groups in a row stop the run: workers that fail every group would
    /// otherwise keep the learner waiting for ever, skipping the whole dataset.
    pub max_failed_in_a_row: usize,
    filter: Option<Filter>,
}

impl Collector {
    pub fn new(receiver: Receiver<Event>, max_staleness: u64, groups_per_step: usize) -> Self {
        Collector {
            receiver,
            max_staleness,
            groups_per_step,
            ready: BTreeMap::new(),
            timeout: Duration::from_secs(600),
            failed_in_a_row: 0,
            max_failed_in_a_row: (4 * groups_per_step).max(32),
            filter: None,
        }
    }

    /// Drops the groups whose rewards are all equal, returning their samples' quota to
    /// `admission`. A step that has dropped more than `(max_batches − 1) · groups_per_step`
    /// groups and still lacks some (it would need more than `max_batches` batches' worth of
    /// groups: verl's `max_num_gen_batches`) ends the run with an error; 0 sets no limit.
    pub fn filtering(mut self, admission: Arc<Admission>, max_batches: usize) -> Self {
        self.filter = Some(Filter {
            admission,
            max_filtered: (max_batches > 0).then(|| (max_batches - 1) * self.groups_per_step),
        });
        self
    }

    fn fresh(&self, s: &[Sample], learner_version: u64) -> bool {
        s.iter()
            .all(|x| learner_version.saturating_sub(x.policy_version) <= self.max_staleness)
    }

    fn accept(&mut self, event: Event, out: &mut StepBatch) -> Result<()> {
        match event {
            Event::Rollout(r) => {
                self.failed_in_a_row = 0;
                let samples = from_batch(&r.batch)
                    .map_err(|e| LearnerError::Invalid(format!("a rollout batch: {e}")))?;
                if let Some(id) = samples.first().map(|s| s.group_id) {
                    if let (true, Some(f)) = (equal_rewards(&samples), &self.filter) {
                        out.filtered_groups += 1;
                        out.generated(id, r.seconds, r.tokens);
                        f.admission.release(samples.len());
                        let short = self.ready.len() < self.groups_per_step;
                        if short && f.max_filtered.is_some_and(|m| out.filtered_groups > m) {
                            return Err(LearnerError::Invalid(format!(
                                "group filtering: {} groups had equal rewards (every completion \
                                 right, or every one wrong) while one step gathered {} of its {} \
                                 groups: the data is too easy or too hard for the model (raise \
                                 algorithm.filter_groups_max_batches; 0 sets no limit)",
                                out.filtered_groups,
                                self.ready.len(),
                                self.groups_per_step
                            )));
                        }
                        return Ok(());
                    }
                    let ready = Ready {
                        samples,
                        batch: r.batch,
                        seconds: r.seconds,
                        tokens: r.tokens,
                    };
                    self.ready.insert(id, ready);
                }
            }
            Event::Failed { group_id, error } => {
                self.failed_in_a_row += 1;
                if self.failed_in_a_row >= self.max_failed_in_a_row {
                    return Err(LearnerError::Invalid(format!(
                        "rollout: {} groups in a row failed, none generated; the last, group \
                         {group_id}: {error}",
                        self.failed_in_a_row
                    )));
                }
                out.failed_groups += 1;
                out.failures.push(format!("group {group_id}: {error}"));
                out.finished_groups.push(group_id);
            }
            Event::Fatal(e) => return Err(LearnerError::Invalid(format!("rollout: {e}"))),
            Event::Decoded(d) => out.decoded += d,
        }
        Ok(())
    }

    /// Drops buffered groups too old for `learner_version`.
    fn drop_stale(&mut self, learner_version: u64, out: &mut StepBatch) {
        let stale: Vec<u64> = self
            .ready
            .iter()
            .filter(|(_, g)| !self.fresh(&g.samples, learner_version))
            .map(|(&id, _)| id)
            .collect();
        for id in stale {
            let g = self.ready.remove(&id).expect("listed");
            out.dropped_rows += g.samples.len();
            out.finished_groups.push(id);
        }
    }

    /// Blocks until `groups_per_step` fresh groups are in, and returns them.
    pub fn next_step(&mut self, learner_version: u64) -> Result<StepBatch> {
        let mut out = StepBatch::default();
        let start = Instant::now();
        while let Ok(e) = self.receiver.try_recv() {
            self.accept(e, &mut out)?;
        }
        loop {
            self.drop_stale(learner_version, &mut out);
            if self.ready.len() >= self.groups_per_step {
                break;
            }
            match self.receiver.recv_timeout(self.timeout) {
                Ok(e) => self.accept(e, &mut out)?,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(LearnerError::Invalid(format!(
                        "no rollout for {} s: the workers are stuck",
                        self.timeout.as_secs()
                    )))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(LearnerError::Invalid("the rollout workers stopped".into()))
                }
            }
        }
        out.wait_seconds = start.elapsed().as_secs_f64();
        let ids: Vec<u64> = self
            .ready
            .keys()
            .take(self.groups_per_step)
            .copied()
            .collect();
        for id in ids {
            let g = self.ready.remove(&id).expect("listed");
            out.generated(id, g.seconds, g.tokens);
            out.groups.push(g.samples);
            out.batches.push(g.batch);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rollout::pool::Rollout;
    use rollout::schema::{to_batch, Finish};

    fn group(id: u64, version: u64) -> Event {
        group_rewarded(id, version, [0.0, 1.0])
    }

    /// A group of two samples with these rewards.
    fn group_rewarded(id: u64, version: u64, rewards: [f32; 2]) -> Event {
        let samples: Vec<Sample> = (0..2)
            .map(|k| Sample {
                sample_id: id * 2 + k,
                prompt_id: id,
                group_id: id,
                policy_version: version,
                prompt_ids: vec![1],
                completion_ids: vec![2],
                behavior_logprobs: vec![-0.5],
                finish: Finish::Stop,
                reward: rewards[k as usize],
                reward_parts: vec![],
                completion_text: "x".into(),
            })
            .collect();
        Event::Rollout(Rollout {
            batch: to_batch(&samples).unwrap(),
            worker: 0,
            seconds: 1.0,
            tokens: 2,
            generation: 1,
        })
    }

    #[test]
    fn stale_groups_are_dropped_and_counted_and_order_is_by_group() {
        let (tx, rx) = crossbeam_channel::bounded(16);
        let mut c = Collector::new(rx, 1, 2);
        let decoded = |steps, rows| Event::Decoded(Decoded { steps, rows });
        for (id, v) in [(5, 3), (4, 1), (3, 2), (2, 3)] {
            tx.send(group(id, v)).unwrap();
            tx.send(decoded(3, 5)).unwrap();
        }
        let step = c.next_step(3).unwrap();
        // the generations' counts that came meanwhile add up
        assert_eq!(
            step.decoded,
            Decoded {
                steps: 12,
                rows: 20
            }
        );
        // group 4 (version 1) is two versions old at learner version 3: dropped
        assert_eq!(step.dropped_rows, 2);
        let ids: Vec<u64> = step.groups.iter().map(|g| g[0].group_id).collect();
        assert_eq!(ids, vec![2, 3]);
        assert_eq!(step.staleness_histogram(3, 1), vec![2, 2]);
        assert_eq!(step.batches.len(), 2, "the groups as sent, for the log");
        // group 5 (version 3) waits for the next step
        tx.send(Event::Failed {
            group_id: 6,
            error: "boom".into(),
        })
        .unwrap();
        tx.send(group(7, 4)).unwrap();
        let step = c.next_step(4).unwrap();
        assert_eq!(step.failed_groups, 1);
        assert_eq!(
            step.decoded,
            Decoded::default(),
            "counted in the step they came in"
        );
        assert_eq!(step.groups.len(), 2);
        drop(tx);
        assert!(c.next_step(4).is_err(), "disconnected workers are an error");
    }

    #[test]
    fn filtering_drops_groups_of_equal_rewards_returns_their_quota_and_has_a_limit() {
        let (tx, rx) = crossbeam_channel::bounded(16);
        // synchronous: one batch of 2 groups × 2 samples per version
        let admission = Arc::new(Admission::new(0, 4));
        let t = Duration::from_millis(10);
        let mut c = Collector::new(rx, 0, 2).filtering(admission.clone(), 2);
        assert_eq!(admission.admit(4, t), Some(0));
        assert_eq!(admission.admit(2, t), None, "the quota is full");
        let (right, wrong) = ([1.0, 1.0], [0.0, 0.0]);
        for e in [
            group_rewarded(1, 0, right),
            group(2, 0),
            group_rewarded(3, 0, wrong),
            group(4, 0),
        ] {
            tx.send(e).unwrap();
        }
        let step = c.next_step(0).unwrap();
        let ids: Vec<u64> = step.groups.iter().map(|g| g[0].group_id).collect();
        assert_eq!(ids, vec![2, 4], "the groups with a signal");
        assert_eq!(step.filtered_groups, 2);
        assert_eq!(step.dropped_rows, 0, "filtered groups are not stale rows");
        let mut finished = step.finished_groups.clone();
        finished.sort_unstable();
        assert_eq!(
            finished,
            vec![1, 2, 3, 4],
            "the feed forgets the filtered groups"
        );
        assert_eq!(step.zero_std_frac(), 0.5);
        assert_eq!(
            step.rollout_tokens, 8,
            "the filtered groups were generated too"
        );
        // the two filtered groups' 4 samples went back to the quota, under the same version
        assert_eq!(admission.admit(4, t), Some(0));
        // limit 2 batches: more than 1 × 2 groups filtered while a step lacks groups fails it
        for id in 5..8 {
            tx.send(group_rewarded(id, 0, right)).unwrap();
        }
        let e = c.next_step(0).unwrap_err().to_string();
        assert!(
            e.contains("3 groups had equal rewards") && e.contains("filter_groups_max_batches"),
            "{e}"
        );
        // unfiltered, the share of groups of equal rewards is still measured
        let (tx, rx) = crossbeam_channel::bounded(16);
        let mut c = Collector::new(rx, 0, 2);
        tx.send(group_rewarded(1, 0, wrong)).unwrap();
        tx.send(group(2, 0)).unwrap();
        let step = c.next_step(0).unwrap();
        assert_eq!((step.groups.len(), step.filtered_groups), (2, 0));
        assert_eq!(step.zero_std_frac(), 0.5);
        // a group of one carries no equal rewards to filter (verl keeps it)
        let one = from_batch(&match group(9, 0) {
            Event::Rollout(r) => r.batch,
            _ => unreachable!(),
        })
        .unwrap();
        assert!(!equal_rewards(&one[..1]) && !equal_rewards(&one));
    }

    #[test]
    fn groups_that_all_fail_stop_the_run_and_a_generated_one_resets_the_count() {
        let (tx, rx) = crossbeam_channel::bounded(64);
        let mut c = Collector::new(rx, 0, 1);
        assert_eq!(c.max_failed_in_a_row, 32);
        c.max_failed_in_a_row = 3;
        let failed = |id: u64| Event::Failed {
            group_id: id,
            error: format!("boom {id}"),
        };
        for e in [failed(1), failed(2), group(3, 0)] {
            tx.send(e).unwrap();
        }
        assert_eq!(c.next_step(0).unwrap().failed_groups, 2);
        for e in [failed(4), failed(5), group(6, 0)] {
            tx.send(e).unwrap();
        }
        assert_eq!(c.next_step(0).unwrap().failed_groups, 2);
        for id in 7..10 {
            tx.send(failed(id)).unwrap();
        }
        let e = c.next_step(0).unwrap_err().to_string();
        assert!(
            e.contains("3 groups in a row failed") && e.contains("boom 9"),
            "{e}"
        );
    }
}
