//! What every part of the engine shares: walking the samples in chunks (to bound the memory of
//! per-sample intermediates), summing tensors into an optional running total, and the workspace
//! whose reusable buffers hold the chunks' per-sample intermediates.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};
use tch::{Device, Kind, Tensor};

/// The bound on per-sample intermediates, and reusable float32 buffers for them. A chunk loop that
/// materialises per-sample gradients writes them into a buffer kept for the whole estimation
/// instead of allocating (and, on the CPU, page-faulting in) up to `budget` bytes afresh for every
/// chunk of every layer.
#[derive(Default)]
pub struct Workspace {
    /// Upper bound for per-sample intermediates, in bytes.
    pub budget: i64,
    buffers: Mutex<BTreeMap<usize, Tensor>>,
}

/// The workspace key of a rule's result, added into the sums before the next rule runs.
pub const RESULT: usize = usize::MAX;
/// The workspace key of a rule's per-chunk intermediates.
pub const CHUNK: usize = 0;
/// The workspace key of a rule's rearranged copy of a chunk's input (a convolution's padded input).
pub const INPUT: usize = usize::MAX - 1;
/// The workspace key of a rule's second rearrangement of a chunk's input (a convolution's
/// unfolded columns).
pub const COLUMNS: usize = usize::MAX - 2;

impl Workspace {
    pub fn new(budget: i64) -> Self {
        Self {
            budget,
            buffers: Mutex::new(BTreeMap::new()),
        }
    }

    /// A float32 tensor of `shape` on `device`, uninitialised, backed by buffer `key`: valid until
    /// the next call with the same key (the caller must be done with it by then).
    pub fn buffer(&self, key: usize, shape: &[i64], device: Device) -> Tensor {
        let numel: i64 = shape.iter().product();
        let mut buffers = self.buffers.lock().unwrap_or_else(PoisonError::into_inner);
        let fits = buffers
            .get(&key)
            .is_some_and(|b| b.device() == device && b.numel() as i64 >= numel);
        if !fits {
            buffers.insert(key, Tensor::empty([numel.max(1)], (Kind::Float, device)));
        }
        buffers[&key].narrow(0, 0, numel).view(shape)
    }
}

/// `(start, len)` of consecutive chunks of at most `size` samples covering `0..n`.
pub fn chunks(n: i64, size: i64) -> impl Iterator<Item = (i64, i64)> {
    let size = size.max(1);
    (0..n)
        .step_by(size as usize)
        .map(move |start| (start, size.min(n - start)))
}

/// `total += t`, where an absent total starts as `t`.
pub fn add_to(total: &mut Option<Tensor>, t: Tensor) {
    *total = Some(match total.take() {
        Some(s) => s + t,
        None => t,
    });
}

/// Running totals keyed by parameter slot.
#[derive(Default)]
pub struct SlotTotals(BTreeMap<usize, Tensor>);

impl SlotTotals {
    pub fn add(&mut self, slot: usize, t: Tensor) {
        let mut total = self.0.remove(&slot);
        add_to(&mut total, t);
        if let Some(total) = total {
            self.0.insert(slot, total);
        }
    }

    pub fn get(&self, slot: usize) -> Option<&Tensor> {
        self.0.get(&slot)
    }

    pub fn into_entries(self) -> impl Iterator<Item = (usize, Tensor)> {
        self.0.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_every_sample_once() {
        let got: Vec<(i64, i64)> = chunks(10, 4).collect();
        assert_eq!(got, vec![(0, 4), (4, 4), (8, 2)]);
        assert_eq!(chunks(0, 4).count(), 0);
        assert_eq!(
            chunks(3, 0).count(),
            3,
            "a chunk size below 1 means one sample"
        );
    }

    #[test]
    fn workspace_buffers_are_reused_per_key_and_grow() {
        let ws = Workspace::new(1 << 20);
        let a = ws.buffer(0, &[2, 3], Device::Cpu);
        let ptr = a.data_ptr();
        assert_eq!(a.size(), vec![2, 3]);
        assert_eq!(
            ws.buffer(0, &[5], Device::Cpu).data_ptr(),
            ptr,
            "fits: reused"
        );
        assert_ne!(
            ws.buffer(1, &[5], Device::Cpu).data_ptr(),
            ptr,
            "another key"
        );
        assert_eq!(
            ws.buffer(0, &[4, 4], Device::Cpu).size(),
            vec![4, 4],
            "grows"
        );
    }
}
