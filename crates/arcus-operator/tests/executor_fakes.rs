//! The operation state machine's executor on fakes: a model of the ring, the nodes' contents
//! and clients that write through the ring. Every operation (scale-in, a join, a rolling
//! restart, a heal) is run once without interruption, then once per persisted write with the
//! operator "crashing" right after that write: clients then overwrite every key (as they do
//! while a new leader takes over), and a fresh executor resumes from the stored record.
//!
//! Checked every time: no node ever enters the ring (by `zkensemble rejoin` or by registering)
//! holding an older value of a key it owns than the last one written, no key reads back older
//! than its last write at the end, and the operation ends with nothing recorded and the ring
//! the spec asks for.

use arcus_client::Ring;
use arcus_operator::day2::LiveConfig;
use arcus_operator::migrate::{
    ConfigFailed, Executor, Label, MigrateError, Mover, NodeAdmin, Pods, ZkMembership,
};
use arcus_operator::migration::{Checkpoint, Progress};
use arcus_operator::operation::{self, Action, Day2Request, Operation, PodState};
use arcus_operator::zk::{Registry, ZkError};
use arcus_operator::zk_plan::CacheZnode;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

const KEYS: u32 = 600;
const NS: &str = "ns";

#[derive(Clone, Debug, PartialEq)]
enum Membership {
    /// Pod created, process not started yet.
    Starting,
    Registered,
    /// Taken out of the ring by the operator (waits for `zkensemble rejoin`).
    HeldOut,
    /// Its ZooKeeper session expired: out of the ring, still serving, contents kept.
    Left,
}

#[derive(Clone, Debug)]
struct Node {
    ordinal: u32,
    uid: u32,
    /// Pod template generation (a roll restarts nodes of an older one).
    template: u32,
    membership: Membership,
    /// key → version.
    contents: HashMap<u32, u64>,
}

impl Node {
    fn addr(&self) -> String {
        format!("10.0.0.{}:11211", self.ordinal + 10)
    }
    fn host(&self) -> String {
        format!("mc-{}.{NS}", self.ordinal)
    }
    fn znode(&self) -> CacheZnode {
        CacheZnode::new(&self.addr(), &self.host())
    }
}

#[derive(Default)]
struct Model {
    nodes: BTreeMap<u32, Node>,
    /// key → last version written by a client.
    truth: HashMap<u32, u64>,
    version: u64,
    record: Option<Operation>,
    persisted: u32,
    /// The operator dies right after this many persisted writes (None: never).
    crash_after: Option<u32>,
    crashed: bool,
    next_uid: u32,
    template: u32,
    /// Invariant breaks: a node let into the ring with older contents.
    violations: Vec<String>,
    /// This node refuses `zkensemble rejoin` (once).
    refuses_rejoin: Option<String>,
    /// The operator dies right after the next `zkensemble rejoin` (before pass 2 ends).
    crash_after_rejoin: bool,
    /// Set while nodes are let back in together (between the watermarks and the return of
    /// misrouted writes): the version the watermarks were taken at. Entering the ring is not
    /// checked meanwhile; the return is, once it ran.
    rejoin_marks: Option<u64>,
    /// The StatefulSet starts a pod only once every pod before it is Ready (registered: a
    /// held-out ARCUS node answers NOT_READY), as `OrderedReady` does.
    ordered_start: bool,
    /// New nodes are stock memcached: they cannot be held out or let back in.
    stock: bool,
    /// Pods created by `with_nodes` (the nodes before the scale-out).
    initial_uids: u32,
    /// This ordinal's node registers only in the middle of a fill (pass 1 of another node),
    /// not between passes.
    registers_during_fill: Option<u32>,
    /// Nodes of the scale-out let in by `zkensemble rejoin`.
    let_in: Vec<String>,
    /// The client version at which the current fill's pass 1 began: what clients write
    /// later is pass 2's to carry over, after the rejoin (not checked on entering the ring).
    fill_began: Option<u64>,
}

type Shared = Arc<Mutex<Model>>;

impl Model {
    fn with_nodes(n: u32) -> Model {
        let mut m = Model::default();
        for o in 0..n {
            m.add_pod(o);
            m.nodes.get_mut(&o).unwrap().membership = Membership::Registered;
        }
        m.initial_uids = m.next_uid;
        m.clients_write_all();
        m
    }

    fn add_pod(&mut self, ordinal: u32) {
        self.next_uid += 1;
        self.nodes.insert(
            ordinal,
            Node {
                ordinal,
                uid: self.next_uid,
                template: self.template,
                membership: Membership::Starting,
                contents: HashMap::new(),
            },
        );
    }

    fn ring_addrs(&self) -> Vec<String> {
        self.nodes
            .values()
            .filter(|n| n.membership == Membership::Registered)
            .map(Node::addr)
            .collect()
    }

    fn node_by_addr(&mut self, addr: &str) -> Option<&mut Node> {
        self.nodes.values_mut().find(|n| n.addr() == addr)
    }

    /// Every key written once more, through the ring clients see now.
    fn clients_write_all(&mut self) {
        if self.ring_addrs().is_empty() {
            return; // no node in cache_list: every client request fails
        }
        self.version += 1;
        let ring = Ring::new(self.ring_addrs());
        for k in 0..KEYS {
            let owner = ring.node_for_key(&key(k)).unwrap().to_string();
            let v = self.version;
            self.node_by_addr(&owner).unwrap().contents.insert(k, v);
            self.truth.insert(k, v);
        }
    }

    /// A node enters the ring: what it holds of its keys must be current.
    fn enter_ring(&mut self, addr: &str, how: &str) {
        let mut ring = self.ring_addrs();
        ring.push(addr.to_string());
        let ring = Ring::new(ring);
        let node = self.nodes.values().find(|n| n.addr() == addr).unwrap();
        if self.rejoin_marks.is_some() {
            self.node_by_addr(addr).unwrap().membership = Membership::Registered;
            return;
        }
        let stale = (0..KEYS)
            .filter(|k| ring.node_for_key(&key(*k)) == Some(addr))
            .filter(|k| node.contents.get(k).is_some_and(|v| *v < self.truth[k]))
            .filter(|k| self.fill_began.is_none_or(|began| self.truth[k] <= began))
            .count();
        if stale > 0 {
            self.violations.push(format!(
                "{addr} entered the ring ({how}) with {stale} stale keys"
            ));
        }
        self.node_by_addr(addr).unwrap().membership = Membership::Registered;
    }

    /// Time passes: started pods register themselves (empty after a restart).
    fn tick(&mut self) {
        let late = self.registers_during_fill;
        let starting: Vec<String> = self
            .nodes
            .values()
            .filter(|n| n.membership == Membership::Starting && Some(n.ordinal) != late)
            .map(Node::addr)
            .collect();
        for a in starting {
            self.enter_ring(&a, "registration");
        }
    }

    /// Copies `keys` from `from` to `to`, the newer version winning (the engine's rules keep a
    /// target's newer client data and replace older copies).
    fn copy_newer(&mut self, from: &str, to: &str, keys: impl Fn(u32) -> bool, add_only: bool) {
        let items: Vec<(u32, u64)> = self
            .nodes
            .values()
            .find(|n| n.addr() == from)
            .map(|n| {
                n.contents
                    .iter()
                    .map(|(k, v)| (*k, *v))
                    .filter(|(k, _)| keys(*k))
                    .collect()
            })
            .unwrap_or_default();
        let target = self.node_by_addr(to).unwrap();
        for (k, v) in items {
            let e = target.contents.entry(k).or_insert(0);
            if (*e == 0 || !add_only) && *e < v {
                *e = v;
            }
        }
    }

    /// Items of `sources` that `after` gives to one of `targets`, copied there.
    fn migrate(
        &mut self,
        sources: &[String],
        after: &[String],
        targets: &[String],
        add_only: bool,
    ) {
        let ring = Ring::new(after.to_vec());
        for s in sources {
            for t in targets {
                let (t2, ring2) = (t.clone(), ring.clone());
                self.copy_newer(
                    s,
                    t,
                    move |k| ring2.node_for_key(&key(k)) == Some(t2.as_str()),
                    add_only,
                );
            }
        }
    }

    fn world_pods(&self) -> Vec<PodState> {
        self.nodes
            .values()
            .map(|n| PodState {
                ordinal: n.ordinal,
                name: format!("mc-{}", n.ordinal),
                uid: format!("uid-{}", n.uid),
                host: n.host(),
                addr: (n.membership != Membership::Starting).then(|| n.addr()),
                running: n.membership != Membership::Starting,
                terminating: false,
                // Pods created after the setup are the scale-out's.
                can_rejoin: Some(!(self.stock && n.uid > self.initial_uids)),
                detached: matches!(n.membership, Membership::HeldOut | Membership::Left),
            })
            .collect()
    }
}

fn key(k: u32) -> String {
    format!("k:{k}")
}

#[derive(Clone)]
struct Fake(Shared);

impl Fake {
    fn alive(&self) -> Result<std::sync::MutexGuard<'_, Model>, ZkError> {
        let m = self.0.lock().unwrap();
        if m.crashed {
            return Err(crashed());
        }
        Ok(m)
    }
}

fn crashed() -> ZkError {
    ZkError::ClaimChanged {
        ensemble: "fake".into(),
        path: "(the operator crashed)".into(),
    }
}

impl Registry for Fake {
    async fn ring(&self) -> Result<Vec<CacheZnode>, ZkError> {
        let m = self.alive()?;
        Ok(m.nodes
            .values()
            .filter(|n| n.membership == Membership::Registered)
            .map(Node::znode)
            .collect())
    }

    async fn leave_ring(
        &self,
        znodes: &[CacheZnode],
        then: Option<&Operation>,
    ) -> Result<(), ZkError> {
        let mut m = self.alive()?;
        for z in znodes {
            if let Some(n) = m.node_by_addr(z.addr()) {
                if n.membership == Membership::Registered {
                    n.membership = Membership::HeldOut;
                }
            }
        }
        m.record = then.cloned();
        m.persisted += 1;
        if m.crash_after == Some(m.persisted) {
            m.crashed = true;
        }
        Ok(())
    }

    fn epoch(&self) -> u64 {
        self.0.lock().unwrap().persisted as u64
    }
}

impl NodeAdmin for Fake {
    async fn membership(&self, addr: &str) -> Option<ZkMembership> {
        let m = self.0.lock().unwrap();
        let pods = m.world_pods();
        let p = pods.iter().find(|p| p.addr.as_deref() == Some(addr))?;
        Some(match (p.can_rejoin?, p.detached) {
            (false, _) => ZkMembership::Stock,
            (true, false) => ZkMembership::Session,
            (true, true) => ZkMembership::NoSession,
        })
    }

    async fn rejoin(&self, addr: &str) -> Result<(), MigrateError> {
        let mut m = self.alive()?;
        if m.refuses_rejoin.as_deref() == Some(addr) {
            m.refuses_rejoin = None;
            return Err(MigrateError::Rejoin {
                node: addr.into(),
                source: arcus_client::Error::InvalidArgument("failed to rejoin ensemble".into()),
            });
        }
        // A new node in the ring, not let in by us, while another is let in: a key clients
        // wrote to it can change owner under it (the give-back then overwrites a newer write).
        let initial = m.initial_uids;
        let visible: Vec<String> = m
            .nodes
            .values()
            .filter(|n| n.membership == Membership::Registered && n.uid > initial)
            .map(Node::addr)
            .filter(|a| a != addr && !m.let_in.contains(a))
            .collect();
        if !visible.is_empty() && !m.stock {
            m.violations
                .push(format!("{visible:?} in the ring while {addr} was let in"));
        }
        m.let_in.push(addr.to_string());
        m.enter_ring(addr, "zkensemble rejoin");
        m.fill_began = None;
        if std::mem::take(&mut m.crash_after_rejoin) {
            m.crashed = true;
        }
        // Clients follow each rejoin at once: with several nodes let in one after another,
        // they write through every ring in between. (When the last of nodes let in together
        // is back, the writes made meanwhile must reach their owners without a rewrite.)
        let all_back = !m
            .nodes
            .values()
            .any(|n| matches!(n.membership, Membership::HeldOut | Membership::Left));
        if m.rejoin_marks.is_none() || !all_back {
            m.clients_write_all();
        }
        Ok(())
    }

    async fn apply_live_config(
        &self,
        _addr: &str,
        _to: LiveConfig,
        _connections_changed: bool,
    ) -> Result<bool, ConfigFailed> {
        Ok(true)
    }
}

impl Pods for Fake {
    async fn delete(&self, pod: &str, uid: Option<&str>) -> Result<(), MigrateError> {
        let mut m = self.alive()?;
        let ordinal: u32 = pod.trim_start_matches("mc-").parse().unwrap();
        let matches = uid.is_none_or(|u| {
            Some(u)
                == m.nodes
                    .get(&ordinal)
                    .map(|n| format!("uid-{}", n.uid))
                    .as_deref()
        });
        if matches {
            // Re-created by the StatefulSet from the current template, empty.
            m.add_pod(ordinal);
        }
        Ok(())
    }
}

impl Mover for Fake {
    async fn drain(
        &self,
        before: &[String],
        leaving: &[String],
        _label: &Label,
    ) -> Result<(Checkpoint, Progress), MigrateError> {
        let mut m = self.alive()?;
        let after: Vec<String> = before
            .iter()
            .filter(|a| !leaving.contains(a))
            .cloned()
            .collect();
        m.migrate(leaving, &after, &after, false);
        Ok((Checkpoint::default(), Progress::default()))
    }

    async fn after_ring_change(
        &self,
        before: &[String],
        leaving: &[String],
        _checkpoint: &Checkpoint,
        label: &Label,
    ) -> Result<Progress, MigrateError> {
        self.drain(before, leaving, label).await.map(|(_, p)| p)
    }

    async fn owner_marks(&self, owners: &[String]) -> Result<BTreeMap<String, u64>, MigrateError> {
        let m = self.alive()?;
        Ok(owners.iter().map(|n| (n.clone(), m.version)).collect())
    }

    async fn give_back(
        &self,
        before: &[String],
        joining: &[String],
        _marks: Option<&BTreeMap<String, u64>>,
        _label: &Label,
    ) -> Result<u64, MigrateError> {
        let mut m = self.alive()?;
        m.migrate(joining, before, before, false);
        Ok(0)
    }

    async fn fill(
        &self,
        before: &[String],
        joining: &[String],
        _keep_own: bool,
        _label: &Label,
    ) -> Result<Checkpoint, MigrateError> {
        let mut m = self.alive()?;
        // Pass 1 treats what the target holds as ours to overwrite, and its watermarks take
        // everything gone from the old owners for clients' deletes: on a node clients use
        // already, both lose their writes.
        for addr in joining {
            if m.node_by_addr(addr)
                .is_some_and(|n| n.membership == Membership::Registered)
            {
                m.violations
                    .push(format!("pass 1 into {addr}, which is in the ring already"));
            }
        }
        let after: Vec<String> = before.iter().chain(joining).cloned().collect();
        m.fill_began = Some(m.version);
        m.migrate(before, &after, joining, false);
        // The late node registers now; clients see it at once.
        let late = m.registers_during_fill.and_then(|o| m.nodes.get(&o));
        if let Some(n) = late.filter(|n| n.membership == Membership::Starting) {
            let addr = n.addr();
            m.enter_ring(&addr, "registration");
            m.clients_write_all();
        }
        Ok(Checkpoint::default())
    }

    async fn after_fill(
        &self,
        before: &[String],
        joining: &[String],
        checkpoint: &Checkpoint,
        _label: &Label,
    ) -> Result<Progress, MigrateError> {
        let mut m = self.alive()?;
        let after: Vec<String> = before.iter().chain(joining).cloned().collect();
        m.migrate(before, &after, joining, false);
        let _ = checkpoint;
        Ok(Progress::default())
    }

    async fn copy_add_only(
        &self,
        before: &[String],
        joining: &[String],
        _rounds: u32,
        _label: &Label,
    ) -> Result<Progress, MigrateError> {
        let mut m = self.alive()?;
        let after: Vec<String> = before.iter().chain(joining).cloned().collect();
        m.migrate(before, &after, joining, true);
        Ok(Progress::default())
    }

    async fn marks(&self, nodes: &[String]) -> Result<BTreeMap<String, u64>, MigrateError> {
        let mut m = self.alive()?;
        m.rejoin_marks = Some(m.version);
        Ok(nodes.iter().map(|n| (n.clone(), m.version)).collect())
    }

    async fn return_misrouted(
        &self,
        ring: &[String],
        _marks: &BTreeMap<String, u64>,
        _label: &Label,
    ) -> Result<Progress, MigrateError> {
        let mut m = self.alive()?;
        let mark = m.rejoin_marks.take().unwrap_or(0);
        let r = Ring::new(ring.to_vec());
        for node in ring {
            let misrouted: Vec<(u32, u64)> = m
                .nodes
                .values()
                .find(|n| n.addr() == *node)
                .unwrap()
                .contents
                .iter()
                .filter(|(k, v)| **v > mark && r.node_for_key(&key(**k)) != Some(node.as_str()))
                .map(|(k, v)| (*k, *v))
                .collect();
            for (k, v) in misrouted {
                let owner = r.node_for_key(&key(k)).unwrap().to_string();
                let e = m
                    .node_by_addr(&owner)
                    .unwrap()
                    .contents
                    .entry(k)
                    .or_insert(0);
                *e = (*e).max(v);
                m.node_by_addr(node).unwrap().contents.remove(&k);
            }
        }
        // Now every node must hold its keys current (what entering the ring checks).
        for node in ring {
            let n = m.nodes.values().find(|n| n.addr() == *node).unwrap();
            let stale = n
                .contents
                .iter()
                .filter(|(k, v)| {
                    r.node_for_key(&key(**k)) == Some(node.as_str()) && **v < m.truth[k]
                })
                .count();
            if stale > 0 {
                m.violations
                    .push(format!("{node} holds {stale} stale keys after the rejoin"));
            }
        }
        Ok(Progress::default())
    }
}

/// The controller's part around the executor, as `decide` does it: the StatefulSet follows
/// the record (grows with a join, shrinks once nothing leaving is in the ring), day-2 asks
/// for a roll of the highest node on an older template, or a heal of a node out of the ring.
fn operator_pass(m: &mut Model, desired: u32) -> (operation::Step, Vec<PodState>) {
    let sts = m.nodes.len() as u32;
    if let Some(Operation::Join { to_replicas, .. }) = &m.record {
        // A narrowed join: the StatefulSet shrinks to it (what registered stays until drained).
        let to = *to_replicas;
        m.nodes
            .retain(|o, n| *o < to || n.membership == Membership::Registered);
        for o in sts..to {
            let all_ready = m
                .nodes
                .values()
                .all(|n| n.membership == Membership::Registered);
            if m.ordered_start && !all_ready {
                break;
            }
            m.add_pod(o);
        }
    }
    let leaving_in_ring = m
        .nodes
        .values()
        .any(|n| n.ordinal >= desired && n.membership == Membership::Registered);
    if m.record.is_none() && sts > desired && !leaving_in_ring {
        m.nodes.retain(|o, _| *o < desired);
    }
    let pods = m.world_pods();
    let all_in = m
        .nodes
        .values()
        .all(|n| n.membership == Membership::Registered);
    let day2 = if m.record.is_none() && m.nodes.len() as u32 == desired {
        let heal = m
            .nodes
            .values()
            .find(|n| matches!(n.membership, Membership::Left | Membership::HeldOut))
            .map(|n| Day2Request::Heal { ordinal: n.ordinal });
        let template = m.template;
        let roll = m
            .nodes
            .values()
            .rev()
            .find(|n| n.template < template)
            .filter(|_| all_in)
            .map(|n| Day2Request::Roll { ordinal: n.ordinal });
        heal.or(roll)
    } else {
        None
    };
    let ring: Vec<CacheZnode> = m
        .nodes
        .values()
        .filter(|n| n.membership == Membership::Registered)
        .map(Node::znode)
        .collect();
    let world = operation::World {
        desired,
        statefulset: m.nodes.len() as u32,
        ring: &ring,
        pods: &pods,
        day2,
    };
    (operation::next_step(m.record.as_ref(), &world), pods)
}

/// Runs the operator until nothing is left to do (bounded), or until it crashes.
async fn run_operator(shared: &Shared, desired: u32) -> Result<u32, String> {
    let fake = Fake(shared.clone());
    let executor = Executor {
        registry: &fake,
        admin: &fake,
        mover: &fake,
        pods: &fake,
    };
    for pass in 0..200 {
        let (step, _) = operator_pass(&mut shared.lock().unwrap(), desired);
        match &step.action {
            Action::Idle => return Ok(pass),
            Action::Wait(_) => {
                shared.lock().unwrap().tick();
                continue;
            }
            _ => {}
        }
        match executor.run(&step).await {
            Ok(_) => {}
            Err(_) if shared.lock().unwrap().crashed => return Err("crashed".into()),
            Err(e) => return Err(format!("{:?}: {e}", step.action)),
        }
        shared.lock().unwrap().tick();
    }
    Err("no end after 200 passes".into())
}

/// One scenario: `setup` builds the model and starts the operation; the operator runs,
/// crashing after `crash_after` persisted writes; clients overwrite every key; a new operator
/// finishes. Returns the number of persisted writes of the whole run.
async fn scenario(setup: &dyn Fn() -> (Model, u32), crash_after: Option<u32>) -> u32 {
    let (mut model, desired) = setup();
    model.crash_after = crash_after;
    let shared: Shared = Arc::new(Mutex::new(model));
    let first = run_operator(&shared, desired).await;
    let persisted_first = shared.lock().unwrap().persisted;
    if first.is_err() {
        let mut m = shared.lock().unwrap();
        assert!(m.crashed, "{crash_after:?}: {first:?}");
        // The restart window: clients keep writing through the ring they see.
        m.crashed = false;
        m.crash_after = None;
        m.clients_write_all();
    }
    run_operator(&shared, desired)
        .await
        .unwrap_or_else(|e| panic!("after a crash at write {crash_after:?}: {e}"));
    let mut m = shared.lock().unwrap();
    // What a reader sees right after the operation, before any further write.
    let ring = Ring::new(m.ring_addrs());
    let older = (0..KEYS)
        .filter(|k| {
            let owner = ring.node_for_key(&key(*k)).unwrap().to_string();
            let node = m.nodes.values().find(|n| n.addr() == owner).unwrap();
            node.contents.get(k).is_some_and(|v| *v < m.truth[k])
        })
        .count();
    assert_eq!(
        m.violations,
        Vec::<String>::new(),
        "crash at write {crash_after:?}"
    );
    assert_eq!(
        older, 0,
        "crash at write {crash_after:?}: keys read back older"
    );
    assert_eq!(
        m.record, None,
        "crash at write {crash_after:?}: operation left recorded"
    );
    assert_eq!(
        m.ring_addrs().len() as u32,
        desired,
        "crash at write {crash_after:?}: ring {:?}",
        m.ring_addrs()
    );
    m.clients_write_all();
    drop(m);
    persisted_first
}

/// Runs the scenario uninterrupted, then crashing after each of its persisted writes.
async fn every_crash_point(name: &str, setup: &dyn Fn() -> (Model, u32)) {
    let writes = scenario(setup, None).await;
    assert!(writes > 0, "{name}: the operation persisted nothing");
    for n in 1..=writes {
        scenario(setup, Some(n)).await;
    }
    eprintln!("{name}: {writes} persisted writes, resumed after each");
}

#[tokio::test(start_paused = true)]
async fn scale_in_resumes_after_every_persisted_write() {
    every_crash_point("scale-in 5→3", &|| (Model::with_nodes(5), 3)).await;
}

#[tokio::test(start_paused = true)]
async fn scale_out_resumes_after_every_persisted_write() {
    every_crash_point("scale-out 3→5", &|| (Model::with_nodes(3), 5)).await;
}

#[tokio::test(start_paused = true)]
async fn a_join_of_several_nodes_resumes_after_every_persisted_write() {
    // All pods started at once: the four are held together and filled in one pass.
    every_crash_point("scale-out 3→7", &|| (Model::with_nodes(3), 7)).await;
    // More than one batch: two joins.
    let more = 3 + operation::JOIN_BATCH + 2;
    every_crash_point("scale-out by more than a batch", &|| {
        (Model::with_nodes(3), more)
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_join_under_ordered_start_resumes_after_every_persisted_write() {
    // A pod starts only once the one before it is Ready: each round fills the one held.
    every_crash_point("scale-out 3→6, ordered start", &|| {
        let mut m = Model::with_nodes(3);
        m.ordered_start = true;
        (m, 6)
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_node_registering_during_another_nodes_fill_is_taken_out_before_it_is_let_in() {
    every_crash_point("scale-out 3→5, node 4 registering mid-fill", &|| {
        let mut m = Model::with_nodes(3);
        m.registers_during_fill = Some(4);
        (m, 5)
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_join_of_stock_nodes_resumes_after_every_persisted_write() {
    every_crash_point("scale-out 3→6 of stock nodes", &|| {
        let mut m = Model::with_nodes(3);
        m.stock = true;
        (m, 6)
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_one_node_join_recorded_by_the_previous_version_is_finished() {
    // The record as the version that joined one node at a time left it: mc-3 started,
    // awaited; the scale-out then goes on to 5.
    every_crash_point("old join record, then to 5", &|| {
        let mut m = Model::with_nodes(3);
        let before = m.ring_addrs();
        m.add_pod(3);
        m.record = Some(Operation::Join {
            from_replicas: None,
            to_replicas: 4,
            before,
            early: vec![],
            stage: operation::JoinStage::AwaitRegistration,
        });
        (m, 5)
    })
    .await;
}

/// A join of mc-3..mc-5 with mc-3 and mc-4 held (clients wrote on them while they were
/// visible), mc-5 starting; the spec then asks for `desired`.
fn join_cut_to(desired: u32) -> (Model, u32) {
    let mut m = Model::with_nodes(3);
    let before = m.ring_addrs();
    for o in 3..6 {
        m.add_pod(o);
    }
    for o in 3..5 {
        m.nodes.get_mut(&o).unwrap().membership = Membership::Registered;
    }
    m.clients_write_all();
    for o in 3..5 {
        m.nodes.get_mut(&o).unwrap().membership = Membership::HeldOut;
    }
    let held = (3..5).map(|o| m.nodes[&o].znode()).collect();
    m.record = Some(Operation::Join {
        from_replicas: Some(3),
        to_replicas: 6,
        before,
        early: vec![],
        stage: operation::JoinStage::HeldOut {
            fill: operation::Fill::new(held, false),
        },
    });
    (m, desired)
}

#[tokio::test(start_paused = true)]
async fn a_join_cut_short_by_the_spec_resumes_after_every_persisted_write() {
    // Narrowed to mc-3, or abandoned: what clients wrote on the held nodes is kept.
    every_crash_point("join 3→6 cut to 4", &|| join_cut_to(4)).await;
    every_crash_point("join 3→6 cut to 3", &|| join_cut_to(3)).await;
}

#[tokio::test(start_paused = true)]
async fn rolling_restart_resumes_after_every_persisted_write() {
    every_crash_point("rolling restart of 3", &|| {
        let mut m = Model::with_nodes(3);
        m.template = 1;
        (m, 3)
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn heal_resumes_after_every_persisted_write() {
    every_crash_point("heal of mc-1", &|| {
        let mut m = Model::with_nodes(3);
        m.nodes.get_mut(&1).unwrap().membership = Membership::Left;
        // Clients write elsewhere while it is out: what it holds is stale now.
        m.clients_write_all();
        (m, 3)
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_node_refusing_to_rejoin_is_restarted_and_filled_again() {
    every_crash_point("heal of mc-1 refusing rejoin", &|| {
        let mut m = Model::with_nodes(3);
        m.nodes.get_mut(&1).unwrap().membership = Membership::Left;
        m.clients_write_all();
        m.refuses_rejoin = Some(m.nodes[&1].addr());
        (m, 3)
    })
    .await;
}

/// The leader dies in pass 2, after the fill let the node in: the next one must not fill it
/// again while it is in the ring (it takes it out, gives back what clients wrote there, which
/// also puts back what the first pass 2 cleaned up on the old owners, and fills it again).
#[tokio::test(start_paused = true)]
async fn a_fill_cut_short_after_the_rejoin_takes_the_node_out_again() {
    let heal = || -> (Model, u32) {
        let mut m = Model::with_nodes(3);
        m.nodes.get_mut(&1).unwrap().membership = Membership::Left;
        m.clients_write_all();
        m.crash_after_rejoin = true;
        (m, 3)
    };
    let scale_out = || -> (Model, u32) {
        let mut m = Model::with_nodes(3);
        m.crash_after_rejoin = true;
        (m, 5)
    };
    for (name, setup) in [
        ("heal", &heal as &dyn Fn() -> (Model, u32)),
        ("3→5", &scale_out),
    ] {
        let (model, desired) = setup();
        let shared: Shared = Arc::new(Mutex::new(model));
        let first = run_operator(&shared, desired).await;
        assert_eq!(first, Err("crashed".to_string()), "{name}");
        {
            let mut m = shared.lock().unwrap();
            m.crashed = false;
            m.clients_write_all();
        }
        run_operator(&shared, desired).await.unwrap();
        let m = shared.lock().unwrap();
        assert_eq!(m.violations, Vec::<String>::new(), "{name}");
        assert_eq!(m.record, None, "{name}");
        assert_eq!(m.ring_addrs().len() as u32, desired, "{name}");
    }
}

/// A ZooKeeper outage expired every node's session (zkfailstop off): all out of
/// `cache_list`, serving what they hold. They are let back in together, without copies; what
/// clients wrote through the partial rings in between goes to the owners.
#[tokio::test(start_paused = true)]
async fn nodes_out_after_an_outage_are_let_back_in_together() {
    let mut m = Model::with_nodes(3);
    for n in m.nodes.values_mut() {
        n.membership = Membership::Left;
    }
    let before: Vec<HashMap<u32, u64>> = m.nodes.values().map(|n| n.contents.clone()).collect();
    let shared: Shared = Arc::new(Mutex::new(m));
    run_operator(&shared, 3).await.unwrap();
    let m = shared.lock().unwrap();
    assert_eq!(m.violations, Vec::<String>::new());
    assert_eq!(m.ring_addrs().len(), 3);
    assert_eq!(m.record, None, "nothing recorded");
    // No node was restarted (same pods) and the first node's items all came back.
    assert_eq!(m.next_uid, 3, "no pod re-created");
    let ring = Ring::new(m.ring_addrs());
    let older = (0..KEYS)
        .filter(|k| {
            let owner = ring.node_for_key(&key(*k)).unwrap();
            let n = m.nodes.values().find(|n| n.addr() == owner).unwrap();
            n.contents.get(k).is_none_or(|v| *v < m.truth[k])
        })
        .count();
    assert_eq!(older, 0, "keys read back older or missing");
    assert!(before.iter().all(|c| !c.is_empty()));
}

/// The defect this state machine removes: a drained node let back in directly (as the old
/// heal did with `zkensemble rejoin`) serves the values it had before clients wrote elsewhere.
#[test]
fn the_model_catches_a_direct_rejoin_of_a_drained_node() {
    let mut m = Model::with_nodes(3);
    let addr = m.nodes[&2].addr();
    let before = m.ring_addrs();
    let after: Vec<String> = before.iter().filter(|a| **a != addr).cloned().collect();
    m.migrate(std::slice::from_ref(&addr), &after, &after, false);
    m.nodes.get_mut(&2).unwrap().membership = Membership::HeldOut;
    m.clients_write_all();
    m.enter_ring(&addr, "zkensemble rejoin");
    assert_eq!(m.violations.len(), 1, "{:?}", m.violations);
}
