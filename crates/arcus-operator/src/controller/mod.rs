//! The reconcile of one ArcusMemcached, as stages read top to bottom (in the manner of
//! stackabletech/zookeeper-operator's dereference → validate → build → apply → update_status):
//!
//! 1. [`validated`]: the spec checked (`validate`), the finalizer ensured; an invalid spec
//!    reports itself and waits for a change.
//! 2. [`observe::observe`]: every read: the StatefulSet and the pods (from the watches'
//!    stores, [`cache`]), ZooKeeper (the claim with the operation in flight, the ring, the
//!    mappings) and the nodes' `zkensemble` support.
//! 3. [`decide::decide`] (pure): the ZooKeeper plan, the operation's next step, day-2, the
//!    objects to apply, the status input, the requeue.
//! 4. [`apply::apply`]: every write, ZooKeeper first, then the step, then the objects.
//! 5. [`apply::update_status`].

mod apply;
pub mod cache;
mod decide;
mod effects;
mod observe;
mod progress;

use crate::crd::ArcusMemcached;
use crate::leader::{Fenced, LeaderGate};
use crate::metrics::Metrics;
use crate::migrate::MigrateError;
use crate::status::StatusInput;
use crate::validate::{self, ValidSpec};
use crate::zk::{ZkError, ZkPool};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::{Api, Client, Resource, ResourceExt};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const FIELD_MANAGER: &str = "arcus-operator";
pub const FINALIZER: &str = "jam2in.com/zookeeper-cleanup";
/// Annotation holding a hash of what we last applied, so an unchanged object is not re-sent.
pub const APPLIED_HASH: &str = "jam2in.com/applied-hash";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("ZooKeeper: {0}")]
    ZooKeeper(#[from] ZkError),
    #[error("Kubernetes API: {action} {object}")]
    Kube {
        action: &'static str,
        object: String,
        #[source]
        source: kube::Error,
    },
    #[error("the watches of StatefulSets, pods, Services and PDBs in namespace {namespace} have not listed them within {waited:?}: check the operator's RBAC (list and watch) and its log")]
    NotWatched { namespace: String, waited: Duration },
    #[error("ZooKeeper credentials (spec.zookeeperAuth): Secret {secret}: {why}")]
    ZookeeperAuth { secret: String, why: String },
    #[error(transparent)]
    NotLeader(#[from] Fenced),
    #[error(transparent)]
    Migration(#[from] MigrateError),
}

impl Error {
    /// The error's category, used as the Event reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::ZooKeeper(ZkError::Connect { .. }) => "ZooKeeperUnreachable",
            Error::ZooKeeper(ZkError::Fenced(_))
            | Error::NotLeader(_)
            | Error::Migration(MigrateError::Fenced(_) | MigrateError::Stopped(_)) => "NotLeader",
            Error::ZooKeeper(ZkError::ClaimChanged { .. }) => "ClaimChanged",
            Error::ZooKeeper(_) => "ZooKeeperError",
            Error::Kube { .. } | Error::NotWatched { .. } => "KubernetesApiError",
            Error::ZookeeperAuth { .. } => "ZooKeeperAuthUnavailable",
            Error::Migration(_) => "MigrationFailed",
        }
    }
}

/// Context for a failed API call, without a closure at every call site.
trait KubeContext<T> {
    fn or_kube(self, action: &'static str, object: impl std::fmt::Display) -> Result<T, Error>;
}

impl<T> KubeContext<T> for Result<T, kube::Error> {
    fn or_kube(self, action: &'static str, object: impl std::fmt::Display) -> Result<T, Error> {
        self.map_err(|source| Error::Kube {
            action,
            object: object.to_string(),
            source,
        })
    }
}

/// Optional APIs the server serves, discovered at start.
#[derive(Clone, Debug)]
pub struct Capabilities {
    /// ServiceMonitor (`monitoring.coreos.com/v1`): the Prometheus Operator is installed.
    pub service_monitor: bool,
}

pub struct Context {
    pub client: Client,
    pub zk: Arc<ZkPool>,
    pub leader: LeaderGate,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    pub capabilities: Capabilities,
    /// How often a settled resource is re-checked.
    pub resync: Duration,
    /// (ensemble, service code) → the CR owning it, to route `cache_list` changes.
    pub by_service: std::sync::Mutex<
        HashMap<(String, String), kube::runtime::reflector::ObjectRef<ArcusMemcached>>,
    >,
    /// The watched StatefulSets, pods, Services and PDBs (`Caches::default()`: read the API).
    pub caches: Arc<cache::Caches>,
    /// ensemble → since when no pass could reach it (cleared by the first pass that did).
    pub zk_unreachable_since: std::sync::Mutex<HashMap<String, Instant>>,
}

pub async fn reconcile(cr: Arc<ArcusMemcached>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let result = reconcile_inner(&cr, &ctx).await;
    ctx.metrics
        .reconcile_seconds
        .observe(started.elapsed().as_secs_f64());
    let label = if result.is_ok() { "ok" } else { "error" };
    ctx.metrics
        .reconciles
        .get_or_create(&crate::metrics::ResultLabel {
            result: label.into(),
        })
        .inc();
    result
}

pub fn error_policy(cr: Arc<ArcusMemcached>, err: &Error, ctx: Arc<Context>) -> Action {
    tracing::warn!(cr = %name_of(&cr), error = %ErrorChain(err), "reconcile failed");
    if let Error::ZooKeeper(ZkError::ClaimChanged { .. }) = err {
        // Another pass (or instance) moved the record on: read it again at once.
        return Action::requeue(Duration::from_millis(200));
    }
    if ctx.leader.is_leader() {
        let recorder = ctx.recorder.clone();
        let reference = cr.object_ref(&());
        let (reason, note) = (err.reason().to_string(), ErrorChain(err).to_string());
        tokio::spawn(async move {
            let event = KubeEvent {
                type_: EventType::Warning,
                reason,
                note: Some(note.chars().take(1000).collect()),
                action: "Reconcile".into(),
                secondary: None,
            };
            let _ = recorder.publish(&event, &reference).await;
        });
    }
    Action::requeue(Duration::from_secs(5))
}

/// An error with its causes, `: `-joined (the sources stay typed; this is only for people).
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

async fn reconcile_inner(cr: &ArcusMemcached, ctx: &Context) -> Result<Action, Error> {
    ctx.leader
        .check(|| format!("reconcile of {}", name_of(cr)))?;
    let Some(valid) = validated(cr, ctx).await? else {
        return Ok(Action::await_change());
    };
    let ensemble = ZkPool::ensemble(&cr.spec.zookeeper_servers);
    let mut stages = StageTimes::start();
    let world = match observe::observe(cr, &valid, ctx).await {
        Err(Error::ZooKeeper(e)) if unreachable(&e) => {
            report_zookeeper_down(cr, ctx, &ensemble).await;
            return Err(Error::ZooKeeper(e));
        }
        // spec.zookeeperAuth's Secret cannot be used: status says why.
        Err(e @ Error::ZookeeperAuth { .. }) => {
            report_degraded(cr, ctx, "ZooKeeperAuthUnavailable", e.to_string()).await;
            return Err(e);
        }
        // Our claim's operation record is unreadable (edited by hand, or garbage): nothing is
        // changed until it is fixed; status says where and what.
        Err(Error::ZooKeeper(e @ ZkError::Record { .. })) => {
            let message = format!("{e}; nothing is changed until then");
            report_degraded(cr, ctx, "OperationRecordInvalid", message).await;
            return Err(Error::ZooKeeper(e));
        }
        r => r?,
    };
    ctx.zk_unreachable_since
        .lock()
        .expect("zk outage lock")
        .remove(&ensemble);
    stages.lap("observe");
    let now = k8s_openapi::jiff::Timestamp::now();
    let decision = decide::decide(cr, &valid, &world, now);
    stages.lap("decide");
    let applied = apply::apply(cr, &valid, &world, &decision, ctx).await?;
    stages.lap("apply");
    if applied.finalizer_removed {
        return Ok(Action::await_change());
    }
    let wrote_status = apply::update_status(cr, ctx, &world, &decision).await?;
    stages.lap("status");
    tracing::debug!(cr = %name_of(cr), stages = %stages, "pass done");
    Ok(decision.requeue(&applied, wrote_status, ctx.resync))
}

/// How long each stage of a pass took (logged at debug, to tell where a slow pass spends it).
struct StageTimes {
    last: Instant,
    laps: Vec<(&'static str, Duration)>,
}

impl StageTimes {
    fn start() -> StageTimes {
        StageTimes {
            last: Instant::now(),
            laps: Vec::with_capacity(4),
        }
    }

    fn lap(&mut self, stage: &'static str) {
        let now = Instant::now();
        self.laps.push((stage, now - self.last));
        self.last = now;
    }
}

impl std::fmt::Display for StageTimes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (stage, took)) in self.laps.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{stage}={:.1}ms", took.as_secs_f64() * 1000.0)?;
        }
        Ok(())
    }
}

/// Errors that mean the ensemble cannot be reached (as opposed to a refused request).
fn unreachable(e: &ZkError) -> bool {
    use zookeeper_client::Error as Zk;
    match e {
        ZkError::Connect { .. } => true,
        ZkError::Op { source, .. } => matches!(
            source,
            Zk::ConnectionLoss | Zk::SessionExpired | Zk::Timeout | Zk::ClientClosed | Zk::NoHosts
        ),
        _ => false,
    }
}

/// While ZooKeeper cannot be reached nothing is changed (no scale step starts; one asked for
/// meanwhile runs once it is back): status says so, the rest of it as last seen.
async fn report_zookeeper_down(cr: &ArcusMemcached, ctx: &Context, ensemble: &str) {
    let since = *ctx
        .zk_unreachable_since
        .lock()
        .expect("zk outage lock")
        .entry(ensemble.to_string())
        .or_insert_with(Instant::now);
    let message = format!(
        "ZooKeeper {ensemble} unreachable for {} s; cache nodes keep serving; no scale step starts until it is back",
        since.elapsed().as_secs()
    );
    report_degraded(cr, ctx, "ZooKeeperUnreachable", message).await;
}

/// Status as last written but for `Degraded` (true for `reason`), for a pass that stops early.
async fn report_degraded(cr: &ArcusMemcached, ctx: &Context, reason: &str, message: String) {
    let now =
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
    let status = crate::status::degraded_only(cr, reason, message, now);
    if let Err(e) = apply::apply_status(cr, ctx, status).await {
        tracing::warn!(cr = %name_of(cr), reason, error = %ErrorChain(&e), "could not report in status");
    }
}

/// The spec, validated, with the finalizer in place; None when the pass ends here (an invalid
/// spec reported, or a deleted resource let go).
async fn validated(cr: &ArcusMemcached, ctx: &Context) -> Result<Option<ValidSpec>, Error> {
    let api: Api<ArcusMemcached> = Api::namespaced(ctx.client.clone(), &namespace_of(cr));
    let deleting = cr.metadata.deletion_timestamp.is_some();
    let has_finalizer = cr.finalizers().iter().any(|f| f == FINALIZER);
    if deleting && !has_finalizer {
        return Ok(None);
    }
    let owned_code = cr.status.as_ref().and_then(|s| s.service_code.clone());
    let invalid = match validate::validate(cr) {
        Ok(v) => {
            if !deleting && !has_finalizer {
                add_finalizer(&api, cr, ctx).await?;
            }
            return Ok(Some(v));
        }
        Err(invalid) => invalid,
    };
    // Deleting: clean up what we own even when the spec changed since (say, an edited
    // serviceCode, which is immutable): validate it with the service code we registered.
    if let (true, Some(code)) = (deleting, &owned_code) {
        if let Ok(v) = validate::validate(&with_service_code(cr, code)) {
            return Ok(Some(v));
        }
    }
    if deleting && owned_code.is_none() {
        tracing::info!(cr = %name_of(cr), %invalid, "deleting an invalid resource that owns nothing");
        remove_finalizer(&api, cr, ctx).await?;
        return Ok(None);
    }
    let message = if deleting {
        format!("cannot clean up ZooKeeper while the spec is invalid: {invalid}; fix the spec, or remove the finalizer {FINALIZER} to leave the ZooKeeper state behind")
    } else {
        format!("invalid spec: {invalid}")
    };
    publish(ctx, cr, EventType::Warning, "InvalidSpec", &message).await;
    let input = StatusInput {
        desired: cr.spec.replicas.max(0) as u32,
        nodes: &[],
        registered: &BTreeSet::new(),
        registered_nodes: vec![],
        blocking_error: Some(("InvalidSpec", message)),
        progress: None,
        zookeeper_problem: None,
        service_code: None,
        operation: None,
    };
    apply::write_status(cr, ctx, &input).await?;
    Ok(None)
}

async fn add_finalizer(
    api: &Api<ArcusMemcached>,
    cr: &ArcusMemcached,
    ctx: &Context,
) -> Result<(), Error> {
    let mut finalizers = cr.finalizers().to_vec();
    finalizers.push(FINALIZER.into());
    patch_finalizers(api, cr, ctx, finalizers).await
}

async fn remove_finalizer(
    api: &Api<ArcusMemcached>,
    cr: &ArcusMemcached,
    ctx: &Context,
) -> Result<(), Error> {
    let finalizers: Vec<String> = cr
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    patch_finalizers(api, cr, ctx, finalizers).await
}

async fn patch_finalizers(
    api: &Api<ArcusMemcached>,
    cr: &ArcusMemcached,
    ctx: &Context,
    finalizers: Vec<String>,
) -> Result<(), Error> {
    ctx.leader
        .check(|| format!("finalizers of {}", name_of(cr)))?;
    // resourceVersion makes this a compare-and-swap: we never drop someone else's finalizer.
    let patch = serde_json::json!({"metadata": {"finalizers": finalizers, "resourceVersion": cr.resource_version()}});
    let patched = api
        .patch(
            &cr.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await;
    match patched {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e).or_kube("update finalizers of", name_of(cr)),
    }
    ctx.metrics.api_write("ArcusMemcached");
    Ok(())
}

async fn publish(ctx: &Context, cr: &ArcusMemcached, type_: EventType, reason: &str, note: &str) {
    if !ctx.leader.is_leader() {
        return;
    }
    tracing::info!(cr = %name_of(cr), %reason, %note, "event");
    let ev = KubeEvent {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &cr.object_ref(&())).await {
        tracing::warn!(cr = %name_of(cr), error = %e, "cannot publish event");
    }
}

fn namespace_of(cr: &ArcusMemcached) -> String {
    cr.namespace().unwrap_or_default()
}

fn name_of(cr: &ArcusMemcached) -> String {
    format!("{}/{}", namespace_of(cr), cr.name_any())
}

fn with_service_code(cr: &ArcusMemcached, code: &str) -> ArcusMemcached {
    let mut owned = cr.clone();
    owned.spec.service_code = code.to_string();
    owned
}
