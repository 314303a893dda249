//! The sandbox as a current cluster: the API server's version, 3 Nodes in 3 zones, the real
//! scheduler (spread, nodeSelector, Unschedulable), per-pod network namespaces (own IP, same
//! port in two pods, 127.0.0.1 is the pod), Services through kube-proxy and names through the
//! cluster DNS, from the host and from a pod, and the guard rails that keep every packet on
//! this machine. Each test uses its own namespace; every wait is bounded.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::TokioResolver;
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::api::{ListParams, PostParams};
use kube::Api;
use serde_json::{json, Value};
use test_support::sandbox::{in_namespace, pod_ready, Sandbox};
use test_support::wait_until;

const START: Duration = Duration::from_secs(90);
/// The cluster DNS, on the host's address on the sandbox bridge.
const CLUSTER_DNS: &str = "10.244.0.1:53";
/// A Service IP no Service has (the range is 10.96.0.0/16; the allocator starts low).
const UNUSED_SERVICE_IP: &str = "10.96.255.254";

async fn create<K>(api: &Api<K>, obj: Value) -> anyhow::Result<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let obj: K = serde_json::from_value(obj)?;
    Ok(api.create(&PostParams::default(), &obj).await?)
}

/// `count` Ready pods with label `app=<app>`: name → (node, pod IP, PID of the first container).
async fn ready_pods(
    api: &Api<Pod>,
    app: &str,
    count: usize,
) -> anyhow::Result<BTreeMap<String, (String, String, u32)>> {
    wait_until(START, &format!("{count} Ready pods app={app}"), || async {
        let list = api
            .list(&ListParams::default().labels(&format!("app={app}")))
            .await
            .ok()?;
        let mut out = BTreeMap::new();
        for p in list.items.iter().filter(|p| pod_ready(p)) {
            let st = p.status.as_ref()?;
            let cs = st.container_statuses.as_ref()?.first()?;
            let pid = cs
                .container_id
                .as_deref()?
                .strip_prefix("sandbox://")?
                .parse()
                .ok()?;
            out.insert(
                p.metadata.name.clone()?,
                (p.spec.as_ref()?.node_name.clone()?, st.pod_ip.clone()?, pid),
            );
        }
        (out.len() == count).then_some(out)
    })
    .await
}

/// A program that answers every HTTP request with its host name (the pod's UTS namespace), on
/// 0.0.0.0:8080 as in a real pod; Ready once 127.0.0.1:8080 — the pod itself — answers.
fn web_container() -> Value {
    json!({
        "name": "web", "image": "debian:12",
        "command": ["python3", "-c", r#"import http.server, socket
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = socket.gethostname().encode()
        self.send_response(200); self.send_header('Content-Length', str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(('0.0.0.0', 8080), H).serve_forever()
"#],
        "ports": [{"containerPort": 8080, "name": "http"}],
        "readinessProbe": {"exec": {"command": ["python3", "-c",
            "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/', timeout=2)"]},
            "periodSeconds": 1}
    })
}

/// One HTTP GET from the host; the body.
fn http_get(addr: &str) -> anyhow::Result<String> {
    let sock: SocketAddr = addr.parse()?;
    let mut s = TcpStream::connect_timeout(&sock, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET / HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    anyhow::ensure!(head.starts_with("HTTP/1.0 200"), "GET {addr}: {head}");
    Ok(body.to_string())
}

fn resolver() -> TokioResolver {
    let mut config = ResolverConfig::new();
    config.add_name_server(NameServerConfig::new(
        CLUSTER_DNS.parse().expect("address"),
        Protocol::Udp,
    ));
    TokioResolver::builder_with_config(config, TokioConnectionProvider::default()).build()
}

async fn resolve(name: &str) -> anyhow::Result<BTreeSet<String>> {
    let answer = resolver()
        .ipv4_lookup(name)
        .await
        .map_err(|e| anyhow::anyhow!("resolving {name} at {CLUSTER_DNS}: {e}"))?;
    Ok(answer.iter().map(|a| a.0.to_string()).collect())
}

#[tokio::test]
async fn current_control_plane_with_three_nodes_in_three_zones() -> anyhow::Result<()> {
    let sb = Sandbox::shared().await?;
    let want = std::fs::read_to_string(sb.dir.join("kubernetes-version"))
        .unwrap_or_else(|_| "1.37".into());
    let version = sb.client.apiserver_version().await?;
    assert!(
        version
            .git_version
            .starts_with(&format!("v{}.", want.trim())),
        "server version {} (want v{}.x)",
        version.git_version,
        want.trim()
    );
    let nodes = Api::<Node>::all(sb.client.clone())
        .list(&ListParams::default())
        .await?;
    let mut zones = BTreeSet::new();
    let mut ips = BTreeSet::new();
    for n in nodes.items.iter().filter(|n| {
        n.metadata
            .name
            .as_deref()
            .is_some_and(|n| n.starts_with("sandbox-"))
    }) {
        let name = n.metadata.name.clone().unwrap_or_default();
        let st = n.status.clone().unwrap_or_default();
        let is_ready = st
            .conditions
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True");
        assert!(is_ready, "node {name} Ready");
        zones.insert(
            n.metadata
                .labels
                .clone()
                .unwrap_or_default()
                .get("topology.kubernetes.io/zone")
                .cloned()
                .unwrap_or_default(),
        );
        let ip = st
            .addresses
            .unwrap_or_default()
            .into_iter()
            .find(|a| a.type_ == "InternalIP")
            .map(|a| a.address);
        ips.insert(ip.unwrap_or_default());
        assert!(
            n.spec
                .as_ref()
                .and_then(|s| s.pod_cidr.as_deref())
                .is_some_and(|c| c.starts_with("10.244.")),
            "node {name} has a pod CIDR"
        );
    }
    assert_eq!(
        zones,
        BTreeSet::from(["a".to_string(), "b".into(), "c".into()]),
        "3 zones"
    );
    assert_eq!(ips.len(), 3, "3 distinct InternalIPs: {ips:?}");
    Ok(())
}

#[tokio::test]
async fn pods_spread_over_zones_each_in_its_own_network_namespace() -> anyhow::Result<()> {
    in_namespace("net-spread", |sb, ns| async move {
        let deployments: Api<Deployment> = Api::namespaced(sb.client.clone(), &ns);
        create(&deployments, json!({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
            "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web"}}, "spec": {
                    "terminationGracePeriodSeconds": 5,
                    "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                        "whenUnsatisfiable": "DoNotSchedule", "labelSelector": {"matchLabels": {"app": "web"}}}],
                    "containers": [web_container()]}}}
        })).await?;
        let pods: Api<Pod> = Api::namespaced(sb.client.clone(), &ns);
        let running = ready_pods(&pods, "web", 3).await?;
        let nodes: BTreeSet<&str> = running.values().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(nodes.len(), 3, "one pod per zone (and Node): {running:?}");
        let host_netns = std::fs::read_link("/proc/self/ns/net")?;
        let mut netns = BTreeSet::new();
        for (name, (node, ip, pid)) in &running {
            // The pod IP is from its Node's pod range: sandbox-a → 10.244.1.0/24, ...
            let index = node.strip_prefix("sandbox-").and_then(|l| l.bytes().next()).map(|b| b - b'a' + 1);
            let ip4: Ipv4Addr = ip.parse()?;
            assert!(!ip4.is_loopback(), "{name}: {ip} is loopback");
            assert_eq!(Some(ip4.octets()[2]), index, "{name} on {node} has {ip}");
            // Same port 8080 in all three pods, each reached at its own address from the host;
            // each answers with its own host name.
            assert_eq!(http_get(&format!("{ip}:8080"))?, *name, "GET {ip}:8080");
            let ns_link = std::fs::read_link(format!("/proc/{pid}/ns/net"))?;
            assert_ne!(ns_link, host_netns, "{name}: process {pid} is in the host's network namespace");
            netns.insert(ns_link);
        }
        assert_eq!(netns.len(), 3, "three network namespaces");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn scheduler_honours_node_selector_and_reports_unschedulable() -> anyhow::Result<()> {
    in_namespace("net-sched", |sb, ns| async move {
        let pods: Api<Pod> = Api::namespaced(sb.client.clone(), &ns);
        let pod = |name: &str, zone: &str| json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"nodeSelector": {"topology.kubernetes.io/zone": zone}, "terminationGracePeriodSeconds": 2,
                     "containers": [{"name": "c", "image": "busybox", "command": ["sleep", "3600"]}]}
        });
        create(&pods, pod("in-b", "b")).await?;
        create(&pods, pod("nowhere", "z")).await?;
        let placed = wait_until(START, "in-b scheduled", || async {
            pods.get_opt("in-b").await.ok()??.spec?.node_name
        })
        .await?;
        assert_eq!(placed, "sandbox-b");
        let (reason, message) = wait_until(START, "nowhere marked Unschedulable", || async {
            let p = pods.get_opt("nowhere").await.ok()??;
            let c = p.status?.conditions?.into_iter().find(|c| c.type_ == "PodScheduled" && c.status == "False")?;
            Some((c.reason.unwrap_or_default(), c.message.unwrap_or_default()))
        })
        .await?;
        assert_eq!(reason, "Unschedulable", "{message}");
        assert!(message.contains("0/3 nodes are available") && message.contains("node affinity/selector"), "{message}");
        let p = pods.get("nowhere").await?;
        assert_eq!(p.status.and_then(|s| s.phase).as_deref(), Some("Pending"));
        assert!(p.spec.and_then(|s| s.node_name).is_none(), "not bound");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn services_and_cluster_dns_from_the_host_and_from_a_pod() -> anyhow::Result<()> {
    in_namespace("net-svc", |sb, ns| async move {
        let stss: Api<StatefulSet> = Api::namespaced(sb.client.clone(), &ns);
        let services: Api<Service> = Api::namespaced(sb.client.clone(), &ns);
        let pods: Api<Pod> = Api::namespaced(sb.client.clone(), &ns);
        create(&services, json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]}})).await?;
        create(&services, json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web-hl"},
            "spec": {"clusterIP": "None", "selector": {"app": "web"}, "ports": [{"port": 8080}]}})).await?;
        create(&stss, json!({
            "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "web"},
            "spec": {"replicas": 2, "serviceName": "web-hl", "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": {"labels": {"app": "web"}}, "spec": {
                    "terminationGracePeriodSeconds": 5, "containers": [web_container()]}}}
        })).await?;
        let running = ready_pods(&pods, "web", 2).await?;
        let names: BTreeSet<String> = running.keys().cloned().collect();
        let cluster_ip = services.get("web").await?.spec.and_then(|s| s.cluster_ip).unwrap_or_default();
        assert!(cluster_ip.starts_with("10.96."), "ClusterIP {cluster_ip}");

        // From the host: the ClusterIP through kube-proxy (once its rules and the
        // EndpointSlice are there), answered by both pods in turn.
        let mut answered = BTreeSet::new();
        wait_until(Duration::from_secs(60), "both pods answer through the ClusterIP", || {
            if let Ok(body) = http_get(&format!("{cluster_ip}:80")) {
                answered.insert(body);
            }
            let done = answered == names;
            async move { done.then_some(()) }
        })
        .await?;
        // An IP of the Service range that no Service has is refused at once (no time-out).
        let err = TcpStream::connect_timeout(&format!("{UNUSED_SERVICE_IP}:80").parse()?, Duration::from_secs(5))
            .expect_err("connect to an unused Service IP");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");

        // From the host: the cluster DNS.
        let fqdn = format!("web.{ns}.svc.cluster.local.");
        let got = wait_until(Duration::from_secs(30), "the Service's DNS name", || async {
            resolve(&fqdn).await.ok()
        })
        .await?;
        assert_eq!(got, BTreeSet::from([cluster_ip.clone()]), "{fqdn}");
        let web0_ip = running["web-0"].1.clone();
        let web0 = format!("web-0.web-hl.{ns}.svc.cluster.local.");
        let got = wait_until(Duration::from_secs(30), "the headless pod name", || async { resolve(&web0).await.ok() }).await?;
        assert_eq!(got, BTreeSet::from([web0_ip.clone()]), "{web0}");

        // From a pod: short names through the pod's resolv.conf search path, the ClusterIP, an
        // unused Service IP, and an address outside the machine (no route out of a pod).
        let probe = format!(
            r#"import json, socket, urllib.request
def connect(addr):
    try:
        socket.create_connection(addr, timeout=5).close(); return 'connected'
    except OSError as e:
        return type(e).__name__ + ':' + str(e.errno)
print(json.dumps({{
  'svc': socket.gethostbyname('web'),
  'svc_fqdn': socket.gethostbyname('web.{ns}.svc.cluster.local'),
  'pod_short': socket.gethostbyname('web-0.web-hl'),
  'pod_fqdn': socket.gethostbyname('web-0.web-hl.{ns}.svc.cluster.local'),
  'http': urllib.request.urlopen('http://web/', timeout=5).read().decode(),
  'unused_service_ip': connect(('{UNUSED_SERVICE_IP}', 80)),
  'outside': connect(('192.0.2.1', 80)),
}}), flush=True)
"#
        );
        create(&pods, json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client"},
            "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "debian:12", "command": ["python3", "-c", probe]}]}})).await?;
        let phase = wait_until(START, "the client pod to finish", || async {
            let phase = pods.get_opt("client").await.ok()??.status?.phase?;
            matches!(phase.as_str(), "Succeeded" | "Failed").then_some(phase)
        })
        .await?;
        let log_file = sb.dir.join(format!("logs/pods/{ns}_client_c.log"));
        let log = std::fs::read_to_string(&log_file).unwrap_or_default();
        assert_eq!(phase, "Succeeded", "client pod: {log}");
        let line = log.lines().rev().find(|l| l.starts_with('{')).unwrap_or("{}");
        let got: Value = serde_json::from_str(line)?;
        assert_eq!(got["svc"], cluster_ip.as_str(), "{got}");
        assert_eq!(got["svc_fqdn"], cluster_ip.as_str(), "{got}");
        assert_eq!(got["pod_short"], web0_ip.as_str(), "{got}");
        assert_eq!(got["pod_fqdn"], web0_ip.as_str(), "{got}");
        assert!(names.contains(got["http"].as_str().unwrap_or_default()), "{got}");
        // ECONNREFUSED (111) at once, not a time-out.
        assert_eq!(got["unused_service_ip"], "ConnectionRefusedError:111", "{got}");
        // ENETUNREACH (101): the pod has no default route.
        assert_eq!(got["outside"], "OSError:101", "{got}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn guard_routes_and_rules_are_in_place_while_up() -> anyhow::Result<()> {
    let sb = Sandbox::shared().await?;
    let out = std::process::Command::new(sb.repo.join("scripts/sandbox"))
        .arg("leftovers")
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "route unreachable 10.244.0.0/16",
        "route unreachable 10.96.0.0/16",
        "-A ARCUS-SANDBOX-GUARD -s 10.244.0.0/16 ! -o arcus0",
        "-A ARCUS-SANDBOX-GUARD -d 10.96.0.0/16 ! -o arcus0",
        "-A ARCUS-SANDBOX-GUARD -i arcus0 ! -o arcus0",
        "-A ARCUS-SANDBOX-REJECT -d 10.96.0.0/16",
        "link arcus0",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    // No masquerading to the outside: the only MASQUERADE is kube-proxy's, in KUBE-POSTROUTING,
    // which returns first for any packet kube-proxy did not mark (pod ↔ Service hairpins).
    let nat = std::process::Command::new("iptables-save")
        .args(["-t", "nat"])
        .output()?;
    let nat = String::from_utf8_lossy(&nat.stdout);
    for rule in nat.lines().filter(|l| l.contains("MASQUERADE")) {
        assert!(
            rule.starts_with("-A KUBE-POSTROUTING "),
            "unexpected masquerade rule: {rule}"
        );
    }
    assert!(
        nat.lines()
            .any(|l| l.starts_with("-A KUBE-POSTROUTING -m mark ! --mark")
                && l.ends_with("-j RETURN")),
        "KUBE-POSTROUTING returns unmarked packets:\n{nat}"
    );
    // And nothing of the sandbox's ranges is routed towards the machine's default route.
    let route = std::process::Command::new("ip")
        .args(["route", "get", UNUSED_SERVICE_IP])
        .output()?;
    let route = String::from_utf8_lossy(&route.stdout);
    assert!(
        route.contains("dev arcus0"),
        "{UNUSED_SERVICE_IP} routed via: {route}"
    );
    Ok(())
}
