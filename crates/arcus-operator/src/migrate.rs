//! When the ring changes, move the cache with it (the `migration` engine does the copying):
//! - scale-in: before the StatefulSet shrinks, pass 1 copies the leaving nodes' items to their
//!   owners on the ring that remains, the leaving nodes' znodes are deleted (clients switch
//!   rings; the nodes keep serving us), pass 2 carries over what changed meanwhile;
//! - scale-out: once every new node has registered, an add-only copy brings the items they now
//!   own from their previous owners.
//!
//! What is in flight is recorded in the data of `/arcus/cache_list/<svc>` (our claim, which
//! servers and clients ignore), so an operator restarted half-way resumes: a scale-in whose
//! checkpoint was stored finishes the ring change and runs pass 2; an interrupted pass 1 simply
//! runs again (it is repeatable until the ring changes).

use crate::migration::{Checkpoint, MigrationError, MigrationOptions, Progress, ScaleIn, ScaleOut};
use crate::zk::ServiceClaim;
use crate::zk_plan::{registered_hostname, CACHE_LIST};
use arcus_client::Ring;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use zookeeper_client as zk;

/// How long clients get to follow a ring change through their ZooKeeper watch before pass 2
/// (ARCUS clients rebuild their ring on the watch event, within milliseconds).
const CLIENTS_FOLLOW: Duration = Duration::from_secs(1);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Pending {
    /// Pass 1 done; `before` is the ring before (ip:port), `leaving` the nodes going away.
    ScaleIn {
        before: Vec<String>,
        leaving: Vec<String>,
        leaving_znodes: Vec<String>,
        checkpoint: Checkpoint,
    },
    /// The StatefulSet grew; `before` is the ring the new nodes' items must come from.
    /// `early` lists new nodes already filled before they registered.
    ScaleOut {
        before: Vec<String>,
        to_replicas: u32,
        #[serde(default)]
        early: Vec<String>,
    },
}

/// The claim with whatever is in flight.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ClaimRecord {
    #[serde(flatten)]
    claim: ServiceClaim,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pending: Option<Pending>,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("migration: {0}")]
    Migration(#[from] MigrationError),
    #[error("ZooKeeper: {action} {path}: {source}")]
    Zk {
        action: &'static str,
        path: String,
        source: zk::Error,
    },
}

fn zk_err(action: &'static str, path: &str) -> impl FnOnce(zk::Error) -> MigrateError {
    let path = path.to_string();
    move |source| MigrateError::Zk {
        action,
        path,
        source,
    }
}

pub async fn read_pending(client: &zk::Client, svc: &str) -> Result<Option<Pending>, MigrateError> {
    let path = format!("{CACHE_LIST}/{svc}");
    match client.get_data(&path).await {
        Ok((data, _)) => Ok(serde_json::from_slice::<ClaimRecord>(&data)
            .ok()
            .and_then(|r| r.pending)),
        Err(zk::Error::NoNode) => Ok(None),
        Err(e) => Err(zk_err("read", &path)(e)),
    }
}

pub async fn write_pending(
    client: &zk::Client,
    svc: &str,
    claim: &ServiceClaim,
    pending: Option<Pending>,
) -> Result<(), MigrateError> {
    let path = format!("{CACHE_LIST}/{svc}");
    let data = serde_json::to_vec(&ClaimRecord {
        claim: claim.clone(),
        pending,
    })
    .expect("claim serializes");
    client
        .set_data(&path, &data, None)
        .await
        .map_err(zk_err("write", &path))?;
    Ok(())
}

/// `<ip>:<port>` of each `cache_list` child (`<ip>:<port>-<hostname>`).
fn addr_of(child: &str) -> &str {
    child.split_once('-').map(|(a, _)| a).unwrap_or(child)
}

/// Scale-in: everything before the StatefulSet may shrink. `children` is `cache_list/<svc>`
/// now; `leaving_hosts` the hostnames of the ordinals that go. Returns the progress, or None
/// when there was nothing to move (no leaving node registered and nothing pending).
pub async fn scale_in(
    client: &zk::Client,
    svc: &str,
    claim: &ServiceClaim,
    children: &[String],
    leaving_hosts: &[String],
) -> Result<Option<Progress>, MigrateError> {
    let (client, svc, claim, children, leaving_hosts) = (
        client.clone(),
        svc.to_string(),
        claim.clone(),
        children.to_vec(),
        leaving_hosts.to_vec(),
    );
    detached(move || async move {
        scale_in_inner(&client, &svc, &claim, &children, &leaving_hosts).await
    })
    .await
}

/// Builds and runs a migration future on a blocking thread of its own: the engine's futures
/// are not `Send` for every lifetime (which the controller's future must be), and a long copy
/// should not occupy a runtime worker anyway. Only the closure's owned inputs cross threads.
async fn detached<T, Fut>(make: impl FnOnce() -> Fut + Send + 'static) -> T
where
    T: Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || handle.block_on(make()))
        .await
        .expect("migration task panicked")
}

async fn scale_in_inner(
    client: &zk::Client,
    svc: &str,
    claim: &ServiceClaim,
    children: &[String],
    leaving_hosts: &[String],
) -> Result<Option<Progress>, MigrateError> {
    let list_path = format!("{CACHE_LIST}/{svc}");
    let mut pending = read_pending(client, svc).await?;
    let mut pass1 = Progress::default();
    if !matches!(pending, Some(Pending::ScaleIn { .. })) {
        let leaving_znodes: Vec<String> = children
            .iter()
            .filter(|c| {
                registered_hostname(c).is_some_and(|h| leaving_hosts.iter().any(|l| l == h))
            })
            .cloned()
            .collect();
        if leaving_znodes.is_empty() {
            return Ok(None);
        }
        let before: Vec<String> = children.iter().map(|c| addr_of(c).to_string()).collect();
        let leaving: Vec<String> = leaving_znodes
            .iter()
            .map(|c| addr_of(c).to_string())
            .collect();
        tracing::info!(%svc, ?leaving, "scale-in: pass 1 (copying the leaving nodes' items)");
        let mut job = ScaleIn::new(
            Ring::new(before.clone()),
            &leaving,
            MigrationOptions::default(),
        )?;
        let checkpoint = job.pass1().await?;
        pass1 = job.progress().borrow().clone();
        let p = Pending::ScaleIn {
            before,
            leaving,
            leaving_znodes,
            checkpoint,
        };
        write_pending(client, svc, claim, Some(p.clone())).await?;
        pending = Some(p);
    }
    let Some(Pending::ScaleIn {
        before,
        leaving,
        leaving_znodes,
        checkpoint,
    }) = pending
    else {
        unreachable!()
    };
    // The ring change: the leaving nodes leave cache_list (they keep serving our reads).
    for z in &leaving_znodes {
        let path = format!("{list_path}/{z}");
        match client.delete(&path, None).await {
            Ok(()) | Err(zk::Error::NoNode) => {}
            Err(e) => return Err(zk_err("delete", &path)(e)),
        }
    }
    tokio::time::sleep(CLIENTS_FOLLOW).await;
    tracing::info!(%svc, ?leaving, "scale-in: pass 2 (what changed during pass 1)");
    let mut job = ScaleIn::resume(
        Ring::new(before),
        &leaving,
        checkpoint,
        MigrationOptions::default(),
    )?;
    let mut progress = job.pass2().await?;
    write_pending(client, svc, claim, None).await?;
    // Pass 2 ran on a fresh job (as after a restart): add what pass 1 did in this process.
    progress.items_total += pass1.items_total;
    progress.items_done += pass1.items_done;
    progress.items_moved += pass1.items_moved;
    progress.items_skipped_expired += pass1.items_skipped_expired;
    progress.items_skipped_newer += pass1.items_skipped_newer;
    progress.items_failed += pass1.items_failed;
    Ok(Some(progress))
}

/// Scale-out, one new node at a time: each new node is let in (the StatefulSet grows by one)
/// only after the previous one registered and received the items it now owns. (With several
/// nodes joining at once, a key could be written to a node of an intermediate ring and then
/// be copied over on the final one.) Returns the StatefulSet size to apply in this pass and the
/// progress of a copy made in this pass.
pub async fn scale_out_step(
    client: &zk::Client,
    svc: &str,
    claim: &ServiceClaim,
    children: &[String],
    now: u32,
    desired: u32,
    unregistered: &[String],
) -> Result<(u32, Option<Progress>), MigrateError> {
    let mut now = now;
    let mut progress = None;
    if let Some(Pending::ScaleOut {
        before,
        to_replicas,
        early,
    }) = read_pending(client, svc).await?
    {
        if (children.len() as u32) < to_replicas {
            // The new node has not registered yet. If it already serves, fill it now, while no
            // client reads from it: once it registers only what changed meanwhile is missing.
            let fresh: Vec<String> = unregistered
                .iter()
                .filter(|a| !early.contains(a))
                .cloned()
                .collect();
            if !fresh.is_empty() && !before.is_empty() {
                let (c, s, cl, b) = (
                    client.clone(),
                    svc.to_string(),
                    claim.clone(),
                    before.clone(),
                );
                let mut early = early.clone();
                detached(move || async move {
                    tracing::info!(svc = %s, joining = ?fresh, "scale-out: filling the new node before it registers");
                    let job = ScaleOut::new(Ring::new(b.clone()), &fresh, MigrationOptions::default())?;
                    job.copy().await?;
                    early.extend(fresh);
                    write_pending(&c, &s, &cl, Some(Pending::ScaleOut { before: b, to_replicas, early })).await
                })
                .await?;
            }
            return Ok((to_replicas.max(now), None));
        }
        let joining: Vec<String> = children
            .iter()
            .map(|c| addr_of(c).to_string())
            .filter(|a| !before.contains(a))
            .collect();
        let (c, s, cl) = (client.clone(), svc.to_string(), claim.clone());
        progress = detached(move || async move {
            let mut progress: Option<Progress> = None;
            if !joining.is_empty() && !before.is_empty() {
                tracing::info!(svc = %s, ?joining, "scale-out: copying the items the new node now owns");
                // Moved items are compare-and-deleted on their old owners, so a further round
                // lists only what an earlier listing missed (stock memcached's LRU crawler can
                // skip items under load) and never re-adds a key a client deleted meanwhile.
                let opts = MigrationOptions { delete_moved_from_sources: true, ..MigrationOptions::default() };
                for round in 1..=3 {
                    let job = ScaleOut::new(Ring::new(before.clone()), &joining, opts.clone())?;
                    let p = job.copy().await?;
                    let moved = p.items_moved;
                    progress = Some(match progress.take() {
                        None => p,
                        Some(mut acc) => {
                            acc.items_moved += p.items_moved;
                            acc.items_failed = p.items_failed;
                            acc
                        }
                    });
                    tracing::info!(svc = %s, round, moved, "scale-out copy round done");
                    if moved == 0 {
                        break;
                    }
                }
            }
            write_pending(&c, &s, &cl, None).await?;
            Ok::<_, MigrateError>(progress)
        })
        .await?;
        now = now.max(to_replicas);
    }
    if desired > now && now > 0 {
        let before = children.iter().map(|c| addr_of(c).to_string()).collect();
        write_pending(
            client,
            svc,
            claim,
            Some(Pending::ScaleOut {
                before,
                to_replicas: now + 1,
                early: vec![],
            }),
        )
        .await?;
        return Ok((now + 1, progress));
    }
    Ok((desired, progress))
}

/// A cache-aware restart of the node `host`: once it is back in the ring (as `expected` nodes),
/// the scale-out copy brings its items back from the nodes that held them meanwhile.
pub async fn copy_back_after_restart(
    client: &zk::Client,
    svc: &str,
    claim: &ServiceClaim,
    children: &[String],
    host: &str,
    expected: u32,
) -> Result<(), MigrateError> {
    let before = children
        .iter()
        .filter(|c| registered_hostname(c) != Some(host))
        .map(|c| addr_of(c).to_string())
        .collect();
    write_pending(
        client,
        svc,
        claim,
        Some(Pending::ScaleOut {
            before,
            to_replicas: expected,
            early: vec![],
        }),
    )
    .await
}
