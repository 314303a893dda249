//! Pod volumes materialised as directories under the pod dir (configMap, secret, emptyDir,
//! downwardAPI, projected), or mapped to host directories (hostPath, and persistentVolumeClaim as
//! a per-claim directory under `<sandbox>/volumes/<ns>/<claim>` that outlives the pod), and the
//! bind mounts a container needs for its volumeMounts.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use k8s_openapi::api::core::v1::{
    ConfigMap, Container, DownwardAPIVolumeFile, KeyToPath, Pod, Secret, Volume,
};
use kube::{Api, Client};

use crate::env::{field_value, PodFacts};
use crate::runtime::Mount;

/// A file to write into a volume directory: relative path, content, mode.
type File = (String, Vec<u8>, u32);

fn safe_relative(p: &str) -> bool {
    let path = Path::new(p);
    !p.is_empty() && path.components().all(|c| matches!(c, Component::Normal(_)))
}

/// Writes `files` into `dir` (each atomically) and removes top-level entries not among them.
fn write_files(dir: &Path, files: &[File]) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let mut keep = BTreeSet::new();
    for (rel, content, mode) in files {
        if !safe_relative(rel) {
            return Err(format!("invalid path {rel:?} in volume"));
        }
        keep.insert(rel.split('/').next().unwrap_or(rel).to_string());
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
        }
        let unchanged = std::fs::read(&path).is_ok_and(|old| old == *content)
            && std::fs::metadata(&path).is_ok_and(|m| m.permissions().mode() & 0o7777 == *mode);
        if unchanged {
            continue;
        }
        let tmp = path.with_file_name(format!(
            ".{}.tmp",
            path.file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default()
        ));
        std::fs::write(&tmp, content).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(*mode))
            .map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, &path).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !keep.contains(&name) {
                let p = e.path();
                let _ = if p.is_dir() {
                    std::fs::remove_dir_all(&p)
                } else {
                    std::fs::remove_file(&p)
                };
            }
        }
    }
    Ok(())
}

/// Selects files from key/value data: all keys, or the listed items.
fn select(
    data: &BTreeMap<String, Vec<u8>>,
    items: Option<&Vec<KeyToPath>>,
    default_mode: u32,
    what: &str,
) -> Result<Vec<File>, String> {
    match items {
        None => Ok(data
            .iter()
            .map(|(k, v)| (k.clone(), v.clone(), default_mode))
            .collect()),
        Some(items) => items
            .iter()
            .map(|it| {
                let v = data.get(&it.key).ok_or_else(|| {
                    format!("configmap/secret {what}: key {:?} not found", it.key)
                })?;
                Ok((
                    it.path.clone(),
                    v.clone(),
                    it.mode.map(|m| m as u32).unwrap_or(default_mode),
                ))
            })
            .collect(),
    }
}

async fn config_map_data(
    client: &Client,
    ns: &str,
    name: &str,
) -> Result<Option<BTreeMap<String, Vec<u8>>>, String> {
    let cm = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(|e| format!("getting configmap {ns}/{name}: {e}"))?;
    Ok(cm.map(|cm| {
        let mut data: BTreeMap<String, Vec<u8>> = cm
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes()))
            .collect();
        data.extend(
            cm.binary_data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.0)),
        );
        data
    }))
}

async fn secret_data(
    client: &Client,
    ns: &str,
    name: &str,
) -> Result<Option<BTreeMap<String, Vec<u8>>>, String> {
    let s = Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .map_err(|e| format!("getting secret {ns}/{name}: {e}"))?;
    Ok(s.map(|s| {
        let mut data: BTreeMap<String, Vec<u8>> = s
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect();
        data.extend(
            s.string_data
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, v.into_bytes())),
        );
        data
    }))
}

fn downward_files(
    items: &[DownwardAPIVolumeFile],
    default_mode: u32,
    facts: &PodFacts<'_>,
) -> Result<Vec<File>, String> {
    items
        .iter()
        .map(|it| {
            let value = match &it.field_ref {
                Some(f) => field_value(&f.field_path, facts).map_err(|e| e.to_string())?,
                None => String::new(),
            };
            Ok((
                it.path.clone(),
                value.into_bytes(),
                it.mode.map(|m| m as u32).unwrap_or(default_mode),
            ))
        })
        .collect()
}

fn mode(m: Option<i32>) -> u32 {
    m.map(|m| m as u32).unwrap_or(0o644)
}

/// Materialises one volume and returns its host directory (or file, for hostPath files).
async fn prepare_one(
    client: &Client,
    v: &Volume,
    pod_dir: &Path,
    sandbox_dir: &Path,
    facts: &PodFacts<'_>,
) -> Result<PathBuf, String> {
    let ns = facts.pod.metadata.namespace.clone().unwrap_or_default();
    let dir = pod_dir.join("volumes").join(&v.name);
    if v.empty_dir.is_some() {
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        // kubelet's emptyDir is world-writable, so a container of any user can use it.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
            .map_err(|e| e.to_string())?;
        return Ok(dir);
    }
    if let Some(cm) = &v.config_map {
        let files = match config_map_data(client, &ns, &cm.name).await? {
            Some(data) => select(&data, cm.items.as_ref(), mode(cm.default_mode), &cm.name)?,
            None if cm.optional.unwrap_or(false) => vec![],
            None => return Err(format!("configmap {:?} not found", cm.name)),
        };
        write_files(&dir, &files)?;
        return Ok(dir);
    }
    if let Some(s) = &v.secret {
        let name = s.secret_name.clone().unwrap_or_default();
        let files = match secret_data(client, &ns, &name).await? {
            Some(data) => select(&data, s.items.as_ref(), mode(s.default_mode), &name)?,
            None if s.optional.unwrap_or(false) => vec![],
            None => return Err(format!("secret {name:?} not found")),
        };
        write_files(&dir, &files)?;
        return Ok(dir);
    }
    if let Some(d) = &v.downward_api {
        let files = downward_files(
            d.items.as_deref().unwrap_or_default(),
            mode(d.default_mode),
            facts,
        )?;
        write_files(&dir, &files)?;
        return Ok(dir);
    }
    if let Some(p) = &v.projected {
        let default_mode = mode(p.default_mode);
        let mut files = Vec::new();
        for src in p.sources.iter().flatten() {
            if let Some(cm) = &src.config_map {
                match config_map_data(client, &ns, &cm.name).await? {
                    Some(data) => {
                        files.extend(select(&data, cm.items.as_ref(), default_mode, &cm.name)?)
                    }
                    None if cm.optional.unwrap_or(false) => {}
                    None => return Err(format!("configmap {:?} not found", cm.name)),
                }
            }
            if let Some(s) = &src.secret {
                match secret_data(client, &ns, &s.name).await? {
                    Some(data) => {
                        files.extend(select(&data, s.items.as_ref(), default_mode, &s.name)?)
                    }
                    None if s.optional.unwrap_or(false) => {}
                    None => return Err(format!("secret {:?} not found", s.name)),
                }
            }
            if let Some(d) = &src.downward_api {
                files.extend(downward_files(
                    d.items.as_deref().unwrap_or_default(),
                    default_mode,
                    facts,
                )?);
            }
        }
        write_files(&dir, &files)?;
        return Ok(dir);
    }
    if let Some(h) = &v.host_path {
        let path = PathBuf::from(&h.path);
        match h.type_.as_deref() {
            Some("DirectoryOrCreate") => {
                std::fs::create_dir_all(&path).map_err(|e| e.to_string())?
            }
            Some("FileOrCreate") => {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
                }
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|e| e.to_string())?;
            }
            _ if !path.exists() => {
                return Err(format!("hostPath {} does not exist", path.display()))
            }
            _ => {}
        }
        return Ok(path);
    }
    if let Some(pvc) = &v.persistent_volume_claim {
        let dir = sandbox_dir.join("volumes").join(&ns).join(&pvc.claim_name);
        if !dir.exists() {
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            // As a hostPath/local-path provisioner's new volume: writable for any pod user.
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))
                .map_err(|e| e.to_string())?;
        }
        return Ok(dir);
    }
    Err(format!(
        "volume {:?}: this volume type is not supported by the sandbox agent",
        v.name
    ))
}

/// Materialises all of a pod's volumes; returns volume name → host path.
pub async fn prepare(
    client: &Client,
    pod: &Pod,
    pod_dir: &Path,
    sandbox_dir: &Path,
    facts: &PodFacts<'_>,
) -> Result<BTreeMap<String, PathBuf>, String> {
    let mut out = BTreeMap::new();
    let fs_group = pod
        .spec
        .as_ref()
        .and_then(|s| s.security_context.as_ref())
        .and_then(|s| s.fs_group)
        .map(|g| g as u32);
    for v in pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .into_iter()
        .flatten()
    {
        let path = prepare_one(client, v, pod_dir, sandbox_dir, facts)
            .await
            .map_err(|e| format!("MountVolume.SetUp failed for volume {:?}: {e}", v.name))?;
        if let Some(gid) = fs_group {
            let content = v.config_map.is_some()
                || v.secret.is_some()
                || v.downward_api.is_some()
                || v.projected.is_some();
            if content || v.empty_dir.is_some() || v.persistent_volume_claim.is_some() {
                apply_fs_group(&path, gid, !content).map_err(|e| {
                    format!(
                        "MountVolume.SetUp failed for volume {:?}: applying fsGroup {gid} to {}: {e}",
                        v.name,
                        path.display()
                    )
                })?;
            }
        }
        out.insert(v.name.clone(), path);
    }
    Ok(out)
}

/// kubelet's SetVolumeOwnership: group `gid` on everything, setgid directories, group
/// read (and write, for `writable` volumes: emptyDir, PVC) permission. A writable volume whose
/// top directory already has the group and setgid is left alone (fsGroupChangePolicy
/// OnRootMismatch: a large PVC is not walked on every start); content volumes (configMap,
/// secret, …) are small and rewritten by the refresh, so they are always walked.
pub fn apply_fs_group(dir: &Path, gid: u32, writable: bool) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let top = std::fs::symlink_metadata(dir)?;
    if writable && top.gid() == gid && top.mode() & 0o2000 != 0 {
        return Ok(());
    }
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p)?;
        if m.file_type().is_symlink() {
            continue; // not followed: it may point anywhere on the host
        }
        std::os::unix::fs::lchown(&p, None, Some(gid))?;
        let bits = if writable { 0o660 } else { 0o440 };
        let mode = if m.is_dir() {
            for e in std::fs::read_dir(&p)? {
                stack.push(e?.path());
            }
            m.mode() | bits | 0o110 | 0o2000
        } else {
            m.mode() | bits
        };
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode & 0o7777))?;
    }
    Ok(())
}

/// The bind mounts for a container's volumeMounts, parents before children.
pub fn mounts_for(
    c: &Container,
    volumes: &BTreeMap<String, PathBuf>,
) -> Result<Vec<Mount>, String> {
    let mut mounts = Vec::new();
    for vm in c.volume_mounts.iter().flatten() {
        let base = volumes
            .get(&vm.name)
            .ok_or_else(|| format!("volumeMount {:?}: no volume of that name", vm.name))?;
        let source = match vm.sub_path.as_deref().filter(|s| !s.is_empty()) {
            Some(sub) if safe_relative(sub) => {
                let p = base.join(sub);
                if !p.exists() {
                    std::fs::create_dir_all(&p).map_err(|e| e.to_string())?;
                }
                p
            }
            Some(sub) => {
                return Err(format!(
                    "volumeMount {:?}: invalid subPath {sub:?}",
                    vm.name
                ))
            }
            None => base.clone(),
        };
        if !vm.mount_path.starts_with('/') {
            return Err(format!(
                "volumeMount {:?}: mountPath must be absolute",
                vm.name
            ));
        }
        mounts.push(Mount {
            source,
            target: PathBuf::from(&vm.mount_path),
            read_only: vm.read_only.unwrap_or(false),
        });
    }
    mounts.sort_by_key(|m| m.target.components().count());
    Ok(mounts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::VolumeMount;

    #[test]
    fn write_files_replaces_and_prunes() {
        let dir = std::env::temp_dir().join(format!("agent-vol-{}", std::process::id()));
        write_files(
            &dir,
            &[
                ("a".into(), b"1".to_vec(), 0o644),
                ("d/b".into(), b"2".to_vec(), 0o600),
            ],
        )
        .unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("d/b")).unwrap(), "2");
        let m = std::fs::metadata(dir.join("d/b"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(m, 0o600);
        let inode = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap());
        let before = inode(&dir.join("a"));
        write_files(&dir, &[("a".into(), b"1".to_vec(), 0o644)]).unwrap();
        assert_eq!(
            inode(&dir.join("a")),
            before,
            "unchanged files are not rewritten"
        );
        write_files(&dir, &[("a".into(), b"3".to_vec(), 0o644)]).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("a")).unwrap(), "3");
        assert!(!dir.join("d").exists());
        assert!(write_files(&dir, &[("../x".into(), vec![], 0o644)]).is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Root only (chown to another group): kubelet's fsGroup ownership rules.
    #[test]
    fn fs_group_ownership() {
        use std::os::unix::fs::MetadataExt;
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: not root");
            return;
        }
        let dir = std::env::temp_dir().join(format!("agent-fsgroup-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sub")).unwrap();
        std::fs::write(dir.join("sub/f"), "x").unwrap();
        std::fs::set_permissions(dir.join("sub/f"), std::fs::Permissions::from_mode(0o600))
            .unwrap();
        std::fs::write(dir.join("outside"), "o").unwrap();
        std::os::unix::fs::symlink(dir.join("outside"), dir.join("sub/link")).unwrap();
        let outside_gid = std::fs::metadata(dir.join("outside")).unwrap().gid();
        let vol = dir.join("sub");
        apply_fs_group(&vol, 4242, true).unwrap();
        let m = |p: &str| std::fs::symlink_metadata(dir.join(p)).unwrap();
        assert_eq!(
            (m("sub").gid(), m("sub").mode() & 0o7777 & 0o2770),
            (4242, 0o2770)
        );
        assert_eq!((m("sub/f").gid(), m("sub/f").mode() & 0o777), (4242, 0o660));
        assert_eq!(m("outside").gid(), outside_gid, "symlinks are not followed");
        // OnRootMismatch: a matching root is not walked again.
        std::fs::write(dir.join("sub/new"), "n").unwrap();
        assert_eq!(
            m("sub/new").gid(),
            4242,
            "new files inherit the group (setgid dir)"
        );
        std::os::unix::fs::lchown(dir.join("sub/new"), None, Some(0)).unwrap();
        apply_fs_group(&vol, 4242, true).unwrap();
        assert_eq!(m("sub/new").gid(), 0);
        // Content volumes are always walked, read permission only.
        apply_fs_group(&vol, 4242, false).unwrap();
        assert_eq!(m("sub/new").gid(), 4242);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mounts_sorted_and_checked() {
        let vols: BTreeMap<String, PathBuf> = [
            ("a".to_string(), PathBuf::from("/tmp")),
            ("b".to_string(), PathBuf::from("/var/tmp")),
        ]
        .into();
        let c = Container {
            volume_mounts: Some(vec![
                VolumeMount {
                    name: "b".into(),
                    mount_path: "/x/y/z".into(),
                    ..Default::default()
                },
                VolumeMount {
                    name: "a".into(),
                    mount_path: "/x".into(),
                    read_only: Some(true),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        };
        let m = mounts_for(&c, &vols).unwrap();
        assert_eq!(m[0].target, PathBuf::from("/x"));
        assert!(m[0].read_only);
        assert_eq!(m[1].source, PathBuf::from("/var/tmp"));
        let bad = Container {
            volume_mounts: Some(vec![VolumeMount {
                name: "nope".into(),
                mount_path: "/x".into(),
                ..Default::default()
            }]),
            ..Default::default()
        };
        assert!(mounts_for(&bad, &vols).is_err());
    }
}
