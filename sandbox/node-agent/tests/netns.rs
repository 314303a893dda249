//! Root-only: per-pod network namespaces (src/netns.rs) on a bridge of the test's own, in the
//! test range 10.251.0.0/16 (guarded by an unreachable route, so nothing can fall through to
//! the machine's real network). Skips, saying why, when not root or a tool is missing. Removes
//! everything it created by name, also when an assertion fails (a Drop guard).

#[path = "../src/netns.rs"]
#[allow(dead_code)]
mod netns;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const RANGE: &str = "10.251.0.0/16";
const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 251, 0, 1);
const PORT: u16 = 18080;

fn ip_sync(args: &[&str]) -> std::io::Result<std::process::Output> {
    Command::new("ip").args(args).stdin(Stdio::null()).output()
}

fn skip_reason() -> Option<String> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (network namespaces need CAP_SYS_ADMIN/CAP_NET_ADMIN)".into());
    }
    if ip_sync(&["-V"]).is_err() {
        return Some("the `ip` command (iproute2) is missing".into());
    }
    let python = Command::new("python3")
        .args(["-c", "import http.server"])
        .output();
    if !python.is_ok_and(|o| o.status.success()) {
        return Some("python3 (used as the pods' HTTP server) is missing".into());
    }
    None
}

/// Everything the test made, removed on drop (best effort, by name).
#[derive(Default)]
struct Cleanup {
    bridge: Option<String>,
    guard_route: bool,
    pods: Vec<(String, String)>,
    servers: Vec<Child>,
    dir: Option<std::path::PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &mut self.servers {
            let _ = c.kill();
            let _ = c.wait();
        }
        for (ns, veth) in &self.pods {
            let _ = ip_sync(&["link", "del", "dev", veth]);
            let _ = ip_sync(&["netns", "del", ns]);
        }
        if let Some(b) = &self.bridge {
            let _ = ip_sync(&["link", "del", "dev", b]);
        }
        if self.guard_route {
            let _ = ip_sync(&["route", "del", "unreachable", RANGE, "metric", "4000"]);
        }
        if let Some(d) = &self.dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

fn run_ok(args: &[&str]) -> String {
    let out = ip_sync(args).expect("running ip");
    assert!(
        out.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An HTTP GET from the host; `Ok` with the status line.
fn http_get(addr: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr.parse().expect("addr"), Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    Ok(buf.lines().next().unwrap_or_default().to_string())
}

fn wait_http_ok(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match http_get(addr) {
            Ok(line) if line.contains(" 200") => return,
            other if Instant::now() > deadline => panic!("GET http://{addr}/: {other:?}"),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn uid(i: u64) -> String {
    // Distinct in the 12 hex digits the veth name uses, and recognisable as the test's.
    let tag = 0xee00_0000_0000u64 | (u64::from(std::process::id()) << 4) | i;
    format!("{tag:012x}-0000-4000-8000-netnstest")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_namespaces_on_a_bridge() {
    if let Some(why) = skip_reason() {
        eprintln!("SKIPPED netns test: {why}");
        return;
    }
    let mut cleanup = Cleanup::default();
    let bridge = format!("arcust{}", std::process::id() % 1000);

    // The guard first: whatever the test sends in its range never leaves the machine.
    let guard = ip_sync(&["route", "add", "unreachable", RANGE, "metric", "4000"]).unwrap();
    let stderr = String::from_utf8_lossy(&guard.stderr);
    assert!(
        guard.status.success() || stderr.contains("File exists"),
        "adding the guard route: {stderr}"
    );
    cleanup.guard_route = guard.status.success();
    run_ok(&["link", "add", "name", &bridge, "type", "bridge"]);
    cleanup.bridge = Some(bridge.clone());
    run_ok(&["addr", "add", &format!("{GATEWAY}/16"), "dev", &bridge]);
    run_ok(&["link", "set", "dev", &bridge, "up"]);

    let cfg = netns::NetConfig {
        bridge: bridge.clone(),
        gateway: GATEWAY,
        prefix_len: 16,
        service_cidr: "10.252.0.0/16".into(),
    };

    // A missing bridge: a clear error, and nothing left behind.
    let (uid_x, uid_a, uid_b) = (uid(0), uid(1), uid(2));
    let missing = netns::NetConfig {
        bridge: format!("{bridge}x"),
        ..cfg.clone()
    };
    let err = netns::create(&missing, &uid_x, Ipv4Addr::new(10, 251, 9, 9))
        .await
        .unwrap_err();
    assert!(
        err.contains("missing") && err.contains(&missing.bridge),
        "{err}"
    );
    assert!(!netns::ns_path(&netns::ns_name(&uid_x)).exists());

    let ip_a = Ipv4Addr::new(10, 251, 1, 2);
    let ip_b = Ipv4Addr::new(10, 251, 2, 2);
    for u in [&uid_a, &uid_b] {
        cleanup.pods.push((netns::ns_name(u), netns::veth_name(u)));
    }
    // Creating twice replaces the first namespace (a pod started again).
    netns::create(&cfg, &uid_a, ip_a).await.expect("pod a");
    let a = netns::create(&cfg, &uid_a, ip_a)
        .await
        .expect("pod a again");
    let b = netns::create(&cfg, &uid_b, ip_b).await.expect("pod b");
    let (own_ns, own_veths) = netns::list_own().await.expect("listing");
    for p in [&a, &b] {
        assert!(own_ns.contains(&p.ns), "{own_ns:?}");
        assert!(own_veths.contains(&p.veth), "{own_veths:?}");
    }

    for (p, ip) in [(&a, ip_a), (&b, ip_b)] {
        let addrs = run_ok(&["-n", &p.ns, "-4", "-o", "addr", "show", "dev", "eth0"]);
        assert!(addrs.contains(&format!("inet {ip}/16")), "{addrs}");
        let routes = run_ok(&["-n", &p.ns, "route", "show"]);
        assert!(!routes.contains("default"), "no default route: {routes}");
        assert!(
            routes.contains(&format!("10.252.0.0/16 via {GATEWAY} dev eth0")),
            "{routes}"
        );
        assert!(routes.contains("10.251.0.0/16 dev eth0"), "{routes}");
        let out = ip_sync(&["-n", &p.ns, "route", "get", "192.0.2.1"]).unwrap();
        assert!(!out.status.success(), "nothing routes off the pod network");
        let master = run_ok(&["-o", "link", "show", "dev", &p.veth]);
        assert!(master.contains(&format!("master {bridge}")), "{master}");
        assert!(
            master.contains("state UP") || master.contains(",UP"),
            "{master}"
        );
    }

    // The same port on 0.0.0.0 in both pods; the host reaches each pod IP.
    let dir = std::env::temp_dir().join(format!("netns-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    cleanup.dir = Some(dir.clone());
    for p in [&a, &b] {
        let child = Command::new("ip")
            .args(["netns", "exec", &p.ns, "python3", "-m", "http.server"])
            .args([&PORT.to_string(), "--bind", "0.0.0.0"])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 http.server");
        cleanup.servers.push(child);
    }
    wait_http_ok(&format!("{ip_a}:{PORT}"));
    wait_http_ok(&format!("{ip_b}:{PORT}"));
    // 127.0.0.1 inside a pod is the pod.
    let local = Command::new("ip")
        .args(["netns", "exec", &a.ns, "python3", "-c"])
        .arg(format!(
            "import urllib.request; urllib.request.urlopen('http://127.0.0.1:{PORT}/', timeout=5)"
        ))
        .output()
        .unwrap();
    assert!(
        local.status.success(),
        "{}",
        String::from_utf8_lossy(&local.stderr)
    );

    // Teardown leaves no namespace and no veth (servers first: they would keep the netns alive).
    for c in &mut cleanup.servers {
        let _ = c.kill();
        let _ = c.wait();
    }
    cleanup.servers.clear();
    for p in [&a, &b] {
        netns::delete(&p.ns, &p.veth).await.expect("delete");
        netns::delete(&p.ns, &p.veth)
            .await
            .expect("delete again: already gone is fine");
        assert!(!netns::ns_path(&p.ns).exists());
        assert!(!ip_sync(&["link", "show", "dev", &p.veth])
            .unwrap()
            .status
            .success());
    }
    let (own_ns, own_veths) = netns::list_own().await.expect("listing");
    assert!(
        !own_ns.contains(&a.ns) && !own_ns.contains(&b.ns),
        "{own_ns:?}"
    );
    assert!(
        !own_veths.contains(&a.veth) && !own_veths.contains(&b.veth),
        "{own_veths:?}"
    );
}
