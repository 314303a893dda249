//! The API side of the executor's effects: deleting cache pods, behind the leader gate.

use super::cache::Caches;
use crate::leader::LeaderGate;
use crate::metrics::Metrics;
use crate::migrate::{MigrateError, Pods};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, Preconditions};
use kube::Api;
use std::sync::Arc;

pub struct PodsApi {
    pub api: Api<Pod>,
    pub gate: LeaderGate,
    pub metrics: Arc<Metrics>,
    /// Told of each deletion, so passes do not take the cached pod for a live one.
    pub caches: Arc<Caches>,
}

impl Pods for PodsApi {
    async fn delete(&self, pod: &str, uid: Option<&str>) -> Result<(), MigrateError> {
        self.gate.check(|| format!("delete of pod {pod}"))?;
        let params = DeleteParams {
            preconditions: uid.map(|uid| Preconditions {
                uid: Some(uid.to_string()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match self.api.delete(pod, &params).await {
            Ok(_) => {
                if let Some(uid) = uid {
                    self.caches.deleted_pod(uid);
                }
            }
            // Gone, or already replaced by a pod of another uid: done either way.
            Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
            Err(source) => {
                return Err(MigrateError::Pod {
                    action: "delete",
                    pod: pod.into(),
                    source,
                })
            }
        }
        self.metrics.api_write("Pod");
        Ok(())
    }
}
