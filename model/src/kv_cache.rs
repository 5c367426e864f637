//! A preallocated key/value cache: one `[B, Hkv, capacity, D]` buffer per layer for keys and
//! one for values, written in place. Decoding never concatenates or reallocates.

use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

#[derive(Debug)]
pub struct KvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    pub fn new(
        c: &ModelConfig,
        batch: usize,
        capacity: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let shape = (batch, c.num_key_value_heads, capacity, c.head_dim);
        let zeros = || Tensor::zeros(shape, dtype, device);
        let keys = (0..c.num_hidden_layers)
            .map(|_| zeros())
            .collect::<candle_core::Result<_>>()?;
        let values = (0..c.num_hidden_layers)
            .map(|_| zeros())
            .collect::<candle_core::Result<_>>()?;
        Ok(KvCache {
            keys,
            values,
            len: 0,
            capacity,
        })
    }

    /// Slots filled so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Writes `k, v [B, Hkv, T, D]` at the current slot of `layer` and returns the keys and
    /// values of all filled slots `[B, Hkv, len + T, D]` (views into the buffers).
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        if self.len + t > self.capacity {
            return Err(ModelError::Generation(format!(
                "KV cache full: {} + {t} slots > capacity {}",
                self.len, self.capacity
            )));
        }
        self.keys[layer].slice_set(&k.contiguous()?, 2, self.len)?;
        self.values[layer].slice_set(&v.contiguous()?, 2, self.len)?;
        let end = self.len + t;
        Ok((
            self.keys[layer].narrow(2, 0, end)?,
            self.values[layer].narrow(2, 0, end)?,
        ))
    }

    /// Called once per forward, after every layer appended `t` slots.
    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }

    /// Empties the cache for reuse (buffers are kept).
    pub fn reset(&mut self) {
        self.len = 0;
    }
}
