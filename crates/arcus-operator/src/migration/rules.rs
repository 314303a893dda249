//! The pass-2 rules: what to do with one moved key once the ring after is live. Pure.
//!
//! Inputs, for a key `k` that moves from source `S` to target `T`:
//! - `s`: `S`'s item now. `S` no longer owns `k`, so clients stopped writing it there: this is
//!   the last value clients wrote before the ring change (absent = deleted, expired or evicted
//!   before the change).
//! - `t`: `T`'s item now, with its CAS unique.
//! - `W_T`, the target watermark: the CAS unique of a marker stored on `T` after pass 1 and
//!   before the ring change. memcached and ARCUS give every stored item the next value of one
//!   per-process counter, so an item on `T` with `cas <= W_T` was stored before the ring change,
//!   when `T` did not own `k` and no client wrote `k` to `T`: it is our pass-1 copy (or a stale
//!   leftover); `cas > W_T` means a client stored it under the new ring (or a cas of ours in
//!   pass 2, which holds `S`'s value anyway).
//! - whether pass 1 copied `k` to `T`: known exactly from pass 1's memory (the set of keys it
//!   stored), or, when that memory is lost (operator restart), inferred from `C_S`, the source
//!   watermark taken when pass 1's last round started: `s.cas <= C_S` means `s` was already
//!   there, unchanged, when that round listed `S`, so pass 1 copied it.
//!
//! | `s`            | `t`                | decision                                                    |
//! |----------------|--------------------|-------------------------------------------------------------|
//! | absent/expired | absent             | nothing                                                     |
//! | absent/expired | `cas <= W_T`       | compare-and-delete `t` (our copy of a deleted item)          |
//! | absent/expired | `cas >  W_T`       | keep `t` (a client wrote it after the change)                |
//! | present        | `cas >  W_T`       | keep `t` (client data is newer than anything on `S`)         |
//! | present        | `cas <= W_T`, same value, flags, unchanged since pass 1 | nothing            |
//! | present        | `cas <= W_T`, else | `cas` `t` with `s` (S changed after pass 1 copied it)        |
//! | present        | absent, copied     | nothing: a client deleted it after the change (or T evicted) |
//! | present        | absent, not copied | `add` `s` (new on `S` after pass 1 listed it)                |
//!
//! Every write is conditional (`add`, or `cas` against the unique read just before), so a client
//! write racing the decision wins, and running pass 2 again converges to the same state.
//!
//! The one case these rules get wrong: a key created (or first written) on `S` after pass 1's
//! last round listed `S`, then deleted by a client on `T` after the ring change and before
//! pass 2 reaches it — pass 2 cannot tell "deleted on T" from "never copied" and adds it back.
//! Pass 1 ends with a catch-up round to keep that window short (milliseconds to a second), and
//! a client that sends the delete to `S` too (arcus-client does after a ring change) leaves
//! `s` absent, so the rules see nothing to copy.

/// What we know about the source item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SourceState {
    pub cas: u64,
    /// Expired by now (its remaining TTL is below one second).
    pub expired: bool,
}

/// What we know about the target item.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TargetState {
    pub cas: u64,
    /// Same value and flags as the source item.
    pub same_as_source: bool,
}

/// Did pass 1 store this key on the target?
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Copied {
    Yes,
    No,
    /// Pass 1's memory is gone: infer from the source watermark.
    Unknown,
}

/// The watermarks of one (source, target) pair. Zero for both means "no pass 1": every item on
/// the target is treated as client data and nothing as copied, which makes pass 2 an add-only
/// copy (the scale-out-after-join mode).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Watermarks {
    /// `C_S`: source CAS when pass 1's last round started.
    pub source: u64,
    /// `W_T`: target CAS after pass 1, before the ring change.
    pub target: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nothing to do; the target is right.
    UpToDate,
    /// Target and source both lack it.
    Absent,
    /// `add` the source item to the target.
    Add,
    /// `cas` the target item (unique `expect`) with the source item.
    Update { expect: u64 },
    /// Compare-and-delete the target item (unique `expect`).
    Delete { expect: u64 },
    /// The target holds client data newer than the source: keep it.
    KeepNewer,
    /// A client deleted it on the target after the change: do not bring it back.
    KeepDeleted,
    /// Gone from the source, but maybe by our own cleanup (see [`decide_cleaning`]): keep the
    /// target's copy.
    KeepCopy,
}

/// [`decide`] for a run that also compare-and-deletes moved items from their sources (the
/// scale-out cleanup). There "gone from the source" can be our own cleanup: of a key the
/// listing returned twice (memcached's LRU crawler can, when an item changes LRU segment
/// mid-crawl), or of a batch retried after its cleanup ran. Deleting the target's copy then
/// would lose the key on every node (seen once in a million at 16→32), so a copy is never
/// deleted for a source's absence in such a run. Copies of items clients deleted before the
/// ring change were deleted by the run before (pass 2's first run, without cleanup); what this
/// gives up is a delete a client with a stale ring sent to the old owner in between.
pub fn decide_cleaning(
    s: Option<SourceState>,
    t: Option<TargetState>,
    copied: Copied,
    wm: Watermarks,
) -> Decision {
    match decide(s, t, copied, wm) {
        Decision::Delete { .. } if s.is_none() => Decision::KeepCopy,
        d => d,
    }
}

pub fn decide(
    s: Option<SourceState>,
    t: Option<TargetState>,
    copied: Copied,
    wm: Watermarks,
) -> Decision {
    let s = s.filter(|s| !s.expired);
    match (s, t) {
        (None, None) => Decision::Absent,
        (None, Some(t)) if t.cas <= wm.target => Decision::Delete { expect: t.cas },
        (None, Some(_)) => Decision::KeepNewer,
        (Some(_), Some(t)) if t.cas > wm.target => Decision::KeepNewer,
        (Some(s), Some(t)) => {
            if t.same_as_source && s.cas <= wm.source {
                Decision::UpToDate
            } else {
                Decision::Update { expect: t.cas }
            }
        }
        (Some(s), None) => {
            let copied = match copied {
                Copied::Yes => true,
                Copied::No => false,
                Copied::Unknown => s.cas <= wm.source,
            };
            if copied {
                Decision::KeepDeleted
            } else {
                Decision::Add
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Decision::*;

    const WM: Watermarks = Watermarks {
        source: 100,
        target: 500,
    };

    fn s(cas: u64) -> Option<SourceState> {
        Some(SourceState {
            cas,
            expired: false,
        })
    }
    fn t(cas: u64, same: bool) -> Option<TargetState> {
        Some(TargetState {
            cas,
            same_as_source: same,
        })
    }

    #[test]
    fn the_rules_table() {
        let expired = Some(SourceState {
            cas: 50,
            expired: true,
        });
        // (source, target, copied) -> decision
        let table: &[(Option<SourceState>, Option<TargetState>, Copied, Decision)] = &[
            // gone from the source
            (None, None, Copied::Yes, Absent),
            (None, t(400, false), Copied::Yes, Delete { expect: 400 }),
            (None, t(500, false), Copied::Unknown, Delete { expect: 500 }),
            (None, t(501, false), Copied::Yes, KeepNewer),
            (expired, t(400, true), Copied::Yes, Delete { expect: 400 }),
            (expired, None, Copied::Yes, Absent),
            // client wrote the target after the change
            (s(50), t(900, false), Copied::Yes, KeepNewer),
            (s(150), t(900, true), Copied::No, KeepNewer),
            // our copy, source unchanged
            (s(50), t(400, true), Copied::Yes, UpToDate),
            // our copy, source changed after pass 1 copied it
            (s(150), t(400, false), Copied::Yes, Update { expect: 400 }),
            (s(150), t(400, true), Copied::Yes, Update { expect: 400 }),
            // a stale leftover on the target, different from the source
            (s(50), t(10, false), Copied::Unknown, Update { expect: 10 }),
            // absent on the target
            (s(50), None, Copied::Yes, KeepDeleted),
            (s(150), None, Copied::Yes, KeepDeleted),
            (s(50), None, Copied::No, Add),
            (s(50), None, Copied::Unknown, KeepDeleted),
            (s(150), None, Copied::Unknown, Add),
        ];
        for (i, (src, tgt, copied, want)) in table.iter().enumerate() {
            assert_eq!(
                decide(*src, *tgt, *copied, WM),
                *want,
                "row {i}: {src:?} {tgt:?} {copied:?}"
            );
        }
    }

    #[test]
    fn a_cleaning_run_never_deletes_a_copy_for_a_missing_source() {
        let expired = Some(SourceState {
            cas: 50,
            expired: true,
        });
        assert_eq!(
            decide(None, t(400, true), Copied::Yes, WM),
            Delete { expect: 400 }
        );
        assert_eq!(
            decide_cleaning(None, t(400, true), Copied::Yes, WM),
            KeepCopy
        );
        assert_eq!(
            decide_cleaning(None, t(500, false), Copied::Unknown, WM),
            KeepCopy
        );
        // An expired source item is there: its copy still goes.
        assert_eq!(
            decide_cleaning(expired, t(400, true), Copied::Yes, WM),
            Delete { expect: 400 }
        );
        // Everything else is decided as without cleanup.
        assert_eq!(
            decide_cleaning(s(150), t(400, false), Copied::Yes, WM),
            Update { expect: 400 }
        );
        assert_eq!(decide_cleaning(s(150), None, Copied::No, WM), Add);
        assert_eq!(decide_cleaning(None, None, Copied::Yes, WM), Absent);
    }

    #[test]
    fn zero_watermarks_make_an_add_only_copy() {
        let none = Watermarks::default();
        assert_eq!(decide(s(7), None, Copied::Unknown, none), Add);
        assert_eq!(decide(s(7), t(1, true), Copied::Unknown, none), KeepNewer);
        assert_eq!(decide(None, t(1, true), Copied::Unknown, none), KeepNewer);
    }
}
