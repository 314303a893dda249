//! The seed's sample web application (jam2in/arcus-application-sample) on the Rust ARCUS client.
//!
//! `GET /` looks up `kubernetes:arcus`: absent, it stores `hello arcus!` for 10 seconds and
//! answers the page with `hello spring!`; present, the page shows the cached `hello arcus!`.
//! `GET /healthz` is 200 once the client has at least one cache node; `GET /ring` lists the
//! client's current nodes as JSON.
//!
//! Environment: `ARCUS_ADDRESS` (ZooKeeper, `host:port,...`), `ARCUS_SERVICE_CODE`,
//! `PORT` (default 8080: the seed's Service sends its port 8080 to the pod's 8080, having no
//! `targetPort`), `BIND_ADDRESS` (default 0.0.0.0).

mod http;

use arcus_client::{ArcusClient, ClientOptions, DiscoveryState};
use http::{Request, Response};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::OnceCell;
use tracing::{debug, error, info, warn};

const KEY: &str = "kubernetes:arcus";
const CACHED_VALUE: &str = "hello arcus!";
const FALLBACK_VALUE: &str = "hello spring!";
const TTL_SECS: i64 = 10;
/// How long in-flight requests may finish after SIGTERM.
const DRAIN: Duration = Duration::from_secs(10);
/// The seed's Service `port: 8080` without a `targetPort` reaches the pod on 8080.
const DEFAULT_PORT: u16 = 8080;
const DEFAULT_BIND: &str = "0.0.0.0";

struct Config {
    zk: String,
    service_code: String,
    bind: String,
    port: u16,
}

impl Config {
    fn from_env() -> anyhow::Result<Config> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// From `var` (the environment); unset and blank variables are the same.
    fn from_vars(var: impl Fn(&str) -> Option<String>) -> anyhow::Result<Config> {
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let zk = var("ARCUS_ADDRESS")
            .ok_or_else(|| anyhow::anyhow!("ARCUS_ADDRESS (ZooKeeper host:port,...) is not set"))?;
        let service_code = var("ARCUS_SERVICE_CODE")
            .ok_or_else(|| anyhow::anyhow!("ARCUS_SERVICE_CODE is not set"))?;
        let port = match var("PORT") {
            Some(p) => p
                .trim()
                .parse()
                .map_err(|_| anyhow::anyhow!("PORT={p:?} is not a port number"))?,
            None => DEFAULT_PORT,
        };
        let bind = var("BIND_ADDRESS").unwrap_or_else(|| DEFAULT_BIND.to_string());
        Ok(Config {
            zk: zk.trim().to_string(),
            service_code: service_code.trim().to_string(),
            bind,
            port,
        })
    }
}

struct App {
    zk: String,
    service_code: String,
    client: OnceCell<ArcusClient>,
}

/// The seed's page, byte for byte, with `message` in the `<h1>`.
fn page(message: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html>\n<head>\n    <meta charset=\"UTF-8\">\n    <title>ARCUS TEST</title>\n</head>\n<body>\n    <h1>{}</h1>\n</body>\n</html>\n",
        http::html_escape(message)
    )
}

impl App {
    /// Connects the ARCUS client, retrying until ZooKeeper and the service code are there (the
    /// app may start before its cache cluster).
    async fn connect(self: Arc<Self>) {
        let mut delay = Duration::from_millis(500);
        loop {
            match ArcusClient::connect(&self.zk, &self.service_code, ClientOptions::default()).await
            {
                Ok(client) => {
                    info!(nodes = ?client.nodes(), "ARCUS client connected to {} service code {}", self.zk, self.service_code);
                    let _ = self.client.set(client);
                    return;
                }
                Err(e) => {
                    warn!("ARCUS client not connected: {e}; retrying in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    async fn handle(&self, req: &Request) -> Response {
        match req.path.as_str() {
            "/" => self.index().await,
            "/healthz" => self.healthz(),
            "/ring" => self.ring(),
            _ => Response::text(404, "not found\n"),
        }
    }

    /// Cache-aside: a cache error is logged and treated as a miss, so the page still answers.
    async fn index(&self) -> Response {
        let Some(client) = self.client.get() else {
            return Response::text(503, "ARCUS client not connected yet\n");
        };
        let (message, cache) = match client.get(KEY).await {
            Ok(Some(item)) => (String::from_utf8_lossy(&item.value).into_owned(), "hit"),
            Ok(None) => match client.set(KEY, CACHED_VALUE, 0, TTL_SECS).await {
                Ok(_) => (FALLBACK_VALUE.to_string(), "miss"),
                Err(e) => {
                    warn!("storing {KEY}: {e}");
                    (FALLBACK_VALUE.to_string(), "error")
                }
            },
            Err(e) => {
                warn!("reading {KEY}: {e}");
                (FALLBACK_VALUE.to_string(), "error")
            }
        };
        Response::new(200, "text/html;charset=UTF-8", page(&message)).header("X-Arcus-Cache", cache)
    }

    fn healthz(&self) -> Response {
        match self.client.get() {
            None => Response::text(503, "ARCUS client not connected\n"),
            Some(c) if c.ring().is_empty() => Response::text(
                503,
                format!("no cache node in service code {}\n", self.service_code),
            ),
            Some(c) => Response::text(200, format!("ok: {} cache nodes\n", c.ring().len())),
        }
    }

    fn ring(&self) -> Response {
        let (state, nodes) = match self.client.get() {
            None => ("connecting", Vec::new()),
            Some(c) => {
                let state = match c.discovery_state() {
                    DiscoveryState::Watching => "watching",
                    DiscoveryState::Disconnected => "disconnected",
                    DiscoveryState::Reconnecting => "reconnecting",
                    DiscoveryState::Static => "static",
                };
                (state, c.nodes())
            }
        };
        let nodes: Vec<String> = nodes.iter().map(|n| http::json_string(n)).collect();
        let body = format!(
            "{{\"service_code\":{},\"zookeeper\":{},\"state\":{},\"nodes\":[{}]}}\n",
            http::json_string(&self.service_code),
            http::json_string(&self.zk),
            http::json_string(state),
            nodes.join(",")
        );
        Response::new(200, "application/json", body)
    }
}

async fn serve_connection(app: Arc<App>, mut sock: TcpStream) {
    let started = std::time::Instant::now();
    let (resp, head_only) = match http::read_request(&mut sock).await {
        Err(resp) => (resp, false),
        Ok(req) if req.method == "GET" || req.method == "HEAD" => {
            let resp = app.handle(&req).await;
            let took = started.elapsed();
            debug!(
                method = req.method,
                path = req.path,
                status = resp.status,
                ?took,
                "request"
            );
            (resp, req.method == "HEAD")
        }
        Ok(_) => (
            Response::text(405, "GET or HEAD only\n").header("Allow", "GET, HEAD"),
            false,
        ),
    };
    if let Err(e) = http::write_response(&mut sock, &resp, head_only).await {
        warn!("writing response: {e}");
    }
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cfg = Config::from_env()?;
    let listener = TcpListener::bind((cfg.bind.as_str(), cfg.port))
        .await
        .map_err(|e| anyhow::anyhow!("listening on {}:{}: {e}", cfg.bind, cfg.port))?;
    info!("arcus-sample listening on {}", listener.local_addr()?);
    let app = Arc::new(App {
        zk: cfg.zk,
        service_code: cfg.service_code,
        client: OnceCell::new(),
    });
    let connecting = tokio::spawn(app.clone().connect());

    let mut conns = tokio::task::JoinSet::new();
    let signal = shutdown_signal();
    tokio::pin!(signal);
    let why = loop {
        tokio::select! {
            why = &mut signal => break why,
            accepted = listener.accept() => match accepted {
                Ok((sock, _)) => {
                    conns.spawn(serve_connection(app.clone(), sock));
                }
                Err(e) => {
                    error!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    };
    info!(
        "{why}: no new connections; finishing {} in flight",
        conns.len()
    );
    drop(listener);
    connecting.abort();
    if tokio::time::timeout(DRAIN, async { while conns.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        warn!(
            "{} connections still open after {DRAIN:?}; closing them",
            conns.len()
        );
    }
    info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> anyhow::Result<Config> {
        Config::from_vars(|name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
        })
    }

    #[test]
    fn listens_on_all_addresses_port_8080_by_default() {
        let cfg = config(&[
            ("ARCUS_ADDRESS", "10.244.0.1:2181"),
            ("ARCUS_SERVICE_CODE", "test"),
        ])
        .unwrap();
        assert_eq!((cfg.bind.as_str(), cfg.port), ("0.0.0.0", 8080));
        assert_eq!(
            (cfg.zk.as_str(), cfg.service_code.as_str()),
            ("10.244.0.1:2181", "test")
        );
    }

    #[test]
    fn bind_address_and_port_override_the_defaults() {
        let cfg = config(&[
            ("ARCUS_ADDRESS", "zk:2181"),
            ("ARCUS_SERVICE_CODE", "test"),
            ("BIND_ADDRESS", "127.0.0.1"),
            ("PORT", "9000"),
        ])
        .unwrap();
        assert_eq!((cfg.bind.as_str(), cfg.port), ("127.0.0.1", 9000));
        let blank = config(&[
            ("ARCUS_ADDRESS", "zk:2181"),
            ("ARCUS_SERVICE_CODE", "test"),
            ("BIND_ADDRESS", " "),
        ])
        .unwrap();
        assert_eq!(blank.bind, "0.0.0.0");
    }

    #[test]
    fn missing_or_bad_settings_say_which() {
        let e = config(&[("ARCUS_SERVICE_CODE", "test")]).err().unwrap();
        assert!(e.to_string().contains("ARCUS_ADDRESS"), "{e}");
        let e = config(&[("ARCUS_ADDRESS", "zk:2181")]).err().unwrap();
        assert!(e.to_string().contains("ARCUS_SERVICE_CODE"), "{e}");
        let e = config(&[
            ("ARCUS_ADDRESS", "zk:2181"),
            ("ARCUS_SERVICE_CODE", "test"),
            ("PORT", "http"),
        ])
        .err()
        .unwrap();
        assert!(e.to_string().contains("PORT=\"http\""), "{e}");
    }

    /// deploy/samples/application.yaml: the seed's Service (port 8080, no targetPort) reaches
    /// the app's default port.
    #[test]
    fn the_sample_manifest_reaches_the_default_port() {
        let yaml = include_str!("../../../deploy/samples/application.yaml");
        let service = yaml
            .split("\n---\n")
            .find(|doc| doc.contains("kind: Service"))
            .expect("a Service in application.yaml");
        assert!(
            service.contains(&format!("port: {DEFAULT_PORT}")),
            "{service}"
        );
        assert!(!service.contains("targetPort"), "{service}");
    }
}
