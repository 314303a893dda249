//! A container's environment: `env`, `envFrom`, `valueFrom` (fieldRef, resourceFieldRef,
//! configMapKeyRef, secretKeyRef) and Kubernetes `$(VAR)` expansion. Pure: the referenced
//! ConfigMaps and Secrets are fetched beforehand (see [`referenced_objects`]).

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Container, Pod};

/// Data of the ConfigMaps and Secrets a container refers to; `None` = the object does not exist.
#[derive(Debug, Default, Clone)]
pub struct ObjectData {
    pub config_maps: BTreeMap<String, Option<BTreeMap<String, String>>>,
    pub secrets: BTreeMap<String, Option<BTreeMap<String, String>>>,
}

/// Facts about the pod that are not in its spec (or not yet in its status).
pub struct PodFacts<'a> {
    pub pod: &'a Pod,
    pub pod_ip: &'a str,
    pub host_ip: &'a str,
    pub node_name: &'a str,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvError {
    #[error("configmap {0:?} not found")]
    ConfigMapNotFound(String),
    #[error("couldn't find key {key} in ConfigMap {ns}/{name}")]
    ConfigMapKeyNotFound {
        ns: String,
        name: String,
        key: String,
    },
    #[error("secret {0:?} not found")]
    SecretNotFound(String),
    #[error("couldn't find key {key} in Secret {ns}/{name}")]
    SecretKeyNotFound {
        ns: String,
        name: String,
        key: String,
    },
    #[error("unsupported fieldPath {0:?}")]
    UnsupportedFieldPath(String),
    #[error("unsupported resource {0:?} in resourceFieldRef")]
    UnsupportedResource(String),
}

/// ConfigMap and Secret names a container's env refers to.
pub fn referenced_objects(c: &Container) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut cms = BTreeSet::new();
    let mut secrets = BTreeSet::new();
    for from in c.env_from.iter().flatten() {
        if let Some(r) = &from.config_map_ref {
            cms.insert(r.name.clone());
        }
        if let Some(r) = &from.secret_ref {
            secrets.insert(r.name.clone());
        }
    }
    for var in c.env.iter().flatten() {
        if let Some(vf) = &var.value_from {
            if let Some(r) = &vf.config_map_key_ref {
                cms.insert(r.name.clone());
            }
            if let Some(r) = &vf.secret_key_ref {
                secrets.insert(r.name.clone());
            }
        }
    }
    (cms, secrets)
}

/// Kubernetes' `$(VAR)` expansion (third_party/forked/golang/expansion): `$(NAME)` becomes the
/// value when `lookup` knows NAME and stays as is otherwise; `$$` becomes `$`.
pub fn expand(input: &str, lookup: &dyn Fn(&str) -> Option<String>) -> String {
    let bytes = input.as_bytes();
    let mut out = String::with_capacity(input.len());
    let mut checkpoint = 0;
    let mut cursor = 0;
    while cursor < bytes.len() {
        if bytes[cursor] == b'$' && cursor + 1 < bytes.len() {
            out.push_str(&input[checkpoint..cursor]);
            let rest = &input[cursor + 1..];
            let advance = match rest.as_bytes()[0] {
                b'$' => {
                    out.push('$');
                    1
                }
                b'(' => match rest[1..].find(')') {
                    Some(close) => {
                        let name = &rest[1..1 + close];
                        match lookup(name) {
                            Some(v) => out.push_str(&v),
                            None => {
                                out.push_str("$(");
                                out.push_str(name);
                                out.push(')');
                            }
                        }
                        close + 2
                    }
                    None => {
                        out.push_str("$(");
                        1
                    }
                },
                _ => {
                    // "$" followed by any other character: both are kept.
                    let ch = rest.chars().next().unwrap_or_default();
                    out.push('$');
                    out.push(ch);
                    ch.len_utf8()
                }
            };
            cursor += advance;
            checkpoint = cursor + 1;
        }
        cursor += 1;
    }
    if checkpoint < input.len() {
        out.push_str(&input[checkpoint..]);
    }
    out
}

fn is_env_name(name: &str) -> bool {
    !name.is_empty()
        && !name.chars().next().is_some_and(|c| c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
}

/// The value of a downward-API field path.
pub fn field_value(path: &str, f: &PodFacts<'_>) -> Result<String, EnvError> {
    let meta = &f.pod.metadata;
    let spec = f.pod.spec.as_ref();
    let keyed = |prefix: &str, map: Option<&BTreeMap<String, String>>| -> Option<String> {
        let key = path.strip_prefix(prefix)?.strip_suffix("']")?;
        Some(map.and_then(|m| m.get(key)).cloned().unwrap_or_default())
    };
    if let Some(v) = keyed("metadata.labels['", meta.labels.as_ref()) {
        return Ok(v);
    }
    if let Some(v) = keyed("metadata.annotations['", meta.annotations.as_ref()) {
        return Ok(v);
    }
    Ok(match path {
        "metadata.name" => meta.name.clone().unwrap_or_default(),
        "metadata.namespace" => meta.namespace.clone().unwrap_or_default(),
        "metadata.uid" => meta.uid.clone().unwrap_or_default(),
        "spec.nodeName" => spec
            .and_then(|s| s.node_name.clone())
            .unwrap_or_else(|| f.node_name.to_string()),
        "spec.serviceAccountName" => spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".to_string()),
        "status.podIP" | "status.podIPs" => f.pod_ip.to_string(),
        "status.hostIP" | "status.hostIPs" => f.host_ip.to_string(),
        _ => return Err(EnvError::UnsupportedFieldPath(path.to_string())),
    })
}

/// Parses a Kubernetes quantity into a float of base units (cores or bytes).
pub fn parse_quantity(q: &str) -> Option<f64> {
    let q = q.trim();
    let suffixes: [(&str, f64); 12] = [
        ("Ki", 1024.0),
        ("Mi", 1024f64.powi(2)),
        ("Gi", 1024f64.powi(3)),
        ("Ti", 1024f64.powi(4)),
        ("Pi", 1024f64.powi(5)),
        ("Ei", 1024f64.powi(6)),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
    ];
    for (s, mul) in suffixes {
        if let Some(n) = q.strip_suffix(s) {
            return n.parse::<f64>().ok().map(|n| n * mul);
        }
    }
    q.parse::<f64>().ok()
}

/// Node capacity used when a container has no limit (matches the Node the agent registers).
pub const NODE_CPU: &str = "2";
pub const NODE_MEMORY: &str = "24Gi";

fn resource_value(
    c: &Container,
    resource: &str,
    divisor: Option<&str>,
) -> Result<String, EnvError> {
    let res = c.resources.as_ref();
    let (kind, name) = resource
        .split_once('.')
        .ok_or_else(|| EnvError::UnsupportedResource(resource.to_string()))?;
    let map = match kind {
        "limits" => res.and_then(|r| r.limits.as_ref()),
        "requests" => res.and_then(|r| r.requests.as_ref()),
        _ => return Err(EnvError::UnsupportedResource(resource.to_string())),
    };
    let given = map.and_then(|m| m.get(name)).map(|q| q.0.clone());
    let fallback = match (kind, name) {
        ("limits", "cpu") => NODE_CPU,
        ("limits", "memory") => NODE_MEMORY,
        (_, "cpu" | "memory" | "ephemeral-storage") => "0",
        _ => return Err(EnvError::UnsupportedResource(resource.to_string())),
    };
    let value = parse_quantity(given.as_deref().unwrap_or(fallback)).unwrap_or(0.0);
    let div = divisor
        .and_then(parse_quantity)
        .filter(|d| *d > 0.0)
        .unwrap_or(1.0);
    // Kubernetes rounds up (cpu: at least 1 for a non-zero request).
    Ok(format!("{}", (value / div).ceil() as i64))
}

/// The container's environment in Kubernetes order and precedence (envFrom, then env).
/// Returns the final variables as a map (keys unique, as in kubelet).
pub fn resolve_env(
    c: &Container,
    f: &PodFacts<'_>,
    data: &ObjectData,
) -> Result<BTreeMap<String, String>, EnvError> {
    let ns = f.pod.metadata.namespace.clone().unwrap_or_default();
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        let (found, optional, not_found) = if let Some(r) = &from.config_map_ref {
            (
                data.config_maps.get(&r.name).cloned().flatten(),
                r.optional.unwrap_or(false),
                EnvError::ConfigMapNotFound(r.name.clone()),
            )
        } else if let Some(r) = &from.secret_ref {
            (
                data.secrets.get(&r.name).cloned().flatten(),
                r.optional.unwrap_or(false),
                EnvError::SecretNotFound(r.name.clone()),
            )
        } else {
            continue;
        };
        match found {
            Some(map) => {
                for (k, v) in map {
                    let key = format!("{prefix}{k}");
                    if is_env_name(&key) {
                        env.insert(key, v);
                    }
                }
            }
            None if optional => {}
            None => return Err(not_found),
        }
    }
    for var in c.env.iter().flatten() {
        let value = var.value.clone().unwrap_or_default();
        let value = if !value.is_empty() {
            let snapshot = env.clone();
            expand(&value, &|n| snapshot.get(n).cloned())
        } else if let Some(vf) = &var.value_from {
            if let Some(r) = &vf.field_ref {
                field_value(&r.field_path, f)?
            } else if let Some(r) = &vf.resource_field_ref {
                resource_value(c, &r.resource, r.divisor.as_ref().map(|d| d.0.as_str()))?
            } else if let Some(r) = &vf.config_map_key_ref {
                match data.config_maps.get(&r.name).cloned().flatten() {
                    Some(m) => match m.get(&r.key) {
                        Some(v) => v.clone(),
                        None if r.optional.unwrap_or(false) => continue,
                        None => {
                            return Err(EnvError::ConfigMapKeyNotFound {
                                ns: ns.clone(),
                                name: r.name.clone(),
                                key: r.key.clone(),
                            })
                        }
                    },
                    None if r.optional.unwrap_or(false) => continue,
                    None => return Err(EnvError::ConfigMapNotFound(r.name.clone())),
                }
            } else if let Some(r) = &vf.secret_key_ref {
                match data.secrets.get(&r.name).cloned().flatten() {
                    Some(m) => match m.get(&r.key) {
                        Some(v) => v.clone(),
                        None if r.optional.unwrap_or(false) => continue,
                        None => {
                            return Err(EnvError::SecretKeyNotFound {
                                ns: ns.clone(),
                                name: r.name.clone(),
                                key: r.key.clone(),
                            })
                        }
                    },
                    None if r.optional.unwrap_or(false) => continue,
                    None => return Err(EnvError::SecretNotFound(r.name.clone())),
                }
            } else {
                String::new()
            }
        } else {
            String::new()
        };
        env.insert(var.name.clone(), value);
    }
    Ok(env)
}

/// `$(VAR)`-expands command or args with the container's final environment.
pub fn expand_all(items: &[String], env: &BTreeMap<String, String>) -> Vec<String> {
    items
        .iter()
        .map(|s| expand(s, &|n| env.get(n).cloned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ConfigMapEnvSource, ConfigMapKeySelector, EnvFromSource, EnvVar, EnvVarSource,
        ObjectFieldSelector, PodSpec, SecretKeySelector,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn lookup(n: &str) -> Option<String> {
        match n {
            "A" => Some("a".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expansion_follows_kubernetes_rules() {
        assert_eq!(expand("$(A)", &lookup), "a");
        assert_eq!(expand("x$(A)y$(A)", &lookup), "xaya");
        assert_eq!(expand("$(B)", &lookup), "$(B)");
        assert_eq!(expand("$$(A)", &lookup), "$(A)");
        assert_eq!(expand("$$$(A)", &lookup), "$a");
        assert_eq!(expand("$A", &lookup), "$A");
        assert_eq!(expand("$", &lookup), "$");
        assert_eq!(expand("a$", &lookup), "a$");
        assert_eq!(expand("$(A", &lookup), "$(A");
        assert_eq!(expand("$(EMPTY)x", &lookup), "x");
        assert_eq!(expand("$()", &lookup), "$()");
        assert_eq!(expand("héllo $(A) wörld", &lookup), "héllo a wörld");
        assert_eq!(expand("$é", &lookup), "$é");
        assert_eq!(expand("", &lookup), "");
    }

    fn pod() -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                namespace: Some("ns".into()),
                uid: Some("u-1".into()),
                labels: Some([("app".to_string(), "x".to_string())].into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                node_name: Some("sandbox-a".into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn var(name: &str, value: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: Some(value.into()),
            value_from: None,
        }
    }

    fn field(name: &str, path: &str) -> EnvVar {
        EnvVar {
            name: name.into(),
            value: None,
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: path.into(),
                    api_version: None,
                }),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn resolves_fields_refs_and_expansion_in_order() {
        let pod = pod();
        let facts = PodFacts {
            pod: &pod,
            pod_ip: "10.244.1.9",
            host_ip: "10.244.0.11",
            node_name: "sandbox-a",
        };
        let c = Container {
            name: "c".into(),
            env_from: Some(vec![EnvFromSource {
                config_map_ref: Some(ConfigMapEnvSource {
                    name: "cm".into(),
                    optional: None,
                }),
                prefix: Some("CM_".into()),
                secret_ref: None,
            }]),
            env: Some(vec![
                field("IP", "status.podIP"),
                field("NAME", "metadata.name"),
                field("NS", "metadata.namespace"),
                field("APP", "metadata.labels['app']"),
                var("ADDR", "$(IP):11211 $(LATER) $(CM_k)"),
                var("LATER", "l"),
                EnvVar {
                    name: "PW".into(),
                    value: None,
                    value_from: Some(EnvVarSource {
                        secret_key_ref: Some(SecretKeySelector {
                            name: "s".into(),
                            key: "pw".into(),
                            optional: None,
                        }),
                        ..Default::default()
                    }),
                },
                EnvVar {
                    name: "OPT".into(),
                    value: None,
                    value_from: Some(EnvVarSource {
                        config_map_key_ref: Some(ConfigMapKeySelector {
                            name: "missing".into(),
                            key: "k".into(),
                            optional: Some(true),
                        }),
                        ..Default::default()
                    }),
                },
            ]),
            ..Default::default()
        };
        let (cms, secrets) = referenced_objects(&c);
        assert_eq!(cms.into_iter().collect::<Vec<_>>(), vec!["cm", "missing"]);
        assert_eq!(secrets.into_iter().collect::<Vec<_>>(), vec!["s"]);
        let mut data = ObjectData::default();
        data.config_maps.insert(
            "cm".into(),
            Some([("k".to_string(), "v".to_string())].into()),
        );
        data.config_maps.insert("missing".into(), None);
        data.secrets.insert(
            "s".into(),
            Some([("pw".to_string(), "secret".to_string())].into()),
        );
        let env = resolve_env(&c, &facts, &data).unwrap();
        assert_eq!(env["IP"], "10.244.1.9");
        assert_eq!(env["NAME"], "p");
        assert_eq!(env["NS"], "ns");
        assert_eq!(env["APP"], "x");
        assert_eq!(env["CM_k"], "v");
        assert_eq!(env["ADDR"], "10.244.1.9:11211 $(LATER) v");
        assert_eq!(env["PW"], "secret");
        assert!(!env.contains_key("OPT"));
        assert_eq!(
            expand_all(&["--ip=$(IP)".to_string(), "$$(IP)".to_string()], &env),
            vec!["--ip=10.244.1.9", "$(IP)"]
        );

        data.secrets.insert("s".into(), None);
        assert_eq!(
            resolve_env(&c, &facts, &data).unwrap_err(),
            EnvError::SecretNotFound("s".into())
        );
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("500m"), Some(0.5));
        assert_eq!(parse_quantity("64Mi"), Some(64.0 * 1024.0 * 1024.0));
        assert_eq!(parse_quantity("2"), Some(2.0));
        let c = Container::default();
        assert_eq!(
            resource_value(&c, "limits.memory", Some("1Mi")).unwrap(),
            "24576"
        );
        assert_eq!(resource_value(&c, "limits.cpu", None).unwrap(), "2");
    }
}
