//! The `memtel` service binary's own modules.

pub(crate) mod demo;
pub(crate) mod diagnostics;
pub(crate) mod limits;
pub(crate) mod pipeline;
pub(crate) mod settings;
