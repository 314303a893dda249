//! The sandbox node agent (sandbox/node-agent) against the real control plane: pods run as
//! local processes (checked in /proc through the PID in `containerID: sandbox://<pid>`), each in
//! its own network namespace and IP, with probes, restarts, volumes, env and graceful deletion.
//! Each test uses its own namespace; every wait is bounded.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, ContainerStatus, Event, Pod};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::Api;
use test_support::sandbox::{in_namespace, pod_ready, Sandbox};
use test_support::wait_until;

const START: Duration = Duration::from_secs(60);

fn pods(sb: &Sandbox, ns: &str) -> Api<Pod> {
    Api::namespaced(sb.client.clone(), ns)
}

async fn create_pod(sb: &Sandbox, ns: &str, pod: serde_json::Value) -> anyhow::Result<Pod> {
    let pod: Pod = serde_json::from_value(pod)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match pods(sb, ns).create(&PostParams::default(), &pod).await {
            // The ServiceAccount admission plugin's cache has not seen `default` yet.
            Err(kube::Error::Api(e))
                if e.message.contains("service account") && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => return Ok(other?),
        }
    }
}

fn busybox_pod(name: &str, container: serde_json::Value) -> serde_json::Value {
    let mut c = container;
    c["name"] = "c".into();
    c["image"] = "busybox:1.36".into();
    serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": [c], "terminationGracePeriodSeconds": 10}
    })
}

fn status_of(p: &Pod) -> Option<ContainerStatus> {
    p.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()
        .cloned()
}

fn pid_of(cs: &ContainerStatus) -> Option<u32> {
    cs.state.as_ref()?.running.as_ref()?;
    cs.container_id
        .as_deref()?
        .strip_prefix("sandbox://")?
        .parse()
        .ok()
}

fn proc_alive(pid: u32) -> bool {
    // A zombie is not alive (the agent reaps its children promptly anyway).
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            stat.rsplit(')')
                .next()
                .and_then(|s| s.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

fn proc_env(pid: u32) -> Vec<(String, String)> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter_map(|kv| {
            let s = String::from_utf8_lossy(kv);
            s.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

/// Waits until the pod's (first) container runs; returns the pod and the container's PID.
async fn wait_running(sb: &Sandbox, ns: &str, name: &str) -> anyhow::Result<(Pod, u32)> {
    let api = pods(sb, ns);
    wait_until(START, &format!("pod {ns}/{name} running"), || {
        let api = api.clone();
        async move {
            let p = api.get_opt(name).await.ok()??;
            let pid = pid_of(&status_of(&p)?)?;
            Some((p, pid))
        }
    })
    .await
}

#[tokio::test]
async fn deployment_runs_processes_and_scaling_down_stops_them() -> anyhow::Result<()> {
    in_namespace("agent-deploy", |sb, ns| async move {
        let deploy: Deployment = serde_json::from_value(serde_json::json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "sleeper"},
            "spec": {
                "replicas": 3,
                "selector": {"matchLabels": {"app": "sleeper"}},
                "template": {
                    "metadata": {"labels": {"app": "sleeper"}},
                    "spec": {"terminationGracePeriodSeconds": 10,
                             "containers": [{"name": "main", "image": "busybox", "command": ["sleep", "3600"]}]}
                }
            }
        }))?;
        let deployments: Api<Deployment> = Api::namespaced(sb.client.clone(), &ns);
        let t0 = Instant::now();
        deployments.create(&PostParams::default(), &deploy).await?;
        let api = pods(sb, &ns);
        let running = wait_until(START, "3 sleeper pods running and ready", || {
            let api = api.clone();
            async move {
                let list = api
                    .list(&ListParams::default().labels("app=sleeper"))
                    .await
                    .ok()?;
                let mut out = Vec::new();
                for p in &list.items {
                    if !pod_ready(p) {
                        return None;
                    }
                    let pid = pid_of(&status_of(p)?)?;
                    let ip = p.status.as_ref()?.pod_ip.clone()?;
                    out.push((p.metadata.name.clone()?, pid, ip));
                }
                (out.len() == 3).then_some(out)
            }
        })
        .await?;
        eprintln!(
            "3 replicas running and ready {:?} after create",
            t0.elapsed()
        );
        let ips: BTreeSet<&str> = running.iter().map(|(_, _, ip)| ip.as_str()).collect();
        assert_eq!(ips.len(), 3, "distinct pod IPs: {running:?}");
        for (name, pid, ip) in &running {
            assert!(
                ip.starts_with("10.244.") && !ip.starts_with("10.244.0."),
                "{name}: pod IP {ip} not in a Node's pod range 10.244.<n>.0/24"
            );
            assert!(proc_alive(*pid), "{name}: process {pid} not alive");
            let cmdline =
                std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            assert!(
                cmdline.starts_with("sleep\x003600"),
                "{name}: /proc/{pid}/cmdline is {cmdline:?}"
            );
        }

        deployments
            .patch(
                "sleeper",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({"spec": {"replicas": 1}})),
            )
            .await?;
        let survivors = wait_until(
            Duration::from_secs(60),
            "scale to 1: 2 pods and processes gone",
            || {
                let api = api.clone();
                let running = running.clone();
                async move {
                    let list = api
                        .list(&ListParams::default().labels("app=sleeper"))
                        .await
                        .ok()?;
                    let alive: Vec<u32> = running
                        .iter()
                        .map(|r| r.1)
                        .filter(|pid| proc_alive(*pid))
                        .collect();
                    (list.items.len() == 1 && alive.len() == 1).then_some(alive)
                }
            },
        )
        .await?;
        let list = api
            .list(&ListParams::default().labels("app=sleeper"))
            .await?;
        let remaining_pid = pid_of(&status_of(&list.items[0]).expect("status")).expect("running");
        assert_eq!(
            survivors,
            vec![remaining_pid],
            "the process left is the remaining pod's"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn failing_readiness_probe_keeps_pod_running_but_not_ready() -> anyhow::Result<()> {
    in_namespace("agent-ready", |sb, ns| async move {
        let mut pod = busybox_pod(
            "notready",
            serde_json::json!({
                "command": ["sleep", "3600"],
                "readinessProbe": {"exec": {"command": ["false"]}, "periodSeconds": 1}
            }),
        );
        // A second container whose probe passes shows that probes have run.
        pod["spec"]["containers"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
                "name": "control", "image": "busybox", "command": ["sleep", "3600"],
                "readinessProbe": {"exec": {"command": ["true"]}, "periodSeconds": 1}
            }));
        create_pod(sb, &ns, pod).await?;
        let api = pods(sb, &ns);
        wait_until(START, "control container ready", || {
            let api = api.clone();
            async move {
                let p = api.get_opt("notready").await.ok()??;
                let cs = p.status?.container_statuses?;
                cs.iter()
                    .any(|c| c.name == "control" && c.ready)
                    .then_some(())
            }
        })
        .await?;
        // Observe for a few probe periods: never Ready, always Running.
        let until = Instant::now() + Duration::from_secs(4);
        while Instant::now() < until {
            let p = api.get("notready").await?;
            assert_eq!(
                p.status.as_ref().and_then(|s| s.phase.as_deref()),
                Some("Running")
            );
            assert!(
                !pod_ready(&p),
                "pod became Ready although its readiness probe fails"
            );
            let c = p
                .status
                .unwrap()
                .container_statuses
                .unwrap()
                .into_iter()
                .find(|c| c.name == "c")
                .unwrap();
            assert!(!c.ready);
            assert!(
                c.state.unwrap().running.is_some(),
                "the not-ready container keeps running"
            );
            assert_eq!(c.restart_count, 0);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn exiting_container_is_restarted_with_backoff() -> anyhow::Result<()> {
    in_namespace("agent-crash", |sb, ns| async move {
        create_pod(
            sb,
            &ns,
            busybox_pod(
                "crasher",
                serde_json::json!({"command": ["sh", "-c", "echo bye; exit 3"]}),
            ),
        )
        .await?;
        let api = pods(sb, &ns);
        let cs = wait_until(
            START,
            "restartCount >= 2 in CrashLoopBackOff with last exit 3",
            || {
                let api = api.clone();
                async move {
                    let p = api.get_opt("crasher").await.ok()??;
                    let cs = status_of(&p)?;
                    let last = cs.last_state.as_ref()?.terminated.as_ref()?;
                    let waiting = cs.state.as_ref()?.waiting.as_ref()?;
                    (cs.restart_count >= 2
                        && last.exit_code == 3
                        && waiting.reason.as_deref() == Some("CrashLoopBackOff"))
                    .then_some(cs)
                }
            },
        )
        .await?;
        let last = cs.last_state.unwrap().terminated.unwrap();
        assert_eq!(last.reason.as_deref(), Some("Error"));
        let log = std::fs::read_to_string(sb.dir.join(format!("logs/pods/{ns}_crasher_c.log")))?;
        assert!(
            log.matches("bye").count() >= 2,
            "each run appends to the container log: {log:?}"
        );
        let events: Api<Event> = Api::namespaced(sb.client.clone(), &ns);
        wait_until(
            Duration::from_secs(10),
            "a BackOff event for the pod",
            || {
                let events = events.clone();
                async move {
                    let list = events.list(&ListParams::default()).await.ok()?;
                    list.items
                        .iter()
                        .any(|e| {
                            e.reason.as_deref() == Some("BackOff")
                                && e.involved_object.name.as_deref() == Some("crasher")
                        })
                        .then_some(())
                }
            },
        )
        .await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn failing_liveness_probe_restarts_the_container() -> anyhow::Result<()> {
    in_namespace("agent-live", |sb, ns| async move {
        create_pod(
            sb,
            &ns,
            busybox_pod(
                "unlively",
                serde_json::json!({
                    "command": ["sleep", "3600"],
                    // Nothing listens on port 9 (discard) of the pod's IP.
                    "livenessProbe": {"tcpSocket": {"port": 9}, "periodSeconds": 1, "failureThreshold": 2}
                }),
            ),
        )
        .await?;
        let (_, first_pid) = wait_running(sb, &ns, "unlively").await?;
        let api = pods(sb, &ns);
        let last = wait_until(START, "a restart after liveness failures", || {
            let api = api.clone();
            async move {
                let cs = status_of(&api.get_opt("unlively").await.ok()??)?;
                let last = cs.last_state?.terminated?;
                (cs.restart_count >= 1).then_some(last)
            }
        })
        .await?;
        assert!(
            last.message.unwrap_or_default().contains("liveness"),
            "lastState says why it was killed"
        );
        assert_eq!(last.exit_code, 143, "sleep killed by SIGTERM");
        assert!(!proc_alive(first_pid), "the first process is gone");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn unknown_image_reports_err_image_pull() -> anyhow::Result<()> {
    in_namespace("agent-image", |sb, ns| async move {
        create_pod(
            sb,
            &ns,
            serde_json::json!({
                "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "nope"},
                "spec": {"containers": [{"name": "c", "image": "example.org/no-such-image:1.0"}]}
            }),
        )
        .await?;
        let api = pods(sb, &ns);
        let (phase, cs) = wait_until(START, "ErrImagePull", || {
            let api = api.clone();
            async move {
                let p = api.get_opt("nope").await.ok()??;
                let cs = status_of(&p)?;
                let w = cs.state.as_ref()?.waiting.as_ref()?;
                (w.reason.as_deref() == Some("ErrImagePull"))
                    .then(|| (p.status.and_then(|s| s.phase), cs))
            }
        })
        .await?;
        assert_eq!(phase.as_deref(), Some("Pending"));
        assert_eq!(cs.restart_count, 0);
        let msg = cs
            .state
            .unwrap()
            .waiting
            .unwrap()
            .message
            .unwrap_or_default();
        for needle in [
            "example.org/no-such-image:1.0",
            "images.yaml",
            "busybox",
            "arcus-memcached",
        ] {
            assert!(msg.contains(needle), "message {msg:?} lacks {needle:?}");
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn config_map_volume_is_mounted_privately_at_mount_path() -> anyhow::Result<()> {
    in_namespace("agent-cm", |sb, ns| async move {
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cfg"},
            "data": {"greeting": format!("hello-{ns}")}
        }))?;
        Api::<ConfigMap>::namespaced(sb.client.clone(), &ns)
            .create(&PostParams::default(), &cm)
            .await?;
        let mount = format!("/var/tmp/arcus-e2e-mounts/{ns}");
        let mut pod = busybox_pod(
            "reader",
            serde_json::json!({
                "command": ["sh", "-c", format!("cat {mount}/greeting; echo; sleep 3600")],
                "volumeMounts": [{"name": "cfg", "mountPath": mount, "readOnly": true}],
                "readinessProbe": {"exec": {"command": ["cat", format!("{mount}/greeting")]}, "periodSeconds": 1}
            }),
        );
        pod["spec"]["volumes"] = serde_json::json!([{"name": "cfg", "configMap": {"name": "cfg"}}]);
        create_pod(sb, &ns, pod).await?;
        let api = pods(sb, &ns);
        wait_until(
            START,
            "reader ready (its exec probe reads the file)",
            || {
                let api = api.clone();
                async move {
                    api.get_opt("reader")
                        .await
                        .ok()?
                        .filter(pod_ready)
                        .map(|_| ())
                }
            },
        )
        .await?;
        let log_path = sb.dir.join(format!("logs/pods/{ns}_reader_c.log"));
        let want = format!("hello-{ns}");
        wait_until(
            Duration::from_secs(10),
            "the process printed the file",
            || {
                let text = std::fs::read_to_string(&log_path).unwrap_or_default();
                let ok = text.contains(&want);
                async move { ok.then_some(()) }
            },
        )
        .await?;
        // The mount is private to the pod: the host sees only the (empty) mount point.
        let host_entries = std::fs::read_dir(&mount).map(|d| d.count()).unwrap_or(0);
        assert_eq!(
            host_entries, 0,
            "{mount} on the host should be an empty mount point"
        );
        api.delete("reader", &DeleteParams::default()).await?;
        wait_until(Duration::from_secs(30), "reader gone", || {
            let api = api.clone();
            async move { matches!(api.get_opt("reader").await, Ok(None)).then_some(()) }
        })
        .await?;
        let _ = std::fs::remove_dir(&mount);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn env_field_refs_expansion_and_service_account_kubeconfig() -> anyhow::Result<()> {
    in_namespace("agent-env", |sb, ns| async move {
        create_pod(
            sb,
            &ns,
            busybox_pod(
                "envy",
                serde_json::json!({
                    "command": ["sh", "-c", "echo addr=$(MY_IP):11211; sleep 3600"],
                    "env": [
                        {"name": "MY_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                        {"name": "MY_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                        {"name": "MY_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                        {"name": "ADDR", "value": "$(MY_IP):11211"},
                        {"name": "LITERAL", "value": "$$(MY_IP)"}
                    ]
                }),
            ),
        )
        .await?;
        let (pod, pid) = wait_running(sb, &ns, "envy").await?;
        let ip = pod.status.and_then(|s| s.pod_ip).expect("podIP");
        let env = proc_env(pid);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(get("MY_IP"), Some(ip.clone()));
        assert_eq!(get("MY_NAME").as_deref(), Some("envy"));
        assert_eq!(get("MY_NS"), Some(ns.clone()));
        assert_eq!(get("ADDR"), Some(format!("{ip}:11211")));
        assert_eq!(get("LITERAL").as_deref(), Some("$(MY_IP)"));
        assert_eq!(get("HOSTNAME").as_deref(), Some("envy"));
        let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))?;
        assert!(
            cmdline.contains(&format!("echo addr={ip}:11211")),
            "command expanded: {cmdline:?}"
        );

        // The pod's kubeconfig carries its ServiceAccount's token: exactly that identity's RBAC.
        let kubeconfig = get("KUBECONFIG").expect("KUBECONFIG set");
        let client = test_support::sandbox::client_from(std::path::Path::new(&kubeconfig)).await?;
        let err = Api::<Pod>::namespaced(client, &ns)
            .list(&ListParams::default())
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&format!("system:serviceaccount:{ns}:default")),
            "{text}"
        );
        assert!(text.contains("forbidden"), "{text}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn deleting_a_pod_sends_sigterm_and_removes_it() -> anyhow::Result<()> {
    in_namespace("agent-delete", |sb, ns| async move {
        let marker = std::env::temp_dir().join(format!("arcus-e2e-term-{ns}"));
        let _ = std::fs::remove_file(&marker);
        create_pod(
            sb,
            &ns,
            busybox_pod(
                "trapper",
                serde_json::json!({
                    "command": ["sh", "-c", "trap 'echo got-term > $FILE; exit 0' TERM; while true; do sleep 0.1; done"],
                    "env": [{"name": "FILE", "value": marker.to_string_lossy()}]
                }),
            ),
        )
        .await?;
        let (_, pid) = wait_running(sb, &ns, "trapper").await?;
        let api = pods(sb, &ns);
        let t0 = Instant::now();
        api.delete("trapper", &DeleteParams::default()).await?;
        wait_until(Duration::from_secs(30), "pod object gone", || {
            let api = api.clone();
            async move { matches!(api.get_opt("trapper").await, Ok(None)).then_some(()) }
        })
        .await?;
        eprintln!("pod gone {:?} after delete", t0.elapsed());
        assert_eq!(
            std::fs::read_to_string(&marker).unwrap_or_default().trim(),
            "got-term"
        );
        assert!(!proc_alive(pid), "process {pid} still alive");
        let _ = std::fs::remove_file(&marker);
        Ok(())
    })
    .await
}
