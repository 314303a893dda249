//! A pod's kubeconfig: a token of its ServiceAccount (from the TokenRequest API), the API server, and the TLS settings the agent's own admin kubeconfig uses.
//! Tokens are written only to the 0600 kubeconfig file: never logged.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::PostParams;
use kube::config::Kubeconfig;
use kube::{Api, Client};

/// How the agent's clients verify the API server, copied into pod kubeconfigs.
#[derive(Debug, Clone, Default)]
pub struct ServerTls {
    pub ca_data: Option<String>,
    pub insecure: bool,
}

impl ServerTls {
    /// From the admin kubeconfig's current cluster: CA data, a CA file (inlined), or insecure.
    pub fn from_kubeconfig(kc: &Kubeconfig) -> Self {
        let ctx_name = kc.current_context.clone().unwrap_or_default();
        let cluster_name = kc
            .contexts
            .iter()
            .find(|c| c.name == ctx_name)
            .and_then(|c| c.context.as_ref())
            .map(|c| c.cluster.clone());
        let cluster = kc
            .clusters
            .iter()
            .find(|c| Some(&c.name) == cluster_name.as_ref())
            .or(kc.clusters.first())
            .and_then(|c| c.cluster.as_ref());
        let Some(cluster) = cluster else {
            return Self {
                ca_data: None,
                insecure: true,
            };
        };
        let ca_data = cluster.certificate_authority_data.clone().or_else(|| {
            let file = cluster.certificate_authority.as_ref()?;
            let pem = std::fs::read(file).ok()?;
            Some(base64::engine::general_purpose::STANDARD.encode(pem))
        });
        let insecure = cluster.insecure_skip_tls_verify.unwrap_or(false) || ca_data.is_none();
        Self {
            ca_data: if insecure { None } else { ca_data },
            insecure,
        }
    }
}

pub fn service_account_name(pod: &k8s_openapi::api::core::v1::Pod) -> String {
    pod.spec
        .as_ref()
        .and_then(|s| {
            s.service_account_name
                .clone()
                .or_else(|| s.service_account.clone())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "default".to_string())
}

/// How long a pod's token is valid. A kubelet refreshes its projected tokens; the pod's
/// kubeconfig file is written once, so the token must outlive any sandbox run.
const TOKEN_EXPIRATION_SECS: i64 = 30 * 24 * 3600;

/// A token for ServiceAccount `sa` in `ns` from the TokenRequest API (as kubelet gets them:
/// Kubernetes no longer creates token Secrets), retried for up to `wait` while the
/// ServiceAccount does not exist yet.
pub async fn find_token(
    client: &Client,
    ns: &str,
    sa: &str,
    wait: Duration,
) -> Result<String, String> {
    let api = Api::<ServiceAccount>::namespaced(client.clone(), ns);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(TOKEN_EXPIRATION_SECS),
            ..Default::default()
        },
        ..Default::default()
    };
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let last_error = match api
            .create_token_request(sa, &PostParams::default(), &request)
            .await
        {
            Ok(tr) => match tr.status.map(|s| s.token).filter(|t| !t.is_empty()) {
                Some(token) => return Ok(token),
                None => "the TokenRequest returned no token".to_string(),
            },
            Err(e) => {
                tracing::debug!(%ns, %sa, error = %e, "requesting a service account token");
                e.to_string()
            }
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "no token for ServiceAccount {ns}/{sa} after {}s ({last_error}); does the ServiceAccount exist?",
                wait.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The kubeconfig document (JSON, which is valid YAML) for a pod.
pub fn kubeconfig_json(
    server: &str,
    tls: &ServerTls,
    ns: &str,
    sa: &str,
    token: &str,
) -> serde_json::Value {
    let mut cluster = serde_json::json!({ "server": server });
    if tls.insecure {
        cluster["insecure-skip-tls-verify"] = true.into();
    } else if let Some(ca) = &tls.ca_data {
        cluster["certificate-authority-data"] = ca.clone().into();
    }
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{ "name": "sandbox", "cluster": cluster }],
        "users": [{ "name": format!("system:serviceaccount:{ns}:{sa}"), "user": { "token": token } }],
        "contexts": [{
            "name": "sandbox",
            "context": { "cluster": "sandbox", "user": format!("system:serviceaccount:{ns}:{sa}"), "namespace": ns }
        }],
        "current-context": "sandbox",
    })
}

pub fn write_kubeconfig(path: &Path, doc: &serde_json::Value) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(doc)?)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(tmp, path)
}

/// Writes a 0600 file atomically (the token for images' serviceaccount dir).
pub fn write_secret_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubeconfig_parses_with_kube_and_uses_namespace() {
        let tls = ServerTls {
            ca_data: None,
            insecure: true,
        };
        let doc = kubeconfig_json("https://127.0.0.1:6443", &tls, "ns1", "op", "tok");
        let kc = Kubeconfig::from_yaml(&serde_json::to_string(&doc).unwrap()).unwrap();
        assert_eq!(kc.current_context.as_deref(), Some("sandbox"));
        let ctx = kc.contexts[0].context.as_ref().unwrap();
        assert_eq!(ctx.namespace.as_deref(), Some("ns1"));
        let cluster = kc.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.insecure_skip_tls_verify, Some(true));
        assert_eq!(cluster.server.as_deref(), Some("https://127.0.0.1:6443"));
    }

    #[test]
    fn tls_copied_from_admin_kubeconfig() {
        let kc = Kubeconfig::from_yaml(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://x\n    certificate-authority-data: QUJD\ncontexts:\n- name: a\n  context:\n    cluster: c\n    user: u\ncurrent-context: a\nusers:\n- name: u\n  user:\n    token: t\n",
        )
        .unwrap();
        let tls = ServerTls::from_kubeconfig(&kc);
        assert!(!tls.insecure);
        assert_eq!(tls.ca_data.as_deref(), Some("QUJD"));
    }
}
