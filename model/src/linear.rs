//! The linear layer's product `y = x·Wᵀ` with a backward of its own. Autograd through
//! `x.matmul(&w.t())` computes the weight's gradient as `Xᵀ·dY`, `[in, out]`, and the
//! transpose's backward then copies it into the weight's layout `[out, in]` (for a Qwen2.5-0.5B
//! layer, 14.9M elements copied a step, one launch per weight). Here it is one matmul,
//! `dW = dYᵀ·X`, that writes `[out, in]` as the weight is laid out. A gradient that nothing
//! tracks (a frozen weight, an input outside the graph) is not computed at all.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, Layout, Shape, Tensor};

use crate::error::Result;

/// `x [N, in] · wᵀ` for `w [out, in]` → `[N, out]`, differentiable in both; one matmul each
/// way per gradient (see the module's doc).
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.apply_op2(w, MatmulT)?)
}

struct MatmulT;

/// The forward on either device's storage: one GEMM with the weight read transposed in place.
fn forward<S: BackendStorage>(
    x: &S,
    xl: &Layout,
    w: &S,
    wl: &Layout,
) -> candle_core::Result<(S, Shape)> {
    let (n, k) = xl.shape().dims2()?;
    let (m, kw) = wl.shape().dims2()?;
    if k != kw {
        candle_core::bail!("linear: x [{n}, {k}] against a weight [{m}, {kw}]");
    }
    let y = x.matmul(w, (1, n, m, k), xl, &wl.transpose(0, 1)?)?;
    Ok((y, Shape::from((n, m))))
}

impl CustomOp2 for MatmulT {
    fn name(&self) -> &'static str {
        "ferrite-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        forward(x, xl, w, wl)
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        forward(x, xl, w, wl)
    }

    /// `dX = dY·W` `[N, in]` and `dW = dYᵀ·X` `[out, in]`, each only where its input is tracked.
    /// The gradients are computed from detached inputs: a product of graph tensors would record
    /// its own backward, holding `dY` (and what it is a view of) and `X` for as long as the
    /// gradient lives, which for a weight is the whole backward.
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.detach().contiguous()?; // [N, out]
        let dx = match x.track_op() {
            true => Some(g.matmul(&w.detach())?),
            false => None,
        };
        let dw = match w.track_op() {
            true => Some(g.t()?.matmul(&x.detach())?),
            false => None,
        };
        Ok((dx, dw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{max_rel, random};
    use candle_core::Var;

    #[test]
    fn matches_autograd_through_matmul_of_the_transpose() {
        let (x0, w0) = (random(&[37, 24], 1, 1.0), random(&[19, 24], 2, 1.0));
        let u = random(&[37, 19], 3, 1.0);
        let run = |f: &dyn Fn(&Tensor, &Tensor) -> Tensor| {
            let (x, w) = (
                Var::from_tensor(&x0).unwrap(),
                Var::from_tensor(&w0).unwrap(),
            );
            let y = f(x.as_tensor(), w.as_tensor());
            let grads = (&y * &u).unwrap().sum_all().unwrap().backward().unwrap();
            let get = |v: &Var| grads.get(v.as_tensor()).expect("a gradient").clone();
            (y, get(&x), get(&w))
        };
        let (want, want_dx, want_dw) = run(&|x, w| x.matmul(&w.t().unwrap()).unwrap());
        let (y, dx, dw) = run(&|x, w| matmul_t(x, w).unwrap());
        assert_eq!(y.dims(), [37, 19]);
        assert!(max_rel(&y, &want) < 1e-6);
        assert!(max_rel(&dx, &want_dx) < 1e-6);
        assert_eq!(dw.dims(), [19, 24]);
        assert!(dw.is_contiguous(), "dW in the weight's layout");
        // no graph recorded: a gradient holding dY and X would keep them through the backward
        assert!(!dx.track_op() && !dw.track_op());
        assert!(max_rel(&dw, &want_dw) < 1e-6);
    }

    #[test]
    fn a_frozen_weight_gets_no_gradient_and_shapes_are_checked() {
        let x = Var::from_tensor(&random(&[5, 4], 4, 1.0)).unwrap();
        let w = random(&[3, 4], 5, 1.0); // not a Var: frozen
        let y = matmul_t(x.as_tensor(), &w).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&w).is_none());
        // dX = 1·W: each row is the column sums of W
        let want = w.sum_keepdim(0).unwrap().broadcast_as((5, 4)).unwrap();
        let dx = grads.get(x.as_tensor()).unwrap();
        assert!(max_rel(dx, &want.contiguous().unwrap()) < 1e-6);
        let err = matmul_t(x.as_tensor(), &random(&[3, 5], 6, 1.0)).unwrap_err();
        assert!(err.to_string().contains("against a weight [3, 5]"), "{err}");
    }
}
