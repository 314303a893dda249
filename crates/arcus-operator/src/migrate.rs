//! When the ring changes, move the cache with it (the `migration` engine does the copying):
//! - scale-in: before the StatefulSet shrinks, pass 1 copies the leaving nodes' items to their
//!   owners on the ring that remains, the leaving nodes' znodes are deleted (clients switch
//!   rings; the nodes keep serving us), pass 2 carries over what changed meanwhile;
//! - scale-out, one node at a time: a node that answers `zkensemble` (ARCUS) is taken out of
//!   `cache_list` the moment it registers, filled (pass 1), let in with `zkensemble rejoin`, and
//!   pass 2 carries over what changed meanwhile; other servers get an add-only copy once they
//!   registered (a key deleted on the new node before its copy arrived can come back);
//! - rolling restart of one node: the scale-in of that node before it stops, the scale-out
//!   copy (`restart_of`) once it is back.
//!
//! Pass 2 runs twice: shortly after the ring change, then after clients followed it (see
//! `pass2_twice`). A key written on its old owner after pass 1's last listing and deleted by a
//! client on its new owner before pass 2 reaches it would come back (the ascii protocol has no
//! tombstone). A client that sends such a delete to the key's previous owner too closes that
//! window (arcus-client does, `ClientOptions::delete_previous_owners_for`); for other clients
//! it stays open for about the first pass 2's duration after the change.
//!
//! A [`Reporter`] carries the live counts to `status.migration` (the Migration column).
//!
//! What is in flight is recorded in the data of `/arcus/cache_list/<svc>` (our claim, which
//! servers and clients ignore), so an operator restarted half-way resumes: a scale-in whose
//! checkpoint was stored finishes the ring change and runs pass 2; an interrupted pass 1 simply
//! runs again (it is repeatable until the ring changes); a new node held out of the ring is
//! filled again and let in.

use crate::crd::MigrationStatus;
use crate::migration::{
    Checkpoint, MigrationError, MigrationOptions, Phase, Progress, ScaleIn, ScaleOut,
};
use crate::zk::ServiceClaim;
use crate::zk_plan::{registered_hostname, CACHE_LIST};
use arcus_client::Ring;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use zookeeper_client as zk;

/// How long clients get to follow a ring change through their ZooKeeper watch before pass 2
/// (ARCUS clients rebuild their ring on the watch event, within milliseconds).
const CLIENTS_FOLLOW: Duration = Duration::from_secs(1);
/// How long the first pass 2 waits after a ring change: long enough for clients to have
/// switched (a write a client still sends to a source after the first pass 2 read that key is
/// not carried over), short enough that a key written on a source just before the change
/// reaches its new owner before clients delete it there.
const CLIENTS_SWITCH: Duration = Duration::from_millis(200);

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
        /// The pod hostname when this copy brings a restarted node's items back (rolling
        /// restart) rather than filling a new node.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        restart_of: Option<String>,
        /// `cache_list` znodes of joining nodes we took out of the ring to fill them first
        /// (they wait for `zkensemble rejoin`); a restarted operator finishes and rejoins them.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        held: Vec<String>,
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
    #[error("zkensemble rejoin of {node} failed: {message}; the next reconcile retries (check the node's log)")]
    Rejoin { node: String, message: String },
    #[error("ZooKeeper: {action} {path}: {source}")]
    Zk {
        action: &'static str,
        path: String,
        source: zk::Error,
    },
}

/// Deletes those of `znodes` still under `list_path` in one ZooKeeper transaction, so clients
/// go from the ring before straight to the ring after. One at a time, a client could route by
/// a ring in between, where a key of the first node to leave belongs to another leaving node:
/// a write made there would not be carried over (pass 2 copies each source's keys by the ring
/// before).
async fn delete_znodes_at_once(
    client: &zk::Client,
    list_path: &str,
    znodes: &[String],
) -> Result<(), MigrateError> {
    let mut last = zk::Error::NoNode;
    // A node can leave by itself between our listing and the transaction: list again.
    for _ in 0..5 {
        let children = client
            .list_children(list_path)
            .await
            .map_err(zk_err("list", list_path))?;
        let present: Vec<String> = znodes
            .iter()
            .filter(|z| children.contains(z))
            .map(|z| format!("{list_path}/{z}"))
            .collect();
        if present.is_empty() {
            return Ok(());
        }
        let mut multi = client.new_multi_writer();
        for path in &present {
            multi
                .add_delete(path, None)
                .map_err(zk_err("delete", path))?;
        }
        match multi.commit().await {
            Ok(_) => return Ok(()),
            Err(zk::MultiWriteError::OperationFailed {
                source: zk::Error::NoNode,
                ..
            }) => last = zk::Error::NoNode,
            Err(e) => return Err(zk_err("delete", &present.join(", "))(e.into())),
        }
    }
    Err(zk_err("delete", list_path)(last))
}

/// `zkensemble rejoin` on `addr`, tried again for up to 2 s. An ARCUS node that has just seen
/// its znode deleted answers `NOT_READY` at once but closes its ZooKeeper handle only on its
/// next state-machine turn (about 100 ms later); a rejoin before that fails with "already a
/// member of cloud" (`ERROR failed to rejoin ensemble`), and the same rejoin a moment later
/// succeeds.
pub(crate) async fn rejoin(addr: &str) -> Result<(), arcus_client::Error> {
    const TRIES: u32 = 10;
    let admin = arcus_client::AdminClient::new(addr.to_string());
    let mut attempt = 1;
    loop {
        match admin.zkensemble_rejoin().await {
            Ok(()) => return Ok(()),
            Err(e) if attempt < TRIES => {
                tracing::debug!(node = addr, attempt, error = %e, "zkensemble rejoin failed; trying again");
                tokio::time::sleep(Duration::from_millis(200)).await;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
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
    operation: &str,
    reporter: &Reporter,
) -> Result<Option<Progress>, MigrateError> {
    let (client, svc, claim, children, leaving_hosts) = (
        client.clone(),
        svc.to_string(),
        claim.clone(),
        children.to_vec(),
        leaving_hosts.to_vec(),
    );
    let (operation, reporter) = (operation.to_string(), reporter.clone());
    detached(move || async move {
        scale_in_inner(
            &client,
            &svc,
            &claim,
            &children,
            &leaving_hosts,
            &operation,
            &reporter,
        )
        .await
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
    operation: &str,
    reporter: &Reporter,
) -> Result<Option<Progress>, MigrateError> {
    // One leaving node (a rolling restart) is named in the status.
    let node = match leaving_hosts {
        [one] => Some(pod_of(one).to_string()),
        _ => None,
    };
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
        let _follow = reporter.follow(operation, node.clone(), job.progress());
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
    delete_znodes_at_once(client, &list_path, &leaving_znodes).await?;
    tracing::info!(%svc, ?leaving, "scale-in: pass 2 (what changed during pass 1)");
    let job = ScaleIn::resume(
        Ring::new(before),
        &leaving,
        checkpoint.clone(),
        MigrationOptions::default(),
    )?;
    let mut progress = pass2_twice(
        job.migration(),
        &checkpoint,
        MigrationOptions::default(),
        operation,
        node,
        reporter,
    )
    .await?;
    write_pending(client, svc, claim, None).await?;
    // Pass 2 ran on a fresh job (as after a restart): add what pass 1 did in this process.
    // Each pass lists the same moving keys again: "to move" is the largest listing, not a sum.
    progress.items_total = progress.items_total.max(pass1.items_total);
    progress.items_done = progress.items_done.max(pass1.items_done);
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
///
/// A joining node that answers `zkensemble` (ARCUS) is filled out of the ring: its znode is
/// deleted as soon as it registers (it stays up, `NOT_READY`), pass 1 copies its items while
/// clients still use the old owners, `zkensemble rejoin` puts it in the ring, and pass 2 carries
/// over what changed meanwhile. Clients see the node only for the milliseconds between its
/// registration and our taking it out: what they wrote there is moved back to the old owners,
/// and a delete they sent there also reached the old owner if they follow deletes (see the
/// module docs). Other servers get the add-only copy after joining.
#[allow(clippy::too_many_arguments)]
pub async fn scale_out_step(
    client: &zk::Client,
    svc: &str,
    claim: &ServiceClaim,
    children: &[String],
    now: u32,
    desired: u32,
    unregistered: &[String],
    hostname_of: &(dyn Fn(u32) -> String + Sync),
    reporter: &Reporter,
) -> Result<(u32, Option<Progress>), MigrateError> {
    let mut now = now;
    let mut progress = None;
    if let Some(Pending::ScaleOut {
        before,
        to_replicas,
        early,
        restart_of,
        held,
    }) = read_pending(client, svc).await?
    {
        let operation = match &restart_of {
            Some(_) => "rolling restart".to_string(),
            None => format!("scale-out to {to_replicas}"),
        };
        let registered_new: Vec<String> = children
            .iter()
            .filter(|c| !before.contains(&addr_of(c).to_string()))
            .cloned()
            .collect();
        let held_out: Vec<String> = held
            .iter()
            .filter(|z| !children.contains(z))
            .cloned()
            .collect();
        if !held_out.is_empty() {
            // An operator stopped between taking the new node out and its rejoin: redo the
            // fill (pass 1 repeats safely while the node is out) and let it in.
            let (c, s, cl, r) = (
                client.clone(),
                svc.to_string(),
                claim.clone(),
                reporter.clone(),
            );
            let pending = Pending::ScaleOut {
                before: before.clone(),
                to_replicas,
                early: early.clone(),
                restart_of: restart_of.clone(),
                held: held.clone(),
            };
            progress = detached(move || async move {
                fill_held_out(&c, &s, &cl, pending, &held_out, &operation, &r, false).await
            })
            .await?;
            return Ok((to_replicas.max(now), progress));
        }
        if (children.len() as u32) < to_replicas {
            // The new node has not registered yet. One that serves already and cannot rejoin
            // (stock memcached) is filled now, while no client reads from it: once it registers
            // only what changed meanwhile is missing. One that can rejoin (ARCUS) is waited for
            // here and taken out of the ring the moment it registers, then filled while out.
            let mut fresh = Vec::new();
            for a in unregistered.iter().filter(|a| !early.contains(a)) {
                if can_rejoin(a).await == Some(false) {
                    fresh.push(a.clone());
                }
            }
            if fresh.is_empty() && !before.is_empty() {
                let expected = match &restart_of {
                    Some(host) => host.clone(),
                    None => hostname_of(to_replicas - 1),
                };
                let held = take_out_on_registration(client, svc, &expected).await?;
                if held.is_empty() {
                    return Ok((to_replicas.max(now), None));
                }
                let pending = Pending::ScaleOut {
                    before: before.clone(),
                    to_replicas,
                    early: early.clone(),
                    restart_of: restart_of.clone(),
                    held: held.clone(),
                };
                write_pending(client, svc, claim, Some(pending.clone())).await?;
                let (c, s, cl, r) = (
                    client.clone(),
                    svc.to_string(),
                    claim.clone(),
                    reporter.clone(),
                );
                progress = detached(move || async move {
                    fill_held_out(&c, &s, &cl, pending, &held, &operation, &r, true).await
                })
                .await?;
                return Ok((to_replicas.max(now), progress));
            }
            if !fresh.is_empty() && !before.is_empty() {
                let (c, s, cl, b, r) = (
                    client.clone(),
                    svc.to_string(),
                    claim.clone(),
                    before.clone(),
                    reporter.clone(),
                );
                let mut early = early.clone();
                let restart_of = restart_of.clone();
                detached(move || async move {
                    tracing::info!(svc = %s, joining = ?fresh, "scale-out: filling the new node before it registers");
                    let job = ScaleOut::new(Ring::new(b.clone()), &fresh, MigrationOptions::default())?;
                    let _follow = r.follow(&operation, None, job.progress());
                    job.copy().await?;
                    early.extend(fresh);
                    write_pending(&c, &s, &cl, Some(Pending::ScaleOut { before: b, to_replicas, early, restart_of, held: vec![] })).await
                })
                .await?;
            }
            return Ok((to_replicas.max(now), None));
        }
        let joining: Vec<String> = registered_new
            .iter()
            .map(|c| addr_of(c).to_string())
            .collect();
        let mut rejoinable = !joining.is_empty() && !before.is_empty();
        for a in &joining {
            rejoinable = rejoinable && can_rejoin(a).await == Some(true);
        }
        let (c, s, cl, r) = (
            client.clone(),
            svc.to_string(),
            claim.clone(),
            reporter.clone(),
        );
        if rejoinable {
            let pending = Pending::ScaleOut {
                before: before.clone(),
                to_replicas,
                early: early.clone(),
                restart_of: restart_of.clone(),
                held: registered_new.clone(),
            };
            progress = detached(move || async move {
                // Recorded first: a restarted operator must find and rejoin the node.
                write_pending(&c, &s, &cl, Some(pending.clone())).await?;
                let list_path = format!("{CACHE_LIST}/{s}");
                for z in &registered_new {
                    let path = format!("{list_path}/{z}");
                    match c.delete(&path, None).await {
                        Ok(()) | Err(zk::Error::NoNode) => {}
                        Err(e) => return Err(zk_err("delete", &path)(e)),
                    }
                }
                tracing::info!(svc = %s, ?joining, "scale-out: new node taken out of the ring until it is filled");
                fill_held_out(&c, &s, &cl, pending, &registered_new, &operation, &r, true).await
            })
            .await?;
        } else {
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
                        let node = restart_of.as_deref().map(|h| pod_of(h).to_string());
                        let _follow = r.follow(&operation, node, job.progress());
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
        }
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
                restart_of: None,
                held: vec![],
            }),
        )
        .await?;
        return Ok((now + 1, progress));
    }
    Ok((desired, progress))
}

/// How long a scale-out step waits for a started node to register before it takes it out.
const REGISTRATION_WAIT: Duration = Duration::from_secs(20);
/// How often `cache_list` is read meanwhile (a few hundred cheap reads at most: a node
/// registers within a fraction of a second of starting).
const REGISTRATION_POLL: Duration = Duration::from_millis(1);

/// Waits until the node with hostname `host` registers and, when it can rejoin, deletes its
/// znode at once, so clients see it for a few milliseconds at most (a watch would not be
/// faster, and the session already holds a recursive watch above this path). Returns the znode
/// taken out, or nothing (not registered in time, or it cannot rejoin: it then stays in).
async fn take_out_on_registration(
    client: &zk::Client,
    svc: &str,
    host: &str,
) -> Result<Vec<String>, MigrateError> {
    let list_path = format!("{CACHE_LIST}/{svc}");
    let deadline = tokio::time::Instant::now() + REGISTRATION_WAIT;
    while tokio::time::Instant::now() < deadline {
        let (children, _) = client
            .get_children(&list_path)
            .await
            .map_err(zk_err("read", &list_path))?;
        if let Some(z) = children
            .into_iter()
            .find(|z| registered_hostname(z) == Some(host))
        {
            if can_rejoin(addr_of(&z)).await != Some(true) {
                return Ok(vec![]);
            }
            let path = format!("{list_path}/{z}");
            match client.delete(&path, None).await {
                Ok(()) | Err(zk::Error::NoNode) => {}
                Err(e) => return Err(zk_err("delete", &path)(e)),
            }
            tracing::info!(%svc, znode = %z, "scale-out: new node taken out of the ring until it is filled");
            return Ok(vec![z]);
        }
        tokio::time::sleep(REGISTRATION_POLL).await;
    }
    Ok(vec![])
}

/// Whether the node at `addr` is an ARCUS server that can be taken out of the ring and let back
/// in (it knows `zkensemble`): Some(false) when it says it does not know the command (stock
/// memcached), None when it does not answer (not listening yet).
async fn can_rejoin(addr: &str) -> Option<bool> {
    match arcus_client::AdminClient::with_timeout(addr, Duration::from_secs(2))
        .zkensemble_get()
        .await
    {
        Ok(_) => Some(true),
        Err(arcus_client::Error::Unsupported { .. }) => Some(false),
        // ARCUS knows it but fails it while it has no ZooKeeper session
        // (`ERROR failed to get the ensemble address`): it can rejoin.
        Err(arcus_client::Error::Server { .. }) => Some(true),
        Err(_) => None,
    }
}

/// The two-pass fill of nodes taken out of the ring (`held`: their znode names): pass 1 while
/// clients use the old owners, `zkensemble rejoin`, pass 2, then the claim is cleared.
#[allow(clippy::too_many_arguments)]
async fn fill_held_out(
    client: &zk::Client,
    svc: &str,
    claim: &ServiceClaim,
    pending: Pending,
    held: &[String],
    operation: &str,
    reporter: &Reporter,
    just_taken_out: bool,
) -> Result<Option<Progress>, MigrateError> {
    let Pending::ScaleOut { before, .. } = &pending else {
        unreachable!("fill_held_out takes a scale-out")
    };
    let joining: Vec<String> = held.iter().map(|z| addr_of(z).to_string()).collect();
    let node = held
        .first()
        .and_then(|z| registered_hostname(z))
        .map(|h| pod_of(h).to_string());
    // Clients may have written to the node in the milliseconds it was visible: those writes
    // go back to the old owners at once (a scale-in of the node), before pass 1 would take the
    // node's items for stale leftovers and overwrite them.
    // (Only right after taking it out: a resumed fill finds our own earlier copies there.)
    if just_taken_out {
        let with_new = Ring::new(before.iter().chain(&joining).cloned());
        let mut give_back = ScaleIn::new(with_new, &joining, MigrationOptions::default())?;
        let back = give_back.pass1().await?;
        let given = give_back.progress().borrow().items_moved;
        if given > 0 {
            tracing::info!(%svc, ?joining, given, "scale-out: writes made while the node was visible moved to their owners");
        }
        drop((give_back, back));
    }
    // Clients that saw the node join must have left it before pass 1 treats what it holds as
    // ours to overwrite.
    tokio::time::sleep(CLIENTS_FOLLOW).await;
    let opts = MigrationOptions {
        delete_moved_from_sources: true,
        ..MigrationOptions::default()
    };
    // Moved items leave the old owners only in the last run of pass 2 (see pass2_twice).
    let mut job = ScaleOut::new(
        Ring::new(before.clone()),
        &joining,
        MigrationOptions::default(),
    )?;
    let _follow = reporter.follow(operation, node.clone(), job.progress());
    tracing::info!(%svc, ?joining, "scale-out: pass 1 into the node out of the ring");
    let cp = job.pass1().await?;
    for a in &joining {
        if let Err(e) = rejoin(a).await {
            // Already back (e.g. rejoined by hand) is fine; anything else is retried by the
            // next reconcile from the recorded `held`.
            let back = client
                .get_children(&format!("{CACHE_LIST}/{svc}"))
                .await
                .map(|(c, _)| c.iter().any(|z| addr_of(z) == a))
                .unwrap_or(false);
            if !back {
                return Err(MigrateError::Rejoin {
                    node: a.clone(),
                    message: e.to_string(),
                });
            }
        }
    }
    tracing::info!(%svc, ?joining, "scale-out: node rejoined; pass 2");
    let p = pass2_twice(job.migration(), &cp, opts, operation, node, reporter).await?;
    write_pending(client, svc, claim, None).await?;
    Ok(Some(p))
}

/// Pass 2 twice after the ring change. First almost at once (`CLIENTS_SWITCH`), with `first`
/// (the job that ran pass 1, or one resumed from its checkpoint): a key written on a source
/// after pass 1's last listing reaches its new owner before most clients could delete it there
/// (such a delete would be undone by the copy, unless the client also sent it to the old owner:
/// the ascii protocol has no tombstone). Then, once clients have followed
/// the change, on a fresh job from a checkpoint taken around the first (source marks before it,
/// target marks of pass 1), for what stragglers still wrote to the sources: keys the first run
/// handled count as copied, so a client's delete of them since is kept. `first` must not
/// delete moved items from the sources (the second would take them for deleted ones); `opts`
/// (the second run's) may.
async fn pass2_twice(
    first: &crate::migration::Migration,
    cp: &Checkpoint,
    opts: MigrationOptions,
    operation: &str,
    node: Option<String>,
    reporter: &Reporter,
) -> Result<Progress, MigrateError> {
    tokio::time::sleep(CLIENTS_SWITCH).await;
    let mut sources = std::collections::BTreeMap::new();
    for s in first.sources() {
        sources.insert(s.clone(), first.watermark(s).await?);
    }
    // `first` may hold pass 1's counts already (its counters are cumulative).
    let before_first = first.progress_now();
    let mut early = {
        let _follow = reporter.follow(operation, node.clone(), first.progress());
        first.pass2(cp).await?
    };
    // Every run lists the same moving keys again: "to move" is the largest listing, not a sum.
    early.items_total = before_first
        .items_total
        .max(early.items_total - before_first.items_total);
    early.items_done = before_first
        .items_done
        .max(early.items_done - before_first.items_done);
    // Target marks stay pass 1's: whatever landed on a target after the ring change (clients'
    // writes, and our copies just made) is not ours to update or delete any more.
    let settled = Checkpoint {
        sources,
        targets: cp.targets.clone(),
        complete: early.items_failed == 0,
    };
    tokio::time::sleep(CLIENTS_FOLLOW).await;
    let second = crate::migration::Migration::new(
        first.ring_before().clone(),
        first.ring_after().clone(),
        opts,
    )?;
    // Users see both runs as one: the second's counts go on top of the first's.
    let (merged_tx, merged_rx) =
        tokio::sync::watch::channel(both_runs(&early, &second.progress_now()));
    let forward = {
        let (mut late_rx, early, tx) = (second.progress(), early.clone(), merged_tx.clone());
        tokio::spawn(async move {
            while late_rx.changed().await.is_ok() {
                let late = late_rx.borrow_and_update().clone();
                tx.send_replace(both_runs(&early, &late));
            }
        })
    };
    let _follow = reporter.follow(operation, node, merged_rx);
    let late = second.pass2(&settled).await;
    forward.abort();
    let p = both_runs(&early, &late?);
    merged_tx.send_replace(p.clone());
    Ok(p)
}

/// The progress of pass 2's two runs as one (pure): counts add up; "to move" and "moved" are
/// the larger of the two (each run lists the same moving keys); the phase is the second run's
/// once it started.
fn both_runs(early: &Progress, late: &Progress) -> Progress {
    let mut p = early.clone();
    p.phase = match late.phase {
        Phase::Idle => Phase::Pass2,
        phase => phase,
    };
    p.items_total = p.items_total.max(late.items_total);
    p.items_done = p.items_done.max(late.items_done);
    p.items_moved += late.items_moved;
    p.items_updated += late.items_updated;
    p.items_deleted += late.items_deleted;
    p.items_skipped_expired += late.items_skipped_expired;
    p.items_skipped_newer += late.items_skipped_newer;
    p.items_skipped_deleted += late.items_skipped_deleted;
    p.items_failed += late.items_failed;
    p.bytes += late.bytes;
    p.source_items_deleted += late.source_items_deleted;
    p
}

/// The pod name in a node hostname `<pod>.<namespace>`.
fn pod_of(host: &str) -> &str {
    host.split('.').next().unwrap_or(host)
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
            restart_of: Some(host.to_string()),
            held: vec![],
        }),
    )
    .await
}

/// Where a running migration reports its progress; the controller writes it to the status
/// about once a second. Cheap to clone; a reporter nobody listens to costs nothing.
#[derive(Clone)]
pub struct Reporter {
    tx: std::sync::Arc<tokio::sync::watch::Sender<Option<MigrationStatus>>>,
}

impl Reporter {
    pub fn new() -> (
        Reporter,
        tokio::sync::watch::Receiver<Option<MigrationStatus>>,
    ) {
        let (tx, rx) = tokio::sync::watch::channel(None);
        (
            Reporter {
                tx: std::sync::Arc::new(tx),
            },
            rx,
        )
    }

    /// The latest progress record, if any job reported.
    pub fn last(&self) -> Option<MigrationStatus> {
        self.tx.borrow().clone()
    }

    /// Follows a job's progress until the returned guard is dropped (which reports the
    /// job's final counts).
    fn follow(
        &self,
        operation: &str,
        node: Option<String>,
        progress: tokio::sync::watch::Receiver<Progress>,
    ) -> Following {
        // `ended` orders the forwarding task's sends before the guard's final one: an aborted
        // task may still be running on another thread.
        let ended = std::sync::Arc::new(std::sync::Mutex::new(false));
        let (tx, op, who, mut rx, stop) = (
            self.tx.clone(),
            operation.to_string(),
            node.clone(),
            progress.clone(),
            ended.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                let p = rx.borrow_and_update().clone();
                {
                    let ended = stop.lock().unwrap();
                    if *ended {
                        break;
                    }
                    tx.send_replace(Some(migration_status(&op, who.as_deref(), &p)));
                }
                if rx.changed().await.is_err() {
                    break;
                }
            }
        });
        Following {
            task,
            ended,
            tx: self.tx.clone(),
            operation: operation.to_string(),
            node,
            progress,
        }
    }
}

struct Following {
    task: tokio::task::JoinHandle<()>,
    ended: std::sync::Arc<std::sync::Mutex<bool>>,
    tx: std::sync::Arc<tokio::sync::watch::Sender<Option<MigrationStatus>>>,
    operation: String,
    node: Option<String>,
    progress: tokio::sync::watch::Receiver<Progress>,
}

impl Drop for Following {
    fn drop(&mut self) {
        self.task.abort();
        let mut ended = self.ended.lock().unwrap();
        *ended = true;
        let p = self.progress.borrow().clone();
        self.tx.send_replace(Some(migration_status(
            &self.operation,
            self.node.as_deref(),
            &p,
        )));
    }
}

/// The status record of a migration's progress (pure).
pub fn migration_status(operation: &str, node: Option<&str>, p: &Progress) -> MigrationStatus {
    let phase = match p.phase {
        Phase::Idle => "Starting",
        Phase::Pass1 { .. } => "Pass1",
        Phase::RingChange => "RingChange",
        Phase::Pass2 => "Pass2",
        Phase::Done => "Done",
    };
    let who = node.map(|n| format!(" {n}")).unwrap_or_default();
    MigrationStatus {
        operation: operation.to_string(),
        node: node.map(str::to_string),
        phase: phase.to_string(),
        items_moved: p.items_done,
        items_to_move: p.items_total,
        summary: format!(
            "{operation}{who}: {phase} {}/{}",
            p.items_done, p.items_total
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_pass2_runs_read_as_one() {
        let early = Progress {
            phase: Phase::Done,
            items_total: 38_000,
            items_done: 38_000,
            items_moved: 120,
            items_skipped_deleted: 3,
            ..Progress::default()
        };
        // The second run has not listed anything yet: the first run's counts, in Pass2.
        let starting = both_runs(&early, &Progress::default());
        assert_eq!(starting.phase, Phase::Pass2);
        assert_eq!(
            (starting.items_done, starting.items_total),
            (38_000, 38_000)
        );
        let late = Progress {
            phase: Phase::Done,
            items_total: 38_010,
            items_done: 38_010,
            items_moved: 7,
            items_skipped_deleted: 1,
            ..Progress::default()
        };
        let done = both_runs(&early, &late);
        assert_eq!(done.phase, Phase::Done);
        assert_eq!((done.items_done, done.items_total), (38_010, 38_010));
        assert_eq!((done.items_moved, done.items_skipped_deleted), (127, 4));
    }

    #[test]
    fn migration_status_names_operation_node_phase_and_counts() {
        let p = Progress {
            phase: Phase::Pass1 { round: 2 },
            items_total: 40_000,
            items_done: 12_345,
            ..Progress::default()
        };
        let m = migration_status("rolling restart", Some("mc-4"), &p);
        assert_eq!(m.summary, "rolling restart mc-4: Pass1 12345/40000");
        assert_eq!((m.items_moved, m.items_to_move), (12_345, 40_000));
        assert_eq!(m.node.as_deref(), Some("mc-4"));
        let done = Progress {
            phase: Phase::Done,
            ..p
        };
        assert_eq!(
            migration_status("scale-in 5→3", None, &done).summary,
            "scale-in 5→3: Done 12345/40000"
        );
    }

    #[test]
    fn old_pending_records_still_parse() {
        // Written by an operator before `restart_of` and `held` existed.
        let old = r#"{"kind":"scaleOut","before":["127.1.0.2:11211"],"to_replicas":4,"early":[]}"#;
        let p: Pending = serde_json::from_str(old).unwrap();
        assert_eq!(
            p,
            Pending::ScaleOut {
                before: vec!["127.1.0.2:11211".into()],
                to_replicas: 4,
                early: vec![],
                restart_of: None,
                held: vec![],
            }
        );
    }

    #[test]
    fn pod_of_takes_the_first_label() {
        assert_eq!(pod_of("mc-3.ns-a"), "mc-3");
        assert_eq!(pod_of("mc-3"), "mc-3");
    }
}
