//! The pipelined transport of [`crate::ArcusClient`] (`ClientOptions::pipeline`): each node's
//! requests go over a small fixed number of long-lived connections instead of one pooled
//! connection per request in flight.
//!
//! Per connection, a writer task takes requests from a bounded queue and coalesces whatever
//! is queued into one socket write; a reader task reads the replies in order and hands each to
//! the request waiting for it. The reader learns what to expect from the writer (in request
//! order) before the bytes are written, so a reply never arrives for an unknown request.
//!
//! In step with the server, always: a caller that times out or is cancelled only stops waiting;
//! its reply is still read and dropped. A reply that does not come within twice `op_timeout`
//! (the connection looks dead: every caller waiting on it has timed out by then), an I/O
//! error, or a reply that leaves the connection out of step (an error line where a data block or
//! `END` may follow) closes the connection, and every request in flight on it fails with an
//! error that says so. The next request opens a new connection; other connections and nodes
//! are not touched. A full queue makes callers wait, within their `op_timeout`.

use crate::connection::{ConnError, ConnResult, Connection, ReplyReader};
use crate::error::{Error, Result};
use crate::protocol::{self, Item, StoreCommand, StoreStatus};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{mpsc, oneshot, Notify};

/// Settings of the pipelined transport (see [`crate::ClientOptions::pipeline`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PipelineOptions {
    /// Connections per node; requests are spread over them round-robin. Default 1 (as the
    /// Java client: one connection per node).
    pub connections_per_node: usize,
    /// Requests waiting to be written, per connection, at most; callers beyond it wait for
    /// room (within `op_timeout`). Default 4096.
    pub queue_per_connection: usize,
    /// Requests written and waiting for their reply, per connection, at most. Default 1024.
    pub max_in_flight: usize,
}

impl Default for PipelineOptions {
    fn default() -> Self {
        PipelineOptions {
            connections_per_node: 1,
            queue_per_connection: 4096,
            max_in_flight: 1024,
        }
    }
}

/// A command of the key-value API, before encoding.
pub(crate) enum Cmd<'a> {
    /// `get`/`gets` of one key.
    One { key: &'a str, with_cas: bool },
    /// `get`/`gets` of several keys.
    Many { keys: &'a [&'a str], with_cas: bool },
    Store {
        cmd: StoreCommand,
        key: &'a str,
        flags: u32,
        exptime: i64,
        data: &'a [u8],
    },
    /// A one-line command answered by one of two lines (`delete`, `touch`).
    YesNo {
        words: &'a [&'a str],
        ok: &'static [u8],
        missing: &'static [u8],
    },
    /// `incr`/`decr`.
    Arith { words: &'a [&'a str] },
}

impl Cmd<'_> {
    fn encode(&self, buf: &mut Vec<u8>) {
        match *self {
            Cmd::One { key, with_cas } => protocol::encode_retrieve(buf, with_cas, [key]),
            Cmd::Many { keys, with_cas } => {
                protocol::encode_retrieve(buf, with_cas, keys.iter().copied())
            }
            Cmd::Store {
                cmd,
                key,
                flags,
                exptime,
                data,
            } => protocol::encode_store(buf, cmd, key, flags, exptime, data),
            Cmd::YesNo { words, .. } | Cmd::Arith { words } => protocol::encode_line(buf, words),
        }
    }

    fn shape(&self) -> Shape {
        match *self {
            Cmd::One { .. } => Shape::One,
            Cmd::Many { .. } => Shape::Many,
            Cmd::Store { .. } => Shape::Store,
            Cmd::YesNo { ok, missing, .. } => Shape::YesNo { ok, missing },
            Cmd::Arith { .. } => Shape::Arith,
        }
    }
}

/// What the reader expects for one request.
#[derive(Clone, Copy, Debug)]
enum Shape {
    One,
    Many,
    Store,
    YesNo {
        ok: &'static [u8],
        missing: &'static [u8],
    },
    Arith,
}

impl Shape {
    /// Whether the connection is still in step after error `e` in this reply: one error line
    /// in place of a one-line reply is; so is `SERVER_ERROR` for a storage command (memcached
    /// swallows the data block first). After an error line in a `get` reply (a data block or
    /// `END` may follow) or a `CLIENT_ERROR` for a storage command (the server may read the
    /// data block as commands) it is not.
    fn in_step_after(self, e: &ConnError) -> bool {
        match (self, e) {
            (_, ConnError::Io(_) | ConnError::Protocol(_)) => false,
            (Shape::YesNo { .. } | Shape::Arith, ConnError::Server(_)) => true,
            (Shape::Store, ConnError::Server(m)) => m.starts_with("SERVER_ERROR"),
            (Shape::One | Shape::Many, ConnError::Server(_)) => false,
        }
    }
}

/// A parsed reply.
#[derive(Debug)]
pub(crate) enum Reply {
    One(Option<Item>),
    Many(Vec<(String, Item)>),
    Store(StoreStatus),
    Bool(bool),
    Number(Option<u64>),
}

impl Cmd<'_> {
    /// Runs this command on a pooled connection (the non-pipelined transport).
    pub(crate) async fn run_on(&self, c: &mut Connection) -> ConnResult<Reply> {
        match *self {
            Cmd::One { key, with_cas } => {
                let mut out = None;
                c.retrieve(&[key], with_cas, |_, item| out = Some(item))
                    .await?;
                Ok(Reply::One(out))
            }
            Cmd::Many { keys, with_cas } => {
                let mut found = Vec::with_capacity(keys.len());
                c.retrieve(keys, with_cas, |k, item| found.push((k.to_string(), item)))
                    .await?;
                Ok(Reply::Many(found))
            }
            Cmd::Store {
                cmd,
                key,
                flags,
                exptime,
                data,
            } => c
                .store(cmd, key, flags, exptime, data)
                .await
                .map(Reply::Store),
            Cmd::YesNo { words, ok, missing } => {
                c.yes_no(words, ok, missing).await.map(Reply::Bool)
            }
            Cmd::Arith { words } => c.arith(words).await.map(Reply::Number),
        }
    }
}

async fn read_reply(r: &mut ReplyReader, shape: Shape) -> ConnResult<Reply> {
    Ok(match shape {
        Shape::One => {
            let mut out = None;
            r.read_values(|_, item| out = Some(item)).await?;
            Reply::One(out)
        }
        Shape::Many => {
            let mut found = Vec::new();
            r.read_values(|k, item| found.push((k.to_string(), item)))
                .await?;
            Reply::Many(found)
        }
        Shape::Store => Reply::Store(r.read_store_status().await?),
        Shape::YesNo { ok, missing } => Reply::Bool(r.read_yes_no(ok, missing).await?),
        Shape::Arith => Reply::Number(r.read_arith().await?),
    })
}

type ReplyTx = oneshot::Sender<ConnResult<Reply>>;

/// A request queued for the writer.
struct Request {
    bytes: Vec<u8>,
    shape: Shape,
    reply: ReplyTx,
}

/// A request written (or about to be), waiting for its reply.
struct Pending {
    shape: Shape,
    reply: ReplyTx,
}

/// Largest coalesced write, in bytes (a single larger request is written alone).
const MAX_BATCH: usize = 64 * 1024;

/// Bounds the transport takes from the client's options.
#[derive(Clone, Debug)]
pub(crate) struct Bounds {
    pub connect_timeout: Duration,
    pub op_timeout: Duration,
    pub read_buffer: usize,
}

/// The pipelined connections to one node.
pub(crate) struct PipelinedNode {
    addr: String,
    opts: PipelineOptions,
    bounds: Bounds,
    lanes: Vec<Lane>,
    next: AtomicUsize,
}

impl std::fmt::Debug for PipelinedNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipelinedNode")
            .field("addr", &self.addr)
            .field("opts", &self.opts)
            .finish()
    }
}

/// One connection slot: the live connection, replaced when it breaks.
#[derive(Default)]
struct Lane {
    live: Mutex<Option<Arc<LaneConn>>>,
    /// Held while connecting, so a broken lane is reopened once, not by every caller.
    connecting: tokio::sync::Mutex<()>,
}

/// A live pipelined connection: its request queue and its state.
struct LaneConn {
    queue: mpsc::Sender<Request>,
    state: Arc<LaneState>,
}

/// Shared by a connection's writer and reader.
#[derive(Default)]
struct LaneState {
    broken: AtomicBool,
    /// Wakes the writer when the reader closes the connection.
    stop: Notify,
}

impl LaneState {
    fn close(&self) {
        self.broken.store(true, Ordering::Release);
        self.stop.notify_one();
    }
}

impl LaneConn {
    fn usable(&self) -> bool {
        !self.state.broken.load(Ordering::Acquire) && !self.queue.is_closed()
    }
}

impl PipelinedNode {
    pub(crate) fn new(addr: String, opts: PipelineOptions, bounds: Bounds) -> PipelinedNode {
        let lanes = (0..opts.connections_per_node.max(1))
            .map(|_| Lane::default())
            .collect();
        PipelinedNode {
            addr,
            opts,
            bounds,
            lanes,
            next: AtomicUsize::new(0),
        }
    }

    /// Connections open and usable now (diagnostics and tests).
    pub(crate) fn open_connections(&self) -> usize {
        self.lanes.iter().filter(|l| l.current().is_some()).count()
    }

    /// Sends `cmd` and waits for its reply, all within `op_timeout`. Errors name the node
    /// and `op`.
    pub(crate) async fn call(&self, op: &'static str, cmd: &Cmd<'_>) -> Result<Reply> {
        let timeout = self.bounds.op_timeout;
        match tokio::time::timeout(timeout, self.exchange(cmd)).await {
            Ok(Ok(r)) => r.map_err(|e| e.at(&self.addr, op)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::Timeout {
                node: self.addr.clone(),
                op,
                timeout,
            }),
        }
    }

    /// The outer error is a failed connect; the inner one the exchange's.
    async fn exchange(&self, cmd: &Cmd<'_>) -> Result<ConnResult<Reply>> {
        let n = self.next.fetch_add(1, Ordering::Relaxed) % self.lanes.len();
        let conn = self.lanes[n].conn(self).await?;
        let mut bytes = Vec::with_capacity(64);
        cmd.encode(&mut bytes);
        let (reply, rx) = oneshot::channel();
        let request = Request {
            bytes,
            shape: cmd.shape(),
            reply,
        };
        if conn.queue.send(request).await.is_err() {
            return Ok(Err(lost(
                "the connection closed before the request was sent",
            )));
        }
        drop(conn);
        Ok(rx
            .await
            .unwrap_or_else(|_| Err(lost("the connection closed before the request was sent"))))
    }
}

impl Lane {
    fn current(&self) -> Option<Arc<LaneConn>> {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.as_ref().filter(|c| c.usable()).cloned()
    }

    /// The live connection, opened (again) if there is none or it broke.
    async fn conn(&self, node: &PipelinedNode) -> Result<Arc<LaneConn>> {
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let _connecting = self.connecting.lock().await;
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let b = &node.bounds;
        let conn = Connection::connect(&node.addr, b.connect_timeout, b.read_buffer).await?;
        let c = Arc::new(start(conn, &node.opts, b.op_timeout * 2));
        *self.live.lock().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
        Ok(c)
    }
}

/// An I/O error for requests that lost their connection.
fn lost(why: &str) -> ConnError {
    ConnError::Io(std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        why.to_string(),
    ))
}

/// Starts the writer and reader tasks of a new connection.
fn start(conn: Connection, opts: &PipelineOptions, stall: Duration) -> LaneConn {
    let (reader, writer) = conn.into_split();
    let (queue, requests) = mpsc::channel(opts.queue_per_connection.max(1));
    let (pending_tx, pending_rx) = mpsc::channel(opts.max_in_flight.max(1));
    let state = Arc::new(LaneState::default());
    tokio::spawn(write_loop(requests, pending_tx, writer, state.clone()));
    tokio::spawn(read_loop(pending_rx, reader, stall, state.clone()));
    LaneConn { queue, state }
}

/// Takes queued requests, registers each with the reader, and writes them in batches. Ends
/// when every sender is gone (the lane was replaced or the client dropped), when the reader
/// closes the connection, or on a write error.
async fn write_loop(
    mut requests: mpsc::Receiver<Request>,
    pending: mpsc::Sender<Pending>,
    mut w: OwnedWriteHalf,
    state: Arc<LaneState>,
) {
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut carry: Option<Request> = None;
    loop {
        let first = match carry.take() {
            Some(r) => r,
            None => tokio::select! {
                r = requests.recv() => match r {
                    Some(r) => r,
                    None => return,
                },
                _ = state.stop.notified() => return,
            },
        };
        buf.clear();
        if !first.reply.is_closed() {
            // Everything before is written: waiting for room in flight cannot deadlock.
            let Ok(slot) = pending.reserve().await else {
                return;
            };
            buf.extend_from_slice(&first.bytes);
            slot.send(Pending {
                shape: first.shape,
                reply: first.reply,
            });
        }
        carry = coalesce(&mut requests, &pending, &mut buf);
        if buf.is_empty() {
            continue;
        }
        let written = tokio::select! {
            r = w.write_all(&buf) => r,
            _ = state.stop.notified() => return,
        };
        if written.is_err() {
            // The reader fails what is in flight when the server closes, or on its deadline.
            state.close();
            return;
        }
    }
}

/// Adds queued requests to `buf` up to [`MAX_BATCH`], skipping those whose caller stopped
/// waiting; returns a request that found no room in flight (it leads the next batch).
fn coalesce(
    requests: &mut mpsc::Receiver<Request>,
    pending: &mpsc::Sender<Pending>,
    buf: &mut Vec<u8>,
) -> Option<Request> {
    while buf.len() < MAX_BATCH {
        let Ok(req) = requests.try_recv() else {
            return None;
        };
        if req.reply.is_closed() {
            continue;
        }
        match pending.try_reserve() {
            Ok(slot) => {
                buf.extend_from_slice(&req.bytes);
                slot.send(Pending {
                    shape: req.shape,
                    reply: req.reply,
                });
            }
            Err(_) => return Some(req),
        }
    }
    None
}

/// Reads replies in request order and hands each to its caller (dropped if the caller is gone).
/// Closes the connection on a failure that leaves it out of step, or when a reply takes longer
/// than `stall`; every request then in flight fails.
async fn read_loop(
    mut pending: mpsc::Receiver<Pending>,
    mut r: ReplyReader,
    stall: Duration,
    state: Arc<LaneState>,
) {
    let deadline = tokio::time::sleep(stall);
    tokio::pin!(deadline);
    let why = loop {
        let Some(p) = pending.recv().await else {
            return; // the writer ended and every reply was read
        };
        deadline.as_mut().reset(tokio::time::Instant::now() + stall);
        let read = tokio::select! {
            biased;
            r = read_reply(&mut r, p.shape) => r,
            _ = &mut deadline => {
                let why = format!("no reply within {stall:?}");
                let _ = p.reply.send(Err(lost(&format!("{why}; connection closed"))));
                break why;
            }
        };
        match read {
            Ok(reply) => {
                let _ = p.reply.send(Ok(reply));
            }
            Err(e) if p.shape.in_step_after(&e) => {
                let _ = p.reply.send(Err(e));
            }
            Err(e) => {
                let why = conn_error_text(&e);
                let _ = p.reply.send(Err(e));
                break why;
            }
        }
    };
    state.close();
    pending.close();
    let msg = format!("connection closed while the request was in flight ({why})");
    while let Some(p) = pending.recv().await {
        let _ = p.reply.send(Err(lost(&msg)));
    }
}

fn conn_error_text(e: &ConnError) -> String {
    match e {
        ConnError::Io(e) => e.to_string(),
        ConnError::Server(m) => format!("server answered {m:?}"),
        ConnError::Protocol(m) => format!("unexpected reply {m:?}"),
    }
}
