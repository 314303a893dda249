//! The ZooKeeper edge: one session per ensemble (shared by every CR that names it), reading the
//! state a plan needs, executing a plan's operations, and turning `cache_list` changes into
//! reconcile triggers. Decisions live in `zk_plan`; nothing here decides what to write.

use crate::leader::LeaderGate;
use crate::metrics::Metrics;
use crate::zk_plan::{
    self, Claim, MappingState, ZkObserved, ZkOp, BASE_TREE, CACHE_LIST, CLIENT_LIST, MAPPING_ROOT,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Mutex};
use zookeeper_client as zk;

#[derive(Debug, thiserror::Error)]
pub enum ZkError {
    #[error("cannot connect to ZooKeeper {ensemble} within {timeout:?}: {cause}; check spec.zookeeperServers and that the ensemble is reachable from the operator")]
    Connect {
        ensemble: String,
        timeout: Duration,
        cause: String,
    },
    #[error("ZooKeeper {ensemble}: {action} {path} failed: {source}")]
    Op {
        ensemble: String,
        action: &'static str,
        path: String,
        source: zk::Error,
    },
    #[error("not the leader any more: ZooKeeper write to {0} skipped")]
    NotLeader(String),
}

/// The data the operator stores in `/arcus/cache_list/<svc>` (servers and clients ignore it) to
/// record which CR owns the service code.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ServiceClaim {
    #[serde(rename = "managedBy")]
    pub managed_by: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl ServiceClaim {
    pub const MANAGER: &'static str = "arcus-operator";

    pub fn to_data(&self) -> String {
        serde_json::to_string(self).expect("claim serializes")
    }

    /// Who holds a `cache_list/<svc>` node with this data, relative to `our_uid`.
    pub fn classify(data: &[u8], our_uid: &str) -> Claim {
        match serde_json::from_slice::<ServiceClaim>(data) {
            Ok(c) if c.uid == our_uid => Claim::Ours,
            Ok(c) => Claim::Other(format!(
                "ArcusMemcached {}/{} (uid {})",
                c.namespace, c.name, c.uid
            )),
            Err(_) => Claim::Other("a service created outside this operator".into()),
        }
    }
}

/// A `cache_list` change seen on an ensemble: the service code whose nodes changed.
#[derive(Clone, Debug)]
pub struct CacheListChange {
    pub ensemble: String,
    pub service_code: String,
}

pub struct ZkPool {
    sessions: Mutex<HashMap<String, zk::Client>>,
    session_timeout: Duration,
    connect_timeout: Duration,
    changes: mpsc::UnboundedSender<CacheListChange>,
}

impl ZkPool {
    pub fn new(session_timeout: Duration, changes: mpsc::UnboundedSender<CacheListChange>) -> Self {
        Self {
            sessions: Mutex::default(),
            session_timeout,
            connect_timeout: Duration::from_secs(10),
            changes,
        }
    }

    /// The ensemble string for a CR: its servers in the given order, comma-joined.
    pub fn ensemble(servers: &[String]) -> String {
        servers.join(",")
    }

    /// A live session to `ensemble`, connecting (bounded) when there is none or it ended.
    pub async fn session(&self, ensemble: &str) -> Result<zk::Client, ZkError> {
        let mut sessions = self.sessions.lock().await;
        if let Some(c) = sessions.get(ensemble) {
            if !c.state().is_terminated() {
                return Ok(c.clone());
            }
            tracing::warn!(%ensemble, state = ?c.state(), "ZooKeeper session ended; reconnecting");
        }
        let connect = zk::Client::connector()
            .with_session_timeout(self.session_timeout)
            .with_connection_timeout(Duration::from_secs(3))
            .connect(ensemble);
        let client = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| ZkError::Connect {
                ensemble: ensemble.into(),
                timeout: self.connect_timeout,
                cause: "timed out".into(),
            })?
            .map_err(|e| ZkError::Connect {
                ensemble: ensemble.into(),
                timeout: self.connect_timeout,
                cause: e.to_string(),
            })?;
        tracing::info!(%ensemble, session = ?client.session_id(), "connected to ZooKeeper");
        self.watch_cache_list(ensemble, &client).await;
        sessions.insert(ensemble.to_string(), client.clone());
        Ok(client)
    }

    /// One persistent recursive watch per session on `/arcus/cache_list`: every node joining or
    /// leaving any service becomes a reconcile trigger. Reads under it never set watches (ZK 3.8
    /// misbehaves when a session adds another watch below its own recursive watch).
    async fn watch_cache_list(&self, ensemble: &str, client: &zk::Client) {
        let mut watcher = match client
            .watch(CACHE_LIST, zk::AddWatchMode::PersistentRecursive)
            .await
        {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!(%ensemble, error = %e, "cannot watch {CACHE_LIST}; relying on periodic resync");
                return;
            }
        };
        let changes = self.changes.clone();
        let ensemble = ensemble.to_string();
        tokio::spawn(async move {
            loop {
                let event = watcher.changed().await;
                if event.session_state.is_terminated() {
                    tracing::warn!(%ensemble, "ZooKeeper session ended; cache_list watch stops");
                    return;
                }
                let rest = event
                    .path
                    .strip_prefix(CACHE_LIST)
                    .unwrap_or("")
                    .trim_start_matches('/');
                if let Some(svc) = rest.split('/').next().filter(|s| !s.is_empty()) {
                    let _ = changes.send(CacheListChange {
                        ensemble: ensemble.clone(),
                        service_code: svc.to_string(),
                    });
                }
            }
        });
    }
}

/// What to read for one CR.
pub struct ObserveRequest<'a> {
    pub ensemble: &'a str,
    pub service_code: &'a str,
    pub our_uid: &'a str,
    pub mapping_key: &'a (dyn Fn(u32) -> String + Sync),
    /// Read mappings 0..read_upto, then on until the first absent one.
    pub read_upto: u32,
}

pub async fn observe(client: &zk::Client, req: &ObserveRequest<'_>) -> Result<ZkObserved, ZkError> {
    let op_err = |action: &'static str, path: &str| {
        let ensemble = req.ensemble.to_string();
        let path = path.to_string();
        move |source| ZkError::Op {
            ensemble,
            action,
            path,
            source,
        }
    };
    let mut observed = ZkObserved::default();
    for path in BASE_TREE {
        if client
            .check_stat(path)
            .await
            .map_err(op_err("stat", path))?
            .is_none()
        {
            observed.missing_base.push(path.to_string());
        }
    }
    let svc = req.service_code;
    let claim_path = format!("{CACHE_LIST}/{svc}");
    observed.claim = Some(match client.get_data(&claim_path).await {
        Ok((data, _)) => ServiceClaim::classify(&data, req.our_uid),
        Err(zk::Error::NoNode) => Claim::Absent,
        Err(e) => return Err(op_err("read", &claim_path)(e)),
    });
    if observed.claim != Some(Claim::Absent) {
        observed.cache_list_children = children(client, &claim_path)
            .await
            .map_err(op_err("list", &claim_path))?
            .unwrap_or_default();
    }
    let client_path = format!("{CLIENT_LIST}/{svc}");
    if let Some(c) = children(client, &client_path)
        .await
        .map_err(op_err("list", &client_path))?
    {
        observed.client_list_exists = true;
        observed.client_list_children = c;
    }
    let mut ordinal = 0;
    loop {
        let path = format!("{MAPPING_ROOT}/{}", (req.mapping_key)(ordinal));
        match children(client, &path)
            .await
            .map_err(op_err("list", &path))?
        {
            None if ordinal >= req.read_upto => break,
            None => {}
            Some(c) if c.is_empty() => {
                observed.mappings.insert(ordinal, MappingState::Empty);
            }
            Some(c) if c.len() == 1 && c[0].split('^').next() == Some(svc) => {
                observed.mappings.insert(ordinal, MappingState::Ours);
            }
            Some(c) => {
                observed.mappings.insert(ordinal, MappingState::Other(c));
            }
        }
        ordinal += 1;
    }
    Ok(observed)
}

async fn children(client: &zk::Client, path: &str) -> Result<Option<Vec<String>>, zk::Error> {
    match client.list_children(path).await {
        Ok(c) => Ok(Some(c)),
        Err(zk::Error::NoNode) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Executes `ops` in order; every write is re-checked against leadership first and counted.
/// Idempotent: a node that already exists (create) or is already gone (delete) is not an error,
/// so a plan interrupted half-way is simply re-planned and finished.
pub async fn apply(
    client: &zk::Client,
    ensemble: &str,
    ops: &[ZkOp],
    leader: &LeaderGate,
    metrics: &Metrics,
) -> Result<u32, ZkError> {
    let persistent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
    let mut writes = 0;
    let err = |action: &'static str, path: &str, source| ZkError::Op {
        ensemble: ensemble.to_string(),
        action,
        path: path.to_string(),
        source,
    };
    for op in ops {
        if !leader.is_leader() {
            return Err(ZkError::NotLeader(op.describe()));
        }
        tracing::info!(%ensemble, op = %op.describe(), "zk write");
        match op {
            ZkOp::CreateNode { path, data } => {
                if ignore(
                    client.create(path, data.as_bytes(), &persistent).await,
                    zk::Error::NodeExists,
                )
                .map_err(|e| err("create", path, e))?
                {
                    writes += 1;
                }
            }
            ZkOp::CreateMapping {
                key, service_code, ..
            } => {
                let parent = format!("{MAPPING_ROOT}/{key}");
                let child = format!("{parent}/{service_code}");
                let mut multi = client.new_multi_writer();
                multi
                    .add_create(&parent, b"", &persistent)
                    .map_err(|e| err("create", &parent, e))?;
                multi
                    .add_create(&child, b"", &persistent)
                    .map_err(|e| err("create", &child, e))?;
                match multi.commit().await {
                    Ok(_) => writes += 2,
                    Err(zk::MultiWriteError::OperationFailed {
                        index: 0,
                        source: zk::Error::NodeExists,
                    }) => {
                        // The parent survived an interrupted create: complete it.
                        if ignore(
                            client.create(&child, b"", &persistent).await,
                            zk::Error::NodeExists,
                        )
                        .map_err(|e| err("create", &child, e))?
                        {
                            writes += 1;
                        }
                    }
                    Err(e) => return Err(err("create", &child, e.into())),
                }
            }
            ZkOp::DeleteMapping {
                key, service_code, ..
            } => {
                let parent = format!("{MAPPING_ROOT}/{key}");
                let child = format!("{parent}/{service_code}");
                if ignore(client.delete(&child, None).await, zk::Error::NoNode)
                    .map_err(|e| err("delete", &child, e))?
                {
                    writes += 1;
                }
                if ignore(client.delete(&parent, None).await, zk::Error::NoNode)
                    .map_err(|e| err("delete", &parent, e))?
                {
                    writes += 1;
                }
            }
            ZkOp::DeleteNodeAndChildren { path, children } => {
                for c in children {
                    let p = format!("{path}/{c}");
                    if ignore(client.delete(&p, None).await, zk::Error::NoNode)
                        .map_err(|e| err("delete", &p, e))?
                    {
                        writes += 1;
                    }
                }
                if ignore(client.delete(path, None).await, zk::Error::NoNode)
                    .map_err(|e| err("delete", path, e))?
                {
                    writes += 1;
                }
            }
        }
    }
    metrics.zk_writes.inc_by(writes as u64);
    Ok(writes)
}

/// Ok(true) when the write happened, Ok(false) when it failed with `benign` (already done).
fn ignore<T>(r: Result<T, zk::Error>, benign: zk::Error) -> Result<bool, zk::Error> {
    match r {
        Ok(_) => Ok(true),
        Err(e) if e == benign => Ok(false),
        Err(e) => Err(e),
    }
}

/// Registered hostnames under `cache_list/<svc>`.
pub fn registered_hostnames(observed: &ZkObserved) -> Vec<String> {
    observed
        .cache_list_children
        .iter()
        .filter_map(|c| zk_plan::registered_hostname(c))
        .map(str::to_string)
        .collect()
}

pub type SharedZkPool = Arc<ZkPool>;
