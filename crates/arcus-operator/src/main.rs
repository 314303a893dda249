//! `arcus-operator run` (the controller) and `arcus-operator crd` (prints the CRD).

use arcus_operator::controller::cache::{Caches, NamespaceStores};
use arcus_operator::controller::{self, Capabilities, Context};
use arcus_operator::crd::ArcusMemcached;
use arcus_operator::metrics::Metrics;
use arcus_operator::zk::ZkPool;
use arcus_operator::{build, leader};
use clap::{Parser, Subcommand};
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{predicates, watcher, Predicate, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "arcus-operator",
    version,
    about = "Kubernetes operator for ARCUS cache clusters (ArcusMemcached, jam2in.com/v1)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller. Uses $KUBECONFIG or the in-cluster config. With several replicas, one
    /// leader (elected on a Lease) reconciles and the others stand by.
    Run(RunArgs),
    /// Print the CustomResourceDefinition (apiextensions.k8s.io/v1) as YAML.
    Crd,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Namespaces to watch: empty for all, or a comma-separated list.
    #[arg(long, env = "WATCH_NAMESPACE", default_value = "")]
    watch_namespace: String,
    /// This replica's identity in the leader Lease (the Deployment sets it from metadata.name).
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// Names the Lease (`<name>-leader`) and the Event reporter.
    #[arg(long, env = "OPERATOR_NAME", default_value = "arcus-operator")]
    operator_name: String,
    /// Namespace of the leader Lease; defaults to the client's namespace.
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Disable leader election (a single replica that always reconciles).
    #[arg(long)]
    no_leader_election: bool,
    /// Where /metrics, /healthz and /readyz are served.
    #[arg(long, env = "METRICS_BIND", default_value = "0.0.0.0:8080")]
    metrics_bind: String,
    /// ZooKeeper session timeout of the operator's own sessions.
    #[arg(long, default_value = "15")]
    zk_session_timeout_seconds: u64,
    /// How often a settled resource is re-checked (a check that finds nothing to do writes nothing).
    #[arg(long, default_value = "300")]
    resync_seconds: u64,
    /// How many resources are reconciled at once.
    #[arg(long, default_value = "16")]
    concurrency: u16,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match Cli::parse().command {
        Command::Crd => {
            print!("{}", arcus_operator::crd::crd_yaml());
            Ok(())
        }
        Command::Run(args) => run(args).await,
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let client = Client::try_default().await.map_err(|e| {
        anyhow::anyhow!("no Kubernetes configuration (set KUBECONFIG or run in a pod): {e}")
    })?;
    let identity = args
        .pod_name
        .clone()
        .unwrap_or_else(|| format!("{}-{}", hostname(), std::process::id()));
    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let metrics_task = tokio::spawn(arcus_operator::metrics::serve(
        args.metrics_bind.clone(),
        metrics.clone(),
        ready.clone(),
    ));
    let capabilities = discover(&client).await;
    tracing::info!(?capabilities, "API capabilities");
    ready.store(true, Ordering::Release);

    let Some((gate, lost)) = elect(&args, &client, &identity).await? else {
        return Ok(());
    };
    metrics.leader.set(1);

    let namespaces = watched_namespaces(&args.watch_namespace);
    let watches: Vec<OwnedWatches> = namespaces
        .iter()
        .map(|ns| watch_owned(&client, ns))
        .collect();
    // The controllers poll the watches; a pass first waits for its namespace's first listing.
    let caches = Arc::new(Caches::new(
        watches.iter().map(|w| w.stores.clone()).collect(),
    ));

    let (zk_tx, zk_rx) = tokio::sync::mpsc::unbounded_channel();
    let zk = Arc::new(ZkPool::new(
        Duration::from_secs(args.zk_session_timeout_seconds),
        zk_tx,
    ));
    let reporter = Reporter {
        controller: args.operator_name.clone(),
        instance: Some(identity.clone()),
    };
    let ctx = Arc::new(Context {
        client: client.clone(),
        zk,
        leader: gate.clone(),
        metrics: metrics.clone(),
        recorder: Recorder::new(client.clone(), reporter),
        capabilities,
        resync: Duration::from_secs(args.resync_seconds),
        by_service: Default::default(),
        zk_unreachable_since: Default::default(),
        caches,
    });
    let trigger_tx = route_cache_list_changes(ctx.clone(), zk_rx);
    tracing::info!(?namespaces, %identity, "leader: starting controllers");
    let controllers = watches
        .into_iter()
        .map(|w| controller_for(w, &client, &trigger_tx, &ctx, args.concurrency));
    let all = futures::future::join_all(controllers);
    tokio::select! {
        _ = all => tracing::info!("controllers stopped (shutdown)"),
        reason = lost => {
            tracing::error!(%reason, fenced_writes = gate.fenced_writes(), "lost leadership; exiting so this replica restarts as a stand-by");
            std::process::exit(1);
        }
        r = metrics_task => tracing::error!(?r, "metrics server stopped"),
    }
    Ok(())
}

/// Waits to lead (unless election is off); None when asked to stop while standing by.
async fn elect(
    args: &RunArgs,
    client: &Client,
    identity: &str,
) -> anyhow::Result<
    Option<(
        leader::LeaderGate,
        futures::future::BoxFuture<'static, String>,
    )>,
> {
    if args.no_leader_election {
        let forever = futures::future::pending::<String>().boxed();
        return Ok(Some((leader::LeaderGate::new(true), forever)));
    }
    let ns = args
        .lease_namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_string());
    let lease = format!("{}-leader", args.operator_name);
    let acquire = leader::acquire(client.clone(), &ns, &lease, identity);
    tokio::select! {
        r = acquire => {
            let (gate, lost) = r?;
            Ok(Some((gate, lost.boxed())))
        }
        _ = shutdown_signal() => {
            tracing::info!("stopping while stand-by");
            Ok(None)
        }
    }
}

/// `cache_list` changes → the owning CR, fanned out to every namespace's controller.
fn route_cache_list_changes(
    ctx: Arc<Context>,
    mut zk_rx: tokio::sync::mpsc::UnboundedReceiver<arcus_operator::zk::CacheListChange>,
) -> tokio::sync::broadcast::Sender<ObjectRef<ArcusMemcached>> {
    let (trigger_tx, _) = tokio::sync::broadcast::channel::<ObjectRef<ArcusMemcached>>(4096);
    let tx = trigger_tx.clone();
    tokio::spawn(async move {
        while let Some(change) = zk_rx.recv().await {
            let targets: Vec<ObjectRef<ArcusMemcached>> = {
                let index = ctx.by_service.lock().expect("index");
                if change.service_code.is_empty() {
                    index
                        .iter()
                        .filter(|((ensemble, _), _)| *ensemble == change.ensemble)
                        .map(|(_, r)| r.clone())
                        .collect()
                } else {
                    index
                        .get(&(change.ensemble, change.service_code))
                        .into_iter()
                        .cloned()
                        .collect()
                }
            };
            for r in targets {
                let _ = tx.send(r);
            }
        }
    });
    trigger_tx
}

fn watched_namespaces(list: &str) -> Vec<Option<String>> {
    if list.trim().is_empty() {
        return vec![None];
    }
    list.split(',')
        .map(|s| Some(s.trim().to_string()))
        .filter(|s| s.as_deref() != Some(""))
        .collect()
}

fn api_in<K>(client: &Client, ns: &Option<String>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
    <K as kube::Resource>::DynamicType: Default,
{
    match ns {
        None => Api::all(client.clone()),
        Some(ns) => Api::namespaced(client.clone(), ns),
    }
}

/// A watch's events (deletions included) after they updated its store.
type Touched<K> = futures::stream::BoxStream<'static, Result<K, watcher::Error>>;

/// The watches of what the operator owns in one namespace (or all): each keeps a store the
/// passes read, and its events (once in the store) trigger the controller.
struct OwnedWatches {
    namespace: Option<String>,
    stores: NamespaceStores,
    statefulsets: Touched<StatefulSet>,
    pods: Touched<Pod>,
    services: Touched<Service>,
    pdbs: Touched<PodDisruptionBudget>,
}

fn watch_owned(client: &Client, ns: &Option<String>) -> OwnedWatches {
    let (statefulsets, sts_events) = reflected_watch(api_in::<StatefulSet>(client, ns));
    let (pods, pod_events) = reflected_watch(api_in::<Pod>(client, ns));
    let (services, svc_events) = reflected_watch(api_in::<Service>(client, ns));
    let (pdbs, pdb_events) = reflected_watch(api_in::<PodDisruptionBudget>(client, ns));
    OwnedWatches {
        namespace: ns.clone(),
        stores: NamespaceStores {
            namespace: ns.clone(),
            statefulsets,
            pods,
            services,
            pdbs,
        },
        statefulsets: sts_events,
        pods: pod_events,
        services: svc_events,
        pdbs: pdb_events,
    }
}

/// A watch of the objects carrying our managed-by label, reflected into a store (without
/// managedFields, which the operator never reads). The controller polls the returned stream,
/// which keeps the store current; deletions come through too, so a Service deleted by hand
/// or a pod gone starts a pass.
fn reflected_watch<K>(api: Api<K>) -> (Store<K>, Touched<K>)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let config = watcher::Config::default().labels(build::MANAGED_BY_SELECTOR);
    let events = watcher(api, config)
        .default_backoff()
        .modify(|o: &mut K| o.managed_fields_mut().clear())
        .reflect(writer)
        .touched_objects()
        .boxed();
    (store, events)
}

/// The controller of one watched namespace (or all): the CRs, what they own, their pods, and
/// the `cache_list` triggers for it.
fn controller_for(
    watches: OwnedWatches,
    client: &Client,
    trigger_tx: &tokio::sync::broadcast::Sender<ObjectRef<ArcusMemcached>>,
    ctx: &Arc<Context>,
    concurrency: u16,
) -> impl std::future::Future<Output = ()> {
    let ns = watches.namespace.clone();
    let rx = trigger_tx.subscribe();
    let wanted = ns.clone();
    let triggers = futures::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(r) => return Some((r, rx)),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
    .filter(move |r| futures::future::ready(wanted.is_none() || r.namespace == wanted));
    // The resource's own status writes (ours) start no pass: only what a user or the API
    // server changes does (spec → generation, deletion → generation, finalizers, metadata).
    let (cr_store, cr_writer) = reflector::store();
    let crs = watcher(
        api_in::<ArcusMemcached>(client, &ns),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(cr_writer)
    .applied_objects()
    .predicate_filter(
        predicates::generation
            .combine(predicates::finalizers)
            .combine(predicates::labels)
            .combine(predicates::annotations),
        Default::default(),
    );
    Controller::for_stream(crs, cr_store)
        .with_config(ControllerConfig::default().concurrency(concurrency))
        .owns_stream(watches.statefulsets)
        // A Service or PDB deleted by hand brings its owner back at once to re-apply it.
        .owns_stream(watches.services)
        .owns_stream(watches.pdbs)
        .watches_stream(watches.pods, |pod: Pod| {
            let instance = pod.labels().get(build::INSTANCE_LABEL)?.clone();
            Some(ObjectRef::new(&instance).within(&pod.namespace()?))
        })
        .reconcile_on(triggers)
        .graceful_shutdown_on(shutdown_signal())
        .run(controller::reconcile, controller::error_policy, ctx.clone())
        .for_each(|_| futures::future::ready(()))
}

async fn discover(client: &Client) -> Capabilities {
    let served = |group_version: &'static str, plural: &'static str| {
        let client = client.clone();
        async move {
            client
                .list_api_group_resources(group_version)
                .await
                .map(|l| l.resources.iter().any(|r| r.name == plural))
                .unwrap_or(false)
        }
    };
    let service_monitor = served("monitoring.coreos.com/v1", "servicemonitors").await;
    Capabilities { service_monitor }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "arcus-operator".into())
}
