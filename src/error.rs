//! The library's error type.

use thiserror::Error;

/// Everything the memtel library can refuse.
///
/// Sources never produce errors: what the platform cannot tell is `None` in the
/// [`Snapshot`](crate::Snapshot). Errors are for invalid input from the caller.
#[derive(Debug, Error, Clone, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// Thresholds must satisfy `0 < warning < critical <= 1`.
    #[error("invalid thresholds: warning {warning} and critical {critical} must satisfy 0 < warning < critical <= 1")]
    InvalidThresholds {
        /// The warning threshold given.
        warning: f64,
        /// The critical threshold given.
        critical: f64,
    },
    /// A component name must be 1 to 64 characters of `[A-Za-z0-9_.-]`.
    #[error("invalid component name {0:?}: expected 1 to 64 characters of letters, digits, '_', '.' or '-'")]
    InvalidComponentName(String),
    /// `other` is the heap remainder that memtel computes; it cannot be registered.
    #[error("component name {0:?} is reserved for the heap remainder")]
    ReservedComponentName(String),
    /// Each component name can be registered once.
    #[error("component {0:?} is already registered")]
    DuplicateComponent(String),
    /// The number of components is bounded so that metric attribute sets stay bounded.
    #[error("too many components: at most {max} can be registered")]
    TooManyComponents {
        /// The bound.
        max: usize,
    },
    /// A history configuration that cannot work (see [`History::new`](crate::history::History::new)).
    #[error("invalid history: {0}")]
    InvalidHistory(String),
}
