//! The Debian runtime files, taken from .deb files extracted with `dpkg-deb -x` (one directory per
//! package): the binary's shared libraries (recursively, with their symlinks), the CA bundle as
//! update-ca-certificates would build it, and each package's copyright file.

use crate::elf;
use crate::rootfs::Rootfs;
use anyhow::{bail, Context, Result};
use std::collections::BTreeSet;
use std::path::{Component, Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Package {
    pub name: String,
    /// Where `dpkg-deb -x` put its files.
    pub root: PathBuf,
}

impl Package {
    /// `NAME=DIR`, as `--deb` takes it.
    pub fn parse(s: &str) -> Result<Self> {
        let (name, dir) = s
            .split_once('=')
            .with_context(|| format!("--deb {s:?}: expected PACKAGE=EXTRACTED_DIR"))?;
        let root = PathBuf::from(dir);
        if !root.is_dir() {
            bail!(
                "--deb {s:?}: {} is not a directory (extract the .deb with dpkg-deb -x first)",
                root.display()
            );
        }
        Ok(Self {
            name: name.to_string(),
            root,
        })
    }
}

/// The directories ld.so searches without an ld.so.cache on Debian amd64, in its order (the
/// image has no cache, so a library must sit in one of them).
const LIBRARY_DIRS: &[&str] = &[
    "lib/x86_64-linux-gnu",
    "usr/lib/x86_64-linux-gnu",
    "lib",
    "usr/lib",
];
/// Top-level directories that merged-/usr Debian (trixie on) ships only below usr/.
const MERGED_USR: &[&str] = &["lib", "lib64", "bin", "sbin"];

pub struct Sysroot {
    packages: Vec<Package>,
}

/// `a/b/../c` → `a/c`, without touching the file system (paths inside an extracted package).
fn normalize(path: &Path) -> Result<String> {
    let mut out: Vec<String> = Vec::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => {
                if out.pop().is_none() {
                    bail!("{}: leaves the package root", path.display());
                }
            }
            Component::Normal(s) => out.push(s.to_string_lossy().into_owned()),
            Component::Prefix(_) => bail!("{}: not a Unix path", path.display()),
        }
    }
    Ok(out.join("/"))
}

impl Sysroot {
    pub fn new(packages: Vec<Package>) -> Self {
        Self { packages }
    }

    pub fn package_names(&self) -> Vec<&str> {
        self.packages.iter().map(|p| p.name.as_str()).collect()
    }

    fn package(&self, name: &str) -> Result<&Package> {
        self.packages.iter().find(|p| p.name == name).with_context(|| {
            format!("package {name} was not given (--deb {name}=DIR); scripts/image passes libc6, libgcc-s1 and ca-certificates")
        })
    }

    /// The first package that has `path` (as a file, directory or symlink, not following it).
    fn lookup(&self, path: &str) -> Option<(&Package, PathBuf)> {
        self.packages.iter().find_map(|p| {
            let host = p.root.join(path);
            host.symlink_metadata().is_ok().then_some((p, host))
        })
    }

    /// Puts `path` into the image as the packages have it: a symlink is copied as a symlink and its
    /// target added too. On merged /usr, a missing `/lib64/x` found as `/usr/lib64/x` brings the
    /// `lib64 -> usr/lib64` link that base-files would provide. Returns the host path of the
    /// regular file finally reached.
    fn add_path(&self, fs: &mut Rootfs, path: &str, depth: usize) -> Result<PathBuf> {
        if depth > 16 {
            bail!("/{path}: too many levels of symlinks in the packages");
        }
        let Some((_, host)) = self.lookup(path) else {
            let top = path.split('/').next().unwrap_or_default();
            if MERGED_USR.contains(&top) && self.lookup(&format!("usr/{path}")).is_some() {
                fs.symlink(top, &format!("usr/{top}"))?;
                return self.add_path(fs, &format!("usr/{path}"), depth + 1);
            }
            bail!(
                "/{path} is in none of the packages {:?}",
                self.package_names()
            );
        };
        let meta = host.symlink_metadata()?;
        if meta.file_type().is_symlink() {
            let target = std::fs::read_link(&host)
                .with_context(|| format!("reading the link {}", host.display()))?;
            let target_str = target.to_string_lossy().into_owned();
            fs.symlink(path, &target_str)?;
            let resolved = if target.is_absolute() {
                normalize(&target)?
            } else {
                normalize(
                    &Path::new(path)
                        .parent()
                        .unwrap_or(Path::new(""))
                        .join(&target),
                )?
            };
            return self.add_path(fs, &resolved, depth + 1);
        }
        if !meta.is_file() {
            bail!("{} is not a regular file", host.display());
        }
        fs.file(path, &host)?;
        Ok(host)
    }

    /// Adds the binary's interpreter and every shared library it needs, transitively. Returns the
    /// image paths of the libraries (for the build's log).
    pub fn add_runtime_of(&self, fs: &mut Rootfs, binary: &Path) -> Result<Vec<String>> {
        let info = elf::read(binary)?;
        if !info.is_x86_64() {
            bail!(
                "{} is {} {}, the images are linux/amd64: build it for x86_64-unknown-linux-gnu",
                binary.display(),
                info.class,
                info.machine
            );
        }
        let mut added = Vec::new();
        if let Some(interp) = &info.interpreter {
            let p = interp.trim_start_matches('/').to_string();
            self.add_path(fs, &p, 0)
                .with_context(|| format!("the program interpreter of {}", binary.display()))?;
            added.push(format!("/{p}"));
        }
        let mut seen = BTreeSet::new();
        let mut queue: Vec<(String, String)> = info
            .needed
            .iter()
            .map(|n| (n.clone(), binary.display().to_string()))
            .collect();
        while let Some((lib, wanted_by)) = queue.pop() {
            if !seen.insert(lib.clone()) {
                continue;
            }
            let Some(dir) = LIBRARY_DIRS
                .iter()
                .find(|d| self.lookup(&format!("{d}/{lib}")).is_some())
            else {
                bail!(
                    "{wanted_by} needs {lib}, which none of the packages {:?} has in {LIBRARY_DIRS:?}: add the Debian package that ships it to scripts/image",
                    self.package_names()
                );
            };
            let path = format!("{dir}/{lib}");
            let host = self.add_path(fs, &path, 0)?;
            added.push(format!("/{path}"));
            for n in elf::read(&host)?.needed {
                queue.push((n, format!("/{path}")));
            }
        }
        Ok(added)
    }

    /// /etc/ssl/certs/ca-certificates.crt as update-ca-certificates makes it (its postinst does
    /// not run under dpkg-deb -x): every .crt below /usr/share/ca-certificates, in sorted path
    /// order, each ending in a newline.
    pub fn ca_bundle(&self) -> Result<(Vec<u8>, usize)> {
        let pkg = self.package("ca-certificates")?;
        let base = pkg.root.join("usr/share/ca-certificates");
        let mut certs = Vec::new();
        collect_crt(&base, &base, &mut certs)?;
        if certs.is_empty() {
            bail!(
                "no .crt files below {}: is that the ca-certificates package?",
                base.display()
            );
        }
        certs.sort();
        let mut bundle = Vec::new();
        for rel in &certs {
            let data = std::fs::read(base.join(rel))
                .with_context(|| format!("reading {}", base.join(rel).display()))?;
            bundle.extend_from_slice(&data);
            if !data.ends_with(b"\n") {
                bundle.push(b'\n');
            }
        }
        Ok((bundle, certs.len()))
    }

    /// /usr/share/doc/<pkg>/copyright of every package. Debian lets a library's doc directory be
    /// a symlink to the one of a package it depends on (libgcc-s1 → gcc-12-base); the link is
    /// kept and the target's copyright added, so that package must be given too.
    pub fn add_copyrights(&self, fs: &mut Rootfs) -> Result<()> {
        for p in &self.packages {
            let doc = format!("usr/share/doc/{}", p.name);
            let host = p.root.join(&doc);
            let meta = host
                .symlink_metadata()
                .with_context(|| format!("{} has no /{doc}", p.name))?;
            let dir = if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&host)?;
                fs.symlink(&doc, &target.to_string_lossy())?;
                let resolved = normalize(&Path::new("usr/share/doc").join(&target))?;
                if self.lookup(&format!("{resolved}/copyright")).is_none() {
                    bail!(
                        "/{doc} links to /{resolved}, whose copyright is in none of the packages {:?}: pass that package too (scripts/image follows such links)",
                        self.package_names()
                    );
                }
                resolved
            } else {
                doc
            };
            let copyright = format!("{dir}/copyright");
            self.add_path(fs, &copyright, 0)
                .with_context(|| format!("the copyright of {}", p.name))?;
        }
        Ok(())
    }
}

fn collect_crt(base: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        let path = e.path();
        let ft = e.file_type()?;
        if ft.is_dir() {
            collect_crt(base, &path, out)?;
        } else if ft.is_file() && path.extension().is_some_and(|x| x == "crt") {
            out.push(path.strip_prefix(base)?.to_string_lossy().into_owned());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rootfs::Content;
    use std::os::unix::fs::symlink;

    struct Tmp(PathBuf);
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn tmp(tag: &str) -> Tmp {
        let d =
            std::env::temp_dir().join(format!("arcus-image-sysroot-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Tmp(d)
    }
    fn write(root: &Path, rel: &str, data: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, data).unwrap();
    }

    #[test]
    fn normalize_stays_inside() {
        assert_eq!(normalize(Path::new("/lib/x/../y")).unwrap(), "lib/y");
        assert_eq!(normalize(Path::new("a/./b")).unwrap(), "a/b");
        assert!(normalize(Path::new("a/../../b")).is_err());
    }

    #[test]
    fn symlinks_are_kept_and_followed_across_packages() {
        let t = tmp("links");
        let a = t.0.join("a");
        let b = t.0.join("b");
        write(&b, "lib/x86_64-linux-gnu/ld.so", "ld");
        std::fs::create_dir_all(a.join("lib64")).unwrap();
        symlink("/lib/x86_64-linux-gnu/ld.so", a.join("lib64/ld.so")).unwrap();
        let s = Sysroot::new(vec![
            Package {
                name: "a".into(),
                root: a,
            },
            Package {
                name: "b".into(),
                root: b.clone(),
            },
        ]);
        let mut fs = Rootfs::new();
        let host = s.add_path(&mut fs, "lib64/ld.so", 0).unwrap();
        assert_eq!(host, b.join("lib/x86_64-linux-gnu/ld.so"));
        let got: Vec<(String, Content)> = fs.iter().map(|(p, e)| (p, e.content.clone())).collect();
        assert_eq!(
            got,
            [
                ("lib".into(), Content::Dir),
                ("lib/x86_64-linux-gnu".into(), Content::Dir),
                ("lib/x86_64-linux-gnu/ld.so".into(), Content::File(host)),
                ("lib64".into(), Content::Dir),
                (
                    "lib64/ld.so".into(),
                    Content::Symlink("/lib/x86_64-linux-gnu/ld.so".into())
                ),
            ]
        );
        assert!(s.add_path(&mut fs, "lib/none.so", 0).is_err());
    }

    #[test]
    fn merged_usr_packages_get_the_top_level_link() {
        let t = tmp("usrmerge");
        write(&t.0, "usr/lib64/ld.so", "ld");
        let s = Sysroot::new(vec![Package {
            name: "libc6".into(),
            root: t.0.clone(),
        }]);
        let mut fs = Rootfs::new();
        s.add_path(&mut fs, "lib64/ld.so", 0).unwrap();
        let got: Vec<String> = fs.iter().map(|(p, _)| p).collect();
        assert_eq!(got, ["lib64", "usr", "usr/lib64", "usr/lib64/ld.so"]);
    }

    #[test]
    fn the_ca_bundle_is_sorted_and_newline_terminated() {
        let t = tmp("ca");
        write(&t.0, "usr/share/ca-certificates/mozilla/B.crt", "B\n");
        write(&t.0, "usr/share/ca-certificates/mozilla/A.crt", "A");
        write(
            &t.0,
            "usr/share/ca-certificates/mozilla/README",
            "not a cert",
        );
        write(&t.0, "usr/share/ca-certificates/extra/Z.crt", "Z\n");
        let s = Sysroot::new(vec![Package {
            name: "ca-certificates".into(),
            root: t.0.clone(),
        }]);
        let (bundle, n) = s.ca_bundle().unwrap();
        assert_eq!(n, 3);
        assert_eq!(
            String::from_utf8(bundle).unwrap(),
            "Z\nA\nB\n",
            "extra/ sorts before mozilla/"
        );
        let empty = Sysroot::new(vec![]);
        assert!(empty.ca_bundle().is_err());
    }

    #[test]
    fn copyright_follows_a_doc_symlink_or_says_which_package_is_missing() {
        let t = tmp("doc");
        let lib = t.0.join("libgcc-s1");
        let base = t.0.join("gcc-12-base");
        std::fs::create_dir_all(lib.join("usr/share/doc")).unwrap();
        symlink("gcc-12-base", lib.join("usr/share/doc/libgcc-s1")).unwrap();
        write(&base, "usr/share/doc/gcc-12-base/copyright", "GPL");
        let only_lib = Sysroot::new(vec![Package {
            name: "libgcc-s1".into(),
            root: lib.clone(),
        }]);
        let err = only_lib
            .add_copyrights(&mut Rootfs::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("gcc-12-base"), "{err}");
        let both = Sysroot::new(vec![
            Package {
                name: "libgcc-s1".into(),
                root: lib,
            },
            Package {
                name: "gcc-12-base".into(),
                root: base,
            },
        ]);
        let mut fs = Rootfs::new();
        both.add_copyrights(&mut fs).unwrap();
        assert!(fs.contains("usr/share/doc/gcc-12-base/copyright"));
        let link = fs
            .iter()
            .find(|(p, _)| p == "usr/share/doc/libgcc-s1")
            .unwrap()
            .1
            .content
            .clone();
        assert_eq!(link, Content::Symlink("gcc-12-base".into()));
    }
}
