//! Admin commands against one cache node, by address, without ZooKeeper: the one place in the
//! workspace that speaks ARCUS's (and stock memcached's) admin ascii commands. The operator
//! uses it for readiness, memory limits, ensemble moves and key listing.
//!
//! Each call is bounded by the helper's timeout. One connection is kept and reused; it is
//! dropped after any error or timeout and reopened on the next call.

use crate::connection::{ConnError, ConnResult, Connection, NodePool, PoolLimits};
use crate::error::{Error, Result};
use crate::protocol::{self, ItemType, MetadumpEntry, ScannedKey};
use std::collections::BTreeMap;
use std::time::Duration;

/// Answer to `ready`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// `READY`: joined the cluster (or not using ZooKeeper).
    Ready,
    /// `NOT_READY`: an ARCUS node that is not (or no longer) registered in ZooKeeper.
    NotReady,
    /// The server does not know `ready` (stock memcached answers `ERROR`).
    Unsupported,
}

impl Readiness {
    pub fn is_ready(self) -> bool {
        self == Readiness::Ready
    }
}

/// Options of `scan key`.
#[derive(Clone, Debug, Default)]
pub struct ScanOptions {
    /// 1..=2000; the server's default (20) when `None`.
    pub count: Option<u32>,
    /// Glob pattern (`*`, `?`, `\`).
    pub pattern: Option<String>,
    pub item_type: Option<ItemType>,
}

/// One page of `scan key`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScanPage {
    pub keys: Vec<ScannedKey>,
    /// Cursor for the next call; `"0"` when the scan is complete.
    pub next_cursor: String,
}

impl ScanPage {
    pub fn is_last(&self) -> bool {
        self.next_cursor == "0"
    }
}

/// `lru_crawler metadump all` walks the LRUs, and can miss an item that moves to an LRU already
/// walked (it happens under writes: likely the one update never carried over in a million keys
/// at 16→32 in the large-cluster benchmark). `metadump hash` walks the hash table instead, but
/// memcached 1.6.18 holds an item lock while it waits for a reader that pauses (ours does, a
/// chunk ahead at most, to stay bounded): our own `gets` on that node then wait for the dump
/// and the dump for us (seen: `gets` timing out at 1M keys in bench-migration). So `all`.
const METADUMP_MODE: &str = "all";

/// An `lru_crawler metadump` being read ([`AdminClient::metadump_stream`]).
pub struct MetadumpStream {
    node: String,
    timeout: Duration,
    /// `None` once the dump ended (`END`) or broke (an error or timeout mid-line).
    conn: Option<Connection>,
    /// The line read when starting, not yet returned.
    first: Option<Vec<u8>>,
}

impl std::fmt::Debug for MetadumpStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetadumpStream")
            .field("node", &self.node)
            .field("open", &self.conn.is_some())
            .finish()
    }
}

impl MetadumpStream {
    /// Up to `max` more entries; `None` once the dump is complete. Fails on a broken dump
    /// (connection closed before `END`, a malformed line, a batch slower than the timeout);
    /// after a failure the stream is closed and every later call fails too: start over.
    pub async fn next_batch(&mut self, max: usize) -> Result<Option<Vec<MetadumpEntry>>> {
        const OP: &str = "lru_crawler metadump";
        let Some(mut conn) = self.conn.take() else {
            return match self.first {
                Some(_) => Err(Error::Protocol {
                    node: self.node.clone(),
                    op: OP,
                    response: "the dump broke earlier; start a new one".into(),
                }),
                None => Ok(None),
            };
        };
        let first = self.first.take();
        let read = async {
            let mut batch = Vec::with_capacity(max.min(16_384));
            if let Some(line) = &first {
                if !push_metadump_line(&mut batch, line)? {
                    return Ok((batch, true));
                }
            }
            while batch.len() < max.max(1) {
                let line = conn.read_reply().await?;
                if !push_metadump_line(&mut batch, line)? {
                    return Ok((batch, true));
                }
            }
            Ok::<_, ConnError>((batch, false))
        };
        let outcome = match tokio::time::timeout(self.timeout, read).await {
            Ok(r) => r.map_err(|e| e.at(&self.node, OP)),
            Err(_) => Err(Error::Timeout {
                node: self.node.clone(),
                op: OP,
                timeout: self.timeout,
            }),
        };
        match outcome {
            Ok((batch, ended)) => {
                if !ended {
                    self.conn = Some(conn);
                }
                Ok((!batch.is_empty() || !ended).then_some(batch))
            }
            Err(e) => {
                // Remembered as broken: `first` marks "not ended cleanly".
                self.first = Some(Vec::new());
                Err(e)
            }
        }
    }
}

/// Starts a metadump on `conn` ([`METADUMP_MODE`]) and returns its first line, which tells a
/// dump (an entry, or END for an empty cache) from BUSY.
async fn start_metadump_on(conn: &mut Connection) -> ConnResult<Vec<u8>> {
    conn.send_line(&["lru_crawler", "metadump", METADUMP_MODE])
        .await?;
    match conn.read_reply().await {
        Ok(l) if l.starts_with(b"BUSY") => Err(ConnError::server(l)),
        Ok(l) => Ok(l.to_vec()),
        Err(e) => Err(e),
    }
}

/// Adds one metadump line to `batch`; `false` at `END`.
fn push_metadump_line(batch: &mut Vec<MetadumpEntry>, line: &[u8]) -> ConnResult<bool> {
    if line == b"END" {
        return Ok(false);
    }
    match protocol::parse_metadump_line(line) {
        Some(e) => {
            batch.push(e);
            Ok(true)
        }
        None => Err(ConnError::unexpected(line)),
    }
}

/// Admin helper for one node.
pub struct AdminClient {
    /// One connection at most, kept between calls.
    pool: NodePool,
}

impl std::fmt::Debug for AdminClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminClient")
            .field("addr", &self.pool.addr())
            .field("timeout", &self.pool.limits().op_timeout)
            .finish()
    }
}

/// Default bound of one admin command.
pub const DEFAULT_ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// One command-line word: non-empty, no spaces or control bytes (they would split or end the
/// command line).
fn check_word(what: &str, word: &str) -> Result<()> {
    if word.is_empty() || word.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(Error::InvalidArgument(format!(
            "{what} {word:?} must be non-empty, without spaces or control characters"
        )));
    }
    Ok(())
}

/// A bare `ERROR` (or `ERROR unknown command`) to an admin command: the server does not know it.
fn unsupported(e: Error) -> Error {
    match e {
        Error::Server { node, op, message } if protocol::is_unknown_command(message.as_bytes()) => {
            Error::Unsupported {
                node,
                command: op.to_string(),
                answer: message,
            }
        }
        e => e,
    }
}

impl AdminClient {
    /// An admin helper for the node at `addr` (`ip:port`); nothing is connected yet.
    pub fn new(addr: impl Into<String>) -> AdminClient {
        AdminClient::with_timeout(addr, DEFAULT_ADMIN_TIMEOUT)
    }

    pub fn with_timeout(addr: impl Into<String>, timeout: Duration) -> AdminClient {
        let limits = PoolLimits {
            max_connections: 1,
            connect_timeout: timeout,
            op_timeout: timeout,
            ..PoolLimits::default()
        };
        AdminClient {
            pool: NodePool::new(addr, limits),
        }
    }

    pub fn addr(&self) -> &str {
        self.pool.addr()
    }

    /// Runs `f` on the kept connection (opened if needed) within the timeout.
    async fn run<T>(
        &self,
        op: &'static str,
        f: impl AsyncFnOnce(&mut Connection) -> ConnResult<T>,
    ) -> Result<T> {
        self.pool.run(op, f).await.map_err(unsupported)
    }

    /// Like [`AdminClient::run`] on a fresh connection that is closed afterwards (for commands
    /// that must be alone on their connection or leave odd trailing bytes).
    async fn run_alone<T>(
        &self,
        op: &'static str,
        f: impl AsyncFnOnce(&mut Connection) -> ConnResult<T>,
    ) -> Result<T> {
        self.pool.run_alone(op, f).await.map_err(unsupported)
    }

    /// A number the server answered for `config <name>`.
    async fn config_number(&self, name: &str) -> Result<u64> {
        let v = self.config(name).await?;
        v.parse().map_err(|_| Error::Protocol {
            node: self.addr().to_string(),
            op: "config",
            response: v,
        })
    }

    /// Sends `words` and expects exactly the line `expect`.
    async fn expect_line(
        &self,
        op: &'static str,
        words: &[&str],
        expect: &'static [u8],
    ) -> Result<()> {
        self.run(op, async |c| {
            c.send_line(words).await?;
            let line = c.read_reply().await?;
            if line == expect {
                Ok(())
            } else {
                Err(ConnError::unexpected(line))
            }
        })
        .await
    }

    /// `stats [section]`: every `STAT <name> <value>` line up to `END`.
    /// Sections: `None` (general), `settings`, `zookeeper` (ARCUS), `scrub` (ARCUS), `slabs`, ...
    pub async fn stats(&self, section: Option<&str>) -> Result<BTreeMap<String, String>> {
        self.run("stats", async |c| c.stats(section).await).await
    }

    /// `ready`: ARCUS's readiness probe. Stock memcached does not know it: `Unsupported`.
    pub async fn ready(&self) -> Result<Readiness> {
        self.run("ready", async |c| {
            c.send_line(&["ready"]).await?;
            let line = c.read_line().await?;
            let r = match line {
                b"READY" => Readiness::Ready,
                b"NOT_READY" => Readiness::NotReady,
                l if protocol::is_unknown_command(l) => Readiness::Unsupported,
                l => return Err(ConnError::unexpected(l)),
            };
            Ok(r)
        })
        .await
    }

    /// `config <name>`: reads an ARCUS run-time setting (`memlimit`, `maxconns`, `zkfailstop`,
    /// `hbtimeout`, `hbfailstop`, `verbosity`, ...). The server answers `<name> <value>` + `END`.
    pub async fn config(&self, name: &str) -> Result<String> {
        check_word("config name", name)?;
        self.run("config", async |c| {
            c.send_line(&["config", name]).await?;
            let line = c.read_reply().await?;
            let text = String::from_utf8_lossy(line).into_owned();
            let value = match text.split_once(' ') {
                Some((n, v)) if n == name => v.to_string(),
                _ => return Err(ConnError::Protocol(text)),
            };
            match c.read_reply().await? {
                b"END" => Ok(value),
                l => Err(ConnError::unexpected(l)),
            }
        })
        .await
    }

    /// `config <name> <value>`: changes an ARCUS run-time setting (answer `END`).
    pub async fn set_config(&self, name: &str, value: &str) -> Result<()> {
        check_word("config name", name)?;
        check_word("config value", value)?;
        self.expect_line("config", &["config", name, value], b"END")
            .await
    }

    /// `config memlimit`: the memory limit in MB.
    pub async fn memlimit(&self) -> Result<u64> {
        self.config_number("memlimit").await
    }

    /// `config memlimit <MB>` (ARCUS). Stock memcached: [`AdminClient::cache_memlimit`].
    pub async fn set_memlimit(&self, mb: u64) -> Result<()> {
        self.set_config("memlimit", &mb.to_string()).await
    }

    /// `config maxconns`.
    pub async fn maxconns(&self) -> Result<u64> {
        self.config_number("maxconns").await
    }

    /// `config maxconns <n>` (ARCUS).
    pub async fn set_maxconns(&self, n: u64) -> Result<()> {
        self.set_config("maxconns", &n.to_string()).await
    }

    /// `cache_memlimit <MB>`: stock memcached's run-time memory limit (answer `OK`).
    pub async fn cache_memlimit(&self, mb: u64) -> Result<()> {
        self.expect_line(
            "cache_memlimit",
            &["cache_memlimit", &mb.to_string()],
            b"OK",
        )
        .await
    }

    /// `zkensemble get`: the ensemble the node uses (`host:port,...`).
    pub async fn zkensemble_get(&self) -> Result<String> {
        // The server follows the address with "\r\n\n\r\n"; a fresh connection that is closed
        // afterwards keeps those extra bytes from confusing the next command.
        self.run_alone("zkensemble get", async |c| {
            c.send_line(&["zkensemble", "get"]).await?;
            let line = c.read_reply().await?;
            Ok(String::from_utf8_lossy(line).into_owned())
        })
        .await
    }

    /// `zkensemble set <host:port,...>`: moves the node to another ensemble (answer `OK`).
    pub async fn zkensemble_set(&self, ensemble: &str) -> Result<()> {
        check_word("ensemble", ensemble)?;
        self.expect_line("zkensemble set", &["zkensemble", "set", ensemble], b"OK")
            .await
    }

    /// `zkensemble rejoin`: re-registers a node that left the cluster.
    pub async fn zkensemble_rejoin(&self) -> Result<()> {
        self.expect_line(
            "zkensemble rejoin",
            &["zkensemble", "rejoin"],
            b"Successfully rejoined",
        )
        .await
    }

    /// `scan key <cursor> [count <n>] [match <glob>] [type <T>]`: one page of keys (ARCUS).
    /// Start with cursor `"0"`; the scan is done when [`ScanPage::is_last`].
    pub async fn scan_keys(&self, cursor: &str, opts: &ScanOptions) -> Result<ScanPage> {
        if let Some(n) = opts.count {
            if !(1..=2000).contains(&n) {
                return Err(Error::InvalidArgument(format!(
                    "scan count {n} is not in 1..=2000"
                )));
            }
        }
        check_word("scan cursor", cursor)?;
        if let Some(p) = &opts.pattern {
            check_word("scan pattern", p)?;
        }
        let count = opts.count.map(|n| n.to_string());
        let type_letter = opts.item_type.map(|t| t.letter().to_string());
        let mut words = vec!["scan", "key", cursor];
        if let Some(n) = &count {
            words.extend(["count", n]);
        }
        if let Some(p) = &opts.pattern {
            words.extend(["match", p]);
        }
        if let Some(t) = &type_letter {
            words.extend(["type", t]);
        }
        self.run("scan key", async |c| {
            c.send_line(&words).await?;
            let line = c.read_reply().await?;
            let Some((n, next_cursor)) = protocol::parse_scan_header(line) else {
                return Err(ConnError::unexpected(line));
            };
            let mut keys = Vec::with_capacity(n);
            for _ in 0..n {
                let line = c.read_reply().await?;
                match protocol::parse_scan_item(line) {
                    Some(k) => keys.push(k),
                    None => return Err(ConnError::unexpected(line)),
                }
            }
            match c.read_reply().await? {
                b"END" => Ok(ScanPage { keys, next_cursor }),
                l => Err(ConnError::unexpected(l)),
            }
        })
        .await
    }

    /// Every key via repeated `scan key` (ARCUS), `count` per page.
    pub async fn scan_all_keys(&self, opts: &ScanOptions) -> Result<Vec<ScannedKey>> {
        let mut cursor = "0".to_string();
        let mut all = Vec::new();
        loop {
            let page = self.scan_keys(&cursor, opts).await?;
            all.extend(page.keys);
            if page.next_cursor == "0" {
                return Ok(all);
            }
            cursor = page.next_cursor;
        }
    }

    /// `lru_crawler metadump all`: stock memcached's key listing. It must be alone on its
    /// connection, so it runs on a fresh one. A crawler already busy answers `BUSY ...`, reported
    /// as [`Error::Server`]; retry later.
    pub async fn metadump_all(&self) -> Result<Vec<MetadumpEntry>> {
        self.run_alone("lru_crawler metadump", async |c| {
            let first = start_metadump_on(c).await?;
            let mut entries = Vec::new();
            if !push_metadump_line(&mut entries, &first)? {
                return Ok(entries);
            }
            while push_metadump_line(&mut entries, c.read_reply().await?)? {}
            Ok(entries)
        })
        .await
    }

    /// `lru_crawler metadump all`, read incrementally: the entries come in batches
    /// ([`MetadumpStream::next_batch`]) so a dump of millions of items is never held whole.
    /// The dump has a connection of its own, held until the stream is dropped; memcached has
    /// one crawler, which waits (holding no item lock) while we do not read, so read it on.
    /// A crawler already busy answers `BUSY ...`, reported here as [`Error::Server`]; retry
    /// later. Each batch is bounded by this helper's timeout.
    pub async fn metadump_stream(&self) -> Result<MetadumpStream> {
        const OP: &str = "lru_crawler metadump";
        let limits = self.pool.limits();
        let timeout = limits.op_timeout;
        let node = self.addr().to_string();
        let start = async {
            let mut conn =
                Connection::connect(&node, limits.connect_timeout, limits.read_buffer).await?;
            let first = start_metadump_on(&mut conn)
                .await
                .map_err(|e| unsupported(e.at(&node, OP)))?;
            Ok::<_, Error>((conn, first))
        };
        let (conn, first) = tokio::time::timeout(timeout, start)
            .await
            .unwrap_or_else(|_| {
                Err(Error::Timeout {
                    node: node.clone(),
                    op: OP,
                    timeout,
                })
            })?;
        Ok(MetadumpStream {
            node,
            timeout,
            conn: Some(conn),
            first: Some(first),
        })
    }

    /// `shutdown [secs]`: ARCUS drains clients for up to `secs` (0..=600) and exits.
    /// Stock memcached answers an error unless started with `-A`.
    pub async fn shutdown(&self, secs: Option<u32>) -> Result<()> {
        let secs = secs.map(|s| s.to_string());
        let mut words = vec!["shutdown"];
        words.extend(secs.as_deref());
        // Stock memcached closes the connection without a reply; ARCUS answers OK.
        self.run_alone("shutdown", async |c| {
            c.send_line(&words).await?;
            match c.read_line().await {
                Ok(b"OK") => Ok(()),
                Ok(l) if protocol::is_error_reply(l) || l == b"DENIED" => Err(ConnError::server(l)),
                Ok(l) => Err(ConnError::unexpected(l)),
                Err(ConnError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(()),
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// `flush_all`: invalidates every item.
    pub async fn flush_all(&self) -> Result<()> {
        self.expect_line("flush_all", &["flush_all"], b"OK").await
    }

    /// `flush_prefix <prefix>` (ARCUS): invalidates the items of one key prefix; `false` when
    /// the prefix has no items.
    pub async fn flush_prefix(&self, prefix: &str) -> Result<bool> {
        check_word("prefix", prefix)?;
        self.run("flush_prefix", async |c| {
            c.send_line(&["flush_prefix", prefix]).await?;
            match c.read_reply().await? {
                b"OK" => Ok(true),
                b"NOT_FOUND" => Ok(false),
                l => Err(ConnError::unexpected(l)),
            }
        })
        .await
    }

    /// `version`.
    pub async fn version(&self) -> Result<String> {
        self.run("version", async |c| {
            c.send_line(&["version"]).await?;
            let line = c.read_reply().await?;
            match line.strip_prefix(b"VERSION ") {
                Some(v) => Ok(String::from_utf8_lossy(v).into_owned()),
                None => Err(ConnError::unexpected(line)),
            }
        })
        .await
    }
}
