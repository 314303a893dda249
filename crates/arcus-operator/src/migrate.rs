//! The executor of the operation state machine (`operation`), and the cache copies it makes
//! (the `migration` engine does the copying):
//! - scale-in: pass 1 copies the leaving nodes' items to their owners on the ring that remains
//!   (`Drain`), one transaction deletes the leaving znodes and records the stage
//!   (`ChangeRingAndPass2`; clients switch rings, the nodes keep serving us), pass 2 carries
//!   over what changed meanwhile;
//! - nodes joining, up to `operation::JOIN_BATCH` in one recorded join: a node that answers
//!   `zkensemble` (ARCUS) is taken out of `cache_list` the moment it registers, what clients
//!   wrote there in those milliseconds goes back to the owners at once (`GiveBack` if a crash came
//!   between), even during another node's fill (its sweep), then one held node
//!   at a time: pass 1 fills it, `zkensemble rejoin` lets it in, pass 2 carries over what
//!   changed meanwhile (`FillHeldOut`); other servers get an add-only copy once they registered
//!   (a key deleted on the new node before its copy arrived can come back);
//! - a cache-aware restart: the scale-in of that node, its pod deleted, and the join's fill
//!   once it is back; healing a node that left ZooKeeper is that fill alone.
//!
//! Pass 2 runs twice: shortly after the ring change, then after clients followed it (see
//! `pass2_twice`). A key written on its old owner after pass 1's last listing and deleted by a
//! client on its new owner before pass 2 reaches it would come back (the ascii protocol has no
//! tombstone). A client that sends such a delete to the key's previous owner too closes that
//! window (arcus-client does, `ClientOptions::delete_previous_owners_for`); for other clients
//! it stays open for about the first pass 2's duration after the change.
//!
//! Every effect is behind a trait — [`Registry`] (ZooKeeper), [`NodeAdmin`] (admin commands),
//! [`Pods`] (the API), [`Mover`] (copies) — so the executor runs on fakes in tests. Each action
//! ends with the write that records its successor; long actions start with a write of the
//! current record (which fences out a paused ex-leader's later writes in ZooKeeper), and copies
//! stop when the leader gate closes.

use crate::crd::MigrationStatus;
use crate::day2::LiveConfig;
use crate::leader::{Fenced, LeaderGate};
use crate::migration::{
    Checkpoint, Migration, MigrationError, MigrationOptions, Phase, Progress, ScaleIn, ScaleOut,
};
use crate::operation::{self, Action, DrainPurpose, Operation, Outcome, Step};
use crate::zk::{Registry, ZkError};
use crate::zk_plan::CacheZnode;
use arcus_client::Ring;
use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

/// How long clients get to follow a ring change through their ZooKeeper watch before pass 2
/// (ARCUS clients rebuild their ring on the watch event, within milliseconds).
const CLIENTS_FOLLOW: Duration = Duration::from_secs(1);
/// How long the first pass 2 waits after a ring change: long enough for clients to have
/// switched (a write a client still sends to a source after the first pass 2 read that key is
/// not carried over), short enough that a key written on a source just before the change
/// reaches its new owner before clients delete it there.
const CLIENTS_SWITCH: Duration = Duration::from_millis(200);
/// How long `TakeOutOnRegistration` waits for a started node to register.
const REGISTRATION_WAIT: Duration = Duration::from_secs(20);
/// How often `cache_list` is read meanwhile (a few hundred cheap reads at most: a node
/// registers within a fraction of a second of starting; a watch would not be faster, and the
/// session already holds a recursive watch above this path).
const REGISTRATION_POLL: Duration = Duration::from_millis(1);
/// How often `cache_list` is read during a fill for a node of the join that registered
/// meanwhile (it is taken out at once, instead of sitting in the ring until the fill ends).
const SWEEP_POLL: Duration = Duration::from_millis(5);

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("migration: {0}")]
    Migration(#[from] MigrationError),
    #[error(
        "zkensemble rejoin of {node} failed; the next reconcile retries (check the node's log)"
    )]
    Rejoin {
        node: String,
        #[source]
        source: arcus_client::Error,
    },
    #[error(transparent)]
    Registry(#[from] ZkError),
    #[error("{action} pod {pod}")]
    Pod {
        action: &'static str,
        pod: String,
        #[source]
        source: kube::Error,
    },
    #[error(transparent)]
    Fenced(#[from] Fenced),
    #[error("leadership lost during {0}: the copy stopped")]
    Stopped(String),
}

/// Where a node stands with ZooKeeper, as its `zkensemble get` answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZkMembership {
    /// Stock memcached (no `zkensemble`): cannot be held out of the ring or let back in.
    Stock,
    /// ARCUS with a ZooKeeper session.
    Session,
    /// ARCUS without one (its znode was deleted, or its session expired with zkfailstop off):
    /// serving, out of `cache_list` until `zkensemble rejoin`.
    NoSession,
}

impl ZkMembership {
    /// Whether the node can be held out of the ring and let back in.
    pub fn can_rejoin(self) -> bool {
        self != ZkMembership::Stock
    }
}

/// Admin commands on cache nodes.
pub trait NodeAdmin: Send + Sync {
    /// Where the node stands with ZooKeeper; None when it does not answer.
    fn membership(&self, addr: &str) -> impl Future<Output = Option<ZkMembership>> + Send;
    /// `zkensemble rejoin`.
    fn rejoin(&self, addr: &str) -> impl Future<Output = Result<(), MigrateError>> + Send;
    /// Sets memlimit (and connections when `connections_changed`) on a running node. Returns
    /// whether the connections took effect live.
    fn apply_live_config(
        &self,
        addr: &str,
        to: LiveConfig,
        connections_changed: bool,
    ) -> impl Future<Output = Result<bool, ConfigFailed>> + Send;
}

/// A live configuration change not made.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFailed {
    #[error("{what}")]
    Refused {
        what: String,
        #[source]
        source: arcus_client::Error,
    },
    #[error(transparent)]
    Fenced(#[from] Fenced),
}

/// The cache pods, through the API.
pub trait Pods: Send + Sync {
    /// Deletes the pod (only the one with `uid`, when given); an absent pod is done.
    fn delete(
        &self,
        pod: &str,
        uid: Option<&str>,
    ) -> impl Future<Output = Result<(), MigrateError>> + Send;
}

/// What a copy is part of, for its progress records.
#[derive(Clone, Debug, PartialEq)]
pub struct Label {
    pub operation: String,
    pub node: Option<String>,
}

impl Label {
    pub fn of(step: &Step) -> Label {
        match (&step.operation, &step.action) {
            (Some(op), _) => Label {
                operation: op.label(),
                node: op.node().map(str::to_string),
            },
            (
                None,
                Action::Drain {
                    purpose: DrainPurpose::ScaleIn { from, to },
                    ..
                },
            ) => Label {
                operation: format!("scale-in {from}→{to}"),
                node: None,
            },
            (
                None,
                Action::Drain {
                    purpose: DrainPurpose::Restart { pod, .. },
                    ..
                },
            ) => Label {
                operation: "rolling restart".into(),
                node: Some(pod.clone()),
            },
            (None, _) => Label {
                operation: String::new(),
                node: None,
            },
        }
    }
}

/// The cache copies (pass 1, pass 2 and the add-only forms), each to completion.
pub trait Mover: Send + Sync {
    /// Pass 1 of a scale-in of `leaving` from the ring `before`.
    fn drain(
        &self,
        before: &[String],
        leaving: &[String],
        label: &Label,
    ) -> impl Future<Output = Result<(Checkpoint, Progress), MigrateError>> + Send;
    /// Pass 2 (twice) after `leaving` left the ring.
    fn after_ring_change(
        &self,
        before: &[String],
        leaving: &[String],
        checkpoint: &Checkpoint,
        label: &Label,
    ) -> impl Future<Output = Result<Progress, MigrateError>> + Send;
    /// The CAS watermarks of `owners`, taken right before nodes are taken out of the ring
    /// (for their give-back: what an owner stores after its mark is newer than anything
    /// clients wrote on the nodes).
    fn owner_marks(
        &self,
        owners: &[String],
    ) -> impl Future<Output = Result<BTreeMap<String, u64>, MigrateError>> + Send;
    /// Moves what clients wrote on `joining` while it was briefly in the ring to the owners
    /// on `before`, the owners' copies stored after `marks` winning (None: taken now).
    fn give_back(
        &self,
        before: &[String],
        joining: &[String],
        marks: Option<&BTreeMap<String, u64>>,
        label: &Label,
    ) -> impl Future<Output = Result<u64, MigrateError>> + Send;
    /// Pass 1 into `joining`, held out of the ring. `keep_own`: what the nodes hold already is
    /// theirs (healed nodes that kept serving) and pass 2 keeps it ([`Checkpoint::kept`]).
    fn fill(
        &self,
        before: &[String],
        joining: &[String],
        keep_own: bool,
        label: &Label,
    ) -> impl Future<Output = Result<Checkpoint, MigrateError>> + Send;
    /// Pass 2 (twice) after `joining` was let in.
    fn after_fill(
        &self,
        before: &[String],
        joining: &[String],
        checkpoint: &Checkpoint,
        label: &Label,
    ) -> impl Future<Output = Result<Progress, MigrateError>> + Send;
    /// Add-only copy into `joining` (not registered yet, or registered and not holdable).
    fn copy_add_only(
        &self,
        before: &[String],
        joining: &[String],
        rounds: u32,
        label: &Label,
    ) -> impl Future<Output = Result<Progress, MigrateError>> + Send;
    /// Each node's CAS watermark, taken before the nodes are let back in together.
    fn marks(
        &self,
        nodes: &[String],
    ) -> impl Future<Output = Result<BTreeMap<String, u64>, MigrateError>> + Send;
    /// Once they are back: what clients wrote on the wrong node meanwhile goes to its owner
    /// on `ring` (`Migration::return_misrouted`).
    fn return_misrouted(
        &self,
        ring: &[String],
        marks: &BTreeMap<String, u64>,
        label: &Label,
    ) -> impl Future<Output = Result<Progress, MigrateError>> + Send;
}

/// What running one step did, for Events and the requeue.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Ran {
    /// The record changed (the next pass has more to do).
    pub persisted: bool,
    /// A copy finished: its counts (the Event `Migrated`).
    pub copied: Option<Progress>,
    /// An Event to publish: reason, note.
    pub event: Option<(&'static str, String)>,
}

/// Runs one [`Step`] on its effects.
pub struct Executor<'a, R, A, M, P> {
    pub registry: &'a R,
    pub admin: &'a A,
    pub mover: &'a M,
    pub pods: &'a P,
}

fn addrs(znodes: &[CacheZnode]) -> Vec<String> {
    znodes.iter().map(|z| z.addr().to_string()).collect()
}

impl<R: Registry, A: NodeAdmin, M: Mover, P: Pods> Executor<'_, R, A, M, P> {
    /// Runs the step's action and persists its successor in the write that finishes it.
    pub async fn run(&self, step: &Step) -> Result<Ran, MigrateError> {
        let label = Label::of(step);
        let mut ran = Ran::default();
        let mut swept = None;
        let outcome = match &step.action {
            Action::Idle | Action::Wait(_) => return Ok(ran),
            Action::RestartPod { pod } => {
                self.pods.delete(pod, None).await?;
                ran.event = Some((
                    "NodeRestarted",
                    format!("{pod} had left ZooKeeper and cannot be let back in: restarting it"),
                ));
                return Ok(ran);
            }
            Action::RejoinAll { nodes } => {
                let marks = self.mover.marks(&addrs(nodes)).await?;
                let (back, ring) = self.rejoin_together(nodes).await?;
                let ring = addrs(&ring);
                let p = self.mover.return_misrouted(&ring, &marks, &label).await?;
                tracing::info!(
                    back,
                    misrouted = p.items_moved,
                    "nodes let back in together"
                );
                ran.event = Some((
                    "NodesRejoined",
                    format!(
                        "{back} of {} nodes had lost their ZooKeeper sessions at once (an outage) and kept their items: let back in together; {} items written on the wrong node meanwhile moved to their owners",
                        nodes.len(),
                        p.items_moved
                    ),
                ));
                return Ok(ran);
            }
            Action::StartJoin { .. }
            | Action::Narrow { .. }
            | Action::Advance
            | Action::StartHeal(_)
            | Action::Abandon => Outcome::Done,
            Action::DeletePod { pod, uid } => {
                self.pods.delete(pod, Some(uid)).await?;
                ran.event = Some((
                    "RollingRestart",
                    format!("restarting {pod} with the new template (its items moved to the other nodes first)"),
                ));
                Outcome::Done
            }
            Action::TakeOutOnRegistration { hosts } => {
                return self.take_out_on_registration(step, hosts).await;
            }
            Action::TakeOut { znodes } => {
                let then = step.successor(&Outcome::Done);
                let ring = self.registry.ring().await?;
                self.hold_out(znodes, &ring, then, &label).await?;
                tracing::info!(held = ?znodes, "node taken out of the ring until it is filled");
                ran.persisted = true;
                return Ok(ran);
            }
            _ => {
                // A long action: first rewrite the record as it stands, so that whatever a
                // paused ex-leader still sends for this operation fails on the claim version.
                self.registry.persist(step.operation.as_ref()).await?;
                let sweep = Sweep::during(step).map(tokio::sync::Mutex::new);
                let (outcome, copied) = match &sweep {
                    Some(sweep) => self.copy_sweeping(step, &label, sweep).await?,
                    None => self.copy(step, &label, None).await?,
                };
                ran.copied = copied;
                // The successor of the record as the sweep left it (what it took out held).
                swept = sweep.map(|s| Step {
                    action: step.action.clone(),
                    operation: s.into_inner().record,
                });
                outcome
            }
        };
        let next = swept.as_ref().unwrap_or(step).successor(&outcome);
        self.registry.persist(next.as_ref()).await?;
        ran.persisted = true;
        Ok(ran)
    }

    /// [`Self::copy`], while nodes of the join that register meanwhile are taken out at once
    /// (`sweep`; the copy's `zkensemble rejoin` waits for a sweep in progress and makes one
    /// first: no node of the join sits in the ring while another is let in, where a key it
    /// was written for could change owner under it).
    async fn copy_sweeping(
        &self,
        step: &Step,
        label: &Label,
        sweep: &tokio::sync::Mutex<Sweep>,
    ) -> Result<(Outcome, Option<Progress>), MigrateError> {
        let copied = std::sync::atomic::AtomicBool::new(false);
        let copy = async {
            let r = self.copy(step, label, Some(sweep)).await;
            copied.store(true, std::sync::atomic::Ordering::SeqCst);
            r
        };
        let watch = async {
            while !copied.load(std::sync::atomic::Ordering::SeqCst) {
                let r = self.sweep(&mut *sweep.lock().await, label).await;
                let pause = match r {
                    Ok(()) => SWEEP_POLL,
                    Err(e) => {
                        tracing::warn!(error = %e, "looking for nodes that registered during the fill");
                        Duration::from_secs(1)
                    }
                };
                tokio::time::sleep(pause).await;
            }
        };
        let (r, ()) = tokio::join!(copy, watch);
        r
    }

    /// Takes out the nodes of the join that registered since the last look.
    async fn sweep(&self, s: &mut Sweep, label: &Label) -> Result<(), MigrateError> {
        let ring = self.registry.ring().await?;
        let new: Vec<CacheZnode> = ring
            .iter()
            .filter(|z| !s.known.iter().any(|k| k == z.addr()))
            .cloned()
            .collect();
        let mut taken = vec![];
        for z in new {
            match self.admin.membership(z.addr()).await {
                Some(m) if m.can_rejoin() => taken.push(z),
                // Stock memcached cannot be held: its add-only copy comes after the fill.
                Some(_) => s.known.push(z.addr().to_string()),
                None => {}
            }
        }
        if taken.is_empty() {
            return Ok(());
        }
        let then = s.record.clone().map(|o| operation::held_out(o, &taken));
        s.record = self.hold_out(&taken, &ring, then, label).await?;
        tracing::info!(held = ?taken, "new node taken out of the ring as it registered, during the fill");
        s.known.extend(addrs(&taken));
        Ok(())
    }

    /// Takes `taken` out of `ring` (as just read), `then` persisted with them owing their
    /// give-back, and gives back at once what clients wrote on them. The marks of the rest of
    /// the ring come
    /// first, before the take-out: what an owner stores after its mark comes from a client
    /// that had seen the node join (newer than anything it wrote there) or left it; a mark
    /// taken later would let a node's older write overwrite an owner's newer one. Returns the
    /// record as persisted last: with the give-back done, or still owed when it failed (the
    /// `GiveBack` step does it then).
    async fn hold_out(
        &self,
        taken: &[CacheZnode],
        ring: &[CacheZnode],
        then: Option<Operation>,
        label: &Label,
    ) -> Result<Option<Operation>, MigrateError> {
        let owners: Vec<String> = ring
            .iter()
            .filter(|z| !taken.contains(z))
            .map(|z| z.addr().to_string())
            .collect();
        let marks = if owners.is_empty() {
            None
        } else {
            self.mover
                .owner_marks(&owners)
                .await
                .inspect_err(|e| {
                    tracing::warn!(error = %e, "owners' watermarks before a take-out; the give-back comes later");
                })
                .ok()
        };
        self.registry.leave_ring(taken, then.as_ref()).await?;
        let Some(marks) = marks else {
            return Ok(then);
        };
        match self
            .mover
            .give_back(&owners, &addrs(taken), Some(&marks), label)
            .await
        {
            Ok(given) => {
                if given > 0 {
                    tracing::info!(
                        ?taken,
                        given,
                        "writes made while the node was in the ring moved to their owners"
                    );
                }
                let paid = then.map(|o| operation::given_back(o, taken));
                self.registry.persist(paid.as_ref()).await?;
                Ok(paid)
            }
            Err(e) => {
                tracing::warn!(error = %e, ?taken, "giving back what clients wrote on the node; the next step retries");
                Ok(then)
            }
        }
    }

    async fn copy(
        &self,
        step: &Step,
        label: &Label,
        sweep: Option<&tokio::sync::Mutex<Sweep>>,
    ) -> Result<(Outcome, Option<Progress>), MigrateError> {
        let mover = self.mover;
        Ok(match &step.action {
            Action::Drain {
                before, leaving, ..
            } => {
                tracing::info!(?leaving, "pass 1: copying the leaving nodes' items");
                let (cp, p) = mover.drain(before, &addrs(leaving), label).await?;
                (Outcome::Checkpoint(cp), Some(p))
            }
            Action::ChangeRingAndPass2 {
                before,
                leaving,
                checkpoint,
            } => {
                // The record stays as it is (pass 2 repeats safely until it is cleared); the
                // ring change is one transaction with it.
                self.registry
                    .leave_ring(leaving, step.operation.as_ref())
                    .await?;
                let p = mover
                    .after_ring_change(before, &addrs(leaving), checkpoint, label)
                    .await?;
                (Outcome::Done, Some(p))
            }
            Action::FillEarly { before, joining } => {
                tracing::info!(?joining, "filling the new node before it registers");
                let p = mover.copy_add_only(before, joining, 1, label).await?;
                (Outcome::Done, Some(p))
            }
            Action::GiveBack { before, held } => {
                let given = mover.give_back(before, &addrs(held), None, label).await?;
                if given > 0 {
                    tracing::info!(
                        ?held,
                        given,
                        "writes made while the node was visible moved to their owners"
                    );
                }
                (Outcome::Done, None)
            }
            Action::FillHeldOut { before, held, .. } => {
                let joining = addrs(held);
                // A restart's node comes back empty; a healed one that kept serving out of
                // cache_list (its session expired, zkfailstop off) still holds its items, which
                // only it has: pass 2 must not take them for copies of deleted items.
                let keep_own = matches!(step.operation, Some(Operation::Restart { .. }));
                let cp = mover.fill(before, &joining, keep_own, label).await?;
                let rejoined = match sweep {
                    Some(sweep) => {
                        let mut s = sweep.lock().await;
                        self.sweep(&mut s, label).await?;
                        self.rejoin_all(held).await
                    }
                    None => self.rejoin_all(held).await,
                };
                match rejoined {
                    Err(MigrateError::Rejoin { node, source }) => {
                        return self.restart_instead(step, node, source).await;
                    }
                    r => r?,
                }
                tracing::info!(?joining, "nodes rejoined; pass 2");
                let p = mover.after_fill(before, &joining, &cp, label).await?;
                (Outcome::Done, Some(p))
            }
            Action::CopyAddOnly { before, joining } => {
                if joining.is_empty() || before.is_empty() {
                    (Outcome::Done, None)
                } else {
                    tracing::info!(?joining, "copying the items the new node now owns");
                    let p = mover.copy_add_only(before, joining, 3, label).await?;
                    (Outcome::Done, Some(p))
                }
            }
            other => unreachable!("not a copy: {other:?}"),
        })
    }

    /// A restart's (or heal's) node refused `zkensemble rejoin`: it is restarted and comes back
    /// empty, to be filled again. A joining node's failure is an error (retried next pass).
    async fn restart_instead(
        &self,
        step: &Step,
        node: String,
        source: arcus_client::Error,
    ) -> Result<(Outcome, Option<Progress>), MigrateError> {
        let Some(crate::operation::Operation::Restart { pod, pod_uid, .. }) = &step.operation
        else {
            return Err(MigrateError::Rejoin { node, source });
        };
        tracing::warn!(%node, error = %source, "the node refused zkensemble rejoin: restarting it");
        let uid = Some(pod_uid.as_str()).filter(|u| !u.is_empty());
        self.pods.delete(pod, uid).await?;
        Ok((Outcome::RejoinFailed, None))
    }

    /// `zkensemble rejoin` on every node at once (the ring is partial until the last one is
    /// back: keep that short). Returns how many are back and the ring read to count them; fails
    /// if none is.
    async fn rejoin_together(
        &self,
        nodes: &[CacheZnode],
    ) -> Result<(usize, Vec<CacheZnode>), MigrateError> {
        let results =
            futures::future::join_all(nodes.iter().map(|z| self.admin.rejoin(z.addr()))).await;
        let ring = self.registry.ring().await?;
        let back = nodes
            .iter()
            .filter(|z| ring.iter().any(|r| r.addr() == z.addr()))
            .count();
        match results.into_iter().find_map(Result::err) {
            Some(e) if back == 0 => Err(e),
            Some(e) => {
                // The others are back; the next pass sees this one out of a non-empty ring
                // and heals it with a fill.
                tracing::warn!(error = %e, back, "a node did not rejoin with the others");
                Ok((back, ring))
            }
            None => Ok((back, ring)),
        }
    }

    /// Lets the held nodes in; one already back (rejoined by hand) is fine.
    async fn rejoin_all(&self, held: &[CacheZnode]) -> Result<(), MigrateError> {
        for z in held {
            if let Err(e) = self.admin.rejoin(z.addr()).await {
                let ring = self.registry.ring().await?;
                if !ring.iter().any(|r| r.addr() == z.addr()) {
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Waits (bounded) until one of `hosts` registers; takes out at once those registered
    /// that can be held out (clients see them for a few milliseconds at most) and records them
    /// held.
    async fn take_out_on_registration(
        &self,
        step: &Step,
        hosts: &[String],
    ) -> Result<Ran, MigrateError> {
        let deadline = tokio::time::Instant::now() + REGISTRATION_WAIT;
        while tokio::time::Instant::now() < deadline {
            let ring = self.registry.ring().await?;
            let registered: Vec<CacheZnode> = ring
                .iter()
                .filter(|z| hosts.iter().any(|h| h == z.host()))
                .cloned()
                .collect();
            if !registered.is_empty() {
                let mut taken = vec![];
                for z in registered {
                    let m = self.admin.membership(z.addr()).await;
                    if m.is_some_and(ZkMembership::can_rejoin) {
                        taken.push(z);
                    }
                }
                if taken.is_empty() {
                    return Ok(Ran::default());
                }
                let then = step.successor(&Outcome::TookOut(taken.clone()));
                self.hold_out(&taken, &ring, then, &Label::of(step)).await?;
                tracing::info!(held = ?taken, "new node taken out of the ring until it is filled");
                return Ok(Ran {
                    persisted: true,
                    ..Ran::default()
                });
            }
            tokio::time::sleep(REGISTRATION_POLL).await;
        }
        Ok(Ran::default())
    }
}

/// What a fill of a join watches for: nodes of the join that register while it runs.
struct Sweep {
    /// Addresses left alone: the ring the join fills from, the held nodes, stock nodes.
    known: Vec<String>,
    /// The record as last persisted (the step's, plus what the sweep took out).
    record: Option<Operation>,
}

impl Sweep {
    /// For a round of a join that more nodes are to register after (None otherwise).
    fn during(step: &Step) -> Option<Sweep> {
        let Action::FillHeldOut {
            before,
            last: false,
            ..
        } = &step.action
        else {
            return None;
        };
        let Some(op @ Operation::Join { stage, .. }) = &step.operation else {
            return None;
        };
        let held = match stage {
            crate::operation::JoinStage::HeldOut { fill } => addrs(&fill.held),
            crate::operation::JoinStage::AwaitRegistration => vec![],
        };
        Some(Sweep {
            known: before.iter().cloned().chain(held).collect(),
            record: Some(op.clone()),
        })
    }
}

/// The admin commands, for real, each behind the leader gate.
pub struct ArcusAdmin {
    pub gate: LeaderGate,
}

impl NodeAdmin for ArcusAdmin {
    async fn membership(&self, addr: &str) -> Option<ZkMembership> {
        match arcus_client::AdminClient::with_timeout(addr, Duration::from_secs(2))
            .zkensemble_get()
            .await
        {
            Ok(_) => Some(ZkMembership::Session),
            Err(arcus_client::Error::Unsupported { .. }) => Some(ZkMembership::Stock),
            // ARCUS knows it but fails it while it has no ZooKeeper session
            // (`ERROR failed to get the ensemble address`).
            Err(arcus_client::Error::Server { .. }) => Some(ZkMembership::NoSession),
            Err(_) => None,
        }
    }

    /// Tried again for up to 2 s. An ARCUS node that has just seen its znode deleted answers
    /// `NOT_READY` at once but closes its ZooKeeper handle only on its next state-machine turn
    /// (about 100 ms later); a rejoin before that fails with "already a member of cloud"
    /// (`ERROR failed to rejoin ensemble`), and the same rejoin a moment later succeeds.
    async fn rejoin(&self, addr: &str) -> Result<(), MigrateError> {
        const TRIES: u32 = 10;
        let admin = arcus_client::AdminClient::new(addr.to_string());
        let mut attempt = 1;
        loop {
            self.gate.check(|| format!("zkensemble rejoin of {addr}"))?;
            match admin.zkensemble_rejoin().await {
                Ok(()) => return Ok(()),
                Err(e) if attempt < TRIES => {
                    tracing::debug!(node = addr, attempt, error = %e, "zkensemble rejoin failed; trying again");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    attempt += 1;
                }
                Err(source) => {
                    return Err(MigrateError::Rejoin {
                        node: addr.into(),
                        source,
                    })
                }
            }
        }
    }

    async fn apply_live_config(
        &self,
        addr: &str,
        to: LiveConfig,
        connections_changed: bool,
    ) -> Result<bool, ConfigFailed> {
        let admin = arcus_client::AdminClient::new(addr.to_string());
        let failed = |what: String| move |source| ConfigFailed::Refused { what, source };
        self.gate.check(|| format!("zkfailstop of {addr}"))?;
        let failstop = if to.zk_failstop { "on" } else { "off" };
        match admin.set_config("zkfailstop", failstop).await {
            // Stock memcached registers nowhere: nothing to fail over.
            Ok(()) | Err(arcus_client::Error::Unsupported { .. }) => {}
            Err(e) => return Err(failed(format!("zkfailstop {failstop}"))(e)),
        }
        self.gate.check(|| format!("memlimit of {addr}"))?;
        let memlimit = match admin.set_memlimit(to.memlimit_mb.into()).await {
            Err(arcus_client::Error::Unsupported { .. }) => {
                admin.cache_memlimit(to.memlimit_mb.into()).await
            }
            r => r,
        };
        memlimit.map_err(failed(format!("memlimit {}", to.memlimit_mb)))?;
        if !connections_changed {
            return Ok(true);
        }
        match admin.set_maxconns(to.connections.into()).await {
            Ok(()) => Ok(true),
            // Stock memcached (the sandbox's stand-in) has no live maxconns.
            Err(arcus_client::Error::Unsupported { .. }) => Ok(false),
            Err(e) => Err(failed(format!("connections {}", to.connections))(e)),
        }
    }
}

/// The copies, for real: each runs on a thread of its own (`detached`) and stops when the
/// leader gate closes.
#[derive(Clone)]
pub struct CacheMover {
    pub reporter: Reporter,
    pub gate: LeaderGate,
}

impl CacheMover {
    async fn run<T, Fut>(
        &self,
        what: &'static str,
        make: impl FnOnce(Reporter) -> Fut + Send + 'static,
    ) -> Result<T, MigrateError>
    where
        T: Send + 'static,
        Fut: Future<Output = Result<T, MigrateError>>,
    {
        let (gate, reporter) = (self.gate.clone(), self.reporter.clone());
        detached(move || async move {
            tokio::select! {
                r = make(reporter) => r,
                _ = gate.closed() => Err(MigrateError::Stopped(what.into())),
            }
        })
        .await
    }
}

fn owned(a: &[String]) -> Vec<String> {
    a.to_vec()
}

impl Mover for CacheMover {
    async fn drain(
        &self,
        before: &[String],
        leaving: &[String],
        label: &Label,
    ) -> Result<(Checkpoint, Progress), MigrateError> {
        let (before, leaving, label) = (owned(before), owned(leaving), label.clone());
        self.run("pass 1", move |r| async move {
            let mut job = ScaleIn::new(Ring::new(before), &leaving, MigrationOptions::default())?;
            let _follow = r.follow(&label, job.progress());
            let cp = job.pass1().await?;
            let p = job.progress().borrow().clone();
            Ok((cp, p))
        })
        .await
    }

    async fn after_ring_change(
        &self,
        before: &[String],
        leaving: &[String],
        checkpoint: &Checkpoint,
        label: &Label,
    ) -> Result<Progress, MigrateError> {
        let (before, leaving, cp, label) = (
            owned(before),
            owned(leaving),
            checkpoint.clone(),
            label.clone(),
        );
        self.run("pass 2", move |r| async move {
            let opts = MigrationOptions::default();
            let job = ScaleIn::resume(Ring::new(before), &leaving, cp.clone(), opts.clone())?;
            pass2_twice(job.migration(), &cp, opts, &label, &r).await
        })
        .await
    }

    async fn owner_marks(&self, owners: &[String]) -> Result<BTreeMap<String, u64>, MigrateError> {
        self.marks(owners).await
    }

    async fn give_back(
        &self,
        before: &[String],
        joining: &[String],
        marks: Option<&BTreeMap<String, u64>>,
        _label: &Label,
    ) -> Result<u64, MigrateError> {
        let (before, joining, marks) = (owned(before), owned(joining), marks.cloned());
        self.run("giving back", move |_| async move {
            Ok(give_back_strays(&before, &joining, marks).await?)
        })
        .await
    }

    async fn fill(
        &self,
        before: &[String],
        joining: &[String],
        keep_own: bool,
        label: &Label,
    ) -> Result<Checkpoint, MigrateError> {
        let (before, joining, label) = (owned(before), owned(joining), label.clone());
        self.run("pass 1", move |r| async move {
            // Clients that saw the node join must have left it before pass 1 treats what it
            // holds as ours to overwrite. (Not a second give-back here: a fill that failed half
            // way is retried, and its node then holds pass 1's copies, which would be taken for
            // clients' writes and overwrite newer ones on the owners: large-cluster run 10.)
            tokio::time::sleep(CLIENTS_FOLLOW).await;
            let mut job = ScaleOut::new(Ring::new(before), &joining, MigrationOptions::default())?;
            let kept = if keep_own {
                cas_marks(job.migration(), &joining).await?
            } else {
                BTreeMap::new()
            };
            let _follow = r.follow(&label, job.progress());
            tracing::info!(?joining, keep_own, "pass 1 into the node out of the ring");
            let mut cp = job.pass1().await?;
            cp.kept = kept;
            Ok(cp)
        })
        .await
    }

    async fn after_fill(
        &self,
        before: &[String],
        joining: &[String],
        checkpoint: &Checkpoint,
        label: &Label,
    ) -> Result<Progress, MigrateError> {
        let (before, joining, cp, label) = (
            owned(before),
            owned(joining),
            checkpoint.clone(),
            label.clone(),
        );
        self.run("pass 2", move |r| async move {
            // Moved items leave the old owners only in the last run of pass 2 (pass2_twice).
            let job = ScaleOut::new(Ring::new(before), &joining, MigrationOptions::default())?;
            let opts = MigrationOptions {
                delete_moved_from_sources: true,
                ..MigrationOptions::default()
            };
            pass2_twice(job.migration(), &cp, opts, &label, &r).await
        })
        .await
    }

    async fn copy_add_only(
        &self,
        before: &[String],
        joining: &[String],
        rounds: u32,
        label: &Label,
    ) -> Result<Progress, MigrateError> {
        let (before, joining, label) = (owned(before), owned(joining), label.clone());
        self.run("copy", move |r| async move {
            copy_rounds(&before, &joining, rounds, &label, &r).await
        })
        .await
    }

    async fn marks(&self, nodes: &[String]) -> Result<BTreeMap<String, u64>, MigrateError> {
        let nodes = owned(nodes);
        self.run("watermarks", move |_| async move {
            let m = Migration::new(
                Ring::new(nodes.clone()),
                Ring::new(nodes.clone()),
                MigrationOptions::default(),
            )?;
            Ok(cas_marks(&m, &nodes).await?)
        })
        .await
    }

    async fn return_misrouted(
        &self,
        ring: &[String],
        marks: &BTreeMap<String, u64>,
        label: &Label,
    ) -> Result<Progress, MigrateError> {
        let (ring, marks, label) = (owned(ring), marks.clone(), label.clone());
        self.run("misrouted writes", move |r| async move {
            let m = Migration::new(
                Ring::new(ring.clone()),
                Ring::new(ring),
                MigrationOptions::default(),
            )?;
            let _follow = r.follow(&label, m.progress());
            Ok(m.return_misrouted(&marks).await?)
        })
        .await
    }
}

/// Everything on the held nodes `joining` is what clients wrote while they were in the ring,
/// whatever ring that was: a key a node owned then may belong to another held node in the final
/// ring, so all of it goes to its owner on `before` (the large-cluster benchmark lost such a
/// write when only the keys the node owns in `before` + it were given back). The owners' marks
/// come first, taken before the nodes left the ring where the executor could (`marks`): what
/// the owners store after them comes from clients that have left the held nodes and is newer
/// than anything there; then the wait for clients to leave them. Returns how many items moved.
async fn give_back_strays(
    before: &[String],
    joining: &[String],
    marks: Option<BTreeMap<String, u64>>,
) -> Result<u64, MigrationError> {
    let ring = Ring::new(before.to_vec());
    let m = Migration::new(ring.clone(), ring, MigrationOptions::default())?;
    let owner_marks = match marks {
        Some(marks) => marks,
        None => cas_marks(&m, before).await?,
    };
    tokio::time::sleep(CLIENTS_FOLLOW).await;
    Ok(m.return_strays(joining, &owner_marks).await?.items_moved)
}

/// Each node's CAS watermark (a store of the watermark key): what it stores later has a higher CAS.
async fn cas_marks(
    m: &Migration,
    nodes: &[String],
) -> Result<BTreeMap<String, u64>, MigrationError> {
    // All at once: a take-out waits for them, and every millisecond a new node spends in
    // the ring is one in which clients write there.
    let marks = futures::future::try_join_all(nodes.iter().map(|n| m.watermark(n))).await?;
    Ok(nodes
        .iter()
        .cloned()
        .zip(marks.into_iter().map(|w| w.cas))
        .collect())
}

/// Add-only copies into `joining`, up to `rounds` of them while a round still moves items.
/// With more than one round, moved items are compare-and-deleted on their old owners, so a
/// further round lists only what an earlier listing missed (an `lru_crawler metadump all` on
/// an older memcached can skip items under load) and never re-adds a key a client deleted meanwhile.
async fn copy_rounds(
    before: &[String],
    joining: &[String],
    rounds: u32,
    label: &Label,
    reporter: &Reporter,
) -> Result<Progress, MigrateError> {
    let opts = MigrationOptions {
        delete_moved_from_sources: rounds > 1,
        ..MigrationOptions::default()
    };
    let mut total: Option<Progress> = None;
    for round in 1..=rounds {
        let job = ScaleOut::new(Ring::new(before.to_vec()), joining, opts.clone())?;
        let _follow = reporter.follow(label, job.progress());
        let p = job.copy().await?;
        let moved = p.items_moved;
        total = Some(match total.take() {
            None => p,
            Some(mut acc) => {
                acc.items_moved += p.items_moved;
                acc.items_failed = p.items_failed;
                acc
            }
        });
        tracing::info!(round, moved, "copy round done");
        if moved == 0 {
            break;
        }
    }
    Ok(total.unwrap_or_default())
}

/// Builds and runs a migration future on a blocking thread of its own: the engine's futures
/// are not `Send` for every lifetime (which the controller's future must be), and a long copy
/// should not occupy a runtime worker anyway. Only the closure's owned inputs cross threads.
async fn detached<T, Fut>(make: impl FnOnce() -> Fut + Send + 'static) -> T
where
    T: Send + 'static,
    Fut: Future<Output = T>,
{
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || handle.block_on(make()))
        .await
        .expect("migration task panicked")
}

/// Pass 2 twice after the ring change. First almost at once (`CLIENTS_SWITCH`), with `first`
/// (the job that ran pass 1, or one resumed from its checkpoint): a key written on a source
/// after pass 1's last listing reaches its new owner before most clients could delete it there
/// (such a delete would be undone by the copy, unless the client also sent it to the old owner:
/// the ascii protocol has no tombstone). Then, once clients have followed
/// the change, on a fresh job from a checkpoint taken around the first (source marks before it,
/// target marks of pass 1), for what stragglers still wrote to the sources: keys the first run
/// handled count as copied, so a client's delete of them since is kept. `first` must not
/// delete moved items from the sources (the second would take them for deleted ones); `opts`
/// (the second run's) may.
async fn pass2_twice(
    first: &crate::migration::Migration,
    cp: &Checkpoint,
    opts: MigrationOptions,
    label: &Label,
    reporter: &Reporter,
) -> Result<Progress, MigrateError> {
    tokio::time::sleep(CLIENTS_SWITCH).await;
    let mut sources = std::collections::BTreeMap::new();
    for s in first.sources() {
        sources.insert(s.clone(), first.watermark(s).await?);
    }
    // `first` may hold pass 1's counts already (its counters are cumulative).
    let before_first = first.progress_now();
    let mut early = {
        let _follow = reporter.follow(label, first.progress());
        first.pass2(cp).await?
    };
    // Every run lists the same moving keys again: "to move" is the largest listing, not a sum.
    early.items_total = before_first
        .items_total
        .max(early.items_total - before_first.items_total);
    early.items_done = before_first
        .items_done
        .max(early.items_done - before_first.items_done);
    // Target marks stay pass 1's: whatever landed on a target after the ring change (clients'
    // writes, and our copies just made) is not ours to update or delete any more.
    let settled = Checkpoint {
        sources,
        targets: cp.targets.clone(),
        complete: early.items_failed == 0,
        kept: cp.kept.clone(),
    };
    tokio::time::sleep(CLIENTS_FOLLOW).await;
    let second = crate::migration::Migration::new(
        first.ring_before().clone(),
        first.ring_after().clone(),
        opts,
    )?;
    // Users see both runs as one: the second's counts go on top of the first's.
    let (merged_tx, merged_rx) =
        tokio::sync::watch::channel(both_runs(&early, &second.progress_now()));
    let forward = {
        let (mut late_rx, early, tx) = (second.progress(), early.clone(), merged_tx.clone());
        tokio::spawn(async move {
            while late_rx.changed().await.is_ok() {
                let late = late_rx.borrow_and_update().clone();
                tx.send_replace(both_runs(&early, &late));
            }
        })
    };
    let _follow = reporter.follow(label, merged_rx);
    let late = second.pass2(&settled).await;
    forward.abort();
    let p = both_runs(&early, &late?);
    merged_tx.send_replace(p.clone());
    Ok(p)
}

/// The progress of pass 2's two runs as one (pure): counts add up; "to move" and "moved" are
/// the larger of the two (each run lists the same moving keys); the phase is the second run's
/// once it started.
fn both_runs(early: &Progress, late: &Progress) -> Progress {
    let mut p = early.clone();
    p.phase = match late.phase {
        Phase::Idle => Phase::Pass2,
        phase => phase,
    };
    p.items_total = p.items_total.max(late.items_total);
    p.items_done = p.items_done.max(late.items_done);
    p.items_moved += late.items_moved;
    p.items_updated += late.items_updated;
    p.items_deleted += late.items_deleted;
    p.items_skipped_expired += late.items_skipped_expired;
    p.items_skipped_newer += late.items_skipped_newer;
    p.items_skipped_deleted += late.items_skipped_deleted;
    p.items_failed += late.items_failed;
    p.bytes += late.bytes;
    p.source_items_deleted += late.source_items_deleted;
    p
}

/// Where a running migration reports its progress; the controller writes it to the status
/// about once a second. Cheap to clone; a reporter nobody listens to costs nothing.
#[derive(Clone)]
pub struct Reporter {
    tx: std::sync::Arc<tokio::sync::watch::Sender<Option<MigrationStatus>>>,
}

impl Reporter {
    pub fn new() -> (
        Reporter,
        tokio::sync::watch::Receiver<Option<MigrationStatus>>,
    ) {
        let (tx, rx) = tokio::sync::watch::channel(None);
        (
            Reporter {
                tx: std::sync::Arc::new(tx),
            },
            rx,
        )
    }

    /// The latest progress record, if any job reported.
    pub fn last(&self) -> Option<MigrationStatus> {
        self.tx.borrow().clone()
    }

    /// Follows a job's progress until the returned guard is dropped (which reports the
    /// job's final counts).
    fn follow(&self, label: &Label, progress: tokio::sync::watch::Receiver<Progress>) -> Following {
        let (operation, node) = (label.operation.as_str(), label.node.clone());
        // `ended` orders the forwarding task's sends before the guard's final one: an aborted
        // task may still be running on another thread.
        let ended = std::sync::Arc::new(std::sync::Mutex::new(false));
        let (tx, op, who, mut rx, stop) = (
            self.tx.clone(),
            operation.to_string(),
            node.clone(),
            progress.clone(),
            ended.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                let p = rx.borrow_and_update().clone();
                {
                    let ended = stop.lock().unwrap();
                    if *ended {
                        break;
                    }
                    tx.send_replace(Some(migration_status(&op, who.as_deref(), &p)));
                }
                if rx.changed().await.is_err() {
                    break;
                }
            }
        });
        Following {
            task,
            ended,
            tx: self.tx.clone(),
            operation: operation.to_string(),
            node,
            progress,
        }
    }
}

struct Following {
    task: tokio::task::JoinHandle<()>,
    ended: std::sync::Arc<std::sync::Mutex<bool>>,
    tx: std::sync::Arc<tokio::sync::watch::Sender<Option<MigrationStatus>>>,
    operation: String,
    node: Option<String>,
    progress: tokio::sync::watch::Receiver<Progress>,
}

impl Drop for Following {
    fn drop(&mut self) {
        self.task.abort();
        let mut ended = self.ended.lock().unwrap();
        *ended = true;
        let p = self.progress.borrow().clone();
        self.tx.send_replace(Some(migration_status(
            &self.operation,
            self.node.as_deref(),
            &p,
        )));
    }
}

/// The status record of a migration's progress (pure).
pub fn migration_status(operation: &str, node: Option<&str>, p: &Progress) -> MigrationStatus {
    let phase = match p.phase {
        Phase::Idle => "Starting",
        Phase::Pass1 { .. } => "Pass1",
        Phase::RingChange => "RingChange",
        Phase::Pass2 => "Pass2",
        Phase::Done => "Done",
    };
    let who = node.map(|n| format!(" {n}")).unwrap_or_default();
    MigrationStatus {
        operation: operation.to_string(),
        node: node.map(str::to_string),
        phase: phase.to_string(),
        items_moved: p.items_done,
        items_to_move: p.items_total,
        summary: format!(
            "{operation}{who}: {phase} {}/{}",
            p.items_done, p.items_total
        ),
        // Set by the writer, from the record the copy belongs to.
        epoch: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_pass2_runs_read_as_one() {
        let early = Progress {
            phase: Phase::Done,
            items_total: 38_000,
            items_done: 38_000,
            items_moved: 120,
            items_skipped_deleted: 3,
            ..Progress::default()
        };
        // The second run has not listed anything yet: the first run's counts, in Pass2.
        let starting = both_runs(&early, &Progress::default());
        assert_eq!(starting.phase, Phase::Pass2);
        assert_eq!(
            (starting.items_done, starting.items_total),
            (38_000, 38_000)
        );
        let late = Progress {
            phase: Phase::Done,
            items_total: 38_010,
            items_done: 38_010,
            items_moved: 7,
            items_skipped_deleted: 1,
            ..Progress::default()
        };
        let done = both_runs(&early, &late);
        assert_eq!(done.phase, Phase::Done);
        assert_eq!((done.items_done, done.items_total), (38_010, 38_010));
        assert_eq!((done.items_moved, done.items_skipped_deleted), (127, 4));
    }

    #[test]
    fn migration_status_names_operation_node_phase_and_counts() {
        let p = Progress {
            phase: Phase::Pass1 { round: 2 },
            items_total: 40_000,
            items_done: 12_345,
            ..Progress::default()
        };
        let m = migration_status("rolling restart", Some("mc-4"), &p);
        assert_eq!(m.summary, "rolling restart mc-4: Pass1 12345/40000");
        assert_eq!((m.items_moved, m.items_to_move), (12_345, 40_000));
        assert_eq!(m.node.as_deref(), Some("mc-4"));
        let done = Progress {
            phase: Phase::Done,
            ..p
        };
        assert_eq!(
            migration_status("scale-in 5→3", None, &done).summary,
            "scale-in 5→3: Done 12345/40000"
        );
    }
}
