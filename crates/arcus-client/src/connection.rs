//! The workspace's one connection layer for the ascii protocol: a TCP connection to one node
//! ([`Connection`]), a bounded pool of them ([`NodePool`]), and pools keyed by address
//! ([`NodePools`]). [`crate::ArcusClient`], [`crate::AdminClient`] and the operator's cache
//! migration all run their commands through it.
//!
//! A command's request is encoded into [`Connection::request`] and written while its reply is
//! read ([`Connection::exchange`]), so a pipeline of many commands never deadlocks on full
//! socket buffers whatever the value sizes. A connection is returned to its pool only after a
//! complete, well-formed exchange; any error, timeout or cancellation drops it, so a pooled
//! connection is never out of step with its server.

use crate::error::{Error, Result};
use crate::protocol::{self, Item, StoreCommand, StoreStatus};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, SemaphorePermit};

/// What went wrong in one exchange, before it is tied to a node and an operation (the pool
/// does that, giving an [`Error`] whose source is the I/O error, if any).
#[derive(Debug)]
pub enum ConnError {
    Io(std::io::Error),
    /// An error reply line (`ERROR`, `CLIENT_ERROR ...`, `SERVER_ERROR ...`) where none is
    /// expected.
    Server(String),
    /// A reply that does not fit the command.
    Protocol(String),
}

impl From<std::io::Error> for ConnError {
    fn from(e: std::io::Error) -> Self {
        ConnError::Io(e)
    }
}

impl ConnError {
    /// A reply line that does not fit the command.
    pub fn unexpected(line: &[u8]) -> ConnError {
        ConnError::Protocol(lossy(line))
    }

    /// An error reply line.
    pub fn server(line: &[u8]) -> ConnError {
        ConnError::Server(lossy(line))
    }

    /// The error of operation `op` on `node`.
    pub(crate) fn at(self, node: &str, op: &'static str) -> Error {
        let node = node.to_string();
        match self {
            ConnError::Io(source) => Error::Io { node, op, source },
            ConnError::Server(message) => Error::Server { node, op, message },
            ConnError::Protocol(response) => Error::Protocol { node, op, response },
        }
    }

    pub(crate) fn closed() -> ConnError {
        ConnError::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed by the server",
        ))
    }
}

pub type ConnResult<T> = std::result::Result<T, ConnError>;

/// A reply line for an error message: at most 200 bytes, lossy UTF-8.
fn lossy(line: &[u8]) -> String {
    const MAX: usize = 200;
    let s = String::from_utf8_lossy(&line[..line.len().min(MAX)]).into_owned();
    if line.len() > MAX {
        s + "..."
    } else {
        s
    }
}

/// The outcome of one storage command inside a pipeline: the status, or the error line the
/// server answered for that command alone (e.g. `SERVER_ERROR out of memory storing object`).
pub type StoreReply = std::result::Result<StoreStatus, String>;

/// One storage command of a pipeline ([`Connection::store_many`]).
#[derive(Clone, Copy, Debug)]
pub struct StoreOp<'a> {
    pub cmd: StoreCommand,
    pub key: &'a str,
    pub flags: u32,
    pub exptime: i64,
    pub data: &'a [u8],
}

/// The reading side of a connection: reply lines, data blocks, raw bytes.
pub struct ReplyReader {
    stream: BufReader<OwnedReadHalf>,
    line: Vec<u8>,
}

impl ReplyReader {
    /// Reads one reply line, without its CRLF.
    pub async fn read_line(&mut self) -> ConnResult<&[u8]> {
        self.line.clear();
        let n = self.stream.read_until(b'\n', &mut self.line).await?;
        if n == 0 || self.line.last() != Some(&b'\n') {
            return Err(ConnError::closed());
        }
        self.line.pop();
        if self.line.last() == Some(&b'\r') {
            self.line.pop();
        }
        Ok(&self.line)
    }

    /// Reads a reply line and turns an error reply into [`ConnError::Server`].
    pub async fn read_reply(&mut self) -> ConnResult<&[u8]> {
        let line = self.read_line().await?;
        if protocol::is_error_reply(line) {
            return Err(ConnError::server(line));
        }
        Ok(line)
    }

    /// Reads a `len`-byte data block and its trailing CRLF.
    pub async fn read_data(&mut self, len: usize) -> ConnResult<Vec<u8>> {
        let mut data = vec![0u8; len + 2];
        self.stream.read_exact(&mut data).await?;
        if &data[len..] != b"\r\n" {
            return Err(ConnError::Protocol(
                "data block not terminated by CRLF".into(),
            ));
        }
        data.truncate(len);
        Ok(data)
    }

    /// Whatever bytes have arrived (at least one), for replies that are cut by the lengths
    /// inside them rather than by lines (ARCUS collection element lists).
    pub async fn read_some(&mut self) -> ConnResult<Vec<u8>> {
        let chunk = self.stream.fill_buf().await?.to_vec();
        if chunk.is_empty() {
            return Err(ConnError::closed());
        }
        self.stream.consume(chunk.len());
        Ok(chunk)
    }

    /// `VALUE ...` items up to `END`; calls `found` for each.
    pub(crate) async fn read_values(
        &mut self,
        mut found: impl FnMut(&str, Item),
    ) -> ConnResult<()> {
        loop {
            let line = self.read_reply().await?;
            if line == b"END" {
                return Ok(());
            }
            let Some(h) = protocol::parse_value_header(line) else {
                return Err(ConnError::unexpected(line));
            };
            let (key, flags, len, cas) = (h.key.to_string(), h.flags, h.len, h.cas);
            let value = self.read_data(len).await?;
            found(&key, Item { value, flags, cas });
        }
    }

    /// One reply of a pipelined storage command. A `SERVER_ERROR` concerns that command alone;
    /// any other error reply (a `CLIENT_ERROR` may mean the server lost track of the data
    /// block) fails the whole exchange.
    pub(crate) async fn read_store_reply(&mut self) -> ConnResult<StoreReply> {
        let line = self.read_line().await?;
        if let Some(s) = protocol::parse_store_reply(line) {
            Ok(Ok(s))
        } else if line.starts_with(b"SERVER_ERROR") {
            Ok(Err(lossy(line)))
        } else if protocol::is_error_reply(line) {
            Err(ConnError::server(line))
        } else {
            Err(ConnError::unexpected(line))
        }
    }

    /// The reply of a storage command: its status (an error line is [`ConnError::Server`]).
    pub(crate) async fn read_store_status(&mut self) -> ConnResult<StoreStatus> {
        let line = self.read_reply().await?;
        protocol::parse_store_reply(line).ok_or_else(|| ConnError::unexpected(line))
    }

    /// A reply that is one of `ok`/`missing` (e.g. `DELETED`/`NOT_FOUND`).
    pub(crate) async fn read_yes_no(&mut self, ok: &[u8], missing: &[u8]) -> ConnResult<bool> {
        let line = self.read_reply().await?;
        if line == ok {
            Ok(true)
        } else if line == missing {
            Ok(false)
        } else {
            Err(ConnError::unexpected(line))
        }
    }

    /// The reply of `incr`/`decr`: the new value, or `None` for `NOT_FOUND`.
    pub(crate) async fn read_arith(&mut self) -> ConnResult<Option<u64>> {
        let line = self.read_reply().await?;
        if line == b"NOT_FOUND" {
            return Ok(None);
        }
        // memcached pads a decremented value with trailing spaces in place.
        std::str::from_utf8(line)
            .ok()
            .and_then(|s| s.trim_end().parse().ok())
            .map(Some)
            .ok_or_else(|| ConnError::unexpected(line))
    }
}

/// One TCP connection to one node.
pub struct Connection {
    reader: ReplyReader,
    writer: OwnedWriteHalf,
    wbuf: Vec<u8>,
}

impl Connection {
    /// Connects to `addr` within `timeout`; `read_buffer` is the reply buffer's size.
    pub(crate) async fn connect(
        addr: &str,
        timeout: Duration,
        read_buffer: usize,
    ) -> Result<Connection> {
        let connect_error = |source| Error::Connect {
            node: addr.to_string(),
            source,
        };
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => return Err(connect_error(source)),
            Err(_) => {
                return Err(connect_error(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {timeout:?}"),
                )))
            }
        };
        let _ = stream.set_nodelay(true);
        let (r, w) = stream.into_split();
        Ok(Connection {
            reader: ReplyReader {
                stream: BufReader::with_capacity(read_buffer, r),
                line: Vec::with_capacity(256),
            },
            writer: w,
            wbuf: Vec::with_capacity(256),
        })
    }

    /// The request buffer, cleared: encode into it, then [`Connection::exchange`] (or
    /// [`Connection::flush_request`] and read the reply).
    pub fn request(&mut self) -> &mut Vec<u8> {
        self.wbuf.clear();
        &mut self.wbuf
    }

    /// Writes the request buffer.
    pub async fn flush_request(&mut self) -> ConnResult<()> {
        self.writer.write_all(&self.wbuf).await?;
        Ok(())
    }

    /// Writes the request buffer while `read` reads the reply: a long pipeline cannot stall on
    /// a server that stops reading until its replies are read.
    pub async fn exchange<T>(
        &mut self,
        read: impl AsyncFnOnce(&mut ReplyReader) -> ConnResult<T>,
    ) -> ConnResult<T> {
        let Connection {
            reader,
            writer,
            wbuf,
        } = self;
        let write = async { writer.write_all(wbuf).await.map_err(ConnError::Io) };
        let (written, read) = tokio::join!(write, read(reader));
        written?;
        read
    }

    pub async fn send_line(&mut self, words: &[&str]) -> ConnResult<()> {
        protocol::encode_line(self.request(), words);
        self.flush_request().await
    }

    /// Reads one reply line, without its CRLF.
    pub async fn read_line(&mut self) -> ConnResult<&[u8]> {
        self.reader.read_line().await
    }

    /// Reads a reply line and turns an error reply into [`ConnError::Server`].
    pub async fn read_reply(&mut self) -> ConnResult<&[u8]> {
        self.reader.read_reply().await
    }

    /// A one-line command and its one-line answer, error replies included (for the caller to
    /// judge), as text.
    pub async fn request_line(&mut self, words: &[&str]) -> ConnResult<String> {
        self.send_line(words).await?;
        let line = self.read_line().await?;
        Ok(String::from_utf8_lossy(line).into_owned())
    }

    /// `get`/`gets` for `keys`; calls `found` for each item returned.
    pub async fn retrieve(
        &mut self,
        keys: &[&str],
        with_cas: bool,
        found: impl FnMut(&str, Item),
    ) -> ConnResult<()> {
        protocol::encode_retrieve(self.request(), with_cas, keys.iter().copied());
        self.exchange(async |r| r.read_values(found).await).await
    }

    /// `gets k1 k2 ...`: the items found, by key.
    pub async fn gets_many(&mut self, keys: &[&str]) -> ConnResult<HashMap<String, Item>> {
        let mut found = HashMap::with_capacity(keys.len());
        if !keys.is_empty() {
            self.retrieve(keys, true, |k, item| {
                found.insert(k.to_string(), item);
            })
            .await?;
        }
        Ok(found)
    }

    pub async fn store(
        &mut self,
        cmd: StoreCommand,
        key: &str,
        flags: u32,
        exptime: i64,
        data: &[u8],
    ) -> ConnResult<StoreStatus> {
        protocol::encode_store(self.request(), cmd, key, flags, exptime, data);
        self.flush_request().await?;
        self.reader.read_store_status().await
    }

    /// The storage commands of `ops`, pipelined: one reply per command, in order. A
    /// `CLIENT_ERROR` reply fails the batch as a whole (the server may have lost track of a data
    /// block; the pool then drops the connection).
    pub async fn store_many(&mut self, ops: &[StoreOp<'_>]) -> ConnResult<Vec<StoreReply>> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let buf = self.request();
        for op in ops {
            protocol::encode_store(buf, op.cmd, op.key, op.flags, op.exptime, op.data);
        }
        self.exchange(async |r| {
            let mut replies = Vec::with_capacity(ops.len());
            for _ in ops {
                replies.push(r.read_store_reply().await?);
            }
            Ok(replies)
        })
        .await
    }

    /// `stats [section]`: every `STAT <name> <value>` line up to `END`.
    pub async fn stats(&mut self, section: Option<&str>) -> ConnResult<BTreeMap<String, String>> {
        let mut words = vec!["stats"];
        words.extend(section);
        self.send_line(&words).await?;
        let mut map = BTreeMap::new();
        loop {
            let line = self.read_reply().await?;
            if line == b"END" {
                return Ok(map);
            }
            let (k, v) =
                protocol::parse_stat_line(line).ok_or_else(|| ConnError::unexpected(line))?;
            map.insert(k, v);
        }
    }

    /// Sends a one-line command and expects one of `ok`/`missing` (e.g. `DELETED`/`NOT_FOUND`).
    pub(crate) async fn yes_no(
        &mut self,
        words: &[&str],
        ok: &[u8],
        missing: &[u8],
    ) -> ConnResult<bool> {
        self.send_line(words).await?;
        self.reader.read_yes_no(ok, missing).await
    }

    /// `incr`/`decr`: the new value, or `None` for `NOT_FOUND`.
    pub(crate) async fn arith(&mut self, words: &[&str]) -> ConnResult<Option<u64>> {
        self.send_line(words).await?;
        self.reader.read_arith().await
    }

    /// The two halves, for a pipelined connection ([`crate::pipeline`]): replies are read by
    /// one task while another writes requests.
    pub(crate) fn into_split(self) -> (ReplyReader, OwnedWriteHalf) {
        (self.reader, self.writer)
    }
}

/// Bounds of one node's pool.
#[derive(Clone, Debug)]
pub struct PoolLimits {
    /// Connections open at once at most (more operations wait for a free one).
    pub max_connections: usize,
    /// Bound of one TCP connect.
    pub connect_timeout: Duration,
    /// Bound of one operation: waiting for a connection, connecting, the exchange.
    pub op_timeout: Duration,
    /// Size of each connection's reply buffer, in bytes.
    pub read_buffer: usize,
}

impl Default for PoolLimits {
    /// 32 connections, 1 s to connect and per operation, 16 KiB buffers (the client's defaults).
    fn default() -> Self {
        PoolLimits {
            max_connections: 32,
            connect_timeout: Duration::from_secs(1),
            op_timeout: Duration::from_secs(1),
            read_buffer: 16 * 1024,
        }
    }
}

/// A bounded pool of connections to one node.
pub struct NodePool {
    addr: String,
    limits: PoolLimits,
    idle: Mutex<Vec<Connection>>,
    permits: Semaphore,
}

impl std::fmt::Debug for NodePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodePool")
            .field("addr", &self.addr)
            .field("limits", &self.limits)
            .finish()
    }
}

impl NodePool {
    pub fn new(addr: impl Into<String>, limits: PoolLimits) -> NodePool {
        let permits = Semaphore::new(limits.max_connections.clamp(1, Semaphore::MAX_PERMITS));
        NodePool {
            addr: addr.into(),
            limits,
            idle: Mutex::new(Vec::new()),
            permits,
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn limits(&self) -> &PoolLimits {
        &self.limits
    }

    /// Runs `f` on a pooled connection (reused or new) within the operation timeout, waiting
    /// for a free slot and connecting included. On success the connection goes back to the
    /// pool; on any error, timeout or cancellation it is closed. Errors name the node and `op`.
    pub async fn run<T>(
        &self,
        op: &'static str,
        f: impl AsyncFnOnce(&mut Connection) -> ConnResult<T>,
    ) -> Result<T> {
        self.bounded(op, async {
            let mut pc = self.checkout().await?;
            let value = self.tie(op, f(&mut pc).await)?;
            pc.release();
            Ok(value)
        })
        .await
    }

    /// Like [`NodePool::run`] on a fresh connection that is closed afterwards (for commands
    /// that must be alone on their connection or leave odd trailing bytes).
    pub async fn run_alone<T>(
        &self,
        op: &'static str,
        f: impl AsyncFnOnce(&mut Connection) -> ConnResult<T>,
    ) -> Result<T> {
        self.bounded(op, async {
            let _permit = self.permit().await;
            let mut conn = self.connect().await?;
            self.tie(op, f(&mut conn).await)
        })
        .await
    }

    /// The outcome of an exchange of `op` on this node.
    fn tie<T>(&self, op: &'static str, r: ConnResult<T>) -> Result<T> {
        r.map_err(|e| e.at(&self.addr, op))
    }

    /// `work` within the operation timeout.
    async fn bounded<T>(
        &self,
        op: &'static str,
        work: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let timeout = self.limits.op_timeout;
        tokio::time::timeout(timeout, work)
            .await
            .unwrap_or_else(|_| {
                Err(Error::Timeout {
                    node: self.addr.clone(),
                    op,
                    timeout,
                })
            })
    }

    async fn permit(&self) -> SemaphorePermit<'_> {
        self.permits
            .acquire()
            .await
            .expect("pool semaphore is never closed")
    }

    async fn connect(&self) -> Result<Connection> {
        Connection::connect(
            &self.addr,
            self.limits.connect_timeout,
            self.limits.read_buffer,
        )
        .await
    }

    /// Waits for a free slot, then reuses an idle connection or opens one.
    async fn checkout(&self) -> Result<PooledConnection<'_>> {
        let permit = self.permit().await;
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match idle {
            Some(c) => c,
            None => self.connect().await?,
        };
        Ok(PooledConnection {
            conn: Some(conn),
            pool: self,
            _permit: permit,
        })
    }

    /// Number of idle connections (for tests and diagnostics).
    pub fn idle_count(&self) -> usize {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// A checked-out connection. Dropped without [`PooledConnection::release`], the connection is
/// closed rather than returned.
struct PooledConnection<'p> {
    conn: Option<Connection>,
    pool: &'p NodePool,
    _permit: SemaphorePermit<'p>,
}

impl PooledConnection<'_> {
    fn release(mut self) {
        if let Some(c) = self.conn.take() {
            self.pool
                .idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(c);
        }
    }
}

impl std::ops::Deref for PooledConnection<'_> {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn
            .as_ref()
            .expect("connection present until release")
    }
}

impl std::ops::DerefMut for PooledConnection<'_> {
    fn deref_mut(&mut self) -> &mut Connection {
        self.conn
            .as_mut()
            .expect("connection present until release")
    }
}

/// One [`NodePool`] per node address, made on first use, all with the same limits.
#[derive(Debug)]
pub struct NodePools {
    limits: PoolLimits,
    pools: Mutex<HashMap<String, Arc<NodePool>>>,
}

impl NodePools {
    pub fn new(limits: PoolLimits) -> NodePools {
        NodePools {
            limits,
            pools: Mutex::new(HashMap::new()),
        }
    }

    /// The pool of `addr`.
    pub fn pool(&self, addr: &str) -> Arc<NodePool> {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        let pool = pools
            .entry(addr.to_string())
            .or_insert_with(|| Arc::new(NodePool::new(addr, self.limits.clone())));
        Arc::clone(pool)
    }

    /// [`NodePool::run`] on the pool of `addr`.
    pub async fn run<T>(
        &self,
        addr: &str,
        op: &'static str,
        f: impl AsyncFnOnce(&mut Connection) -> ConnResult<T>,
    ) -> Result<T> {
        self.pool(addr).run(op, f).await
    }
}
