//! Facts about the checkout an image is built from: the workspace Cargo.toml (version = default
//! tag, license, repository), a crate's description, and git (origin, HEAD, dirty, commit time).

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkspaceInfo {
    pub version: String,
    pub license: Option<String>,
    pub repository: Option<String>,
}

fn read_toml(path: &Path) -> Result<toml::Table> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// `[workspace.package]` of the workspace Cargo.toml (given as text, for tests).
pub fn parse_workspace(table: &toml::Table, path: &Path) -> Result<WorkspaceInfo> {
    let pkg = table
        .get("workspace")
        .and_then(|w| w.get("package"))
        .and_then(|p| p.as_table())
        .with_context(|| format!("{} has no [workspace.package] table", path.display()))?;
    let s = |k: &str| pkg.get(k).and_then(|v| v.as_str()).map(str::to_string);
    Ok(WorkspaceInfo {
        version: s("version")
            .with_context(|| format!("{}: [workspace.package] has no version", path.display()))?,
        license: s("license"),
        repository: s("repository"),
    })
}

pub fn workspace(repo: &Path) -> Result<WorkspaceInfo> {
    let path = repo.join("Cargo.toml");
    parse_workspace(&read_toml(&path)?, &path)
}

/// `description` of `crates/<name>/Cargo.toml`, if that crate exists and sets one.
pub fn crate_description(repo: &Path, name: &str) -> Result<Option<String>> {
    let path = repo.join("crates").join(name).join("Cargo.toml");
    if !path.exists() {
        return Ok(None);
    }
    let t = read_toml(&path)?;
    Ok(t.get("package")
        .and_then(|p| p.get("description"))
        .and_then(|d| d.as_str())
        .map(str::to_string))
}

fn git(repo: &Path, args: &[&str]) -> Result<std::process::Output> {
    Command::new("git")
        .arg("-C")
        .arg(repo)
        .args(args)
        .output()
        .with_context(|| format!("running git {} in {}", args.join(" "), repo.display()))
}

fn git_text(repo: &Path, args: &[&str]) -> Result<String> {
    let out = git(repo, args)?;
    if !out.status.success() {
        bail!(
            "git {} in {} failed: {} (the images are built from a git checkout; its HEAD dates and names them)",
            args.join(" "),
            repo.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[derive(Debug, Clone)]
pub struct GitInfo {
    pub top: PathBuf,
    pub origin: Option<String>,
    pub head: String,
    pub dirty: bool,
    pub commit_time: u64,
}

pub fn git_info(repo: &Path) -> Result<GitInfo> {
    let top = PathBuf::from(git_text(repo, &["rev-parse", "--show-toplevel"])?);
    let origin = git(repo, &["remote", "get-url", "origin"])
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty());
    let head = git_text(repo, &["rev-parse", "HEAD"])?;
    // Untracked files count: a new crate not yet committed is built into the binary too.
    let dirty = !git_text(repo, &["status", "--porcelain"])?.is_empty();
    let ct = git_text(repo, &["log", "-1", "--format=%ct"])?;
    let commit_time = ct
        .parse()
        .with_context(|| format!("git log -1 --format=%ct printed {ct:?}"))?;
    Ok(GitInfo {
        top,
        origin,
        head,
        dirty,
        commit_time,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_workspace_package_keys() {
        let t: toml::Table =
            toml::from_str("[workspace]\nmembers=[]\n[workspace.package]\nversion = \"0.1.0\"\nlicense = \"Apache-2.0\"\n")
                .unwrap();
        let w = parse_workspace(&t, Path::new("Cargo.toml")).unwrap();
        assert_eq!(
            w,
            WorkspaceInfo {
                version: "0.1.0".into(),
                license: Some("Apache-2.0".into()),
                repository: None
            }
        );
        let t: toml::Table = toml::from_str("[package]\nname='x'\n").unwrap();
        assert!(parse_workspace(&t, Path::new("Cargo.toml")).is_err());
    }

    #[test]
    fn this_workspace_has_a_version_and_the_crates_descriptions() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let w = workspace(&repo).unwrap();
        assert!(!w.version.is_empty());
        assert!(crate_description(&repo, "arcus-operator")
            .unwrap()
            .is_some());
        assert_eq!(crate_description(&repo, "no-such-crate").unwrap(), None);
    }
}
