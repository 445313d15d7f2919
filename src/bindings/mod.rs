//! What crosses between Python and Rust: the typed boundary of the Fisher engine (`fisher`), the
//! penalty's entry points (`penalty`), merging (`merge`), Fisher statistics as numpy arrays
//! (`summary`), and the mapping of crate errors to Python exceptions.

pub mod cuda;
pub mod fisher;
pub mod fisher8;
pub mod kfac;
pub mod merge;
pub mod penalty;
pub mod summary;

use crate::error::EwcError;
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::PyErr;

impl From<EwcError> for PyErr {
    fn from(e: EwcError) -> PyErr {
        match e {
            EwcError::Value(m) => PyValueError::new_err(m),
            EwcError::Type(m) => PyTypeError::new_err(m),
            e @ (EwcError::Torch(..) | EwcError::Cuda(_)) => PyRuntimeError::new_err(e.to_string()),
        }
    }
}
