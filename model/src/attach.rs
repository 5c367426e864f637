//! Joins a value computed outside autograd to the graph, with a hand-written backward. The
//! chunked output layer ([`crate::head`]) and the chunked attention ([`crate::attention`]) run
//! their forward on detached inputs, keeping nothing for the backward, and recompute there.

use candle_core::{CpuStorage, CudaStorage, CustomOp3, Layout, Shape, Storage, Tensor};

use crate::error::Result;

/// `backward(a, b, c, value, grad)` → the gradients of `a`, `b`, `c`.
pub type Backward = dyn Fn(&Tensor, &Tensor, &Tensor, &Tensor, &Tensor) -> Result<[Option<Tensor>; 3]>
    + Send
    + Sync;

/// What [`attach`] joins to the graph.
pub enum Value {
    /// A tensor: the graph's output is a copy of its data (the graph cannot take a tensor's
    /// storage over, as it is shared).
    Tensor(Tensor),
    /// A buffer of this shape, contiguous, that its maker hands over (a kernel's fresh output):
    /// the graph's output is that buffer, with no copy.
    Storage(Storage, Shape),
}

impl Value {
    /// The value as a tensor outside any graph (a handed-over buffer wrapped, no copy).
    pub fn into_tensor(self) -> Tensor {
        match self {
            Value::Tensor(t) => t,
            Value::Storage(storage, shape) => {
                Tensor::from_storage(storage, shape, candle_core::op::BackpropOp::none(), false)
            }
        }
    }
}

impl From<Tensor> for Value {
    fn from(t: Tensor) -> Self {
        Value::Tensor(t)
    }
}

/// A tensor holding `value`'s data whose gradients with respect to `a`, `b` and `c` are what
/// `backward` returns for the upstream gradient (given the inputs and the value as the graph
/// holds it). `value` must be on the inputs' device.
pub fn attach(
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    value: impl Into<Value>,
    backward: impl Fn(&Tensor, &Tensor, &Tensor, &Tensor, &Tensor) -> Result<[Option<Tensor>; 3]>
        + Send
        + Sync
        + 'static,
) -> Result<Tensor> {
    let value = match value.into() {
        Value::Tensor(t) => Value::Tensor(t.contiguous()?),
        own => own,
    };
    let op = Attached {
        value: std::sync::Mutex::new(Some(value)),
        backward: Box::new(backward),
    };
    Ok(a.apply_op3(b, c, op)?)
}

struct Attached {
    /// Taken by the forward, so the graph keeps only the output.
    value: std::sync::Mutex<Option<Value>>,
    backward: Box<Backward>,
}

impl Attached {
    /// The value's storage, handed over or copied, through `pick` (the device's variant of
    /// `Storage`).
    fn take<S>(&self, pick: impl FnOnce(Storage) -> Option<S>) -> candle_core::Result<(S, Shape)>
    where
        S: candle_core::backend::BackendStorage,
    {
        let value = self
            .value
            .lock()
            .map_err(|_| candle_core::Error::Msg("attach: poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("attach: forward run twice".into()))?;
        let (storage, shape) = match value {
            Value::Storage(storage, shape) => (storage, shape),
            Value::Tensor(t) => {
                let (storage, layout) = t.storage_and_layout();
                (storage.try_clone(layout)?, layout.shape().clone())
            }
        };
        let s = pick(storage)
            .ok_or_else(|| candle_core::Error::Msg("attach: value on another device".into()))?;
        Ok((s, shape))
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
        self.take(|s| match s {
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
        self.take(|s| match s {
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn a_tensor_or_a_handed_over_buffer_becomes_the_output_with_the_given_backward() {
        let x = Var::new(&[1f32, 2., 3.], &Device::Cpu).unwrap();
        let data = Tensor::new(&[10f32, 20., 30.], &Device::Cpu).unwrap();
        let buffer = || {
            let (storage, layout) = data.storage_and_layout();
            Value::Storage(storage.try_clone(layout).unwrap(), Shape::from(3))
        };
        for value in [Value::Tensor(data.clone()), buffer()] {
            let x = x.as_tensor();
            let y = attach(x, x, x, value, |_, _, _, y, g| {
                Ok([Some((g * y)?), None, None])
            })
            .unwrap();
            assert_eq!(y.to_vec1::<f32>().unwrap(), [10., 20., 30.]);
            let grads = (&y * 3.0).unwrap().sum_all().unwrap().backward().unwrap();
            let dx = grads.get(x).unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(dx, [30., 60., 90.]);
        }
    }
}
