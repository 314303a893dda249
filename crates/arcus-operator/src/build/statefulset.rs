//! The StatefulSet `<name>-arcus-mc`: one arcus-memcached per pod, started with ARCUS's
//! canonical command line and told its stable hostname and its pod IP, so the node finds its
//! ZooKeeper mapping (`<pod-hostname>:<port>`) and registers `<pod IP>:<port>-<hostname>`.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, ExecAction, ObjectFieldSelector,
    PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile, SecurityContext,
    TCPSocketAction, TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    arcus_paths, env, labels, object_meta, CONTAINER_NAME, EXPORTER_CONTAINER_NAME,
    METRICS_PORT_NAME, PORT_NAME,
};
use crate::crd::MetricsExporter;
use crate::validate::ValidSpec;

/// The StatefulSet with `replicas` pods. `replicas` is a parameter, not `spec.replicas`: during a
/// scale the controller moves it only after (out) or before (in) the ZooKeeper mappings change.
pub fn statefulset(spec: &ValidSpec, replicas: i32) -> StatefulSet {
    let mut sts = statefulset_without_marks(spec, replicas);
    // Mark the template: what a restart would change, and the live configuration its pods
    // start with.
    let started = crate::day2::LiveConfig {
        memlimit_mb: spec.memlimit_mb,
        connections: spec.connections,
        // arcus-memcached has no start-up option for it: every node starts with it on.
        zk_failstop: true,
    };
    let template = &mut sts.spec.as_mut().expect("spec").template;
    let annotations = template
        .metadata
        .get_or_insert_with(Default::default)
        .annotations
        .get_or_insert_with(Default::default);
    annotations.insert(crate::day2::RESTART_HASH.into(), restart_hash(spec));
    annotations.insert(crate::day2::STARTED_CONFIG.into(), started.to_string());
    sts
}

/// Raised (with a release note in docs/UPGRADING.md) only when a new operator version must
/// restart running cache nodes to bring them a changed default. Everything else an operator
/// upgrade changes in the pod template reaches pods only as they are recreated for another reason.
pub const POD_TEMPLATE_EPOCH: u32 = 1;

/// What the operator restarts a cache node for (the `jam2in.com/restart-hash` of the template,
/// compared with each pod's): the user's spec fields that shape the pod, and
/// [`POD_TEMPLATE_EPOCH`]. Not the rendered template: then every changed default of a new
/// operator version would restart every cache node on upgrade. Not `memlimit`/`connections`
/// either: they are applied to running nodes (day2.rs).
///
/// By construction: the destructuring names every field of [`ValidSpec`], so a new field does
/// not compile until it is either hashed or named as not restarting anything; an unset
/// optional field is left out of the hashed JSON, so adding one keeps every existing hash.
pub fn restart_hash(spec: &ValidSpec) -> String {
    let ValidSpec {
        name,
        namespace,
        owner: _,
        generation: _,
        service_code,
        replicas: _,
        port,
        zookeeper_servers: _,
        memlimit_mb: _,
        connections: _,
        threads,
        zk_session_timeout_seconds,
        // Live (`config zkfailstop`), like memlimit and connections.
        zk_failstop: _,
        // The operator's own credentials: the nodes never authenticate.
        zookeeper_auth_secret: _,
        image,
        pull_policy,
        resources,
        node_selector,
        affinity,
        tolerations,
        pod_annotations,
        pod_labels,
        termination_grace_period_seconds,
        metrics_exporter,
        pod_security_context,
        security_context,
        priority_class_name,
        topology_spread_constraints,
        image_pull_secrets,
        service_account_name,
    } = spec;
    let mut inputs = serde_json::json!({
        "epoch": POD_TEMPLATE_EPOCH,
        "name": name,
        "namespace": namespace,
        "serviceCode": service_code.to_string(),
        "port": port,
        // The ensemble as `-z` receives it.
        "zookeeperServers": spec.zk_connect_string(),
        "threads": threads,
        "image": image,
        "pullPolicy": pull_policy.as_str(),
        "terminationGracePeriodSeconds": termination_grace_period_seconds,
    });
    let optional = [
        (
            "zkSessionTimeoutSeconds",
            serde_json::to_value(zk_session_timeout_seconds),
        ),
        ("resources", serde_json::to_value(resources)),
        ("nodeSelector", serde_json::to_value(node_selector)),
        ("affinity", serde_json::to_value(affinity)),
        ("tolerations", serde_json::to_value(tolerations)),
        ("podAnnotations", serde_json::to_value(pod_annotations)),
        ("podLabels", serde_json::to_value(pod_labels)),
        ("metricsExporter", serde_json::to_value(metrics_exporter)),
        (
            "podSecurityContext",
            serde_json::to_value(pod_security_context),
        ),
        ("securityContext", serde_json::to_value(security_context)),
        (
            "priorityClassName",
            serde_json::to_value(priority_class_name),
        ),
        ("imagePullSecrets", serde_json::to_value(image_pull_secrets)),
        (
            "serviceAccountName",
            serde_json::to_value(service_account_name),
        ),
    ];
    for (key, value) in optional {
        let value = value.expect("spec fields serialize");
        let unset = match &value {
            serde_json::Value::Null => true,
            serde_json::Value::Array(a) => a.is_empty(),
            serde_json::Value::Object(o) => o.is_empty(),
            _ => false,
        };
        if !unset {
            inputs[key] = value;
        }
    }
    // `[]` (no constraint) differs from unset (the default spread).
    if let Some(constraints) = topology_spread_constraints {
        inputs["topologySpreadConstraints"] =
            serde_json::to_value(constraints).expect("spec fields serialize");
    }
    super::content_hash(&inputs)
}

fn statefulset_without_marks(spec: &ValidSpec, replicas: i32) -> StatefulSet {
    let pod_meta = ObjectMeta {
        labels: Some(labels::pod_labels(spec)),
        annotations: (!spec.pod_annotations.is_empty()).then(|| spec.pod_annotations.clone()),
        ..Default::default()
    };
    let mut containers = vec![memcached_container(spec)];
    if let Some(exporter) = &spec.metrics_exporter {
        containers.push(exporter_container(spec, exporter));
    }
    StatefulSet {
        metadata: object_meta(spec, spec.statefulset_name()),
        spec: Some(StatefulSetSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(labels::selector_labels(&spec.name)),
                ..Default::default()
            },
            // The headless Service gives each pod its DNS name `<pod>.<service>`.
            service_name: Some(spec.statefulset_name()),
            // Start in ordinal order, each after the previous is Ready (i.e. serving).
            pod_management_policy: Some("OrderedReady".into()),
            // The operator rolls nodes itself (one at a time, only while the rest of the ring
            // is healthy; see day2.rs), and applies memlimit/connections without any restart.
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("OnDelete".into()),
                ..Default::default()
            }),
            template: PodTemplateSpec {
                metadata: Some(pod_meta),
                spec: Some(PodSpec {
                    containers,
                    termination_grace_period_seconds: Some(spec.termination_grace_period_seconds),
                    // Cache pods need no service environment variables; a namespace with many
                    // Services would otherwise fill their environment.
                    enable_service_links: Some(false),
                    node_selector: (!spec.node_selector.is_empty())
                        .then(|| spec.node_selector.clone()),
                    affinity: spec.affinity.clone(),
                    tolerations: (!spec.tolerations.is_empty()).then(|| spec.tolerations.clone()),
                    security_context: Some(
                        spec.pod_security_context
                            .clone()
                            .unwrap_or_else(default_pod_security_context),
                    ),
                    priority_class_name: spec.priority_class_name.clone(),
                    topology_spread_constraints: Some(
                        spec.topology_spread_constraints
                            .clone()
                            .unwrap_or_else(|| default_topology_spread(&spec.name)),
                    )
                    .filter(|c| !c.is_empty()),
                    image_pull_secrets: (!spec.image_pull_secrets.is_empty())
                        .then(|| spec.image_pull_secrets.clone()),
                    service_account_name: spec.service_account_name.clone(),
                    // Cache nodes never call the Kubernetes API.
                    automount_service_account_token: Some(false),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    }
}

/// Unset `podSecurityContext`: what the Pod Security Standard "restricted" asks of a pod. The
/// uid is not root (arcus-memcached needs no privilege: its port is above 1024 and `-u` only
/// matters as root); `fsGroup` lets it write the volumes Kubernetes mounts.
pub fn default_pod_security_context() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(1000),
        run_as_group: Some(1000),
        fs_group: Some(1000),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Unset `securityContext` (every container of the pod): "restricted" again.
pub fn default_security_context() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Unset `topologySpreadConstraints`: spread the nodes evenly over Nodes and over zones, where
/// the scheduler can (`ScheduleAnyway`: more cache nodes than Nodes must still schedule).
pub fn default_topology_spread(cr_name: &str) -> Vec<TopologySpreadConstraint> {
    ["kubernetes.io/hostname", "topology.kubernetes.io/zone"]
        .into_iter()
        .map(|key| TopologySpreadConstraint {
            max_skew: 1,
            topology_key: key.into(),
            when_unsatisfiable: "ScheduleAnyway".into(),
            label_selector: Some(LabelSelector {
                match_labels: Some(labels::selector_labels(cr_name)),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect()
}

fn container_security_context(spec: &ValidSpec) -> Option<SecurityContext> {
    Some(
        spec.security_context
            .clone()
            .unwrap_or_else(default_security_context),
    )
}

/// arcus-memcached's canonical command line (ARCUS.md), built from the spec:
/// `-p` port, `-m` memlimit, `-c` connections, `-t` threads, `-z` the ensemble, `-o` the ZK
/// session timeout when set. `-u root` matters only when a user runs the node as root (the
/// default pod runs as uid 1000, where memcached ignores it); `-U 0` turns UDP off.
pub fn command(spec: &ValidSpec) -> Vec<String> {
    let mut cmd: Vec<String> = [
        arcus_paths::MEMCACHED_BIN,
        "-E",
        arcus_paths::DEFAULT_ENGINE,
        "-X",
        arcus_paths::ASCII_SCRUB,
        "-u",
        "root",
        "-D",
        ":",
        "-r",
        "-R5",
        "-U",
        "0",
        "-b",
        "8192",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    cmd.extend([
        "-p".into(),
        spec.port.to_string(),
        "-m".into(),
        spec.memlimit_mb.to_string(),
        "-c".into(),
        spec.connections.to_string(),
        "-t".into(),
        spec.threads.to_string(),
        "-z".into(),
        spec.zk_connect_string(),
    ]);
    if let Some(secs) = spec.zk_session_timeout_seconds {
        cmd.extend(["-o".into(), secs.to_string()]);
    }
    cmd
}

/// The readiness check, run by bash: ask the node `ready` on its pod IP and succeed on `READY`
/// (serving and registered in ZooKeeper; `NOT_READY` when it has left the cluster).
///
/// Limitation: `ERROR` also succeeds. That is what a stock memcached, which lacks `ready`,
/// answers (the sandbox's stand-in is one); there the probe only means "serving". The operator
/// does not rely on the probe alone: it counts a node ready only when its pod is Ready AND its
/// ephemeral znode exists in `cache_list`.
pub fn readiness_script(port: u16) -> String {
    format!(
        "exec 3<>/dev/tcp/${}/{port} && printf 'ready\\r\\n' >&3 && IFS= read -r -t 1 reply <&3 && \
         case \"${{reply%$'\\r'}}\" in READY|ERROR) exit 0;; esac; exit 1",
        env::PUBLIC_IP
    )
}

fn memcached_container(spec: &ValidSpec) -> Container {
    Container {
        name: CONTAINER_NAME.into(),
        image: Some(spec.image.clone()),
        image_pull_policy: Some(spec.pull_policy.as_str().into()),
        command: Some(command(spec)),
        env: Some(vec![
            // `<pod>.<namespace>`: stable across restarts and unique per ensemble, it keys the
            // mapping (see ValidSpec::pod_hostname). Kubernetes expands $(ARCUS_POD_NAME).
            field_env(env::POD_NAME, "metadata.name"),
            EnvVar {
                name: env::HOSTNAME_OVERWRITE.into(),
                value: Some(format!("$({}).{}", env::POD_NAME, spec.namespace)),
                ..Default::default()
            },
            // arcus-memcached's own guess (a UDP connect towards ZooKeeper) can pick the wrong interface.
            field_env(env::PUBLIC_IP, "status.podIP"),
        ]),
        ports: Some(vec![ContainerPort {
            name: Some(PORT_NAME.into()),
            container_port: spec.port.into(),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        readiness_probe: Some(Probe {
            exec: Some(ExecAction {
                command: Some(vec![
                    "/bin/bash".into(),
                    "-c".into(),
                    readiness_script(spec.port),
                ]),
            }),
            period_seconds: Some(5),
            timeout_seconds: Some(2),
            ..Default::default()
        }),
        liveness_probe: Some(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::String(PORT_NAME.into()),
                ..Default::default()
            }),
            initial_delay_seconds: Some(10),
            period_seconds: Some(10),
            failure_threshold: Some(3),
            ..Default::default()
        }),
        resources: spec.resources.clone(),
        security_context: container_security_context(spec),
        ..Default::default()
    }
}

/// A Prometheus memcached exporter that scrapes the node over the pod's loopback (containers
/// of a pod share its network namespace; arcus-memcached listens on all addresses).
fn exporter_container(spec: &ValidSpec, exporter: &MetricsExporter) -> Container {
    Container {
        name: EXPORTER_CONTAINER_NAME.into(),
        image: Some(exporter.image.clone()),
        image_pull_policy: Some(spec.pull_policy.as_str().into()),
        args: Some(vec![
            format!("--memcached.address=localhost:{}", spec.port),
            format!("--web.listen-address=:{}", exporter.port),
        ]),
        ports: Some(vec![ContainerPort {
            name: Some(METRICS_PORT_NAME.into()),
            container_port: exporter.port,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        resources: Some(k8s_openapi::api::core::v1::ResourceRequirements {
            requests: Some(BTreeMap::from([
                (
                    "cpu".to_string(),
                    k8s_openapi::apimachinery::pkg::api::resource::Quantity("10m".into()),
                ),
                (
                    "memory".to_string(),
                    k8s_openapi::apimachinery::pkg::api::resource::Quantity("16Mi".into()),
                ),
            ])),
            ..Default::default()
        }),
        security_context: container_security_context(spec),
        ..Default::default()
    }
}

fn field_env(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field_path.into(),
                api_version: Some("v1".into()),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::test_util::{assert_snapshot, seed_spec};
    use k8s_openapi::api::core::v1::{ResourceRequirements, Toleration};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn container(sts: &StatefulSet) -> &Container {
        &sts.spec
            .as_ref()
            .unwrap()
            .template
            .spec
            .as_ref()
            .unwrap()
            .containers[0]
    }

    #[test]
    fn seed_statefulset_snapshot() {
        assert_snapshot("statefulset_seed", &statefulset(&seed_spec(), 3));
    }

    #[test]
    fn full_statefulset_snapshot() {
        let mut spec = seed_spec();
        spec.zk_session_timeout_seconds = Some(60);
        spec.resources = Some(ResourceRequirements {
            limits: Some(BTreeMap::from([(
                "memory".to_string(),
                Quantity("256Mi".into()),
            )])),
            requests: Some(BTreeMap::from([(
                "cpu".to_string(),
                Quantity("100m".into()),
            )])),
            ..Default::default()
        });
        spec.node_selector.insert("disk".into(), "ssd".into());
        spec.tolerations.push(Toleration {
            key: Some("dedicated".into()),
            operator: Some("Equal".into()),
            value: Some("cache".into()),
            effect: Some("NoSchedule".into()),
            ..Default::default()
        });
        spec.affinity = Some(
            serde_json::from_value(serde_json::json!({
                "podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
                    "weight": 100,
                    "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": {"app.kubernetes.io/instance": "test"}}}
                }]}
            }))
            .unwrap(),
        );
        spec.pod_annotations
            .insert("example.com/note".into(), "cache".into());
        spec.pod_labels.insert("team".into(), "cache".into());
        spec.termination_grace_period_seconds = 60;
        spec.metrics_exporter = Some(MetricsExporter {
            image: "prom/memcached-exporter:v0.15.3".into(),
            port: 9150,
            interval: "30s".into(),
        });
        assert_snapshot("statefulset_full", &statefulset(&spec, 5));
    }

    #[test]
    fn command_line_is_built_from_configuration() {
        let mut spec = seed_spec();
        assert_eq!(
            command(&spec).join(" "),
            "/arcus/bin/memcached -E /arcus/lib/default_engine.so -X /arcus/lib/ascii_scrub.so -u root -D : -r -R5 \
             -U 0 -b 8192 -p 11211 -m 100 -c 1000 -t 10 -z 1.2.3.4:2181"
        );
        spec.port = 11300;
        spec.memlimit_mb = 2048;
        spec.connections = 4096;
        spec.threads = 8;
        spec.zookeeper_servers = vec![
            crate::validate::ZkServer {
                host: "zk-0.zk".into(),
                port: 2181,
            },
            crate::validate::ZkServer {
                host: "zk-1.zk".into(),
                port: 2182,
            },
        ];
        spec.zk_session_timeout_seconds = Some(45);
        let cmd = command(&spec);
        let tail: Vec<&str> = cmd[15..].iter().map(String::as_str).collect();
        assert_eq!(
            tail,
            [
                "-p",
                "11300",
                "-m",
                "2048",
                "-c",
                "4096",
                "-t",
                "8",
                "-z",
                "zk-0.zk:2181,zk-1.zk:2182",
                "-o",
                "45"
            ]
        );
    }

    #[test]
    fn container_env_ports_image() {
        let spec = seed_spec();
        let sts = statefulset(&spec, 3);
        let c = container(&sts);
        assert_eq!(c.name, "arcus-memcached");
        assert_eq!(c.image.as_deref(), Some("jam2in/arcus-memcached:1.11.7"));
        assert_eq!(c.image_pull_policy.as_deref(), Some("Always"));
        let env = c
            .env
            .as_ref()
            .unwrap()
            .iter()
            .map(|e| {
                let source = match &e.value_from {
                    Some(v) => v.field_ref.as_ref().unwrap().field_path.clone(),
                    None => e.value.clone().unwrap(),
                };
                (e.name.clone(), source)
            })
            .collect::<Vec<_>>();
        let ns = spec.namespace.clone();
        assert_eq!(
            env,
            [
                ("ARCUS_POD_NAME".to_string(), "metadata.name".to_string()),
                (
                    "ARCUS_CACHE_HOSTNAME_OVERWRITE".to_string(),
                    format!("$(ARCUS_POD_NAME).{ns}")
                ),
                (
                    "ARCUS_CACHE_PUBLIC_IP".to_string(),
                    "status.podIP".to_string()
                )
            ]
        );
        let port = &c.ports.as_ref().unwrap()[0];
        assert_eq!(
            (port.name.as_deref(), port.container_port),
            (Some("memcached"), 11211)
        );
    }

    #[test]
    fn probes() {
        let sts = statefulset(&seed_spec(), 3);
        let c = container(&sts);
        let r = c.readiness_probe.as_ref().unwrap();
        let cmd = r.exec.as_ref().unwrap().command.as_ref().unwrap();
        assert_eq!(&cmd[..2], ["/bin/bash", "-c"]);
        assert!(
            cmd[2].contains("/dev/tcp/$ARCUS_CACHE_PUBLIC_IP/11211"),
            "{}",
            cmd[2]
        );
        assert!(cmd[2].contains(r"printf 'ready\r\n'"), "{}", cmd[2]);
        assert!(cmd[2].contains("READY|ERROR) exit 0"), "{}", cmd[2]);
        assert_eq!((r.period_seconds, r.timeout_seconds), (Some(5), Some(2)));
        let l = c.liveness_probe.as_ref().unwrap();
        assert_eq!(
            l.tcp_socket.as_ref().unwrap().port,
            IntOrString::String("memcached".into())
        );
        assert_eq!(
            (
                l.initial_delay_seconds,
                l.period_seconds,
                l.failure_threshold
            ),
            (Some(10), Some(10), Some(3))
        );
    }

    #[test]
    fn readiness_script_answers_like_the_probe_should() {
        // Runs the script against a fake node on 127.0.0.1 answering each reply in turn.
        if std::process::Command::new("/bin/bash")
            .arg("-c")
            .arg("true")
            .status()
            .is_err()
        {
            return;
        }
        use std::io::{BufRead, BufReader, Write};
        for (reply, ok) in [
            ("READY", true),
            ("ERROR", true),
            ("NOT_READY", false),
            ("", false),
        ] {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            let server = std::thread::spawn(move || {
                let (mut s, _) = listener.accept().unwrap();
                let mut line = String::new();
                BufReader::new(s.try_clone().unwrap())
                    .read_line(&mut line)
                    .unwrap();
                assert_eq!(line, "ready\r\n");
                if !reply.is_empty() {
                    write!(s, "{reply}\r\n").unwrap();
                }
            });
            let status = std::process::Command::new("/bin/bash")
                .arg("-c")
                .arg(readiness_script(port))
                .env("ARCUS_CACHE_PUBLIC_IP", "127.0.0.1")
                .status()
                .unwrap();
            server.join().unwrap();
            assert_eq!(status.success(), ok, "reply {reply:?}");
        }
    }

    #[test]
    fn statefulset_shape() {
        let sts = statefulset(&seed_spec(), 5);
        let s = sts.spec.as_ref().unwrap();
        assert_eq!(s.replicas, Some(5));
        assert_eq!(s.service_name.as_deref(), Some("test-arcus-mc"));
        assert_eq!(s.pod_management_policy.as_deref(), Some("OrderedReady"));
        assert_eq!(
            s.update_strategy.as_ref().unwrap().type_.as_deref(),
            Some("OnDelete")
        );
        assert_eq!(
            s.selector.match_labels,
            Some(labels::selector_labels("test"))
        );
        let pod = s.template.spec.as_ref().unwrap();
        assert_eq!(pod.termination_grace_period_seconds, Some(30));
        assert_eq!(
            pod.hostname, None,
            "a fixed hostname would give every pod the same one"
        );
        // Left to the API server: the operator neither sets nor depends on them.
        assert_eq!(s.min_ready_seconds, None);
        assert!(s.persistent_volume_claim_retention_policy.is_none() && s.ordinals.is_none());
        let labels = s
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .as_ref()
            .unwrap();
        assert_eq!(
            labels.get("jam2in.com/service-code").map(String::as_str),
            Some("test")
        );
    }

    fn restart_hash_of(change: impl FnOnce(&mut ValidSpec)) -> String {
        let mut spec = seed_spec();
        change(&mut spec);
        restart_hash(&spec)
    }

    /// The release notes' record: a changed hash of the seed's cache pods means that upgrading
    /// the operator restarts every cache node of every cluster.
    #[test]
    fn restart_hash_is_recorded_in_upgrading_notes() {
        let notes = include_str!("../../../../docs/UPGRADING.md");
        let recorded = |what: &str| {
            let marker = format!("restart-hash of the {what}: `");
            let at = notes
                .find(&marker)
                .unwrap_or_else(|| panic!("docs/UPGRADING.md has no line with {marker:?}"));
            notes[at + marker.len()..]
                .split('`')
                .next()
                .unwrap()
                .to_string()
        };
        let mut full = seed_spec();
        full.zk_session_timeout_seconds = Some(60);
        full.pod_labels.insert("team".into(), "cache".into());
        full.priority_class_name = Some("cache".into());
        for (what, spec) in [("seed sample", seed_spec()), ("full sample", full)] {
            let hash = restart_hash(&spec);
            assert_eq!(
                recorded(what),
                hash,
                "the restart-hash of the {what} changed: upgrading the operator would restart every cache node. \
                 If that is intended (POD_TEMPLATE_EPOCH raised, or a new field hashed when set), add a release note \
                 saying so to docs/UPGRADING.md and record the new hash there; otherwise keep the hash's inputs as they were"
            );
        }
    }

    #[test]
    fn restart_hash_covers_what_shapes_a_pod_and_nothing_live() {
        let seed = restart_hash(&seed_spec());
        // Applied to running nodes, or no part of a pod.
        assert_eq!(restart_hash_of(|s| s.memlimit_mb = 200), seed);
        assert_eq!(restart_hash_of(|s| s.connections = 2000), seed);
        assert_eq!(restart_hash_of(|s| s.replicas = 7), seed);
        assert_eq!(restart_hash_of(|s| s.generation = Some(9)), seed);
        // Spelled out but empty is the same as unset (a new optional field keeps old hashes).
        assert_eq!(restart_hash_of(|s| s.image_pull_secrets = vec![]), seed);
        for (what, changed) in [
            ("image", restart_hash_of(|s| s.image = "arcus:2".into())),
            ("threads", restart_hash_of(|s| s.threads = 4)),
            (
                "pod security context",
                restart_hash_of(|s| {
                    s.pod_security_context = Some(PodSecurityContext {
                        run_as_user: Some(2000),
                        ..Default::default()
                    })
                }),
            ),
            (
                "security context",
                restart_hash_of(|s| s.security_context = Some(default_security_context())),
            ),
            (
                "no spread constraint",
                restart_hash_of(|s| s.topology_spread_constraints = Some(vec![])),
            ),
            (
                "service account",
                restart_hash_of(|s| s.service_account_name = Some("cache".into())),
            ),
        ] {
            assert_ne!(changed, seed, "{what} must restart the nodes");
        }
    }

    #[test]
    fn defaults_pass_pod_security_restricted() {
        let mut spec = seed_spec();
        spec.metrics_exporter = Some(MetricsExporter {
            image: "prom/memcached-exporter:v0.15.3".into(),
            port: 9150,
            interval: "30s".into(),
        });
        let sts = statefulset(&spec, 3);
        let pod = sts.spec.unwrap().template.spec.unwrap();
        let psc = pod.security_context.unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_ne!(psc.run_as_user, Some(0));
        assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
        assert_eq!(pod.containers.len(), 2);
        for c in &pod.containers {
            let sc = c.security_context.as_ref().unwrap();
            assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
            assert_eq!(
                sc.capabilities.as_ref().unwrap().drop,
                Some(vec!["ALL".to_string()])
            );
        }
        assert!(
            pod.volumes.is_none(),
            "restricted allows only some volume types"
        );
        let spread = pod.topology_spread_constraints.unwrap();
        let keys: Vec<&str> = spread.iter().map(|c| c.topology_key.as_str()).collect();
        assert_eq!(
            keys,
            ["kubernetes.io/hostname", "topology.kubernetes.io/zone"]
        );
        // Opting out of the default spread.
        let mut none = seed_spec();
        none.topology_spread_constraints = Some(vec![]);
        let pod = statefulset(&none, 3).spec.unwrap().template.spec.unwrap();
        assert!(pod.topology_spread_constraints.is_none());
    }
}
