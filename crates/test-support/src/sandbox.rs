//! The sandbox cluster (scripts/sandbox) as e2e tests see it: one shared cluster per machine,
//! brought up once (or reused), and one fresh namespace per test.

use k8s_openapi::api::core::v1::{Event, Namespace, Pod};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tokio::sync::OnceCell;

/// The sandbox's ZooKeeper, on the host's address on the sandbox bridge: reachable from tests
/// (the host) and from pods (`scripts/sandbox env` prints it as `ARCUS_ZK`).
pub const ZOOKEEPER: &str = "10.244.0.1:2181";

pub struct Sandbox {
    pub client: Client,
    pub dir: PathBuf,
    pub kubeconfig: PathBuf,
    pub repo: PathBuf,
}

static STARTED: OnceCell<()> = OnceCell::const_new();

impl Sandbox {
    /// The running sandbox, started with `scripts/sandbox up` when it is not answering.
    /// Several test binaries may call this at once: `up` runs under a file lock.
    ///
    /// Each call makes its own client: a kube Client is bound to the tokio runtime it was made
    /// in, and every `#[tokio::test]` has its own runtime. (The small allocation is leaked so
    /// tests can hold a `&'static Sandbox` across their futures.)
    pub async fn shared() -> anyhow::Result<&'static Sandbox> {
        let repo = repo_dir();
        let dir = PathBuf::from(
            std::env::var("ARCUS_SANDBOX_DIR").unwrap_or_else(|_| "/var/tmp/arcus-sandbox".into()),
        );
        STARTED
            .get_or_try_init(|| start_if_down(repo.clone(), dir.clone()))
            .await?;
        let kubeconfig = dir.join("kubeconfig");
        let client = client_from(&kubeconfig).await?;
        Ok(Box::leak(Box::new(Sandbox {
            client,
            dir,
            kubeconfig,
            repo,
        })))
    }

    /// A new namespace `<prefix>-<random>`; delete it with [`TestNamespace::cleanup`].
    pub async fn namespace(&self, prefix: &str) -> anyhow::Result<TestNamespace> {
        self.namespace_labelled(prefix, &[]).await
    }

    /// A new namespace where the API server's Pod Security admission enforces the "restricted"
    /// standard: what the operator and its cache pods must be admitted under.
    pub async fn restricted_namespace(&self, prefix: &str) -> anyhow::Result<TestNamespace> {
        self.namespace_labelled(prefix, &[(POD_SECURITY_ENFORCE, "restricted")])
            .await
    }

    async fn namespace_labelled(
        &self,
        prefix: &str,
        extra: &[(&str, &str)],
    ) -> anyhow::Result<TestNamespace> {
        let name = format!("{prefix}-{:06x}", rand::random::<u32>() & 0xff_ffff);
        let mut labels = serde_json::json!({"arcus-e2e": "true"});
        for (k, v) in extra {
            labels[*k] = serde_json::json!(v);
        }
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels}
        }))?;
        Api::<Namespace>::all(self.client.clone())
            .create(&PostParams::default(), &ns)
            .await?;
        // Pods are refused until the ServiceAccount controller has made `default`.
        let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(self.client.clone(), &name);
        crate::wait_until(
            Duration::from_secs(30),
            &format!("the ServiceAccount {name}/default"),
            || {
                let sas = sas.clone();
                async move { sas.get_opt("default").await.ok()?.map(|_| ()) }
            },
        )
        .await?;
        Ok(TestNamespace {
            name,
            client: self.client.clone(),
            dir: self.dir.clone(),
        })
    }

    /// Runs kubectl against the sandbox; returns stdout, fails with stderr.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(self.kubectl_path())
            .env("KUBECONFIG", &self.kubeconfig)
            .args(args)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The kubectl of the sandbox's Kubernetes version (`scripts/sandbox up` links it), else the
    /// one on the PATH.
    pub fn kubectl_path(&self) -> PathBuf {
        let own = self.dir.join("bin/kubectl");
        if own.exists() {
            own
        } else {
            PathBuf::from("kubectl")
        }
    }

    /// Where the workspace's binaries are (what the node agent runs for our images).
    pub fn bin_dir(&self) -> PathBuf {
        std::env::var("ARCUS_BIN_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| self.repo.join("target/debug"))
    }
}

async fn start_if_down(repo: PathBuf, dir: PathBuf) -> anyhow::Result<()> {
    if ready(&repo) {
        return Ok(());
    }
    let lock = dir.with_extension("up.lock");
    let script = repo.join("scripts/sandbox");
    let status = tokio::task::spawn_blocking(move || {
        Command::new("flock")
            .arg(&lock)
            .arg(&script)
            .arg("up")
            .status()
    })
    .await??;
    anyhow::ensure!(
        status.success(),
        "scripts/sandbox up failed ({status}); see its output above and {}/logs",
        dir.display()
    );
    Ok(())
}

/// The namespace label the Pod Security admission enforces.
pub const POD_SECURITY_ENFORCE: &str = "pod-security.kubernetes.io/enforce";

/// Whether the pod's Ready condition is True.
pub fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
        .is_some_and(|c| c.status == "True")
}

/// Runs `body` in a fresh namespace `<prefix>-<random>` of the shared sandbox; dumps the
/// namespace when it fails and always deletes it.
pub async fn in_namespace<F, Fut>(prefix: &str, body: F) -> anyhow::Result<()>
where
    F: FnOnce(&'static Sandbox, String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let sb = Sandbox::shared().await?;
    let ns = sb.namespace(prefix).await?;
    let result = body(sb, ns.name.clone()).await;
    if result.is_err() {
        ns.dump().await;
    }
    ns.cleanup().await?;
    result
}

pub struct TestNamespace {
    pub name: String,
    client: Client,
    dir: PathBuf,
}

impl TestNamespace {
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        K::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// Prints pods, events and the tails of the agent's and this namespace's pod logs: call it
    /// when a test fails, so CI output says why.
    pub async fn dump(&self) {
        eprintln!("===== dump of namespace {} =====", self.name);
        if let Ok(pods) = self.api::<Pod>().list(&ListParams::default()).await {
            for p in pods {
                let st = p.status.unwrap_or_default();
                let cs: Vec<String> = st
                    .container_statuses
                    .unwrap_or_default()
                    .iter()
                    .map(|c| {
                        format!(
                            "{} ready={} restarts={} state={:?}",
                            c.name, c.ready, c.restart_count, c.state
                        )
                    })
                    .collect();
                eprintln!(
                    "pod {} phase={:?} ip={:?} {:?}",
                    p.metadata.name.unwrap_or_default(),
                    st.phase,
                    st.pod_ip,
                    cs
                );
            }
        }
        if let Ok(events) = self.api::<Event>().list(&ListParams::default()).await {
            for e in events {
                eprintln!(
                    "event {} {}: {} {}",
                    e.involved_object.name.unwrap_or_default(),
                    e.type_.unwrap_or_default(),
                    e.reason.unwrap_or_default(),
                    e.message.unwrap_or_default()
                );
            }
        }
        tail(&self.dir.join("logs/node-agent.log"), 30);
        if let Ok(rd) = std::fs::read_dir(self.dir.join("logs/pods")) {
            for e in rd.flatten() {
                if e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{}_", self.name))
                {
                    tail(&e.path(), 15);
                }
            }
        }
    }

    /// Deletes the namespace (the agent then stops its pods) and waits, bounded, until it is gone.
    pub async fn cleanup(self) -> anyhow::Result<()> {
        let api = Api::<Namespace>::all(self.client.clone());
        let _ = api.delete(&self.name, &DeleteParams::default()).await;
        let name = self.name.clone();
        crate::wait_until(
            Duration::from_secs(120),
            &format!("namespace {name} to be deleted"),
            || {
                let api = api.clone();
                let name = name.clone();
                async move { matches!(api.get_opt(&name).await, Ok(None)).then_some(()) }
            },
        )
        .await
    }
}

fn tail(path: &Path, lines: usize) {
    if let Ok(text) = std::fs::read_to_string(path) {
        let all: Vec<&str> = text.lines().collect();
        eprintln!("----- last {lines} lines of {} -----", path.display());
        for l in &all[all.len().saturating_sub(lines)..] {
            eprintln!("{l}");
        }
    }
}

fn ready(repo: &Path) -> bool {
    Command::new(repo.join("scripts/sandbox"))
        .arg("status")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// A kube client for the given kubeconfig file.
pub async fn client_from(kubeconfig: &Path) -> anyhow::Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig)?;
    let cfg = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(cfg)?)
}

/// The workspace root (this crate lives in crates/test-support).
pub fn repo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}
