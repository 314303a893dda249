//! Stage 2: every read one pass needs, each made once, and the per-pod views built once.

use super::cache::CachedStatefulSet;
use super::{namespace_of, Context, Error, KubeContext};
use crate::build;
use crate::crd::ArcusMemcached;
use crate::day2::{self, LiveConfig, NodePod};
use crate::migrate::{ArcusAdmin, NodeAdmin, ZkMembership};
use crate::operation::{self, Operation, PodState};
use crate::status::{self, NodeView};
use crate::validate::ValidSpec;
use crate::zk::{ObserveRequest, ServiceClaim, ZkPool, ZkRegistry};
use crate::zk_auth::{OwnedAcls, ZkAuth};
use crate::zk_plan::{self, CacheZnode, ZkObserved};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use std::collections::BTreeSet;
use std::sync::Arc;

/// How long a pass waits for the watches of its namespace to list their objects (at start).
const WATCH_LISTED_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

/// The world as one pass read it.
pub struct World {
    pub deleting: bool,
    /// Replicas the spec asks for (0 while deleting).
    pub desired: u32,
    pub statefulset: Option<StatefulSet>,
    /// The cache pods by ordinal.
    pub pods: Vec<(u32, Pod)>,
    pub zk: ZkObserved,
    /// The operation recorded in the claim.
    pub operation: Option<Operation>,
    /// The ring: `cache_list/<svc>` registrations, parsed.
    pub ring: Vec<CacheZnode>,
    /// Registered hostnames.
    pub registered: BTreeSet<String>,
    pub nodes: Vec<NodeView>,
    pub pod_states: Vec<PodState>,
    pub day2_pods: Vec<NodePod>,
    pub claim: ServiceClaim,
    /// Every ZooKeeper read and write for this service code.
    pub registry: ZkRegistry,
}

impl World {
    pub fn statefulset_replicas(&self) -> Option<u32> {
        let spec = self.statefulset.as_ref()?.spec.as_ref()?;
        spec.replicas.map(|r| r.max(0) as u32)
    }
}

pub async fn observe(
    cr: &ArcusMemcached,
    valid: &ValidSpec,
    ctx: &Context,
) -> Result<World, Error> {
    let ns = namespace_of(cr);
    let deleting = cr.metadata.deletion_timestamp.is_some();
    let desired = if deleting {
        0
    } else {
        cr.spec.replicas.max(0) as u32
    };
    let sts_name = valid.statefulset_name();
    if !ctx.caches.ready_for(&ns, WATCH_LISTED_WITHIN).await {
        return Err(Error::NotWatched {
            namespace: ns,
            waited: WATCH_LISTED_WITHIN,
        });
    }
    let statefulset = statefulset(ctx, &ns, &sts_name).await?;
    let pods = cache_pods(ctx, cr, &sts_name).await?;

    let sts_replicas = statefulset
        .as_ref()
        .and_then(|s| s.spec.as_ref())
        .and_then(|s| s.replicas)
        .map(|r| r.max(0) as u32);
    let (registry, claim, zk, operation) =
        observe_zookeeper(cr, valid, ctx, desired, sts_replicas).await?;
    let ring = CacheZnode::parse_all(&zk.cache_list_children);
    let registered: BTreeSet<String> = ring.iter().map(|z| z.host().to_string()).collect();
    let nodes = pods
        .iter()
        .map(|(o, p)| status::node_view(p, *o, valid.pod_hostname(*o)))
        .collect();
    let mut pod_states: Vec<PodState> = pods.iter().map(|(o, p)| pod_state(valid, *o, p)).collect();
    probe_rejoin(
        &ArcusAdmin {
            gate: ctx.leader.clone(),
        },
        operation.as_ref(),
        &ring,
        &mut pod_states,
    )
    .await;
    let now = k8s_openapi::jiff::Timestamp::now();
    let day2_pods = pods
        .iter()
        .map(|(o, p)| node_pod(valid, &registered, *o, p, now))
        .collect();
    Ok(World {
        deleting,
        desired,
        statefulset,
        pods,
        zk,
        operation,
        ring,
        registered,
        nodes,
        pod_states,
        day2_pods,
        claim,
        registry,
    })
}

/// The ZooKeeper side: the session, the registry for this service code, what it holds.
async fn observe_zookeeper(
    cr: &ArcusMemcached,
    valid: &ValidSpec,
    ctx: &Context,
    desired: u32,
    sts_replicas: Option<u32>,
) -> Result<(ZkRegistry, ServiceClaim, ZkObserved, Option<Operation>), Error> {
    let svc = valid.service_code.as_str();
    let ensemble = ZkPool::ensemble(&cr.spec.zookeeper_servers);
    ctx.by_service.lock().expect("service index lock").insert(
        (ensemble.clone(), svc.to_string()),
        kube::runtime::reflector::ObjectRef::from_obj(cr),
    );
    let uid = cr.uid().unwrap_or_default();
    let claim = ServiceClaim {
        managed_by: ServiceClaim::MANAGER.into(),
        namespace: namespace_of(cr),
        name: cr.name_any(),
        uid: uid.clone(),
    };
    let auth = match &valid.zookeeper_auth_secret {
        Some(secret) => Some(zookeeper_auth(ctx, &namespace_of(cr), secret).await?),
        None => None,
    };
    let session = ctx.zk.session(&ensemble, auth.as_ref()).await?;
    let registry = ZkRegistry::new(
        session,
        &ensemble,
        svc,
        claim.clone(),
        ctx.leader.clone(),
        ctx.metrics.clone(),
        OwnedAcls::of(auth.as_ref()),
    );
    let recorded = cr
        .status
        .as_ref()
        .and_then(|s| s.operation.as_ref())
        .map(|o| o.from_replicas.max(o.to_replicas).max(0) as u32);
    let mapping_key = |o: u32| valid.mapping_key(o);
    let (zk, operation) = registry
        .observe(&ObserveRequest {
            our_uid: &uid,
            mapping_key: &mapping_key,
            read_upto: zk_plan::ordinals_to_read(desired, sts_replicas, recorded.unwrap_or(0)),
        })
        .await?;
    Ok((registry, claim, zk, operation))
}

/// The digest credentials of `spec.zookeeperAuth`: the Secret's `username` and `password`.
/// Read on every pass that needs ZooKeeper (one GET), so a rotated password is used at once.
async fn zookeeper_auth(ctx: &Context, ns: &str, secret: &str) -> Result<ZkAuth, Error> {
    let unusable = |why: String| Error::ZookeeperAuth {
        secret: format!("{ns}/{secret}"),
        why,
    };
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let found = match api.get_opt(secret).await {
        Ok(found) => found,
        Err(kube::Error::Api(e)) if e.code == 403 => {
            return Err(unusable(
                "the operator may not read it: name it in the Helm value zookeeperAuth.secretNames (deploy/rbac.yaml allows arcus-zookeeper-auth only)".into(),
            ))
        }
        Err(source) => {
            return Err(Error::Kube {
                action: "get",
                object: format!("Secret {ns}/{secret}"),
                source,
            })
        }
    };
    let Some(found) = found else {
        return Err(unusable(
            "it does not exist; create it with the keys username and password".into(),
        ));
    };
    let data = found.data.unwrap_or_default();
    let field = |key: &str| match data.get(key).map(|b| String::from_utf8(b.0.clone())) {
        Some(Ok(v)) if !v.is_empty() => Ok(v),
        _ => Err(unusable(format!(
            "its key {key} is missing, empty or not UTF-8"
        ))),
    };
    let user = field("username")?;
    if user.contains(':') {
        return Err(unusable(
            "its username contains ':', which a digest credential cannot".into(),
        ));
    }
    let auth = ZkAuth::new(user, field("password")?);
    // A password change: the tree is still secured with this one until the next pass moves it.
    Ok(match field("previousPassword") {
        Ok(previous) => auth.with_previous(previous),
        Err(_) => auth,
    })
}

/// Asks the nodes the state machine needs to know about whether they know `zkensemble`.
async fn probe_rejoin(
    admin: &impl NodeAdmin,
    op: Option<&Operation>,
    ring: &[CacheZnode],
    pods: &mut [PodState],
) {
    for ordinal in operation::pods_to_probe(op, ring, pods) {
        let Some(p) = pods.iter_mut().find(|p| p.ordinal == ordinal) else {
            continue;
        };
        if let Some(addr) = &p.addr {
            let m = admin.membership(addr).await;
            p.can_rejoin = m.map(ZkMembership::can_rejoin);
            p.detached = m == Some(ZkMembership::NoSession);
        }
    }
}

fn pod_state(valid: &ValidSpec, ordinal: u32, p: &Pod) -> PodState {
    let status = p.status.as_ref();
    let running = status
        .and_then(|s| s.container_statuses.as_ref())
        .is_some_and(|c| {
            !c.is_empty()
                && c.iter()
                    .all(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
        });
    PodState {
        ordinal,
        name: p.name_any(),
        uid: p.uid().unwrap_or_default(),
        host: valid.pod_hostname(ordinal),
        addr: status
            .and_then(|s| s.pod_ip.as_ref())
            .map(|ip| format!("{ip}:{}", valid.port)),
        running,
        terminating: p.metadata.deletion_timestamp.is_some(),
        can_rejoin: None,
        detached: false,
    }
}

fn node_pod(
    valid: &ValidSpec,
    registered: &BTreeSet<String>,
    ordinal: u32,
    p: &Pod,
    now: k8s_openapi::jiff::Timestamp,
) -> NodePod {
    let secs_since = |t: &Time| (now.as_second() - t.0.as_second()).max(0);
    let annotations = p.metadata.annotations.clone().unwrap_or_default();
    let ready_cond = crate::status::ready_condition(p);
    let status = p.status.clone().unwrap_or_default();
    let config = |key: &str| annotations.get(key).and_then(|s| LiveConfig::parse(s));
    NodePod {
        ordinal,
        name: p.name_any(),
        ip: status.pod_ip,
        restart_hash: annotations.get(day2::RESTART_HASH).cloned(),
        started: config(day2::STARTED_CONFIG),
        applied: config(day2::APPLIED_CONFIG),
        ready: ready_cond.is_some(),
        registered: registered.contains(&valid.pod_hostname(ordinal)),
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
}

/// The StatefulSet from the watch's store; from the API when the store has not seen our own
/// last apply yet, or no store covers the namespace.
async fn statefulset(ctx: &Context, ns: &str, name: &str) -> Result<Option<StatefulSet>, Error> {
    if let CachedStatefulSet::Found(sts) = ctx.caches.statefulset(ns, name) {
        return Ok(sts.map(Arc::unwrap_or_clone));
    }
    let api: Api<StatefulSet> = Api::namespaced(ctx.client.clone(), ns);
    api.get_opt(name)
        .await
        .or_kube("read", format_args!("StatefulSet {ns}/{name}"))
}

/// The resource's pods by ordinal, from the watch's store (or the API when none covers the
/// namespace).
async fn cache_pods(
    ctx: &Context,
    cr: &ArcusMemcached,
    sts_name: &str,
) -> Result<Vec<(u32, Pod)>, Error> {
    let ns = namespace_of(cr);
    let labels = build::selector_labels(cr);
    let pods = match ctx.caches.pods(&ns, &labels) {
        Some(pods) => pods,
        None => {
            let selector = labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",");
            let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
            api.list(&ListParams::default().labels(&selector))
                .await
                .or_kube("list", format_args!("pods {ns}/{selector}"))?
                .items
        }
    };
    let prefix = format!("{sts_name}-");
    let mut pods: Vec<(u32, Pod)> = pods
        .into_iter()
        .filter_map(|p| {
            let ordinal = p.name_any().strip_prefix(&prefix)?.parse().ok()?;
            Some((ordinal, p))
        })
        .collect();
    // The store has no order; the API lists by name (passes must not depend on either).
    pods.sort_by_key(|(o, _)| *o);
    Ok(pods)
}
