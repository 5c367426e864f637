//! AlphaRL's linear algebra (spec §2): the top singular triplet of an update `ΔW`, its numerical
//! rank with PyTorch's default tolerance, the norm-matched rank-1 update, sign alignment of a
//! trajectory, and the one-component PLS regression (scikit-learn's `PLSRegression(1,
//! scale=True)`) with OLS on its score, inverted at a target accuracy.
//!
//! Matrices are row-major `[m, n]` slices in HF layout (`[d_out, d_in]`); dense algebra is faer's,
//! in f64.

use faer::Mat;
use serde::{Deserialize, Serialize};

use crate::error::{LearnerError, Result};

fn matrix(data: &[f32], m: usize, n: usize) -> Result<Mat<f64>> {
    if data.len() != m * n || m == 0 || n == 0 {
        return Err(LearnerError::Invalid(format!(
            "a {m}×{n} matrix needs {} values, found {}",
            m * n,
            data.len()
        )));
    }
    Ok(Mat::from_fn(m, n, |i, j| f64::from(data[i * n + j])))
}

/// `σ₁ u₁ v₁ᵀ` of a matrix and its Frobenius norm. The sign is fixed so that the largest-magnitude
/// entry of `u` is positive (SVD signs are otherwise arbitrary).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Triplet {
    pub sigma: f64,
    /// `[m]`
    pub u: Vec<f64>,
    /// `[n]`
    pub v: Vec<f64>,
    pub frobenius: f64,
}

pub fn top_triplet(data: &[f32], m: usize, n: usize) -> Result<Triplet> {
    let a = matrix(data, m, n)?;
    let svd = a
        .thin_svd()
        .map_err(|e| LearnerError::Invalid(format!("SVD did not converge: {e:?}")))?;
    let s = svd.S().column_vector();
    let (u, v) = (svd.U(), svd.V());
    let mut uu: Vec<f64> = (0..m).map(|i| u[(i, 0)]).collect();
    let mut vv: Vec<f64> = (0..n).map(|j| v[(j, 0)]).collect();
    let biggest = uu
        .iter()
        .copied()
        .fold(0.0f64, |b, x| if x.abs() > b.abs() { x } else { b });
    if biggest < 0.0 {
        uu.iter_mut().for_each(|x| *x = -*x);
        vv.iter_mut().for_each(|x| *x = -*x);
    }
    let frobenius = data
        .iter()
        .map(|&x| f64::from(x).powi(2))
        .sum::<f64>()
        .sqrt();
    Ok(Triplet {
        sigma: s[0],
        u: uu,
        v: vv,
        frobenius,
    })
}

/// The numerical rank as `torch.linalg.matrix_rank` computes it by default: singular values
/// above `σ_max · max(m, n) · ε_f32`. Returns `(rank, min(m, n))`.
pub fn numerical_rank(data: &[f32], m: usize, n: usize) -> Result<(usize, usize)> {
    let a = matrix(data, m, n)?;
    let s = a
        .singular_values()
        .map_err(|e| LearnerError::Invalid(format!("SVD did not converge: {e:?}")))?;
    let max = s.iter().copied().fold(0.0f64, f64::max);
    let tol = max * m.max(n) as f64 * f64::from(f32::EPSILON);
    Ok((s.iter().filter(|&&x| x > tol).count(), m.min(n)))
}

/// AlphaRL's rank-1 reconstruction of an update: `λ · α · σ₁ u₁ v₁ᵀ` with the norm-matching
/// `α = ‖ΔW‖_F / σ₁`, i.e. `λ · ‖ΔW‖_F · u₁ v₁ᵀ`, row-major `[m, n]`.
pub fn rank1_update(t: &Triplet, lambda: f64) -> Vec<f32> {
    let scale = lambda * t.frobenius;
    t.u.iter()
        .flat_map(|&ui| t.v.iter().map(move |&vj| (scale * ui * vj) as f32))
        .collect()
}

/// Sign alignment of a trajectory (`extract_rank1_au.py`): walking from the last vector back,
/// `a_t` is negated when `cos(a_t, a_{t+1}) < 0` (against the already aligned `a_{t+1}`).
/// Returns the flip flags.
pub fn align_signs(vectors: &mut [Vec<f64>]) -> Vec<bool> {
    let mut flipped = vec![false; vectors.len()];
    for t in (0..vectors.len().saturating_sub(1)).rev() {
        let dot: f64 = vectors[t]
            .iter()
            .zip(&vectors[t + 1])
            .map(|(a, b)| a * b)
            .sum();
        if dot < 0.0 {
            vectors[t].iter_mut().for_each(|x| *x = -*x);
            flipped[t] = true;
        }
    }
    flipped
}

/// One-component PLS of `y` on `X` (`K × d`), standardised as scikit-learn's `scale=True`, and
/// the ordinary least squares of `y` on the PLS score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pls1 {
    /// Column means and standard deviations (ddof 1; 1 where a column is constant).
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
    /// Unit weight vector `w ∝ Xsᵀ ys` (largest-magnitude entry positive).
    pub weights: Vec<f64>,
    /// X-loadings `p = Xsᵀ τ / τᵀτ`.
    pub loadings: Vec<f64>,
    /// Scores `τ = Xs w` of the training rows.
    pub scores: Vec<f64>,
    /// `y ≈ slope · τ + intercept`.
    pub slope: f64,
    pub intercept: f64,
    /// R² of that fit (AlphaRL's linearity measure).
    pub r2: f64,
}

fn mean_std(xs: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let n = xs.clone().count() as f64;
    let mean = xs.clone().sum::<f64>() / n;
    let var = xs.map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

impl Pls1 {
    pub fn fit(x: &[Vec<f64>], y: &[f64]) -> Result<Pls1> {
        let k = x.len();
        if k < 2 || y.len() != k || x.iter().any(|r| r.len() != x[0].len()) || x[0].is_empty() {
            return Err(LearnerError::Invalid(
                "PLS needs at least two rows of equal length and one target per row".into(),
            ));
        }
        let d = x[0].len();
        let (mean, std): (Vec<f64>, Vec<f64>) = (0..d)
            .map(|j| {
                let (m, s) = mean_std(x.iter().map(|r| r[j]));
                (m, if s == 0.0 { 1.0 } else { s })
            })
            .unzip();
        let xs: Vec<Vec<f64>> = x
            .iter()
            .map(|r| (0..d).map(|j| (r[j] - mean[j]) / std[j]).collect())
            .collect();
        let (ym, ysd) = mean_std(y.iter().copied());
        let ysd = if ysd == 0.0 { 1.0 } else { ysd };
        let ys: Vec<f64> = y.iter().map(|v| (v - ym) / ysd).collect();
        let mut w: Vec<f64> = (0..d)
            .map(|j| xs.iter().zip(&ys).map(|(r, yv)| r[j] * yv).sum())
            .collect();
        let norm = w.iter().map(|v| v * v).sum::<f64>().sqrt();
        if norm == 0.0 {
            return Err(LearnerError::Invalid(
                "PLS: the targets are uncorrelated with every column".into(),
            ));
        }
        let biggest = w
            .iter()
            .copied()
            .fold(0.0f64, |b, v| if v.abs() > b.abs() { v } else { b });
        let sign = if biggest < 0.0 { -1.0 } else { 1.0 };
        w.iter_mut().for_each(|v| *v *= sign / norm);
        let scores: Vec<f64> = xs
            .iter()
            .map(|r| r.iter().zip(&w).map(|(a, b)| a * b).sum())
            .collect();
        let tt: f64 = scores.iter().map(|t| t * t).sum();
        let loadings: Vec<f64> = (0..d)
            .map(|j| xs.iter().zip(&scores).map(|(r, t)| r[j] * t).sum::<f64>() / tt)
            .collect();
        // OLS of y on the score
        let (tm, _) = mean_std(scores.iter().copied());
        let sxy: f64 = scores.iter().zip(y).map(|(t, v)| (t - tm) * (v - ym)).sum();
        let sxx: f64 = scores.iter().map(|t| (t - tm).powi(2)).sum();
        let slope = sxy / sxx;
        let intercept = ym - slope * tm;
        let ss_res: f64 = scores
            .iter()
            .zip(y)
            .map(|(t, v)| (v - slope * t - intercept).powi(2))
            .sum();
        let ss_tot: f64 = y.iter().map(|v| (v - ym).powi(2)).sum();
        Ok(Pls1 {
            mean,
            std,
            weights: w,
            loadings,
            scores,
            slope,
            intercept,
            r2: if ss_tot > 0.0 {
                1.0 - ss_res / ss_tot
            } else {
                0.0
            },
        })
    }

    /// The vector whose predicted target is `y_target`: `τ* = (y* − b) / c`, then
    /// `a* = μ + τ* · (p ⊙ s)` (scikit-learn's `inverse_transform` of the score).
    pub fn inverse(&self, y_target: f64) -> Vec<f64> {
        let tau = (y_target - self.intercept) / self.slope;
        self.mean
            .iter()
            .zip(&self.loadings)
            .zip(&self.std)
            .map(|((m, p), s)| m + tau * p * s)
            .collect()
    }
}
