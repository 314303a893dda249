//! Per-pod network namespaces, made with iproute2's `ip` command (simple, and what one would
//! type by hand to debug them). Per pod: a named netns `asbx-<uid>`, a veth pair whose host end
//! `av<12 hex of the uid>` is a port of the sandbox bridge and whose pod end is `eth0` with
//! `<pod IP>/<prefix>`; inside, only the connected route and the Service CIDR via the gateway —
//! no default route, so nothing a pod sends can leave the machine.
//!
//! The bridge, its addresses, forwarding and iptables rules belong to `scripts/sandbox up`; this
//! module only adds and removes per-pod namespaces and veths. Self-contained (std + tokio only)
//! so that `tests/netns.rs` can include it.

use std::net::Ipv4Addr;
use std::path::PathBuf;

/// Prefix of the agent's netns names (leftovers of a previous run are found by it).
pub const NS_PREFIX: &str = "asbx-";
/// Prefix of the host ends of pod veths.
pub const VETH_PREFIX: &str = "av";
const VETH_HEX: usize = 12;

/// The sandbox network the pods join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Linux bridge the host ends are attached to (must exist, with the gateway address).
    pub bridge: String,
    /// The bridge's address: where pods reach the host's services and the Service CIDR.
    pub gateway: Ipv4Addr,
    /// Prefix length of pod addresses (the whole pod network is one L2 segment).
    pub prefix_len: u8,
    /// Routed via the gateway (kube-proxy's rules on the host translate it).
    pub service_cidr: String,
}

/// A pod's namespace and veth, as created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodNet {
    pub ns: String,
    pub veth: String,
    pub ip: Ipv4Addr,
}

/// `asbx-<uid>` (characters other than ASCII alphanumerics and `-` dropped).
pub fn ns_name(uid: &str) -> String {
    let clean: String = uid
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    format!("{NS_PREFIX}{clean}")
}

/// `av` + the first 12 hex digits of the uid (interface names have at most 15 characters).
pub fn veth_name(uid: &str) -> String {
    let mut hex: String = uid
        .chars()
        .filter(char::is_ascii_hexdigit)
        .map(|c| c.to_ascii_lowercase())
        .take(VETH_HEX)
        .collect();
    while hex.len() < VETH_HEX {
        hex.push('0');
    }
    format!("{VETH_PREFIX}{hex}")
}

/// Whether `name` is a host-side veth name this module makes.
pub fn is_pod_veth(name: &str) -> bool {
    name.strip_prefix(VETH_PREFIX).is_some_and(|h| {
        h.len() == VETH_HEX
            && h.chars()
                .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c))
    })
}

/// The netns file that container processes `setns(2)` into.
pub fn ns_path(ns: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(ns)
}

fn ip_binary() -> &'static str {
    ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
        .unwrap_or("ip")
}

/// Runs `ip <args>`; the error names the command and carries its stderr.
pub async fn ip(args: &[&str]) -> Result<String, String> {
    let line = format!("ip {}", args.join(" "));
    let out = tokio::process::Command::new(ip_binary())
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| format!("running `{line}`: {e} (is iproute2 installed?)"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Whether an `ip` error only says that the object is already gone.
fn already_gone(err: &str) -> bool {
    err.contains("Cannot find device")
        || err.contains("No such file or directory")
        || err.contains("does not exist")
}

async fn ip_tolerating_gone(args: &[&str]) -> Result<(), String> {
    match ip(args).await {
        Ok(_) => Ok(()),
        Err(e) if already_gone(&e) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Creates the pod's namespace and veth, replacing any left from an earlier run of the same
/// pod. On failure nothing is left behind and the error names the failing command.
pub async fn create(cfg: &NetConfig, uid: &str, pod_ip: Ipv4Addr) -> Result<PodNet, String> {
    ip(&["-o", "link", "show", "dev", &cfg.bridge])
        .await
        .map_err(|e| {
            format!(
                "the sandbox bridge {} is missing ({e}); `scripts/sandbox up` sets it up",
                cfg.bridge
            )
        })?;
    let net = PodNet {
        ns: ns_name(uid),
        veth: veth_name(uid),
        ip: pod_ip,
    };
    delete(&net.ns, &net.veth).await?;
    if let Err(e) = build(cfg, &net).await {
        if let Err(cleanup) = delete(&net.ns, &net.veth).await {
            return Err(format!("{e}; cleaning up failed too: {cleanup}"));
        }
        return Err(e);
    }
    Ok(net)
}

async fn build(cfg: &NetConfig, net: &PodNet) -> Result<(), String> {
    let (ns, veth) = (net.ns.as_str(), net.veth.as_str());
    let addr = format!("{}/{}", net.ip, cfg.prefix_len);
    let gateway = cfg.gateway.to_string();
    ip(&["netns", "add", ns]).await?;
    ip(&[
        "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
    ])
    .await?;
    ip(&["link", "set", "dev", veth, "master", &cfg.bridge]).await?;
    // Hairpin: with bridge-nf-call-iptables a Service connection that kube-proxy translates
    // back to the same pod is bridged out of the port it came in on.
    ip(&[
        "link",
        "set",
        "dev",
        veth,
        "type",
        "bridge_slave",
        "hairpin",
        "on",
    ])
    .await?;
    ip(&["link", "set", "dev", veth, "up"]).await?;
    ip(&["-n", ns, "link", "set", "dev", "lo", "up"]).await?;
    ip(&["-n", ns, "addr", "add", &addr, "dev", "eth0"]).await?;
    ip(&["-n", ns, "link", "set", "dev", "eth0", "up"]).await?;
    ip(&[
        "-n",
        ns,
        "route",
        "add",
        &cfg.service_cidr,
        "via",
        &gateway,
        "dev",
        "eth0",
    ])
    .await?;
    Ok(())
}

/// Removes a pod's veth and namespace; either may already be gone.
pub async fn delete(ns: &str, veth: &str) -> Result<(), String> {
    let link = ip_tolerating_gone(&["link", "del", "dev", veth]).await;
    let netns = if ns_path(ns).exists() {
        ip_tolerating_gone(&["netns", "del", ns]).await
    } else {
        Ok(())
    };
    link.and(netns)
}

/// Names of the agent's namespaces and host-side veths that exist now.
pub async fn list_own() -> Result<(Vec<String>, Vec<String>), String> {
    let namespaces = ip(&["netns", "list"])
        .await?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(NS_PREFIX))
        .map(str::to_string)
        .collect();
    let veths = ip(&["-o", "link", "show", "type", "veth"])
        .await?
        .lines()
        .filter_map(parse_link_name)
        .filter(|n| is_pod_veth(n))
        .collect();
    Ok((namespaces, veths))
}

/// The name in a line of `ip -o link show` (`12: av0123@if2: <...> ...`).
fn parse_link_name(line: &str) -> Option<String> {
    let name = line.split(':').nth(1)?.trim();
    Some(name.split('@').next()?.to_string())
}

/// Removes every namespace and veth of the agent's naming that exists now, but those of the
/// pod UIDs in `keep` (adopted from a previous run); call only when no pod of this run has its
/// network yet. Returns how many objects were removed.
pub async fn remove_all_own(keep: &std::collections::HashSet<String>) -> Result<usize, String> {
    let (mut namespaces, mut veths) = list_own().await?;
    namespaces.retain(|n| !keep.iter().any(|uid| ns_name(uid) == *n));
    veths.retain(|v| !keep.iter().any(|uid| veth_name(uid) == *v));
    let mut errors = Vec::new();
    for v in &veths {
        if let Err(e) = ip_tolerating_gone(&["link", "del", "dev", v]).await {
            errors.push(e);
        }
    }
    for n in &namespaces {
        if let Err(e) = ip_tolerating_gone(&["netns", "del", n]).await {
            errors.push(e);
        }
    }
    if errors.is_empty() {
        Ok(namespaces.len() + veths.len())
    } else {
        Err(errors.join("; "))
    }
}

/// Root-only tests: a scratch named namespace `arcust-<tag>-<pid>` (the caller deletes it), or
/// None, with the reason printed, when not root or `ip netns add` fails.
#[cfg(test)]
pub(crate) fn scratch_netns(tag: &str) -> Option<String> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: not root");
        return None;
    }
    let ns = format!("arcust-{tag}-{}", std::process::id());
    let add = std::process::Command::new("ip")
        .args(["netns", "add", &ns])
        .output();
    if !add.is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED: `ip netns add` not available");
        return None;
    }
    Some(ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_uids() {
        let uid = "3F2504E0-4F89-11D3-9A0C-0305E82C3301";
        assert_eq!(ns_name(uid), "asbx-3F2504E0-4F89-11D3-9A0C-0305E82C3301");
        assert_eq!(veth_name(uid), "av3f2504e04f89");
        assert!(veth_name(uid).len() <= 15);
        assert_eq!(veth_name("ab"), "avab0000000000");
        assert_eq!(ns_name("a/b c"), "asbx-abc");
        assert!(is_pod_veth("av3f2504e04f89"));
        for other in ["av3f2504e04f8", "arcus0", "av3f2504e04f8g", "eth0"] {
            assert!(!is_pod_veth(other), "{other}");
        }
        assert_eq!(ns_path("asbx-x"), std::path::Path::new("/run/netns/asbx-x"));
    }

    #[test]
    fn link_lines() {
        assert_eq!(
            parse_link_name("12: av0123456789ab@if2: <BROADCAST,MULTICAST,UP> mtu 1500").as_deref(),
            Some("av0123456789ab")
        );
        assert_eq!(
            parse_link_name("3: arcus0: <BROADCAST> mtu 1500").as_deref(),
            Some("arcus0")
        );
        assert!(already_gone("Cannot find device \"av1\""));
        assert!(already_gone(
            "Cannot remove namespace file \"/run/netns/x\": No such file or directory"
        ));
        assert!(!already_gone("Operation not permitted"));
    }
}
