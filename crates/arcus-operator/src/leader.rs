//! Leader election on a coordination.k8s.io Lease (kube-lease-manager), as the seed's
//! master/stand-by Deployment needs: only the leader reconciles, and every write is gated on
//! [`LeaderGate`].
//!
//! The gate is a deadline on the monotonic clock, not a flag: it stays open until the Lease
//! we last saw ourselves holding could have expired for the other replicas (its `renewTime`,
//! as read by a GET *sent* at a known instant, plus its duration, minus a margin). A process
//! that was paused (SIGSTOP, a long GC-like stall, a frozen VM) finds the deadline passed the
//! moment it wakes, before it writes anything, whether or not the renewal task ran meanwhile.

use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use kube_lease_manager::LeaseManagerBuilder;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Lease validity after the last renewal; a stand-by takes over at most this long (plus one
/// retry step) after the leader dies.
pub const LEASE_SECONDS: u64 = 12;
/// The holder renews this long before expiry.
pub const LEASE_GRACE_SECONDS: u64 = 4;
/// The gate closes this long before the Lease could expire for the others: covers clock
/// drift between the two replicas' monotonic clocks over one lease period and the time a
/// write takes to reach the server after the check.
pub const FENCE_MARGIN: Duration = Duration::from_secs(2);

/// Where "now" comes from; a fake in tests moves time by hand.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> Instant;
}

/// The process's monotonic clock (it keeps running while the process is stopped).
#[derive(Debug, Default)]
pub struct MonotonicClock;

impl Clock for MonotonicClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A write refused because leadership is not confirmed any more.
#[derive(Debug, thiserror::Error)]
#[error("not the leader (leadership unconfirmed since {stale_for:?}): {what} skipped")]
pub struct Fenced {
    pub what: String,
    pub stale_for: Duration,
}

/// Whether this process may write. Cloned into every writer; checked before each write.
#[derive(Clone, Debug)]
pub struct LeaderGate(Arc<GateState>);

#[derive(Debug)]
struct GateState {
    clock: Arc<dyn Clock>,
    /// None: closed for good. Some(instant): open until then.
    open_until: Mutex<Option<Instant>>,
    /// Writes refused since start (a paused leader that woke up counts here).
    fenced: AtomicU64,
}

impl LeaderGate {
    /// A gate open for good (`true`: a single replica without election, tests) or closed.
    pub fn new(open: bool) -> Self {
        Self::with_clock(Arc::new(MonotonicClock), open.then(far_future))
    }

    /// A gate open until `open_until` on `clock`.
    pub fn with_clock(clock: Arc<dyn Clock>, open_until: Option<Instant>) -> Self {
        Self(Arc::new(GateState {
            clock,
            open_until: Mutex::new(open_until),
            fenced: AtomicU64::new(0),
        }))
    }

    pub fn is_leader(&self) -> bool {
        let now = self.0.clock.now();
        self.deadline().is_some_and(|d| now < d)
    }

    /// Ok when a write may go out now; otherwise the refusal, counted.
    pub fn check(&self, what: impl FnOnce() -> String) -> Result<(), Fenced> {
        let now = self.0.clock.now();
        match self.deadline() {
            Some(d) if now < d => Ok(()),
            d => {
                self.0.fenced.fetch_add(1, Ordering::Relaxed);
                Err(Fenced {
                    what: what(),
                    stale_for: d
                        .map(|d| now.saturating_duration_since(d))
                        .unwrap_or_default(),
                })
            }
        }
    }

    /// Writes refused so far.
    pub fn fenced_writes(&self) -> u64 {
        self.0.fenced.load(Ordering::Relaxed)
    }

    /// Extends the gate to `until` (never shortens it: confirmations can arrive out of order).
    pub fn extend(&self, until: Instant) {
        let mut open = self.0.open_until.lock().expect("gate lock");
        if let Some(current) = open.as_mut() {
            *current = (*current).max(until);
        }
    }

    /// Closes the gate for good.
    pub fn close(&self) {
        *self.0.open_until.lock().expect("gate lock") = None;
    }

    /// Completes once the gate is closed (by `close` or by its deadline passing): long copies
    /// race against it and stop.
    pub async fn closed(&self) {
        loop {
            let now = self.0.clock.now();
            match self.deadline() {
                Some(d) if now < d => {
                    // Re-checked at least every second: the deadline may move (extend, close).
                    let wait = (d - now).min(Duration::from_secs(1));
                    tokio::time::sleep(wait).await;
                }
                _ => return,
            }
        }
    }

    fn deadline(&self) -> Option<Instant> {
        *self.0.open_until.lock().expect("gate lock")
    }
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600)
}

/// How long the Lease stays ours after a GET sent at `sent` (wall clock `sent_wall`) showed it
/// renewed at `renewed` (wall clock, written by our own lease manager), as an instant on the
/// monotonic clock (pure). Never beyond one full lease duration after `sent`.
pub fn lease_valid_until(
    sent: Instant,
    sent_wall: k8s_openapi::jiff::Timestamp,
    renewed: Option<k8s_openapi::jiff::Timestamp>,
    duration: Duration,
) -> Instant {
    let left = renewed
        .map(|r| {
            let expires_ms = r.as_millisecond() + duration.as_millis() as i64;
            Duration::from_millis((expires_ms - sent_wall.as_millisecond()).max(0) as u64)
        })
        .unwrap_or_default()
        .min(duration);
    sent + left.saturating_sub(FENCE_MARGIN)
}

/// Waits until this process holds the Lease, then returns a gate that is open while the Lease
/// is confirmed ours and a future that completes (after closing the gate) when leadership is
/// lost.
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
    let leases: Api<Lease> = Api::namespaced(client, namespace);
    // Open only as far as a Lease read confirms.
    let gate = LeaderGate::with_clock(Arc::new(MonotonicClock), Some(Instant::now()));
    let _ = confirm(&gate, &leases, lease_name, identity).await;
    let lost = {
        let gate = gate.clone();
        let lease_name = lease_name.to_string();
        let identity = identity.to_string();
        async move {
            let reason = watch_leadership(&mut rx, &gate, &leases, &lease_name, &identity).await;
            gate.close();
            drop(rx); // releases the lease if we still hold it
            reason
        }
    };
    Ok((gate, lost))
}

/// Reads the Lease; when we hold it, extends the gate to its expiry (as of the read's send
/// time). Err(reason) when another holder has it; Ok(false) when it could not be read.
async fn confirm(
    gate: &LeaderGate,
    leases: &Api<Lease>,
    lease_name: &str,
    identity: &str,
) -> Result<bool, String> {
    let (sent, sent_wall) = (Instant::now(), k8s_openapi::jiff::Timestamp::now());
    let lease = match leases.get(lease_name).await {
        Ok(l) => l,
        Err(e) => {
            tracing::debug!(error = %e, "cannot read the leader Lease");
            return Ok(false);
        }
    };
    let spec = lease.spec.unwrap_or_default();
    let holder = spec.holder_identity.unwrap_or_default();
    if holder != identity {
        return Err(format!("the lease is now held by {holder:?}"));
    }
    let duration = Duration::from_secs(
        spec.lease_duration_seconds
            .map(|s| s.max(0) as u64)
            .unwrap_or(LEASE_SECONDS),
    );
    let renewed = spec.renew_time.map(|t| t.0);
    gate.extend(lease_valid_until(sent, sent_wall, renewed, duration));
    Ok(true)
}

/// Returns why leadership ended: the manager said so, another holder appeared in the Lease, or
/// the gate's deadline passed without a confirmation.
async fn watch_leadership(
    rx: &mut tokio::sync::watch::Receiver<bool>,
    gate: &LeaderGate,
    leases: &Api<Lease>,
    lease_name: &str,
    identity: &str,
) -> String {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut closed_since: Option<Instant> = None;
    loop {
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() || !*rx.borrow_and_update() {
                    return "the lease manager reported the lease lost".into();
                }
            }
            _ = tick.tick() => {
                if let Err(reason) = confirm(gate, leases, lease_name, identity).await {
                    return reason;
                }
                // A closed gate only fences writes while the manager may still renew; once it
                // has been closed for a whole lease period, another replica may hold the Lease.
                match (gate.is_leader(), closed_since) {
                    (true, _) => closed_since = None,
                    (false, None) => closed_since = Some(Instant::now()),
                    (false, Some(t)) if t.elapsed() > Duration::from_secs(LEASE_SECONDS) => {
                        return format!("the lease could not be confirmed for {:?}", t.elapsed());
                    }
                    (false, Some(_)) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct FakeClock(Mutex<Instant>);
    impl Clock for FakeClock {
        fn now(&self) -> Instant {
            *self.0.lock().unwrap()
        }
    }
    impl FakeClock {
        fn advance(&self, by: Duration) {
            *self.0.lock().unwrap() += by;
        }
    }

    #[test]
    fn a_paused_process_finds_the_gate_closed_before_its_first_write() {
        let start = Instant::now();
        let clock = Arc::new(FakeClock(Mutex::new(start)));
        let gate = LeaderGate::with_clock(clock.clone(), Some(start + Duration::from_secs(6)));
        assert!(gate.check(|| "status".into()).is_ok());
        // Stopped for 20 s: no renewal ran; the first check after waking refuses.
        clock.advance(Duration::from_secs(20));
        let refused = gate.check(|| "status of ns/mc".into()).unwrap_err();
        assert_eq!(refused.stale_for, Duration::from_secs(14));
        assert!(refused.to_string().contains("status of ns/mc skipped"));
        assert_eq!(gate.fenced_writes(), 1);
        assert!(!gate.is_leader());
    }

    #[test]
    fn extending_never_shortens_and_close_is_final() {
        let start = Instant::now();
        let clock = Arc::new(FakeClock(Mutex::new(start)));
        let gate = LeaderGate::with_clock(clock.clone(), Some(start + Duration::from_secs(5)));
        gate.extend(start + Duration::from_secs(2));
        clock.advance(Duration::from_secs(4));
        assert!(gate.is_leader());
        gate.close();
        gate.extend(start + Duration::from_secs(60));
        assert!(!gate.is_leader());
    }

    #[test]
    fn lease_validity_counts_from_the_renewal_not_from_the_read() {
        let sent = Instant::now();
        let wall = k8s_openapi::jiff::Timestamp::from_second(1_000_000).unwrap();
        let d = Duration::from_secs(LEASE_SECONDS);
        // Renewed 7 s before our read was sent: 12 - 7 - margin 2 = 3 s left.
        let renewed = k8s_openapi::jiff::Timestamp::from_second(1_000_000 - 7).unwrap();
        assert_eq!(
            lease_valid_until(sent, wall, Some(renewed), d),
            sent + Duration::from_secs(3)
        );
        // A renewal time in the future (clock step) gives at most one lease duration.
        let ahead = k8s_openapi::jiff::Timestamp::from_second(1_000_100).unwrap();
        assert_eq!(
            lease_valid_until(sent, wall, Some(ahead), d),
            sent + d - FENCE_MARGIN
        );
        // Expired or unknown: nothing.
        let old = k8s_openapi::jiff::Timestamp::from_second(1_000_000 - 30).unwrap();
        assert_eq!(lease_valid_until(sent, wall, Some(old), d), sent);
        assert_eq!(lease_valid_until(sent, wall, None, d), sent);
    }

    #[tokio::test]
    async fn closed_completes_when_the_deadline_passes() {
        let gate = LeaderGate::with_clock(
            Arc::new(MonotonicClock),
            Some(Instant::now() + Duration::from_millis(50)),
        );
        tokio::time::timeout(Duration::from_secs(5), gate.closed())
            .await
            .expect("closed() completes after the deadline");
        assert!(!gate.is_leader());
    }
}
