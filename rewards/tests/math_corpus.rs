//! The math-answer corpus (tests/data/math_cases.tsv): pairs that must compare equal and pairs
//! that must not, each written from a named answer style (GSM8K, MATH, Math-Verify and TRL
//! test kinds), never from what the checker returns.

use rewards::math::verify;

#[test]
fn corpus_of_math_answers() {
    let data = include_str!("data/math_cases.tsv");
    let mut failures = Vec::new();
    let mut n = 0;
    for (line_no, line) in data.lines().enumerate() {
        if line.starts_with("# ") || line.trim().is_empty() {
            continue;
        }
        let cols: Vec<&str> = line.split('\t').collect();
        assert_eq!(cols.len(), 4, "line {}: {line:?}", line_no + 1);
        let gold = cols[0].replace("\\n", "\n");
        let completion = cols[1].replace("\\n", "\n");
        let expected = cols[2] == "1";
        let v = verify(&completion, &gold);
        n += 1;
        if v.correct != expected {
            failures.push(format!(
                "line {}: [{}] gold {:?} completion {:?}: expected {expected}, got {} ({})",
                line_no + 1,
                cols[3],
                gold,
                completion,
                v.correct,
                v.reason
            ));
        }
    }
    assert!(n >= 200, "the corpus has {n} cases");
    assert!(
        failures.is_empty(),
        "{} of {n} cases fail:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
