//! Stage 4 and 5: every write of a pass, in order — ZooKeeper's plan (mappings exist before any
//! pod that needs them), the operation's step, the objects (the StatefulSet last), live
//! configuration — then the status.

use super::decide::{Applied, Decision, Objects, StatefulSetChange};
use super::effects::PodsApi;
use super::observe::World;
use super::progress::ProgressWriter;
use super::{name_of, namespace_of, publish, remove_finalizer, Context, Error, KubeContext};
use super::{APPLIED_HASH, FIELD_MANAGER};
use crate::build;
use crate::crd::ArcusMemcached;
use crate::day2::{self, Day2Action};
use crate::migrate::{ArcusAdmin, CacheMover, Executor, NodeAdmin, Pods, Ran};
use crate::migration::Progress;
use crate::operation::{Action, Step};
use crate::status::{self, StatusInput};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{DynamicObject, Patch, PatchParams};
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;

pub async fn apply(
    cr: &ArcusMemcached,
    valid: &crate::validate::ValidSpec,
    world: &World,
    decision: &Decision,
    ctx: &Context,
) -> Result<Applied, Error> {
    let mut applied = Applied::default();
    if let Some(conflict) = &decision.conflict {
        publish(ctx, cr, EventType::Warning, "ServiceCodeConflict", conflict).await;
        // Deleting: nothing in ZooKeeper is ours, so there is nothing to clean up.
        applied.finalizer_removed = finish_deletion(cr, ctx, decision, None).await?;
        return Ok(applied);
    }
    // One Event tells what this pass did.
    let mut actions: Vec<(&str, String)> = Vec::new();
    let plan = &decision.plan;
    if !plan.ops.is_empty() {
        let writes = world.registry.apply(&plan.ops).await?;
        let summary: Vec<String> = plan.ops.iter().map(|o| o.describe()).collect();
        actions.push((
            "ZooKeeperUpdated",
            format!("{} ({writes} znode writes)", summary.join(", ")),
        ));
    }
    let acts = |s: &&Step| !matches!(s.action, Action::Idle | Action::Wait(_));
    if let Some(step) = decision.step.as_ref().filter(acts) {
        applied.ran = run_step(cr, world, step, ctx).await?;
        if let Some(p) = &applied.ran.copied {
            // Named as its progress records are.
            let what = crate::migrate::Label::of(step).operation;
            actions.push(("Migrated", migrated_note(&what, p)));
        }
        if let Some((reason, note)) = &applied.ran.event {
            actions.push((reason, note.clone()));
        }
    }
    let sts_before = world.statefulset_replicas();
    match &decision.statefulset {
        StatefulSetChange::Leave => {}
        StatefulSetChange::ScaleToZero => scale_to_zero(valid, ctx).await?,
        StatefulSetChange::Apply(objects) => {
            apply_objects(valid, ctx, objects, world.statefulset.as_ref()).await?;
            let replicas = objects.statefulset.spec.as_ref().and_then(|s| s.replicas);
            let before = sts_before.unwrap_or(0) as i32;
            if let Some(r) = replicas.filter(|r| sts_before.map(|b| b as i32) != Some(*r)) {
                let verb = if before < r { "ScaledOut" } else { "ScaledIn" };
                let name = valid.statefulset_name();
                actions.push((verb, format!("StatefulSet {name} replicas {before} → {r}")));
            }
        }
    }
    if !decision.remove_pods.is_empty() {
        let pods = pods_api(cr, ctx);
        for (name, uid) in &decision.remove_pods {
            pods.delete(name, Some(uid)).await?;
        }
        let names: Vec<&str> = decision
            .remove_pods
            .iter()
            .map(|(n, _)| n.as_str())
            .collect();
        actions.push((
            "LeavingPodsRemoved",
            format!(
                "deleted {}: past the StatefulSet's size and unready, which its OrderedReady controller would wait on forever",
                names.join(", ")
            ),
        ));
    }
    for action in &decision.live_config {
        if let Some(note) = apply_live_config(cr, valid, ctx, action).await? {
            actions.push(("ConfigApplied", note));
        }
    }
    if let Some((reason, _)) = actions.last() {
        let note: Vec<&str> = actions.iter().map(|(_, n)| n.as_str()).collect();
        publish(ctx, cr, EventType::Normal, reason, &note.join("; ")).await;
    }
    if let Some(stuck) = &decision.day2.roll_stuck {
        publish(ctx, cr, EventType::Warning, "RollingRestartStuck", stuck).await;
    }
    let cleaned = format!("service code {} removed from ZooKeeper", valid.service_code);
    applied.finalizer_removed = finish_deletion(cr, ctx, decision, Some(&cleaned)).await?;
    Ok(applied)
}

/// The cache pods of `cr`, deleted through the leader gate.
fn pods_api(cr: &ArcusMemcached, ctx: &Context) -> PodsApi {
    PodsApi {
        api: Api::namespaced(ctx.client.clone(), &namespace_of(cr)),
        gate: ctx.leader.clone(),
        metrics: ctx.metrics.clone(),
        caches: ctx.caches.clone(),
    }
}

/// Removes our finalizer when the decision says the deletion is done (after an Event saying
/// what was cleaned up). Returns whether it did.
async fn finish_deletion(
    cr: &ArcusMemcached,
    ctx: &Context,
    decision: &Decision,
    cleaned_up: Option<&str>,
) -> Result<bool, Error> {
    if !decision.remove_finalizer {
        return Ok(false);
    }
    if let Some(note) = cleaned_up {
        publish(ctx, cr, EventType::Normal, "ZooKeeperCleanedUp", note).await;
    }
    let api: Api<ArcusMemcached> = Api::namespaced(ctx.client.clone(), &namespace_of(cr));
    remove_finalizer(&api, cr, ctx).await?;
    Ok(true)
}

/// Runs the operation's step on the real effects, its copies reported to `status.migration`.
async fn run_step(
    cr: &ArcusMemcached,
    world: &World,
    step: &Step,
    ctx: &Context,
) -> Result<Ran, Error> {
    let (reporter, writer) = ProgressWriter::start(ctx, cr, &world.registry);
    let executor = Executor {
        registry: &world.registry,
        admin: &ArcusAdmin {
            gate: ctx.leader.clone(),
        },
        mover: &CacheMover {
            reporter: reporter.clone(),
            gate: ctx.leader.clone(),
        },
        pods: &pods_api(cr, ctx),
    };
    tracing::info!(cr = %name_of(cr), action = ?step.action, stage = step.operation.as_ref().map(|o| o.stage_name()), "operation step");
    let ran = executor.run(step).await;
    writer.stop(reporter).await;
    Ok(ran?)
}

/// Sets memlimit/connections on a running node and records it on the pod; a node that
/// refuses is reported (Warning Event) and left for the next pass.
async fn apply_live_config(
    cr: &ArcusMemcached,
    valid: &crate::validate::ValidSpec,
    ctx: &Context,
    action: &Day2Action,
) -> Result<Option<String>, Error> {
    let Day2Action::ApplyLiveConfig { pod, ip, from, to } = action else {
        return Ok(None);
    };
    let admin = ArcusAdmin {
        gate: ctx.leader.clone(),
    };
    let connections_changed = from.is_none_or(|f| f.connections != to.connections);
    let addr = format!("{ip}:{}", valid.port);
    let live = match admin
        .apply_live_config(&addr, *to, connections_changed)
        .await
    {
        Ok(live) => live,
        Err(e) => {
            let note = format!("{pod}: {}", super::ErrorChain(&e));
            publish(ctx, cr, EventType::Warning, "ConfigFailed", &note).await;
            return Ok(None);
        }
    };
    let failstop = if to.zk_failstop { "on" } else { "off" };
    let mut note = format!(
        "{pod}: zkfailstop {failstop}, memlimit {} MB",
        to.memlimit_mb
    );
    match (connections_changed, live) {
        (true, true) => note.push_str(&format!(", connections {}", to.connections)),
        (true, false) => note.push_str(&format!("; connections {} takes effect at the next restart (not changeable live on this server)", to.connections)),
        _ => {}
    }
    ctx.leader.check(|| format!("annotation of pod {pod}"))?;
    let patch =
        serde_json::json!({"metadata": {"annotations": {day2::APPLIED_CONFIG: to.to_string()}}});
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &valid.namespace);
    pods.patch(pod, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .or_kube("annotate", format_args!("pod {pod}"))?;
    ctx.metrics.api_write("Pod");
    Ok(Some(format!("{note}, without a restart")))
}

/// Server-side apply of the Service, the PDB, the ServiceMonitor (where served; deleted when
/// the spec no longer asks for one) and, last, the StatefulSet, which carries a hash of the
/// whole set: when the live StatefulSet has that hash and the wanted size, nothing is sent at
/// all (a steady state costs no write and no extra read). The StatefulSet goes last so pods
/// never start before their Service and budget exist.
async fn apply_objects(
    valid: &crate::validate::ValidSpec,
    ctx: &Context,
    objects: &Objects,
    live_sts: Option<&StatefulSet>,
) -> Result<(), Error> {
    let ns = valid.namespace.clone();
    let client = &ctx.client;
    let wanted_replicas = objects.statefulset.spec.as_ref().and_then(|s| s.replicas);
    let live_replicas = live_sts
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.replicas);
    let live_hash = live_sts.and_then(|s| s.annotations().get(APPLIED_HASH).cloned());
    let svc_api = Api::<Service>::namespaced(client.clone(), &ns);
    let pdb_api = Api::<PodDisruptionBudget>::namespaced(client.clone(), &ns);
    // The StatefulSet's hash covers the set but its size; the Service and PDB it does not live
    // on may have been deleted by hand since (from the stores, or two metadata reads).
    let companions_in_place = live_hash.as_deref() == Some(objects.hash.as_str()) && {
        let svc_name = objects.service.name_any();
        let pdb_name = objects.pdb.name_any();
        match ctx.caches.service_and_pdb_exist(&ns, &svc_name, &pdb_name) {
            Some(there) => there,
            None => service_and_pdb_exist(&svc_api, &svc_name, &pdb_api, &pdb_name).await?,
        }
    };
    if companions_in_place && live_replicas == wanted_replicas {
        return Ok(());
    }
    if !companions_in_place {
        // Independent of each other; both before the StatefulSet that needs them.
        tokio::try_join!(
            server_side_apply(ctx, &svc_api, &objects.service, "Service"),
            server_side_apply(ctx, &pdb_api, &objects.pdb, "PodDisruptionBudget"),
        )?;
        if ctx.capabilities.service_monitor {
            let sm_api: Api<DynamicObject> =
                Api::namespaced_with(client.clone(), &ns, &build::service_monitor_api_resource());
            match &objects.service_monitor {
                Some(sm) => {
                    server_side_apply(ctx, &sm_api, sm, "ServiceMonitor").await?;
                }
                None => delete_service_monitor(ctx, &sm_api, &valid.statefulset_name()).await?,
            }
        }
    }
    let mut sts = objects.statefulset.clone();
    sts.annotations_mut()
        .insert(APPLIED_HASH.into(), objects.hash.clone());
    let sts_api = Api::<StatefulSet>::namespaced(client.clone(), &ns);
    let applied = server_side_apply(ctx, &sts_api, &sts, "StatefulSet").await?;
    ctx.caches
        .applied_statefulset(&ns, &sts.name_any(), applied.metadata.generation);
    Ok(())
}

/// The Service and PDB read from the API (no store covers the namespace): two metadata reads.
async fn service_and_pdb_exist(
    svc_api: &Api<Service>,
    svc_name: &str,
    pdb_api: &Api<PodDisruptionBudget>,
    pdb_name: &str,
) -> Result<bool, Error> {
    let svc_there = svc_api.get_metadata_opt(svc_name).await;
    let svc_there = svc_there.or_kube("read", format_args!("Service {svc_name}"))?;
    if svc_there.is_none() {
        return Ok(false);
    }
    let pdb_there = pdb_api.get_metadata_opt(pdb_name).await;
    let pdb_there = pdb_there.or_kube("read", format_args!("PodDisruptionBudget {pdb_name}"))?;
    Ok(pdb_there.is_some())
}

/// The ServiceMonitor of a spec that no longer asks for one (absent is done).
async fn delete_service_monitor(
    ctx: &Context,
    api: &Api<DynamicObject>,
    name: &str,
) -> Result<(), Error> {
    ctx.leader
        .check(|| format!("delete of ServiceMonitor {name}"))?;
    match api.delete(name, &Default::default()).await {
        Ok(_) => ctx.metrics.api_write("ServiceMonitor"),
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e).or_kube("delete", format_args!("ServiceMonitor {name}")),
    }
    Ok(())
}

async fn server_side_apply<K>(ctx: &Context, api: &Api<K>, obj: &K, kind: &str) -> Result<K, Error>
where
    K: Resource + Serialize + Clone + std::fmt::Debug + serde::de::DeserializeOwned,
{
    let name = obj.name_any();
    ctx.leader.check(|| format!("apply of {kind} {name}"))?;
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let applied = api
        .patch(&name, &params, &Patch::Apply(obj))
        .await
        .or_kube("apply", format_args!("{kind} {name}"))?;
    ctx.metrics.api_write(kind);
    Ok(applied)
}

async fn scale_to_zero(valid: &crate::validate::ValidSpec, ctx: &Context) -> Result<(), Error> {
    let name = valid.statefulset_name();
    ctx.leader
        .check(|| format!("scale of StatefulSet {name}"))?;
    let api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), &valid.namespace);
    let patch = serde_json::json!({"spec": {"replicas": 0}});
    let scaled = api
        .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .or_kube("scale to 0", format_args!("StatefulSet {name}"))?;
    ctx.metrics.api_write("StatefulSet");
    ctx.caches
        .applied_statefulset(&valid.namespace, &name, scaled.metadata.generation);
    Ok(())
}

/// Stage 5: the status, when it differs from the stored one (not while deleting: the
/// resource is going). Returns whether it wrote.
pub async fn update_status(
    cr: &ArcusMemcached,
    ctx: &Context,
    world: &World,
    decision: &Decision,
) -> Result<bool, Error> {
    if decision.deleting && decision.conflict.is_none() {
        return Ok(false);
    }
    let parts = &decision.status;
    let conflict = decision.conflict.is_some();
    let empty = Default::default();
    let mut registered_nodes = world.zk.cache_list_children.clone();
    registered_nodes.sort();
    let input = StatusInput {
        desired: parts.desired,
        nodes: &world.nodes,
        registered: if conflict { &empty } else { &world.registered },
        registered_nodes: if conflict { vec![] } else { registered_nodes },
        blocking_error: parts.blocking_error.clone(),
        progress: parts.progress.clone(),
        zookeeper_problem: parts.zookeeper_problem.clone(),
        service_code: parts.service_code.clone(),
        operation: parts.operation.clone(),
    };
    write_status(cr, ctx, &input).await
}

/// Writes status (server-side apply on the subresource) only when it differs from the stored
/// one, and only over the version this pass read (resourceVersion): a status computed from an
/// older view never replaces a newer one. Returns whether it wrote (or must look again).
pub async fn write_status(
    cr: &ArcusMemcached,
    ctx: &Context,
    input: &StatusInput<'_>,
) -> Result<bool, Error> {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    apply_status(cr, ctx, status::compute(cr, input, now)).await
}

/// Writes `status` unless it is what the resource has already (see [`write_status`]).
pub async fn apply_status(
    cr: &ArcusMemcached,
    ctx: &Context,
    status: crate::crd::ArcusMemcachedStatus,
) -> Result<bool, Error> {
    if cr.status.as_ref() == Some(&status) {
        return Ok(false);
    }
    ctx.leader.check(|| format!("status of {}", name_of(cr)))?;
    let mut body = serde_json::to_value(&status).expect("status serializes");
    // Owned by the migration progress writer; a copy from a stale cache must not revert it.
    if let Some(b) = body.as_object_mut() {
        b.remove("migration");
    }
    let patch = serde_json::json!({
        "apiVersion": "jam2in.com/v1",
        "kind": "ArcusMemcached",
        "metadata": {"resourceVersion": cr.resource_version()},
        "status": body,
    });
    let api: Api<ArcusMemcached> = Api::namespaced(ctx.client.clone(), &namespace_of(cr));
    let params = PatchParams::apply(FIELD_MANAGER).force();
    match api
        .patch_status(&cr.name_any(), &params, &Patch::Apply(&patch))
        .await
    {
        Ok(_) => {}
        // Changed since this pass read it (our own progress writer, usually): the next pass
        // computes the status again from the newer object.
        Err(kube::Error::Api(e)) if e.code == 409 => return Ok(true),
        Err(e) => return Err(e).or_kube("update status of", name_of(cr)),
    }
    ctx.metrics.api_write("ArcusMemcachedStatus");
    Ok(true)
}

fn migrated_note(what: &str, p: &Progress) -> String {
    format!(
        "{what} migration: {}/{} items moved ({} updated, {} deleted, {} expired skipped, {} newer kept, {} failed)",
        p.items_moved, p.items_total, p.items_updated, p.items_deleted, p.items_skipped_expired, p.items_skipped_newer, p.items_failed
    )
}
