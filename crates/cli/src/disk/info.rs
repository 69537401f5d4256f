//! `vireo disk info`: what a disk is, in the order qemu-img users read it: format, virtual
//! size, file size, block size and parent first, then the details. Text and JSON keep that order.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use serde_json::{json, Map, Value};
use vireo_vhdx::convert::{AnyDisk, Format};
use vireo_vhdx::vhd::Vhd;
use vireo_vhdx::{OpenOptions, Vhdx, VhdxError};

use super::errors;
use super::size::human;
use super::{OutputArg, Result};
use crate::exit::CliError;

#[derive(Args)]
pub struct InfoArgs {
    /// The disk (VHDX, VHD or raw; recognised by content).
    pub path: PathBuf,
    /// text (default) or json.
    #[arg(long, value_enum, default_value = "text")]
    pub output: OutputArg,
}

/// Keys shown first, in this order; the rest follow as the format reports them.
const FIRST: [&str; 5] = [
    "format",
    "virtual_size",
    "file_size",
    "block_size",
    "parent",
];

pub fn run(a: InfoArgs) -> Result<ExitCode> {
    let value = match errors::detect(&a.path)? {
        Format::Vhdx => {
            let disk = open_vhdx_for_looking(&a.path)?;
            let mut v = serde_json::to_value(disk.info())?;
            if let Some(obj) = v.as_object_mut() {
                obj.insert("format".into(), json!("vhdx"));
            }
            v
        }
        Format::Vhd => {
            let disk = Vhd::open(&a.path, true).map_err(|e| errors::vhd(&a.path, e))?;
            let i = disk.info().map_err(|e| errors::vhd(&a.path, e))?;
            json!({
                "format": "vhd",
                "path": a.path,
                "disk_type": format!("{:?}", i.disk_type).to_lowercase(),
                "virtual_size": i.virtual_size,
                "file_size": i.file_size,
                "block_size": i.block_size,
                "allocated_blocks": i.allocated_blocks,
                "total_blocks": i.total_blocks,
                "creator": i.creator_app,
                "unique_id": i.unique_id,
                "parent": i.parent,
            })
        }
        Format::Raw => {
            let disk = AnyDisk::open_as(&a.path, Format::Raw, true)
                .map_err(|e| errors::convert(&a.path, e))?;
            let allocated: u64 = disk
                .allocated_ranges()
                .map_err(|e| errors::convert(&a.path, e))?
                .iter()
                .map(|(_, len)| len)
                .sum();
            let file_size = std::fs::metadata(&a.path)
                .map_err(|e| CliError::failed(format!("{}: {e}", a.path.display())))?
                .len();
            json!({
                "format": "raw",
                "virtual_size": disk.backend().size(),
                "file_size": file_size,
                "path": a.path,
                "allocated_bytes": allocated,
            })
        }
    };
    let value = in_order(value);
    match a.output {
        OutputArg::Json => println!("{}", serde_json::to_string_pretty(&value)?),
        OutputArg::Text => print_text(&value, ""),
    }
    Ok(ExitCode::SUCCESS)
}

/// Opens read-only; a disk (or a parent) that a running VM holds is shown without a lock, with
/// a note naming the file that is locked.
pub(super) fn open_vhdx_for_looking(
    path: &Path,
) -> std::result::Result<Vhdx, crate::exit::CliError> {
    let ro = OpenOptions::read_only();
    match Vhdx::open(path, &ro) {
        Err(VhdxError::Locked { path: locked, .. }) => {
            let whose = if same_file(&locked, path) {
                format!("{} is in use by another process", path.display())
            } else {
                format!(
                    "{} (in the parent chain of {}) is in use by another process",
                    locked.display(),
                    path.display()
                )
            };
            eprintln!("note: {whose}; shown without a lock, so the figures may be mid-update");
            Vhdx::open(
                path,
                &OpenOptions {
                    no_lock: true,
                    ..ro
                },
            )
            .map_err(|e| errors::vhdx(path, e))
        }
        other => other.map_err(|e| errors::vhdx(path, e)),
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// `v`'s keys with [`FIRST`] at the front.
fn in_order(v: Value) -> Value {
    let Value::Object(mut rest) = v else {
        return v;
    };
    let mut out = Map::new();
    for key in FIRST {
        if let Some(val) = rest.shift_remove(key) {
            out.insert(key.into(), val);
        }
    }
    out.extend(rest);
    Value::Object(out)
}

/// Flat `key: value` lines; sizes in bytes also shown human-readable.
pub(super) fn print_text(v: &Value, indent: &str) {
    let Some(obj) = v.as_object() else {
        println!("{indent}{v}");
        return;
    };
    for (k, val) in obj {
        match val {
            Value::Object(_) => {
                println!("{indent}{k}:");
                print_text(val, &format!("{indent}  "));
            }
            Value::Array(items) if items.is_empty() => println!("{indent}{k}: none"),
            Value::Array(items) => {
                println!("{indent}{k}:");
                for item in items {
                    match item {
                        Value::Object(_) => print_text(item, &format!("{indent}  - ")),
                        other => println!("{indent}  - {}", plain(other)),
                    }
                }
            }
            Value::Number(n) if k.contains("size") || k.ends_with("bytes") => {
                let n = n.as_u64().unwrap_or(0);
                println!("{indent}{k}: {n} ({})", human(n));
            }
            other => println!("{indent}{k}: {}", plain(other)),
        }
    }
}

fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}
