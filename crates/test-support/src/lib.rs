//! Helpers for this workspace's tests: real processes (ZooKeeper, memcached) started on
//! loopback and stopped by PID, the sandbox cluster, and bounded waits.
//! Nothing here is part of the product.

pub mod memcached;
pub mod operator;
pub mod process;
pub mod sandbox;
pub mod wait;
pub mod zk_server;

pub use process::ChildGuard;
pub use wait::wait_until;
