//! The ZooKeeper edge: one session per ensemble (shared by every CR that names it), and, per
//! service code, a [`ZkRegistry`]: every read and write the operator makes in ZooKeeper for it.
//! Decisions live in `zk_plan` and `operation`; nothing here decides what to write.
//!
//! Fencing: every write checks the [`LeaderGate`] first, and every write also names the data
//! version of the claim znode (`/arcus/cache_list/<svc>`) this process last read or wrote, in
//! the same transaction. A stand-by that took over rewrites the claim as its first act of an
//! operation, so a paused ex-leader that slipped past the gate still fails in ZooKeeper.

use crate::leader::{Fenced, LeaderGate};
use crate::metrics::Metrics;
use crate::operation::{self, Operation, OperationRecord, RecordError, RECORD_VERSION};
use crate::zk_auth::{same_acls, OwnedAcls, ZkAuth};
use crate::zk_plan::{
    CacheZnode, Claim, MappingState, ZkObserved, ZkOp, BASE_TREE, CACHE_LIST, CLIENT_LIST,
    MAPPING_ROOT,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::future::Future;
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
    #[error("ZooKeeper {ensemble}: {action} {path} refused: its ACL does not let the operator in (NoAuth); set spec.zookeeperAuth to the Secret with the credentials the tree was secured with (after a password change: the old one under the Secret's key previousPassword until the next pass), or open the znode's ACL by hand")]
    NotAuthorized {
        ensemble: String,
        action: &'static str,
        path: String,
    },
    #[error("ZooKeeper {ensemble}: {action} {path} failed: {source}")]
    Op {
        ensemble: String,
        action: &'static str,
        path: String,
        source: zk::Error,
    },
    #[error(transparent)]
    Fenced(#[from] Fenced),
    #[error("ZooKeeper {ensemble}: {path} was changed by another writer since this pass read it (another operator instance took over?): this pass stops, the next one reads it again")]
    ClaimChanged { ensemble: String, path: String },
    #[error("ZooKeeper {ensemble}: {path}: {source}")]
    Record {
        ensemble: String,
        path: String,
        source: RecordError,
    },
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

/// A `cache_list` change seen on an ensemble: the service code whose nodes changed (empty:
/// every service of the ensemble, when the session watching it ended).
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

    /// A live session to `ensemble`, connecting (bounded) when there is none or it ended; with
    /// `auth`, a session of its own that has sent `addauth digest` with it.
    pub async fn session(
        &self,
        ensemble: &str,
        auth: Option<&ZkAuth>,
    ) -> Result<zk::Client, ZkError> {
        // Keyed by the digest ids, never the password: a changed password opens a new session.
        let key = match auth {
            Some(a) => format!("{ensemble}#{}", a.session_key()),
            None => ensemble.to_string(),
        };
        let mut sessions = self.sessions.lock().await;
        if let Some(c) = sessions.get(&key) {
            if !c.state().is_terminated() {
                return Ok(c.clone());
            }
            tracing::warn!(%ensemble, state = ?c.state(), "ZooKeeper session ended; reconnecting");
        }
        let mut connector = zk::Client::connector()
            .with_session_timeout(self.session_timeout)
            .with_connection_timeout(Duration::from_secs(3));
        for credential in auth.map(ZkAuth::credentials).unwrap_or_default() {
            connector = connector.with_auth("digest", &credential);
        }
        let connect = connector.connect(ensemble);
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
        let user = auth.map(|a| a.user.as_str());
        tracing::info!(%ensemble, session = ?client.session_id(), ?user, "connected to ZooKeeper");
        self.watch_cache_list(ensemble, &client).await;
        if let Some(a) = auth {
            // The same user's sessions with another password are a password change's leftovers:
            // let them close (a session ends when its last clone is dropped).
            let same_user = format!("{ensemble}#{}:", a.user);
            sessions.retain(|k, _| !k.starts_with(&same_user));
        }
        sessions.insert(key, client.clone());
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
                    // Every resource on this ensemble looks again now (its pass reconnects, or
                    // reports the outage in its status), and again the moment the ensemble
                    // answers: nodes whose sessions expired wait for the operator to let them in.
                    let all = CacheListChange {
                        ensemble: ensemble.clone(),
                        service_code: String::new(),
                    };
                    let _ = changes.send(all.clone());
                    if wait_until_answering(&ensemble).await {
                        tracing::info!(%ensemble, "ZooKeeper answers again");
                        let _ = changes.send(all);
                    }
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

/// Returns once a new session to `ensemble` can be established (tried every second; each try
/// is closed at once: the next pass opens the session it uses), or after 10 minutes (the
/// passes, retried while it fails, reconnect by themselves).
async fn wait_until_answering(ensemble: &str) -> bool {
    for _ in 0..600 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let probe = zk::Client::connector()
            .with_session_timeout(Duration::from_secs(10))
            .with_connection_timeout(Duration::from_secs(1))
            .connect(ensemble);
        if let Ok(Ok(client)) = tokio::time::timeout(Duration::from_secs(3), probe).await {
            drop(client);
            return true;
        }
    }
    false
}

/// What to read for one CR.
pub struct ObserveRequest<'a> {
    pub our_uid: &'a str,
    pub mapping_key: &'a (dyn Fn(u32) -> String + Sync),
    /// Read mappings 0..read_upto, then on until the first absent one.
    pub read_upto: u32,
}

/// What the state machine needs of ZooKeeper (the executor runs on a fake of it in tests).
pub trait Registry: Send + Sync {
    /// The ring now: the `cache_list/<svc>` children that are node registrations.
    fn ring(&self) -> impl Future<Output = Result<Vec<CacheZnode>, ZkError>> + Send;
    /// Persists `operation` (None: nothing in flight) in the claim: a ring change that takes
    /// no node out.
    fn persist(
        &self,
        operation: Option<&Operation>,
    ) -> impl Future<Output = Result<(), ZkError>> + Send {
        self.leave_ring(&[], operation)
    }
    /// Deletes `znodes` from the ring and persists `then`, in one transaction: clients go from
    /// the ring before straight to the ring after (one at a time, a client could route by a
    /// ring in between, where a key of one leaving node belongs to another), and the record
    /// never lags the ring.
    fn leave_ring(
        &self,
        znodes: &[CacheZnode],
        then: Option<&Operation>,
    ) -> impl Future<Output = Result<(), ZkError>> + Send;
    /// The epoch of the last record read or written (progress reports carry it).
    fn epoch(&self) -> u64;
}

/// The claim znode as this process last read or wrote it.
#[derive(Clone, Debug, Default)]
struct ClaimState {
    /// Its data version; None until read (or when it does not exist).
    version: Option<i32>,
    epoch: u64,
}

/// Every ZooKeeper read and write for one service code, fenced (see the module docs).
#[derive(Clone)]
pub struct ZkRegistry {
    client: zk::Client,
    ensemble: String,
    service_code: String,
    claim: ServiceClaim,
    gate: LeaderGate,
    metrics: Arc<Metrics>,
    state: Arc<std::sync::Mutex<ClaimState>>,
    /// What the znodes this service code owns are created (and secured) with.
    acls: OwnedAcls,
}

impl ZkRegistry {
    pub fn new(
        client: zk::Client,
        ensemble: &str,
        service_code: &str,
        claim: ServiceClaim,
        gate: LeaderGate,
        metrics: Arc<Metrics>,
        acls: OwnedAcls,
    ) -> Self {
        Self {
            client,
            ensemble: ensemble.into(),
            service_code: service_code.into(),
            claim,
            gate,
            metrics,
            state: Arc::default(),
            acls,
        }
    }

    fn client_list_path(&self) -> String {
        format!("{CLIENT_LIST}/{}", self.service_code)
    }

    /// The ACL an owned znode gets: `cache_list/<svc>` and `client_list/<svc>` take children
    /// from anyone, mappings are read-only to them. None: a shared node (open).
    fn acl_of(&self, path: &str) -> Option<Vec<zk::Acl>> {
        if path == self.claim_path() || path == self.client_list_path() {
            Some(self.acls.registrable())
        } else if path.starts_with(&format!("{MAPPING_ROOT}/")) {
            Some(self.acls.readable())
        } else {
            None
        }
    }

    fn claim_path(&self) -> String {
        format!("{CACHE_LIST}/{}", self.service_code)
    }

    fn op_err(&self, action: &'static str, path: &str) -> impl FnOnce(zk::Error) -> ZkError {
        let (ensemble, path) = (self.ensemble.clone(), path.to_string());
        move |source| match source {
            zk::Error::NoAuth => ZkError::NotAuthorized {
                ensemble,
                action,
                path,
            },
            source => ZkError::Op {
                ensemble,
                action,
                path,
                source,
            },
        }
    }

    fn version(&self) -> Option<i32> {
        self.state.lock().expect("claim state").version
    }

    /// Reads what a plan and the state machine need: the base tree, the claim (and the
    /// operation recorded in it), the ring, the clients, the mappings.
    ///
    /// All requests go out at once: ZooKeeper answers one session's requests in the order they
    /// were sent, so this reads what the same requests one after another would, in one round
    /// trip instead of a dozen (a pass's latency is mostly these round trips).
    pub async fn observe(
        &self,
        req: &ObserveRequest<'_>,
    ) -> Result<(ZkObserved, Option<Operation>), ZkError> {
        let claim_path = self.claim_path();
        let client_path = format!("{CLIENT_LIST}/{}", self.service_code);
        let stats = futures::future::join_all(BASE_TREE.iter().map(|p| self.client.check_stat(p)));
        let claim = self.client.get_data(&claim_path);
        // Read whoever holds the claim; used only when it is ours.
        let acl = self.client.get_acl(&claim_path);
        let ring = children(&self.client, &claim_path);
        let clients = children(&self.client, &client_path);
        let mappings = self.read_mappings(req);
        let (stats, claim, acl, ring, clients, mappings) =
            tokio::join!(stats, claim, acl, ring, clients, mappings);

        let mut observed = ZkObserved::default();
        for (path, stat) in BASE_TREE.iter().zip(stats) {
            if stat.map_err(self.op_err("stat", path))?.is_none() {
                observed.missing_base.push(path.to_string());
            }
        }
        let (claim, operation) = self.classify_claim(claim, req.our_uid)?;
        if claim == Claim::Ours {
            let (acl, _) = acl.map_err(self.op_err("read the ACL of", &claim_path))?;
            observed.owned_acls_stale = !same_acls(&acl, &self.acls.registrable());
        }
        observed.claim = Some(claim);
        if observed.claim != Some(Claim::Absent) {
            observed.cache_list_children = ring
                .map_err(self.op_err("list", &claim_path))?
                .unwrap_or_default();
        }
        if let Some(c) = clients.map_err(self.op_err("list", &client_path))? {
            observed.client_list_exists = true;
            observed.client_list_children = c;
        }
        observed.mappings = mappings?;
        Ok((observed, operation))
    }

    /// Who holds the claim (as read) and, when it is ours, the operation it records;
    /// remembers the data version every later write is conditional on.
    fn classify_claim(
        &self,
        read: Result<(Vec<u8>, zk::Stat), zk::Error>,
        our_uid: &str,
    ) -> Result<(Claim, Option<Operation>), ZkError> {
        let path = self.claim_path();
        let (data, stat) = match read {
            Ok(found) => found,
            Err(zk::Error::NoNode) => {
                *self.state.lock().expect("claim state") = ClaimState::default();
                return Ok((Claim::Absent, None));
            }
            Err(e) => return Err(self.op_err("read", &path)(e)),
        };
        let claim = ServiceClaim::classify(&data, our_uid);
        if claim != Claim::Ours {
            return Ok((claim, None));
        }
        let (operation, epoch) =
            operation::parse_claim_data(&data).map_err(|source| ZkError::Record {
                ensemble: self.ensemble.clone(),
                path: path.clone(),
                source,
            })?;
        *self.state.lock().expect("claim state") = ClaimState {
            version: Some(stat.version),
            epoch,
        };
        Ok((Claim::Ours, operation))
    }

    /// Mappings 0..=read_upto are read at once; past that, one by one until the first absent.
    async fn read_mappings(
        &self,
        req: &ObserveRequest<'_>,
    ) -> Result<std::collections::BTreeMap<u32, MappingState>, ZkError> {
        let path_of = |ordinal: u32| format!("{MAPPING_ROOT}/{}", (req.mapping_key)(ordinal));
        let first: Vec<String> = (0..=req.read_upto).map(path_of).collect();
        let found = futures::future::join_all(first.iter().map(|p| children(&self.client, p)));
        let mut mappings = std::collections::BTreeMap::new();
        let mut last_found = false;
        for (ordinal, (path, found)) in (0..).zip(first.iter().zip(found.await)) {
            last_found = self.mapping_state(path, found, ordinal, &mut mappings)?;
        }
        let mut ordinal = req.read_upto + 1;
        while last_found {
            let path = path_of(ordinal);
            let found = children(&self.client, &path).await;
            last_found = self.mapping_state(&path, found, ordinal, &mut mappings)?;
            ordinal += 1;
        }
        Ok(mappings)
    }

    /// Records the mapping of `ordinal` as read; whether it exists.
    fn mapping_state(
        &self,
        path: &str,
        found: Result<Option<Vec<String>>, zk::Error>,
        ordinal: u32,
        mappings: &mut std::collections::BTreeMap<u32, MappingState>,
    ) -> Result<bool, ZkError> {
        let state = match found.map_err(self.op_err("list", path))? {
            None => return Ok(false),
            Some(c) if c.is_empty() => MappingState::Empty,
            Some(c) if c.len() == 1 && c[0].split('^').next() == Some(&self.service_code) => {
                MappingState::Ours
            }
            Some(c) => MappingState::Other(c),
        };
        mappings.insert(ordinal, state);
        Ok(true)
    }

    /// The claim data with `operation` recorded and the epoch raised.
    fn record_data(&self, operation: Option<&Operation>) -> (Vec<u8>, u64) {
        let epoch = self.state.lock().expect("claim state").epoch + 1;
        let record = ClaimRecord {
            claim: self.claim.clone(),
            epoch,
            operation: operation.map(|o| OperationRecord {
                version: RECORD_VERSION,
                epoch,
                operation: o.clone(),
            }),
        };
        (
            serde_json::to_vec(&record).expect("claim serializes"),
            epoch,
        )
    }

    /// Sends `multi` (its first op names the claim's version: callers pass [`Self::fence`]
    /// first); on success the claim's version moves on by `bumps` (the number of claim writes
    /// in it) and its epoch becomes `epoch`.
    async fn commit(
        &self,
        what: &str,
        mut multi: zk::MultiWriter<'_>,
        bumps: i32,
        epoch: Option<u64>,
    ) -> Result<Vec<zk::MultiWriteResult>, zk::MultiWriteError> {
        let result = multi.commit().await;
        if result.is_ok() {
            let mut state = self.state.lock().expect("claim state");
            state.version = state.version.map(|v| v + bumps);
            if let Some(e) = epoch {
                state.epoch = e;
            }
        }
        tracing::debug!(ensemble = %self.ensemble, %what, ok = result.is_ok(), "zk transaction");
        result
    }

    fn fence(&self, what: impl FnOnce() -> String) -> Result<i32, ZkError> {
        self.gate.check(what)?;
        self.version().ok_or_else(|| ZkError::ClaimChanged {
            ensemble: self.ensemble.clone(),
            path: self.claim_path(),
        })
    }

    fn failed(&self, path: &str, e: zk::MultiWriteError, claim_index: usize) -> ZkError {
        match e {
            zk::MultiWriteError::OperationFailed {
                index,
                source: zk::Error::BadVersion | zk::Error::NoNode,
            } if index == claim_index => ZkError::ClaimChanged {
                ensemble: self.ensemble.clone(),
                path: self.claim_path(),
            },
            e => self.op_err("write", path)(e.into()),
        }
    }

    /// Executes a plan's operations in order, each fenced. Idempotent: a node that already
    /// exists (create) or is already gone (delete) is not an error, so a plan interrupted
    /// half-way is simply re-planned and finished. Returns the znode writes made.
    pub async fn apply(&self, ops: &[ZkOp]) -> Result<u32, ZkError> {
        let mut writes = 0;
        for op in ops {
            self.gate
                .check(|| format!("ZooKeeper: {}", op.describe()))?;
            tracing::info!(ensemble = %self.ensemble, op = %op.describe(), "zk write");
            writes += match op {
                ZkOp::CreateNode { path, data } => self.create_node(path, data).await?,
                ZkOp::CreateMapping {
                    key, service_code, ..
                } => self.create_mapping(key, service_code).await?,
                ZkOp::DeleteMapping {
                    key, service_code, ..
                } => {
                    let parent = format!("{MAPPING_ROOT}/{key}");
                    let child = format!("{parent}/{service_code}");
                    self.delete_fenced(&[child, parent]).await?
                }
                ZkOp::DeleteNodeAndChildren { path, children } => {
                    self.delete_tree(path, children).await?
                }
                ZkOp::SecureOwned { paths } => self.secure(paths).await?,
            };
        }
        self.metrics.zk_writes.inc_by(writes as u64);
        Ok(writes)
    }

    async fn create_node(&self, path: &str, data: &str) -> Result<u32, ZkError> {
        let acl = self.acl_of(path);
        let acls = acl.as_deref().map_or(zk::Acls::anyone_all(), zk::Acls::new);
        let persistent = zk::CreateMode::Persistent.with_acls(acls);
        let created = self.client.create(path, data.as_bytes(), &persistent).await;
        let wrote = ignore(created, zk::Error::NodeExists).map_err(self.op_err("create", path))?;
        if wrote && path == self.claim_path() {
            // Our claim is new: version 0, no operation.
            *self.state.lock().expect("claim state") = ClaimState {
                version: Some(0),
                epoch: 0,
            };
        }
        Ok(wrote as u32)
    }

    /// `cache_server_mapping/<key>` and its child `<svc>` in one transaction, with the claim's
    /// version checked.
    async fn create_mapping(&self, key: &str, service_code: &str) -> Result<u32, ZkError> {
        let acl = self.acls.readable();
        let persistent = zk::CreateMode::Persistent.with_acls(zk::Acls::new(&acl));
        let parent = format!("{MAPPING_ROOT}/{key}");
        let child = format!("{parent}/{service_code}");
        for with_parent in [true, false] {
            let version = self.fence(|| format!("ZooKeeper: map {key}"))?;
            let mut multi = self.client.new_multi_writer();
            let build = (|| {
                multi.add_check_version(&self.claim_path(), version)?;
                if with_parent {
                    multi.add_create(&parent, b"", &persistent)?;
                }
                multi.add_create(&child, b"", &persistent)
            })();
            build.map_err(self.op_err("create", &child))?;
            match self.commit("map", multi, 0, None).await {
                Ok(_) => return Ok(1 + with_parent as u32),
                // The parent survived an interrupted create: complete it.
                Err(zk::MultiWriteError::OperationFailed {
                    index: 1,
                    source: zk::Error::NodeExists,
                }) if with_parent => continue,
                Err(zk::MultiWriteError::OperationFailed {
                    index,
                    source: zk::Error::NodeExists,
                }) if index > 0 => return Ok(0),
                Err(e) => return Err(self.failed(&child, e, 0)),
            }
        }
        Ok(0)
    }

    /// Sets each owned znode's ACL (absent ones are done). Not fenced (ZooKeeper has no
    /// conditional ACL change in a transaction); an ex-leader's late write sets the same ACL.
    async fn secure(&self, paths: &[String]) -> Result<u32, ZkError> {
        let mut writes = 0;
        for path in paths {
            let Some(acl) = self.acl_of(path) else {
                continue;
            };
            let set = self.client.set_acl(path, &acl, None).await;
            writes += ignore(set.map(|_| ()), zk::Error::NoNode)
                .map_err(self.op_err("set the ACL of", path))? as u32;
        }
        Ok(writes)
    }

    /// Deletes `paths` in order, each with the claim's version checked; absent ones are done.
    async fn delete_fenced(&self, paths: &[String]) -> Result<u32, ZkError> {
        let mut writes = 0;
        for path in paths {
            let version = self.fence(|| format!("ZooKeeper: delete {path}"))?;
            let mut multi = self.client.new_multi_writer();
            let build = multi
                .add_check_version(&self.claim_path(), version)
                .and_then(|_| multi.add_delete(path, None));
            build.map_err(self.op_err("delete", path))?;
            match self.commit("delete", multi, 0, None).await {
                Ok(_) => writes += 1,
                Err(zk::MultiWriteError::OperationFailed {
                    index: 1,
                    source: zk::Error::NoNode,
                }) => {}
                Err(e) => return Err(self.failed(path, e, 0)),
            }
        }
        Ok(writes)
    }

    /// Deletion: the nodes' (ephemeral) registrations, then the claim itself at its version.
    async fn delete_tree(&self, path: &str, children: &[String]) -> Result<u32, ZkError> {
        let paths: Vec<String> = children.iter().map(|c| format!("{path}/{c}")).collect();
        let mut writes = if path == self.claim_path() {
            self.delete_fenced(&paths).await?
        } else {
            let mut w = 0;
            for p in &paths {
                let gone = self.client.delete(p, None).await;
                w += ignore(gone, zk::Error::NoNode).map_err(self.op_err("delete", p))? as u32;
            }
            w
        };
        let version = (path == self.claim_path())
            .then(|| self.version())
            .flatten();
        match self.client.delete(path, version).await {
            Ok(()) => writes += 1,
            Err(zk::Error::NoNode) => {}
            Err(zk::Error::BadVersion) => {
                return Err(ZkError::ClaimChanged {
                    ensemble: self.ensemble.clone(),
                    path: path.into(),
                })
            }
            Err(e) => return Err(self.op_err("delete", path)(e)),
        }
        Ok(writes)
    }
}

impl Registry for ZkRegistry {
    async fn ring(&self) -> Result<Vec<CacheZnode>, ZkError> {
        let path = self.claim_path();
        let (children, _) = self
            .client
            .get_children(&path)
            .await
            .map_err(self.op_err("list", &path))?;
        Ok(CacheZnode::parse_all(&children))
    }

    async fn leave_ring(
        &self,
        znodes: &[CacheZnode],
        then: Option<&Operation>,
    ) -> Result<(), ZkError> {
        let path = self.claim_path();
        // A node can leave by itself between our listing and the transaction: list again.
        for _ in 0..5 {
            let version = self.fence(|| format!("ZooKeeper: operation record of {path}"))?;
            let ring = if znodes.is_empty() {
                vec![]
            } else {
                self.ring().await?
            };
            let present: Vec<String> = znodes
                .iter()
                .filter(|z| ring.contains(z))
                .map(|z| format!("{path}/{z}"))
                .collect();
            let (data, epoch) = self.record_data(then);
            let mut multi = self.client.new_multi_writer();
            let build = (|| {
                multi.add_set_data(&path, &data, Some(version))?;
                for p in &present {
                    multi.add_delete(p, None)?;
                }
                Ok::<_, zk::Error>(())
            })();
            build.map_err(self.op_err("write", &path))?;
            match self.commit("record", multi, 1, Some(epoch)).await {
                Ok(_) => {
                    self.metrics.zk_writes.inc_by(1 + present.len() as u64);
                    tracing::info!(ensemble = %self.ensemble, %path, epoch, left = ?present, stage = then.map(|o| o.stage_name()).unwrap_or("none"), "operation recorded");
                    return Ok(());
                }
                Err(zk::MultiWriteError::OperationFailed {
                    index,
                    source: zk::Error::NoNode,
                }) if index > 0 => continue,
                Err(e) => return Err(self.failed(&path, e, 0)),
            }
        }
        Err(self.op_err("delete", &path)(zk::Error::NoNode))
    }

    fn epoch(&self) -> u64 {
        self.state.lock().expect("claim state").epoch
    }
}

/// The claim data: the claim, the epoch of the last record, and what is in flight.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ClaimRecord {
    #[serde(flatten)]
    claim: ServiceClaim,
    epoch: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    operation: Option<OperationRecord>,
}

async fn children(client: &zk::Client, path: &str) -> Result<Option<Vec<String>>, zk::Error> {
    match client.list_children(path).await {
        Ok(c) => Ok(Some(c)),
        Err(zk::Error::NoNode) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Ok(true) when the write happened, Ok(false) when it failed with `benign` (already done).
fn ignore<T>(r: Result<T, zk::Error>, benign: zk::Error) -> Result<bool, zk::Error> {
    match r {
        Ok(_) => Ok(true),
        Err(e) if e == benign => Ok(false),
        Err(e) => Err(e),
    }
}

pub type SharedZkPool = Arc<ZkPool>;
