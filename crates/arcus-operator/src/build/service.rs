//! The headless Service `<name>-arcus-mc`: the StatefulSet's governing Service, giving each
//! cache pod a DNS name. Clients do not use it to route (they read `cache_list` in ZooKeeper).

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{labels, object_meta, METRICS_PORT_NAME, PORT_NAME};
use crate::validate::ValidSpec;

/// The headless Service. It publishes not-ready pods too: a node must be resolvable while it
/// starts and registers, before its readiness probe passes.
pub fn headless_service(spec: &ValidSpec) -> Service {
    let mut ports = vec![port(PORT_NAME, spec.port.into())];
    if let Some(exporter) = &spec.metrics_exporter {
        ports.push(port(METRICS_PORT_NAME, exporter.port));
    }
    Service {
        metadata: object_meta(spec, spec.statefulset_name()),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(labels::selector_labels(&spec.name)),
            ports: Some(ports),
            ..Default::default()
        }),
        status: None,
    }
}

fn port(name: &str, number: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port: number,
        target_port: Some(IntOrString::String(name.into())),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::test_util::{assert_snapshot, seed_spec};

    #[test]
    fn seed_service_snapshot() {
        assert_snapshot("service_seed", &headless_service(&seed_spec()));
    }

    #[test]
    fn headless_and_publishes_not_ready() {
        let svc = headless_service(&seed_spec());
        let s = svc.spec.unwrap();
        assert_eq!(s.cluster_ip.as_deref(), Some("None"));
        assert_eq!(s.publish_not_ready_addresses, Some(true));
        assert_eq!(s.selector, Some(labels::selector_labels("test")));
        let p = &s.ports.unwrap()[0];
        assert_eq!((p.name.as_deref(), p.port), (Some("memcached"), 11211));
    }

    #[test]
    fn exporter_adds_the_metrics_port() {
        let mut spec = seed_spec();
        spec.metrics_exporter = Some(crate::crd::MetricsExporter {
            image: "prom/memcached-exporter:v0.15.3".into(),
            port: 9150,
            interval: "30s".into(),
        });
        let ports = headless_service(&spec).spec.unwrap().ports.unwrap();
        assert_eq!(ports[1].name.as_deref(), Some("metrics"));
        assert_eq!(ports[1].port, 9150);
    }
}
