//! What a VM's disk attaches (`vireo run --disk PATH[,ro][,format=F]`, a spec's `disks`): the
//! image format is read from the file's content (or given explicitly) and never guessed by
//! falling through to raw. A VHD
//! served as raw shows the guest the container's bytes, and a guest write at LBA 0 then destroys
//! the image; so every file with a known signature is served as its format or refused.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use vireo_block::{BlockBackend, RawFile};
use vireo_vhdx::convert::Format;
use vireo_vhdx::vhd::{DiskType as VhdType, Vhd};
use vireo_vhdx::Vhdx;

use crate::error::WorkerError;

/// One disk to open (a `--disk` option, a spec's disk).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskArg {
    pub path: PathBuf,
    pub read_only: bool,
    /// Given with `format=`; `None` means "detect by content".
    pub format: Option<Format>,
    /// virtio-blk request queues (`queues=N`); `None`: one per vCPU.
    pub queues: Option<u16>,
}

/// Most request queues `queues=` accepts (the device's own limit).
pub const MAX_DISK_QUEUES: u16 = vireo_virtio::block::MAX_QUEUES;

/// `PATH[,ro|,rw][,format=raw|vhd|vhdx][,queues=N]`: options follow the path, in any order.
pub fn parse_disk(s: &str) -> Result<DiskArg, String> {
    let mut parts = s.split(',');
    let path = parts.next().unwrap_or_default();
    if path.is_empty() {
        return Err("empty disk path".into());
    }
    let mut arg = DiskArg {
        path: path.into(),
        read_only: false,
        format: None,
        queues: None,
    };
    for opt in parts {
        match opt.split_once('=') {
            None if opt == "ro" => arg.read_only = true,
            None if opt == "rw" => arg.read_only = false,
            Some(("format", f)) => {
                arg.format = Some(f.parse().map_err(|_| {
                    format!("unknown disk format '{f}' (format=raw, format=vhd or format=vhdx)")
                })?)
            }
            Some(("queues", n)) => arg.queues = Some(parse_queues(n)?),
            _ => {
                return Err(format!(
                    "unknown disk option '{opt}' (options: ro, format=raw|vhd|vhdx, queues=N)"
                ))
            }
        }
    }
    Ok(arg)
}

/// `queues=N`: 1 to [`MAX_DISK_QUEUES`] virtio-blk request queues.
pub fn parse_queues(n: &str) -> Result<u16, String> {
    match n.parse::<u16>() {
        Ok(q) if (1..=MAX_DISK_QUEUES).contains(&q) => Ok(q),
        _ => Err(format!(
            "queues={n} is not a queue count; give 1 to {MAX_DISK_QUEUES} (default: one per vCPU)"
        )),
    }
}

/// What a file's content says it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Content {
    /// A format `vireo run` serves.
    Known(Format),
    /// A disk image format it does not: the name users know it by.
    Foreign(&'static str),
}

/// Signatures at offset 0 of image formats we do not serve. Anything here is refused unless the
/// user says `format=raw`.
const FOREIGN_AT_0: &[(&[u8], &str)] = &[
    (b"QFI\xfb", "qcow2"),
    (b"QED\0", "QED"),
    (b"KDMV", "VMDK"),
    (b"COWD", "VMDK (ESX COW)"),
    (b"# Disk DescriptorFile", "VMDK descriptor"),
    (b"<<< Oracle VM VirtualBox Disk Image >>>", "VDI"),
    (b"LUKS\xba\xbe", "LUKS"),
    (b"WithoutFreeSpace", "Parallels"),
    (b"WithouFreSpacExt", "Parallels"),
    (b"Bochs Virtual HD Image", "Bochs"),
];
/// VDI keeps its signature (0xbeda107f, little-endian) at 0x40.
const VDI_SIGNATURE: (usize, [u8; 4]) = (0x40, [0x7f, 0x10, 0xda, 0xbe]);

/// Reads the signatures of `path`: VHDX and VHD first, then the foreign ones; no signature is
/// raw.
pub fn detect(file: &File) -> std::io::Result<Content> {
    let len = file.metadata()?.len();
    let mut head = [0u8; 512];
    let n = (len as usize).min(head.len());
    file.read_exact_at(&mut head[..n], 0)?;
    let head = &head[..n];
    if head.starts_with(b"vhdxfile") {
        return Ok(Content::Known(Format::Vhdx));
    }
    // A VHD ends with a "conectix" footer; a dynamic one also starts with a copy of it (the
    // end may lack it after a crash while growing).
    if head.starts_with(b"conectix") {
        return Ok(Content::Known(Format::Vhd));
    }
    if len >= 512 {
        let mut tail = [0u8; 8];
        file.read_exact_at(&mut tail, len - 512)?;
        if &tail == b"conectix" {
            return Ok(Content::Known(Format::Vhd));
        }
    }
    if let Some((_, name)) = FOREIGN_AT_0.iter().find(|(sig, _)| head.starts_with(sig)) {
        return Ok(Content::Foreign(name));
    }
    let (at, sig) = VDI_SIGNATURE;
    if head.get(at..at + 4) == Some(&sig[..]) {
        return Ok(Content::Foreign("VDI"));
    }
    Ok(Content::Known(Format::Raw))
}

/// An opened disk image, with the typed handle the control socket needs.
#[derive(Clone)]
pub enum Image {
    Raw,
    Vhd(Arc<Vhd>),
    Vhdx(Arc<Vhdx>),
}

impl Image {
    pub fn format(&self) -> Format {
        match self {
            Image::Raw => Format::Raw,
            Image::Vhd(_) => Format::Vhd,
            Image::Vhdx(_) => Format::Vhdx,
        }
    }
}

/// A disk ready to attach: what the device does I/O through, and what the image is.
pub struct OpenedDisk {
    pub backend: Arc<dyn BlockBackend>,
    pub image: Image,
}

/// Opens `d` as the format its content (or its `format=`) names; refuses formats it does not
/// serve and a `format=` the content contradicts. Errors are one line naming the file.
pub fn open(d: &DiskArg) -> Result<OpenedDisk, WorkerError> {
    open_from(d, None)
}

/// [`open`]; with `held` the disk is opened from that file, already open and locked (a disk
/// handed over with its lock, `vireo_block::handover`), instead of from its path, so its
/// lock is never let go. The caller has checked it is the file `d.path` names.
pub fn open_from(d: &DiskArg, held: Option<File>) -> Result<OpenedDisk, WorkerError> {
    let path = &d.path;
    let shown = path.display();
    let content = match &held {
        Some(file) => detect(file),
        None => {
            let meta = std::fs::metadata(path).map_err(|source| WorkerError::DiskMissing {
                path: path.clone(),
                source,
            })?;
            if meta.is_dir() {
                return Err(WorkerError::DiskIsDirectory { path: path.clone() });
            }
            let file = File::open(path).map_err(|source| WorkerError::DiskUnreadable {
                path: path.clone(),
                source,
            })?;
            detect(&file)
        }
    }
    .map_err(|source| WorkerError::DiskRead {
        path: path.clone(),
        source,
    })?;
    let format = match (d.format, content) {
        // The user's word: a raw disk whose guest data happens to start with a signature.
        (Some(Format::Raw), _) => {
            if content != Content::Known(Format::Raw) {
                eprintln!(
                    "vireo: warning: disk {shown} looks like a {} image; attaching it as raw \
                     because of format=raw (the guest sees the file's bytes)",
                    content_name(content)
                );
            }
            Format::Raw
        }
        (_, Content::Foreign(name)) => {
            return Err(WorkerError::ForeignFormat {
                path: path.clone(),
                name,
            })
        }
        (Some(asked), Content::Known(found)) if asked != found => {
            return Err(WorkerError::FormatMismatch {
                path: path.clone(),
                asked,
                found,
                found_name: content_name(content),
            })
        }
        (_, Content::Known(found)) => found,
    };
    match format {
        Format::Raw => {
            let raw = match held {
                Some(file) => RawFile::from_file(file, path, d.read_only),
                None => RawFile::open(path, d.read_only),
            }
            .map_err(|source| WorkerError::Raw {
                path: path.clone(),
                source,
            })?;
            Ok(OpenedDisk {
                backend: Arc::new(raw),
                image: Image::Raw,
            })
        }
        Format::Vhd => {
            let vhd = match held {
                Some(file) => Vhd::open_file(file, path, d.read_only),
                None => Vhd::open(path, d.read_only),
            }
            .map_err(|source| WorkerError::Vhd {
                path: path.clone(),
                source,
            })?;
            let vhd = Arc::new(vhd);
            Ok(OpenedDisk {
                backend: vhd.clone(),
                image: Image::Vhd(vhd),
            })
        }
        Format::Vhdx => {
            let opts = vireo_vhdx::OpenOptions {
                read_only: d.read_only,
                ..Default::default()
            };
            let vhdx = match held {
                Some(file) => Vhdx::open_file(file, path, &opts),
                None => Vhdx::open(path, &opts),
            }
            .map_err(|source| WorkerError::Vhdx {
                path: path.clone(),
                source,
            })?;
            // The guest flushes when it needs to; write-back started under its streams only
            // competes with them (`Vhdx::set_early_writeback`).
            vhdx.set_early_writeback(false);
            let vhdx = Arc::new(vhdx);
            Ok(OpenedDisk {
                backend: vhdx.clone(),
                image: Image::Vhdx(vhdx),
            })
        }
    }
}

fn content_name(c: Content) -> &'static str {
    match c {
        Content::Known(Format::Raw) => "raw",
        Content::Known(Format::Vhd) => "VHD",
        Content::Known(Format::Vhdx) => "VHDX",
        Content::Foreign(name) => name,
    }
}

/// How many images make up a VHD's chain (1 for fixed and dynamic disks), for `disks`.
pub fn vhd_chain_depth(vhd: &Vhd) -> usize {
    let mut depth = 1;
    let mut parent = match vhd.info() {
        Ok(info) => info.parent,
        Err(_) => return depth,
    };
    // The chain is open already (and bounded by the reader); this only counts it.
    while let Some(p) = parent {
        depth += 1;
        if depth > vireo_vhdx::vhd::MAX_CHAIN_DEPTH {
            break;
        }
        parent = Vhd::open(&p, true)
            .ok()
            .filter(|v| v.disk_type() == VhdType::Differencing)
            .and_then(|v| v.info().ok())
            .and_then(|i| i.parent);
    }
    depth
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detect_bytes(bytes: &[u8]) -> Content {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, bytes).unwrap();
        detect(&File::open(&p).unwrap()).unwrap()
    }

    #[test]
    fn disk_options() {
        assert_eq!(
            parse_disk("a.img,ro"),
            Ok(DiskArg {
                path: "a.img".into(),
                read_only: true,
                format: None,
                queues: None,
            })
        );
        let d = parse_disk("a.vhd,format=vhd,ro").unwrap();
        assert_eq!((d.read_only, d.format), (true, Some(Format::Vhd)));
        assert_eq!(
            parse_disk("a.img,format=raw").unwrap().format,
            Some(Format::Raw)
        );
        assert!(!parse_disk("a.img").unwrap().read_only);
        assert!(parse_disk("a.img,bogus").is_err());
        assert!(parse_disk("a.img,format=qcow2")
            .unwrap_err()
            .contains("unknown disk format"));
        assert!(parse_disk(",ro").is_err());
        assert_eq!(parse_disk("a.img,queues=2").unwrap().queues, Some(2));
        assert_eq!(parse_disk("a.img").unwrap().queues, None);
        for bad in ["0", "17", "two", "-1", ""] {
            let e = parse_disk(&format!("a.img,queues={bad}")).unwrap_err();
            assert!(e.contains(&format!("queues={bad} ")), "{e}");
        }
    }

    #[test]
    fn signatures() {
        let mut b = vec![0u8; 4096];
        assert_eq!(detect_bytes(&b), Content::Known(Format::Raw));
        assert_eq!(detect_bytes(b"tiny"), Content::Known(Format::Raw));
        assert_eq!(detect_bytes(b""), Content::Known(Format::Raw));
        b[..8].copy_from_slice(b"vhdxfile");
        assert_eq!(detect_bytes(&b), Content::Known(Format::Vhdx));
        b[..8].copy_from_slice(b"conectix");
        assert_eq!(detect_bytes(&b), Content::Known(Format::Vhd));
        b[..8].fill(0);
        b[4096 - 512..][..8].copy_from_slice(b"conectix");
        assert_eq!(detect_bytes(&b), Content::Known(Format::Vhd));
        for (sig, name) in FOREIGN_AT_0 {
            let mut b = vec![0u8; 4096];
            b[..sig.len()].copy_from_slice(sig);
            assert_eq!(detect_bytes(&b), Content::Foreign(name), "{name}");
        }
        let mut b = vec![0u8; 4096];
        b[0x40..0x44].copy_from_slice(&VDI_SIGNATURE.1);
        assert_eq!(detect_bytes(&b), Content::Foreign("VDI"));
    }

    #[test]
    fn refuses_foreign_and_contradicted_formats() {
        let dir = tempfile::tempdir().unwrap();
        let q = dir.path().join("d.qcow2");
        let mut b = vec![0u8; 4096];
        b[..4].copy_from_slice(b"QFI\xfb");
        std::fs::write(&q, &b).unwrap();
        let arg = parse_disk(q.to_str().unwrap()).unwrap();
        let e = open(&arg).err().unwrap();
        assert!(e.is_bad_input());
        assert!(e.to_string().contains("is a qcow2 image"), "{e}");
        assert!(e.to_string().contains(q.to_str().unwrap()), "{e}");
        let arg = parse_disk(&format!("{},format=raw", q.display())).unwrap();
        assert!(matches!(open(&arg).map(|d| d.image), Ok(Image::Raw)));

        let raw = dir.path().join("d.img");
        std::fs::write(&raw, vec![0u8; 4096]).unwrap();
        let arg = parse_disk(&format!("{},format=vhdx", raw.display())).unwrap();
        let e = open(&arg).err().unwrap();
        assert!(e.is_bad_input());
        assert!(
            e.to_string().contains(
                "was given as format=vhdx but it is a raw image; drop format= or give format=raw"
            ),
            "{e}"
        );
        assert!(std::fs::read(&q).unwrap() == b && std::fs::read(&raw).unwrap() == [0; 4096]);
    }
}
