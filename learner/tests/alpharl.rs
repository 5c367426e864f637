//! AlphaRL's linear algebra against NumPy, PyTorch and scikit-learn
//! (scripts/make_analysis_fixtures.py): top singular triplets, numerical rank, the norm-matched
//! rank-1 update, sign alignment, PLS1 with OLS and its inverse transform.

use learner::alpharl::{align_signs, numerical_rank, rank1_update, top_triplet, Pls1};
use serde_json::Value;

fn fixture() -> Value {
    let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/alpharl.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn vec64(v: &Value) -> Vec<f64> {
    serde_json::from_value(v.clone()).unwrap()
}

fn close(got: &[f64], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert!((a - b).abs() < tol, "{what}[{i}]: {a} vs {b}");
    }
}

#[test]
fn singular_triplets_ranks_and_rank1_updates_match_numpy_and_torch() {
    let f = fixture();
    for (k, m) in f["matrices"].as_array().unwrap().iter().enumerate() {
        let (rows, cols) = (
            m["m"].as_u64().unwrap() as usize,
            m["n"].as_u64().unwrap() as usize,
        );
        let data: Vec<f32> = serde_json::from_value(m["data"].clone()).unwrap();
        let t = top_triplet(&data, rows, cols).unwrap();
        let sigma = m["sigma"].as_f64().unwrap();
        assert!(
            (t.sigma - sigma).abs() < 1e-9 * sigma,
            "matrix {k}: σ₁ {} vs {sigma}",
            t.sigma
        );
        close(&t.u, &vec64(&m["u"]), 1e-8, &format!("matrix {k} u₁"));
        close(&t.v, &vec64(&m["v"]), 1e-8, &format!("matrix {k} v₁"));
        assert!((t.frobenius - m["frobenius"].as_f64().unwrap()).abs() < 1e-9);
        let (rank, full) = numerical_rank(&data, rows, cols).unwrap();
        assert_eq!(rank as u64, m["rank"].as_u64().unwrap(), "matrix {k} rank");
        assert_eq!(full, rows.min(cols));
        let r1: Vec<f64> = rank1_update(&t, m["lambda"].as_f64().unwrap())
            .into_iter()
            .map(f64::from)
            .collect();
        close(
            &r1,
            &vec64(&m["rank1"]),
            1e-5,
            &format!("matrix {k} rank-1 update"),
        );
    }
    assert!(
        top_triplet(&[1.0; 5], 2, 3).is_err(),
        "a wrong size is an error"
    );
}

#[test]
fn sign_alignment_and_pls_match_scikit_learn() {
    let f = fixture();
    let mut traj: Vec<Vec<f64>> = serde_json::from_value(f["trajectory"].clone()).unwrap();
    let flips = align_signs(&mut traj);
    assert_eq!(
        flips,
        serde_json::from_value::<Vec<bool>>(f["flips"].clone()).unwrap()
    );
    let aligned: Vec<Vec<f64>> = serde_json::from_value(f["aligned"].clone()).unwrap();
    assert_eq!(traj, aligned);

    let acc = vec64(&f["accuracy"]);
    let pls = Pls1::fit(&traj, &acc).unwrap();
    // scikit-learn's sign convention for the weights may differ: compare up to one sign
    let want_w = vec64(&f["x_weights"]);
    let sign = if pls
        .weights
        .iter()
        .zip(&want_w)
        .map(|(a, b)| a * b)
        .sum::<f64>()
        < 0.0
    {
        -1.0
    } else {
        1.0
    };
    let flip = |v: &[f64]| v.iter().map(|x| x * sign).collect::<Vec<_>>();
    close(&flip(&pls.weights), &want_w, 1e-9, "PLS weights");
    close(
        &flip(&pls.loadings),
        &vec64(&f["x_loadings"]),
        1e-9,
        "PLS loadings",
    );
    close(&flip(&pls.scores), &vec64(&f["scores"]), 1e-9, "PLS scores");
    let slope = f["slope"].as_f64().unwrap();
    assert!((pls.slope * sign - slope).abs() < 1e-9 * slope.abs());
    assert!((pls.intercept - f["intercept"].as_f64().unwrap()).abs() < 1e-9);
    assert!((pls.r2 - f["r2"].as_f64().unwrap()).abs() < 1e-9);
    // the inverse does not depend on the sign convention
    let target = f["target"].as_f64().unwrap();
    close(
        &pls.inverse(target),
        &vec64(&f["inverse"]),
        1e-9,
        "inverse transform",
    );
    assert!(Pls1::fit(&traj[..1], &acc[..1]).is_err());
}
