//! Scores 10,000 GSM8K-style completions with the math verifier and prints completions per
//! second. `scripts/bench_rewards.sh` runs it beside Math-Verify (Python) on the same
//! completions and prints the ratio.
//!
//!     cargo run --release -p ferrite-rewards --example bench_rewards -- [OUT.jsonl]
//!
//! With OUT, writes the completions, gold answers and our verdicts for the reference script.

use std::io::Write;
use std::time::Instant;

use rewards::math::verify;

/// A deterministic mix of the answer styles GSM8K-trained models write.
fn completions(n: usize) -> Vec<(String, String)> {
    let mut state = 0x1234_5678_9ABC_DEF0u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    (0..n)
        .map(|i| {
            let gold = (next() % 5000) as i64 + 1;
            let wrong = next() % 3 == 0;
            let ans = if wrong { gold + (next() % 9) as i64 + 1 } else { gold };
            let a = (next() % 90) as i64 + 10;
            let reasoning = format!(
                "Natalia sold {a} clips in April. In May she sold half as many, {} clips. \
                 Altogether she sold {a} + {} = {} clips. Each clip costs $2, so she earned {} dollars.",
                a / 2,
                a / 2,
                a + a / 2,
                2 * (a + a / 2)
            );
            let formatted = if ans >= 1000 && i % 2 == 0 {
                format!("{},{:03}", ans / 1000, ans % 1000)
            } else {
                ans.to_string()
            };
            let text = match i % 5 {
                0 => format!("{reasoning}\n#### {formatted}"),
                1 => format!("{reasoning} The answer is \\boxed{{{formatted}}}."),
                2 => format!("{reasoning} The answer is ${formatted}."),
                3 => format!("{reasoning}\n<answer>{formatted}</answer>"),
                _ => format!("{reasoning} So the final answer is \\boxed{{\\frac{{{}}}{{2}}}}.", 2 * ans),
            };
            (text, gold.to_string())
        })
        .collect()
}

fn main() -> std::io::Result<()> {
    let data = completions(10_000);
    // warm-up (regex compilation)
    verify(&data[0].0, &data[0].1);
    let start = Instant::now();
    let verdicts: Vec<bool> = data.iter().map(|(c, g)| verify(c, g).correct).collect();
    let secs = start.elapsed().as_secs_f64();
    let correct = verdicts.iter().filter(|&&v| v).count();
    println!(
        "ferrite math verifier: {} completions in {:.3} s = {:.0} completions/s ({} judged correct)",
        data.len(),
        secs,
        data.len() as f64 / secs,
        correct
    );
    if let Some(out) = std::env::args().nth(1) {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&out)?);
        for ((c, g), v) in data.iter().zip(&verdicts) {
            let line = format!(
                "{{\"completion\": {}, \"gold\": {}, \"ferrite\": {v}}}",
                json_string(c),
                json_string(g)
            );
            writeln!(f, "{line}")?;
        }
        println!("RATE {:.1}", data.len() as f64 / secs);
    }
    Ok(())
}

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
