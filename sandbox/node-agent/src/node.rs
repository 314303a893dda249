//! The agent's Nodes (`<prefix>-a`, `<prefix>-b`, …): their fixed identities (addresses,
//! podCIDR, zone), registration (idempotent) and a status heartbeat per node.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Node, NodeAddress, NodeCondition, NodeSpec, NodeStatus, NodeSystemInfo,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};

use crate::env::{NODE_CPU, NODE_MEMORY};

pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// Pods per node (kubelet's default maxPods; each podCIDR has 253 addresses).
const NODE_PODS: &str = "110";
/// Reported as kubelet and kube-proxy version: the API server's, as a kubelet of the same
/// release would (set once the server answered; v1.37.0 until then).
static KUBELET_VERSION: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn kubelet_version() -> &'static str {
    KUBELET_VERSION
        .get()
        .map(String::as_str)
        .unwrap_or("v1.37.0")
}
pub const MAX_NODES: usize = 9;

/// One Node the agent plays: everything about it is derived from its index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    /// `a`, `b`, `c`, …: the name suffix and the zone.
    pub letter: char,
    /// InternalIP: `10.244.0.<11+i>` (set up on the bridge by scripts/sandbox).
    pub ip: Ipv4Addr,
    /// Network address of the /24 podCIDR `10.244.<i+1>.0/24`.
    pub pod_cidr_base: Ipv4Addr,
}

impl NodeInfo {
    pub fn new(prefix: &str, index: usize) -> Self {
        assert!(index < MAX_NODES, "at most {MAX_NODES} nodes");
        let i = index as u8;
        let letter = (b'a' + i) as char;
        Self {
            name: format!("{prefix}-{letter}"),
            letter,
            ip: Ipv4Addr::new(10, 244, 0, 11 + i),
            pod_cidr_base: Ipv4Addr::new(10, 244, i + 1, 0),
        }
    }

    pub fn pod_cidr(&self) -> String {
        format!("{}/24", self.pod_cidr_base)
    }
}

/// The agent's nodes: `count` of them (1..=9), named `<prefix>-a`, `<prefix>-b`, ….
pub fn nodes(prefix: &str, count: usize) -> Vec<NodeInfo> {
    (0..count.clamp(1, MAX_NODES))
        .map(|i| NodeInfo::new(prefix, i))
        .collect()
}

pub fn labels(node: &NodeInfo) -> BTreeMap<String, String> {
    let zone = node.letter.to_string();
    [
        ("kubernetes.io/hostname", node.name.as_str()),
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", arch()),
        ("beta.kubernetes.io/os", "linux"),
        ("beta.kubernetes.io/arch", arch()),
        ("topology.kubernetes.io/zone", zone.as_str()),
        ("topology.kubernetes.io/region", "sandbox"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
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
pub fn status(node: &NodeInfo, since: Timestamp, now: Timestamp) -> NodeStatus {
    let resources: BTreeMap<String, Quantity> = [
        ("cpu", NODE_CPU),
        ("memory", NODE_MEMORY),
        ("pods", NODE_PODS),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), Quantity(v.to_string())))
    .collect();
    let (since, now) = (Time(since), Time(now));
    let ok = |kind: &str, reason: &str| {
        condition(
            kind,
            "False",
            reason,
            "sandbox node agent",
            since.clone(),
            now.clone(),
        )
    };
    NodeStatus {
        addresses: Some(vec![
            NodeAddress {
                type_: "InternalIP".into(),
                address: node.ip.to_string(),
            },
            NodeAddress {
                type_: "Hostname".into(),
                address: node.name.clone(),
            },
        ]),
        capacity: Some(resources.clone()),
        allocatable: Some(resources),
        conditions: Some(vec![
            ok("MemoryPressure", "KubeletHasSufficientMemory"),
            ok("DiskPressure", "KubeletHasNoDiskPressure"),
            ok("PIDPressure", "KubeletHasSufficientPID"),
            condition(
                "Ready",
                "True",
                "KubeletReady",
                "sandbox node agent is posting ready status",
                since.clone(),
                now.clone(),
            ),
        ]),
        node_info: Some(NodeSystemInfo {
            architecture: arch().into(),
            boot_id: read_trim("/proc/sys/kernel/random/boot_id"),
            container_runtime_version: "sandbox://0.2.0".into(),
            kernel_version: read_trim("/proc/sys/kernel/osrelease"),
            kube_proxy_version: kubelet_version().into(),
            kubelet_version: kubelet_version().into(),
            machine_id: read_trim("/etc/machine-id"),
            operating_system: "linux".into(),
            os_image: os_image(),
            system_uuid: read_trim("/etc/machine-id"),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The Node object the agent creates (the status is posted separately).
pub fn object(node: &NodeInfo) -> Node {
    Node {
        metadata: ObjectMeta {
            name: Some(node.name.clone()),
            labels: Some(labels(node)),
            ..Default::default()
        },
        spec: Some(NodeSpec {
            pod_cidr: Some(node.pod_cidr()),
            pod_cidrs: Some(vec![node.pod_cidr()]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Creates the Node or brings an existing one up to date (labels, podCIDR when unset,
/// unschedulable off), then posts its status. Returns the time the node was first seen Ready
/// by this run. An existing Node with another podCIDR is an error (podCIDR is immutable).
pub async fn register(client: &Client, node: &NodeInfo) -> anyhow::Result<Timestamp> {
    if KUBELET_VERSION.get().is_none() {
        let _ = KUBELET_VERSION.set(client.apiserver_version().await?.git_version);
    }
    let api = Api::<Node>::all(client.clone());
    let since = Timestamp::now();
    match api.get_opt(&node.name).await? {
        None => {
            api.create(&PostParams::default(), &object(node)).await?;
            tracing::info!(node = %node.name, ip = %node.ip, pod_cidr = %node.pod_cidr(), "registered node");
        }
        Some(existing) => {
            let current = existing.spec.as_ref().and_then(|s| s.pod_cidr.clone());
            let mut patch = serde_json::json!({ "metadata": { "labels": labels(node) }, "spec": { "unschedulable": null } });
            match current.as_deref() {
                None | Some("") => {
                    patch["spec"]["podCIDR"] = node.pod_cidr().into();
                    patch["spec"]["podCIDRs"] = serde_json::json!([node.pod_cidr()]);
                }
                Some(c) if c == node.pod_cidr() => {}
                Some(c) => anyhow::bail!(
                    "node {} exists with podCIDR {c}, but this agent gives it {} (podCIDR cannot change): delete the Node object (kubectl delete node {}) and restart the agent",
                    node.name,
                    node.pod_cidr(),
                    node.name
                ),
            }
            api.patch(&node.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            tracing::info!(node = %node.name, "node already registered; labels refreshed");
        }
    }
    post_status(&api, node, since).await?;
    Ok(since)
}

pub async fn post_status(api: &Api<Node>, node: &NodeInfo, since: Timestamp) -> kube::Result<()> {
    let patch = serde_json::json!({ "status": status(node, since, Timestamp::now()) });
    api.patch_status(&node.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map(|_| ())
}

/// Keeps the node's status fresh every 10 s until cancelled (re-registering if it was deleted).
pub async fn heartbeat(
    client: Client,
    node: NodeInfo,
    mut since: Timestamp,
    stop: tokio_util::sync::CancellationToken,
) {
    let api = Api::<Node>::all(client.clone());
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(HEARTBEAT) => {}
        }
        match post_status(&api, &node, since).await {
            Ok(()) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {
                tracing::warn!(node = %node.name, "node object was deleted; registering it again");
                match register(&client, &node).await {
                    Ok(t) => since = t,
                    Err(e) => tracing::warn!(node = %node.name, error = %e, "re-registering node"),
                }
            }
            Err(e) => tracing::warn!(node = %node.name, error = %e, "node status heartbeat failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_nodes_with_their_own_addresses_cidrs_and_zones() {
        let ns = nodes("sandbox", 3);
        let got: Vec<(&str, String, String)> = ns
            .iter()
            .map(|n| (n.name.as_str(), n.ip.to_string(), n.pod_cidr()))
            .collect();
        assert_eq!(
            got,
            [
                ("sandbox-a", "10.244.0.11".into(), "10.244.1.0/24".into()),
                ("sandbox-b", "10.244.0.12".into(), "10.244.2.0/24".into()),
                ("sandbox-c", "10.244.0.13".into(), "10.244.3.0/24".into()),
            ]
        );
        assert_eq!(nodes("sandbox", 0).len(), 1);
        assert_eq!(nodes("sandbox", 20).len(), 9);
        assert_eq!(nodes("sandbox", 9)[8].name, "sandbox-i");
        assert_eq!(nodes("sandbox", 9)[8].pod_cidr(), "10.244.9.0/24");
    }

    #[test]
    fn labels_and_object() {
        let b = NodeInfo::new("sandbox", 1);
        let l = labels(&b);
        assert_eq!(l["kubernetes.io/hostname"], "sandbox-b");
        assert_eq!(l["kubernetes.io/os"], "linux");
        assert_eq!(l["kubernetes.io/arch"], arch());
        assert_eq!(l["topology.kubernetes.io/zone"], "b");
        assert_eq!(l["topology.kubernetes.io/region"], "sandbox");
        let o = object(&b);
        let spec = o.spec.unwrap();
        assert_eq!(spec.pod_cidr.as_deref(), Some("10.244.2.0/24"));
        assert_eq!(spec.pod_cidrs, Some(vec!["10.244.2.0/24".to_string()]));
        assert_eq!(o.metadata.name.as_deref(), Some("sandbox-b"));
    }

    #[test]
    fn status_is_ready_with_capacity_and_addresses() {
        let s = status(
            &NodeInfo::new("sandbox", 2),
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
        assert_eq!(s.capacity.as_ref().unwrap()["pods"].0, "110");
        assert_eq!(s.allocatable.as_ref().unwrap()["memory"].0, "24Gi");
        assert_eq!(s.allocatable.as_ref().unwrap()["cpu"].0, "2");
        let addrs = s.addresses.unwrap();
        assert_eq!(
            (addrs[0].type_.as_str(), addrs[0].address.as_str()),
            ("InternalIP", "10.244.0.13")
        );
        assert_eq!(
            (addrs[1].type_.as_str(), addrs[1].address.as_str()),
            ("Hostname", "sandbox-c")
        );
    }
}
