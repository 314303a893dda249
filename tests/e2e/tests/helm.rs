//! The Helm chart `charts/arcus-operator`.
//!
//! Without the sandbox: `helm lint --strict`, `helm template` against goldens (default values and
//! `tests/custom-values.yaml`; `UPDATE_SNAPSHOTS=1` rewrites them), the chart against
//! deploy/*.yaml, the rendered CRD against `arcus-operator crd`, and the schema refusing bad
//! values. On the sandbox: install → upgrade → uninstall → install again, with a cache cluster
//! that keeps its pods and ZooKeeper state throughout.
//!
//! helm: `$ARCUS_HELM`, else the path `scripts/build-control-plane --helm` prints (it builds helm
//! once into the sandbox cache).

use arcus_operator::crd::ArcusMemcached;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;
use test_support::operator::leader_pod;
use test_support::sandbox::{pod_ready, repo_dir, Sandbox, TestNamespace, ZOOKEEPER};
use test_support::wait_until;
use zookeeper_client as zk;

const CHART: &str = "charts/arcus-operator";
/// Named like the chart, so the full name (objects, OPERATOR_NAME, the Lease
/// `arcus-operator-leader`) is `arcus-operator`, as with deploy/*.yaml.
const RELEASE: &str = "arcus-operator";
const CRD_NAME: &str = "memcacheds.jam2in.com";
/// The image tags the life-cycle test runs: `arcus-operator:<tag>` must exist for both (the
/// sandbox's image table maps every tag of `arcus-operator` to target/debug/arcus-operator; with
/// OCI images from target/images both tags must have been built). INSTALL_TAG is the chart's
/// appVersion; UPGRADE_TAG only has to differ from it, so that the upgrade rolls every pod.
const INSTALL_TAG: &str = "0.1.0";
const UPGRADE_TAG: &str = "latest";
/// Whether the life-cycle test's namespace enforces the Pod Security Standard "restricted" (the
/// chart's defaults and the operator's cache pods must both pass it); false only warns.
const ENFORCE_RESTRICTED: bool = true;
const MAPPINGS: &str = "/arcus/cache_server_mapping";
const OPERATOR_SELECTOR: &str =
    "app.kubernetes.io/name=arcus-operator,app.kubernetes.io/instance=arcus-operator";

// ---- helm -----------------------------------------------------------------------------------

fn helm_path() -> &'static Path {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(|| {
        if let Some(p) = std::env::var_os("ARCUS_HELM").filter(|p| !p.is_empty()) {
            return PathBuf::from(p);
        }
        let script = repo_dir().join("scripts/build-control-plane");
        let out = Command::new(&script)
            .arg("--helm")
            .stderr(std::process::Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("running {} --helm: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} --helm failed ({}); see its output above, or set ARCUS_HELM to a helm binary",
            script.display(),
            out.status
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let path = PathBuf::from(stdout.lines().last().unwrap_or_default().trim());
        assert!(
            path.is_file(),
            "{} --helm printed {path:?}, which is no file",
            script.display()
        );
        path
    })
}

/// Runs helm in the repository with its own config/cache dirs (none of the user's repositories
/// or plugins); returns (success, stdout, stderr).
fn helm(args: &[&str]) -> (bool, String, String) {
    let home = Path::new(env!("CARGO_TARGET_TMPDIR")).join("helm-home");
    let out = Command::new(helm_path())
        .current_dir(repo_dir())
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_DATA_HOME", home.join("data"))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", helm_path().display()));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn helm_ok(args: &[&str]) -> anyhow::Result<String> {
    let (ok, stdout, stderr) = helm(args);
    anyhow::ensure!(ok, "helm {} failed:\n{stderr}{stdout}", args.join(" "));
    Ok(stdout)
}

/// helm on a thread of its own: `--wait` blocks for minutes.
async fn helm_async(args: Vec<String>) -> anyhow::Result<String> {
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        helm_ok(&args)
    })
    .await?
}

fn template(extra: &[&str]) -> String {
    let mut args = vec!["template", RELEASE, CHART, "--namespace", "arcus-system"];
    args.extend_from_slice(extra);
    helm_ok(&args).unwrap_or_else(|e| panic!("{e}"))
}

/// The documents of a multi-document YAML text (nulls, e.g. empty documents, dropped).
fn docs(text: &str) -> Vec<Value> {
    let all: Vec<Value> =
        serde_saphyr::from_multiple(text).unwrap_or_else(|e| panic!("parsing YAML: {e}\n{text}"));
    all.into_iter().filter(|d| !d.is_null()).collect()
}

fn repo_docs(path: &str) -> Vec<Value> {
    let p = repo_dir().join(path);
    docs(&std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display())))
}

fn find<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn one<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    let found = find(docs, kind);
    assert_eq!(found.len(), 1, "expected one {kind}, found {}", found.len());
    found[0]
}

// ---- goldens --------------------------------------------------------------------------------

/// The CRD's spec is compared with `arcus-operator crd` by its own test; eliding it here keeps the
/// goldens about the chart (a CRD change does not touch them).
fn elide_crd_spec(rendered: &str) -> String {
    rendered
        .split("\n---\n")
        .map(|doc| {
            if doc.contains("# Source: arcus-operator/templates/crd.yaml") {
                let head = doc.split("\nspec:\n").next().unwrap_or(doc);
                format!("{head}\n# spec: elided (the test chart_crd_equals_operator_crd compares it with `arcus-operator crd`)\n")
            } else {
                doc.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n---\n")
}

fn assert_golden(name: &str, rendered: &str) {
    let path = repo_dir()
        .join(CHART)
        .join("tests/golden")
        .join(format!("{name}.yaml"));
    let actual = elide_crd_spec(rendered);
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some_and(|v| v == "1") {
        std::fs::write(&path, &actual)
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    if expected != actual {
        let (e, a): (Vec<_>, Vec<_>) = (expected.lines().collect(), actual.lines().collect());
        let diff: Vec<String> = (0..e.len().max(a.len()))
            .filter(|&i| e.get(i) != a.get(i))
            .take(40)
            .map(|i| {
                format!(
                    "line {}:\n  - {}\n  + {}",
                    i + 1,
                    e.get(i).unwrap_or(&"<none>"),
                    a.get(i).unwrap_or(&"<none>")
                )
            })
            .collect();
        panic!(
            "golden {} differs (rerun with UPDATE_SNAPSHOTS=1 to accept):\n{}",
            path.display(),
            diff.join("\n")
        );
    }
}

/// JSON numbers as f64: `maximum: 65536.0` (deploy/crd.yaml) and `65536` (Helm's toYaml) are the
/// same number to the API server.
fn normalize_numbers(v: &mut Value) {
    match v {
        Value::Number(n) => *v = json!(n.as_f64().expect("finite number")),
        Value::Array(a) => a.iter_mut().for_each(normalize_numbers),
        Value::Object(o) => o.values_mut().for_each(normalize_numbers),
        _ => {}
    }
}

// ---- pure tests -----------------------------------------------------------------------------

#[test]
fn lint_strict_is_clean() {
    for extra in [
        vec![],
        vec!["-f", "charts/arcus-operator/tests/custom-values.yaml"],
    ] {
        let mut args = vec!["lint", "--strict", CHART];
        args.extend_from_slice(&extra);
        let out = helm_ok(&args).unwrap_or_else(|e| panic!("{e}"));
        assert!(
            out.contains("1 chart(s) linted, 0 chart(s) failed")
                && !out.contains("[WARNING]")
                && !out.contains("[ERROR]"),
            "helm {}:\n{out}",
            args.join(" ")
        );
    }
}

#[test]
fn template_default_values_matches_golden() {
    assert_golden("default", &template(&[]));
}

#[test]
fn template_custom_values_matches_golden() {
    let rendered = helm_ok(&[
        "template",
        "cache-ops",
        CHART,
        "--namespace",
        "ops",
        "-f",
        "charts/arcus-operator/tests/custom-values.yaml",
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    assert_golden("custom", &rendered);
    // What the custom values are there for, stated outside the golden.
    let d = docs(&rendered);
    assert!(
        find(&d, "CustomResourceDefinition").is_empty(),
        "crds.install=false"
    );
    assert!(find(&d, "ClusterRole").is_empty() && find(&d, "ClusterRoleBinding").is_empty());
    let c = &one(&d, "Deployment")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        c["image"],
        "registry.example/arcus/arcus-operator@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "the digest wins over the tag"
    );
    assert_eq!(c["args"], json!(["run", "--no-leader-election"]));
    assert_eq!(
        one(&d, "ServiceMonitor")["metadata"]["labels"]["release"],
        "prometheus"
    );
    assert_eq!(one(&d, "Service")["spec"]["ports"][0]["port"], 9090);
}

/// Default values produce the operator of deploy/*.yaml: its ClusterRole's rules, its container
/// (probes, ports, resources, env), plus what the chart adds.
#[test]
fn default_values_produce_the_deploy_yaml_operator() {
    let d = docs(&template(&[]));
    let rbac = repo_docs("deploy/rbac.yaml");
    assert_eq!(
        one(&d, "ClusterRole")["rules"],
        one(&rbac, "ClusterRole")["rules"],
        "the chart's ClusterRole rules differ from deploy/rbac.yaml's"
    );
    let binding = one(&d, "ClusterRoleBinding");
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "arcus-operator", "namespace": "arcus-system"}])
    );
    assert_eq!(
        one(&d, "ServiceAccount")["metadata"]["name"],
        "arcus-operator"
    );

    let ours = one(&d, "Deployment");
    let seed = &repo_docs("deploy/operator.yaml")
        .into_iter()
        .find(|x| x["kind"] == "Deployment")
        .expect("deploy/operator.yaml has a Deployment");
    assert_eq!(ours["spec"]["replicas"], 3);
    assert_eq!(ours["spec"]["strategy"]["type"], "RollingUpdate");
    assert_eq!(
        ours["spec"]["selector"]["matchLabels"],
        json!({"app.kubernetes.io/name": "arcus-operator", "app.kubernetes.io/instance": RELEASE}),
        "the selector is immutable: only name and instance"
    );
    let pod = &ours["spec"]["template"];
    for l in [
        "app.kubernetes.io/version",
        "app.kubernetes.io/managed-by",
        "helm.sh/chart",
    ] {
        assert!(pod["metadata"]["labels"].get(l).is_some(), "pod label {l}");
    }
    let c = &pod["spec"]["containers"][0];
    let s = &seed["spec"]["template"]["spec"]["containers"][0];
    assert!(
        c.get("command").is_none(),
        "no command: the image's entrypoint runs"
    );
    assert_eq!(c["args"], json!(["run"]));
    assert_eq!(
        c["image"], "arcus-operator:0.1.0",
        "default tag: appVersion"
    );
    for field in [
        "ports",
        "readinessProbe",
        "livenessProbe",
        "resources",
        "imagePullPolicy",
        "securityContext",
        "image",
    ] {
        assert_eq!(
            c[field], s[field],
            "container {field} differs from deploy/operator.yaml"
        );
    }
    let env: BTreeMap<String, Value> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["name"].as_str().unwrap().to_string(), e.clone()))
        .collect();
    for e in s["env"].as_array().unwrap() {
        let name = e["name"].as_str().unwrap();
        assert_eq!(
            env.get(name),
            Some(e),
            "env {name} differs from deploy/operator.yaml"
        );
    }
    assert_eq!(
        pod["spec"]["securityContext"], seed["spec"]["template"]["spec"]["securityContext"],
        "pod securityContext differs from deploy/operator.yaml"
    );
    // Pod Security "restricted" (the life-cycle test has the API server check it for real).
    let psc = &pod["spec"]["securityContext"];
    assert_eq!(psc["runAsNonRoot"], true);
    assert_eq!(psc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    assert!(find(&d, "ServiceMonitor").is_empty() && find(&d, "Service").is_empty());
}

/// watchNamespaces: Roles where the operator works, one for the Lease in the release namespace,
/// and nothing cluster-scoped but the CRD.
#[test]
fn watch_namespaces_make_rbac_namespaced() {
    let d = docs(&template(&["--set", "watchNamespaces={a,b}"]));
    assert!(find(&d, "ClusterRole").is_empty() && find(&d, "ClusterRoleBinding").is_empty());
    let mut where_: BTreeSet<(String, String)> = BTreeSet::new();
    let mut rules: Vec<Value> = Vec::new();
    for r in find(&d, "Role") {
        where_.insert((
            r["metadata"]["namespace"].as_str().unwrap().into(),
            r["metadata"]["name"].as_str().unwrap().into(),
        ));
        rules.extend(r["rules"].as_array().unwrap().iter().cloned());
    }
    let want: BTreeSet<(String, String)> = [
        ("a", "arcus-operator"),
        ("b", "arcus-operator"),
        ("arcus-system", "arcus-operator-leader-election"),
    ]
    .iter()
    .map(|(n, r)| (n.to_string(), r.to_string()))
    .collect();
    assert_eq!(where_, want);
    for b in find(&d, "RoleBinding") {
        assert_eq!(b["roleRef"]["name"], b["metadata"]["name"]);
        assert_eq!(b["subjects"][0]["namespace"], "arcus-system");
    }
    // Together the Roles grant deploy/rbac.yaml's rules but the (cluster-scoped) CRD lookup,
    // which the operator does not need: it asks API discovery.
    let rbac = repo_docs("deploy/rbac.yaml");
    for rule in one(&rbac, "ClusterRole")["rules"].as_array().unwrap() {
        let cluster_scoped = rule["apiGroups"] == json!(["apiextensions.k8s.io"]);
        assert_eq!(
            rules.contains(rule),
            !cluster_scoped,
            "rule {rule} (namespaced Roles)"
        );
    }
    let env = &one(&d, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"];
    assert_eq!(env[0], json!({"name": "WATCH_NAMESPACE", "value": "a,b"}));
}

#[test]
fn chart_crd_equals_operator_crd() {
    let d = docs(&template(&["--show-only", "templates/crd.yaml"]));
    let mut ours = one(&d, "CustomResourceDefinition").clone();
    let meta = ours["metadata"].as_object_mut().unwrap();
    let annotations = meta.remove("annotations").unwrap_or_default();
    let labels = meta.remove("labels").unwrap_or_default();
    assert_eq!(
        annotations,
        json!({"helm.sh/resource-policy": "keep"}),
        "helm uninstall must keep the CRD"
    );
    assert_eq!(labels["app.kubernetes.io/managed-by"], "Helm");
    assert_eq!(labels["helm.sh/chart"], "arcus-operator-0.1.0");
    let mut operator = docs(&arcus_operator::crd::crd_yaml()).remove(0);
    normalize_numbers(&mut ours);
    normalize_numbers(&mut operator);
    assert!(
        ours == operator,
        "the chart's CRD differs from `arcus-operator crd`: copy deploy/crd.yaml to \
         charts/arcus-operator/files/crd.yaml (regenerate deploy/crd.yaml first with \
         `UPDATE_SNAPSHOTS=1 cargo test -p arcus-operator --lib crd`)"
    );
    assert!(
        docs(&template(&["--set", "crds.install=false"]))
            .iter()
            .all(|x| x["kind"] != "CustomResourceDefinition"),
        "crds.install=false renders no CRD"
    );
}

#[test]
fn bad_values_fail_naming_the_field() {
    for (set, names) in [
        ("replicas=3", "additional properties 'replicas' not allowed"),
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("replicaCount=0", "/replicaCount"),
        ("watchNamespaces={Not_A_Namespace}", "/watchNamespaces/0"),
        ("image.digest=latest", "/image/digest"),
    ] {
        let (ok, stdout, stderr) = helm(&["template", RELEASE, CHART, "--set", set]);
        assert!(!ok, "--set {set} must fail, rendered:\n{stdout}");
        assert!(
            stderr.contains("values don't meet the specifications of the schema")
                && stderr.contains(names),
            "--set {set}: the error must name {names:?}:\n{stderr}"
        );
    }
}

#[test]
fn no_leader_election_needs_one_replica() {
    let (ok, _, stderr) = helm(&[
        "template",
        RELEASE,
        CHART,
        "--set",
        "leaderElection.enabled=false",
    ]);
    assert!(
        !ok && stderr.contains("leaderElection.enabled=false needs replicaCount: 1"),
        "{stderr}"
    );
    let d = docs(&template(&[
        "--set",
        "leaderElection.enabled=false",
        "--set",
        "replicaCount=1",
    ]));
    let dep = one(&d, "Deployment");
    assert_eq!(
        dep["spec"]["template"]["spec"]["containers"][0]["args"],
        json!(["run", "--no-leader-election"])
    );
    assert_eq!(
        dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"], 0,
        "never two reconcilers"
    );
}

#[test]
fn kubernetes_older_than_1_33_is_refused() {
    let (ok, _, stderr) = helm(&["template", RELEASE, CHART, "--kube-version", "1.32.0"]);
    assert!(!ok && stderr.contains(">=1.33.0-0"), "{stderr}");
}

/// The pod template's checksum follows the operator's configuration and nothing else.
#[test]
fn checksum_rolls_the_operator_only_for_its_configuration() {
    let checksum = |extra: &[&str]| {
        let d = docs(&template(extra));
        one(&d, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
            .as_str()
            .expect("checksum/config")
            .to_string()
    };
    let base = checksum(&[]);
    assert_eq!(base, checksum(&["--set", "serviceMonitor.enabled=true"]));
    assert_eq!(base, checksum(&["--set", "crds.install=false"]));
    assert_eq!(base, checksum(&["--set", "resources.limits.memory=1Gi"]));
    assert_ne!(base, checksum(&["--set", "logLevel=debug"]));
    assert_ne!(base, checksum(&["--set", "watchNamespaces={a}"]));
}

// ---- on the sandbox -------------------------------------------------------------------------

/// `kubectl auth can-i <verb> <group>/<resource> -n <namespace> --as <user>`, asked with a
/// SubjectAccessReview (empty namespace: cluster-wide; `resource` may be `<resource>/<name>`).
async fn can_i(
    sb: &Sandbox,
    user: &str,
    verb: &str,
    group: &str,
    resource: &str,
    namespace: &str,
) -> anyhow::Result<bool> {
    use k8s_openapi::api::authorization::v1::SubjectAccessReview;
    let (resource, name) = resource.split_once('/').unwrap_or((resource, ""));
    let review: SubjectAccessReview = serde_json::from_value(json!({
        "apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
        "spec": {
            "user": user,
            "groups": ["system:serviceaccounts", "system:authenticated"],
            "resourceAttributes": {
                "verb": verb, "group": group, "resource": resource, "namespace": namespace,
                "name": name
            }
        }
    }))?;
    let answer = Api::<SubjectAccessReview>::all(sb.client.clone())
        .create(&PostParams::default(), &review)
        .await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

/// The operator's ServiceAccount, installed with `watchNamespaces` (Roles, no ClusterRole for
/// the workload): it cannot read Secrets, touch pods outside the watched namespace, or grant
/// itself more; and it can do what it uses.
async fn least_privilege(sb: &Sandbox, ns: &str, sa: &str) -> anyhow::Result<()> {
    let user = format!("system:serviceaccount:{ns}:{sa}");
    let rbac = "rbac.authorization.k8s.io";
    let checks = [
        ("get", "", "secrets", ns, false),
        ("list", "", "secrets", "", false),
        ("list", "", "secrets", ns, false),
        ("get", "", "secrets/other-secret", ns, false),
        // spec.zookeeperAuth's Secret, by the name the chart allows, and nothing else.
        ("get", "", "secrets/arcus-zookeeper-auth", ns, true),
        ("get", "", "secrets/arcus-zookeeper-auth", "default", false),
        ("list", "", "pods", "default", false),
        ("delete", "", "pods", "kube-system", false),
        ("patch", "apps", "statefulsets", "default", false),
        ("escalate", rbac, "roles", ns, false),
        ("bind", rbac, "clusterroles", "", false),
        ("create", rbac, "rolebindings", ns, false),
        ("impersonate", "", "serviceaccounts", ns, false),
        ("create", "", "pods", ns, false),
        ("delete", "", "pods", ns, true),
        ("patch", "apps", "statefulsets", ns, true),
        ("watch", "jam2in.com", "memcacheds", ns, true),
    ];
    let mut wrong = Vec::new();
    for (verb, group, resource, namespace, want) in checks {
        let got = can_i(sb, &user, verb, group, resource, namespace).await?;
        if got != want {
            wrong.push(format!(
                "{verb} {group}/{resource} in {namespace:?}: {got} (want {want})"
            ));
        }
    }
    anyhow::ensure!(wrong.is_empty(), "{user}: {wrong:?}");
    Ok(())
}

/// What `spec.zookeeperAuth` promises, seen by another tenant (no credentials): the claim and a
/// mapping carry the operator's digest ACL; their nodes (the stand-in, which never
/// authenticates, like arcus-memcached) registered anyway; deleting a mapping or a node's
/// registration, or rewriting the claim, is refused.
async fn zookeeper_acl_holds(zk: &zk::Client, svc: &str, ns: &str) -> anyhow::Result<()> {
    let claim = format!("/arcus/cache_list/{svc}");
    let mapping = format!("/arcus/cache_server_mapping/test-arcus-mc-0.{ns}:11211/{svc}");
    for path in [&claim, &mapping] {
        let (acl, _) = zk.get_acl(path).await?;
        anyhow::ensure!(
            acl.iter()
                .any(|a| a.scheme() == "digest" && a.id().starts_with("arcus-e2e:"))
                && acl
                    .iter()
                    .all(|a| a.scheme() != "world" || !a.permission().has(zk::Permission::DELETE)),
            "{path}: ACL {acl:?} is not the operator's digest ACL"
        );
    }
    let nodes = zk.list_children(&claim).await?;
    anyhow::ensure!(nodes.len() == 3, "registered under {claim}: {nodes:?}");
    let refused = [
        ("delete a mapping", zk.delete(&mapping, None).await),
        (
            "delete a registration",
            zk.delete(&format!("{claim}/{}", nodes[0]), None).await,
        ),
        (
            "rewrite the claim",
            zk.set_data(&claim, b"{}", None).await.map(|_| ()),
        ),
    ];
    for (what, result) in refused {
        anyhow::ensure!(
            result == Err(zk::Error::NoAuth),
            "another tenant could {what}: {result:?}"
        );
    }
    Ok(())
}

async fn zk_client() -> anyhow::Result<zk::Client> {
    Ok(zk::Client::connector()
        .with_session_timeout(Duration::from_secs(10))
        .connect(ZOOKEEPER)
        .await?)
}

/// `<MAPPINGS>/<key>/<svc>` of this namespace's nodes → its mzxid.
async fn mapping_mzxids(
    zk: &zk::Client,
    svc: &str,
    ns: &str,
) -> anyhow::Result<BTreeMap<String, i64>> {
    let mut out = BTreeMap::new();
    for key in zk.list_children(MAPPINGS).await? {
        if !key.contains(ns) {
            continue;
        }
        let path = format!("{MAPPINGS}/{key}/{svc}");
        if let Some(stat) = zk.check_stat(&path).await? {
            out.insert(path, stat.mzxid);
        }
    }
    Ok(out)
}

/// Cache pod name → (uid, total restarts).
async fn cache_pods(ns: &TestNamespace) -> anyhow::Result<BTreeMap<String, (String, i32)>> {
    let pods: Api<Pod> = ns.api();
    Ok(pods
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|p| p.name_any().starts_with("test-arcus-mc-"))
        .map(|p| {
            let restarts = p
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .map(|cs| cs.iter().map(|c| c.restart_count).sum())
                .unwrap_or(0);
            (p.name_any(), (p.uid().unwrap_or_default(), restarts))
        })
        .collect())
}

/// The cache pods keep their uid and restart count, and the mappings their mzxid: neither the
/// operator's pods nor its release touched the cache.
async fn assert_cache_untouched(
    ns: &TestNamespace,
    zk: &zk::Client,
    svc: &str,
    pods: &BTreeMap<String, (String, i32)>,
    mappings: &BTreeMap<String, i64>,
    when: &str,
) -> anyhow::Result<()> {
    assert_eq!(
        &cache_pods(ns).await?,
        pods,
        "cache pods (uid, restarts) {when}"
    );
    assert_eq!(
        &mapping_mzxids(zk, svc, &ns.name).await?,
        mappings,
        "mapping mzxids {when}"
    );
    Ok(())
}

/// The operator pods (not terminating) when all `n` are Ready and one of them holds the Lease:
/// uid → name, and the leader's name.
async fn operator_settled(
    ns: &TestNamespace,
    n: usize,
) -> Option<(BTreeMap<String, String>, String)> {
    let pods: Api<Pod> = ns.api();
    let list = pods
        .list(&ListParams::default().labels(OPERATOR_SELECTOR))
        .await
        .ok()?;
    let live: Vec<&Pod> = list.items.iter().collect();
    if live.len() != n
        || !live
            .iter()
            .all(|p| pod_ready(p) && p.metadata.deletion_timestamp.is_none())
    {
        return None;
    }
    let leader = leader_pod(ns).await.ok()??.name_any();
    let by_uid: BTreeMap<String, String> = live
        .iter()
        .map(|p| (p.uid().unwrap_or_default(), p.name_any()))
        .collect();
    by_uid
        .values()
        .any(|name| *name == leader)
        .then_some((by_uid, leader))
}

/// Keys the life-cycle test writes before scaling and upgrading.
const KEYS: usize = 2000;

/// How many of the `KEYS` keys read back with their value.
async fn readable(client: &arcus_client::ArcusClient) -> anyhow::Result<usize> {
    let mut found = 0;
    for i in 0..KEYS {
        if let Some(item) = client.get(&format!("k{i}")).await? {
            assert_eq!(item.value, format!("v{i}").into_bytes(), "k{i}");
            found += 1;
        }
    }
    Ok(found)
}

async fn wait_ready(crs: &Api<ArcusMemcached>, want: &str, secs: u64) -> anyhow::Result<()> {
    wait_until(
        Duration::from_secs(secs),
        &format!("ArcusMemcached test status.ready == {want}"),
        || async {
            let cr = crs.get("test").await.ok()?;
            (cr.status?.ready.as_deref() == Some(want)).then_some(())
        },
    )
    .await
}

/// The operator reconciles the CR now: a headless Service deleted by hand comes back.
async fn operator_reconciles(ns: &TestNamespace, when: &str) -> anyhow::Result<()> {
    let services: Api<Service> = ns.api();
    let old = services.get("test-arcus-mc").await?.uid();
    services
        .delete("test-arcus-mc", &DeleteParams::default())
        .await?;
    wait_until(
        Duration::from_secs(60),
        &format!("the operator to re-create the Service test-arcus-mc ({when})"),
        || async {
            let s = services.get_opt("test-arcus-mc").await.ok()??;
            (s.uid() != old && s.metadata.deletion_timestamp.is_none()).then_some(())
        },
    )
    .await
}

/// Hands an existing CRD (e.g. server-side applied from deploy/crd.yaml by the other e2e tests)
/// to this release, as the chart's README tells users; Helm refuses to adopt it otherwise.
async fn adopt_crd(sb: &Sandbox, ns: &str) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(sb.client.clone());
    if crds.get_opt(CRD_NAME).await?.is_some() {
        crds.patch(
            CRD_NAME,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {
                "labels": {"app.kubernetes.io/managed-by": "Helm"},
                "annotations": {"meta.helm.sh/release-name": RELEASE, "meta.helm.sh/release-namespace": ns}
            }})),
        )
        .await?;
    }
    Ok(())
}

fn helm_args(sb: &Sandbox, verb: &str, ns: &str, tag: Option<&str>) -> Vec<String> {
    let mut a: Vec<String> = vec![verb.into(), RELEASE.into()];
    if let Some(tag) = tag {
        a.push(CHART.into());
        a.extend(["--set".into(), format!("image.tag={tag}")]);
        a.extend(["--set".into(), format!("watchNamespaces={{{ns}}}")]);
    }
    a.extend(["--namespace".into(), ns.into(), "--kubeconfig".into()]);
    a.push(sb.kubeconfig.display().to_string());
    a.extend(["--wait".into(), "--timeout".into(), "3m".into()]);
    a
}

/// Where the node agent runs `arcus-operator:<tag>` from OCI layouts (`scripts/image build`), the
/// tags this test needs must be there; say so up front rather than as an upgrade timing out.
fn check_image_tags(sb: &Sandbox) -> anyhow::Result<()> {
    let index = sb.repo.join("target/images/arcus-operator/index.json");
    let Ok(text) = std::fs::read_to_string(&index) else {
        return Ok(()); // no layout: the image table maps every tag to the binary
    };
    let parsed: Value = serde_json::from_str(&text)?;
    let tags: Vec<&str> = parsed["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str())
        .collect();
    for tag in [INSTALL_TAG, UPGRADE_TAG] {
        anyhow::ensure!(
            tags.contains(&tag),
            "{} has no tag {tag:?} (it has {tags:?}): run `scripts/image build --tag {tag}` \
             (or `--package-only` after a release build) before this test",
            index.display()
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn install_upgrade_uninstall_reinstall_keep_the_cache() -> anyhow::Result<()> {
    let sb = Sandbox::shared().await?;
    check_image_tags(sb)?;
    let ns = sb.namespace("helm").await?;
    let result = lifecycle(sb, &ns).await;
    if result.is_err() {
        ns.dump().await;
    }
    let cleaned = cleanup(sb, &ns).await;
    ns.cleanup().await?;
    result.and(cleaned)
}

async fn lifecycle(sb: &'static Sandbox, ns: &TestNamespace) -> anyhow::Result<()> {
    let level = if ENFORCE_RESTRICTED {
        "enforce"
    } else {
        "warn"
    };
    Api::<Namespace>::all(sb.client.clone())
        .patch(
            &ns.name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {
                format!("pod-security.kubernetes.io/{level}"): "restricted"
            }}})),
        )
        .await?;
    if ENFORCE_RESTRICTED {
        // The label is really enforced here: a pod with no securityContext is refused.
        let bare: Pod = serde_json::from_value(json!({
            "metadata": {"name": "bare"},
            "spec": {"containers": [{"name": "c", "image": "busybox"}]}
        }))?;
        let dry = PostParams {
            dry_run: true,
            ..Default::default()
        };
        let refused = ns.api::<Pod>().create(&dry, &bare).await;
        assert!(
            matches!(&refused, Err(kube::Error::Api(e)) if e.message.contains("violates PodSecurity")),
            "namespace {} should enforce Pod Security restricted: {refused:?}",
            ns.name
        );
    }
    let zk = zk_client().await?;
    let svc = ns.name.replace('-', "_");
    let started = std::time::Instant::now();
    let step = |what: &str| {
        eprintln!(
            "[helm e2e {:>5.1}s] {what}",
            started.elapsed().as_secs_f64()
        )
    };

    // Install: 3 Ready operator pods, one of them the leader.
    adopt_crd(sb, &ns.name).await?;
    helm_async(helm_args(sb, "install", &ns.name, Some(INSTALL_TAG))).await?;
    let (first, leader) = wait_until(
        Duration::from_secs(120),
        "3 Ready operator pods and a leader",
        || operator_settled(ns, 3),
    )
    .await?;
    step(&format!(
        "installed: operator pods {:?}, leader {leader}",
        first.values()
    ));
    let dep = ns.api::<Deployment>().get(RELEASE).await?;
    let sa = dep
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".into());
    least_privilege(sb, &ns.name, &sa).await?;
    step(&format!(
        "the ServiceAccount {sa} holds only what the operator uses"
    ));
    let image = dep
        .spec
        .and_then(|s| s.template.spec)
        .map(|s| s.containers[0].image.clone());
    assert_eq!(
        image.flatten().as_deref(),
        Some(&*format!("arcus-operator:{INSTALL_TAG}"))
    );

    // The seed's sample, with this namespace's own service code and the sandbox's ZooKeeper,
    // and a digest ACL on what it owns there (the ensemble is shared by every test).
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "arcus-zookeeper-auth"},
        "type": "kubernetes.io/basic-auth",
        "stringData": {"username": "arcus-e2e", "password": "not-a-real-secret"},
    }))?;
    ns.api::<Secret>()
        .create(&PostParams::default(), &secret)
        .await?;
    let mut sample = repo_docs("deploy/samples/arcus_memcached.yaml").remove(0);
    sample["metadata"]["namespace"] = json!(ns.name);
    sample["spec"]["serviceCode"] = json!(svc);
    sample["spec"]["zookeeperServers"] = json!([ZOOKEEPER]);
    sample["spec"]["zookeeperAuth"] = json!({"secretName": "arcus-zookeeper-auth"});
    let crs: Api<ArcusMemcached> = ns.api();
    crs.create(&PostParams::default(), &serde_json::from_value(sample)?)
        .await?;
    wait_ready(&crs, "3/3", 180).await?;
    step("the sample is Ready 3/3, its znodes under a digest ACL");
    zookeeper_acl_holds(&zk, &svc, &ns.name).await?;

    // Keys written now must all be readable after the scale-out and after the upgrade.
    let client = arcus_client::ArcusClient::connect(ZOOKEEPER, &svc, Default::default()).await?;
    wait_until(Duration::from_secs(10), "client ring of 3", || async {
        (client.nodes().len() == 3).then_some(())
    })
    .await?;
    for i in 0..KEYS {
        client.set(&format!("k{i}"), format!("v{i}"), 0, 0).await?;
    }
    // `kubectl scale` through the scale subresource; the new nodes are filled by migration.
    sb.kubectl(&["scale", "-n", &ns.name, "mc/test", "--replicas=5"])?;
    wait_ready(&crs, "5/5", 240).await?;
    let migrated = wait_until(
        Duration::from_secs(120),
        "the scale-out's migration recorded as done",
        || async {
            let m = crs.get("test").await.ok()?.status?.migration?;
            (m.phase == "Done" && m.items_moved > 0).then_some(m.summary)
        },
    )
    .await?;
    step(&format!("scaled to 5 with kubectl scale: {migrated}"));
    wait_until(Duration::from_secs(30), "client ring of 5", || async {
        (client.nodes().len() == 5).then_some(())
    })
    .await?;
    assert_eq!(
        readable(&client).await?,
        KEYS,
        "keys readable after the scale-out"
    );

    let pods = cache_pods(ns).await?;
    let mappings = mapping_mzxids(&zk, &svc, &ns.name).await?;
    assert_eq!(pods.len(), 5, "cache pods: {pods:?}");
    assert_eq!(mappings.len(), 5, "mapping znodes: {mappings:?}");

    // Upgrade to another image tag: every operator pod is replaced and the Lease moves to a new
    // pod; the cache is untouched.
    helm_async(helm_args(sb, "upgrade", &ns.name, Some(UPGRADE_TAG))).await?;
    let (second, new_leader) = wait_until(
        Duration::from_secs(180),
        "3 new Ready operator pods (none of the first install) and a new leader",
        || async {
            let (pods, leader) = operator_settled(ns, 3).await?;
            pods.keys()
                .all(|uid| !first.contains_key(uid))
                .then_some((pods, leader))
        },
    )
    .await?;
    assert!(
        !first.values().any(|n| *n == new_leader),
        "the leader after the upgrade ({new_leader}) must be a new pod (before: {leader})"
    );
    step(&format!(
        "upgraded: operator pods {:?}, leader {new_leader}",
        second.values()
    ));
    operator_reconciles(ns, "after the upgrade").await?;
    wait_ready(&crs, "5/5", 60).await?;
    assert_cache_untouched(ns, &zk, &svc, &pods, &mappings, "after the upgrade").await?;
    assert_eq!(
        readable(&client).await?,
        KEYS,
        "keys readable after the upgrade"
    );
    step("after the upgrade: every key written before is readable");

    // An upgrade that would change an immutable field (nameOverride changes the Deployment's
    // selector; fullnameOverride keeps its name) fails with Helm's message and leaves the
    // operator as it was.
    let deployment_uid = ns.api::<Deployment>().get(RELEASE).await?.uid();
    let mut bad = helm_args(sb, "upgrade", &ns.name, Some(UPGRADE_TAG));
    bad.extend(["--set".into(), "nameOverride=renamed".into()]);
    bad.extend(["--set".into(), format!("fullnameOverride={RELEASE}")]);
    let (ok, stdout, stderr) = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = bad.iter().map(String::as_str).collect();
        helm(&args)
    })
    .await?;
    assert!(!ok, "an upgrade changing the selector must fail:\n{stdout}");
    assert!(
        stderr.contains("field is immutable"),
        "Helm's message: {stderr}"
    );
    let kept = operator_settled(ns, 3).await;
    assert_eq!(
        kept.as_ref().map(|(pods, _)| pods),
        Some(&second),
        "the operator pods after the refused upgrade"
    );
    assert_eq!(
        ns.api::<Deployment>().get(RELEASE).await?.uid(),
        deployment_uid
    );
    step("an upgrade changing an immutable field was refused; the operator is unchanged");

    // Uninstall: the operator and its RBAC go; the CR, its pods and its ZooKeeper state stay.
    helm_async(helm_args(sb, "uninstall", &ns.name, None)).await?;
    wait_until(
        Duration::from_secs(60),
        "the operator pods to be gone",
        || async {
            let pods: Api<Pod> = ns.api();
            let l = pods
                .list(&ListParams::default().labels(OPERATOR_SELECTOR))
                .await
                .ok()?;
            l.items.is_empty().then_some(())
        },
    )
    .await?;
    assert!(ns.api::<Deployment>().get_opt(RELEASE).await?.is_none());
    assert!(ns.api::<ServiceAccount>().get_opt(RELEASE).await?.is_none());
    let roles: Vec<String> = ns
        .api::<Role>()
        .list(&ListParams::default())
        .await?
        .iter()
        .map(|r| r.name_any())
        .collect();
    let bindings: Vec<String> = ns
        .api::<RoleBinding>()
        .list(&ListParams::default())
        .await?
        .iter()
        .map(|r| r.name_any())
        .collect();
    assert!(
        roles.is_empty() && bindings.is_empty(),
        "RBAC left: {roles:?} {bindings:?}"
    );
    step("uninstalled; the cache is still there");
    let crd = Api::<CustomResourceDefinition>::all(sb.client.clone())
        .get_opt(CRD_NAME)
        .await?;
    assert!(
        crd.is_some(),
        "helm uninstall must keep the CRD (resource-policy keep)"
    );
    assert!(
        crs.get_opt("test").await?.is_some(),
        "the ArcusMemcached must survive the uninstall"
    );
    assert_cache_untouched(ns, &zk, &svc, &pods, &mappings, "after the uninstall").await?;
    assert_eq!(
        zk.list_children(&format!("/arcus/cache_list/{svc}"))
            .await?
            .len(),
        5,
        "the 5 nodes stay registered"
    );

    // Install again: the new operator takes the CR over without restarting a cache pod.
    adopt_crd(sb, &ns.name).await?;
    helm_async(helm_args(sb, "install", &ns.name, Some(INSTALL_TAG))).await?;
    let (third, _) = wait_until(
        Duration::from_secs(120),
        "3 Ready operator pods and a leader again",
        || operator_settled(ns, 3),
    )
    .await?;
    assert!(third.keys().all(|uid| !second.contains_key(uid)));
    step(&format!(
        "installed again: operator pods {:?}",
        third.values()
    ));
    operator_reconciles(ns, "after installing again").await?;
    wait_ready(&crs, "5/5", 60).await?;
    assert_cache_untouched(ns, &zk, &svc, &pods, &mappings, "after installing again").await?;
    step("the new operator reconciles the CR; no cache pod restarted");
    Ok(())
}

/// Deletes the CR while an operator runs (it removes the ZooKeeper state), then uninstalls.
async fn cleanup(sb: &'static Sandbox, ns: &TestNamespace) -> anyhow::Result<()> {
    let crs: Api<ArcusMemcached> = ns.api();
    let svc = ns.name.replace('-', "_");
    let mut result = Ok(());
    if crs.get_opt("test").await.ok().flatten().is_some() {
        // A test that failed between uninstall and install leaves no operator: install it so the
        // CR's ZooKeeper state (in the shared ZooKeeper) is removed by the finalizer.
        if ns
            .api::<Deployment>()
            .get_opt(RELEASE)
            .await
            .ok()
            .flatten()
            .is_none()
        {
            let _ = adopt_crd(sb, &ns.name).await;
            if let Err(e) = helm_async(helm_args(sb, "install", &ns.name, Some(INSTALL_TAG))).await
            {
                eprintln!("cleanup: installing the operator to delete the CR: {e}");
            }
        }
        let _ = crs.delete("test", &DeleteParams::default()).await;
        let zk = zk_client().await?;
        let gone = wait_until(
            Duration::from_secs(180),
            "the CR and its ZooKeeper state deleted",
            || async {
                let cr_gone = crs.get_opt("test").await.ok()?.is_none();
                let list_gone = zk
                    .check_stat(&format!("/arcus/cache_list/{svc}"))
                    .await
                    .ok()?
                    .is_none();
                let maps_gone = mapping_mzxids(&zk, &svc, &ns.name).await.ok()?.is_empty();
                (cr_gone && list_gone && maps_gone).then_some(())
            },
        )
        .await;
        if let Err(e) = gone {
            eprintln!("{e}: removing the finalizer by hand (ZooKeeper state of {svc} may remain)");
            let _ = crs
                .patch(
                    "test",
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"finalizers": null}})),
                )
                .await;
            result = Err(anyhow::anyhow!(
                "cleanup: the operator did not delete the CR: {e}"
            ));
        }
    }
    let (ok, _, stderr) = tokio::task::spawn_blocking({
        let args = helm_args(sb, "uninstall", &ns.name, None);
        move || helm(&args.iter().map(String::as_str).collect::<Vec<_>>())
    })
    .await?;
    if !ok && !stderr.contains("not found") {
        eprintln!("cleanup: helm uninstall: {stderr}");
    }
    result
}
