//! `arcus-image`: the packager behind `scripts/image` (see docs/IMAGES.md).
//!
//! `build` writes one image into `OUT/<name>/` (an OCI image layout) and, with
//! `--docker-archive`, `OUT/<name>-<tag>.tar` through skopeo; it prints one line
//! `<name>:<tag> sha256:<manifest digest> <layout> (<compressed>, <uncompressed>)` on stdout
//! (scripts parse its first three fields) and its log on stderr.

use anyhow::{bail, Context, Result};
use arcus_image::labels::{self, ImageMeta};
use arcus_image::layout::{self, human_size, ImageSpec};
use arcus_image::reference::{check_transport_path, validate_name, validate_tag, ImageRef};
use arcus_image::rootfs::{Rootfs, TMP_MODE};
use arcus_image::sysroot::{Package, Sysroot};
use arcus_image::workspace;
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Parser)]
#[command(
    name = "arcus-image",
    about = "Reproducible OCI images of the ARCUS operator and sample app"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write one image into OUT/<name>/ and tag it.
    Build(BuildArgs),
    /// Show an image's config and manifest with skopeo.
    Inspect {
        /// NAME or NAME:TAG (default tag: the workspace version)
        reference: String,
        #[arg(long)]
        out: PathBuf,
        /// The checkout (for the default tag)
        #[arg(long, default_value = ".")]
        repo: PathBuf,
    },
}

#[derive(clap::Args)]
struct BuildArgs {
    /// Image name: the layout is OUT/<name>, the binary goes to /usr/local/bin/<name>
    #[arg(long)]
    name: String,
    /// The binary to package
    #[arg(long)]
    binary: PathBuf,
    /// Tag (default: the workspace version)
    #[arg(long)]
    tag: Option<String>,
    /// Directory of the layouts
    #[arg(long)]
    out: PathBuf,
    /// The checkout the binary was built from (git metadata, Cargo.toml)
    #[arg(long, default_value = ".")]
    repo: PathBuf,
    /// PACKAGE=DIR of a Debian package extracted with dpkg-deb -x (repeat; libc6 and
    /// ca-certificates at least)
    #[arg(long = "deb", required = true)]
    debs: Vec<String>,
    /// Default arguments (the config's Cmd; repeat). None: no Cmd.
    #[arg(long = "cmd")]
    cmd: Vec<String>,
    /// org.opencontainers.image.description (default: crates/<name>/Cargo.toml's description)
    #[arg(long)]
    description: Option<String>,
    /// Exposed port
    #[arg(long, default_value = "8080/tcp")]
    port: Vec<String>,
    /// Also write OUT/<name>-<tag>.tar (docker-archive, via skopeo)
    #[arg(long)]
    docker_archive: bool,
}

const USER: &str = "65532:65532";
const CA_BUNDLE: &str = "etc/ssl/certs/ca-certificates.crt";
const PASSWD: &str = "root:x:0:0:root:/root:/usr/sbin/nologin\nnonroot:x:65532:65532:nonroot:/nonexistent:/usr/sbin/nologin\n";
const GROUP: &str = "root:x:0:\nnonroot:x:65532:\n";

fn log(msg: impl AsRef<str>) {
    eprintln!("[arcus-image] {}", msg.as_ref());
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("resolving {}", p.display()))
}

fn build(a: BuildArgs) -> Result<()> {
    validate_name(&a.name)?;
    let repo = absolute(&a.repo)?;
    let out = absolute(&a.out)?;
    check_transport_path(&out)?;
    let ws = workspace::workspace(&repo)?;
    let tag = a.tag.clone().unwrap_or_else(|| ws.version.clone());
    validate_tag(&tag)?;
    let git = workspace::git_info(&repo)?;

    // The reproducible-builds convention: an explicit SOURCE_DATE_EPOCH wins, else HEAD's time.
    let epoch = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) if !v.is_empty() => {
            let e = v
                .parse()
                .with_context(|| format!("SOURCE_DATE_EPOCH={v:?} is not a number of seconds"))?;
            log(format!("SOURCE_DATE_EPOCH={e} (from the environment)"));
            e
        }
        _ => git.commit_time,
    };
    let created = labels::rfc3339(epoch)?;
    let (source, origin) =
        labels::choose_source(git.origin.as_deref(), ws.repository.as_deref(), &git.top);
    log(format!("{}: source {source} (from {origin})", a.name));
    let description = match a.description.clone() {
        Some(d) => d,
        None => workspace::crate_description(&repo, &a.name)?.with_context(|| {
            format!(
                "no description for {}: crates/{}/Cargo.toml has none; pass --description",
                a.name, a.name
            )
        })?,
    };
    let meta = ImageMeta {
        title: a.name.clone(),
        description,
        version: tag.clone(),
        source,
        revision: labels::revision(&git.head, git.dirty),
        licenses: ws
            .license
            .clone()
            .unwrap_or_else(|| "Apache-2.0".to_string()),
        created: created.clone(),
    };

    let packages = a
        .debs
        .iter()
        .map(|s| Package::parse(s))
        .collect::<Result<Vec<_>>>()?;
    let sysroot = Sysroot::new(packages);
    let binary = absolute(&a.binary)?;
    let mut fs = Rootfs::new();
    let bin_path = format!("usr/local/bin/{}", a.name);
    fs.executable(&bin_path, &binary)?;
    let libs = sysroot.add_runtime_of(&mut fs, &binary)?;
    log(format!(
        "{}: runtime from {:?}: {}",
        a.name,
        sysroot.package_names(),
        libs.join(" ")
    ));
    let (bundle, n) = sysroot.ca_bundle()?;
    fs.bytes(CA_BUNDLE, bundle, 0o644)?;
    log(format!("{}: /{CA_BUNDLE} from {n} certificates", a.name));
    sysroot.add_copyrights(&mut fs)?;
    fs.bytes("etc/passwd", PASSWD.as_bytes().to_vec(), 0o644)?;
    fs.bytes("etc/group", GROUP.as_bytes().to_vec(), 0o644)?;
    fs.dir("tmp", TMP_MODE)?;

    let spec = ImageSpec {
        name: a.name.clone(),
        tag: tag.clone(),
        entrypoint: vec![format!("/{bin_path}")],
        cmd: (!a.cmd.is_empty()).then(|| a.cmd.clone()),
        env: vec![
            "PATH=/usr/local/bin:/usr/bin:/bin".to_string(),
            format!("SSL_CERT_FILE=/{CA_BUNDLE}"),
        ],
        user: USER.to_string(),
        working_dir: "/".to_string(),
        exposed_ports: a.port.clone(),
        labels: labels::label_set(&meta),
        created,
        epoch,
        created_by: format!(
            "arcus-image: /{bin_path} and its Debian runtime ({})",
            sysroot.package_names().join(", ")
        ),
    };
    let built = layout::write_image(&out, &spec, &fs)?;
    if built.pruned > 0 {
        log(format!(
            "{}: pruned {} blobs that no tag references any more",
            a.name, built.pruned
        ));
    }

    if a.docker_archive {
        let r = ImageRef {
            name: a.name.clone(),
            tag: tag.clone(),
        };
        let tar = out.join(format!("{}-{tag}.tar", a.name));
        export_docker_archive(&r, &out, &tar)?;
        log(format!(
            "{}: {} ({})",
            a.name,
            tar.display(),
            human_size(std::fs::metadata(&tar)?.len())
        ));
    }
    println!(
        "{}:{} {} {} ({} compressed, {} uncompressed)",
        a.name,
        tag,
        built.digest,
        built.layout.display(),
        human_size(built.compressed),
        human_size(built.uncompressed)
    );
    Ok(())
}

fn skopeo(args: &[String]) -> Result<std::process::Output> {
    Command::new("skopeo")
        .args(args)
        .output()
        .context("running skopeo: install it with 'apt-get install -y skopeo'")
}

/// docker load and podman load take this; written beside and renamed so a reader never sees a
/// partial tarball.
fn export_docker_archive(r: &ImageRef, out: &Path, tar: &Path) -> Result<()> {
    let tmp = out.join(format!(".{}-{}.tar.tmp", r.name, r.tag));
    let _ = std::fs::remove_file(&tmp);
    let args = vec![
        "copy".to_string(),
        "--quiet".to_string(),
        r.oci_transport(out),
        format!("docker-archive:{}:{r}", tmp.display()),
    ];
    let o = skopeo(&args)?;
    if !o.status.success() {
        let _ = std::fs::remove_file(&tmp);
        bail!(
            "skopeo {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    std::fs::rename(&tmp, tar)
        .with_context(|| format!("renaming {} to {}", tmp.display(), tar.display()))
}

fn inspect(reference: &str, out: &Path, repo: &Path) -> Result<()> {
    let out = absolute(out)?;
    let default_tag = workspace::workspace(&absolute(repo)?)?.version;
    let r = ImageRef::parse(reference, &default_tag)?;
    let tags = layout::tags(&out.join(&r.name))?;
    if !tags.contains_key(&r.tag) {
        bail!(
            "{}: no tag {} (it has: {}); build it with 'scripts/image build --tag {}'",
            out.join(&r.name).display(),
            r.tag,
            tags.keys().cloned().collect::<Vec<_>>().join(", "),
            r.tag
        );
    }
    for (title, args) in [
        (
            "config",
            vec![
                "inspect".to_string(),
                "--config".to_string(),
                r.oci_transport(&out),
            ],
        ),
        ("image", vec!["inspect".to_string(), r.oci_transport(&out)]),
    ] {
        let o = skopeo(&args)?;
        if !o.status.success() {
            bail!(
                "skopeo {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&o.stderr).trim()
            );
        }
        println!("# skopeo {} ({title})", args.join(" "));
        println!("{}", String::from_utf8_lossy(&o.stdout).trim_end());
    }
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Build(a) => build(a),
        Cmd::Inspect {
            reference,
            out,
            repo,
        } => inspect(&reference, &out, &repo),
    };
    if let Err(e) = res {
        eprintln!("[arcus-image] error: {e:#}");
        std::process::exit(1);
    }
}
