//! The ServiceMonitor `<name>-arcus-mc` (monitoring.coreos.com/v1) for the Prometheus Operator:
//! scrape the exporter sidecars through the headless Service's `metrics` port. Built only when
//! `spec.metricsExporter` is set; the controller applies it only where the ServiceMonitor CRD
//! is installed.

use kube::core::{ApiResource, DynamicObject, GroupVersionKind, TypeMeta};

use super::{labels, object_meta, METRICS_PORT_NAME};
use crate::validate::ValidSpec;

/// Name of the CRD whose presence means ServiceMonitors can be applied.
pub const SERVICE_MONITOR_CRD: &str = "servicemonitors.monitoring.coreos.com";

/// The resource to build an `Api<DynamicObject>` with.
pub fn service_monitor_api_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("monitoring.coreos.com", "v1", "ServiceMonitor"),
        "servicemonitors",
    )
}

/// The ServiceMonitor, or `None` when the spec has no metrics exporter (nothing to scrape).
pub fn service_monitor(spec: &ValidSpec) -> Option<DynamicObject> {
    let exporter = spec.metrics_exporter.as_ref()?;
    let resource = service_monitor_api_resource();
    Some(DynamicObject {
        types: Some(TypeMeta {
            api_version: resource.api_version,
            kind: resource.kind,
        }),
        metadata: object_meta(spec, spec.statefulset_name()),
        data: serde_json::json!({
            "spec": {
                "selector": {"matchLabels": labels::selector_labels(&spec.name)},
                "namespaceSelector": {"matchNames": [spec.namespace]},
                "endpoints": [{"port": METRICS_PORT_NAME, "interval": exporter.interval}],
            }
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::test_util::{assert_snapshot, seed_spec};
    use crate::crd::MetricsExporter;

    #[test]
    fn none_without_exporter() {
        assert!(service_monitor(&seed_spec()).is_none());
    }

    #[test]
    fn seed_with_exporter_snapshot() {
        let mut spec = seed_spec();
        spec.metrics_exporter = Some(MetricsExporter {
            image: "prom/memcached-exporter:v0.15.3".into(),
            port: 9150,
            interval: "15s".into(),
        });
        let sm = service_monitor(&spec).unwrap();
        assert_eq!(sm.data["spec"]["endpoints"][0]["port"], "metrics");
        assert_eq!(sm.data["spec"]["endpoints"][0]["interval"], "15s");
        assert_snapshot("service_monitor_seed", &sm);
    }
}
