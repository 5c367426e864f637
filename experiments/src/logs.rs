//! The run's Parquet logs, each readable at every moment, during the run and after it dies:
//!
//! - `metrics.parquet` (one row per step) and `eval.parquet` (one row per evaluation) are small
//!   tables rewritten whole after each row: written to a temporary file and renamed, so a
//!   reader never sees a torn file.
//! - `rollouts.parquet/` is a directory of complete Parquet files, one per step (a dataset
//!   that `pyarrow.parquet.read_table("rollouts.parquet")` or polars reads as one table).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use arrow::array::{
    Array, ArrayRef, AsArray, Float32Array, Float64Array, RecordBatch, UInt64Array,
};
use arrow::datatypes::{DataType, Field, Float64Type, Schema, UInt64Type};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::tensorboard::{now, Board, NamedRows};

fn props() -> WriterProperties {
    WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .build()
}

/// Writes `batch` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, batch: &RecordBatch) -> anyhow::Result<()> {
    let tmp = path.with_extension("parquet.tmp");
    let file = std::fs::File::create(&tmp).with_context(|| tmp.display().to_string())?;
    let mut w = ArrowWriter::try_new(file, batch.schema(), Some(props()))?;
    w.write(batch)?;
    w.close()?;
    std::fs::rename(&tmp, path).with_context(|| path.display().to_string())?;
    Ok(())
}

/// The column of every [`StepTable`] row that holds when the row was logged (seconds since the
/// Unix epoch): what its TensorBoard events carry as their wall time, rebuilt or not.
pub const WALL_TIME: &str = "time/wall";

/// A table of a `step` column and named f64 columns, one row per step; the last column,
/// [`WALL_TIME`], is when each row was logged.
#[derive(Debug, Clone, Default)]
pub struct StepTable {
    path: PathBuf,
    columns: Vec<String>,
    rows: Vec<(u64, Vec<f64>)>,
    /// Each row also goes to this TensorBoard event file, tagged `prefix/column`.
    board: Option<(Arc<Board>, String)>,
}

impl StepTable {
    pub fn new(path: PathBuf) -> Self {
        StepTable {
            path,
            columns: Vec::new(),
            rows: Vec::new(),
            board: None,
        }
    }

    /// Every row from now on also goes to `board` under `prefix/`.
    pub fn mirror(&mut self, board: &Arc<Board>, prefix: &str) {
        self.board = Some((board.clone(), prefix.to_string()));
    }

    /// The rows with their column names and the time each was logged (what [`Board::rebuild`]
    /// takes; NaN for a row of a table written before [`WALL_TIME`] was).
    pub fn named_rows(&self) -> NamedRows {
        (0..self.rows.len())
            .map(|i| {
                let (step, row) = &self.rows[i];
                let values = self.columns.iter().cloned().zip(row.iter().copied());
                let values = values.filter(|(c, _)| c != WALL_TIME).collect();
                (*step, self.value(i, WALL_TIME), values)
            })
            .collect()
    }

    /// A table as its file holds it (empty when there is none), for reading.
    pub fn read(path: PathBuf) -> anyhow::Result<Self> {
        let mut t = StepTable::new(path);
        if t.path.exists() {
            (t.columns, t.rows) = read_step_table(&t.path)?;
        }
        Ok(t)
    }

    /// Reopens a table, keeping the rows of steps `≤ last_step` (a resumed run continues it).
    pub fn reopen(path: PathBuf, last_step: u64) -> anyhow::Result<Self> {
        let mut t = StepTable::read(path)?;
        if !t.path.exists() {
            return Ok(t);
        }
        t.rows.retain(|(s, _)| *s <= last_step);
        t.flush()?;
        Ok(t)
    }

    pub fn rows(&self) -> &[(u64, Vec<f64>)] {
        &self.rows
    }

    /// The value of column `name` in row `i` (NaN when the table has no such column).
    pub fn value(&self, i: usize, name: &str) -> f64 {
        match (
            self.columns.iter().position(|c| c == name),
            self.rows.get(i),
        ) {
            (Some(c), Some((_, row))) => row[c],
            _ => f64::NAN,
        }
    }

    /// The value of the first column starting with `prefix` other than `except`.
    pub fn value_like(&self, i: usize, prefix: &str, except: &str) -> f64 {
        match self
            .columns
            .iter()
            .find(|c| c.starts_with(prefix) && c.as_str() != except)
        {
            Some(name) => self.value(i, name),
            None => f64::NAN,
        }
    }

    /// Appends a row (its names fix the columns on the first row; later rows give a value for
    /// each column, NaN where they lack one) and rewrites the file.
    pub fn push(&mut self, step: u64, values: &[(String, f64)]) -> anyhow::Result<()> {
        if self.columns.is_empty() {
            self.columns = values.iter().map(|(n, _)| n.clone()).collect();
        }
        // a table written before the column was, reopened: NaN for its earlier rows
        if !self.columns.iter().any(|c| c == WALL_TIME) {
            self.columns.push(WALL_TIME.into());
            self.rows.iter_mut().for_each(|(_, r)| r.push(f64::NAN));
        }
        let wall = now();
        let row = self
            .columns
            .iter()
            .map(|c| match c.as_str() {
                WALL_TIME => wall,
                _ => values
                    .iter()
                    .find(|(n, _)| n == c)
                    .map_or(f64::NAN, |(_, v)| *v),
            })
            .collect();
        self.rows.push((step, row));
        self.flush()?;
        match &self.board {
            Some((board, prefix)) => board.scalars(prefix, step, wall, values),
            None => Ok(()),
        }
    }

    /// Sets column `name` of the last row (a timing known only after the row had to be on disk)
    /// and rewrites the file.
    pub fn set_last(&mut self, name: &str, value: f64) -> anyhow::Result<()> {
        let c = self
            .columns
            .iter()
            .position(|c| c == name)
            .with_context(|| format!("no column {name}"))?;
        let (step, row) = self.rows.last_mut().context("no row")?;
        row[c] = value;
        let step = *step;
        self.flush()?;
        let wall = self.value(self.rows.len() - 1, WALL_TIME);
        match &self.board {
            Some((board, prefix)) => {
                board.scalars(prefix, step, wall, &[(name.to_string(), value)])
            }
            None => Ok(()),
        }
    }

    fn flush(&self) -> anyhow::Result<()> {
        let mut fields = vec![Field::new("step", DataType::UInt64, false)];
        let mut arrays: Vec<ArrayRef> = vec![Arc::new(UInt64Array::from(
            self.rows.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        ))];
        for (i, c) in self.columns.iter().enumerate() {
            fields.push(Field::new(c, DataType::Float64, true));
            arrays.push(Arc::new(Float64Array::from(
                self.rows.iter().map(|(_, r)| r[i]).collect::<Vec<_>>(),
            )));
        }
        let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)?;
        write_atomic(&self.path, &batch)
    }
}

/// Reads a table written by [`StepTable`].
/// Column names and `(step, values)` rows.
pub type Rows = (Vec<String>, Vec<(u64, Vec<f64>)>);

pub fn read_step_table(path: &Path) -> anyhow::Result<Rows> {
    let file = std::fs::File::open(path).with_context(|| path.display().to_string())?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)?.build()?;
    let mut columns = Vec::new();
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch?;
        let schema = batch.schema();
        columns = schema
            .fields()
            .iter()
            .skip(1)
            .map(|f| f.name().clone())
            .collect();
        let steps = batch
            .column(0)
            .as_primitive_opt::<UInt64Type>()
            .context("the step column")?;
        let values: Vec<_> = (1..batch.num_columns())
            .map(|c| {
                batch
                    .column(c)
                    .as_primitive_opt::<Float64Type>()
                    .context("a metric column")
            })
            .collect::<anyhow::Result<_>>()?;
        for r in 0..batch.num_rows() {
            rows.push((
                steps.value(r),
                values
                    .iter()
                    .map(|v| if v.is_null(r) { f64::NAN } else { v.value(r) })
                    .collect(),
            ));
        }
    }
    Ok((columns, rows))
}

/// `rollouts.parquet/part-<step>.parquet`: the sample schema plus `step` and `advantage`:
/// the rows the step trained on; rows dropped as stale are counted in `metrics.parquet`.
pub struct RolloutLog {
    dir: PathBuf,
}

impl RolloutLog {
    /// Opens the directory, removing parts after `last_step` (written by a run that died).
    pub fn open(dir: PathBuf, last_step: Option<u64>) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let step = name
                .strip_prefix("part-")
                .and_then(|n| n.strip_suffix(".parquet"))
                .and_then(|n| n.parse::<u64>().ok());
            let stale = match (step, last_step) {
                (Some(s), Some(last)) => s > last,
                (Some(_), None) => true,
                (None, _) => name.ends_with(".tmp"),
            };
            if stale {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(RolloutLog { dir })
    }

    pub fn write(
        &self,
        step: u64,
        batches: &[RecordBatch],
        advantages: &[f32],
    ) -> anyhow::Result<()> {
        if batches.is_empty() {
            return Ok(());
        }
        let schema = rollout::schema::schema();
        let all = arrow::compute::concat_batches(&schema, batches)?;
        let n = all.num_rows();
        anyhow::ensure!(advantages.len() == n, "one advantage per row");
        let mut fields: Vec<Field> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
        fields.push(Field::new("step", DataType::UInt64, false));
        fields.push(Field::new("advantage", DataType::Float32, false));
        let mut columns = all.columns().to_vec();
        columns.push(Arc::new(UInt64Array::from(vec![step; n])));
        columns.push(Arc::new(Float32Array::from(advantages.to_vec())));
        let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)?;
        write_atomic(&self.dir.join(format!("part-{step:06}.parquet")), &batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_tables_round_trip_and_truncate_on_reopen() {
        let dir = std::env::temp_dir().join(format!("ferrite-logs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics.parquet");
        let mut t = StepTable::new(path.clone());
        for s in 1..=4u64 {
            t.push(
                s,
                &[("loss".into(), s as f64), ("reward".into(), 0.5 * s as f64)],
            )
            .unwrap();
        }
        let (cols, rows) = read_step_table(&path).unwrap();
        assert_eq!(cols, vec!["loss", "reward", WALL_TIME]);
        assert_eq!((rows[3].0, &rows[3].1[..2]), (4, &[4.0, 2.0][..]));
        // when each row was logged, in order
        assert!(rows
            .windows(2)
            .all(|w| w[0].1[2] <= w[1].1[2] && w[0].1[2] > 1.7e9));
        let t = StepTable::reopen(path.clone(), 2).unwrap();
        assert_eq!(t.rows().len(), 2);
        assert_eq!(read_step_table(&path).unwrap().1.len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
