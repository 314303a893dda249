//! The OCI annotation set that goes into both the config's Labels and the manifest's
//! annotations, and the choices behind it (where `source` comes from, `-dirty`, `created`).

use anyhow::{Context, Result};
use oci_spec::image::{
    ANNOTATION_CREATED, ANNOTATION_DESCRIPTION, ANNOTATION_LICENSES, ANNOTATION_REVISION,
    ANNOTATION_SOURCE, ANNOTATION_TITLE, ANNOTATION_VERSION,
};
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceOrigin {
    GitRemote,
    CargoRepository,
    LocalPath,
}

impl fmt::Display for SourceOrigin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SourceOrigin::GitRemote => "git remote origin",
            SourceOrigin::CargoRepository => "the workspace Cargo.toml's repository key",
            SourceOrigin::LocalPath => {
                "the local checkout (no git remote origin, no repository key)"
            }
        })
    }
}

/// `org.opencontainers.image.source`: the origin remote, else the workspace's `repository`, else
/// the checkout itself as a file:// URL.
pub fn choose_source(
    remote: Option<&str>,
    repository: Option<&str>,
    repo_path: &Path,
) -> (String, SourceOrigin) {
    let nonempty = |s: Option<&str>| {
        s.map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    if let Some(r) = nonempty(remote) {
        return (strip_credentials(&r), SourceOrigin::GitRemote);
    }
    if let Some(r) = nonempty(repository) {
        return (r, SourceOrigin::CargoRepository);
    }
    (
        format!("file://{}", repo_path.display()),
        SourceOrigin::LocalPath,
    )
}

/// A remote such as https://user:token@host/x must not put the token into a published label.
pub fn strip_credentials(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
        if let Some((_, host)) = authority.rsplit_once('@') {
            let sep = if rest.contains('/') { "/" } else { "" };
            return format!("{scheme}://{host}{sep}{path}");
        }
    }
    url.to_string()
}

/// `org.opencontainers.image.revision`: HEAD, marked `-dirty` when the tree has changes (the
/// image then holds code no commit has).
pub fn revision(head: &str, dirty: bool) -> String {
    if dirty {
        format!("{head}-dirty")
    } else {
        head.to_string()
    }
}

/// SOURCE_DATE_EPOCH as RFC 3339 (seconds, `Z`): config `created`, history `created`, label.
pub fn rfc3339(epoch: u64) -> Result<String> {
    let secs = i64::try_from(epoch).context("SOURCE_DATE_EPOCH is out of range")?;
    let t = chrono::DateTime::from_timestamp(secs, 0)
        .with_context(|| format!("SOURCE_DATE_EPOCH {epoch} is not a representable time"))?;
    Ok(t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
}

#[derive(Debug, Clone)]
pub struct ImageMeta {
    pub title: String,
    pub description: String,
    pub version: String,
    pub source: String,
    pub revision: String,
    pub licenses: String,
    pub created: String,
}

pub fn label_set(m: &ImageMeta) -> BTreeMap<String, String> {
    [
        (ANNOTATION_SOURCE, &m.source),
        (ANNOTATION_VERSION, &m.version),
        (ANNOTATION_REVISION, &m.revision),
        (ANNOTATION_TITLE, &m.title),
        (ANNOTATION_DESCRIPTION, &m.description),
        (ANNOTATION_LICENSES, &m.licenses),
        (ANNOTATION_CREATED, &m.created),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.clone()))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_prefers_the_remote_then_the_repository_key_then_the_path() {
        let p = Path::new("/work/main");
        assert_eq!(
            choose_source(Some("https://example.org/a/b.git\n"), Some("https://r"), p),
            (
                "https://example.org/a/b.git".to_string(),
                SourceOrigin::GitRemote
            )
        );
        assert_eq!(
            choose_source(None, Some("https://r"), p),
            ("https://r".to_string(), SourceOrigin::CargoRepository)
        );
        assert_eq!(
            choose_source(Some(" "), Some(""), p),
            ("file:///work/main".to_string(), SourceOrigin::LocalPath)
        );
    }

    #[test]
    fn credentials_never_reach_the_label() {
        assert_eq!(
            strip_credentials("https://u:tok@example.org/a/b.git"),
            "https://example.org/a/b.git"
        );
        assert_eq!(
            strip_credentials("https://tok@example.org"),
            "https://example.org"
        );
        assert_eq!(
            strip_credentials("https://example.org/a@b"),
            "https://example.org/a@b"
        );
        assert_eq!(
            strip_credentials("git@example.org:a/b.git"),
            "git@example.org:a/b.git"
        );
    }

    #[test]
    fn revision_and_created() {
        assert_eq!(revision("abc", false), "abc");
        assert_eq!(revision("abc", true), "abc-dirty");
        assert_eq!(rfc3339(0).unwrap(), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_764_590_400).unwrap(), "2025-12-01T12:00:00Z");
    }

    #[test]
    fn the_label_set_is_complete() {
        let m = ImageMeta {
            title: "arcus-operator".into(),
            description: "d".into(),
            version: "0.1.0".into(),
            source: "file:///w".into(),
            revision: "abc-dirty".into(),
            licenses: "Apache-2.0".into(),
            created: "1970-01-01T00:00:00Z".into(),
        };
        let l = label_set(&m);
        let keys: Vec<&str> = l.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "org.opencontainers.image.created",
                "org.opencontainers.image.description",
                "org.opencontainers.image.licenses",
                "org.opencontainers.image.revision",
                "org.opencontainers.image.source",
                "org.opencontainers.image.title",
                "org.opencontainers.image.version",
            ]
        );
        assert_eq!(l["org.opencontainers.image.version"], "0.1.0");
        assert_eq!(l["org.opencontainers.image.licenses"], "Apache-2.0");
        assert_eq!(l["org.opencontainers.image.revision"], "abc-dirty");
    }
}
