//! What the operator owns, as its watches see it: one reflector store per kind and watched
//! namespace, kept by the same watches whose events trigger the controller. A pass reads
//! these stores instead of the API server, so a resync of a settled resource sends nothing.
//!
//! A store lags the API server by the watch latency. Two of our own writes matter for the
//! state machine and are remembered until the watch shows them:
//! - the StatefulSet generation we applied: an older cached one is read from the API instead
//!   (a pass must never size the ring from a StatefulSet that predates its own last write);
//! - the pods we deleted: a cached copy without its deletion timestamp is treated as
//!   terminating.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::ResourceExt;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a deleted pod's uid is remembered: far longer than any watch delay.
const DELETED_POD_MEMORY: Duration = Duration::from_secs(600);

/// The stores of one watched namespace (`None`: all namespaces).
#[derive(Clone)]
pub struct NamespaceStores {
    pub namespace: Option<String>,
    pub statefulsets: Store<StatefulSet>,
    pub pods: Store<Pod>,
    pub services: Store<Service>,
    pub pdbs: Store<PodDisruptionBudget>,
}

impl NamespaceStores {
    fn covers(&self, ns: &str) -> bool {
        self.namespace.as_deref().is_none_or(|n| n == ns)
    }
}

#[derive(Default)]
pub struct Caches {
    stores: Vec<NamespaceStores>,
    /// (namespace, StatefulSet) → the generation our last apply returned.
    applied_generation: Mutex<HashMap<(String, String), i64>>,
    /// uid → when we deleted the pod.
    deleted_pods: Mutex<HashMap<String, Instant>>,
}

/// A cached StatefulSet, or why the API must be asked instead.
pub enum CachedStatefulSet {
    Found(Option<Arc<StatefulSet>>),
    /// The store has not yet seen our last apply of it.
    Stale,
}

impl Caches {
    pub fn new(stores: Vec<NamespaceStores>) -> Caches {
        Caches {
            stores,
            ..Caches::default()
        }
    }

    fn stores_for(&self, ns: &str) -> Option<&NamespaceStores> {
        self.stores.iter().find(|s| s.covers(ns))
    }

    /// Waits (up to `timeout`) until the stores covering `ns` have listed their objects once:
    /// at start, or never when a watch keeps failing (RBAC, say). False when they have not.
    pub async fn ready_for(&self, ns: &str, timeout: Duration) -> bool {
        let Some(s) = self.stores_for(ns) else {
            return true;
        };
        let listed = async {
            s.statefulsets.wait_until_ready().await.is_ok()
                && s.pods.wait_until_ready().await.is_ok()
                && s.services.wait_until_ready().await.is_ok()
                && s.pdbs.wait_until_ready().await.is_ok()
        };
        tokio::time::timeout(timeout, listed).await.unwrap_or(false)
    }

    pub fn statefulset(&self, ns: &str, name: &str) -> CachedStatefulSet {
        let Some(stores) = self.stores_for(ns) else {
            return CachedStatefulSet::Stale;
        };
        let cached = stores.statefulsets.get(&ObjectRef::new(name).within(ns));
        let applied = self
            .applied_generation
            .lock()
            .expect("generation lock")
            .get(&(ns.to_string(), name.to_string()))
            .copied();
        let seen = cached.as_ref().and_then(|s| s.metadata.generation);
        match (applied, seen) {
            (Some(a), Some(s)) if s < a => CachedStatefulSet::Stale,
            (Some(_), None) => CachedStatefulSet::Stale,
            _ => CachedStatefulSet::Found(cached),
        }
    }

    /// Remembers what our apply of a StatefulSet returned (`None`: deleted or scaled by us).
    pub fn applied_statefulset(&self, ns: &str, name: &str, generation: Option<i64>) {
        let mut map = self.applied_generation.lock().expect("generation lock");
        let key = (ns.to_string(), name.to_string());
        match generation {
            Some(g) => {
                map.insert(key, g);
            }
            None => {
                map.remove(&key);
            }
        }
    }

    /// The pods of `ns` carrying all of `labels`, with the ones we deleted marked terminating.
    pub fn pods(&self, ns: &str, labels: &BTreeMap<String, String>) -> Option<Vec<Pod>> {
        let stores = self.stores_for(ns)?;
        let mut deleted = self.deleted_pods.lock().expect("deleted pods lock");
        deleted.retain(|_, at| at.elapsed() < DELETED_POD_MEMORY);
        let pods = stores
            .pods
            .state_filter(|p| {
                p.namespace().as_deref() == Some(ns)
                    && labels.iter().all(|(k, v)| p.labels().get(k) == Some(v))
            })
            .into_iter()
            .map(|p| {
                let mut p = Arc::unwrap_or_clone(p);
                let ours = p.uid().is_some_and(|u| deleted.contains_key(&u));
                if ours && p.metadata.deletion_timestamp.is_none() {
                    p.metadata.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::now()));
                }
                p
            })
            .collect();
        Some(pods)
    }

    pub fn deleted_pod(&self, uid: &str) {
        self.deleted_pods
            .lock()
            .expect("deleted pods lock")
            .insert(uid.to_string(), Instant::now());
    }

    /// Whether the Service and the PDB named are in the stores (`None`: not watched here).
    pub fn service_and_pdb_exist(&self, ns: &str, service: &str, pdb: &str) -> Option<bool> {
        let stores = self.stores_for(ns)?;
        let svc = stores.services.get(&ObjectRef::new(service).within(ns));
        let pdb = stores.pdbs.get(&ObjectRef::new(pdb).within(ns));
        Some(svc.is_some() && pdb.is_some())
    }
}
