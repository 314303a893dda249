//! A container's root filesystem from an image's layers: each layer (gzip or plain tar) unpacked
//! in order into a fresh directory, with OCI whiteouts (`.wh.<name>` removes a lower entry,
//! `.wh..wh..opq` hides a directory's lower contents). Entries that would leave the root are
//! refused: absolute paths, `..` components, paths through a symlink, hard links to outside.
//! Ownership (as root), modes and mtimes are kept; device nodes are skipped (the container gets
//! its own /dev).

use std::collections::HashSet;
use std::ffi::CString;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::oci::{Descriptor, LayoutImage};

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

/// Reads through and hashes everything read (the layer's digest is checked at its end).
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

fn cpath(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
}

fn lchown(p: &Path, uid: u64, gid: u64) -> std::io::Result<()> {
    let c = cpath(p)?;
    // SAFETY: lchown(2) on a NUL-terminated path.
    if unsafe { libc::lchown(c.as_ptr(), uid as libc::uid_t, gid as libc::gid_t) } != 0 {
        let e = std::io::Error::last_os_error();
        // Not root (unit tests): files stay the caller's.
        if e.raw_os_error() != Some(libc::EPERM) {
            return Err(e);
        }
    }
    Ok(())
}

fn set_mtime(p: &Path, mtime: u64) {
    let Ok(c) = cpath(p) else { return };
    let t = libc::timespec {
        tv_sec: mtime as libc::time_t,
        tv_nsec: 0,
    };
    // SAFETY: utimensat(2) with a valid path and two timespecs.
    unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            [t, t].as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        );
    }
}

/// The relative path of an archive entry; refuses absolute paths and `..`.
pub fn entry_path(raw: &Path) -> Result<PathBuf, String> {
    let mut out = PathBuf::new();
    for c in raw.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!(
                    "entry {:?} has an absolute path",
                    raw.display().to_string()
                ))
            }
            Component::ParentDir => {
                return Err(format!(
                    "entry {:?} has a '..' component",
                    raw.display().to_string()
                ))
            }
        }
    }
    Ok(out)
}

/// Makes sure every ancestor of `rel` inside `root` is a real directory (creating missing ones);
/// a symlink or file on the way is refused: writing through it could leave the root.
fn ensure_parents(root: &Path, rel: &Path) -> Result<(), String> {
    let mut cur = root.to_path_buf();
    let Some(parent) = rel.parent() else {
        return Ok(());
    };
    for c in parent.components() {
        cur.push(c);
        match std::fs::symlink_metadata(&cur) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!(
                    "entry {:?} goes through the symlink {:?}",
                    rel.display().to_string(),
                    cur.strip_prefix(root).unwrap_or(&cur).display().to_string()
                ))
            }
            Ok(_) => {
                return Err(format!(
                    "entry {:?}: {:?} is not a directory",
                    rel.display().to_string(),
                    cur.strip_prefix(root).unwrap_or(&cur).display().to_string()
                ))
            }
            Err(_) => {
                std::fs::create_dir(&cur).map_err(|e| format!("creating {}: {e}", cur.display()))?
            }
        }
    }
    Ok(())
}

fn remove_any(p: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Directory metadata applied after all layers (a read-only directory must not block later
/// entries, and writing into a directory changes its mtime).
struct DirMeta {
    path: PathBuf,
    mode: u32,
    mtime: u64,
}

/// Unpacks one layer archive (already decompressed) into `root`.
fn unpack_entries<R: Read>(reader: R, root: &Path, dirs: &mut Vec<DirMeta>) -> Result<(), String> {
    let mut archive = tar::Archive::new(reader);
    // Paths of this layer, so an opaque marker only hides what lower layers put there.
    let mut this_layer: HashSet<PathBuf> = HashSet::new();
    let entries = archive
        .entries()
        .map_err(|e| format!("reading the archive: {e}"))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("reading an entry: {e}"))?;
        let raw = entry
            .path()
            .map_err(|e| format!("an entry's path: {e}"))?
            .into_owned();
        let rel = entry_path(&raw)?;
        if rel.as_os_str().is_empty() {
            continue; // "./": the root itself
        }
        ensure_parents(root, &rel)?;
        let name = rel
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let parent_rel = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        if name == OPAQUE {
            let dir = root.join(&parent_rel);
            if let Ok(children) = std::fs::read_dir(&dir) {
                for child in children.flatten() {
                    if !this_layer.contains(&parent_rel.join(child.file_name())) {
                        remove_any(&child.path())
                            .map_err(|e| format!("opaque whiteout in {}: {e}", dir.display()))?;
                    }
                }
            }
            continue;
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT) {
            if hidden.is_empty() || hidden == "." || hidden == ".." {
                return Err(format!("invalid whiteout {:?}", raw.display().to_string()));
            }
            let target = root.join(&parent_rel).join(hidden);
            remove_any(&target).map_err(|e| format!("whiteout {}: {e}", target.display()))?;
            continue;
        }
        this_layer.insert(rel.clone());
        let target = root.join(&rel);
        let header = entry.header().clone();
        let kind = header.entry_type();
        let mode = header.mode().unwrap_or(0o644) & 0o7777;
        let (uid, gid) = (header.uid().unwrap_or(0), header.gid().unwrap_or(0));
        let mtime = header.mtime().unwrap_or(0);
        let existing = std::fs::symlink_metadata(&target).ok();
        // A directory merges into a directory; anything else replaces what was there.
        if existing
            .as_ref()
            .is_some_and(|m| !(m.is_dir() && kind.is_dir()))
        {
            remove_any(&target).map_err(|e| format!("replacing {}: {e}", target.display()))?;
        }
        let io = |what: &str, e: std::io::Error| format!("{what} {}: {e}", target.display());
        match kind {
            k if k.is_dir() => {
                if !target.is_dir() {
                    std::fs::create_dir(&target).map_err(|e| io("creating", e))?;
                }
                lchown(&target, uid, gid).map_err(|e| io("chown", e))?;
                dirs.push(DirMeta {
                    path: target,
                    mode,
                    mtime,
                });
            }
            k if k.is_file() => {
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&target)
                    .map_err(|e| io("creating", e))?;
                std::io::copy(&mut entry, &mut f).map_err(|e| io("writing", e))?;
                drop(f);
                lchown(&target, uid, gid).map_err(|e| io("chown", e))?;
                // After chown, which clears set-id bits.
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode))
                    .map_err(|e| io("chmod", e))?;
                set_mtime(&target, mtime);
            }
            k if k.is_symlink() => {
                let link = entry
                    .link_name()
                    .map_err(|e| io("reading the link of", e))?
                    .ok_or_else(|| format!("symlink {} without a target", rel.display()))?;
                std::os::unix::fs::symlink(&*link, &target).map_err(|e| io("creating", e))?;
                lchown(&target, uid, gid).map_err(|e| io("chown", e))?;
                set_mtime(&target, mtime);
            }
            k if k.is_hard_link() => {
                let link = entry
                    .link_name()
                    .map_err(|e| io("reading the link of", e))?
                    .ok_or_else(|| format!("hard link {} without a target", rel.display()))?;
                let src_rel = entry_path(&link)
                    .map_err(|e| format!("hard link {}: target {e}", rel.display()))?;
                ensure_parents(root, &src_rel)
                    .map_err(|e| format!("hard link {}: target {e}", rel.display()))?;
                std::fs::hard_link(root.join(&src_rel), &target).map_err(|e| io("linking", e))?;
            }
            k if k.is_fifo() => {
                let c = cpath(&target).map_err(|e| io("fifo", e))?;
                // SAFETY: mkfifo(3) on a NUL-terminated path.
                if unsafe { libc::mkfifo(c.as_ptr(), mode as libc::mode_t) } != 0 {
                    return Err(io("mkfifo", std::io::Error::last_os_error()));
                }
                lchown(&target, uid, gid).map_err(|e| io("chown", e))?;
            }
            k if k.is_character_special() || k.is_block_special() => {
                tracing::debug!(entry = %rel.display(), "skipping a device node in an image layer");
            }
            // PAX and GNU extension headers are consumed by the reader; nothing else is expected.
            other => tracing::debug!(entry = %rel.display(), kind = ?other, "skipping an entry"),
        }
    }
    Ok(())
}

fn is_gzip(desc: &Descriptor, head: &[u8]) -> bool {
    desc.media_type.ends_with("gzip") || head.starts_with(&[0x1f, 0x8b])
}

/// Unpacks one layer blob into `root`, checking its digest.
fn unpack_layer(
    image: &LayoutImage,
    desc: &Descriptor,
    root: &Path,
    dirs: &mut Vec<DirMeta>,
) -> Result<(), String> {
    if desc.media_type.contains("zstd") {
        return Err(format!(
            "layer {}: zstd layers are not supported (build the image with gzip layers)",
            desc.digest
        ));
    }
    let path = image.blob_path(&desc.digest)?;
    let file =
        std::fs::File::open(&path).map_err(|e| format!("opening layer {}: {e}", path.display()))?;
    let mut head = [0u8; 2];
    let n = std::fs::File::open(&path)
        .and_then(|mut f| f.read(&mut head))
        .unwrap_or(0);
    let mut hashing = HashingReader {
        inner: std::io::BufReader::new(file),
        hasher: Sha256::new(),
    };
    let result = {
        let mut reader: Box<dyn Read + '_> = if is_gzip(desc, &head[..n]) {
            Box::new(flate2::read::GzDecoder::new(&mut hashing))
        } else {
            Box::new(&mut hashing)
        };
        unpack_entries(&mut reader, root, dirs)
            // The rest of the stream (tar padding, the gzip trailer) belongs to the digest too.
            .and_then(|()| {
                std::io::copy(&mut reader, &mut std::io::sink())
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            })
    };
    result.map_err(|e| format!("layer {} ({}): {e}", desc.digest, path.display()))?;
    std::io::copy(&mut hashing, &mut std::io::sink())
        .map_err(|e| format!("reading layer {}: {e}", path.display()))?;
    let actual = format!("sha256:{:x}", hashing.hasher.finalize());
    if actual != desc.digest {
        return Err(format!(
            "layer {} has digest {actual}, not {}: the layout is corrupt (rebuild the image)",
            path.display(),
            desc.digest
        ));
    }
    Ok(())
}

/// Makes `root` a fresh copy of the image's filesystem (whatever was there is removed first).
pub fn create(image: &LayoutImage, root: &Path) -> Result<(), String> {
    remove_any(root).map_err(|e| format!("removing the old root {}: {e}", root.display()))?;
    std::fs::create_dir_all(root).map_err(|e| format!("creating {}: {e}", root.display()))?;
    std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("chmod {}: {e}", root.display()))?;
    let mut dirs = Vec::new();
    for layer in &image.manifest.layers {
        unpack_layer(image, layer, root, &mut dirs)?;
    }
    // Deepest first, so setting a parent's mtime comes after its children changed.
    dirs.sort_by_key(|d| std::cmp::Reverse(d.path.components().count()));
    for d in dirs {
        if d.path.is_dir() {
            let _ = std::fs::set_permissions(&d.path, std::fs::Permissions::from_mode(d.mode));
            set_mtime(&d.path, d.mtime);
        }
    }
    Ok(())
}

#[cfg(test)]
pub mod testimage {
    //! Builds OCI layouts for tests (tar + gzip + sha256, as `scripts/image build` writes them).
    use super::*;
    use std::io::Write;

    /// One entry of a test layer.
    pub enum E<'a> {
        Dir(&'a str, u32),
        File(&'a str, &'a [u8], u32),
        Symlink(&'a str, &'a str),
        HardLink(&'a str, &'a str),
        /// A raw path written as is (for escape tests).
        RawFile(&'a [u8], &'a [u8]),
    }

    pub fn layer(entries: &[E<'_>]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for e in entries {
            let mut h = tar::Header::new_gnu();
            h.set_mtime(1_700_000_000);
            h.set_uid(0);
            h.set_gid(0);
            match e {
                E::Dir(p, mode) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(*mode);
                    h.set_size(0);
                    b.append_data(&mut h, p, std::io::empty()).unwrap();
                }
                E::File(p, data, mode) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*mode);
                    h.set_size(data.len() as u64);
                    b.append_data(&mut h, p, *data).unwrap();
                }
                E::Symlink(p, target) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_size(0);
                    h.set_mode(0o777);
                    b.append_link(&mut h, p, target).unwrap();
                }
                E::HardLink(p, target) => {
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_size(0);
                    h.set_mode(0o644);
                    b.append_link(&mut h, p, target).unwrap();
                }
                E::RawFile(p, data) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(0o644);
                    h.set_size(data.len() as u64);
                    // Bypasses the builder's path checks: set the name bytes directly.
                    let name = &mut h.as_old_mut().name;
                    name[..p.len()].copy_from_slice(p);
                    h.set_cksum();
                    b.append(&h, *data).unwrap();
                }
            }
        }
        b.into_inner().unwrap()
    }

    pub fn gzip(data: &[u8]) -> Vec<u8> {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    fn put_blob(layout: &Path, data: &[u8]) -> (String, usize) {
        let hex = format!("{:x}", Sha256::digest(data));
        let dir = layout.join("blobs/sha256");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(&hex), data).unwrap();
        (format!("sha256:{hex}"), data.len())
    }

    /// Writes (or adds a tag to) the layout `<image_dir>/<name>`: gzip layers, a config with
    /// `config` as its process part. Returns the manifest digest.
    pub fn write_layout(
        image_dir: &Path,
        name: &str,
        tag: &str,
        layers: &[Vec<u8>],
        config: serde_json::Value,
    ) -> String {
        let layout = image_dir.join(name);
        std::fs::create_dir_all(&layout).unwrap();
        std::fs::write(
            layout.join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        let mut layer_descs = Vec::new();
        let mut diff_ids = Vec::new();
        for l in layers {
            diff_ids.push(format!("sha256:{:x}", Sha256::digest(l)));
            let (d, size) = put_blob(&layout, &gzip(l));
            layer_descs.push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": size
            }));
        }
        let cfg = serde_json::json!({
            "architecture": "amd64", "os": "linux", "config": config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids}
        });
        let (cd, cs) = put_blob(&layout, cfg.to_string().as_bytes());
        let manifest = serde_json::json!({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
            "layers": layer_descs
        });
        let (md, ms) = put_blob(&layout, manifest.to_string().as_bytes());
        let index_path = layout.join("index.json");
        let mut index: serde_json::Value = std::fs::read(&index_path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_else(|| serde_json::json!({"schemaVersion": 2, "manifests": []}));
        index["manifests"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms,
                "annotations": {crate::oci::REF_NAME: tag}
            }));
        std::fs::write(index_path, index.to_string()).unwrap();
        md
    }
}

#[cfg(test)]
mod tests {
    use super::testimage::*;
    use super::*;
    use crate::oci::{lookup, Lookup};

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("agent-rootfs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn found(dir: &Path, image: &str) -> LayoutImage {
        match lookup(dir, image).unwrap() {
            Lookup::Found(i) => *i,
            other => panic!("{image}: {other:?}"),
        }
    }

    #[test]
    fn layers_whiteouts_and_lookup() {
        let dir = tmp("wh");
        let base = layer(&[
            E::Dir("etc", 0o755),
            E::File("etc/keep", b"k", 0o644),
            E::File("etc/gone", b"g", 0o644),
            E::Dir("data", 0o755),
            E::File("data/lower", b"l", 0o644),
            E::Dir("data/sub", 0o755),
            E::File("data/sub/x", b"x", 0o644),
            E::Dir("usr/bin", 0o755),
            E::File("usr/bin/tool", b"#!/bin/sh\n", 0o755),
            E::Symlink("bin", "usr/bin"),
            E::HardLink("usr/bin/tool2", "usr/bin/tool"),
            E::File("ro/file", b"r", 0o444),
        ]);
        let top = layer(&[
            E::File("etc/.wh.gone", b"", 0o644),
            E::File("data/.wh..wh..opq", b"", 0o644),
            E::File("data/upper", b"u", 0o600),
            E::File("etc/keep", b"k2", 0o640),
            E::File("etc/.wh.never-existed", b"", 0o644),
        ]);
        let d1 = write_layout(
            &dir,
            "app",
            "1.0",
            std::slice::from_ref(&base),
            serde_json::json!({}),
        );
        let d2 = write_layout(
            &dir,
            "app",
            "2.0",
            &[base, top],
            serde_json::json!({"User": "65532:65532", "Entrypoint": ["/bin/tool"]}),
        );
        let img = found(&dir, "registry:5000/team/app:2.0");
        assert_eq!(img.manifest_digest, d2);
        assert_eq!(img.image_id(), format!("app@{d2}"));
        assert_eq!(img.config.user.as_deref(), Some("65532:65532"));
        assert_eq!(found(&dir, &format!("app@{d1}")).manifest_digest, d1);
        match lookup(&dir, "app:3.0").unwrap() {
            Lookup::Missing(m) => {
                let msg = m.to_string();
                assert!(
                    msg.contains("tag \"3.0\"") && msg.contains("1.0, 2.0"),
                    "{msg}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(lookup(&dir, "other:1").unwrap(), Lookup::NoLayout));

        let root = dir.join("root");
        create(&img, &root).unwrap();
        let read = |p: &str| std::fs::read_to_string(root.join(p)).ok();
        assert_eq!(read("etc/keep").as_deref(), Some("k2"));
        assert_eq!(read("etc/gone"), None, "whiteout removes the lower file");
        assert_eq!(read("data/lower"), None, "opaque dir hides lower files");
        assert!(!root.join("data/sub").exists(), "and lower dirs");
        assert_eq!(
            read("data/upper").as_deref(),
            Some("u"),
            "but not its own layer's"
        );
        assert!(!root.join("etc/.wh.gone").exists() && !root.join("data/.wh..wh..opq").exists());
        assert_eq!(read("bin/tool").as_deref(), Some("#!/bin/sh\n"));
        let mode = |p: &str| {
            std::fs::metadata(root.join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("usr/bin/tool"), 0o755);
        assert_eq!(mode("etc/keep"), 0o640);
        assert_eq!(mode("ro/file"), 0o444);
        let ino = |p: &str| {
            std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(root.join(p)).unwrap())
        };
        assert_eq!(ino("usr/bin/tool2"), ino("usr/bin/tool"), "hard link");
        // A restart gets a fresh copy: changes are gone.
        std::fs::write(root.join("etc/keep"), "changed").unwrap();
        std::fs::write(root.join("new"), "n").unwrap();
        create(&img, &root).unwrap();
        assert_eq!(read("etc/keep").as_deref(), Some("k2"));
        assert_eq!(read("new"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn corrupt_blob_is_detected() {
        let dir = tmp("corrupt");
        write_layout(
            &dir,
            "c",
            "latest",
            &[layer(&[E::File("a", b"a", 0o644)])],
            serde_json::json!({}),
        );
        let img = found(&dir, "c");
        let blob = img.blob_path(&img.manifest.layers[0].digest).unwrap();
        let mut bytes = std::fs::read(&blob).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&blob, bytes).unwrap();
        let err = create(&img, &dir.join("root")).unwrap_err();
        assert!(
            err.contains("digest") || err.contains("corrupt") || err.contains("crc"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn escaping_entries_are_refused() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("absolute", layer(&[E::RawFile(b"/abs-escape", b"x")])),
            ("dotdot", layer(&[E::RawFile(b"../dotdot-escape", b"x")])),
            (
                "nested dotdot",
                layer(&[E::RawFile(b"a/../../nested-escape", b"x")]),
            ),
            (
                "through a symlink",
                layer(&[
                    E::Symlink("link", "/tmp"),
                    E::RawFile(b"link/sym-escape", b"x"),
                ]),
            ),
            (
                "through a relative symlink",
                layer(&[
                    E::Symlink("up", "../.."),
                    E::RawFile(b"up/rel-escape", b"x"),
                ]),
            ),
            (
                "hard link to outside",
                layer(&[E::HardLink("pw", "../../../../etc/passwd")]),
            ),
        ];
        for (what, l) in cases {
            let dir = tmp("escape");
            write_layout(&dir, "evil", "latest", &[l], serde_json::json!({}));
            let img = found(&dir, "evil");
            let root = dir.join("a/b/root");
            let err = create(&img, &root).expect_err(what);
            assert!(
                err.contains("absolute") || err.contains("'..'") || err.contains("symlink"),
                "{what}: {err}"
            );
            for f in [
                "abs-escape",
                "dotdot-escape",
                "nested-escape",
                "sym-escape",
                "rel-escape",
            ] {
                assert!(!Path::new("/").join(f).exists() && !Path::new("/tmp").join(f).exists());
                assert!(
                    !dir.join(f).exists() && !dir.join("a").join(f).exists(),
                    "{what}: {f}"
                );
            }
            assert!(!root.join("pw").exists());
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}
