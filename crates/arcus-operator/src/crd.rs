//! The `ArcusMemcached` custom resource (`memcacheds.jam2in.com/v1`): its Rust types, the
//! OpenAPI schema the API server validates with, and the CRD manifest (`deploy/crd.yaml`).
//!
//! Owns the user interface of the seed's `arcus_memcached.yaml`: its field names, printer columns
//! and group/kind/plural/short name are kept exactly. Must not hold logic: rules the schema cannot
//! express live in `validate`, objects derived from the spec in `build`.
//!
//! Compatibility: the CRD is `apiextensions.k8s.io/v1` with a structural schema for Kubernetes
//! 1.33 and later: CEL rules (`x-kubernetes-validations`, see [`rules`]) refuse bad input at
//! `kubectl apply`, each rule bounded (`maxItems`, `maxLength`) so the API server's cost
//! estimator accepts it. Embedded Kubernetes types (resources, affinity, tolerations) get
//! hand-written schemas because k8s-openapi is built without its `schemars` feature.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, LocalObjectReference, PodSecurityContext, ResourceRequirements, SecurityContext,
    Toleration, TopologySpreadConstraint,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, CustomResourceExt};
use schemars::{json_schema, JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};

use crate::build::labels;

/// Bounds shared by the schema (as literals in attributes) and by `validate` (as constants).
pub mod limits {
    pub const REPLICAS_MAX: i32 = 1000;
    pub const SERVICE_CODE_MAX_LEN: usize = 128;
    pub const ZOOKEEPER_SERVERS_MAX: usize = 9;
    /// `host:port` with a 253-char DNS name, or a bracketed IPv6 address, and a 5-digit port.
    pub const ZOOKEEPER_SERVER_MAX_LEN: usize = 261;
    pub const MEMLIMIT_MB_MIN: i32 = 8;
    pub const MEMLIMIT_MB_MAX: i32 = 1_048_576;
    pub const CONNECTIONS_MIN: i32 = 10;
    pub const CONNECTIONS_MAX: i32 = 65_536;
    pub const THREADS_MIN: i32 = 1;
    /// arcus-memcached warns above 64 worker threads ("other problems when you get above 64").
    pub const THREADS_MAX: i32 = 64;
    pub const PORT_MIN: i32 = 1;
    pub const PORT_MAX: i32 = 65_535;
    /// arcus-memcached's accepted `-o` range; it silently falls back to 30 outside it.
    pub const ZK_SESSION_TIMEOUT_MIN: i32 = 10;
    pub const ZK_SESSION_TIMEOUT_MAX: i32 = 2000;
    pub const TERMINATION_GRACE_MAX: i64 = 3600;
}

/// The pattern of `spec.serviceCode`: a znode name (no `/`) that ARCUS's mapping parser keeps
/// whole (no `^`), starting with a letter or digit.
pub const SERVICE_CODE_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9_.-]*$";
/// The shape of one `spec.zookeeperServers` item (RE2, checked by a CEL rule): `host:port`, host
/// a DNS name of RFC 1123 labels (either case) or an IPv4 address, or a bracketed IPv6 address.
/// What a regex cannot say well (an IPv4-looking host that is no address, a valid IPv6 address,
/// a name over 253 characters) is left to `validate`.
pub const ZOOKEEPER_SERVER_PATTERN: &str = r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*):[0-9]{1,5}$";

/// The CEL validation rules of the CRD (`x-kubernetes-validations`), attached to the schema by
/// the `on_*` transforms: the API server refuses an object breaking one on create or update with
/// `<field path>: Invalid value: ...: <message>`. `validate` checks the same things again, with
/// messages to the same effect, for objects stored before a rule existed.
///
/// Left to `validate` (too costly or too loose in CEL): labels' and annotations' syntax, image
/// references, quantities' syntax, IPv4/IPv6 address validity, a DNS name's total length, a
/// port written with leading zeros repeating another item, and that `spec.serviceCode` keeps the
/// code recorded in `status.serviceCode`.
pub mod rules {
    use kube::core::{Message, Rule};
    use schemars::Schema;

    use super::{labels, limits, ZOOKEEPER_SERVER_PATTERN};
    use crate::validate::NAME_MAX_LEN;

    pub const SERVICE_CODE_IMMUTABLE_MSG: &str = "serviceCode is immutable: the cache nodes and \
        their clients find this cluster in ZooKeeper under it (delete and re-create the resource \
        to change it)";
    pub const ZOOKEEPER_SERVER_SHAPE_MSG: &str = "must be <host>:<port>, host a DNS name, an IPv4 \
        address or a bracketed IPv6 address, e.g. zk-0.zk:2181 or [fd00::1]:2181";
    pub const ZOOKEEPER_SERVER_PORT_MSG: &str =
        "has a port out of range: a ZooKeeper client port is 1 to 65535 (usually 2181)";
    pub const ZOOKEEPER_SERVERS_UNIQUE_MSG: &str = "lists a ZooKeeper server twice (host names \
        compare case-insensitively); list each ensemble member once";
    pub const EXPORTER_PORT_CLASH_MSG: &str =
        "equals spec.port; give the exporter its own port (default 9150)";
    pub const MEMLIMIT_FITS_MSG: &str = "leaves too little of spec.resources.limits.memory: \
        arcus-memcached also needs memory for connections and its hash table and would be \
        OOM-killed; keep memlimit at most 90% of the limit or raise the limit";
    pub const RESERVED_POD_LABELS_MSG: &str = "must not set the operator's own labels \
        (app.kubernetes.io/name, app.kubernetes.io/instance, app.kubernetes.io/managed-by, \
        jam2in.com/service-code), which select the cache pods; remove them";
    pub const NAME_DNS1035_MSG: &str = "metadata.name cannot name a Service: it must be a \
        DNS-1035 label (lower-case letters, digits and '-', starting with a letter, ending with a \
        letter or digit); create the resource under such a name";
    pub const NAME_LENGTH_MSG: &str = "metadata.name is longer than 43 characters: the \
        StatefulSet <name>-arcus-mc and its pods' labels would exceed Kubernetes' 63-character \
        limits; create the resource with a shorter name";

    fn rule(expression: impl Into<String>, message: &str) -> Rule {
        Rule::new(expression).message(Message::Message(message.into()))
    }

    fn attach(schema: &mut Schema, rule: Rule) {
        kube::core::validate(schema, rule).expect("a CEL rule serializes");
    }

    /// `spec.serviceCode`: a transition rule, so checked on update only.
    pub fn service_code_immutable() -> Rule {
        rule("self == oldSelf", SERVICE_CODE_IMMUTABLE_MSG)
    }

    /// Each `spec.zookeeperServers` item: [`ZOOKEEPER_SERVER_PATTERN`].
    pub fn zookeeper_server_shape() -> Rule {
        rule(
            format!("self.matches(r'{ZOOKEEPER_SERVER_PATTERN}')"),
            ZOOKEEPER_SERVER_SHAPE_MSG,
        )
    }

    /// Each `spec.zookeeperServers` item: the port, where it is 1 to 5 digits after the last
    /// `:` (so `int()` cannot fail; the shape rule reports the rest).
    pub fn zookeeper_server_port() -> Rule {
        let port = "int(self.substring(self.lastIndexOf(':') + 1))";
        rule(
            format!(
                "!self.matches(r'^.*:[0-9]{{1,5}}$') || ({port} >= {} && {port} <= {})",
                limits::PORT_MIN,
                limits::PORT_MAX
            ),
            ZOOKEEPER_SERVER_PORT_MSG,
        )
    }

    /// `spec.zookeeperServers`: no item twice, host names compared case-insensitively as
    /// `validate` does (`ZK-0:2181` repeats `zk-0:2181`).
    pub fn zookeeper_servers_unique() -> Rule {
        rule(
            "self.all(x, self.exists_one(y, y.lowerAscii() == x.lowerAscii()))",
            ZOOKEEPER_SERVERS_UNIQUE_MSG,
        )
    }

    /// `spec`, reported at `spec.metricsExporter.port` (both ports have defaults, so both exist).
    pub fn exporter_port_clash() -> Rule {
        rule(
            "!has(self.metricsExporter) || self.metricsExporter.port != self.port",
            EXPORTER_PORT_CLASH_MSG,
        )
        .field_path(".metricsExporter.port")
    }

    /// `spec`, reported at `spec.configuration.memlimit`: memlimit at most 90% of the memory
    /// limit, a quantity given as an integer or a string. For an integer memlimit,
    /// `memlimit <= floor(0.9 * limit / 1 MiB)` (what `validate` computes) is
    /// `memlimit * 1 MiB <= 0.9 * limit`, so no rounding is needed.
    pub fn memlimit_fits() -> Rule {
        let limit = "string(self.resources.limits['memory'])";
        rule(
            format!(
                "!has(self.resources) || !has(self.resources.limits) \
                 || !('memory' in self.resources.limits) || !isQuantity({limit}) \
                 || double(self.configuration.memlimit) * 1048576.0 \
                 <= 0.9 * quantity({limit}).asApproximateFloat()"
            ),
            MEMLIMIT_FITS_MSG,
        )
        .field_path(".configuration.memlimit")
    }

    /// `spec.podLabels`: none of [`labels::RESERVED`] (map lookups, cheap for any map size).
    pub fn pod_labels_not_reserved() -> Rule {
        let keys: Vec<String> = labels::RESERVED.iter().map(|k| format!("'{k}'")).collect();
        rule(
            format!("[{}].all(k, !(k in self))", keys.join(", ")),
            RESERVED_POD_LABELS_MSG,
        )
    }

    /// The resource: `metadata.name` names a Service (`<name>-arcus-mc`).
    pub fn name_dns1035() -> Rule {
        rule(
            "self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
            NAME_DNS1035_MSG,
        )
    }

    /// The resource: at most [`NAME_MAX_LEN`] characters.
    pub fn name_length() -> Rule {
        rule(
            format!("self.metadata.name.size() <= {NAME_MAX_LEN}"),
            NAME_LENGTH_MSG,
        )
    }

    pub(super) fn on_spec(schema: &mut Schema) {
        attach(schema, exporter_port_clash());
        attach(schema, memlimit_fits());
    }

    pub(super) fn on_service_code(schema: &mut Schema) {
        attach(schema, service_code_immutable());
    }

    pub(super) fn on_zookeeper_servers(schema: &mut Schema) {
        attach(schema, zookeeper_servers_unique());
        let items = schema
            .get_mut("items")
            .and_then(|v| Schema::try_from(v.take()).ok());
        let mut items = items.expect("spec.zookeeperServers has an items schema");
        attach(&mut items, zookeeper_server_shape());
        attach(&mut items, zookeeper_server_port());
        schema.insert("items".into(), items.into());
    }

    pub(super) fn on_pod_labels(schema: &mut Schema) {
        attach(schema, pod_labels_not_reserved());
    }

    pub const MIGRATION_EPOCH_MSG: &str = "status.migration.epoch must not go back: this \
        report belongs to an older operation record than the stored one (written by an \
        operator replica that is no longer the leader)";

    /// `status.migration`: a report never replaces one of a later operation record (a
    /// transition rule: checked on update only, and only when the stored report has an epoch).
    pub fn migration_epoch_monotonic() -> Rule {
        rule(
            "!has(oldSelf.epoch) || (has(self.epoch) && self.epoch >= oldSelf.epoch)",
            MIGRATION_EPOCH_MSG,
        )
    }

    pub(super) fn on_migration(schema: &mut Schema) {
        attach(schema, migration_epoch_monotonic());
    }
}

/// Specification of an ARCUS cache cluster: a set of arcus-memcached nodes that register
/// themselves in ZooKeeper under one service code.
// Several printer columns repeat `type_ = "string"`, which clippy mistakes for duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "jam2in.com",
    version = "v1",
    kind = "ArcusMemcached",
    plural = "memcacheds",
    singular = "memcached",
    shortname = "mc",
    namespaced,
    status = "ArcusMemcachedStatus",
    // `kubectl scale mc test --replicas=5`, and what a HorizontalPodAutoscaler or KEDA targets.
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.labelSelector"
    ),
    derive = "PartialEq",
    doc = "An ARCUS cache cluster: arcus-memcached nodes run by a StatefulSet and registered in ZooKeeper under one service code.",
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        description = "The number memcached nodes ready",
        json_path = ".status.ready"
    ),
    printcolumn(
        name = "Container",
        type_ = "string",
        description = "The memcached container",
        json_path = ".status.container"
    ),
    printcolumn(
        name = "Image",
        type_ = "string",
        description = "The memcached image",
        json_path = ".status.image"
    ),
    printcolumn(
        name = "Message",
        type_ = "string",
        description = "The memcached error message",
        json_path = ".status.message"
    ),
    printcolumn(
        name = "Migration",
        type_ = "string",
        description = "The cache migration in flight or last done: operation, node, phase, items moved/to move",
        json_path = ".status.migration.summary"
    ),
    validation = rules::name_dns1035(),
    validation = rules::name_length()
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = rules::on_spec)]
pub struct ArcusMemcachedSpec {
    /// Number of cache nodes (pods `<name>-arcus-mc-0..N-1`). Scaling out registers the new
    /// nodes in ZooKeeper before their pods start; scaling in removes the surplus nodes'
    /// registrations after their pods are gone. 0 keeps the service registered with no node.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,

    /// The ARCUS service code clients use to find this cluster in ZooKeeper
    /// (`/arcus/cache_list/<serviceCode>`). Letters, digits, `_`, `.` and `-`, starting with a
    /// letter or digit, at most 128 characters. Immutable (the API server refuses a change), and
    /// the operator refuses a service code that another resource or a manual setup already uses.
    #[schemars(
        length(min = 1, max = 128),
        regex(pattern = SERVICE_CODE_PATTERN),
        transform = rules::on_service_code
    )]
    pub service_code: String,

    /// The ZooKeeper ensemble that holds the ARCUS cluster metadata, as `host:port` items
    /// (e.g. `zk-0.zk:2181`). The operator writes the service's znodes there and every cache
    /// node registers there (`-z`). At most 9 servers, no duplicates.
    #[schemars(
        length(min = 1, max = 9),
        inner(length(min = 3, max = 261)),
        transform = rules::on_zookeeper_servers
    )]
    pub zookeeper_servers: Vec<String>,

    /// Start-up options of each arcus-memcached process.
    #[serde(default)]
    pub configuration: Configuration,

    /// The arcus-memcached container image.
    pub image: Image,

    /// TCP port every cache node listens on (`-p`); clients reach nodes at `<pod IP>:<port>`.
    /// Part of each node's ZooKeeper mapping (`<pod hostname>:<port>`).
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,

    /// ZooKeeper session timeout of each cache node in seconds (`-o`, 10 to 2000). A node whose
    /// session expires leaves the cluster and restarts. Unset: arcus-memcached's default (30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 2000))]
    pub zk_session_timeout_seconds: Option<i32>,

    /// What a cache node does when its ZooKeeper session expired (a ZooKeeper outage longer
    /// than the session timeout): `false` (the default here) keeps it serving its items and out
    /// of `cache_list` until the operator lets it back in (`config zkfailstop off`, applied to
    /// every running node); `true` is arcus-memcached's own default, exit 75, which restarts
    /// the pod empty. With `false`, a node cut off from ZooKeeper keeps answering clients that
    /// still have it in their ring.
    #[serde(default)]
    pub zk_failstop: bool,

    /// ZooKeeper digest authentication, for ensembles shared with other tenants. The operator
    /// authenticates (`addauth digest`) with the Secret's credentials and creates the znodes
    /// this resource owns (`cache_list/<svc>`, `client_list/<svc>`, its mappings) with an ACL
    /// that gives that user everything and anyone else only what ARCUS servers and clients
    /// need without authenticating (read; create under `cache_list/<svc>` and
    /// `client_list/<svc>`): other tenants cannot delete or change them. Existing znodes get the
    /// ACL on the next pass. Unset: open ACLs (world:anyone), as ARCUS itself creates them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zookeeper_auth: Option<ZookeeperAuth>,

    /// CPU and memory requests and limits of the arcus-memcached container. Keep the memory
    /// limit comfortably above `configuration.memlimit`: arcus-memcached also uses memory for
    /// connections and its hash table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "resources_schema")]
    pub resources: Option<ResourceRequirements>,

    /// Node labels a node must have to run a cache pod (pod `nodeSelector`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,

    /// Scheduling constraints of the cache pods (pod `affinity`, the Kubernetes Affinity type).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserved_object_schema")]
    pub affinity: Option<Affinity>,

    /// Taints the cache pods tolerate (pod `tolerations`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "tolerations_schema")]
    pub tolerations: Vec<Toleration>,

    /// Extra annotations on the cache pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_annotations: BTreeMap<String, String>,

    /// Extra labels on the cache pods. The operator's own labels (`app.kubernetes.io/name`,
    /// `app.kubernetes.io/instance`, `app.kubernetes.io/managed-by`, `jam2in.com/service-code`)
    /// cannot be overridden.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(transform = rules::on_pod_labels)]
    pub pod_labels: BTreeMap<String, String>,

    /// Seconds a cache pod gets to stop. On SIGTERM arcus-memcached closes its ZooKeeper
    /// session first (clients stop routing to it at once) and exits in about a second.
    #[serde(default = "default_termination_grace")]
    #[schemars(range(min = 0, max = 3600))]
    pub termination_grace_period_seconds: i64,

    /// Prometheus metrics: when set, each cache pod runs a memcached exporter sidecar, the
    /// headless Service exposes its `metrics` port, and a ServiceMonitor is created where the
    /// Prometheus Operator is installed. Unset: no exporter, no ServiceMonitor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_exporter: Option<MetricsExporter>,

    /// Pod-level security settings of the cache pods (the Kubernetes PodSecurityContext).
    /// Unset: `runAsNonRoot: true`, `runAsUser`/`runAsGroup`/`fsGroup` 1000 and the
    /// `RuntimeDefault` seccomp profile, which the Pod Security Standard "restricted" admits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserved_object_schema")]
    pub pod_security_context: Option<PodSecurityContext>,

    /// Security settings of the cache pods' containers (the Kubernetes SecurityContext).
    /// Unset: `allowPrivilegeEscalation: false` and all capabilities dropped ("restricted").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserved_object_schema")]
    pub security_context: Option<SecurityContext>,

    /// PriorityClass of the cache pods (pod `priorityClassName`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub priority_class_name: Option<String>,

    /// How the cache pods spread over failure domains (pod `topologySpreadConstraints`). Unset:
    /// at most one pod more on any Node, and on any zone, than on another, where the scheduler
    /// can (`ScheduleAnyway`), so losing one Node or zone loses as little of the cache as
    /// possible. `[]`: no constraint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserved_objects_schema")]
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,

    /// Secrets for pulling the cache images from a private registry (pod `imagePullSecrets`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "local_object_references_schema")]
    pub image_pull_secrets: Vec<LocalObjectReference>,

    /// The ServiceAccount the cache pods run as. Unset: the namespace's `default`. The cache
    /// pods do not call the Kubernetes API, so their token is not mounted either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub service_account_name: Option<String>,
}

/// Start-up options of each arcus-memcached process. Changing them restarts the nodes one by one.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Configuration {
    /// Item memory of each node in megabytes (`-m`, 8 to 1048576). Also what the node
    /// publishes in its ZooKeeper znode (`<memlimit>MB`).
    #[serde(default = "default_memlimit")]
    #[schemars(range(min = 8, max = 1048576))]
    pub memlimit: i32,

    /// Maximum simultaneous client connections per node (`-c`, 10 to 65536).
    #[serde(default = "default_connections")]
    #[schemars(range(min = 10, max = 65536))]
    pub connections: i32,

    /// Worker threads per node (`-t`, 1 to 64; arcus-memcached advises against more than 64).
    #[serde(default = "default_threads")]
    #[schemars(range(min = 1, max = 64))]
    pub threads: i32,
}

impl Default for Configuration {
    fn default() -> Self {
        Self {
            memlimit: default_memlimit(),
            connections: default_connections(),
            threads: default_threads(),
        }
    }
}

/// The arcus-memcached container image.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Image {
    /// Image reference, e.g. `jam2in/arcus-memcached:1.11.7`.
    #[schemars(length(min = 1, max = 1024))]
    pub name: String,

    /// When the kubelet pulls the image: `Always`, `IfNotPresent` (default) or `Never`.
    #[serde(default)]
    pub pull_policy: PullPolicy,
}

/// Image pull policy of the cache containers.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum PullPolicy {
    Always,
    #[default]
    IfNotPresent,
    Never,
}

impl PullPolicy {
    /// The value of a container's `imagePullPolicy`.
    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }
}

/// Where the operator finds its ZooKeeper digest credentials.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ZookeeperAuth {
    /// A Secret in the resource's namespace with the keys `username` and `password` (the
    /// `kubernetes.io/basic-auth` layout), and during a password change `previousPassword` (the
    /// old one, until the next pass moved the ACLs). The operator may read only the Secrets its
    /// RBAC names (Helm value `zookeeperAuth.secretNames`; `deploy/rbac.yaml`: `arcus-zookeeper-auth`).
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
}

/// A Prometheus memcached exporter run next to each cache node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MetricsExporter {
    /// Exporter image; it must accept `--memcached.address=<host:port>` and
    /// `--web.listen-address=:<port>` like prom/memcached-exporter.
    #[serde(default = "default_exporter_image")]
    #[schemars(length(min = 1, max = 1024))]
    pub image: String,

    /// Port the exporter serves `/metrics` on (the `metrics` port of pods and Service).
    #[serde(default = "default_exporter_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,

    /// Prometheus scrape interval of the ServiceMonitor, e.g. `30s`.
    #[serde(default = "default_scrape_interval")]
    #[schemars(regex(pattern = "^[0-9]+(ms|s|m|h)$"))]
    pub interval: String,
}

/// Observed state, written by the operator only.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ArcusMemcachedStatus {
    /// `<ready>/<desired>`: nodes whose pod is Ready AND whose ephemeral znode exists under
    /// `cache_list/<serviceCode>` (i.e. nodes clients route to), over `spec.replicas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,

    /// `<running>/<desired>`: cache pods whose arcus-memcached container is running (ready or
    /// not), over `spec.replicas`. Next to `ready` it tells "not started" from "not registered".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,

    /// The image the cache nodes run (`spec.image.name` once applied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,

    /// The latest error in one line (invalid spec, conflict, failing node); empty when healthy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,

    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Cache pods that exist (the scale subresource's `status.replicas`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<i32>,

    /// The label selector of the cache pods, as a string (the scale subresource's
    /// `labelSelector`, which a HorizontalPodAutoscaler uses to find the pods' metrics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_selector: Option<String>,

    /// Available, Progressing and Degraded conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,

    /// Number of nodes counted in `ready`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_replicas: Option<i32>,

    /// The cache nodes registered in ZooKeeper (`<ip>:<port>-<hostname>` znode names), sorted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub registered_nodes: Vec<String>,

    /// The service code this resource owns in ZooKeeper, recorded when first registered.
    /// `spec.serviceCode` must keep this value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_code: Option<String>,

    /// The scale or delete operation in flight, persisted so a new leader can finish it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<OperationStatus>,

    /// The cache migration in flight (updated about once a second while items move) or the
    /// last one done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationStatus>,
}

/// Items moving with the ring: on scale-in, scale-out and around each node of a rolling
/// restart.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = rules::on_migration)]
pub struct MigrationStatus {
    /// What moves the items, e.g. `scale-in 5→3`, `scale-out 3→4`, `restart of arcus-4`.
    pub operation: String,
    /// The node being rolled or joining, when there is one (pod name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// `Pass1`, `Pass2`, `Done` or `Failed`.
    pub phase: String,
    /// Items decided and done so far (copied, updated, skipped because expired or newer).
    // The API server knows int64, not schemars' uint64 (kubectl warns "unrecognized format").
    #[schemars(extend("format" = "int64"))]
    pub items_moved: u64,
    /// Items the listings found to move so far (grows while changed keys are found).
    #[schemars(extend("format" = "int64"))]
    pub items_to_move: u64,
    /// One line for `kubectl get`: `<operation> [<node>]: <phase> <moved>/<to move>`.
    pub summary: String,
    /// The epoch of the operation record (in ZooKeeper) this report belongs to; the API
    /// server refuses a report older than the stored one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<i64>,
}

/// A status condition, shaped like Kubernetes' `metav1.Condition`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Available, Progressing or Degraded.
    #[serde(rename = "type")]
    pub type_: ConditionType,
    /// True, False or Unknown.
    pub status: ConditionStatus,
    /// One CamelCase word for the cause, e.g. `ScalingOut` or `ServiceCodeConflict`.
    pub reason: String,
    /// What happened, in a sentence.
    pub message: String,
    /// When `status` last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "time_schema")]
    pub last_transition_time: Option<Time>,
    /// The `metadata.generation` the condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The kinds of [`Condition`].
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
pub enum ConditionType {
    Available,
    Progressing,
    Degraded,
}

/// A [`Condition`]'s truth value.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

/// An operation that takes several reconciles (ZooKeeper and StatefulSet changes in order).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OperationStatus {
    /// ScaleOut, ScaleIn, Restart or Delete.
    pub kind: OperationKind,
    /// The stage reached. While the ring changes, the persisted operation's stage:
    /// `Pass1Done` (ScaleIn), `AwaitRegistration` or `HeldOut` (ScaleOut), `Draining`,
    /// `Drained`, `AwaitReturn` or `HeldOut` (Restart); otherwise the ZooKeeper plan's:
    /// `CreatingMappings`, `WaitingForPods` or `RemovingMappings`.
    pub phase: String,
    /// Replicas before the operation.
    pub from_replicas: i32,
    /// Replicas the operation moves to.
    pub to_replicas: i32,
    /// When the operation started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "time_schema")]
    pub started_at: Option<Time>,
}

/// The kinds of [`OperationStatus`].
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum OperationKind {
    ScaleOut,
    ScaleIn,
    Delete,
    /// A cache-aware restart of one node (a rolling restart's step, or healing a node that
    /// left ZooKeeper).
    Restart,
}

fn default_replicas() -> i32 {
    1
}
fn default_port() -> i32 {
    11211
}
fn default_memlimit() -> i32 {
    100
}
fn default_connections() -> i32 {
    1000
}
fn default_threads() -> i32 {
    4
}
fn default_termination_grace() -> i64 {
    30
}
fn default_exporter_image() -> String {
    "prom/memcached-exporter:v0.15.3".to_string()
}
fn default_exporter_port() -> i32 {
    9150
}
fn default_scrape_interval() -> String {
    "30s".to_string()
}

/// Kubernetes `resource.Quantity`: an integer or a string such as `500m` or `1Gi`. (No `anyOf`
/// of the two types: kube's structural rewriter would strip their `type`s anyway.)
fn quantity_schema() -> serde_json::Value {
    serde_json::json!({
        "pattern": r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$",
        "x-kubernetes-int-or-string": true
    })
}

fn resources_schema(_: &mut SchemaGenerator) -> Schema {
    let quantities = serde_json::json!({
        "type": "object",
        "additionalProperties": quantity_schema(),
    });
    json_schema!({
        "type": "object",
        "properties": {
            "limits": {
                "description": "Maximum amount of compute resources allowed (e.g. cpu: 500m, memory: 256Mi).",
                "type": "object",
                "additionalProperties": quantities["additionalProperties"],
            },
            "requests": {
                "description": "Minimum amount of compute resources required (e.g. cpu: 100m, memory: 128Mi).",
                "type": "object",
                "additionalProperties": quantities["additionalProperties"],
            },
        },
    })
}

fn tolerations_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "items": {
            "type": "object",
            "properties": {
                "key": {"description": "Taint key the toleration applies to; empty matches all keys (with operator Exists).", "type": "string"},
                "operator": {"description": "Exists or Equal (default).", "type": "string", "enum": ["Exists", "Equal"]},
                "value": {"description": "Taint value the toleration matches (operator Equal).", "type": "string"},
                "effect": {"description": "Taint effect to match: NoSchedule, PreferNoSchedule or NoExecute; empty matches all.", "type": "string", "enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]},
                "tolerationSeconds": {"description": "For NoExecute: seconds the pod stays bound after the taint appears.", "type": "integer", "format": "int64"},
            },
        },
    })
}

/// For Kubernetes types whose schema is large and version-dependent (Affinity, the security
/// contexts): the API server validates the pod template when the StatefulSet is applied, and
/// that error reaches the status.
fn preserved_object_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    })
}

fn preserved_objects_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "items": {
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": true,
        },
    })
}

fn local_object_references_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "items": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"description": "Name of a Secret of type kubernetes.io/dockerconfigjson in the resource's namespace.", "type": "string", "minLength": 1},
            },
        },
    })
}

fn time_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "format": "date-time",
    })
}

/// The CustomResourceDefinition `memcacheds.jam2in.com` (apiextensions.k8s.io/v1).
pub fn crd() -> CustomResourceDefinition {
    let mut crd = ArcusMemcached::crd();
    // The seed names it; the derive leaves it to the API server's default.
    crd.spec.names.list_kind = Some("ArcusMemcachedList".into());
    crd
}

/// [`crd`] as YAML: what `arcus-operator crd` prints and `deploy/crd.yaml` holds. Deterministic
/// (schema properties are sorted maps).
pub fn crd_yaml() -> String {
    serde_saphyr::to_string(&crd()).expect("a CustomResourceDefinition always serializes to YAML")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use kube::core::Rule;
    use serde_json::Value;

    /// The seed's `arcus_memcached.yaml`, verbatim (comments included).
    pub(crate) const SEED_CR_YAML: &str = r#"apiVersion: jam2in.com/v1
kind: ArcusMemcached
metadata:
  name: test
spec:
  # 생성할 캐시 노드의 컨테이너 대수
  replicas: 3
  # 서비스 코드
  serviceCode: test
  # 캐시 클러스터 관리를 위한 ZooKeeper 서버 주소
  zookeeperServers:
    - 1.2.3.4:2181
  # 캐시 프로세스의 구동 옵션
  configuration:
    memlimit: 100
    connections: 1000
    threads: 10
  # ARCUS Memcached의 Docker 이미지 정보
  image:
    name: jam2in/arcus-memcached:1.11.7
    pullPolicy: Always
"#;

    /// The seed's CR as the API server would return it: namespace `default`, a uid, generation 1.
    pub(crate) fn seed_cr() -> ArcusMemcached {
        let mut cr: ArcusMemcached = serde_saphyr::from_str(SEED_CR_YAML).unwrap();
        cr.metadata.namespace = Some("default".into());
        cr.metadata.uid = Some("6f1c2b1e-0000-4000-8000-000000000001".into());
        cr.metadata.generation = Some(1);
        cr
    }

    fn schema() -> Value {
        let crd = serde_json::to_value(crd()).unwrap();
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
    }

    fn spec_prop(path: &[&str]) -> Value {
        let mut v = schema()["properties"]["spec"].clone();
        for p in path {
            v = if *p == "items" {
                v["items"].clone()
            } else {
                v["properties"][*p].clone()
            };
        }
        v
    }

    /// What `kubectl apply` users and the Helm chart install (the chart renders its copy with
    /// `helm.sh/resource-policy: keep` added).
    #[test]
    fn deploy_and_chart_crd_yaml_are_the_generated_crd() {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
        for file in ["deploy/crd.yaml", "charts/arcus-operator/files/crd.yaml"] {
            let path = format!("{root}/{file}");
            if std::env::var_os("UPDATE_SNAPSHOTS").is_some_and(|v| v == "1") {
                std::fs::write(&path, crd_yaml()).unwrap();
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                text == crd_yaml(),
                "{file} is stale: regenerate it with `UPDATE_SNAPSHOTS=1 cargo test -p arcus-operator --lib crd` \
                 (or `arcus-operator crd > {file}`)"
            );
        }
    }

    #[test]
    fn crd_yaml_is_deterministic_and_parses_back() {
        assert_eq!(crd_yaml(), crd_yaml());
        let back: CustomResourceDefinition = serde_saphyr::from_str(&crd_yaml()).unwrap();
        assert_eq!(back, crd());
    }

    #[test]
    fn names_and_columns_match_the_seed() {
        let crd = crd();
        assert_eq!(crd.metadata.name.as_deref(), Some("memcacheds.jam2in.com"));
        assert_eq!(crd.spec.group, "jam2in.com");
        assert_eq!(crd.spec.scope, "Namespaced");
        let n = &crd.spec.names;
        assert_eq!(n.kind, "ArcusMemcached");
        assert_eq!(n.list_kind.as_deref(), Some("ArcusMemcachedList"));
        assert_eq!(n.plural, "memcacheds");
        assert_eq!(n.singular.as_deref(), Some("memcached"));
        assert_eq!(n.short_names.as_deref(), Some(&["mc".to_string()][..]));
        let v = &crd.spec.versions[0];
        assert_eq!((v.name.as_str(), v.served, v.storage), ("v1", true, true));
        assert!(v.subresources.as_ref().unwrap().status.is_some());
        let cols: Vec<_> = v
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c.name.as_str(),
                    c.type_.as_str(),
                    c.json_path.as_str(),
                    c.description.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            cols,
            [
                ("Age", "date", ".metadata.creationTimestamp", None),
                (
                    "Ready",
                    "string",
                    ".status.ready",
                    Some("The number memcached nodes ready")
                ),
                (
                    "Container",
                    "string",
                    ".status.container",
                    Some("The memcached container")
                ),
                (
                    "Image",
                    "string",
                    ".status.image",
                    Some("The memcached image")
                ),
                (
                    "Message",
                    "string",
                    ".status.message",
                    Some("The memcached error message")
                ),
                // Ours, after the seed's columns.
                (
                    "Migration",
                    "string",
                    ".status.migration.summary",
                    Some("The cache migration in flight or last done: operation, node, phase, items moved/to move")
                ),
            ]
        );
    }

    #[test]
    fn schema_has_the_validation_constraints() {
        let s = schema();
        let mut required: Vec<_> = s["properties"]["spec"]["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        required.sort();
        assert_eq!(required, ["image", "serviceCode", "zookeeperServers"]);
        assert_eq!(
            spec_prop(&["image"])["required"],
            serde_json::json!(["name"])
        );

        let range = |p: &Value| (p["minimum"].as_f64(), p["maximum"].as_f64());
        let replicas = spec_prop(&["replicas"]);
        assert_eq!(range(&replicas), (Some(0.0), Some(1000.0)));
        assert_eq!(replicas["default"], 1);

        let svc = spec_prop(&["serviceCode"]);
        assert_eq!(svc["pattern"], SERVICE_CODE_PATTERN);
        assert_eq!(
            (svc["minLength"].clone(), svc["maxLength"].clone()),
            (1.into(), 128.into())
        );

        let zk = spec_prop(&["zookeeperServers"]);
        assert_eq!(
            (zk["minItems"].clone(), zk["maxItems"].clone()),
            (1.into(), 9.into())
        );
        // The shape is a CEL rule with a message (`cel_rules_are_in_the_schema`), not a pattern
        // whose error would only repeat the regex.
        assert!(zk["items"].get("pattern").is_none());
        assert_eq!(zk["items"]["maxLength"], 261);

        for (field, min, max, default) in [
            ("memlimit", 8, 1_048_576, 100),
            ("connections", 10, 65_536, 1000),
            ("threads", 1, 64, 4),
        ] {
            let p = spec_prop(&["configuration", field]);
            assert_eq!(range(&p), (Some(min as f64), Some(max as f64)), "{field}");
            assert_eq!(p["default"], default, "{field}");
        }
        let port = spec_prop(&["port"]);
        assert_eq!(range(&port), (Some(1.0), Some(65535.0)));
        assert_eq!(port["default"], 11211);
        assert_eq!(
            range(&spec_prop(&["zkSessionTimeoutSeconds"])),
            (Some(10.0), Some(2000.0))
        );
        let grace = spec_prop(&["terminationGracePeriodSeconds"]);
        assert_eq!(range(&grace), (Some(0.0), Some(3600.0)));
        assert_eq!(grace["default"], 30);
        let quantity = spec_prop(&["resources", "limits"])["additionalProperties"].clone();
        assert_eq!(quantity["x-kubernetes-int-or-string"], true);
        assert!(quantity["pattern"].is_string());

        let pull = spec_prop(&["image", "pullPolicy"]);
        assert_eq!(
            pull["enum"],
            serde_json::json!(["Always", "IfNotPresent", "Never"])
        );
        assert_eq!(pull["default"], "IfNotPresent");
        assert_eq!(spec_prop(&["image", "name"])["minLength"], 1);
    }

    /// The rules (expression and message) at `v["x-kubernetes-validations"]`.
    fn rules_at(v: &Value) -> Vec<(String, String, Option<String>)> {
        v["x-kubernetes-validations"]
            .as_array()
            .unwrap_or_else(|| panic!("no x-kubernetes-validations in {v}"))
            .iter()
            .map(|r| {
                (
                    r["rule"].as_str().unwrap().to_string(),
                    r["message"].as_str().unwrap().to_string(),
                    r["fieldPath"].as_str().map(String::from),
                )
            })
            .collect()
    }

    fn as_tuple(r: Rule) -> (String, String, Option<String>) {
        let kube::core::Message::Message(m) = r.message.expect("every rule has a message") else {
            panic!("static messages only")
        };
        (r.rule, m, r.field_path)
    }

    /// Every `format` is one the API server knows: another one makes kubectl print
    /// `Warning: unrecognized format` on each request touching the resource.
    #[test]
    fn schema_formats_are_known_to_kubernetes() {
        fn formats(v: &serde_json::Value, out: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(m) => {
                    if let Some(serde_json::Value::String(f)) = m.get("format") {
                        out.push(f.clone());
                    }
                    m.values().for_each(|x| formats(x, out));
                }
                serde_json::Value::Array(a) => a.iter().for_each(|x| formats(x, out)),
                _ => {}
            }
        }
        let mut found = Vec::new();
        formats(&schema(), &mut found);
        let known = [
            "int32",
            "int64",
            "float",
            "double",
            "byte",
            "date",
            "date-time",
            "duration",
            "int-or-string",
        ];
        for f in &found {
            assert!(
                known.contains(&f.as_str()),
                "format {f:?} is not one Kubernetes knows"
            );
        }
        assert!(!found.is_empty());
    }

    #[test]
    fn cel_rules_are_in_the_schema() {
        let root = schema();
        assert_eq!(
            rules_at(&root),
            [rules::name_dns1035(), rules::name_length()].map(as_tuple)
        );
        assert_eq!(
            rules_at(&root["properties"]["spec"]),
            [rules::exporter_port_clash(), rules::memlimit_fits()].map(as_tuple)
        );
        assert_eq!(
            rules_at(&spec_prop(&["serviceCode"])),
            [rules::service_code_immutable()].map(as_tuple)
        );
        assert_eq!(
            rules_at(&spec_prop(&["zookeeperServers"])),
            [rules::zookeeper_servers_unique()].map(as_tuple)
        );
        assert_eq!(
            rules_at(&spec_prop(&["zookeeperServers", "items"])),
            [
                rules::zookeeper_server_shape(),
                rules::zookeeper_server_port()
            ]
            .map(as_tuple)
        );
        assert_eq!(
            rules_at(&spec_prop(&["podLabels"])),
            [rules::pod_labels_not_reserved()].map(as_tuple)
        );
    }

    #[test]
    fn cel_rules_say_what_they_check() {
        let r = |rule: Rule| as_tuple(rule).0;
        assert_eq!(r(rules::service_code_immutable()), "self == oldSelf");
        assert_eq!(
            r(rules::zookeeper_server_shape()),
            format!("self.matches(r'{ZOOKEEPER_SERVER_PATTERN}')")
        );
        let port = r(rules::zookeeper_server_port());
        assert!(
            port.contains(">= 1 &&") && port.contains("<= 65535"),
            "{port}"
        );
        assert!(r(rules::zookeeper_servers_unique()).contains("lowerAscii()"));
        assert_eq!(
            r(rules::name_length()),
            format!(
                "self.metadata.name.size() <= {}",
                crate::validate::NAME_MAX_LEN
            )
        );
        assert!(rules::NAME_LENGTH_MSG.contains(&format!(
            "longer than {} characters",
            crate::validate::NAME_MAX_LEN
        )));
        let reserved = r(rules::pod_labels_not_reserved());
        for key in labels::RESERVED {
            assert!(reserved.contains(&format!("'{key}'")), "{reserved}");
            assert!(rules::RESERVED_POD_LABELS_MSG.contains(key), "{key}");
        }
        assert!(r(rules::memlimit_fits()).contains("0.9 * quantity("));
        // A message is shown after the field's path, on one line.
        for (_, msg, _) in [
            rules::service_code_immutable(),
            rules::zookeeper_server_shape(),
            rules::zookeeper_server_port(),
            rules::zookeeper_servers_unique(),
            rules::exporter_port_clash(),
            rules::memlimit_fits(),
            rules::pod_labels_not_reserved(),
            rules::name_dns1035(),
            rules::name_length(),
        ]
        .map(as_tuple)
        {
            assert!(!msg.contains('\n') && !msg.contains("  "), "{msg:?}");
        }
    }

    #[test]
    fn cel_rules_over_lists_and_strings_are_bounded() {
        // The API server estimates each rule's cost from these bounds and refuses a CRD whose
        // rules could cost too much (`matches` over unbounded strings, `exists_one` over an
        // unbounded list).
        let zk = spec_prop(&["zookeeperServers"]);
        assert_eq!(zk["maxItems"], limits::ZOOKEEPER_SERVERS_MAX);
        assert_eq!(zk["items"]["maxLength"], limits::ZOOKEEPER_SERVER_MAX_LEN);
    }

    #[test]
    fn schema_is_structural() {
        // The structural rules that matter here: every node has a type (or is int-or-string /
        // preserve-unknown-fields), and no type/properties/items hide inside anyOf/oneOf/allOf.
        fn walk(path: &str, v: &Value) {
            let o = v
                .as_object()
                .unwrap_or_else(|| panic!("{path}: schema is not an object"));
            assert!(!o.contains_key("$ref"), "{path}: $ref");
            assert!(!o.contains_key("oneOf"), "{path}: oneOf");
            assert!(!o.contains_key("allOf"), "{path}: allOf");
            let int_or_string = o.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true));
            let preserve =
                o.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
            assert!(
                o.contains_key("type") || int_or_string || preserve,
                "{path}: no type"
            );
            assert!(!o.contains_key("anyOf"), "{path}: anyOf");
            // An empty-string default says nothing an absent field does not, and API servers
            // have refused it ("in body must be of type string: null").
            assert_ne!(
                o.get("default"),
                Some(&Value::String(String::new())),
                "{path}: default \"\""
            );
            if o.get("type") == Some(&Value::String("object".into())) {
                assert!(
                    !(o.contains_key("properties") && o.contains_key("additionalProperties")),
                    "{path}: both properties and additionalProperties"
                );
            }
            for (k, sub) in o
                .get("properties")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
            {
                walk(&format!("{path}.{k}"), sub);
            }
            if let Some(items) = o.get("items") {
                walk(&format!("{path}[]"), items);
            }
            if let Some(ap) = o.get("additionalProperties").filter(|v| v.is_object()) {
                walk(&format!("{path}{{}}"), ap);
            }
        }
        walk("", &schema());
    }

    #[test]
    fn every_spec_and_status_field_has_a_description() {
        fn walk(path: &str, v: &Value) {
            for (k, sub) in v
                .get("properties")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
            {
                let p = format!("{path}.{k}");
                let desc = sub.get("description").and_then(Value::as_str).unwrap_or("");
                assert!(
                    !desc.trim().is_empty(),
                    "{p} has no description (kubectl explain)"
                );
                walk(&p, sub);
                if let Some(items) = sub.get("items") {
                    walk(&format!("{p}[]"), items);
                }
            }
        }
        let s = schema();
        walk("spec", &s["properties"]["spec"]);
        walk("status", &s["properties"]["status"]);
    }

    #[test]
    fn seed_cr_deserializes_unchanged() {
        let cr: ArcusMemcached = serde_saphyr::from_str(SEED_CR_YAML).unwrap();
        assert_eq!(cr.metadata.name.as_deref(), Some("test"));
        let s = &cr.spec;
        assert_eq!(s.replicas, 3);
        assert_eq!(s.service_code, "test");
        assert_eq!(s.zookeeper_servers, ["1.2.3.4:2181"]);
        assert_eq!(
            s.configuration,
            Configuration {
                memlimit: 100,
                connections: 1000,
                threads: 10
            }
        );
        assert_eq!(
            s.image,
            Image {
                name: "jam2in/arcus-memcached:1.11.7".into(),
                pull_policy: PullPolicy::Always
            }
        );
        // Extras take their defaults.
        assert_eq!(s.port, 11211);
        assert_eq!(s.termination_grace_period_seconds, 30);
        assert_eq!(s.zk_session_timeout_seconds, None);
        assert!(s.resources.is_none() && s.affinity.is_none() && s.metrics_exporter.is_none());
        assert!(s.tolerations.is_empty() && s.node_selector.is_empty());
        assert!(s.pod_labels.is_empty() && s.pod_annotations.is_empty());
        assert!(cr.status.is_none());
    }

    #[test]
    fn minimal_cr_takes_defaults() {
        let cr: ArcusMemcached = serde_json::from_value(serde_json::json!({
            "apiVersion": "jam2in.com/v1", "kind": "ArcusMemcached", "metadata": {"name": "m"},
            "spec": {"serviceCode": "svc", "zookeeperServers": ["zk:2181"], "image": {"name": "arcus"}}
        }))
        .unwrap();
        assert_eq!(cr.spec.replicas, 1);
        assert_eq!(cr.spec.configuration, Configuration::default());
        assert_eq!(
            cr.spec.configuration,
            Configuration {
                memlimit: 100,
                connections: 1000,
                threads: 4
            }
        );
        assert_eq!(cr.spec.image.pull_policy, PullPolicy::IfNotPresent);
    }

    #[test]
    fn deploy_sample_deserializes() {
        let cr: ArcusMemcached =
            serde_saphyr::from_str(include_str!("../../../deploy/samples/arcus_memcached.yaml"))
                .unwrap();
        assert_eq!(cr.metadata.name.as_deref(), Some("test"));
        assert_eq!(cr.spec.zookeeper_servers, ["10.244.0.1:2181"]);
        assert_eq!(cr.spec.replicas, 3);
    }

    #[test]
    fn empty_status_serializes_to_nothing() {
        assert_eq!(
            serde_json::to_value(ArcusMemcachedStatus::default()).unwrap(),
            serde_json::json!({})
        );
        let status = ArcusMemcachedStatus {
            ready: Some("3/3".into()),
            conditions: vec![Condition {
                type_: ConditionType::Available,
                status: ConditionStatus::True,
                reason: "AllNodesReady".into(),
                message: "3 of 3 nodes ready".into(),
                last_transition_time: None,
                observed_generation: Some(1),
            }],
            operation: Some(OperationStatus {
                kind: OperationKind::ScaleOut,
                phase: "MappingsCreated".into(),
                from_replicas: 3,
                to_replicas: 5,
                started_at: None,
            }),
            ..Default::default()
        };
        assert_eq!(
            serde_json::to_value(&status).unwrap(),
            serde_json::json!({
                "ready": "3/3",
                "conditions": [{"type": "Available", "status": "True", "reason": "AllNodesReady", "message": "3 of 3 nodes ready", "observedGeneration": 1}],
                "operation": {"kind": "ScaleOut", "phase": "MappingsCreated", "fromReplicas": 3, "toReplicas": 5}
            })
        );
    }
}
