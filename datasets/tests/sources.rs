//! Files as users publish them, bad rows, splits, round trips and resumable order.

use std::io::Write;
use std::path::PathBuf;

use datasets::fields::Fields;
use datasets::generators::{
    arithmetic::Arithmetic, countdown::Countdown, knights::KnightsKnaves, Generator,
};
use datasets::order::{Source, SourceOptions, Split};
use datasets::report::BadRowPolicy;
use datasets::{jsonl, parquet_io, Cursor, DataError, Loader, Prompt, Record};
use serde_json::json;

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferrite-datasets-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn write_lines(name: &str, lines: &[String]) -> PathBuf {
    let p = tmp(name);
    let mut f = std::fs::File::create(&p).unwrap();
    for l in lines {
        writeln!(f, "{l}").unwrap();
    }
    p
}

fn read_all(spec: &str, opts: &SourceOptions) -> Vec<Record> {
    let source = Source::open(spec, opts).unwrap();
    let n = source.records_per_epoch().unwrap() as usize;
    let mut loader = Loader::new(source, 0, false, 16).unwrap();
    loader.take(n).unwrap()
}

fn generated(g: &dyn Generator, n: u64) -> Vec<Record> {
    (0..n).map(|i| g.generate(7, 0, i)).collect()
}

#[test]
fn generator_output_round_trips_through_jsonl_and_parquet() {
    let gens: Vec<Box<dyn Generator>> = vec![
        Box::new(Arithmetic::default()),
        Box::new(Countdown::default()),
        Box::new(KnightsKnaves::default()),
    ];
    for g in gens {
        let records = generated(g.as_ref(), 150);
        let j = tmp(&format!("{}.jsonl", g.name()));
        jsonl::write(&j, &records).unwrap();
        assert_eq!(
            read_all(j.to_str().unwrap(), &SourceOptions::default()),
            records,
            "{} via JSONL",
            g.name()
        );
        let p = tmp(&format!("{}.parquet", g.name()));
        parquet_io::write(&p, &records, 40).unwrap();
        let source = Source::open(p.to_str().unwrap(), &SourceOptions::default()).unwrap();
        match &source {
            Source::Parquet(f) => assert_eq!(f.num_groups(), 4, "150 rows in groups of 40"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            read_all(p.to_str().unwrap(), &SourceOptions::default()),
            records,
            "{} via Parquet",
            g.name()
        );
    }
}

#[test]
fn published_formats_are_read() {
    let lines = vec![
        json!({"question": "Natalia sold clips...", "answer": "She sold 48/2 = 24 clips.\n#### 72"}).to_string(),
        json!({"problem": "Find x.", "solution": "So $x = \\boxed{3}$.", "level": "Level 2", "type": "Algebra"}).to_string(),
        json!({"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}], "answer": 4}).to_string(),
        json!({"messages": [{"role": "user", "content": "hi"}]}).to_string(),
    ];
    let p = write_lines("mixed.jsonl", &lines);
    let r = read_all(p.to_str().unwrap(), &SourceOptions::default());
    assert_eq!(
        r[0].answer.as_deref(),
        Some("She sold 48/2 = 24 clips.\n#### 72")
    );
    assert_eq!(r[1].metadata["type"], json!("Algebra"));
    assert_eq!(r[2].prompt.messages().len(), 2);
    assert_eq!(r[2].answer.as_deref(), Some("4"));
    assert_eq!(r[3].answer, None);

    // preferences, as strings and as message lists, in JSONL and in Parquet
    let prefs = vec![
        json!({"prompt": "Say hi", "chosen": "Hi!", "rejected": "No."}).to_string(),
        json!({"prompt": [{"role": "user", "content": "Say hi"}], "chosen": [{"role": "assistant", "content": "Hi!"}],
               "rejected": [{"role": "assistant", "content": "No."}]})
        .to_string(),
    ];
    let p = write_lines("prefs.jsonl", &prefs);
    let opts = SourceOptions {
        fields: Fields::preference(),
        ..Default::default()
    };
    let r = read_all(p.to_str().unwrap(), &opts);
    assert_eq!(r[0].chosen, Some(Prompt::Text("Hi!".into())));
    assert_eq!(r[1].rejected.as_ref().unwrap().messages()[0].content, "No.");
    // a Parquet column has one type: string pairs and message-list pairs in separate files
    for (k, rows) in [&r[..1], &r[1..]].into_iter().enumerate() {
        let pq = tmp(&format!("prefs{k}.parquet"));
        parquet_io::write(&pq, rows, 10).unwrap();
        assert_eq!(read_all(pq.to_str().unwrap(), &opts), rows);
    }
}

#[test]
fn bad_rows_are_skipped_counted_and_reported_with_lines() {
    let mut lines: Vec<String> = (0..95)
        .map(|i| json!({"prompt": format!("q{i}"), "answer": i}).to_string())
        .collect();
    lines.insert(3, "{not json".into()); // line 4
    lines.insert(10, json!({"text": "no prompt field"}).to_string()); // line 11
    lines.insert(20, json!({"prompt": 5}).to_string()); // line 21: wrong type
    lines.insert(30, String::new()); // blank: not a row
    lines.insert(40, json!({"prompt": [{"role": "user"}]}).to_string()); // line 41
    let p = write_lines("bad.jsonl", &lines);
    // invalid UTF-8 on one more line, and a 17 MB line
    {
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"{\"prompt\": \"\xff\xfe\"}\n").unwrap();
        f.write_all(b"{\"prompt\": \"").unwrap();
        f.write_all(&vec![b'a'; 17 << 20]).unwrap();
        f.write_all(b"\"}\n").unwrap();
    }
    let strict = SourceOptions {
        policy: BadRowPolicy { max_fraction: 0.01 },
        ..Default::default()
    };
    match Source::open(p.to_str().unwrap(), &strict) {
        Err(DataError::TooManyBadRows {
            bad: 6,
            total: 101,
            first,
            ..
        }) => assert!(first.starts_with("line 4:"), "{first}"),
        other => panic!("{other:?}"),
    }
    let lenient = SourceOptions {
        policy: BadRowPolicy { max_fraction: 0.1 },
        ..Default::default()
    };
    let source = Source::open(p.to_str().unwrap(), &lenient).unwrap();
    let report = source.report().unwrap().clone();
    assert_eq!((report.bad_rows, report.total_rows), (6, 101));
    let lines_reported: Vec<u64> = report.examples.iter().map(|b| b.line).collect();
    assert_eq!(lines_reported, vec![4, 11, 21, 41, 101, 102]);
    assert!(
        report.examples[4].reason.contains("UTF-8"),
        "{:?}",
        report.examples[4]
    );
    assert!(
        report.examples[5].reason.contains("longer than"),
        "{:?}",
        report.examples[5]
    );
    assert!(
        report.to_string().contains("bad.jsonl:11: no prompt field"),
        "{report}"
    );
    assert_eq!(source.records_per_epoch(), Some(95));
}

#[test]
fn files_that_are_not_what_their_name_says_are_clear_errors() {
    let records = generated(&Arithmetic::default(), 5);
    let pq = tmp("real.parquet");
    parquet_io::write(&pq, &records, 10).unwrap();
    let disguised = tmp("disguised.jsonl");
    std::fs::copy(&pq, &disguised).unwrap();
    let e = Source::open(disguised.to_str().unwrap(), &SourceOptions::default()).unwrap_err();
    assert!(
        e.to_string()
            .contains("not a JSON Lines file (it is a Parquet file)"),
        "{e}"
    );
    let js = tmp("real.jsonl");
    jsonl::write(&js, &records).unwrap();
    let fake = tmp("fake.parquet");
    std::fs::copy(&js, &fake).unwrap();
    let e = Source::open(fake.to_str().unwrap(), &SourceOptions::default()).unwrap_err();
    assert!(e.to_string().contains("not a Parquet file"), "{e}");
    let array = write_lines("array.json", &[json!([{"prompt": "a"}]).to_string()]);
    let e = Source::open(array.to_str().unwrap(), &SourceOptions::default()).unwrap_err();
    assert!(e.to_string().contains("JSON array"), "{e}");
    let e = Source::open("data.csv", &SourceOptions::default()).unwrap_err();
    assert!(e.to_string().contains("unknown data source"), "{e}");
}

#[test]
fn splits_are_disjoint_and_cover_the_file() {
    let lines: Vec<String> = (0..500)
        .map(|i| json!({"prompt": format!("q{i}")}).to_string())
        .collect();
    let p = write_lines("split.jsonl", &lines);
    let ids = |split| {
        let opts = SourceOptions {
            split,
            test_fraction: 0.2,
            ..Default::default()
        };
        let mut v: Vec<u64> = read_all(p.to_str().unwrap(), &opts)
            .iter()
            .map(|r| r.id)
            .collect();
        v.sort_unstable();
        v
    };
    let (train, test) = (ids(Split::Train), ids(Split::Test));
    assert!(
        (70..130).contains(&test.len()),
        "test split of 20%: {}",
        test.len()
    );
    let mut all: Vec<u64> = train.iter().chain(&test).copied().collect();
    all.sort_unstable();
    assert_eq!(all, (0..500).collect::<Vec<_>>());
    // generators: the test stream differs from the train stream
    let g = Countdown::default();
    assert_ne!(g.generate(1, 0, 0), g.generate(1, 1, 0));
}

#[test]
fn shuffled_order_is_a_permutation_per_epoch_and_resumes_exactly() {
    let records: Vec<Record> = generated(&Arithmetic::default(), 1000);
    for (name, path) in [
        ("jsonl", tmp("order.jsonl")),
        ("parquet", tmp("order.parquet")),
    ] {
        if name == "jsonl" {
            jsonl::write(&path, &records).unwrap();
        } else {
            parquet_io::write(&path, &records, 128).unwrap();
        }
        let open = || {
            Loader::new(
                Source::open(path.to_str().unwrap(), &SourceOptions::default()).unwrap(),
                42,
                true,
                64,
            )
            .unwrap()
        };
        let mut full = open();
        let served: Vec<u64> = full.take(2500).unwrap().iter().map(|r| r.id).collect();
        for epoch in 0..2 {
            let mut ids = served[epoch * 1000..(epoch + 1) * 1000].to_vec();
            assert_ne!(ids, (0..1000).collect::<Vec<_>>(), "{name}: shuffled");
            ids.sort_unstable();
            assert_eq!(
                ids,
                (0..1000).collect::<Vec<_>>(),
                "{name}: epoch {epoch} visits every record once"
            );
        }
        assert_ne!(served[..1000], served[1000..2000], "{name}: epochs differ");
        // interrupt at 1234, resume from the cursor alone
        let mut first = open();
        first.take(1234).unwrap();
        let cursor = first.cursor();
        assert_eq!(
            cursor,
            Cursor {
                epoch: 1,
                position: 234
            }
        );
        let stored = serde_json::to_string(&cursor).unwrap();
        let mut resumed = open();
        resumed.seek(serde_json::from_str(&stored).unwrap());
        let rest: Vec<u64> = resumed.take(1266).unwrap().iter().map(|r| r.id).collect();
        assert_eq!(
            rest,
            served[1234..],
            "{name}: resumed run sees the same records"
        );
        // another seed, another order
        let mut other = Loader::new(
            Source::open(path.to_str().unwrap(), &SourceOptions::default()).unwrap(),
            43,
            true,
            64,
        )
        .unwrap();
        let o: Vec<u64> = other.take(1000).unwrap().iter().map(|r| r.id).collect();
        assert_ne!(o, served[..1000]);
    }
}

#[test]
fn generator_loaders_resume_from_a_cursor() {
    let open = || {
        Loader::new(
            Source::open("builtin:knights_knaves", &SourceOptions::default()).unwrap(),
            3,
            true,
            1,
        )
        .unwrap()
    };
    let all = open().take(30).unwrap();
    let mut l = open();
    l.seek(Cursor {
        epoch: 0,
        position: 17,
    });
    assert_eq!(l.take(13).unwrap(), all[17..]);
}
