//! The image's file tree and its normalised tar stream.
//!
//! Reproducibility lives here: entries come out sorted component-wise (parents before children),
//! every header has the same mtime (SOURCE_DATE_EPOCH), uid/gid 0, no user/group names, a fixed
//! mode, and no atime/ctime or pax records, so the same inputs give the same bytes.

use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    Dir,
    /// A regular file copied from the host (the binary, a library from an extracted .deb).
    File(PathBuf),
    /// A regular file made here (passwd, group, the CA bundle).
    Bytes(Vec<u8>),
    Symlink(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub mode: u32,
    pub content: Content,
}

pub const DIR_MODE: u32 = 0o755;
pub const TMP_MODE: u32 = 0o1777;
const SYMLINK_MODE: u32 = 0o777;

/// Files are 0755 when their source has any execute bit, else 0644: the host's umask and
/// checkout modes must not reach the image.
pub fn normalize_file_mode(source_mode: u32) -> u32 {
    if source_mode & 0o111 != 0 {
        0o755
    } else {
        0o644
    }
}

/// The tree, keyed by path components so that iteration order is a parents-first sort.
#[derive(Debug, Default)]
pub struct Rootfs {
    entries: BTreeMap<Vec<String>, Entry>,
}

fn components(path: &str) -> Result<Vec<String>> {
    let parts: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    if parts.is_empty() {
        bail!("{path:?}: the image root itself is not an entry");
    }
    if parts.iter().any(|p| p == "." || p == "..") {
        bail!("{path:?}: image paths must not contain . or ..");
    }
    Ok(parts)
}

impl Rootfs {
    pub fn new() -> Self {
        Self::default()
    }

    /// A directory with an explicit mode (implied parents get 0755).
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<()> {
        let key = components(path)?;
        self.parents(&key, path)?;
        match self.entries.get_mut(&key) {
            Some(Entry {
                content: Content::Dir,
                mode: m,
            }) => *m = mode,
            Some(_) => bail!(
                "/{}: already in the image as a non-directory",
                key.join("/")
            ),
            None => {
                self.entries.insert(
                    key,
                    Entry {
                        mode,
                        content: Content::Dir,
                    },
                );
            }
        }
        Ok(())
    }

    /// A host file; its mode is normalised from the source's execute bits.
    pub fn file(&mut self, path: &str, source: &Path) -> Result<()> {
        let meta = std::fs::metadata(source).with_context(|| {
            format!(
                "reading {} (for /{})",
                source.display(),
                path.trim_start_matches('/')
            )
        })?;
        if !meta.is_file() {
            bail!(
                "{} is not a regular file (wanted for /{})",
                source.display(),
                path.trim_start_matches('/')
            );
        }
        let mode = normalize_file_mode(meta.permissions().mode());
        self.insert(
            path,
            Entry {
                mode,
                content: Content::File(source.to_path_buf()),
            },
        )
    }

    /// A host file that must be executable in the image whatever its source mode.
    pub fn executable(&mut self, path: &str, source: &Path) -> Result<()> {
        self.file(path, source)?;
        if let Some(e) = self.entries.get_mut(&components(path)?) {
            e.mode = 0o755;
        }
        Ok(())
    }

    pub fn bytes(&mut self, path: &str, data: Vec<u8>, mode: u32) -> Result<()> {
        self.insert(
            path,
            Entry {
                mode,
                content: Content::Bytes(data),
            },
        )
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        self.insert(
            path,
            Entry {
                mode: SYMLINK_MODE,
                content: Content::Symlink(target.to_string()),
            },
        )
    }

    /// Whether `path` is in the tree (as anything).
    pub fn contains(&self, path: &str) -> bool {
        components(path)
            .map(|k| self.entries.contains_key(&k))
            .unwrap_or(false)
    }

    fn parents(&mut self, key: &[String], path: &str) -> Result<()> {
        for i in 1..key.len() {
            let parent = key[..i].to_vec();
            match self.entries.get(&parent) {
                None => {
                    self.entries.insert(
                        parent,
                        Entry {
                            mode: DIR_MODE,
                            content: Content::Dir,
                        },
                    );
                }
                Some(Entry {
                    content: Content::Dir,
                    ..
                }) => {}
                Some(_) => bail!(
                    "/{}: cannot add /{} below it, it is not a directory in the image",
                    parent.join("/"),
                    path.trim_start_matches('/')
                ),
            }
        }
        Ok(())
    }

    /// Adding the same entry twice is fine (two libraries needing a third); two different
    /// entries at one path are a packaging bug.
    fn insert(&mut self, path: &str, entry: Entry) -> Result<()> {
        let key = components(path)?;
        self.parents(&key, path)?;
        match self.entries.get(&key) {
            Some(existing) if *existing == entry => Ok(()),
            Some(existing) => bail!(
                "/{}: two different entries for one path ({:?} and {:?})",
                key.join("/"),
                existing.content,
                entry.content
            ),
            None => {
                self.entries.insert(key, entry);
                Ok(())
            }
        }
    }

    /// Paths (no leading slash) and entries, in tar order.
    pub fn iter(&self) -> impl Iterator<Item = (String, &Entry)> {
        self.entries.iter().map(|(k, e)| (k.join("/"), e))
    }

    /// Writes the tar stream (without compressing it) and hands the writer back.
    pub fn write_tar<W: Write>(&self, out: W, mtime: u64) -> Result<W> {
        let mut tar = tar::Builder::new(out);
        for (path, entry) in self.iter() {
            let (kind, size) = match &entry.content {
                Content::Dir => (tar::EntryType::Directory, 0),
                Content::Symlink(_) => (tar::EntryType::Symlink, 0),
                Content::Bytes(b) => (tar::EntryType::Regular, b.len() as u64),
                Content::File(src) => (
                    tar::EntryType::Regular,
                    std::fs::metadata(src)
                        .with_context(|| format!("reading {}", src.display()))?
                        .len(),
                ),
            };
            let mut header = header(kind, entry.mode, size, mtime);
            let ctx = || format!("writing /{path} into the layer");
            match &entry.content {
                Content::Dir => tar
                    .append_data(&mut header, format!("{path}/"), io::empty())
                    .with_context(ctx)?,
                Content::Symlink(target) => tar
                    .append_link(&mut header, &path, target)
                    .with_context(ctx)?,
                Content::Bytes(b) => tar
                    .append_data(&mut header, &path, b.as_slice())
                    .with_context(ctx)?,
                Content::File(src) => {
                    let f =
                        File::open(src).with_context(|| format!("opening {}", src.display()))?;
                    // A file that changed size since it was measured would corrupt the archive.
                    let got = f.metadata()?.len();
                    if got != size {
                        bail!("{} changed while the image was written (size {size} -> {got}); run again", src.display());
                    }
                    tar.append_data(&mut header, &path, f).with_context(ctx)?
                }
            }
        }
        tar.into_inner().context("finishing the layer's tar stream")
    }
}

/// One normalised header: GNU format (long names become GNU long-name records, never pax
/// records with times), root:root, fixed mtime.
pub fn header(kind: tar::EntryType, mode: u32, size: u64, mtime: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(mtime);
    h.set_uid(0);
    h.set_gid(0);
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listing(tar_bytes: &[u8]) -> Vec<(String, u32, u64, u64, u64, tar::EntryType)> {
        let mut a = tar::Archive::new(tar_bytes);
        a.entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    e.path().unwrap().to_string_lossy().into_owned(),
                    h.mode().unwrap(),
                    h.mtime().unwrap(),
                    h.uid().unwrap(),
                    h.gid().unwrap(),
                    h.entry_type(),
                )
            })
            .collect()
    }

    #[test]
    fn modes_depend_only_on_the_execute_bits() {
        assert_eq!(normalize_file_mode(0o100600), 0o644);
        assert_eq!(normalize_file_mode(0o100664), 0o644);
        assert_eq!(normalize_file_mode(0o100700), 0o755);
        assert_eq!(normalize_file_mode(0o100744), 0o755);
    }

    #[test]
    fn entries_are_sorted_parents_first_with_fixed_headers() {
        let mut fs = Rootfs::new();
        // Inserted out of order, and with names that a plain string sort would put before their
        // parent's siblings ("usr/local-x" < "usr/local/..." bytewise).
        fs.bytes("usr/local/bin/x", b"x".to_vec(), 0o755).unwrap();
        fs.bytes("etc/passwd", b"p\n".to_vec(), 0o644).unwrap();
        fs.dir("tmp", TMP_MODE).unwrap();
        fs.bytes("usr/local-x", b"".to_vec(), 0o644).unwrap();
        fs.symlink("lib64/ld.so", "/lib/ld.so").unwrap();
        let bytes = fs.write_tar(Vec::new(), 1_700_000_000).unwrap();
        let l = listing(&bytes);
        let names: Vec<&str> = l.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "etc/",
                "etc/passwd",
                "lib64/",
                "lib64/ld.so",
                "tmp/",
                "usr/",
                "usr/local/",
                "usr/local/bin/",
                "usr/local/bin/x",
                "usr/local-x"
            ]
        );
        for (name, mode, mtime, uid, gid, _) in &l {
            assert_eq!((*mtime, *uid, *gid), (1_700_000_000, 0, 0), "{name}");
            let want = match name.as_str() {
                "tmp/" => 0o1777,
                "etc/passwd" | "usr/local-x" => 0o644,
                "lib64/ld.so" => 0o777,
                _ => 0o755,
            };
            assert_eq!(*mode, want, "{name}");
        }
        assert_eq!(l[3].5, tar::EntryType::Symlink);
        // Same tree, same bytes; another epoch, other bytes.
        assert_eq!(bytes, fs.write_tar(Vec::new(), 1_700_000_000).unwrap());
        assert_ne!(bytes, fs.write_tar(Vec::new(), 1_700_000_001).unwrap());
    }

    #[test]
    fn headers_carry_no_names_or_extra_times() {
        let h = header(tar::EntryType::Regular, 0o644, 3, 42);
        assert_eq!(h.username().unwrap(), Some(""));
        assert_eq!(h.groupname().unwrap(), Some(""));
        let gnu = h.as_gnu().unwrap();
        // Left as NUL bytes: nothing of the build machine's clock gets in.
        assert!(gnu.atime.iter().chain(&gnu.ctime).all(|b| *b == 0));
    }

    #[test]
    fn long_paths_survive_without_pax_records() {
        let mut fs = Rootfs::new();
        let long = format!("usr/share/doc/{}/copyright", "p".repeat(120));
        fs.bytes(&long, b"c".to_vec(), 0o644).unwrap();
        let bytes = fs.write_tar(Vec::new(), 1).unwrap();
        let l = listing(&bytes);
        assert_eq!(l.last().unwrap().0, long);
        let mut a = tar::Archive::new(bytes.as_slice());
        for e in a.entries().unwrap() {
            assert!(e.unwrap().pax_extensions().unwrap().is_none());
        }
    }

    #[test]
    fn conflicting_entries_are_refused_and_repeats_accepted() {
        let mut fs = Rootfs::new();
        fs.symlink("lib64/ld.so", "/lib/ld.so").unwrap();
        fs.symlink("lib64/ld.so", "/lib/ld.so").unwrap();
        assert!(fs.symlink("lib64/ld.so", "/other").is_err());
        assert!(
            fs.bytes("lib64/ld.so/x", vec![], 0o644).is_err(),
            "a file below a symlink"
        );
        assert!(fs.dir("lib64/ld.so", DIR_MODE).is_err());
        assert!(fs.bytes("../etc/x", vec![], 0o644).is_err());
        assert!(fs.bytes("/", vec![], 0o644).is_err());
    }

    #[test]
    fn host_files_get_normalised_modes() {
        let dir = std::env::temp_dir().join(format!("arcus-image-rootfs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("f");
        std::fs::write(&f, b"abc").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut fs = Rootfs::new();
        fs.file("a/f", &f).unwrap();
        fs.executable("b/f", &f).unwrap();
        let modes: Vec<(String, u32)> = fs.iter().map(|(p, e)| (p, e.mode)).collect();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            modes,
            [
                ("a".into(), 0o755),
                ("a/f".into(), 0o644),
                ("b".into(), 0o755),
                ("b/f".into(), 0o755)
            ]
        );
    }
}
