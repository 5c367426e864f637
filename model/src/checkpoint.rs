//! Per-layer activation checkpointing. With it on, a training forward keeps only each decoder
//! layer's input: the layer runs on detached weights, and its backward runs it again with the
//! real weights and backpropagates through that one layer. Peak activation memory is one
//! layer's worth plus a `[B, T, H]` tensor per layer, for about one more forward of compute.
//!
//! candle's custom ops take at most three inputs, so the recomputed layer's weight gradients
//! cannot flow back through the op; they are set aside in this thread and [`backward`] adds
//! them to the gradient store. Call [`backward`] instead of `Tensor::backward` when
//! checkpointing may be on (the learner's optimizer does).

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::Result;
use crate::weights::LayerWeights;

static ENABLED: AtomicBool = AtomicBool::new(false);
static RECOMPUTED: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Weight gradients of recomputed layers, waiting for [`backward`] to collect them.
    static SET_ASIDE: RefCell<Vec<(Tensor, Tensor)>> = const { RefCell::new(Vec::new()) };
    /// Checkpointing forced on for this thread ([`forced`]).
    static FORCED: Cell<bool> = const { Cell::new(false) };
}

/// Turns per-layer checkpointing of training forwards on or off (off by default).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether training forwards on this thread checkpoint their layers: turned on for the process
/// ([`set_enabled`]) or for this thread ([`forced`]).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed) || FORCED.with(Cell::get)
}

/// Runs `f` with checkpointing on for this thread when `on` (otherwise as it is): the learner
/// turns it on for its steps once a sequence has not fitted in device memory without it.
pub fn forced<T>(on: bool, f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            FORCED.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(FORCED.with(|c| c.replace(on || c.get())));
    f()
}

/// How many layer backwards this process has recomputed.
pub fn recomputed_layers() -> usize {
    RECOMPUTED.load(Ordering::Relaxed)
}

/// `loss.backward()` plus the weight gradients of checkpointed layers.
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    SET_ASIDE.with(|s| s.borrow_mut().clear());
    let grads = loss.backward();
    // taken whether the backward failed or not: a failed one's (out of device memory, say) would
    // hold their memory through the next forward
    let set_aside = SET_ASIDE.with(|s| std::mem::take(&mut *s.borrow_mut()));
    let mut grads = grads?;
    for (param, g) in set_aside {
        let total = match grads.get(&param) {
            Some(acc) => (acc + g)?,
            None => g,
        };
        grads.insert(&param, total);
    }
    Ok(grads)
}

/// `layer(w, x)` computed on the detached weights without a graph, joined to `x`'s graph with
/// a backward that recomputes it on `w` itself and sets `w`'s gradients aside for [`backward`].
pub fn checkpointed<F>(x: &Tensor, w: &LayerWeights, layer: F) -> Result<Tensor>
where
    F: Fn(&LayerWeights, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
{
    let y = layer(&w.detach(), &x.detach())?;
    // A weight joins the op's inputs so that the op stays in the graph even when `x` does not
    // need a gradient (its gradient comes through the set-aside store, not through the op).
    let anchor = w
        .tensors()
        .into_iter()
        .find(|t| t.is_variable())
        .unwrap_or(&w.q_proj)
        .clone();
    let w = w.clone();
    crate::attach::attach(x, &anchor, &anchor, y, move |x, _, _, _, g| {
        RECOMPUTED.fetch_add(1, Ordering::Relaxed);
        let input = Var::from_tensor(&x.detach())?;
        let y = layer(&w, input.as_tensor())?;
        let grads = y.backward_from(g)?;
        SET_ASIDE.with(|s| {
            let mut s = s.borrow_mut();
            for p in w.tensors() {
                if let Some(g) = grads.get(p) {
                    s.push((p.clone(), g.clone()));
                }
            }
        });
        Ok([grads.get(input.as_tensor()).cloned(), None, None])
    })
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    /// The recomputed layer's backward is seeded with the upstream gradient (vendored candle's
    /// `backward_from`): the same gradients, bit for bit, as the product with it summed, which
    /// on a GPU was an elementwise product, a one-block reduction over the layer's whole output
    /// and their backward, per layer.
    #[test]
    fn a_seeded_backward_gives_the_gradients_of_the_seeds_product_summed() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (3, 5), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f32, 1., (5, 4), &dev).unwrap()).unwrap();
        let g = Tensor::randn(0f32, 1., (3, 4), &dev).unwrap();
        let layer = || {
            let h = x.as_tensor().matmul(w.as_tensor()).unwrap();
            (h.silu().unwrap() + x.as_tensor().narrow(1, 0, 4).unwrap()).unwrap()
        };
        let seeded = layer().backward_from(&g).unwrap();
        let summed = (layer() * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &w] {
            let a = seeded.get(v.as_tensor()).unwrap().flatten_all().unwrap();
            let b = summed.get(v.as_tensor()).unwrap().flatten_all().unwrap();
            assert_eq!(a.to_vec1::<f32>().unwrap(), b.to_vec1::<f32>().unwrap());
        }
        // a seed of another shape or dtype is an error, not a silent broadcast or cast
        let y = layer();
        assert!(y.backward_from(&g.narrow(0, 0, 2).unwrap()).is_err());
        assert!(y.backward_from(&g.to_dtype(DType::F64).unwrap()).is_err());
    }
}
