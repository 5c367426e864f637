//! A reward computed by an external program (any language: a Python verifier such as
//! `math_verify`, a code sandbox, a judge client), the way TRL's reward functions, verl's
//! `custom_reward_function` or OpenRLHF's remote reward let users bring their own, but under
//! ferrite's rules: it runs under a deadline, and a program that hangs, crashes or answers
//! nonsense fails that completion's part (recorded, counted) and is started afresh for the
//! next one; it never stops or stalls a run.
//!
//! The protocol is one JSON object a line each way. ferrite writes, for each completion,
//! `{"completion": …, "completion_tokens": …}` with the record's `prompt`, `answer` and
//! `metadata` fields added; the program answers one line: a number (the reward), or an object
//! `{"reward": x}` with, optionally, `"correct": true / false` (which sets the accuracy when the
//! part is the task's first), and nothing else on stdout (logs go to stderr). The programs stay
//! up between requests: one per caller at a time (a rollout worker), started as needed and kept
//! for the next request after each good answer.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Mutex;
use std::time::Duration;

/// An external reward program and its running instances.
pub struct Command {
    /// The program and its arguments.
    argv: Vec<String>,
    /// How long one answer may take.
    timeout: Duration,
    /// Running instances waiting for a request.
    idle: Mutex<Vec<Process>>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Command")
            .field("argv", &self.argv)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl PartialEq for Command {
    fn eq(&self, other: &Self) -> bool {
        self.argv == other.argv && self.timeout == other.timeout
    }
}

/// One running instance: its stdin, and the lines of its stdout as a reader thread reads them.
struct Process {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Command {
    /// Starts nothing yet: see [`Command::start`].
    pub fn new(argv: Vec<String>, timeout: Duration) -> Self {
        Command {
            argv,
            timeout,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// The program as it is written, for messages.
    pub fn name(&self) -> String {
        self.argv.join(" ")
    }

    /// Starts one instance (kept for the first request): whether the program can run at all.
    pub fn start(&self) -> Result<(), String> {
        let p = self.spawn()?;
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(p);
        Ok(())
    }

    fn spawn(&self) -> Result<Process, String> {
        let (program, args) = self
            .argv
            .split_first()
            .ok_or_else(|| "no program given".to_string())?;
        let mut child = std::process::Command::new(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("cannot start `{}`: {e}", self.name()))?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Ok(Process {
            child,
            stdin,
            lines,
        })
    }

    /// The program's answer to one request line (a JSON object): the reward and, if it says,
    /// whether the completion is correct. An instance is kept for the next request only after
    /// a good answer; one that missed the deadline, exited, answered nonsense or wrote lines it
    /// was not asked for is dropped (killed), so that its answers never go to the wrong request.
    pub fn score(&self, request: &str) -> Result<(f32, Option<bool>), String> {
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut p = match idle {
            Some(p) => p,
            None => self.spawn()?,
        };
        let stray = p.lines.try_iter().count();
        if stray > 0 {
            return Err(format!(
                "`{}` wrote {stray} line(s) it was not asked for (one answer line a request; \
                 logs go to stderr): stopped",
                self.name()
            ));
        }
        let sent = writeln!(p.stdin, "{request}").and_then(|_| p.stdin.flush());
        if let Err(e) = sent {
            return Err(format!("`{}` did not take the request: {e}", self.name()));
        }
        let line = match p.lines.recv_timeout(self.timeout) {
            Ok(line) => line,
            Err(RecvTimeoutError::Timeout) => {
                return Err(format!(
                    "`{}` gave no answer within {} ms (stopped; the next request starts it \
                     again)",
                    self.name(),
                    self.timeout.as_millis()
                ))
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = p.child.wait().map(|s| s.to_string()).unwrap_or_default();
                return Err(format!("`{}` exited ({status})", self.name()));
            }
        };
        let answer = parse_answer(&line)?;
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(p);
        Ok(answer)
    }
}

/// A reply line: a number, or `{"reward": x, "correct": bool?}`; the reward must be finite.
pub fn parse_answer(line: &str) -> Result<(f32, Option<bool>), String> {
    let bad = || format!("answer {line:?} is not a number nor {{\"reward\": number}}");
    let value: serde_json::Value = serde_json::from_str(line.trim()).map_err(|_| bad())?;
    let (reward, correct) = match &value {
        serde_json::Value::Number(n) => (n.as_f64(), None),
        serde_json::Value::Object(o) => {
            let correct = match o.get("correct") {
                None | Some(serde_json::Value::Null) => None,
                Some(serde_json::Value::Bool(b)) => Some(*b),
                Some(_) => return Err(format!("answer {line:?}: `correct` must be true or false")),
            };
            (o.get("reward").and_then(serde_json::Value::as_f64), correct)
        }
        _ => (None, None),
    };
    match reward {
        Some(r) if r.is_finite() && (r as f32).is_finite() => Ok((r as f32, correct)),
        Some(r) => Err(format!("answer {line:?}: reward {r} is not finite")),
        None => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_numbers_or_objects_with_a_finite_reward() {
        assert_eq!(parse_answer("0.5\n"), Ok((0.5, None)));
        assert_eq!(parse_answer(" -2 "), Ok((-2.0, None)));
        assert_eq!(
            parse_answer(r#"{"reward": 1, "correct": true}"#),
            Ok((1.0, Some(true)))
        );
        assert_eq!(parse_answer(r#"{"reward": 0.25}"#), Ok((0.25, None)));
        for bad in ["", "yes", "[1]", r#"{"score": 1}"#, "1e999", r#""1""#] {
            assert!(parse_answer(bad).is_err(), "{bad:?}");
        }
        let e = parse_answer(r#"{"reward": 1, "correct": "yes"}"#).unwrap_err();
        assert!(e.contains("correct"), "{e}");
    }
}
