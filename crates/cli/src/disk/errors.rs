//! Errors at the `vireo disk` edge: every one is a single line that names the file it is about
//! and says what to do, and carries its exit status (`crate::exit`): 2 for input the command
//! cannot use (nothing was changed), 1 for an operation that failed, 130 for Ctrl-C.
//!
//! Input files are checked here before a library sees them, so "No such file or directory" or
//! "Is a directory" never reaches the user without the path.

use std::io;
use std::path::Path;

use vireo_vhdx::convert::{ConvertError, Format};
use vireo_vhdx::newfile::{NewFile, NewFileError};
use vireo_vhdx::vhd::VhdError;
use vireo_vhdx::VhdxError;

use crate::exit::CliError;

/// An existing image the command reads: a regular file or a block device, readable.
pub fn existing(path: &Path) -> Result<(), CliError> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => CliError::bad_input(format!(
            "{shown} does not exist; check the path (or create it with `vireo disk create`)"
        )),
        io::ErrorKind::PermissionDenied => CliError::bad_input(format!(
            "cannot read {shown}: permission denied; run as a user who may read it"
        )),
        _ => CliError::bad_input(format!("cannot read {shown}: {e}")),
    })?;
    if meta.is_dir() {
        return Err(CliError::bad_input(format!(
            "{shown} is a directory, not a disk image; give the image file inside it"
        )));
    }
    std::fs::File::open(path).map_err(|e| {
        CliError::bad_input(format!("cannot open {shown}: {e}; check its permissions"))
    })?;
    Ok(())
}

/// The format of an existing image, by content (after [`existing`]).
pub fn detect(path: &Path) -> Result<Format, CliError> {
    existing(path)?;
    Format::detect(path).map_err(|e| convert(path, e))
}

/// A path a new file will be created at: it must not exist and its directory must.
pub fn new_file(path: &Path) -> Result<(), CliError> {
    NewFile::begin(path).map(drop).map_err(new_file_error)
}

fn new_file_error(e: NewFileError) -> CliError {
    match e {
        NewFileError::Io { .. } => CliError::failed(e.to_string()),
        _ => CliError::bad_input(e.to_string()),
    }
}

/// `message`, prefixed with `path` unless it already names it.
fn about(path: &Path, message: String) -> String {
    let shown = path.display().to_string();
    if message.contains(&shown) {
        message
    } else {
        format!("{shown}: {message}")
    }
}

/// A VHDX error about `path`.
pub fn vhdx(path: &Path, e: VhdxError) -> CliError {
    match e {
        VhdxError::Cancelled => CliError::interrupted(about(path, e.to_string())),
        VhdxError::NewFile(e) => new_file_error(e),
        VhdxError::BadVirtualSize(_)
        | VhdxError::BadBlockSize(_)
        | VhdxError::BadSectorSize(_)
        | VhdxError::MissingParentOption
        | VhdxError::NotDifferencing(_)
        | VhdxError::Unsupported(_) => CliError::bad_input(about(path, e.to_string())),
        VhdxError::Io(io) => CliError::failed(format!(
            "{}: I/O error: {io}; check the file and the disk it is on",
            path.display()
        )),
        other => CliError::failed(about(path, other.to_string())),
    }
}

/// A VHD error about `path`.
pub fn vhd(path: &Path, e: VhdError) -> CliError {
    match e {
        VhdError::NewFile(e) => new_file_error(e),
        VhdError::BadSize(_) | VhdError::BlockSize(_) | VhdError::Unsupported(_) => {
            CliError::bad_input(about(path, e.to_string()))
        }
        VhdError::Io(io) => CliError::failed(format!(
            "{}: I/O error: {io}; check the file and the disk it is on",
            path.display()
        )),
        other => CliError::failed(about(path, other.to_string())),
    }
}

/// A conversion (or open-any-format) error about `path`.
pub fn convert(path: &Path, e: ConvertError) -> CliError {
    match e {
        ConvertError::Cancelled => CliError::interrupted(e.to_string()),
        ConvertError::NewFile(e) => new_file_error(e),
        ConvertError::SectorUnsupported { .. } | ConvertError::TooLarge { .. } => {
            CliError::bad_input(e.to_string())
        }
        ConvertError::Open(p, io) if io.kind() == io::ErrorKind::NotFound => {
            CliError::bad_input(format!("{} does not exist; check the path", p.display()))
        }
        ConvertError::Vhdx(e) => vhdx(path, e),
        ConvertError::Vhd(e) => vhd(path, e),
        ConvertError::Io(io) => CliError::failed(format!(
            "{}: I/O error: {io}; check the files and the disks they are on",
            path.display()
        )),
        other => CliError::failed(about(path, other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_name_the_file() {
        let e = vhdx(Path::new("a.vhdx"), VhdxError::Io(io::Error::other("boom")));
        assert!(e.message.starts_with("a.vhdx: I/O error"), "{e}");
        assert_eq!(e.status, crate::exit::FAILED);
        let e = vhdx(Path::new("a.vhdx"), VhdxError::Cancelled);
        assert_eq!(e.status, crate::exit::INTERRUPTED);
    }
}
