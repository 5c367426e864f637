//! Reading speed and peak memory on large files. `scripts/bench_data.sh` runs it beside a
//! Python reference (json / pyarrow) on the same files and prints the ratios.
//!
//!     cargo run --release -p ferrite-datasets --example bench_read -- generate DIR [MB]
//!     cargo run --release -p ferrite-datasets --example bench_read -- read FILE
//!
//! `generate` writes DIR/bench.jsonl and DIR/bench.parquet of about MB megabytes each (default
//! 1024) from the Countdown generator with GSM8K-sized solutions; `read` opens one (validating
//! every row), then reads every record in file order, and prints rows/s and the peak RSS.

use std::path::Path;
use std::time::Instant;

use datasets::generators::{countdown::Countdown, Generator};
use datasets::order::{Source, SourceOptions};
use datasets::{parquet_io, Loader, Record};

fn record(i: u64) -> Record {
    let mut r = Countdown::default().generate(0, 0, i);
    // a GSM8K-sized worked solution (about 400 bytes), distinct per row
    r.answer = Some(format!(
        "Janet's ducks lay {} eggs per day. She eats {} for breakfast every morning and bakes muffins for her friends every day with {}. She sells the remainder at the farmers' market daily for $2 per fresh duck egg. She makes {} - {} - {} = {} eggs' worth, so 2 * {} = ${} every day.\n#### {}",
        i % 97 + 16, i % 5 + 3, i % 7 + 4, i % 97 + 16, i % 5 + 3, i % 7 + 4, i, i, 2 * i, 2 * i
    ));
    r
}

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn generate(dir: &Path, mb: u64) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    let target = mb << 20;
    let chunk = 50_000u64;
    let j = dir.join("bench.jsonl");
    // written row by row, so memory stays bounded
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&j)?);
        let mut i = 0;
        while std::fs::metadata(&j)?.len() + f.buffer().len() as u64 <= target {
            for k in i..i + chunk {
                let row = datasets::fields::record_to_row(&record(k));
                writeln!(f, "{}", serde_json::to_string(&row)?)?;
            }
            f.flush()?;
            i += chunk;
        }
        println!("wrote {} ({} rows)", j.display(), i);
    }
    let p = dir.join("bench.parquet");
    let mut w = parquet_io::Writer::create(&p, 100_000);
    let mut i = 0;
    // the file grows as row groups are flushed
    while std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0) <= target {
        let rows: Vec<Record> = (i..i + chunk).map(record).collect();
        w.write(&rows)?;
        i += chunk;
    }
    w.close()?;
    println!("wrote {} ({} rows)", p.display(), i);
    Ok(())
}

fn read(path: &str) -> Result<(), Box<dyn std::error::Error>> {
    let bytes = std::fs::metadata(path)?.len();
    let start = Instant::now();
    let source = Source::open(path, &SourceOptions::default())?;
    let open_secs = start.elapsed().as_secs_f64();
    let n = source.records_per_epoch().unwrap_or(0);
    let mut loader = Loader::new(source, 0, false, 4096)?;
    let start = Instant::now();
    let mut chars = 0usize;
    for _ in 0..n {
        chars += loader.next_record()?.answer.map_or(0, |a| a.len());
    }
    let read_secs = start.elapsed().as_secs_f64();
    println!(
        "{path}: {:.0} MB, {n} rows; open+validate {:.1} s ({:.0} rows/s); read {:.1} s ({:.0} rows/s); peak RSS {:.0} MB ({chars} answer bytes)",
        bytes as f64 / 1e6,
        open_secs,
        n as f64 / open_secs,
        read_secs,
        n as f64 / read_secs,
        peak_rss_mb()
    );
    println!(
        "RESULT {:.1} {:.1}",
        n as f64 / (open_secs + read_secs),
        peak_rss_mb()
    );
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [cmd, dir, rest @ ..] if cmd == "generate" => generate(
            Path::new(dir),
            rest.first().map_or(Ok(1024), |s| s.parse())?,
        ),
        [cmd, file] if cmd == "read" => read(file),
        _ => Err("usage: bench_read generate DIR [MB] | read FILE".into()),
    }
}
