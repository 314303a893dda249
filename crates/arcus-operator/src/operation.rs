//! The one state machine for every multi-step operation on the ring: scale-in, a node joining
//! (scale-out), a cache-aware restart of one node, and healing a node that left ZooKeeper.
//!
//! - [`Operation`] is what is in flight, persisted (versioned) in the claim data of
//!   `/arcus/cache_list/<svc>`, so a new leader resumes at the recorded stage.
//! - [`next_step`] (pure) decides the one [`Action`] to take from the operation and the
//!   observed [`World`]; [`Action::successor`] (pure) is the record the executor persists in the
//!   write that finishes the action (`migrate::Executor` runs it).
//!
//! ```text
//! ScaleIn:  (idle) ─Drain─► Pass1Done ─ChangeRingAndPass2─► (idle)
//! Join:     (idle) ─StartJoin─► AwaitRegistration ─TakeOut*─► HeldOut{owing} ─► HeldOut{givenBack}
//!             AwaitRegistration ─FillEarly─► AwaitRegistration    (stock nodes, before they register)
//!             AwaitRegistration ─CopyAddOnly─► (idle)             (registered, cannot be held out)
//!             HeldOut ─TakeOut*─► HeldOut{it owing} ─► HeldOut    (another node of the join registered)
//!             HeldOut{owing} ─GiveBack─► HeldOut{givenBack}       (a crash or failure between the two writes)
//!             HeldOut ─FillHeldOut─► (idle) | HeldOut | AwaitRegistration (one node per round; more to come;
//!                                    a node registering meanwhile is taken out during it)
//!             any ─Narrow─► the same stage, fewer nodes           (the spec shrank, none of the dropped registered)
//! Restart:  (idle) ─Drain─► Draining ─ChangeRingAndPass2─► Drained ─DeletePod─► AwaitReturn
//!             AwaitReturn ─TakeOut*─► HeldOut{owing} ─► HeldOut{givenBack} ─FillHeldOut─► (idle)
//! Heal:     (idle) ─StartHeal─► Restart HeldOut{givenBack:true} ─FillHeldOut─► (idle)
//! ```
//! The invariant on every path back into the ring: a node that was out of `cache_list` while
//! clients wrote elsewhere is let in (`zkensemble rejoin`) only by `FillHeldOut`, after pass 1
//! copied the current owners' items into it; a restart empties it first. No path rejoins a
//! node directly. A take-out writes the record twice: the node held, owing its give-back
//! ([`Fill::owing`]), then, once what clients wrote on it went to the owners, given back.

use crate::migration::Checkpoint;
use crate::zk_plan::CacheZnode;
use serde::{Deserialize, Serialize};

/// The record format this operator writes; it reads this and the unversioned one before it.
pub const RECORD_VERSION: u32 = 2;

/// What is in flight for one service code.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Operation {
    /// Nodes leave the ring (the StatefulSet shrinks once this is done).
    #[serde(rename_all = "camelCase")]
    ScaleIn {
        from: u32,
        to: u32,
        stage: ScaleInStage,
    },
    /// New nodes join: the StatefulSet has grown to `to_replicas`, the ordinals from
    /// `from_replicas` on join; `before` is the ring (ip:port) their items come from (it grows
    /// by the nodes let in so far); `early` lists nodes filled before they registered.
    #[serde(rename_all = "camelCase")]
    Join {
        /// Absent in the records of operators that joined one node at a time: `to_replicas − 1`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from_replicas: Option<u32>,
        to_replicas: u32,
        before: Vec<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        early: Vec<String>,
        stage: JoinStage,
    },
    /// A cache-aware restart of one node (or the fill of a node that left ZooKeeper: healing).
    #[serde(rename_all = "camelCase")]
    Restart {
        host: String,
        pod: String,
        /// The pod to delete (a re-created pod of the same name has another uid).
        #[serde(default)]
        pod_uid: String,
        stage: RestartStage,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "camelCase")]
pub enum ScaleInStage {
    /// Pass 1 copied the leaving nodes' items: the ring change and pass 2 are next.
    #[serde(rename_all = "camelCase")]
    Pass1Done {
        before: Vec<String>,
        leaving: Vec<CacheZnode>,
        checkpoint: Checkpoint,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "camelCase")]
pub enum JoinStage {
    /// Waiting for the new node to register (it is taken out of the ring as it does).
    AwaitRegistration,
    /// Taken out of the ring to be filled.
    #[serde(rename_all = "camelCase")]
    HeldOut { fill: Fill },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "name", rename_all = "camelCase")]
pub enum RestartStage {
    /// Pass 1 moved the node's items to the ring without it: ring change and pass 2 next.
    #[serde(rename_all = "camelCase")]
    Draining {
        before: Vec<String>,
        znode: CacheZnode,
        checkpoint: Checkpoint,
    },
    /// Out of the ring, its items moved: the pod is deleted next. `before` is the ring the
    /// items come back from.
    #[serde(rename_all = "camelCase")]
    Drained { before: Vec<String> },
    /// The pod was deleted: it is taken out of the ring as it registers again.
    #[serde(rename_all = "camelCase")]
    AwaitReturn { before: Vec<String> },
    /// Out of the ring to be filled from `before`, then let in.
    #[serde(rename_all = "camelCase")]
    HeldOut { before: Vec<String>, fill: Fill },
}

/// Nodes held out of the ring until they are filled.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fill {
    pub held: Vec<CacheZnode>,
    /// What clients wrote to the nodes while they were briefly in the ring has been moved to
    /// the owners (or there was no such moment: a healed node), but for the nodes in `owed`.
    /// Until then pass 1 must not take the nodes' items for stale leftovers.
    pub given_back: bool,
    /// With `given_back`: the held nodes (addresses) that still owe their give-back (taken
    /// out later than the others; each is given back once, as it is taken out: a second
    /// give-back of a node pass 1 began to fill would take its copies for clients' writes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub owed: Vec<String>,
}

impl Fill {
    pub fn new(held: Vec<CacheZnode>, given_back: bool) -> Fill {
        Fill {
            held,
            given_back,
            owed: vec![],
        }
    }

    /// The held nodes whose give-back is still to be done.
    pub fn owing(&self) -> Vec<CacheZnode> {
        self.held
            .iter()
            .filter(|z| !self.given_back || self.owed.iter().any(|a| a == z.addr()))
            .cloned()
            .collect()
    }

    /// `held`, of which `owing` still owe their give-back (in its shortest form: all of them
    /// owing is `given_back: false`).
    fn owing_only(held: Vec<CacheZnode>, owing: &[CacheZnode]) -> Fill {
        let owing: Vec<&CacheZnode> = held.iter().filter(|z| owing.contains(z)).collect();
        if !owing.is_empty() && owing.len() == held.len() {
            return Fill::new(held, false);
        }
        let owed = owing.iter().map(|z| z.addr().to_string()).collect();
        Fill {
            held,
            given_back: true,
            owed,
        }
    }
}

/// The claim data stored in `/arcus/cache_list/<svc>`: who owns it and what is in flight.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OperationRecord {
    pub version: u32,
    /// Raised by every write of an operation record: progress reports carry it, and the API
    /// server refuses a report older than the last one (a paused ex-leader's).
    pub epoch: u64,
    #[serde(flatten)]
    pub operation: Operation,
}

impl Operation {
    /// The phase shown in `status.operation.phase` and the Migration column.
    pub fn stage_name(&self) -> &'static str {
        match self {
            Operation::ScaleIn { .. } => "Pass1Done",
            Operation::Join { stage, .. } => match stage {
                JoinStage::AwaitRegistration => "AwaitRegistration",
                JoinStage::HeldOut { .. } => "HeldOut",
            },
            Operation::Restart { stage, .. } => match stage {
                RestartStage::Draining { .. } => "Draining",
                RestartStage::Drained { .. } => "Drained",
                RestartStage::AwaitReturn { .. } => "AwaitReturn",
                RestartStage::HeldOut { .. } => "HeldOut",
            },
        }
    }

    /// What users read as the operation: `scale-in 5→3`, `scale-out to 4`, `rolling restart`.
    pub fn label(&self) -> String {
        match self {
            Operation::ScaleIn { from, to, .. } => format!("scale-in {from}→{to}"),
            Operation::Join { to_replicas, .. } => format!("scale-out to {to_replicas}"),
            Operation::Restart { .. } => "rolling restart".into(),
        }
    }

    /// The pod a single-node operation is about.
    pub fn node(&self) -> Option<&str> {
        match self {
            Operation::Restart { pod, .. } => Some(pod),
            _ => None,
        }
    }
}

/// One cache pod as the state machine sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PodState {
    pub ordinal: u32,
    pub name: String,
    pub uid: String,
    /// `<pod>.<namespace>`: the hostname it registers under.
    pub host: String,
    /// `<pod IP>:<port>` once it has an IP.
    pub addr: Option<String>,
    /// Every container is running.
    pub running: bool,
    pub terminating: bool,
    /// Whether the node can be held out and let back in (`zkensemble`): probed for the pods
    /// [`pods_to_probe`] names, None otherwise or when it did not answer.
    pub can_rejoin: Option<bool>,
    /// Probed like `can_rejoin`: an ARCUS node without a ZooKeeper session, waiting for
    /// `zkensemble rejoin` (its session expired with zkfailstop off, or its znode was deleted).
    pub detached: bool,
}

/// What day-2 asks of the ring when nothing else is in flight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Day2Request {
    /// Restart this node for a new template.
    Roll { ordinal: u32 },
    /// This running node lacks its znode past the grace.
    Heal { ordinal: u32 },
}

/// Everything `next_step` looks at (observed in one pass).
#[derive(Clone, Debug, Default)]
pub struct World<'a> {
    pub desired: u32,
    /// The StatefulSet's replicas now (0 when there is none).
    pub statefulset: u32,
    pub ring: &'a [CacheZnode],
    pub pods: &'a [PodState],
    pub day2: Option<Day2Request>,
}

impl World<'_> {
    fn ring_addrs(&self) -> Vec<String> {
        self.ring.iter().map(|z| z.addr().to_string()).collect()
    }

    fn pod(&self, ordinal: u32) -> Option<&PodState> {
        self.pods.iter().find(|p| p.ordinal == ordinal)
    }

    fn in_ring(&self, z: &CacheZnode) -> bool {
        self.ring.contains(z)
    }
}

/// The one thing to do next.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Nothing in flight, nothing to start.
    Idle,
    /// Waiting for the world (a pod to start or register).
    Wait(String),
    /// Record the start of a join of the ordinals `from_replicas..to_replicas`; the
    /// StatefulSet grows to `to_replicas`.
    StartJoin {
        from_replicas: u32,
        to_replicas: u32,
        before: Vec<String>,
    },
    /// The spec shrank below a join in flight whose dropped nodes never entered the ring: the
    /// join goes on for the ordinals below `to_replicas`, holding only `held`.
    Narrow {
        to_replicas: u32,
        held: Vec<CacheZnode>,
    },
    /// Pass 1 of moving `leaving`'s items onto the ring without them (repeatable: the ring
    /// has not changed yet).
    Drain {
        before: Vec<String>,
        leaving: Vec<CacheZnode>,
        purpose: DrainPurpose,
    },
    /// Delete `leaving` from the ring in one transaction, then pass 2 from `checkpoint`.
    ChangeRingAndPass2 {
        before: Vec<String>,
        leaving: Vec<CacheZnode>,
        checkpoint: Checkpoint,
    },
    /// Delete the drained node's pod (only the pod with `uid`).
    DeletePod { pod: String, uid: String },
    /// Record a stage that needs no work (the pod was already deleted and re-created).
    Advance,
    /// Copy into new stock-memcached nodes before they register (nobody reads them yet).
    FillEarly {
        before: Vec<String>,
        joining: Vec<String>,
    },
    /// Wait (bounded) for one of `hosts` to register and take out at once those that did.
    TakeOutOnRegistration { hosts: Vec<String> },
    /// Take these registered nodes out of the ring.
    TakeOut { znodes: Vec<CacheZnode> },
    /// Move what clients wrote on the held nodes while they were in the ring to the owners.
    GiveBack {
        before: Vec<String>,
        held: Vec<CacheZnode>,
    },
    /// Pass 1 into the held nodes, `zkensemble rejoin`, pass 2: the end of the operation, or
    /// (`last` false) of this round of a join whose other nodes are still to come.
    FillHeldOut {
        before: Vec<String>,
        held: Vec<CacheZnode>,
        last: bool,
    },
    /// Add-only copy into registered nodes that cannot be held out (stock memcached).
    CopyAddOnly {
        before: Vec<String>,
        joining: Vec<String>,
    },
    /// Restart a node that left ZooKeeper and cannot be let back in (not an operation).
    RestartPod { pod: String },
    /// Every node left `cache_list` at once (their sessions expired in a ZooKeeper outage,
    /// with zkfailstop off) and waits for `zkensemble rejoin`: let them all back in together,
    /// unfilled (not an operation).
    RejoinAll { nodes: Vec<CacheZnode> },
    /// Record the heal of a node that left ZooKeeper: it is filled before it is let in.
    StartHeal(Operation),
    /// The spec shrank below a join in flight: the join ends (its registered nodes are drained
    /// by the scale-in that follows; held ones gave back what clients wrote on them first, and
    /// any of them the spec still wants is filled by the heal of nodes out of the ring).
    Abandon,
}

/// What a drain is for: the record pass 1's checkpoint goes into.
#[derive(Clone, Debug, PartialEq)]
pub enum DrainPurpose {
    ScaleIn {
        from: u32,
        to: u32,
    },
    Restart {
        host: String,
        pod: String,
        uid: String,
    },
}

/// What the executor learned running an action, for [`Action::successor`].
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Done,
    Checkpoint(Checkpoint),
    /// `TakeOutOnRegistration` took these out (empty: the node did not register in time).
    TookOut(Vec<CacheZnode>),
    /// `FillHeldOut`: the node refused `zkensemble rejoin`; a restart's node was restarted
    /// instead (it comes back empty and is filled again).
    RejoinFailed,
}

/// The next step: an action and the record to persist when it finishes.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub action: Action,
    /// The record as it stands (the successor is computed from it).
    pub operation: Option<Operation>,
}

impl Step {
    fn new(action: Action, operation: Option<&Operation>) -> Step {
        Step {
            action,
            operation: operation.cloned(),
        }
    }

    /// Whether running the action changes the persisted record.
    pub fn persists(&self) -> bool {
        !matches!(
            self.action,
            Action::Idle | Action::Wait(_) | Action::RestartPod { .. } | Action::RejoinAll { .. }
        )
    }

    /// The record to persist once the action finished with `outcome` (pure). `None` when the
    /// operation is over. The same record when nothing changes (a wait).
    pub fn successor(&self, outcome: &Outcome) -> Option<Operation> {
        let op = self.operation.clone();
        match (&self.action, outcome) {
            (
                Action::Idle
                | Action::Wait(_)
                | Action::RestartPod { .. }
                | Action::RejoinAll { .. },
                _,
            ) => op,
            (Action::StartHeal(record), _) => Some(record.clone()),
            (
                Action::StartJoin {
                    from_replicas,
                    to_replicas,
                    before,
                },
                _,
            ) => Some(Operation::Join {
                from_replicas: Some(*from_replicas),
                to_replicas: *to_replicas,
                before: before.clone(),
                early: vec![],
                stage: JoinStage::AwaitRegistration,
            }),
            (
                Action::Drain {
                    before,
                    leaving,
                    purpose,
                },
                Outcome::Checkpoint(checkpoint),
            ) => Some(drained_record(before, leaving, purpose, checkpoint.clone())),
            (Action::Drain { .. }, _) => op,
            (Action::ChangeRingAndPass2 { .. }, _) => op.and_then(after_ring_change),
            (Action::DeletePod { .. } | Action::Advance, _) => op.map(after_pod_deleted),
            (Action::FillEarly { joining, .. }, _) => op.map(|o| filled_early(o, joining)),
            (Action::Narrow { to_replicas, held }, _) => {
                op.map(|o| narrowed(o, *to_replicas, held))
            }
            (Action::TakeOutOnRegistration { .. }, Outcome::TookOut(held)) if held.is_empty() => op,
            (Action::TakeOutOnRegistration { .. }, Outcome::TookOut(held)) => {
                op.map(|o| held_out(o, held))
            }
            (Action::TakeOutOnRegistration { .. }, _) => op,
            (Action::TakeOut { znodes }, _) => op.map(|o| held_out(o, znodes)),
            (Action::GiveBack { held, .. }, _) => op.map(|o| given_back(o, held)),
            (
                Action::FillHeldOut {
                    held, last: false, ..
                },
                Outcome::Done,
            ) => op.map(|o| let_in(o, held)),
            (Action::FillHeldOut { .. }, Outcome::RejoinFailed) => match op? {
                Operation::Restart {
                    host,
                    pod,
                    pod_uid,
                    stage: RestartStage::HeldOut { before, .. },
                } => Some(Operation::Restart {
                    host,
                    pod,
                    pod_uid,
                    stage: RestartStage::AwaitReturn { before },
                }),
                other => Some(other),
            },
            (Action::FillHeldOut { .. } | Action::CopyAddOnly { .. } | Action::Abandon, _) => None,
        }
    }
}

/// A join whose stock nodes `joining` were filled before they registered.
fn filled_early(op: Operation, joining: &[String]) -> Operation {
    match op {
        Operation::Join {
            from_replicas,
            to_replicas,
            before,
            mut early,
            stage,
        } => {
            early.extend(joining.iter().cloned());
            Operation::Join {
                from_replicas,
                to_replicas,
                before,
                early,
                stage,
            }
        }
        other => other,
    }
}

/// The ring change and pass 2 ended the scale-in, or the drain of a node to restart.
fn after_ring_change(op: Operation) -> Option<Operation> {
    match op {
        Operation::Restart {
            host,
            pod,
            pod_uid,
            stage: RestartStage::Draining { before, znode, .. },
        } => Some(Operation::Restart {
            host,
            pod,
            pod_uid,
            // The ring its items come back from: without it.
            stage: RestartStage::Drained {
                before: before.into_iter().filter(|a| a != znode.addr()).collect(),
            },
        }),
        _ => None,
    }
}

/// The drained node's pod was deleted (or already replaced): its return is awaited.
fn after_pod_deleted(op: Operation) -> Operation {
    match op {
        Operation::Restart {
            host,
            pod,
            pod_uid,
            stage: RestartStage::Drained { before },
        } => Operation::Restart {
            host,
            pod,
            pod_uid,
            stage: RestartStage::AwaitReturn { before },
        },
        other => other,
    }
}

fn drained_record(
    before: &[String],
    leaving: &[CacheZnode],
    purpose: &DrainPurpose,
    checkpoint: Checkpoint,
) -> Operation {
    match purpose {
        DrainPurpose::ScaleIn { from, to } => Operation::ScaleIn {
            from: *from,
            to: *to,
            stage: ScaleInStage::Pass1Done {
                before: before.to_vec(),
                leaving: leaving.to_vec(),
                checkpoint,
            },
        },
        DrainPurpose::Restart { host, pod, uid } => Operation::Restart {
            host: host.clone(),
            pod: pod.clone(),
            pod_uid: uid.clone(),
            stage: RestartStage::Draining {
                before: before.to_vec(),
                znode: leaving.first().cloned().expect("a restart drains one node"),
                checkpoint,
            },
        },
    }
}

/// `op` with `taken` held out too, each owing its give-back, keeping the ring they are
/// filled from. Nodes held already stay held: a join holds each node as it registers.
pub fn held_out(op: Operation, taken: &[CacheZnode]) -> Operation {
    with_fill(op, |fill| {
        let (mut held, mut owing) = match fill {
            Some(f) => (f.held.clone(), f.owing()),
            None => (vec![], vec![]),
        };
        for z in taken {
            if !held.contains(z) {
                held.push(z.clone());
            }
            if !owing.contains(z) {
                owing.push(z.clone());
            }
        }
        Fill::owing_only(held, &owing)
    })
}

/// `op` with the give-back of the held nodes `paid` done.
pub fn given_back(op: Operation, paid: &[CacheZnode]) -> Operation {
    with_fill(op, |fill| {
        let fill = fill.cloned().unwrap_or_default();
        let owing: Vec<CacheZnode> = fill
            .owing()
            .into_iter()
            .filter(|z| !paid.contains(z))
            .collect();
        Fill::owing_only(fill.held, &owing)
    })
}

/// `op` held out, with its fill (None: none yet) changed by `change`.
fn with_fill(op: Operation, change: impl FnOnce(Option<&Fill>) -> Fill) -> Operation {
    match op {
        Operation::Join {
            from_replicas,
            to_replicas,
            before,
            early,
            stage,
        } => {
            let fill = match &stage {
                JoinStage::HeldOut { fill } => Some(fill),
                JoinStage::AwaitRegistration => None,
            };
            Operation::Join {
                from_replicas,
                to_replicas,
                before,
                early,
                stage: JoinStage::HeldOut { fill: change(fill) },
            }
        }
        Operation::Restart {
            host,
            pod,
            pod_uid,
            stage,
        } => {
            let (before, fill) = match stage {
                RestartStage::HeldOut { before, fill } => (before, Some(fill)),
                RestartStage::AwaitReturn { before }
                | RestartStage::Drained { before }
                | RestartStage::Draining { before, .. } => (before, None),
            };
            Operation::Restart {
                host,
                pod,
                pod_uid,
                stage: RestartStage::HeldOut {
                    before,
                    fill: change(fill.as_ref()),
                },
            }
        }
        other => other,
    }
}

/// A round of a join ended with `filled` let in: the rest of its nodes (those still held
/// stay held) are filled from the ring with them.
fn let_in(op: Operation, filled: &[CacheZnode]) -> Operation {
    match op {
        Operation::Join {
            from_replicas,
            to_replicas,
            mut before,
            early,
            stage,
        } => {
            before.extend(filled.iter().map(|z| z.addr().to_string()));
            let stage = match stage {
                JoinStage::HeldOut { fill } if fill.held.iter().any(|z| !filled.contains(z)) => {
                    let owing = fill.owing();
                    let rest = fill.held.into_iter().filter(|z| !filled.contains(z));
                    JoinStage::HeldOut {
                        fill: Fill::owing_only(rest.collect(), &owing),
                    }
                }
                _ => JoinStage::AwaitRegistration,
            };
            Operation::Join {
                from_replicas,
                to_replicas,
                before,
                early,
                stage,
            }
        }
        other => other,
    }
}

/// The join, down to `to_replicas` (only `held` of its held nodes are left).
fn narrowed(op: Operation, to: u32, held: &[CacheZnode]) -> Operation {
    match op {
        Operation::Join {
            from_replicas,
            before,
            early,
            stage,
            ..
        } => Operation::Join {
            from_replicas,
            to_replicas: to,
            before,
            early,
            stage: match stage {
                JoinStage::HeldOut { fill } if !held.is_empty() => JoinStage::HeldOut {
                    fill: Fill::owing_only(held.to_vec(), &fill.owing()),
                },
                _ => JoinStage::AwaitRegistration,
            },
        },
        other => other,
    }
}

/// How many new nodes one join brings in at most (one record, the StatefulSet grown once).
/// Each is taken out as it registers and filled and let in in turn (see `join_step`: a fill
/// of several at once would let them in one after another). Bounded so that a scale-out by
/// many nodes is let in by parts (a stuck pod holds up at most this many) and the pods started
/// ahead of their fill stay few.
pub const JOIN_BATCH: u32 = 8;

/// A join in flight, as `next_step` reads it.
struct JoinView<'a> {
    /// The ordinals `from..to` join.
    from: u32,
    to: u32,
    before: &'a [String],
    early: &'a [String],
    fill: Option<&'a Fill>,
}

impl JoinView<'_> {
    fn held(&self) -> &[CacheZnode] {
        self.fill.map_or(&[], |f| &f.held)
    }
}

/// The spec wants fewer nodes than the join brings in. Held nodes give back what clients
/// wrote on them first (they may be deleted next). If no dropped node entered the ring, the
/// join goes on for the rest; otherwise it ends, and the scale-in that follows drains the
/// registered ones (the others are filled by the heal of nodes out of the ring).
fn shrunk_join(world: &World, join: &JoinView) -> Action {
    let owing = join.fill.map(Fill::owing).unwrap_or_default();
    if !owing.is_empty() && !join.before.is_empty() {
        return Action::GiveBack {
            before: join.before.to_vec(),
            held: owing,
        };
    }
    let dropped: Vec<&PodState> = (world.desired..join.to)
        .filter_map(|o| world.pod(o))
        .collect();
    let dropped_registered = dropped
        .iter()
        .any(|p| world.ring.iter().any(|z| z.host() == p.host));
    if world.desired <= join.from || dropped_registered {
        return Action::Abandon;
    }
    let kept = join
        .held()
        .iter()
        .filter(|z| !dropped.iter().any(|p| p.host == z.host()))
        .cloned()
        .collect();
    Action::Narrow {
        to_replicas: world.desired,
        held: kept,
    }
}

/// A join: every node of it that registers is taken out at once; the held ones are filled,
/// one per round, once no other node of the join is about to register (the StatefulSet's ordered
/// start creates the next pod only once the previous one is Ready, which a held-out ARCUS
/// node is not: then the round is filled and let in, and the join goes on with the next).
fn join_step(world: &World, join: &JoinView) -> Action {
    let held = join.held();
    let holdable = |z: &CacheZnode| {
        held.contains(z)
            || world
                .pods
                .iter()
                .any(|p| p.addr.as_deref() == Some(z.addr()) && p.can_rejoin == Some(true))
    };
    // A node the spec no longer wants (the join narrowed) is left to the scale-in.
    let dropped = |z: &CacheZnode| {
        world
            .pods
            .iter()
            .any(|p| p.host == z.host() && p.ordinal >= join.to)
    };
    // New in the ring since the join began (a held node back in it, too).
    let (out, stock): (Vec<CacheZnode>, Vec<CacheZnode>) = world
        .ring
        .iter()
        .filter(|z| !join.before.iter().any(|b| b == z.addr()) && !dropped(z))
        .cloned()
        .partition(|z| holdable(z) && !join.before.is_empty());
    if !out.is_empty() {
        return Action::TakeOut { znodes: out };
    }
    let waiting: Vec<u32> = (join.from..join.to)
        .filter(|o| {
            world.pod(*o).is_none_or(|p| {
                !world.ring.iter().any(|z| z.host() == p.host)
                    && !held.iter().any(|z| z.host() == p.host)
            })
        })
        .collect();
    if let Some(action) = await_joining(world, join, &waiting) {
        return action;
    }
    match join.fill {
        Some(fill) if !fill.owing().is_empty() => Action::GiveBack {
            before: join.before.to_vec(),
            held: fill.owing(),
        },
        // One held node per round: nodes let in one after another would each be in the ring
        // alone for a moment, and a client's write to one of them of a key the next one owns
        // is on no source pass 2 reads (it would come back as pass 1's older copy). The others
        // stay held and are filled from the ring with it. Registered nodes that cannot be held
        // get their add-only copy in a round after.
        Some(_) if !held.is_empty() => Action::FillHeldOut {
            before: join.before.to_vec(),
            held: held[..1].to_vec(),
            last: waiting.is_empty() && stock.is_empty() && held.len() == 1,
        },
        // Registered and not holdable (stock memcached), or nothing left: the add-only copy
        // ends the join.
        _ => Action::CopyAddOnly {
            before: join.before.to_vec(),
            joining: stock.iter().map(|z| z.addr().to_string()).collect(),
        },
    }
}

/// What the join waits for before its held nodes are filled: a stock node to fill before it
/// registers, a started node to register (taken out as it does), or a pod to start while
/// nothing is held. None: fill what is held now (or nothing is awaited).
fn await_joining(world: &World, join: &JoinView, waiting: &[u32]) -> Option<Action> {
    let pods: Vec<&PodState> = waiting.iter().filter_map(|o| world.pod(*o)).collect();
    let in_ring = |a: &String| world.ring.iter().any(|z| z.addr() == a);
    // A stock node serving already is filled before it registers (nobody reads it yet).
    let fresh: Vec<String> = pods
        .iter()
        .filter(|p| p.running && !p.terminating && p.can_rejoin == Some(false))
        .filter_map(|p| p.addr.clone())
        .filter(|a| !join.early.contains(a) && !in_ring(a))
        .collect();
    if !fresh.is_empty() && !join.before.is_empty() {
        return Some(Action::FillEarly {
            before: join.before.to_vec(),
            joining: fresh,
        });
    }
    let filled_early = pods
        .iter()
        .find(|p| p.addr.as_ref().is_some_and(|a| join.early.contains(a)));
    if let Some(p) = filled_early {
        return Some(Action::Wait(format!(
            "{} (filled early) to register",
            p.host
        )));
    }
    // Polled for at most a few seconds, and only once the pod has an IP (it registers
    // within a fraction of a second of starting).
    let hosts: Vec<String> = pods
        .iter()
        .filter(|p| p.addr.is_some() && !p.terminating)
        .map(|p| p.host.clone())
        .collect();
    if !hosts.is_empty() && !join.before.is_empty() {
        return Some(Action::TakeOutOnRegistration { hosts });
    }
    let first = waiting.first()?;
    if !join.held().is_empty() {
        return None;
    }
    Some(Action::Wait(match world.pod(*first) {
        Some(p) => format!("{} to register", p.host),
        None => format!("the new pod of ordinal {first} to be created"),
    }))
}

/// The one action to take now (pure).
pub fn next_step(op: Option<&Operation>, world: &World) -> Step {
    let action = match op {
        None => idle(world),
        Some(Operation::ScaleIn {
            stage:
                ScaleInStage::Pass1Done {
                    before,
                    leaving,
                    checkpoint,
                },
            ..
        }) => Action::ChangeRingAndPass2 {
            before: before.clone(),
            leaving: leaving.clone(),
            checkpoint: checkpoint.clone(),
        },
        Some(Operation::Join {
            from_replicas,
            to_replicas,
            before,
            early,
            stage,
        }) => {
            let fill = match stage {
                JoinStage::AwaitRegistration => None,
                JoinStage::HeldOut { fill } => Some(fill),
            };
            let join = JoinView {
                from: from_replicas.unwrap_or(to_replicas.saturating_sub(1)),
                to: *to_replicas,
                before,
                early,
                fill,
            };
            if world.desired < join.to {
                shrunk_join(world, &join)
            } else {
                join_step(world, &join)
            }
        }
        Some(Operation::Restart {
            host,
            pod,
            pod_uid,
            stage,
        }) => restart(world, host, pod, pod_uid, stage),
    };
    Step::new(action, op)
}

fn idle(world: &World) -> Action {
    if let Some(action) = after_outage(world) {
        return action;
    }
    let before = world.ring_addrs();
    if world.statefulset > world.desired {
        let leaving: Vec<CacheZnode> = (world.desired..world.statefulset)
            .filter_map(|o| world.pod(o))
            .flat_map(|p| world.ring.iter().filter(|z| z.host() == p.host))
            .cloned()
            .collect();
        if leaving.is_empty() {
            return Action::Idle;
        }
        return Action::Drain {
            before,
            leaving,
            purpose: DrainPurpose::ScaleIn {
                from: world.statefulset,
                to: world.desired,
            },
        };
    }
    if world.desired > world.statefulset && world.statefulset > 0 {
        return Action::StartJoin {
            from_replicas: world.statefulset,
            to_replicas: world.desired.min(world.statefulset + JOIN_BATCH),
            before,
        };
    }
    match &world.day2 {
        Some(Day2Request::Roll { ordinal }) => {
            let Some(p) = world.pod(*ordinal) else {
                return Action::Wait(format!("pod of ordinal {ordinal} to restart"));
            };
            let leaving: Vec<CacheZnode> = world
                .ring
                .iter()
                .filter(|z| z.host() == p.host)
                .cloned()
                .collect();
            if leaving.is_empty() {
                return Action::Wait(format!("{} to register before its restart", p.name));
            }
            Action::Drain {
                before,
                leaving,
                purpose: DrainPurpose::Restart {
                    host: p.host.clone(),
                    pod: p.name.clone(),
                    uid: p.uid.clone(),
                },
            }
        }
        Some(Day2Request::Heal { ordinal }) => match world.pod(*ordinal) {
            Some(p) if p.can_rejoin == Some(true) && p.addr.is_some() && !before.is_empty() => {
                match heal_record(world, *ordinal) {
                    Some(record) => Action::StartHeal(record),
                    None => Action::Idle,
                }
            }
            // Nobody in the ring to fill it from, but it keeps its items: it either registers
            // by itself or reports its session gone (then all such nodes rejoin together).
            // Restarting it would throw them away.
            Some(p) if p.can_rejoin == Some(true) && before.is_empty() => Action::Wait(format!(
                "{} to register, or to report that its ZooKeeper session expired",
                p.name
            )),
            Some(p) if p.can_rejoin.is_some() || before.is_empty() => Action::RestartPod {
                pod: p.name.clone(),
            },
            Some(p) => Action::Wait(format!("{} to answer before it is healed", p.name)),
            None => Action::Idle,
        },
        None => Action::Idle,
    }
}

/// The nodes to let back in together when none of ours is in `cache_list` and the running
/// ones wait for `zkensemble rejoin`: a ZooKeeper outage expired every session at once. Each
/// still holds what the whole ring gave it (clients kept that ring while ZooKeeper was away,
/// and found no node once the znodes went), so nothing is copied; healing them one at a time
/// would fill each from a partial ring and move keys around for nothing.
///
/// The nodes learn that their sessions expired one by one (each on its next try to reach
/// ZooKeeper): until every ARCUS node out of the ring has, wait. Letting in the first ones
/// alone would leave the others to a heal, whose fill from a ring that never had their keys
/// drops what they hold (seen: 33,467 keys of one node deleted).
fn after_outage(world: &World) -> Option<Action> {
    if !world.ring.is_empty() {
        return None;
    }
    let arcus: Vec<&PodState> = world
        .pods
        .iter()
        .filter(|p| p.ordinal < world.statefulset && p.running && !p.terminating)
        .filter(|p| p.addr.is_some() && p.can_rejoin == Some(true))
        .collect();
    if !arcus.iter().any(|p| p.detached) {
        return None;
    }
    if let Some(p) = arcus.iter().find(|p| !p.detached) {
        return Some(Action::Wait(format!(
            "{} to find its ZooKeeper session expired too, so that every node is let back in together",
            p.name
        )));
    }
    let nodes = arcus
        .iter()
        .filter_map(|p| Some(CacheZnode::new(p.addr.as_deref()?, &p.host)))
        .collect();
    Some(Action::RejoinAll { nodes })
}

/// The record a heal starts with (the node is out already, and has been for a while: nothing
/// to give back; it is filled like a new node before it is let in).
fn heal_record(world: &World, ordinal: u32) -> Option<Operation> {
    let p = world.pod(ordinal)?;
    Some(Operation::Restart {
        host: p.host.clone(),
        pod: p.name.clone(),
        pod_uid: p.uid.clone(),
        stage: RestartStage::HeldOut {
            before: world.ring_addrs(),
            fill: Fill::new(vec![CacheZnode::new(p.addr.as_deref()?, &p.host)], true),
        },
    })
}

fn restart(world: &World, host: &str, pod: &str, uid: &str, stage: &RestartStage) -> Action {
    match stage {
        RestartStage::Draining {
            before,
            znode,
            checkpoint,
        } => Action::ChangeRingAndPass2 {
            before: before.clone(),
            leaving: vec![znode.clone()],
            checkpoint: checkpoint.clone(),
        },
        RestartStage::Drained { .. } => {
            let still_there = world
                .pods
                .iter()
                .any(|p| p.name == pod && p.uid == uid && !p.terminating);
            if still_there {
                Action::DeletePod {
                    pod: pod.to_string(),
                    uid: uid.to_string(),
                }
            } else {
                Action::Advance
            }
        }
        RestartStage::AwaitReturn { before } => {
            let old_pod_running = world
                .pods
                .iter()
                .any(|p| p.name == pod && p.uid == uid && !p.terminating);
            if old_pod_running {
                // Deleted, but the delete did not take (or was never sent): again.
                return Action::DeletePod {
                    pod: pod.to_string(),
                    uid: uid.to_string(),
                };
            }
            await_registration(
                world,
                before,
                &[],
                before.len() as u32 + 1,
                Some(host.to_string()),
            )
        }
        RestartStage::HeldOut { before, fill } => held(world, before, fill),
    }
}

/// A restarted node (`expected`) to register: it is taken out of the ring as it does.
fn await_registration(
    world: &World,
    before: &[String],
    early: &[String],
    to_replicas: u32,
    expected: Option<String>,
) -> Action {
    let joined: Vec<CacheZnode> = world
        .ring
        .iter()
        .filter(|z| !before.iter().any(|b| b == z.addr()))
        .cloned()
        .collect();
    let registered = world.ring.len() as u32 >= to_replicas
        || expected
            .as_deref()
            .is_some_and(|h| joined.iter().any(|z| z.host() == h));
    if !registered {
        // A stock node serving already is filled before it registers (nobody reads it yet);
        // an ARCUS node is taken out of the ring the moment it registers.
        let fresh: Vec<String> = world
            .pods
            .iter()
            .filter(|p| p.running && !p.terminating && p.can_rejoin == Some(false))
            .filter(|p| expected.as_deref() == Some(p.host.as_str()))
            .filter_map(|p| p.addr.clone())
            .filter(|a| !early.contains(a) && !world.ring.iter().any(|z| z.addr() == a))
            .collect();
        return match (fresh.is_empty(), before.is_empty(), expected) {
            (false, false, _) => Action::FillEarly {
                before: before.to_vec(),
                joining: fresh,
            },
            (true, false, Some(host)) if !early.is_empty() => {
                Action::Wait(format!("{host} (filled early) to register"))
            }
            // Polled for at most a few seconds, and only once the pod has an IP (it registers
            // within a fraction of a second of starting).
            (true, false, Some(host))
                if world
                    .pods
                    .iter()
                    .any(|p| p.host == host && p.addr.is_some() && !p.terminating) =>
            {
                Action::TakeOutOnRegistration { hosts: vec![host] }
            }
            (_, _, Some(host)) => Action::Wait(format!("{host} to register")),
            (_, _, None) => Action::Wait("the new pod to be created".into()),
        };
    }
    let rejoinable = !joined.is_empty()
        && !before.is_empty()
        && joined.iter().all(|z| {
            world
                .pods
                .iter()
                .any(|p| p.addr.as_deref() == Some(z.addr()) && p.can_rejoin == Some(true))
        });
    if rejoinable {
        Action::TakeOut { znodes: joined }
    } else {
        Action::CopyAddOnly {
            before: before.to_vec(),
            joining: joined.iter().map(|z| z.addr().to_string()).collect(),
        }
    }
}

fn held(world: &World, before: &[String], fill: &Fill) -> Action {
    let back: Vec<CacheZnode> = fill
        .held
        .iter()
        .filter(|z| world.in_ring(z))
        .cloned()
        .collect();
    if !back.is_empty() {
        // Back in the ring before we let it in (re-registered by itself, or our rejoin went
        // through and pass 2 did not finish): out again; what clients wrote there meanwhile
        // goes back to the owners first.
        return Action::TakeOut { znodes: back };
    }
    let owing = fill.owing();
    if !owing.is_empty() {
        return Action::GiveBack {
            before: before.to_vec(),
            held: owing,
        };
    }
    Action::FillHeldOut {
        before: before.to_vec(),
        held: fill.held.clone(),
        last: true,
    }
}

/// Pods whose `zkensemble` support `next_step` needs this pass: running pods that are not in
/// the ring, and registered ones that joined the ring after `op` began.
pub fn pods_to_probe(op: Option<&Operation>, ring: &[CacheZnode], pods: &[PodState]) -> Vec<u32> {
    let before: &[String] = match op {
        Some(Operation::Join { before, .. })
        | Some(Operation::Restart {
            stage: RestartStage::AwaitReturn { before },
            ..
        }) => before,
        _ => &[],
    };
    pods.iter()
        .filter(|p| p.running && !p.terminating)
        .filter(|p| {
            let Some(addr) = &p.addr else { return false };
            let registered = ring.iter().any(|z| z.host() == p.host);
            !registered || (op.is_some() && !before.is_empty() && !before.contains(addr))
        })
        .map(|p| p.ordinal)
        .collect()
}

/// How a record read from ZooKeeper turned out.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("the claim holds an operation record of version {found}, written by a newer operator (this one reads up to {RECORD_VERSION}); run the newer operator, or clear the record by hand once nothing is in flight")]
    TooNew { found: u32 },
    #[error("the claim's operation record does not parse: {0}; fix or clear it by hand (the claim's data in ZooKeeper)")]
    Malformed(#[source] serde_json::Error),
}

/// The operation in a claim's data: `operation` (this version), the unversioned `pending` of
/// earlier operators (converted), or nothing. Returns it with the record's epoch.
pub fn parse_claim_data(data: &[u8]) -> Result<(Option<Operation>, u64), RecordError> {
    let value: serde_json::Value = serde_json::from_slice(data).unwrap_or_default();
    let epoch = value.get("epoch").and_then(|e| e.as_u64()).unwrap_or(0);
    if let Some(record) = value.get("operation") {
        let found = record.get("version").and_then(|v| v.as_u64()).unwrap_or(0) as u32;
        if found > RECORD_VERSION {
            return Err(RecordError::TooNew { found });
        }
        let record: OperationRecord =
            serde_json::from_value(record.clone()).map_err(RecordError::Malformed)?;
        return Ok((Some(record.operation), record.epoch.max(epoch)));
    }
    match value.get("pending") {
        Some(p) if !p.is_null() => {
            let legacy: LegacyPending =
                serde_json::from_value(p.clone()).map_err(RecordError::Malformed)?;
            Ok((Some(legacy.into_operation()), epoch))
        }
        _ => Ok((None, epoch)),
    }
}

/// The record of operators before version 2 (`pending`), read once and written back as 2.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
enum LegacyPending {
    ScaleIn {
        before: Vec<String>,
        leaving: Vec<String>,
        leaving_znodes: Vec<CacheZnode>,
        checkpoint: Checkpoint,
    },
    ScaleOut {
        before: Vec<String>,
        to_replicas: u32,
        #[serde(default)]
        early: Vec<String>,
        #[serde(default)]
        restart_of: Option<String>,
        #[serde(default)]
        held: Vec<CacheZnode>,
    },
}

impl LegacyPending {
    fn into_operation(self) -> Operation {
        match self {
            LegacyPending::ScaleIn {
                before,
                leaving,
                leaving_znodes,
                checkpoint,
            } => Operation::ScaleIn {
                from: before.len() as u32,
                to: before.len().saturating_sub(leaving.len()) as u32,
                stage: ScaleInStage::Pass1Done {
                    before,
                    leaving: leaving_znodes,
                    checkpoint,
                },
            },
            // A restart has no early fill and one node to bring back.
            LegacyPending::ScaleOut {
                before,
                restart_of: Some(host),
                held,
                ..
            } => Operation::Restart {
                pod: host.split('.').next().unwrap_or_default().to_string(),
                host,
                pod_uid: String::new(),
                stage: if held.is_empty() {
                    RestartStage::AwaitReturn { before }
                } else {
                    // It was in the middle of a fill; whether it gave back is unknown, and
                    // the old operator never gave back on a resumed fill either.
                    RestartStage::HeldOut {
                        before,
                        fill: Fill::new(held, true),
                    }
                },
            },
            LegacyPending::ScaleOut {
                before,
                to_replicas,
                early,
                restart_of: None,
                held,
            } => Operation::Join {
                // One node at a time.
                from_replicas: None,
                to_replicas,
                before,
                early,
                stage: if held.is_empty() {
                    JoinStage::AwaitRegistration
                } else {
                    JoinStage::HeldOut {
                        fill: Fill::new(held, true),
                    }
                },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: &str = "ns";

    fn host(o: u32) -> String {
        format!("mc-{o}.{NS}")
    }
    fn addr(o: u32) -> String {
        format!("10.0.0.{}:11211", o + 10)
    }
    fn znode(o: u32) -> CacheZnode {
        CacheZnode::new(&addr(o), &host(o))
    }
    fn ring(ordinals: impl IntoIterator<Item = u32>) -> Vec<CacheZnode> {
        ordinals.into_iter().map(znode).collect()
    }
    fn addrs(ordinals: impl IntoIterator<Item = u32>) -> Vec<String> {
        ordinals.into_iter().map(addr).collect()
    }
    fn pod(o: u32, can_rejoin: Option<bool>) -> PodState {
        PodState {
            ordinal: o,
            name: format!("mc-{o}"),
            uid: format!("uid-{o}"),
            host: host(o),
            addr: Some(addr(o)),
            running: true,
            terminating: false,
            can_rejoin,
            detached: false,
        }
    }
    fn pods(n: u32) -> Vec<PodState> {
        (0..n).map(|o| pod(o, Some(true))).collect()
    }
    fn cp() -> Checkpoint {
        Checkpoint {
            complete: true,
            ..Checkpoint::default()
        }
    }
    fn world<'a>(
        desired: u32,
        sts: u32,
        ring: &'a [CacheZnode],
        pods: &'a [PodState],
    ) -> World<'a> {
        World {
            desired,
            statefulset: sts,
            ring,
            pods,
            day2: None,
        }
    }

    fn restart_op(stage: RestartStage) -> Operation {
        Operation::Restart {
            host: host(2),
            pod: "mc-2".into(),
            pod_uid: "uid-2".into(),
            stage,
        }
    }

    // --- idle ---

    #[test]
    fn settled_cluster_is_idle() {
        let (r, p) = (ring(0..3), pods(3));
        assert_eq!(next_step(None, &world(3, 3, &r, &p)).action, Action::Idle);
    }

    #[test]
    fn scale_in_drains_the_registered_leaving_nodes_first() {
        let (r, p) = (ring(0..5), pods(5));
        let step = next_step(None, &world(3, 5, &r, &p));
        assert_eq!(
            step.action,
            Action::Drain {
                before: addrs(0..5),
                leaving: ring(3..5),
                purpose: DrainPurpose::ScaleIn { from: 5, to: 3 },
            }
        );
        // Its successor holds the checkpoint: the operator restarted after it resumes there.
        let next = step.successor(&Outcome::Checkpoint(cp())).unwrap();
        assert_eq!(next.stage_name(), "Pass1Done");
        assert_eq!(next.label(), "scale-in 5→3");
    }

    #[test]
    fn scale_in_without_registered_leaving_nodes_has_nothing_to_move() {
        let (r, p) = (ring(0..3), pods(5));
        assert_eq!(next_step(None, &world(3, 5, &r, &p)).action, Action::Idle);
    }

    #[test]
    fn scale_out_records_one_join_of_up_to_a_batch_of_nodes() {
        let (r, p) = (ring(0..3), pods(3));
        let step = next_step(None, &world(5, 3, &r, &p));
        assert_eq!(
            step.action,
            Action::StartJoin {
                from_replicas: 3,
                to_replicas: 5,
                before: addrs(0..3)
            }
        );
        let next = step.successor(&Outcome::Done).unwrap();
        assert_eq!(next.stage_name(), "AwaitRegistration");
        assert!(matches!(
            next,
            Operation::Join {
                from_replicas: Some(3),
                ..
            }
        ));
        // A larger scale-out goes by batches.
        let step = next_step(None, &world(3 + 2 * JOIN_BATCH, 3, &r, &p));
        assert!(
            matches!(step.action, Action::StartJoin { to_replicas, .. } if to_replicas == 3 + JOIN_BATCH),
            "{step:?}"
        );
    }

    #[test]
    fn a_roll_drains_the_node_before_its_pod_goes() {
        let (r, p) = (ring(0..3), pods(3));
        let mut w = world(3, 3, &r, &p);
        w.day2 = Some(Day2Request::Roll { ordinal: 2 });
        let step = next_step(None, &w);
        let Action::Drain {
            leaving, purpose, ..
        } = &step.action
        else {
            panic!("{step:?}")
        };
        assert_eq!(leaving, &ring(2..3));
        assert_eq!(
            purpose,
            &DrainPurpose::Restart {
                host: host(2),
                pod: "mc-2".into(),
                uid: "uid-2".into()
            }
        );
        let next = step.successor(&Outcome::Checkpoint(cp())).unwrap();
        assert_eq!(next.stage_name(), "Draining");
    }

    #[test]
    fn a_node_out_of_zookeeper_is_filled_before_it_is_let_in() {
        let (r, p) = (ring(0..2), pods(3));
        let mut w = world(3, 3, &r, &p);
        w.day2 = Some(Day2Request::Heal { ordinal: 2 });
        let step = next_step(None, &w);
        assert!(matches!(step.action, Action::StartHeal(_)), "{step:?}");
        let op = step.successor(&Outcome::Done).unwrap();
        assert_eq!((op.stage_name(), op.node()), ("HeldOut", Some("mc-2")));
        // Never a direct rejoin: the heal's first step is the fill.
        assert_eq!(
            next_step(Some(&op), &w).action,
            Action::FillHeldOut {
                before: addrs(0..2),
                held: ring(2..3),
                last: true
            }
        );
    }

    #[test]
    fn nodes_all_out_after_an_outage_are_let_back_in_together_before_anything_else() {
        let none: Vec<CacheZnode> = vec![];
        let mut p = pods(3);
        for x in &mut p {
            x.detached = true;
        }
        let mut w = world(3, 3, &none, &p);
        w.day2 = Some(Day2Request::Heal { ordinal: 0 });
        let step = next_step(None, &w);
        assert_eq!(step.action, Action::RejoinAll { nodes: ring(0..3) });
        assert!(!step.persists());
        // A scale asked for during the outage waits until they are back.
        let step = next_step(None, &world(5, 3, &none, &p));
        assert!(matches!(step.action, Action::RejoinAll { .. }), "{step:?}");
        // One that has not found its session expired yet is waited for: all go in together.
        p[1].detached = false;
        let step = next_step(None, &world(3, 3, &none, &p));
        assert!(matches!(step.action, Action::Wait(_)), "{step:?}");
        // One that does not answer at all (can_rejoin unknown) is not waited for.
        p[1].can_rejoin = None;
        let step = next_step(None, &world(3, 3, &none, &p));
        assert_eq!(
            step.action,
            Action::RejoinAll {
                nodes: vec![znode(0), znode(2)]
            }
        );
    }

    #[test]
    fn an_arcus_node_out_of_an_empty_ring_is_never_restarted() {
        let none: Vec<CacheZnode> = vec![];
        let p = pods(3);
        let mut w = world(3, 3, &none, &p);
        w.day2 = Some(Day2Request::Heal { ordinal: 1 });
        assert!(matches!(next_step(None, &w).action, Action::Wait(_)));
        // A stock node cannot be let back in: restarted.
        let mut p = pods(3);
        p[1].can_rejoin = Some(false);
        let mut w = world(3, 3, &none, &p);
        w.day2 = Some(Day2Request::Heal { ordinal: 1 });
        assert_eq!(
            next_step(None, &w).action,
            Action::RestartPod { pod: "mc-1".into() }
        );
    }

    #[test]
    fn a_node_out_of_a_ring_that_others_still_serve_is_not_let_in_unfilled() {
        let r = ring(0..2);
        let mut p = pods(3);
        p[2].detached = true;
        let mut w = world(3, 3, &r, &p);
        w.day2 = Some(Day2Request::Heal { ordinal: 2 });
        assert!(matches!(next_step(None, &w).action, Action::StartHeal(_)));
        // Nor nodes of a cluster that is still starting (they register themselves).
        let none: Vec<CacheZnode> = vec![];
        assert!(!matches!(
            next_step(None, &world(3, 3, &none, &pods(3))).action,
            Action::RejoinAll { .. }
        ));
    }

    #[test]
    fn a_stock_node_out_of_zookeeper_is_restarted() {
        let r = ring(0..2);
        let mut p = pods(3);
        p[2].can_rejoin = Some(false);
        let mut w = world(3, 3, &r, &p);
        w.day2 = Some(Day2Request::Heal { ordinal: 2 });
        assert_eq!(
            next_step(None, &w).action,
            Action::RestartPod { pod: "mc-2".into() }
        );
    }

    // --- one test per persisted stage: what an operator restarted there does ---

    #[test]
    fn restarted_at_scale_in_pass1_done_changes_the_ring_and_runs_pass_2() {
        let op = Operation::ScaleIn {
            from: 5,
            to: 3,
            stage: ScaleInStage::Pass1Done {
                before: addrs(0..5),
                leaving: ring(3..5),
                checkpoint: cp(),
            },
        };
        // Whether or not the ring change went through before the restart.
        for r in [ring(0..5), ring(0..3)] {
            let p = pods(5);
            let step = next_step(Some(&op), &world(3, 5, &r, &p));
            assert_eq!(
                step.action,
                Action::ChangeRingAndPass2 {
                    before: addrs(0..5),
                    leaving: ring(3..5),
                    checkpoint: cp()
                }
            );
            assert_eq!(step.successor(&Outcome::Done), None);
        }
    }

    #[test]
    fn restarted_at_join_await_registration_takes_the_node_out_as_it_registers() {
        let op = Operation::Join {
            from_replicas: None,
            to_replicas: 4,
            before: addrs(0..3),
            early: vec![],
            stage: JoinStage::AwaitRegistration,
        };
        let (r, p) = (ring(0..3), pods(4));
        let step = next_step(Some(&op), &world(5, 4, &r, &p));
        assert_eq!(
            step.action,
            Action::TakeOutOnRegistration {
                hosts: vec![host(3)]
            }
        );
        let next = step.successor(&Outcome::TookOut(ring(3..4))).unwrap();
        assert_eq!(
            next,
            Operation::Join {
                from_replicas: None,
                to_replicas: 4,
                before: addrs(0..3),
                early: vec![],
                stage: JoinStage::HeldOut {
                    fill: Fill::new(ring(3..4), false)
                }
            }
        );
        // Not registered in time: the same record, tried again.
        assert_eq!(step.successor(&Outcome::TookOut(vec![])), Some(op.clone()));
        // Registered meanwhile (we missed the moment): taken out now.
        let r = ring(0..4);
        assert_eq!(
            next_step(Some(&op), &world(5, 4, &r, &p)).action,
            Action::TakeOut { znodes: ring(3..4) }
        );
    }

    #[test]
    fn a_join_the_spec_no_longer_wants_ends() {
        let op = Operation::Join {
            from_replicas: None,
            to_replicas: 4,
            before: addrs(0..3),
            early: vec![],
            stage: JoinStage::AwaitRegistration,
        };
        let (r, p) = (ring(0..3), pods(4));
        let step = next_step(Some(&op), &world(3, 4, &r, &p));
        assert_eq!(step.action, Action::Abandon);
        assert_eq!(step.successor(&Outcome::Done), None);
    }

    #[test]
    fn restarted_at_join_await_registration_with_stock_nodes() {
        let op = Operation::Join {
            from_replicas: None,
            to_replicas: 4,
            before: addrs(0..3),
            early: vec![],
            stage: JoinStage::AwaitRegistration,
        };
        let r = ring(0..3);
        let mut p = pods(4);
        p[3].can_rejoin = Some(false);
        let step = next_step(Some(&op), &world(4, 4, &r, &p));
        assert_eq!(
            step.action,
            Action::FillEarly {
                before: addrs(0..3),
                joining: addrs(3..4)
            }
        );
        let filled = step.successor(&Outcome::Done).unwrap();
        // Filled early: it waits for the registration, then gets the add-only copy.
        let w = world(4, 4, &r, &p);
        assert!(matches!(
            next_step(Some(&filled), &w).action,
            Action::Wait(_)
        ));
        let r = ring(0..4);
        let step = next_step(Some(&filled), &world(4, 4, &r, &p));
        assert_eq!(
            step.action,
            Action::CopyAddOnly {
                before: addrs(0..3),
                joining: addrs(3..4)
            }
        );
        assert_eq!(step.successor(&Outcome::Done), None);
    }

    #[test]
    fn a_node_taken_out_later_owes_its_own_give_back_only() {
        // Node 3 held and given back (pass 1 may have begun to fill it); node 4 registers.
        let op = join_of(3, 5, addrs(0..3), holding(ring(3..4), true));
        let (r, p) = (ring([0, 1, 2, 4]), pods(5));
        let step = next_step(Some(&op), &world(5, 5, &r, &p));
        assert_eq!(step.action, Action::TakeOut { znodes: ring(4..5) });
        let owing = step.successor(&Outcome::Done).unwrap();
        let JoinStage::HeldOut { fill } = &join_stage(&owing) else {
            panic!("{owing:?}")
        };
        assert_eq!((fill.given_back, fill.owed.clone()), (true, addrs(4..5)));
        // A crash before the give-back: it is done for node 4 alone, never again for node 3.
        let r = ring(0..3);
        let step = next_step(Some(&owing), &world(5, 5, &r, &p));
        assert_eq!(
            step.action,
            Action::GiveBack {
                before: addrs(0..3),
                held: ring(4..5)
            }
        );
        let paid = step.successor(&Outcome::Done).unwrap();
        assert_eq!(paid, join_of(3, 5, addrs(0..3), holding(ring(3..5), true)));
        assert_eq!(given_back(owing, &ring(4..5)), paid);
        // Fill node 3; node 4 still owes nothing after its round.
        let step = next_step(Some(&paid), &world(5, 5, &r, &p));
        assert!(
            matches!(&step.action, Action::FillHeldOut { held, last: false, .. } if *held == ring(3..4)),
            "{:?}",
            step.action
        );
        let next = step.successor(&Outcome::Done).unwrap();
        assert_eq!(next, join_of(3, 5, addrs(0..4), holding(ring(4..5), true)));
        // All held owing is the short form, which the previous version wrote too.
        let fresh = held_out(
            join_of(3, 5, addrs(0..3), JoinStage::AwaitRegistration),
            &ring(3..5),
        );
        assert_eq!(
            fresh,
            join_of(3, 5, addrs(0..3), holding(ring(3..5), false))
        );
    }

    #[test]
    fn a_fill_without_owed_nodes_is_stored_as_before() {
        let old = serde_json::json!({"held": [], "givenBack": true});
        let fill: Fill = serde_json::from_value(old.clone()).unwrap();
        assert_eq!(fill, Fill::new(vec![], true));
        assert_eq!(serde_json::to_value(&fill).unwrap(), old);
    }

    fn join_stage(op: &Operation) -> JoinStage {
        match op {
            Operation::Join { stage, .. } => stage.clone(),
            other => panic!("not a join: {other:?}"),
        }
    }

    #[test]
    fn restarted_at_held_out_gives_back_once_then_fills() {
        let fill = |given_back| Fill::new(ring(3..4), given_back);
        let op = |given_back| Operation::Join {
            from_replicas: None,
            to_replicas: 4,
            before: addrs(0..3),
            early: vec![],
            stage: JoinStage::HeldOut {
                fill: fill(given_back),
            },
        };
        let (r, p) = (ring(0..3), pods(4));
        let w = world(4, 4, &r, &p);
        let step = next_step(Some(&op(false)), &w);
        assert_eq!(
            step.action,
            Action::GiveBack {
                before: addrs(0..3),
                held: ring(3..4)
            }
        );
        assert_eq!(step.successor(&Outcome::Done), Some(op(true)));
        let step = next_step(Some(&op(true)), &w);
        assert_eq!(
            step.action,
            Action::FillHeldOut {
                before: addrs(0..3),
                held: ring(3..4),
                last: true
            }
        );
        assert_eq!(step.successor(&Outcome::Done), None);
        // Back in the ring before the fill finished: out again, and give back again.
        let r = ring(0..4);
        let step = next_step(Some(&op(true)), &world(4, 4, &r, &p));
        assert_eq!(step.action, Action::TakeOut { znodes: ring(3..4) });
        assert_eq!(step.successor(&Outcome::Done), Some(op(false)));
    }

    fn join_of(from: u32, to: u32, before: Vec<String>, stage: JoinStage) -> Operation {
        Operation::Join {
            from_replicas: Some(from),
            to_replicas: to,
            before,
            early: vec![],
            stage,
        }
    }

    fn holding(held: Vec<CacheZnode>, given_back: bool) -> JoinStage {
        JoinStage::HeldOut {
            fill: Fill::new(held, given_back),
        }
    }

    #[test]
    fn a_join_of_several_nodes_holds_each_as_it_registers_and_fills_them_in_turn() {
        let op = join_of(3, 6, addrs(0..3), JoinStage::AwaitRegistration);
        let (r, p) = (ring(0..3), pods(6));
        let step = next_step(Some(&op), &world(6, 6, &r, &p));
        assert_eq!(
            step.action,
            Action::TakeOutOnRegistration {
                hosts: vec![host(3), host(4), host(5)]
            }
        );
        let op = step.successor(&Outcome::TookOut(ring(3..4))).unwrap();
        assert_eq!(op, join_of(3, 6, addrs(0..3), holding(ring(3..4), false)));
        // mc-4 registered between two passes: out at once, held with mc-3.
        let r = [ring(0..3), ring(4..5)].concat();
        let step = next_step(Some(&op), &world(6, 6, &r, &p));
        assert_eq!(step.action, Action::TakeOut { znodes: ring(4..5) });
        let op = step.successor(&Outcome::Done).unwrap();
        assert_eq!(op, join_of(3, 6, addrs(0..3), holding(ring(3..5), false)));
        // mc-5 is started: awaited before the fill.
        let r = ring(0..3);
        let step = next_step(Some(&op), &world(6, 6, &r, &p));
        assert_eq!(
            step.action,
            Action::TakeOutOnRegistration {
                hosts: vec![host(5)]
            }
        );
        let op = step.successor(&Outcome::TookOut(ring(5..6))).unwrap();
        // All held: given back once, then one fill of the three ends the join.
        let step = next_step(Some(&op), &world(6, 6, &r, &p));
        assert_eq!(
            step.action,
            Action::GiveBack {
                before: addrs(0..3),
                held: ring(3..6)
            }
        );
        let op = step.successor(&Outcome::Done).unwrap();
        // Filled and let in one per round (see `join_step`); the others stay held and are
        // filled from the ring with it.
        let step = next_step(Some(&op), &world(6, 6, &r, &p));
        assert_eq!(
            step.action,
            Action::FillHeldOut {
                before: addrs(0..3),
                held: ring(3..4),
                last: false
            }
        );
        let op = step.successor(&Outcome::Done).unwrap();
        assert_eq!(op, join_of(3, 6, addrs(0..4), holding(ring(4..6), true)));
        let r = ring(0..4);
        let step = next_step(Some(&op), &world(6, 6, &r, &p));
        assert_eq!(
            step.action,
            Action::FillHeldOut {
                before: addrs(0..4),
                held: ring(4..5),
                last: false
            }
        );
        let op = join_of(3, 6, addrs(0..5), holding(ring(5..6), true));
        let r = ring(0..5);
        let step = next_step(Some(&op), &world(6, 6, &r, &p));
        assert!(matches!(
            step.action,
            Action::FillHeldOut { last: true, .. }
        ));
        assert_eq!(step.successor(&Outcome::Done), None);
    }

    #[test]
    fn a_join_fills_what_it_holds_while_the_next_pod_is_not_started() {
        // The StatefulSet's ordered start: mc-4 is created once mc-3 is Ready, which it is
        // not while held out.
        let op = join_of(3, 5, addrs(0..3), holding(ring(3..4), true));
        let (r, p) = (ring(0..3), pods(4));
        let step = next_step(Some(&op), &world(5, 5, &r, &p));
        assert_eq!(
            step.action,
            Action::FillHeldOut {
                before: addrs(0..3),
                held: ring(3..4),
                last: false
            }
        );
        // The join goes on, filling the rest from the ring with mc-3 in it.
        let op = step.successor(&Outcome::Done).unwrap();
        assert_eq!(op, join_of(3, 5, addrs(0..4), JoinStage::AwaitRegistration));
        let r = ring(0..4);
        assert!(matches!(
            next_step(Some(&op), &world(5, 5, &r, &p)).action,
            Action::Wait(_)
        ));
        let p = pods(5);
        assert_eq!(
            next_step(Some(&op), &world(5, 5, &r, &p)).action,
            Action::TakeOutOnRegistration {
                hosts: vec![host(4)]
            }
        );
        // All in: the last round's add-only copy has nothing to copy and ends the join.
        let r = ring(0..5);
        let op = join_of(3, 5, addrs(0..5), JoinStage::AwaitRegistration);
        let step = next_step(Some(&op), &world(5, 5, &r, &p));
        assert_eq!(
            step.action,
            Action::CopyAddOnly {
                before: addrs(0..5),
                joining: vec![]
            }
        );
        assert_eq!(step.successor(&Outcome::Done), None);
    }

    #[test]
    fn a_join_of_stock_nodes_fills_them_early_then_copies_add_only() {
        let op = join_of(3, 5, addrs(0..3), JoinStage::AwaitRegistration);
        let r = ring(0..3);
        let p: Vec<PodState> = (0..5).map(|o| pod(o, Some(o < 3))).collect();
        let step = next_step(Some(&op), &world(5, 5, &r, &p));
        assert_eq!(
            step.action,
            Action::FillEarly {
                before: addrs(0..3),
                joining: addrs(3..5)
            }
        );
        let filled = step.successor(&Outcome::Done).unwrap();
        assert!(matches!(
            next_step(Some(&filled), &world(5, 5, &r, &p)).action,
            Action::Wait(_)
        ));
        // One registered: the other is still awaited.
        let r = ring(0..4);
        assert!(matches!(
            next_step(Some(&filled), &world(5, 5, &r, &p)).action,
            Action::Wait(_)
        ));
        let r = ring(0..5);
        let step = next_step(Some(&filled), &world(5, 5, &r, &p));
        assert_eq!(
            step.action,
            Action::CopyAddOnly {
                before: addrs(0..3),
                joining: addrs(3..5)
            }
        );
        assert_eq!(step.successor(&Outcome::Done), None);
    }

    #[test]
    fn a_join_the_spec_shrinks_gives_back_then_narrows_or_ends() {
        let op = join_of(3, 6, addrs(0..3), holding(ring(3..5), false));
        let (r, p) = (ring(0..3), pods(6));
        // Whatever clients wrote on the held nodes goes back before any of them is dropped.
        let step = next_step(Some(&op), &world(4, 6, &r, &p));
        assert_eq!(
            step.action,
            Action::GiveBack {
                before: addrs(0..3),
                held: ring(3..5)
            }
        );
        let op = step.successor(&Outcome::Done).unwrap();
        let step = next_step(Some(&op), &world(4, 6, &r, &p));
        assert_eq!(
            step.action,
            Action::Narrow {
                to_replicas: 4,
                held: ring(3..4)
            }
        );
        let narrowed = step.successor(&Outcome::Done).unwrap();
        assert_eq!(
            narrowed,
            join_of(3, 4, addrs(0..3), holding(ring(3..4), true))
        );
        let step = next_step(Some(&narrowed), &world(4, 6, &r, &p));
        assert!(
            matches!(step.action, Action::FillHeldOut { last: true, .. }),
            "{step:?}"
        );
        // A dropped node in the ring, or nothing of the join wanted: the join ends (the
        // scale-in that follows drains what registered).
        let r = [ring(0..3), ring(5..6)].concat();
        assert_eq!(
            next_step(Some(&op), &world(4, 6, &r, &p)).action,
            Action::Abandon
        );
        let r = ring(0..3);
        let step = next_step(Some(&op), &world(3, 6, &r, &p));
        assert_eq!(step.action, Action::Abandon);
        assert_eq!(step.successor(&Outcome::Done), None);
    }

    #[test]
    fn a_one_node_join_recorded_by_the_previous_version_is_finished() {
        // As the version that joined one node at a time wrote it (no fromReplicas).
        let data = format!(
            r#"{{"uid":"u","operation":{{"version":2,"epoch":4,"kind":"join","toReplicas":4,"before":{before},"stage":{{"name":"heldOut","fill":{{"held":["{held}"],"givenBack":true}}}}}}}}"#,
            before = serde_json::to_string(&addrs(0..3)).unwrap(),
            held = znode(3)
        );
        let (op, epoch) = parse_claim_data(data.as_bytes()).unwrap();
        let op = op.unwrap();
        assert_eq!(epoch, 4);
        assert!(matches!(
            op,
            Operation::Join {
                from_replicas: None,
                to_replicas: 4,
                ..
            }
        ));
        let (r, p) = (ring(0..3), pods(4));
        let step = next_step(Some(&op), &world(6, 4, &r, &p));
        assert_eq!(
            step.action,
            Action::FillHeldOut {
                before: addrs(0..3),
                held: ring(3..4),
                last: true
            }
        );
        assert_eq!(step.successor(&Outcome::Done), None);
        // Written back as it was read: an operator of that version can still read it.
        let text = serde_json::to_string(&op).unwrap();
        assert!(!text.contains("fromReplicas"), "{text}");
    }

    #[test]
    fn restarted_at_restart_draining_finishes_the_drain() {
        let op = restart_op(RestartStage::Draining {
            before: addrs(0..3),
            znode: znode(2),
            checkpoint: cp(),
        });
        let (r, p) = (ring(0..3), pods(3));
        let step = next_step(Some(&op), &world(3, 3, &r, &p));
        assert_eq!(
            step.action,
            Action::ChangeRingAndPass2 {
                before: addrs(0..3),
                leaving: ring(2..3),
                checkpoint: cp()
            }
        );
        // The drain's last write is the next stage, never "nothing in flight": a new leader
        // must not find a drained node and rejoin it with what it held.
        let next = step.successor(&Outcome::Done).unwrap();
        assert_eq!(
            next,
            restart_op(RestartStage::Drained {
                before: addrs(0..2)
            })
        );
    }

    #[test]
    fn restarted_at_restart_drained_deletes_the_pod_once() {
        let op = restart_op(RestartStage::Drained {
            before: addrs(0..2),
        });
        let (r, p) = (ring(0..2), pods(3));
        let step = next_step(Some(&op), &world(3, 3, &r, &p));
        assert_eq!(
            step.action,
            Action::DeletePod {
                pod: "mc-2".into(),
                uid: "uid-2".into()
            }
        );
        let next = step.successor(&Outcome::Done).unwrap();
        assert_eq!(next.stage_name(), "AwaitReturn");
        // Deleted and re-created before the record moved on: just move on.
        let mut p = pods(3);
        p[2].uid = "uid-2b".into();
        assert_eq!(
            next_step(Some(&op), &world(3, 3, &r, &p)).action,
            Action::Advance
        );
    }

    #[test]
    fn restarted_at_restart_await_return() {
        let op = restart_op(RestartStage::AwaitReturn {
            before: addrs(0..2),
        });
        let r = ring(0..2);
        // The old pod is still there: the delete did not happen.
        let p = pods(3);
        assert!(matches!(
            next_step(Some(&op), &world(3, 3, &r, &p)).action,
            Action::DeletePod { .. }
        ));
        // The new pod: taken out as it registers, then filled.
        let mut p = pods(3);
        p[2].uid = "uid-2b".into();
        let step = next_step(Some(&op), &world(3, 3, &r, &p));
        assert_eq!(
            step.action,
            Action::TakeOutOnRegistration {
                hosts: vec![host(2)]
            }
        );
        let next = step.successor(&Outcome::TookOut(ring(2..3))).unwrap();
        assert_eq!(
            next,
            restart_op(RestartStage::HeldOut {
                before: addrs(0..2),
                fill: Fill::new(ring(2..3), false)
            })
        );
    }

    #[test]
    fn restarted_at_restart_held_out_fills_then_lets_in() {
        let op = restart_op(RestartStage::HeldOut {
            before: addrs(0..2),
            fill: Fill::new(ring(2..3), true),
        });
        let (r, p) = (ring(0..2), pods(3));
        let step = next_step(Some(&op), &world(3, 3, &r, &p));
        assert_eq!(
            step.action,
            Action::FillHeldOut {
                before: addrs(0..2),
                held: ring(2..3),
                last: true
            }
        );
        assert_eq!(step.successor(&Outcome::Done), None);
        // It refused to rejoin: restarted, and awaited like any restarted node.
        assert_eq!(
            step.successor(&Outcome::RejoinFailed).unwrap().stage_name(),
            "AwaitReturn"
        );
    }

    #[test]
    fn probes_only_nodes_the_step_may_need() {
        let r = ring(0..3);
        let mut p = pods(4);
        p[3].can_rejoin = None;
        assert_eq!(pods_to_probe(None, &r, &p), vec![3]);
        let op = Operation::Join {
            from_replicas: None,
            to_replicas: 4,
            before: addrs(0..2),
            early: vec![],
            stage: JoinStage::AwaitRegistration,
        };
        assert_eq!(pods_to_probe(Some(&op), &r, &p), vec![2, 3]);
    }

    // --- the record ---

    #[test]
    fn records_round_trip_with_their_version_and_epoch() {
        let op = restart_op(RestartStage::Draining {
            before: addrs(0..3),
            znode: znode(2),
            checkpoint: cp(),
        });
        let record = OperationRecord {
            version: RECORD_VERSION,
            epoch: 7,
            operation: op.clone(),
        };
        let data =
            serde_json::json!({"managedBy": "arcus-operator", "uid": "u", "operation": record});
        let text = data.to_string();
        assert!(text.contains(r#""kind":"restart""#), "{text}");
        assert!(text.contains(r#""name":"draining""#), "{text}");
        assert_eq!(parse_claim_data(text.as_bytes()).unwrap(), (Some(op), 7));
        assert_eq!(
            parse_claim_data(br#"{"managedBy":"arcus-operator","uid":"u"}"#).unwrap(),
            (None, 0)
        );
    }

    #[test]
    fn a_newer_record_is_refused_clearly() {
        let data = br#"{"uid":"u","operation":{"version":3,"epoch":1,"kind":"teleport"}}"#;
        let err = parse_claim_data(data).unwrap_err();
        assert!(err.to_string().contains("version 3"), "{err}");
        let bad = br#"{"uid":"u","operation":{"version":2,"epoch":1,"kind":"teleport"}}"#;
        assert!(matches!(
            parse_claim_data(bad).unwrap_err(),
            RecordError::Malformed(_)
        ));
    }

    #[test]
    fn records_of_earlier_operators_are_read() {
        let scale_in = r#"{"uid":"u","pending":{"kind":"scaleIn","before":["a:1","b:1","c:1"],"leaving":["c:1"],"leaving_znodes":["c:1-mc-2.ns"],"checkpoint":{"sources":{},"targets":{},"complete":true}}}"#;
        let (op, _) = parse_claim_data(scale_in.as_bytes()).unwrap();
        assert_eq!(op.as_ref().unwrap().label(), "scale-in 3→2");
        assert_eq!(op.unwrap().stage_name(), "Pass1Done");
        let held = r#"{"uid":"u","pending":{"kind":"scaleOut","before":["a:1"],"to_replicas":2,"early":[],"held":["b:1-mc-1.ns"]}}"#;
        let (op, _) = parse_claim_data(held.as_bytes()).unwrap();
        assert_eq!(op.unwrap().stage_name(), "HeldOut");
        let restart = r#"{"uid":"u","pending":{"kind":"scaleOut","before":["a:1"],"to_replicas":2,"restart_of":"mc-1.ns"}}"#;
        let (op, _) = parse_claim_data(restart.as_bytes()).unwrap();
        let op = op.unwrap();
        assert_eq!((op.stage_name(), op.node()), ("AwaitReturn", Some("mc-1")));
    }
}
