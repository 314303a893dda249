//! arcus-node-agent: the sandbox's kubelet for several Nodes in one process. Registers the
//! Nodes and runs the containers of each pod kube-scheduler bound to one of them as local
//! processes in the pod's own network namespace (see sandbox/node-agent/README.md).

mod agent;
mod dns;
mod env;
mod events;
mod images;
mod ipam;
mod netns;
mod node;
mod oci;
mod pod;
mod probe;
mod rootfs;
mod runtime;
mod serviceaccount;
mod status;
mod users;
mod volumes;

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::Api;

#[derive(Debug, Parser)]
#[command(
    name = "arcus-node-agent",
    about = "Sandbox kubelet for several Nodes (pods run as local processes in their own network namespaces)"
)]
struct Cli {
    /// Admin kubeconfig of the sandbox cluster.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    /// How many Nodes to play: <prefix>-a, <prefix>-b, … (InternalIP 10.244.0.<11+i>,
    /// podCIDR 10.244.<i+1>.0/24, zone a, b, …).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=9))]
    nodes: u8,
    /// Node names are <prefix>-<letter>.
    #[arg(long, default_value = "sandbox")]
    node_prefix: String,
    /// Bridge the pods' veths are attached to (created by scripts/sandbox, with --gateway on it).
    #[arg(long, default_value = "arcus0")]
    bridge: String,
    /// The bridge's address: pods route the Service CIDR via it.
    #[arg(long, default_value = "10.244.0.1")]
    gateway: Ipv4Addr,
    /// Routed from pods via the gateway (kube-proxy's rules on the host).
    #[arg(long, default_value = "10.96.0.0/16")]
    service_cidr: String,
    /// Prefix length of pod addresses on the bridge (the pod network 10.244.0.0/16).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u8).range(8..=30))]
    pod_prefix_len: u8,
    /// Nameserver in pods' resolv.conf (dnsPolicy ClusterFirst).
    #[arg(long, default_value = "10.244.0.1")]
    cluster_dns: String,
    #[arg(long, default_value = "cluster.local")]
    cluster_domain: String,
    /// Sandbox dir (pod dirs under pods/, container logs under logs/pods/).
    #[arg(
        long,
        env = "ARCUS_SANDBOX_DIR",
        default_value = "/var/tmp/arcus-sandbox"
    )]
    sandbox_dir: PathBuf,
    /// Image table (default: <repo>/sandbox/images.yaml).
    #[arg(long)]
    images: Option<PathBuf>,
    /// OCI image layouts: an image whose name (last path component, without tag or digest) has
    /// `<image-dir>/<name>/index.json` runs from that layout in its own root filesystem; other
    /// images go through the image table. Default: <repo>/target/images.
    #[arg(long, env = "ARCUS_IMAGE_DIR")]
    image_dir: Option<PathBuf>,
    /// Where the project's binaries are ({bin_dir} in the image table; default: this binary's dir).
    #[arg(long, env = "ARCUS_BIN_DIR")]
    bin_dir: Option<PathBuf>,
    /// Repository root ({repo} in the image table; default: found above this binary).
    #[arg(long, env = "ARCUS_REPO_DIR")]
    repo_dir: Option<PathBuf>,
    /// API server address written into pods' kubeconfigs (reachable from inside the pods).
    #[arg(long, default_value = "https://10.244.0.1:6443")]
    api_server: String,
    #[arg(long, default_value_t = 1)]
    backoff_base_secs: u64,
    #[arg(long, default_value_t = 30)]
    backoff_max_secs: u64,
}

/// The repository root: the first ancestor of `start` holding sandbox/images.yaml.
fn find_repo(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .find(|d| d.join("sandbox/images.yaml").is_file())
        .map(Path::to_path_buf)
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,kube_runtime=warn,kube_client=warn")
            }),
        )
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build();
    let result = rt.context("starting tokio").and_then(|rt| {
        let r = rt.block_on(run(cli));
        // Pods are stopped by now; do not wait for idle connection tasks.
        rt.shutdown_timeout(Duration::from_millis(200));
        r
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating this binary")?;
    let exe_dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    let repo = match cli.repo_dir {
        Some(r) => r,
        None => find_repo(&exe_dir)
            .or_else(|| std::env::current_dir().ok().and_then(|d| find_repo(&d)))
            .context("cannot find the repository (no sandbox/images.yaml above this binary); set ARCUS_REPO_DIR")?,
    };
    let images_path = cli
        .images
        .unwrap_or_else(|| repo.join("sandbox/images.yaml"));
    let table = images::ImageTable::load(&images_path)?;
    let bin_dir = cli.bin_dir.unwrap_or(exe_dir);
    let image_dir = cli.image_dir.unwrap_or_else(|| repo.join("target/images"));
    let kubeconfig = Kubeconfig::read_from(&cli.kubeconfig)
        .with_context(|| format!("reading kubeconfig {}", cli.kubeconfig.display()))?;
    let tls = serviceaccount::ServerTls::from_kubeconfig(&kubeconfig);
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .context("loading kubeconfig")?;
    let client = kube::Client::try_from(config).context("building the API client")?;
    for d in ["pods", "logs/pods", "volumes"] {
        std::fs::create_dir_all(cli.sandbox_dir.join(d))
            .with_context(|| format!("creating {}", cli.sandbox_dir.join(d).display()))?;
    }
    let nodes = node::nodes(&cli.node_prefix, usize::from(cli.nodes));
    let net = netns::NetConfig {
        bridge: cli.bridge.clone(),
        gateway: cli.gateway,
        prefix_len: cli.pod_prefix_len,
        service_cidr: cli.service_cidr.clone(),
    };
    tracing::info!(nodes = %nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>().join(","),
        bridge = %net.bridge, gateway = %net.gateway, service_cidr = %net.service_cidr,
        cluster_dns = %cli.cluster_dns, sandbox = %cli.sandbox_dir.display(), images = %images_path.display(),
        image_dir = %image_dir.display(), bin_dir = %bin_dir.display(), repo = %repo.display(), api_server = %cli.api_server, known_images = %table.known(),
        "starting");
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        tracing::warn!("not running as root: pod network namespaces cannot be created, pods will wait in ContainerCreating");
    }
    let agent = Arc::new(agent::Agent::new(
        client.clone(),
        table,
        nodes.clone(),
        agent::Settings {
            sandbox_dir: cli.sandbox_dir.clone(),
            image_dir,
            bin_dir: bin_dir.to_string_lossy().to_string(),
            repo_dir: repo.to_string_lossy().to_string(),
            api_server: cli.api_server.clone(),
            tls,
            backoff_base: Duration::from_secs(cli.backoff_base_secs.max(1)),
            backoff_max: Duration::from_secs(
                cli.backoff_max_secs.max(cli.backoff_base_secs).max(1),
            ),
            net,
            dns: dns::DnsSettings {
                cluster_dns: cli.cluster_dns.clone(),
                cluster_domain: cli.cluster_domain.clone(),
            },
        },
    ));
    let shutdown = agent.shutdown.clone();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("SIGTERM handler");
            let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
                .expect("SIGINT handler");
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM: stopping all pods"),
                _ = int.recv() => tracing::info!("SIGINT: stopping all pods"),
            }
            shutdown.cancel();
        }
    });

    // Register the nodes, waiting (bounded) for the API server.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    for n in &nodes {
        let since = loop {
            match node::register(&client, n).await {
                Ok(t) => break t,
                Err(e) if tokio::time::Instant::now() < deadline && !shutdown.is_cancelled() => {
                    tracing::warn!(node = %n.name, error = %e, "registering node; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e.context(format!("registering node {}", n.name))),
            }
        };
        tokio::spawn(node::heartbeat(
            client.clone(),
            n.clone(),
            since,
            shutdown.clone(),
        ));
    }

    // After the nodes are registered (the API answers): what a previous run left running is
    // either taken over or stopped, before any pod of this run starts.
    settle_leftovers(&client, &agent).await;

    let manager = agent::Manager::new(agent.clone());
    let mut events = watcher::watcher(Api::<Pod>::all(client.clone()), watcher::Config::default())
        .default_backoff()
        .boxed();
    let mut listed: HashSet<String> = HashSet::new();
    let mut first_list = true;
    loop {
        let event = tokio::select! {
            e = events.next() => e,
            _ = shutdown.cancelled() => break,
        };
        match event {
            None => anyhow::bail!("pod watch ended"),
            Some(Err(e)) => tracing::warn!(error = %e, "pod watch error (retrying)"),
            Some(Ok(Event::Init)) => listed.clear(),
            Some(Ok(Event::InitApply(p))) => {
                listed.insert(p.metadata.uid.clone().unwrap_or_default());
                manager.apply(p);
            }
            Some(Ok(Event::InitDone)) => {
                manager.resync(&listed, first_list);
                if first_list {
                    tracing::info!(pods = listed.len(), "initial pod list done; watching");
                }
                first_list = false;
            }
            Some(Ok(Event::Apply(p))) => manager.apply(p),
            Some(Ok(Event::Delete(p))) => manager.delete(&p),
        }
    }
    manager.wait_all().await;
    tracing::info!("all pods stopped; exiting");
    Ok(())
}

/// Containers a previous agent run (killed, not stopped) left running: those of pods that still
/// exist here are adopted (they keep running; their network namespace stays), the rest are
/// stopped; then every agent-named namespace and veth not adopted is removed.
async fn settle_leftovers(client: &kube::Client, agent: &agent::Agent) {
    let leftovers = runtime::find_leftovers(&agent.pods_dir());
    let mut adopted = std::collections::HashMap::new();
    let mut to_stop = Vec::new();
    if !leftovers.is_empty() {
        let pods = match Api::<Pod>::all(client.clone())
            .list(&Default::default())
            .await
        {
            Ok(list) => Some(list.items),
            Err(e) => {
                tracing::warn!(error = %e, "listing pods to adopt a previous run's containers failed; stopping them instead");
                None
            }
        };
        for l in leftovers {
            let pod = pods
                .iter()
                .flatten()
                .find(|p| p.metadata.uid.as_deref() == Some(&l.uid));
            let decision = match &pods {
                None => Err("the pods could not be listed".to_string()),
                Some(_) => agent::adoptable(
                    &l,
                    pod,
                    pod.is_some_and(|p| agent.node_of(p).is_some()),
                    netns::ns_path(&netns::ns_name(&l.uid)).exists(),
                ),
            };
            match decision {
                Ok(runs) => {
                    tracing::info!(pod_dir = %l.pod_dir.display(), containers = runs.len(),
                        "adopting running containers of a previous agent run");
                    adopted.insert(l.uid.clone(), runs);
                }
                Err(why) => {
                    tracing::info!(pod_dir = %l.pod_dir.display(), reason = %why,
                        "not adopting a previous agent run's containers");
                    to_stop.push(l);
                }
            }
        }
    }
    let stopped = runtime::kill_leftovers(&to_stop, Duration::from_secs(5)).await;
    if stopped > 0 {
        tracing::info!(
            count = stopped,
            "stopped container processes of a previous agent run"
        );
    }
    let keep: std::collections::HashSet<String> = adopted.keys().cloned().collect();
    match netns::remove_all_own(&keep).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            count = n,
            "removed network namespaces and veths of a previous agent run"
        ),
        Err(e) => tracing::warn!(error = %e, "removing a previous run's pod networks"),
    }
    agent.set_adoptions(adopted);
}
