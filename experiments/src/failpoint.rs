//! Failure injection for the recovery tests. `FERRITE_FAILPOINT=point@step` (say `rl-step@3`)
//! makes `point` fail where it is reached after `step` steps of its stage, as a device out of
//! memory or a lost rollout worker would. Unset, nothing fails.

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
    let parsed = spec
        .split_once('@')
        .and_then(|(p, s)| Some((p, s.parse::<u64>().ok()?)));
    match parsed {
        None => anyhow::bail!("{VAR}={spec}: expected POINT@STEP, say rl-step@3"),
        Some((p, s)) if p == point && s == step => {
            anyhow::bail!("{point} failed after {step} steps ({VAR}={spec})")
        }
        Some(_) => Ok(()),
    }
}
