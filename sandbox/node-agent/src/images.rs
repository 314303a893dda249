//! The image table (`sandbox/images.yaml`): which local program runs for a container image.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// command[0] is replaced by the entry's program; command[1..] and args are passed.
    #[default]
    ReplaceCommand,
    /// command + args run on the host as given.
    Host,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathRewrite {
    pub prefix: String,
    pub replacement: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageEntry {
    #[serde(default)]
    pub mode: Mode,
    #[serde(default)]
    pub program: Option<String>,
    #[serde(default)]
    pub override_env: Option<String>,
    #[serde(default)]
    pub default_command: Vec<String>,
    #[serde(default)]
    pub extra_args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub path_rewrites: Vec<PathRewrite>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TableFile {
    images: BTreeMap<String, ImageEntry>,
}

#[derive(Debug, Clone)]
pub struct ImageTable {
    pub path: PathBuf,
    pub entries: BTreeMap<String, ImageEntry>,
}

/// Values for `{bin_dir}`, `{repo}`, `{pod_ip}`, `{pod_dir}` and `{env:NAME}` in the table.
pub struct Templates<'a> {
    pub bin_dir: &'a str,
    pub repo: &'a str,
    pub pod_ip: &'a str,
    pub pod_dir: &'a str,
    /// The agent's environment (`std::env::var` in production).
    pub agent_env: &'a dyn Fn(&str) -> Option<String>,
}

/// What to execute for one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub program: String,
    pub args: Vec<String>,
    /// Extra environment from the table entry (added after the container's own env).
    pub env: Vec<(String, String)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    #[error(
        "image {image:?} (key {key:?}) is not in the sandbox image table {table}; known images: {known}"
    )]
    Unknown {
        image: String,
        key: String,
        table: String,
        known: String,
    },
    #[error("image {image:?}: the container gives no command and the table entry has no default_command")]
    NoCommand { image: String },
    #[error("image {image:?}: the table entry has no program")]
    NoProgram { image: String },
}

/// The table key of an image: basename without registry, tag or digest.
pub fn image_key(image: &str) -> &str {
    let no_digest = image.split('@').next().unwrap_or(image);
    let base = no_digest.rsplit('/').next().unwrap_or(no_digest);
    base.split(':').next().unwrap_or(base)
}

/// Expands `{name}` placeholders. `None` when an `{env:NAME}` is unset or empty.
fn expand(template: &str, t: &Templates<'_>) -> Option<String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            out.push_str(&rest[open..]);
            return Some(out);
        };
        let name = &after[..close];
        match name {
            "bin_dir" => out.push_str(t.bin_dir),
            "repo" => out.push_str(t.repo),
            "pod_ip" => out.push_str(t.pod_ip),
            "pod_dir" => out.push_str(t.pod_dir),
            _ if name.starts_with("env:") => {
                let v = (t.agent_env)(&name[4..]).filter(|v| !v.is_empty())?;
                out.push_str(&v);
            }
            _ => {
                out.push('{');
                out.push_str(name);
                out.push('}');
            }
        }
        rest = &after[close + 1..];
    }
    out.push_str(rest);
    Some(out)
}

impl ImageTable {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading image table {}: {e}", path.display()))?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> anyhow::Result<Self> {
        let file: TableFile = serde_saphyr::from_str(text)
            .map_err(|e| anyhow::anyhow!("parsing image table {}: {e}", path.display()))?;
        for (key, entry) in &file.images {
            if entry.mode == Mode::ReplaceCommand && entry.program.is_none() {
                anyhow::bail!(
                    "image table {}: entry {key:?} needs a program",
                    path.display()
                );
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            entries: file.images,
        })
    }

    pub fn known(&self) -> String {
        self.entries.keys().cloned().collect::<Vec<_>>().join(", ")
    }

    pub fn lookup(&self, image: &str) -> Result<&ImageEntry, ImageError> {
        let key = image_key(image);
        self.entries.get(key).ok_or_else(|| ImageError::Unknown {
            image: image.to_string(),
            key: key.to_string(),
            table: self.path.display().to_string(),
            known: self.known(),
        })
    }

    /// Program, arguments and extra env for a container (command/args already `$(VAR)`-expanded).
    pub fn resolve(
        &self,
        image: &str,
        command: &[String],
        args: &[String],
        t: &Templates<'_>,
    ) -> Result<Launch, ImageError> {
        let entry = self.lookup(image)?;
        let mut argv: Vec<String> = match entry.mode {
            Mode::Host => {
                if !command.is_empty() {
                    command.iter().chain(args).cloned().collect()
                } else if !args.is_empty() {
                    args.to_vec()
                } else if !entry.default_command.is_empty() {
                    entry.default_command.clone()
                } else {
                    return Err(ImageError::NoCommand {
                        image: image.to_string(),
                    });
                }
            }
            Mode::ReplaceCommand => {
                let over = entry
                    .override_env
                    .as_deref()
                    .and_then(|name| (t.agent_env)(name))
                    .filter(|v| !v.is_empty());
                let program = match over {
                    Some(p) => p,
                    None => {
                        let p = entry
                            .program
                            .as_deref()
                            .ok_or_else(|| ImageError::NoProgram {
                                image: image.to_string(),
                            })?;
                        expand(p, t).unwrap_or_else(|| p.to_string())
                    }
                };
                let mut v = vec![program];
                v.extend(command.iter().skip(1).cloned());
                v.extend(args.iter().cloned());
                v
            }
        };
        for arg in argv.iter_mut().skip(1) {
            for rw in &entry.path_rewrites {
                if let Some(rest) = arg.strip_prefix(rw.prefix.as_str()) {
                    if let Some(repl) = expand(&rw.replacement, t) {
                        *arg = format!("{repl}{rest}");
                        break;
                    }
                }
            }
        }
        argv.extend(entry.extra_args.iter().filter_map(|a| expand(a, t)));
        let env = entry
            .env
            .iter()
            .filter_map(|(k, v)| expand(v, t).map(|v| (k.clone(), v)))
            .collect();
        let program = argv.remove(0);
        Ok(Launch {
            program,
            args: argv,
            env,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> ImageTable {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../images.yaml"))
            .unwrap();
        ImageTable::parse(Path::new("sandbox/images.yaml"), &text).unwrap()
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn t<'a>(env: &'a dyn Fn(&str) -> Option<String>) -> Templates<'a> {
        Templates {
            bin_dir: "/b",
            repo: "/r",
            pod_ip: "10.244.1.5",
            pod_dir: "/p",
            agent_env: env,
        }
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn keys() {
        assert_eq!(
            image_key("jam2in/arcus-memcached:1.11.7"),
            "arcus-memcached"
        );
        assert_eq!(image_key("busybox"), "busybox");
        assert_eq!(
            image_key("localhost:5000/a/b/zookeeper:3.8@sha256:abc"),
            "zookeeper"
        );
        assert_eq!(image_key("docker.io/library/debian@sha256:0123"), "debian");
    }

    /// The images `scripts/image build` makes run from their layouts only: an entry here would
    /// let a test pass without the image users deploy.
    #[test]
    fn repo_table_leaves_our_own_images_to_their_layouts() {
        let tb = table();
        for k in ["arcus-operator", "arcus-sample", "arcus-application-sample"] {
            assert!(!tb.entries.contains_key(k), "{k}");
        }
    }

    #[test]
    fn repo_table_parses_and_has_the_needed_entries() {
        let tb = table();
        for k in [
            "arcus-memcached",
            "zookeeper",
            "busybox",
            "debian",
            "alpine",
        ] {
            assert!(tb.entries.contains_key(k), "{k}");
        }
    }

    #[test]
    fn memcached_default_is_the_standin_on_all_addresses() {
        let l = table()
            .resolve(
                "jam2in/arcus-memcached:1.11.7",
                &s(&["/arcus/bin/memcached", "-m", "64"]),
                &s(&["-E", "/arcus/lib/default_engine.so"]),
                &t(&no_env),
            )
            .unwrap();
        assert_eq!(l.program, "/b/arcus-standin");
        assert_eq!(
            l.args,
            s(&["-m", "64", "-E", "/arcus/lib/default_engine.so"])
        );
    }

    #[test]
    fn memcached_override_and_lib_rewrite() {
        let env = |n: &str| match n {
            "ARCUS_MEMCACHED_BIN" => Some("/opt/arcus/bin/memcached".to_string()),
            "ARCUS_MEMCACHED_LIB" => Some("/opt/arcus/lib".to_string()),
            _ => None,
        };
        let l = table()
            .resolve(
                "arcus-memcached:1.11.7",
                &s(&["/arcus/bin/memcached"]),
                &s(&["-E", "/arcus/lib/default_engine.so"]),
                &t(&env),
            )
            .unwrap();
        assert_eq!(l.program, "/opt/arcus/bin/memcached");
        assert_eq!(l.args, s(&["-E", "/opt/arcus/lib/default_engine.so"]));
    }

    #[test]
    fn host_mode_runs_command_as_given() {
        let tb = table();
        let l = tb
            .resolve("busybox:1.36", &s(&["sleep"]), &s(&["3600"]), &t(&no_env))
            .unwrap();
        assert_eq!(
            (l.program.as_str(), l.args.clone()),
            ("sleep", s(&["3600"]))
        );
        let l = tb
            .resolve("busybox", &[], &s(&["sleep", "1"]), &t(&no_env))
            .unwrap();
        assert_eq!((l.program.as_str(), l.args.clone()), ("sleep", s(&["1"])));
        let l = tb.resolve("debian:12", &[], &[], &t(&no_env)).unwrap();
        assert_eq!(l.program, "bash");
    }

    #[test]
    fn zookeeper_gets_the_pod_ip() {
        let z = table()
            .resolve("zookeeper:3.8", &[], &[], &t(&no_env))
            .unwrap();
        assert_eq!(z.program, "/r/sandbox/images/zookeeper-run");
        assert_eq!(
            z.env,
            vec![("POD_IP".to_string(), "10.244.1.5".to_string())],
            "{{pod_ip}} templating"
        );
    }

    #[test]
    fn unknown_image_names_table_and_known_images() {
        let err = table()
            .resolve("nginx:1.25", &[], &[], &t(&no_env))
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("\"nginx:1.25\""), "{msg}");
        assert!(msg.contains("sandbox/images.yaml"), "{msg}");
        assert!(msg.contains("arcus-memcached, busybox"), "{msg}");
    }

    #[test]
    fn bad_table_is_rejected() {
        assert!(
            ImageTable::parse(Path::new("x"), "images:\n  a:\n    mode: replace-command\n")
                .is_err()
        );
        assert!(ImageTable::parse(Path::new("x"), "images:\n  a:\n    programm: x\n").is_err());
    }
}
