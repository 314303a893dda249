//! Status as a pure function of what one reconcile saw and decided. Conditions keep their
//! lastTransitionTime while their truth value holds, so a steady state computes the very status
//! that is stored and nothing is written.

use crate::crd::{ArcusMemcached, ArcusMemcachedStatus, Condition, ConditionStatus, ConditionType};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use std::collections::BTreeSet;

/// One cache pod as status needs it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeView {
    pub ordinal: u32,
    pub hostname: String,
    pub pod_ready: bool,
    pub running: bool,
    /// Why the node is failing, if it is (exit code, image problem), in one phrase.
    pub failure: Option<String>,
}

pub struct StatusInput<'a> {
    pub desired: u32,
    pub nodes: &'a [NodeView],
    /// Hostnames with an ephemeral znode under `cache_list/<svc>`.
    pub registered: &'a BTreeSet<String>,
    pub registered_nodes: Vec<String>,
    /// An error that stops the operator acting: invalid spec, conflict, ZooKeeper unreachable.
    pub blocking_error: Option<(&'static str, String)>,
    /// What a scale or deletion is waiting for.
    pub progress: Option<(&'static str, String)>,
    /// Something in ZooKeeper the operator does not own and leaves alone, but clients see
    /// (a foreign child of `cache_list/<svc>`): Degraded, without blocking anything.
    pub zookeeper_problem: Option<(&'static str, String)>,
    pub service_code: Option<String>,
    pub operation: Option<crate::crd::OperationStatus>,
}

pub fn compute(cr: &ArcusMemcached, input: &StatusInput, now: Time) -> ArcusMemcachedStatus {
    let old = cr.status.clone().unwrap_or_default();
    let in_range = |n: &&NodeView| n.ordinal < input.desired;
    let ready = input
        .nodes
        .iter()
        .filter(in_range)
        .filter(|n| n.pod_ready && input.registered.contains(&n.hostname))
        .count() as u32;
    let running = input
        .nodes
        .iter()
        .filter(in_range)
        .filter(|n| n.running)
        .count() as u32;
    let failures: Vec<String> = input
        .nodes
        .iter()
        .filter_map(|n| n.failure.as_ref().map(|f| format!("{}: {f}", n.hostname)))
        .collect();
    let message = match (&input.blocking_error, failures.is_empty()) {
        (Some((_, m)), _) => m.clone(),
        (None, false) => failures.join("; "),
        (None, true) => input
            .zookeeper_problem
            .as_ref()
            .map(|(_, m)| m.clone())
            .unwrap_or_default(),
    };
    let generation = cr.metadata.generation;
    let conditions = [
        available(input, ready),
        progressing(input, ready),
        degraded(input, &failures),
    ]
    .into_iter()
    .map(|(type_, truth, reason, msg)| condition(&old, type_, truth, reason, msg, generation, &now))
    .collect();
    ArcusMemcachedStatus {
        ready: Some(format!("{ready}/{}", input.desired)),
        container: Some(format!("{running}/{}", input.desired)),
        image: Some(cr.spec.image.name.clone()),
        message: (!message.is_empty()).then_some(message),
        observed_generation: generation,
        replicas: Some(input.nodes.len() as i32),
        label_selector: Some(crate::build::labels::selector_string(&cr.name_any())),
        conditions,
        ready_replicas: Some(ready as i32),
        registered_nodes: input.registered_nodes.clone(),
        service_code: input.service_code.clone().or(old.service_code),
        operation: input.operation.clone(),
        // Written only by the migration progress writer (a merge patch of its own): kept here
        // so a steady state compares equal, and left out of the status apply.
        migration: old.migration,
    }
}

/// A condition as (type, status, reason, message).
type ConditionParts = (ConditionType, bool, &'static str, String);

fn available(input: &StatusInput, ready: u32) -> ConditionParts {
    let available = input.blocking_error.is_none() && ready == input.desired;
    let reason = if available {
        "AllNodesReady"
    } else {
        "NodesNotReady"
    };
    let message = format!(
        "{ready}/{} cache nodes are ready and registered in ZooKeeper",
        input.desired
    );
    (ConditionType::Available, available, reason, message)
}

fn progressing(input: &StatusInput, ready: u32) -> ConditionParts {
    match &input.progress {
        Some((reason, msg)) => (ConditionType::Progressing, true, reason, msg.clone()),
        None if ready != input.desired && input.blocking_error.is_none() => (
            ConditionType::Progressing,
            true,
            "WaitingForNodes",
            format!(
                "waiting for {} cache node(s) to become ready and registered",
                input.desired - ready.min(input.desired)
            ),
        ),
        None => (
            ConditionType::Progressing,
            false,
            "Settled",
            "nothing in progress".into(),
        ),
    }
}

fn degraded(input: &StatusInput, failures: &[String]) -> ConditionParts {
    match (&input.blocking_error, failures.is_empty()) {
        (Some((reason, m)), _) => (ConditionType::Degraded, true, reason, m.clone()),
        (None, false) => (
            ConditionType::Degraded,
            true,
            "NodesFailing",
            failures.join("; "),
        ),
        (None, true) => match &input.zookeeper_problem {
            Some((reason, m)) => (ConditionType::Degraded, true, reason, m.clone()),
            None => (
                ConditionType::Degraded,
                false,
                "Healthy",
                "no errors".into(),
            ),
        },
    }
}

/// The status kept as it is but for `Degraded`, true for `reason` (an outage the operator
/// waits out, ZooKeeper unreachable: what it saw last of the nodes still holds).
pub fn degraded_only(
    cr: &ArcusMemcached,
    reason: &str,
    message: String,
    now: Time,
) -> ArcusMemcachedStatus {
    let old = cr.status.clone().unwrap_or_default();
    let mut status = old.clone();
    let degraded = condition(
        &old,
        ConditionType::Degraded,
        true,
        reason,
        message.clone(),
        cr.metadata.generation,
        &now,
    );
    status
        .conditions
        .retain(|c| c.type_ != ConditionType::Degraded);
    status.conditions.push(degraded);
    status.message = Some(message);
    status
}

fn condition(
    old: &ArcusMemcachedStatus,
    type_: ConditionType,
    truth: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = if truth {
        ConditionStatus::True
    } else {
        ConditionStatus::False
    };
    let last_transition_time = old
        .conditions
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .and_then(|c| c.last_transition_time.clone())
        .or_else(|| Some(now.clone()));
    Condition {
        type_,
        status,
        reason: reason.to_string(),
        message,
        last_transition_time,
        observed_generation: generation,
    }
}

/// The pod's `Ready` condition when it is `True` (its transition time says since when).
pub fn ready_condition(pod: &Pod) -> Option<&k8s_openapi::api::core::v1::PodCondition> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == "True")
}

/// Reads a cache pod: readiness, whether its container runs, and why it fails (the exit codes
/// arcus-memcached uses say what went wrong).
pub fn node_view(pod: &Pod, ordinal: u32, hostname: String) -> NodeView {
    let pod_ready = ready_condition(pod).is_some();
    let status = pod.status.clone().unwrap_or_default();
    let containers = status.container_statuses.unwrap_or_default();
    let running = containers
        .iter()
        .any(|c| c.state.as_ref().and_then(|s| s.running.as_ref()).is_some());
    let failure = containers.iter().find_map(|c| {
        let waiting = c.state.as_ref().and_then(|s| s.waiting.as_ref());
        if let Some(w) = waiting {
            let reason = w.reason.clone().unwrap_or_default();
            if matches!(
                reason.as_str(),
                "ErrImagePull"
                    | "ImagePullBackOff"
                    | "InvalidImageName"
                    | "CreateContainerConfigError"
            ) {
                return Some(format!(
                    "{reason}: {}",
                    w.message.clone().unwrap_or_default()
                ));
            }
        }
        let last_exit = c
            .last_state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .map(|t| t.exit_code);
        match (waiting.and_then(|w| w.reason.as_deref()), last_exit) {
            (Some("CrashLoopBackOff"), Some(code)) | (_, Some(code)) if !c.ready && code != 0 => {
                Some(format!(
                    "restarted {} time(s), last exit {}",
                    c.restart_count,
                    explain_exit(code)
                ))
            }
            _ => None,
        }
    });
    NodeView {
        ordinal,
        hostname,
        pod_ready,
        running,
        failure,
    }
}

/// What an arcus-memcached exit code means (ARCUS.md: 76 no mapping, 75 session expired).
pub fn explain_exit(code: i32) -> String {
    match code {
        76 => "76 (EX_PROTOCOL: no ZooKeeper mapping found for this node)".into(),
        75 => "75 (ZooKeeper session expired)".into(),
        139 => {
            "139 (segmentation fault; persistence options on a server built without persistence?)"
                .into()
        }
        137 => "137 (killed: out of memory or liveness failure)".into(),
        c => c.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::ArcusMemcachedSpec;

    fn cr(status: Option<ArcusMemcachedStatus>) -> ArcusMemcached {
        let spec: ArcusMemcachedSpec = serde_json::from_value(serde_json::json!({
            "replicas": 3, "serviceCode": "test", "zookeeperServers": ["127.0.0.1:2181"],
            "image": {"name": "jam2in/arcus-memcached:1.11.7"}
        }))
        .unwrap();
        let mut cr = ArcusMemcached::new("test", spec);
        cr.metadata.generation = Some(2);
        cr.status = status;
        cr
    }

    fn node(o: u32, ready: bool) -> NodeView {
        NodeView {
            ordinal: o,
            hostname: format!("h{o}"),
            pod_ready: ready,
            running: true,
            failure: None,
        }
    }

    fn input<'a>(nodes: &'a [NodeView], registered: &'a BTreeSet<String>) -> StatusInput<'a> {
        StatusInput {
            desired: 3,
            nodes,
            registered,
            registered_nodes: vec![],
            blocking_error: None,
            progress: None,
            zookeeper_problem: None,
            service_code: Some("test".into()),
            operation: None,
        }
    }

    fn t(s: i64) -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(s).unwrap())
    }

    #[test]
    fn ready_needs_pod_ready_and_znode() {
        let nodes = [node(0, true), node(1, true), node(2, false)];
        let registered: BTreeSet<String> = ["h0".to_string(), "h2".to_string()].into();
        let st = compute(&cr(None), &input(&nodes, &registered), t(1));
        assert_eq!(st.ready.as_deref(), Some("1/3"));
        assert_eq!(st.container.as_deref(), Some("3/3"));
        assert_eq!(st.observed_generation, Some(2));
    }

    #[test]
    fn steady_state_recomputes_the_stored_status_exactly() {
        let nodes = [node(0, true), node(1, true), node(2, true)];
        let registered: BTreeSet<String> =
            ["h0", "h1", "h2"].iter().map(|s| s.to_string()).collect();
        let first = compute(&cr(None), &input(&nodes, &registered), t(1));
        let second = compute(&cr(Some(first.clone())), &input(&nodes, &registered), t(99));
        assert_eq!(first, second);
        assert!(first
            .conditions
            .iter()
            .any(|c| c.type_ == ConditionType::Available && c.status == ConditionStatus::True));
    }

    #[test]
    fn blocking_error_is_the_message_and_degrades() {
        let registered = BTreeSet::new();
        let mut i = input(&[], &registered);
        i.blocking_error = Some((
            "ServiceCodeConflict",
            "service code \"test\" is already in use".into(),
        ));
        let st = compute(&cr(None), &i, t(1));
        assert_eq!(
            st.message.as_deref(),
            Some("service code \"test\" is already in use")
        );
        let degraded = st
            .conditions
            .iter()
            .find(|c| c.type_ == ConditionType::Degraded)
            .unwrap();
        assert_eq!(
            (degraded.status, degraded.reason.as_str()),
            (ConditionStatus::True, "ServiceCodeConflict")
        );
    }

    #[test]
    fn exit_76_is_explained() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "test-arcus-mc-0"},
            "status": {"containerStatuses": [{
                "name": "arcus-memcached", "image": "x", "imageID": "", "ready": false, "restartCount": 2,
                "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                "lastState": {"terminated": {"exitCode": 76}}
            }]}
        }))
        .unwrap();
        let v = node_view(&pod, 0, "h0".into());
        assert!(v.failure.unwrap().contains("EX_PROTOCOL"));
        assert!(!v.pod_ready);
    }
}
