//! arcus-memcached's command line: parsing (getopt style, any order) and translation into a
//! command line for Debian's stock memcached.

use std::fmt;
use std::time::Duration;

/// EX_USAGE from sysexits.h: the exit status for a command line we cannot accept.
pub const EX_USAGE: u8 = 64;

/// arcus-memcached's default ZooKeeper session timeout (`-o`), in seconds.
pub const DEFAULT_ZK_TIMEOUT_SECS: u32 = 30;
/// The range of `-o` values the real server accepts (seconds); others fall back to the default.
pub const ZK_TIMEOUT_RANGE_SECS: std::ops::RangeInclusive<u32> = 10..=2000;

/// Engine config keys that only an arcus-memcached built with `--enable-persistence` knows.
const PERSISTENCE_KEYS: &[&str] = &[
    "use_persistence",
    "data_path",
    "logs_path",
    "async_logging",
    "chkpt_interval_pct_snapshot",
    "chkpt_interval_min_logsize",
];

/// The options of arcus-memcached's canonical command line that the stand-in understands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerArgs {
    /// `-E <lib>/default_engine.so` (ignored: stock memcached has one built-in engine).
    pub engine: Option<String>,
    /// `-X <lib>/ascii_scrub.so` (ignored; stock `-X` means "disable dumping", so never pass it on).
    pub extension: Vec<String>,
    /// `-u <user>`.
    pub user: Option<String>,
    /// `-D <char>` (ignored).
    pub prefix_delimiter: Option<String>,
    /// `-r` (ignored).
    pub core_dumps: bool,
    /// `-R <n>`.
    pub reqs_per_event: Option<u32>,
    /// `-U <port>`.
    pub udp_port: Option<u16>,
    /// `-b <backlog>`.
    pub backlog: Option<u32>,
    /// `-p <port>`.
    pub port: Option<u16>,
    /// `-m <MB>`.
    pub memlimit_mb: Option<u64>,
    /// `-c <connections>`.
    pub max_conns: Option<u32>,
    /// `-t <threads>`.
    pub threads: Option<u32>,
    /// `-z <host:port,...>`.
    pub zk_ensemble: Option<String>,
    /// `-o <secs>` as given (see [`ServerArgs::zk_session_timeout`]).
    pub zk_timeout_secs: Option<u32>,
    /// `-l <listen ip>`.
    pub listen: Option<String>,
    /// `-e <engine config>`.
    pub engine_config: Option<String>,
    /// Number of `-v`.
    pub verbose: u8,
}

/// A command line the stand-in refuses (exit [`EX_USAGE`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

pub const USAGE: &str = "usage: arcus-standin -E <lib>/default_engine.so -X <lib>/ascii_scrub.so -u <user> -D : -r \
-R5 -U 0 -b 8192 -p <port> -m <MB> -c <conns> -t <threads> -z <zk host:port,...> [-o <zk session timeout secs>] \
[-l <listen ip>] [-e <engine config>] [-v...]";

/// Options that take a value, as getopt's `x:`.
const WITH_VALUE: &str = "EXuDRUbpmctzole";
/// Options without a value.
const FLAGS: &str = "rv";

impl ServerArgs {
    /// Parses arcus-memcached's arguments (without argv\[0\]) like getopt: options in any order,
    /// values attached (`-R5`) or separate (`-R 5`), flags bundled (`-vv`, `-rv`).
    pub fn parse<I, S>(args: I) -> Result<Self, UsageError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let args: Vec<String> = args.into_iter().map(|s| s.as_ref().to_string()).collect();
        let mut out = ServerArgs::default();
        let mut i = 0;
        while i < args.len() {
            let arg = &args[i];
            i += 1;
            if arg == "--" {
                if i < args.len() {
                    return Err(UsageError(format!(
                        "unexpected argument {:?} after --",
                        args[i]
                    )));
                }
                break;
            }
            if arg.starts_with("--") {
                return Err(UsageError(format!(
                    "unknown option {arg:?} (long options are not supported)"
                )));
            }
            let Some(body) = arg.strip_prefix('-').filter(|b| !b.is_empty()) else {
                return Err(UsageError(format!(
                    "unexpected argument {arg:?} (not an option)"
                )));
            };
            for (pos, opt) in body.char_indices() {
                if FLAGS.contains(opt) {
                    match opt {
                        'r' => out.core_dumps = true,
                        'v' => out.verbose = out.verbose.saturating_add(1),
                        _ => unreachable!(),
                    }
                    continue;
                }
                if !WITH_VALUE.contains(opt) {
                    return Err(UsageError(format!(
                        "unknown option -{opt} (in {arg:?}); the stand-in accepts only -E -X -u -D -r -R -U -b -p -m -c -t -z -o -l -e -v"
                    )));
                }
                let rest = &body[pos + opt.len_utf8()..];
                let value = if !rest.is_empty() {
                    rest.to_string()
                } else if i < args.len() {
                    i += 1;
                    args[i - 1].clone()
                } else {
                    return Err(UsageError(format!("option -{opt} needs a value")));
                };
                out.set(opt, value)?;
                break;
            }
        }
        Ok(out)
    }

    fn set(&mut self, opt: char, value: String) -> Result<(), UsageError> {
        match opt {
            'E' => self.engine = Some(value),
            'X' => self.extension.push(value),
            'u' => self.user = Some(value),
            'D' => self.prefix_delimiter = Some(value),
            'R' => self.reqs_per_event = Some(number(opt, &value, 1)?),
            'U' => self.udp_port = Some(number(opt, &value, 0)?),
            'b' => self.backlog = Some(number(opt, &value, 1)?),
            'p' => self.port = Some(number(opt, &value, 1)?),
            'm' => self.memlimit_mb = Some(number(opt, &value, 1)?),
            'c' => self.max_conns = Some(number(opt, &value, 1)?),
            't' => self.threads = Some(number(opt, &value, 1)?),
            'z' => {
                if value.trim().is_empty() {
                    return Err(UsageError(
                        "-z needs a ZooKeeper ensemble host:port[,host:port...]".into(),
                    ));
                }
                self.zk_ensemble = Some(value)
            }
            'o' => self.zk_timeout_secs = Some(number(opt, &value, 0)?),
            'l' => self.listen = Some(value),
            'e' => self.engine_config = Some(value),
            _ => unreachable!("option -{opt} is in WITH_VALUE"),
        }
        Ok(())
    }

    /// The TCP port (arcus-memcached's default is 11211).
    pub fn port(&self) -> u16 {
        self.port.unwrap_or(11211)
    }

    /// The memory limit in MB (default 64), as written into the cache_list znode.
    pub fn memlimit_mb(&self) -> u64 {
        self.memlimit_mb.unwrap_or(64)
    }

    /// The ZooKeeper session timeout: `-o` when within 10..=2000 s, else the default 30 s
    /// (the real server silently ignores an out-of-range value; the stand-in logs it).
    pub fn zk_session_timeout(&self) -> (Duration, Option<String>) {
        match self.zk_timeout_secs {
            None => (Duration::from_secs(DEFAULT_ZK_TIMEOUT_SECS.into()), None),
            Some(s) if ZK_TIMEOUT_RANGE_SECS.contains(&s) => (Duration::from_secs(s.into()), None),
            Some(s) => (
                Duration::from_secs(DEFAULT_ZK_TIMEOUT_SECS.into()),
                Some(format!(
                    "-o {s} is outside {}..={} seconds; using the default {DEFAULT_ZK_TIMEOUT_SECS} s like arcus-memcached",
                    ZK_TIMEOUT_RANGE_SECS.start(),
                    ZK_TIMEOUT_RANGE_SECS.end()
                )),
            ),
        }
    }

    /// The address to probe until memcached accepts: the first `-l` address, else 127.0.0.1.
    pub fn probe_ip(&self) -> String {
        let Some(listen) = self.listen.as_deref() else {
            return "127.0.0.1".into();
        };
        let first = listen.split(',').next().unwrap_or("").trim();
        let first = first.strip_prefix("notls:").unwrap_or(first);
        // `-l ip:port` is allowed by memcached; keep only the address part.
        let ip = if let Ok(ip) = first.parse::<std::net::IpAddr>() {
            Some(ip)
        } else {
            first.parse::<std::net::SocketAddr>().ok().map(|sa| sa.ip())
        };
        match ip {
            Some(ip) if ip.is_unspecified() => "127.0.0.1".into(),
            Some(ip) => ip.to_string(),
            None if first.is_empty() => "127.0.0.1".into(),
            None => first
                .rsplit_once(':')
                .map(|(h, _)| h.to_string())
                .unwrap_or_else(|| first.to_string()),
        }
    }

    /// The TCP addresses the stand-in's proxy listens on: every `-l` item (comma separated,
    /// `notls:` prefix dropped) with `-p` unless it names its own port; `0.0.0.0:<port>` without
    /// `-l` (memcached's default is every interface).
    pub fn listen_addrs(&self) -> Vec<String> {
        let port = self.port();
        let Some(listen) = self.listen.as_deref() else {
            return vec![format!("0.0.0.0:{port}")];
        };
        let mut out = Vec::new();
        for item in listen.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let item = item.strip_prefix("notls:").unwrap_or(item);
            let addr = if let Ok(ip) = item.parse::<std::net::IpAddr>() {
                std::net::SocketAddr::new(ip, port).to_string()
            } else if item.parse::<std::net::SocketAddr>().is_ok() {
                item.to_string()
            } else if item.contains(':') {
                // host:port
                item.to_string()
            } else {
                format!("{item}:{port}")
            };
            if !out.contains(&addr) {
                out.push(addr);
            }
        }
        if out.is_empty() {
            out.push(format!("0.0.0.0:{port}"));
        }
        out
    }

    /// The listen backlog (`-b`, memcached's default 1024).
    pub fn backlog(&self) -> u32 {
        self.backlog.unwrap_or(1024)
    }

    /// Arguments for Debian's stock memcached, which listens only on the unix socket `socket`
    /// (mode 0700) behind the stand-in's proxy: `-p -l -U` are not passed (with `-s` memcached
    /// opens no network port). Dropped as well: `-E -X -D -r -z -o -e` (`-X` would even mean
    /// "disable dumping" to stock memcached, which would break `lru_crawler metadump`).
    pub fn memcached_args(&self, socket: &str) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        let mut push = |flag: &str, value: String| {
            v.push(flag.to_string());
            v.push(value);
        };
        push("-s", socket.to_string());
        push("-a", "0700".to_string());
        push("-m", self.memlimit_mb().to_string());
        if let Some(c) = self.max_conns {
            push("-c", c.to_string());
        }
        if let Some(t) = self.threads {
            push("-t", t.to_string());
        }
        if let Some(b) = self.backlog {
            push("-b", b.to_string());
        }
        if let Some(u) = &self.user {
            push("-u", u.clone());
        }
        if let Some(r) = self.reqs_per_event {
            push("-R", r.to_string());
        }
        if self.verbose > 0 {
            v.push(format!("-{}", "v".repeat(self.verbose.min(3) as usize)));
        }
        v
    }
}

fn number<T: std::str::FromStr + PartialOrd + From<u8>>(
    opt: char,
    value: &str,
    min: u8,
) -> Result<T, UsageError> {
    match value.trim().parse::<T>() {
        Ok(n) if n >= T::from(min) => Ok(n),
        _ => Err(UsageError(format!(
            "option -{opt} needs a number >= {min}, got {value:?}"
        ))),
    }
}

/// What the default engine would make of `-e`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineConfig {
    /// Nothing the stand-in must refuse; the listed keys are ignored (stock memcached has no
    /// equivalent of the default engine's config string).
    Ignored(Vec<String>),
    /// A persistence key: a build without `--enable-persistence` prints
    /// `Unsupported key: <key>` and fails.
    Unsupported(String),
}

/// Inspects an `-e` engine config: `key=value;key=value...`, or `config_file=<file>` whose lines
/// (or `;`-separated items) are read the same way. `read_file` is injected for tests.
pub fn check_engine_config(
    config: &str,
    read_file: &dyn Fn(&str) -> std::io::Result<String>,
) -> Result<EngineConfig, String> {
    let mut ignored = Vec::new();
    for item in config.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        let key = item.split_once('=').map(|(k, _)| k.trim()).unwrap_or(item);
        if PERSISTENCE_KEYS.contains(&key) {
            return Ok(EngineConfig::Unsupported(key.to_string()));
        }
        if key == "config_file" {
            let path = item.split_once('=').map(|(_, v)| v.trim()).unwrap_or("");
            let text = read_file(path)
                .map_err(|e| format!("cannot read engine config_file {path:?}: {e}"))?;
            for line in text.lines().flat_map(|l| l.split(';')) {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let key = line.split_once('=').map(|(k, _)| k.trim()).unwrap_or(line);
                if PERSISTENCE_KEYS.contains(&key) {
                    return Ok(EngineConfig::Unsupported(key.to_string()));
                }
                ignored.push(key.to_string());
            }
            continue;
        }
        ignored.push(key.to_string());
    }
    Ok(EngineConfig::Ignored(ignored))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CANONICAL: &str =
        "-E /opt/arcus/lib/default_engine.so -X /opt/arcus/lib/ascii_scrub.so -u root -D : -r \
        -R5 -U 0 -b 8192 -p 11300 -m 100 -c 4096 -t 6 -z 127.0.0.1:2181,127.0.0.2:2181";

    fn parse(s: &str) -> Result<ServerArgs, UsageError> {
        ServerArgs::parse(s.split_whitespace())
    }

    #[test]
    fn canonical_command_line() {
        let a = parse(CANONICAL).unwrap();
        assert_eq!(
            a.engine.as_deref(),
            Some("/opt/arcus/lib/default_engine.so")
        );
        assert_eq!(
            a.extension,
            vec!["/opt/arcus/lib/ascii_scrub.so".to_string()]
        );
        assert_eq!(a.user.as_deref(), Some("root"));
        assert_eq!(a.prefix_delimiter.as_deref(), Some(":"));
        assert!(a.core_dumps);
        assert_eq!(a.reqs_per_event, Some(5));
        assert_eq!(a.udp_port, Some(0));
        assert_eq!(a.backlog, Some(8192));
        assert_eq!(a.port(), 11300);
        assert_eq!(a.memlimit_mb(), 100);
        assert_eq!(a.max_conns, Some(4096));
        assert_eq!(a.threads, Some(6));
        assert_eq!(
            a.zk_ensemble.as_deref(),
            Some("127.0.0.1:2181,127.0.0.2:2181")
        );
        assert_eq!(a.zk_session_timeout(), (Duration::from_secs(30), None));
        assert_eq!(a.verbose, 0);
        assert_eq!(
            a.memcached_args("/tmp/d/memcached.sock").join(" "),
            "-s /tmp/d/memcached.sock -a 0700 -m 100 -c 4096 -t 6 -b 8192 -u root -R 5"
        );
        assert_eq!(a.listen_addrs(), vec!["0.0.0.0:11300".to_string()]);
    }

    #[test]
    fn any_order_attached_values_and_optional_flags() {
        let a =
            parse("-z zk:2181 -o 15 -vv -l 127.1.0.7 -p11211 -m64 -R 5 -e eviction=on -u nobody")
                .unwrap();
        assert_eq!(a.port(), 11211);
        assert_eq!(a.memlimit_mb(), 64);
        assert_eq!(a.zk_session_timeout(), (Duration::from_secs(15), None));
        assert_eq!(a.listen.as_deref(), Some("127.1.0.7"));
        assert_eq!(a.verbose, 2);
        assert_eq!(a.engine_config.as_deref(), Some("eviction=on"));
        assert_eq!(a.probe_ip(), "127.1.0.7");
        assert_eq!(
            a.memcached_args("s").join(" "),
            "-s s -a 0700 -m 64 -u nobody -R 5 -vv"
        );
        assert_eq!(a.listen_addrs(), vec!["127.1.0.7:11211".to_string()]);
    }

    #[test]
    fn bundled_flags_and_repeated_v() {
        let a = parse("-rv -v -v -v -p 1").unwrap();
        assert!(a.core_dumps);
        assert_eq!(a.verbose, 4);
        // stock memcached knows at most -vvv
        assert!(a.memcached_args("s").contains(&"-vvv".to_string()));
        // a flag bundled in front of an option with a value
        let a = parse("-rp11222").unwrap();
        assert!(a.core_dumps);
        assert_eq!(a.port(), 11222);
    }

    #[test]
    fn defaults_without_options() {
        let a = parse("").unwrap();
        assert_eq!(a.port(), 11211);
        assert_eq!(a.memlimit_mb(), 64);
        assert_eq!(a.zk_ensemble, None);
        assert_eq!(a.probe_ip(), "127.0.0.1");
        assert_eq!(a.memcached_args("s").join(" "), "-s s -a 0700 -m 64");
    }

    #[test]
    fn dropped_options_never_reach_memcached() {
        let a = parse(&format!("{CANONICAL} -o 20 -e eviction=on -l 127.1.0.2")).unwrap();
        let args = a.memcached_args("s");
        // with -s memcached opens no TCP/UDP port: the proxy owns -p and -l
        for dropped in ["-E", "-X", "-D", "-r", "-z", "-o", "-e", "-p", "-l", "-U"] {
            assert!(
                !args.contains(&dropped.to_string()),
                "{dropped} passed on: {args:?}"
            );
        }
    }

    #[test]
    fn zk_timeout_range() {
        let t = |s: &str| parse(&format!("-o {s}")).unwrap().zk_session_timeout();
        assert_eq!(t("10").0, Duration::from_secs(10));
        assert_eq!(t("2000").0, Duration::from_secs(2000));
        assert_eq!(t("9").0, Duration::from_secs(30));
        assert!(t("9").1.unwrap().contains("outside 10..=2000"));
        assert_eq!(t("2001").0, Duration::from_secs(30));
        assert!(parse("-o ten").is_err());
    }

    #[test]
    fn errors_are_clear() {
        let e = parse("-p 11211 -Q").unwrap_err().0;
        assert!(e.contains("unknown option -Q"), "{e}");
        let e = parse("--port 11211").unwrap_err().0;
        assert!(e.contains("unknown option \"--port\""), "{e}");
        let e = parse("-p").unwrap_err().0;
        assert!(e.contains("-p needs a value"), "{e}");
        let e = parse("-p abc").unwrap_err().0;
        assert!(e.contains("-p needs a number"), "{e}");
        let e = parse("-p 0").unwrap_err().0;
        assert!(e.contains("-p needs a number >= 1"), "{e}");
        let e = parse("-m 64 stray").unwrap_err().0;
        assert!(e.contains("unexpected argument \"stray\""), "{e}");
        let e = parse("-M").unwrap_err().0;
        assert!(e.contains("unknown option -M"), "{e}");
        assert!(ServerArgs::parse(["-z", " "]).is_err());
    }

    #[test]
    fn delimiter_value_looks_like_anything() {
        // "-D :" takes ":" as its value; "-D -" must also be a value, not an option.
        let a = ServerArgs::parse(["-D", "-", "-p", "5"]).unwrap();
        assert_eq!(a.prefix_delimiter.as_deref(), Some("-"));
        assert_eq!(a.port(), 5);
    }

    #[test]
    fn probe_ip_variants() {
        let p = |l: &str| {
            ServerArgs {
                listen: Some(l.into()),
                ..Default::default()
            }
            .probe_ip()
        };
        assert_eq!(p("127.1.0.3,127.1.0.4"), "127.1.0.3");
        assert_eq!(p("127.1.0.3:11211"), "127.1.0.3");
        assert_eq!(p("notls:127.1.0.9"), "127.1.0.9");
        assert_eq!(p("0.0.0.0"), "127.0.0.1");
    }

    #[test]
    fn listen_addrs_variants() {
        let l = |l: &str| {
            ServerArgs {
                listen: Some(l.into()),
                port: Some(11300),
                ..Default::default()
            }
            .listen_addrs()
        };
        assert_eq!(
            l("127.1.0.3,notls:127.1.0.4"),
            ["127.1.0.3:11300", "127.1.0.4:11300"]
        );
        assert_eq!(l("127.1.0.3:11999"), ["127.1.0.3:11999"]);
        assert_eq!(l("::1"), ["[::1]:11300"]);
        assert_eq!(l("localhost"), ["localhost:11300"]);
        assert_eq!(l(""), ["0.0.0.0:11300"]);
    }

    #[test]
    fn engine_config_persistence_is_unsupported() {
        let no_file =
            |_: &str| -> std::io::Result<String> { Err(std::io::Error::other("no file")) };
        let c = "use_persistence=true;data_path=/d;logs_path=/l;async_logging=false;chkpt_interval_pct_snapshot=100";
        assert_eq!(
            check_engine_config(c, &no_file),
            Ok(EngineConfig::Unsupported("use_persistence".into()))
        );
        assert_eq!(
            check_engine_config("eviction=on; data_path=/x", &no_file),
            Ok(EngineConfig::Unsupported("data_path".into()))
        );
        assert_eq!(
            check_engine_config("eviction=on;verbose=1", &no_file),
            Ok(EngineConfig::Ignored(vec![
                "eviction".into(),
                "verbose".into()
            ]))
        );
        let file = |p: &str| -> std::io::Result<String> {
            assert_eq!(p, "/etc/arcus.conf");
            Ok("# comment\nuse_persistence=true\ndata_path=/d\n".into())
        };
        assert_eq!(
            check_engine_config("config_file=/etc/arcus.conf", &file),
            Ok(EngineConfig::Unsupported("use_persistence".into()))
        );
        assert!(check_engine_config("config_file=/nope", &no_file)
            .unwrap_err()
            .contains("/nope"));
    }
}
