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
        self.filled(layer, t)
    }

    /// `layer`'s key and value buffers `[B, Hkv, capacity, D]` and the slot the next token goes
    /// to, for a kernel that writes it in place (then [`KvCache::filled`]).
    pub(crate) fn next_slot(&self, layer: usize) -> Result<(&Tensor, &Tensor, usize)> {
        if self.len >= self.capacity {
            return Err(ModelError::Generation(format!(
                "KV cache full: {} + 1 slots > capacity {}",
                self.len, self.capacity
            )));
        }
        Ok((&self.keys[layer], &self.values[layer], self.len))
    }

    /// Views of `layer`'s keys and values in the filled slots plus `t` new ones `[B, Hkv,
    /// len + t, D]`, once something wrote those in place.
    pub(crate) fn filled(&self, layer: usize, t: usize) -> Result<(Tensor, Tensor)> {
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

    /// Rows in the batch.
    pub fn batch(&self) -> usize {
        self.keys.first().map_or(0, |k| k.dim(0).unwrap_or(0))
    }

    /// Copies every filled slot of `from`'s row `j` into this cache's row `rows[j]`, ending at
    /// this cache's current length (continuous batching: a new prompt's prefill joins a running
    /// batch in the slot a finished sequence left).
    pub(crate) fn write_rows(&mut self, from: &KvCache, rows: &[usize]) -> Result<()> {
        let n = from.len;
        if n > self.len || rows.len() != from.batch() {
            return Err(ModelError::Generation(format!(
                "cannot place {} rows of {n} slots before slot {}",
                from.batch(),
                self.len
            )));
        }
        // runs of consecutive rows, each one copy a buffer: `(first j, first row, rows)`
        let mut runs: Vec<(usize, usize, usize)> = Vec::new();
        for (j, &row) in rows.iter().enumerate() {
            match runs.last_mut() {
                Some((j0, r0, k)) if *j0 + *k == j && *r0 + *k == row => *k += 1,
                _ => runs.push((j, row, 1)),
            }
        }
        for (dst, src) in self.buffers().zip(from.buffers()) {
            for &(j, row, k) in &runs {
                // a copy only where `from` holds more slots than it filled
                let s = src.narrow(0, j, k)?.narrow(2, 0, n)?.contiguous()?;
                dst.narrow(0, row, k)?.slice_set(&s, 2, self.len - n)?;
            }
        }
        Ok(())
    }

    /// Moves row `row`'s slots `[from, from + n)` to `[to, to + n)` in every layer.
    pub(crate) fn move_slots(
        &mut self,
        row: usize,
        from: usize,
        to: usize,
        n: usize,
    ) -> Result<()> {
        if n == 0 || from == to {
            return Ok(());
        }
        for buf in self.buffers() {
            let s = buf
                .narrow(0, row, 1)?
                .narrow(2, from, n)?
                .force_contiguous()?;
            buf.narrow(0, row, 1)?.slice_set(&s, 2, to)?;
        }
        Ok(())
    }

    /// Sets the filled length to `len` (up to the capacity) after [`KvCache::move_slots`] moved
    /// the rows to end there.
    pub(crate) fn set_len(&mut self, len: usize) -> Result<()> {
        if len > self.capacity {
            return Err(ModelError::Generation(format!(
                "KV cache: {len} slots > capacity {}",
                self.capacity
            )));
        }
        self.len = len;
        Ok(())
    }

    /// Makes the capacity at least `capacity`, copying the filled slots into larger buffers.
    pub(crate) fn reserve(&mut self, capacity: usize) -> Result<()> {
        if capacity <= self.capacity {
            return Ok(());
        }
        for buf in self.keys.iter_mut().chain(self.values.iter_mut()) {
            let (b, h, _, d) = buf.dims4()?;
            let larger = Tensor::zeros((b, h, capacity, d), buf.dtype(), buf.device())?;
            if self.len > 0 {
                larger.slice_set(&buf.narrow(2, 0, self.len)?.force_contiguous()?, 2, 0)?;
            }
            *buf = larger;
        }
        self.capacity = capacity;
        Ok(())
    }

    /// Keeps only `rows` (in that order): the batch shrinks when its sequences run out.
    pub(crate) fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        let device = self.keys.first().map(|k| k.device().clone());
        let Some(device) = device else {
            return Ok(());
        };
        let ids = Tensor::from_vec(
            rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
            rows.len(),
            &device,
        )?;
        for buf in self.keys.iter_mut().chain(self.values.iter_mut()) {
            *buf = buf.index_select(&ids, 0)?;
        }
        Ok(())
    }

    fn buffers(&self) -> impl Iterator<Item = &Tensor> {
        self.keys.iter().chain(&self.values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::IndexOp;

    /// A cache of `batch` rows whose slots hold `base + 100·row + slot` in every element (keys)
    /// and its negation (values), `len` of them filled.
    fn filled(batch: usize, capacity: usize, len: usize, base: f32) -> KvCache {
        let c = crate::builtin::tiny_config(32, 2);
        let mut cache = KvCache::new(&c, batch, capacity, DType::F32, &Device::Cpu).unwrap();
        let (h, d) = (c.num_key_value_heads, c.head_dim);
        let v: Vec<f32> = (0..batch * h * len * d)
            .map(|i| base + (100 * (i / (h * len * d)) + (i / d) % len) as f32)
            .collect();
        let k = Tensor::from_vec(v, (batch, h, len, d), &Device::Cpu).unwrap();
        for layer in 0..c.num_hidden_layers {
            cache.append(layer, &k, &k.neg().unwrap()).unwrap();
        }
        cache.advance(len);
        cache
    }

    /// Every layer's keys of `row`, slot by slot (the first element of each), and its values'
    /// negation, which must agree.
    fn slots(cache: &KvCache, row: usize) -> Vec<f32> {
        let key = |t: &Tensor| {
            t.narrow(0, row, 1)
                .unwrap()
                .narrow(2, 0, cache.len())
                .unwrap()
                .i((0, 0, .., 0))
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let first = key(&cache.keys[0]);
        for (k, v) in cache.keys.iter().zip(&cache.values) {
            assert_eq!(key(k), first);
            assert_eq!(key(&v.neg().unwrap()), first);
        }
        first
    }

    #[test]
    fn rows_written_from_a_prefill_land_in_their_rows_and_the_others_stay() {
        // five rows of 6 slots; a prefill of 3 rows and 2 slots goes to rows 0, 2 and 3 (one
        // run of two) at slots 4 and 5, from a prefill cache as full as its capacity, and from
        // one with a slot to spare
        for fill_capacity in [2, 3] {
            let mut cache = filled(5, 8, 6, 0.0);
            let fill = filled(3, fill_capacity, 2, 1000.0);
            cache.write_rows(&fill, &[0, 2, 3]).unwrap();
            let expect = |row: usize, from: Option<usize>| -> Vec<f32> {
                (0..6)
                    .map(|s| match from {
                        Some(j) if s >= 4 => 1000.0 + (100 * j + s - 4) as f32,
                        _ => (100 * row + s) as f32,
                    })
                    .collect()
            };
            let sources = [
                (0, Some(0)),
                (1, None),
                (2, Some(1)),
                (3, Some(2)),
                (4, None),
            ];
            for (row, from) in sources {
                assert_eq!(slots(&cache, row), expect(row, from), "row {row}");
            }
            let long = filled(1, 7, 7, 0.0);
            assert!(cache.write_rows(&long, &[1]).is_err(), "7 slots before 6");
        }
    }

    #[test]
    fn a_reserved_cache_keeps_its_slots_and_a_length_stays_within_the_capacity() {
        let mut cache = filled(2, 4, 3, 0.0);
        cache.reserve(9).unwrap();
        assert_eq!((cache.capacity(), cache.len()), (9, 3));
        assert_eq!(slots(&cache, 1), vec![100.0, 101.0, 102.0]);
        cache.reserve(5).unwrap();
        assert_eq!(cache.capacity(), 9, "never shrinks");
        assert!(cache.set_len(10).is_err());
        cache.set_len(9).unwrap();
        assert_eq!(cache.len(), 9);
    }
}
