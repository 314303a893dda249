//! The scheduler half: binds unscheduled pods to this node via the `binding` subresource.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Binding, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};

#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// Not ours to schedule (already bound, terminating, or another scheduler's).
    Skip,
    Bind,
    /// Cannot run on this node; the message says why.
    Unschedulable(String),
}

/// Whether and how to schedule `pod` on the node with `node_labels`.
pub fn decide(pod: &Pod, node_labels: &BTreeMap<String, String>) -> Decision {
    let Some(spec) = &pod.spec else {
        return Decision::Skip;
    };
    if spec.node_name.as_deref().is_some_and(|n| !n.is_empty())
        || pod.metadata.deletion_timestamp.is_some()
    {
        return Decision::Skip;
    }
    if let Some(phase) = pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
        if phase == "Succeeded" || phase == "Failed" {
            return Decision::Skip;
        }
    }
    match spec.scheduler_name.as_deref() {
        None | Some("") | Some("default-scheduler") => {}
        Some(_) => return Decision::Skip,
    }
    for (k, v) in spec.node_selector.iter().flatten() {
        if node_labels.get(k) != Some(v) {
            return Decision::Unschedulable(format!(
                "0/1 nodes are available: 1 node(s) didn't match node selector ({k}={v})"
            ));
        }
    }
    Decision::Bind
}

pub async fn bind(client: &Client, pod: &Pod, node_name: &str) -> kube::Result<()> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let binding = Binding {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(ns.clone()),
            uid: pod.metadata.uid.clone(),
            ..Default::default()
        },
        target: ObjectReference {
            kind: Some("Node".into()),
            name: Some(node_name.into()),
            api_version: Some("v1".into()),
            ..Default::default()
        },
    };
    let api = Api::<Pod>::namespaced(client.clone(), &ns);
    api.create_subresource::<Binding, serde_json::Value>(
        "binding",
        &name,
        &PostParams::default(),
        &binding,
    )
    .await
    .map(|_| ())
}

pub async fn mark_unschedulable(client: &Client, pod: &Pod, message: &str) -> kube::Result<()> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let name = pod.metadata.name.clone().unwrap_or_default();
    let already = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "PodScheduled"))
        .is_some_and(|c| c.status == "False" && c.message.as_deref() == Some(message));
    if already {
        return Ok(());
    }
    let patch = serde_json::json!({ "status": { "phase": "Pending", "conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message,
        "lastTransitionTime": k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
    }]}});
    Api::<Pod>::namespaced(client.clone(), &ns)
        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodSpec;

    fn pod(spec: PodSpec) -> Pod {
        Pod {
            spec: Some(spec),
            ..Default::default()
        }
    }

    #[test]
    fn decisions() {
        let labels = crate::node::labels("sandbox-node");
        assert_eq!(decide(&pod(PodSpec::default()), &labels), Decision::Bind);
        assert_eq!(
            decide(
                &pod(PodSpec {
                    scheduler_name: Some("default-scheduler".into()),
                    ..Default::default()
                }),
                &labels
            ),
            Decision::Bind
        );
        assert_eq!(
            decide(
                &pod(PodSpec {
                    node_name: Some("x".into()),
                    ..Default::default()
                }),
                &labels
            ),
            Decision::Skip
        );
        assert_eq!(
            decide(
                &pod(PodSpec {
                    scheduler_name: Some("other".into()),
                    ..Default::default()
                }),
                &labels
            ),
            Decision::Skip
        );
        let sel = |k: &str, v: &str| PodSpec {
            node_selector: Some([(k.to_string(), v.to_string())].into()),
            ..Default::default()
        };
        assert_eq!(
            decide(&pod(sel("kubernetes.io/os", "linux")), &labels),
            Decision::Bind
        );
        assert!(
            matches!(decide(&pod(sel("disk", "ssd")), &labels), Decision::Unschedulable(m) if m.contains("disk=ssd"))
        );
    }
}
