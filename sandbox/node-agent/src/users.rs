//! Who a container process runs as: `runAsUser`/`runAsGroup` of the container's
//! securityContext, else the pod's, else (OCI layout images) the image's `User` (`uid`,
//! `uid:gid`, or names looked up in the image's /etc/passwd and /etc/group); supplementalGroups,
//! fsGroup and the user's groups in the image's /etc/group as supplementary groups;
//! `runAsNonRoot` checked as kubelet does (same messages); `allowPrivilegeEscalation: false`
//! as PR_SET_NO_NEW_PRIVS.

use k8s_openapi::api::core::v1::{Container, Pod};

/// What the process switches to after the mounts (setgroups, setgid, setuid).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Credentials {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// `None`: the agent's own (root), as before — a table-mapped program with no user settings.
    pub creds: Option<Credentials>,
    /// The user's home in the image's /etc/passwd (layout images), for `HOME`.
    pub home: Option<String>,
    pub no_new_privs: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserError {
    /// `CreateContainerConfigError` (runAsNonRoot) or `CreateContainerError` (unknown user).
    pub reason: &'static str,
    pub message: String,
}

/// The image side: its `User` and, for name lookups, its /etc/passwd and /etc/group.
#[derive(Debug, Clone, Default)]
pub struct ImageUser<'a> {
    pub user: &'a str,
    pub passwd: &'a str,
    pub group: &'a str,
}

struct PasswdEntry<'a> {
    name: &'a str,
    uid: u32,
    gid: u32,
    home: &'a str,
}

fn passwd_entries(text: &str) -> impl Iterator<Item = PasswdEntry<'_>> {
    text.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 6).then_some(())?;
        Some(PasswdEntry {
            name: f[0],
            uid: f[2].parse().ok()?,
            gid: f[3].parse().ok()?,
            home: f[5],
        })
    })
}

/// (name, gid, members) of /etc/group.
fn group_entries(text: &str) -> impl Iterator<Item = (&str, u32, Vec<&str>)> {
    text.lines().filter_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 3).then_some(())?;
        let members = f
            .get(3)
            .map(|m| m.split(',').filter(|s| !s.is_empty()).collect())
            .unwrap_or_default();
        Some((f[0], f[2].parse().ok()?, members))
    })
}

/// kubelet's `format.Pod`: `name_namespace(uid)`.
fn pod_label(pod: &Pod) -> String {
    format!(
        "{}_{}({})",
        pod.metadata.name.as_deref().unwrap_or_default(),
        pod.metadata.namespace.as_deref().unwrap_or_default(),
        pod.metadata.uid.as_deref().unwrap_or_default()
    )
}

/// The identity of container `c` of `pod`. `image`: `Some` for layout images, `None` for
/// table-mapped programs (whose "image user" is root).
pub fn resolve(
    pod: &Pod,
    c: &Container,
    image: Option<&ImageUser<'_>>,
) -> Result<Identity, UserError> {
    let psc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let csc = c.security_context.as_ref();
    let run_as_user = csc
        .and_then(|s| s.run_as_user)
        .or(psc.and_then(|s| s.run_as_user));
    let run_as_group = csc
        .and_then(|s| s.run_as_group)
        .or(psc.and_then(|s| s.run_as_group));
    let non_root = csc
        .and_then(|s| s.run_as_non_root)
        .or(psc.and_then(|s| s.run_as_non_root))
        .unwrap_or(false);
    let fs_group = psc.and_then(|s| s.fs_group);
    let supplemental = psc
        .and_then(|s| s.supplemental_groups.clone())
        .unwrap_or_default();
    let no_new_privs = csc.and_then(|s| s.allow_privilege_escalation) == Some(false);
    let config_err = |message: String| UserError {
        reason: "CreateContainerConfigError",
        message,
    };
    let create_err = |message: String| UserError {
        reason: "CreateContainerError",
        message,
    };
    let (image_user, image_group) = match image.map(|i| i.user).filter(|u| !u.is_empty()) {
        Some(u) => match u.split_once(':') {
            Some((u, g)) => (Some(u), Some(g)),
            None => (Some(u), None),
        },
        None => (None, None),
    };
    // kubelet's verifyRunAsNonRoot.
    if non_root {
        let who = format!("(pod: {:?}, container: {})", pod_label(pod), c.name);
        match (run_as_user, image_user) {
            (Some(0), _) => {
                return Err(config_err(format!(
                    "container's runAsUser breaks non-root policy {who}"
                )))
            }
            (Some(_), _) => {}
            (None, Some(u)) if u.parse::<u32>().is_err() => {
                return Err(config_err(format!(
                    "container has runAsNonRoot and image has non-numeric user ({u}), cannot verify user is non-root {who}"
                )))
            }
            (None, Some(u)) if u.parse::<u32>() != Ok(0) => {}
            (None, _) => {
                return Err(config_err(format!(
                    "container has runAsNonRoot and image will run as root {who}"
                )))
            }
        }
    }
    let passwd = image.map(|i| i.passwd).unwrap_or_default();
    let group = image.map(|i| i.group).unwrap_or_default();
    let uid: u32 = match (run_as_user, image_user) {
        (Some(u), _) => u as u32,
        (None, Some(u)) => match u.parse() {
            Ok(n) => n,
            Err(_) => passwd_entries(passwd)
                .find(|e| e.name == u)
                .map(|e| e.uid)
                .ok_or_else(|| {
                    create_err(format!(
                        "unable to find user {u}: no matching entries in the image's /etc/passwd"
                    ))
                })?,
        },
        (None, None) => 0,
    };
    let entry = passwd_entries(passwd).find(|e| e.uid == uid);
    let gid: u32 = match (
        run_as_group,
        run_as_user.is_none().then_some(image_group).flatten(),
    ) {
        (Some(g), _) => g as u32,
        (None, Some(g)) => match g.parse() {
            Ok(n) => n,
            Err(_) => group_entries(group)
                .find(|(name, _, _)| *name == g)
                .map(|(_, gid, _)| gid)
                .ok_or_else(|| {
                    create_err(format!(
                        "unable to find group {g}: no matching entries in the image's /etc/group"
                    ))
                })?,
        },
        (None, None) => entry.as_ref().map(|e| e.gid).unwrap_or(0),
    };
    let anything_set = run_as_user.is_some()
        || run_as_group.is_some()
        || fs_group.is_some()
        || !supplemental.is_empty();
    if image.is_none() && !anything_set {
        return Ok(Identity {
            creds: None,
            home: None,
            no_new_privs,
        });
    }
    let mut groups: Vec<u32> = vec![gid];
    if let Some(name) = entry.as_ref().map(|e| e.name) {
        groups.extend(
            group_entries(group)
                .filter(|(_, _, members)| members.contains(&name))
                .map(|(_, g, _)| g),
        );
    }
    groups.extend(supplemental.iter().map(|g| *g as u32));
    groups.extend(fs_group.map(|g| g as u32));
    let mut seen = std::collections::BTreeSet::new();
    groups.retain(|g| seen.insert(*g));
    Ok(Identity {
        creds: Some(Credentials { uid, gid, groups }),
        home: image.map(|_| {
            entry
                .as_ref()
                .map(|e| e.home.to_string())
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "/".into())
        }),
        no_new_privs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\napp:x:1000:1001::/srv/app:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nnonroot:x:65532:\nappg:x:1001:\nextra:x:2000:app,other\n";

    fn pod(psc: serde_json::Value, csc: serde_json::Value) -> (Pod, Container) {
        let p: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u1"},
            "spec": {"securityContext": psc, "containers": [{"name": "c", "securityContext": csc}]}
        }))
        .unwrap();
        let c = p.spec.as_ref().unwrap().containers[0].clone();
        (p, c)
    }

    fn img(user: &str) -> ImageUser<'_> {
        ImageUser {
            user,
            passwd: PASSWD,
            group: GROUP,
        }
    }

    fn creds(r: Result<Identity, UserError>) -> (u32, u32, Vec<u32>) {
        let c = r.unwrap().creds.unwrap();
        (c.uid, c.gid, c.groups)
    }

    #[test]
    fn image_user_forms() {
        let (p, c) = pod(serde_json::json!({}), serde_json::json!({}));
        assert_eq!(
            creds(resolve(&p, &c, Some(&img("65532:65532")))),
            (65532, 65532, vec![65532])
        );
        assert_eq!(
            creds(resolve(&p, &c, Some(&img("1000")))),
            (1000, 1001, vec![1001, 2000]),
            "gid and groups from passwd/group"
        );
        assert_eq!(
            creds(resolve(&p, &c, Some(&img("app")))),
            (1000, 1001, vec![1001, 2000])
        );
        assert_eq!(
            creds(resolve(&p, &c, Some(&img("app:extra")))),
            (1000, 2000, vec![2000])
        );
        assert_eq!(
            creds(resolve(&p, &c, Some(&img("")))),
            (0, 0, vec![0]),
            "no User: root"
        );
        assert_eq!(
            creds(resolve(&p, &c, Some(&img("4242")))),
            (4242, 0, vec![0]),
            "unknown uid: gid 0"
        );
        let id = resolve(&p, &c, Some(&img("nonroot"))).unwrap();
        assert_eq!(id.home.as_deref(), Some("/home/nonroot"));
        let e = resolve(&p, &c, Some(&img("nobody"))).unwrap_err();
        assert_eq!(e.reason, "CreateContainerError");
        assert!(
            e.message.contains("unable to find user nobody"),
            "{}",
            e.message
        );
        assert!(resolve(&p, &c, Some(&img("1000:nogroup"))).is_err());
    }

    #[test]
    fn security_context_wins_and_groups_add_up() {
        let (p, c) = pod(
            serde_json::json!({"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 3000, "supplementalGroups": [4000, 1000]}),
            serde_json::json!({"runAsUser": 1234}),
        );
        assert_eq!(
            creds(resolve(&p, &c, Some(&img("65532:65532")))),
            (1234, 1000, vec![1000, 4000, 3000])
        );
        // Table-mapped programs: same rules, the image user is root.
        assert_eq!(
            creds(resolve(&p, &c, None)),
            (1234, 1000, vec![1000, 4000, 3000])
        );
        let (p, c) = pod(
            serde_json::json!({}),
            serde_json::json!({"allowPrivilegeEscalation": false}),
        );
        let id = resolve(&p, &c, None).unwrap();
        assert_eq!(
            id.creds, None,
            "nothing set: the agent's own user, as before"
        );
        assert!(id.no_new_privs);
        let (p, c) = pod(serde_json::json!({"runAsGroup": 5}), serde_json::json!({}));
        assert_eq!(
            creds(resolve(&p, &c, Some(&img("65532:65532")))),
            (65532, 5, vec![5])
        );
    }

    #[test]
    fn run_as_non_root_is_enforced_like_kubelet() {
        let (p, c) = pod(
            serde_json::json!({"runAsNonRoot": true}),
            serde_json::json!({}),
        );
        let e = resolve(&p, &c, None).unwrap_err();
        assert_eq!(e.reason, "CreateContainerConfigError");
        assert_eq!(
            e.message,
            "container has runAsNonRoot and image will run as root (pod: \"p_ns(u1)\", container: c)"
        );
        assert!(resolve(&p, &c, Some(&img(""))).is_err());
        assert!(resolve(&p, &c, Some(&img("0:0"))).is_err());
        assert!(resolve(&p, &c, Some(&img("65532:65532"))).is_ok());
        let e = resolve(&p, &c, Some(&img("nonroot"))).unwrap_err();
        assert!(
            e.message.contains("non-numeric user (nonroot)"),
            "{}",
            e.message
        );
        let (p, c) = pod(
            serde_json::json!({"runAsNonRoot": true}),
            serde_json::json!({"runAsUser": 0}),
        );
        let e = resolve(&p, &c, Some(&img("65532"))).unwrap_err();
        assert!(
            e.message
                .starts_with("container's runAsUser breaks non-root policy"),
            "{}",
            e.message
        );
        // What the lead's cache pods use: fine for a table-mapped program.
        let (p, c) = pod(
            serde_json::json!({"runAsNonRoot": true, "runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000}),
            serde_json::json!({"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}),
        );
        let id = resolve(&p, &c, None).unwrap();
        assert_eq!(
            id.creds.as_ref().map(|c| (c.uid, c.gid, c.groups.clone())),
            Some((1000, 1000, vec![1000]))
        );
        assert!(id.no_new_privs);
    }
}
