//! Leader election on a coordination.k8s.io Lease (kube-lease-manager), as the seed's
//! master/stand-by Deployment needs: only the leader reconciles, and every write is gated on
//! [`LeaderGate`], which drops the moment leadership is in doubt.

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use kube_lease_manager::LeaseManagerBuilder;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Lease validity after the last renewal; a stand-by takes over at most this long (plus one
/// retry step) after the leader dies.
pub const LEASE_SECONDS: u64 = 12;
/// The holder renews this long before expiry.
pub const LEASE_GRACE_SECONDS: u64 = 4;

/// Whether this process may write. Cloned into every writer; checked before each write.
#[derive(Clone, Debug)]
pub struct LeaderGate(Arc<AtomicBool>);

impl LeaderGate {
    pub fn new(initially: bool) -> Self {
        Self(Arc::new(AtomicBool::new(initially)))
    }

    pub fn is_leader(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    fn set(&self, leader: bool) {
        self.0.store(leader, Ordering::Release)
    }
}

/// Waits until this process holds the Lease, then returns a gate that is true while it holds it
/// and a future that completes (after clearing the gate) when leadership is lost.
pub async fn acquire(
    client: Client,
    namespace: &str,
    lease_name: &str,
    identity: &str,
) -> anyhow::Result<(LeaderGate, impl std::future::Future<Output = String>)> {
    let manager = LeaseManagerBuilder::new(client.clone(), lease_name)
        .with_namespace(namespace)
        .with_identity(identity)
        .with_duration(LEASE_SECONDS)
        .with_grace(LEASE_GRACE_SECONDS)
        .build()
        .await?;
    let (mut rx, task) = manager.watch().await;
    tracing::info!(%identity, lease = %format!("{namespace}/{lease_name}"), "waiting for leadership (stand-by)");
    while !*rx.borrow_and_update() {
        rx.changed()
            .await
            .map_err(|_| anyhow::anyhow!("lease manager stopped: {:?}", task.is_finished()))?;
    }
    tracing::info!(%identity, "became the leader");
    let gate = LeaderGate::new(true);
    let lost = {
        let gate = gate.clone();
        let leases: Api<Lease> = Api::namespaced(client, namespace);
        let lease_name = lease_name.to_string();
        let identity = identity.to_string();
        async move {
            let reason = watch_leadership(&mut rx, &leases, &lease_name, &identity).await;
            gate.set(false);
            drop(rx); // releases the lease if we still hold it
            reason
        }
    };
    Ok((gate, lost))
}

/// Returns why leadership ended: the manager said so, another holder appeared in the Lease, or
/// the Lease could not be confirmed for longer than it stays valid.
async fn watch_leadership(
    rx: &mut tokio::sync::watch::Receiver<bool>,
    leases: &Api<Lease>,
    lease_name: &str,
    identity: &str,
) -> String {
    let mut confirmed = Instant::now();
    let doubt_after = Duration::from_secs(LEASE_SECONDS - LEASE_GRACE_SECONDS);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() || !*rx.borrow_and_update() {
                    return "the lease manager reported the lease lost".into();
                }
            }
            _ = tick.tick() => {
                match leases.get(lease_name).await {
                    Ok(l) => {
                        let holder = l.spec.and_then(|s| s.holder_identity).unwrap_or_default();
                        if holder != identity {
                            return format!("the lease is now held by {holder:?}");
                        }
                        confirmed = Instant::now();
                    }
                    Err(e) if confirmed.elapsed() > doubt_after => {
                        return format!("the lease could not be confirmed for {:?}: {e}", confirmed.elapsed());
                    }
                    Err(_) => {}
                }
            }
        }
    }
}
