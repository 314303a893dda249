//! ARCUS's `scan key <cursor> [count <n>] [match <glob>] [type <T>]`, which stock memcached
//! lacks, answered from a snapshot of memcached's hash table.
//!
//! Why: arcus-memcached's `scan` is a cursor over the hash table: every item present for the
//! whole scan is returned. Stock memcached's only listing, `lru_crawler metadump`, either walks
//! the LRUs (`all`: misses an item that moves to an LRU already walked, which writes do) or the
//! hash table (`hash`: holds an item lock while its reader pauses). The stand-in reads a
//! `metadump hash` to its end without pausing, at cursor `0`, and pages through that snapshot,
//! so the operator lists stand-in nodes the way it lists ARCUS nodes. A cursor is
//! `<snapshot id>.<offset>`; a snapshot goes when its last page is read or after
//! [`SNAPSHOT_IDLE`] unused.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tracing::{info, warn};

/// How long an unread snapshot is kept (a listing that stopped half-way).
pub const SNAPSHOT_IDLE: Duration = Duration::from_secs(600);
/// ARCUS's default and largest page.
const DEFAULT_COUNT: usize = 20;
const MAX_COUNT: usize = 2000;
/// How long reading the whole hash table may take.
const DUMP_TIMEOUT: Duration = Duration::from_secs(120);

/// A parsed `scan key` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanRequest {
    pub cursor: String,
    pub count: usize,
    pub pattern: Option<String>,
    /// The item type letter asked for (`K`, `L`, ...); stock memcached holds only `K`.
    pub item_type: Option<String>,
}

/// Parses the words after `scan key`; `None` is arcus's "bad command line format".
pub fn parse_request(words: &[&[u8]]) -> Option<ScanRequest> {
    let (cursor, mut rest) = words.split_first()?;
    let mut req = ScanRequest {
        cursor: String::from_utf8(cursor.to_vec()).ok()?,
        count: DEFAULT_COUNT,
        pattern: None,
        item_type: None,
    };
    while let [name, value, tail @ ..] = rest {
        let value = std::str::from_utf8(value).ok()?;
        match *name {
            b"count" => {
                req.count = value.parse().ok().filter(|n| (1..=MAX_COUNT).contains(n))?;
            }
            b"match" => req.pattern = Some(value.to_string()),
            b"type" => req.item_type = Some(value.to_string()),
            _ => return None,
        }
        rest = tail;
    }
    rest.is_empty().then_some(req)
}

/// One listed item: its key and absolute expiry (`None`: never).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Item {
    key: String,
    exp: Option<i64>,
}

struct Snapshot {
    items: Vec<Item>,
    last_used: Instant,
}

/// The snapshots of the scans in progress, and where memcached listens.
pub struct Scans {
    upstream: PathBuf,
    snapshots: Mutex<HashMap<u64, Snapshot>>,
    next_id: AtomicU64,
    /// One hash dump at a time (memcached runs one crawler).
    dumping: tokio::sync::Mutex<()>,
}

impl Scans {
    pub fn new(upstream: PathBuf) -> Scans {
        Scans {
            upstream,
            snapshots: Mutex::default(),
            next_id: AtomicU64::new(1),
            dumping: tokio::sync::Mutex::new(()),
        }
    }

    /// The reply to one `scan key` request, with its `\r\n`s.
    pub async fn answer(&self, req: &ScanRequest) -> Vec<u8> {
        let (id, offset) = if req.cursor == "0" {
            match self.take_snapshot().await {
                Ok(id) => (id, 0),
                Err(e) => {
                    warn!("scan: listing memcached's hash table failed: {e}");
                    return format!("SERVER_ERROR scan failed: {e}\r\n").into_bytes();
                }
            }
        } else {
            match parse_cursor(&req.cursor) {
                Some(c) => c,
                None => return b"CLIENT_ERROR bad cursor value\r\n".to_vec(),
            }
        };
        let now = unix_now();
        let mut snapshots = self.snapshots.lock().expect("scan snapshots");
        snapshots.retain(|_, s| s.last_used.elapsed() < SNAPSHOT_IDLE);
        let Some(snapshot) = snapshots.get_mut(&id) else {
            return b"CLIENT_ERROR bad cursor value\r\n".to_vec();
        };
        snapshot.last_used = Instant::now();
        let end = (offset + req.count).min(snapshot.items.len());
        let start = offset.min(end);
        let mut lines = Vec::new();
        let wants_kv = req.item_type.as_deref().is_none_or(|t| t == "K");
        for item in &snapshot.items[start..end] {
            let left = match item.exp {
                None => 0,
                Some(exp) if exp > now => exp - now,
                Some(_) => continue, // expired since the snapshot
            };
            let matches = req.pattern.as_deref().is_none_or(|p| glob(p, &item.key));
            if wants_kv && matches {
                lines.push(format!("{} K {left}\r\n", item.key));
            }
        }
        let next = if end >= snapshot.items.len() {
            snapshots.remove(&id);
            "0".to_string()
        } else {
            format!("{id}.{end}")
        };
        let mut out = format!("KEYS {} {next}\r\n", lines.len()).into_bytes();
        for l in lines {
            out.extend_from_slice(l.as_bytes());
        }
        out.extend_from_slice(b"END\r\n");
        out
    }

    /// Reads a whole `lru_crawler metadump hash` (every item present for the whole walk), as
    /// fast as memcached sends it, into a new snapshot.
    async fn take_snapshot(&self) -> Result<u64, String> {
        let _one = self.dumping.lock().await;
        let started = Instant::now();
        let items = tokio::time::timeout(DUMP_TIMEOUT, async {
            // memcached's crawler stays busy for a moment after a dump's END (and while a
            // client's own metadump runs): asked again, as the operator does for metadump.
            loop {
                match dump_hash(&self.upstream).await {
                    Err(e) if e.contains("BUSY") => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    other => return other,
                }
            }
        })
        .await
        .map_err(|_| format!("no END within {DUMP_TIMEOUT:?}"))??;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        info!(
            "scan: snapshot {id} of {} keys in {:?}",
            items.len(),
            started.elapsed()
        );
        self.snapshots.lock().expect("scan snapshots").insert(
            id,
            Snapshot {
                items,
                last_used: Instant::now(),
            },
        );
        Ok(id)
    }
}

fn parse_cursor(cursor: &str) -> Option<(u64, usize)> {
    let (id, offset) = cursor.split_once('.')?;
    Some((id.parse().ok()?, offset.parse().ok()?))
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

async fn dump_hash(upstream: &PathBuf) -> Result<Vec<Item>, String> {
    let mut conn = UnixStream::connect(upstream)
        .await
        .map_err(|e| format!("connecting to {}: {e}", upstream.display()))?;
    conn.write_all(b"lru_crawler metadump hash\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut lines = BufReader::with_capacity(256 * 1024, conn).lines();
    let now = unix_now();
    let mut items = Vec::new();
    while let Some(line) = lines.next_line().await.map_err(|e| e.to_string())? {
        if line == "END" {
            return Ok(items);
        }
        if line.starts_with("BUSY") || line.starts_with("ERROR") {
            return Err(format!("memcached answered {line:?}"));
        }
        if let Some(item) = parse_metadump_line(&line) {
            if item.exp.is_none_or(|e| e > now) {
                items.push(item);
            }
        }
    }
    Err("the dump ended without END".into())
}

/// `key=<url-encoded> exp=<unix|-1> ...` → the key and its expiry.
fn parse_metadump_line(line: &str) -> Option<Item> {
    let e = arcus_client::protocol::parse_metadump_line(line.as_bytes())?;
    Some(Item {
        key: e.key,
        exp: e.exp,
    })
}

/// ARCUS's `match` glob: `*` any run, `?` one character, `\` escapes the next.
fn glob(pattern: &str, text: &str) -> bool {
    fn go(p: &[char], t: &[char]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some(('*', rest)) => (0..=t.len()).any(|i| go(rest, &t[i..])),
            Some(('?', rest)) => !t.is_empty() && go(rest, &t[1..]),
            Some(('\\', rest)) if !rest.is_empty() => {
                t.first() == rest.first() && go(&rest[1..], &t[1..])
            }
            Some((c, rest)) => t.first() == Some(c) && go(rest, &t[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    go(&p, &t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_as_arcus_reads_them() {
        let w =
            |s: &'static str| -> Vec<&'static [u8]> { s.split(' ').map(str::as_bytes).collect() };
        assert_eq!(
            parse_request(&w("0 count 1000")),
            Some(ScanRequest {
                cursor: "0".into(),
                count: 1000,
                pattern: None,
                item_type: None
            })
        );
        let r = parse_request(&w("3.20 match a* type K")).unwrap();
        assert_eq!((r.cursor.as_str(), r.count), ("3.20", DEFAULT_COUNT));
        assert_eq!(r.pattern.as_deref(), Some("a*"));
        assert_eq!(parse_request(&w("0 count 0")), None);
        assert_eq!(parse_request(&w("0 count 2001")), None);
        assert_eq!(parse_request(&w("0 count")), None);
        assert_eq!(parse_request(&w("0 bogus 1")), None);
        assert_eq!(parse_request(&[]), None);
    }

    #[test]
    fn metadump_lines_and_globs() {
        assert_eq!(
            parse_metadump_line("key=a%20b exp=-1 la=1 cas=2 fetch=no cls=1 size=60"),
            Some(Item {
                key: "a b".into(),
                exp: None
            })
        );
        assert_eq!(
            parse_metadump_line("key=k exp=1700000000 la=1")
                .unwrap()
                .exp,
            Some(1_700_000_000)
        );
        assert_eq!(parse_metadump_line("END"), None);
        assert!(glob("k:*", "k:12"));
        assert!(glob("k:?2", "k:12"));
        assert!(!glob("k:?", "k:12"));
        assert!(glob("a\\*", "a*") && !glob("a\\*", "ab"));
    }
}
