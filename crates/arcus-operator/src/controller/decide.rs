//! Stage 3 (pure): from the validated spec and the observed world to everything this pass
//! will write: the ZooKeeper plan, the operation's next step, the objects (built once), the
//! day-2 live configuration, the status input and the requeue.

use super::observe::World;
use crate::build;
use crate::crd::{ArcusMemcached, OperationKind, OperationStatus};
use crate::day2::{self, Day2Action, Day2Plan, LiveConfig};
use crate::migrate::Ran;
use crate::operation::{self, Day2Request, Operation, Step};
use crate::validate::ValidSpec;
use crate::zk_plan::{self, PlanInput, ZkOp, ZkPlan};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::DynamicObject;
use kube::runtime::controller::Action;
use std::collections::BTreeSet;
use std::time::Duration;

/// Requeue while something is in flight (a settled one waits `Context::resync`).
const REQUEUE_BUSY: Duration = Duration::from_secs(2);
const REQUEUE_NOT_READY: Duration = Duration::from_secs(60);
const REQUEUE_CONFLICT: Duration = Duration::from_secs(60);

/// The objects of one cluster, built from the spec.
pub struct Objects {
    pub statefulset: StatefulSet,
    pub service: Service,
    pub pdb: PodDisruptionBudget,
    /// Wanted (`metricsExporter` with the Prometheus Operator installed), or to be deleted.
    pub service_monitor: Option<DynamicObject>,
    /// A hash of the whole set but the StatefulSet's size: when the live StatefulSet carries
    /// it, only a new size is sent (the Service and the PDB are not re-sent for a scale).
    pub hash: String,
}

/// What to do with the StatefulSet.
pub enum StatefulSetChange {
    Leave,
    /// Deleting: to 0 replicas (its pods go before ZooKeeper is cleaned up).
    ScaleToZero,
    Apply(Box<Objects>),
}

/// The status, as this pass sees it (written by `update_status`).
pub struct StatusParts {
    pub desired: u32,
    pub blocking_error: Option<(&'static str, String)>,
    pub progress: Option<(&'static str, String)>,
    pub zookeeper_problem: Option<(&'static str, String)>,
    pub service_code: Option<String>,
    pub operation: Option<OperationStatus>,
}

pub struct Decision {
    pub plan: ZkPlan,
    pub conflict: Option<String>,
    /// The operation's next step (none while deleting or in conflict).
    pub step: Option<Step>,
    /// The record once the step has run.
    pub after: Option<Operation>,
    pub statefulset: StatefulSetChange,
    /// Day-2 decisions (the roll's progress is reported from it).
    pub day2: Day2Plan,
    /// Live configuration changes to make now (only while nothing else is in flight).
    pub live_config: Vec<Day2Action>,
    pub status: StatusParts,
    /// Deleting, and nothing of ours is left in ZooKeeper (or nothing ever was).
    pub remove_finalizer: bool,
    pub deleting: bool,
    /// Nodes Ready and registered within the desired range.
    pub ready: u32,
    /// Leaving pods the StatefulSet controller will not remove (see [`stalled_leaving_pods`]):
    /// `(name, uid)`, deleted by this pass.
    pub remove_pods: Vec<(String, String)>,
}

pub fn decide(
    cr: &ArcusMemcached,
    valid: &ValidSpec,
    world: &World,
    now: k8s_openapi::jiff::Timestamp,
) -> Decision {
    let plan = zk_plan_for(valid, world);
    let sts_now = world.statefulset_replicas();
    if let Some(conflict) = plan.conflict.clone() {
        return in_conflict(world, plan, conflict);
    }
    let want = LiveConfig {
        memlimit_mb: valid.memlimit_mb,
        connections: valid.connections,
        zk_failstop: valid.zk_failstop,
    };
    let restart_hash = build::statefulset::restart_hash(valid);
    let day2 = if world.deleting {
        Day2Plan::default()
    } else {
        day2::plan(&restart_hash, want, world.desired, &world.day2_pods)
    };
    let plan_settled = plan.ops.is_empty() && plan.waiting_for.is_none();
    let step = (!world.deleting).then(|| {
        let request = (plan_settled && world.operation.is_none())
            .then(|| day2_request(&day2, world))
            .flatten();
        operation::next_step(
            world.operation.as_ref(),
            &operation::World {
                desired: world.desired,
                statefulset: sts_now.unwrap_or(0),
                ring: &world.ring,
                pods: &world.pod_states,
                day2: request,
            },
        )
    });
    let after = match &step {
        Some(s) => s.successor(&assumed_outcome(s)),
        None => world.operation.clone(),
    };
    let statefulset = statefulset_change(valid, world, &plan, step.as_ref(), after.as_ref());
    let idle = plan_settled && after.is_none() && step.as_ref().is_none_or(|s| !s.persists());
    let live_config = live_config_now(&day2, idle);
    let status = StatusParts {
        desired: world.desired,
        blocking_error: day2.roll_stuck.clone().map(|m| ("RollingRestartStuck", m)),
        progress: progress(valid, &plan, &day2, step.as_ref()),
        zookeeper_problem: foreign_ring_note(valid, &world.zk.cache_list_children),
        service_code: Some(valid.service_code.to_string()),
        operation: operation_status(cr, &plan, sts_now, world.desired, after.as_ref(), now),
    };
    let ready = world
        .nodes
        .iter()
        .filter(|n| {
            n.ordinal < world.desired && n.pod_ready && world.registered.contains(&n.hostname)
        })
        .count() as u32;
    let remove_pods = stalled_leaving_pods(
        world.statefulset.as_ref(),
        &world.pods,
        &world.registered,
        |o| valid.pod_hostname(o),
        world.deleting,
    );
    Decision {
        remove_finalizer: world.deleting && plan.cleanup_done,
        remove_pods,
        deleting: world.deleting,
        ready,
        conflict: None,
        plan,
        step,
        after,
        statefulset,
        day2,
        live_config,
        status,
    }
}

/// The live configuration to apply in this pass: all of it when idle; while an operation runs
/// or the plan is unsettled, only `zkfailstop` (a safety setting: a node filled during a
/// scale-out must not exit in an outage), the rest waiting for the idle pass.
fn live_config_now(day2: &Day2Plan, idle: bool) -> Vec<Day2Action> {
    day2.actions
        .iter()
        .filter_map(|a| match a {
            Day2Action::ApplyLiveConfig { .. } if idle => Some(a.clone()),
            Day2Action::ApplyLiveConfig {
                pod,
                ip,
                from: Some(from),
                to,
            } if from.zk_failstop != to.zk_failstop => Some(Day2Action::ApplyLiveConfig {
                pod: pod.clone(),
                ip: ip.clone(),
                from: Some(*from),
                to: from.with_failstop(to.zk_failstop),
            }),
            _ => None,
        })
        .collect()
}

/// Nothing is written but the status (and the finalizer's removal while deleting: nothing in
/// ZooKeeper is ours).
fn in_conflict(world: &World, plan: ZkPlan, conflict: String) -> Decision {
    Decision {
        status: StatusParts {
            desired: world.desired,
            blocking_error: Some(("ServiceCodeConflict", conflict.clone())),
            progress: None,
            zookeeper_problem: None,
            service_code: None,
            operation: None,
        },
        conflict: Some(conflict),
        step: None,
        after: None,
        deleting: world.deleting,
        ready: 0,
        statefulset: StatefulSetChange::Leave,
        day2: Day2Plan::default(),
        live_config: vec![],
        remove_finalizer: world.deleting,
        remove_pods: vec![],
        plan,
    }
}

/// Children of `cache_list/<svc>` that are not this resource's nodes: a name that is not
/// `<ip>:<port>-<hostname>`, or a hostname that is not one of its pods (`<statefulset>-<n>.<ns>`).
/// They are not ours, so they stay; but ARCUS clients put a parsable one in their ring.
pub fn foreign_ring_members(valid: &ValidSpec, children: &[String]) -> Vec<String> {
    let prefix = format!("{}-", valid.statefulset_name());
    let suffix = format!(".{}", valid.namespace);
    let ours = |child: &String| {
        zk_plan::CacheZnode::parse(child).is_some_and(|z| {
            z.host()
                .strip_prefix(&prefix)
                .and_then(|rest| rest.strip_suffix(&suffix))
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
    };
    children.iter().filter(|c| !ours(c)).cloned().collect()
}

fn foreign_ring_note(valid: &ValidSpec, children: &[String]) -> Option<(&'static str, String)> {
    let foreign = foreign_ring_members(valid, children);
    (!foreign.is_empty()).then(|| {
        let shown: Vec<&str> = foreign.iter().take(5).map(String::as_str).collect();
        (
            "ForeignNodesInRing",
            format!(
                "/arcus/cache_list/{} holds {} znode(s) that are not this resource's nodes ({}{}): left as they are; clients of the service may route keys to them; delete them by hand if they are stale",
                valid.service_code,
                foreign.len(),
                shown.join(", "),
                if foreign.len() > shown.len() { ", ..." } else { "" }
            ),
        )
    })
}

/// Pods past the StatefulSet's size that its controller will never remove: `(name, uid)`.
///
/// Under `OrderedReady` the StatefulSet controller removes leaving pods from the highest
/// ordinal down, and only while each is Ready, except the lowest unready one
/// (`processCondemned` in Kubernetes' `stateful_set_control.go`). A node taken out of
/// `cache_list` answers `NOT_READY`, so after a scale-in of several nodes whose pass 2 outlasts
/// the readiness probe, or a deletion with several unready nodes, it waits forever: the 32→16
/// drain left 16 pods running and the resource's deletion then hung.
///
/// Only an unready pod the controller has already been told to remove (it saw the lowered
/// size) goes, and, unless the resource is being deleted, only once it is out of the ring.
/// Ready ones stay the controller's, as does everything under the `Parallel` policy.
pub fn stalled_leaving_pods(
    statefulset: Option<&StatefulSet>,
    pods: &[(u32, k8s_openapi::api::core::v1::Pod)],
    registered: &BTreeSet<String>,
    hostname: impl Fn(u32) -> String,
    deleting: bool,
) -> Vec<(String, String)> {
    let Some(sts) = statefulset else {
        return vec![];
    };
    let spec = sts.spec.as_ref();
    let ordered = spec
        .and_then(|s| s.pod_management_policy.as_deref())
        .is_none_or(|p| p == "OrderedReady");
    let seen = match (&sts.status, sts.metadata.generation) {
        (Some(st), Some(generation)) => st.observed_generation.is_some_and(|o| o >= generation),
        _ => false,
    };
    let Some(size) = spec.and_then(|s| s.replicas).map(|r| r.max(0) as u32) else {
        return vec![];
    };
    if !ordered || !seen {
        return vec![];
    }
    let ready = |p| crate::status::ready_condition(p).is_some();
    pods.iter()
        .filter(|(o, p)| *o >= size && p.metadata.deletion_timestamp.is_none() && !ready(p))
        .filter(|(o, _)| deleting || !registered.contains(&hostname(*o)))
        .filter_map(|(_, p)| Some((p.metadata.name.clone()?, p.metadata.uid.clone()?)))
        .collect()
}

fn statefulset_change(
    valid: &ValidSpec,
    world: &World,
    plan: &ZkPlan,
    step: Option<&Step>,
    after: Option<&Operation>,
) -> StatefulSetChange {
    let sts_now = world.statefulset_replicas();
    match (world.deleting, plan.statefulset_replicas) {
        (_, None) => StatefulSetChange::Leave,
        (true, Some(_)) if world.statefulset.is_none() || sts_now == Some(0) => {
            StatefulSetChange::Leave
        }
        (true, Some(_)) => StatefulSetChange::ScaleToZero,
        (false, Some(target)) => {
            let now = sts_now.unwrap_or(0);
            // Leaving nodes still in the ring are drained first (the next step), unless this
            // step is the one taking them out.
            let finishing = step
                .is_some_and(|s| matches!(s.action, operation::Action::ChangeRingAndPass2 { .. }));
            let undrained = !finishing
                && (target..now).any(|o| world.registered.contains(&valid.pod_hostname(o)));
            let replicas = statefulset_target(target, now, after, undrained);
            StatefulSetChange::Apply(Box::new(objects(valid, replicas)))
        }
    }
}

fn zk_plan_for(valid: &ValidSpec, world: &World) -> ZkPlan {
    let pod_ordinals: BTreeSet<u32> = world.pods.iter().map(|(o, _)| *o).collect();
    let claim_data = world.claim.to_data();
    let mapping_key = |o: u32| valid.mapping_key(o);
    zk_plan::plan(
        &PlanInput {
            service_code: valid.service_code.as_str(),
            claim_data: &claim_data,
            desired_replicas: world.desired,
            statefulset_replicas: world.statefulset_replicas(),
            pod_ordinals: &pod_ordinals,
            deleting: world.deleting,
            mapping_key: &mapping_key,
        },
        &world.zk,
    )
}

/// What a step is expected to end with, to plan the rest of the pass (the objects, the
/// status). If it fails, the pass stops before anything that depends on it.
fn assumed_outcome(step: &Step) -> operation::Outcome {
    use operation::{Action as A, Outcome};
    match &step.action {
        // A drain ends with a checkpoint; its value does not matter for planning.
        A::Drain { .. } => Outcome::Checkpoint(Default::default()),
        // Whether the node registers within the wait is not known: plan as if it does not.
        A::TakeOutOnRegistration { .. } => Outcome::TookOut(vec![]),
        _ => Outcome::Done,
    }
}

/// The first ring-changing request of day 2: a heal before a roll (a node out of the ring
/// costs hits until it is back).
fn day2_request(day2: &Day2Plan, world: &World) -> Option<Day2Request> {
    let ordinal_of = |pod: &str| {
        world
            .pod_states
            .iter()
            .find(|p| p.name == pod)
            .map(|p| p.ordinal)
    };
    let heal = day2.actions.iter().find_map(|a| match a {
        Day2Action::Heal { pod, .. } => {
            ordinal_of(pod).map(|ordinal| Day2Request::Heal { ordinal })
        }
        _ => None,
    });
    heal.or_else(|| {
        day2.actions.iter().find_map(|a| match a {
            Day2Action::Roll { ordinal, .. } => Some(Day2Request::Roll { ordinal: *ordinal }),
            _ => None,
        })
    })
}

/// The StatefulSet size: the plan's, held back while the ring is still being changed: a
/// scale-in shrinks it only once its migration is over; a scale-out grows it by one recorded
/// join at a time (up to `operation::JOIN_BATCH` nodes; a narrowed join shrinks it again).
fn statefulset_target(plan: u32, now: u32, after: Option<&Operation>, undrained: bool) -> u32 {
    match after {
        Some(Operation::ScaleIn { .. }) => now.max(plan),
        _ if undrained && now > plan => now,
        Some(Operation::Join { to_replicas, .. }) => plan.min(now.max(*to_replicas)),
        // A join is recorded before the StatefulSet grows (the next pass starts it).
        None | Some(Operation::Restart { .. }) if now > 0 && plan > now => now,
        _ => plan,
    }
}

fn objects(valid: &ValidSpec, replicas: u32) -> Objects {
    let statefulset = build::statefulset(valid, replicas as i32);
    let service = build::headless_service(valid);
    let pdb = build::pdb(valid);
    let service_monitor = build::service_monitor(valid);
    let mut unsized_statefulset = statefulset.clone();
    if let Some(spec) = unsized_statefulset.spec.as_mut() {
        spec.replicas = None;
    }
    let set = (&unsized_statefulset, &service, &pdb, &service_monitor);
    let hash = build::content_hash(&set);
    Objects {
        statefulset,
        service,
        pdb,
        service_monitor,
        hash,
    }
}

fn progress(
    valid: &ValidSpec,
    plan: &ZkPlan,
    day2: &Day2Plan,
    step: Option<&Step>,
) -> Option<(&'static str, String)> {
    if let Some(w) = &plan.waiting_for {
        return Some(("Scaling", format!("waiting for {w}")));
    }
    if let Some(operation::Action::Wait(w)) = step.map(|s| &s.action) {
        if day2.stale.is_empty() {
            return Some(("Scaling", format!("waiting for {w}")));
        }
    }
    if day2.stale.is_empty() {
        return None;
    }
    let left: Vec<String> = day2.stale.iter().map(|o| valid.pod_name(*o)).collect();
    let wait = day2
        .roll_waiting
        .clone()
        .map(|w| format!("; {w}"))
        .unwrap_or_default();
    Some((
        "RollingRestart",
        format!(
            "restarting nodes one at a time, highest ordinal first; left: {}{wait}",
            left.join(", ")
        ),
    ))
}

/// `status.operation`: the recorded operation's kind and stage when one is in flight, else
/// the ZooKeeper plan's (mappings being made or removed, pods awaited).
fn operation_status(
    cr: &ArcusMemcached,
    plan: &ZkPlan,
    sts: Option<u32>,
    desired: u32,
    after: Option<&Operation>,
    now: k8s_openapi::jiff::Timestamp,
) -> Option<OperationStatus> {
    let from = sts?;
    let previous = cr.status.as_ref().and_then(|s| s.operation.clone());
    let (kind, phase) = match after {
        Some(Operation::ScaleIn { .. }) => (OperationKind::ScaleIn, after?.stage_name()),
        Some(Operation::Join { .. }) => (OperationKind::ScaleOut, after?.stage_name()),
        Some(Operation::Restart { .. }) => (OperationKind::Restart, after?.stage_name()),
        None if plan.ops.is_empty() && plan.waiting_for.is_none() => return None,
        None if desired > from
            || plan
                .ops
                .iter()
                .any(|o| matches!(o, ZkOp::CreateMapping { .. })) =>
        {
            (OperationKind::ScaleOut, "CreatingMappings")
        }
        None if plan.waiting_for.is_some() => (OperationKind::ScaleIn, "WaitingForPods"),
        None => (OperationKind::ScaleIn, "RemovingMappings"),
    };
    let same_kind = previous.as_ref().filter(|p| p.kind == kind);
    let from_replicas = match after {
        Some(Operation::ScaleIn { from, .. }) => *from as i32,
        _ => same_kind.map(|p| p.from_replicas).unwrap_or(from as i32),
    };
    Some(OperationStatus {
        kind,
        phase: phase.into(),
        from_replicas,
        to_replicas: desired as i32,
        started_at: Some(
            same_kind
                .and_then(|p| p.started_at.clone())
                .unwrap_or(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now)),
        ),
    })
}

impl Decision {
    /// When to look again. Pod and `cache_list` watches bring changes in at once; these
    /// requeues are a safety net.
    pub fn requeue(&self, applied: &Applied, wrote_status: bool, resync: Duration) -> Action {
        if self.conflict.is_some() {
            return Action::requeue(REQUEUE_CONFLICT);
        }
        if self.deleting {
            return Action::requeue(REQUEUE_BUSY);
        }
        let busy = !self.plan.ops.is_empty()
            || self.plan.waiting_for.is_some()
            || !self.remove_pods.is_empty()
            || self.after.is_some()
            || applied.ran.persisted
            || wrote_status
            || !self.day2.actions.is_empty()
            || !self.day2.stale.is_empty()
            || self.day2.heal_pending;
        if busy || self.status.operation.is_some() {
            return Action::requeue(REQUEUE_BUSY);
        }
        if self.ready != self.status.desired {
            return Action::requeue(REQUEUE_NOT_READY.min(resync));
        }
        Action::requeue(resync)
    }
}

/// What `apply` did, for the requeue.
#[derive(Default)]
pub struct Applied {
    pub ran: Ran,
    pub finalizer_removed: bool,
}

#[cfg(test)]
mod leaving_pod_tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{StatefulSetSpec, StatefulSetStatus};
    use k8s_openapi::api::core::v1::{Pod, PodCondition, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

    fn sts(replicas: i32, policy: Option<&str>, generation: i64, observed: i64) -> StatefulSet {
        StatefulSet {
            metadata: ObjectMeta {
                generation: Some(generation),
                ..Default::default()
            },
            spec: Some(StatefulSetSpec {
                replicas: Some(replicas),
                pod_management_policy: policy.map(String::from),
                ..Default::default()
            }),
            status: Some(StatefulSetStatus {
                observed_generation: Some(observed),
                ..Default::default()
            }),
        }
    }

    fn pod(o: u32, ready: bool) -> (u32, Pod) {
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some(format!("mc-{o}")),
                uid: Some(format!("uid-{o}")),
                ..Default::default()
            },
            status: Some(PodStatus {
                conditions: Some(vec![PodCondition {
                    type_: "Ready".into(),
                    status: if ready { "True" } else { "False" }.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        (o, pod)
    }

    fn names(v: Vec<(String, String)>) -> Vec<String> {
        v.into_iter().map(|(n, _)| n).collect()
    }

    #[test]
    fn unready_pods_past_the_size_and_out_of_the_ring_are_removed() {
        // 5 → 2: mc-2 is unready and out (removed), mc-3 Ready (the controller's), mc-4 unready
        // but still registered (left alone), mc-1 in range (never).
        let pods = vec![
            pod(0, true),
            pod(1, false),
            pod(2, false),
            pod(3, true),
            pod(4, false),
        ];
        let registered: BTreeSet<String> = ["mc-0", "mc-1", "mc-4"].map(String::from).into();
        let host = |o: u32| format!("mc-{o}");
        let set = sts(2, Some("OrderedReady"), 7, 7);
        let got = stalled_leaving_pods(Some(&set), &pods, &registered, host, false);
        assert_eq!(names(got), vec!["mc-2"]);
        // Deleting: registered or not, every unready pod past the size goes.
        let set = sts(0, None, 8, 8);
        let got = stalled_leaving_pods(Some(&set), &pods, &registered, host, true);
        assert_eq!(names(got), vec!["mc-1", "mc-2", "mc-4"]);
    }

    #[test]
    fn nothing_goes_before_the_controller_saw_the_size_or_under_parallel() {
        let pods = vec![pod(0, true), pod(1, false), pod(2, false)];
        let none = BTreeSet::new();
        let host = |o: u32| format!("mc-{o}");
        let unseen = sts(1, None, 9, 8);
        assert!(stalled_leaving_pods(Some(&unseen), &pods, &none, host, false).is_empty());
        let parallel = sts(1, Some("Parallel"), 9, 9);
        assert!(stalled_leaving_pods(Some(&parallel), &pods, &none, host, false).is_empty());
        assert!(stalled_leaving_pods(None, &pods, &none, host, false).is_empty());
        let mut terminating = pods.clone();
        terminating[2].1.metadata.deletion_timestamp =
            Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
        let seen = sts(1, None, 9, 9);
        let got = stalled_leaving_pods(Some(&seen), &terminating, &none, host, false);
        assert_eq!(names(got), vec!["mc-1"]);
    }
}

#[cfg(test)]
mod foreign_ring_tests {
    use super::*;
    use crate::crd::tests::seed_cr;

    #[test]
    fn only_this_resources_pods_are_its_ring_members() {
        let valid = crate::validate::validate(&seed_cr()).unwrap();
        let sts = valid.statefulset_name();
        let ours = format!("10.0.0.1:11211-{sts}-0.default");
        let children = vec![
            ours.clone(),
            format!("10.0.0.2:11211-{sts}-12.default"),
            "garbage".to_string(),
            "10.0.0.9:11211-stranger.elsewhere".to_string(),
            format!("10.0.0.3:11211-{sts}-1.other-ns"),
            format!("10.0.0.4:11211-{sts}-x.default"),
        ];
        let foreign = foreign_ring_members(&valid, &children);
        assert_eq!(foreign, children[2..].to_vec());
        let (reason, note) = foreign_ring_note(&valid, &children).unwrap();
        assert_eq!(reason, "ForeignNodesInRing");
        assert!(
            note.contains("4 znode(s)") && note.contains("stranger.elsewhere"),
            "{note}"
        );
        assert!(foreign_ring_note(&valid, &[ours]).is_none());
    }
}

#[cfg(test)]
mod live_config_tests {
    use super::*;

    #[test]
    fn during_an_operation_only_zkfailstop_is_applied_live() {
        let on = LiveConfig {
            memlimit_mb: 100,
            connections: 1000,
            zk_failstop: true,
        };
        let action = |pod: &str, from: LiveConfig, to: LiveConfig| Day2Action::ApplyLiveConfig {
            pod: pod.into(),
            ip: "10.0.0.1".into(),
            from: Some(from),
            to,
        };
        let want = LiveConfig {
            memlimit_mb: 200,
            zk_failstop: false,
            ..on
        };
        let off = on.with_failstop(false);
        let day2 = Day2Plan {
            actions: vec![
                action("a", on, want),
                action("b", off, want),
                Day2Action::Heal {
                    pod: "c".into(),
                    ip: "10.0.0.3".into(),
                },
            ],
            ..Default::default()
        };
        assert_eq!(
            live_config_now(&day2, true),
            vec![action("a", on, want), action("b", off, want)],
            "idle: everything"
        );
        assert_eq!(
            live_config_now(&day2, false),
            vec![action("a", on, off)],
            "busy: only the failstop change, memlimit waits"
        );
    }
}
