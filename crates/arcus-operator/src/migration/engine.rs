//! The executor: pass 1, pass 2, the add-only copy, progress.

use super::collection::{self, CollectionCopy};
use super::conn::{NodePool, StoreOp, EXPIRED_EXPTIME};
use super::keys::{self, unix_now, KeyInfo, Listing, TtlArg};
use super::plan::{self, Hashing};
use super::rules::{self, Copied, Decision, SourceState, TargetState, Watermarks};
use super::MigrationError;
use arcus_client::protocol::{Item, StoreCommand, StoreStatus};
use arcus_client::{ItemType, Ring};
use futures::stream::{self, StreamExt};
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

/// Tuning and behaviour. `MigrationOptions::default()` gives the documented values.
#[derive(Clone, Debug)]
pub struct MigrationOptions {
    /// Keys per `gets` and per pipelined batch of storage commands. Default 100.
    pub batch: usize,
    /// Batches in flight per source node (each on its own connections). Default 4.
    pub concurrency_per_node: usize,
    /// Bound of one batch operation on one node (a `gets`, a pipeline). Default 5 s.
    pub op_timeout: Duration,
    /// Bound of listing one node's keys. Default 120 s.
    pub list_timeout: Duration,
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
}

/// A migration between two rings. See the module docs for the sequence.
pub struct Migration {
    before: Ring,
    after: Ring,
    opts: MigrationOptions,
    sources: Vec<String>,
    targets: Vec<String>,
    pools: HashMap<String, Arc<NodePool>>,
    listings: Mutex<HashMap<String, Listing>>,
    progress: watch::Sender<Progress>,
    /// Pass 1's memory: per source, the keys it stored on their target. `None` until a pass 1
    /// of this object completed.
    copied: Mutex<Option<HashMap<String, HashSet<String>>>>,
    /// Collections among `copied` (not readable with `gets`).
    copied_collections: Mutex<HashSet<String>>,
}

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
        let pools = before
            .nodes()
            .iter()
            .chain(after.nodes())
            .map(|n| (n.clone(), Arc::new(NodePool::new(n, opts.op_timeout))))
            .collect();
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
            copied_collections: Mutex::new(HashSet::new()),
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

    fn pool(&self, node: &str) -> &NodePool {
        &self.pools[node]
    }

    fn set_phase(&self, phase: Phase) {
        self.progress.send_modify(|p| p.phase = phase);
    }

    fn record(&self, t: &Tally) {
        self.progress.send_modify(|p| p.add(t));
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

    /// Runs `f` up to `1 + retries` times, backing off between attempts.
    async fn retry<T, F, Fut>(&self, what: &str, mut f: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let mut delay = Duration::from_millis(50);
        let mut attempt = 0;
        loop {
            match f().await {
                Ok(v) => return Ok(v),
                Err(e) if attempt < self.opts.retries => {
                    warn!(error = %e, attempt, "{what} failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Stores [`WATERMARK_KEY`] on `node` and reads back its CAS unique, with the process
    /// identity from `stats`.
    pub async fn watermark(&self, node: &str) -> Result<NodeMark> {
        self.retry("watermark", || async {
            self.pool(node)
                .run("watermark", async |c| {
                    let token = unix_now().to_string();
                    let op = StoreOp {
                        cmd: StoreCommand::Set,
                        key: WATERMARK_KEY,
                        flags: 0,
                        exptime: 0,
                        data: token.as_bytes(),
                    };
                    match c.store_many(std::slice::from_ref(&op)).await?.pop() {
                        Some(Ok(StoreStatus::Stored)) => {}
                        other => {
                            return Err(super::conn::ConnError::Protocol(format!(
                                "storing the watermark answered {other:?}"
                            )))
                        }
                    }
                    let items = c.gets_many(&[WATERMARK_KEY]).await?;
                    let cas = items
                        .get(WATERMARK_KEY)
                        .and_then(|i| i.cas)
                        .unwrap_or_default();
                    if cas == 0 {
                        return Err(super::conn::ConnError::Protocol(
                            "no CAS unique on the watermark (CAS disabled with -C?)".into(),
                        ));
                    }
                    let stats = c.stats().await?;
                    let num = |k: &str| stats.get(k).and_then(|v| v.parse::<i64>().ok());
                    let process_started = num("time").unwrap_or(0) - num("uptime").unwrap_or(0);
                    let pid = num("pid").unwrap_or(0) as u64;
                    Ok(NodeMark {
                        cas,
                        process_started,
                        pid,
                    })
                })
                .await
        })
        .await
    }

    /// The process identity of `node` now (to see whether it restarted since a mark).
    async fn identity(&self, node: &str) -> Result<(i64, u64)> {
        self.retry("stats", || async {
            self.pool(node)
                .run("stats", async |c| {
                    let stats = c.stats().await?;
                    let num = |k: &str| stats.get(k).and_then(|v| v.parse::<i64>().ok());
                    Ok((
                        num("time").unwrap_or(0) - num("uptime").unwrap_or(0),
                        num("pid").unwrap_or(0) as u64,
                    ))
                })
                .await
        })
        .await
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
        *self.copied.lock().unwrap() = Some(HashMap::new());
        let mut prev: BTreeMap<String, u64> = BTreeMap::new();
        let mut marks: BTreeMap<String, NodeMark> = BTreeMap::new();
        let mut failed = false;
        for round in 1..=self.opts.max_rounds.max(1) {
            self.set_phase(Phase::Pass1 { round });
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
        })
    }

    /// Drops from pass 1's memory the key-value copies no longer on their target, so pass 2
    /// copies those keys again if their source still has them, instead of taking the absence
    /// for a client's delete after the ring change. Before the change no client writes these
    /// keys to the target, but a client's delete can still reach it: arcus-client sends a delete
    /// to the key's owners on recent rings too, and a node held out of the ring, or a new node
    /// on a reused address, was such an owner. Pass 1 calls this last, just before the ring
    /// changes; returns how many copies were gone.
    pub async fn recheck_copies(&self) -> Result<u64> {
        let Some(memory) = self.copied.lock().unwrap().clone() else {
            return Ok(0);
        };
        let collections = self.copied_collections.lock().unwrap().clone();
        let mut jobs: Vec<(String, String, Vec<String>)> = Vec::new();
        for (source, keys) in &memory {
            let mut per_target: BTreeMap<&str, Vec<String>> = BTreeMap::new();
            for k in keys.iter().filter(|k| !collections.contains(*k)) {
                if let Some(t) = plan::owner(&self.after, k, self.opts.hashing) {
                    per_target.entry(t).or_default().push(k.clone());
                }
            }
            for (target, keys) in per_target {
                for chunk in keys.chunks(self.opts.batch) {
                    jobs.push((source.clone(), target.to_string(), chunk.to_vec()));
                }
            }
        }
        let results: Vec<Result<(String, Vec<String>)>> = stream::iter(jobs)
            .map(|(source, target, keys)| async move {
                let names: Vec<&str> = keys.iter().map(String::as_str).collect();
                let found = self
                    .retry("copy check", || async {
                        self.pool(&target)
                            .run("gets", async |c| c.gets_many(&names).await)
                            .await
                    })
                    .await?;
                let gone = keys.iter().filter(|k| !found.contains_key(*k)).cloned();
                Ok((source, gone.collect()))
            })
            .buffer_unordered(self.opts.concurrency_per_node)
            .collect()
            .await;
        let mut gone = 0;
        let mut memory = self.copied.lock().unwrap();
        for r in results {
            let (source, keys) = r?;
            if let Some(copied) = memory.as_mut().and_then(|m| m.get_mut(&source)) {
                for k in keys {
                    copied.remove(&k);
                    gone += 1;
                }
            }
        }
        if gone > 0 {
            info!(
                gone,
                "copies deleted on their target before the ring change; pass 2 copies them again"
            );
        }
        Ok(gone)
    }

    /// One round on one source: (its mark taken before listing, keys stored, any failure).
    async fn pass1_source(&self, source: &str, prev: Option<u64>) -> Result<(NodeMark, u64, bool)> {
        let mark = self.watermark(source).await?;
        let listed = self.enumerate(source).await?;
        let sp = plan::plan_source(&self.before, &self.after, source, listed, self.opts.hashing);
        if prev.is_none() {
            self.progress
                .send_modify(|p| p.items_not_owned += sp.not_owned as u64);
        }
        // Later rounds copy what changed since the previous round started (metadump's CAS
        // tells before reading), and every key no earlier round stored: a listing may miss
        // keys (memcached's LRU crawler can skip items the LRU maintainer moves under it).
        let known: HashSet<String> = match prev {
            Some(_) => self
                .copied
                .lock()
                .unwrap()
                .as_ref()
                .and_then(|m| m.get(source).cloned())
                .unwrap_or_default(),
            None => HashSet::new(),
        };
        let mut jobs = Vec::new();
        for (target, keys) in &sp.moves {
            let (kv, colls): (Vec<&KeyInfo>, Vec<&KeyInfo>) = keys
                .iter()
                .filter(|k| match (prev, k.cas) {
                    (Some(p), Some(c)) => c > p || !known.contains(&k.key),
                    // No CAS tells whether a collection changed: each is copied once per
                    // pass 1 (see the module docs), not again in every round.
                    (Some(_), None) if k.item_type != ItemType::KeyValue => !known.contains(&k.key),
                    _ => true,
                })
                .partition(|k| k.item_type == ItemType::KeyValue);
            let (changed, missed): (Vec<&KeyInfo>, Vec<&KeyInfo>) = match prev {
                Some(_) => kv.into_iter().partition(|k| known.contains(&k.key)),
                None => (Vec::new(), kv),
            };
            for chunk in changed.chunks(self.opts.batch) {
                jobs.push(Job::Kv(target.as_str(), chunk.to_vec(), prev));
            }
            for chunk in missed.chunks(self.opts.batch) {
                jobs.push(Job::Kv(target.as_str(), chunk.to_vec(), None));
            }
            for c in colls {
                jobs.push(Job::Collection(target.as_str(), c));
            }
        }
        let results: Vec<Result<(u64, bool)>> = stream::iter(jobs)
            .map(|job| async move {
                match job {
                    Job::Kv(target, keys, prev) => {
                        self.retry("pass 1 batch", || {
                            self.pass1_batch(source, target, &keys, prev)
                        })
                        .await
                    }
                    Job::Collection(target, key) => {
                        self.copy_collection(source, target, key, true, true).await
                    }
                }
            })
            .buffer_unordered(self.opts.concurrency_per_node)
            .collect()
            .await;
        let mut stored = 0;
        let mut failed = false;
        for r in results {
            let (n, f) = r?;
            stored += n;
            failed |= f;
        }
        Ok((mark, stored, failed))
    }

    fn remember(&self, source: &str, keys: impl IntoIterator<Item = String>) {
        if let Some(m) = self.copied.lock().unwrap().as_mut() {
            m.entry(source.to_string()).or_default().extend(keys);
        }
    }

    /// Copies one batch in pass 1: (keys stored, any failed).
    async fn pass1_batch(
        &self,
        source: &str,
        target: &str,
        keys: &[&KeyInfo],
        prev: Option<u64>,
    ) -> Result<(u64, bool)> {
        let names: Vec<&str> = keys.iter().map(|k| k.key.as_str()).collect();
        let s_items = self
            .pool(source)
            .run("gets", async |c| c.gets_many(&names).await)
            .await?;
        let now = unix_now();
        let mut t = Tally::default();
        // (key, item, exptime) to store.
        let mut work: Vec<(&str, &Item, i64)> = Vec::new();
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
                TtlArg::Exptime(e) => work.push((&k.key, item, e)),
            }
        }
        let mut stored: Vec<String> = Vec::new();
        let mut pending: Vec<usize> = (0..work.len()).collect();
        let mut first = true;
        // add; where refused, compare with the target's copy and replace it with cas. The
        // target does not own these keys yet, so its copy is a leftover (or ours).
        for _ in 0..4 {
            if pending.is_empty() {
                break;
            }
            let mut ops = Vec::with_capacity(pending.len());
            let mut op_idx = Vec::with_capacity(pending.len());
            if first {
                for &i in &pending {
                    let (key, item, e) = work[i];
                    ops.push(StoreOp {
                        cmd: StoreCommand::Add,
                        key,
                        flags: item.flags,
                        exptime: e,
                        data: &item.value,
                    });
                    op_idx.push(i);
                }
            } else {
                let names: Vec<&str> = pending.iter().map(|&i| work[i].0).collect();
                let t_items = self
                    .pool(target)
                    .run("gets", async |c| c.gets_many(&names).await)
                    .await?;
                for &i in &pending {
                    let (key, item, e) = work[i];
                    let cmd = match t_items.get(key) {
                        None => StoreCommand::Add,
                        Some(ti) if ti.value == item.value && ti.flags == item.flags => {
                            t.unchanged += 1;
                            stored.push(key.to_string());
                            continue;
                        }
                        Some(ti) => StoreCommand::Cas(ti.cas.unwrap_or_default()),
                    };
                    ops.push(StoreOp {
                        cmd,
                        key,
                        flags: item.flags,
                        exptime: e,
                        data: &item.value,
                    });
                    op_idx.push(i);
                }
            }
            first = false;
            let replies = self
                .pool(target)
                .run("add", async |c| c.store_many(&ops).await)
                .await?;
            let mut next = Vec::new();
            for (&i, r) in op_idx.iter().zip(replies) {
                let (key, item, _) = work[i];
                match r {
                    Ok(StoreStatus::Stored) => {
                        t.moved += 1;
                        t.bytes += item.value.len() as u64;
                        stored.push(key.to_string());
                    }
                    Ok(_) => next.push(i),
                    Err(msg) => {
                        warn!(target, key, %msg, "target refused a copy");
                        t.failed += 1;
                    }
                }
            }
            pending = next;
        }
        if !pending.is_empty() {
            warn!(
                target,
                n = pending.len(),
                "keys kept changing on the target during pass 1"
            );
            t.failed += pending.len() as u64;
        }
        let n = stored.len() as u64;
        self.remember(source, stored);
        self.record(&t);
        Ok((n, t.failed > 0))
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
        let memory = self.copied.lock().unwrap().clone();
        // Keys on targets that may be our copies of items since deleted on their source (or
        // stale leftovers of an older ring whose source item is gone), per source: pass 1's
        // memory of copied keys, and the moved keys found by listing the targets.
        let mut candidates: HashMap<String, HashSet<String>> = match &memory {
            Some(m) => m.clone(),
            None => HashMap::new(),
        };
        {
            for t in &self.targets {
                if wm_target[t] == 0 {
                    continue;
                }
                for k in self.enumerate(t).await? {
                    let h = self.opts.hashing.hash(&k.key);
                    if self.after.node_for_hash(h) != Some(t.as_str()) {
                        continue;
                    }
                    if let Some(s) = self.before.node_for_hash(h) {
                        if s != t && wm_source.contains_key(s) {
                            candidates.entry(s.to_string()).or_default().insert(k.key);
                        }
                    }
                }
            }
        }
        let results = futures::future::join_all(self.sources.iter().map(|s| {
            let cands = candidates.remove(s).unwrap_or_default();
            let memory = memory
                .as_ref()
                .map(|m| m.get(s).cloned().unwrap_or_default());
            self.pass2_source(s, cands, memory, wm_source[s], &wm_target)
        }))
        .await;
        for r in results {
            r?;
        }
        self.set_phase(Phase::Done);
        Ok(self.progress_now())
    }

    /// Scale-out after the new nodes joined the ring: pass 2 with no watermarks, an add-only
    /// copy from the previous owners (see the module docs for its resurrection window).
    pub async fn copy_after_join(&self) -> Result<Progress> {
        *self.copied.lock().unwrap() = None;
        self.pass2(&Checkpoint::default()).await
    }

    async fn pass2_source(
        &self,
        source: &str,
        mut candidates: HashSet<String>,
        memory: Option<HashSet<String>>,
        c_s: u64,
        wm_target: &HashMap<String, u64>,
    ) -> Result<()> {
        let listed = self.enumerate(source).await?;
        let sp = plan::plan_source(&self.before, &self.after, source, listed, self.opts.hashing);
        self.progress
            .send_modify(|p| p.items_not_owned += sp.not_owned as u64);
        let cleanup = self.opts.delete_moved_from_sources && self.after.contains(source);
        let mut jobs = Vec::new();
        for (target, keys) in &sp.moves {
            for k in keys {
                candidates.remove(&k.key);
            }
            let (kv, colls): (Vec<&KeyInfo>, Vec<&KeyInfo>) =
                keys.iter().partition(|k| k.item_type == ItemType::KeyValue);
            for chunk in kv.chunks(self.opts.batch) {
                jobs.push(Job::Kv(target.as_str(), chunk.to_vec(), None));
            }
            for c in colls {
                jobs.push(Job::Collection(target.as_str(), c));
            }
        }
        // Keys gone from the source whose copies may still be on their target.
        let mut gone: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for k in candidates {
            if let Some(t) = plan::owner(&self.after, &k, self.opts.hashing) {
                if t != source {
                    gone.entry(t.to_string()).or_default().push(k);
                }
            }
        }
        let memory = memory.as_ref();
        let results: Vec<Result<(u64, bool)>> = stream::iter(jobs)
            .map(|job| async move {
                match job {
                    Job::Kv(target, keys, _) => {
                        let wm = Watermarks {
                            source: c_s,
                            target: wm_target.get(target).copied().unwrap_or(0),
                        };
                        self.retry("pass 2 batch", || {
                            self.pass2_batch(source, target, &keys, wm, memory, cleanup)
                        })
                        .await
                    }
                    Job::Collection(target, key) => {
                        let copied = memory.is_some_and(|m| m.contains(&key.key));
                        if copied {
                            return Ok((0, false));
                        }
                        self.copy_collection(source, target, key, false, true).await
                    }
                }
            })
            .buffer_unordered(self.opts.concurrency_per_node)
            .collect()
            .await;
        for r in results {
            r?;
        }
        let gone_jobs: Vec<(String, Vec<String>)> = gone
            .into_iter()
            .flat_map(|(t, keys)| {
                keys.chunks(self.opts.batch)
                    .map(|c| (t.clone(), c.to_vec()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let results: Vec<Result<()>> = stream::iter(gone_jobs)
            .map(|(target, keys)| async move {
                let wm = wm_target.get(&target).copied().unwrap_or(0);
                self.retry("pass 2 deletions", || {
                    self.pass2_gone_batch(source, &target, &keys, wm)
                })
                .await
            })
            .buffer_unordered(self.opts.concurrency_per_node)
            .collect()
            .await;
        for r in results {
            r?;
        }
        Ok(())
    }

    async fn pass2_batch(
        &self,
        source: &str,
        target: &str,
        keys: &[&KeyInfo],
        wm: Watermarks,
        memory: Option<&HashSet<String>>,
        cleanup: bool,
    ) -> Result<(u64, bool)> {
        let names: Vec<&str> = keys.iter().map(|k| k.key.as_str()).collect();
        let s_items = self
            .pool(source)
            .run("gets", async |c| c.gets_many(&names).await)
            .await?;
        let t_items = self
            .pool(target)
            .run("gets", async |c| c.gets_many(&names).await)
            .await?;
        let now = unix_now();
        let mut t = Tally {
            total: keys.len() as u64,
            ..Tally::default()
        };
        let mut ops: Vec<StoreOp> = Vec::new();
        let mut kinds: Vec<(Decision, u64)> = Vec::new();
        for k in keys {
            let s_item = s_items.get(&k.key);
            let t_item = t_items.get(&k.key);
            let ttl = k.expiry.exptime_at(now);
            let s = s_item.map(|i| SourceState {
                cas: i.cas.unwrap_or_default(),
                expired: ttl == TtlArg::Expired,
            });
            let tt = t_item.map(|ti| TargetState {
                cas: ti.cas.unwrap_or_default(),
                same_as_source: s_item
                    .is_some_and(|si| si.value == ti.value && si.flags == ti.flags),
            });
            let copied = match memory {
                Some(m) if m.contains(&k.key) => Copied::Yes,
                Some(_) => Copied::No,
                None => Copied::Unknown,
            };
            let d = rules::decide(s, tt, copied, wm);
            let exptime = match ttl {
                TtlArg::Exptime(e) => e,
                TtlArg::Expired => EXPIRED_EXPTIME,
            };
            let op = match (d, s_item) {
                (Decision::Add, Some(i)) => StoreOp {
                    cmd: StoreCommand::Add,
                    key: &k.key,
                    flags: i.flags,
                    exptime,
                    data: &i.value,
                },
                (Decision::Update { expect }, Some(i)) => StoreOp {
                    cmd: StoreCommand::Cas(expect),
                    key: &k.key,
                    flags: i.flags,
                    exptime,
                    data: &i.value,
                },
                (Decision::Delete { expect }, _) => StoreOp {
                    cmd: StoreCommand::Cas(expect),
                    key: &k.key,
                    flags: 0,
                    exptime: EXPIRED_EXPTIME,
                    data: b"",
                },
                (Decision::UpToDate, _) => {
                    t.unchanged += 1;
                    continue;
                }
                (Decision::Absent, _) => {
                    if s_item.is_none() {
                        t.gone += 1;
                    } else {
                        t.expired += 1;
                    }
                    continue;
                }
                (Decision::KeepNewer, _) => {
                    t.newer += 1;
                    continue;
                }
                (Decision::KeepDeleted, _) => {
                    t.kept_deleted += 1;
                    continue;
                }
                (Decision::Add | Decision::Update { .. }, None) => {
                    unreachable!("decided on a source item")
                }
            };
            kinds.push((d, s_item.map(|i| i.value.len() as u64).unwrap_or(0)));
            ops.push(op);
        }
        let replies = self
            .pool(target)
            .run("pass 2 writes", async |c| c.store_many(&ops).await)
            .await?;
        for ((d, len), r) in kinds.into_iter().zip(replies) {
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
        if cleanup {
            let ops: Vec<StoreOp> = keys
                .iter()
                .filter_map(|k| {
                    let i = s_items.get(&k.key)?;
                    Some(StoreOp {
                        cmd: StoreCommand::Cas(i.cas?),
                        key: &k.key,
                        flags: 0,
                        exptime: EXPIRED_EXPTIME,
                        data: b"",
                    })
                })
                .collect();
            let replies = self
                .pool(source)
                .run("source cleanup", async |c| c.store_many(&ops).await)
                .await?;
            t.source_deleted += replies
                .iter()
                .filter(|r| matches!(r, Ok(StoreStatus::Stored)))
                .count() as u64;
        }
        self.record(&t);
        Ok((t.moved + t.updated, t.failed > 0))
    }

    /// Keys no longer on `source` whose copy may be on `target`: compare-and-delete our copies.
    async fn pass2_gone_batch(
        &self,
        source: &str,
        target: &str,
        keys: &[String],
        w_t: u64,
    ) -> Result<()> {
        let names: Vec<&str> = keys.iter().map(String::as_str).collect();
        let s_items = self
            .pool(source)
            .run("gets", async |c| c.gets_many(&names).await)
            .await?;
        let t_items = self
            .pool(target)
            .run("gets", async |c| c.gets_many(&names).await)
            .await?;
        let mut t = Tally::default();
        let mut ops = Vec::new();
        for k in &names {
            if s_items.contains_key(*k) {
                // Written again on the source after its listing (a client with a stale ring):
                // not ours to judge from here; the next pass 2 run sees it listed.
                continue;
            }
            t.total += 1;
            let tt = t_items.get(*k).map(|i| TargetState {
                cas: i.cas.unwrap_or_default(),
                same_as_source: false,
            });
            let wm = Watermarks {
                source: 0,
                target: w_t,
            };
            match rules::decide(None, tt, Copied::Unknown, wm) {
                Decision::Delete { expect } => ops.push(StoreOp {
                    cmd: StoreCommand::Cas(expect),
                    key: k,
                    flags: 0,
                    exptime: EXPIRED_EXPTIME,
                    data: b"",
                }),
                Decision::KeepNewer => t.newer += 1,
                _ => t.gone += 1,
            }
        }
        let replies = self
            .pool(target)
            .run("compare-and-delete", async |c| c.store_many(&ops).await)
            .await?;
        for r in replies {
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
        let outcome = self
            .retry("collection copy", || {
                collection::copy(
                    self.pool(source),
                    self.pool(target),
                    &key.key,
                    key.item_type,
                    replace,
                )
            })
            .await?;
        let mut stored = 0;
        match outcome {
            CollectionCopy::Copied { bytes, .. } => {
                t.moved += 1;
                t.bytes += bytes;
                stored = 1;
                self.remember(source, [key.key.clone()]);
                self.copied_collections
                    .lock()
                    .unwrap()
                    .insert(key.key.clone());
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

enum Job<'a> {
    /// Key-value batch to a target, with the CAS below which a key is unchanged (pass 1).
    Kv(&'a str, Vec<&'a KeyInfo>, Option<u64>),
    Collection(&'a str, &'a KeyInfo),
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
