//! Finding a differencing VHD's parent from its parent locators (W2ru relative, W2ku absolute,
//! MacX URL) and, as a last resort, the parent's file name in the header.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::format::DynamicHeader;
use super::VhdError;

/// Locator payloads are paths; anything larger than this is corruption, not a path.
const MAX_LOCATOR_LEN: u32 = 64 * 1024;

/// Candidate parent paths in the order they should be tried.
pub fn parent_candidates(
    file: &File,
    file_len: u64,
    child: &Path,
    header: &DynamicHeader,
) -> Result<Vec<PathBuf>, VhdError> {
    let dir = child.parent().unwrap_or(Path::new("."));
    let mut relative = Vec::new();
    let mut absolute = Vec::new();
    for loc in &header.locators {
        let code = &loc.platform_code;
        if code == &[0; 4] || loc.data_length == 0 {
            continue;
        }
        if loc.data_length > MAX_LOCATOR_LEN
            || loc
                .data_offset
                .checked_add(loc.data_length as u64)
                .is_none_or(|end| end > file_len)
        {
            return Err(VhdError::Locator(
                child.to_path_buf(),
                format!(
                    "entry {:?} at {} length {} is outside the file",
                    String::from_utf8_lossy(code),
                    loc.data_offset,
                    loc.data_length
                ),
            ));
        }
        let mut raw = vec![0u8; loc.data_length as usize];
        file.read_exact_at(&mut raw, loc.data_offset)?;
        match code {
            b"W2ru" | b"W2ku" | b"Wi2r" | b"Wi2k" => {
                let units: Vec<u16> = raw
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .take_while(|&u| u != 0)
                    .collect();
                let text = String::from_utf16_lossy(&units);
                let path = windows_to_unix(&text);
                if code == b"W2ru" || code == b"Wi2r" {
                    relative.push(dir.join(path));
                } else {
                    absolute.push(path);
                }
            }
            b"MacX" => {
                let text = String::from_utf8_lossy(&raw);
                let text = text.trim_end_matches('\0');
                let path = text.strip_prefix("file://").unwrap_or(text);
                absolute.push(PathBuf::from(path));
            }
            _ => {}
        }
    }
    let mut all = relative;
    all.extend(absolute);
    if !header.parent_name.is_empty() {
        let name = header.parent_name.rsplit(['\\', '/']).next().unwrap_or("");
        if !name.is_empty() {
            all.push(dir.join(name));
        }
    }
    Ok(all)
}

/// `.\dir\base.vhd` → `./dir/base.vhd`; `C:\x\base.vhd` → `/x/base.vhd` (the drive letter has
/// no meaning here, but an image copied with its tree often keeps the rest of the path).
fn windows_to_unix(text: &str) -> PathBuf {
    let mut s = text.replace('\\', "/");
    if s.len() >= 2 && s.as_bytes()[1] == b':' {
        s = s[2..].to_string();
    }
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_paths_become_unix_paths() {
        assert_eq!(windows_to_unix(".\\a\\b.vhd"), PathBuf::from("./a/b.vhd"));
        assert_eq!(
            windows_to_unix("C:\\vms\\b.vhd"),
            PathBuf::from("/vms/b.vhd")
        );
    }
}
