//! One TCP connection speaking the ascii protocol, and a bounded per-node pool of them.
//!
//! A connection is returned to its pool only after a complete, well-formed exchange; any error,
//! timeout or cancellation drops it, so a pooled connection is never out of step with its server.

use crate::error::{Error, Result};
use crate::protocol;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What went wrong on a connection, before it is tied to a node and an operation.
#[derive(Debug)]
pub(crate) enum ConnError {
    Io(std::io::Error),
    /// An error reply line (`ERROR`, `CLIENT_ERROR ...`, `SERVER_ERROR ...`).
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
    pub(crate) fn unexpected(line: &[u8]) -> ConnError {
        ConnError::Protocol(lossy(line))
    }

    /// An error reply line.
    pub(crate) fn server(line: &[u8]) -> ConnError {
        ConnError::Server(lossy(line))
    }

    pub(crate) fn at(self, node: &str, op: &'static str) -> Error {
        let node = node.to_string();
        match self {
            ConnError::Io(source) => Error::Io { node, op, source },
            ConnError::Server(message) => Error::Server { node, op, message },
            ConnError::Protocol(response) => Error::Protocol { node, op, response },
        }
    }
}

pub(crate) type ConnResult<T> = std::result::Result<T, ConnError>;

fn lossy(line: &[u8]) -> String {
    const MAX: usize = 200;
    let s = String::from_utf8_lossy(&line[..line.len().min(MAX)]).into_owned();
    if line.len() > MAX {
        s + "..."
    } else {
        s
    }
}

pub(crate) struct Connection {
    stream: BufReader<TcpStream>,
    line: Vec<u8>,
    wbuf: Vec<u8>,
}

impl Connection {
    pub(crate) async fn connect(addr: &str, timeout: Duration) -> Result<Connection> {
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => {
                return Err(Error::Connect {
                    node: addr.to_string(),
                    source,
                })
            }
            Err(_) => {
                let source = std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("no answer within {timeout:?}"),
                );
                return Err(Error::Connect {
                    node: addr.to_string(),
                    source,
                });
            }
        };
        let _ = stream.set_nodelay(true);
        Ok(Connection {
            stream: BufReader::with_capacity(16 * 1024, stream),
            line: Vec::with_capacity(256),
            wbuf: Vec::with_capacity(256),
        })
    }

    /// The request buffer, cleared: encode into it, then [`Connection::flush_request`].
    pub(crate) fn request(&mut self) -> &mut Vec<u8> {
        self.wbuf.clear();
        &mut self.wbuf
    }

    pub(crate) async fn flush_request(&mut self) -> ConnResult<()> {
        self.stream.get_mut().write_all(&self.wbuf).await?;
        Ok(())
    }

    pub(crate) async fn send_line(&mut self, words: &[&str]) -> ConnResult<()> {
        protocol::encode_line(self.request(), words);
        self.flush_request().await
    }

    /// Reads one reply line, without its CRLF.
    pub(crate) async fn read_line(&mut self) -> ConnResult<&[u8]> {
        self.line.clear();
        let n = self.stream.read_until(b'\n', &mut self.line).await?;
        if n == 0 || self.line.last() != Some(&b'\n') {
            return Err(ConnError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed by the server",
            )));
        }
        self.line.pop();
        if self.line.last() == Some(&b'\r') {
            self.line.pop();
        }
        Ok(&self.line)
    }

    /// Reads a reply line and turns an error reply into [`ConnError::Server`].
    pub(crate) async fn read_reply(&mut self) -> ConnResult<&[u8]> {
        let line = self.read_line().await?;
        if protocol::is_error_reply(line) {
            return Err(ConnError::server(line));
        }
        Ok(line)
    }

    /// Reads a `len`-byte data block and its trailing CRLF.
    async fn read_data(&mut self, len: usize) -> ConnResult<Vec<u8>> {
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

    /// `get`/`gets` for `keys`; calls `found` for each item returned.
    pub(crate) async fn retrieve(
        &mut self,
        keys: &[&str],
        with_cas: bool,
        mut found: impl FnMut(&str, protocol::Item),
    ) -> ConnResult<()> {
        protocol::encode_retrieve(self.request(), with_cas, keys.iter().copied());
        self.flush_request().await?;
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
            found(&key, protocol::Item { value, flags, cas });
        }
    }

    pub(crate) async fn store(
        &mut self,
        cmd: protocol::StoreCommand,
        key: &str,
        flags: u32,
        exptime: i64,
        data: &[u8],
    ) -> ConnResult<protocol::StoreStatus> {
        protocol::encode_store(self.request(), cmd, key, flags, exptime, data);
        self.flush_request().await?;
        let line = self.read_reply().await?;
        protocol::parse_store_reply(line).ok_or_else(|| ConnError::unexpected(line))
    }

    /// Sends a one-line command and expects one of `ok`/`missing` (e.g. `DELETED`/`NOT_FOUND`).
    pub(crate) async fn yes_no(
        &mut self,
        words: &[&str],
        ok: &[u8],
        missing: &[u8],
    ) -> ConnResult<bool> {
        self.send_line(words).await?;
        let line = self.read_reply().await?;
        if line == ok {
            Ok(true)
        } else if line == missing {
            Ok(false)
        } else {
            Err(ConnError::unexpected(line))
        }
    }

    /// `incr`/`decr`: the new value, or `None` for `NOT_FOUND`.
    pub(crate) async fn arith(&mut self, words: &[&str]) -> ConnResult<Option<u64>> {
        self.send_line(words).await?;
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

/// Bounds for one node's pool.
#[derive(Clone, Debug)]
pub(crate) struct PoolLimits {
    pub max_connections: usize,
    pub connect_timeout: Duration,
}

/// A bounded pool of connections to one node.
pub(crate) struct NodePool {
    addr: String,
    limits: PoolLimits,
    idle: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
}

impl NodePool {
    pub(crate) fn new(addr: impl Into<String>, limits: PoolLimits) -> NodePool {
        let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
        NodePool {
            addr: addr.into(),
            limits,
            idle: Mutex::new(Vec::new()),
            permits,
        }
    }

    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    /// Waits for a free slot, then reuses an idle connection or opens one. The caller bounds
    /// the wait with its operation timeout.
    pub(crate) async fn checkout(self: &Arc<Self>) -> Result<PooledConnection> {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("pool semaphore is never closed");
        let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let conn = match idle {
            Some(c) => c,
            None => Connection::connect(&self.addr, self.limits.connect_timeout).await?,
        };
        Ok(PooledConnection {
            conn: Some(conn),
            pool: Arc::clone(self),
            _permit: permit,
        })
    }

    /// Number of idle connections (for tests and diagnostics).
    pub(crate) fn idle_count(&self) -> usize {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// A checked-out connection. Dropped without [`PooledConnection::release`], the connection is
/// closed rather than returned.
pub(crate) struct PooledConnection {
    conn: Option<Connection>,
    pool: Arc<NodePool>,
    _permit: OwnedSemaphorePermit,
}

impl PooledConnection {
    pub(crate) fn release(mut self) {
        if let Some(c) = self.conn.take() {
            self.pool
                .idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(c);
        }
    }
}

impl std::ops::Deref for PooledConnection {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        self.conn
            .as_ref()
            .expect("connection present until release")
    }
}

impl std::ops::DerefMut for PooledConnection {
    fn deref_mut(&mut self) -> &mut Connection {
        self.conn
            .as_mut()
            .expect("connection present until release")
    }
}

/// Runs `op` on a pooled connection of `pool` within `timeout` (waiting for a slot and
/// connecting included). On success the connection goes back to the pool.
pub(crate) async fn with_connection<T>(
    pool: &Arc<NodePool>,
    op: &'static str,
    timeout: Duration,
    f: impl AsyncFnOnce(&mut Connection) -> ConnResult<T>,
) -> Result<T> {
    let work = async {
        let mut pc = pool.checkout().await?;
        let r = f(&mut pc).await.map_err(|e| e.at(pool.addr(), op))?;
        pc.release();
        Ok(r)
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(Error::Timeout {
            node: pool.addr().to_string(),
            op,
            timeout,
        }),
    }
}
