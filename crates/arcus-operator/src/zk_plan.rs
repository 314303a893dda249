//! The ZooKeeper plan: a pure function from (what the CR wants, what ZooKeeper and the cluster
//! hold now) to an ordered list of znode operations and the StatefulSet size to apply after them.
//!
//! Answers "what happens on scale-in?" without reading the applier:
//! - scale out: missing mappings are created first, then the StatefulSet grows (pods never start
//!   without a mapping, which would make arcus-memcached exit 76);
//! - scale in: the StatefulSet shrinks first; a surplus mapping is removed only once no pod with
//!   its ordinal exists any more;
//! - deletion: the StatefulSet goes to 0; once no pod is left, the mappings, then
//!   `cache_list/<svc>` (once its ephemeral nodes are gone) and `client_list/<svc>` are removed;
//! - a service code claimed by someone else, or a mapping address holding another service code,
//!   is a conflict: nothing is written at all.
//!
//! Only state this CR owns is ever deleted: mappings whose child is our service code, and
//! `cache_list/<svc>` only when its data carries our claim.

use std::collections::{BTreeMap, BTreeSet};

pub const ARCUS_ROOT: &str = "/arcus";
pub const CACHE_LIST: &str = "/arcus/cache_list";
pub const CLIENT_LIST: &str = "/arcus/client_list";
pub const MAPPING_ROOT: &str = "/arcus/cache_server_mapping";
pub const SERVER_LOG: &str = "/arcus/cache_server_log";
pub const BASE_TREE: [&str; 5] = [
    ARCUS_ROOT,
    CACHE_LIST,
    CLIENT_LIST,
    MAPPING_ROOT,
    SERVER_LOG,
];

/// Who holds `/arcus/cache_list/<svc>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    Absent,
    /// Its data is this CR's claim (same UID).
    Ours,
    /// Created by hand or by another CR; the string says by whom.
    Other(String),
}

/// What `/arcus/cache_server_mapping/<key>` holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MappingState {
    /// The node exists with exactly one child, our service code.
    Ours,
    /// The node exists with no child (an interrupted create): ours to complete.
    Empty,
    /// The node maps another service code (or several): not ours to touch.
    Other(Vec<String>),
}

/// ZooKeeper as read for one CR.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ZkObserved {
    pub missing_base: Vec<String>,
    pub claim: Option<Claim>,
    pub client_list_exists: bool,
    /// Mappings present, by ordinal (absent ordinals are not in the map).
    pub mappings: BTreeMap<u32, MappingState>,
    /// Children of `cache_list/<svc>` (`<ip>:<port>-<hostname>`).
    pub cache_list_children: Vec<String>,
    /// Children of `client_list/<svc>` (ephemeral client registrations).
    pub client_list_children: Vec<String>,
    /// Our claim's ACL is not the one `spec.zookeeperAuth` asks for (credentials set on an
    /// existing tree, or changed).
    pub owned_acls_stale: bool,
}

/// The inputs the plan needs about the CR and the cluster.
#[derive(Clone)]
pub struct PlanInput<'a> {
    pub service_code: &'a str,
    /// `cache_list/<svc>` data marking this CR's claim.
    pub claim_data: &'a str,
    pub desired_replicas: u32,
    /// The StatefulSet's current `spec.replicas`, None when it does not exist yet.
    pub statefulset_replicas: Option<u32>,
    /// Ordinals of pods that exist (any phase, terminating included).
    pub pod_ordinals: &'a BTreeSet<u32>,
    pub deleting: bool,
    /// The mapping key for an ordinal: `<pod-hostname>:<port>`.
    pub mapping_key: &'a (dyn Fn(u32) -> String + Sync),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ZkOp {
    /// Create a persistent node with data if absent.
    CreateNode { path: String, data: String },
    /// Create `cache_server_mapping/<key>` (if absent) and its child `<svc>`, in one transaction.
    CreateMapping {
        ordinal: u32,
        key: String,
        service_code: String,
    },
    /// Delete the child `<svc>` and then `cache_server_mapping/<key>`, in one transaction.
    DeleteMapping {
        ordinal: u32,
        key: String,
        service_code: String,
    },
    /// Delete a node and its (ephemeral) children.
    DeleteNodeAndChildren { path: String, children: Vec<String> },
    /// Give the znodes we own the ACL `spec.zookeeperAuth` asks for (the claim last).
    SecureOwned { paths: Vec<String> },
}

impl ZkOp {
    /// Short form for logs and Events.
    pub fn describe(&self) -> String {
        match self {
            ZkOp::CreateNode { path, .. } => format!("create {path}"),
            ZkOp::CreateMapping {
                key, service_code, ..
            } => format!("map {key} to {service_code}"),
            ZkOp::DeleteMapping {
                key, service_code, ..
            } => format!("unmap {key} from {service_code}"),
            ZkOp::DeleteNodeAndChildren { path, .. } => format!("delete {path}"),
            ZkOp::SecureOwned { paths } => format!("set the ACL of {} owned znodes", paths.len()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict(pub String);

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ZkPlan {
    /// Executed in order, before the StatefulSet is applied.
    pub ops: Vec<ZkOp>,
    /// The StatefulSet size to apply after `ops` succeed; None: leave it as it is.
    pub statefulset_replicas: Option<u32>,
    /// What the plan is waiting for before it can go on (requeue), if anything.
    pub waiting_for: Option<String>,
    /// Set when nothing may be written: the reason, for status and an Event.
    pub conflict: Option<String>,
    /// Deletion only: every piece of ZooKeeper state we owned is gone.
    pub cleanup_done: bool,
}

/// Highest ordinal worth reading: mappings are created contiguously from 0 and removed from the
/// top, so reading up to this bound and then on until the first absent one finds them all.
pub fn ordinals_to_read(desired: u32, statefulset_replicas: Option<u32>, recorded: u32) -> u32 {
    desired.max(statefulset_replicas.unwrap_or(0)).max(recorded)
}

pub fn plan(input: &PlanInput, zk: &ZkObserved) -> ZkPlan {
    let svc = input.service_code;
    if let Some(reason) = conflict(input, zk) {
        return ZkPlan {
            conflict: Some(reason),
            ..Default::default()
        };
    }
    if input.deleting {
        return plan_deletion(input, zk);
    }
    let mut ops: Vec<ZkOp> = zk
        .missing_base
        .iter()
        .map(|p| ZkOp::CreateNode {
            path: p.clone(),
            data: String::new(),
        })
        .collect();
    if zk.claim != Some(Claim::Ours) {
        ops.push(ZkOp::CreateNode {
            path: format!("{CACHE_LIST}/{svc}"),
            data: input.claim_data.to_string(),
        });
    }
    if !zk.client_list_exists {
        ops.push(ZkOp::CreateNode {
            path: format!("{CLIENT_LIST}/{svc}"),
            data: String::new(),
        });
    }
    for ordinal in 0..input.desired_replicas {
        if zk.mappings.get(&ordinal) != Some(&MappingState::Ours) {
            ops.push(create_mapping(input, ordinal));
        }
    }
    if zk.owned_acls_stale {
        ops.push(secure_owned(input, zk));
    }
    // A StatefulSet not yet lowered may still (re)create pods of surplus ordinals: their
    // mappings stay until it has been lowered and the pods are gone.
    let sts_now = input.statefulset_replicas.unwrap_or(0);
    let mut lingering = Vec::new();
    for (&ordinal, state) in zk.mappings.range(input.desired_replicas..) {
        if input.pod_ordinals.contains(&ordinal) || ordinal < sts_now {
            lingering.push(ordinal);
        } else if matches!(state, MappingState::Ours | MappingState::Empty) {
            ops.push(delete_mapping(input, ordinal));
        }
    }
    let waiting_for = (!lingering.is_empty()).then(|| {
        format!(
            "pods {} to terminate before their mappings are removed",
            ordinal_list(&lingering)
        )
    });
    ZkPlan {
        ops,
        statefulset_replicas: Some(input.desired_replicas),
        waiting_for,
        ..Default::default()
    }
}

fn plan_deletion(input: &PlanInput, zk: &ZkObserved) -> ZkPlan {
    let svc = input.service_code;
    let sts = input.statefulset_replicas.map(|_| 0);
    if !input.pod_ordinals.is_empty() {
        return ZkPlan {
            statefulset_replicas: sts,
            waiting_for: Some(format!(
                "pods {} to terminate",
                ordinal_list(&input.pod_ordinals.iter().copied().collect::<Vec<_>>())
            )),
            ..Default::default()
        };
    }
    let mut ops: Vec<ZkOp> = zk
        .mappings
        .iter()
        .filter(|(_, s)| matches!(s, MappingState::Ours | MappingState::Empty))
        .map(|(&o, _)| delete_mapping(input, o))
        .collect();
    let mut waiting_for = None;
    if zk.claim == Some(Claim::Ours) {
        if zk.cache_list_children.is_empty() {
            ops.push(ZkOp::DeleteNodeAndChildren {
                path: format!("{CACHE_LIST}/{svc}"),
                children: vec![],
            });
        } else {
            // Ephemeral nodes of stopped servers vanish when their sessions end.
            waiting_for = Some(format!(
                "cache nodes {} to leave {CACHE_LIST}/{svc}",
                zk.cache_list_children.join(", ")
            ));
        }
        if zk.client_list_exists {
            ops.push(ZkOp::DeleteNodeAndChildren {
                path: format!("{CLIENT_LIST}/{svc}"),
                children: zk.client_list_children.clone(),
            });
        }
    }
    let cleanup_done = ops.is_empty() && waiting_for.is_none();
    ZkPlan {
        ops,
        statefulset_replicas: sts,
        waiting_for,
        cleanup_done,
        ..Default::default()
    }
}

fn conflict(input: &PlanInput, zk: &ZkObserved) -> Option<String> {
    let svc = input.service_code;
    if let Some(Claim::Other(owner)) = &zk.claim {
        return Some(format!(
            "service code {svc:?} is already in use ({CACHE_LIST}/{svc} is held by {owner}); \
             choose another serviceCode or remove the other owner"
        ));
    }
    let others: Vec<String> = zk
        .mappings
        .iter()
        .filter_map(|(&o, s)| match s {
            MappingState::Other(codes) => {
                Some(format!("{} -> {}", (input.mapping_key)(o), codes.join(",")))
            }
            _ => None,
        })
        .collect();
    (!others.is_empty()).then(|| {
        format!(
            "mapping addresses are already used by other service codes ({}); delete those mappings or rename this resource",
            others.join("; ")
        )
    })
}

fn create_mapping(input: &PlanInput, ordinal: u32) -> ZkOp {
    ZkOp::CreateMapping {
        ordinal,
        key: (input.mapping_key)(ordinal),
        service_code: input.service_code.to_string(),
    }
}

/// Every znode we own that exists, mappings first and the claim last: the claim's ACL is what
/// tells the next pass whether this is done.
fn secure_owned(input: &PlanInput, zk: &ZkObserved) -> ZkOp {
    let svc = input.service_code;
    let mut paths = Vec::new();
    for (&ordinal, state) in &zk.mappings {
        if matches!(state, MappingState::Ours | MappingState::Empty) {
            let parent = format!("{MAPPING_ROOT}/{}", (input.mapping_key)(ordinal));
            if *state == MappingState::Ours {
                paths.push(format!("{parent}/{svc}"));
            }
            paths.push(parent);
        }
    }
    if zk.client_list_exists {
        paths.push(format!("{CLIENT_LIST}/{svc}"));
    }
    paths.push(format!("{CACHE_LIST}/{svc}"));
    ZkOp::SecureOwned { paths }
}

fn delete_mapping(input: &PlanInput, ordinal: u32) -> ZkOp {
    ZkOp::DeleteMapping {
        ordinal,
        key: (input.mapping_key)(ordinal),
        service_code: input.service_code.to_string(),
    }
}

fn ordinal_list(ordinals: &[u32]) -> String {
    ordinals
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A node's ephemeral znode under `cache_list/<svc>`: `<ip>:<port>-<hostname>` (ip:port has no
/// '-'), parsed once. Serialized as the znode name, so records keep the name ZooKeeper shows.
#[derive(
    Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct CacheZnode {
    name: String,
    dash: usize,
}

impl CacheZnode {
    pub fn parse(name: &str) -> Option<CacheZnode> {
        let dash = name.find('-')?;
        (dash > 0 && dash + 1 < name.len()).then(|| CacheZnode {
            name: name.to_string(),
            dash,
        })
    }

    /// The znode a node at `addr` (`<ip>:<port>`) registers as `host`.
    pub fn new(addr: &str, host: &str) -> CacheZnode {
        CacheZnode {
            name: format!("{addr}-{host}"),
            dash: addr.len(),
        }
    }

    /// `<ip>:<port>`.
    pub fn addr(&self) -> &str {
        &self.name[..self.dash]
    }

    /// The node's hostname (`<pod>.<namespace>` for ours).
    pub fn host(&self) -> &str {
        &self.name[self.dash + 1..]
    }

    /// The pod name (the hostname's first label).
    pub fn pod(&self) -> &str {
        self.host().split('.').next().unwrap_or_default()
    }

    /// The znode's name under `cache_list/<svc>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The nodes among `children` that parse (others are not ARCUS registrations).
    pub fn parse_all(children: &[String]) -> Vec<CacheZnode> {
        children
            .iter()
            .filter_map(|c| CacheZnode::parse(c))
            .collect()
    }
}

impl TryFrom<String> for CacheZnode {
    type Error = String;
    fn try_from(name: String) -> Result<Self, String> {
        CacheZnode::parse(&name).ok_or_else(|| format!("{name:?} is not <ip>:<port>-<hostname>"))
    }
}

impl From<CacheZnode> for String {
    fn from(z: CacheZnode) -> String {
        z.name
    }
}

impl std::fmt::Display for CacheZnode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(o: u32) -> String {
        format!("test-arcus-mc-{o}.test-arcus-mc.default:11211")
    }

    fn input<'a>(
        desired: u32,
        sts: Option<u32>,
        pods: &'a BTreeSet<u32>,
        deleting: bool,
    ) -> PlanInput<'a> {
        PlanInput {
            service_code: "test",
            claim_data: "{\"uid\":\"u1\"}",
            desired_replicas: desired,
            statefulset_replicas: sts,
            pod_ordinals: pods,
            deleting,
            mapping_key: &key,
        }
    }

    fn settled(n: u32) -> ZkObserved {
        ZkObserved {
            claim: Some(Claim::Ours),
            client_list_exists: true,
            mappings: (0..n).map(|o| (o, MappingState::Ours)).collect(),
            ..Default::default()
        }
    }

    fn pods(r: std::ops::Range<u32>) -> BTreeSet<u32> {
        r.collect()
    }

    #[test]
    fn first_reconcile_creates_base_claim_and_mappings_before_the_statefulset() {
        let zk = ZkObserved {
            missing_base: BASE_TREE.iter().map(|s| s.to_string()).collect(),
            claim: Some(Claim::Absent),
            ..Default::default()
        };
        let p = plan(&input(3, None, &BTreeSet::new(), false), &zk);
        let described: Vec<String> = p.ops.iter().map(ZkOp::describe).collect();
        assert_eq!(
            described,
            vec![
                "create /arcus",
                "create /arcus/cache_list",
                "create /arcus/client_list",
                "create /arcus/cache_server_mapping",
                "create /arcus/cache_server_log",
                "create /arcus/cache_list/test",
                "create /arcus/client_list/test",
                "map test-arcus-mc-0.test-arcus-mc.default:11211 to test",
                "map test-arcus-mc-1.test-arcus-mc.default:11211 to test",
                "map test-arcus-mc-2.test-arcus-mc.default:11211 to test",
            ]
        );
        assert_eq!(
            p.ops[5],
            ZkOp::CreateNode {
                path: "/arcus/cache_list/test".into(),
                data: "{\"uid\":\"u1\"}".into()
            }
        );
        assert_eq!(p.statefulset_replicas, Some(3));
        assert_eq!(p.conflict, None);
    }

    #[test]
    fn steady_state_plans_nothing() {
        let p = plan(&input(3, Some(3), &pods(0..3), false), &settled(3));
        assert!(p.ops.is_empty(), "{:?}", p.ops);
        assert_eq!(p.statefulset_replicas, Some(3));
        assert_eq!(p.waiting_for, None);
    }

    #[test]
    fn scale_out_maps_new_ordinals_only() {
        let p = plan(&input(5, Some(3), &pods(0..3), false), &settled(3));
        assert_eq!(
            p.ops,
            vec![
                ZkOp::CreateMapping {
                    ordinal: 3,
                    key: key(3),
                    service_code: "test".into()
                },
                ZkOp::CreateMapping {
                    ordinal: 4,
                    key: key(4),
                    service_code: "test".into()
                },
            ]
        );
        assert_eq!(p.statefulset_replicas, Some(5));
    }

    #[test]
    fn scale_in_lowers_the_statefulset_and_keeps_mappings_while_pods_exist() {
        let p = plan(&input(3, Some(5), &pods(0..5), false), &settled(5));
        assert!(p.ops.is_empty(), "{:?}", p.ops);
        assert_eq!(p.statefulset_replicas, Some(3));
        assert_eq!(
            p.waiting_for.as_deref(),
            Some("pods 3, 4 to terminate before their mappings are removed")
        );
    }

    #[test]
    fn scale_in_removes_mappings_once_their_pods_are_gone() {
        let p = plan(&input(3, Some(3), &pods(0..4), false), &settled(5));
        assert_eq!(
            p.ops,
            vec![ZkOp::DeleteMapping {
                ordinal: 4,
                key: key(4),
                service_code: "test".into()
            }]
        );
        assert!(p.waiting_for.unwrap().contains("pods 3"));
        let p = plan(&input(3, Some(3), &pods(0..3), false), &settled(5));
        assert_eq!(p.ops.len(), 2);
        assert_eq!(p.waiting_for, None);
    }

    #[test]
    fn scale_in_while_statefulset_not_yet_lowered_keeps_mappings_of_its_ordinals() {
        // The pod is gone (deleted by hand) but the StatefulSet still has 5: it would recreate it.
        let p = plan(&input(3, Some(5), &pods(0..3), false), &settled(5));
        assert!(p.ops.is_empty());
        assert_eq!(p.statefulset_replicas, Some(3));
    }

    #[test]
    fn empty_mapping_is_completed() {
        let mut zk = settled(3);
        zk.mappings.insert(1, MappingState::Empty);
        let p = plan(&input(3, Some(3), &pods(0..3), false), &zk);
        assert_eq!(
            p.ops,
            vec![ZkOp::CreateMapping {
                ordinal: 1,
                key: key(1),
                service_code: "test".into()
            }]
        );
    }

    #[test]
    fn claim_by_someone_else_is_a_conflict_and_writes_nothing() {
        let zk = ZkObserved {
            claim: Some(Claim::Other("default/other".into())),
            ..Default::default()
        };
        let p = plan(&input(3, None, &BTreeSet::new(), false), &zk);
        assert!(p.ops.is_empty());
        assert_eq!(p.statefulset_replicas, None);
        let msg = p.conflict.unwrap();
        assert!(
            msg.contains("\"test\"") && msg.contains("default/other"),
            "{msg}"
        );
    }

    #[test]
    fn mapping_of_another_service_is_a_conflict() {
        let mut zk = settled(2);
        zk.mappings
            .insert(2, MappingState::Other(vec!["prod".into()]));
        let p = plan(&input(3, Some(2), &pods(0..2), false), &zk);
        assert!(p.ops.is_empty());
        assert!(p.conflict.unwrap().contains("prod"));
    }

    #[test]
    fn conflict_blocks_deletion_cleanup_too() {
        let zk = ZkObserved {
            claim: Some(Claim::Other("hand-made".into())),
            ..Default::default()
        };
        let p = plan(&input(3, None, &BTreeSet::new(), true), &zk);
        assert!(p.ops.is_empty());
        assert!(!p.cleanup_done);
        assert!(p.conflict.is_some());
    }

    #[test]
    fn deletion_waits_for_pods_then_removes_everything_we_own() {
        let mut zk = settled(3);
        zk.cache_list_children = vec!["127.1.0.2:11211-test-arcus-mc-0".into()];
        let p = plan(&input(3, Some(3), &pods(0..3), true), &zk);
        assert!(p.ops.is_empty());
        assert_eq!(p.statefulset_replicas, Some(0));
        assert!(!p.cleanup_done);

        let p = plan(&input(3, Some(0), &BTreeSet::new(), true), &zk);
        assert_eq!(p.ops.len(), 4, "3 mappings and client_list: {:?}", p.ops);
        assert!(p
            .waiting_for
            .unwrap()
            .contains("127.1.0.2:11211-test-arcus-mc-0"));

        zk.cache_list_children.clear();
        zk.client_list_children = vec!["client-1".into()];
        let p = plan(&input(3, Some(0), &BTreeSet::new(), true), &zk);
        assert_eq!(
            &p.ops[3..],
            &[
                ZkOp::DeleteNodeAndChildren {
                    path: "/arcus/cache_list/test".into(),
                    children: vec![]
                },
                ZkOp::DeleteNodeAndChildren {
                    path: "/arcus/client_list/test".into(),
                    children: vec!["client-1".into()]
                },
            ]
        );
        let done = ZkObserved {
            claim: Some(Claim::Absent),
            ..Default::default()
        };
        let p = plan(&input(3, None, &BTreeSet::new(), true), &done);
        assert!(p.cleanup_done);
        assert!(p.ops.is_empty());
    }

    #[test]
    fn deletion_never_touches_a_claim_that_is_not_ours() {
        let zk = ZkObserved {
            claim: Some(Claim::Absent),
            client_list_exists: true,
            ..Default::default()
        };
        let p = plan(&input(0, None, &BTreeSet::new(), true), &zk);
        assert!(
            p.ops.is_empty(),
            "client_list of a service we never claimed stays: {:?}",
            p.ops
        );
        assert!(p.cleanup_done);
    }

    #[test]
    fn cache_znodes_split_at_the_first_dash() {
        let z = CacheZnode::parse("127.1.0.2:11211-test-arcus-mc-0.ns-a").unwrap();
        assert_eq!(z.addr(), "127.1.0.2:11211");
        assert_eq!(z.host(), "test-arcus-mc-0.ns-a");
        assert_eq!(z.pod(), "test-arcus-mc-0");
        assert_eq!(
            z,
            CacheZnode::new("127.1.0.2:11211", "test-arcus-mc-0.ns-a")
        );
        assert_eq!(CacheZnode::parse("nodash"), None);
        assert_eq!(CacheZnode::parse("-x"), None);
        let json = serde_json::to_string(&z).unwrap();
        assert_eq!(json, "\"127.1.0.2:11211-test-arcus-mc-0.ns-a\"");
        assert!(serde_json::from_str::<CacheZnode>("\"nodash\"").is_err());
    }

    #[test]
    fn read_bound_covers_every_source() {
        assert_eq!(ordinals_to_read(3, Some(5), 0), 5);
        assert_eq!(ordinals_to_read(3, None, 7), 7);
    }
}
