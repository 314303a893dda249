//! Day-2 decisions for running nodes, as a pure function of what one pass observed:
//! - live configuration: `memlimit`, `connections` and `zkfailstop` reach running nodes by
//!   admin command (no restart); the pod template keeps them for future restarts without rolling anything;
//! - the operator's own rolling restart (the StatefulSet is `OnDelete`): a node whose pod was
//!   made from an older template is restarted one at a time, highest ordinal first, only while
//!   every other node is Ready and registered; a node that does not come back stops the roll;
//! - self-healing: a running node whose znode has been missing for a while is asked to rejoin,
//!   or else restarted.
//!
//! The executor lives in the controller; nothing here performs I/O.

use std::fmt;

/// Pod annotation (set through the template) naming the restart-relevant template it came from.
pub const RESTART_HASH: &str = "jam2in.com/restart-hash";
/// Pod annotation (set through the template): the live configuration the node started with.
pub const STARTED_CONFIG: &str = "jam2in.com/started-config";
/// Pod annotation set by the operator after it changed the configuration of the running node.
pub const APPLIED_CONFIG: &str = "jam2in.com/applied-config";

/// How long a running node may lack its znode before it is healed (it registers right after it
/// starts; this only covers the gap between listening and registering).
pub const HEAL_AFTER_SECS: i64 = 10;
/// How long a restarted node may take to be Ready and registered before the roll stops.
pub const ROLL_STUCK_AFTER_SECS: i64 = 300;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiveConfig {
    pub memlimit_mb: u32,
    pub connections: u32,
    /// arcus `zk_failstop`: on, an expired ZooKeeper session makes the node exit.
    pub zk_failstop: bool,
}

impl fmt::Display for LiveConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "memlimit={},connections={},zkfailstop={}",
            self.memlimit_mb,
            self.connections,
            if self.zk_failstop { "on" } else { "off" }
        )
    }
}

impl LiveConfig {
    /// This configuration with only `zkfailstop` changed.
    pub fn with_failstop(self, zk_failstop: bool) -> LiveConfig {
        LiveConfig {
            zk_failstop,
            ..self
        }
    }

    pub fn parse(s: &str) -> Option<LiveConfig> {
        let mut memlimit_mb = None;
        let mut connections = None;
        // Written by versions before it was live: the node runs with the server's default.
        let mut zk_failstop = Some(true);
        for part in s.split(',') {
            match part.split_once('=')? {
                ("memlimit", v) => memlimit_mb = v.parse().ok(),
                ("connections", v) => connections = v.parse().ok(),
                ("zkfailstop", "on") => zk_failstop = Some(true),
                ("zkfailstop", "off") => zk_failstop = Some(false),
                ("zkfailstop", _) => zk_failstop = None,
                _ => {}
            }
        }
        Some(LiveConfig {
            memlimit_mb: memlimit_mb?,
            connections: connections?,
            zk_failstop: zk_failstop?,
        })
    }
}

/// One cache pod as these decisions need it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodePod {
    pub ordinal: u32,
    pub name: String,
    pub ip: Option<String>,
    pub restart_hash: Option<String>,
    pub started: Option<LiveConfig>,
    pub applied: Option<LiveConfig>,
    pub ready: bool,
    pub registered: bool,
    pub terminating: bool,
    /// Seconds since the pod became Ready (None when not Ready).
    pub ready_for_secs: Option<i64>,
    /// Seconds since the pod object was created.
    pub age_secs: i64,
    /// Seconds since the cache container last started running (None when not running).
    pub running_for_secs: Option<i64>,
}

impl NodePod {
    /// What the running node uses now: what we applied last, else what it started with.
    pub fn effective(&self) -> Option<LiveConfig> {
        self.applied.or(self.started)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Day2Action {
    /// Change memlimit/connections of a running node by admin command.
    ApplyLiveConfig {
        pod: String,
        ip: String,
        from: Option<LiveConfig>,
        to: LiveConfig,
    },
    /// Its znode is missing: `zkensemble rejoin`, or restart the pod when that fails.
    Heal { pod: String, ip: String },
    /// Restart this node (delete its pod) to pick up the current template.
    Roll { pod: String, ordinal: u32 },
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Day2Plan {
    pub actions: Vec<Day2Action>,
    /// Pods still on an older template, highest ordinal first.
    pub stale: Vec<u32>,
    /// Why the roll is not advancing right now (waiting, or stuck).
    pub roll_waiting: Option<String>,
    /// Set when the roll stopped on a node that did not come back.
    pub roll_stuck: Option<String>,
    /// A Ready node lacks its znode but is still within the grace: look again soon.
    pub heal_pending: bool,
}

/// Heal or live configuration for one running node of the desired range.
fn running_node_actions(p: &NodePod, desired: LiveConfig, out: &mut Day2Plan) {
    // A node that left the cluster answers `ready` with NOT_READY, so its pod may turn
    // unready: heal whatever runs unregistered past the grace, Ready or not.
    if let (Some(ip), Some(running)) = (&p.ip, p.running_for_secs) {
        if !p.registered && running >= HEAL_AFTER_SECS {
            out.actions.push(Day2Action::Heal {
                pod: p.name.clone(),
                ip: ip.clone(),
            });
        } else if !p.registered {
            out.heal_pending = true;
        }
    }
    if !p.ready {
        failstop_before_ready(p, desired, out);
        return;
    }
    let Some(ip) = p.ip.clone() else {
        return;
    };
    if p.effective() != Some(desired) {
        out.actions.push(Day2Action::ApplyLiveConfig {
            pod: p.name.clone(),
            ip: ip.clone(),
            from: p.effective(),
            to: desired,
        });
    }
}

/// How long a node's process must have run before it is sent admin commands while unready
/// (it listens right after it starts; before that the command would only fail).
pub const FAILSTOP_AFTER_SECS: i64 = 2;

/// `zkfailstop` is a safety setting, not tuning: it reaches a running node that is not Ready yet
/// too (a held node of a scale-out, a node being filled, one left unready by an outage), so a
/// ZooKeeper outage meanwhile does not make it exit and lose its fill. Only that setting
/// changes; the rest follows once it is Ready.
fn failstop_before_ready(p: &NodePod, desired: LiveConfig, out: &mut Day2Plan) {
    let (Some(ip), Some(from)) = (&p.ip, p.effective()) else {
        return;
    };
    let running = p.running_for_secs.is_some_and(|s| s >= FAILSTOP_AFTER_SECS);
    if running && from.zk_failstop != desired.zk_failstop {
        out.actions.push(Day2Action::ApplyLiveConfig {
            pod: p.name.clone(),
            ip: ip.clone(),
            from: Some(from),
            to: from.with_failstop(desired.zk_failstop),
        });
    }
}

pub fn plan(desired_hash: &str, desired: LiveConfig, replicas: u32, pods: &[NodePod]) -> Day2Plan {
    let mut out = Day2Plan::default();
    let in_range: Vec<&NodePod> = pods.iter().filter(|p| p.ordinal < replicas).collect();

    for p in in_range.iter().filter(|p| !p.terminating) {
        running_node_actions(p, desired, &mut out);
    }

    let mut stale: Vec<u32> = in_range
        .iter()
        .filter(|p| p.restart_hash.as_deref() != Some(desired_hash))
        .map(|p| p.ordinal)
        .collect();
    stale.sort_unstable_by(|a, b| b.cmp(a));
    out.stale = stale.clone();
    // A node restarted for the roll that has not come back in time stops the roll.
    if let Some(p) = in_range.iter().find(|p| {
        p.restart_hash.as_deref() == Some(desired_hash)
            && !(p.ready && p.registered)
            && p.age_secs > ROLL_STUCK_AFTER_SECS
    }) {
        out.roll_stuck = Some(format!(
            "rolling restart stopped: {} has not become ready and registered within {ROLL_STUCK_AFTER_SECS} s; the other nodes keep serving",
            p.name
        ));
        return out;
    }
    let Some(&next) = stale.first() else {
        return out;
    };
    let all_healthy = in_range.len() as u32 == replicas
        && in_range
            .iter()
            .all(|p| p.ready && p.registered && !p.terminating);
    if !all_healthy {
        let waiting: Vec<&str> = in_range
            .iter()
            .filter(|p| !(p.ready && p.registered) || p.terminating)
            .map(|p| p.name.as_str())
            .collect();
        out.roll_waiting = Some(if waiting.is_empty() {
            format!("waiting for all {replicas} nodes before restarting the next")
        } else {
            format!(
                "waiting for {} to be ready and registered before restarting the next node",
                waiting.join(", ")
            )
        });
        return out;
    }
    let pod = in_range
        .iter()
        .find(|p| p.ordinal == next)
        .expect("stale pod is in range");
    out.actions.push(Day2Action::Roll {
        pod: pod.name.clone(),
        ordinal: next,
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: LiveConfig = LiveConfig {
        memlimit_mb: 100,
        connections: 1000,
        zk_failstop: false,
    };

    #[test]
    fn live_config_annotation_round_trips_and_reads_older_ones() {
        assert_eq!(LiveConfig::parse(&CFG.to_string()), Some(CFG));
        assert_eq!(
            CFG.to_string(),
            "memlimit=100,connections=1000,zkfailstop=off"
        );
        // Before zkfailstop was live: the node runs with arcus-memcached's default, on.
        assert_eq!(
            LiveConfig::parse("memlimit=100,connections=1000"),
            Some(LiveConfig {
                zk_failstop: true,
                ..CFG
            })
        );
        assert_eq!(
            LiveConfig::parse("memlimit=100,connections=1000,zkfailstop=x"),
            None
        );
    }

    #[test]
    fn a_node_started_with_failstop_on_gets_it_turned_off_live() {
        let mut pods: Vec<_> = (0..2).map(|o| pod(o, "h1")).collect();
        for p in &mut pods {
            p.started = Some(LiveConfig {
                zk_failstop: true,
                ..CFG
            });
        }
        let p = plan("h1", CFG, 2, &pods);
        assert_eq!(p.actions.len(), 2, "{p:?}");
        assert!(p
            .actions
            .iter()
            .all(|a| matches!(a, Day2Action::ApplyLiveConfig { to, .. } if !to.zk_failstop)));
        assert!(p.stale.is_empty(), "no restart for it");
    }

    fn pod(o: u32, hash: &str) -> NodePod {
        NodePod {
            ordinal: o,
            name: format!("t-arcus-mc-{o}"),
            ip: Some(format!("127.1.0.{}", o + 2)),
            restart_hash: Some(hash.into()),
            started: Some(CFG),
            applied: None,
            ready: true,
            registered: true,
            terminating: false,
            ready_for_secs: Some(100),
            age_secs: 100,
            running_for_secs: Some(100),
        }
    }

    #[test]
    fn an_unready_running_node_gets_only_failstop_turned_off() {
        let mut pods: Vec<_> = (0..3).map(|o| pod(o, "h1")).collect();
        let started = LiveConfig {
            zk_failstop: true,
            ..CFG
        };
        for p in &mut pods {
            p.started = Some(started);
            p.ready = false;
            p.ready_for_secs = None;
        }
        pods[1].running_for_secs = Some(1); // just started: not listening yet
        pods[2].running_for_secs = None; // not running
        let want = LiveConfig {
            memlimit_mb: 200,
            ..CFG
        };
        let p = plan("h1", want, 3, &pods);
        let live: Vec<_> = p
            .actions
            .iter()
            .filter(|a| matches!(a, Day2Action::ApplyLiveConfig { .. }))
            .collect();
        assert_eq!(
            live,
            vec![&Day2Action::ApplyLiveConfig {
                pod: pods[0].name.clone(),
                ip: pods[0].ip.clone().unwrap(),
                from: Some(started),
                to: started.with_failstop(false),
            }],
            "only node 0 runs long enough; only zkfailstop changes before Ready"
        );
        // Once applied (annotation), nothing more until Ready.
        pods[0].applied = Some(started.with_failstop(false));
        let again = plan("h1", want, 3, &pods);
        assert!(!again
            .actions
            .iter()
            .any(|a| matches!(a, Day2Action::ApplyLiveConfig { .. })));
    }

    #[test]
    fn settled_cluster_needs_nothing() {
        let pods: Vec<_> = (0..3).map(|o| pod(o, "h1")).collect();
        assert_eq!(plan("h1", CFG, 3, &pods), Day2Plan::default());
    }

    #[test]
    fn memlimit_change_is_applied_live_to_every_ready_node_without_a_roll() {
        let pods: Vec<_> = (0..3).map(|o| pod(o, "h1")).collect();
        let want = LiveConfig {
            memlimit_mb: 200,
            ..CFG
        };
        let p = plan("h1", want, 3, &pods);
        assert_eq!(p.actions.len(), 3);
        assert!(p
            .actions
            .iter()
            .all(|a| matches!(a, Day2Action::ApplyLiveConfig { to, .. } if *to == want)));
        assert!(p.stale.is_empty());
    }

    #[test]
    fn applied_config_counts_as_current() {
        let mut pods: Vec<_> = (0..2).map(|o| pod(o, "h1")).collect();
        let want = LiveConfig {
            memlimit_mb: 200,
            ..CFG
        };
        for p in &mut pods {
            p.applied = Some(want);
        }
        assert!(plan("h1", want, 2, &pods).actions.is_empty());
    }

    #[test]
    fn roll_goes_highest_ordinal_first_one_at_a_time() {
        let pods: Vec<_> = (0..5).map(|o| pod(o, "old")).collect();
        let p = plan("new", CFG, 5, &pods);
        assert_eq!(p.stale, vec![4, 3, 2, 1, 0]);
        assert_eq!(
            p.actions,
            vec![Day2Action::Roll {
                pod: "t-arcus-mc-4".into(),
                ordinal: 4
            }]
        );
    }

    #[test]
    fn roll_waits_while_the_restarted_node_is_not_back() {
        let mut pods: Vec<_> = (0..4).map(|o| pod(o, "old")).collect();
        pods.push(NodePod {
            ready: false,
            registered: false,
            ready_for_secs: None,
            age_secs: 5,
            running_for_secs: Some(5),
            ..pod(4, "new")
        });
        let p = plan("new", CFG, 5, &pods);
        assert!(p.actions.is_empty());
        assert!(p.roll_waiting.unwrap().contains("t-arcus-mc-4"));
        pods[4] = pod(4, "new");
        let p = plan("new", CFG, 5, &pods);
        assert_eq!(
            p.actions,
            vec![Day2Action::Roll {
                pod: "t-arcus-mc-3".into(),
                ordinal: 3
            }]
        );
    }

    #[test]
    fn roll_stops_when_a_node_does_not_come_back() {
        let mut pods: Vec<_> = (0..4).map(|o| pod(o, "old")).collect();
        pods.push(NodePod {
            ready: false,
            registered: false,
            ready_for_secs: None,
            age_secs: ROLL_STUCK_AFTER_SECS + 1,
            running_for_secs: None,
            ..pod(4, "new")
        });
        let p = plan("new", CFG, 5, &pods);
        assert!(p
            .actions
            .iter()
            .all(|a| !matches!(a, Day2Action::Roll { .. })));
        assert!(p.roll_stuck.unwrap().contains("t-arcus-mc-4"));
    }

    #[test]
    fn a_ready_node_without_znode_is_healed_after_the_grace() {
        let mut pods: Vec<_> = (0..3).map(|o| pod(o, "h1")).collect();
        pods[1].registered = false;
        pods[1].running_for_secs = Some(HEAL_AFTER_SECS - 1);
        let p = plan("h1", CFG, 3, &pods);
        assert!(p.actions.is_empty());
        assert!(p.heal_pending, "looks again soon");
        pods[1].running_for_secs = Some(HEAL_AFTER_SECS);
        assert_eq!(
            plan("h1", CFG, 3, &pods).actions,
            vec![Day2Action::Heal {
                pod: "t-arcus-mc-1".into(),
                ip: "127.1.0.3".into()
            }]
        );
    }

    #[test]
    fn no_roll_while_a_node_is_unregistered() {
        let mut pods: Vec<_> = (0..3).map(|o| pod(o, "old")).collect();
        pods[0].registered = false;
        pods[0].ready_for_secs = Some(1);
        pods[0].running_for_secs = Some(1);
        let p = plan("new", CFG, 3, &pods);
        assert!(p.actions.is_empty());
        assert!(p.roll_waiting.is_some());
    }

    #[test]
    fn live_config_round_trips() {
        assert_eq!(LiveConfig::parse(&CFG.to_string()), Some(CFG));
        assert_eq!(LiveConfig::parse("memlimit=1"), None);
    }
}
