//! Cache migration: moving items to their new owner when the ring changes, over the ascii
//! protocol (the open-source arcus-memcached has no migration of its own). No Kubernetes here:
//! the controller decides when the ring changes; this module copies.
//!
//! # Shape
//! - [`keys`]: listing a node's keys (`scan key` on ARCUS, `lru_crawler metadump all` on stock
//!   memcached, chosen by asking the node) a chunk at a time, and item lifetimes (remaining TTL).
//! - [`copied`]: pass 1's compact memory of the keys it stored (a Bloom filter per source).
//! - [`plan`] (pure): which listed keys change owner between the ring before and after.
//! - [`rules`] (pure): the pass-2 decision table.
//! - [`collection`]: ARCUS list/set/map/b+tree: ascii encoding/parsing and copying.
//! - [`Migration`]: the executor, in two passes around the ring change, with [`Progress`].
//!
//! # The two passes (scale-in, and scale-out when new nodes can be kept out of the ring)
//! ```text
//!   ring before live ──► pass1() ──► Checkpoint ──► caller changes the ring ──► pass2(&cp)
//! ```
//! **Pass 1** (the ring before is live: sources own their keys, targets get no client traffic
//! for them). In rounds: take the source watermark `C_S` (the CAS unique of a marker stored on
//! the source), list the source, and for each key that moves: `gets` it on the source, skip it
//! when expired, `add` it to its new owner with its flags and remaining TTL. An `add` refused
//! because the target already holds the key means a stale leftover (or our own copy from an
//! earlier run): it is compared and replaced with `cas`, never `set`. Round 2 and later copy
//! only what changed since the previous round started (`cas > C_S`), and pass 1 stops when a
//! round copies few keys. Then the target watermark `W_T` is taken on every target and pass 1
//! returns a [`Checkpoint`] (a few numbers per node, serializable: keep it in the CR status).
//!
//! **Ring change** (the caller): delete the leaving nodes' znodes / stop them (scale-in), or let
//! the new nodes join (scale-out), and wait until clients have seen it (for ARCUS, a node whose
//! znode is gone answers `ready` with `NOT_READY`; clients follow their ZooKeeper watch).
//!
//! **Pass 2** (the ring after is live; sources are frozen): list the sources again and apply
//! [`rules::decide`] to each moved key: update our copies of items that changed after pass 1
//! (`cas` against the unique read, and only while the target item is still ours: `cas <= W_T`),
//! add items that appeared after pass 1, compare-and-delete our copies of items deleted before
//! the change, and leave alone everything a client wrote or deleted on the target after it.
//! Conditional delete uses `cas <key> 0 <1970 unix time> 0 <unique>` (see
//! [`EXPIRED_EXPTIME`]): the classic ascii protocol has no `delete` with a CAS.
//!
//! # Scale-out after the new nodes joined
//! When new nodes enter the ring before anything was copied (the ARCUS node registers itself at
//! start), [`Migration::copy_after_join`] runs pass 2 with empty watermarks: an add-only copy
//! from the previous owners. It keeps every client write (an `add` never overwrites), but a key
//! a client DELETES on the new node between the node joining and our copy reaching that key is
//! copied back (resurrected) — there is no tombstone in the ascii protocol to tell "deleted"
//! from "not copied yet" — unless the client sent the delete to the previous owner too (see
//! Window 1 below). The window is the copy's duration; keep it short (the copy starts as
//! soon as the node is in the ring, runs batched and pipelined at tens of thousands of keys/s)
//! or avoid it with the two-pass form: start the new node, keep it out of `cache_list`
//! (delete its znode; ARCUS keeps serving and answers `NOT_READY`), `pass1()`, then
//! `zkensemble rejoin` (the ring change), then `pass2()`.
//! After a scale-out copy, [`MigrationOptions::delete_moved_from_sources`] compare-and-deletes
//! the moved items on the previous owners (ARCUS's auto-scrub would remove them anyway).
//!
//! # Memory
//! Bounded whatever the key count: every listing is read in chunks of
//! [`MigrationOptions::list_chunk`] keys (`scan key` pages; metadump read incrementally on a
//! connection of its own, by a task that stays at most [`keys::READ_AHEAD`] chunks ahead),
//! each chunk is planned and turned into batches at once, and at most
//! `concurrency_per_node` batches per listed node are in flight, across chunk boundaries. What
//! outlives a chunk is pass 1's memory of the keys it stored: a Bloom filter per source
//! ([`copied::CopiedKeys`], about 1.2 bytes a key, 1% false positives, grown by added filters
//! when a source has more keys than its `curr_items` said), plus an exact set of the copies
//! found gone by [`Migration::recheck_copies`] (capped; past the cap the memory answers
//! "unknown" and pass 2 infers from `C_S` as after a restart). Pass 2 keeps nothing per key:
//! it lists the sources again (moved keys) and the targets (our copies of deleted items).
//!
//! # Guarantees and limits
//! - Only `add`, `cas` and compare-and-delete: never a blind `set`. Running the same plan
//!   again converges to the same state (resumable): pass 1 any number of times while the ring
//!   before is live; pass 2 any number of times after the change, with or without the memory of
//!   pass 1 (a restarted operator passes the saved [`Checkpoint`]; the rules then use `C_S`).
//! - Window 1 (rare): a key first written on a source after pass 1's last round listed it and
//!   deleted by a client on the target after the change, before pass 2 reaches it, comes back.
//!   Closed by clients that also send a delete to the key's previous owner for a while after a
//!   ring change (arcus-client's `delete_previous_owners_for`): pass 2 then finds the source
//!   item gone. What is left is the delete landing inside one batch's read-then-write on the
//!   pass-2 side (sub-millisecond).
//! - Window 2: a client with a stale ring writing to a source after pass 2 read that key loses
//!   the write (clients switch rings within their ZooKeeper watch latency; wait for it).
//! - A node restarted between the passes (new process start time) loses its watermark: its items
//!   are then all treated as client data (target) or as new (source).
//! - Listings: ARCUS's `scan key` returns every item present for the whole scan; stock
//!   memcached's `lru_crawler metadump` can skip an item the LRU maintainer moves under the
//!   crawler (seen about 1 in 200,000 under load). Later pass-1 rounds copy every key no earlier
//!   round stored, and pass 2 with pass 1's memory adds any still missing; a pass 2 resumed from
//!   the checkpoint alone infers "copied" from `C_S` and would keep such a key uncopied if every
//!   pass-1 listing missed it.
//! - What the compact memory costs. Its "not copied" is exact; its "copied" is wrong for about
//!   1% of the keys it never stored (a false positive), and always in the safe direction: a
//!   false "copied" makes pass 1's later rounds and pass 2 leave a key uncopied (a cache miss
//!   on its new owner), never revert or resurrect one. It matters only for keys pass 1 did not
//!   store: (a) a key every pass-1 listing missed (metadump, about 1 in 200,000) AND a false
//!   positive: about 1 in 20 million keys not copied. (b) Items the source changed after the
//!   last round's watermark `C_S` (new keys of the settle window) are answered from an exact
//!   set of what the last round stored (it stores few keys; capped at 100,000, past which the
//!   filter answers), so no false positive keeps a new key uncopied. The price: a key copied in
//!   an earlier round, changed on its source after the last round's listing passed it, and
//!   deleted by a client on its new owner after the change, before pass 2, is copied back (the
//!   Window 1 below; closed by clients that also delete on the previous owner). The exact set
//!   used before this memory cost about 0.55 KB a key (557 MiB at 1M keys).
//! - Our copies of items deleted on their source between pass 1 and the ring change are found
//!   by listing the targets in pass 2 (keys stored before the change, `cas <= W_T`, whose source
//!   item is gone). A target's metadump that skips such a copy (about 1 in 200,000) leaves that
//!   deleted item on its new owner until it expires or is evicted; the exact memory of pass 1
//!   used to cover that case too. ARCUS's `scan key` skips nothing.
//! - TTLs are copied with one-second resolution.
//! - Collections (ARCUS only) are copied whole in pass 1 and added when absent in pass 2;
//!   their changes between pass 1 and the ring change are not carried over (no CAS on
//!   collections). See [`collection`].

pub mod collection;
pub mod copied;
mod engine;
pub mod keys;
pub mod plan;
pub mod rules;

pub use engine::{
    Checkpoint, Migration, MigrationOptions, NodeMark, Phase, Progress, ScaleIn, ScaleOut,
    EXPIRED_EXPTIME, WATERMARK_KEY,
};
pub use keys::{Expiry, KeyInfo, Listing};
pub use plan::Hashing;

use std::time::Duration;

/// Why a migration step failed. Every variant but `Invalid` names the node.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// A command on a node failed during `step`; the cause names the node and the command.
    #[error("{step}: {source}")]
    Node {
        step: &'static str,
        #[source]
        source: Box<arcus_client::Error>,
    },
    /// Listing a node's keys did not finish in time (each page did answer).
    #[error(
        "node {node}: one chunk of its key listing (or waiting for its busy crawler) took \
         longer than {timeout:?}; check the node's load, or raise MigrationOptions::list_timeout"
    )]
    ListTimeout { node: String, timeout: Duration },
    #[error("invalid migration: {0}")]
    Invalid(String),
}

impl MigrationError {
    /// The node the error is about.
    pub fn node(&self) -> Option<&str> {
        match self {
            MigrationError::Node { source, .. } => source.node(),
            MigrationError::ListTimeout { node, .. } => Some(node),
            MigrationError::Invalid(_) => None,
        }
    }
}

/// Names the migration step a node command belonged to, keeping the command's error as the
/// cause: `admin.stats(None).await.step("listing keys")?`.
pub(crate) trait Step<T> {
    fn step(self, step: &'static str) -> Result<T, MigrationError>;
}

impl<T> Step<T> for arcus_client::Result<T> {
    fn step(self, step: &'static str) -> Result<T, MigrationError> {
        self.map_err(|source| MigrationError::Node {
            step,
            source: Box::new(source),
        })
    }
}
