//! Shared by the integration tests: options for stock memcached and a stand-in for cache
//! nodes' ZooKeeper registration.
#![allow(dead_code)]

use arcus_client::{protocol, ArcusClient, ClientOptions};
use std::time::Duration;
use zookeeper_client as zk;

/// Options for tests against Debian's stock memcached (250-byte keys) with short timeouts.
pub fn opts() -> ClientOptions {
    ClientOptions {
        op_timeout: Duration::from_millis(500),
        connect_timeout: Duration::from_millis(500),
        max_key_len: protocol::MEMCACHED_MAX_KEY_LEN,
        zk_connect_timeout: Duration::from_secs(5),
        ..ClientOptions::default()
    }
}

/// Registers cache nodes the way arcus-memcached does: an ephemeral
/// `/arcus/cache_list/<svc>/<ip>:<port>-<hostname>` holding `"<MB>MB"`, on its own session.
pub struct Registrar {
    pub zk: zk::Client,
    pub svc: String,
}

impl Registrar {
    /// Connects and creates `/arcus/cache_list/<svc>` if missing.
    pub async fn new(
        zk_addr: &str,
        svc: &str,
        session_timeout: Duration,
    ) -> anyhow::Result<Registrar> {
        let zk = zk::Client::connector()
            .with_session_timeout(session_timeout)
            .connect(zk_addr)
            .await?;
        let dir = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
        zk.mkdir(&format!("/arcus/cache_list/{svc}"), &dir).await?;
        Ok(Registrar {
            zk,
            svc: svc.to_string(),
        })
    }

    fn path(&self, addr: &str) -> String {
        let host = format!("host{}", addr.replace(['.', ':'], "-"));
        format!("/arcus/cache_list/{}/{addr}-{host}", self.svc)
    }

    pub async fn register(&self, addr: &str) -> anyhow::Result<()> {
        let eph = zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());
        self.zk.create(&self.path(addr), b"64MB", &eph).await?;
        Ok(())
    }

    pub async fn unregister(&self, addr: &str) -> anyhow::Result<()> {
        self.zk.delete(&self.path(addr), None).await?;
        Ok(())
    }
}

/// Waits (bounded) until the client's ring holds exactly `expected`.
pub async fn wait_ring(
    client: &ArcusClient,
    expected: &[String],
    timeout: Duration,
) -> anyhow::Result<()> {
    let mut want = expected.to_vec();
    want.sort();
    test_support::wait_until(timeout, &format!("ring == {want:?}"), || {
        let nodes = client.nodes();
        let ok = nodes == want;
        async move { ok.then_some(()) }
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}; ring is {:?}", client.nodes()))
}
