//! Image names and tags: what `scripts/image inspect NAME[:TAG]` accepts and what a layout is
//! tagged with (the OCI `org.opencontainers.image.ref.name` annotation).

use anyhow::{bail, Result};
use std::fmt;
use std::path::Path;

/// A tag as the OCI distribution spec allows it: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
pub fn validate_tag(tag: &str) -> Result<()> {
    let mut chars = tag.chars();
    let ok = match chars.next() {
        Some(c) if c.is_ascii_alphanumeric() || c == '_' => {
            tag.len() <= 128
                && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        }
        _ => false,
    };
    if !ok {
        bail!(
            "tag {tag:?} is not a valid OCI tag: use 1-128 of A-Z a-z 0-9 _ . - (not starting with . or -)"
        );
    }
    Ok(())
}

/// An image name here is one path component (each image is `DIR/<name>/`): lowercase letters and
/// digits, separated by single `.`, `_` or `-`, as a repository path component must be.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.split(['.', '_', '-']).all(|part| {
            !part.is_empty()
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        });
    if !ok {
        bail!(
            "image name {name:?} is not valid: use lowercase letters and digits separated by single . _ or -"
        );
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    pub name: String,
    pub tag: String,
}

impl ImageRef {
    /// Parses `NAME` or `NAME:TAG`; a missing tag is `default_tag`.
    pub fn parse(s: &str, default_tag: &str) -> Result<Self> {
        if s.contains('@') {
            bail!("{s:?}: digests are not accepted here, give NAME[:TAG]");
        }
        if s.contains('/') {
            bail!("{s:?}: give the image name only (e.g. arcus-operator), the directory goes in --out");
        }
        let (name, tag) = match s.split_once(':') {
            Some((n, t)) => (n, t),
            None => (s, default_tag),
        };
        validate_name(name)?;
        validate_tag(tag)?;
        Ok(Self {
            name: name.to_string(),
            tag: tag.to_string(),
        })
    }

    /// The skopeo/containers-image reference of this image in the layouts under `out`.
    pub fn oci_transport(&self, out: &Path) -> String {
        format!("oci:{}:{}", out.join(&self.name).display(), self.tag)
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.name, self.tag)
    }
}

/// skopeo splits `oci:PATH:TAG` at a colon, so a path with one cannot be named.
pub fn check_transport_path(path: &Path) -> Result<()> {
    if path.to_string_lossy().contains(':') {
        bail!(
            "{}: the output directory must not contain ':' (skopeo's oci: and docker-archive: references split at it); choose another --out",
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_follow_the_oci_rule() {
        for good in ["0.1.0", "latest", "_x", "v1.2.3-rc.1", &"a".repeat(128)] {
            validate_tag(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in ["", ".x", "-x", "a/b", "a:b", "a b", "ü", &"a".repeat(129)] {
            assert!(validate_tag(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn names_are_one_lowercase_component() {
        for good in ["arcus-operator", "arcus-sample", "a.b_c-d", "x1"] {
            validate_name(good).unwrap_or_else(|e| panic!("{good}: {e}"));
        }
        for bad in ["", "Arcus", "a--b", "-a", "a-", "a/b", "a b"] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn reference_defaults_the_tag_and_rejects_digests_and_paths() {
        let r = ImageRef::parse("arcus-operator", "0.1.0").unwrap();
        assert_eq!(
            r,
            ImageRef {
                name: "arcus-operator".into(),
                tag: "0.1.0".into()
            }
        );
        assert_eq!(r.to_string(), "arcus-operator:0.1.0");
        let r = ImageRef::parse("arcus-sample:t2", "0.1.0").unwrap();
        assert_eq!(r.tag, "t2");
        assert_eq!(
            r.oci_transport(Path::new("/x/target/images")),
            "oci:/x/target/images/arcus-sample:t2"
        );
        assert!(ImageRef::parse("arcus-sample:", "0.1.0").is_err());
        assert!(ImageRef::parse("arcus-sample@sha256:00", "0.1.0").is_err());
        assert!(ImageRef::parse("images/arcus-sample", "0.1.0").is_err());
        assert!(ImageRef::parse("a:b:c", "0.1.0").is_err());
    }

    #[test]
    fn colons_in_the_output_path_are_refused() {
        assert!(check_transport_path(Path::new("/tmp/a:b")).is_err());
        assert!(check_transport_path(Path::new("/tmp/ab")).is_ok());
    }
}
