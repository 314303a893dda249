//! Kubernetes Events about pods (Started, Killing, BackOff, Unhealthy, Failed, FailedMount,
//! FailedCreatePodSandBox), as kubelet records them, so `kubectl describe` and test dumps
//! say what happened. Published in the background; failures are only logged at debug level.

use k8s_openapi::api::core::v1::{ObjectReference, Pod};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::Client;

#[derive(Clone)]
pub struct Events {
    recorder: Recorder,
}

pub fn pod_ref(pod: &Pod) -> ObjectReference {
    ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Pod".into()),
        name: pod.metadata.name.clone(),
        namespace: pod.metadata.namespace.clone(),
        uid: pod.metadata.uid.clone(),
        resource_version: pod.metadata.resource_version.clone(),
        ..Default::default()
    }
}

impl Events {
    pub fn new(client: Client) -> Self {
        // One reporter for all of the agent's nodes: the events name the pod, and the pod its node.
        let reporter = Reporter {
            controller: "sandbox-node-agent".into(),
            instance: std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()),
        };
        Self {
            recorder: Recorder::new(client, reporter),
        }
    }

    fn publish(&self, pod: &Pod, type_: EventType, reason: &str, note: String) {
        let recorder = self.recorder.clone();
        let reference = pod_ref(pod);
        let event = Event {
            type_,
            reason: reason.to_string(),
            note: Some(note.chars().take(1000).collect()),
            action: reason.to_string(),
            secondary: None,
        };
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&event, &reference).await {
                tracing::debug!(error = %e, "publishing event");
            }
        });
    }

    pub fn normal(&self, pod: &Pod, reason: &str, note: String) {
        self.publish(pod, EventType::Normal, reason, note);
    }

    pub fn warning(&self, pod: &Pod, reason: &str, note: String) {
        self.publish(pod, EventType::Warning, reason, note);
    }
}
