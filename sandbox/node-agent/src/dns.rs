//! A pod's hostname, `/etc/resolv.conf` and `/etc/hosts`, as kubelet writes them (pure).

use k8s_openapi::api::core::v1::Pod;

/// Cluster DNS settings (kubelet's `--cluster-dns` and `--cluster-domain`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsSettings {
    pub cluster_dns: String,
    pub cluster_domain: String,
}

/// `spec.hostname`, else the pod name, cut to 63 characters without a trailing `-` or `.`
/// (kubelet's GeneratePodHostNameAndDomain).
pub fn pod_hostname(pod: &Pod) -> String {
    let name = pod
        .spec
        .as_ref()
        .and_then(|s| s.hostname.clone())
        .filter(|h| !h.is_empty())
        .or_else(|| pod.metadata.name.clone())
        .unwrap_or_default();
    let cut: String = name.chars().take(63).collect();
    cut.trim_end_matches(['-', '.']).to_string()
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Resolv {
    nameservers: Vec<String>,
    searches: Vec<String>,
    /// `name` or `name:value`.
    options: Vec<String>,
}

fn parse_resolv(text: &str) -> Resolv {
    let mut r = Resolv::default();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or_default();
        let mut words = line.split_whitespace();
        match words.next() {
            Some("nameserver") => r.nameservers.extend(words.next().map(str::to_string)),
            // The last search/domain line wins, as in resolv.conf(5).
            Some("search" | "domain") => r.searches = words.map(str::to_string).collect(),
            Some("options") => r.options.extend(words.map(str::to_string)),
            _ => {}
        }
    }
    r
}

fn push_unique(list: &mut Vec<String>, v: &str) {
    if !v.is_empty() && !list.iter().any(|x| x == v) {
        list.push(v.to_string());
    }
}

/// The effective DNS policy: kubelet treats ClusterFirst as Default for hostNetwork pods.
fn policy(pod: &Pod) -> &str {
    let spec = pod.spec.as_ref();
    let policy = spec
        .and_then(|s| s.dns_policy.as_deref())
        .filter(|p| !p.is_empty())
        .unwrap_or("ClusterFirst");
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    match policy {
        "ClusterFirst" if host_network => "Default",
        p => p,
    }
}

/// The pod's resolv.conf. ClusterFirst (the default): the cluster DNS with the namespace's
/// search path and `ndots:5`; Default: the node's (`host_resolv`, the host's file); None: only
/// `spec.dnsConfig`, which is merged into the other policies too.
pub fn resolv_conf(pod: &Pod, dns: &DnsSettings, host_resolv: &str) -> String {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let d = &dns.cluster_domain;
    let mut r = match policy(pod) {
        "None" => Resolv::default(),
        "Default" => parse_resolv(host_resolv),
        _ => Resolv {
            nameservers: vec![dns.cluster_dns.clone()],
            searches: vec![format!("{ns}.svc.{d}"), format!("svc.{d}"), d.clone()],
            options: vec!["ndots:5".into()],
        },
    };
    if let Some(cfg) = pod.spec.as_ref().and_then(|s| s.dns_config.as_ref()) {
        for n in cfg.nameservers.iter().flatten() {
            push_unique(&mut r.nameservers, n);
        }
        for s in cfg.searches.iter().flatten() {
            push_unique(&mut r.searches, s);
        }
        for o in cfg.options.iter().flatten() {
            let Some(name) = o.name.as_deref().filter(|n| !n.is_empty()) else {
                continue;
            };
            let item = match &o.value {
                Some(v) => format!("{name}:{v}"),
                None => name.to_string(),
            };
            // A dnsConfig option replaces the same-named one of the policy.
            r.options.retain(|x| x.split(':').next() != Some(name));
            r.options.push(item);
        }
    }
    let mut out = String::new();
    for n in &r.nameservers {
        out.push_str(&format!("nameserver {n}\n"));
    }
    if !r.searches.is_empty() {
        out.push_str(&format!("search {}\n", r.searches.join(" ")));
    }
    if !r.options.is_empty() {
        out.push_str(&format!("options {}\n", r.options.join(" ")));
    }
    out
}

/// The pod's /etc/hosts (kubelet's managed hosts file, with `hostAliases`).
pub fn hosts_file(pod: &Pod, pod_ip: &str, dns: &DnsSettings) -> String {
    let mut out = String::from(
        "# Kubernetes-managed hosts file.\n\
         127.0.0.1\tlocalhost\n\
         ::1\tlocalhost ip6-localhost ip6-loopback\n\
         fe00::0\tip6-localnet\n\
         fe00::0\tip6-mcastprefix\n\
         fe00::1\tip6-allnodes\n\
         fe00::2\tip6-allrouters\n",
    );
    let hostname = pod_hostname(pod);
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let subdomain = pod
        .spec
        .as_ref()
        .and_then(|s| s.subdomain.as_deref())
        .filter(|s| !s.is_empty());
    match subdomain {
        Some(sub) => out.push_str(&format!(
            "{pod_ip}\t{hostname}.{sub}.{ns}.svc.{}\t{hostname}\n",
            dns.cluster_domain
        )),
        None => out.push_str(&format!("{pod_ip}\t{hostname}\n")),
    }
    let aliases = pod.spec.as_ref().and_then(|s| s.host_aliases.as_ref());
    if let Some(aliases) = aliases.filter(|a| !a.is_empty()) {
        out.push_str("\n# Entries added by HostAliases.\n");
        for a in aliases {
            let names = a.hostnames.clone().unwrap_or_default().join("\t");
            out.push_str(&format!("{}\t{names}\n", a.ip));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{HostAlias, PodDNSConfig, PodDNSConfigOption, PodSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn settings() -> DnsSettings {
        DnsSettings {
            cluster_dns: "10.244.0.1".into(),
            cluster_domain: "cluster.local".into(),
        }
    }

    fn pod(name: &str, spec: PodSpec) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("team1".into()),
                ..Default::default()
            },
            spec: Some(spec),
            ..Default::default()
        }
    }

    #[test]
    fn hostnames() {
        assert_eq!(pod_hostname(&pod("web-0", PodSpec::default())), "web-0");
        let p = pod(
            "web-0",
            PodSpec {
                hostname: Some("h".into()),
                ..Default::default()
            },
        );
        assert_eq!(pod_hostname(&p), "h");
        let long = format!("{}-x", "a".repeat(62));
        assert_eq!(
            pod_hostname(&pod(&long, PodSpec::default())),
            "a".repeat(62)
        );
    }

    #[test]
    fn cluster_first_resolv_conf() {
        let text = resolv_conf(
            &pod("p", PodSpec::default()),
            &settings(),
            "nameserver 9.9.9.9\n",
        );
        assert_eq!(
            text,
            "nameserver 10.244.0.1\n\
             search team1.svc.cluster.local svc.cluster.local cluster.local\n\
             options ndots:5\n"
        );
    }

    #[test]
    fn default_none_and_dns_config() {
        let host = "# generated\nnameserver 10.255.255.53\nsearch example.org\noptions edns0\n";
        let default = pod(
            "p",
            PodSpec {
                dns_policy: Some("Default".into()),
                ..Default::default()
            },
        );
        assert_eq!(
            resolv_conf(&default, &settings(), host),
            "nameserver 10.255.255.53\nsearch example.org\noptions edns0\n"
        );
        let host_net = pod(
            "p",
            PodSpec {
                host_network: Some(true),
                ..Default::default()
            },
        );
        assert!(resolv_conf(&host_net, &settings(), host).starts_with("nameserver 10.255.255.53"));
        let none = pod(
            "p",
            PodSpec {
                dns_policy: Some("None".into()),
                dns_config: Some(PodDNSConfig {
                    nameservers: Some(vec!["1.2.3.4".into()]),
                    searches: Some(vec!["a.example".into()]),
                    options: Some(vec![PodDNSConfigOption {
                        name: Some("ndots".into()),
                        value: Some("2".into()),
                    }]),
                }),
                ..Default::default()
            },
        );
        assert_eq!(
            resolv_conf(&none, &settings(), host),
            "nameserver 1.2.3.4\nsearch a.example\noptions ndots:2\n"
        );
        let merged = pod(
            "p",
            PodSpec {
                dns_config: Some(PodDNSConfig {
                    options: Some(vec![
                        PodDNSConfigOption {
                            name: Some("ndots".into()),
                            value: Some("1".into()),
                        },
                        PodDNSConfigOption {
                            name: Some("single-request".into()),
                            value: None,
                        },
                    ]),
                    ..Default::default()
                }),
                ..Default::default()
            },
        );
        assert!(
            resolv_conf(&merged, &settings(), host).ends_with("options ndots:1 single-request\n")
        );
    }

    #[test]
    fn hosts() {
        let plain = hosts_file(&pod("web-0", PodSpec::default()), "10.244.1.2", &settings());
        assert!(plain.starts_with("# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n"));
        assert!(plain.ends_with("\n10.244.1.2\tweb-0\n"), "{plain}");
        let sub = pod(
            "cache-1",
            PodSpec {
                subdomain: Some("cache".into()),
                host_aliases: Some(vec![HostAlias {
                    ip: "10.244.0.1".into(),
                    hostnames: Some(vec!["zk".into(), "api".into()]),
                }]),
                ..Default::default()
            },
        );
        let text = hosts_file(&sub, "10.244.2.7", &settings());
        assert!(
            text.contains("\n10.244.2.7\tcache-1.cache.team1.svc.cluster.local\tcache-1\n"),
            "{text}"
        );
        assert!(
            text.ends_with("# Entries added by HostAliases.\n10.244.0.1\tzk\tapi\n"),
            "{text}"
        );
    }
}
