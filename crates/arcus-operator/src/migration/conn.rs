//! A pipelining connection to one cache node, and a small pool of them.
//!
//! The migration moves keys in batches: one `gets k1 .. kn` for up to `batch` keys, then the
//! storage commands of the whole batch written at once and their replies read in order. Writing
//! and reading run at the same time (`tokio::join!` over the two socket halves), so a batch can
//! never deadlock on full socket buffers whatever the value sizes.
//!
//! Requests are encoded with `arcus_client::protocol` (the workspace's one ascii encoder).
//! A connection that saw an I/O error, a timeout or a reply it could not place is dropped, never
//! returned to its pool, so a pooled connection is never out of step with its server.

use arcus_client::protocol::{self, Item, StoreCommand, StoreStatus};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use super::MigrationError;

/// What went wrong on a connection; turned into [`MigrationError::Node`] with the node and op.
#[derive(Debug)]
pub(crate) enum ConnError {
    Io(std::io::Error),
    /// An error reply (`ERROR`, `CLIENT_ERROR ...`, `SERVER_ERROR ...`) where none is expected.
    Server(String),
    /// A reply that does not fit the command.
    Protocol(String),
}

impl From<std::io::Error> for ConnError {
    fn from(e: std::io::Error) -> Self {
        ConnError::Io(e)
    }
}

impl std::fmt::Display for ConnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnError::Io(e) => write!(f, "connection failed: {e}"),
            ConnError::Server(m) => write!(f, "server answered {m:?}"),
            ConnError::Protocol(m) => write!(f, "unexpected reply {m:?}"),
        }
    }
}

pub(crate) type ConnResult<T> = Result<T, ConnError>;

pub(crate) fn lossy(line: &[u8]) -> String {
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
pub(crate) type StoreReply = Result<StoreStatus, String>;

/// One storage command of a pipeline.
pub(crate) struct StoreOp<'a> {
    pub cmd: StoreCommand,
    pub key: &'a str,
    pub flags: u32,
    pub exptime: i64,
    pub data: &'a [u8],
}

/// The `exptime` that makes a stored item expired at once on stock memcached and ARCUS alike:
/// a value over 30 days is an absolute unix time, and one at or before the server's start makes
/// `realtime()` answer 1, which is already past. (`-1` would mean "sticky" on ARCUS, so negative
/// values are not portable.) `cas <key> 0 EXPIRED_EXPTIME 0 <unique>` is therefore a
/// compare-and-delete over the classic ascii protocol.
pub const EXPIRED_EXPTIME: i64 = 30 * 24 * 3600 + 1;

pub(crate) struct NodeConn {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    line: Vec<u8>,
    wbuf: Vec<u8>,
}

impl NodeConn {
    pub(crate) async fn connect(addr: &str) -> ConnResult<NodeConn> {
        let stream = TcpStream::connect(addr).await?;
        let _ = stream.set_nodelay(true);
        let (r, w) = stream.into_split();
        Ok(NodeConn {
            reader: BufReader::with_capacity(64 * 1024, r),
            writer: w,
            line: Vec::with_capacity(256),
            wbuf: Vec::with_capacity(16 * 1024),
        })
    }

    async fn read_line(
        reader: &mut BufReader<OwnedReadHalf>,
        line: &mut Vec<u8>,
    ) -> ConnResult<()> {
        line.clear();
        let n = reader.read_until(b'\n', line).await?;
        if n == 0 || line.last() != Some(&b'\n') {
            return Err(ConnError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed by the server",
            )));
        }
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        Ok(())
    }

    async fn read_data(reader: &mut BufReader<OwnedReadHalf>, len: usize) -> ConnResult<Vec<u8>> {
        let mut data = vec![0u8; len + 2];
        reader.read_exact(&mut data).await?;
        if &data[len..] != b"\r\n" {
            return Err(ConnError::Protocol(
                "data block not terminated by CRLF".into(),
            ));
        }
        data.truncate(len);
        Ok(data)
    }

    /// `gets k1 k2 ...`: the items found, by key.
    pub(crate) async fn gets_many(&mut self, keys: &[&str]) -> ConnResult<HashMap<String, Item>> {
        let mut found = HashMap::with_capacity(keys.len());
        if keys.is_empty() {
            return Ok(found);
        }
        self.wbuf.clear();
        protocol::encode_retrieve(&mut self.wbuf, true, keys.iter().copied());
        self.writer.write_all(&self.wbuf).await?;
        loop {
            Self::read_line(&mut self.reader, &mut self.line).await?;
            if self.line == b"END" {
                return Ok(found);
            }
            if protocol::is_error_reply(&self.line) {
                return Err(ConnError::Server(lossy(&self.line)));
            }
            let Some(h) = protocol::parse_value_header(&self.line) else {
                return Err(ConnError::Protocol(lossy(&self.line)));
            };
            let (key, flags, len, cas) = (h.key.to_string(), h.flags, h.len, h.cas);
            let value = Self::read_data(&mut self.reader, len).await?;
            found.insert(key, Item { value, flags, cas });
        }
    }

    /// The storage commands of `ops`, written at once; one reply per command, in order.
    /// A `CLIENT_ERROR` reply means the server may have lost track of the data block: the batch
    /// fails as a whole (and the connection is dropped by the caller).
    pub(crate) async fn store_many(&mut self, ops: &[StoreOp<'_>]) -> ConnResult<Vec<StoreReply>> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        self.wbuf.clear();
        for op in ops {
            protocol::encode_store(
                &mut self.wbuf,
                op.cmd,
                op.key,
                op.flags,
                op.exptime,
                op.data,
            );
        }
        let NodeConn {
            reader,
            writer,
            line,
            wbuf,
        } = self;
        let write = async {
            writer.write_all(wbuf).await?;
            Ok::<(), ConnError>(())
        };
        let read = async {
            let mut replies = Vec::with_capacity(ops.len());
            for _ in 0..ops.len() {
                Self::read_line(reader, line).await?;
                if let Some(s) = protocol::parse_store_reply(line) {
                    replies.push(Ok(s));
                } else if line.starts_with(b"SERVER_ERROR") {
                    replies.push(Err(lossy(line)));
                } else if protocol::is_error_reply(line) {
                    return Err(ConnError::Server(lossy(line)));
                } else {
                    return Err(ConnError::Protocol(lossy(line)));
                }
            }
            Ok(replies)
        };
        let (w, r) = tokio::join!(write, read);
        w?;
        r
    }

    /// One command line, one reply line (error replies included, for the caller to judge).
    pub(crate) async fn request_line(&mut self, words: &[&str]) -> ConnResult<String> {
        self.wbuf.clear();
        protocol::encode_line(&mut self.wbuf, words);
        self.writer.write_all(&self.wbuf).await?;
        Self::read_line(&mut self.reader, &mut self.line).await?;
        Ok(String::from_utf8_lossy(&self.line).into_owned())
    }

    /// A raw request (already encoded) whose reply is read by `read`.
    pub(crate) async fn raw<T>(
        &mut self,
        request: &[u8],
        read: impl AsyncFnOnce(&mut ReplyReader<'_>) -> ConnResult<T>,
    ) -> ConnResult<T> {
        let NodeConn {
            reader,
            writer,
            line,
            ..
        } = self;
        let write = async {
            writer.write_all(request).await?;
            Ok::<(), ConnError>(())
        };
        let mut rr = ReplyReader { reader, line };
        let (w, r) = tokio::join!(write, read(&mut rr));
        w?;
        r
    }

    /// `stats`: every `STAT name value` up to `END`.
    pub(crate) async fn stats(&mut self) -> ConnResult<HashMap<String, String>> {
        self.wbuf.clear();
        protocol::encode_line(&mut self.wbuf, &["stats"]);
        self.writer.write_all(&self.wbuf).await?;
        let mut map = HashMap::new();
        loop {
            Self::read_line(&mut self.reader, &mut self.line).await?;
            if self.line == b"END" {
                return Ok(map);
            }
            match protocol::parse_stat_line(&self.line) {
                Some((k, v)) => {
                    map.insert(k, v);
                }
                None => return Err(ConnError::Protocol(lossy(&self.line))),
            }
        }
    }
}

/// Reads the reply of a raw request: lines and length-prefixed data.
pub(crate) struct ReplyReader<'a> {
    reader: &'a mut BufReader<OwnedReadHalf>,
    line: &'a mut Vec<u8>,
}

impl ReplyReader<'_> {
    pub(crate) async fn line(&mut self) -> ConnResult<&[u8]> {
        NodeConn::read_line(self.reader, self.line).await?;
        Ok(self.line)
    }

    /// Whatever bytes are available (at least one; an error at end of stream).
    pub(crate) async fn some_bytes(&mut self) -> ConnResult<Vec<u8>> {
        let chunk = self.reader.fill_buf().await?.to_vec();
        if chunk.is_empty() {
            return Err(ConnError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed by the server",
            )));
        }
        self.reader.consume(chunk.len());
        Ok(chunk)
    }
}

/// A few connections to one node, reused across batches.
pub(crate) struct NodePool {
    addr: String,
    timeout: Duration,
    idle: Mutex<Vec<NodeConn>>,
}

impl NodePool {
    pub(crate) fn new(addr: &str, timeout: Duration) -> NodePool {
        NodePool {
            addr: addr.to_string(),
            timeout,
            idle: Mutex::new(Vec::new()),
        }
    }

    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    /// Runs `f` on a connection (reused or new) within the pool's per-operation timeout. On
    /// success the connection goes back to the pool; on any error or timeout it is closed.
    pub(crate) async fn run<T>(
        &self,
        op: &'static str,
        f: impl AsyncFnOnce(&mut NodeConn) -> ConnResult<T>,
    ) -> Result<T, MigrationError> {
        let work = async {
            let idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let mut conn = match idle {
                Some(c) => c,
                None => NodeConn::connect(&self.addr).await?,
            };
            let v = f(&mut conn).await?;
            self.idle
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(conn);
            Ok::<T, ConnError>(v)
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(MigrationError::Node {
                node: self.addr.clone(),
                op,
                message: e.to_string(),
            }),
            Err(_) => Err(MigrationError::Node {
                node: self.addr.clone(),
                op,
                message: format!("timed out after {:?}", self.timeout),
            }),
        }
    }
}
