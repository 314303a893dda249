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
/// in `ignore` (the migration's own watermark key, ARCUS's `arcus:zk-ping`). `op_timeout`
/// bounds each command, `list_timeout` the whole listing (metadump's `BUSY` is retried
/// within it).
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
        deadline: Instant::now() + list_timeout,
    };
    let keys = match listing {
        Listing::Scan => scan_all(node, &bounds).await?,
        Listing::Metadump => metadump(node, &bounds).await?,
    };
    Ok(keys
        .into_iter()
        .filter(|k| !ignore.contains(&k.key.as_str()))
        .collect())
}

/// The step named in listing errors.
const LISTING: &str = "listing keys";

/// What bounds one listing: each command, and the whole of it (ending at `deadline`).
struct Bounds {
    op_timeout: Duration,
    list_timeout: Duration,
    deadline: Instant,
}

async fn scan_all(node: &str, bounds: &Bounds) -> Result<Vec<KeyInfo>, MigrationError> {
    let admin = AdminClient::with_timeout(node, bounds.op_timeout);
    let opts = ScanOptions {
        count: Some(1000),
        ..ScanOptions::default()
    };
    let mut cursor = "0".to_string();
    let mut out = Vec::new();
    loop {
        if Instant::now() >= bounds.deadline {
            return Err(MigrationError::ListTimeout {
                node: node.to_string(),
                timeout: bounds.list_timeout,
            });
        }
        let page = admin.scan_keys(&cursor, &opts).await.step(LISTING)?;
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
            return Ok(out);
        }
        cursor = page.next_cursor;
    }
}

async fn metadump(node: &str, bounds: &Bounds) -> Result<Vec<KeyInfo>, MigrationError> {
    let admin = AdminClient::with_timeout(node, bounds.op_timeout);
    let dump_admin = AdminClient::with_timeout(node, bounds.list_timeout);
    let mut backoff = Duration::from_millis(20);
    loop {
        // Our clock and the server's, read together, to place metadump's absolute times.
        let stats = admin.stats(None).await.step(LISTING)?;
        let local_now = unix_now();
        let server_now: i64 = stats
            .get("time")
            .and_then(|t| t.parse().ok())
            .unwrap_or(local_now);
        match dump_admin.metadump_all().await {
            Ok(entries) => {
                return Ok(entries
                    .into_iter()
                    .map(|e| KeyInfo {
                        expiry: Expiry::from_metadump(e.exp, server_now, local_now),
                        key: e.key,
                        item_type: ItemType::KeyValue,
                        cas: Some(e.cas),
                    })
                    .filter(|k| !k.expiry.is_expired_at(local_now))
                    .collect());
            }
            // Another crawl (ours from a parallel listing, or someone else's) is running.
            Err(ClientError::Server { message, .. })
                if message.starts_with("BUSY") && Instant::now() + backoff < bounds.deadline =>
            {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
            Err(e) => return Err(e).step(LISTING),
        }
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
