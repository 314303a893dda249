//! Pure builders of the Kubernetes objects an `ArcusMemcached` owns: the StatefulSet of cache
//! nodes, their headless Service, a PodDisruptionBudget and (with a metrics exporter) a
//! ServiceMonitor; plus the names every other step derives from the resource (pods, hostnames,
//! ZooKeeper mapping keys).
//!
//! Each builder takes a [`ValidSpec`] (so nothing unchecked reaches an object) and returns the
//! complete desired object for server-side apply: the same labels and a controller
//! ownerReference on everything. Nothing here talks to the API server or ZooKeeper; what is
//! applied, in which order, and what the ZooKeeper plan does belong to the controller.
//!
//! Compatibility: objects use no field newer than Kubernetes 1.33, the oldest version supported.

pub mod labels;
pub mod pdb;
pub mod service;
pub mod service_monitor;
pub mod statefulset;

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;

use crate::crd::ArcusMemcached;
use crate::validate::ValidSpec;

pub use labels::{INSTANCE as INSTANCE_LABEL, MANAGED_BY_SELECTOR};
pub use pdb::pdb;
pub use service::headless_service;
pub use service_monitor::{service_monitor, service_monitor_api_resource, SERVICE_MONITOR_CRD};
pub use statefulset::{command, readiness_script, statefulset};

/// Appended to the resource name to name the StatefulSet and the headless Service (the seed's
/// pods are `test-arcus-mc-N`).
pub const STATEFULSET_SUFFIX: &str = "-arcus-mc";
/// Name of the arcus-memcached container in every cache pod.
pub const CONTAINER_NAME: &str = "arcus-memcached";
/// Name of the memcached port on containers and Service.
pub const PORT_NAME: &str = "memcached";
/// Name of the exporter's port on containers and Service.
pub const METRICS_PORT_NAME: &str = "metrics";
/// Name of the metrics exporter sidecar.
pub const EXPORTER_CONTAINER_NAME: &str = "metrics-exporter";

/// Where the arcus-memcached image keeps its server and modules (naver/arcus layout).
pub mod arcus_paths {
    pub const MEMCACHED_BIN: &str = "/arcus/bin/memcached";
    pub const DEFAULT_ENGINE: &str = "/arcus/lib/default_engine.so";
    pub const ASCII_SCRUB: &str = "/arcus/lib/ascii_scrub.so";
}

/// Environment of the arcus-memcached container (read by arcus-memcached itself).
pub mod env {
    /// The pod's name (downward API), used to compose the hostname below.
    pub const POD_NAME: &str = "ARCUS_POD_NAME";
    /// The hostname the node registers with and looks its mapping up by (`<pod>.<namespace>`).
    pub const HOSTNAME_OVERWRITE: &str = "ARCUS_CACHE_HOSTNAME_OVERWRITE";
    /// The IP the node registers in `cache_list` (= pod IP; its own guess can be wrong).
    pub const PUBLIC_IP: &str = "ARCUS_CACHE_PUBLIC_IP";
}

/// `<name>-arcus-mc`: the StatefulSet, its headless Service, PDB and ServiceMonitor.
pub fn statefulset_name(cr: &ArcusMemcached) -> String {
    sts_name(&cr.name_any())
}

/// `<name>-arcus-mc-<ordinal>`.
pub fn pod_name(cr: &ArcusMemcached, ordinal: u32) -> String {
    format!("{}-{ordinal}", statefulset_name(cr))
}

/// The same names, from a validated spec.
impl ValidSpec {
    pub fn statefulset_name(&self) -> String {
        sts_name(&self.name)
    }
    pub fn pod_name(&self, ordinal: u32) -> String {
        format!("{}-{ordinal}", self.statefulset_name())
    }
    /// The hostname the node registers with and is mapped by: `<pod>.<namespace>`. A pod's own
    /// hostname is only its name, which repeats across namespaces, while one ZooKeeper ensemble
    /// commonly serves many namespaces; qualifying it keeps mappings apart. (At most
    /// 56 + 1 + 63 characters: within arcus-memcached's 200-byte znode path buffers.)
    pub fn pod_hostname(&self, ordinal: u32) -> String {
        format!("{}.{}", self.pod_name(ordinal), self.namespace)
    }
    pub fn mapping_key(&self, ordinal: u32) -> String {
        format!("{}:{}", self.pod_hostname(ordinal), self.port)
    }
}

/// The selector labels of the resource's pods (`app.kubernetes.io/name`, `app.kubernetes.io/instance`).
pub fn selector_labels(cr: &ArcusMemcached) -> BTreeMap<String, String> {
    labels::selector_labels(&cr.name_any())
}

fn sts_name(name: &str) -> String {
    format!("{name}{STATEFULSET_SUFFIX}")
}

/// A stable hash (FNV-1a over the JSON) of an object: marks what was applied or built.
pub fn content_hash<T: serde::Serialize>(obj: &T) -> String {
    let bytes = serde_json::to_vec(obj).expect("object serializes");
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}")
}

/// Name, namespace, the common labels and the controller ownerReference.
fn object_meta(spec: &ValidSpec, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: Some(spec.namespace.clone()),
        labels: Some(labels::labels(spec)),
        owner_references: Some(vec![spec.owner.clone()]),
        ..Default::default()
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use std::path::PathBuf;

    use crate::crd::tests::seed_cr;
    use crate::validate::{validate, ValidSpec};

    /// The seed's CR, validated.
    pub(crate) fn seed_spec() -> ValidSpec {
        validate(&seed_cr()).unwrap()
    }

    /// Compares `value` as YAML with `src/build/snapshots/<name>.yaml`; with
    /// `UPDATE_SNAPSHOTS=1` rewrites the file instead.
    pub(crate) fn assert_snapshot(name: &str, value: &impl serde::Serialize) {
        let yaml = serde_saphyr::to_string(value).unwrap();
        let path: PathBuf = [
            env!("CARGO_MANIFEST_DIR"),
            "src",
            "build",
            "snapshots",
            &format!("{name}.yaml"),
        ]
        .iter()
        .collect();
        if std::env::var_os("UPDATE_SNAPSHOTS").is_some_and(|v| v == "1") {
            std::fs::write(&path, &yaml).unwrap();
            return;
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_default();
        if expected != yaml {
            let diff: Vec<String> = diff_lines(&expected, &yaml);
            panic!(
                "snapshot {} differs (rerun with UPDATE_SNAPSHOTS=1 to accept):\n{}",
                path.display(),
                diff.join("\n")
            );
        }
    }

    /// A crude line diff: enough to see what changed in a failing test's output.
    fn diff_lines(old: &str, new: &str) -> Vec<String> {
        let (o, n): (Vec<_>, Vec<_>) = (old.lines().collect(), new.lines().collect());
        let mut out = Vec::new();
        for i in 0..o.len().max(n.len()) {
            match (o.get(i), n.get(i)) {
                (Some(a), Some(b)) if a == b => {}
                (a, b) => {
                    if let Some(a) = a {
                        out.push(format!("{:>4} - {a}", i + 1));
                    }
                    if let Some(b) = b {
                        out.push(format!("{:>4} + {b}", i + 1));
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::seed_spec;
    use super::*;
    use crate::crd::tests::seed_cr;

    #[test]
    fn names_follow_the_seed() {
        let cr = seed_cr();
        assert_eq!(statefulset_name(&cr), "test-arcus-mc");
        assert_eq!(pod_name(&cr, 0), "test-arcus-mc-0");
        let spec = seed_spec();
        assert_eq!(spec.statefulset_name(), "test-arcus-mc");
        assert_eq!(spec.pod_name(1), pod_name(&cr, 1));
        assert_eq!(
            spec.pod_hostname(4),
            format!("test-arcus-mc-4.{}", spec.namespace)
        );
        assert_eq!(
            spec.mapping_key(2),
            format!("test-arcus-mc-2.{}:11211", spec.namespace)
        );
        assert_eq!(selector_labels(&cr), labels::selector_labels("test"));
    }

    #[test]
    fn every_object_has_the_labels_and_the_owner() {
        let spec = seed_spec();
        let expected = labels::labels(&spec);
        let sts = statefulset(&spec, 3).metadata;
        let svc = headless_service(&spec).metadata;
        let pdb = pdb(&spec).metadata;
        let mut with_exporter = spec.clone();
        with_exporter.metrics_exporter = Some(crate::crd::MetricsExporter {
            image: "prom/memcached-exporter:v0.15.3".into(),
            port: 9150,
            interval: "30s".into(),
        });
        let sm = service_monitor(&with_exporter).unwrap().metadata;
        for meta in [sts, svc, pdb, sm] {
            assert_eq!(meta.name.as_deref(), Some("test-arcus-mc"));
            assert_eq!(meta.namespace.as_deref(), Some("default"));
            assert_eq!(meta.labels.as_ref(), Some(&expected));
            let owners = meta.owner_references.unwrap();
            assert_eq!(owners.len(), 1);
            let o = &owners[0];
            assert_eq!(
                (o.api_version.as_str(), o.kind.as_str(), o.name.as_str()),
                ("jam2in.com/v1", "ArcusMemcached", "test")
            );
            assert_eq!(o.uid, "6f1c2b1e-0000-4000-8000-000000000001");
            assert_eq!(o.controller, Some(true));
        }
    }
}
