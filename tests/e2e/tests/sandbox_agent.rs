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

/// An OCI image layout written for one test into the sandbox's image dir
/// (`<repo>/target/images/<name>`), removed on drop.
struct TestLayout {
    dir: std::path::PathBuf,
    name: String,
}

impl Drop for TestLayout {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn sh(cmd: &mut std::process::Command) -> anyhow::Result<String> {
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// Writes `data` as a blob; returns (`sha256:<hex>`, size).
fn put_blob(layout: &std::path::Path, data: &[u8]) -> anyhow::Result<(String, usize)> {
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs)?;
    let tmp = blobs.join("incoming");
    std::fs::write(&tmp, data)?;
    let hex = sh(std::process::Command::new("sha256sum").arg(&tmp))?
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    std::fs::rename(&tmp, blobs.join(&hex))?;
    Ok((format!("sha256:{hex}"), data.len()))
}

impl TestLayout {
    /// A layout `<name>` with no tags yet.
    fn new(sb: &Sandbox, name: &str) -> TestLayout {
        TestLayout {
            dir: sb.repo.join("target/images").join(name),
            name: name.to_string(),
        }
    }

    /// Adds tag `tag`: one gzip layer with the host's dash as /bin/sh (and the libraries ldd
    /// names), a marker file, a FIFO to block on, /etc/passwd; `config` as the image config's
    /// process part. Returns the manifest digest. The index is written last, as an image
    /// builder would, so the agent never sees a half-written tag.
    fn add_tag(&self, tag: &str, config: serde_json::Value) -> anyhow::Result<String> {
        let stage = std::env::temp_dir().join(format!("arcus-e2e-layer-{}-{tag}", self.name));
        let _ = std::fs::remove_dir_all(&stage);
        let dash = std::fs::canonicalize("/bin/sh")?;
        let mut files = vec![(std::path::PathBuf::from("bin/sh"), dash.clone())];
        for line in sh(std::process::Command::new("ldd").arg(&dash))?.lines() {
            if let Some(p) = line.split_whitespace().find(|w| w.starts_with('/')) {
                files.push((p.trim_start_matches('/').into(), p.into()));
            }
        }
        for (rel, src) in &files {
            let dst = stage.join(rel);
            std::fs::create_dir_all(dst.parent().expect("parent"))?;
            std::fs::copy(src, &dst)?;
        }
        std::fs::create_dir_all(stage.join("etc"))?;
        std::fs::write(
            stage.join("marker"),
            format!("image {} tag {tag}\n", self.name),
        )?;
        std::fs::write(
            stage.join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nnonroot:x:65532:65532::/home/nonroot:/bin/sh\n",
        )?;
        sh(std::process::Command::new("mkfifo").arg(stage.join("block")))?;
        let layer_file = stage.with_extension("tar.gz");
        sh(std::process::Command::new("tar")
            .args(["--owner=0", "--group=0", "--numeric-owner", "-czf"])
            .arg(&layer_file)
            .arg("-C")
            .arg(&stage)
            .arg("."))?;
        let layer = std::fs::read(&layer_file)?;
        let _ = std::fs::remove_dir_all(&stage);
        let _ = std::fs::remove_file(&layer_file);
        std::fs::create_dir_all(&self.dir)?;
        std::fs::write(
            self.dir.join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )?;
        let (ld, ls) = put_blob(&self.dir, &layer)?;
        let cfg = serde_json::json!({"architecture": "amd64", "os": "linux", "config": config,
            "rootfs": {"type": "layers", "diff_ids": []}});
        let (cd, cs) = put_blob(&self.dir, cfg.to_string().as_bytes())?;
        let manifest = serde_json::json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": ld, "size": ls}]
        });
        let (md, ms) = put_blob(&self.dir, manifest.to_string().as_bytes())?;
        let index_path = self.dir.join("index.json");
        let mut index: serde_json::Value = std::fs::read(&index_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_else(|| serde_json::json!({"schemaVersion": 2, "manifests": []}));
        index["manifests"]
            .as_array_mut()
            .expect("manifests")
            .push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms,
                "annotations": {"org.opencontainers.image.ref.name": tag}
            }));
        let tmp = self.dir.join("index.json.tmp");
        std::fs::write(&tmp, index.to_string())?;
        std::fs::rename(tmp, index_path)?;
        Ok(md)
    }
}

fn proc_status_field(pid: u32, field: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_string())
        })
}

/// Waits for the first container of pod `name` to wait with `reason`; returns its message.
async fn wait_waiting(sb: &Sandbox, ns: &str, name: &str, reason: &str) -> anyhow::Result<String> {
    let api = pods(sb, ns);
    wait_until(
        START,
        &format!("pod {ns}/{name} waiting with {reason}"),
        || {
            let api = api.clone();
            async move {
                let p = api.get_opt(name).await.ok()??;
                let w = status_of(&p)?.state?.waiting?;
                (w.reason.as_deref() == Some(reason)).then(|| w.message.unwrap_or_default())
            }
        },
    )
    .await
}

#[tokio::test]
async fn oci_layout_image_runs_in_its_own_root_as_its_user() -> anyhow::Result<()> {
    in_namespace("agent-oci", |sb, ns| async move {
        let layout = TestLayout::new(sb, &format!("e2e-{ns}"));
        let digest = layout.add_tag(
            "1",
            serde_json::json!({
                "User": "65532:65532", "WorkingDir": "/home/nonroot",
                "Entrypoint": ["/bin/sh", "-c"],
                "Cmd": ["echo started in $(pwd); echo hi > /scratch/f && echo scratch-ok; \
                         if echo x > /rootfile; then echo root-writable; fi; read x < /block"],
                "Env": ["PATH=/bin", "FROM_IMAGE=yes", "OVERRIDDEN=image"]
            }),
        )?;
        let image = format!("registry.sandbox.test:5000/e2e/{}:1", layout.name);
        let pod = |name: &str, image: &str| {
            serde_json::json!({
                "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
                "spec": {
                    "terminationGracePeriodSeconds": 2,
                    "securityContext": {"runAsNonRoot": true, "fsGroup": 2000},
                    "volumes": [{"name": "scratch", "emptyDir": {}}],
                    "containers": [{
                        "name": "c", "image": image, "imagePullPolicy": "IfNotPresent",
                        "env": [{"name": "OVERRIDDEN", "value": "pod"}],
                        "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
                        "securityContext": {"readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false,
                                            "capabilities": {"drop": ["ALL"]}}
                    }]
                }
            })
        };
        create_pod(sb, &ns, pod("tiny", &image)).await?;
        let (p, pid) = wait_running(sb, &ns, "tiny").await?;
        let cs = status_of(&p).expect("status");
        assert_eq!(cs.image, image, "image as given");
        assert_eq!(cs.image_id, format!("{}@{digest}", layout.name));
        // Its root is the image's: the marker is there, the host's os-release is not.
        let root = std::path::PathBuf::from(format!("/proc/{pid}/root"));
        assert_eq!(
            std::fs::read_to_string(root.join("marker"))?,
            format!("image {} tag 1\n", layout.name)
        );
        assert!(!root.join("etc/os-release").exists());
        assert!(std::path::Path::new("/etc/os-release").exists() || !root.join("bin/bash").exists());
        assert_eq!(proc_status_field(pid, "Uid").as_deref(), Some("65532\t65532\t65532\t65532"));
        assert_eq!(proc_status_field(pid, "Gid").as_deref(), Some("65532\t65532\t65532\t65532"));
        assert_eq!(proc_status_field(pid, "Groups").as_deref(), Some("2000 65532"));
        assert_eq!(proc_status_field(pid, "NoNewPrivs").as_deref(), Some("1"));
        let env = proc_env(pid);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(get("FROM_IMAGE").as_deref(), Some("yes"));
        assert_eq!(get("OVERRIDDEN").as_deref(), Some("pod"));
        assert_eq!(get("PATH").as_deref(), Some("/bin"));
        assert_eq!(get("HOME").as_deref(), Some("/home/nonroot"));
        // The pod's ServiceAccount: in place of the admission's projected token volume.
        let sa = "/var/run/secrets/kubernetes.io/serviceaccount";
        assert_eq!(get("KUBECONFIG"), Some(format!("{sa}/kubeconfig")));
        let sa_in_root = root.join(sa.trim_start_matches('/'));
        assert_eq!(std::fs::read_to_string(sa_in_root.join("namespace"))?, ns);
        let kc = std::fs::metadata(sa_in_root.join("kubeconfig"))?;
        assert_eq!(std::os::unix::fs::MetadataExt::uid(&kc), 65532, "readable by the pod's user");
        let token = std::fs::read_to_string(sa_in_root.join("token"))?;
        assert!(token.len() > 20);
        let log = sb.dir.join(format!("logs/pods/{ns}_tiny_c.log"));
        let text = wait_until(START, "the entrypoint's output", || {
            let log = log.clone();
            async move {
                let t = std::fs::read_to_string(&log).ok()?;
                t.contains("scratch-ok").then_some(t)
            }
        })
        .await?;
        assert!(text.contains("started in /home/nonroot"), "{text}");
        assert!(text.contains("Read-only file system"), "{text}");
        assert!(!text.contains("root-writable"), "{text}");

        // A tag the layout lacks: ErrImagePull naming the tags it has.
        create_pod(sb, &ns, pod("notag", &format!("{}:nope", layout.name))).await?;
        let msg = wait_waiting(sb, &ns, "notag", "ErrImagePull").await?;
        assert!(msg.contains("tag \"nope\"") && msg.contains("it has tags: 1"), "{msg}");

        // A tag added while the agent runs is found at the next container start.
        let digest2 = layout.add_tag(
            "2",
            serde_json::json!({"User": "65532", "Entrypoint": ["/bin/sh", "-c", "read x < /block"]}),
        )?;
        create_pod(sb, &ns, pod("tag2", &format!("{}:2", layout.name))).await?;
        let (p2, _) = wait_running(sb, &ns, "tag2").await?;
        assert_eq!(
            status_of(&p2).map(|s| s.image_id),
            Some(format!("{}@{digest2}", layout.name))
        );

        // runAsNonRoot with an image that runs as root: kubelet's refusal.
        let root_layout = TestLayout::new(sb, &format!("e2e-root-{ns}"));
        root_layout.add_tag("latest", serde_json::json!({"Entrypoint": ["/bin/sh", "-c", "read x < /block"]}))?;
        create_pod(sb, &ns, pod("rooty", &root_layout.name)).await?;
        let msg = wait_waiting(sb, &ns, "rooty", "CreateContainerConfigError").await?;
        assert!(msg.starts_with("container has runAsNonRoot and image will run as root"), "{msg}");

        // The pod's root filesystem goes with the pod.
        let dir = std::fs::read_dir(sb.dir.join("pods"))?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("{ns}_tiny_"))))
            .expect("pod dir");
        assert!(dir.join("rootfs/c/marker").is_file());
        pods(sb, &ns).delete("tiny", &DeleteParams::default()).await?;
        wait_until(Duration::from_secs(30), "pod dir removed", || {
            let dir = dir.clone();
            async move { (!dir.exists()).then_some(()) }
        })
        .await?;
        assert!(!proc_alive(pid));
        Ok(())
    })
    .await
}

/// The ARCUS stand-in (a table-mapped program on the host's filesystem) under Pod Security
/// "restricted" as the operator's cache pods set it: uid/gid 1000, fsGroup, no privilege
/// escalation, all capabilities dropped. It serves and registers in ZooKeeper like as root.
#[tokio::test]
async fn standin_runs_under_restricted_pod_security() -> anyhow::Result<()> {
    use zookeeper_client as zk;
    in_namespace("agent-restricted", |sb, ns| async move {
        let zkc = zk::Client::connector()
            .with_session_timeout(Duration::from_secs(10))
            .connect(test_support::sandbox::ZOOKEEPER)
            .await?;
        let svc = format!("e2e-{ns}");
        let hostname = format!("mc.{ns}");
        let mapping = format!("/arcus/cache_server_mapping/{hostname}:11211");
        let persistent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
        for p in [
            "/arcus".to_string(),
            "/arcus/cache_list".into(),
            "/arcus/cache_server_mapping".into(),
            "/arcus/cache_server_log".into(),
            format!("/arcus/cache_list/{svc}"),
            mapping.clone(),
            format!("{mapping}/{svc}"),
        ] {
            match zkc.create(&p, &[], &persistent).await {
                Ok(_) | Err(zk::Error::NodeExists) => {}
                Err(e) => anyhow::bail!("create {p}: {e}"),
            }
        }
        let result = async {
            create_pod(sb, &ns, serde_json::json!({
                "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "mc"},
                "spec": {
                    "terminationGracePeriodSeconds": 5,
                    "automountServiceAccountToken": false,
                    "securityContext": {"runAsNonRoot": true, "runAsUser": 1000, "runAsGroup": 1000,
                                        "fsGroup": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
                    "volumes": [{"name": "data", "emptyDir": {}}],
                    "containers": [{
                        "name": "memcached", "image": "jam2in/arcus-memcached:1.11.7",
                        "command": ["/arcus/bin/memcached", "-E", "/arcus/lib/default_engine.so",
                                    "-X", "/arcus/lib/ascii_scrub.so", "-u", "root", "-D", ":", "-r",
                                    "-R5", "-U", "0", "-b", "8192", "-p", "11211", "-m", "64",
                                    "-c", "1024", "-t", "2", "-z", test_support::sandbox::ZOOKEEPER],
                        "env": [{"name": "ARCUS_CACHE_HOSTNAME_OVERWRITE", "value": hostname}],
                        "volumeMounts": [{"name": "data", "mountPath": "/tmp/e2e-data-unused"}],
                        "readinessProbe": {"tcpSocket": {"port": 11211}, "periodSeconds": 1},
                        "securityContext": {"allowPrivilegeEscalation": false,
                                            "capabilities": {"drop": ["ALL"]}}
                    }]
                }
            }))
            .await?;
            let api = pods(sb, &ns);
            let p = wait_until(START, "stand-in pod Ready", || {
                let api = api.clone();
                async move { api.get_opt("mc").await.ok()?.filter(pod_ready) }
            })
            .await?;
            let pid = pid_of(&status_of(&p).expect("status")).expect("running");
            // The stand-in itself and its memcached child run as 1000.
            assert_eq!(proc_status_field(pid, "Uid").as_deref(), Some("1000\t1000\t1000\t1000"));
            assert_eq!(proc_status_field(pid, "Groups").as_deref(), Some("1000"));
            assert_eq!(proc_status_field(pid, "NoNewPrivs").as_deref(), Some("1"));
            let znodes = wait_until(START, "the node's cache_list znode", || {
                let zkc = zkc.clone();
                let path = format!("/arcus/cache_list/{svc}");
                async move {
                    let c = zkc.list_children(&path).await.ok()?;
                    (!c.is_empty()).then_some(c)
                }
            })
            .await?;
            assert!(znodes[0].ends_with(&format!(":11211-{hostname}")), "{znodes:?}");
            api.delete("mc", &DeleteParams::default()).await?;
            wait_until(Duration::from_secs(30), "stand-in pod gone", || {
                let api = api.clone();
                async move { matches!(api.get_opt("mc").await, Ok(None)).then_some(()) }
            })
            .await?;
            anyhow::Ok(())
        }
        .await;
        // Best effort: the ephemeral znode goes with the stand-in's session.
        for p in [
            format!("{mapping}/{svc}"),
            mapping.clone(),
            format!("/arcus/cache_list/{svc}"),
        ] {
            for _ in 0..50 {
                match zkc.delete(&p, None).await {
                    Ok(()) | Err(zk::Error::NoNode) => break,
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
        }
        result
    })
    .await
}
