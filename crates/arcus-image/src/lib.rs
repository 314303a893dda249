//! Reproducible OCI image layouts for the operator and the sample app, written without a container
//! engine: `oci-spec` types, `ocidir` for the layout (blobs, canonical JSON, atomic `index.json`),
//! `tar` + `flate2` for the one layer. `scripts/image build` fetches Debian's .deb files and calls
//! the `arcus-image` binary; docs/IMAGES.md tells the whole story.

pub mod elf;
pub mod labels;
pub mod layout;
pub mod reference;
pub mod rootfs;
pub mod sysroot;
pub mod workspace;
