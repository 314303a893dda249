//! The reconcile pipeline for one ArcusMemcached, read top to bottom:
//! read the world → validate → plan ZooKeeper and build objects (pure) → apply (ZooKeeper first,
//! then the Kubernetes objects) → status. Deletion runs the same plan with `deleting` set and
//! removes our finalizer once ZooKeeper holds nothing of ours.

use crate::build;
use crate::crd::{ArcusMemcached, OperationKind, OperationStatus};
use crate::day2::{self, Day2Action, LiveConfig, NodePod};
use crate::leader::LeaderGate;
use crate::metrics::Metrics;
use crate::migrate;
use crate::status::{self, NodeView, StatusInput};
use crate::validate::{self, ValidSpec};
use crate::zk::{self, ObserveRequest, ServiceClaim, ZkError, ZkPool};
use crate::zk_plan::{self, PlanInput, ZkPlan};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DynamicObject, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
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
    #[error("Kubernetes API: {action} {object}: {source}")]
    Kube {
        action: &'static str,
        object: String,
        source: kube::Error,
    },
    #[error("not the leader: write skipped")]
    NotLeader,
    #[error("{0}")]
    Migration(#[from] crate::migrate::MigrateError),
}

impl Error {
    /// The error's category, used as the Event reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::ZooKeeper(ZkError::Connect { .. }) => "ZooKeeperUnreachable",
            Error::ZooKeeper(ZkError::NotLeader(_)) | Error::NotLeader => "NotLeader",
            Error::ZooKeeper(_) => "ZooKeeperError",
            Error::Kube { .. } => "KubernetesApiError",
            Error::Migration(_) => "MigrationFailed",
        }
    }
}

fn kube_err(action: &'static str, object: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let object = object.into();
    move |source| Error::Kube {
        action,
        object,
        source,
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
}

/// Requeue while something is in flight (a settled one waits `Context::resync`).
const REQUEUE_BUSY: Duration = Duration::from_secs(2);
const REQUEUE_NOT_READY: Duration = Duration::from_secs(60);

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
    tracing::warn!(cr = %name_of(&cr), error = %err, "reconcile failed");
    if ctx.leader.is_leader() {
        let recorder = ctx.recorder.clone();
        let reference = cr.object_ref(&());
        let (reason, note) = (err.reason().to_string(), err.to_string());
        tokio::spawn(async move {
            let _ = recorder
                .publish(
                    &KubeEvent {
                        type_: EventType::Warning,
                        reason,
                        note: Some(note),
                        action: "Reconcile".into(),
                        secondary: None,
                    },
                    &reference,
                )
                .await;
        });
    }
    Action::requeue(Duration::from_secs(5))
}

async fn reconcile_inner(cr: &ArcusMemcached, ctx: &Context) -> Result<Action, Error> {
    if !ctx.leader.is_leader() {
        return Err(Error::NotLeader);
    }
    let ns = cr.namespace().unwrap_or_default();
    let api: Api<ArcusMemcached> = Api::namespaced(ctx.client.clone(), &ns);
    let deleting = cr.metadata.deletion_timestamp.is_some();
    let has_finalizer = cr.finalizers().iter().any(|f| f == FINALIZER);
    if deleting && !has_finalizer {
        return Ok(Action::await_change());
    }

    // Validate. An invalid spec waits for a change; a deleted invalid CR that never claimed
    // anything in ZooKeeper just lets go.
    let owned_code = cr.status.as_ref().and_then(|s| s.service_code.clone());
    let valid = match validate::validate(cr) {
        Ok(v) => v,
        // Deleting: clean up what we own even when the spec changed since (say, an edited
        // serviceCode, which is immutable): validate it with the service code we registered.
        Err(_)
            if deleting
                && owned_code.is_some()
                && validate::validate(&with_service_code(cr, owned_code.clone())).is_ok() =>
        {
            validate::validate(&with_service_code(cr, owned_code.clone()))
                .expect("checked just above")
        }
        Err(invalid) if deleting && owned_code.is_none() => {
            tracing::info!(cr = %name_of(cr), %invalid, "deleting an invalid resource that owns nothing");
            remove_finalizer(&api, cr, ctx).await?;
            return Ok(Action::await_change());
        }
        Err(invalid) => {
            let message = if deleting {
                format!("cannot clean up ZooKeeper while the spec is invalid: {invalid}; fix the spec, or remove the finalizer {FINALIZER} to leave the ZooKeeper state behind")
            } else {
                format!("invalid spec: {invalid}")
            };
            publish(ctx, cr, EventType::Warning, "InvalidSpec", &message).await;
            write_status(
                &api,
                cr,
                ctx,
                &StatusInput {
                    desired: cr.spec.replicas.max(0) as u32,
                    nodes: &[],
                    registered: &BTreeSet::new(),
                    registered_nodes: vec![],
                    blocking_error: Some(("InvalidSpec", message)),
                    progress: None,
                    service_code: None,
                    operation: None,
                },
            )
            .await?;
            return Ok(Action::await_change());
        }
    };
    if !deleting && !has_finalizer {
        add_finalizer(&api, cr, ctx).await?;
    }

    // Read the world.
    let sts_name = valid.statefulset_name();
    let sts_api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &ns);
    let sts = sts_api
        .get_opt(&sts_name)
        .await
        .map_err(kube_err("read", format!("StatefulSet {ns}/{sts_name}")))?;
    let sts_replicas = sts
        .as_ref()
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.replicas)
        .map(|r| r.max(0) as u32);
    let pods = cache_pods(ctx, cr, &sts_name).await?;
    let pod_ordinals: BTreeSet<u32> = pods.iter().map(|(o, _)| *o).collect();

    let svc = valid.service_code.as_str();
    let ensemble = ZkPool::ensemble(&cr.spec.zookeeper_servers);
    ctx.by_service.lock().expect("service index lock").insert(
        (ensemble.clone(), svc.to_string()),
        kube::runtime::reflector::ObjectRef::from_obj(cr),
    );
    let desired = if deleting {
        0
    } else {
        cr.spec.replicas.max(0) as u32
    };
    let mapping_key = |o: u32| valid.mapping_key(o);
    let uid = cr.uid().unwrap_or_default();
    let zk_client = ctx.zk.session(&ensemble).await?;
    let recorded = cr
        .status
        .as_ref()
        .and_then(|s| s.operation.as_ref())
        .map(|o| o.from_replicas.max(o.to_replicas).max(0) as u32);
    let observed = zk::observe(
        &zk_client,
        &ObserveRequest {
            ensemble: &ensemble,
            service_code: svc,
            our_uid: &uid,
            mapping_key: &mapping_key,
            read_upto: zk_plan::ordinals_to_read(desired, sts_replicas, recorded.unwrap_or(0)),
        },
    )
    .await?;

    // Plan (pure).
    let claim = ServiceClaim {
        managed_by: ServiceClaim::MANAGER.into(),
        namespace: ns.clone(),
        name: cr.name_any(),
        uid,
    };
    let claim_data = claim.to_data();
    let plan = zk_plan::plan(
        &PlanInput {
            service_code: svc,
            claim_data: &claim_data,
            desired_replicas: desired,
            statefulset_replicas: sts_replicas,
            pod_ordinals: &pod_ordinals,
            deleting,
            mapping_key: &mapping_key,
        },
        &observed,
    );

    let registered: BTreeSet<String> = zk::registered_hostnames(&observed).into_iter().collect();
    let nodes: Vec<NodeView> = pods
        .iter()
        .map(|(o, p)| status::node_view(p, *o, valid.pod_hostname(*o)))
        .collect();
    let mut registered_nodes = observed.cache_list_children.clone();
    registered_nodes.sort();

    if let Some(conflict) = &plan.conflict {
        publish(ctx, cr, EventType::Warning, "ServiceCodeConflict", conflict).await;
        write_status(
            &api,
            cr,
            ctx,
            &StatusInput {
                desired,
                nodes: &nodes,
                registered: &BTreeSet::new(),
                registered_nodes: vec![],
                blocking_error: Some(("ServiceCodeConflict", conflict.clone())),
                progress: None,
                service_code: None,
                operation: None,
            },
        )
        .await?;
        if deleting {
            // Nothing in ZooKeeper is ours: let the resource go.
            remove_finalizer(&api, cr, ctx).await?;
            return Ok(Action::await_change());
        }
        return Ok(Action::requeue(Duration::from_secs(60)));
    }

    // One Event tells what this pass did.
    let mut actions = Vec::new();
    // Move the cache with the ring: before a scale-in shrinks anything; during a scale-out,
    // one new node at a time, each receiving its items before the next is let in.
    let mut sts_target = plan.statefulset_replicas;
    // A migration takes a while: what this pass read about the nodes is stale afterwards.
    let mut migrated = false;
    if !deleting {
        let children = &observed.cache_list_children;
        let now = sts_replicas.unwrap_or(0);
        if now > desired {
            let leaving: Vec<String> = (desired..now).map(|o| valid.pod_hostname(o)).collect();
            let operation = format!("scale-in {now}→{desired}");
            let (reporter, writer) = ProgressWriter::start(ctx, cr);
            let moved = migrate::scale_in(
                &zk_client, svc, &claim, children, &leaving, &operation, &reporter,
            )
            .await;
            let done = match &moved {
                Ok(Some(p)) => Some(migrate::migration_status(&operation, None, p)),
                _ => None,
            };
            writer.stop(reporter, done).await;
            if let Some(p) = moved? {
                actions.push(("Migrated", migrated_note("scale-in", &p)));
                migrated = true;
            }
        } else if now > 0 && plan.conflict.is_none() {
            // New nodes that serve but have not registered yet (can be filled before they do).
            let unregistered: Vec<String> = pods
                .iter()
                .filter(|(o, p)| {
                    *o < desired
                        && p.metadata.deletion_timestamp.is_none()
                        && !registered.contains(&valid.pod_hostname(*o))
                })
                .filter(|(_, p)| {
                    p.status
                        .as_ref()
                        .and_then(|s| s.container_statuses.as_ref())
                        .is_some_and(|c| {
                            c.iter()
                                .all(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
                        })
                })
                .filter_map(|(_, p)| {
                    Some(format!(
                        "{}:{}",
                        p.status.as_ref()?.pod_ip.as_ref()?,
                        valid.port
                    ))
                })
                .collect();
            let (reporter, writer) = ProgressWriter::start(ctx, cr);
            let step = migrate::scale_out_step(
                &zk_client,
                svc,
                &claim,
                children,
                now,
                desired,
                &unregistered,
                &|o| valid.pod_hostname(o),
                &reporter,
            )
            .await;
            let last = reporter.last();
            writer.stop(reporter, last).await;
            let (target, copied) = step?;
            if let Some(p) = copied {
                actions.push(("Migrated", migrated_note("scale-out", &p)));
                migrated = true;
            }
            sts_target = sts_target.map(|t| t.min(target));
        }
    }

    // Apply: ZooKeeper first (mappings exist before any pod that needs them), then objects.
    if !plan.ops.is_empty() {
        let writes = zk::apply(&zk_client, &ensemble, &plan.ops, &ctx.leader, &ctx.metrics).await?;
        let summary: Vec<String> = plan.ops.iter().map(|o| o.describe()).collect();
        actions.push((
            "ZooKeeperUpdated",
            format!("{} ({writes} znode writes)", summary.join(", ")),
        ));
    }
    if let Some(replicas) = sts_target {
        if deleting {
            if sts.is_some() && sts_replicas != Some(0) {
                scale_statefulset(&sts_api, &sts_name, ctx).await?;
            }
        } else {
            apply_objects(&valid, ctx, replicas as i32, sts.as_ref()).await?;
            let before = sts_replicas.unwrap_or(0);
            if sts_replicas != Some(replicas) {
                let verb = if before < replicas {
                    "ScaledOut"
                } else {
                    "ScaledIn"
                };
                actions.push((
                    verb,
                    format!("StatefulSet {sts_name} replicas {before} → {replicas}"),
                ));
            }
        }
    }
    if let Some((reason, _)) = actions.last() {
        let note: Vec<&str> = actions.iter().map(|(_, n)| n.as_str()).collect();
        publish(ctx, cr, EventType::Normal, reason, &note.join("; ")).await;
    }

    if deleting {
        if plan.cleanup_done {
            publish(
                ctx,
                cr,
                EventType::Normal,
                "ZooKeeperCleanedUp",
                &format!("service code {svc} removed from ZooKeeper"),
            )
            .await;
            remove_finalizer(&api, cr, ctx).await?;
            return Ok(Action::await_change());
        }
        return Ok(Action::requeue(REQUEUE_BUSY));
    }

    // Day-2 work on running nodes, only while no scale is in flight.
    let day2 = if plan.ops.is_empty() && plan.waiting_for.is_none() && !migrated {
        let cache = CacheRing {
            zk: &zk_client,
            service_code: svc,
            claim: &claim,
            children: &observed.cache_list_children,
        };
        run_day2(cr, &valid, ctx, desired, &pods, &registered, &cache).await?
    } else {
        day2::Day2Plan::default()
    };

    // Status.
    let operation = operation_status(cr, &plan, sts_replicas, desired);
    let progress = plan
        .waiting_for
        .clone()
        .map(|w| ("Scaling", format!("waiting for {w}")))
        .or_else(|| {
            (!day2.stale.is_empty()).then(|| {
                let left: Vec<String> = day2.stale.iter().map(|o| valid.pod_name(*o)).collect();
                let wait = day2
                    .roll_waiting
                    .clone()
                    .map(|w| format!("; {w}"))
                    .unwrap_or_default();
                (
                    "RollingRestart",
                    format!(
                        "restarting nodes one at a time, highest ordinal first; left: {}{wait}",
                        left.join(", ")
                    ),
                )
            })
        });
    let changed = write_status(
        &api,
        cr,
        ctx,
        &StatusInput {
            desired,
            nodes: &nodes,
            registered: &registered,
            registered_nodes,
            blocking_error: day2.roll_stuck.clone().map(|m| ("RollingRestartStuck", m)),
            progress,
            service_code: Some(svc.to_string()),
            operation,
        },
    )
    .await?;
    let ready = nodes
        .iter()
        .filter(|n| n.ordinal < desired && n.pod_ready && registered.contains(&n.hostname))
        .count() as u32;
    // Pod and cache_list watches bring changes in at once; these requeues are a safety net.
    let busy = !plan.ops.is_empty()
        || plan.waiting_for.is_some()
        || changed
        || !day2.actions.is_empty()
        || !day2.stale.is_empty()
        || day2.heal_pending;
    Ok(Action::requeue(if busy {
        REQUEUE_BUSY
    } else if ready != desired {
        REQUEUE_NOT_READY.min(ctx.resync)
    } else {
        ctx.resync
    }))
}

/// The in-flight scale, persisted in status so a new leader (and `kubectl get`) sees it.
fn operation_status(
    cr: &ArcusMemcached,
    plan: &ZkPlan,
    sts: Option<u32>,
    desired: u32,
) -> Option<OperationStatus> {
    let from = sts.unwrap_or(0);
    let in_flight = !plan.ops.is_empty() || plan.waiting_for.is_some();
    if !in_flight || sts.is_none() {
        return None;
    }
    let previous = cr.status.as_ref().and_then(|s| s.operation.clone());
    let (kind, phase) = if desired > from
        || plan
            .ops
            .iter()
            .any(|o| matches!(o, zk_plan::ZkOp::CreateMapping { .. }))
    {
        (OperationKind::ScaleOut, "CreatingMappings")
    } else if plan.waiting_for.is_some() {
        (OperationKind::ScaleIn, "WaitingForPods")
    } else {
        (OperationKind::ScaleIn, "RemovingMappings")
    };
    Some(OperationStatus {
        kind,
        phase: phase.into(),
        from_replicas: previous
            .as_ref()
            .map(|p| p.from_replicas)
            .unwrap_or(from as i32),
        to_replicas: desired as i32,
        started_at: previous.and_then(|p| p.started_at),
    })
}

async fn cache_pods(
    ctx: &Context,
    cr: &ArcusMemcached,
    sts_name: &str,
) -> Result<Vec<(u32, Pod)>, Error> {
    let ns = cr.namespace().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let selector = build::selector_labels(cr)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let list = api
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(kube_err("list", format!("pods {ns}/{selector}")))?;
    let prefix = format!("{sts_name}-");
    Ok(list
        .items
        .into_iter()
        .filter_map(|p| {
            let ordinal = p.name_any().strip_prefix(&prefix)?.parse().ok()?;
            Some((ordinal, p))
        })
        .collect())
}

/// Server-side apply of the Service, the PDB, the ServiceMonitor (where served) and, last, the
/// StatefulSet, which carries a hash of the whole set: when the live StatefulSet has that hash
/// and the wanted size, nothing is sent at all (a steady state costs no write and no extra read).
/// The StatefulSet goes last so pods never start before their Service and budget exist.
async fn apply_objects(
    valid: &ValidSpec,
    ctx: &Context,
    replicas: i32,
    live_sts: Option<&StatefulSet>,
) -> Result<(), Error> {
    let ns = valid.namespace.clone();
    let client = &ctx.client;
    let mut sts = build::statefulset(valid, replicas);
    let svc = build::headless_service(valid);
    let pdb = build::pdb(valid);
    let sm = build::service_monitor(valid).filter(|_| ctx.capabilities.service_monitor);
    let set_hash = build::content_hash(&(&sts, &svc, &pdb, &sm));
    let live_replicas = live_sts
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.replicas);
    let live_hash = live_sts.and_then(|s| s.annotations().get(APPLIED_HASH).cloned());
    let svc_api = Api::<Service>::namespaced(client.clone(), &ns);
    let pdb_api = Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns);
    if live_replicas == Some(replicas) && live_hash.as_deref() == Some(set_hash.as_str()) {
        // The StatefulSet's hash covers the set; the Service and PDB it does not live on may
        // have been deleted by hand since (two metadata reads, no write).
        let svc_name = svc.name_any();
        let there = svc_api
            .get_metadata_opt(&svc_name)
            .await
            .map_err(kube_err("read", format!("Service {svc_name}")))?
            .is_some()
            && pdb_api
                .get_metadata_opt(&pdb.name_any())
                .await
                .map_err(kube_err(
                    "read",
                    format!("PodDisruptionBudget {}", pdb.name_any()),
                ))?
                .is_some();
        if there {
            return Ok(());
        }
    }
    apply(ctx, &svc_api, &svc, "Service").await?;
    apply(ctx, &pdb_api, &pdb, "PodDisruptionBudget").await?;
    if let Some(sm) = &sm {
        let sm_api: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), &ns, &build::service_monitor_api_resource());
        apply(ctx, &sm_api, sm, "ServiceMonitor").await?;
    }
    sts.annotations_mut().insert(APPLIED_HASH.into(), set_hash);
    apply(
        ctx,
        &Api::<StatefulSet>::namespaced(client.clone(), &ns),
        &sts,
        "StatefulSet",
    )
    .await
}

async fn apply<K>(ctx: &Context, api: &Api<K>, obj: &K, kind: &str) -> Result<(), Error>
where
    K: Resource + Serialize + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    if !ctx.leader.is_leader() {
        return Err(Error::NotLeader);
    }
    let name = obj.name_any();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
    .map_err(kube_err("apply", format!("{kind} {name}")))?;
    ctx.metrics.api_write(kind);
    Ok(())
}

async fn scale_statefulset(api: &Api<StatefulSet>, name: &str, ctx: &Context) -> Result<(), Error> {
    if !ctx.leader.is_leader() {
        return Err(Error::NotLeader);
    }
    let patch = serde_json::json!({"spec": {"replicas": 0}});
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(kube_err("scale to 0", format!("StatefulSet {name}")))?;
    ctx.metrics.api_write("StatefulSet");
    Ok(())
}

/// Writes status (server-side apply on the subresource) only when it differs from the stored one.
/// Returns whether it wrote.
async fn write_status(
    api: &Api<ArcusMemcached>,
    cr: &ArcusMemcached,
    ctx: &Context,
    input: &StatusInput<'_>,
) -> Result<bool, Error> {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    let status = status::compute(cr, input, now);
    if cr.status.as_ref() == Some(&status) {
        return Ok(false);
    }
    if !ctx.leader.is_leader() {
        return Err(Error::NotLeader);
    }
    let mut body = serde_json::to_value(&status).expect("status serializes");
    // Owned by the migration progress writer; a copy from a stale cache must not revert it.
    if let Some(b) = body.as_object_mut() {
        b.remove("migration");
    }
    let patch = serde_json::json!({
        "apiVersion": "jam2in.com/v1",
        "kind": "ArcusMemcached",
        "status": body,
    });
    api.patch_status(
        &cr.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(kube_err("update status of", name_of(cr)))?;
    ctx.metrics.api_write("ArcusMemcachedStatus");
    Ok(true)
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
    if !ctx.leader.is_leader() {
        return Err(Error::NotLeader);
    }
    // resourceVersion makes this a compare-and-swap: we never drop someone else's finalizer.
    let patch = serde_json::json!({"metadata": {"finalizers": finalizers, "resourceVersion": cr.resource_version()}});
    match api
        .patch(
            &cr.name_any(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(kube_err("update finalizers of", name_of(cr))(e)),
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

fn name_of(cr: &ArcusMemcached) -> String {
    format!("{}/{}", cr.namespace().unwrap_or_default(), cr.name_any())
}

/// Reads the nodes for `day2::plan`, then carries out its actions: live configuration by admin
/// command, healing a node that left ZooKeeper, restarting the next node of a roll.
/// The ring a cache-aware restart moves items around.
struct CacheRing<'a> {
    zk: &'a zookeeper_client::Client,
    service_code: &'a str,
    claim: &'a ServiceClaim,
    children: &'a [String],
}

async fn run_day2(
    cr: &ArcusMemcached,
    valid: &ValidSpec,
    ctx: &Context,
    desired: u32,
    pods: &[(u32, Pod)],
    registered: &BTreeSet<String>,
    cache: &CacheRing<'_>,
) -> Result<day2::Day2Plan, Error> {
    let template = build::statefulset(valid, desired as i32);
    let desired_hash = template
        .spec
        .and_then(|s| s.template.metadata)
        .and_then(|m| m.annotations)
        .and_then(|a| a.get(day2::RESTART_HASH).cloned())
        .unwrap_or_default();
    let want = LiveConfig {
        memlimit_mb: valid.memlimit_mb,
        connections: valid.connections,
    };
    let now = k8s_openapi::jiff::Timestamp::now();
    let secs_since = |t: &Time| (now.as_second() - t.0.as_second()).max(0);
    let nodes: Vec<NodePod> = pods
        .iter()
        .map(|(o, p)| {
            let annotations = p.metadata.annotations.clone().unwrap_or_default();
            let status = p.status.clone().unwrap_or_default();
            let ready_cond = status
                .conditions
                .unwrap_or_default()
                .into_iter()
                .find(|c| c.type_ == "Ready" && c.status == "True");
            NodePod {
                ordinal: *o,
                name: p.name_any(),
                ip: status.pod_ip,
                restart_hash: annotations.get(day2::RESTART_HASH).cloned(),
                started: annotations
                    .get(day2::STARTED_CONFIG)
                    .and_then(|s| LiveConfig::parse(s)),
                applied: annotations
                    .get(day2::APPLIED_CONFIG)
                    .and_then(|s| LiveConfig::parse(s)),
                ready: ready_cond.is_some(),
                registered: registered.contains(&valid.pod_hostname(*o)),
                terminating: p.metadata.deletion_timestamp.is_some(),
                ready_for_secs: ready_cond
                    .map(|c| c.last_transition_time.as_ref().map(secs_since).unwrap_or(0)),
                age_secs: p
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map(secs_since)
                    .unwrap_or(0),
                running_for_secs: status
                    .container_statuses
                    .as_ref()
                    .and_then(|c| c.iter().find(|c| c.name == build::CONTAINER_NAME))
                    .and_then(|c| c.state.as_ref()?.running.as_ref())
                    .map(|r| r.started_at.as_ref().map(secs_since).unwrap_or(0)),
            }
        })
        .collect();
    let plan = day2::plan(&desired_hash, want, desired, &nodes);
    let pod_api: Api<Pod> = Api::namespaced(ctx.client.clone(), &valid.namespace);
    for action in &plan.actions {
        if !ctx.leader.is_leader() {
            return Err(Error::NotLeader);
        }
        match action {
            Day2Action::ApplyLiveConfig { pod, ip, from, to } => {
                let admin = arcus_client::AdminClient::new(format!("{ip}:{}", valid.port));
                let memlimit = match admin.set_memlimit(to.memlimit_mb.into()).await {
                    Err(arcus_client::Error::Unsupported { .. }) => {
                        admin.cache_memlimit(to.memlimit_mb.into()).await
                    }
                    r => r,
                };
                if let Err(e) = memlimit {
                    publish(
                        ctx,
                        cr,
                        EventType::Warning,
                        "ConfigFailed",
                        &format!("{pod}: memlimit {}: {e}", to.memlimit_mb),
                    )
                    .await;
                    continue;
                }
                let mut note = format!("{pod}: memlimit {} MB", to.memlimit_mb);
                if from.is_none_or(|f| f.connections != to.connections) {
                    match admin.set_maxconns(to.connections.into()).await {
                        Ok(()) => note.push_str(&format!(", connections {}", to.connections)),
                        // Stock memcached (the sandbox's stand-in) has no live maxconns.
                        Err(arcus_client::Error::Unsupported { .. }) => {
                            note.push_str(&format!("; connections {} takes effect at the next restart (not changeable live on this server)", to.connections))
                        }
                        Err(e) => {
                            publish(ctx, cr, EventType::Warning, "ConfigFailed", &format!("{pod}: connections {}: {e}", to.connections)).await;
                            continue;
                        }
                    }
                }
                let patch = serde_json::json!({"metadata": {"annotations": {day2::APPLIED_CONFIG: to.to_string()}}});
                pod_api
                    .patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map_err(kube_err("annotate", format!("pod {pod}")))?;
                ctx.metrics.api_write("Pod");
                publish(
                    ctx,
                    cr,
                    EventType::Normal,
                    "ConfigApplied",
                    &format!("{note}, without a restart"),
                )
                .await;
            }
            Day2Action::Heal { pod, ip } => {
                match crate::migrate::rejoin(&format!("{ip}:{}", valid.port)).await {
                    Ok(()) => {
                        publish(
                            ctx,
                            cr,
                            EventType::Normal,
                            "NodeRejoined",
                            &format!("{pod} had left ZooKeeper: zkensemble rejoin"),
                        )
                        .await
                    }
                    Err(e) => {
                        // "Already a member": it registered meanwhile (our view is a moment
                        // old). Restart only a node that is still out.
                        let list = format!("{}/{}", zk_plan::CACHE_LIST, cache.service_code);
                        let host = valid.pod_hostname(
                            pod.rsplit('-')
                                .next()
                                .and_then(|o| o.parse().ok())
                                .unwrap_or(u32::MAX),
                        );
                        let back = cache
                            .zk
                            .get_children(&list)
                            .await
                            .map(|(c, _)| {
                                c.iter()
                                    .any(|z| zk_plan::registered_hostname(z) == Some(host.as_str()))
                            })
                            .unwrap_or(false);
                        if back {
                            continue;
                        }
                        pod_api
                            .delete(pod, &Default::default())
                            .await
                            .map_err(kube_err("delete", format!("pod {pod}")))?;
                        ctx.metrics.api_write("Pod");
                        let msg = format!(
                            "{pod} had left ZooKeeper and cannot rejoin ({e}): restarting it"
                        );
                        publish(ctx, cr, EventType::Warning, "NodeRestarted", &msg).await;
                    }
                }
            }
            Day2Action::Roll { pod, ordinal } => {
                // Cache-aware: the node's items move to the rest of the ring first (as for a
                // scale-in of this one node), and come back once it has restarted and registered
                // (the scale-out copy picks that up).
                let host = valid.pod_hostname(*ordinal);
                let (reporter, writer) = ProgressWriter::start(ctx, cr);
                let moved = migrate::scale_in(
                    cache.zk,
                    cache.service_code,
                    cache.claim,
                    cache.children,
                    std::slice::from_ref(&host),
                    "rolling restart",
                    &reporter,
                )
                .await;
                let last = reporter.last();
                writer.stop(reporter, last).await;
                if let Some(p) = moved? {
                    publish(
                        ctx,
                        cr,
                        EventType::Normal,
                        "Migrated",
                        &migrated_note(&format!("before restarting {pod}"), &p),
                    )
                    .await;
                }
                migrate::copy_back_after_restart(
                    cache.zk,
                    cache.service_code,
                    cache.claim,
                    cache.children,
                    &host,
                    desired,
                )
                .await?;
                pod_api
                    .delete(pod, &Default::default())
                    .await
                    .map_err(kube_err("delete", format!("pod {pod}")))?;
                ctx.metrics.api_write("Pod");
                let left = plan.stale.len().saturating_sub(1);
                let msg = format!("restarting {pod} (ordinal {ordinal}) with the new template; {left} node(s) after it");
                publish(ctx, cr, EventType::Normal, "RollingRestart", &msg).await;
            }
        }
    }
    if let Some(stuck) = &plan.roll_stuck {
        publish(ctx, cr, EventType::Warning, "RollingRestartStuck", stuck).await;
    }
    Ok(plan)
}

/// Writes a running migration's progress into `status.migration` (a merge patch under a field
/// manager of its own, so the reconcile's status apply never carries a stale copy back), at
/// most once a second, and the final record when stopped.
struct ProgressWriter {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
    target: ProgressTarget,
}

#[derive(Clone)]
struct ProgressTarget {
    api: Api<ArcusMemcached>,
    name: String,
    leader: LeaderGate,
    metrics: Arc<Metrics>,
}

impl ProgressTarget {
    async fn write(&self, value: &crate::crd::MigrationStatus) {
        if !self.leader.is_leader() {
            return;
        }
        let patch = serde_json::json!({"status": {"migration": value}});
        let params = PatchParams {
            field_manager: Some(format!("{FIELD_MANAGER}-progress")),
            ..PatchParams::default()
        };
        match self
            .api
            .patch_status(&self.name, &params, &Patch::Merge(&patch))
            .await
        {
            Ok(_) => self.metrics.api_write("ArcusMemcachedStatus"),
            Err(e) => tracing::warn!(name = %self.name, "writing migration progress: {e}"),
        }
    }
}

impl ProgressWriter {
    fn start(ctx: &Context, cr: &ArcusMemcached) -> (migrate::Reporter, ProgressWriter) {
        let (reporter, mut rx) = migrate::Reporter::new();
        let target = ProgressTarget {
            api: Api::namespaced(ctx.client.clone(), &cr.namespace().unwrap_or_default()),
            name: cr.name_any(),
            leader: ctx.leader.clone(),
            metrics: ctx.metrics.clone(),
        };
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let t = target.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stopped => return,
                    changed = rx.changed() => if changed.is_err() { return },
                }
                let value = rx.borrow_and_update().clone();
                if let Some(v) = value {
                    t.write(&v).await;
                }
                // At most one write a second, however fast the copy reports.
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
        (reporter, ProgressWriter { stop, task, target })
    }

    /// Stops the periodic writes, waits for the one in flight, then writes `last`.
    async fn stop(self, reporter: migrate::Reporter, last: Option<crate::crd::MigrationStatus>) {
        drop(reporter);
        let _ = self.stop.send(());
        let _ = self.task.await;
        if let Some(last) = last {
            self.target.write(&last).await;
        }
    }
}

fn migrated_note(what: &str, p: &crate::migration::Progress) -> String {
    format!(
        "{what} migration: {}/{} items moved ({} updated, {} deleted, {} expired skipped, {} newer kept, {} failed)",
        p.items_moved, p.items_total, p.items_updated, p.items_deleted, p.items_skipped_expired, p.items_skipped_newer, p.items_failed
    )
}

fn with_service_code(cr: &ArcusMemcached, code: Option<String>) -> ArcusMemcached {
    let mut owned = cr.clone();
    if let Some(code) = code {
        owned.spec.service_code = code;
    }
    owned
}
