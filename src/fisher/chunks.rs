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
pub struct Workspace {
    /// Upper bound for per-sample intermediates, in bytes.
    pub budget: i64,
    buffers: Mutex<BTreeMap<usize, Tensor>>,
    /// Where the buffers go when the workspace ends (`POOL`).
    pool: &'static Pool,
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

/// Bytes of CPU buffers kept between estimations (see `POOL`).
const POOL_BYTES: i64 = 32 << 20;

/// CPU buffers that an ended estimation's workspace leaves to the next one, at most `POOL_BYTES`
/// in all: without them, every estimation page-faults its buffers in afresh (a small CNN's
/// first batch, ~15 MB of unfolded columns and gradients, paid several milliseconds for it).
/// No tensor that outlives an estimation is a view of a workspace buffer (results are added into
/// the sums, never kept), so a buffer handed on is not read by anyone else. CUDA buffers are not
/// kept: the caching allocator already reuses that memory.
static POOL: Pool = Mutex::new(Vec::new());

/// Buffers by workspace key.
type Pool = Mutex<Vec<(usize, Tensor)>>;

impl Workspace {
    /// A workspace that starts with the buffers the last ended one left in the pool.
    pub fn new(budget: i64) -> Self {
        Self::with_pool(budget, &POOL)
    }

    fn with_pool(budget: i64, pool: &'static Pool) -> Self {
        let pooled = std::mem::take(&mut *pool.lock().unwrap_or_else(PoisonError::into_inner));
        Self {
            budget,
            buffers: Mutex::new(pooled.into_iter().collect()),
            pool,
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

impl Drop for Workspace {
    /// Leaves the CPU buffers to the pool, largest first, as long as they fit in `POOL_BYTES`.
    fn drop(&mut self) {
        let buffers = std::mem::take(
            self.buffers
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner),
        );
        let mut cpu: Vec<(usize, Tensor)> = buffers
            .into_iter()
            .filter(|(_, b)| b.device() == Device::Cpu)
            .collect();
        cpu.sort_by_key(|(_, b)| std::cmp::Reverse(b.numel()));
        let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        let mut bytes: i64 = pool.iter().map(|(_, b)| 4 * b.numel() as i64).sum();
        for (key, b) in cpu {
            let size = 4 * b.numel() as i64;
            if bytes + size <= POOL_BYTES && !pool.iter().any(|(k, _)| *k == key) {
                bytes += size;
                pool.push((key, b));
            }
        }
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
    fn an_ended_workspace_leaves_its_small_cpu_buffers_to_the_next() {
        static TEST_POOL: Pool = Mutex::new(Vec::new());
        let first = Workspace::with_pool(1 << 20, &TEST_POOL);
        let small = first.buffer(CHUNK, &[1000], Device::Cpu).data_ptr();
        let big_numel = POOL_BYTES / 4 + 1;
        let _ = first.buffer(COLUMNS, &[big_numel], Device::Cpu);
        drop(first);
        let keys: Vec<usize> = TEST_POOL.lock().unwrap().iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, vec![CHUNK], "over the pool's size: not kept");
        let second = Workspace::with_pool(1 << 20, &TEST_POOL);
        assert!(
            TEST_POOL.lock().unwrap().is_empty(),
            "the second took the pool"
        );
        assert_eq!(
            second.buffer(CHUNK, &[500], Device::Cpu).data_ptr(),
            small,
            "kept"
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
