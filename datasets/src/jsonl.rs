//! JSON Lines files, streamed. Opening makes one pass that validates every row and records the
//! byte offset of each usable one; reading then seeks to the rows it needs.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};
use crate::fields::{record_to_row, Fields};
use crate::record::Record;
use crate::report::{BadRowPolicy, BadRowReport};

/// Rows longer than this are skipped as malformed without being held in memory.
pub const MAX_LINE_BYTES: usize = 16 << 20;

#[derive(Debug, Clone, Copy)]
struct RowRef {
    offset: u64,
    len: u32,
    /// 0-based line number: the record id.
    line: u32,
}

#[derive(Debug)]
pub struct JsonlFile {
    path: PathBuf,
    fields: Fields,
    rows: Vec<RowRef>,
    pub report: BadRowReport,
}

/// Reads one line into `buf` (without the newline), keeping at most `max` bytes.
/// Returns the bytes consumed (0 at end of file) and whether the line was longer than `max`.
fn read_line_bounded(
    r: &mut impl BufRead,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<(u64, bool)> {
    buf.clear();
    let mut consumed = 0u64;
    let mut too_long = false;
    loop {
        let chunk = r.fill_buf()?;
        if chunk.is_empty() {
            return Ok((consumed, too_long));
        }
        let (line_part, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (&chunk[..i], Some(i + 1)),
            None => (chunk, None),
        };
        if !too_long {
            if buf.len() + line_part.len() > max {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(line_part);
            }
        }
        let n = done.unwrap_or(chunk.len());
        r.consume(n);
        consumed += n as u64;
        if done.is_some() {
            return Ok((consumed, too_long));
        }
    }
}

/// Refuses files that are not JSON Lines whatever their name says.
fn check_format(path: &Path) -> Result<()> {
    let mut head = [0u8; 4096];
    let mut f = File::open(path).map_err(|e| DataError::io(path, e))?;
    let n = f.read(&mut head).map_err(|e| DataError::io(path, e))?;
    let head = &head[..n];
    let wrong = |why: &str| {
        Err(DataError::WrongFormat {
            path: path.to_path_buf(),
            expected: "JSON Lines",
            why: why.into(),
        })
    };
    if head.starts_with(b"PAR1") {
        return wrong("it is a Parquet file");
    }
    if head.contains(&0) {
        return wrong("it holds binary data");
    }
    match head.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'[') => wrong("it is a JSON array; write one JSON object per line"),
        Some(b'{') | None => Ok(()),
        Some(_) => wrong("the first row is not a JSON object"),
    }
}

impl JsonlFile {
    /// Validates every row; `keep(id)` selects the rows of a split.
    pub fn open(
        path: &Path,
        fields: &Fields,
        policy: BadRowPolicy,
        keep: &dyn Fn(u64) -> bool,
    ) -> Result<Self> {
        check_format(path)?;
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        let mut report = BadRowReport::new(path);
        let mut rows = Vec::new();
        let mut buf = Vec::new();
        let (mut offset, mut line) = (0u64, 0u32);
        loop {
            let (n, too_long) = read_line_bounded(&mut reader, &mut buf, MAX_LINE_BYTES)
                .map_err(|e| DataError::io(path, e))?;
            if n == 0 {
                break;
            }
            let id = line;
            let start = offset;
            offset += n;
            line += 1;
            if !too_long && buf.iter().all(u8::is_ascii_whitespace) {
                continue; // blank lines are not rows
            }
            report.total_rows += 1;
            if too_long {
                report.bad(
                    u64::from(id) + 1,
                    format!("line longer than {MAX_LINE_BYTES} bytes"),
                );
                continue;
            }
            match parse_row(&buf, fields, u64::from(id)) {
                Ok(r) if !keep(r.id) => {}
                Ok(_) => rows.push(RowRef {
                    offset: start,
                    len: buf.len() as u32,
                    line: id,
                }),
                Err(why) => report.bad(u64::from(id) + 1, why),
            }
        }
        report.check(policy)?;
        Ok(JsonlFile {
            path: path.to_path_buf(),
            fields: fields.clone(),
            rows,
            report,
        })
    }

    /// Usable rows in the selected split.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The records of usable rows `range` (indices into this file's usable rows), read with
    /// one sequential read of the span they occupy.
    pub fn read(&self, range: std::ops::Range<usize>) -> Result<Vec<Record>> {
        let rows = &self.rows[range];
        let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
            return Ok(Vec::new());
        };
        let start = first.offset;
        let end = last.offset + u64::from(last.len);
        let mut f = File::open(&self.path).map_err(|e| DataError::io(&self.path, e))?;
        f.seek(SeekFrom::Start(start))
            .map_err(|e| DataError::io(&self.path, e))?;
        let mut span = vec![0u8; (end - start) as usize];
        f.read_exact(&mut span)
            .map_err(|e| DataError::io(&self.path, e))?;
        rows.iter()
            .map(|r| {
                let at = (r.offset - start) as usize;
                parse_row(
                    &span[at..at + r.len as usize],
                    &self.fields,
                    u64::from(r.line),
                )
                .map_err(|why| {
                    DataError::Invalid(format!(
                        "{}:{}: changed since it was opened: {why}",
                        self.path.display(),
                        r.line + 1
                    ))
                })
            })
            .collect()
    }
}

fn parse_row(bytes: &[u8], fields: &Fields, id: u64) -> std::result::Result<Record, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("invalid UTF-8 ({e})"))?;
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("invalid JSON ({e})"))?;
    fields.record(id, value)
}

/// Writes records as JSON Lines (one object per record, fields as [`record_to_row`] lays them).
pub fn write(path: &Path, records: &[Record]) -> Result<()> {
    let file = File::create(path).map_err(|e| DataError::io(path, e))?;
    let mut w = std::io::BufWriter::new(file);
    for r in records {
        let line = serde_json::to_string(&record_to_row(r)).expect("JSON values serialize");
        writeln!(w, "{line}").map_err(|e| DataError::io(path, e))?;
    }
    w.flush().map_err(|e| DataError::io(path, e))
}
