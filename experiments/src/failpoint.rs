//! Failure injection for the recovery tests. `FERRITE_FAILPOINT=point@step` (say `rl-step@3`)
//! makes `point` fail with an error where it is reached after `step` steps of its stage, as a
//! device out of memory or a lost rollout worker would; `point@step:panic` makes it panic there,
//! as a bug would. Unset, nothing fails.

use std::sync::OnceLock;

/// The variable that names the point to fail.
pub const VAR: &str = "FERRITE_FAILPOINT";

/// A point a run passes once a step: where a warm-start step (`sft-step`), an RL step's update
/// (`rl-step`) or a DPO step (`dpo-step`) begins.
pub fn check(point: &str, step: u64) -> anyhow::Result<()> {
    static SPEC: OnceLock<Option<String>> = OnceLock::new();
    let Some(spec) = SPEC.get_or_init(|| std::env::var(VAR).ok()) else {
        return Ok(());
    };
    let parsed = spec.split_once('@').and_then(|(p, rest)| {
        let (s, how) = rest.split_once(':').unwrap_or((rest, "error"));
        Some((p, s.parse::<u64>().ok()?, how))
    });
    match parsed {
        Some((p, s, how)) if p == point && s == step => {
            let what = format!("{point} failed after {step} steps ({VAR}={spec})");
            match how {
                "panic" => panic!("{what}"),
                _ => anyhow::bail!(what),
            }
        }
        Some((_, _, "error" | "panic")) => Ok(()),
        _ => anyhow::bail!("{VAR}={spec}: expected POINT@STEP or POINT@STEP:panic, say rl-step@3"),
    }
}
