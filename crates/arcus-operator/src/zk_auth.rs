//! ZooKeeper digest authentication for the znodes a resource owns (`spec.zookeeperAuth`).
//!
//! ARCUS servers and clients never authenticate: arcus-memcached creates its `cache_list`
//! registration and `cache_server_log` entries with the open ACL and calls no `zoo_add_auth`
//! (arcus_zk.c, 1.15.0); the Java and Python clients read `cache_list/<svc>` and register under
//! `client_list/<svc>`. So an owned znode can only be closed to what they do not need:
//! - `cache_list/<svc>` and `client_list/<svc>`: the operator's user ALL, anyone READ and
//!   CREATE (nodes and clients add their ephemeral children; nobody else may delete them,
//!   since a delete is checked against the parent, or rewrite the claim);
//! - `cache_server_mapping/<host>:<port>` and its `<svc>` child: the user ALL, anyone READ.
//!
//! The shared base tree (`/arcus`, `/arcus/cache_list`, ...) keeps the open ACL: every tenant
//! of the ensemble creates under it.

use zookeeper_client as zk;

/// The operator's credentials for one resource, read from its Secret. Never printed: `Debug`
/// shows the user only.
#[derive(Clone, PartialEq, Eq)]
pub struct ZkAuth {
    pub user: String,
    password: String,
    /// During a password change: the one the tree is still secured with. The session
    /// authenticates with both, so the owned znodes' ACLs can be moved to the new password.
    previous_password: Option<String>,
}

impl std::fmt::Debug for ZkAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZkAuth")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .field(
                "previous_password",
                &self.previous_password.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

impl ZkAuth {
    pub fn new(user: impl Into<String>, password: impl Into<String>) -> ZkAuth {
        ZkAuth {
            user: user.into(),
            password: password.into(),
            previous_password: None,
        }
    }

    /// The same user, also authenticated with the password being replaced.
    pub fn with_previous(mut self, previous_password: impl Into<String>) -> ZkAuth {
        self.previous_password = Some(previous_password.into());
        self
    }

    /// What `addauth digest` sends.
    pub fn credential(&self) -> Vec<u8> {
        digest_credential(&self.user, &self.password)
    }

    /// Every `addauth digest` a session sends: the current credential, then the previous one.
    pub fn credentials(&self) -> Vec<Vec<u8>> {
        std::iter::once(self.credential())
            .chain(
                self.previous_password
                    .as_deref()
                    .map(|p| digest_credential(&self.user, p)),
            )
            .collect()
    }

    /// What tells sessions apart in the pool: the digest ids, never a password.
    pub fn session_key(&self) -> String {
        match &self.previous_password {
            Some(p) => format!(
                "{}+{}",
                self.digest_id(),
                digest_of(&digest_credential(&self.user, p), &self.user)
            ),
            None => self.digest_id(),
        }
    }

    /// The ACL id ZooKeeper's DigestAuthenticationProvider derives from the credential:
    /// `user:base64(sha1("user:password"))`.
    pub fn digest_id(&self) -> String {
        digest_of(&self.credential(), &self.user)
    }
}

fn digest_credential(user: &str, password: &str) -> Vec<u8> {
    format!("{user}:{password}").into_bytes()
}

fn digest_of(credential: &[u8], user: &str) -> String {
    use base64::Engine;
    use sha1::Digest;
    let hash = sha1::Sha1::digest(credential);
    format!(
        "{user}:{}",
        base64::engine::general_purpose::STANDARD.encode(hash)
    )
}

/// The ACLs of the znodes a resource owns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnedAcls {
    /// No credentials: world:anyone ALL, as ARCUS creates its znodes.
    Open,
    /// The digest id of the operator's user.
    Digest(String),
}

impl OwnedAcls {
    pub fn of(auth: Option<&ZkAuth>) -> OwnedAcls {
        auth.map_or(OwnedAcls::Open, |a| OwnedAcls::Digest(a.digest_id()))
    }

    /// `cache_list/<svc>` and `client_list/<svc>`: servers and clients add children.
    pub fn registrable(&self) -> Vec<zk::Acl> {
        self.with_world(zk::Permission::READ | zk::Permission::CREATE)
    }

    /// A mapping and its child: servers only read them.
    pub fn readable(&self) -> Vec<zk::Acl> {
        self.with_world(zk::Permission::READ)
    }

    fn with_world(&self, world: zk::Permission) -> Vec<zk::Acl> {
        match self {
            OwnedAcls::Open => zk::Acls::anyone_all().to_vec(),
            OwnedAcls::Digest(id) => vec![
                zk::Acl::new(zk::Permission::ALL, zk::AuthId::new("digest", id)),
                zk::Acl::new(world, zk::AuthId::anyone()),
            ],
        }
    }
}

/// Whether two ACL lists grant the same (ZooKeeper keeps them in the order given).
pub fn same_acls(a: &[zk::Acl], b: &[zk::Acl]) -> bool {
    let key = |acl: &zk::Acl| {
        (
            acl.scheme().to_string(),
            acl.id().to_string(),
            format!("{:?}", acl.permission()),
        )
    };
    let mut a: Vec<_> = a.iter().map(key).collect();
    let mut b: Vec<_> = b.iter().map(key).collect();
    a.sort();
    b.sort();
    a == b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_id_is_zookeepers() {
        // `echo -n 'arcus:s3cret' | openssl dgst -binary -sha1 | openssl base64`
        let auth = ZkAuth::new("arcus", "s3cret");
        assert_eq!(auth.digest_id(), "arcus:1/bRj48qWGNQTfbXUfMhlCF/BMo=");
        assert_eq!(auth.credential(), b"arcus:s3cret");
        assert!(!format!("{auth:?}").contains("s3cret"));
        let rotating = ZkAuth::new("arcus", "n3w").with_previous("s3cret");
        assert_eq!(
            rotating.credentials(),
            vec![b"arcus:n3w".to_vec(), b"arcus:s3cret".to_vec()]
        );
        assert_eq!(
            rotating.session_key(),
            format!(
                "{}+{}",
                ZkAuth::new("arcus", "n3w").digest_id(),
                auth.digest_id()
            )
        );
        assert_ne!(
            rotating.digest_id(),
            auth.digest_id(),
            "ACLs move to the new one"
        );
        let shown = format!("{rotating:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("n3w"),
            "{shown}"
        );
    }

    #[test]
    fn owned_acls_close_deletes_and_writes_to_anyone_but_the_user() {
        let acls = OwnedAcls::Digest("arcus:x".into());
        let reg = acls.registrable();
        assert_eq!(reg.len(), 2);
        let world = reg.iter().find(|a| a.scheme() == "world").unwrap();
        assert!(world
            .permission()
            .has(zk::Permission::READ | zk::Permission::CREATE));
        assert!(!world.permission().has(zk::Permission::DELETE));
        assert!(!world.permission().has(zk::Permission::WRITE));
        let read = acls.readable();
        let world = read.iter().find(|a| a.scheme() == "world").unwrap();
        assert!(!world.permission().has(zk::Permission::CREATE));
        assert!(same_acls(
            &OwnedAcls::Open.readable(),
            &zk::Acls::anyone_all()
        ));
        assert!(!same_acls(&reg, &read));
        let mut reversed = reg.clone();
        reversed.reverse();
        assert!(same_acls(&reg, &reversed));
    }
}
