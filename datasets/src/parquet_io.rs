//! Parquet files, streamed one row group at a time. Opening validates every row (one pass);
//! reading decodes only the row group asked for.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::{ArrowWriter, ProjectionMask};
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use crate::arrow_json::{batch_from_rows, rows};
use crate::error::{DataError, Result};
use crate::fields::{record_to_row, Fields};
use crate::record::Record;
use crate::report::{BadRowPolicy, BadRowReport};

#[derive(Debug)]
struct Group {
    index: usize,
    /// First row number of the group in the file.
    first_row: u64,
    /// Usable rows of the selected split (offsets within the group).
    rows: Vec<u32>,
}

#[derive(Debug)]
pub struct ParquetFile {
    path: PathBuf,
    fields: Fields,
    groups: Vec<Group>,
    pub report: BadRowReport,
}

fn perr(path: &Path, e: impl std::fmt::Display) -> DataError {
    DataError::Parquet {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn check_format(path: &Path) -> Result<()> {
    let mut f = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut magic = [0u8; 4];
    let n = f.read(&mut magic).map_err(|e| DataError::io(path, e))?;
    if n < 4 || &magic != b"PAR1" {
        let why = if magic.first() == Some(&b'{') {
            "it looks like JSON Lines"
        } else {
            "no PAR1 magic"
        };
        return Err(DataError::WrongFormat {
            path: path.to_path_buf(),
            expected: "Parquet",
            why: why.into(),
        });
    }
    Ok(())
}

/// Decodes one row group into JSON rows.
/// Decodes one row group into JSON rows, optionally only the named top-level columns.
fn group_rows(
    path: &Path,
    group: usize,
    only: Option<&[String]>,
) -> Result<Vec<serde_json::Map<String, serde_json::Value>>> {
    let file = File::open(path).map_err(|e| DataError::io(path, e))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| perr(path, e))?;
    let builder = match only {
        Some(names) => {
            let roots: Vec<usize> = builder
                .schema()
                .fields()
                .iter()
                .enumerate()
                .filter(|(_, f)| names.contains(f.name()))
                .map(|(i, _)| i)
                .collect();
            let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
            builder.with_projection(mask)
        }
        None => builder,
    };
    let reader = builder
        .with_row_groups(vec![group])
        .with_batch_size(4096)
        .build()
        .map_err(|e| perr(path, e))?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| perr(path, e))?;
        out.extend(rows(&batch).map_err(|e| perr(path, e))?);
    }
    Ok(out)
}

impl ParquetFile {
    pub fn open(
        path: &Path,
        fields: &Fields,
        policy: BadRowPolicy,
        keep: &dyn Fn(u64) -> bool,
    ) -> Result<Self> {
        check_format(path)?;
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| perr(path, e))?;
        let meta = builder.metadata().clone();
        let mut report = BadRowReport::new(path);
        let mut groups = Vec::new();
        let mut first_row = 0u64;
        // validation reads only the columns the record is built from (and `id`, which names it)
        let mut needed: Vec<String> = fields
            .prompt
            .iter()
            .chain(&fields.answer)
            .cloned()
            .collect();
        if let Some((c, r)) = &fields.preference {
            needed.extend([c.clone(), r.clone()]);
        }
        needed.push("id".into());
        for g in 0..meta.num_row_groups() {
            let rows = group_rows(path, g, Some(&needed))?;
            let mut usable = Vec::new();
            for (i, row) in rows.into_iter().enumerate() {
                let id = first_row + i as u64;
                report.total_rows += 1;
                match fields.record(id, serde_json::Value::Object(row)) {
                    Ok(r) if keep(r.id) => usable.push(i as u32),
                    Ok(_) => {}
                    Err(why) => report.bad(id + 1, why),
                }
            }
            groups.push(Group {
                index: g,
                first_row,
                rows: usable,
            });
            first_row += meta.row_group(g).num_rows() as u64;
        }
        report.check(policy)?;
        Ok(ParquetFile {
            path: path.to_path_buf(),
            fields: fields.clone(),
            groups,
            report,
        })
    }

    pub fn num_groups(&self) -> usize {
        self.groups.len()
    }

    /// Usable rows of group `g`.
    pub fn group_len(&self, g: usize) -> usize {
        self.groups[g].rows.len()
    }

    pub fn len(&self) -> usize {
        self.groups.iter().map(|g| g.rows.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The usable records of group `g`, in file order.
    pub fn read_group(&self, g: usize) -> Result<Vec<Record>> {
        let group = &self.groups[g];
        let mut rows = group_rows(&self.path, group.index, None)?;
        group
            .rows
            .iter()
            .map(|&i| {
                let row = std::mem::take(&mut rows[i as usize]);
                let id = group.first_row + u64::from(i);
                self.fields
                    .record(id, serde_json::Value::Object(row))
                    .map_err(|why| {
                        DataError::Invalid(format!("{} row {}: {why}", self.path.display(), id + 1))
                    })
            })
            .collect()
    }
}

/// Writes records to Parquet (snappy), `rows_per_group` rows per row group, with the columns of
/// [`record_to_row`] and types inferred from the values.
pub fn write(path: &Path, records: &[Record], rows_per_group: usize) -> Result<()> {
    let mut w = Writer::create(path, rows_per_group);
    w.write(records)?;
    w.close()
}

/// A streaming Parquet writer: the schema is inferred from the first records written; later
/// records must fit it.
pub struct Writer {
    path: PathBuf,
    rows_per_group: usize,
    inner: Option<(ArrowWriter<File>, arrow::datatypes::SchemaRef)>,
}

impl Writer {
    pub fn create(path: &Path, rows_per_group: usize) -> Self {
        Writer {
            path: path.to_path_buf(),
            rows_per_group: rows_per_group.max(1),
            inner: None,
        }
    }

    pub fn write(&mut self, records: &[Record]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let rows: Vec<_> = records.iter().map(record_to_row).collect();
        let batch = batch_from_rows(&rows).map_err(|e| perr(&self.path, e))?;
        if self.inner.is_none() {
            let props = WriterProperties::builder()
                .set_compression(Compression::SNAPPY)
                .set_max_row_group_row_count(Some(self.rows_per_group))
                .build();
            let file = File::create(&self.path).map_err(|e| DataError::io(&self.path, e))?;
            let schema = batch.schema();
            let w = ArrowWriter::try_new(file, schema.clone(), Some(props))
                .map_err(|e| perr(&self.path, e))?;
            self.inner = Some((w, schema));
        }
        let (w, schema) = self.inner.as_mut().expect("created above");
        let batch = batch.with_schema(schema.clone()).map_err(|e| {
            perr(
                &self.path,
                format!("records do not fit the schema of the first ones: {e}"),
            )
        })?;
        w.write(&batch).map_err(|e| perr(&self.path, e))
    }

    pub fn close(self) -> Result<()> {
        match self.inner {
            Some((w, _)) => w.close().map(|_| ()).map_err(|e| perr(&self.path, e)),
            None => Err(DataError::Invalid(format!(
                "{}: no records written",
                self.path.display()
            ))),
        }
    }
}
