//! The PodDisruptionBudget `<name>-arcus-mc`: voluntary evictions (node drains) take one cache
//! node at a time, so at most one node's share of the keys is cold at once.
//!
//! Built as a [`DynamicObject`] because the API depends on the server: `policy/v1` from
//! Kubernetes 1.21, `policy/v1beta1` before (the sandbox runs 1.20). The fields used are the
//! same in both.

use kube::core::{ApiResource, DynamicObject, GroupVersionKind, TypeMeta};

use super::{labels, object_meta};
use crate::validate::ValidSpec;

/// Which PodDisruptionBudget API the server serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PdbApi {
    /// `policy/v1` (Kubernetes ≥ 1.21).
    V1,
    /// `policy/v1beta1` (Kubernetes ≤ 1.24; the only one before 1.21).
    V1Beta1,
}

impl PdbApi {
    pub fn version(self) -> &'static str {
        match self {
            PdbApi::V1 => "v1",
            PdbApi::V1Beta1 => "v1beta1",
        }
    }

    /// The resource to build an `Api<DynamicObject>` with.
    pub fn api_resource(self) -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("policy", self.version(), "PodDisruptionBudget"),
            "poddisruptionbudgets",
        )
    }
}

/// The PDB: `maxUnavailable: 1` over the cache pods.
pub fn pdb(spec: &ValidSpec, api: PdbApi) -> DynamicObject {
    let resource = api.api_resource();
    DynamicObject {
        types: Some(TypeMeta {
            api_version: resource.api_version,
            kind: resource.kind,
        }),
        metadata: object_meta(spec, spec.statefulset_name()),
        data: serde_json::json!({
            "spec": {
                "maxUnavailable": 1,
                "selector": {"matchLabels": labels::selector_labels(&spec.name)},
            }
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::test_util::{assert_snapshot, seed_spec};
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;

    #[test]
    fn seed_pdb_snapshots() {
        assert_snapshot("pdb_v1_seed", &pdb(&seed_spec(), PdbApi::V1));
        assert_snapshot("pdb_v1beta1_seed", &pdb(&seed_spec(), PdbApi::V1Beta1));
    }

    #[test]
    fn api_versions() {
        let v1 = pdb(&seed_spec(), PdbApi::V1);
        assert_eq!(v1.types.as_ref().unwrap().api_version, "policy/v1");
        let beta = pdb(&seed_spec(), PdbApi::V1Beta1);
        assert_eq!(beta.types.as_ref().unwrap().api_version, "policy/v1beta1");
        assert_eq!(v1.data, beta.data);
        assert_eq!(
            PdbApi::V1Beta1.api_resource().plural,
            "poddisruptionbudgets"
        );
    }

    #[test]
    fn is_a_valid_policy_v1_pdb() {
        let typed: PodDisruptionBudget =
            serde_json::from_value(serde_json::to_value(pdb(&seed_spec(), PdbApi::V1)).unwrap())
                .unwrap();
        let spec = typed.spec.unwrap();
        assert_eq!(
            spec.max_unavailable,
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
        );
        assert_eq!(spec.min_available, None);
        assert_eq!(
            spec.selector.unwrap().match_labels,
            Some(labels::selector_labels("test"))
        );
    }
}
