//! The Fisher engine: which scalars to differentiate for each Fisher kind (`roots`), the
//! per-layer rules that turn layer gradients into per-sample squared gradients (`rules`), and
//! the driver that runs the backward passes and accumulates (`driver`).

pub mod driver;
pub mod roots;
pub mod rules;
