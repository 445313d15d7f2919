//! The Fisher engine: which scalars to differentiate for each Fisher kind (`roots`), the
//! per-layer rules that turn layer gradients into per-sample squared gradients (`rules`), the
//! driver that runs the backward passes and sums the squares (`driver`), and the chunked loops
//! they share (`chunks`).

pub mod chunks;
pub mod driver;
pub mod roots;
pub mod rules;
