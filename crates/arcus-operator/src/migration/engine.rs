//! The executor: pass 1, pass 2, the add-only copy, progress.

use super::collection::{self, CollectionCopy};
use super::copied::CopiedKeys;
use super::keys::{self, unix_now, Bounds, KeyChunks, KeyInfo, Listing, TtlArg};
use super::plan::{self, Hashing, SourcePlan};
use super::rules::{self, Copied, Decision, SourceState, TargetState, Watermarks};
use super::{MigrationError, Step};
use arcus_client::connection::{ConnError, StoreOp, StoreReply};
use arcus_client::protocol::{Item, StoreCommand, StoreStatus};
use arcus_client::{ItemType, NodePools, PoolLimits, Ring};
use futures::stream::{self, StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tracing::{debug, info, warn};

type Result<T, E = MigrationError> = std::result::Result<T, E>;

/// The marker key whose CAS unique is a node's watermark. Never migrated.
pub const WATERMARK_KEY: &str = "arcus-operator:migration-watermark";
/// Keys never migrated: our marker, and ARCUS's heartbeat key (each node writes its own).
const IGNORED_KEYS: &[&str] = &[WATERMARK_KEY, "arcus:zk-ping"];

/// The `exptime` that makes a stored item expired at once on stock memcached and ARCUS alike:
/// a value over 30 days is an absolute unix time, and one at or before the server's start makes
/// `realtime()` answer 1, which is already past. (`-1` would mean "sticky" on ARCUS, so negative
/// values are not portable.) `cas <key> 0 EXPIRED_EXPTIME 0 <unique>` is therefore a
/// compare-and-delete over the classic ascii protocol.
pub const EXPIRED_EXPTIME: i64 = 30 * 24 * 3600 + 1;

/// Pass 1 tries a key this many times (an `add`, then `cas` over what the target holds) before
/// counting it failed.
const PASS1_ATTEMPTS: usize = 4;

/// Reply buffer of a migration connection: batches of values arrive in bulk.
const READ_BUFFER: usize = 64 * 1024;

/// Tuning and behaviour. `MigrationOptions::default()` gives the documented values.
#[derive(Clone, Debug)]
pub struct MigrationOptions {
    /// Keys per `gets` and per pipelined batch of storage commands. Default 100.
    pub batch: usize,
    /// Batches in flight per source node (each on its own connections). Default 4.
    pub concurrency_per_node: usize,
    /// Bound of one batch operation on one node (a `gets`, a pipeline). Default 5 s.
    pub op_timeout: Duration,
    /// Bound of reading one chunk of a node's key listing (and of waiting for its crawler, on
    /// stock memcached). Default 120 s.
    pub list_timeout: Duration,
    /// Keys per chunk of a listing: a listing is read and copied a chunk at a time, never held
    /// whole. Default 10,000 (about 1 MB of keys).
    pub list_chunk: usize,
    /// Retries of a failed or timed-out batch (each retry starts the batch over, which is safe:
    /// every write is conditional). Default 3.
    pub retries: u32,
    /// Pass-1 rounds at most (the first copies everything, later ones what changed since the
    /// previous round started). Default 3.
    pub max_rounds: u32,
    /// Pass 1 stops after a catch-up round that copied at most this many keys. Default 200.
    pub settle_keys: u64,
    /// Hash keys as the clients do (shard keys off by default, as in the Java client).
    pub hashing: Hashing,
    /// After pass 2 (or the add-only copy), compare-and-delete the moved items on sources
    /// that stay in the ring (scale-out). Default false (ARCUS's auto-scrub removes them).
    pub delete_moved_from_sources: bool,
}

impl Default for MigrationOptions {
    fn default() -> Self {
        MigrationOptions {
            batch: 100,
            concurrency_per_node: 4,
            op_timeout: Duration::from_secs(5),
            list_timeout: Duration::from_secs(120),
            list_chunk: 10_000,
            retries: 3,
            max_rounds: 3,
            settle_keys: 200,
            hashing: Hashing::default(),
            delete_moved_from_sources: false,
        }
    }
}

/// Where a migration is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    #[default]
    Idle,
    /// Pass 1, round `n` (1 = full copy, later = catch-up).
    Pass1 {
        round: u32,
    },
    /// Pass 1 done: waiting for the caller to change the ring.
    RingChange,
    /// Pass 2 (or the add-only copy).
    Pass2,
    Done,
}

/// Counters, cumulative over the whole migration; `items_done / items_total` is the
/// "moved / to move" of the status.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    pub phase: Phase,
    /// Moved keys the listings found work for (grows as rounds find changed keys).
    pub items_total: u64,
    /// Of those, decided and done (whatever the outcome).
    pub items_done: u64,
    /// Stored on their new owner (`add`, or `cas` over a stale copy).
    pub items_moved: u64,
    /// Our copies updated in pass 2 because the source changed after pass 1.
    pub items_updated: u64,
    /// Our copies compare-and-deleted because the source item was deleted before the change.
    pub items_deleted: u64,
    /// Already right on the target.
    pub items_unchanged: u64,
    /// Expired (or with no whole second left) when read: not copied.
    pub items_skipped_expired: u64,
    /// The target holds newer client data: kept.
    pub items_skipped_newer: u64,
    /// A client deleted it on the target after the change: not recreated.
    pub items_skipped_deleted: u64,
    /// Gone from the source between listing and reading.
    pub items_gone: u64,
    /// Refused by the target (e.g. out of memory) after retries.
    pub items_failed: u64,
    /// Value bytes written to targets.
    pub bytes: u64,
    /// Moved items compare-and-deleted on sources that stay (scale-out cleanup).
    pub source_items_deleted: u64,
    /// Listed keys on sources that their node did not own on the ring before (stale; not moved).
    pub items_not_owned: u64,
}

impl Progress {
    fn add(&mut self, t: &Tally) {
        self.items_total += t.total;
        self.items_done += t.done();
        self.items_moved += t.moved;
        self.items_updated += t.updated;
        self.items_deleted += t.deleted;
        self.items_unchanged += t.unchanged;
        self.items_skipped_expired += t.expired;
        self.items_skipped_newer += t.newer;
        self.items_skipped_deleted += t.kept_deleted;
        self.items_gone += t.gone;
        self.items_failed += t.failed;
        self.bytes += t.bytes;
        self.source_items_deleted += t.source_deleted;
    }
}

/// One batch's counts, applied to [`Progress`] once the batch succeeded.
#[derive(Default, Debug)]
struct Tally {
    total: u64,
    moved: u64,
    updated: u64,
    deleted: u64,
    unchanged: u64,
    expired: u64,
    newer: u64,
    kept_deleted: u64,
    gone: u64,
    failed: u64,
    bytes: u64,
    source_deleted: u64,
}

impl Tally {
    fn done(&self) -> u64 {
        self.moved
            + self.updated
            + self.deleted
            + self.unchanged
            + self.expired
            + self.newer
            + self.kept_deleted
            + self.gone
            + self.failed
    }
}

/// A node's watermark and the identity of the process it was read from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeMark {
    /// CAS unique of [`WATERMARK_KEY`] just stored.
    pub cas: u64,
    /// `stats time - uptime`: the server's start, constant for one process.
    pub process_started: i64,
    pub pid: u64,
}

/// What pass 2 needs from pass 1, small enough for a CR status: watermarks per node.
/// `Checkpoint::default()` (no watermarks) makes pass 2 an add-only copy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Checkpoint {
    /// `C_S`: taken when pass 1's last round started, per source.
    pub sources: BTreeMap<String, NodeMark>,
    /// `W_T`: taken after pass 1, before the ring change, per target.
    pub targets: BTreeMap<String, NodeMark>,
    /// Every key pass 1 listed was copied (no per-key failure).
    pub complete: bool,
    /// Per target, its CAS before pass 1 began, when the target's own items are to be kept: a
    /// healed node that kept serving while it was out of `cache_list` (its session expired with
    /// zkfailstop off). Pass 2 does not take an item at or below it for a copy of ours: the
    /// sweep keeps it. Empty: every item on a target is ours to judge (a new or restarted node).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub kept: BTreeMap<String, u64>,
}

/// A migration between two rings. See the module docs for the sequence.
pub struct Migration {
    before: Ring,
    after: Ring,
    opts: MigrationOptions,
    sources: Vec<String>,
    targets: Vec<String>,
    pools: NodePools,
    listings: Mutex<HashMap<String, Listing>>,
    progress: watch::Sender<Progress>,
    /// Pass 1's memory: per source, the keys it stored on their target (compact, see
    /// [`CopiedKeys`]). `None` until a pass 1 of this object started.
    copied: Mutex<Option<HashMap<String, Memory>>>,
}

/// One source's memory of copied keys, shared by the batches in flight.
type Memory = Arc<Mutex<CopiedKeys>>;

impl std::fmt::Debug for Migration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Migration")
            .field("before", &self.before.nodes())
            .field("after", &self.after.nodes())
            .field("sources", &self.sources)
            .field("targets", &self.targets)
            .finish()
    }
}

/// One unit of copying work from a source (owning its chunk's keys).
enum Job {
    /// Key-value batch to a target, with the CAS below which a key is unchanged (pass 1).
    Kv(String, Vec<KeyInfo>, Option<u64>),
    Collection(String, KeyInfo),
}

/// `items` in batches of `n` (at least 1), without copying them.
fn into_batches<T>(items: Vec<T>, n: usize) -> Vec<Vec<T>> {
    let mut out = Vec::with_capacity(items.len().div_ceil(n.max(1)));
    let mut it = items.into_iter().peekable();
    while it.peek().is_some() {
        out.push(it.by_ref().take(n.max(1)).collect());
    }
    out
}

/// One key-value copy of pass 1: the key, the source's item, the exptime to store it with.
struct KvCopy<'a> {
    key: &'a str,
    item: &'a Item,
    exptime: i64,
}

impl<'a> KvCopy<'a> {
    fn op(&self, cmd: StoreCommand) -> StoreOp<'a> {
        StoreOp {
            cmd,
            key: self.key,
            flags: self.item.flags,
            exptime: self.exptime,
            data: &self.item.value,
        }
    }
}

/// A pass-2 write and what it is for: the decision and the value bytes it carries.
type Pass2Write<'a> = (StoreOp<'a>, Decision, u64);

/// `cas <key> 0 EXPIRED_EXPTIME 0 <unique>`: deletes `key` if its CAS unique is still `cas`.
fn compare_and_delete(key: &str, cas: u64) -> StoreOp<'_> {
    StoreOp {
        cmd: StoreCommand::Cas(cas),
        key,
        flags: 0,
        exptime: EXPIRED_EXPTIME,
        data: b"",
    }
}

fn key_names(keys: &[KeyInfo]) -> Vec<&str> {
    keys.iter().map(|k| k.key.as_str()).collect()
}

/// The process identity in a node's `stats`: (`time - uptime`, its start; `pid`).
fn identity_in(stats: &BTreeMap<String, String>) -> (i64, u64) {
    let num = |k: &str| stats.get(k).and_then(|v| v.parse::<i64>().ok());
    (
        num("time").unwrap_or(0) - num("uptime").unwrap_or(0),
        num("pid").unwrap_or(0) as u64,
    )
}

/// Which listed `keys` pass 1 stores, given the source's items: a key gone from the source, or
/// unchanged since the previous round (`prev`), is not; an expired one is counted, not stored.
fn pass1_copies<'a>(
    keys: &'a [KeyInfo],
    s_items: &'a HashMap<String, Item>,
    prev: Option<u64>,
    now: i64,
    t: &mut Tally,
) -> Vec<KvCopy<'a>> {
    let mut copies = Vec::with_capacity(keys.len());
    for k in keys {
        let Some(item) = s_items.get(&k.key) else {
            if prev.is_none() {
                t.total += 1;
                t.gone += 1;
            }
            continue;
        };
        if let (Some(p), Some(c)) = (prev, item.cas) {
            if c <= p {
                continue; // unchanged since the previous round copied it
            }
        }
        t.total += 1;
        match k.expiry.exptime_at(now) {
            TtlArg::Expired => t.expired += 1,
            TtlArg::Exptime(exptime) => copies.push(KvCopy {
                key: &k.key,
                item,
                exptime,
            }),
        }
    }
    copies
}

/// Counts the replies to one attempt of pass 1's writes; returns the copies to try again (the
/// target held the key, or it changed under our `cas`).
fn tally_pass1<'c, 'a>(
    target: &str,
    batch: &[(&'c KvCopy<'a>, StoreCommand)],
    replies: Vec<StoreReply>,
    t: &mut Tally,
    stored: &mut Vec<String>,
) -> Vec<&'c KvCopy<'a>> {
    let mut again = Vec::new();
    for ((copy, _), r) in batch.iter().zip(replies) {
        match r {
            Ok(StoreStatus::Stored) => {
                t.moved += 1;
                t.bytes += copy.item.value.len() as u64;
                stored.push(copy.key.to_string());
            }
            Ok(_) => again.push(*copy),
            Err(msg) => {
                warn!(target, key = copy.key, %msg, "target refused a copy");
                t.failed += 1;
            }
        }
    }
    again
}

/// The rules' decision for one moved key in pass 2, with the `exptime` to write it with.
fn pass2_decision(
    k: &KeyInfo,
    s_item: Option<&Item>,
    t_item: Option<&Item>,
    copied: Copied,
    wm: Watermarks,
    cleaning: bool,
    now: i64,
) -> (Decision, i64) {
    let ttl = k.expiry.exptime_at(now);
    let s = s_item.map(|i| SourceState {
        cas: i.cas.unwrap_or_default(),
        expired: ttl == TtlArg::Expired,
    });
    let t = t_item.map(|ti| TargetState {
        cas: ti.cas.unwrap_or_default(),
        same_as_source: s_item.is_some_and(|si| si.value == ti.value && si.flags == ti.flags),
    });
    let exptime = match ttl {
        TtlArg::Exptime(e) => e,
        TtlArg::Expired => EXPIRED_EXPTIME,
    };
    let decide = if cleaning {
        rules::decide_cleaning
    } else {
        rules::decide
    };
    (decide(s, t, copied, wm), exptime)
}

/// The write a pass-2 decision asks for, or `None` (counted in `t`) when it asks for none.
fn pass2_write<'a>(
    key: &'a str,
    d: Decision,
    s_item: Option<&'a Item>,
    exptime: i64,
    t: &mut Tally,
) -> Option<StoreOp<'a>> {
    let write = |cmd, i: &'a Item| StoreOp {
        cmd,
        key,
        flags: i.flags,
        exptime,
        data: &i.value,
    };
    match (d, s_item) {
        (Decision::Add, Some(i)) => Some(write(StoreCommand::Add, i)),
        (Decision::Update { expect }, Some(i)) => Some(write(StoreCommand::Cas(expect), i)),
        (Decision::Delete { expect }, _) => Some(compare_and_delete(key, expect)),
        (Decision::UpToDate, _) => {
            t.unchanged += 1;
            None
        }
        (Decision::Absent | Decision::KeepCopy, None) => {
            t.gone += 1;
            None
        }
        (Decision::Absent, Some(_)) => {
            t.expired += 1;
            None
        }
        (Decision::KeepNewer, _) => {
            t.newer += 1;
            None
        }
        (Decision::KeepDeleted, _) => {
            t.kept_deleted += 1;
            None
        }
        (Decision::KeepCopy, Some(_)) => unreachable!("kept for a missing source item"),
        (Decision::Add | Decision::Update { .. }, None) => {
            unreachable!("decided on a source item")
        }
    }
}

/// Counts the replies to pass 2's writes.
fn tally_pass2(target: &str, writes: &[Pass2Write<'_>], replies: Vec<StoreReply>, t: &mut Tally) {
    for ((_, d, len), r) in writes.iter().zip(replies) {
        match (d, r) {
            (Decision::Add, Ok(StoreStatus::Stored)) => {
                t.moved += 1;
                t.bytes += len;
            }
            (Decision::Update { .. }, Ok(StoreStatus::Stored)) => {
                t.updated += 1;
                t.bytes += len;
            }
            (Decision::Delete { .. }, Ok(StoreStatus::Stored)) => t.deleted += 1,
            // A client wrote (or deleted) it between our read and our write: theirs wins.
            (_, Ok(_)) => t.newer += 1,
            (_, Err(msg)) => {
                warn!(target, %msg, "target refused a pass-2 write");
                t.failed += 1;
            }
        }
    }
}

impl Migration {
    /// A migration from the ring `before` to the ring `after` (any change of membership).
    pub fn new(before: Ring, after: Ring, opts: MigrationOptions) -> Result<Migration> {
        if after.is_empty() {
            return Err(MigrationError::Invalid(
                "the ring after has no node: nowhere to move keys".into(),
            ));
        }
        if opts.batch == 0 || opts.concurrency_per_node == 0 {
            return Err(MigrationError::Invalid(
                "batch and concurrency_per_node must be at least 1".into(),
            ));
        }
        let (sources, targets) = plan::sources_and_targets(&before, &after);
        // Every source runs `concurrency_per_node` batches at once, each holding one connection
        // at a time: this many connections to one node are never all busy.
        let nodes = before.len() + after.len();
        let pools = NodePools::new(PoolLimits {
            max_connections: nodes.saturating_mul(opts.concurrency_per_node),
            connect_timeout: opts.op_timeout,
            op_timeout: opts.op_timeout,
            read_buffer: READ_BUFFER,
        });
        Ok(Migration {
            before,
            after,
            opts,
            sources: sources.into_iter().collect(),
            targets: targets.into_iter().collect(),
            pools,
            listings: Mutex::new(HashMap::new()),
            progress: watch::Sender::new(Progress::default()),
            copied: Mutex::new(None),
        })
    }

    pub fn ring_before(&self) -> &Ring {
        &self.before
    }

    pub fn ring_after(&self) -> &Ring {
        &self.after
    }

    /// Nodes that give keys away (listed in each pass).
    pub fn sources(&self) -> &[String] {
        &self.sources
    }

    /// Nodes that receive keys.
    pub fn targets(&self) -> &[String] {
        &self.targets
    }

    /// A receiver of the progress, updated after every batch.
    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.progress.subscribe()
    }

    /// The progress now.
    pub fn progress_now(&self) -> Progress {
        self.progress.borrow().clone()
    }

    fn set_phase(&self, phase: Phase) {
        self.progress.send_modify(|p| p.phase = phase);
    }

    fn record(&self, t: &Tally) {
        self.progress.send_modify(|p| p.add(t));
    }

    /// `gets` of `keys` on `node` (one command).
    async fn gets(&self, node: &str, keys: &[&str]) -> arcus_client::Result<HashMap<String, Item>> {
        self.pools
            .run(node, "gets", async |c| c.gets_many(keys).await)
            .await
    }

    /// The storage commands `ops` on `node`, pipelined (`op` names them in errors).
    async fn store(
        &self,
        node: &str,
        op: &'static str,
        ops: &[StoreOp<'_>],
    ) -> arcus_client::Result<Vec<StoreReply>> {
        self.pools
            .run(node, op, async |c| c.store_many(ops).await)
            .await
    }

    /// How `node` lists its keys (asked once, then remembered).
    pub async fn listing(&self, node: &str) -> Result<Listing> {
        if let Some(l) = self.listings.lock().unwrap().get(node) {
            return Ok(*l);
        }
        let l = keys::detect_listing(node, self.opts.op_timeout).await?;
        info!(node, listing = ?l, "key listing");
        self.listings.lock().unwrap().insert(node.to_string(), l);
        Ok(l)
    }

    /// Every key of `node` (see [`keys::enumerate`]).
    pub async fn enumerate(&self, node: &str) -> Result<Vec<KeyInfo>> {
        let listing = self.listing(node).await?;
        keys::enumerate(
            node,
            listing,
            self.opts.op_timeout,
            self.opts.list_timeout,
            IGNORED_KEYS,
        )
        .await
    }

    /// The listing of `node`, a chunk at a time (read ahead by at most a few chunks).
    async fn chunks(&self, node: &str) -> Result<KeyChunks> {
        let listing = self.listing(node).await?;
        let bounds = Bounds {
            op_timeout: self.opts.op_timeout,
            list_timeout: self.opts.list_timeout,
            chunk: self.opts.list_chunk,
        };
        KeyChunks::open(node, listing, bounds, IGNORED_KEYS).await
    }

    /// Lists `node` a chunk at a time and runs the jobs `plan` makes of each chunk, up to
    /// `concurrency_per_node` at once and across chunk boundaries (the next chunk's first jobs
    /// start as the previous chunk's last ones finish): (keys stored, any failed). Memory is a
    /// few chunks, whatever the node's key count.
    async fn stream_jobs<J, P, F, Fut>(
        &self,
        node: &str,
        mut plan: P,
        run: F,
    ) -> Result<(u64, bool)>
    where
        P: FnMut(Vec<KeyInfo>) -> Vec<J>,
        F: Fn(J) -> Fut,
        Fut: std::future::Future<Output = Result<(u64, bool)>>,
    {
        let chunks = self.chunks(node).await?;
        stream::try_unfold(chunks, |mut c| async move {
            Ok(c.next().await?.map(|chunk| (chunk, c)))
        })
        .map_ok(move |chunk| stream::iter(plan(chunk)).map(Ok::<J, MigrationError>))
        .try_flatten()
        .map_ok(run)
        .try_buffer_unordered(self.opts.concurrency_per_node)
        .try_fold(
            (0, false),
            |(n, f), (m, g)| async move { Ok((n + m, f || g)) },
        )
        .await
    }

    /// Runs `f` up to `1 + retries` times, backing off between attempts; the last error is
    /// reported as a failure of `step`.
    async fn retry<T, F, Fut>(&self, step: &'static str, mut f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = arcus_client::Result<T>>,
    {
        let mut delay = Duration::from_millis(50);
        let mut attempt = 0;
        loop {
            match f().await {
                Ok(v) => return Ok(v),
                Err(e) if attempt < self.opts.retries => {
                    warn!(error = %e, attempt, "{step} failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                    attempt += 1;
                }
                Err(e) => return Err(e).step(step),
            }
        }
    }

    /// Stores [`WATERMARK_KEY`] on `node` and reads back its CAS unique, with the process
    /// identity from `stats`.
    pub async fn watermark(&self, node: &str) -> Result<NodeMark> {
        self.retry("watermark", || {
            self.pools.run(node, "watermark", async |c| {
                let token = unix_now().to_string();
                let set = c.store(StoreCommand::Set, WATERMARK_KEY, 0, 0, token.as_bytes());
                match set.await? {
                    StoreStatus::Stored => {}
                    other => {
                        return Err(ConnError::Protocol(format!(
                            "storing the watermark answered {other:?}"
                        )))
                    }
                }
                let items = c.gets_many(&[WATERMARK_KEY]).await?;
                let cas = items.get(WATERMARK_KEY).and_then(|i| i.cas);
                let Some(cas) = cas.filter(|&c| c != 0) else {
                    return Err(ConnError::Protocol(
                        "no CAS unique on the watermark (CAS disabled with -C?)".into(),
                    ));
                };
                let (process_started, pid) = identity_in(&c.stats(None).await?);
                Ok(NodeMark {
                    cas,
                    process_started,
                    pid,
                })
            })
        })
        .await
    }

    /// The process identity of `node` now (to see whether it restarted since a mark).
    async fn identity(&self, node: &str) -> Result<(i64, u64)> {
        self.retry("stats", || {
            self.pools.run(node, "stats", async |c| {
                Ok(identity_in(&c.stats(None).await?))
            })
        })
        .await
    }

    /// `curr_items` of `node`: what pass 1's memory of copied keys is sized for.
    async fn item_count(&self, node: &str) -> Result<usize> {
        self.retry("stats", || {
            self.pools.run(node, "stats", async |c| {
                let stats = c.stats(None).await?;
                Ok(stats
                    .get("curr_items")
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0))
            })
        })
        .await
    }

    /// Pass 1's memory of the keys copied from `source`, if a pass 1 of this object started.
    fn memory(&self, source: &str) -> Option<Memory> {
        self.copied.lock().unwrap().as_ref()?.get(source).cloned()
    }

    /// `mark.cas` when `node` is still the process that mark was read from, else 0 (a restarted
    /// node's counter started over, so its uniques say nothing about before and after).
    async fn valid_mark(&self, node: &str, mark: Option<&NodeMark>) -> Result<u64> {
        let Some(mark) = mark else { return Ok(0) };
        let (started, pid) = self.identity(node).await?;
        // `time - uptime` can move by a second when the two are read across a tick.
        if pid == mark.pid && (started - mark.process_started).abs() <= 1 {
            Ok(mark.cas)
        } else {
            warn!(
                node,
                "node restarted since its watermark was taken; treating all its items as unknown"
            );
            Ok(0)
        }
    }

    // ---------------------------------------------------------------- pass 1

    /// Pass 1, while the ring BEFORE is live. Returns the checkpoint for [`Migration::pass2`].
    /// May be run again (e.g. after an error or an operator restart) as long as the ring has
    /// not changed yet.
    pub async fn pass1(&self) -> Result<Checkpoint> {
        let mut memory = HashMap::new();
        for s in &self.sources {
            let expected = self.item_count(s).await?;
            memory.insert(
                s.clone(),
                Arc::new(Mutex::new(CopiedKeys::with_capacity(expected))),
            );
        }
        *self.copied.lock().unwrap() = Some(memory);
        let mut prev: BTreeMap<String, u64> = BTreeMap::new();
        let mut marks: BTreeMap<String, NodeMark> = BTreeMap::new();
        let mut failed = false;
        for round in 1..=self.opts.max_rounds.max(1) {
            self.set_phase(Phase::Pass1 { round });
            if let Some(memory) = self.copied.lock().unwrap().as_ref() {
                for m in memory.values() {
                    m.lock().unwrap().start_round();
                }
            }
            let results = futures::future::join_all(
                self.sources
                    .iter()
                    .map(|s| self.pass1_source(s, prev.get(s).copied())),
            )
            .await;
            let mut copied = 0;
            for (s, r) in self.sources.iter().zip(results) {
                let (mark, stored, round_failed) = r?;
                prev.insert(s.clone(), mark.cas);
                marks.insert(s.clone(), mark);
                copied += stored;
                failed |= round_failed;
            }
            info!(round, copied, "pass 1 round done");
            if round >= 2 && copied <= self.opts.settle_keys {
                break;
            }
        }
        self.recheck_copies().await?;
        let mut targets = BTreeMap::new();
        for t in &self.targets {
            targets.insert(t.clone(), self.watermark(t).await?);
        }
        self.set_phase(Phase::RingChange);
        Ok(Checkpoint {
            sources: marks,
            targets,
            complete: !failed,
            kept: BTreeMap::new(),
        })
    }

    /// Drops from pass 1's memory the key-value copies no longer on their target, so pass 2
    /// copies those keys again if their source still has them, instead of taking the absence
    /// for a client's delete after the ring change. Before the change no client writes these
    /// keys to the target, but a client's delete can still reach it: arcus-client sends a delete
    /// to the key's owners on recent rings too, and a node held out of the ring, or a new node
    /// on a reused address, was such an owner. Pass 1 calls this last, just before the ring
    /// changes; returns how many copies were gone (of keys still on their source: the sources
    /// are listed again, as the memory is a filter that cannot be enumerated).
    pub async fn recheck_copies(&self) -> Result<u64> {
        let Some(memory) = self.copied.lock().unwrap().clone() else {
            return Ok(0);
        };
        let results = futures::future::join_all(
            self.sources
                .iter()
                .filter_map(|s| Some(self.recheck_source(s, memory.get(s)?))),
        )
        .await;
        let mut gone = 0;
        for r in results {
            gone += r?;
        }
        if gone > 0 {
            info!(
                gone,
                "copies deleted on their target before the ring change; pass 2 copies them again"
            );
        }
        Ok(gone)
    }

    /// [`Migration::recheck_copies`] for one source: lists it again (pass 1's memory cannot be
    /// enumerated) and looks for each moved key-value item it remembers as copied on its
    /// target. A remembered key that is a false positive of the memory and not on its target
    /// is corrected here too.
    async fn recheck_source(&self, source: &str, memory: &Memory) -> Result<u64> {
        let (gone, _) = self
            .stream_jobs(
                source,
                |chunk| {
                    let sp = plan::plan_source(
                        &self.before,
                        &self.after,
                        source,
                        chunk,
                        self.opts.hashing,
                    );
                    let m = memory.lock().unwrap();
                    let mut jobs = Vec::new();
                    for (target, keys) in sp.moves {
                        let copied: Vec<KeyInfo> = keys
                            .into_iter()
                            .filter(|k| k.item_type == ItemType::KeyValue)
                            .filter(|k| m.copied(&k.key) == Copied::Yes)
                            .collect();
                        for b in into_batches(copied, self.opts.batch) {
                            jobs.push((target.clone(), b));
                        }
                    }
                    jobs
                },
                |(target, keys)| async move {
                    let names = key_names(&keys);
                    let found = self
                        .retry("copy check", || self.gets(&target, &names))
                        .await?;
                    let mut m = memory.lock().unwrap();
                    let mut gone = 0;
                    for k in keys.into_iter().filter(|k| !found.contains_key(&k.key)) {
                        m.forget(k.key);
                        gone += 1;
                    }
                    Ok((gone, false))
                },
            )
            .await?;
        Ok(gone)
    }

    /// One round on one source: (its mark taken before listing, keys stored, any failure).
    async fn pass1_source(&self, source: &str, prev: Option<u64>) -> Result<(NodeMark, u64, bool)> {
        let mark = self.watermark(source).await?;
        let memory = self.memory(source);
        let memory = memory.as_ref();
        let plan_chunk = |chunk| {
            let sp = plan::plan_source(&self.before, &self.after, source, chunk, self.opts.hashing);
            if prev.is_none() {
                self.progress
                    .send_modify(|p| p.items_not_owned += sp.not_owned as u64);
            }
            self.pass1_jobs(sp, prev, memory)
        };
        let (stored, failed) = self
            .stream_jobs(source, plan_chunk, |job| async move {
                match job {
                    Job::Kv(target, keys, prev) => {
                        self.retry("pass 1 batch", || {
                            self.pass1_batch(source, &target, &keys, prev, memory)
                        })
                        .await
                    }
                    Job::Collection(target, key) => {
                        self.copy_collection(source, &target, &key, true, true)
                            .await
                    }
                }
            })
            .await?;
        Ok((mark, stored, failed))
    }

    /// The work of one chunk of a pass-1 round on a source. Later rounds (`prev`: the CAS the
    /// previous round started at) copy what changed since (metadump's CAS tells before
    /// reading), and every key no earlier round stored (by `memory`): a listing may miss keys
    /// (memcached's LRU crawler can skip items the LRU maintainer moves under it).
    fn pass1_jobs(&self, sp: SourcePlan, prev: Option<u64>, memory: Option<&Memory>) -> Vec<Job> {
        let memory = memory.map(|m| m.lock().unwrap());
        let known = |k: &KeyInfo| {
            prev.is_some()
                && memory
                    .as_ref()
                    .is_some_and(|m| m.copied(&k.key) == Copied::Yes)
        };
        let mut jobs = Vec::new();
        for (target, keys) in sp.moves {
            let (mut changed, mut missed) = (Vec::new(), Vec::new());
            for k in keys {
                let known = known(&k);
                if k.item_type != ItemType::KeyValue {
                    // No CAS tells whether a collection changed: each is copied once per
                    // pass 1 (see the module docs), not again in every round.
                    if !known {
                        jobs.push(Job::Collection(target.clone(), k));
                    }
                    continue;
                }
                match (prev, k.cas) {
                    (Some(p), Some(c)) if c <= p && known => {} // unchanged since copied
                    _ if known => changed.push(k),
                    _ => missed.push(k),
                }
            }
            for b in into_batches(changed, self.opts.batch) {
                jobs.push(Job::Kv(target.clone(), b, prev));
            }
            for b in into_batches(missed, self.opts.batch) {
                jobs.push(Job::Kv(target.clone(), b, None));
            }
        }
        jobs
    }

    fn remember<'k>(&self, memory: Option<&Memory>, keys: impl IntoIterator<Item = &'k str>) {
        if let Some(m) = memory {
            let mut m = m.lock().unwrap();
            for k in keys {
                m.insert(k);
            }
        }
    }

    /// Copies one batch in pass 1: (keys stored, any failed).
    async fn pass1_batch(
        &self,
        source: &str,
        target: &str,
        keys: &[KeyInfo],
        prev: Option<u64>,
        memory: Option<&Memory>,
    ) -> arcus_client::Result<(u64, bool)> {
        let s_items = self.gets(source, &key_names(keys)).await?;
        let mut t = Tally::default();
        let copies = pass1_copies(keys, &s_items, prev, unix_now(), &mut t);
        let stored = self.store_copies(target, &copies, &mut t).await?;
        let n = stored.len() as u64;
        self.remember(memory, stored.iter().map(String::as_str));
        self.record(&t);
        Ok((n, t.failed > 0))
    }

    /// Stores pass 1's `copies` on `target`: `add`; where refused, compare with the target's
    /// copy and replace it with `cas` (the target does not own these keys yet, so its copy is
    /// a leftover, or ours). Returns the keys now right on the target.
    async fn store_copies(
        &self,
        target: &str,
        copies: &[KvCopy<'_>],
        t: &mut Tally,
    ) -> arcus_client::Result<Vec<String>> {
        let mut stored = Vec::new();
        let mut pending: Vec<&KvCopy> = copies.iter().collect();
        for attempt in 0..PASS1_ATTEMPTS {
            if pending.is_empty() {
                break;
            }
            let batch = match attempt {
                0 => pending.iter().map(|c| (*c, StoreCommand::Add)).collect(),
                _ => self.replacements(target, &pending, t, &mut stored).await?,
            };
            let ops: Vec<StoreOp> = batch.iter().map(|(c, cmd)| c.op(*cmd)).collect();
            let replies = self.store(target, "add", &ops).await?;
            pending = tally_pass1(target, &batch, replies, t, &mut stored);
        }
        if !pending.is_empty() {
            warn!(
                target,
                n = pending.len(),
                "keys kept changing on the target during pass 1"
            );
            t.failed += pending.len() as u64;
        }
        Ok(stored)
    }

    /// For copies the target refused to `add`: the command that replaces what the target holds
    /// now (`add` again if it is gone, `cas` over it otherwise); a copy already equal to it is
    /// counted unchanged and stored.
    async fn replacements<'c, 'a>(
        &self,
        target: &str,
        pending: &[&'c KvCopy<'a>],
        t: &mut Tally,
        stored: &mut Vec<String>,
    ) -> arcus_client::Result<Vec<(&'c KvCopy<'a>, StoreCommand)>> {
        let names: Vec<&str> = pending.iter().map(|c| c.key).collect();
        let t_items = self.gets(target, &names).await?;
        let mut batch = Vec::with_capacity(pending.len());
        for &copy in pending {
            let cmd = match t_items.get(copy.key) {
                None => StoreCommand::Add,
                Some(ti) if ti.value == copy.item.value && ti.flags == copy.item.flags => {
                    t.unchanged += 1;
                    stored.push(copy.key.to_string());
                    continue;
                }
                Some(ti) => StoreCommand::Cas(ti.cas.unwrap_or_default()),
            };
            batch.push((copy, cmd));
        }
        Ok(batch)
    }

    // ---------------------------------------------------------------- pass 2

    /// Pass 2, once the ring AFTER is live and clients use it. `cp` is what pass 1 returned
    /// (or was saved in the status); the memory of pass 1 in this object is used when present.
    /// May be run again: it converges.
    pub async fn pass2(&self, cp: &Checkpoint) -> Result<Progress> {
        self.set_phase(Phase::Pass2);
        let mut wm_source = HashMap::new();
        for s in &self.sources {
            let v = self.valid_mark(s, cp.sources.get(s)).await?;
            // A pass 1 with failures copied less than its watermark says.
            wm_source.insert(s.clone(), if cp.complete { v } else { 0 });
        }
        let mut wm_target = HashMap::new();
        for t in &self.targets {
            wm_target.insert(t.clone(), self.valid_mark(t, cp.targets.get(t)).await?);
        }
        // First our copies of items deleted on their source before the change (see
        // `pass2_sweep` for why first), then every moved key listed on the sources. A run that
        // cleans up the sources leaves that to the run before it (`rules::decide_cleaning`).
        let cleaning = self.opts.delete_moved_from_sources;
        let sweeps = futures::future::join_all(
            self.targets
                .iter()
                .filter(|t| wm_target[*t] != 0 && !cleaning)
                .map(|t| self.pass2_sweep(t, wm_target[t], cp.kept.get(t).copied().unwrap_or(0))),
        )
        .await;
        for r in sweeps {
            r?;
        }
        let memory = self.copied.lock().unwrap().clone();
        let results = futures::future::join_all(self.sources.iter().map(|s| {
            // A pass 1 of this object that copied nothing from `s` remembers an empty set.
            let memory = memory.as_ref().map(|m| {
                m.get(s)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Mutex::new(CopiedKeys::with_capacity(0))))
            });
            self.pass2_source(s, memory, wm_source[s], &wm_target)
        }))
        .await;
        for r in results {
            r?;
        }
        self.set_phase(Phase::Done);
        Ok(self.progress_now())
    }

    /// Our copies of items deleted on their source between pass 1 and the ring change, found
    /// by listing the target (pass 1's memory cannot be enumerated): every key on `target` it
    /// owns on the ring after, that a source owned before, stored before the change
    /// (`cas <= W_T`), and gone from that source, is compare-and-deleted. Runs before the
    /// sources' pass, whose scale-out cleanup deletes moved items from their sources: after
    /// that, "gone from the source" would no longer mean "deleted by a client".
    ///
    /// `kept`: items at or below it were the target's own before pass 1 (see
    /// [`Checkpoint::kept`]), not copies: they stay.
    async fn pass2_sweep(&self, target: &str, w_t: u64, kept: u64) -> Result<()> {
        let plan_chunk = |chunk: Vec<KeyInfo>| {
            let mut per_source: BTreeMap<&str, Vec<String>> = BTreeMap::new();
            for k in chunk {
                if k.cas.is_some_and(|c| c > w_t) {
                    continue; // a client's write after the change
                }
                if k.cas.is_some_and(|c| c <= kept) {
                    continue; // the node's own item from before pass 1
                }
                let h = self.opts.hashing.hash(&k.key);
                if self.after.node_for_hash(h) != Some(target) {
                    continue;
                }
                let Some(s) = self.before.node_for_hash(h) else {
                    continue;
                };
                if s != target && self.sources.iter().any(|x| x == s) {
                    per_source.entry(s).or_default().push(k.key);
                }
            }
            let mut jobs = Vec::new();
            for (s, keys) in per_source {
                for b in into_batches(keys, self.opts.batch) {
                    jobs.push((s.to_string(), b));
                }
            }
            jobs
        };
        self.stream_jobs(target, plan_chunk, |(source, keys)| async move {
            self.retry("pass 2 deletions", || {
                self.pass2_gone_batch(&source, target, &keys, w_t, kept)
            })
            .await?;
            Ok((0, false))
        })
        .await?;
        Ok(())
    }

    // ------------------------------------------- after nodes were let back in together

    /// After the nodes of the ring were let back into an empty `cache_list` one after another
    /// (a ZooKeeper outage expired all their sessions at once): what clients wrote on a node in
    /// those milliseconds for a key it does not own (their ring was partial) goes to the key's
    /// owner, unless the owner was written since it was back, and is then removed where it
    /// landed. `marks` are the nodes' CAS watermarks taken before the first rejoin: only items
    /// stored after them are moved (older items a node does not own are leftovers, not
    /// writes). Key-value items only: a collection created in those milliseconds stays where
    /// it landed.
    pub async fn return_misrouted(&self, marks: &BTreeMap<String, u64>) -> Result<Progress> {
        let nodes = self.after.nodes().to_vec();
        let sources = nodes
            .iter()
            .filter_map(|n| Some((n.as_str(), *marks.get(n)?)));
        self.move_misrouted(sources, marks).await
    }

    /// Nodes that were briefly in the ring and are out of it again (a joining node between
    /// registering and being taken out): every key-value item on them is a client's write,
    /// made while their ring had the node, for a key the node owned only in that ring (another
    /// joining node held out owns it in the final one). Each goes to its owner on the ring
    /// AFTER (which does not hold `strays_on`), unless the owner stored the key after its
    /// mark in `owner_marks` (taken before: written by a client that had left the node), and
    /// is then removed from the node. Key-value items only, as [`Self::return_misrouted`].
    pub async fn return_strays(
        &self,
        strays_on: &[String],
        owner_marks: &BTreeMap<String, u64>,
    ) -> Result<Progress> {
        let sources = strays_on.iter().map(|n| (n.as_str(), 0));
        self.move_misrouted(sources, owner_marks).await
    }

    /// Moves the key-value items stored on each `(node, mark)` after its mark to their owners
    /// on the ring AFTER, all nodes at once ([`Self::misrouted_on`]).
    async fn move_misrouted<'n>(
        &self,
        sources: impl Iterator<Item = (&'n str, u64)>,
        owner_marks: &BTreeMap<String, u64>,
    ) -> Result<Progress> {
        self.set_phase(Phase::Pass2);
        let results = futures::future::join_all(
            sources.map(|(node, mark)| self.misrouted_on(node, mark, owner_marks)),
        )
        .await;
        for r in results {
            r?;
        }
        self.set_phase(Phase::Done);
        Ok(self.progress_now())
    }

    /// [`Migration::return_misrouted`] for the items on `node`.
    async fn misrouted_on(
        &self,
        node: &str,
        mark: u64,
        marks: &BTreeMap<String, u64>,
    ) -> Result<()> {
        let plan_chunk = |chunk: Vec<KeyInfo>| {
            let mut per_owner: BTreeMap<String, Vec<KeyInfo>> = BTreeMap::new();
            for k in chunk {
                // A listing that reports CAS uniques (metadump) spares the reads of leftovers.
                if k.item_type != ItemType::KeyValue || k.cas.is_some_and(|c| c <= mark) {
                    continue;
                }
                let owner = self.after.node_for_hash(self.opts.hashing.hash(&k.key));
                if let Some(owner) = owner.filter(|o| *o != node) {
                    per_owner.entry(owner.to_string()).or_default().push(k);
                }
            }
            per_owner
                .into_iter()
                .flat_map(|(owner, keys)| {
                    into_batches(keys, self.opts.batch)
                        .into_iter()
                        .map(move |b| (owner.clone(), b))
                })
                .collect::<Vec<_>>()
        };
        self.stream_jobs(node, plan_chunk, |(owner, keys)| async move {
            let owner_mark = marks.get(&owner).copied().unwrap_or(0);
            self.retry("misrouted writes", || {
                self.misrouted_batch(node, &owner, &keys, mark, owner_mark)
            })
            .await
        })
        .await?;
        Ok(())
    }

    async fn misrouted_batch(
        &self,
        node: &str,
        owner: &str,
        keys: &[KeyInfo],
        mark: u64,
        owner_mark: u64,
    ) -> arcus_client::Result<(u64, bool)> {
        let here = self.gets(node, &key_names(keys)).await?;
        let written: Vec<&KeyInfo> = keys
            .iter()
            .filter(|k| {
                here.get(&k.key)
                    .and_then(|i| i.cas)
                    .is_some_and(|c| c > mark)
            })
            .collect();
        if written.is_empty() {
            return Ok((0, false));
        }
        let names: Vec<&str> = written.iter().map(|k| k.key.as_str()).collect();
        let there = self.gets(owner, &names).await?;
        let now = unix_now();
        let mut t = Tally {
            total: written.len() as u64,
            ..Tally::default()
        };
        let mut ops = Vec::new();
        for k in &written {
            let item = &here[&k.key];
            let exptime = match k.expiry.exptime_at(now) {
                TtlArg::Exptime(e) => e,
                TtlArg::Expired => {
                    t.expired += 1;
                    continue;
                }
            };
            let cmd = match there.get(&k.key).map(|o| o.cas.unwrap_or_default()) {
                None => StoreCommand::Add,
                // Written on its owner since the owner was back: newer than ours.
                Some(cas) if cas > owner_mark => {
                    t.newer += 1;
                    continue;
                }
                Some(cas) => StoreCommand::Cas(cas),
            };
            ops.push(StoreOp {
                cmd,
                key: &k.key,
                flags: item.flags,
                exptime,
                data: &item.value,
            });
        }
        let replies = self.store(owner, "misrouted writes", &ops).await?;
        let mut refused = HashSet::new();
        for (op, r) in ops.iter().zip(&replies) {
            match r {
                Ok(StoreStatus::Stored) => {
                    t.moved += 1;
                    t.bytes += op.data.len() as u64;
                }
                // A client wrote it on the owner meanwhile: theirs wins.
                Ok(_) => t.newer += 1,
                Err(msg) => {
                    warn!(owner, %msg, "owner refused a misrouted write");
                    t.failed += 1;
                    refused.insert(op.key);
                }
            }
        }
        let cleanup: Vec<StoreOp> = written
            .iter()
            .filter(|k| !refused.contains(k.key.as_str()))
            .filter_map(|k| Some(compare_and_delete(&k.key, here.get(&k.key)?.cas?)))
            .collect();
        let removed = self.store(node, "misrouted cleanup", &cleanup).await?;
        t.source_deleted += removed
            .iter()
            .filter(|r| matches!(r, Ok(StoreStatus::Stored)))
            .count() as u64;
        self.record(&t);
        Ok((t.moved, t.failed > 0))
    }

    /// Scale-out after the new nodes joined the ring: pass 2 with no watermarks, an add-only
    /// copy from the previous owners (see the module docs for its resurrection window).
    pub async fn copy_after_join(&self) -> Result<Progress> {
        *self.copied.lock().unwrap() = None;
        self.pass2(&Checkpoint::default()).await
    }

    /// Pass 2 on one source: its moved keys, listed a chunk at a time.
    async fn pass2_source(
        &self,
        source: &str,
        memory: Option<Memory>,
        c_s: u64,
        wm_target: &HashMap<String, u64>,
    ) -> Result<()> {
        let cleanup = self.opts.delete_moved_from_sources && self.after.contains(source);
        let memory = memory.as_ref();
        let plan_chunk = |chunk| {
            let sp = plan::plan_source(&self.before, &self.after, source, chunk, self.opts.hashing);
            self.progress
                .send_modify(|p| p.items_not_owned += sp.not_owned as u64);
            self.pass2_jobs(sp)
        };
        self.stream_jobs(source, plan_chunk, |job| async move {
            match job {
                Job::Kv(target, keys, _) => {
                    let wm = Watermarks {
                        source: c_s,
                        target: wm_target.get(&target).copied().unwrap_or(0),
                    };
                    self.retry("pass 2 batch", || {
                        self.pass2_batch(source, &target, &keys, wm, memory, cleanup)
                    })
                    .await
                }
                Job::Collection(_, key)
                    if memory
                        .is_some_and(|m| m.lock().unwrap().copied(&key.key) == Copied::Yes) =>
                {
                    Ok((0, false))
                }
                Job::Collection(target, key) => {
                    self.copy_collection(source, &target, &key, false, true)
                        .await
                }
            }
        })
        .await?;
        Ok(())
    }

    /// The moved keys of one chunk of a source in pass 2, as jobs.
    fn pass2_jobs(&self, sp: SourcePlan) -> Vec<Job> {
        let mut jobs = Vec::new();
        for (target, keys) in sp.moves {
            let (kv, colls): (Vec<KeyInfo>, Vec<KeyInfo>) = keys
                .into_iter()
                .partition(|k| k.item_type == ItemType::KeyValue);
            for b in into_batches(kv, self.opts.batch) {
                jobs.push(Job::Kv(target.clone(), b, None));
            }
            jobs.extend(
                colls
                    .into_iter()
                    .map(|c| Job::Collection(target.clone(), c)),
            );
        }
        jobs
    }

    /// One batch of pass 2: (keys moved or updated, any failed).
    async fn pass2_batch(
        &self,
        source: &str,
        target: &str,
        keys: &[KeyInfo],
        wm: Watermarks,
        memory: Option<&Memory>,
        cleanup: bool,
    ) -> arcus_client::Result<(u64, bool)> {
        let names = key_names(keys);
        let s_items = self.gets(source, &names).await?;
        let t_items = self.gets(target, &names).await?;
        let now = unix_now();
        let copied: Vec<Copied> = match memory {
            Some(m) => {
                let m = m.lock().unwrap();
                keys.iter()
                    .map(|k| {
                        let cas = s_items.get(&k.key).and_then(|i| i.cas);
                        m.copied_given(&k.key, cas.is_some_and(|c| c > wm.source))
                    })
                    .collect()
            }
            None => vec![Copied::Unknown; keys.len()],
        };
        let mut t = Tally {
            total: keys.len() as u64,
            ..Tally::default()
        };
        let mut writes: Vec<Pass2Write> = Vec::new();
        for (k, copied) in keys.iter().zip(copied) {
            let s_item = s_items.get(&k.key);
            let t_item = t_items.get(&k.key);
            let (d, exptime) = pass2_decision(k, s_item, t_item, copied, wm, cleanup, now);
            if let Some(op) = pass2_write(&k.key, d, s_item, exptime, &mut t) {
                writes.push((op, d, s_item.map_or(0, |i| i.value.len() as u64)));
            }
        }
        let ops: Vec<StoreOp> = writes.iter().map(|(op, ..)| *op).collect();
        let replies = self.store(target, "pass 2 writes", &ops).await?;
        // A key whose copy the target refused stays on its source.
        let refused: HashSet<&str> = writes
            .iter()
            .zip(&replies)
            .filter(|(_, r)| r.is_err())
            .map(|((op, ..), _)| op.key)
            .collect();
        tally_pass2(target, &writes, replies, &mut t);
        if cleanup {
            let confirmed: Vec<&KeyInfo> = keys
                .iter()
                .filter(|k| !refused.contains(k.key.as_str()))
                .collect();
            t.source_deleted += self.delete_moved(source, &confirmed, &s_items).await?;
        }
        self.record(&t);
        Ok((t.moved + t.updated, t.failed > 0))
    }

    /// Compare-and-deletes the moved `keys` on a source that stays in the ring (scale-out
    /// cleanup), each only if unchanged since it was read (`s_items`); returns how many went.
    async fn delete_moved(
        &self,
        source: &str,
        keys: &[&KeyInfo],
        s_items: &HashMap<String, Item>,
    ) -> arcus_client::Result<u64> {
        let ops: Vec<StoreOp> = keys
            .iter()
            .filter_map(|k| Some(compare_and_delete(&k.key, s_items.get(&k.key)?.cas?)))
            .collect();
        let replies = self.store(source, "source cleanup", &ops).await?;
        Ok(replies
            .iter()
            .filter(|r| matches!(r, Ok(StoreStatus::Stored)))
            .count() as u64)
    }

    /// Keys no longer on `source` whose copy may be on `target`: compare-and-delete our copies.
    async fn pass2_gone_batch(
        &self,
        source: &str,
        target: &str,
        keys: &[String],
        w_t: u64,
        kept: u64,
    ) -> arcus_client::Result<()> {
        let names: Vec<&str> = keys.iter().map(String::as_str).collect();
        let s_items = self.gets(source, &names).await?;
        // A key written again on the source after its listing (a client with a stale ring) is
        // not ours to judge from here; the next pass 2 run sees it listed.
        let names: Vec<&str> = names
            .into_iter()
            .filter(|k| !s_items.contains_key(*k))
            .collect();
        if names.is_empty() {
            return Ok(());
        }
        let t_items = self.gets(target, &names).await?;
        let mut t = Tally::default();
        let mut ops = Vec::new();
        let wm = Watermarks {
            source: 0,
            target: w_t,
        };
        for k in &names {
            t.total += 1;
            let tt = t_items.get(*k).map(|i| TargetState {
                cas: i.cas.unwrap_or_default(),
                same_as_source: false,
            });
            match rules::decide(None, tt, Copied::Unknown, wm) {
                Decision::Delete { expect } if expect <= kept => t.unchanged += 1,
                Decision::Delete { expect } => ops.push(compare_and_delete(k, expect)),
                Decision::KeepNewer => t.newer += 1,
                _ => t.gone += 1,
            }
        }
        for r in self.store(target, "compare-and-delete", &ops).await? {
            match r {
                Ok(StoreStatus::Stored) => t.deleted += 1,
                Ok(_) => t.newer += 1,
                Err(_) => t.failed += 1,
            }
        }
        debug!(
            source,
            target,
            deleted = t.deleted,
            "copies of deleted items"
        );
        self.record(&t);
        Ok(())
    }

    // ---------------------------------------------------------------- collections

    /// Copies one collection (ARCUS). `replace`: a copy already on the target is a leftover
    /// (pass 1) and is replaced; otherwise an existing target item is kept. `count_total`
    /// adds the key to `items_total`.
    async fn copy_collection(
        &self,
        source: &str,
        target: &str,
        key: &KeyInfo,
        replace: bool,
        count_total: bool,
    ) -> Result<(u64, bool)> {
        let mut t = Tally {
            total: count_total as u64,
            ..Tally::default()
        };
        let (src, tgt) = (self.pools.pool(source), self.pools.pool(target));
        let outcome = self
            .retry("collection copy", || {
                collection::copy(&src, &tgt, &key.key, key.item_type, replace)
            })
            .await?;
        let mut stored = 0;
        match outcome {
            CollectionCopy::Copied { bytes, .. } => {
                t.moved += 1;
                t.bytes += bytes;
                stored = 1;
                self.remember(self.memory(source).as_ref(), [key.key.as_str()]);
            }
            CollectionCopy::Exists => t.newer += 1,
            CollectionCopy::Gone => t.gone += 1,
            CollectionCopy::Expired => t.expired += 1,
            CollectionCopy::Unreadable => {
                warn!(source, key = %key.key, "unreadable collection not copied");
                t.failed += 1;
            }
        }
        self.record(&t);
        Ok((stored, t.failed > 0))
    }
}

/// Scale-in: nodes leave; their items go to the remaining nodes. Sequence:
/// [`ScaleIn::pass1`] (leaving nodes still in `cache_list`) → the caller removes them from the
/// ring and waits for clients to follow → [`ScaleIn::pass2`] → the nodes may stop.
#[derive(Debug)]
pub struct ScaleIn {
    migration: Migration,
    checkpoint: Option<Checkpoint>,
}

impl ScaleIn {
    /// `before`: the ring now; `leaving`: addresses (`ip:port`) about to leave it.
    pub fn new(before: Ring, leaving: &[String], opts: MigrationOptions) -> Result<ScaleIn> {
        for l in leaving {
            if !before.contains(l) {
                return Err(MigrationError::Invalid(format!(
                    "leaving node {l} is not on the ring"
                )));
            }
        }
        let after = Ring::new(
            before
                .nodes()
                .iter()
                .filter(|n| !leaving.contains(n))
                .cloned(),
        );
        Ok(ScaleIn {
            migration: Migration::new(before, after, opts)?,
            checkpoint: None,
        })
    }

    /// An operator restarted after the ring change: pass 2 with the saved checkpoint.
    pub fn resume(
        before: Ring,
        leaving: &[String],
        checkpoint: Checkpoint,
        opts: MigrationOptions,
    ) -> Result<ScaleIn> {
        let mut s = ScaleIn::new(before, leaving, opts)?;
        s.checkpoint = Some(checkpoint);
        Ok(s)
    }

    pub fn migration(&self) -> &Migration {
        &self.migration
    }

    pub fn ring_after(&self) -> &Ring {
        self.migration.ring_after()
    }

    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.migration.progress()
    }

    pub fn checkpoint(&self) -> Option<&Checkpoint> {
        self.checkpoint.as_ref()
    }

    /// Pass 1; keep the returned checkpoint (status) before changing the ring.
    pub async fn pass1(&mut self) -> Result<Checkpoint> {
        let cp = self.migration.pass1().await?;
        self.checkpoint = Some(cp.clone());
        Ok(cp)
    }

    /// Pass 2, after the ring change. Without a checkpoint (none taken, none resumed) this is
    /// an add-only copy.
    pub async fn pass2(&mut self) -> Result<Progress> {
        let cp = self.checkpoint.clone().unwrap_or_default();
        self.migration.pass2(&cp).await
    }
}

/// Scale-out: nodes join; the items they now own are copied from their previous owners.
/// Either [`ScaleOut::copy`] right after they joined (add-only; see the module docs for its
/// window), or, when the new nodes can be kept out of `cache_list` until the copy is done,
/// [`ScaleOut::pass1`] → join → [`ScaleOut::pass2`].
#[derive(Debug)]
pub struct ScaleOut {
    migration: Migration,
    checkpoint: Option<Checkpoint>,
}

impl ScaleOut {
    /// `before`: the ring without the new nodes; `joining`: their addresses.
    pub fn new(before: Ring, joining: &[String], opts: MigrationOptions) -> Result<ScaleOut> {
        let after = Ring::new(before.nodes().iter().chain(joining).cloned());
        Ok(ScaleOut {
            migration: Migration::new(before, after, opts)?,
            checkpoint: None,
        })
    }

    pub fn migration(&self) -> &Migration {
        &self.migration
    }

    pub fn ring_after(&self) -> &Ring {
        self.migration.ring_after()
    }

    pub fn progress(&self) -> watch::Receiver<Progress> {
        self.migration.progress()
    }

    /// Add-only copy after the new nodes joined the ring.
    pub async fn copy(&self) -> Result<Progress> {
        self.migration.copy_after_join().await
    }

    /// Two-pass form, pass 1: the new nodes run but are not in the ring yet.
    pub async fn pass1(&mut self) -> Result<Checkpoint> {
        let cp = self.migration.pass1().await?;
        self.checkpoint = Some(cp.clone());
        Ok(cp)
    }

    /// Two-pass form, pass 2: after the new nodes joined.
    pub async fn pass2(&mut self) -> Result<Progress> {
        let cp = self.checkpoint.clone().unwrap_or_default();
        self.migration.pass2(&cp).await
    }
}
