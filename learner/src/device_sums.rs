//! A loss's statistics as sums on the device, read back in one transfer once the backward is
//! queued. Each read from a GPU (`to_scalar`, `to_vec`) waits for the device to finish: read
//! between the forward and the backward, the device would then sit idle while the host walks the
//! backward graph and issues its launches.

use candle_core::{DType, Tensor};

use crate::error::Result;

pub struct DeviceSums(Tensor);

impl DeviceSums {
    /// Scalar tensors (any float dtype) as one `[n]` f32 tensor, in order.
    pub fn stack(parts: &[Tensor]) -> Result<Self> {
        let parts = parts
            .iter()
            .map(|t| t.to_dtype(DType::F32))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(DeviceSums(Tensor::stack(&parts, 0)?))
    }

    /// The sums, in the order they were stacked (waits for the device).
    pub fn read(&self) -> Result<Vec<f64>> {
        Ok(self
            .0
            .to_vec1::<f32>()?
            .into_iter()
            .map(f64::from)
            .collect())
    }
}
