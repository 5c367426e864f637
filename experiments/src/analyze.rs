//! `ferrite analyze subnetwork RUN_DIR`: which parameters each checkpoint of a run changed against
//! its RL start (the SFT checkpoint), and what the warm start itself changed against the initial
//! model (spec §3). One row per checkpoint in `subnetwork.parquet`; the masks as bitsets in
//! `subnetwork/<checkpoint>.masks.safetensors`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use learner::alpharl::numerical_rank;
use learner::subnetwork::{model_update, overlap, sparsity, TensorUpdate};
use model::Weights;

use crate::config::Config;
use crate::logs::StepTable;
use crate::setup;

fn load(dir: &Path) -> anyhow::Result<BTreeMap<String, Tensor>> {
    Ok(Weights::load_dir(dir, DType::F32, &Device::Cpu)
        .with_context(|| dir.display().to_string())?
        .named())
}

/// Writes the changed-parameter bitsets of an update (`|Δ| > tol`, bf16 bitwise) as u8 tensors.
fn save_masks(path: &Path, updates: &[TensorUpdate]) -> anyhow::Result<()> {
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for u in updates {
        for (kind, bits) in [("tol", &u.changed_tol), ("bf16", &u.changed_bf16)] {
            let bytes = bits.to_bytes();
            let n = bytes.len();
            tensors.insert(
                format!("{}.{kind}", u.name),
                Tensor::from_vec(bytes, n, &Device::Cpu)?,
            );
        }
    }
    candle_core::safetensors::save(&tensors, path)?;
    Ok(())
}

/// The figures of one update: sparsity overall, per layer and per matrix type, and the mean
/// numerical rank fraction of its 2-D attention and MLP updates.
fn row(
    updates: &[TensorUpdate],
    before: &BTreeMap<String, Tensor>,
    after: &BTreeMap<String, Tensor>,
) -> anyhow::Result<Vec<(String, f64)>> {
    let mut out = Vec::new();
    for s in sparsity(updates) {
        out.push((format!("{}/unchanged_bf16", s.group), s.unchanged_bf16));
        out.push((format!("{}/unchanged_tol", s.group), s.unchanged_tol));
        out.push((format!("{}/frobenius", s.group), s.frobenius));
    }
    let mut fractions = Vec::new();
    for u in updates {
        let is_matrix = u.shape.len() == 2
            && ["proj"].iter().any(|k| u.name.contains(k))
            && u.name.starts_with("model.layers.");
        if !is_matrix {
            continue;
        }
        let delta = (&after[&u.name] - &before[&u.name])?;
        let data = delta.flatten_all()?.to_vec1::<f32>()?;
        let (rank, full) = numerical_rank(&data, u.shape[0], u.shape[1])?;
        fractions.push(rank as f64 / full as f64);
    }
    if !fractions.is_empty() {
        out.push((
            "rank_fraction".into(),
            fractions.iter().sum::<f64>() / fractions.len() as f64,
        ));
    }
    Ok(out)
}

pub fn subnetwork(run: &Path, tol: f64) -> anyhow::Result<()> {
    let config = Config::from_toml(
        &std::fs::read_to_string(run.join(crate::run::CONFIG_FILE))?,
        &run.display().to_string(),
    )?;
    let ckpts = run.join("checkpoints");
    let sft = ckpts.join("sft");
    anyhow::ensure!(
        sft.is_dir(),
        "{}: no SFT checkpoint to measure the RL updates from",
        run.display()
    );
    let start = load(&sft)?;
    let masks_dir = run.join("subnetwork");
    std::fs::create_dir_all(&masks_dir)?;
    let mut table = StepTable::new(run.join("subnetwork.parquet"));
    // the warm start's own update: SFT against the initial model (step 0 of the table)
    let (initial, _) = setup::load_model(&config)?;
    let initial = initial.named();
    let sft_update = model_update(&initial, &start, tol)?;
    save_masks(&masks_dir.join("sft.masks.safetensors"), &sft_update)?;
    let mut r = row(&sft_update, &initial, &start)?;
    r.insert(0, ("is_sft".into(), 1.0));
    table.push(0, &r)?;
    print_line("sft vs initial", &r);
    let mut previous: Option<Vec<TensorUpdate>> = None;
    for (step, dir) in learner::checkpoint::list(&ckpts)? {
        let after = load(&dir)?;
        let updates = model_update(&start, &after, tol)?;
        save_masks(
            &masks_dir.join(format!(
                "{}.masks.safetensors",
                learner::checkpoint::step_name(step)
            )),
            &updates,
        )?;
        let mut r = row(&updates, &start, &after)?;
        r.insert(0, ("is_sft".into(), 0.0));
        // overlap of this update's subnetwork with the previous checkpoint's, and with the SFT's
        let masks =
            |us: &[TensorUpdate]| us.iter().map(|u| u.changed_tol.clone()).collect::<Vec<_>>();
        let now = masks(&updates);
        let now_refs: Vec<_> = now.iter().collect();
        if let Some(prev) = &previous {
            let p = masks(prev);
            let o = overlap(&p.iter().collect::<Vec<_>>(), &now_refs)?;
            r.extend([
                ("prev/o1".into(), o.o1),
                ("prev/o1_random".into(), o.o1_random),
                ("prev/o2".into(), o.o2),
                ("prev/jaccard".into(), o.jaccard),
                ("prev/jaccard_random".into(), o.jaccard_random),
            ]);
        }
        let s = masks(&sft_update);
        let o = overlap(&s.iter().collect::<Vec<_>>(), &now_refs)?;
        r.extend([
            ("sft/jaccard".into(), o.jaccard),
            ("sft/jaccard_random".into(), o.jaccard_random),
        ]);
        table.push(step, &r)?;
        print_line(&format!("step {step} vs sft"), &r);
        previous = Some(updates);
    }
    println!("{}", run.join("subnetwork.parquet").display());
    Ok(())
}

/// Restricts training to a saved subnetwork: every parameter with a mask in `path` (kind `tol`
/// or `bf16`) trains only where the mask is set. Parameters the file does not cover (a value
/// head) train freely.
pub fn apply_masks(opt: &mut learner::optim::AdamW, path: &Path, kind: &str) -> anyhow::Result<()> {
    let masks = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("subnetwork mask {}", path.display()))?;
    let params: Vec<(String, usize)> = opt
        .vars()
        .map(|(n, v)| (n.to_string(), v.as_tensor().elem_count()))
        .collect();
    let (mut free, mut total, mut covered) = (0u64, 0u64, 0usize);
    for (name, n) in params {
        let Some(t) = masks.get(&format!("{name}.{kind}")) else {
            tracing::warn!("{name}: not in the subnetwork mask; trained in full");
            continue;
        };
        let bits = learner::subnetwork::Bitset::from_bytes(n, &t.to_vec1::<u8>()?)
            .with_context(|| format!("{name} in {}", path.display()))?;
        free += bits.count();
        total += n as u64;
        covered += 1;
        opt.set_mask(&name, (0..n).map(|i| bits.get(i)).collect())?;
    }
    anyhow::ensure!(
        covered > 0,
        "{}: no mask matches the model's parameters",
        path.display()
    );
    tracing::info!(
        trainable = free,
        parameters = total,
        "subnetwork-only training: {:.2} % of the parameters train",
        100.0 * free as f64 / total.max(1) as f64
    );
    Ok(())
}

fn print_line(label: &str, r: &[(String, f64)]) {
    let get = |k: &str| r.iter().find(|(n, _)| n == k).map_or(f64::NAN, |(_, v)| *v);
    println!(
        "{label:<16} unchanged: {:.4} (bf16 bitwise), {:.4} (|Δ| ≤ tol); ‖Δ‖_F {:.4}; rank {:.3} of full",
        get("all/unchanged_bf16"),
        get("all/unchanged_tol"),
        get("all/frobenius"),
        get("rank_fraction"),
    );
}
