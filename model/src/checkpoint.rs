//! Per-layer activation checkpointing. With it on, a training forward keeps only each decoder
//! layer's input: the layer runs on detached weights, and its backward runs it again with the
//! real weights and backpropagates through that one layer. Peak activation memory is one
//! layer's worth plus a `[B, T, H]` tensor per layer, for about one more forward of compute.
//!
//! candle's custom ops take at most three inputs, so the recomputed layer's weight gradients
//! cannot flow back through the op; they are set aside in this thread and [`backward`] adds
//! them to the gradient store. Call [`backward`] instead of `Tensor::backward` when
//! checkpointing may be on (the learner's optimizer does).

use std::cell::RefCell;
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
}

/// Turns per-layer checkpointing of training forwards on or off (off by default).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// How many layer backwards this process has recomputed.
pub fn recomputed_layers() -> usize {
    RECOMPUTED.load(Ordering::Relaxed)
}

/// `loss.backward()` plus the weight gradients of checkpointed layers.
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    SET_ASIDE.with(|s| s.borrow_mut().clear());
    let mut grads = loss.backward()?;
    let set_aside = SET_ASIDE.with(|s| std::mem::take(&mut *s.borrow_mut()));
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
    let anchor = w.q_proj.clone();
    let w = w.clone();
    crate::attach::attach(x, &anchor, &anchor, y, move |x, _, _, _, g| {
        RECOMPUTED.fetch_add(1, Ordering::Relaxed);
        let input = Var::from_tensor(&x.detach())?;
        let y = layer(&w, input.as_tensor())?;
        let grads = (y * g)?.sum_all()?.backward()?;
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
