//! `scripts/image build --package-only` end to end, with copies of /bin/true as the two binaries
//! (fast; the real release binaries are packaged the same way): reproducible digests, a second
//! tag in the same layout, the layer's contents, a run of the packaged binary in a chroot of the
//! layer, and skopeo's view of the layout and of the docker-archive tarball.

use flate2::read::GzDecoder;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// A temp directory removed when the test ends, however it ends.
struct TempDir(PathBuf);
impl TempDir {
    fn new() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let p = std::env::temp_dir().join(format!("arcus-image-it-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[derive(Debug, Clone, PartialEq)]
struct Line {
    reference: String,
    digest: String,
    layout: PathBuf,
}

/// Runs the script; returns its per-image lines.
fn build(bin_dir: &Path, out: &Path, tag: &str, archive: bool) -> Vec<Line> {
    let mut cmd = Command::new(repo().join("scripts/image"));
    cmd.args(["build", "--package-only", "--tag", tag])
        .arg("--bin-dir")
        .arg(bin_dir)
        .arg("--out")
        .arg(out)
        .env("ARCUS_IMAGE_BIN", env!("CARGO_BIN_EXE_arcus-image"))
        // The digest must not depend on the caller's environment.
        .env_remove("SOURCE_DATE_EPOCH");
    if !archive {
        cmd.arg("--no-archive");
    }
    let o = cmd.output().expect("running scripts/image");
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "scripts/image build failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let lines: Vec<Line> = stdout
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            assert!(
                f.len() >= 4 && l.ends_with(" uncompressed)"),
                "unexpected line {l:?}"
            );
            assert!(
                f[1].starts_with("sha256:") && f[1].len() == 71,
                "bad digest in {l:?}"
            );
            Line {
                reference: f[0].into(),
                digest: f[1].into(),
                layout: f[2].into(),
            }
        })
        .collect();
    let refs: Vec<&str> = lines.iter().map(|l| l.reference.as_str()).collect();
    assert_eq!(
        refs,
        [
            format!("arcus-operator:{tag}"),
            format!("arcus-sample:{tag}")
        ],
        "{stdout}"
    );
    assert!(
        stderr.contains("source "),
        "the script should say where the source label comes from:\n{stderr}"
    );
    lines
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

/// Reads a blob and checks that its content matches its name.
fn blob(layout: &Path, digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").unwrap();
    let data = fs::read(layout.join("blobs/sha256").join(hex)).unwrap();
    assert_eq!(
        format!("{:x}", Sha256::digest(&data)),
        hex,
        "blob {digest} is corrupt"
    );
    data
}

fn index_tags(layout: &Path) -> BTreeMap<String, String> {
    let index = read_json(&layout.join("index.json"));
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["annotations"]["org.opencontainers.image.ref.name"]
                    .as_str()
                    .unwrap()
                    .to_string(),
                m["digest"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn git(args: &[&str]) -> String {
    let o = Command::new("git")
        .arg("-C")
        .arg(repo())
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success());
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

#[test]
fn package_only_builds_are_reproducible_tagged_and_runnable() {
    let skopeo = have("skopeo");
    if !skopeo {
        eprintln!("skopeo is not installed: the skopeo inspect and docker-archive checks are skipped (apt-get install -y skopeo)");
        assert!(
            std::env::var("ARCUS_REQUIRE_SKOPEO").as_deref() != Ok("1"),
            "ARCUS_REQUIRE_SKOPEO=1 but skopeo is not installed"
        );
    }
    let tmp = TempDir::new();
    let bin = tmp.0.join("bin");
    fs::create_dir_all(&bin).unwrap();
    for name in ["arcus-operator", "arcus-sample"] {
        fs::copy("/bin/true", bin.join(name)).unwrap();
        fs::set_permissions(bin.join(name), fs::Permissions::from_mode(0o755)).unwrap();
    }
    let (out1, out2) = (tmp.0.join("out1"), tmp.0.join("out2"));

    // 1. Same inputs into two directories: the same manifest digests.
    let first = build(&bin, &out1, "t1", skopeo);
    let second = build(&bin, &out2, "t1", false);
    for (a, b) in first.iter().zip(&second) {
        assert_eq!(a.digest, b.digest, "{} is not reproducible", a.reference);
        assert_ne!(a.layout, b.layout);
    }
    assert_eq!(first[0].layout, out1.join("arcus-operator"));

    // 2. A second tag into the same layout keeps the first; rebuilding a tag replaces it.
    let t2 = build(&bin, &out1, "t2", false);
    let t1_again = build(&bin, &out1, "t1", skopeo);
    assert_eq!(t1_again, first, "rebuilding t1 gave another digest or path");
    for (l1, l2) in first.iter().zip(&t2) {
        let tags = index_tags(&l1.layout);
        assert_eq!(
            tags,
            BTreeMap::from([
                ("t1".to_string(), l1.digest.clone()),
                ("t2".to_string(), l2.digest.clone())
            ]),
            "{}: index.json should hold exactly t1 and t2",
            l1.layout.display()
        );
        assert_ne!(
            l1.digest, l2.digest,
            "the version label differs, so must the digest"
        );
        assert_eq!(
            read_json(&l1.layout.join("oci-layout"))["imageLayoutVersion"],
            "1.0.0"
        );
    }

    // 3. The manifest, config and layer of the operator image.
    let layout = &first[0].layout;
    let epoch: u64 = git(&["log", "-1", "--format=%ct"]).parse().unwrap();
    let manifest: Value = serde_json::from_slice(&blob(layout, &first[0].digest)).unwrap();
    assert_eq!(
        manifest["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1, "one layer");
    assert_eq!(
        layers[0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    let ann = &manifest["annotations"];
    assert_eq!(ann["org.opencontainers.image.version"], "t1");
    assert_eq!(ann["org.opencontainers.image.licenses"], "Apache-2.0");
    assert_eq!(ann["org.opencontainers.image.title"], "arcus-operator");
    assert!(ann["org.opencontainers.image.revision"]
        .as_str()
        .unwrap()
        .starts_with(&git(&["rev-parse", "HEAD"])));
    let config: Value = serde_json::from_slice(&blob(
        layout,
        manifest["config"]["digest"].as_str().unwrap(),
    ))
    .unwrap();
    let created = chrono::DateTime::from_timestamp(epoch as i64, 0)
        .unwrap()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    assert_eq!(config["created"], created.as_str());
    assert_eq!(config["history"][0]["created"], created.as_str());
    assert_eq!(ann["org.opencontainers.image.created"], created.as_str());
    assert_eq!(
        (config["architecture"].as_str(), config["os"].as_str()),
        (Some("amd64"), Some("linux"))
    );
    let c = &config["config"];
    assert_eq!(
        c["Entrypoint"],
        serde_json::json!(["/usr/local/bin/arcus-operator"])
    );
    assert_eq!(c["Cmd"], serde_json::json!(["run"]));
    assert_eq!(c["User"], "65532:65532");
    assert_eq!(c["WorkingDir"], "/");
    assert_eq!(c["ExposedPorts"], serde_json::json!({"8080/tcp": {}}));
    assert_eq!(
        c["Env"],
        serde_json::json!([
            "PATH=/usr/local/bin:/usr/bin:/bin",
            "SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"
        ])
    );
    assert_eq!(
        c["Labels"], *ann,
        "config labels and manifest annotations are one set"
    );
    let sample_manifest: Value =
        serde_json::from_slice(&blob(&first[1].layout, &first[1].digest)).unwrap();
    let sample_config: Value = serde_json::from_slice(&blob(
        &first[1].layout,
        sample_manifest["config"]["digest"].as_str().unwrap(),
    ))
    .unwrap();
    assert_eq!(
        sample_config["config"]["Entrypoint"],
        serde_json::json!(["/usr/local/bin/arcus-sample"])
    );
    assert!(
        sample_config["config"].get("Cmd").is_none(),
        "the sample has no Cmd"
    );

    // The layer: normalised headers, only what /bin/true needs, and the diff_id is its tar's digest.
    let gz = blob(layout, layers[0]["digest"].as_str().unwrap());
    assert_eq!(&gz[4..8], &[0, 0, 0, 0], "gzip header mtime must be 0");
    assert_eq!(gz[3] & 0x08, 0, "gzip header must not carry a file name");
    let mut tar_bytes = Vec::new();
    std::io::Read::read_to_end(&mut GzDecoder::new(gz.as_slice()), &mut tar_bytes).unwrap();
    assert_eq!(
        config["rootfs"]["diff_ids"][0],
        format!("sha256:{:x}", Sha256::digest(&tar_bytes)).as_str()
    );
    let mut archive = tar::Archive::new(tar_bytes.as_slice());
    let mut entries = BTreeMap::new();
    let mut order = Vec::new();
    for e in archive.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e
            .path()
            .unwrap()
            .to_string_lossy()
            .trim_end_matches('/')
            .to_string();
        assert!(e.pax_extensions().unwrap().is_none(), "{path}: pax records");
        let h = e.header();
        assert_eq!(h.mtime().unwrap(), epoch, "{path}: mtime");
        assert_eq!(
            (h.uid().unwrap(), h.gid().unwrap()),
            (0, 0),
            "{path}: owner"
        );
        let mode = h.mode().unwrap();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        order.push(path.clone());
        entries.insert(path, (mode, data));
    }
    let mut sorted = order.clone();
    sorted.sort_by(|a, b| a.split('/').cmp(b.split('/')));
    assert_eq!(order, sorted, "entries are sorted, parents first");
    assert_eq!(entries["tmp"].0, 0o1777);
    assert_eq!(entries["usr/local/bin/arcus-operator"].0, 0o755);
    assert_eq!(
        entries["usr/local/bin/arcus-operator"].1,
        fs::read("/bin/true").unwrap()
    );
    for want in [
        "lib/x86_64-linux-gnu/libc.so.6",
        "usr/share/doc/libc6/copyright",
        "usr/share/doc/ca-certificates/copyright",
        "usr/share/doc/gcc-12-base/copyright",
        "etc/passwd",
        "etc/group",
    ] {
        assert!(
            entries.contains_key(want) || entries.contains_key(&format!("usr/{want}")),
            "{want} missing from the layer: {order:?}"
        );
    }
    for unwanted in [
        "libm.so.6",
        "libgcc_s.so.1",
        "usr/share/ca-certificates",
        "sbin/",
        "share/locale",
        "share/man",
    ] {
        assert!(
            !order.iter().any(|p| p.contains(unwanted)),
            "{unwanted} should not be in the image of /bin/true: {order:?}"
        );
    }
    let passwd = String::from_utf8(entries["etc/passwd"].1.clone()).unwrap();
    assert!(
        passwd
            .lines()
            .any(|l| l.starts_with("nonroot:x:65532:65532:")),
        "{passwd}"
    );
    let bundle = String::from_utf8(entries["etc/ssl/certs/ca-certificates.crt"].1.clone()).unwrap();
    assert!(
        bundle.matches("-----BEGIN CERTIFICATE-----").count() > 100,
        "the CA bundle looks empty"
    );

    // 4. The packaged binary runs on the packaged libraries alone, as the image's user.
    if Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout == b"0\n")
    {
        let root = tmp.0.join("rootfs");
        fs::create_dir_all(&root).unwrap();
        tar::Archive::new(tar_bytes.as_slice())
            .unpack(&root)
            .unwrap();
        let o = Command::new("chroot")
            .arg("--userspec=65532:65532")
            .arg(&root)
            .arg("/usr/local/bin/arcus-operator")
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "the image's binary did not run in a chroot of its layer: {o:?}"
        );
    } else {
        eprintln!("not root: the chroot run of the layer is skipped");
    }

    // 5. skopeo reads the layout and the tarball.
    if skopeo {
        for l in &first {
            let name = l.reference.split(':').next().unwrap();
            let o = Command::new("skopeo")
                .args(["inspect", "--config"])
                .arg(format!("oci:{}:t1", l.layout.display()))
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "skopeo inspect --config: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            let cfg: Value = serde_json::from_slice(&o.stdout).unwrap();
            assert_eq!(
                cfg["config"]["Entrypoint"],
                serde_json::json!([format!("/usr/local/bin/{name}")])
            );
            assert_eq!(cfg["config"]["User"], "65532:65532");
            assert_eq!(
                cfg["config"]["Labels"]["org.opencontainers.image.version"],
                "t1"
            );
            assert_eq!(
                cfg["config"]["Labels"]["org.opencontainers.image.title"],
                name
            );
            let o = Command::new("skopeo")
                .args(["inspect"])
                .arg(format!("oci:{}:t2", l.layout.display()))
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "the second tag must resolve: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            let tarball = out1.join(format!("{name}-t1.tar"));
            let o = Command::new("skopeo")
                .arg("inspect")
                .arg(format!("docker-archive:{}", tarball.display()))
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "{} is no docker-archive: {}",
                tarball.display(),
                String::from_utf8_lossy(&o.stderr)
            );
            let info: Value = serde_json::from_slice(&o.stdout).unwrap();
            assert_eq!(info["Architecture"], "amd64");
            assert_eq!(info["Labels"]["org.opencontainers.image.title"], name);
        }
        // The inspect subcommand names a missing tag.
        let o = Command::new(repo().join("scripts/image"))
            .args(["inspect", "arcus-sample:nope", "--out"])
            .arg(&out1)
            .env("ARCUS_IMAGE_BIN", env!("CARGO_BIN_EXE_arcus-image"))
            .output()
            .unwrap();
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("no tag nope") && err.contains("t1, t2"),
            "{err}"
        );
        let o = Command::new(repo().join("scripts/image"))
            .args(["inspect", "arcus-sample:t2", "--out"])
            .arg(&out1)
            .env("ARCUS_IMAGE_BIN", env!("CARGO_BIN_EXE_arcus-image"))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(String::from_utf8_lossy(&o.stdout).contains("\"/usr/local/bin/arcus-sample\""));
    }
}
