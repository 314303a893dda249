//! The line-aware proxy in front of stock memcached: clients connect to the stand-in's TCP port,
//! every byte goes on to memcached's private unix socket unchanged, except the ARCUS admin
//! commands stock memcached does not know (`ready`, `zkensemble ...`, `config zkfailstop`), which
//! the stand-in answers.
//!
//! Order is kept under pipelining: for an intercepted command the proxy sends memcached the meta
//! no-op `mn` as a barrier and queues the command; when memcached's `MN` for that barrier comes
//! back (after the answers of everything sent before it), the proxy writes the local answer in
//! its place. A client's own `mn` queues a pass-through marker in the same FIFO.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UnixStream};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

/// Bytes read per `read` call (and the write buffers' size).
const CHUNK: usize = 64 * 1024;
/// A request line longer than this without `\n` cannot be one we intercept (or a valid storage
/// command line): it is streamed on to memcached, which decides (it allows huge multi-gets).
const MAX_LINE: usize = 8 * 1024;
/// Same for response lines: only `MN`, `VALUE` and `VA` lines are inspected, all short.
const MAX_RESPONSE_LINE: usize = 64 * 1024;
/// memcached's KEY_MAX_LENGTH: a longer key makes a storage command a plain error line.
const KEY_MAX_LENGTH: usize = 250;
/// The barrier: memcached 1.6's meta no-op, answered `MN\r\n`.
const BARRIER: &[u8] = b"mn\r\n";
const MN: &[u8] = b"MN\r\n";

/// An ARCUS admin command the stand-in answers itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminCmd {
    /// `ready`
    Ready,
    /// `zkensemble get`
    ZkGet,
    /// `zkensemble rejoin`
    ZkRejoin,
    /// `zkensemble set <ensemble>`
    ZkSet(String),
    /// any other `zkensemble <...>`
    ZkBad,
    /// `config zkfailstop` (None: read it)
    ZkFailstop(Option<bool>),
    /// `config zkfailstop <neither on nor off>`
    ZkFailstopBadValue,
    /// `config zkfailstop <more than one argument>`
    ZkFailstopBad,
    /// `scan key <cursor> [count <n>] [match <glob>] [type <T>]`
    Scan(crate::scan::ScanRequest),
    /// `scan key` with arguments arcus refuses
    ScanBad,
}

/// What `ready` and `zkensemble` answer from; written by the ZooKeeper loop, read by the proxy.
pub struct NodeStatus {
    /// `-z` without a chroot suffix (what `zkensemble get` prints); None without `-z`.
    ensemble: Option<String>,
    /// Session open and own znode created (arcus `zk_ready`).
    registered: AtomicBool,
    /// A ZooKeeper session exists (arcus `main_zk->zh != NULL`).
    session: AtomicBool,
    /// arcus `zk_failstop` (default on): an expired session makes the node exit 75; off, it
    /// leaves the cluster and waits for `zkensemble rejoin`.
    failstop: AtomicBool,
    rejoin: mpsc::UnboundedSender<oneshot::Sender<bool>>,
    /// `scan key` over memcached's hash table (set once memcached's socket is known).
    scans: std::sync::OnceLock<crate::scan::Scans>,
}

/// A `zkensemble rejoin` for the ZooKeeper loop: it answers true when the node rejoined.
pub type RejoinRequest = oneshot::Sender<bool>;

impl NodeStatus {
    pub fn new(
        ensemble: Option<&str>,
    ) -> (Arc<NodeStatus>, mpsc::UnboundedReceiver<RejoinRequest>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let ensemble = ensemble.map(|e| {
            // The C client keeps the chroot apart from the host list it reports.
            let hosts = e.split_once('/').map(|(h, _)| h).unwrap_or(e);
            hosts.trim().to_string()
        });
        let status = NodeStatus {
            ensemble,
            registered: AtomicBool::new(false),
            session: AtomicBool::new(false),
            failstop: AtomicBool::new(true),
            rejoin: tx,
            scans: std::sync::OnceLock::new(),
        };
        (Arc::new(status), rx)
    }

    /// Where memcached listens: `scan key` lists its hash table there.
    pub fn set_upstream(&self, socket: PathBuf) {
        let _ = self.scans.set(crate::scan::Scans::new(socket));
    }

    pub fn set_registered(&self, v: bool) {
        self.registered.store(v, Ordering::SeqCst);
    }

    pub fn set_session(&self, v: bool) {
        self.session.store(v, Ordering::SeqCst);
    }

    pub fn failstop(&self) -> bool {
        self.failstop.load(Ordering::SeqCst)
    }

    /// The reply arcus-memcached 1.15 sends (memcached.c `ready` and
    /// `process_zkensemble_command`), with its `\r\n`.
    pub async fn answer(&self, cmd: &AdminCmd) -> Vec<u8> {
        // memcached.c process_zkfailstop_command, with or without ZooKeeper.
        match cmd {
            AdminCmd::ZkFailstop(None) => {
                let now = if self.failstop() { "on" } else { "off" };
                return format!("zkfailstop {now}\r\nEND\r\n").into_bytes();
            }
            AdminCmd::ZkFailstop(Some(on)) => {
                self.failstop.store(*on, Ordering::SeqCst);
                warn!("zk_failstop set to {}", if *on { "on" } else { "off" });
                return b"END\r\n".to_vec();
            }
            AdminCmd::ZkFailstopBadValue => return b"CLIENT_ERROR bad value\r\n".to_vec(),
            AdminCmd::ZkFailstopBad => return b"CLIENT_ERROR bad command line format\r\n".to_vec(),
            AdminCmd::Scan(req) => {
                return match self.scans.get() {
                    Some(scans) => scans.answer(req).await,
                    None => b"SERVER_ERROR scan not available yet\r\n".to_vec(),
                }
            }
            AdminCmd::ScanBad => return b"CLIENT_ERROR bad command line format\r\n".to_vec(),
            _ => {}
        }
        let Some(ensemble) = &self.ensemble else {
            return match cmd {
                AdminCmd::Ready => b"READY\r\n".to_vec(),
                _ => b"ERROR not using ZooKeeper\r\n".to_vec(),
            };
        };
        match cmd {
            AdminCmd::Ready if self.registered.load(Ordering::SeqCst) => b"READY\r\n".to_vec(),
            AdminCmd::Ready => b"NOT_READY\r\n".to_vec(),
            // The real server appends "\r\n\n" to the address before out_string adds "\r\n".
            AdminCmd::ZkGet if self.session.load(Ordering::SeqCst) => {
                format!("{ensemble}\r\n\n\r\n").into_bytes()
            }
            AdminCmd::ZkGet => {
                warn!("Failed to get the ZooKeeper ensemble list. The handle is invalid.");
                b"ERROR failed to get the ensemble address\r\n".to_vec()
            }
            AdminCmd::ZkRejoin => {
                let (tx, rx) = oneshot::channel();
                let ok = self.rejoin.send(tx).is_ok() && rx.await.unwrap_or(false);
                if ok {
                    b"Successfully rejoined\r\n".to_vec()
                } else {
                    b"ERROR failed to rejoin ensemble\r\n".to_vec()
                }
            }
            AdminCmd::ZkSet(new) => {
                warn!(
                    "zkensemble set {new}: the stand-in cannot move a live session to another \
                     ensemble; answering the real server's failure reply (restart the node with \
                     another -z instead)"
                );
                b"ERROR failed to set the new ensemble address (check logs)\r\n".to_vec()
            }
            AdminCmd::ZkBad => b"CLIENT_ERROR bad command line format\r\n".to_vec(),
            AdminCmd::ZkFailstop(_)
            | AdminCmd::ZkFailstopBadValue
            | AdminCmd::ZkFailstopBad
            | AdminCmd::Scan(_)
            | AdminCmd::ScanBad => {
                unreachable!("answered above")
            }
        }
    }
}

/// One step of the client→memcached stream.
#[derive(Debug, PartialEq, Eq)]
enum Req {
    /// Forward this many bytes unchanged.
    Forward(usize),
    /// The client's own `mn` line of this length: forward it and expect its `MN`.
    ClientMn(usize),
    /// A line of this length the stand-in answers: not forwarded; a barrier goes instead.
    Intercept(usize, AdminCmd),
}

#[derive(Debug, Default)]
struct RequestParser {
    /// Data-block bytes (with their `\r\n`) still to forward.
    data_left: usize,
    /// Inside an over-long line: forward up to its `\n`.
    long_line: bool,
}

impl RequestParser {
    /// The next step for the bytes at the start of `buf`; None when more bytes are needed.
    fn next(&mut self, buf: &[u8]) -> Option<Req> {
        if buf.is_empty() {
            return None;
        }
        if self.data_left > 0 {
            let n = self.data_left.min(buf.len());
            self.data_left -= n;
            return Some(Req::Forward(n));
        }
        match buf.iter().position(|&b| b == b'\n') {
            Some(i) if self.long_line => {
                self.long_line = false;
                Some(Req::Forward(i + 1))
            }
            Some(i) => Some(self.classify(&buf[..=i])),
            None if self.long_line || buf.len() > MAX_LINE => {
                self.long_line = true;
                Some(Req::Forward(buf.len()))
            }
            None => None,
        }
    }

    /// One whole line (with its `\n`), tokenized like memcached (split on spaces).
    fn classify(&mut self, line: &[u8]) -> Req {
        let n = line.len();
        let mut words = words(line);
        let Some(cmd) = words.next() else {
            return Req::Forward(n);
        };
        match cmd {
            b"ready" if words.next().is_none() => Req::Intercept(n, AdminCmd::Ready),
            b"zkensemble" => {
                let rest: Vec<&[u8]> = words.collect();
                // A bare `zkensemble` is not dispatched by arcus either (unknown command).
                match rest.as_slice() {
                    [] => Req::Forward(n),
                    [b"get"] => Req::Intercept(n, AdminCmd::ZkGet),
                    [b"rejoin"] => Req::Intercept(n, AdminCmd::ZkRejoin),
                    [b"set", e] => {
                        Req::Intercept(n, AdminCmd::ZkSet(String::from_utf8_lossy(e).into_owned()))
                    }
                    _ => Req::Intercept(n, AdminCmd::ZkBad),
                }
            }
            b"config" => {
                let rest: Vec<&[u8]> = words.collect();
                // Stock memcached knows no `config`; only zkfailstop is answered here.
                match rest.as_slice() {
                    [b"zkfailstop"] => Req::Intercept(n, AdminCmd::ZkFailstop(None)),
                    [b"zkfailstop", b"on"] => Req::Intercept(n, AdminCmd::ZkFailstop(Some(true))),
                    [b"zkfailstop", b"off"] => Req::Intercept(n, AdminCmd::ZkFailstop(Some(false))),
                    [b"zkfailstop", _] => Req::Intercept(n, AdminCmd::ZkFailstopBadValue),
                    [b"zkfailstop", ..] => Req::Intercept(n, AdminCmd::ZkFailstopBad),
                    _ => Req::Forward(n),
                }
            }
            b"scan" => {
                let rest: Vec<&[u8]> = words.collect();
                // Only `scan key` is arcus's key listing; anything else goes on (and fails).
                match rest.split_first() {
                    Some((&b"key", args)) => match crate::scan::parse_request(args) {
                        Some(req) => Req::Intercept(n, AdminCmd::Scan(req)),
                        None => Req::Intercept(n, AdminCmd::ScanBad),
                    },
                    _ => Req::Forward(n),
                }
            }
            b"mn" => Req::ClientMn(n),
            b"set" | b"add" | b"replace" | b"append" | b"prepend" | b"cas" => {
                if let Some(bytes) = storage_data_len(cmd == b"cas", words) {
                    self.data_left = bytes + 2;
                }
                Req::Forward(n)
            }
            b"ms" => {
                // ms <key> <datalen> <flags>*
                let _key = words.next();
                if let Some(len) = words.next().and_then(parse::<i32>) {
                    if (0..=i32::MAX - 2).contains(&len) {
                        self.data_left = len as usize + 2;
                    }
                }
                Req::Forward(n)
            }
            _ => Req::Forward(n),
        }
    }
}

/// The words of a line without its `\r\n`, split on spaces as memcached's tokenizer does.
fn words(line: &[u8]) -> impl Iterator<Item = &[u8]> {
    let body = line.strip_suffix(b"\n").unwrap_or(line);
    let body = body.strip_suffix(b"\r").unwrap_or(body);
    body.split(|&b| b == b' ').filter(|w| !w.is_empty())
}

fn parse<T: std::str::FromStr>(w: &[u8]) -> Option<T> {
    std::str::from_utf8(w).ok()?.parse().ok()
}

/// The data block length of `set|add|replace|append|prepend <key> <flags> <exptime> <bytes>
/// [noreply]` or `cas ... <bytes> <cas> [noreply]`, when memcached would read one: a command it
/// rejects outright (word count, key length, numbers) reads no data, and its next line is parsed
/// as a command, by memcached and by this proxy alike.
fn storage_data_len<'a>(cas: bool, mut words: impl Iterator<Item = &'a [u8]>) -> Option<usize> {
    let key = words.next()?;
    let flags = words.next()?;
    let exptime = words.next()?;
    let bytes = words.next()?;
    if cas {
        parse::<u64>(words.next()?)?;
    }
    let _noreply = words.next();
    if words.next().is_some() || key.len() > KEY_MAX_LENGTH {
        return None;
    }
    parse::<u32>(flags)?;
    parse::<i32>(exptime)?;
    let bytes = parse::<i32>(bytes)?;
    (0..=i32::MAX - 2)
        .contains(&bytes)
        .then_some(bytes as usize)
}

/// One step of the memcached→client stream.
#[derive(Debug, PartialEq, Eq)]
enum Resp {
    Forward(usize),
    /// An `MN\r\n` line: a barrier's or the client's own.
    Mn(usize),
}

#[derive(Debug, Default)]
struct ResponseParser {
    data_left: usize,
    long_line: bool,
}

impl ResponseParser {
    fn next(&mut self, buf: &[u8]) -> Option<Resp> {
        if buf.is_empty() {
            return None;
        }
        if self.data_left > 0 {
            let n = self.data_left.min(buf.len());
            self.data_left -= n;
            return Some(Resp::Forward(n));
        }
        match buf.iter().position(|&b| b == b'\n') {
            Some(i) if self.long_line => {
                self.long_line = false;
                Some(Resp::Forward(i + 1))
            }
            Some(i) => {
                let line = &buf[..=i];
                if line == MN {
                    return Some(Resp::Mn(line.len()));
                }
                // VALUE <key> <flags> <bytes> [<cas>] / VA <size> <flags>*: a data block follows.
                let size = if line.starts_with(b"VALUE ") {
                    words(line).nth(3).and_then(parse::<usize>)
                } else if line.starts_with(b"VA ") {
                    words(line).nth(1).and_then(parse::<usize>)
                } else {
                    None
                };
                if let Some(size) = size {
                    self.data_left = size + 2;
                }
                Some(Resp::Forward(line.len()))
            }
            None if self.long_line || buf.len() > MAX_RESPONSE_LINE => {
                self.long_line = true;
                Some(Resp::Forward(buf.len()))
            }
            None => None,
        }
    }
}

/// What the response side does at the next `MN`.
#[derive(Debug)]
enum Expect {
    /// The client's own `mn`: pass `MN` through.
    ClientMn,
    /// A barrier: answer this command instead.
    Local(AdminCmd),
}

/// Binds one TCP listener (SO_REUSEADDR and the `-b` backlog, like memcached).
pub async fn bind(addr: &str, backlog: u32) -> io::Result<TcpListener> {
    let mut last = None;
    for sa in tokio::net::lookup_host(addr).await? {
        let sock = if sa.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        sock.set_reuseaddr(true)?;
        match sock.bind(sa).and_then(|_| sock.listen(backlog)) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other(format!("{addr} resolves to no address"))))
}

/// Accepts clients forever, one task each.
pub async fn accept_loop(listener: TcpListener, upstream: Arc<PathBuf>, status: Arc<NodeStatus>) {
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                let upstream = upstream.clone();
                let status = status.clone();
                tokio::spawn(async move {
                    if let Err(e) = serve(client, &upstream, status).await {
                        debug!("client {peer}: {e}");
                    }
                });
            }
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                warn!("cannot accept a client connection: {e}; retrying in 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One client: its own connection to memcached, a request pump and a response pump.
async fn serve(client: TcpStream, upstream: &PathBuf, status: Arc<NodeStatus>) -> io::Result<()> {
    client.set_nodelay(true)?;
    let memcached = UnixStream::connect(upstream).await.map_err(|e| {
        warn!(
            "cannot connect to memcached at {}: {e}; closing the client connection",
            upstream.display()
        );
        e
    })?;
    let (cr, cw) = client.into_split();
    let (mr, mw) = memcached.into_split();
    let (tx, rx) = mpsc::unbounded_channel();
    let binary = AtomicBool::new(false);
    let requests = pump_requests(cr, mw, tx, &binary);
    let responses = pump_responses(mr, cw, rx, &status, &binary);
    tokio::pin!(requests, responses);
    tokio::select! {
        // memcached closed (quit, shutdown) or the client stopped reading: done.
        r = &mut responses => r,
        // The client closed its side: memcached got EOF and closes too, after its last answers.
        r = &mut requests => {
            let answered = responses.await;
            r.and(answered)
        }
    }
}

async fn pump_requests(
    mut from: impl AsyncRead + Unpin,
    to: impl AsyncWrite + Unpin,
    fifo: mpsc::UnboundedSender<Expect>,
    binary: &AtomicBool,
) -> io::Result<()> {
    let mut to = BufWriter::with_capacity(CHUNK, to);
    let mut buf: Vec<u8> = Vec::with_capacity(CHUNK);
    let mut parser = RequestParser::default();
    let mut first = true;
    loop {
        if buf.capacity() - buf.len() < CHUNK / 4 {
            buf.reserve(CHUNK);
        }
        if from.read_buf(&mut buf).await? == 0 {
            break;
        }
        if first {
            first = false;
            // memcached's binary protocol starts with the magic byte 0x80: nothing to intercept.
            if buf[0] == 0x80 {
                binary.store(true, Ordering::SeqCst);
            }
        }
        if binary.load(Ordering::Relaxed) {
            to.write_all(&buf).await?;
            to.flush().await?;
            buf.clear();
            continue;
        }
        let (mut pos, mut sent) = (0, 0);
        while let Some(step) = parser.next(&buf[pos..]) {
            match step {
                Req::Forward(n) => pos += n,
                Req::ClientMn(n) => {
                    let _ = fifo.send(Expect::ClientMn);
                    pos += n;
                }
                Req::Intercept(n, cmd) => {
                    to.write_all(&buf[sent..pos]).await?;
                    // Queued before the barrier is written, so the response side always finds it.
                    let _ = fifo.send(Expect::Local(cmd));
                    to.write_all(BARRIER).await?;
                    pos += n;
                    sent = pos;
                }
            }
        }
        to.write_all(&buf[sent..pos]).await?;
        to.flush().await?;
        buf.drain(..pos);
    }
    to.flush().await?;
    to.into_inner().shutdown().await
}

async fn pump_responses(
    mut from: impl AsyncRead + Unpin,
    to: impl AsyncWrite + Unpin,
    mut fifo: mpsc::UnboundedReceiver<Expect>,
    status: &NodeStatus,
    binary: &AtomicBool,
) -> io::Result<()> {
    let mut to = BufWriter::with_capacity(CHUNK, to);
    let mut buf: Vec<u8> = Vec::with_capacity(CHUNK);
    let mut parser = ResponseParser::default();
    loop {
        if buf.capacity() - buf.len() < CHUNK / 4 {
            buf.reserve(CHUNK);
        }
        if from.read_buf(&mut buf).await? == 0 {
            break;
        }
        if binary.load(Ordering::SeqCst) {
            to.write_all(&buf).await?;
            to.flush().await?;
            buf.clear();
            continue;
        }
        let (mut pos, mut sent) = (0, 0);
        while let Some(step) = parser.next(&buf[pos..]) {
            match step {
                Resp::Forward(n) => pos += n,
                Resp::Mn(n) => {
                    to.write_all(&buf[sent..pos]).await?;
                    match fifo.try_recv() {
                        Ok(Expect::Local(cmd)) => {
                            if cmd == AdminCmd::ZkRejoin {
                                // A rejoin takes a while: earlier answers go out first.
                                to.flush().await?;
                            }
                            // Answered only now, after everything sent before it, as a server
                            // executing the pipeline in order would.
                            to.write_all(&status.answer(&cmd).await).await?;
                        }
                        Ok(Expect::ClientMn) => to.write_all(MN).await?,
                        Err(_) => {
                            // An `MN` nobody asked for (e.g. `mn` inside a data block memcached
                            // refused to read): pass it on.
                            warn!("MN without a queued request; passed through");
                            to.write_all(MN).await?;
                        }
                    }
                    pos += n;
                    sent = pos;
                }
            }
        }
        to.write_all(&buf[sent..pos]).await?;
        to.flush().await?;
        buf.drain(..pos);
    }
    to.flush().await?;
    to.into_inner().shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requests(input: &[u8]) -> Vec<Req> {
        let mut p = RequestParser::default();
        let mut pos = 0;
        let mut out = Vec::new();
        while let Some(r) = p.next(&input[pos..]) {
            pos += match &r {
                Req::Forward(n) | Req::ClientMn(n) | Req::Intercept(n, _) => *n,
            };
            out.push(r);
        }
        out
    }

    #[test]
    fn data_blocks_are_never_commands() {
        let input =
            b"set k 0 0 7\r\nready\r\n\r\nready\r\nget k\r\ncas k 1 2 5 99 noreply\r\nmn\r\nx\r\nmn\r\n";
        assert_eq!(
            requests(input),
            vec![
                Req::Forward(13),
                Req::Forward(9),
                Req::Intercept(7, AdminCmd::Ready),
                Req::Forward(7),
                Req::Forward(24),
                Req::Forward(7),
                Req::ClientMn(4),
            ]
        );
    }

    #[test]
    fn data_block_split_across_reads() {
        let mut p = RequestParser::default();
        // 10 data bytes + \r\n, arriving in pieces
        assert_eq!(p.next(b"set k 0 0 10\r\nrea"), Some(Req::Forward(14)));
        assert_eq!(p.next(b"rea"), Some(Req::Forward(3)));
        assert_eq!(p.next(b"dy\r\nxxx"), Some(Req::Forward(7)));
        assert_eq!(p.next(b"\r\nready\r\n"), Some(Req::Forward(2)));
        assert_eq!(
            p.next(b"ready\r\n"),
            Some(Req::Intercept(7, AdminCmd::Ready))
        );
        // an incomplete line waits for more
        assert_eq!(p.next(b"read"), None);
    }

    #[test]
    fn admin_commands() {
        let one = |l: &str| requests(l.as_bytes()).pop().unwrap();
        assert_eq!(one("ready\n"), Req::Intercept(6, AdminCmd::Ready));
        assert_eq!(one("ready \r\n"), Req::Intercept(8, AdminCmd::Ready));
        assert_eq!(one("ready now\r\n"), Req::Forward(11));
        assert_eq!(
            one("zkensemble get\r\n"),
            Req::Intercept(16, AdminCmd::ZkGet)
        );
        assert_eq!(
            one("zkensemble  rejoin\r\n"),
            Req::Intercept(20, AdminCmd::ZkRejoin)
        );
        assert_eq!(
            one("zkensemble set a:1,b:2\r\n"),
            Req::Intercept(24, AdminCmd::ZkSet("a:1,b:2".into()))
        );
        assert_eq!(
            one("zkensemble get x\r\n"),
            Req::Intercept(18, AdminCmd::ZkBad)
        );
        assert_eq!(one("zkensemble\r\n"), Req::Forward(12));
        assert_eq!(
            one("config zkfailstop\r\n"),
            Req::Intercept(19, AdminCmd::ZkFailstop(None))
        );
        assert_eq!(
            one("config zkfailstop off\r\n"),
            Req::Intercept(23, AdminCmd::ZkFailstop(Some(false)))
        );
        assert_eq!(
            one("config zkfailstop maybe\r\n"),
            Req::Intercept(25, AdminCmd::ZkFailstopBadValue)
        );
        assert_eq!(one("config memlimit 64\r\n"), Req::Forward(20));
        assert_eq!(one("READY\r\n"), Req::Forward(7));
        assert_eq!(one("mn\r\n"), Req::ClientMn(4));
    }

    #[test]
    fn rejected_storage_commands_read_no_data() {
        // memcached answers these with an error and parses the next line as a command
        for bad in [
            "set k 0 0\r\n",
            "set k 0 0 x\r\n",
            "set k 0 0 -1\r\n",
            "set k 0 0 5 noreply extra\r\n",
            "cas k 0 0 5\r\n",
        ] {
            let input = format!("{bad}ready\r\n");
            assert_eq!(
                requests(input.as_bytes()).last(),
                Some(&Req::Intercept(7, AdminCmd::Ready)),
                "{bad:?}"
            );
        }
        let long_key = format!("set {} 0 0 5\r\nready\r\n", "k".repeat(251));
        assert_eq!(
            requests(long_key.as_bytes()).last(),
            Some(&Req::Intercept(7, AdminCmd::Ready))
        );
        // meta set carries a data block too
        assert_eq!(
            requests(b"ms k 5 T0\r\nready\r\n"),
            vec![Req::Forward(11), Req::Forward(7)]
        );
    }

    #[test]
    fn long_lines_stream_through() {
        let mut p = RequestParser::default();
        let long = vec![b'k'; MAX_LINE + 1];
        assert_eq!(p.next(&long), Some(Req::Forward(MAX_LINE + 1)));
        assert_eq!(p.next(b"kk\r\nready\r\n"), Some(Req::Forward(4)));
        assert_eq!(
            p.next(b"ready\r\n"),
            Some(Req::Intercept(7, AdminCmd::Ready))
        );
    }

    #[test]
    fn responses_find_mn_outside_values() {
        let input = b"STORED\r\nVALUE k 0 4\r\nMN\r\n\r\nEND\r\nVA 4 t\r\nMN\r\n\r\nMN\r\n";
        let mut p = ResponseParser::default();
        let mut pos = 0;
        let mut out = Vec::new();
        while let Some(r) = p.next(&input[pos..]) {
            pos += match r {
                Resp::Forward(n) | Resp::Mn(n) => n,
            };
            out.push(r);
        }
        assert_eq!(
            out,
            vec![
                Resp::Forward(8),
                Resp::Forward(13),
                Resp::Forward(6),
                Resp::Forward(5),
                Resp::Forward(8),
                Resp::Forward(6),
                Resp::Mn(4),
            ]
        );
        assert_eq!(pos, input.len());
    }

    #[tokio::test]
    async fn answers() {
        let (s, mut rx) = NodeStatus::new(Some("127.0.0.1:2181,127.0.0.2:2181/chroot"));
        assert_eq!(s.answer(&AdminCmd::Ready).await, b"NOT_READY\r\n");
        assert_eq!(
            s.answer(&AdminCmd::ZkGet).await,
            b"ERROR failed to get the ensemble address\r\n"
        );
        s.set_registered(true);
        s.set_session(true);
        assert_eq!(s.answer(&AdminCmd::Ready).await, b"READY\r\n");
        assert_eq!(
            s.answer(&AdminCmd::ZkGet).await,
            b"127.0.0.1:2181,127.0.0.2:2181\r\n\n\r\n"
        );
        let loop_side = tokio::spawn(async move {
            let a = rx.recv().await.unwrap();
            a.send(true).unwrap();
            let b = rx.recv().await.unwrap();
            b.send(false).unwrap();
        });
        assert_eq!(
            s.answer(&AdminCmd::ZkRejoin).await,
            b"Successfully rejoined\r\n"
        );
        assert_eq!(
            s.answer(&AdminCmd::ZkRejoin).await,
            b"ERROR failed to rejoin ensemble\r\n"
        );
        loop_side.await.unwrap();

        let (plain, _rx) = NodeStatus::new(None);
        assert_eq!(plain.answer(&AdminCmd::Ready).await, b"READY\r\n");
        assert_eq!(
            plain.answer(&AdminCmd::ZkRejoin).await,
            b"ERROR not using ZooKeeper\r\n"
        );
    }
}
