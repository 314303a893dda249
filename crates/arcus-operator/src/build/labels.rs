//! The labels on everything the operator builds for an `ArcusMemcached`. The selector labels
//! (name + instance) pick a resource's pods and never change; the full set also says who manages
//! the object and which service code it serves, so orphans can be found by label.

use std::collections::BTreeMap;

use crate::validate::ValidSpec;

pub const NAME: &str = "app.kubernetes.io/name";
pub const INSTANCE: &str = "app.kubernetes.io/instance";
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
pub const SERVICE_CODE: &str = "jam2in.com/service-code";

/// Value of [`NAME`].
pub const APP_NAME: &str = "arcus-memcached";
/// Value of [`MANAGED_BY`].
pub const MANAGER: &str = "arcus-operator";

/// Selects everything any instance of the operator manages (for watches).
pub const MANAGED_BY_SELECTOR: &str = "app.kubernetes.io/managed-by=arcus-operator";

/// Keys users may not set through `spec.podLabels` (refused by a CEL rule of the CRD and by
/// `validate`).
pub const RESERVED: [&str; 4] = [NAME, INSTANCE, MANAGED_BY, SERVICE_CODE];

/// Whether `key` is one of the operator's own labels.
pub fn is_reserved_key(key: &str) -> bool {
    RESERVED.contains(&key)
}

/// `app.kubernetes.io/name` and `app.kubernetes.io/instance`: the StatefulSet's, Service's and
/// PDB's selector. Immutable once a StatefulSet exists, so it holds only the resource name.
pub fn selector_labels(cr_name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (NAME.to_string(), APP_NAME.to_string()),
        (INSTANCE.to_string(), cr_name.to_string()),
    ])
}

/// [`selector_labels`] as a label selector string, for list and watch calls.
pub fn selector_string(cr_name: &str) -> String {
    selector_labels(cr_name)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The labels of every built object: the selector labels, `managed-by` and the service code.
///
/// A service code that is not a valid label value (longer than 63 characters, or ending in
/// `-`, `_` or `.`, which ARCUS allows) is left out of the labels rather than mangled.
pub fn labels(spec: &ValidSpec) -> BTreeMap<String, String> {
    let mut labels = selector_labels(&spec.name);
    labels.insert(MANAGED_BY.to_string(), MANAGER.to_string());
    let code = spec.service_code.as_str();
    if code.len() <= 63 && code.ends_with(|c: char| c.is_ascii_alphanumeric()) {
        labels.insert(SERVICE_CODE.to_string(), code.to_string());
    }
    labels
}

/// The pod template's labels: `spec.podLabels` plus [`labels`] (validation refuses user labels
/// that would override the operator's).
pub fn pod_labels(spec: &ValidSpec) -> BTreeMap<String, String> {
    let mut out = spec.pod_labels.clone();
    out.extend(labels(spec));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::test_util::seed_spec;

    #[test]
    fn seed_labels() {
        let spec = seed_spec();
        assert_eq!(
            labels(&spec),
            BTreeMap::from([
                (
                    "app.kubernetes.io/name".to_string(),
                    "arcus-memcached".to_string()
                ),
                ("app.kubernetes.io/instance".to_string(), "test".to_string()),
                (
                    "app.kubernetes.io/managed-by".to_string(),
                    "arcus-operator".to_string()
                ),
                ("jam2in.com/service-code".to_string(), "test".to_string()),
            ])
        );
        assert_eq!(MANAGED_BY_SELECTOR, format!("{MANAGED_BY}={MANAGER}"));
        assert_eq!(
            selector_string("test"),
            "app.kubernetes.io/instance=test,app.kubernetes.io/name=arcus-memcached"
        );
    }

    #[test]
    fn service_code_unfit_for_a_label_is_left_out() {
        let mut spec = seed_spec();
        spec.service_code = crate::validate::tests_support::service_code(&"s".repeat(64));
        assert!(!labels(&spec).contains_key(SERVICE_CODE));
        spec.service_code = crate::validate::tests_support::service_code("svc-");
        assert!(!labels(&spec).contains_key(SERVICE_CODE));
    }

    #[test]
    fn pod_labels_add_user_labels() {
        let mut spec = seed_spec();
        spec.pod_labels.insert("team".into(), "cache".into());
        let l = pod_labels(&spec);
        assert_eq!(l.get("team").map(String::as_str), Some("cache"));
        assert_eq!(l.get(INSTANCE).map(String::as_str), Some("test"));
    }
}
