//! The Node object: registration (idempotent) and a status heartbeat.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, NodeAddress, NodeCondition, NodeStatus, NodeSystemInfo};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};

use crate::env::{NODE_CPU, NODE_MEMORY};

pub const HEARTBEAT: Duration = Duration::from_secs(10);

pub fn labels(node_name: &str) -> BTreeMap<String, String> {
    [
        ("kubernetes.io/hostname", node_name),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", std::env::consts::ARCH),
        ("beta.kubernetes.io/os", "linux"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn os_image() -> String {
    read_trim("/etc/os-release")
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| "linux".into())
}

fn condition(
    kind: &str,
    status: &str,
    reason: &str,
    message: &str,
    since: Time,
    now: Time,
) -> NodeCondition {
    NodeCondition {
        type_: kind.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        last_heartbeat_time: Some(now),
        last_transition_time: Some(since),
    }
}

/// The full status the agent reports; `since` is when the node became Ready.
pub fn status(node_name: &str, since: Timestamp, now: Timestamp) -> NodeStatus {
    let resources: BTreeMap<String, Quantity> =
        [("cpu", NODE_CPU), ("memory", NODE_MEMORY), ("pods", "1000")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
            .collect();
    let (since, now) = (Time(since), Time(now));
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    NodeStatus {
        addresses: Some(vec![
            NodeAddress {
                type_: "InternalIP".into(),
                address: "127.0.0.1".into(),
            },
            NodeAddress {
                type_: "Hostname".into(),
                address: node_name.into(),
            },
        ]),
        capacity: Some(resources.clone()),
        allocatable: Some(resources),
        conditions: Some(vec![
            condition(
                "MemoryPressure",
                "False",
                "KubeletHasSufficientMemory",
                "sandbox node agent",
                since.clone(),
                now.clone(),
            ),
            condition(
                "DiskPressure",
                "False",
                "KubeletHasNoDiskPressure",
                "sandbox node agent",
                since.clone(),
                now.clone(),
            ),
            condition(
                "PIDPressure",
                "False",
                "KubeletHasSufficientPID",
                "sandbox node agent",
                since.clone(),
                now.clone(),
            ),
            condition(
                "Ready",
                "True",
                "KubeletReady",
                "sandbox node agent is posting ready status",
                since,
                now,
            ),
        ]),
        node_info: Some(NodeSystemInfo {
            architecture: arch.into(),
            boot_id: read_trim("/proc/sys/kernel/random/boot_id"),
            container_runtime_version: "sandbox://0.1.0".into(),
            kernel_version: read_trim("/proc/sys/kernel/osrelease"),
            kube_proxy_version: "v1.20.2".into(),
            kubelet_version: "v1.20.2".into(),
            machine_id: read_trim("/etc/machine-id"),
            operating_system: "linux".into(),
            os_image: os_image(),
            system_uuid: read_trim("/etc/machine-id"),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Creates the Node or brings an existing one up to date (labels, unschedulable off), then
/// posts its status. Returns the time the node was first seen Ready by this run.
pub async fn register(client: &Client, node_name: &str) -> anyhow::Result<Timestamp> {
    let api = Api::<Node>::all(client.clone());
    let since = Timestamp::now();
    match api.get_opt(node_name).await? {
        None => {
            let node = Node {
                metadata: ObjectMeta {
                    name: Some(node_name.into()),
                    labels: Some(labels(node_name)),
                    ..Default::default()
                },
                ..Default::default()
            };
            api.create(&PostParams::default(), &node).await?;
            tracing::info!(node = node_name, "registered node");
        }
        Some(_) => {
            let patch = serde_json::json!({ "metadata": { "labels": labels(node_name) }, "spec": { "unschedulable": null } });
            api.patch(node_name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            tracing::info!(
                node = node_name,
                "node already registered; labels refreshed"
            );
        }
    }
    post_status(&api, node_name, since).await?;
    Ok(since)
}

pub async fn post_status(api: &Api<Node>, node_name: &str, since: Timestamp) -> kube::Result<()> {
    let patch = serde_json::json!({ "status": status(node_name, since, Timestamp::now()) });
    api.patch_status(node_name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}

/// Keeps the node's status fresh every 10 s until cancelled (re-registering if it was deleted).
pub async fn heartbeat(
    client: Client,
    node_name: String,
    mut since: Timestamp,
    stop: tokio_util::sync::CancellationToken,
) {
    let api = Api::<Node>::all(client.clone());
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(HEARTBEAT) => {}
        }
        match post_status(&api, &node_name, since).await {
            Ok(()) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {
                tracing::warn!(node = %node_name, "node object was deleted; registering it again");
                match register(&client, &node_name).await {
                    Ok(t) => since = t,
                    Err(e) => tracing::warn!(node = %node_name, error = %e, "re-registering node"),
                }
            }
            Err(e) => tracing::warn!(node = %node_name, error = %e, "node status heartbeat failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_ready_with_capacity_and_addresses() {
        let s = status(
            "sandbox-node",
            Timestamp::from_second(1).unwrap(),
            Timestamp::from_second(2).unwrap(),
        );
        let ready = s
            .conditions
            .as_ref()
            .unwrap()
            .iter()
            .find(|c| c.type_ == "Ready")
            .unwrap();
        assert_eq!(ready.status, "True");
        assert_eq!(s.capacity.as_ref().unwrap()["pods"].0, "1000");
        assert_eq!(s.allocatable.as_ref().unwrap()["memory"].0, "24Gi");
        let addrs = s.addresses.unwrap();
        assert_eq!(
            (addrs[0].type_.as_str(), addrs[0].address.as_str()),
            ("InternalIP", "127.0.0.1")
        );
        assert_eq!(addrs[1].address, "sandbox-node");
        let json = serde_json::to_value(s.node_info.unwrap()).unwrap();
        assert!(json.get("swap").is_none(), "no field newer than 1.20");
    }
}
