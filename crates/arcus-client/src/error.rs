//! Errors: each says which node (or ZooKeeper ensemble) and what failed.

use std::time::Duration;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a key was refused before anything was sent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("key is empty")]
    Empty,
    #[error("key is {len} bytes, the maximum is {max}")]
    TooLong { len: usize, max: usize },
    #[error("key contains byte 0x{byte:02x} at offset {offset} (no spaces or control characters)")]
    InvalidByte { offset: usize, byte: u8 },
    #[error(
        "key prefix (before the first ':') may only hold letters, digits and _ - + . {{ }} and must not start with '-'"
    )]
    InvalidPrefix,
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey { key: String, reason: KeyError },

    #[error("value is {len} bytes, the maximum is {max} bytes (nothing was sent)")]
    ValueTooLarge { len: usize, max: usize },

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error("no cache node on the ring of service code {service_code:?}")]
    NoNodes { service_code: String },

    #[error("node {node}: connect failed: {source}")]
    Connect {
        node: String,
        #[source]
        source: std::io::Error,
    },

    #[error("node {node}: {op} timed out after {timeout:?} (node not answering)")]
    Timeout {
        node: String,
        op: &'static str,
        timeout: Duration,
    },

    #[error("node {node}: {op}: connection failed: {source}")]
    Io {
        node: String,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },

    /// The server answered `ERROR`, `CLIENT_ERROR ...` or `SERVER_ERROR ...`.
    #[error("node {node}: {op}: server answered {message:?}")]
    Server {
        node: String,
        op: &'static str,
        message: String,
    },

    /// The server does not know the command (stock memcached answers a bare `ERROR` to ARCUS-only
    /// commands such as `ready`, `config memlimit`, `zkensemble`, `scan`).
    #[error("node {node}: {command:?} is not supported by this server (answered {answer:?})")]
    Unsupported {
        node: String,
        command: String,
        answer: String,
    },

    #[error("node {node}: {op}: unexpected response {response:?}")]
    Protocol {
        node: String,
        op: &'static str,
        response: String,
    },

    #[error("unknown service code {service_code:?}: ZooKeeper {zk} has no {path}")]
    UnknownServiceCode {
        service_code: String,
        zk: String,
        path: String,
    },

    /// No session opened (or the first listing did not finish) in time; `source` is what the
    /// ZooKeeper client said when it gave up early.
    #[error("ZooKeeper {zk} unreachable: {reason}{}", caused_by(source))]
    ZkUnreachable {
        zk: String,
        reason: String,
        #[source]
        source: Option<zookeeper_client::Error>,
    },

    #[error("ZooKeeper {zk}: {op} {path}: {source}")]
    Zk {
        zk: String,
        op: &'static str,
        path: String,
        #[source]
        source: zookeeper_client::Error,
    },
}

/// `": <cause>"`, or nothing.
fn caused_by(source: &Option<zookeeper_client::Error>) -> String {
    source
        .as_ref()
        .map(|e| format!(": {e}"))
        .unwrap_or_default()
}

impl Error {
    /// The cache node the error is about, if any.
    pub fn node(&self) -> Option<&str> {
        match self {
            Error::Connect { node, .. }
            | Error::Timeout { node, .. }
            | Error::Io { node, .. }
            | Error::Server { node, .. }
            | Error::Unsupported { node, .. }
            | Error::Protocol { node, .. } => Some(node),
            _ => None,
        }
    }

    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }

    /// True for errors raised before anything was sent (bad key, value, argument).
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            Error::InvalidKey { .. } | Error::ValueTooLarge { .. } | Error::InvalidArgument(_)
        )
    }
}
