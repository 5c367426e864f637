//! Policy versions and the staleness bound.
//!
//! The learner publishes weights stamped with a version and a checksum; a worker switches to the
//! newest published weights only between generations, after checking the checksum of its own
//! copy, so it can never sample from weights it believes are newer than they are.
//!
//! Admission bounds how far the workers run ahead, as verl's fully-async trainer does: at each
//! publication the count of samples under way restarts from those still outstanding (generating
//! or queued, not yet consumed by the learner), and new samples may start while that count stays
//! within `(1 + max_staleness) · batch_size`. In steady state the workers hold `max_staleness`
//! batches ahead of the learner and nothing is generated only to be dropped. `max_staleness = 0`
//! is the synchronous baseline: exactly one batch per version.

use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

/// Weights of one policy version.
#[derive(Debug)]
pub struct Snapshot<W> {
    pub version: u64,
    pub checksum: u64,
    pub weights: Arc<W>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("policy version {new} published after {current}: versions must increase")]
    NotNewer { current: u64, new: u64 },
    #[error(
        "policy version {version}: checksum {got:#x} of the worker's copy, {expected:#x} published"
    )]
    Checksum {
        version: u64,
        expected: u64,
        got: u64,
    },
    #[error("stopped")]
    Stopped,
}

/// The newest published weights.
#[derive(Debug)]
pub struct PolicyStore<W> {
    latest: RwLock<Arc<Snapshot<W>>>,
}

impl<W> PolicyStore<W> {
    pub fn new(version: u64, checksum: u64, weights: W) -> Self {
        PolicyStore {
            latest: RwLock::new(Arc::new(Snapshot {
                version,
                checksum,
                weights: Arc::new(weights),
            })),
        }
    }

    pub fn publish(&self, version: u64, checksum: u64, weights: W) -> Result<(), PolicyError> {
        let mut latest = self.latest.write().expect("policy store lock");
        if version <= latest.version {
            return Err(PolicyError::NotNewer {
                current: latest.version,
                new: version,
            });
        }
        *latest = Arc::new(Snapshot {
            version,
            checksum,
            weights: Arc::new(weights),
        });
        Ok(())
    }

    pub fn latest(&self) -> Arc<Snapshot<W>> {
        self.latest.read().expect("policy store lock").clone()
    }

    pub fn version(&self) -> u64 {
        self.latest.read().expect("policy store lock").version
    }
}

/// A worker's current policy: switched only by [`WorkerPolicy::refresh`], between generations.
pub struct WorkerPolicy<W> {
    current: Arc<Snapshot<W>>,
}

impl<W> WorkerPolicy<W> {
    pub fn new(store: &PolicyStore<W>) -> Self {
        WorkerPolicy {
            current: store.latest(),
        }
    }

    /// Adopts the newest published weights if they are newer, after `checksum` of them matches
    /// the published one. On a mismatch the worker keeps its verified weights and reports it.
    pub fn refresh(
        &mut self,
        store: &PolicyStore<W>,
        checksum: impl Fn(&W) -> u64,
    ) -> Result<bool, PolicyError> {
        let latest = store.latest();
        if latest.version == self.current.version {
            return Ok(false);
        }
        let got = checksum(&latest.weights);
        if got != latest.checksum {
            return Err(PolicyError::Checksum {
                version: latest.version,
                expected: latest.checksum,
                got,
            });
        }
        self.current = latest;
        Ok(true)
    }

    pub fn snapshot(&self) -> &Arc<Snapshot<W>> {
        &self.current
    }
}

#[derive(Debug, Default)]
struct AdmissionState {
    version: u64,
    /// Samples counted against the quota since the last publication (verl's
    /// `staleness_samples`): those outstanding at the publication plus those started since.
    started: usize,
    /// Samples started and not yet consumed (or dropped) by the learner.
    outstanding: usize,
    stopped: bool,
}

/// The staleness bound on sample production.
#[derive(Debug)]
pub struct Admission {
    max_staleness: u64,
    batch_size: usize,
    state: Mutex<AdmissionState>,
    changed: Condvar,
}

impl Admission {
    pub fn new(max_staleness: u64, batch_size: usize) -> Self {
        Admission {
            max_staleness,
            batch_size,
            state: Mutex::new(AdmissionState::default()),
            changed: Condvar::new(),
        }
    }

    fn quota(&self) -> usize {
        (1 + self.max_staleness as usize) * self.batch_size
    }

    /// Blocks until `n` samples may start; returns the version they are admitted under, or
    /// `None` after `stop` or when `timeout` passes.
    pub fn admit(&self, n: usize, timeout: Duration) -> Option<u64> {
        let deadline = std::time::Instant::now() + timeout;
        let mut s = self.state.lock().expect("admission lock");
        loop {
            if s.stopped {
                return None;
            }
            if s.started + n <= self.quota() {
                s.started += n;
                s.outstanding += n;
                return Some(s.version);
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return None;
            }
            s = self
                .changed
                .wait_timeout(s, deadline - now)
                .expect("admission lock")
                .0;
        }
    }

    /// Admits `n` samples now if they fit the quota and no version after `version` has been
    /// published: a worker refilling a running batch under the weights of `version` takes new
    /// groups only while they are the newest, so that a batch never outlives its version.
    pub fn admit_under(&self, n: usize, version: u64) -> bool {
        let mut s = self.state.lock().expect("admission lock");
        if s.stopped || s.version != version || s.started + n > self.quota() {
            return false;
        }
        s.started += n;
        s.outstanding += n;
        true
    }

    /// The learner published `version`.
    pub fn published(&self, version: u64) {
        let mut s = self.state.lock().expect("admission lock");
        s.version = version;
        s.started = s.outstanding;
        self.changed.notify_all();
    }

    /// The learner took (trained on or dropped) `n` samples.
    pub fn consumed(&self, n: usize) {
        let mut s = self.state.lock().expect("admission lock");
        s.outstanding = s.outstanding.saturating_sub(n);
    }

    /// Returns the quota of `n` admitted samples that were never produced (a failed group).
    pub fn release(&self, n: usize) {
        let mut s = self.state.lock().expect("admission lock");
        s.started = s.started.saturating_sub(n);
        s.outstanding = s.outstanding.saturating_sub(n);
        self.changed.notify_all();
    }

    pub fn max_staleness(&self) -> u64 {
        self.max_staleness
    }

    pub fn stop(&self) {
        self.state.lock().expect("admission lock").stopped = true;
        self.changed.notify_all();
    }

    /// Whether a sample of `sample_version` may be trained on at learner version `learner_version`.
    pub fn fresh(&self, sample_version: u64, learner_version: u64) -> bool {
        learner_version.saturating_sub(sample_version) <= self.max_staleness
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_switch_only_to_verified_newer_weights() {
        let store = PolicyStore::new(0, 10, 10u64);
        let mut worker = WorkerPolicy::new(&store);
        assert!(!worker.refresh(&store, |w| *w).unwrap());
        store.publish(1, 11, 11).unwrap();
        assert!(worker.refresh(&store, |w| *w).unwrap());
        assert_eq!(worker.snapshot().version, 1);
        // a corrupted copy: the worker keeps version 1
        store.publish(2, 99, 12).unwrap();
        assert_eq!(
            worker.refresh(&store, |w| *w),
            Err(PolicyError::Checksum {
                version: 2,
                expected: 99,
                got: 12
            })
        );
        assert_eq!(worker.snapshot().version, 1);
        assert_eq!(
            store.publish(2, 0, 0),
            Err(PolicyError::NotNewer { current: 2, new: 2 })
        );
    }

    #[test]
    fn synchronous_admission_allows_one_batch_per_version() {
        let a = Admission::new(0, 8);
        let t = Duration::from_millis(10);
        assert_eq!(a.admit(4, t), Some(0));
        assert_eq!(a.admit(4, t), Some(0));
        assert_eq!(a.admit(4, t), None, "a second batch waits for the learner");
        a.consumed(8);
        assert_eq!(a.admit(4, t), None, "consumed, but not yet published");
        a.published(1);
        assert_eq!(a.admit(4, t), Some(1));
        assert!(a.fresh(1, 1) && !a.fresh(0, 1));
    }

    #[test]
    fn one_step_staleness_keeps_the_workers_one_batch_ahead() {
        let a = Admission::new(1, 8);
        let t = Duration::from_millis(10);
        assert_eq!(
            (0..4).filter_map(|_| a.admit(4, t)).count(),
            4,
            "two batches under version 0"
        );
        assert_eq!(a.admit(4, t), None);
        // the learner takes one batch and publishes: one batch is still outstanding, so one
        // more may start under version 1
        a.consumed(8);
        a.published(1);
        assert_eq!((0..3).filter_map(|_| a.admit(4, t)).count(), 2);
        // it takes the second batch of version 0 (one version old) and publishes again
        a.consumed(8);
        a.published(2);
        assert_eq!((0..3).filter_map(|_| a.admit(4, t)).count(), 2);
        assert!(a.fresh(1, 2) && !a.fresh(0, 2));
    }

    #[test]
    fn a_refill_is_admitted_only_under_the_newest_version_and_within_the_quota() {
        let a = Admission::new(1, 8);
        let t = Duration::from_millis(10);
        assert_eq!(a.admit(4, t), Some(0));
        assert!(a.admit_under(4, 0) && a.admit_under(8, 0));
        assert!(
            !a.admit_under(4, 0),
            "two batches under way: the quota is full"
        );
        a.consumed(8);
        a.published(1);
        assert!(!a.admit_under(4, 0), "version 1 is out: no refill under 0");
        assert!(a.admit_under(4, 1));
        a.stop();
        assert!(!a.admit_under(1, 1), "stopped");
    }

    #[test]
    fn waiting_workers_wake_on_publication_and_on_stop() {
        let a = Arc::new(Admission::new(0, 2));
        assert_eq!(a.admit(2, Duration::from_millis(1)), Some(0));
        let waiter = {
            let a = a.clone();
            std::thread::spawn(move || a.admit(2, Duration::from_secs(10)))
        };
        std::thread::sleep(Duration::from_millis(20));
        a.consumed(2);
        a.published(1);
        assert_eq!(waiter.join().unwrap(), Some(1));
        let waiter = {
            let a = a.clone();
            std::thread::spawn(move || a.admit(2, Duration::from_secs(10)))
        };
        std::thread::sleep(Duration::from_millis(20));
        a.stop();
        assert_eq!(waiter.join().unwrap(), None);
    }
}
