//! One error type for the crate; `lib.rs` maps it to Python exceptions.

use std::fmt;

#[derive(Debug)]
pub enum EwcError {
    /// The caller passed something wrong (maps to `ValueError`).
    Value(String),
    /// The caller passed a tensor of the wrong type or dtype (maps to `TypeError`).
    Type(String),
    /// libtorch failed; the string says where (maps to `RuntimeError`).
    Torch(String, tch::TchError),
    /// The CUDA kernel failed to launch (maps to `RuntimeError`).
    Cuda(String),
}

pub type Result<T> = std::result::Result<T, EwcError>;

impl fmt::Display for EwcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EwcError::Value(m) | EwcError::Type(m) => write!(f, "{m}"),
            EwcError::Cuda(m) => write!(f, "ewc_rs CUDA kernel: {m}"),
            EwcError::Torch(ctx, e) => write!(f, "{ctx}: {e}"),
        }
    }
}

impl From<tch::TchError> for EwcError {
    fn from(e: tch::TchError) -> Self {
        EwcError::Torch("libtorch error".to_string(), e)
    }
}

/// Adds context to a libtorch error (`op.ctx("linear rule")?`).
pub trait Context<T> {
    fn ctx(self, what: &str) -> Result<T>;
}

impl<T> Context<T> for std::result::Result<T, tch::TchError> {
    fn ctx(self, what: &str) -> Result<T> {
        self.map_err(|e| EwcError::Torch(what.to_string(), e))
    }
}

/// Shorthand for a `ValueError`.
pub fn value_err<T>(msg: impl Into<String>) -> Result<T> {
    Err(EwcError::Value(msg.into()))
}
