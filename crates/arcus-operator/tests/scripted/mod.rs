//! A scripted Kubernetes API for reconcile tests, in the manner of kube-rs/controller-rs's
//! `ApiServerVerifier`: `kube::Client` talks to a `tower_test` mock, and a verifier task answers
//! each request with the next step of a script, checking method, path, query, content type and
//! body. A request the script does not expect fails the test (it is answered with a 500, so the
//! reconcile stops soon, and reported by [`ScriptedApi::finish`]).
//!
//! Events (`events.k8s.io`, POST or a series PATCH) are answered at any point and kept apart,
//! so a script lists only the requests whose order matters.
//!
//! A probe may be given: it runs as each request arrives, so a test can tell what ZooKeeper held
//! at the moment of each API write (e.g. that the mappings existed before the Service apply).

use futures::future::BoxFuture;
use http::{Method, Request, Response};
use kube::client::Body;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

/// Checks a request body; the error says what is wrong.
pub type Check = Box<dyn FnOnce(&Value) -> Result<(), String> + Send>;
/// Computes an answer (status code, body) from the request body.
pub type Answer = Box<dyn FnOnce(&Value) -> (u16, Value) + Send>;
/// Runs as each request arrives; its output is stored with the request.
pub type Probe = Arc<dyn Fn() -> BoxFuture<'static, Vec<String>> + Send + Sync>;

pub const MERGE_PATCH: &str = "application/merge-patch+json";
pub const APPLY_PATCH: &str = "application/apply-patch+yaml";

enum Reply {
    Json(u16, Value),
    /// Computed from the request body (e.g. the object as stored after a patch).
    With(Answer),
}

/// One expected request and its answer.
pub struct Step {
    method: Method,
    path: String,
    query: Vec<(String, String)>,
    content_type: Option<&'static str>,
    accept_contains: Option<&'static str>,
    check: Option<Check>,
    reply: Reply,
}

impl Step {
    fn new(method: Method, path: impl Into<String>) -> Self {
        Step {
            method,
            path: path.into(),
            query: vec![],
            content_type: None,
            accept_contains: None,
            check: None,
            reply: Reply::Json(
                500,
                status_body(500, "InternalError", "the script gave no reply"),
            ),
        }
    }

    pub fn get(path: impl Into<String>) -> Self {
        Step::new(Method::GET, path)
    }

    /// A metadata-only GET (`Api::get_metadata_opt`).
    pub fn get_metadata(path: impl Into<String>) -> Self {
        let mut s = Step::new(Method::GET, path);
        s.accept_contains = Some("as=PartialObjectMetadata");
        s
    }

    pub fn list(path: impl Into<String>, label_selector: &str) -> Self {
        Step::new(Method::GET, path).query("labelSelector", label_selector)
    }

    pub fn merge_patch(path: impl Into<String>) -> Self {
        let mut s = Step::new(Method::PATCH, path);
        s.content_type = Some(MERGE_PATCH);
        s
    }

    /// A forced server-side apply under `field_manager`.
    pub fn apply(path: impl Into<String>, field_manager: &str) -> Self {
        let mut s = Step::new(Method::PATCH, path)
            .query("fieldManager", field_manager)
            .query("force", "true");
        s.content_type = Some(APPLY_PATCH);
        s
    }

    pub fn query(mut self, key: &str, value: &str) -> Self {
        self.query.push((key.into(), value.into()));
        self
    }

    pub fn check(mut self, f: impl FnOnce(&Value) -> Result<(), String> + Send + 'static) -> Self {
        self.check = Some(Box::new(f));
        self
    }

    pub fn reply(mut self, code: u16, body: Value) -> Self {
        self.reply = Reply::Json(code, body);
        self
    }

    pub fn not_found(self) -> Self {
        let what = self.path.rsplit('/').next().unwrap_or_default().to_string();
        self.reply(
            404,
            status_body(404, "NotFound", &format!("{what:?} not found")),
        )
    }

    pub fn fail(self, code: u16, message: &str) -> Self {
        self.reply(code, status_body(code, "InternalError", message))
    }

    pub fn reply_with(mut self, f: impl FnOnce(&Value) -> (u16, Value) + Send + 'static) -> Self {
        self.reply = Reply::With(Box::new(f));
        self
    }

    fn describe(&self) -> String {
        let q: Vec<String> = self.query.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("{} {}?{}", self.method, self.path, q.join("&"))
    }

    /// Why `seen` is not this step's request, if it is not.
    fn mismatch(
        &self,
        seen: &Seen,
        content_type: Option<&str>,
        accept: Option<&str>,
    ) -> Option<String> {
        if seen.method != self.method || seen.path != self.path {
            return Some("method or path differ".into());
        }
        for (k, v) in &self.query {
            if !seen.query.iter().any(|(sk, sv)| sk == k && sv == v) {
                return Some(format!("query lacks {k}={v}"));
            }
        }
        if let Some(ct) = self.content_type {
            if content_type != Some(ct) {
                return Some(format!("content type {content_type:?}, expected {ct}"));
            }
        }
        if let Some(a) = self.accept_contains {
            if !accept.is_some_and(|h| h.contains(a)) {
                return Some(format!("Accept {accept:?} lacks {a}"));
            }
        }
        None
    }
}

/// One request as it reached the scripted API.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub body: Value,
    /// The probe's output when the request arrived.
    pub probe: Vec<String>,
}

impl Seen {
    pub fn is_write(&self) -> bool {
        self.method != Method::GET
    }
}

impl std::fmt::Display for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let q: Vec<String> = self.query.iter().map(|(k, v)| format!("{k}={v}")).collect();
        write!(f, "{} {}?{}", self.method, self.path, q.join("&"))
    }
}

/// Everything the scripted API saw, in order.
#[derive(Debug, Default)]
pub struct Transcript {
    /// Every request but Events.
    pub requests: Vec<Seen>,
    /// The Events' bodies (events.k8s.io/v1 Event).
    pub events: Vec<Value>,
}

impl Transcript {
    pub fn writes(&self) -> Vec<&Seen> {
        self.requests.iter().filter(|s| s.is_write()).collect()
    }

    pub fn event_reasons(&self) -> Vec<String> {
        self.events
            .iter()
            .map(|e| e["reason"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// The request to `path` with `method`; panics naming what was seen when there is none.
    pub fn find(&self, method: Method, path: &str) -> &Seen {
        self.requests
            .iter()
            .find(|s| s.method == method && s.path == path)
            .unwrap_or_else(|| panic!("no {method} {path} among {:#?}", self.lines()))
    }

    pub fn lines(&self) -> Vec<String> {
        self.requests.iter().map(Seen::to_string).collect()
    }
}

pub struct ScriptedApi {
    task: JoinHandle<Result<Transcript, String>>,
}

impl ScriptedApi {
    /// A client whose requests are answered by `steps`, in order.
    pub fn start(steps: Vec<Step>, probe: Option<Probe>) -> (kube::Client, ScriptedApi) {
        let (mock, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(mock, "default");
        let task = tokio::spawn(verify(handle, steps, probe));
        (client, ScriptedApi { task })
    }

    /// Waits (bounded) until every client is dropped, then returns the transcript, or fails the
    /// test with every request that broke the script and every step that never came.
    pub async fn finish(self) -> Transcript {
        match tokio::time::timeout(Duration::from_secs(10), self.task).await {
            Err(_) => panic!(
                "scripted API: still serving 10 s after the reconcile returned; drop every \
                 kube::Client (the Context) before calling finish"
            ),
            Ok(Err(e)) => panic!("scripted API verifier task failed: {e}"),
            Ok(Ok(Err(failures))) => {
                panic!("scripted API: the reconcile broke the script:\n{failures}")
            }
            Ok(Ok(Ok(t))) => t,
        }
    }
}

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

async fn verify(
    mut handle: Handle,
    steps: Vec<Step>,
    probe: Option<Probe>,
) -> Result<Transcript, String> {
    let mut steps = steps.into_iter();
    let mut transcript = Transcript::default();
    let mut failures: Vec<String> = Vec::new();
    while let Some((request, respond)) = handle.next_request().await {
        let (parts, body) = request.into_parts();
        let bytes = body
            .collect_bytes()
            .await
            .map_err(|e| format!("reading a request body: {e}"))?;
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).map_err(|e| {
                format!(
                    "request body of {} {} is not JSON: {e}",
                    parts.method, parts.uri
                )
            })?
        };
        let header = |name: http::header::HeaderName| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let seen = Seen {
            method: parts.method.clone(),
            path: parts.uri.path().to_string(),
            query: parse_query(parts.uri.query().unwrap_or_default()),
            body,
            probe: match &probe {
                Some(p) => p().await,
                None => vec![],
            },
        };
        if is_event(&seen) {
            // The Recorder posts an Event, or patches its series when it repeats: echo it.
            let code = if seen.method == Method::POST {
                201
            } else {
                200
            };
            respond.send_response(json_response(code, &seen.body));
            transcript.events.push(seen.body);
            continue;
        }
        let reply = if !failures.is_empty() {
            failures.push(format!("after that: {seen}"));
            None
        } else {
            match steps.next() {
                None => {
                    failures.push(format!("unexpected request {seen}: the script had ended"));
                    None
                }
                Some(step) => {
                    let ct = header(http::header::CONTENT_TYPE);
                    let accept = header(http::header::ACCEPT);
                    if let Some(why) = step.mismatch(&seen, ct.as_deref(), accept.as_deref()) {
                        failures.push(format!(
                            "unexpected request {seen} ({why}); the script expected {}",
                            step.describe()
                        ));
                        None
                    } else if let Some(Err(why)) = step.check.map(|c| c(&seen.body)) {
                        failures.push(format!(
                            "{seen}: body check failed: {why}\nbody: {:#}",
                            seen.body
                        ));
                        None
                    } else {
                        Some(match step.reply {
                            Reply::Json(code, v) => (code, v),
                            Reply::With(f) => f(&seen.body),
                        })
                    }
                }
            }
        };
        let (code, v) = reply.unwrap_or_else(|| {
            (
                500,
                status_body(
                    500,
                    "InternalError",
                    &format!("scripted API: unexpected request {seen}"),
                ),
            )
        });
        respond.send_response(json_response(code, &v));
        transcript.requests.push(seen);
    }
    let never: Vec<String> = steps.map(|s| s.describe()).collect();
    if !never.is_empty() {
        failures.push(format!("expected requests that never came: {never:#?}"));
    }
    if failures.is_empty() {
        Ok(transcript)
    } else {
        failures.push(format!("all requests seen: {:#?}", transcript.lines()));
        Err(failures.join("\n"))
    }
}

fn is_event(seen: &Seen) -> bool {
    seen.path.starts_with("/apis/events.k8s.io/v1/namespaces/")
        && (seen.method == Method::POST || seen.method == Method::PATCH)
}

fn json_response(code: u16, body: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            serde_json::to_vec(body).expect("JSON serializes"),
        ))
        .expect("a valid response")
}

/// A `meta/v1` Status, as the API server answers errors.
pub fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

/// `metadata` as a `PartialObjectMetadata` answer.
pub fn partial_metadata(metadata: &Value) -> Value {
    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": metadata})
}

fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
