//! [`ArcusClient`]: key-value operations routed over the ring of a service code.

use crate::admin::AdminClient;
use crate::connection::{NodePool, PoolLimits};
use crate::discovery::{self, DiscoveryState, RingSink};
use crate::error::{Error, Result};
use crate::pipeline::{Bounds, Cmd, PipelineOptions, PipelinedNode, Reply};
use crate::protocol::{self, Item, StoreCommand, StoreStatus};
use crate::ring::{self, Ring};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::{debug, info};
use zookeeper_client as zk;

/// Client settings. `ClientOptions::default()` gives the values documented per field.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Bound of one operation on one node: waiting for a pooled connection, connecting,
    /// sending and reading the reply. Default 1 s.
    pub op_timeout: Duration,
    /// Bound of a TCP connect to a cache node (also bounded by `op_timeout`). Default 1 s.
    pub connect_timeout: Duration,
    /// Connections per node at most (operations beyond wait for a free one). Default 32.
    pub max_connections_per_node: usize,
    /// Longest key in bytes. Default 4000 as arcus-java-client (`KeyValidator.MAX_KEY_LENGTH`);
    /// stock memcached accepts only 250 ([`protocol::MEMCACHED_MAX_KEY_LEN`]).
    pub max_key_len: usize,
    /// Largest value in bytes. Default [`protocol::DEFAULT_MAX_VALUE_LEN`] (1 MiB less overhead).
    pub max_value_len: usize,
    /// Keys per `get` command line in multi-key gets (larger batches are split). Default 100.
    pub max_keys_per_get: usize,
    /// ZooKeeper session timeout to negotiate. Default 15 s (the Java client's).
    pub zk_session_timeout: Duration,
    /// Bound of opening a ZooKeeper session and the first read of the node list. Default 10 s.
    pub zk_connect_timeout: Duration,
    /// Hash only the `{...}` part of a key when present (ARCUS shard keys). Default off, as in
    /// the Java client.
    pub shard_key: bool,
    /// For this long after a ring change, `delete` also goes to the key's owners on the rings
    /// replaced within that time (best effort, in the same call). A cache migration copies a
    /// moved key from its previous owner for a while after the change; without this, a key
    /// deleted on its new owner before the copy reached it would come back. Default 60 s
    /// (longer than a migration's pass 2 and ARCUS's scrub-stale window); zero turns it off.
    pub delete_previous_owners_for: Duration,
    /// `Some`: each node's requests are pipelined over `connections_per_node` long-lived
    /// connections (a writer coalesces queued requests into one socket write, a reader matches
    /// replies in order), as the Java client does; `max_connections_per_node` then does not
    /// apply. `None`: one pooled connection per request in flight. Default `None`. Fastest with
    /// one current-thread runtime per core, each with its own client (docs/BENCHMARKS.md).
    pub pipeline: Option<PipelineOptions>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            op_timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            max_connections_per_node: 32,
            max_key_len: protocol::MAX_KEY_LEN,
            max_value_len: protocol::DEFAULT_MAX_VALUE_LEN,
            max_keys_per_get: 100,
            zk_session_timeout: Duration::from_secs(15),
            zk_connect_timeout: Duration::from_secs(10),
            shard_key: false,
            delete_previous_owners_for: Duration::from_secs(60),
            pipeline: None,
        }
    }
}

/// Rings replaced less than `delete_previous_owners_for` ago, at most this many.
const MAX_RETIRED_RINGS: usize = 8;

/// How requests reach one node: its connection pool, or its pipelined connections.
pub(crate) struct Node {
    pool: NodePool,
    pipe: Option<PipelinedNode>,
}

impl Node {
    fn addr(&self) -> &str {
        self.pool.addr()
    }

    /// Runs `cmd` as operation `op` on this node, within the operation timeout.
    async fn call(&self, op: &'static str, cmd: &Cmd<'_>) -> Result<Reply> {
        match &self.pipe {
            Some(p) => p.call(op, cmd).await,
            None => self.pool.run(op, async |c| cmd.run_on(c).await).await,
        }
    }
}

/// A ring the client routed by until `at`, with the nodes it used then.
struct Retired {
    at: Instant,
    ring: Arc<Ring>,
    nodes: Vec<Arc<Node>>,
    /// Nodes a follow-up delete could not reach: gone for good, most likely, so they are not
    /// tried again (each try could cost a connect timeout).
    unreachable: Mutex<HashSet<String>>,
}

impl Retired {
    fn node(&self, addr: &str) -> Option<&Arc<Node>> {
        let i = self
            .ring
            .nodes()
            .binary_search_by(|n| n.as_str().cmp(addr))
            .ok()?;
        Some(&self.nodes[i])
    }
}

/// The distinct owners of `key` on `previous` rings (newest first) other than `current_owner`.
/// Pure: unit-tested below.
pub(crate) fn previous_owners<'r>(
    previous: impl IntoIterator<Item = &'r Ring>,
    key: &str,
    current_owner: &str,
) -> Vec<&'r str> {
    let mut out: Vec<&str> = Vec::new();
    for ring in previous {
        if let Some(owner) = ring.node_for_key(key) {
            if owner != current_owner && !out.contains(&owner) {
                out.push(owner);
            }
        }
    }
    out
}

/// The ring and one [`Node`] per node on it (same order as `ring.nodes()`), and the rings it
/// replaced recently (oldest first).
struct Topology {
    ring: Arc<Ring>,
    nodes: Vec<Arc<Node>>,
    retired: Vec<Arc<Retired>>,
}

impl Topology {
    fn node(&self, addr: &str) -> Option<&Arc<Node>> {
        let i = self
            .ring
            .nodes()
            .binary_search_by(|n| n.as_str().cmp(addr))
            .ok()?;
        Some(&self.nodes[i])
    }
}

enum Session {
    Static,
    Reconnecting,
    Watching(zk::Client),
}

/// State shared by the client handles and the discovery task.
struct Shared {
    service_code: String,
    limits: PoolLimits,
    pipeline: Option<PipelineOptions>,
    keep_retired_for: Duration,
    topology: RwLock<Arc<Topology>>,
    ring_tx: watch::Sender<Arc<Ring>>,
    session: Mutex<Session>,
}

impl Shared {
    fn new(service_code: String, opts: &ClientOptions, session: Session) -> Shared {
        let ring = Arc::new(Ring::default());
        let limits = PoolLimits {
            max_connections: opts.max_connections_per_node,
            connect_timeout: opts.connect_timeout,
            op_timeout: opts.op_timeout,
            ..PoolLimits::default()
        };
        Shared {
            service_code,
            limits,
            pipeline: opts.pipeline.clone(),
            keep_retired_for: opts.delete_previous_owners_for,
            topology: RwLock::new(Arc::new(Topology {
                ring: ring.clone(),
                nodes: Vec::new(),
                retired: Vec::new(),
            })),
            ring_tx: watch::Sender::new(ring),
            session: Mutex::new(session),
        }
    }

    fn topology(&self) -> Arc<Topology> {
        self.topology
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn new_node(&self, addr: &str) -> Arc<Node> {
        let pipe = self.pipeline.as_ref().map(|opts| {
            let bounds = Bounds {
                connect_timeout: self.limits.connect_timeout,
                op_timeout: self.limits.op_timeout,
                // Replies of many requests arrive together: read them in few system calls.
                read_buffer: self.limits.read_buffer.max(64 * 1024),
            };
            PipelinedNode::new(addr.to_string(), opts.clone(), bounds)
        });
        Arc::new(Node {
            pool: NodePool::new(addr, self.limits.clone()),
            pipe,
        })
    }

    /// Installs `ring`, keeping the nodes (and their open connections) that stay.
    fn install(&self, ring: Ring) {
        let mut slot = self.topology.write().unwrap_or_else(|p| p.into_inner());
        if *slot.ring == ring {
            return;
        }
        let nodes = ring
            .nodes()
            .iter()
            .map(|addr| match slot.node(addr) {
                Some(n) => n.clone(),
                None => self.new_node(addr),
            })
            .collect();
        let added: Vec<&String> = ring
            .nodes()
            .iter()
            .filter(|n| !slot.ring.contains(n))
            .collect();
        let removed: Vec<&String> = slot
            .ring
            .nodes()
            .iter()
            .filter(|n| !ring.contains(n))
            .collect();
        info!(service_code = %self.service_code, nodes = ring.len(), ?added, ?removed, "ring changed");
        let now = Instant::now();
        let mut retired: Vec<Arc<Retired>> = slot
            .retired
            .iter()
            .filter(|r| now.duration_since(r.at) < self.keep_retired_for)
            .cloned()
            .collect();
        if !self.keep_retired_for.is_zero() && !slot.ring.is_empty() {
            retired.push(Arc::new(Retired {
                at: now,
                ring: slot.ring.clone(),
                nodes: slot.nodes.clone(),
                unreachable: Mutex::new(HashSet::new()),
            }));
        }
        let excess = retired.len().saturating_sub(MAX_RETIRED_RINGS);
        retired.drain(..excess);
        let ring = Arc::new(ring);
        *slot = Arc::new(Topology {
            ring: ring.clone(),
            nodes,
            retired,
        });
        drop(slot);
        self.ring_tx.send_replace(ring);
    }
}

impl RingSink for Shared {
    fn apply_children(&self, children: Vec<String>) {
        self.install(Ring::from_cache_list(&children));
    }

    fn watching(&self, session: &zk::Client) {
        *self.session.lock().unwrap_or_else(|p| p.into_inner()) =
            Session::Watching(session.clone());
    }

    fn reconnecting(&self) {
        *self.session.lock().unwrap_or_else(|p| p.into_inner()) = Session::Reconnecting;
    }
}

struct Inner {
    shared: Arc<Shared>,
    opts: ClientOptions,
    discovery: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(task) = self.discovery.take() {
            task.abort();
        }
    }
}

/// An ARCUS client for one service code. Cheap to clone; clones share the ring and the
/// connection pools. Dropping the last clone stops the ZooKeeper watch.
#[derive(Clone)]
pub struct ArcusClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ArcusClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArcusClient")
            .field("service_code", &self.inner.shared.service_code)
            .field("nodes", &self.ring().nodes())
            .finish()
    }
}

impl ArcusClient {
    /// Connects to the ZooKeeper ensemble `zk_addrs` (`host:port,host:port,...`), reads the node
    /// list of `service_code` under `/arcus/cache_list/` and keeps watching it.
    ///
    /// Fails with [`Error::ZkUnreachable`] when no session opens within
    /// `options.zk_connect_timeout`, and [`Error::UnknownServiceCode`] when
    /// `/arcus/cache_list/<service_code>` does not exist. An existing service code with no node
    /// yet is fine: operations fail with [`Error::NoNodes`] until nodes register.
    pub async fn connect(
        zk_addrs: &str,
        service_code: &str,
        options: ClientOptions,
    ) -> Result<ArcusClient> {
        discovery::check_service_code(service_code)?;
        let path = discovery::cache_list_path(service_code);
        let client = discovery::connect(zk_addrs, &options).await?;
        let first = tokio::time::timeout(
            options.zk_connect_timeout,
            discovery::list_and_watch(&client, &path),
        )
        .await;
        let (children, watcher) = match first {
            Ok(Ok(v)) => v,
            Ok(Err(zk::Error::NoNode)) => {
                return Err(Error::UnknownServiceCode {
                    service_code: service_code.to_string(),
                    zk: zk_addrs.to_string(),
                    path,
                })
            }
            Ok(Err(source)) => {
                return Err(Error::Zk {
                    zk: zk_addrs.to_string(),
                    op: "list",
                    path,
                    source,
                })
            }
            Err(_) => {
                return Err(Error::ZkUnreachable {
                    zk: zk_addrs.to_string(),
                    reason: format!(
                        "listing {path} took longer than {:?}",
                        options.zk_connect_timeout
                    ),
                    source: None,
                })
            }
        };
        let shared = Arc::new(Shared::new(
            service_code.to_string(),
            &options,
            Session::Watching(client.clone()),
        ));
        shared.apply_children(children);
        let task = tokio::spawn(discovery::watch_loop(
            shared.clone(),
            zk_addrs.to_string(),
            path,
            options.clone(),
            client,
            watcher,
        ));
        Ok(ArcusClient {
            inner: Arc::new(Inner {
                shared,
                opts: options,
                discovery: Some(task),
            }),
        })
    }

    /// A client over a fixed list of node addresses (`ip:port`), without ZooKeeper: for tests,
    /// benchmarks and single-node use.
    pub fn with_nodes<I, S>(nodes: I, options: ClientOptions) -> ArcusClient
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let shared = Arc::new(Shared::new(
            "(static)".to_string(),
            &options,
            Session::Static,
        ));
        shared.install(Ring::new(nodes));
        ArcusClient {
            inner: Arc::new(Inner {
                shared,
                opts: options,
                discovery: None,
            }),
        }
    }

    /// Replaces the node list of a client made by [`ArcusClient::with_nodes`]: a ring change,
    /// as discovery makes when `cache_list` changes (deletes then follow moved keys to their
    /// previous owners). On a client that watches ZooKeeper the next change there overrides it.
    pub fn set_nodes<I, S>(&self, nodes: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.inner.shared.install(Ring::new(nodes));
    }

    pub fn service_code(&self) -> &str {
        &self.inner.shared.service_code
    }

    pub fn options(&self) -> &ClientOptions {
        &self.inner.opts
    }

    /// The current ring.
    pub fn ring(&self) -> Arc<Ring> {
        self.inner.shared.topology().ring.clone()
    }

    /// Current node addresses (`ip:port`), sorted.
    pub fn nodes(&self) -> Vec<String> {
        self.ring().nodes().to_vec()
    }

    /// A receiver that sees every new ring (for waiting on membership changes).
    pub fn watch_ring(&self) -> watch::Receiver<Arc<Ring>> {
        self.inner.shared.ring_tx.subscribe()
    }

    fn session(&self) -> std::sync::MutexGuard<'_, Session> {
        self.inner
            .shared
            .session
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the node list is being watched right now.
    pub fn discovery_state(&self) -> DiscoveryState {
        match &*self.session() {
            Session::Static => DiscoveryState::Static,
            Session::Reconnecting => DiscoveryState::Reconnecting,
            Session::Watching(c) => match c.state() {
                zk::SessionState::SyncConnected | zk::SessionState::ConnectedReadOnly => {
                    DiscoveryState::Watching
                }
                zk::SessionState::Disconnected => DiscoveryState::Disconnected,
                _ => DiscoveryState::Reconnecting,
            },
        }
    }

    /// The id of the ZooKeeper session the node list is watched on (`None` between sessions
    /// and for a static client). A new id after an outage means the old session expired.
    pub fn zk_session_id(&self) -> Option<i64> {
        match &*self.session() {
            Session::Watching(c) => Some(c.session_id().0),
            _ => None,
        }
    }

    /// The node that owns `key` on the current ring.
    pub fn node_for_key(&self, key: &str) -> Result<String> {
        self.check_key(key)?;
        let ring = self.ring();
        ring.node_for_key(self.hash_key(key))
            .map(str::to_string)
            .ok_or_else(|| self.no_nodes())
    }

    /// An admin helper for one node of this client (bounded by the client's `op_timeout`).
    pub fn admin(&self, node: &str) -> AdminClient {
        AdminClient::with_timeout(node, self.inner.opts.op_timeout)
    }

    fn no_nodes(&self) -> Error {
        Error::NoNodes {
            service_code: self.inner.shared.service_code.clone(),
        }
    }

    fn hash_key<'k>(&self, key: &'k str) -> &'k str {
        if self.inner.opts.shard_key {
            ring::shard_key(key)
        } else {
            key
        }
    }

    fn check_key(&self, key: &str) -> Result<()> {
        protocol::validate_key(key.as_bytes(), self.inner.opts.max_key_len).map_err(|reason| {
            let mut shown: String = key.chars().take(64).collect();
            if shown.len() < key.len() {
                shown.push_str("...");
            }
            Error::InvalidKey { key: shown, reason }
        })
    }

    fn check_value(&self, value: &[u8]) -> Result<()> {
        let max = self.inner.opts.max_value_len;
        if value.len() > max {
            return Err(Error::ValueTooLarge {
                len: value.len(),
                max,
            });
        }
        Ok(())
    }

    /// Validates `key` and finds its node.
    fn route(&self, key: &str) -> Result<Arc<Node>> {
        self.check_key(key)?;
        let topo = self.inner.shared.topology();
        let node = topo
            .ring
            .node_for_key(self.hash_key(key))
            .ok_or_else(|| self.no_nodes())?;
        Ok(topo.node(node).expect("every ring node has a Node").clone())
    }

    async fn retrieve_one(&self, key: &str, with_cas: bool) -> Result<Option<Item>> {
        let node = self.route(key)?;
        let op = if with_cas { "gets" } else { "get" };
        match node.call(op, &Cmd::One { key, with_cas }).await? {
            Reply::One(item) => Ok(item),
            other => Err(shape_mismatch(node.addr(), op, other)),
        }
    }

    /// `get`: the item, or `None` when absent.
    pub async fn get(&self, key: &str) -> Result<Option<Item>> {
        self.retrieve_one(key, false).await
    }

    /// `gets`: the item with its CAS unique, or `None` when absent.
    pub async fn gets(&self, key: &str) -> Result<Option<Item>> {
        self.retrieve_one(key, true).await
    }

    /// `get` of many keys: split per node, sent to the nodes concurrently, merged. Absent keys
    /// are missing from the map. Any node failing fails the call, naming the node.
    pub async fn get_multi(&self, keys: &[&str]) -> Result<HashMap<String, Item>> {
        self.retrieve_multi(keys, false).await
    }

    /// `gets` of many keys (items carry their CAS unique).
    pub async fn gets_multi(&self, keys: &[&str]) -> Result<HashMap<String, Item>> {
        self.retrieve_multi(keys, true).await
    }

    async fn retrieve_multi(&self, keys: &[&str], with_cas: bool) -> Result<HashMap<String, Item>> {
        for k in keys {
            self.check_key(k)?;
        }
        let topo = self.inner.shared.topology();
        let mut per_node: HashMap<&str, Vec<&str>> = HashMap::new();
        for &k in keys {
            let node = topo
                .ring
                .node_for_key(self.hash_key(k))
                .ok_or_else(|| self.no_nodes())?;
            let batch = per_node.entry(node).or_default();
            if !batch.contains(&k) {
                batch.push(k);
            }
        }
        let op = if with_cas { "gets" } else { "get" };
        let chunk = self.inner.opts.max_keys_per_get.max(1);
        let requests = per_node.into_iter().flat_map(|(addr, ks)| {
            let node = topo.node(addr).expect("every ring node has a Node").clone();
            ks.chunks(chunk)
                .map(|c| (node.clone(), c.to_vec()))
                .collect::<Vec<_>>()
        });
        let replies = futures::future::try_join_all(requests.map(|(node, batch)| async move {
            let cmd = Cmd::Many {
                keys: &batch,
                with_cas,
            };
            match node.call(op, &cmd).await? {
                Reply::Many(found) => Ok(found),
                other => Err(shape_mismatch(node.addr(), op, other)),
            }
        }))
        .await?;
        Ok(replies.into_iter().flatten().collect())
    }

    async fn store(
        &self,
        cmd: StoreCommand,
        key: &str,
        data: &[u8],
        flags: u32,
        exptime: i64,
    ) -> Result<StoreStatus> {
        let node = self.route(key)?;
        self.check_value(data)?;
        let op = cmd.name();
        let cmd = Cmd::Store {
            cmd,
            key,
            flags,
            exptime,
            data,
        };
        match node.call(op, &cmd).await? {
            Reply::Store(status) => Ok(status),
            other => Err(shape_mismatch(node.addr(), op, other)),
        }
    }

    /// `set`: store unconditionally. `exptime` in seconds (0 = never; over 30 days = unix time).
    pub async fn set(
        &self,
        key: &str,
        value: impl AsRef<[u8]>,
        flags: u32,
        exptime: i64,
    ) -> Result<StoreStatus> {
        self.store(StoreCommand::Set, key, value.as_ref(), flags, exptime)
            .await
    }

    /// `add`: store only if absent (`NotStored` otherwise).
    pub async fn add(
        &self,
        key: &str,
        value: impl AsRef<[u8]>,
        flags: u32,
        exptime: i64,
    ) -> Result<StoreStatus> {
        self.store(StoreCommand::Add, key, value.as_ref(), flags, exptime)
            .await
    }

    /// `replace`: store only if present (`NotStored` otherwise).
    pub async fn replace(
        &self,
        key: &str,
        value: impl AsRef<[u8]>,
        flags: u32,
        exptime: i64,
    ) -> Result<StoreStatus> {
        self.store(StoreCommand::Replace, key, value.as_ref(), flags, exptime)
            .await
    }

    /// `append`: add bytes after an existing value (`NotStored` when absent); the item keeps
    /// its flags and exptime.
    pub async fn append(&self, key: &str, value: impl AsRef<[u8]>) -> Result<StoreStatus> {
        self.store(StoreCommand::Append, key, value.as_ref(), 0, 0)
            .await
    }

    /// `prepend`: add bytes before an existing value (`NotStored` when absent).
    pub async fn prepend(&self, key: &str, value: impl AsRef<[u8]>) -> Result<StoreStatus> {
        self.store(StoreCommand::Prepend, key, value.as_ref(), 0, 0)
            .await
    }

    /// `cas`: store if the item's CAS unique is still `cas` (`Exists` if changed since,
    /// `NotFound` if gone).
    pub async fn cas(
        &self,
        key: &str,
        value: impl AsRef<[u8]>,
        flags: u32,
        exptime: i64,
        cas: u64,
    ) -> Result<StoreStatus> {
        self.store(StoreCommand::Cas(cas), key, value.as_ref(), flags, exptime)
            .await
    }

    /// `delete`: `true` if the item existed on its owner. Within
    /// [`ClientOptions::delete_previous_owners_for`] of a ring change, the key's previous
    /// owners get the delete too, in the same call (their replies and failures do not change
    /// the result), so a migration still copying from them cannot bring the key back.
    pub async fn delete(&self, key: &str) -> Result<bool> {
        self.check_key(key)?;
        let topo = self.inner.shared.topology();
        let hashed = self.hash_key(key);
        let owner = topo
            .ring
            .node_for_key(hashed)
            .ok_or_else(|| self.no_nodes())?;
        let node = topo
            .node(owner)
            .expect("every ring node has a Node")
            .clone();
        let words = ["delete", key];
        let delete_on =
            async |node: &Arc<Node>| yes_no(node, "delete", &words, b"DELETED", b"NOT_FOUND").await;
        let followers = self.previous_owner_nodes(&topo, hashed, owner);
        if followers.is_empty() {
            return delete_on(&node).await;
        }
        let follow = futures::future::join_all(followers.iter().map(|(retired, node)| async {
            if let Err(e) = delete_on(node).await {
                debug!(node = node.addr(), error = %e, "previous owner unreachable; not followed again");
                retired
                    .unreachable
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(node.addr().to_string());
            }
        }));
        let (result, _) = futures::future::join(delete_on(&node), follow).await;
        result
    }

    /// Nodes owning `key` on the rings replaced within the grace period, other than `owner`,
    /// skipping nodes found unreachable. Reuses the current Node of a node that is still on
    /// the ring.
    fn previous_owner_nodes(
        &self,
        topo: &Topology,
        key: &str,
        owner: &str,
    ) -> Vec<(Arc<Retired>, Arc<Node>)> {
        let grace = self.inner.opts.delete_previous_owners_for;
        let live: Vec<&Arc<Retired>> = topo
            .retired
            .iter()
            .rev()
            .filter(|r| r.at.elapsed() < grace)
            .collect();
        if live.is_empty() {
            return Vec::new();
        }
        previous_owners(live.iter().map(|r| &*r.ring), key, owner)
            .into_iter()
            .filter_map(|addr| {
                let retired = live.iter().find(|r| r.ring.contains(addr))?;
                if retired
                    .unreachable
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains(addr)
                {
                    return None;
                }
                let node = topo.node(addr).or_else(|| retired.node(addr))?.clone();
                Some((Arc::clone(retired), node))
            })
            .collect()
    }

    /// `touch`: sets a new exptime; `true` if the item existed.
    pub async fn touch(&self, key: &str, exptime: i64) -> Result<bool> {
        let node = self.route(key)?;
        let exptime = exptime.to_string();
        yes_no(
            &node,
            "touch",
            &["touch", key, &exptime],
            b"TOUCHED",
            b"NOT_FOUND",
        )
        .await
    }

    /// `incr`: the new value, or `None` when the key is absent. The value must be a decimal
    /// number (else the server's `CLIENT_ERROR` comes back as [`Error::Server`]); it wraps at 2^64.
    pub async fn incr(&self, key: &str, delta: u64) -> Result<Option<u64>> {
        self.arith("incr", key, delta).await
    }

    /// `decr`: the new value (never below 0), or `None` when the key is absent.
    pub async fn decr(&self, key: &str, delta: u64) -> Result<Option<u64>> {
        self.arith("decr", key, delta).await
    }

    async fn arith(&self, op: &'static str, key: &str, delta: u64) -> Result<Option<u64>> {
        let node = self.route(key)?;
        let delta = delta.to_string();
        let words = [op, key, &delta];
        match node.call(op, &Cmd::Arith { words: &words }).await? {
            Reply::Number(n) => Ok(n),
            other => Err(shape_mismatch(node.addr(), op, other)),
        }
    }

    /// Idle pooled connections to `node` (diagnostics; 0 for a pipelined client).
    pub fn idle_connections(&self, node: &str) -> usize {
        self.inner
            .shared
            .topology()
            .node(node)
            .map(|n| n.pool.idle_count())
            .unwrap_or(0)
    }

    /// Open pipelined connections to `node` (diagnostics; 0 without
    /// [`ClientOptions::pipeline`]).
    pub fn pipelined_connections(&self, node: &str) -> usize {
        self.inner
            .shared
            .topology()
            .node(node)
            .and_then(|n| n.pipe.as_ref().map(|p| p.open_connections()))
            .unwrap_or(0)
    }
}

/// A one-line command answered by `ok` or `missing` on `node`.
async fn yes_no(
    node: &Node,
    op: &'static str,
    words: &[&str],
    ok: &'static [u8],
    missing: &'static [u8],
) -> Result<bool> {
    match node.call(op, &Cmd::YesNo { words, ok, missing }).await? {
        Reply::Bool(b) => Ok(b),
        other => Err(shape_mismatch(node.addr(), op, other)),
    }
}

/// A reply of another command's shape: a bug here, reported rather than panicking.
fn shape_mismatch(node: &str, op: &'static str, reply: Reply) -> Error {
    Error::Protocol {
        node: node.to_string(),
        op,
        response: format!("internal: reply {reply:?} does not fit the command"),
    }
}

#[cfg(test)]
mod tests {
    use super::previous_owners;
    use crate::ring::Ring;

    #[test]
    fn previous_owners_are_distinct_and_exclude_the_current_owner() {
        let r3 = Ring::new(["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]);
        let r5 = Ring::new([
            "127.0.0.1:1",
            "127.0.0.1:2",
            "127.0.0.1:3",
            "127.0.0.1:4",
            "127.0.0.1:5",
        ]);
        let (mut moved, mut stayed) = (0, 0);
        for i in 0..2000 {
            let key = format!("k:{i}");
            let now = r5.node_for_key(&key).unwrap();
            let before = r3.node_for_key(&key).unwrap();
            // The ring went 3 -> 5, then flapped 5 -> 3 -> 5 (a node held out of the ring).
            let got = previous_owners([&r3, &r5, &r3], &key, now);
            if before == now {
                stayed += 1;
                assert!(got.is_empty(), "{key}: owner unchanged, nothing to follow");
            } else {
                moved += 1;
                assert_eq!(got, vec![before], "{key}: the old owner, once");
            }
        }
        assert!(
            moved > 400 && stayed > 400,
            "moved {moved}, stayed {stayed}"
        );
        assert!(previous_owners([], "k", "127.0.0.1:1").is_empty());
    }
}
