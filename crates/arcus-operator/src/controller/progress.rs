//! A running copy's progress in `status.migration` (the Migration column).

use super::{Context, FIELD_MANAGER};
use crate::crd::{ArcusMemcached, MigrationStatus};
use crate::leader::LeaderGate;
use crate::metrics::Metrics;
use crate::migrate::Reporter;
use crate::zk::{Registry, ZkRegistry};
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use std::sync::Arc;
use std::time::Duration;

/// Writes a running migration's progress into `status.migration` (a merge patch under a field
/// manager of its own, so the reconcile's status apply never carries a stale copy back), at
/// most once a second, and the final record when stopped. Each record carries the epoch of the
/// operation record it belongs to; the API server refuses one older than the stored one.
pub struct ProgressWriter {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
    target: ProgressTarget,
}

#[derive(Clone)]
struct ProgressTarget {
    api: Api<ArcusMemcached>,
    name: String,
    leader: LeaderGate,
    metrics: Arc<Metrics>,
    registry: ZkRegistry,
}

impl ProgressTarget {
    async fn write(&self, value: &MigrationStatus) {
        if self
            .leader
            .check(|| format!("migration progress of {}", self.name))
            .is_err()
        {
            return;
        }
        let mut value = value.clone();
        value.epoch = Some(self.registry.epoch() as i64);
        let patch = serde_json::json!({"status": {"migration": value}});
        let params = PatchParams {
            field_manager: Some(format!("{FIELD_MANAGER}-progress")),
            ..PatchParams::default()
        };
        match self
            .api
            .patch_status(&self.name, &params, &Patch::Merge(&patch))
            .await
        {
            Ok(_) => self.metrics.api_write("ArcusMemcachedStatus"),
            Err(kube::Error::Api(e)) if e.code == 422 => {
                tracing::warn!(name = %self.name, "migration progress refused (a later operation reported since): {}", e.message)
            }
            Err(e) => tracing::warn!(name = %self.name, "writing migration progress: {e}"),
        }
    }
}

impl ProgressWriter {
    pub fn start(ctx: &Context, cr: &ArcusMemcached, registry: &ZkRegistry) -> (Reporter, Self) {
        let (reporter, mut rx) = Reporter::new();
        let target = ProgressTarget {
            api: Api::namespaced(ctx.client.clone(), &cr.namespace().unwrap_or_default()),
            name: cr.name_any(),
            leader: ctx.leader.clone(),
            metrics: ctx.metrics.clone(),
            registry: registry.clone(),
        };
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let t = target.clone();
        let task = tokio::spawn(async move {
            let mut written: Option<MigrationStatus> = None;
            loop {
                // A value not written yet goes out at once; otherwise wait for the next one.
                if rx.borrow().as_ref() == written.as_ref() {
                    tokio::select! {
                        _ = &mut stopped => return,
                        changed = rx.changed() => if changed.is_err() { return },
                    }
                }
                let value = rx.borrow_and_update().clone();
                let Some(v) = value else { continue };
                t.write(&v).await;
                written = Some(v);
                // At most one write a second within a phase, however fast the copy reports;
                // a new phase (Pass1, RingChange, Pass2, Done) is written at once.
                let pause = tokio::time::sleep(Duration::from_secs(1));
                tokio::pin!(pause);
                loop {
                    tokio::select! {
                        _ = &mut stopped => return,
                        _ = &mut pause => break,
                        changed = rx.changed() => {
                            if changed.is_err() { return }
                            let phase = written.as_ref().map(|w| w.phase.as_str());
                            if rx.borrow().as_ref().is_some_and(|n| Some(n.phase.as_str()) != phase) {
                                break;
                            }
                        }
                    }
                }
            }
        });
        (reporter, ProgressWriter { stop, task, target })
    }

    /// Stops the periodic writes, waits for the one in flight, then writes the last record
    /// (when a copy reported one).
    pub async fn stop(self, reporter: Reporter) {
        let last = reporter.last();
        drop(reporter);
        let _ = self.stop.send(());
        let _ = self.task.await;
        if let Some(last) = last {
            self.target.write(&last).await;
        }
    }
}
