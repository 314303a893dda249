//! arcus-node-agent: the sandbox's kubelet and scheduler for one Node. Registers the Node, binds
//! unscheduled pods to it, and runs each pod's containers as local processes on their own
//! 127.1.x.y IP (see sandbox/README.md).

mod agent;
mod env;
mod events;
mod images;
mod ipam;
mod node;
mod pod;
mod probe;
mod runtime;
mod scheduler;
mod serviceaccount;
mod status;
mod volumes;

use std::collections::HashSet;
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
    about = "Sandbox kubelet + scheduler for one Node (pods run as local processes)"
)]
struct Cli {
    /// Admin kubeconfig of the sandbox cluster.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    #[arg(long, default_value = "sandbox-node")]
    node_name: String,
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
    /// Where the project's binaries are ({bin_dir} in the image table; default: this binary's dir).
    #[arg(long, env = "ARCUS_BIN_DIR")]
    bin_dir: Option<PathBuf>,
    /// Repository root ({repo} in the image table; default: found above this binary).
    #[arg(long, env = "ARCUS_REPO_DIR")]
    repo_dir: Option<PathBuf>,
    /// API server address written into pods' kubeconfigs.
    #[arg(long, default_value = "https://127.0.0.1:6443")]
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
    tracing::info!(node = %cli.node_name, sandbox = %cli.sandbox_dir.display(), images = %images_path.display(),
        bin_dir = %bin_dir.display(), repo = %repo.display(), api_server = %cli.api_server, known_images = %table.known(),
        "starting");
    let leftovers =
        runtime::kill_leftovers(&cli.sandbox_dir.join("pods"), Duration::from_secs(5)).await;
    if leftovers > 0 {
        tracing::info!(
            count = leftovers,
            "stopped container processes of a previous agent run"
        );
    }

    let agent = Arc::new(agent::Agent::new(
        client.clone(),
        cli.node_name.clone(),
        cli.sandbox_dir.clone(),
        table,
        bin_dir.to_string_lossy().to_string(),
        repo.to_string_lossy().to_string(),
        cli.api_server.clone(),
        tls,
        Duration::from_secs(cli.backoff_base_secs.max(1)),
        Duration::from_secs(cli.backoff_max_secs.max(cli.backoff_base_secs).max(1)),
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

    // Register the node, waiting (bounded) for the API server.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let since = loop {
        match node::register(&client, &cli.node_name).await {
            Ok(t) => break t,
            Err(e) if tokio::time::Instant::now() < deadline && !shutdown.is_cancelled() => {
                tracing::warn!(error = %e, "registering node; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e.context("registering the node")),
        }
    };
    tokio::spawn(node::heartbeat(
        client.clone(),
        cli.node_name.clone(),
        since,
        shutdown.clone(),
    ));

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
