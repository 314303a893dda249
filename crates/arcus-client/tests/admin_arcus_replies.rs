//! ARCUS-only admin replies, byte for byte as arcus-memcached 1.15 writes them (memcached.c:
//! `process_memlimit_command`, `process_zkensemble_command`, `process_keyscan_command`, `ready`),
//! served by a scripted socket: no arcus-memcached binary exists on this machine. Real-server
//! behaviour (stock memcached) is covered in `admin.rs`.

use arcus_client::{AdminClient, Error, ItemType, Readiness, ScanOptions};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// Answers each command line with the scripted reply; unknown commands get `ERROR unknown command`.
async fn scripted_server(script: &'static [(&'static str, &'static str)]) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        loop {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (r, mut w) = sock.into_split();
                let mut lines = BufReader::new(r).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let reply = script
                        .iter()
                        .find(|(cmd, _)| *cmd == line.trim_end())
                        .map(|(_, r)| *r)
                        .unwrap_or("ERROR unknown command\r\n");
                    if w.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn parses_arcus_admin_replies() -> anyhow::Result<()> {
    static SCRIPT: &[(&str, &str)] = &[
        ("ready", "READY\r\n"),
        ("config memlimit", "memlimit 100\r\nEND\r\n"),
        ("config memlimit 200", "END\r\n"),
        ("config maxconns", "maxconns 1000\r\nEND\r\n"),
        (
            "config maxconns 5",
            "CLIENT_ERROR the value is out of range\r\n",
        ),
        ("zkensemble get", "127.0.0.1:2181,127.0.0.2:2181\r\n\n\r\n"),
        ("zkensemble set 127.0.0.3:2181", "OK\r\n"),
        ("zkensemble rejoin", "Successfully rejoined\r\n"),
        (
            "scan key 0 count 3",
            "KEYS 3 4711\r\nuser:1 K 0\r\nlist:a L 120\r\nsticky B -1\r\nEND\r\n",
        ),
        ("scan key 4711 count 3", "KEYS 1 0\r\nlast K -2\r\nEND\r\n"),
        (
            "scan key 0 count 10 match user:* type K",
            "KEYS 1 0\r\nuser:1 K 0\r\nEND\r\n",
        ),
        ("shutdown 5", "OK\r\n"),
        ("flush_prefix user", "OK\r\n"),
        ("flush_prefix none", "NOT_FOUND\r\n"),
    ];
    let admin = AdminClient::new(scripted_server(SCRIPT).await);

    assert_eq!(admin.ready().await?, Readiness::Ready);
    assert_eq!(admin.memlimit().await?, 100);
    admin.set_memlimit(200).await?;
    assert_eq!(admin.maxconns().await?, 1000);
    let err = admin.set_maxconns(5).await.unwrap_err();
    assert!(
        matches!(&err, Error::Server { message, .. } if message.contains("out of range")),
        "{err}"
    );

    assert_eq!(
        admin.zkensemble_get().await?,
        "127.0.0.1:2181,127.0.0.2:2181"
    );
    // The odd trailing bytes of `zkensemble get` do not leak into the next reply.
    assert_eq!(admin.ready().await?, Readiness::Ready);
    admin.zkensemble_set("127.0.0.3:2181").await?;
    admin.zkensemble_rejoin().await?;

    let opts = ScanOptions {
        count: Some(3),
        ..Default::default()
    };
    let page = admin.scan_keys("0", &opts).await?;
    assert_eq!(page.next_cursor, "4711");
    assert!(!page.is_last());
    let got: Vec<(&str, ItemType, i64)> = page
        .keys
        .iter()
        .map(|k| (k.key.as_str(), k.item_type, k.exptime))
        .collect();
    assert_eq!(
        got,
        [
            ("user:1", ItemType::KeyValue, 0),
            ("list:a", ItemType::List, 120),
            ("sticky", ItemType::BTree, -1)
        ]
    );
    let all = admin.scan_all_keys(&opts).await?;
    assert_eq!(all.len(), 4);
    assert_eq!(all[3].key, "last");
    let filtered = ScanOptions {
        count: Some(10),
        pattern: Some("user:*".into()),
        item_type: Some(ItemType::KeyValue),
    };
    assert!(admin.scan_keys("0", &filtered).await?.is_last());

    assert!(admin.flush_prefix("user").await?);
    assert!(!admin.flush_prefix("none").await?);
    admin.shutdown(Some(5)).await?;
    Ok(())
}

#[tokio::test]
async fn not_ready_node() -> anyhow::Result<()> {
    static SCRIPT: &[(&str, &str)] = &[("ready", "NOT_READY\r\n")];
    let admin = AdminClient::new(scripted_server(SCRIPT).await);
    assert_eq!(admin.ready().await?, Readiness::NotReady);
    Ok(())
}
