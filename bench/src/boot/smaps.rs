//! Memory accounting of a VMM process from `/proc/<pid>/smaps`: the resident set split into the
//! guest's RAM and everything else (the VMM's own overhead), with the overhead broken down by
//! kind of mapping so a regression can be traced to heap, stacks or mapped code.
//!
//! Both VMMs are measured with the same formula: overhead = Σ Rss of all mappings − Σ Rss of the
//! mappings that hold guest RAM. Only the rule that recognises the guest RAM mapping differs:
//! Vireo maps a file named `vireo-guest-ram` (a memfd, shown as `/memfd:vireo-guest-ram
//! (deleted)`, or on a private huge-page tmpfs, shown as `/vireo-guest-ram (deleted)`),
//! QEMU an anonymous private mapping exactly the size of `-m`.

use std::fmt;

/// One mapping of the process, with the smaps fields the accounting needs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    /// Path or pseudo-name (`[heap]`, `[stack]`, `/memfd:...`); empty for anonymous memory.
    pub path: String,
    pub size_kib: u64,
    pub rss_kib: u64,
    /// Private_Clean + Private_Dirty: pages only this process maps (its USS share).
    pub private_kib: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub struct SmapsError(String);

impl fmt::Display for SmapsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "smaps: {}", self.0)
    }
}

impl std::error::Error for SmapsError {}

/// How to recognise the guest RAM mapping(s) of a VMM.
#[derive(Clone, Debug)]
pub enum GuestRamRule {
    /// Every mapping whose path ends with this: Vireo's RAM file is a memfd
    /// (`/memfd:vireo-guest-ram (deleted)`) or on a private tmpfs (`/vireo-guest-ram
    /// (deleted)`), and both end the same.
    PathSuffix(String),
    /// Anonymous mappings (no path) of exactly this many KiB.
    AnonymousOfSize(u64),
}

/// The resident set of one process at one moment, in KiB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryUse {
    pub total_rss: u64,
    pub guest_ram_rss: u64,
    /// Anonymous memory other than guest RAM: heap, malloc arenas, thread stacks, firmware
    /// copies, KVM's shared run pages...
    pub anon: u64,
    /// File-backed mappings: the VMM binary and its shared libraries.
    pub file: u64,
    /// Kernel pseudo-mappings (`[vdso]`, `[vvar]`, ...).
    pub other: u64,
}

impl MemoryUse {
    /// RSS minus guest RAM: what the VMM itself costs.
    pub fn overhead(&self) -> u64 {
        self.total_rss - self.guest_ram_rss
    }
}

/// Parses the text of `/proc/<pid>/smaps`.
pub fn parse(text: &str) -> Result<Vec<Mapping>, SmapsError> {
    let mut maps: Vec<Mapping> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line_no = n + 1;
        let Some(first) = line.split_whitespace().next() else {
            continue;
        };
        if let Some(key) = first.strip_suffix(':') {
            let Some(current) = maps.last_mut() else {
                return Err(SmapsError(format!(
                    "line {line_no}: field before any mapping"
                )));
            };
            let field = || -> Result<u64, SmapsError> {
                let mut words = line.split_whitespace().skip(1);
                let value = words.next().and_then(|v| v.parse().ok());
                match (value, words.next()) {
                    (Some(v), Some("kB")) => Ok(v),
                    _ => Err(SmapsError(format!(
                        "line {line_no}: expected '{key}: <n> kB', got {line:?}"
                    ))),
                }
            };
            match key {
                "Size" => current.size_kib = field()?,
                "Rss" => current.rss_kib = field()?,
                "Private_Clean" | "Private_Dirty" => current.private_kib += field()?,
                _ => {}
            }
        } else {
            maps.push(parse_header(line).ok_or_else(|| {
                SmapsError(format!("line {line_no}: not a mapping header: {line:?}"))
            })?);
        }
    }
    Ok(maps)
}

/// `start-end perms offset dev inode [path]`; the path may contain spaces.
fn parse_header(line: &str) -> Option<Mapping> {
    let mut rest = line;
    let mut tokens = Vec::with_capacity(5);
    for _ in 0..5 {
        rest = rest.trim_start();
        let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
        if end == 0 {
            return None;
        }
        tokens.push(&rest[..end]);
        rest = &rest[end..];
    }
    let (start, end) = tokens[0].split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    if end < start || tokens[1].len() != 4 {
        return None;
    }
    Some(Mapping {
        start,
        end,
        perms: tokens[1].to_string(),
        path: rest.trim().to_string(),
        ..Mapping::default()
    })
}

fn is_guest_ram(m: &Mapping, rule: &GuestRamRule) -> bool {
    match rule {
        GuestRamRule::PathSuffix(suffix) => m.path.ends_with(suffix.as_str()),
        GuestRamRule::AnonymousOfSize(kib) => m.path.is_empty() && m.size_kib == *kib,
    }
}

fn is_anonymous(path: &str) -> bool {
    // `[anon:name]` is a named anonymous mapping (PR_SET_VMA_ANON_NAME).
    path.is_empty() || path == "[heap]" || path.starts_with("[stack") || path.starts_with("[anon")
}

/// Splits the process's RSS into guest RAM and the VMM's own memory. Fails if no mapping matches
/// `rule`, since the overhead would then silently include the guest's RAM.
pub fn account(maps: &[Mapping], rule: &GuestRamRule) -> Result<MemoryUse, SmapsError> {
    let mut used = MemoryUse::default();
    let mut guest_maps = 0;
    for m in maps {
        used.total_rss += m.rss_kib;
        if is_guest_ram(m, rule) {
            guest_maps += 1;
            used.guest_ram_rss += m.rss_kib;
        } else if is_anonymous(&m.path) {
            used.anon += m.rss_kib;
        } else if m.path.starts_with('/') {
            used.file += m.rss_kib;
        } else {
            used.other += m.rss_kib;
        }
    }
    if guest_maps == 0 {
        return Err(SmapsError(format!(
            "no guest RAM mapping matches {rule:?} among {} mappings",
            maps.len()
        )));
    }
    Ok(used)
}

/// Unique set size outside guest RAM: the memory that would be freed if the process exited,
/// not counting its guest's RAM (code pages shared with other processes do not count).
pub fn private_overhead_kib(maps: &[Mapping], rule: &GuestRamRule) -> Result<u64, SmapsError> {
    if !maps.iter().any(|m| is_guest_ram(m, rule)) {
        return Err(SmapsError(format!("no guest RAM mapping matches {rule:?}")));
    }
    Ok(maps
        .iter()
        .filter(|m| !is_guest_ram(m, rule))
        .map(|m| m.private_kib)
        .sum())
}

/// The `n` mappings with the largest RSS outside guest RAM (for the overhead breakdown).
pub fn largest_overhead<'a>(
    maps: &'a [Mapping],
    rule: &GuestRamRule,
    n: usize,
) -> Vec<&'a Mapping> {
    let mut rest: Vec<&Mapping> = maps.iter().filter(|m| !is_guest_ram(m, rule)).collect();
    rest.sort_by_key(|m| std::cmp::Reverse(m.rss_kib));
    rest.truncate(n);
    rest
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Trimmed from a real `vireo run` process: binary, heap, a thread stack, the guest memfd
    /// (path with a space), vdso.
    const VIREO_SMAPS: &str = "\
55d0c0a00000-55d0c0b00000 r-xp 00010000 fe:01 123456                     /work/target/release/vireo
Size:               1024 kB
KernelPageSize:        4 kB
Rss:                 700 kB
Pss:                 700 kB
VmFlags: rd ex mr mw me
55d0c1000000-55d0c1021000 rw-p 00000000 00:00 0                          [heap]
Size:                132 kB
Rss:                  40 kB
VmFlags: rd wr mr mw me ac
7f0000000000-7f0010000000 rw-s 00000000 00:01 2048                       /memfd:vireo-guest-ram (deleted)
Size:             262144 kB
Rss:                1208 kB
RssShmem:           1208 kB
VmFlags: rd wr sh mr mw me ms
7f0010000000-7f0010200000 rw-p 00000000 00:00 0 
Size:               2048 kB
Rss:                  16 kB
VmFlags: rd wr mr mw me ac
7ffd1234a000-7ffd1236b000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
Rss:                  24 kB
7ffd123f0000-7ffd123f2000 r-xp 00000000 00:00 0                          [vdso]
Size:                  8 kB
Rss:                   4 kB
";

    #[test]
    fn parses_headers_and_fields() {
        let maps = parse(VIREO_SMAPS).unwrap();
        assert_eq!(maps.len(), 6);
        assert_eq!(maps[0].start, 0x55d0c0a00000);
        assert_eq!(maps[0].end, 0x55d0c0b00000);
        assert_eq!(maps[0].perms, "r-xp");
        assert_eq!(maps[0].path, "/work/target/release/vireo");
        assert_eq!((maps[0].size_kib, maps[0].rss_kib), (1024, 700));
        assert_eq!(maps[2].path, "/memfd:vireo-guest-ram (deleted)");
        assert_eq!(maps[3].path, "");
        assert_eq!((maps[3].size_kib, maps[3].rss_kib), (2048, 16));
    }

    #[test]
    fn vireo_overhead_excludes_the_memfd() {
        let maps = parse(VIREO_SMAPS).unwrap();
        let rule = GuestRamRule::PathSuffix("vireo-guest-ram (deleted)".into());
        let used = account(&maps, &rule).unwrap();
        assert_eq!(
            used,
            MemoryUse {
                total_rss: 700 + 40 + 1208 + 16 + 24 + 4,
                guest_ram_rss: 1208,
                anon: 40 + 16 + 24,
                file: 700,
                other: 4,
            }
        );
        assert_eq!(used.overhead(), 784);
        assert_eq!(
            private_overhead_kib(&maps, &rule).unwrap(),
            0,
            "no Private_* fields"
        );
        let top = largest_overhead(&maps, &rule, 2);
        assert_eq!(top[0].rss_kib, 700);
        assert_eq!(top[1].rss_kib, 40);
    }

    #[test]
    fn vireo_ram_on_the_huge_page_tmpfs_is_guest_ram_too() {
        let text = VIREO_SMAPS.replace("/memfd:vireo-guest-ram", "/vireo-guest-ram");
        let rule = GuestRamRule::PathSuffix("vireo-guest-ram (deleted)".into());
        let used = account(&parse(&text).unwrap(), &rule).unwrap();
        assert_eq!(used.guest_ram_rss, 1208);
        assert_eq!(used.overhead(), 784);
    }

    #[test]
    fn qemu_guest_ram_is_the_anonymous_mapping_of_the_guest_size() {
        let text = "\
7f1000000000-7f1010000000 rw-p 00000000 00:00 0 
Size:             262144 kB
Rss:                2048 kB
AnonHugePages:      2048 kB
7f1010000000-7f1010200000 rw-p 00000000 00:00 0 
Size:               2048 kB
Rss:                 300 kB
7f1020000000-7f1020010000 rw-p 00000000 00:00 0 
Size:                 64 kB
Rss:                  64 kB
";
        let maps = parse(text).unwrap();
        let used = account(&maps, &GuestRamRule::AnonymousOfSize(262144)).unwrap();
        assert_eq!(used.guest_ram_rss, 2048);
        assert_eq!(used.overhead(), 364);
        assert_eq!(used.anon, 364);
        // A wrong guest size must not silently count guest RAM as overhead.
        assert!(account(&maps, &GuestRamRule::AnonymousOfSize(131072)).is_err());
    }

    #[test]
    fn private_overhead_sums_private_pages_outside_guest_ram() {
        let text = "\
1000-2000 r-xp 00000000 fe:01 1 /bin/vireo-vm
Size:                  4 kB
Rss:                   4 kB
Private_Clean:         0 kB
Private_Dirty:         0 kB
2000-3000 rw-p 00000000 00:00 0 [heap]
Size:                  4 kB
Rss:                   4 kB
Private_Clean:         1 kB
Private_Dirty:         3 kB
3000-9000 rw-s 00000000 00:01 2 /memfd:vireo-guest-ram (deleted)
Size:                 24 kB
Rss:                  24 kB
Private_Dirty:        24 kB
";
        let maps = parse(text).unwrap();
        let rule = GuestRamRule::PathSuffix("vireo-guest-ram (deleted)".into());
        assert_eq!(private_overhead_kib(&maps, &rule).unwrap(), 4);
        let other = GuestRamRule::PathSuffix("other (deleted)".into());
        assert!(private_overhead_kib(&maps, &other).is_err());
    }

    #[test]
    fn malformed_text_is_an_error_not_a_panic() {
        assert!(parse("Rss: 4 kB\n").is_err());
        assert!(parse("zzzz-1000 rw-p 0 0 0\n").is_err());
        assert!(parse("2000-1000 rw-p 00000000 00:00 0\n").is_err());
        assert!(parse("1000-2000 rw-p 00000000 00:00 0\nRss: many kB\n").is_err());
        assert!(parse("1000-2000 rw-p 00000000 00:00 0\nRss: 4\n").is_err());
        assert!(parse("1000-2000 rw-p\n").is_err());
        assert_eq!(parse("").unwrap(), Vec::new());
    }
}
