//! Shared-nothing migration of the kernel and initrd (docs/migration.md, "Shared-nothing
//! migration"): the destination worker loads them when it builds the skeleton VM, so they must
//! be on the destination before it starts.
//!
//! - Source ([`describe`]): each file's name, length and SHA-256 go in the offer.
//! - Destination, at the offer ([`plan`]): a file already here is used — the same path inside a
//!   storage root, a kernel or initrd another VM here boots from, or `dest_dir/<name>` — when
//!   its length and hash match (many VMs share one kernel); another file of that name in `dest_dir` refuses the offer; otherwise the file is
//!   asked for (`Accepted.send_files`) and arrives under a temporary name in `dest_dir`
//!   ([`Plan::claim`], listed in the arrival's manifest first), is checked against the offered
//!   hash, and only then linked to its name ([`Plan::finish`]): a partial or wrong file never
//!   carries the name another VM could pick up.
//! - A failed arrival removes the temporary files, and a file it put in place unless a VM here
//!   boots from it by then (`arriving::Manifest`, its images). The source never deletes its
//!   own: they are shared images.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use uuid::Uuid;
use vireo_api::migrate::{BootFile, BootRole};
use vireo_api::VmSpec;

use super::arriving::Manifest;
use super::peer::{FileError, Peer};
use crate::daemon::Daemon;

/// Length and lower-case hex SHA-256 of the file at `path`.
pub fn hash_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut f = std::fs::File::open(path)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
        len += n as u64;
    }
    let hex = ctx
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok((len, hex))
}

/// Source: the offer's description of the VM's kernel and initrd (blocking: it reads them).
pub fn describe(spec: &VmSpec) -> Result<Vec<BootFile>, String> {
    let mut out = vec![describe_one(BootRole::Kernel, &spec.kernel)?];
    if let Some(initrd) = &spec.initrd {
        out.push(describe_one(BootRole::Initrd, initrd)?);
    }
    Ok(out)
}

fn describe_one(role: BootRole, path: &Path) -> Result<BootFile, String> {
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("the VM's {role} {} has no usable file name", path.display()))?
        .to_string();
    let (len, sha256) =
        hash_file(path).map_err(|e| format!("reading the VM's {role} {}: {e}", path.display()))?;
    Ok(BootFile {
        role,
        file_name,
        len,
        sha256,
    })
}

/// Whether the file at `p` is `f` (length, then hash).
fn same(p: &Path, f: &BootFile) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.len() == f.len)
        && hash_file(p).is_ok_and(|(_, h)| h == f.sha256)
}

/// A boot file that travels: received into `temp`, linked to `path` once checked.
struct Wanted {
    file: BootFile,
    temp: PathBuf,
    path: PathBuf,
    received: bool,
}

/// Destination: the boot files the arriving VM still needs here.
#[derive(Default)]
pub struct Plan {
    wanted: Vec<Wanted>,
}

/// Destination, at the offer (blocking: it may hash files here): puts `spec`'s kernel and
/// initrd on the files this host will boot it from and says which must travel. `Err` is the
/// refusal's one line; nothing is created.
pub fn plan(
    d: &Daemon,
    vm_id: Uuid,
    spec: &mut VmSpec,
    dest_dir: Option<&Path>,
    files: &[BootFile],
) -> Result<Plan, String> {
    let roles = [
        (BootRole::Kernel, Some(spec.kernel.clone())),
        (BootRole::Initrd, spec.initrd.clone()),
    ];
    for f in files {
        let uses = roles.iter().any(|(r, p)| *r == f.role && p.is_some());
        if !uses || files.iter().filter(|g| g.role == f.role).count() > 1 {
            return Err(format!(
                "the offer's boot files do not match the VM's spec (the {} {:?})",
                f.role, f.file_name
            ));
        }
    }
    let dir = super::storage::confined_dest_dir(d, dest_dir)?;
    let mut plan = Plan::default();
    for (role, path) in roles {
        let Some(path) = path else { continue };
        let Some(f) = files.iter().find(|f| f.role == role) else {
            return Err(format!(
                "the offer does not describe the VM's {role} {}, which a shared-nothing \
                 migration carries",
                path.display()
            ));
        };
        if !super::storage::plain_file_name(&f.file_name) {
            return Err(format!("{role} file name {:?} refused", f.file_name));
        }
        let here = d
            .storage
            .confine_path(&role.to_string(), &path)
            .ok()
            .into_iter()
            .chain(booted_here(d))
            .find(|p| same(p, f));
        let chosen = match here {
            Some(p) => p,
            None => {
                let p = dir.join(&f.file_name);
                if plan.wanted.iter().any(|w| w.path == p) {
                    return Err(format!(
                        "the VM's kernel and initrd would both be {} here; rename one of them",
                        p.display()
                    ));
                }
                if p.exists() {
                    if !same(&p, f) {
                        return Err(format!(
                            "{} exists on this host and is not the VM's {role} (another length \
                             or SHA-256); remove or rename it, or choose another dest_dir",
                            p.display()
                        ));
                    }
                } else {
                    plan.wanted.push(Wanted {
                        temp: dir.join(format!(".{}.arriving-{}", f.file_name, vm_id.simple())),
                        path: p.clone(),
                        file: f.clone(),
                        received: false,
                    });
                }
                p
            }
        };
        match role {
            BootRole::Kernel => spec.kernel = chosen,
            BootRole::Initrd => spec.initrd = Some(chosen),
        }
    }
    let need = plan.wanted.iter().map(|w| w.file.len).sum();
    if need > 0 {
        super::storage::check_room(&dir, need, "the VM's kernel and initrd")?;
    }
    Ok(plan)
}

impl Plan {
    /// The `File` names the source is asked for (`Accepted.send_files`).
    pub fn names(&self) -> Vec<String> {
        self.wanted
            .iter()
            .map(|w| w.file.role.file_message_name().to_string())
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.wanted.is_empty()
    }

    /// After every check of the offer: each temporary file is listed in the arrival's
    /// manifest, then created empty. On `Err` the caller discards the arrival (the manifest
    /// names only what was created).
    pub fn claim(&self, d: &Daemon, vm_id: Uuid) -> Result<(), String> {
        let listed = Manifest::of(d, vm_id);
        for w in &self.wanted {
            listed.list(&w.temp)?;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&w.temp)
                .map_err(|e| {
                    listed.unlist(&w.temp);
                    format!("creating {}: {e}", w.temp.display())
                })?;
        }
        Ok(())
    }

    /// A `File` the source sent: `Ok(None)` when it is no boot file this plan asked for. A
    /// file this host cannot store fails the arrival at the end (`not_stored`), as a tree
    /// file does.
    pub async fn receive(
        &mut self,
        peer: &mut Peer,
        name: &str,
        len: u64,
        silence: Duration,
        not_stored: &mut Option<String>,
    ) -> Result<Option<()>, String> {
        let Some(w) = self
            .wanted
            .iter_mut()
            .find(|w| w.file.role.file_message_name() == name)
        else {
            return Ok(None);
        };
        if len != w.file.len || w.received {
            return Err(format!(
                "the source sent the {} again or with {len} bytes (offered: {})",
                w.file.role, w.file.len
            ));
        }
        let stored = match not_stored {
            None => peer.recv_claimed_file(&w.temp, len, silence).await,
            Some(_) => peer.recv_file(None, len, silence).await,
        };
        match stored {
            Ok(()) => w.received = true,
            Err(FileError::Store(e)) => *not_stored = Some(e),
            Err(FileError::Link(e)) => return Err(e),
        }
        Ok(Some(()))
    }

    /// Once the source said `TreeSent` (blocking): each file checked against the offer and
    /// linked to its name (listed as the arrival's image first), its temporary name removed.
    pub fn finish(&mut self, d: &Daemon, vm_id: Uuid) -> Result<(), String> {
        let listed = Manifest::of(d, vm_id);
        for w in &self.wanted {
            if !w.received {
                return Err(format!("the source did not send the VM's {}", w.file.role));
            }
            let (len, hash) = hash_file(&w.temp)
                .map_err(|e| format!("reading back {}: {e}", w.temp.display()))?;
            if len != w.file.len || hash != w.file.sha256 {
                return Err(format!(
                    "the VM's {} arrived with SHA-256 {hash} ({len} bytes) where the offer said \
                     {} ({} bytes): it changed on the source meanwhile; migrate again",
                    w.file.role, w.file.sha256, w.file.len
                ));
            }
            listed.list_image(&w.path)?;
            match std::fs::hard_link(&w.temp, &w.path) {
                Ok(()) => {}
                // Another arrival put the same image there meanwhile: it is not ours.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    listed.unlist(&w.path);
                    if !same(&w.path, &w.file) {
                        return Err(format!(
                            "{} appeared on this host meanwhile and is not the VM's {}; remove \
                             or rename it, or choose another dest_dir",
                            w.path.display(),
                            w.file.role
                        ));
                    }
                }
                Err(e) => {
                    listed.unlist(&w.path);
                    return Err(format!("linking {}: {e}", w.path.display()));
                }
            }
            if std::fs::remove_file(&w.temp).is_ok() {
                listed.unlist(&w.temp);
            }
        }
        Ok(())
    }
}

/// Every kernel and initrd the VMs of this host boot from.
fn booted_here(d: &Daemon) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = d
        .store
        .list()
        .unwrap_or_default()
        .into_iter()
        .flat_map(|vm| std::iter::once(vm.spec.kernel).chain(vm.spec.initrd))
        .collect();
    paths.sort();
    paths.dedup();
    paths
}

/// Whether a VM of this host other than `except` boots from `path` (a boot file an arrival
/// put in place is then no longer its own to remove).
pub fn in_use(d: &Daemon, path: &Path, except: Uuid) -> bool {
    d.store.list().is_ok_and(|vms| {
        vms.iter().any(|vm| {
            vm.id() != except && (vm.spec.kernel == path || vm.spec.initrd.as_deref() == Some(path))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_files_hash_is_its_sha256_in_lower_case_hex() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"abc").unwrap();
        assert_eq!(
            hash_file(&p).unwrap(),
            (
                3,
                "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad".to_string()
            )
        );
        let f = BootFile {
            role: BootRole::Kernel,
            file_name: "f".into(),
            len: 3,
            sha256: hash_file(&p).unwrap().1,
        };
        assert!(same(&p, &f));
        std::fs::write(&p, b"abd").unwrap();
        assert!(!same(&p, &f), "same length, other content");
        assert!(!same(&dir.path().join("none"), &f));
    }
}
