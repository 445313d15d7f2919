//! Raw tensor memory as the CPU passes see it (the penalty kernel, the merge): an address type
//! that may cross threads, and the byte spans of tensors, so that what a pass's SAFETY contract
//! claims (what it writes overlaps nothing it reads and nothing else it writes) is checked, not
//! assumed.

use std::ops::Range;
use tch::Tensor;

/// The address of a live tensor's element memory. Only made from a tensor's data pointer; the
/// passes read or write through it under their stated contracts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addr(*mut u8);

// SAFETY: an `Addr` is a plain address; the pool threads that receive it only dereference it
// under their pass's contract (`penalty::kernel::run`, `merge::cpu_merge`) (live memory, written ranges disjoint from everything else).
unsafe impl Send for Addr {}
unsafe impl Sync for Addr {}

impl Addr {
    pub fn of(t: &Tensor) -> Self {
        Addr(t.data_ptr() as *mut u8)
    }

    /// The address `bytes` further on.
    pub fn byte_add(self, bytes: usize) -> Self {
        Addr(self.0.wrapping_add(bytes))
    }

    pub fn as_ptr<T>(self) -> *mut T {
        self.0.cast()
    }
}

/// Bytes a tensor's elements may occupy: from its first element to one past its last, following
/// its strides (PyTorch strides are never negative). Empty for a tensor without elements.
pub fn span(t: &Tensor) -> Range<usize> {
    let start = t.data_ptr() as usize;
    let numel = t.numel();
    if numel == 0 {
        return start..start;
    }
    // The usual case, without reading sizes and strides (this runs per tensor on every step).
    if t.is_contiguous() {
        return start..start + numel * t.kind().elt_size_in_bytes();
    }
    let last: i64 = t
        .size()
        .iter()
        .zip(t.stride())
        .map(|(n, s)| (n - 1) * s)
        .sum();
    start..start + (last as usize + 1) * t.kind().elt_size_in_bytes()
}

/// Whether every span in `writes` is disjoint from every other write and from every read
/// (reads may overlap each other). O((r + w) log(r + w)): the check runs on every step.
pub fn writes_are_disjoint(reads: &[Range<usize>], writes: &[Range<usize>]) -> bool {
    // Reads merged into disjoint intervals; a write must then not touch any other interval.
    let mut spans: Vec<Range<usize>> = reads.iter().filter(|r| !r.is_empty()).cloned().collect();
    spans.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<usize>> = Vec::with_capacity(spans.len());
    for r in spans {
        match merged.last_mut() {
            Some(m) if r.start < m.end => m.end = m.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged.extend(writes.iter().filter(|w| !w.is_empty()).cloned());
    merged.sort_by_key(|r| r.start);
    merged.windows(2).all(|pair| pair[0].end <= pair[1].start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn spans_follow_strides() {
        let t = Tensor::zeros([3, 4], (Kind::Float, Device::Cpu));
        let s = span(&t);
        assert_eq!(s.end - s.start, 48);
        let col = t.narrow(1, 1, 1); // 3 elements, stride 4
        let c = span(&col);
        assert_eq!(c.start, s.start + 4);
        assert_eq!(c.end - c.start, (2 * 4 + 1) * 4);
    }

    #[test]
    fn overlapping_writes_are_found() {
        let reads = [0..10, 5..20, 40..50];
        assert!(writes_are_disjoint(&reads, &[20..30, 30..40]));
        assert!(
            !writes_are_disjoint(&reads, std::slice::from_ref(&(19..25))),
            "write into a read"
        );
        assert!(
            !writes_are_disjoint(&reads, std::slice::from_ref(&(41..42))),
            "write inside a read"
        );
        assert!(
            !writes_are_disjoint(&reads, &[20..30, 25..35]),
            "two writes"
        );
        assert!(
            writes_are_disjoint(&reads, std::slice::from_ref(&(50..50))),
            "empty writes touch nothing"
        );
    }
}
