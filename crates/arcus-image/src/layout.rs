//! Writes one image (one gzip layer, config, manifest) into an OCI image layout with `ocidir`, and
//! tags it in index.json. ocidir writes blobs under their digest and replaces index.json by
//! temp file + rename, so a reader (the sandbox's node agent) sees the old or the new index,
//! never half of one; a lock file beside the layout serialises two builders of one layout.

use crate::rootfs::Rootfs;
use anyhow::{bail, Context, Result};
use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor, DescriptorBuilder, Digest, ImageConfigurationBuilder,
    ImageManifest, ImageManifestBuilder, MediaType, Os, PlatformBuilder, RootFsBuilder,
    ANNOTATION_REF_NAME, SCHEMA_VERSION,
};
use ocidir::cap_std::{ambient_authority, fs::Dir};
use ocidir::{OciDir, OciRead};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// gzip level of the layer: fixed, since another level gives other bytes and another digest.
pub const GZIP_LEVEL: u32 = 9;

#[derive(Debug, Clone)]
pub struct ImageSpec {
    pub name: String,
    pub tag: String,
    pub entrypoint: Vec<String>,
    pub cmd: Option<Vec<String>>,
    pub env: Vec<String>,
    pub user: String,
    pub working_dir: String,
    pub exposed_ports: Vec<String>,
    pub labels: BTreeMap<String, String>,
    /// RFC 3339 of SOURCE_DATE_EPOCH.
    pub created: String,
    pub epoch: u64,
    /// The history entry's created_by.
    pub created_by: String,
}

#[derive(Debug, Clone)]
pub struct Built {
    /// `sha256:<hex>` of the manifest.
    pub digest: String,
    pub layout: PathBuf,
    pub compressed: u64,
    pub uncompressed: u64,
    /// Unreferenced blobs removed from the layout.
    pub pruned: usize,
}

/// Counts what the tar stream writes: the uncompressed layer size.
struct Counting<W> {
    inner: W,
    n: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.n += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn hashmap(m: &BTreeMap<String, String>) -> HashMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Holds an exclusive lock on `<out>/.<name>.lock` while it lives.
pub struct LayoutLock(#[allow(dead_code)] File);

pub fn lock(out: &Path, name: &str) -> Result<LayoutLock> {
    let path = out.join(format!(".{name}.lock"));
    let f = File::create(&path)
        .with_context(|| format!("creating the lock file {}", path.display()))?;
    f.lock()
        .with_context(|| format!("locking {}", path.display()))?;
    Ok(LayoutLock(f))
}

pub fn open_layout(path: &Path) -> Result<OciDir> {
    std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    let dir = Dir::open_ambient_dir(path, ambient_authority())
        .with_context(|| format!("opening {}", path.display()))?;
    OciDir::ensure(dir).with_context(|| {
        format!(
            "{} is not an OCI image layout, and could not be made one",
            path.display()
        )
    })
}

pub fn write_image(out: &Path, spec: &ImageSpec, fs: &Rootfs) -> Result<Built> {
    let layout_path = out.join(&spec.name);
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let _lock = lock(out, &spec.name)?;
    let oci = open_layout(&layout_path)?;

    let layer_writer = oci
        .create_gzip_layer(Some(flate2::Compression::new(GZIP_LEVEL)))
        .context("starting the layer blob")?;
    let counting = fs.write_tar(
        Counting {
            inner: layer_writer,
            n: 0,
        },
        spec.epoch,
    )?;
    let uncompressed = counting.n;
    let layer = counting
        .inner
        .complete()
        .context("finishing the layer blob")?;
    let compressed = layer.blob.size();

    let mut cfg = ConfigBuilder::default()
        .user(spec.user.clone())
        .env(spec.env.clone())
        .entrypoint(spec.entrypoint.clone())
        .working_dir(spec.working_dir.clone())
        .exposed_ports(spec.exposed_ports.clone())
        .labels(hashmap(&spec.labels));
    if let Some(cmd) = &spec.cmd {
        cfg = cfg.cmd(cmd.clone());
    }
    let mut config = ImageConfigurationBuilder::default()
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .created(spec.created.clone())
        .config(cfg.build()?)
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(Vec::<String>::new())
                .build()?,
        )
        .build()?;

    // The real config descriptor replaces this one once push_layer has filled in diff_ids and
    // history (insert_manifest_and_config); building it by hand keeps ocidir's empty `{}`
    // config blob out of the layout.
    let placeholder = DescriptorBuilder::default()
        .media_type(MediaType::ImageConfig)
        .digest(Digest::from_str(
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        )?)
        .size(0u64)
        .build()?;
    let mut manifest = ImageManifestBuilder::default()
        .schema_version(SCHEMA_VERSION)
        .media_type(MediaType::ImageManifest)
        .config(placeholder)
        .layers(Vec::<Descriptor>::new())
        .annotations(hashmap(&spec.labels))
        .build()?;
    let created = chrono::DateTime::from_timestamp(i64::try_from(spec.epoch)?, 0)
        .context("SOURCE_DATE_EPOCH")?;
    oci.push_layer_full(
        &mut manifest,
        &mut config,
        layer,
        None::<HashMap<String, String>>,
        &spec.created_by,
        created,
    );
    let platform = PlatformBuilder::default()
        .architecture(Arch::Amd64)
        .os(Os::Linux)
        .build()?;
    let desc = oci
        .insert_manifest_and_config(manifest, config, Some(&spec.tag), platform)
        .with_context(|| {
            format!(
                "writing the manifest and index.json of {}",
                layout_path.display()
            )
        })?;
    let pruned = prune(&layout_path, PRUNE_GRACE)?;
    Ok(Built {
        digest: desc.digest().to_string(),
        layout: layout_path,
        compressed,
        uncompressed,
        pruned,
    })
}

/// How long a blob no tag references is kept: a reader that loaded the previous index.json (the
/// node agent pulling the tag just replaced) still finds its blobs meanwhile.
pub const PRUNE_GRACE: Duration = Duration::from_secs(600);

/// Deletes the blobs that no manifest in index.json references (what replaced tags left
/// behind) once they are older than `grace`; returns how many. Call it holding the layout lock.
pub fn prune(layout: &Path, grace: Duration) -> Result<usize> {
    let dir = Dir::open_ambient_dir(layout, ambient_authority())
        .with_context(|| format!("opening {}", layout.display()))?;
    let oci = OciDir::open(dir)?;
    let mut keep = BTreeSet::new();
    for m in oci.read_index()?.manifests() {
        keep.insert(m.digest().digest().to_string());
        let manifest: ImageManifest = oci
            .read_json_blob(m)
            .with_context(|| format!("reading manifest {}", m.digest()))?;
        keep.insert(manifest.config().digest().digest().to_string());
        keep.extend(
            manifest
                .layers()
                .iter()
                .map(|l| l.digest().digest().to_string()),
        );
    }
    let blobs = layout.join("blobs/sha256");
    let mut removed = 0;
    for e in std::fs::read_dir(&blobs).with_context(|| format!("reading {}", blobs.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        let is_digest = name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit());
        if !is_digest || keep.contains(&name) {
            continue;
        }
        let age = e.metadata()?.modified()?.elapsed().unwrap_or_default();
        if age >= grace {
            std::fs::remove_file(e.path())
                .with_context(|| format!("removing {}", e.path().display()))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Tag → manifest digest of a layout, from its index.json.
pub fn tags(layout: &Path) -> Result<BTreeMap<String, String>> {
    if !layout.join("index.json").exists() {
        bail!(
            "{} has no index.json: build it with 'scripts/image build'",
            layout.display()
        );
    }
    let dir = Dir::open_ambient_dir(layout, ambient_authority())
        .with_context(|| format!("opening {}", layout.display()))?;
    let index = OciDir::open(dir)?
        .read_index()
        .with_context(|| format!("reading {}/index.json", layout.display()))?;
    Ok(index
        .manifests()
        .iter()
        .filter_map(|d| {
            let tag = d.annotations().as_ref()?.get(ANNOTATION_REF_NAME)?;
            Some((tag.clone(), d.digest().to_string()))
        })
        .collect())
}

pub fn human_size(bytes: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if bytes >= 1024 * 1024 {
        format!("{:.1} MiB", bytes as f64 / MIB)
    } else {
        format!("{:.1} KiB", bytes as f64 / 1024.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(tag: &str) -> ImageSpec {
        ImageSpec {
            name: "img".into(),
            tag: tag.into(),
            entrypoint: vec!["/x".into()],
            cmd: None,
            env: vec![],
            user: "65532:65532".into(),
            working_dir: "/".into(),
            exposed_ports: vec!["8080/tcp".into()],
            labels: BTreeMap::from([(
                "org.opencontainers.image.version".to_string(),
                tag.to_string(),
            )]),
            created: "1970-01-01T00:00:00Z".into(),
            epoch: 0,
            created_by: "test".into(),
        }
    }

    #[test]
    fn tags_are_added_replaced_and_their_leftovers_pruned() {
        let out = std::env::temp_dir().join(format!("arcus-image-layout-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let mut fs = Rootfs::new();
        fs.bytes("x", b"one".to_vec(), 0o755).unwrap();
        let a = write_image(&out, &spec("a"), &fs).unwrap();
        let b = write_image(&out, &spec("b"), &fs).unwrap();
        let blobs = |p: &Path| std::fs::read_dir(p.join("blobs/sha256")).unwrap().count();
        // a and b share the layer: 1 layer + 2 configs + 2 manifests.
        assert_eq!(blobs(&a.layout), 5);
        assert_eq!(
            tags(&a.layout).unwrap(),
            BTreeMap::from([
                ("a".into(), a.digest.clone()),
                ("b".into(), b.digest.clone())
            ])
        );

        fs.bytes("y", b"two".to_vec(), 0o644).unwrap();
        let a2 = write_image(&out, &spec("a"), &fs).unwrap();
        assert_ne!(a2.digest, a.digest);
        assert_eq!(a2.pruned, 0, "within the grace period nothing goes");
        assert_eq!(
            tags(&a.layout).unwrap(),
            BTreeMap::from([
                ("a".into(), a2.digest.clone()),
                ("b".into(), b.digest.clone())
            ])
        );
        assert_eq!(blobs(&a.layout), 8);
        // The old a's config and manifest go; the layer b still uses stays.
        assert_eq!(prune(&a.layout, Duration::ZERO).unwrap(), 2);
        assert_eq!(blobs(&a.layout), 6);
        let kept = tags(&a.layout).unwrap();
        std::fs::remove_dir_all(&out).unwrap();
        assert_eq!(kept.len(), 2);
    }

    #[test]
    fn sizes_read_as_mib_or_kib() {
        assert_eq!(human_size(512), "0.5 KiB");
        assert_eq!(human_size(3 * 1024 * 1024 + 512 * 1024), "3.5 MiB");
    }
}
