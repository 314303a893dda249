//! ARCUS operator library.

pub mod crd;
pub mod validate;
pub mod build;
