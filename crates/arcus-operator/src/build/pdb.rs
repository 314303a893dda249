//! The PodDisruptionBudget `<name>-arcus-mc`: voluntary evictions (node drains) take one cache
//! node at a time, so at most one node's share of the keys is cold at once.

use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{labels, object_meta};
use crate::validate::ValidSpec;

/// The PDB (`policy/v1`): `maxUnavailable: 1` over the cache pods.
pub fn pdb(spec: &ValidSpec) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: object_meta(spec, spec.statefulset_name()),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(labels::selector_labels(&spec.name)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        status: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::test_util::{assert_snapshot, seed_spec};

    #[test]
    fn seed_pdb_snapshot() {
        assert_snapshot("pdb_v1_seed", &pdb(&seed_spec()));
    }

    #[test]
    fn one_node_at_a_time_over_the_cache_pods() {
        // Through JSON, as the API server receives it: apiVersion/kind are set, minAvailable is
        // absent (a PDB takes only one of the two).
        let json = serde_json::to_value(pdb(&seed_spec())).unwrap();
        assert_eq!(json["apiVersion"], "policy/v1");
        assert_eq!(json["kind"], "PodDisruptionBudget");
        assert_eq!(json["spec"]["maxUnavailable"], 1);
        assert!(json["spec"].get("minAvailable").is_none());
        let typed: PodDisruptionBudget = serde_json::from_value(json).unwrap();
        assert_eq!(
            typed.spec.unwrap().selector.unwrap().match_labels,
            Some(labels::selector_labels("test"))
        );
    }
}
