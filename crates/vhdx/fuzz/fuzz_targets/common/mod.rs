//! Shared by the whole-file targets: the valid base image and the patch-record input format.

use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;

use vireo_block::BlockBackend;
use vireo_vhdx::{CreateOptions, Vhdx};

/// A valid 8 MiB dynamic VHDX (1 MiB blocks) holding a little data, as bytes.
pub fn base() -> &'static Vec<u8> {
    static BASE: OnceLock<Vec<u8>> = OnceLock::new();
    BASE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("vhdx-fuzz-base-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("base.vhdx");
        let _ = std::fs::remove_file(&path);
        let disk = Vhdx::create(
            &path,
            &CreateOptions {
                size: 8 << 20,
                block_size: 1 << 20,
                ..CreateOptions::default()
            },
        )
        .unwrap();
        disk.write_at(&[0x5a; 8192], 4096).unwrap();
        disk.write_at(&[0xa5; 4096], 5 << 20).unwrap();
        disk.flush().unwrap();
        drop(disk);
        let bytes = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        bytes
    })
}

/// The base image patched by `data`: an optional truncation record (0xff, u32 LE length), then
/// `(offset: u32 LE, len: u8, bytes)` records, so every structure is reachable while the corpus
/// stays tiny.
pub fn patched(data: &[u8]) -> Vec<u8> {
    let mut image = base().clone();
    let mut rest = data;
    if rest.len() >= 5 && rest[0] == 0xff {
        let len = u32::from_le_bytes(rest[1..5].try_into().unwrap()) as usize;
        image.truncate(len.min(image.len()));
        rest = &rest[5..];
    }
    while rest.len() >= 5 {
        let off = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        let len = rest[4] as usize;
        let bytes = &rest[5..(5 + len).min(rest.len())];
        rest = &rest[(5 + len).min(rest.len())..];
        if let Some(end) = off.checked_add(bytes.len()) {
            if end <= image.len() {
                image[off..end].copy_from_slice(bytes);
            }
        }
    }
    image
}

/// Writes `image` to this process's scratch file and returns its path.
pub fn scratch(image: &[u8]) -> PathBuf {
    let path = std::env::temp_dir().join(format!("vhdx-fuzz-{}.vhdx", std::process::id()));
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(image).unwrap();
    path
}
