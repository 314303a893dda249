//! Async ARCUS client for tokio.
//!
//! ARCUS is a memcached-based cache cluster: cache nodes register ephemeral znodes under
//! `/arcus/cache_list/<service code>` in ZooKeeper, and clients spread keys over them on a
//! ketama ring. This crate owns, for the whole workspace:
//! - [`ring`]: the ketama ring, exactly as arcus-java-client builds it;
//! - [`protocol`]: the memcached ascii protocol (encoding, key rules, reply parsing);
//! - [`connection`]: the one connection layer over it: a connection to one node, pipelined
//!   exchanges, bounded per-node pools and pools keyed by address (also used by the operator's
//!   cache migration);
//! - [`discovery`]: reading and watching the node list in ZooKeeper;
//! - [`ArcusClient`]: key-value operations over the ring, with per-node connection pools (or,
//!   with [`ClientOptions::pipeline`], requests pipelined over a few connections per node) and
//!   per-operation timeouts;
//! - [`admin`]: admin commands against one node by address (`stats`, `ready`, `config`,
//!   `zkensemble`, `scan`, `lru_crawler metadump`, ...), used by the operator.
//!
//! ```no_run
//! # async fn demo() -> arcus_client::Result<()> {
//! use arcus_client::{ArcusClient, ClientOptions};
//! let client = ArcusClient::connect("127.0.0.1:2181", "test", ClientOptions::default()).await?;
//! client.set("kubernetes:arcus", "hello arcus!", 0, 10).await?;
//! let item = client.get("kubernetes:arcus").await?;
//! assert_eq!(item.map(|i| i.value), Some(b"hello arcus!".to_vec()));
//! println!("{} nodes", client.ring().len());
//! # Ok(()) }
//! ```

pub mod admin;
mod client;
pub mod connection;
pub mod discovery;
mod error;
mod pipeline;
pub mod protocol;
pub mod ring;

pub use admin::{AdminClient, Readiness, ScanOptions, ScanPage};
pub use client::{ArcusClient, ClientOptions};
pub use connection::{NodePool, NodePools, PoolLimits};
pub use discovery::DiscoveryState;
pub use error::{Error, KeyError, Result};
pub use pipeline::PipelineOptions;
pub use protocol::{Item, ItemType, MetadumpEntry, ScannedKey, StoreStatus};
pub use ring::Ring;
