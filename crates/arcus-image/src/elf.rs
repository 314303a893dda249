//! What an ELF file needs at run time, read with binutils' `readelf` (the linker's own tool; it
//! is on every machine that can build the workspace).

use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ElfInfo {
    pub class: String,
    pub machine: String,
    /// PT_INTERP, e.g. /lib64/ld-linux-x86-64.so.2; None for a static binary.
    pub interpreter: Option<String>,
    /// DT_NEEDED, in file order.
    pub needed: Vec<String>,
}

impl ElfInfo {
    pub fn is_x86_64(&self) -> bool {
        self.class == "ELF64" && self.machine.contains("X86-64")
    }
}

/// Parses `readelf -h -l -d -W` output (C locale).
pub fn parse_readelf(out: &str) -> ElfInfo {
    let mut info = ElfInfo::default();
    for line in out.lines() {
        let t = line.trim();
        if let Some(v) = t.strip_prefix("Class:") {
            info.class = v.trim().to_string();
        } else if let Some(v) = t.strip_prefix("Machine:") {
            info.machine = v.trim().to_string();
        } else if let Some(v) = t.strip_prefix("[Requesting program interpreter:") {
            info.interpreter = Some(v.trim_end_matches(']').trim().to_string());
        } else if t.contains("(NEEDED)") {
            if let Some(lib) = t
                .split_once("Shared library: [")
                .and_then(|(_, r)| r.strip_suffix(']'))
            {
                info.needed.push(lib.to_string());
            }
        }
    }
    info
}

pub fn read(path: &Path) -> Result<ElfInfo> {
    let out = Command::new("readelf")
        .env("LC_ALL", "C")
        .args(["-h", "-l", "-d", "-W"])
        .arg(path)
        .output()
        .context("running readelf (binutils): install it with 'apt-get install -y binutils'")?;
    if !out.status.success() {
        bail!(
            "readelf could not read {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let info = parse_readelf(&String::from_utf8_lossy(&out.stdout));
    if info.class.is_empty() {
        bail!(
            "{} is not an ELF file (readelf printed no header)",
            path.display()
        );
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "ELF Header:
  Magic:   7f 45 4c 46 02 01 01 00 00 00 00 00 00 00 00 00
  Class:                             ELF64
  Type:                              DYN (Position-Independent Executable file)
  Machine:                           Advanced Micro Devices X86-64

Program Headers:
  Type           Offset   VirtAddr           PhysAddr           FileSiz  MemSiz   Flg Align
  INTERP         0x000318 0x0000000000000318 0x0000000000000318 0x00001c 0x00001c R   0x1
      [Requesting program interpreter: /lib64/ld-linux-x86-64.so.2]

Dynamic section at offset 0x1ecd8 contains 27 entries:
  Tag        Type                         Name/Value
 0x0000000000000001 (NEEDED)             Shared library: [libgcc_s.so.1]
 0x0000000000000001 (NEEDED)             Shared library: [libm.so.6]
 0x0000000000000001 (NEEDED)             Shared library: [libc.so.6]
 0x000000000000000e (SONAME)             Library soname: [libx.so.1]
";

    #[test]
    fn parses_interpreter_and_needed() {
        let i = parse_readelf(SAMPLE);
        assert!(i.is_x86_64());
        assert_eq!(
            i.interpreter.as_deref(),
            Some("/lib64/ld-linux-x86-64.so.2")
        );
        assert_eq!(i.needed, ["libgcc_s.so.1", "libm.so.6", "libc.so.6"]);
    }

    #[test]
    fn static_and_foreign_binaries_are_told_apart() {
        let i = parse_readelf("  Class: ELF64\n  Machine: AArch64\n");
        assert!(!i.is_x86_64());
        assert_eq!(i.interpreter, None);
        assert!(i.needed.is_empty());
    }

    #[test]
    fn reads_a_real_binary() {
        let i = read(Path::new("/bin/true")).unwrap();
        assert!(i.needed.iter().any(|n| n == "libc.so.6"), "{i:?}");
        assert!(i.interpreter.is_some(), "{i:?}");
        assert!(read(Path::new("/etc/passwd")).is_err());
    }
}
