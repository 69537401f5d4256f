//! `--disk PATH[,ro][,format=raw|vhd|vhdx][,max-iops=N][,min-iops=N][,queues=N]` (and `vm set --add-disk`): one disk of a VM spec.
//!
//! A relative path is made absolute against the current directory, because the daemon runs
//! elsewhere and requires absolute paths. Paths containing ',' cannot be given this way.

use std::path::PathBuf;

use vireo_api::{DiskFormat, DiskSpec};

pub const FORM: &str = "PATH[,ro][,format=raw|vhd|vhdx][,max-iops=N][,min-iops=N][,queues=N]";

/// A parsed `--disk`; the path is still as typed (see [`DiskArg::to_spec`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskArg {
    pub path: PathBuf,
    pub read_only: bool,
    pub format: Option<DiskFormat>,
    /// Storage QoS in IOPS normalized to 8 KiB (the daemon validates the values).
    pub max_iops: Option<u32>,
    pub min_iops: Option<u32>,
    /// virtio-blk request queues; `None`: one per vCPU.
    pub queues: Option<u16>,
}

/// clap's value parser: the error names the value and shows the form.
pub fn parse(text: &str) -> Result<DiskArg, String> {
    let mut parts = text.split(',');
    let path = parts.next().unwrap_or_default();
    if path.is_empty() {
        return Err(format!("{text:?} names no file; use {FORM}"));
    }
    let mut disk = DiskArg {
        path: PathBuf::from(path),
        read_only: false,
        format: None,
        max_iops: None,
        min_iops: None,
        queues: None,
    };
    for option in parts {
        match option {
            "ro" => disk.read_only = true,
            "rw" => disk.read_only = false,
            "format=raw" => disk.format = Some(DiskFormat::Raw),
            "format=vhd" => disk.format = Some(DiskFormat::Vhd),
            "format=vhdx" => disk.format = Some(DiskFormat::Vhdx),
            other if other.starts_with("max-iops=") || other.starts_with("min-iops=") => {
                let (key, n) = other.split_once('=').unwrap_or_default();
                let n: u32 = n.parse().map_err(|_| {
                    format!("{text:?}: {key} takes a whole number of IOPS (8 KiB each), not {n:?}")
                })?;
                if key == "max-iops" {
                    disk.max_iops = Some(n);
                } else {
                    disk.min_iops = Some(n);
                }
            }
            other if other.starts_with("queues=") => {
                let n = &other["queues=".len()..];
                disk.queues = Some(
                    vireo_worker::image::parse_queues(n).map_err(|e| format!("{text:?}: {e}"))?,
                );
            }
            other => {
                return Err(format!(
                    "{text:?}: unknown disk option {other:?}; use {FORM} \
                     (without format= the daemon detects it from the file)"
                ))
            }
        }
    }
    Ok(disk)
}

impl DiskArg {
    /// The spec entry, with an absolute path; the serial is left for the daemon to assign.
    pub fn to_spec(&self) -> Result<DiskSpec, String> {
        Ok(DiskSpec {
            path: absolute(&self.path)?,
            read_only: self.read_only,
            format: self.format,
            serial: None,
            max_iops: self.max_iops,
            min_iops: self.min_iops,
            queues: self.queues,
        })
    }
}

/// `path` made absolute against the current directory, lexically (no symlinks resolved: the
/// daemon resolves them itself before it checks the storage root).
pub fn absolute(path: &std::path::Path) -> Result<PathBuf, String> {
    std::path::absolute(path).map_err(|e| format!("cannot make {} absolute: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_qos_options() {
        let d = parse("/d/a.vhdx,max-iops=500,ro,min-iops=100").unwrap();
        assert_eq!(
            (d.max_iops, d.min_iops, d.read_only),
            (Some(500), Some(100), true)
        );
        let spec = d.to_spec().unwrap();
        assert_eq!((spec.max_iops, spec.min_iops), (Some(500), Some(100)));
        let e = parse("/d/a,max-iops=lots").unwrap_err();
        assert!(e.contains("max-iops takes a whole number"), "{e}");
        assert!(parse("/d/a,max-iops=-1").is_err());
    }

    #[test]
    fn queue_count_option() {
        let d = parse("/d/a.vhdx,queues=2").unwrap();
        assert_eq!(d.to_spec().unwrap().queues, Some(2));
        assert_eq!(parse("/d/a.vhdx").unwrap().queues, None);
        let e = parse("/d/a,queues=0").unwrap_err();
        assert!(e.contains("queues=0 is not a queue count"), "{e}");
    }

    #[test]
    fn options_parse_in_any_order() {
        let d = parse("/d/a.vhdx").unwrap();
        assert_eq!((d.read_only, d.format), (false, None));
        let d = parse("/d/a.img,ro,format=raw").unwrap();
        assert_eq!((d.read_only, d.format), (true, Some(DiskFormat::Raw)));
        let d = parse("b.vhd,format=vhd,ro").unwrap();
        assert_eq!(d.path, PathBuf::from("b.vhd"));
        assert_eq!((d.read_only, d.format), (true, Some(DiskFormat::Vhd)));
    }

    #[test]
    fn bad_options_name_the_value() {
        for bad in ["", ",ro", "/d/a,qcow2", "/d/a,format=qcow2", "/d/a,RO"] {
            let e = parse(bad).unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{bad}: {e}");
            assert!(e.contains(FORM), "{bad}: {e}");
        }
    }

    #[test]
    fn relative_paths_become_absolute() {
        let spec = parse("disks/a.vhdx,ro").unwrap().to_spec().unwrap();
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(spec.path, cwd.join("disks/a.vhdx"));
        assert!(spec.read_only && spec.serial.is_none());
        let spec = parse("/abs/b.img").unwrap().to_spec().unwrap();
        assert_eq!(spec.path, PathBuf::from("/abs/b.img"));
    }
}
