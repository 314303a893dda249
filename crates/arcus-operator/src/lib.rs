//! ARCUS operator library.
