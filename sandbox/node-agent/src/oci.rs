//! OCI image layouts as container images: `<image dir>/<NAME>/` (`oci-layout`, `index.json`,
//! `blobs/sha256/…`) serves every reference whose last path component is NAME, by manifest
//! digest or by the `org.opencontainers.image.ref.name` annotation (the tag). Also the
//! Kubernetes rules that turn an image config and a container into a process: command/args vs
//! Entrypoint/Cmd, the image's Env under the container's, the program looked up in the image's
//! PATH inside the root filesystem.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

pub const REF_NAME: &str = "org.opencontainers.image.ref.name";
const INDEX_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];

/// `[registry[:port]/][path/]NAME[:TAG][@sha256:DIGEST]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub name: String,
    pub tag: Option<String>,
    /// `sha256:<64 hex>`.
    pub digest: Option<String>,
}

impl ImageRef {
    pub fn tag_or_latest(&self) -> &str {
        self.tag.as_deref().unwrap_or("latest")
    }
}

fn valid_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// Parses an image reference (the parts this agent uses; the registry and path are ignored).
pub fn parse_ref(image: &str) -> Result<ImageRef, String> {
    let bad = |why: &str| format!("invalid image reference {image:?}: {why}");
    let (rest, digest) = match image.split_once('@') {
        Some((r, d)) if valid_digest(d) => (r, Some(d.to_string())),
        Some(_) => return Err(bad("the digest must be sha256:<64 lowercase hex digits>")),
        None => (image, None),
    };
    // A colon in the last path component is the tag's; one before it is a registry port.
    let last = rest.rsplit('/').next().unwrap_or(rest);
    let (name, tag) = match last.split_once(':') {
        Some((n, t)) => (n, Some(t.to_string())),
        None => (last, None),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if !name_ok {
        return Err(bad(
            "the name must be lowercase letters, digits, '.', '_' or '-'",
        ));
    }
    if let Some(t) = &tag {
        let tag_ok = !t.is_empty()
            && t.len() <= 128
            && !t.starts_with(['.', '-'])
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !tag_ok {
            return Err(bad("the tag must be [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"));
        }
    }
    Ok(ImageRef {
        name: name.to_string(),
        tag,
        digest,
    })
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    #[serde(default)]
    pub size: i64,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub platform: Option<Platform>,
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Index {
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
}

/// The part of an image config (`config` in the config blob) that shapes the process.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct ProcessConfig {
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct ConfigBlob {
    #[serde(default)]
    config: Option<ProcessConfig>,
}

/// An image resolved from a layout.
#[derive(Debug, Clone)]
pub struct LayoutImage {
    pub name: String,
    pub layout: PathBuf,
    /// `sha256:<hex>` of the manifest.
    pub manifest_digest: String,
    pub manifest: Manifest,
    pub config: ProcessConfig,
}

impl LayoutImage {
    /// `status.containerStatuses[].imageID`.
    pub fn image_id(&self) -> String {
        format!("{}@{}", self.name, self.manifest_digest)
    }

    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, String> {
        blob_path(&self.layout, digest)
    }
}

fn blob_path(layout: &Path, digest: &str) -> Result<PathBuf, String> {
    if !valid_digest(digest) {
        return Err(format!(
            "layout {}: unsupported or invalid digest {digest:?} (only sha256 is supported)",
            layout.display()
        ));
    }
    Ok(layout.join("blobs/sha256").join(&digest["sha256:".len()..]))
}

/// A blob's bytes, checked against its digest.
fn read_blob(layout: &Path, digest: &str) -> Result<Vec<u8>, String> {
    let path = blob_path(layout, digest)?;
    let bytes =
        std::fs::read(&path).map_err(|e| format!("reading blob {}: {e}", path.display()))?;
    let actual = format!("sha256:{:x}", Sha256::digest(&bytes));
    if actual != digest {
        return Err(format!(
            "blob {} has digest {actual}, not {digest}: the layout is corrupt (rebuild the image)",
            path.display()
        ));
    }
    Ok(bytes)
}

/// Why a reference has no image in a layout that exists (`ErrImagePull`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("image {image:?}: {what} is not in the OCI layout {layout}; it has tags: {tags}")]
pub struct NotInLayout {
    pub image: String,
    pub what: String,
    pub layout: String,
    pub tags: String,
}

/// The descriptor of `r` in an index: by digest when the reference has one, else by tag.
pub fn select<'a>(index: &'a Index, r: &ImageRef) -> Option<&'a Descriptor> {
    match &r.digest {
        Some(d) => index.manifests.iter().find(|m| &m.digest == d),
        None => {
            let tag = r.tag_or_latest();
            index.manifests.iter().find(|m| {
                m.annotations.get(REF_NAME).is_some_and(|n| {
                    // Some tools annotate the whole reference (`name:tag`), most the tag.
                    n == tag || n.rsplit_once(':').is_some_and(|(_, t)| t == tag)
                })
            })
        }
    }
}

/// The tags an index has, for messages.
pub fn tags(index: &Index) -> String {
    let t: Vec<&str> = index
        .manifests
        .iter()
        .filter_map(|m| m.annotations.get(REF_NAME).map(String::as_str))
        .collect();
    if t.is_empty() {
        "(none)".into()
    } else {
        t.join(", ")
    }
}

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Result of looking an image up in the image dir.
#[derive(Debug)]
pub enum Lookup {
    /// No layout named after the image: the image table decides.
    NoLayout,
    Found(Box<LayoutImage>),
    /// The layout exists but lacks the tag or digest.
    Missing(NotInLayout),
}

/// Looks `image` up in `<image_dir>/<NAME>/index.json` (read afresh on every call: tags are added
/// while the agent runs). `Err` for a reference or layout that cannot be used.
pub fn lookup(image_dir: &Path, image: &str) -> Result<Lookup, String> {
    let r = parse_ref(image)?;
    let layout = image_dir.join(&r.name);
    let index_path = layout.join("index.json");
    let text = match std::fs::read(&index_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Lookup::NoLayout),
        Err(e) => return Err(format!("reading {}: {e}", index_path.display())),
    };
    let index: Index = serde_json::from_slice(&text)
        .map_err(|e| format!("parsing {}: {e}", index_path.display()))?;
    let desc = match select(&index, &r) {
        Some(d) => d.clone(),
        // A digest of a manifest that only a nested index lists, or that is just a blob.
        None if r.digest.is_some()
            && blob_path(&layout, r.digest.as_deref().unwrap_or_default())?.is_file() =>
        {
            Descriptor {
                media_type: String::new(),
                digest: r.digest.clone().unwrap_or_default(),
                size: 0,
                annotations: BTreeMap::new(),
                platform: None,
            }
        }
        None => {
            return Ok(Lookup::Missing(NotInLayout {
                image: image.to_string(),
                what: match &r.digest {
                    Some(d) => format!("digest {d}"),
                    None => format!("tag {:?}", r.tag_or_latest()),
                },
                layout: layout.display().to_string(),
                tags: tags(&index),
            }))
        }
    };
    let mut digest = desc.digest.clone();
    let mut bytes = read_blob(&layout, &digest)?;
    let is_index = |media: &str, bytes: &[u8]| {
        INDEX_TYPES.contains(&media)
            || serde_json::from_slice::<serde_json::Value>(bytes)
                .ok()
                .is_some_and(|v| v.get("manifests").is_some() && v.get("config").is_none())
    };
    if is_index(&desc.media_type, &bytes) {
        // A multi-platform image: this machine's linux platform.
        let nested: Index = serde_json::from_slice(&bytes)
            .map_err(|e| format!("parsing image index {digest} in {}: {e}", layout.display()))?;
        let m = nested
            .manifests
            .iter()
            .find(|m| {
                m.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == host_arch())
            })
            .ok_or_else(|| {
                format!(
                    "image {image:?}: the index {digest} in {} has no linux/{} manifest",
                    layout.display(),
                    host_arch()
                )
            })?;
        digest = m.digest.clone();
        bytes = read_blob(&layout, &digest)?;
    }
    let manifest: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| format!("parsing manifest {digest} in {}: {e}", layout.display()))?;
    let config_bytes = read_blob(&layout, &manifest.config.digest)?;
    let config: ConfigBlob = serde_json::from_slice(&config_bytes).map_err(|e| {
        format!(
            "parsing image config {} in {}: {e}",
            manifest.config.digest,
            layout.display()
        )
    })?;
    Ok(Lookup::Found(Box::new(LayoutImage {
        name: r.name,
        layout,
        manifest_digest: digest,
        manifest,
        config: config.config.unwrap_or_default(),
    })))
}

/// Kubernetes' rule: `command` replaces the Entrypoint and `args` the Cmd; without a command,
/// Entrypoint + (args, else Cmd).
pub fn merge_command(
    entrypoint: &[String],
    cmd: &[String],
    command: &[String],
    args: &[String],
) -> Vec<String> {
    if !command.is_empty() {
        return command.iter().chain(args).cloned().collect();
    }
    let tail = if args.is_empty() { cmd } else { args };
    entrypoint.iter().chain(tail).cloned().collect()
}

/// The image's Env (`K=V`) as a map.
pub fn image_env(config: &ProcessConfig) -> BTreeMap<String, String> {
    config
        .env
        .iter()
        .flatten()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

/// The host path of the container path `path` inside `root`, with symlinks followed as the
/// container would see them (absolute links and `..` never leave `root`). Components that do
/// not exist are appended as they are.
pub fn resolve_in_root(root: &Path, path: &Path) -> std::io::Result<PathBuf> {
    use std::path::Component;
    let mut pending: Vec<std::ffi::OsString> = path
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut current = PathBuf::new();
    let mut links = 0;
    while let Some(part) = pending.pop() {
        if part == ".." {
            current.pop();
            continue;
        }
        let candidate = current.join(&part);
        match std::fs::symlink_metadata(root.join(&candidate)) {
            Ok(m) if m.file_type().is_symlink() => {
                links += 1;
                if links > 40 {
                    return Err(std::io::Error::other(format!(
                        "too many symbolic links resolving {} in {}",
                        path.display(),
                        root.display()
                    )));
                }
                let target = std::fs::read_link(root.join(&candidate))?;
                if target.is_absolute() {
                    current = PathBuf::new();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(n) => pending.push(n.to_os_string()),
                        Component::ParentDir => pending.push("..".into()),
                        _ => {}
                    }
                }
            }
            _ => current = candidate,
        }
    }
    Ok(root.join(current))
}

/// The program as the container's exec sees it: `argv0` with a `/` as is (relative to the
/// working dir), else the first executable `<dir>/argv0` of PATH inside `root`.
pub fn find_program(
    root: &Path,
    argv0: &str,
    path_var: &str,
    working_dir: &str,
) -> Result<String, String> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &str| {
        resolve_in_root(root, Path::new(p))
            .ok()
            .and_then(|h| std::fs::metadata(h).ok())
            .is_some_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if argv0.contains('/') {
        let p = if argv0.starts_with('/') {
            argv0.to_string()
        } else {
            format!("{}/{argv0}", working_dir.trim_end_matches('/'))
        };
        return if executable(&p) {
            Ok(p)
        } else {
            Err(format!(
                "exec: {argv0:?}: no such executable file in the image"
            ))
        };
    }
    path_var
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| format!("{}/{argv0}", d.trim_end_matches('/')))
        .find(|p| executable(p))
        .ok_or_else(|| {
            format!("exec: {argv0:?}: executable file not found in $PATH ({path_var}) of the image")
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn references() {
        let r = parse_ref("busybox").unwrap();
        assert_eq!((r.name.as_str(), r.tag.as_deref()), ("busybox", None));
        assert_eq!(r.tag_or_latest(), "latest");
        let r = parse_ref("localhost:5000/a/b/arcus-operator:0.1.0").unwrap();
        assert_eq!(
            (r.name.as_str(), r.tag.as_deref(), r.digest.as_deref()),
            ("arcus-operator", Some("0.1.0"), None)
        );
        let r = parse_ref(&format!("registry.example:443/x/zk:3.8@{D}")).unwrap();
        assert_eq!(
            (r.name.as_str(), r.tag.as_deref(), r.digest.as_deref()),
            ("zk", Some("3.8"), Some(D))
        );
        let r = parse_ref(&format!("zk@{D}")).unwrap();
        assert_eq!((r.tag, r.digest.as_deref()), (None, Some(D)));
        for bad in [
            "",
            "Upper",
            "a:",
            "a:-x",
            "a/.hidden",
            "a/..",
            "a@sha256:12",
            "a@md5:0123",
            "a:b c",
        ] {
            assert!(parse_ref(bad).is_err(), "{bad:?} must be refused");
        }
    }

    fn desc(digest: &str, tag: Option<&str>) -> Descriptor {
        Descriptor {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            digest: digest.into(),
            size: 1,
            annotations: tag
                .map(|t| [(REF_NAME.to_string(), t.to_string())].into())
                .unwrap_or_default(),
            platform: None,
        }
    }

    #[test]
    fn tag_and_digest_selection() {
        let d2 = D.replace("0123", "4567");
        let index = Index {
            manifests: vec![
                desc(D, Some("latest")),
                desc(&d2, Some("docker.io/x/app:1.0")),
            ],
        };
        let pick = |s: &str| select(&index, &parse_ref(s).unwrap()).map(|d| d.digest.clone());
        assert_eq!(pick("app").as_deref(), Some(D));
        assert_eq!(pick("app:latest").as_deref(), Some(D));
        assert_eq!(pick("x/app:1.0").as_deref(), Some(d2.as_str()));
        assert_eq!(pick("app:2.0"), None);
        assert_eq!(
            pick(&format!("app:2.0@{d2}")).as_deref(),
            Some(d2.as_str()),
            "digest wins"
        );
        assert_eq!(tags(&index), "latest, docker.io/x/app:1.0");
        assert_eq!(tags(&Index { manifests: vec![] }), "(none)");
    }

    #[test]
    fn command_merge_follows_kubernetes() {
        let (ep, cmd) = (s(&["/entry", "-v"]), s(&["serve", "--port=1"]));
        assert_eq!(
            merge_command(&ep, &cmd, &[], &[]),
            s(&["/entry", "-v", "serve", "--port=1"])
        );
        assert_eq!(
            merge_command(&ep, &cmd, &[], &s(&["x"])),
            s(&["/entry", "-v", "x"])
        );
        assert_eq!(
            merge_command(&ep, &cmd, &s(&["sh"]), &[]),
            s(&["sh"]),
            "command drops the image's Cmd too"
        );
        assert_eq!(
            merge_command(&ep, &cmd, &s(&["sh", "-c"]), &s(&["echo"])),
            s(&["sh", "-c", "echo"])
        );
        assert_eq!(merge_command(&[], &cmd, &[], &[]), cmd);
        assert!(merge_command(&[], &[], &[], &[]).is_empty());
    }

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let root = std::env::temp_dir().join(format!("agent-resolve-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("usr/bin")).unwrap();
        std::os::unix::fs::symlink("usr/bin", root.join("bin")).unwrap();
        std::os::unix::fs::symlink("/", root.join("up")).unwrap();
        std::os::unix::fs::symlink("../../../..", root.join("usr/dots")).unwrap();
        let r = |p: &str| resolve_in_root(&root, Path::new(p)).unwrap();
        assert_eq!(r("/bin/sh"), root.join("usr/bin/sh"));
        assert_eq!(r("/up/etc/passwd"), root.join("etc/passwd"));
        assert_eq!(r("/usr/dots/etc"), root.join("etc"));
        assert_eq!(r("/../../etc"), root.join("etc"));
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        assert!(resolve_in_root(&root, Path::new("/loop/x")).is_err());
        std::fs::write(root.join("usr/bin/tool"), "").unwrap();
        std::fs::set_permissions(
            root.join("usr/bin/tool"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        assert_eq!(
            find_program(&root, "tool", "/sbin:/bin", "/").unwrap(),
            "/bin/tool"
        );
        assert!(find_program(&root, "sh", "/sbin:/bin", "/")
            .unwrap_err()
            .contains("not found in $PATH"));
        assert_eq!(
            find_program(&root, "./tool", "", "/usr/bin").unwrap(),
            "/usr/bin/./tool"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
