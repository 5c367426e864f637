//! The worker pool with a tiny model: groups arrive whole, stamped with the version that made
//! them; the staleness bound holds; a group's completions do not depend on the worker.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use candle_core::Device;
use datasets::order::{Source, SourceOptions};
use datasets::Loader;
use model::generate::{Decoded, GenerationConfig};
use model::{builtin, init, Weights};
use rewards::compose::{Part, PartKind, RewardSpec};
use rollout::policy::{Admission, PolicyStore};
use rollout::pool::{Event, Feed, FeedState, Pool, PoolConfig};
use rollout::schema::{from_batch, Sample};
use rollout::task::Task;

/// Two-operand addition, prompted as `{expression}=`, with the math reward.
fn addition_task() -> Task {
    Task {
        tokenizer: builtin::char_tokenizer().unwrap(),
        prompt_template: Some("{expression}=".into()),
        system_prompt: None,
        reward: RewardSpec {
            parts: vec![Part {
                name: "answer".into(),
                kind: PartKind::MathAnswer,
                weight: 1.0,
            }],
        },
    }
}

type Setup = (
    Pool,
    crossbeam_channel::Receiver<Event>,
    Arc<PolicyStore<Weights>>,
    Arc<Admission>,
    Weights,
);

/// A pool of `workers` on the tiny model, groups of 4, two groups a step.
fn setup(workers: usize, max_staleness: u64, groups_per_batch: usize) -> Setup {
    let config = builtin::tiny_config(32, 1);
    let pool = pool_config(workers, groups_per_batch);
    setup_with(config, addition_task(), 2, max_staleness, pool)
}

/// Groups of 4 completions of up to 4 tokens, seed 11.
fn pool_config(workers: usize, groups_per_batch: usize) -> PoolConfig {
    PoolConfig {
        workers,
        group_size: 4,
        generation: GenerationConfig {
            max_new_tokens: 4,
            stop_token_ids: vec![2],
            ..Default::default()
        },
        seed: 11,
        entropy_reward: Default::default(),
        groups_per_batch,
        greedy_baseline: false,
    }
}

fn setup_with(
    config: model::ModelConfig,
    task: Task,
    groups_per_step: usize,
    max_staleness: u64,
    pool: PoolConfig,
) -> Setup {
    let w = init::random_weights(&config, 0.02, 3, &Device::Cpu).unwrap();
    let source = Source::open("builtin:addition", &SourceOptions::default()).unwrap();
    let feed = Feed::new(
        Loader::new(source, 0, false, 16).unwrap(),
        FeedState::default(),
    );
    let store = Arc::new(PolicyStore::new(
        0,
        w.checksum().unwrap(),
        w.snapshot().unwrap(),
    ));
    let admission = Arc::new(Admission::new(max_staleness, groups_per_step * 4));
    let (tx, rx) = crossbeam_channel::bounded(64);
    let pool = Pool::spawn(
        pool,
        Arc::new(task),
        Arc::new(Mutex::new(feed)),
        store.clone(),
        admission.clone(),
        tx,
    );
    (pool, rx, store, admission, w)
}

/// The next event that is not a generation's count of what it decoded (those follow their
/// groups).
fn next_event(rx: &crossbeam_channel::Receiver<Event>) -> Event {
    loop {
        match rx.recv_timeout(Duration::from_secs(60)).unwrap() {
            Event::Decoded(_) => continue,
            e => return e,
        }
    }
}

/// Whether no group (nor failure) arrives for `ms` milliseconds, and what the generations whose
/// counts arrived meanwhile decoded.
fn no_group_for(rx: &crossbeam_channel::Receiver<Event>, ms: u64) -> (bool, Decoded) {
    let deadline = std::time::Instant::now() + Duration::from_millis(ms);
    let mut decoded = Decoded::default();
    loop {
        match rx.recv_deadline(deadline) {
            Err(_) => return (true, decoded),
            Ok(Event::Decoded(d)) => decoded += d,
            Ok(_) => return (false, decoded),
        }
    }
}

fn groups(rx: &crossbeam_channel::Receiver<Event>, n: usize) -> Vec<Vec<Sample>> {
    let mut out: Vec<Vec<Sample>> = (0..n)
        .map(|_| match next_event(rx) {
            Event::Rollout(r) => from_batch(&r.batch).unwrap(),
            other => panic!("{other:?}"),
        })
        .collect();
    out.sort_by_key(|g| g[0].group_id);
    out
}

#[test]
fn synchronous_workers_make_one_batch_per_version_and_switch_between_generations() {
    let (pool, rx, store, admission, w) = setup(2, 0, 1);
    let first = groups(&rx, 2);
    assert_eq!(
        first.iter().map(|g| g[0].group_id).collect::<Vec<_>>(),
        vec![0, 1]
    );
    for g in &first {
        assert_eq!(g.len(), 4);
        assert!(g
            .iter()
            .all(|s| s.policy_version == 0 && s.group_id == g[0].group_id));
        assert!(g
            .iter()
            .all(|s| s.behavior_logprobs.len() == s.completion_ids.len()));
    }
    // nothing more until the learner publishes
    assert!(no_group_for(&rx, 300).0);
    let v1 = init::random_weights(&w.config, 0.02, 4, &Device::Cpu).unwrap();
    store.publish(1, v1.checksum().unwrap(), v1).unwrap();
    admission.consumed(8);
    admission.published(1);
    let second = groups(&rx, 2);
    assert_eq!(
        second.iter().map(|g| g[0].group_id).collect::<Vec<_>>(),
        vec![2, 3]
    );
    assert!(second.iter().flatten().all(|s| s.policy_version == 1));
    // a hand-off whose checksum does not match is refused: the group fails, never samples
    store.publish(2, 12345, w.snapshot().unwrap()).unwrap();
    admission.consumed(8);
    admission.published(2);
    match next_event(&rx) {
        Event::Failed { error, .. } => assert!(error.contains("checksum"), "{error}"),
        other => panic!("{other:?}"),
    }
    drop(rx);
    pool.stop();
}

#[test]
fn a_group_is_the_same_whichever_worker_makes_it() {
    let (pool_a, rx_a, _, _, _) = setup(1, 0, 1);
    let a = groups(&rx_a, 2);
    drop(rx_a);
    pool_a.stop();
    let (pool_b, rx_b, _, _, _) = setup(2, 0, 1);
    let b = groups(&rx_b, 2);
    drop(rx_b);
    pool_b.stop();
    assert_eq!(a, b);
}

/// Each group's samples and the worker's generation that made it, by group id.
fn rollouts(rx: &crossbeam_channel::Receiver<Event>, n: usize) -> Vec<(Vec<Sample>, u64)> {
    let mut out: Vec<(Vec<Sample>, u64)> = (0..n)
        .map(|_| match next_event(rx) {
            Event::Rollout(r) => (from_batch(&r.batch).unwrap(), r.generation),
            other => panic!("{other:?}"),
        })
        .collect();
    out.sort_by_key(|(g, _)| g[0].group_id);
    out
}

/// The same samples up to the float rounding of another batch shape: ids, tokens and rewards
/// equal, log-probs within 1e-4.
fn assert_same_samples(a: &[Sample], b: &[Sample]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(
            (
                x.group_id,
                x.sample_id,
                &x.prompt_ids,
                &x.completion_ids,
                x.reward,
                x.policy_version
            ),
            (
                y.group_id,
                y.sample_id,
                &y.prompt_ids,
                &y.completion_ids,
                y.reward,
                y.policy_version
            )
        );
        for (p, q) in x.behavior_logprobs.iter().zip(&y.behavior_logprobs) {
            assert!((p - q).abs() < 1e-4, "{p} vs {q}");
        }
    }
}

#[test]
fn a_worker_batches_the_groups_it_may_start_and_each_samples_as_alone() {
    // one worker, two groups a step: alone it makes them one after the other; with batches of
    // two it generates both in one batch
    let run = |groups_per_batch: usize| {
        let (pool, rx, _, _, _) = setup(1, 0, groups_per_batch);
        let out = rollouts(&rx, 2);
        drop(rx);
        pool.stop();
        out
    };
    let (alone, batched) = (run(1), run(2));
    assert_eq!(batched[0].1, batched[1].1, "one generation");
    assert_ne!(alone[0].1, alone[1].1);
    for ((a, _), (b, _)) in alone.iter().zip(&batched) {
        assert_eq!(a.len(), 4);
        assert_same_samples(a, b);
    }
    let distinct: std::collections::HashSet<_> = alone
        .iter()
        .flat_map(|(g, _)| g.iter().map(|s| &s.completion_ids))
        .collect();
    assert!(distinct.len() > 2, "rows sample from their own streams");
}

#[test]
fn a_worker_refills_its_batch_with_groups_it_may_start_under_its_version() {
    // One worker, batches of two groups, one step of staleness: the quota holds four groups.
    // The worker starts two; as their rows finish it admits the other two into the running
    // batch, so one generation makes all four, each group what it is alone. Then the quota is
    // full until the learner publishes; the next groups are a new generation under the new
    // version.
    let (pool, rx, store, admission, w) = setup(1, 1, 2);
    let (streamed, decoded) = rollouts_decoded(&rx, 4);
    let first = streamed[0].1;
    assert!(
        streamed.iter().all(|(_, g)| *g == first),
        "refilled: {:?}",
        streamed.iter().map(|(_, g)| g).collect::<Vec<_>>()
    );
    let v1 = init::random_weights(&w.config, 0.02, 4, &Device::Cpu).unwrap();
    store.publish(1, v1.checksum().unwrap(), v1).unwrap();
    admission.consumed(8);
    admission.published(1);
    let next = rollouts(&rx, 2);
    assert_eq!(
        next.iter().map(|(g, _)| g[0].group_id).collect::<Vec<_>>(),
        vec![4, 5]
    );
    assert!(next
        .iter()
        .flat_map(|(g, _)| g)
        .all(|s| s.policy_version == 1));
    assert!(next.iter().all(|(_, g)| *g == first + 1));
    drop(rx);
    pool.stop();

    let (pool, rx, _, _, _) = setup(1, 1, 1);
    let (alone, decoded_alone) = rollouts_decoded(&rx, 4);
    drop(rx);
    pool.stop();
    let generations: std::collections::HashSet<u64> = alone.iter().map(|(_, g)| *g).collect();
    assert_eq!(generations.len(), 4, "one generation a group");
    for ((a, _), (b, _)) in alone.iter().zip(&streamed) {
        assert_same_samples(a, b);
    }
    // every completion token after the first comes from a decode step in which its row ran;
    // the streamed batch ran more rows a step than a group alone has
    let after_first: usize = streamed
        .iter()
        .flat_map(|(g, _)| g)
        .map(|s| s.completion_ids.len() - 1)
        .sum();
    assert_eq!(decoded.rows, after_first);
    assert_eq!(decoded_alone.rows, after_first);
    let fill = |d: Decoded| d.rows as f64 / d.steps as f64;
    assert!(
        fill(decoded_alone) <= 4.0 && fill(decoded) > 4.0,
        "{decoded:?} streamed, {decoded_alone:?} alone"
    );
}

/// `n` groups with the worker's generation of each, and what the generations decoded (their
/// counts that arrive with the groups and in the 300 ms after, when no group may come: the
/// quota is full).
fn rollouts_decoded(
    rx: &crossbeam_channel::Receiver<Event>,
    n: usize,
) -> (Vec<(Vec<Sample>, u64)>, Decoded) {
    let mut out = Vec::new();
    let mut decoded = Decoded::default();
    while out.len() < n {
        match rx.recv_timeout(Duration::from_secs(60)).unwrap() {
            Event::Rollout(r) => out.push((from_batch(&r.batch).unwrap(), r.generation)),
            Event::Decoded(d) => decoded += d,
            other => panic!("{other:?}"),
        }
    }
    let (quiet, after) = no_group_for(rx, 300);
    assert!(quiet, "bounded at two batches");
    decoded += after;
    out.sort_by_key(|(g, _)| g[0].group_id);
    (out, decoded)
}

#[test]
fn a_group_that_fails_a_streamed_batch_fails_alone_and_the_others_are_as_alone() {
    // A model of 30 tokens under a tokenizer of 100: a prompt with a 9 (token 30) fails
    // generation. In a streamed batch that failure ends the generation (with all eight groups
    // in it from the start, or after groups refilled into a batch of two were sent); the
    // groups it left unfinished are generated again in halves, so that each bad group fails
    // alone and every other group is what it is alone.
    let run = |groups_per_batch: usize| {
        let mut config = builtin::tiny_config(32, 1);
        config.vocab_size = 30;
        // the prompt is the expression alone, without the chat template's words
        let mut task = Task {
            prompt_template: Some("{expression}".into()),
            ..addition_task()
        };
        task.tokenizer
            .set_chat_template(Some("{{ messages[0].content }}".into()));
        let (pool, rx, _, _, _) = setup_with(config, task, 8, 0, pool_config(1, groups_per_batch));
        let mut out: Vec<(u64, Result<Vec<Sample>, String>)> = (0..8)
            .map(|_| match next_event(&rx) {
                Event::Rollout(r) => {
                    let g = from_batch(&r.batch).unwrap();
                    (g[0].group_id, Ok(g))
                }
                Event::Failed { group_id, error } => (group_id, Err(error)),
                other => panic!("{other:?}"),
            })
            .collect();
        drop(rx);
        pool.stop();
        out.sort_by_key(|(id, _)| *id);
        out
    };
    let alone = run(1);
    let failed: Vec<u64> = alone
        .iter()
        .filter(|(_, r)| r.is_err())
        .map(|(id, _)| *id)
        .collect();
    assert!(
        failed.len() < 8 && failed.iter().any(|&id| id > 1),
        "some groups fail, one after the first two: {failed:?}"
    );
    // all eight in one batch from the start; two at first, the rest refilled
    for (a_id, a, b_id, b) in [run(8), run(2)].iter().flat_map(|streamed| {
        alone
            .iter()
            .zip(streamed)
            .map(|((a_id, a), (b_id, b))| (a_id, a, b_id, b))
    }) {
        assert_eq!(a_id, b_id);
        match (a, b) {
            (Ok(a), Ok(b)) => assert_same_samples(a, b),
            (Err(a), Err(b)) => {
                assert!(a.contains("vocab size"), "{a}");
                assert_eq!(a, b);
            }
            _ => panic!("group {a_id}: {a:?} alone, {b:?} streamed"),
        }
    }
}

#[test]
fn one_step_staleness_lets_workers_run_a_batch_ahead() {
    let (pool, rx, _, _, _) = setup(2, 1, 1);
    let ahead = groups(&rx, 4);
    assert!(ahead.iter().flatten().all(|s| s.policy_version == 0));
    assert!(no_group_for(&rx, 300).0, "bounded at two batches");
    drop(rx);
    pool.stop();
}

/// EM-RL: the reward of a completion is its own negative entropy (token) or log-probability
/// (sequence), from the sampling step; the verifier's total is kept as a part.
#[test]
fn entropy_rewards_come_from_the_sampling_policy() {
    use rollout::pool::rollout_group;
    use rollout::task::EntropyReward;
    let config = builtin::tiny_config(32, 1);
    let w = init::random_weights(&config, 0.02, 3, &Device::Cpu).unwrap();
    let task = addition_task();
    let source = Source::open("builtin:addition", &SourceOptions::default()).unwrap();
    let record = Loader::new(source, 0, false, 16)
        .unwrap()
        .take(1)
        .unwrap()
        .remove(0);
    let cfg = |entropy_reward| PoolConfig {
        group_size: 3,
        generation: GenerationConfig {
            max_new_tokens: 5,
            stop_token_ids: vec![2],
            ..Default::default()
        },
        seed: 5,
        entropy_reward,
        ..pool_config(1, 1)
    };
    let plain = rollout_group(&task, &w, 0, 9, &record, &cfg(EntropyReward::None)).unwrap();
    let seq = rollout_group(&task, &w, 0, 9, &record, &cfg(EntropyReward::Sequence)).unwrap();
    let tok = rollout_group(&task, &w, 0, 9, &record, &cfg(EntropyReward::Token)).unwrap();
    let v = model::Weights::detach(&w);
    for ((p, s), t) in plain.iter().zip(&seq).zip(&tok) {
        // the same completions (the same seed), rewarded differently
        assert_eq!(p.completion_ids, s.completion_ids);
        let sum: f32 = p.behavior_logprobs.iter().sum();
        assert!((s.reward - sum).abs() < 1e-5, "{} vs {sum}", s.reward);
        assert!(s
            .reward_parts
            .iter()
            .any(|(n, x)| n == "verifier" && *x == p.reward));
        // a near-uniform random model: each step's entropy is close to log |V|
        let steps = t.completion_ids.len() as f32;
        let log_v = (v.config.vocab_size as f32).ln();
        assert!(
            t.reward < 0.0 && (t.reward / steps + log_v).abs() < 0.05 * log_v,
            "{}",
            t.reward
        );
    }
}

/// ReMax: every sample of a group carries its prompt's greedy completion's reward and
/// correctness (the baseline) under the weights that sampled the group, whether the group was
/// generated alone or joined a streamed batch; the greedy row, decoded in the group's batch,
/// leaves its samples as they are without it.
#[test]
fn remax_groups_carry_their_prompts_greedy_completions_reward() {
    use model::generate::generate;
    use model::sampling::SamplingParams;
    use rollout::pool::rollout_group;
    // a length penalty past 1 token and generation that stops at a newline, which the random
    // model's greedy completions start with and its samples seldom draw: they score apart
    let mut task = addition_task();
    task.reward.parts.push(Part {
        name: "length".into(),
        kind: PartKind::Overlong {
            max_tokens: 4,
            cache_tokens: 3,
        },
        weight: 1.0,
    });
    let newline = task.tokenizer.encode("\n", false).unwrap()[0];
    let cfg = |groups_per_batch| PoolConfig {
        generation: GenerationConfig {
            max_new_tokens: 4,
            stop_token_ids: vec![newline],
            ..Default::default()
        },
        greedy_baseline: true,
        ..pool_config(1, groups_per_batch)
    };
    let config = builtin::tiny_config(32, 1);
    let (pool, rx, _, _, w) = setup_with(config, task.clone(), 4, 0, cfg(2));
    let streamed = groups(&rx, 4);
    drop(rx);
    pool.stop();
    let source = Source::open("builtin:addition", &SourceOptions::default()).unwrap();
    let records = Loader::new(source, 0, false, 16).unwrap().take(4).unwrap();
    let v = w.detach();
    let greedy = GenerationConfig {
        sampling: SamplingParams::greedy(),
        ..cfg(1).generation
    };
    let part = |s: &Sample, name: &str| {
        let p = s.reward_parts.iter().find(|(n, _)| n == name);
        p.unwrap_or_else(|| panic!("no part {name}: {:?}", s.reward_parts))
            .1
    };
    let mut differs = false;
    for group in &streamed {
        let record = records.iter().find(|r| r.id == group[0].prompt_id).unwrap();
        let prompt = [group[0].prompt_ids.clone()];
        let c = &generate(&v, &prompt, &greedy, Some(&task.tokenizer)).unwrap()[0];
        let text = c.text.as_deref().unwrap_or("");
        let scored = task.score(text, c.tokens.len(), &task.reference(record));
        let correct = f32::from(u8::from(scored.correct == Some(true)));
        let alone = rollout_group(&task, &v, 0, group[0].group_id, record, &cfg(1)).unwrap();
        // the greedy row leaves the sampled ones as they are without it
        let plain = PoolConfig {
            greedy_baseline: false,
            ..cfg(1)
        };
        let plain = rollout_group(&task, &v, 0, group[0].group_id, record, &plain).unwrap();
        for (a, p) in alone.iter().zip(&plain) {
            assert_eq!((&a.completion_ids, a.reward), (&p.completion_ids, p.reward));
        }
        for (s, a) in group.iter().zip(&alone) {
            assert_eq!(part(s, "greedy_reward"), scored.total);
            assert_eq!(part(s, "greedy_correct"), correct);
            assert_eq!(part(a, "greedy_reward"), scored.total, "alone");
            differs |= s.reward != scored.total;
        }
    }
    assert!(
        differs,
        "some sample scores other than its greedy completion"
    );
}

/// A worker that panics (a bug) tells the learner the run must stop, where its drawn groups
/// would otherwise never come (nor their quota return) and the learner would wait for ever.
#[test]
fn a_worker_that_panics_tells_the_learner_the_run_must_stop() {
    use rollout::pool::guarded;
    let (tx, rx) = crossbeam_channel::unbounded();
    guarded(3, &tx, || panic!("index {} out of range", 9));
    match rx.try_recv() {
        Ok(Event::Fatal(e)) => assert_eq!(e, "rollout worker 3 panicked: index 9 out of range"),
        other => panic!("{other:?}"),
    }
    guarded(1, &tx, || {});
    assert!(
        rx.try_recv().is_err(),
        "a worker that ends sends nothing more"
    );
}

/// A thread that panics while it holds the feed's lock poisons the lock; the feed stays readable,
/// so that the learner still saves where the run stands, and resumes from the first group it
/// has not consumed.
#[test]
fn a_panic_holding_the_feed_lock_leaves_the_feed_readable() {
    let source = Source::open("builtin:addition", &SourceOptions::default()).unwrap();
    let feed = Arc::new(Mutex::new(Feed::new(
        Loader::new(source, 0, false, 16).unwrap(),
        FeedState::default(),
    )));
    let (first, second) = {
        let mut f = Feed::locked(&feed);
        (f.next_group().unwrap(), f.next_group().unwrap())
    };
    let before = Feed::locked(&feed).state();
    let held = feed.clone();
    let worker = std::thread::spawn(move || {
        let mut f = held.lock().unwrap();
        f.done(0);
        panic!("a bug while drawing");
    });
    assert!(worker.join().is_err());
    assert!(feed.is_poisoned());
    let mut f = Feed::locked(&feed);
    // group 0 was consumed before the panic: a resume regenerates group 1 on
    let state = f.state();
    assert_eq!((first.0, second.0, state.next_group), (0, 1, 1));
    assert_ne!(state.cursor, before.cursor);
    let (third, _) = f.next_group().unwrap();
    assert_eq!(third, 2);
}
