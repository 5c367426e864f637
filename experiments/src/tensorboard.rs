//! TensorBoard event files (`tensorboard --logdir runs`): the run's step tables (`sft.parquet`,
//! `metrics.parquet`, `eval.parquet`) mirrored as scalars under `sft/`, `train/` and `eval/`.
//!
//! The format is TensorFlow's: `Event` protocol buffers (`tensorboard/compat/proto/event.proto`,
//! `summary.proto`), each framed as a TFRecord (its length as a little-endian u64, the masked
//! CRC-32C of those 8 bytes, the bytes, their masked CRC-32C). The Parquet tables stay the
//! source of truth: at the start of each stage of a run (a fresh one or a resumed one) the
//! directory is written anew from the tables as they stand, so the rows a killed run logged past
//! its checkpoint never show; after that each row is appended as it is logged.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;

/// The run directory's subdirectory of event files.
const DIR: &str = "tensorboard";

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), TFRecord's checksum.
fn crc32c(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, entry) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 == 1 {
                    (c >> 1) ^ 0x82F6_3B78
                } else {
                    c >> 1
                };
            }
            *entry = c;
        }
        t
    });
    !data.iter().fold(!0u32, |c, &b| {
        table[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

/// TFRecord's masked CRC: rotated right by 15 bits plus a constant.
fn masked_crc(data: &[u8]) -> u32 {
    crc32c(data).rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord around `data`.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// Protocol-buffer encoding: a field's key, varints, and length-delimited fields.
fn varint(out: &mut Vec<u8>, mut x: u64) {
    while x >= 0x80 {
        out.push((x as u8) | 0x80);
        x >>= 7;
    }
    out.push(x as u8);
}

fn key(out: &mut Vec<u8>, field: u64, wire_type: u64) {
    varint(out, (field << 3) | wire_type);
}

fn bytes_field(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    key(out, field, 2);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// What an event carries beside its time and step.
enum Body<'a> {
    /// The first event of a file: `brain.Event:2`, written by `ferrite`.
    FileVersion,
    /// A `Summary` of scalar values (tag, value).
    Scalars(&'a [(String, f32)]),
}

/// An `Event` message (proto3: a zero step is left out, as protobuf leaves it out).
fn event(wall_time: f64, step: u64, body: Body) -> Vec<u8> {
    let mut out = Vec::new();
    key(&mut out, 1, 1); // wall_time: double
    out.extend_from_slice(&wall_time.to_le_bytes());
    if step != 0 {
        key(&mut out, 2, 0); // step: int64
        varint(&mut out, step);
    }
    match body {
        Body::FileVersion => {
            bytes_field(&mut out, 3, b"brain.Event:2");
            let mut source = Vec::new();
            bytes_field(&mut source, 1, b"ferrite"); // SourceMetadata.writer
            bytes_field(&mut out, 10, &source); // Event.source_metadata
        }
        Body::Scalars(values) => {
            let mut summary = Vec::new();
            for (tag, v) in values {
                let mut value = Vec::new();
                bytes_field(&mut value, 1, tag.as_bytes()); // tag
                key(&mut value, 2, 5); // simple_value: float (in a oneof: written even when 0)
                value.extend_from_slice(&v.to_le_bytes());
                bytes_field(&mut summary, 1, &value); // Summary.value
            }
            bytes_field(&mut out, 5, &summary); // Event.summary
        }
    }
    out
}

/// The encoded record of an event.
fn event_record(wall_time: f64, step: u64, body: Body) -> Vec<u8> {
    record(&event(wall_time, step, body))
}

/// Seconds since the Unix epoch (an event's wall time).
pub(crate) fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A table's rows: (step, when it was logged, [(column, value)]).
pub type NamedRows = Vec<(u64, f64, Vec<(String, f64)>)>;

/// A run's event file, appended to by every table that mirrors into it.
#[derive(Debug)]
pub struct Board {
    file: Mutex<std::fs::File>,
    path: PathBuf,
}

impl Board {
    /// `run_dir/tensorboard/` written anew: earlier event files removed, then one file with the
    /// rows of `tables` (prefix, rows of (step, wall time, [(column, value)])), each at the wall
    /// time it was first logged.
    pub fn rebuild(run_dir: &Path, tables: &[(&str, NamedRows)]) -> anyhow::Result<Arc<Board>> {
        let dir = run_dir.join(DIR);
        std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.contains("tfevents") {
                std::fs::remove_file(&path).with_context(|| path.display().to_string())?;
            }
        }
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let path = dir.join(format!(
            "events.out.tfevents.{:010}.{:09}.ferrite.{}",
            t.as_secs(),
            t.subsec_nanos(),
            std::process::id()
        ));
        let file = std::fs::File::create(&path).with_context(|| path.display().to_string())?;
        let board = Board {
            file: Mutex::new(file),
            path,
        };
        board.write(&event_record(now(), 0, Body::FileVersion))?;
        for (prefix, rows) in tables {
            for (step, wall, values) in rows {
                board.scalars(prefix, *step, *wall, values)?;
            }
        }
        Ok(Arc::new(board))
    }

    /// One event of the finite values of a row, tagged `prefix/column`, at `wall_time` (seconds
    /// since the Unix epoch; now where it is not finite).
    pub fn scalars(
        &self,
        prefix: &str,
        step: u64,
        wall_time: f64,
        values: &[(String, f64)],
    ) -> anyhow::Result<()> {
        let scalars: Vec<(String, f32)> = values
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(name, v)| (format!("{prefix}/{name}"), *v as f32))
            .collect();
        if scalars.is_empty() {
            return Ok(());
        }
        let wall_time = if wall_time.is_finite() {
            wall_time
        } else {
            now()
        };
        self.write(&event_record(wall_time, step, Body::Scalars(&scalars)))
    }

    fn write(&self, bytes: &[u8]) -> anyhow::Result<()> {
        let mut f = self.file.lock().expect("the event file");
        f.write_all(bytes)
            .with_context(|| self.path.display().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CRC-32C's check value (RFC 3720's test vector: 32 zero bytes) and the standard "123456789".
    #[test]
    fn crc32c_matches_its_check_values() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
    }

    /// The events TensorBoard's own writer wrote (`scripts/make_tensorboard_fixture.py`:
    /// `EventFileWriter` with `event_pb2` messages at fixed wall times), byte for byte.
    #[test]
    fn events_match_tensorboards_writer_byte_for_byte() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tensorboard");
        let golden = std::fs::read(dir.join("golden.tfevents")).unwrap();
        let spec: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap())
                .unwrap();
        let mut ours = event_record(
            spec["file_version_time"].as_f64().unwrap(),
            0,
            Body::FileVersion,
        );
        for e in spec["events"].as_array().unwrap() {
            let values: Vec<(String, f32)> = e["values"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| {
                    (
                        v[0].as_str().unwrap().to_string(),
                        v[1].as_f64().unwrap() as f32,
                    )
                })
                .collect();
            ours.extend(event_record(
                e["wall_time"].as_f64().unwrap(),
                e["step"].as_u64().unwrap(),
                Body::Scalars(&values),
            ));
        }
        assert_eq!(ours.len(), golden.len());
        assert!(ours == golden, "the event file differs from TensorBoard's");
    }
}
