//! External reward programs (POSIX `sh` scripts here, any language in use): the protocol, the
//! context they receive, and programs that hang, crash, answer nonsense or do not exist, each of
//! which fails its completion's part without stalling the caller.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rewards::command::Command;
use rewards::{Gold, Part, PartKind, RewardSpec, Sample, Scored};

fn sh(script: &str, timeout_ms: u64) -> Arc<Command> {
    let argv = ["sh", "-c", script].map(String::from).to_vec();
    Arc::new(Command::new(argv, Duration::from_millis(timeout_ms)))
}

fn spec(program: Arc<Command>) -> RewardSpec {
    RewardSpec {
        parts: vec![Part {
            name: "mine".into(),
            kind: PartKind::Command(program),
            weight: 2.0,
        }],
    }
}

fn score(spec: &RewardSpec, completion: &str, context: &str) -> Scored {
    spec.score(&Sample {
        completion,
        completion_tokens: 3,
        gold: &Gold::None,
        context,
    })
}

/// Reward 1 (correct) when the completion equals the context's answer, else 0 (wrong): the
/// program sees the completion, its token count and the record's fields.
const JUDGE: &str = r#"while IFS= read -r l; do
  case "$l" in
    *'"completion":"42","completion_tokens":3,"prompt":"6*7=","answer":"42"'*) echo '{"reward": 1, "correct": true}';;
    *'"answer"'*) echo '{"reward": 0, "correct": false}';;
    *) echo 0.5;;
  esac
done"#;

#[test]
fn a_program_scores_completions_against_the_records_context() {
    let spec = spec(sh(JUDGE, 5000));
    let context = r#"{"prompt":"6*7=","answer":"42","metadata":{"level":1}}"#;
    let right = score(&spec, "42", context);
    assert_eq!((right.total, right.correct), (2.0, Some(true)));
    assert_eq!(right.parts, vec![("mine".to_string(), 1.0)]);
    assert!(right.failures.is_empty());
    let wrong = score(&spec, "41", context);
    assert_eq!((wrong.total, wrong.correct), (0.0, Some(false)));
    // no context: the completion and its length alone
    let bare = score(&spec, "42", "{}");
    assert_eq!((bare.total, bare.correct), (1.0, None));
    // a completion with quotes and a newline arrives as one JSON string on one line
    let odd = score(&spec, "say \"42\"\nthen stop", context);
    assert_eq!((odd.total, odd.correct), (0.0, Some(false)));
}

#[test]
fn one_instance_serves_request_after_request_and_threads_get_their_own() {
    // the count of requests this instance has seen
    let program = sh("n=0; while read -r l; do n=$((n+1)); echo $n; done", 5000);
    let spec = spec(program.clone());
    let totals: Vec<f32> = (0..3).map(|_| score(&spec, "x", "{}").total).collect();
    assert_eq!(totals, vec![2.0, 4.0, 6.0]);
    // four callers at once: each request is answered, by one instance or another
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let spec = spec.clone();
            std::thread::spawn(move || {
                (0..5)
                    .map(|_| score(&spec, "x", "{}"))
                    .all(|s| s.failures.is_empty())
            })
        })
        .collect();
    assert!(handles.into_iter().all(|h| h.join().unwrap()));
}

#[test]
fn a_program_that_hangs_crashes_or_answers_nonsense_fails_the_part_and_is_replaced() {
    let failure = |s: &Scored| {
        assert_eq!((s.total, s.parts.len()), (0.0, 1));
        assert_eq!(s.failures.len(), 1, "{s:?}");
        assert_eq!(s.failures[0].0, "mine");
        s.failures[0].1.clone()
    };
    // hangs: stopped at the deadline, twice (the second request starts a new instance)
    let hangs = spec(sh("while read -r l; do sleep 30; echo 1; done", 200));
    let start = Instant::now();
    for _ in 0..2 {
        let why = failure(&score(&hangs, "x", "{}"));
        assert!(why.contains("no answer within 200 ms"), "{why}");
    }
    assert!(start.elapsed() < Duration::from_secs(10));
    // crashes at its first request: each request gets a fresh instance, which exits in turn
    let crashes = spec(sh("read -r l; exit 3", 5000));
    for _ in 0..2 {
        let why = failure(&score(&crashes, "x", "{}"));
        assert!(why.contains("exited") && why.contains('3'), "{why}");
    }
    // answers nonsense: the part fails (and the instance is replaced)
    let chatty = spec(sh("while read -r l; do echo hello; done", 5000));
    let why = failure(&score(&chatty, "x", "{}"));
    assert!(why.contains("\"hello\""), "{why}");
    // answers twice: the first answer counts, the extra line fails the next request instead of
    // answering it
    let twice = spec(sh("while read -r l; do echo 1; echo 2; done", 5000));
    assert_eq!(score(&twice, "x", "{}").total, 2.0);
    std::thread::sleep(Duration::from_millis(100));
    let why = failure(&score(&twice, "x", "{}"));
    assert!(why.contains("not asked for"), "{why}");
    assert_eq!(
        score(&twice, "x", "{}").total,
        2.0,
        "a fresh instance answers"
    );
    let not_finite = spec(sh(
        r#"while read -r l; do echo '{"reward": NaN}'; done"#,
        5000,
    ));
    failure(&score(&not_finite, "x", "{}"));
}

#[test]
fn a_program_that_cannot_start_is_an_error_up_front_and_a_failure_later() {
    let argv = vec!["/nonexistent/verifier".to_string(), "--fast".to_string()];
    let missing = Arc::new(Command::new(argv, Duration::from_secs(1)));
    let e = missing.start().unwrap_err();
    assert!(
        e.contains("cannot start `/nonexistent/verifier --fast`"),
        "{e}"
    );
    let s = score(&spec(missing), "x", "{}");
    assert!(s.failures[0].1.contains("cannot start"), "{s:?}");
    assert!(sh(JUDGE, 1000).start().is_ok());
}
