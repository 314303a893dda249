//! The StatefulSet `<name>-arcus-mc`: one arcus-memcached per pod, started with ARCUS's
//! canonical command line and told its stable hostname and its pod IP, so the node finds its
//! ZooKeeper mapping (`<pod-hostname>:<port>`) and registers `<pod IP>:<port>-<hostname>`.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetSpec, StatefulSetUpdateStrategy};
use k8s_openapi::api::core::v1::{
    Container, ContainerPort, EnvVar, EnvVarSource, ExecAction, ObjectFieldSelector, PodSpec,
    PodTemplateSpec, Probe, TCPSocketAction,
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
    // Mark the template: what a restart would change (memlimit and connections excluded: they
    // are applied to running nodes), and the live configuration its pods start with.
    let mut plain = spec.clone();
    plain.memlimit_mb = 0;
    plain.connections = 0;
    let restart_hash = super::content_hash(
        &statefulset_without_marks(&plain, 0)
            .spec
            .map(|s| s.template),
    );
    let started = crate::day2::LiveConfig {
        memlimit_mb: spec.memlimit_mb,
        connections: spec.connections,
    };
    let template = &mut sts.spec.as_mut().expect("spec").template;
    let annotations = template
        .metadata
        .get_or_insert_with(Default::default)
        .annotations
        .get_or_insert_with(Default::default);
    annotations.insert(crate::day2::RESTART_HASH.into(), restart_hash);
    annotations.insert(crate::day2::STARTED_CONFIG.into(), started.to_string());
    sts
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
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    }
}

/// arcus-memcached's canonical command line (ARCUS.md), built from the spec:
/// `-p` port, `-m` memlimit, `-c` connections, `-t` threads, `-z` the ensemble, `-o` the ZK
/// session timeout when set. `-u root` because the image runs as root; `-U 0` turns UDP off.
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
}
