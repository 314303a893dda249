//! Listing a node's keys, and item lifetimes.
//!
//! Which listing a node speaks is found by asking it: ARCUS answers `scan key 0 count 1` with a
//! `KEYS ...` page, stock memcached answers `ERROR` (then `lru_crawler metadump all` is used).
//! Never by configuration.
//!
//! Expiry times are kept as absolute unix seconds on the OPERATOR's clock: `scan key` reports
//! seconds left (turned absolute with our clock at listing time), `metadump` reports absolute
//! times on the SERVER's clock (shifted by `our clock - the server's "stats time"`), so a clock
//! skew between the operator and a node never shortens or lengthens a copied item's life.

use arcus_client::admin::MetadumpStream;
use arcus_client::{AdminClient, Error as ClientError, ItemType, ScanOptions};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{MigrationError, Step};

/// memcached's largest relative exptime (30 days); larger values are absolute unix times.
pub const REALTIME_MAXDELTA: i64 = 30 * 24 * 3600;

/// When an item expires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Expiry {
    /// exptime 0: never expires (may be evicted).
    Never,
    /// ARCUS exptime -1: never expires and is never evicted.
    Sticky,
    /// Expires at this unix time (operator's clock).
    At(i64),
}

/// Outcome of turning an [`Expiry`] into the `exptime` argument of a storage command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TtlArg {
    /// Already expired at `now`: do not copy.
    Expired,
    /// Pass this exptime.
    Exptime(i64),
}

impl Expiry {
    /// From a `scan key` line's exptime (seconds left; 0 never, -1 sticky, -2 or below already
    /// expired), listed at `now`. `None` for an item that is already expired.
    pub fn from_scan(exptime: i64, now: i64) -> Option<Expiry> {
        match exptime {
            0 => Some(Expiry::Never),
            -1 => Some(Expiry::Sticky),
            e if e < -1 => None,
            e => Some(Expiry::At(now + e)),
        }
    }

    /// From a `metadump` `exp` (absolute, server clock, `None` = never), given the server's
    /// `stats time` and our clock read at the same moment.
    pub fn from_metadump(exp: Option<i64>, server_now: i64, local_now: i64) -> Expiry {
        match exp {
            None => Expiry::Never,
            Some(e) => Expiry::At(e - server_now + local_now),
        }
    }

    /// From `getattr`'s `expiretime` (seconds left, 0 never, -1 sticky), read at `now`.
    pub fn from_attr(expiretime: i64, now: i64) -> Option<Expiry> {
        Expiry::from_scan(expiretime, now)
    }

    /// The `exptime` to store a copy with at `now` so it expires when the original does:
    /// seconds left when that is at most 30 days (memcached's relative range), else the
    /// absolute unix time. An item with no whole second left is expired.
    pub fn exptime_at(self, now: i64) -> TtlArg {
        match self {
            Expiry::Never => TtlArg::Exptime(0),
            Expiry::Sticky => TtlArg::Exptime(-1),
            Expiry::At(at) => {
                let left = at - now;
                if left <= 0 {
                    TtlArg::Expired
                } else if left <= REALTIME_MAXDELTA {
                    TtlArg::Exptime(left)
                } else {
                    TtlArg::Exptime(at)
                }
            }
        }
    }

    pub fn is_expired_at(self, now: i64) -> bool {
        self.exptime_at(now) == TtlArg::Expired
    }
}

/// Our clock, unix seconds.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// One listed key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyInfo {
    pub key: String,
    pub expiry: Expiry,
    pub item_type: ItemType,
    /// The CAS unique when the listing reports it (metadump does, `scan key` does not).
    pub cas: Option<u64>,
}

/// How a node lists its keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listing {
    /// ARCUS `scan key <cursor> count 1000`.
    Scan,
    /// Stock memcached `lru_crawler metadump all`.
    Metadump,
}

/// Asks `node` which listing it speaks: `scan key 0 count 1` answered with `KEYS` → ARCUS scan;
/// answered with `ERROR` (unknown command) → metadump.
pub async fn detect_listing(node: &str, timeout: Duration) -> Result<Listing, MigrationError> {
    let admin = AdminClient::with_timeout(node, timeout);
    let probe = ScanOptions {
        count: Some(1),
        ..ScanOptions::default()
    };
    match admin.scan_keys("0", &probe).await {
        Ok(_) => Ok(Listing::Scan),
        Err(ClientError::Unsupported { .. }) => Ok(Listing::Metadump),
        Err(e) => Err(e).step("asking how the node lists its keys"),
    }
}

/// Every key of `node` with its expiry and type, skipping items already expired and the keys
/// in `ignore` (the migration's own watermark key, ARCUS's `arcus:zk-ping`), all in memory:
/// for tests and small nodes. The migration reads [`KeyChunks`] instead. `op_timeout` bounds
/// each command, `list_timeout` each chunk (metadump's `BUSY` is retried within it).
pub async fn enumerate(
    node: &str,
    listing: Listing,
    op_timeout: Duration,
    list_timeout: Duration,
    ignore: &[&str],
) -> Result<Vec<KeyInfo>, MigrationError> {
    let bounds = Bounds {
        op_timeout,
        list_timeout,
        chunk: 10_000,
    };
    let ignore = ignore.iter().map(|k| k.to_string()).collect();
    let mut keys = KeyLister::open(node, listing, &bounds, ignore).await?;
    let mut out = Vec::new();
    while let Some(chunk) = keys.next_chunk().await? {
        out.extend(chunk);
    }
    Ok(out)
}

/// The step named in listing errors.
const LISTING: &str = "listing keys";

/// What bounds one listing: each command, each chunk (`chunk` keys at most).
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    pub op_timeout: Duration,
    pub list_timeout: Duration,
    pub chunk: usize,
}

/// A listing of one node being read, a chunk at a time (in the caller's task).
struct KeyLister {
    node: String,
    bounds: Bounds,
    ignore: Vec<String>,
    source: ListSource,
}

enum ListSource {
    /// `scan key`: the next cursor, `None` once the scan is complete.
    Scan {
        admin: AdminClient,
        cursor: Option<String>,
    },
    /// `lru_crawler metadump`, with the server's clock and ours read together when it started.
    Metadump {
        dump: MetadumpStream,
        server_now: i64,
        local_now: i64,
    },
}

impl KeyLister {
    async fn open(
        node: &str,
        listing: Listing,
        bounds: &Bounds,
        ignore: Vec<String>,
    ) -> Result<KeyLister, MigrationError> {
        let source = match listing {
            Listing::Scan => ListSource::Scan {
                admin: AdminClient::with_timeout(node, bounds.op_timeout),
                cursor: Some("0".into()),
            },
            Listing::Metadump => start_metadump(node, bounds).await?,
        };
        Ok(KeyLister {
            node: node.to_string(),
            bounds: *bounds,
            ignore,
            source,
        })
    }

    /// The next chunk (at most `bounds.chunk` keys, perhaps none left after filtering), or
    /// `None` when the listing is complete. A chunk slower than `list_timeout` fails.
    async fn next_chunk(&mut self) -> Result<Option<Vec<KeyInfo>>, MigrationError> {
        let timeout = self.bounds.list_timeout;
        let read = self.read_chunk();
        let chunk = match tokio::time::timeout(timeout, read).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(MigrationError::ListTimeout {
                    node: self.node.clone(),
                    timeout,
                })
            }
        };
        Ok(chunk.map(|mut keys| {
            keys.retain(|k| !self.ignore.contains(&k.key));
            keys
        }))
    }

    async fn read_chunk(&mut self) -> Result<Option<Vec<KeyInfo>>, MigrationError> {
        let max = self.bounds.chunk.max(1);
        match &mut self.source {
            ListSource::Scan { admin, cursor } => {
                let Some(mut at) = cursor.take() else {
                    return Ok(None);
                };
                let opts = ScanOptions {
                    count: Some(max.clamp(1, 1000) as u32),
                    ..ScanOptions::default()
                };
                let mut out = Vec::new();
                while out.len() < max {
                    let page = admin.scan_keys(&at, &opts).await.step(LISTING)?;
                    let now = unix_now();
                    out.extend(page.keys.into_iter().filter_map(|k| {
                        Some(KeyInfo {
                            expiry: Expiry::from_scan(k.exptime, now)?,
                            key: k.key,
                            item_type: k.item_type,
                            cas: None,
                        })
                    }));
                    if page.next_cursor == "0" {
                        return Ok(Some(out));
                    }
                    at = page.next_cursor;
                }
                *cursor = Some(at);
                Ok(Some(out))
            }
            ListSource::Metadump {
                dump,
                server_now,
                local_now,
            } => {
                let Some(entries) = dump.next_batch(max).await.step(LISTING)? else {
                    return Ok(None);
                };
                let (server_now, local_now) = (*server_now, *local_now);
                let now = unix_now();
                Ok(Some(
                    entries
                        .into_iter()
                        .map(|e| KeyInfo {
                            expiry: Expiry::from_metadump(e.exp, server_now, local_now),
                            key: e.key,
                            item_type: ItemType::KeyValue,
                            cas: Some(e.cas),
                        })
                        .filter(|k| !k.expiry.is_expired_at(now))
                        .collect(),
                ))
            }
        }
    }
}

/// Starts `lru_crawler metadump all`, retrying `BUSY` (another crawl, ours from a parallel
/// listing or someone else's) for up to `list_timeout`.
async fn start_metadump(node: &str, bounds: &Bounds) -> Result<ListSource, MigrationError> {
    let admin = AdminClient::with_timeout(node, bounds.op_timeout);
    let dump_admin = AdminClient::with_timeout(node, bounds.list_timeout);
    let deadline = Instant::now() + bounds.list_timeout;
    let mut backoff = Duration::from_millis(20);
    loop {
        // Our clock and the server's, read together, to place metadump's absolute times.
        let stats = admin.stats(None).await.step(LISTING)?;
        let local_now = unix_now();
        let server_now: i64 = stats
            .get("time")
            .and_then(|t| t.parse().ok())
            .unwrap_or(local_now);
        match dump_admin.metadump_stream().await {
            Ok(dump) => {
                return Ok(ListSource::Metadump {
                    dump,
                    server_now,
                    local_now,
                })
            }
            Err(ClientError::Server { message, .. })
                if message.starts_with("BUSY") && Instant::now() + backoff < deadline =>
            {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
            Err(ClientError::Server { message, .. }) if message.starts_with("BUSY") => {
                return Err(MigrationError::ListTimeout {
                    node: node.to_string(),
                    timeout: bounds.list_timeout,
                })
            }
            Err(e) => return Err(e).step(LISTING),
        }
    }
}

/// Chunks of a node's listing, read ahead by a task of their own: the listing is read on while
/// the caller copies the previous chunks (a metadump must be read steadily: it holds the
/// node's one crawler), yet at most [`READ_AHEAD`] chunks wait in memory. Dropping it stops the
/// task (and closes the listing's connection).
pub struct KeyChunks {
    rx: tokio::sync::mpsc::Receiver<Result<Vec<KeyInfo>, MigrationError>>,
    task: tokio::task::JoinHandle<()>,
}

/// Chunks read ahead of the caller, at most.
pub const READ_AHEAD: usize = 2;

impl KeyChunks {
    /// Opens the listing of `node` (errors starting it are returned here) and reads it on in
    /// the background. `ignore`: keys never returned.
    pub async fn open(
        node: &str,
        listing: Listing,
        bounds: Bounds,
        ignore: &[&str],
    ) -> Result<KeyChunks, MigrationError> {
        let ignore = ignore.iter().map(|k| k.to_string()).collect();
        let mut lister = KeyLister::open(node, listing, &bounds, ignore).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(READ_AHEAD);
        let task = tokio::spawn(async move {
            loop {
                let next = lister.next_chunk().await;
                let stop = !matches!(next, Ok(Some(_)));
                let item = match next {
                    Ok(Some(chunk)) => Ok(chunk),
                    Ok(None) => break,
                    Err(e) => Err(e),
                };
                if tx.send(item).await.is_err() || stop {
                    break;
                }
            }
        });
        Ok(KeyChunks { rx, task })
    }

    /// The next chunk, or `None` when the listing is complete.
    pub async fn next(&mut self) -> Result<Option<Vec<KeyInfo>>, MigrationError> {
        self.rx.recv().await.transpose()
    }
}

impl Drop for KeyChunks {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_exptimes() {
        assert_eq!(Expiry::from_scan(0, 1000), Some(Expiry::Never));
        assert_eq!(Expiry::from_scan(-1, 1000), Some(Expiry::Sticky));
        assert_eq!(Expiry::from_scan(-2, 1000), None);
        assert_eq!(Expiry::from_scan(10, 1000), Some(Expiry::At(1010)));
    }

    #[test]
    fn metadump_times_are_moved_to_our_clock() {
        // The server's clock runs 100 s ahead of ours: an item it says expires at its 5000
        // expires at our 4900.
        assert_eq!(
            Expiry::from_metadump(Some(5000), 4000, 3900),
            Expiry::At(4900)
        );
        assert_eq!(Expiry::from_metadump(None, 4000, 3900), Expiry::Never);
    }

    #[test]
    fn remaining_ttl() {
        let now = 1_700_000_000;
        assert_eq!(Expiry::Never.exptime_at(now), TtlArg::Exptime(0));
        assert_eq!(Expiry::Sticky.exptime_at(now), TtlArg::Exptime(-1));
        assert_eq!(Expiry::At(now + 7).exptime_at(now), TtlArg::Exptime(7));
        assert_eq!(Expiry::At(now + 1).exptime_at(now), TtlArg::Exptime(1));
        // No whole second left, or already past: expired, not copied.
        assert_eq!(Expiry::At(now).exptime_at(now), TtlArg::Expired);
        assert_eq!(Expiry::At(now - 5).exptime_at(now), TtlArg::Expired);
        // Up to 30 days: relative seconds.
        assert_eq!(
            Expiry::At(now + REALTIME_MAXDELTA).exptime_at(now),
            TtlArg::Exptime(REALTIME_MAXDELTA)
        );
        // Beyond: memcached would read the relative value as a unix time in 1970, so pass the
        // absolute time.
        assert_eq!(
            Expiry::At(now + REALTIME_MAXDELTA + 1).exptime_at(now),
            TtlArg::Exptime(now + REALTIME_MAXDELTA + 1)
        );
        assert!(Expiry::At(now).is_expired_at(now));
        assert!(!Expiry::Never.is_expired_at(now));
    }
}
