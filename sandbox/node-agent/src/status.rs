//! The runtime state of a pod's containers and the pure computation of the PodStatus the agent
//! reports from it (phase, conditions, containerStatuses) — kubelet's rules, simplified.

use k8s_openapi::api::core::v1::{
    ContainerState, ContainerStateRunning, ContainerStateTerminated, ContainerStateWaiting,
    ContainerStatus, HostIP, PodCondition, PodIP, PodStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Termination {
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub reason: String,
    pub message: Option<String>,
    pub started_at: Option<Timestamp>,
    pub finished_at: Timestamp,
    pub pid: Option<u32>,
}

impl Termination {
    /// Reason as kubelet reports it: Completed for exit 0, Error otherwise.
    pub fn new(
        exit_code: i32,
        signal: Option<i32>,
        started_at: Option<Timestamp>,
        finished_at: Timestamp,
    ) -> Self {
        let reason = if exit_code == 0 { "Completed" } else { "Error" }.to_string();
        Self {
            exit_code,
            signal,
            reason,
            message: None,
            started_at,
            finished_at,
            pid: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunState {
    Waiting {
        reason: String,
        message: Option<String>,
    },
    Running {
        started_at: Timestamp,
        pid: u32,
    },
    Terminated(Termination),
}

impl RunState {
    pub fn waiting(reason: &str, message: Option<String>) -> Self {
        RunState::Waiting {
            reason: reason.to_string(),
            message,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerRt {
    pub name: String,
    pub image: String,
    pub image_id: String,
    pub state: RunState,
    pub last: Option<Termination>,
    pub restart_count: i32,
    /// Readiness (only meaningful while running).
    pub ready: bool,
    /// Startup probe passed (or none) while running.
    pub started: bool,
}

impl ContainerRt {
    pub fn new(name: &str, image: &str) -> Self {
        Self {
            name: name.to_string(),
            image: image.to_string(),
            image_id: String::new(),
            state: RunState::waiting("ContainerCreating", None),
            last: None,
            restart_count: 0,
            ready: false,
            started: false,
        }
    }

    pub fn is_running(&self) -> bool {
        matches!(self.state, RunState::Running { .. })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRt {
    pub init: Vec<ContainerRt>,
    pub containers: Vec<ContainerRt>,
    /// All init containers completed successfully.
    pub initialized: bool,
    pub restart_policy: String,
    pub pod_ip: Option<String>,
    /// The node's InternalIP.
    pub host_ip: Option<String>,
    pub start_time: Option<Timestamp>,
}

fn time(t: Timestamp) -> Time {
    Time(t)
}

fn container_id(pid: Option<u32>) -> Option<String> {
    pid.map(|p| format!("sandbox://{p}"))
}

fn terminated(t: &Termination) -> ContainerState {
    ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code: t.exit_code,
            signal: t.signal,
            reason: Some(t.reason.clone()),
            message: t.message.clone(),
            started_at: t.started_at.map(time),
            finished_at: Some(time(t.finished_at)),
            container_id: container_id(t.pid),
        }),
        ..Default::default()
    }
}

fn container_status(c: &ContainerRt) -> ContainerStatus {
    let (state, id, running) = match &c.state {
        RunState::Waiting { reason, message } => (
            ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: Some(reason.clone()),
                    message: message.clone(),
                }),
                ..Default::default()
            },
            c.last.as_ref().and_then(|l| container_id(l.pid)),
            false,
        ),
        RunState::Running { started_at, pid } => (
            ContainerState {
                running: Some(ContainerStateRunning {
                    started_at: Some(time(*started_at)),
                }),
                ..Default::default()
            },
            container_id(Some(*pid)),
            true,
        ),
        RunState::Terminated(t) => (terminated(t), container_id(t.pid), false),
    };
    ContainerStatus {
        name: c.name.clone(),
        image: c.image.clone(),
        image_id: c.image_id.clone(),
        container_id: id,
        ready: running && c.ready,
        started: Some(running && c.started),
        restart_count: c.restart_count,
        state: Some(state),
        last_state: Some(c.last.as_ref().map(terminated).unwrap_or_default()),
        ..Default::default()
    }
}

/// kubelet's getPhase.
pub fn phase(rt: &PodRt) -> &'static str {
    let never = rt.restart_policy == "Never";
    if !rt.initialized {
        let failed = rt
            .init
            .iter()
            .any(|c| matches!(&c.state, RunState::Terminated(t) if t.exit_code != 0));
        return if failed && never { "Failed" } else { "Pending" };
    }
    let (mut running, mut waiting, mut stopped, mut succeeded) = (0, 0, 0, 0);
    for c in &rt.containers {
        match &c.state {
            RunState::Running { .. } => running += 1,
            RunState::Terminated(t) => {
                stopped += 1;
                if t.exit_code == 0 {
                    succeeded += 1;
                }
            }
            RunState::Waiting { .. } => {
                if c.last.is_some() {
                    stopped += 1;
                } else {
                    waiting += 1;
                }
            }
        }
    }
    if waiting > 0 {
        "Pending"
    } else if running > 0 {
        "Running"
    } else if stopped > 0 {
        if rt.restart_policy == "Always" {
            "Running"
        } else if stopped == succeeded {
            "Succeeded"
        } else if never {
            "Failed"
        } else {
            "Running"
        }
    } else {
        "Pending"
    }
}

fn condition(
    kind: &str,
    ok: bool,
    reason: Option<String>,
    message: Option<String>,
    prev: Option<&PodStatus>,
    now: Timestamp,
) -> PodCondition {
    let status = if ok { "True" } else { "False" };
    let since = prev
        .and_then(|p| p.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == kind))
        .filter(|c| c.status == status)
        .and_then(|c| c.last_transition_time.clone())
        .unwrap_or(time(now));
    PodCondition {
        type_: kind.to_string(),
        status: status.to_string(),
        reason: if ok { None } else { reason },
        message: if ok { None } else { message },
        last_transition_time: Some(since),
        last_probe_time: None,
        ..Default::default()
    }
}

/// The status to report. `prev` (the last reported status) keeps conditions' transition times.
pub fn compute(rt: &PodRt, prev: Option<&PodStatus>, now: Timestamp) -> PodStatus {
    let phase = phase(rt);
    let not_ready: Vec<&str> = rt
        .containers
        .iter()
        .filter(|c| !(c.is_running() && c.ready))
        .map(|c| c.name.as_str())
        .collect();
    let not_init: Vec<&str> = if rt.initialized {
        vec![]
    } else {
        rt.init
            .iter()
            .filter(|c| !matches!(&c.state, RunState::Terminated(t) if t.exit_code == 0))
            .map(|c| c.name.as_str())
            .collect()
    };
    let completed = phase == "Succeeded";
    let (ready_reason, ready_msg) = if completed {
        (Some("PodCompleted".to_string()), None)
    } else {
        (
            Some("ContainersNotReady".to_string()),
            Some(format!(
                "containers with unready status: [{}]",
                not_ready.join(" ")
            )),
        )
    };
    let ready = not_ready.is_empty() && !completed;
    let conditions = vec![
        condition(
            "Initialized",
            rt.initialized,
            Some("ContainersNotInitialized".to_string()),
            Some(format!(
                "containers with incomplete status: [{}]",
                not_init.join(" ")
            )),
            prev,
            now,
        ),
        condition(
            "Ready",
            ready,
            ready_reason.clone(),
            ready_msg.clone(),
            prev,
            now,
        ),
        condition("ContainersReady", ready, ready_reason, ready_msg, prev, now),
        condition("PodScheduled", true, None, None, prev, now),
    ];
    PodStatus {
        phase: Some(phase.to_string()),
        conditions: Some(conditions),
        host_ip: rt.host_ip.clone(),
        host_ips: rt
            .host_ip
            .as_ref()
            .map(|ip| vec![HostIP { ip: ip.clone() }]),
        pod_ip: rt.pod_ip.clone(),
        pod_ips: rt.pod_ip.as_ref().map(|ip| vec![PodIP { ip: ip.clone() }]),
        start_time: rt.start_time.map(time),
        init_container_statuses: if rt.init.is_empty() {
            None
        } else {
            Some(rt.init.iter().map(container_status).collect())
        },
        container_statuses: Some(rt.containers.iter().map(container_status).collect()),
        ..Default::default()
    }
}

/// The merge patch that makes the server's status equal to `status` for every field the agent
/// owns (fields it does not set are removed with `null`).
pub fn status_patch(status: &PodStatus) -> serde_json::Value {
    let mut v = serde_json::to_value(status).unwrap_or_default();
    if let Some(obj) = v.as_object_mut() {
        for key in [
            "phase",
            "conditions",
            "hostIP",
            "hostIPs",
            "podIP",
            "podIPs",
            "startTime",
            "initContainerStatuses",
            "containerStatuses",
            "message",
            "reason",
        ] {
            obj.entry(key).or_insert(serde_json::Value::Null);
        }
    }
    serde_json::json!({ "status": v })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + s).unwrap()
    }

    fn running(name: &str, ready: bool) -> ContainerRt {
        let mut c = ContainerRt::new(name, "busybox");
        c.state = RunState::Running {
            started_at: ts(1),
            pid: 42,
        };
        c.ready = ready;
        c.started = true;
        c
    }

    fn pod(containers: Vec<ContainerRt>, policy: &str) -> PodRt {
        PodRt {
            init: vec![],
            containers,
            initialized: true,
            restart_policy: policy.to_string(),
            pod_ip: Some("10.244.1.2".into()),
            host_ip: Some("10.244.0.11".into()),
            start_time: Some(ts(0)),
        }
    }

    fn cond<'a>(s: &'a PodStatus, kind: &str) -> &'a PodCondition {
        s.conditions
            .as_ref()
            .unwrap()
            .iter()
            .find(|c| c.type_ == kind)
            .unwrap()
    }

    #[test]
    fn running_and_ready() {
        let s = compute(&pod(vec![running("a", true)], "Always"), None, ts(2));
        assert_eq!(s.phase.as_deref(), Some("Running"));
        assert_eq!(cond(&s, "Ready").status, "True");
        assert_eq!(cond(&s, "ContainersReady").status, "True");
        assert_eq!(s.pod_ips.as_ref().unwrap()[0].ip, "10.244.1.2");
        assert_eq!(s.host_ip.as_deref(), Some("10.244.0.11"));
        assert_eq!(s.host_ips.as_ref().unwrap()[0].ip, "10.244.0.11");
        let cs = &s.container_statuses.as_ref().unwrap()[0];
        assert_eq!(cs.container_id.as_deref(), Some("sandbox://42"));
        assert!(cs.ready);
        assert_eq!(cs.started, Some(true));
    }

    #[test]
    fn running_not_ready_keeps_transition_time() {
        let rt = pod(vec![running("a", false)], "Always");
        let s1 = compute(&rt, None, ts(2));
        assert_eq!(s1.phase.as_deref(), Some("Running"));
        let r = cond(&s1, "Ready");
        assert_eq!(r.status, "False");
        assert_eq!(r.reason.as_deref(), Some("ContainersNotReady"));
        assert_eq!(
            r.message.as_deref(),
            Some("containers with unready status: [a]")
        );
        let s2 = compute(&rt, Some(&s1), ts(50));
        assert_eq!(s1, s2, "no change → identical status (no write)");
        let s3 = compute(&pod(vec![running("a", true)], "Always"), Some(&s2), ts(60));
        assert_eq!(cond(&s3, "Ready").last_transition_time, Some(Time(ts(60))));
        assert_eq!(
            cond(&s3, "PodScheduled").last_transition_time,
            Some(Time(ts(2)))
        );
    }

    #[test]
    fn crash_loop_is_running_with_last_state() {
        let mut c = ContainerRt::new("a", "busybox");
        let mut t = Termination::new(3, None, Some(ts(1)), ts(2));
        t.pid = Some(7);
        c.last = Some(t);
        c.restart_count = 2;
        c.state = RunState::waiting("CrashLoopBackOff", Some("back-off 4s".into()));
        let s = compute(&pod(vec![c.clone()], "Always"), None, ts(3));
        assert_eq!(s.phase.as_deref(), Some("Running"));
        let cs = &s.container_statuses.as_ref().unwrap()[0];
        assert_eq!(cs.restart_count, 2);
        assert_eq!(
            cs.state
                .as_ref()
                .unwrap()
                .waiting
                .as_ref()
                .unwrap()
                .reason
                .as_deref(),
            Some("CrashLoopBackOff")
        );
        let last = cs.last_state.as_ref().unwrap().terminated.as_ref().unwrap();
        assert_eq!(last.exit_code, 3);
        assert_eq!(last.reason.as_deref(), Some("Error"));
        assert_eq!(cs.container_id.as_deref(), Some("sandbox://7"));
    }

    #[test]
    fn phases() {
        let mut never_pulled = ContainerRt::new("a", "nope");
        never_pulled.state = RunState::waiting("ErrImagePull", Some("not in table".into()));
        assert_eq!(phase(&pod(vec![never_pulled], "Always")), "Pending");

        let mut done = ContainerRt::new("a", "busybox");
        done.state = RunState::Terminated(Termination::new(0, None, None, ts(1)));
        let mut failed = ContainerRt::new("b", "busybox");
        failed.state = RunState::Terminated(Termination::new(76, None, None, ts(1)));
        assert_eq!(phase(&pod(vec![done.clone()], "Never")), "Succeeded");
        assert_eq!(phase(&pod(vec![done.clone()], "OnFailure")), "Succeeded");
        assert_eq!(
            phase(&pod(vec![done.clone(), failed.clone()], "Never")),
            "Failed"
        );
        assert_eq!(phase(&pod(vec![failed.clone()], "OnFailure")), "Running");
        let s = compute(&pod(vec![done], "Never"), None, ts(2));
        assert_eq!(cond(&s, "Ready").reason.as_deref(), Some("PodCompleted"));
        let s = compute(&pod(vec![failed], "Never"), None, ts(2));
        let t = s.container_statuses.unwrap()[0]
            .state
            .clone()
            .unwrap()
            .terminated
            .unwrap();
        assert_eq!(t.exit_code, 76);
    }

    #[test]
    fn init_containers_gate_the_pod() {
        let mut rt = pod(vec![ContainerRt::new("main", "busybox")], "Never");
        rt.initialized = false;
        let mut init = ContainerRt::new("init", "busybox");
        init.state = RunState::Running {
            started_at: ts(1),
            pid: 9,
        };
        rt.init = vec![init.clone()];
        let s = compute(&rt, None, ts(2));
        assert_eq!(s.phase.as_deref(), Some("Pending"));
        let c = cond(&s, "Initialized");
        assert_eq!(c.status, "False");
        assert_eq!(
            c.message.as_deref(),
            Some("containers with incomplete status: [init]")
        );
        init.state = RunState::Terminated(Termination::new(1, None, None, ts(3)));
        rt.init = vec![init];
        assert_eq!(phase(&rt), "Failed");
    }

    #[test]
    fn patch_nulls_unset_owned_fields() {
        let s = compute(&pod(vec![running("a", true)], "Always"), None, ts(2));
        let p = status_patch(&s);
        assert!(p["status"]["initContainerStatuses"].is_null());
        assert!(p["status"].as_object().unwrap().contains_key("message"));
        assert_eq!(p["status"]["phase"], "Running");
        assert!(!p["status"].as_object().unwrap().contains_key("qosClass"));
    }
}
