//! Update-sparsity tracking (spec §3): which parameters each checkpoint of a run changed against
//! its RL start (the SFT checkpoint), and what the warm start itself changed against the initial
//! model. One row per checkpoint in `subnetwork.parquet` (step 0: SFT against the initial model:
//! overall, per layer and per matrix type); one row per tensor and checkpoint in
//! `subnetwork_tensors.parquet/`; the masks as bitsets in
//! `subnetwork/<checkpoint>.masks.safetensors`; the figure in `subnetwork.png`.
//!
//! A [`Tracker`] does it live during a run (`run.track_subnetwork`), at every checkpoint, so the
//! masks and figures survive checkpoint pruning; `ferrite analyze subnetwork RUN_DIR` does it
//! afterwards from the checkpoints on disk.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use learner::alpharl::numerical_rank;
use learner::subnetwork::{model_update, overlap, sparsity, Bitset, Overlap, TensorUpdate};
use model::Weights;

use crate::config::Config;
use crate::logs::{read_step_table, StepTable};
use crate::setup;

pub const TABLE: &str = "subnetwork.parquet";
pub const MASKS_DIR: &str = "subnetwork";
/// Per-tensor rows, one Parquet file per checkpoint (a dataset pyarrow reads as one table).
pub const TENSORS: &str = "subnetwork_tensors.parquet";

pub fn load(dir: &Path) -> anyhow::Result<BTreeMap<String, Tensor>> {
    Ok(Weights::load_dir(dir, DType::F32, &Device::Cpu)
        .with_context(|| dir.display().to_string())?
        .named())
}

/// The 2-D attention and MLP matrices of the decoder layers (`self_attn.{q,k,v,o}_proj.weight`,
/// `mlp.{gate,up,down}_proj.weight`): what the rank analyses and AlphaRL act on.
pub fn is_layer_matrix(name: &str) -> bool {
    name.starts_with("model.layers.") && name.ends_with("_proj.weight")
}

pub fn masks_path(run: &Path, label: &str) -> PathBuf {
    run.join(MASKS_DIR)
        .join(format!("{label}.masks.safetensors"))
}

/// Writes the changed-parameter bitsets of an update (`|Δ| > tol`, bf16 bitwise) as u8 tensors
/// named `<param>.tol` and `<param>.bf16`.
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
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Reads the `kind` (`tol` or `bf16`) masks of a masks file: parameter name → bitset. `sizes`
/// gives each parameter's element count.
pub fn load_masks(
    path: &Path,
    kind: &str,
    sizes: &BTreeMap<String, usize>,
) -> anyhow::Result<BTreeMap<String, Bitset>> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("subnetwork mask {}", path.display()))?;
    let mut out = BTreeMap::new();
    for (name, &n) in sizes {
        if let Some(t) = tensors.get(&format!("{name}.{kind}")) {
            let bits = Bitset::from_bytes(n, &t.to_vec1::<u8>()?)
                .with_context(|| format!("{name} in {}", path.display()))?;
            out.insert(name.clone(), bits);
        }
    }
    Ok(out)
}

/// Every `kind` mask of a masks file, without the model at hand: lengths come from the byte
/// counts (the last byte may be partly used, so lengths are rounded up to whole bytes; two files
/// of the same model get the same rounding).
fn load_all_masks(path: &Path, kind: &str) -> anyhow::Result<BTreeMap<String, Bitset>> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("subnetwork mask {}", path.display()))?;
    let mut out = BTreeMap::new();
    for (key, t) in &tensors {
        if let Some(name) = key.strip_suffix(&format!(".{kind}")) {
            let bytes = t.to_vec1::<u8>()?;
            out.insert(
                name.to_string(),
                Bitset::from_bytes(bytes.len() * 8, &bytes)?,
            );
        }
    }
    Ok(out)
}

/// Numerical rank and full rank of each 2-D attention and MLP update.
fn ranks(
    updates: &[TensorUpdate],
    before: &BTreeMap<String, Tensor>,
    after: &BTreeMap<String, Tensor>,
) -> anyhow::Result<BTreeMap<String, (usize, usize)>> {
    let mut out = BTreeMap::new();
    for u in updates.iter().filter(|u| is_layer_matrix(&u.name)) {
        let f32s = |t: &Tensor| t.to_dtype(DType::F32);
        let delta = (f32s(&after[&u.name])? - f32s(&before[&u.name])?)?;
        let data = delta.flatten_all()?.to_vec1::<f32>()?;
        out.insert(
            u.name.clone(),
            numerical_rank(&data, u.shape[0], u.shape[1])?,
        );
    }
    Ok(out)
}

/// The figures of one update: sparsity overall, per layer and per matrix type, and the mean
/// numerical rank fraction of its 2-D attention and MLP updates.
fn figures(
    updates: &[TensorUpdate],
    ranks: &BTreeMap<String, (usize, usize)>,
) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for s in sparsity(updates) {
        out.push((format!("{}/unchanged_bf16", s.group), s.unchanged_bf16));
        out.push((format!("{}/unchanged_tol", s.group), s.unchanged_tol));
        out.push((format!("{}/frobenius", s.group), s.frobenius));
    }
    if !ranks.is_empty() {
        let sum: f64 = ranks.values().map(|&(r, f)| r as f64 / f as f64).sum();
        out.push(("rank_fraction".into(), sum / ranks.len() as f64));
    }
    out
}

/// `subnetwork_tensors.parquet/part-<label>.parquet`: one row per tensor of one update.
fn write_tensors(
    run: &Path,
    label: &str,
    step: u64,
    is_sft: bool,
    updates: &[TensorUpdate],
    ranks: &BTreeMap<String, (usize, usize)>,
) -> anyhow::Result<()> {
    use arrow::array::{
        ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray, UInt64Array,
    };
    use arrow::datatypes::{DataType, Field, Schema};
    use std::sync::Arc;
    let n = |u: &TensorUpdate| u.numel().max(1) as f64;
    let rank = |u: &TensorUpdate, i: usize| ranks.get(&u.name).map(|r| [r.0, r.1][i] as u64);
    let columns: Vec<(&str, DataType, ArrayRef)> = vec![
        (
            "step",
            DataType::UInt64,
            Arc::new(UInt64Array::from(vec![step; updates.len()])),
        ),
        (
            "is_sft",
            DataType::Boolean,
            Arc::new(BooleanArray::from(vec![is_sft; updates.len()])),
        ),
        (
            "tensor",
            DataType::Utf8,
            Arc::new(StringArray::from_iter_values(
                updates.iter().map(|u| u.name.as_str()),
            )),
        ),
        (
            "layer",
            DataType::Int64,
            Arc::new(Int64Array::from_iter(
                updates.iter().map(|u| u.layer().map(|l| l as i64)),
            )),
        ),
        (
            "matrix_type",
            DataType::Utf8,
            Arc::new(StringArray::from_iter_values(
                updates.iter().map(|u| u.matrix_type()),
            )),
        ),
        (
            "numel",
            DataType::UInt64,
            Arc::new(UInt64Array::from_iter_values(
                updates.iter().map(|u| u.numel() as u64),
            )),
        ),
        (
            "unchanged_bf16",
            DataType::Float64,
            Arc::new(Float64Array::from_iter_values(
                updates
                    .iter()
                    .map(|u| 1.0 - u.changed_bf16.count() as f64 / n(u)),
            )),
        ),
        (
            "unchanged_tol",
            DataType::Float64,
            Arc::new(Float64Array::from_iter_values(
                updates
                    .iter()
                    .map(|u| 1.0 - u.changed_tol.count() as f64 / n(u)),
            )),
        ),
        (
            "frobenius",
            DataType::Float64,
            Arc::new(Float64Array::from_iter_values(
                updates.iter().map(|u| u.frobenius),
            )),
        ),
        (
            "rank",
            DataType::UInt64,
            Arc::new(UInt64Array::from_iter(updates.iter().map(|u| rank(u, 0)))),
        ),
        (
            "full_rank",
            DataType::UInt64,
            Arc::new(UInt64Array::from_iter(updates.iter().map(|u| rank(u, 1)))),
        ),
    ];
    let schema = Schema::new(
        columns
            .iter()
            .map(|(name, t, _)| Field::new(*name, t.clone(), true))
            .collect::<Vec<_>>(),
    );
    let batch = RecordBatch::try_new(
        Arc::new(schema),
        columns.into_iter().map(|(_, _, a)| a).collect(),
    )?;
    let dir = run.join(TENSORS);
    std::fs::create_dir_all(&dir)?;
    crate::logs::write_atomic(&dir.join(format!("part-{label}.parquet")), &batch)
}

fn overlap_columns(prefix: &str, o: Option<Overlap>) -> Vec<(String, f64)> {
    let o = o.unwrap_or(Overlap {
        o1: f64::NAN,
        o2: f64::NAN,
        jaccard: f64::NAN,
        o1_random: f64::NAN,
        o2_random: f64::NAN,
        jaccard_random: f64::NAN,
    });
    vec![
        (format!("{prefix}/o1"), o.o1),
        (format!("{prefix}/o1_random"), o.o1_random),
        (format!("{prefix}/o2"), o.o2),
        (format!("{prefix}/o2_random"), o.o2_random),
        (format!("{prefix}/jaccard"), o.jaccard),
        (format!("{prefix}/jaccard_random"), o.jaccard_random),
    ]
}

fn ordered<'a>(m: &'a BTreeMap<String, Bitset>, names: &[String]) -> Vec<&'a Bitset> {
    names.iter().filter_map(|n| m.get(n)).collect()
}

/// Measures a run's checkpoints against its RL start as they are written.
pub struct Tracker {
    run: PathBuf,
    start: BTreeMap<String, Tensor>,
    sizes: BTreeMap<String, usize>,
    tol: f64,
    table: StepTable,
}

impl Tracker {
    /// Opens the tracker of a run whose RL stage starts from `start`. A fresh table gets the
    /// warm start's own row (step 0) when `initial` (the model before SFT) is given; a resumed
    /// run (`last_step`) keeps its rows up to that step.
    pub fn open(
        run: &Path,
        start: BTreeMap<String, Tensor>,
        initial: Option<&BTreeMap<String, Tensor>>,
        tol: f64,
        last_step: Option<u64>,
    ) -> anyhow::Result<Tracker> {
        let sizes = start
            .iter()
            .map(|(n, t)| (n.clone(), t.elem_count()))
            .collect();
        let path = run.join(TABLE);
        let table = match last_step {
            Some(step) => StepTable::reopen(path, step)?,
            None => StepTable::new(path),
        };
        let mut t = Tracker {
            run: run.to_path_buf(),
            start,
            sizes,
            tol,
            table,
        };
        if let (None, Some(initial)) = (last_step, initial) {
            let updates = model_update(initial, &t.start, tol)?;
            save_masks(&masks_path(run, "sft"), &updates)?;
            let ranks = ranks(&updates, initial, &t.start)?;
            write_tensors(run, "sft", 0, true, &updates, &ranks)?;
            let mut r = vec![("is_sft".to_string(), 1.0)];
            r.extend(figures(&updates, &ranks));
            r.extend(overlap_columns("prev", None));
            r.extend(overlap_columns("sft", None));
            t.table.push(0, &r)?;
            print_line("sft vs initial", &r);
        }
        Ok(t)
    }

    /// Whether checkpoint `step` has its row (a run killed between saving a checkpoint and
    /// measuring it has not).
    pub fn has(&self, step: u64) -> bool {
        self.table.rows().iter().any(|(s, _)| *s == step)
    }

    /// The newest masks file of a step before `step`.
    fn previous(&self, step: u64) -> Option<PathBuf> {
        let entries = std::fs::read_dir(self.run.join(MASKS_DIR)).ok()?;
        entries
            .filter_map(|e| {
                let name = e.ok()?.file_name().into_string().ok()?;
                let s: u64 = name
                    .strip_prefix("step-")?
                    .strip_suffix(".masks.safetensors")?
                    .parse()
                    .ok()?;
                (s < step).then_some((s, name))
            })
            .max()
            .map(|(_, name)| self.run.join(MASKS_DIR).join(name))
    }

    /// Measures the weights of checkpoint `step`, appends its row and writes its masks.
    pub fn record(
        &mut self,
        step: u64,
        after: &BTreeMap<String, Tensor>,
    ) -> anyhow::Result<Vec<(String, f64)>> {
        let updates = model_update(&self.start, after, self.tol)?;
        let names: Vec<String> = updates.iter().map(|u| u.name.clone()).collect();
        let now: BTreeMap<String, Bitset> = updates
            .iter()
            .map(|u| (u.name.clone(), u.changed_tol.clone()))
            .collect();
        let ranks = ranks(&updates, &self.start, after)?;
        let label = learner::checkpoint::step_name(step);
        write_tensors(&self.run, &label, step, false, &updates, &ranks)?;
        let mut r = vec![("is_sft".to_string(), 0.0)];
        r.extend(figures(&updates, &ranks));
        // overlap with the previous checkpoint's subnetwork, and with the SFT stage's
        let against = |path: Option<PathBuf>| -> anyhow::Result<Option<Overlap>> {
            let Some(path) = path.filter(|p| p.is_file()) else {
                return Ok(None);
            };
            let other = load_masks(&path, "tol", &self.sizes)?;
            Ok(Some(overlap(
                &ordered(&other, &names),
                &ordered(&now, &names),
            )?))
        };
        r.extend(overlap_columns("prev", against(self.previous(step))?));
        r.extend(overlap_columns(
            "sft",
            against(Some(masks_path(&self.run, "sft")))?,
        ));
        save_masks(&masks_path(&self.run, &label), &updates)?;
        self.table.push(step, &r)?;
        if let Err(e) = plot(&self.run) {
            tracing::warn!("subnetwork.png: {e:#}");
        }
        Ok(r)
    }
}

fn run_config(run: &Path) -> anyhow::Result<Config> {
    let path = run.join(crate::run::CONFIG_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{} is not a run directory", run.display()))?;
    Config::from_toml(&text, &path.display().to_string())
}

/// `ferrite analyze subnetwork RUN_DIR`: the tracker over a finished run's checkpoints. The RL
/// start is `checkpoints/sft` (or the initial model when the run had no SFT stage).
pub fn subnetwork(run: &Path, tol: f64) -> anyhow::Result<()> {
    let config = run_config(run)?.on_host();
    let ckpts = run.join("checkpoints");
    let sft = ckpts.join("sft");
    let (initial, _) = setup::load_model(&config)?;
    let initial = initial.named();
    let mut tracker = if sft.is_dir() {
        Tracker::open(run, load(&sft)?, Some(&initial), tol, None)?
    } else {
        Tracker::open(run, initial, None, tol, None)?
    };
    // masks of checkpoints pruned since are kept; those of the checkpoints present are redone
    for (step, dir) in learner::checkpoint::list(&ckpts)? {
        let r = tracker.record(step, &load(&dir)?)?;
        print_line(&format!("step {step} vs start"), &r);
    }
    println!("{}", run.join(TABLE).display());
    println!("{}", run.join("subnetwork.png").display());
    Ok(())
}

/// A masks file, or a run directory's newest checkpoint masks.
fn resolve_masks(path: &Path) -> anyhow::Result<PathBuf> {
    if path.is_file() {
        return Ok(path.to_path_buf());
    }
    let dir = path.join(MASKS_DIR);
    let newest = std::fs::read_dir(&dir)
        .with_context(|| {
            format!(
                "{}: neither a masks file nor a run with {MASKS_DIR}/ (run ferrite analyze subnetwork)",
                path.display()
            )
        })?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("step-") && n.ends_with(".masks.safetensors"))
        .max()
        .with_context(|| format!("{}: no checkpoint masks", dir.display()))?;
    Ok(dir.join(newest))
}

/// `ferrite analyze overlap A B`: the overlap of two subnetworks (masks files or runs), overall
/// and per matrix type, beside the overlap two random subnetworks of the same densities have.
pub fn overlap_cli(a: &Path, b: &Path, kind: &str) -> anyhow::Result<()> {
    let (pa, pb) = (resolve_masks(a)?, resolve_masks(b)?);
    let (ma, mb) = (load_all_masks(&pa, kind)?, load_all_masks(&pb, kind)?);
    anyhow::ensure!(
        !ma.is_empty(),
        "{}: no `{kind}` masks (kind is tol or bf16)",
        pa.display()
    );
    let sizes = |m: &BTreeMap<String, Bitset>| -> Vec<(String, usize)> {
        m.iter().map(|(n, b)| (n.clone(), b.len)).collect()
    };
    anyhow::ensure!(
        sizes(&ma) == sizes(&mb),
        "{} and {} cover different parameters",
        pa.display(),
        pb.display()
    );
    println!("A = {}\nB = {}", pa.display(), pb.display());
    println!(
        "{:<30} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "group", "o1", "random", "o2", "random", "jaccard", "random"
    );
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for name in ma.keys() {
        groups.entry("all".into()).or_default().push(name.clone());
        let kind = name.rsplit('.').nth(1).unwrap_or(name);
        groups
            .entry(format!("type.{kind}"))
            .or_default()
            .push(name.clone());
    }
    for (group, names) in groups {
        let o = overlap(&ordered(&ma, &names), &ordered(&mb, &names))?;
        println!(
            "{group:<30} {:>9.4} {:>9.4} {:>9.4} {:>9.4} {:>9.4} {:>9.4}",
            o.o1, o.o1_random, o.o2, o.o2_random, o.jaccard, o.jaccard_random
        );
    }
    println!("o1 = |A∩B|/|A|, o2 = |A∩B|/|B| over the changed parameters; random: independent masks of the same densities");
    Ok(())
}

/// Restricts training to a saved subnetwork: every parameter with a mask in `path` (kind `tol`
/// or `bf16`) trains only where the mask is set. Parameters the file does not cover (a value
/// head) train freely.
pub fn apply_masks(opt: &mut learner::optim::AdamW, path: &Path, kind: &str) -> anyhow::Result<()> {
    let sizes: BTreeMap<String, usize> = opt
        .vars()
        .map(|(n, v)| (n.to_string(), v.as_tensor().elem_count()))
        .collect();
    let masks = load_masks(path, kind, &sizes)?;
    for name in sizes.keys().filter(|n| !masks.contains_key(*n)) {
        tracing::warn!("{name}: not in the subnetwork mask; trained in full");
    }
    anyhow::ensure!(
        !masks.is_empty(),
        "{}: no mask matches the model's parameters",
        path.display()
    );
    let (mut free, mut total) = (0u64, 0u64);
    for (name, bits) in &masks {
        free += bits.count();
        total += bits.len as u64;
        opt.set_mask(name, (0..bits.len).map(|i| bits.get(i)).collect())?;
    }
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
        "{label:<18} unchanged: {:.4} (bf16 bitwise), {:.4} (|Δ| ≤ tol); ‖Δ‖_F {:.4}; rank {:.3} of full",
        get("all/unchanged_bf16"),
        get("all/unchanged_tol"),
        get("all/frobenius"),
        get("rank_fraction"),
    );
}

/// `subnetwork.png`: unchanged fractions, norms, rank and overlaps over the checkpoints, and the
/// last checkpoint's per-layer and per-matrix-type sparsity beside the SFT stage's.
pub fn plot(run: &Path) -> anyhow::Result<()> {
    use crate::report::{draw, Panel};
    let (cols, rows) = read_step_table(&run.join(TABLE))?;
    let col = |name: &str| cols.iter().position(|c| c == name);
    let rl: Vec<&(u64, Vec<f64>)> = rows
        .iter()
        .filter(|(_, r)| col("is_sft").is_some_and(|i| r[i] == 0.0))
        .collect();
    let sft = rows
        .iter()
        .find(|(_, r)| col("is_sft").is_some_and(|i| r[i] == 1.0));
    let over_steps = |name: &str| -> Vec<(f64, f64)> {
        col(name).map_or(Vec::new(), |i| {
            rl.iter()
                .filter(|(_, r)| r[i].is_finite())
                .map(|(s, r)| (*s as f64, r[i]))
                .collect()
        })
    };
    // per layer / per type of one row: (index, value) points and the category names
    let by_group =
        |row: Option<&(u64, Vec<f64>)>, prefix: &str| -> (Vec<String>, Vec<(f64, f64)>) {
            let Some((_, r)) = row else {
                return (Vec::new(), Vec::new());
            };
            let groups: Vec<(String, f64)> = cols
                .iter()
                .enumerate()
                .filter_map(|(i, c)| {
                    let g = c.strip_prefix(prefix)?.strip_suffix("/unchanged_tol")?;
                    Some((g.trim_start_matches('0').to_string(), r[i]))
                })
                .collect();
            let names = groups
                .iter()
                .map(|(g, _)| match g.as_str() {
                    "" => "0".into(),
                    "embed_tokens" => "embed".into(),
                    "lm_head" => "head".into(),
                    "input_layernorm" => "ln1".into(),
                    "post_attention_layernorm" => "ln2".into(),
                    "norm" => "norm".into(),
                    other => other.trim_end_matches("_proj").to_string(),
                })
                .collect();
            let points = groups
                .iter()
                .enumerate()
                .map(|(i, (_, v))| (i as f64, *v))
                .collect();
            (names, points)
        };
    let last = rl.last().copied();
    let (layers, rl_layers) = by_group(last, "layer.");
    let (_, sft_layers) = by_group(sft, "layer.");
    let (types, rl_types) = by_group(last, "type.");
    let (_, sft_types) = by_group(sft, "type.");
    let last_step = last.map_or(0, |(s, _)| *s);
    let rl_label = format!("RL step {last_step} vs SFT");
    let panels = vec![
        Panel::steps(
            "unchanged fraction (RL vs its start)",
            vec![
                ("bf16 bitwise", over_steps("all/unchanged_bf16")),
                ("|delta| <= tol", over_steps("all/unchanged_tol")),
            ],
        ),
        Panel::steps(
            "update norm ||delta||_F",
            vec![("all", over_steps("all/frobenius"))],
        ),
        Panel::steps(
            "numerical rank / full rank",
            vec![("attn + MLP mean", over_steps("rank_fraction"))],
        ),
        Panel::steps(
            "subnetwork overlap (Jaccard)",
            vec![
                ("with previous ckpt", over_steps("prev/jaccard")),
                ("random baseline", over_steps("prev/jaccard_random")),
                ("with SFT's", over_steps("sft/jaccard")),
                ("random baseline (SFT)", over_steps("sft/jaccard_random")),
            ],
        ),
        Panel::categories(
            "unchanged (|delta| <= tol) per layer",
            "layer",
            layers,
            vec![
                (rl_label.as_str(), rl_layers),
                ("SFT vs initial", sft_layers),
            ],
        ),
        Panel::categories(
            "unchanged (|delta| <= tol) per matrix type",
            "matrix type",
            types,
            vec![(rl_label.as_str(), rl_types), ("SFT vs initial", sft_types)],
        ),
    ];
    draw(&run.join("subnetwork.png"), &panels)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Array, AsArray, RecordBatch};
    use arrow::datatypes::{Float64Type, UInt64Type};

    const UP: &str = "model.layers.0.mlp.up_proj.weight";
    const NORM: &str = "model.layers.0.input_layernorm.weight";

    fn named(up: Vec<f32>, norm: Vec<f32>) -> BTreeMap<String, Tensor> {
        BTreeMap::from([
            (
                UP.into(),
                Tensor::from_vec(up, (2, 3), &Device::Cpu).unwrap(),
            ),
            (
                NORM.into(),
                Tensor::from_vec(norm, 4, &Device::Cpu).unwrap(),
            ),
        ])
    }

    fn read(path: &Path) -> RecordBatch {
        let f = std::fs::File::open(path).unwrap();
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
            .unwrap()
            .build()
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
    }

    #[test]
    fn the_tracker_writes_per_tensor_rows_masks_and_overlaps_with_the_previous_checkpoint() {
        let run = std::env::temp_dir().join(format!("ferrite-tracker-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run);
        let start = named(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], vec![1.0; 4]);
        let mut t = Tracker::open(&run, start, None, 1e-5, None).unwrap();
        // step 1: two of six matrix entries and one of four norm entries move; one by less than tol
        let one = named(
            vec![1.5, 2.0, 3.25, 4.0, 5.0, 6.0],
            vec![1.0, 1.0, 1.0 + 1e-7, 0.5],
        );
        t.record(1, &one).unwrap();
        // step 2: the same two entries and one more
        let two = named(
            vec![1.5, 2.5, 3.25, 4.0, 5.0, 6.0],
            vec![1.0, 1.0, 1.0, 0.5],
        );
        let r = t.record(2, &two).unwrap();
        let get = |k: &str| r.iter().find(|(n, _)| n == k).unwrap().1;
        assert!((get("type.up_proj/unchanged_tol") - 0.5).abs() < 1e-12);
        assert!((get("all/unchanged_tol") - 6.0 / 10.0).abs() < 1e-12);
        // masks {0, 2, norm 3} then {0, 1, 2, norm 3}: o1 = 3/3, o2 = 3/4, Jaccard 3/4
        assert!((get("prev/o1") - 1.0).abs() < 1e-12);
        assert!((get("prev/o2") - 0.75).abs() < 1e-12);
        assert!((get("prev/jaccard") - 0.75).abs() < 1e-12);
        // the rank-1 matrix update of step 1 has rank 1 of 2
        let b = read(&run.join(TENSORS).join("part-step-000001.parquet"));
        let tensors: Vec<&str> = b.column(2).as_string::<i32>().iter().flatten().collect();
        assert_eq!(tensors, vec![NORM, UP]);
        let tol = b.column(7).as_primitive::<Float64Type>();
        assert_eq!(tol.value(0), 0.75, "the 1e-7 change is below tol");
        assert!((tol.value(1) - 4.0 / 6.0).abs() < 1e-12);
        let rank = b.column(9).as_primitive::<UInt64Type>();
        assert!(rank.is_null(0));
        assert_eq!(rank.value(1), 1);
        assert_eq!(b.column(10).as_primitive::<UInt64Type>().value(1), 2);
        assert!(masks_path(&run, "step-000002").is_file());
        assert!(t.has(2) && !t.has(3));
        let _ = std::fs::remove_dir_all(&run);
    }
}
