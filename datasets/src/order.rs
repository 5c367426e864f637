//! Sources, splits and the order records are served in.
//!
//! A file is cut into chunks (Parquet row groups; blocks of JSONL rows). Each epoch visits the
//! chunks in a seeded random order and the rows of each chunk in a seeded random order, so only
//! one chunk is decoded at a time. Every permutation is a pure function of (seed, epoch, chunk):
//! a [`Cursor`] (epoch, position) is all a checkpoint needs to resume the exact sequence.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::fields::Fields;
use crate::generators::{
    arithmetic::Arithmetic, countdown::Countdown, knights::KnightsKnaves, Generator,
};
use crate::jsonl::JsonlFile;
use crate::parquet_io::ParquetFile;
use crate::record::Record;
use crate::report::{BadRowPolicy, BadRowReport};
use crate::rng::{mix, Stream};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    All,
    Train,
    Test,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SourceOptions {
    pub fields: Fields,
    pub policy: BadRowPolicy,
    pub split: Split,
    /// Fraction of a file's rows in the test split (by a hash of the record id, so the split
    /// does not depend on the run's seed or the file's order).
    pub test_fraction: f64,
    /// JSONL rows per shuffling chunk.
    pub block_rows: usize,
    /// Difficulty of a built-in generator (0 = its default).
    pub difficulty: u32,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            fields: Fields::default(),
            policy: BadRowPolicy::default(),
            split: Split::All,
            test_fraction: 0.1,
            block_rows: 1024,
            difficulty: 0,
        }
    }
}

pub enum Source {
    Jsonl(JsonlFile),
    Parquet(ParquetFile),
    Generator(Box<dyn Generator>, Split),
}

impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Jsonl(j) => write!(f, "Jsonl({} rows)", j.len()),
            Source::Parquet(p) => write!(f, "Parquet({} rows)", p.len()),
            Source::Generator(g, s) => write!(f, "Generator({}, {s:?})", g.name()),
        }
    }
}

impl Source {
    /// `builtin:addition`, `builtin:arithmetic`, `builtin:countdown`, `builtin:knights_knaves`, or a `.jsonl` /
    /// `.json` / `.parquet` path.
    pub fn open(spec: &str, opts: &SourceOptions) -> Result<Source> {
        if let Some(name) = spec.strip_prefix("builtin:") {
            let d = opts.difficulty;
            let g: Box<dyn Generator> = match name {
                "arithmetic" => Box::new(if d == 0 {
                    Arithmetic::default()
                } else {
                    Arithmetic::with_difficulty(d)
                }),
                // the built-in default task: sums of two numbers of up to `d` (2) digits
                "addition" => Box::new(Arithmetic {
                    max_digits: if d == 0 { 2 } else { d },
                    max_operands: 2,
                    operators: vec!['+'],
                }),
                "countdown" => Box::new(if d == 0 {
                    Countdown::default()
                } else {
                    Countdown::with_difficulty(d)
                }),
                "knights_knaves" | "kk" => Box::new(if d == 0 {
                    KnightsKnaves::default()
                } else {
                    KnightsKnaves::with_people(d)
                }),
                _ => return Err(DataError::UnknownSource(spec.into())),
            };
            return Ok(Source::Generator(g, opts.split));
        }
        let path = Path::new(spec);
        let keep = |id: u64| {
            let unit = (mix(0x5E1E_C7ED, 0, id) >> 11) as f64 / (1u64 << 53) as f64;
            let in_test = unit < opts.test_fraction;
            match opts.split {
                Split::All => true,
                Split::Train => !in_test,
                Split::Test => in_test,
            }
        };
        match path.extension().and_then(|e| e.to_str()) {
            Some("jsonl") | Some("json") | Some("ndjson") => Ok(Source::Jsonl(JsonlFile::open(
                path,
                &opts.fields,
                opts.policy,
                &keep,
            )?)),
            Some("parquet") => Ok(Source::Parquet(ParquetFile::open(
                path,
                &opts.fields,
                opts.policy,
                &keep,
            )?)),
            _ => Err(DataError::UnknownSource(spec.into())),
        }
    }

    /// The bad-row report of a file source.
    pub fn report(&self) -> Option<&BadRowReport> {
        match self {
            Source::Jsonl(j) => Some(&j.report),
            Source::Parquet(p) => Some(&p.report),
            Source::Generator(..) => None,
        }
    }

    /// Records per epoch (`None`: unlimited).
    pub fn records_per_epoch(&self) -> Option<u64> {
        match self {
            Source::Jsonl(j) => Some(j.len() as u64),
            Source::Parquet(p) => Some(p.len() as u64),
            Source::Generator(..) => None,
        }
    }

    fn chunk_sizes(&self, block_rows: usize) -> Vec<u64> {
        match self {
            Source::Jsonl(j) => {
                let n = j.len();
                (0..n.div_ceil(block_rows))
                    .map(|c| ((c + 1) * block_rows).min(n) as u64 - (c * block_rows) as u64)
                    .collect()
            }
            Source::Parquet(p) => (0..p.num_groups()).map(|g| p.group_len(g) as u64).collect(),
            Source::Generator(..) => Vec::new(),
        }
    }

    fn read_chunk(&self, chunk: usize, block_rows: usize) -> Result<Vec<Record>> {
        match self {
            Source::Jsonl(j) => j.read(chunk * block_rows..((chunk + 1) * block_rows).min(j.len())),
            Source::Parquet(p) => p.read_group(chunk),
            Source::Generator(..) => unreachable!("generators have no chunks"),
        }
    }
}

/// Where a loader stands: a checkpoint stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    /// Records already served in this epoch (for a generator: in total).
    pub position: u64,
}

struct EpochPlan {
    epoch: u64,
    /// Chunks in visiting order, with the position at which each starts.
    order: Vec<u32>,
    starts: Vec<u64>,
}

/// Serves records in a seeded, resumable order.
pub struct Loader {
    source: Source,
    seed: u64,
    shuffle: bool,
    block_rows: usize,
    cursor: Cursor,
    sizes: Vec<u64>,
    plan: Option<EpochPlan>,
    /// The decoded chunk: (epoch, chunk, rows in visiting order; served rows are taken out).
    chunk: Option<(u64, u32, Vec<Option<Record>>)>,
}

impl Loader {
    pub fn new(source: Source, seed: u64, shuffle: bool, block_rows: usize) -> Result<Self> {
        let sizes = source.chunk_sizes(block_rows.max(1));
        if source.records_per_epoch() == Some(0) {
            return Err(DataError::Invalid(
                "the data source has no records in this split".into(),
            ));
        }
        Ok(Loader {
            source,
            seed,
            shuffle,
            block_rows: block_rows.max(1),
            cursor: Cursor::default(),
            sizes,
            plan: None,
            chunk: None,
        })
    }

    pub fn source(&self) -> &Source {
        &self.source
    }

    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// Continues from a stored cursor.
    pub fn seek(&mut self, cursor: Cursor) {
        self.cursor = cursor;
    }

    fn plan(&mut self, epoch: u64) -> &EpochPlan {
        if self.plan.as_ref().is_none_or(|p| p.epoch != epoch) {
            let n = self.sizes.len();
            let order: Vec<u32> = if self.shuffle {
                Stream::new(self.seed, 0x0DE7, epoch).permutation(n)
            } else {
                (0..n as u32).collect()
            };
            let mut starts = Vec::with_capacity(n);
            let mut at = 0;
            for &c in &order {
                starts.push(at);
                at += self.sizes[c as usize];
            }
            self.plan = Some(EpochPlan {
                epoch,
                order,
                starts,
            });
        }
        self.plan.as_ref().expect("just set")
    }

    /// The next record (files wrap around into the next epoch).
    pub fn next_record(&mut self) -> Result<Record> {
        if let Source::Generator(g, split) = &self.source {
            let split_id = match split {
                Split::Test => 1,
                _ => 0,
            };
            let r = g.generate(self.seed, split_id, self.cursor.position);
            self.cursor.position += 1;
            return Ok(r);
        }
        let total: u64 = self.sizes.iter().sum();
        if self.cursor.position >= total {
            self.cursor = Cursor {
                epoch: self.cursor.epoch + 1,
                position: 0,
            };
        }
        let Cursor { epoch, position } = self.cursor;
        let (chunk, offset) = {
            let plan = self.plan(epoch);
            let slot = plan.starts.partition_point(|&s| s <= position) - 1;
            (plan.order[slot], position - plan.starts[slot])
        };
        let cached = matches!(&self.chunk, Some((e, c, rows)) if *e == epoch && *c == chunk && rows[offset as usize].is_some());
        if !cached {
            let mut rows = self.source.read_chunk(chunk as usize, self.block_rows)?;
            if self.shuffle {
                let perm = Stream::new(self.seed, epoch ^ 0xC4_0000, u64::from(chunk))
                    .permutation(rows.len());
                let mut taken: Vec<Option<Record>> = rows.into_iter().map(Some).collect();
                rows = perm
                    .iter()
                    .map(|&i| taken[i as usize].take().expect("a permutation"))
                    .collect();
            }
            self.chunk = Some((epoch, chunk, rows.into_iter().map(Some).collect()));
        }
        let rows = &mut self.chunk.as_mut().expect("cached").2;
        let record = rows[offset as usize].take().expect("checked above");
        self.cursor.position += 1;
        Ok(record)
    }

    /// The next `n` records.
    pub fn take(&mut self, n: usize) -> Result<Vec<Record>> {
        (0..n).map(|_| self.next_record()).collect()
    }
}
