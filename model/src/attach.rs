//! Joins a value computed outside autograd to the graph, with a hand-written backward. The
//! chunked output layer ([`crate::head`]) and the chunked attention ([`crate::attention`]) run
//! their forward on detached inputs, keeping nothing for the backward, and recompute there.

use candle_core::{CpuStorage, CudaStorage, CustomOp3, Layout, Shape, Storage, Tensor};

use crate::error::Result;

/// `backward(a, b, c, value, grad)` → the gradients of `a`, `b`, `c`.
pub type Backward = dyn Fn(&Tensor, &Tensor, &Tensor, &Tensor, &Tensor) -> Result<[Option<Tensor>; 3]>
    + Send
    + Sync;

/// A tensor holding `value`'s data whose gradients with respect to `a`, `b` and `c` are what
/// `backward` returns for the upstream gradient (given the inputs and the value as the graph
/// holds it). `value` must be on the inputs' device.
pub fn attach(
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    value: Tensor,
    backward: impl Fn(&Tensor, &Tensor, &Tensor, &Tensor, &Tensor) -> Result<[Option<Tensor>; 3]>
        + Send
        + Sync
        + 'static,
) -> Result<Tensor> {
    let op = Attached {
        value: std::sync::Mutex::new(Some(value.contiguous()?)),
        backward: Box::new(backward),
    };
    Ok(a.apply_op3(b, c, op)?)
}

struct Attached {
    /// Taken by the forward, so the graph keeps only the output.
    value: std::sync::Mutex<Option<Tensor>>,
    backward: Box<Backward>,
}

impl Attached {
    /// A copy of the value's storage, through `pick` (the device's variant of `Storage`).
    fn copy<S>(&self, pick: impl FnOnce(&Storage) -> Option<&S>) -> candle_core::Result<(S, Shape)>
    where
        S: candle_core::backend::BackendStorage,
    {
        let value = self
            .value
            .lock()
            .map_err(|_| candle_core::Error::Msg("attach: poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("attach: forward run twice".into()))?;
        let (storage, layout) = value.storage_and_layout();
        let s = pick(&storage)
            .ok_or_else(|| candle_core::Error::Msg("attach: value on another device".into()))?;
        Ok((s.try_clone(layout)?, layout.shape().clone()))
    }
}

impl CustomOp3 for Attached {
    fn name(&self) -> &'static str {
        "ferrite-attached"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.copy(|s| match s {
            Storage::Cpu(s) => Some(s),
            _ => None,
        })
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        self.copy(|s| match s {
            Storage::Cuda(s) => Some(s),
            _ => None,
        })
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        value: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [da, db, dc] = (self.backward)(a, b, c, value, g)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok((da, db, dc))
    }
}
