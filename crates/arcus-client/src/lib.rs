//! Async ARCUS client for tokio.
//!
//! - [`ring`]: the ketama ring, exactly as arcus-java-client builds it;
//! - [`protocol`]: the memcached ascii protocol (encoding, key rules, reply parsing).

mod error;
pub mod protocol;
pub mod ring;

pub use error::{Error, KeyError, Result};
pub use protocol::{Item, ItemType, MetadumpEntry, ScannedKey, StoreStatus};
pub use ring::Ring;
