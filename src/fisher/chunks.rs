//! The two loops every part of the engine shares: walking the samples in chunks (to bound the
//! memory of per-sample intermediates), and summing tensors into an optional running total.

use std::collections::BTreeMap;
use tch::Tensor;

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
}
