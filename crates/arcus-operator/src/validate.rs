//! Validation of an `ArcusMemcached`: what the CRD's schema and CEL rules (`crd::rules`) refuse at
//! the API server, checked again so an object stored under an older or hand-edited CRD is
//! refused here rather than half-applied, plus what they cannot say: label and annotation syntax,
//! image references, IPv4/IPv6 address validity, a DNS name's total length, and that
//! `spec.serviceCode` keeps the code this resource owns in ZooKeeper (`status.serviceCode`).
//!
//! Pure: reads only the resource. Produces a [`ValidSpec`] that the builders consume, so no
//! builder can be handed an unchecked spec. Must not look at the cluster or ZooKeeper (a service
//! code already used elsewhere is the ZooKeeper plan's conflict, not a validation error).

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{
    Affinity, LocalObjectReference, PodSecurityContext, ResourceRequirements, SecurityContext,
    Toleration, TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{Resource, ResourceExt};

use crate::build::{labels, STATEFULSET_SUFFIX};
use crate::crd::{limits, ArcusMemcached, MetricsExporter, PullPolicy};

/// Longest resource name whose objects all get valid names: a StatefulSet's pods carry the label
/// `controller-revision-hash: <statefulset name>-<10-char hash>`, a label value of at most 63
/// characters, so the StatefulSet name `<name>-arcus-mc` may have at most 52.
pub const NAME_MAX_LEN: usize = 63 - 11 - STATEFULSET_SUFFIX.len();

/// An ARCUS service code that passed validation: what the cache nodes register under in
/// `/arcus/cache_list/<code>` and what names the mapping child `/arcus/cache_server_mapping/<addr>/<code>`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceCode(String);

impl ServiceCode {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ServiceCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One member of the ZooKeeper ensemble. `host` is a DNS name, an IPv4 address or a bracketed
/// IPv6 address, as written by the user.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ZkServer {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for ZkServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// An `ArcusMemcached` whose spec passed [`validate`], with its defaults applied and the facts
/// the builders need (namespace, owner reference) resolved.
#[derive(Clone, Debug, PartialEq)]
pub struct ValidSpec {
    /// `metadata.name` of the resource.
    pub name: String,
    pub namespace: String,
    /// Controller owner reference to the resource, put on every built object.
    pub owner: OwnerReference,
    pub generation: Option<i64>,
    pub service_code: ServiceCode,
    pub replicas: i32,
    pub port: u16,
    /// In the user's order, duplicates refused.
    pub zookeeper_servers: Vec<ZkServer>,
    pub memlimit_mb: u32,
    pub connections: u32,
    pub threads: u32,
    pub zk_session_timeout_seconds: Option<u32>,
    pub zk_failstop: bool,
    /// The Secret with the operator's ZooKeeper digest credentials (`spec.zookeeperAuth`).
    pub zookeeper_auth_secret: Option<String>,
    pub image: String,
    pub pull_policy: PullPolicy,
    pub resources: Option<ResourceRequirements>,
    pub node_selector: BTreeMap<String, String>,
    pub affinity: Option<Affinity>,
    pub tolerations: Vec<Toleration>,
    pub pod_annotations: BTreeMap<String, String>,
    pub pod_labels: BTreeMap<String, String>,
    pub termination_grace_period_seconds: i64,
    pub metrics_exporter: Option<MetricsExporter>,
    /// `None`: the operator's defaults (build/statefulset.rs); the same for the next three.
    pub pod_security_context: Option<PodSecurityContext>,
    pub security_context: Option<SecurityContext>,
    pub priority_class_name: Option<String>,
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,
    pub image_pull_secrets: Vec<LocalObjectReference>,
    pub service_account_name: Option<String>,
}

impl ValidSpec {
    /// The `-z` argument: the ensemble joined by `,`.
    pub fn zk_connect_string(&self) -> String {
        self.zookeeper_servers
            .iter()
            .map(ZkServer::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Why a resource's spec cannot be applied. Each message names the field, says what is wrong
/// and what to do; it goes to `status.message` and to an Event.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidSpec {
    #[error(
        "metadata.name {name:?} cannot name a Service: it must be a DNS-1035 label (lower-case letters, digits \
         and '-', starting with a letter, ending with a letter or digit); recreate the resource under such a name"
    )]
    NameNotDns1035 { name: String },

    #[error(
        "metadata.name {name:?} is {len} characters, longer than {max}: the StatefulSet {name}-arcus-mc and \
         its pods' labels would exceed Kubernetes' 63-character limits; recreate the resource with a shorter name"
    )]
    NameTooLong {
        name: String,
        len: usize,
        max: usize,
    },

    #[error("the resource has no metadata.namespace; ArcusMemcached is namespaced: create it in a namespace")]
    NoNamespace,

    #[error(
        "the resource has no metadata.uid, so its objects cannot be owned by it; pass the object as read from the API server"
    )]
    NoUid,

    #[error("{field} is {value}, out of range {min}..={max}: {hint}")]
    OutOfRange {
        field: &'static str,
        value: i64,
        min: i64,
        max: i64,
        hint: &'static str,
    },

    #[error(
        "spec.serviceCode {value:?} is invalid: {why}; use 1 to 128 letters, digits, '_', '.' or '-', \
         starting with a letter or digit"
    )]
    ServiceCodeInvalid { value: String, why: String },

    #[error(
        "spec.serviceCode is immutable: this resource owns service code {owned:?} in ZooKeeper \
         (status.serviceCode) but the spec now asks for {requested:?}; set spec.serviceCode back to {owned:?}, \
         or create a new ArcusMemcached for {requested:?}"
    )]
    ServiceCodeChanged { owned: String, requested: String },

    #[error("spec.zookeeperServers is empty; list your ZooKeeper ensemble as host:port items, e.g. [\"zk-0.zk:2181\"]")]
    NoZookeeperServers,

    #[error(
        "spec.zookeeperServers has {count} items, more than {max}; list at most {max} members of one ensemble"
    )]
    TooManyZookeeperServers { count: usize, max: usize },

    #[error(
        "spec.zookeeperServers[{index}] {value:?} is not host:port; write it as <host>:<port>, e.g. \"zk-0.zk:2181\" \
         or \"[fd00::1]:2181\""
    )]
    ZookeeperServerNotHostPort { index: usize, value: String },

    #[error("spec.zookeeperServers[{index}] {value:?} has port {port}; a ZooKeeper client port is 1 to 65535 (usually 2181)")]
    ZookeeperPortInvalid {
        index: usize,
        value: String,
        port: String,
    },

    #[error("spec.zookeeperServers[{index}] {value:?} has an invalid host: {why}")]
    ZookeeperHostInvalid {
        index: usize,
        value: String,
        why: String,
    },

    #[error(
        "spec.zookeeperServers[{index}] {value:?} repeats spec.zookeeperServers[{first}]; list each ensemble member once"
    )]
    ZookeeperServerDuplicate {
        index: usize,
        first: usize,
        value: String,
    },

    #[error("{field} {value:?} is not an image reference: {why}; e.g. \"jam2in/arcus-memcached:1.11.7\"")]
    ImageInvalid {
        field: &'static str,
        value: String,
        why: String,
    },

    #[error(
        "spec.podLabels[{key:?}] would override the operator's own label, which selects the cache pods; \
         remove it or use a key outside app.kubernetes.io/ and jam2in.com/"
    )]
    ReservedPodLabel { key: String },

    #[error("{field}[{key:?}] is not a valid {what}: {why}")]
    InvalidMapEntry {
        field: &'static str,
        key: String,
        what: &'static str,
        why: String,
    },

    #[error("spec.resources.{which}.{resource} {value:?} is not a Kubernetes quantity (e.g. 500m, 256Mi, 1Gi)")]
    QuantityInvalid {
        which: &'static str,
        resource: String,
        value: String,
    },

    #[error(
        "spec.configuration.memlimit {memlimit_mb} MB leaves too little of spec.resources.limits.memory {limit} \
         ({limit_mb} MB): arcus-memcached also needs memory for connections and its hash table and would be \
         OOM-killed; keep memlimit at most 90% of the limit ({max_mb} MB) or raise the limit"
    )]
    MemlimitExceedsMemoryLimit {
        memlimit_mb: i32,
        limit: String,
        limit_mb: u64,
        max_mb: u64,
    },

    #[error(
        "spec.zookeeperAuth.secretName {value:?} cannot name a Secret: it must be a DNS-1123 subdomain \
         (lower-case letters, digits, '-' and '.', at most 253 characters), e.g. \"arcus-zookeeper-auth\""
    )]
    ZookeeperAuthSecretInvalid { value: String },

    #[error("spec.metricsExporter.port {port} equals spec.port; give the exporter its own port (default 9150)")]
    PortClash { port: i32 },

    #[error("{} problems: {}", .0.len(), .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; "))]
    Several(Vec<InvalidSpec>),
}

impl InvalidSpec {
    /// One CamelCase word for Events and condition reasons.
    pub fn reason(&self) -> &'static str {
        match self {
            InvalidSpec::NameNotDns1035 { .. } | InvalidSpec::NameTooLong { .. } => "InvalidName",
            InvalidSpec::NoNamespace | InvalidSpec::NoUid => "InvalidMetadata",
            InvalidSpec::ServiceCodeChanged { .. } => "ServiceCodeImmutable",
            InvalidSpec::ServiceCodeInvalid { .. } => "InvalidServiceCode",
            InvalidSpec::NoZookeeperServers
            | InvalidSpec::TooManyZookeeperServers { .. }
            | InvalidSpec::ZookeeperServerNotHostPort { .. }
            | InvalidSpec::ZookeeperPortInvalid { .. }
            | InvalidSpec::ZookeeperHostInvalid { .. }
            | InvalidSpec::ZookeeperServerDuplicate { .. } => "InvalidZookeeperServers",
            _ => "InvalidSpec",
        }
    }

    /// The problems this error stands for (itself, or each of [`InvalidSpec::Several`]).
    pub fn problems(&self) -> &[InvalidSpec] {
        match self {
            InvalidSpec::Several(all) => all,
            one => std::slice::from_ref(one),
        }
    }
}

/// Checks `cr` and resolves what the builders need. All problems are reported at once.
pub fn validate(cr: &ArcusMemcached) -> Result<ValidSpec, InvalidSpec> {
    let mut problems = Vec::new();
    let spec = &cr.spec;
    let (name, namespace, owner) = check_identity(cr, &mut problems);
    check_ranges(spec, &mut problems);
    check_exporter(spec, &mut problems);
    let service_code = check_service_code_field(cr, &mut problems);
    let zookeeper_servers = check_zookeeper_servers(&spec.zookeeper_servers, &mut problems);
    check_pod_fields(spec, &mut problems);
    match problems.len() {
        0 => {}
        1 => return Err(problems.remove(0)),
        _ => return Err(InvalidSpec::Several(problems)),
    }
    // Every `None`/`Err` below pushed a problem above.
    let (Some(namespace), Some(owner), Ok(service_code)) = (namespace, owner, service_code) else {
        unreachable!("a missing namespace, uid or bad service code is reported as a problem")
    };
    Ok(valid_spec(
        cr,
        name,
        namespace,
        owner,
        service_code,
        zookeeper_servers,
    ))
}

/// The name (a Service must be able to carry it), the namespace and the owner reference.
fn check_identity(
    cr: &ArcusMemcached,
    problems: &mut Vec<InvalidSpec>,
) -> (String, Option<String>, Option<OwnerReference>) {
    let name = cr.name_any();
    if !is_dns1035_label(&name) {
        problems.push(InvalidSpec::NameNotDns1035 { name: name.clone() });
    } else if name.len() > NAME_MAX_LEN {
        problems.push(InvalidSpec::NameTooLong {
            len: name.len(),
            name: name.clone(),
            max: NAME_MAX_LEN,
        });
    }
    let namespace = cr.namespace();
    if namespace.is_none() {
        problems.push(InvalidSpec::NoNamespace);
    }
    let owner = cr.controller_owner_ref(&());
    if owner.is_none() {
        problems.push(InvalidSpec::NoUid);
    }

    (name, namespace, owner)
}

/// Every number of the spec within its limits, and the exporter's port and image.
fn check_ranges(spec: &crate::crd::ArcusMemcachedSpec, problems: &mut Vec<InvalidSpec>) {
    let mut range = |field, value: i64, min: i64, max: i64, hint| {
        if !(min..=max).contains(&value) {
            problems.push(InvalidSpec::OutOfRange {
                field,
                value,
                min,
                max,
                hint,
            });
        }
    };
    range(
        "spec.replicas",
        spec.replicas.into(),
        0,
        limits::REPLICAS_MAX.into(),
        "set the number of cache nodes, 0 to 1000",
    );
    range(
        "spec.port",
        spec.port.into(),
        limits::PORT_MIN.into(),
        limits::PORT_MAX.into(),
        "memcached's port is usually 11211",
    );
    let c = &spec.configuration;
    range(
        "spec.configuration.memlimit",
        c.memlimit.into(),
        limits::MEMLIMIT_MB_MIN.into(),
        limits::MEMLIMIT_MB_MAX.into(),
        "give the item memory per node in megabytes, e.g. 100",
    );
    range(
        "spec.configuration.connections",
        c.connections.into(),
        limits::CONNECTIONS_MIN.into(),
        limits::CONNECTIONS_MAX.into(),
        "give the maximum client connections per node, e.g. 1000",
    );
    range(
        "spec.configuration.threads",
        c.threads.into(),
        limits::THREADS_MIN.into(),
        limits::THREADS_MAX.into(),
        "give the worker threads per node, e.g. 4; arcus-memcached advises against more than 64",
    );
    if let Some(secs) = spec.zk_session_timeout_seconds {
        range(
            "spec.zkSessionTimeoutSeconds",
            secs.into(),
            limits::ZK_SESSION_TIMEOUT_MIN.into(),
            limits::ZK_SESSION_TIMEOUT_MAX.into(),
            "arcus-memcached accepts 10 to 2000 seconds; remove the field for its default of 30",
        );
    }
    range(
        "spec.terminationGracePeriodSeconds",
        spec.termination_grace_period_seconds,
        0,
        limits::TERMINATION_GRACE_MAX,
        "arcus-memcached stops in about a second; 30 is plenty",
    );
}

/// The exporter sidecar's port (its own) and image.
fn check_exporter(spec: &crate::crd::ArcusMemcachedSpec, problems: &mut Vec<InvalidSpec>) {
    if let Some(m) = &spec.metrics_exporter {
        if !(limits::PORT_MIN..=limits::PORT_MAX).contains(&m.port) {
            problems.push(InvalidSpec::OutOfRange {
                field: "spec.metricsExporter.port",
                value: m.port.into(),
                min: limits::PORT_MIN.into(),
                max: limits::PORT_MAX.into(),
                hint: "the exporter's port is usually 9150",
            });
        }
        if m.port == spec.port {
            problems.push(InvalidSpec::PortClash { port: m.port });
        }
        if let Err(why) = check_image(&m.image) {
            problems.push(InvalidSpec::ImageInvalid {
                field: "spec.metricsExporter.image",
                value: m.image.clone(),
                why,
            });
        }
    }
}

/// The service code's shape, and that it is the one recorded as ours.
fn check_service_code_field(
    cr: &ArcusMemcached,
    problems: &mut Vec<InvalidSpec>,
) -> Result<ServiceCode, InvalidSpec> {
    let spec = &cr.spec;
    let service_code =
        check_service_code(&spec.service_code).map_err(|why| InvalidSpec::ServiceCodeInvalid {
            value: spec.service_code.clone(),
            why,
        });
    if let Err(e) = &service_code {
        problems.push(e.clone());
    }
    if let Some(owned) = cr.status.as_ref().and_then(|s| s.service_code.as_ref()) {
        if *owned != spec.service_code {
            problems.push(InvalidSpec::ServiceCodeChanged {
                owned: owned.clone(),
                requested: spec.service_code.clone(),
            });
        }
    }

    service_code
}

/// The image, labels, node selector, annotations and resources of the pod.
fn check_pod_fields(spec: &crate::crd::ArcusMemcachedSpec, problems: &mut Vec<InvalidSpec>) {
    let c = &spec.configuration;
    if let Err(why) = check_image(&spec.image.name) {
        problems.push(InvalidSpec::ImageInvalid {
            field: "spec.image.name",
            value: spec.image.name.clone(),
            why,
        });
    }

    for (key, value) in &spec.pod_labels {
        if labels::is_reserved_key(key) {
            problems.push(InvalidSpec::ReservedPodLabel {
                key: key.to_string(),
            });
        } else {
            check_label("spec.podLabels", key, value, problems);
        }
    }
    for (key, value) in &spec.node_selector {
        check_label("spec.nodeSelector", key, value, problems);
    }
    for key in spec.pod_annotations.keys() {
        if let Err(why) = check_qualified_name(key) {
            problems.push(InvalidSpec::InvalidMapEntry {
                field: "spec.podAnnotations",
                key: key.to_string(),
                what: "annotation key",
                why,
            });
        }
    }
    check_resources(spec.resources.as_ref(), c.memlimit, problems);
    if let Some(auth) = &spec.zookeeper_auth {
        if !is_dns1123_subdomain(&auth.secret_name) {
            problems.push(InvalidSpec::ZookeeperAuthSecretInvalid {
                value: auth.secret_name.clone(),
            });
        }
    }
}

/// Dot-separated DNS-1123 labels, at most 253 characters: what an object name must be.
fn is_dns1123_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        })
}

fn valid_spec(
    cr: &ArcusMemcached,
    name: String,
    namespace: String,
    owner: OwnerReference,
    service_code: ServiceCode,
    zookeeper_servers: Vec<ZkServer>,
) -> ValidSpec {
    let spec = &cr.spec;
    let c = &spec.configuration;
    ValidSpec {
        name,
        namespace,
        owner,
        generation: cr.metadata.generation,
        service_code,
        replicas: spec.replicas,
        port: spec.port as u16,
        zookeeper_servers,
        memlimit_mb: c.memlimit as u32,
        connections: c.connections as u32,
        threads: c.threads as u32,
        zk_session_timeout_seconds: spec.zk_session_timeout_seconds.map(|s| s as u32),
        zk_failstop: spec.zk_failstop,
        zookeeper_auth_secret: spec.zookeeper_auth.as_ref().map(|a| a.secret_name.clone()),
        image: spec.image.name.clone(),
        pull_policy: spec.image.pull_policy,
        resources: spec.resources.clone(),
        node_selector: spec.node_selector.clone(),
        affinity: spec.affinity.clone(),
        tolerations: spec.tolerations.clone(),
        pod_annotations: spec.pod_annotations.clone(),
        pod_labels: spec.pod_labels.clone(),
        termination_grace_period_seconds: spec.termination_grace_period_seconds,
        metrics_exporter: spec.metrics_exporter.clone(),
        pod_security_context: spec.pod_security_context.clone(),
        security_context: spec.security_context.clone(),
        priority_class_name: spec.priority_class_name.clone(),
        topology_spread_constraints: spec.topology_spread_constraints.clone(),
        image_pull_secrets: spec.image_pull_secrets.clone(),
        service_account_name: spec.service_account_name.clone(),
    }
}

fn check_service_code(code: &str) -> Result<ServiceCode, String> {
    if code.is_empty() {
        return Err("it is empty".into());
    }
    if code.len() > limits::SERVICE_CODE_MAX_LEN {
        return Err(format!(
            "it is {} characters, ARCUS allows at most {}",
            code.len(),
            limits::SERVICE_CODE_MAX_LEN
        ));
    }
    if !code.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err("it must start with a letter or digit".into());
    }
    if let Some(bad) = code
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!("it contains {bad:?}"));
    }
    Ok(ServiceCode(code.to_string()))
}

fn check_zookeeper_servers(items: &[String], problems: &mut Vec<InvalidSpec>) -> Vec<ZkServer> {
    if items.is_empty() {
        problems.push(InvalidSpec::NoZookeeperServers);
    } else if items.len() > limits::ZOOKEEPER_SERVERS_MAX {
        problems.push(InvalidSpec::TooManyZookeeperServers {
            count: items.len(),
            max: limits::ZOOKEEPER_SERVERS_MAX,
        });
    }
    let mut servers: Vec<ZkServer> = Vec::new();
    let mut seen: Vec<(String, u16, usize)> = Vec::new();
    for (index, value) in items.iter().enumerate() {
        let Some(server) = parse_zk_server(index, value, problems) else {
            continue;
        };
        let key = server.host.to_ascii_lowercase();
        if let Some(&(_, _, first)) = seen.iter().find(|(h, p, _)| *h == key && *p == server.port) {
            problems.push(InvalidSpec::ZookeeperServerDuplicate {
                index,
                first,
                value: value.clone(),
            });
            continue;
        }
        seen.push((key, server.port, index));
        servers.push(server);
    }
    servers
}

fn parse_zk_server(index: usize, value: &str, problems: &mut Vec<InvalidSpec>) -> Option<ZkServer> {
    let not_host_port = || InvalidSpec::ZookeeperServerNotHostPort {
        index,
        value: value.to_string(),
    };
    let Some((host, port)) = value.rsplit_once(':') else {
        problems.push(not_host_port());
        return None;
    };
    if host.is_empty() || port.is_empty() {
        problems.push(not_host_port());
        return None;
    }
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        match inner.strip_suffix(']') {
            Some(addr) if addr.parse::<std::net::Ipv6Addr>().is_ok() => Ok(()),
            _ => Err(format!("{host:?} is not a bracketed IPv6 address")),
        }
    } else if host.contains(':') {
        Err("write an IPv6 address in brackets, e.g. [fd00::1]:2181".to_string())
    } else {
        check_dns_name(host)
    };
    let port_num = match port.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Some(p as u16),
        Ok(_) => None,
        Err(_) if port.chars().all(|c| c.is_ascii_digit()) => None, // too many digits
        Err(_) => {
            problems.push(not_host_port());
            return None;
        }
    };
    if let Err(why) = &host_ok {
        problems.push(InvalidSpec::ZookeeperHostInvalid {
            index,
            value: value.to_string(),
            why: why.clone(),
        });
    }
    if port_num.is_none() {
        problems.push(InvalidSpec::ZookeeperPortInvalid {
            index,
            value: value.to_string(),
            port: port.to_string(),
        });
    }
    Some(ZkServer {
        host: host.to_string(),
        port: port_num?,
    })
    .filter(|_| host_ok.is_ok())
}

/// A DNS name (RFC 1123 labels, case-insensitive) or an IPv4 address.
fn check_dns_name(host: &str) -> Result<(), String> {
    if host.len() > 253 {
        return Err(format!(
            "it is {} characters, a DNS name has at most 253",
            host.len()
        ));
    }
    let all_numeric = host
        .split('.')
        .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_digit()));
    if all_numeric && host.parse::<std::net::Ipv4Addr>().is_err() {
        return Err(format!(
            "{host:?} looks like an IPv4 address but is not one"
        ));
    }
    for label in host.split('.') {
        if label.is_empty() {
            return Err("it has an empty label (\"..\" or a leading/trailing dot)".into());
        }
        if label.len() > 63 {
            return Err(format!(
                "its label {label:?} is {} characters, a DNS label has at most 63",
                label.len()
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("its label {label:?} starts or ends with '-'"));
        }
        if let Some(bad) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return Err(format!("it contains {bad:?}"));
        }
    }
    Ok(())
}

/// `[a-z]([-a-z0-9]*[a-z0-9])?`, at most 63 characters: what a Service name must be.
fn is_dns1035_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && !s.ends_with('-')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// What the kubelet would refuse as `InvalidImageName`, in broad strokes: empty, whitespace, a
/// dangling tag or digest separator, upper case in the repository path.
fn check_image(image: &str) -> Result<(), String> {
    if image.trim().is_empty() {
        return Err("it is empty".into());
    }
    if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("it contains whitespace".into());
    }
    let (name, digest) = match image.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (image, None),
    };
    if digest.is_some_and(|d| !d.contains(':') || d.ends_with(':')) {
        return Err("its digest is not <algorithm>:<hex>".into());
    }
    let last_slash = name.rfind('/').map_or(0, |i| i + 1);
    let repo = match name[last_slash..].rfind(':') {
        Some(i) if name.len() == last_slash + i + 1 => return Err("its tag is empty".into()),
        Some(i) => &name[..last_slash + i],
        None => name,
    };
    if repo.is_empty() || repo.ends_with('/') || repo.starts_with('/') || repo.contains("//") {
        return Err("its repository path is empty or has an empty component".into());
    }
    // The first component is a registry host (case-insensitive) when it has a '.' or ':' or is localhost.
    let path = match repo.split_once('/') {
        Some((first, rest)) if first.contains(['.', ':']) || first == "localhost" => rest,
        _ => repo,
    };
    if path.chars().any(|c| c.is_ascii_uppercase()) {
        return Err("its repository path must be lower case".into());
    }
    Ok(())
}

/// A label key (`[prefix/]name`) and value.
fn check_label(field: &'static str, key: &str, value: &str, problems: &mut Vec<InvalidSpec>) {
    if let Err(why) = check_qualified_name(key) {
        problems.push(InvalidSpec::InvalidMapEntry {
            field,
            key: key.to_string(),
            what: "label key",
            why,
        });
    } else if let Err(why) = check_label_value(value) {
        problems.push(InvalidSpec::InvalidMapEntry {
            field,
            key: key.to_string(),
            what: "label value",
            why: format!("{value:?}: {why}"),
        });
    }
}

/// Kubernetes' qualified name: optional DNS-subdomain prefix and '/', then a name of at most 63
/// characters, alphanumeric at both ends, `-`, `_` and `.` inside.
fn check_qualified_name(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        if p.is_empty() || p.len() > 253 {
            return Err("its prefix must be a DNS subdomain of 1 to 253 characters".into());
        }
        let ok = p.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        });
        if !ok {
            return Err(format!(
                "its prefix {p:?} is not a lower-case DNS subdomain"
            ));
        }
    }
    if name.is_empty() {
        return Err("its name part is empty".into());
    }
    check_label_value(name).map_err(|why| format!("its name part {why}"))
}

fn check_label_value(v: &str) -> Result<(), String> {
    if v.is_empty() {
        return Ok(());
    }
    if v.len() > 63 {
        return Err(format!("is {} characters, at most 63 are allowed", v.len()));
    }
    if !v.starts_with(|c: char| c.is_ascii_alphanumeric())
        || !v.ends_with(|c: char| c.is_ascii_alphanumeric())
    {
        return Err("must start and end with a letter or digit".into());
    }
    if let Some(bad) = v
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!("contains {bad:?}"));
    }
    Ok(())
}

fn check_resources(
    resources: Option<&ResourceRequirements>,
    memlimit_mb: i32,
    problems: &mut Vec<InvalidSpec>,
) {
    let Some(r) = resources else { return };
    for (which, map) in [("limits", &r.limits), ("requests", &r.requests)] {
        for (resource, q) in map.iter().flatten() {
            if quantity_bytes(q).is_none() {
                problems.push(InvalidSpec::QuantityInvalid {
                    which,
                    resource: resource.clone(),
                    value: q.0.clone(),
                });
            }
        }
    }
    let Some(limit) = r.limits.as_ref().and_then(|l| l.get("memory")) else {
        return;
    };
    let Some(bytes) = quantity_bytes(limit) else {
        return;
    };
    const MIB: f64 = 1024.0 * 1024.0;
    let max_mb = (bytes * 0.9 / MIB).floor();
    if memlimit_mb as f64 > max_mb {
        problems.push(InvalidSpec::MemlimitExceedsMemoryLimit {
            memlimit_mb,
            limit: limit.0.clone(),
            limit_mb: (bytes / MIB).floor() as u64,
            max_mb: max_mb.max(0.0) as u64,
        });
    }
}

/// The value of a Kubernetes quantity (`128Mi`, `1G`, `500m`, `1e9`, `0.5Gi`), or `None` when it
/// is not one. Approximate (f64): enough to compare a memory limit with memlimit.
pub fn quantity_bytes(q: &Quantity) -> Option<f64> {
    let s = q.0.trim();
    let split = s
        .char_indices()
        .find(|&(i, c)| !(c.is_ascii_digit() || c == '.' || ((c == '+' || c == '-') && i == 0)))
        .map_or(s.len(), |(i, _)| i);
    let (num, suffix) = s.split_at(split);
    if num.is_empty()
        || num == "+"
        || num == "-"
        || num.matches('.').count() > 1
        || num.ends_with(['+', '-'])
    {
        return None;
    }
    let n: f64 = num.parse().ok()?;
    let mult = match suffix {
        "" => 1.0,
        "Ki" => 1024f64,
        "Mi" => 1024f64.powi(2),
        "Gi" => 1024f64.powi(3),
        "Ti" => 1024f64.powi(4),
        "Pi" => 1024f64.powi(5),
        "Ei" => 1024f64.powi(6),
        "n" => 1e-9,
        "u" => 1e-6,
        "m" => 1e-3,
        "k" => 1e3,
        "M" => 1e6,
        "G" => 1e9,
        "T" => 1e12,
        "P" => 1e15,
        "E" => 1e18,
        exp if exp.starts_with(['e', 'E']) => {
            let e: i32 = exp[1..].parse().ok()?;
            10f64.powi(e)
        }
        _ => return None,
    };
    Some(n * mult)
}

#[cfg(test)]
pub(crate) mod tests_support {
    /// A service code made without validation, for builder tests of odd codes.
    pub(crate) fn service_code(code: &str) -> super::ServiceCode {
        super::ServiceCode(code.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::tests::seed_cr;
    use crate::crd::{ArcusMemcachedStatus, MetricsExporter};

    fn with(f: impl FnOnce(&mut ArcusMemcached)) -> ArcusMemcached {
        let mut cr = seed_cr();
        f(&mut cr);
        cr
    }

    /// Validates a seed CR changed by `f`; expects exactly one problem and returns its message.
    fn invalid(f: impl FnOnce(&mut ArcusMemcached)) -> InvalidSpec {
        let err = validate(&with(f)).expect_err("expected the spec to be refused");
        assert!(
            !matches!(err, InvalidSpec::Several(_)),
            "expected one problem, got: {err}"
        );
        err
    }

    fn assert_msg(err: &InvalidSpec, parts: &[&str]) {
        let msg = err.to_string();
        for p in parts {
            assert!(msg.contains(p), "message {msg:?} lacks {p:?}");
        }
    }

    #[test]
    fn seed_cr_is_valid() {
        let v = validate(&seed_cr()).unwrap();
        assert_eq!(v.name, "test");
        assert_eq!(v.namespace, "default");
        assert_eq!(v.service_code.as_str(), "test");
        assert_eq!(v.replicas, 3);
        assert_eq!(v.port, 11211);
        assert_eq!(v.zk_connect_string(), "1.2.3.4:2181");
        assert_eq!((v.memlimit_mb, v.connections, v.threads), (100, 1000, 10));
        assert_eq!(v.image, "jam2in/arcus-memcached:1.11.7");
        assert_eq!(v.pull_policy, PullPolicy::Always);
        assert_eq!(v.owner.kind, "ArcusMemcached");
        assert_eq!(v.owner.controller, Some(true));
        assert_eq!(v.generation, Some(1));
    }

    #[test]
    fn deploy_sample_is_valid() {
        let mut cr: ArcusMemcached =
            serde_saphyr::from_str(include_str!("../../../deploy/samples/arcus_memcached.yaml"))
                .unwrap();
        cr.metadata.namespace = Some("default".into());
        cr.metadata.uid = Some("uid".into());
        let v = validate(&cr).unwrap();
        assert_eq!(v.zk_connect_string(), "10.244.0.1:2181");
    }

    #[test]
    fn valid_variants_pass() {
        for zk in [
            vec![
                "zk-0.zk.arcus.svc.cluster.local:2181",
                "zk-1.zk.arcus.svc.cluster.local:2181",
            ],
            vec!["[fd00::1]:2181", "10.0.0.1:2181", "ZK:2181"],
            vec!["a:1", "a:65535"],
        ] {
            let cr =
                with(|cr| cr.spec.zookeeper_servers = zk.iter().map(|s| s.to_string()).collect());
            validate(&cr).unwrap_or_else(|e| panic!("{zk:?}: {e}"));
        }
        let cr = with(|cr| {
            cr.metadata.name = Some("a".repeat(NAME_MAX_LEN));
            cr.spec.replicas = 0;
            cr.spec.image.name =
                "registry.Example.com:5000/arcus/memcached:1.15.0-RC1@sha256:abc".into();
            cr.spec.pod_labels.insert("team".into(), "cache".into());
            cr.spec
                .pod_labels
                .insert("example.com/tier".into(), "".into());
            cr.spec
                .pod_annotations
                .insert("prometheus.io/scrape".into(), "false".into());
            cr.spec.resources = Some(ResourceRequirements {
                limits: Some([("memory".to_string(), Quantity("128Mi".into()))].into()),
                ..Default::default()
            });
            cr.status = Some(ArcusMemcachedStatus {
                service_code: Some("test".into()),
                ..Default::default()
            });
        });
        validate(&cr).unwrap();
    }

    #[test]
    fn name_not_dns1035() {
        for name in ["Test", "1test", "te.st", "test-"] {
            let e = invalid(|cr| cr.metadata.name = Some(name.into()));
            assert!(
                matches!(e, InvalidSpec::NameNotDns1035 { .. }),
                "{name}: {e}"
            );
            assert_msg(&e, &["metadata.name", "DNS-1035", "recreate"]);
        }
    }

    #[test]
    fn name_too_long_for_pod_names() {
        let e = invalid(|cr| cr.metadata.name = Some("a".repeat(NAME_MAX_LEN + 1)));
        assert!(
            matches!(
                e,
                InvalidSpec::NameTooLong {
                    len: 44,
                    max: 43,
                    ..
                }
            ),
            "{e}"
        );
        assert_msg(
            &e,
            &[
                "metadata.name",
                "44 characters",
                "longer than 43",
                "shorter name",
            ],
        );
    }

    #[test]
    fn missing_namespace_and_uid() {
        assert_eq!(
            invalid(|cr| cr.metadata.namespace = None),
            InvalidSpec::NoNamespace
        );
        let e = invalid(|cr| cr.metadata.uid = None);
        assert_eq!(e, InvalidSpec::NoUid);
        assert_msg(&e, &["metadata.uid", "API server"]);
    }

    #[test]
    fn replicas_out_of_range() {
        for n in [-1, 1001, i32::MAX] {
            let e = invalid(|cr| cr.spec.replicas = n);
            assert_msg(&e, &["spec.replicas", &n.to_string(), "0..=1000"]);
        }
    }

    #[test]
    fn service_code_bad() {
        for (code, why) in [
            ("", "empty"),
            ("-svc", "start with a letter or digit"),
            ("svc^group", "'^'"),
            ("svc/x", "'/'"),
            ("svc code", "' '"),
            (&"s".repeat(129), "129 characters"),
        ] {
            let e = invalid(|cr| cr.spec.service_code = code.to_string());
            assert!(
                matches!(e, InvalidSpec::ServiceCodeInvalid { .. }),
                "{code}: {e}"
            );
            assert_msg(&e, &["spec.serviceCode", why, "1 to 128"]);
        }
    }

    #[test]
    fn service_code_is_immutable() {
        let e = invalid(|cr| {
            cr.spec.service_code = "other".into();
            cr.status = Some(ArcusMemcachedStatus {
                service_code: Some("test".into()),
                ..Default::default()
            });
        });
        assert_eq!(
            e,
            InvalidSpec::ServiceCodeChanged {
                owned: "test".into(),
                requested: "other".into()
            }
        );
        assert_msg(
            &e,
            &[
                "immutable",
                "\"test\"",
                "\"other\"",
                "set spec.serviceCode back",
            ],
        );
        assert_eq!(e.reason(), "ServiceCodeImmutable");
    }

    #[test]
    fn zookeeper_servers_empty_or_too_many() {
        let e = invalid(|cr| cr.spec.zookeeper_servers.clear());
        assert_eq!(e, InvalidSpec::NoZookeeperServers);
        assert_msg(&e, &["spec.zookeeperServers", "empty", "host:port"]);
        let e = invalid(|cr| {
            cr.spec.zookeeper_servers = (0..10).map(|i| format!("zk-{i}:2181")).collect()
        });
        assert_msg(&e, &["spec.zookeeperServers", "10 items", "at most 9"]);
    }

    #[test]
    fn zookeeper_server_not_host_port() {
        for v in ["1.2.3.4", ":2181", "zk:", "zk:port", "zk:21x1"] {
            let e = invalid(|cr| cr.spec.zookeeper_servers = vec![v.into()]);
            assert!(
                matches!(e, InvalidSpec::ZookeeperServerNotHostPort { index: 0, .. }),
                "{v}: {e}"
            );
            assert_msg(
                &e,
                &["spec.zookeeperServers[0]", "not host:port", "<host>:<port>"],
            );
        }
    }

    #[test]
    fn zookeeper_port_zero_or_too_big() {
        for v in ["zk:0", "zk:65536", "zk:99999999999"] {
            let e = invalid(|cr| cr.spec.zookeeper_servers = vec!["ok:2181".into(), v.into()]);
            assert!(
                matches!(e, InvalidSpec::ZookeeperPortInvalid { index: 1, .. }),
                "{v}: {e}"
            );
            assert_msg(&e, &["spec.zookeeperServers[1]", "1 to 65535"]);
        }
    }

    #[test]
    fn zookeeper_host_invalid() {
        let long_label = format!("{}.example.com:2181", "a".repeat(64));
        let long_name = format!("{}:2181", ["a".repeat(63).as_str(); 5].join("."));
        for (v, why) in [
            (long_label.as_str(), "at most 63"),
            (long_name.as_str(), "at most 253"),
            ("zk..example:2181", "empty label"),
            ("-zk:2181", "'-'"),
            ("zk_0:2181", "'_'"),
            ("300.1.2.3:2181", "not one"),
            ("fd00::1:2181", "brackets"),
            ("[not-ipv6]:2181", "bracketed IPv6"),
        ] {
            let e = invalid(|cr| cr.spec.zookeeper_servers = vec![v.into()]);
            assert!(
                matches!(e, InvalidSpec::ZookeeperHostInvalid { .. }),
                "{v}: {e}"
            );
            assert_msg(&e, &["spec.zookeeperServers[0]", "invalid host", why]);
        }
    }

    #[test]
    fn zookeeper_server_duplicate() {
        let e = invalid(|cr| {
            cr.spec.zookeeper_servers =
                vec!["zk-0:2181".into(), "zk-1:2181".into(), "ZK-0:2181".into()]
        });
        assert_eq!(
            e,
            InvalidSpec::ZookeeperServerDuplicate {
                index: 2,
                first: 0,
                value: "ZK-0:2181".into()
            }
        );
        assert_msg(
            &e,
            &[
                "spec.zookeeperServers[2]",
                "repeats spec.zookeeperServers[0]",
                "once",
            ],
        );
        assert_eq!(e.reason(), "InvalidZookeeperServers");
    }

    #[test]
    fn configuration_out_of_range() {
        for (field, f) in [
            (
                "spec.configuration.memlimit",
                (|cr: &mut ArcusMemcached| cr.spec.configuration.memlimit = 0) as fn(&mut _),
            ),
            ("spec.configuration.memlimit", |cr| {
                cr.spec.configuration.memlimit = 2_000_000
            }),
            ("spec.configuration.connections", |cr| {
                cr.spec.configuration.connections = 5
            }),
            ("spec.configuration.connections", |cr| {
                cr.spec.configuration.connections = 100_000
            }),
            ("spec.configuration.threads", |cr| {
                cr.spec.configuration.threads = 0
            }),
            ("spec.configuration.threads", |cr| {
                cr.spec.configuration.threads = 65
            }),
            ("spec.port", |cr| cr.spec.port = 0),
            ("spec.port", |cr| cr.spec.port = 70000),
            ("spec.zkSessionTimeoutSeconds", |cr| {
                cr.spec.zk_session_timeout_seconds = Some(5)
            }),
            ("spec.zkSessionTimeoutSeconds", |cr| {
                cr.spec.zk_session_timeout_seconds = Some(3000)
            }),
            ("spec.terminationGracePeriodSeconds", |cr| {
                cr.spec.termination_grace_period_seconds = -1
            }),
        ] {
            let e = invalid(f);
            assert!(
                matches!(e, InvalidSpec::OutOfRange { field: got, .. } if got == field),
                "{field}: {e}"
            );
            assert_msg(&e, &[field, "out of range"]);
        }
    }

    #[test]
    fn image_invalid() {
        for (image, why) in [
            ("", "empty"),
            ("   ", "empty"),
            ("jam2in/arcus memcached", "whitespace"),
            ("jam2in/arcus-memcached:", "tag is empty"),
            ("Jam2in/Arcus-Memcached:1.0", "lower case"),
            ("jam2in/arcus@sha256", "digest"),
            ("/arcus", "empty component"),
        ] {
            let e = invalid(|cr| cr.spec.image.name = image.into());
            assert!(
                matches!(e, InvalidSpec::ImageInvalid { .. }),
                "{image:?}: {e}"
            );
            assert_msg(&e, &["spec.image.name", why]);
        }
    }

    #[test]
    fn pod_labels_cannot_override_selector_labels() {
        for key in [
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "jam2in.com/service-code",
        ] {
            let e = invalid(|cr| {
                cr.spec.pod_labels.insert(key.into(), "x".into());
            });
            assert_eq!(e, InvalidSpec::ReservedPodLabel { key: key.into() });
            assert_msg(&e, &["spec.podLabels", key, "remove it"]);
        }
    }

    #[test]
    fn labels_and_annotations_syntax() {
        let e = invalid(|cr| {
            cr.spec.pod_labels.insert("bad key".into(), "x".into());
        });
        assert_msg(&e, &["spec.podLabels[\"bad key\"]", "label key", "' '"]);
        let e = invalid(|cr| {
            cr.spec.node_selector.insert("disk".into(), "-ssd".into());
        });
        assert_msg(
            &e,
            &[
                "spec.nodeSelector[\"disk\"]",
                "label value",
                "start and end",
            ],
        );
        let e = invalid(|cr| {
            cr.spec.pod_labels.insert("team".into(), "x".repeat(64));
        });
        assert_msg(&e, &["spec.podLabels", "64 characters"]);
        let e = invalid(|cr| {
            cr.spec
                .pod_annotations
                .insert("Example.com/x".into(), "any value at all".into());
        });
        assert_msg(&e, &["spec.podAnnotations", "annotation key", "prefix"]);
    }

    #[test]
    fn memlimit_must_fit_the_memory_limit() {
        let e = invalid(|cr| {
            cr.spec.configuration.memlimit = 1024;
            cr.spec.resources = Some(ResourceRequirements {
                limits: Some([("memory".to_string(), Quantity("1Gi".into()))].into()),
                ..Default::default()
            });
        });
        assert_eq!(
            e,
            InvalidSpec::MemlimitExceedsMemoryLimit {
                memlimit_mb: 1024,
                limit: "1Gi".into(),
                limit_mb: 1024,
                max_mb: 921
            }
        );
        assert_msg(&e, &["memlimit 1024 MB", "1Gi", "OOM", "921 MB"]);
    }

    #[test]
    fn quantity_must_parse() {
        let e = invalid(|cr| {
            cr.spec.resources = Some(ResourceRequirements {
                requests: Some([("cpu".to_string(), Quantity("lots".into()))].into()),
                ..Default::default()
            });
        });
        assert_msg(&e, &["spec.resources.requests.cpu", "\"lots\"", "quantity"]);
    }

    #[test]
    fn metrics_exporter_port_clash() {
        let e = invalid(|cr| {
            cr.spec.metrics_exporter = Some(MetricsExporter {
                image: "prom/memcached-exporter:v0.15.3".into(),
                port: 11211,
                interval: "30s".into(),
            });
        });
        assert_eq!(e, InvalidSpec::PortClash { port: 11211 });
    }

    #[test]
    fn several_problems_are_reported_together() {
        let e = validate(&with(|cr| {
            cr.spec.replicas = -1;
            cr.spec.zookeeper_servers = vec!["zk:0".into()];
        }))
        .unwrap_err();
        assert_eq!(e.problems().len(), 2);
        assert_msg(
            &e,
            &["2 problems", "spec.replicas", "spec.zookeeperServers[0]"],
        );
    }

    #[test]
    fn quantities() {
        let q = |s: &str| quantity_bytes(&Quantity(s.into()));
        assert_eq!(q("128Mi"), Some(128.0 * 1024.0 * 1024.0));
        assert_eq!(q("1G"), Some(1e9));
        assert_eq!(q("1e3"), Some(1000.0));
        assert_eq!(q("500m"), Some(0.5));
        assert_eq!(q("0.5Gi"), Some(512.0 * 1024.0 * 1024.0));
        assert_eq!(q("12345"), Some(12345.0));
        for bad in ["", "Mi", "1.2.3", "1Qi", "1e", "--1"] {
            assert_eq!(q(bad), None, "{bad}");
        }
    }
}
