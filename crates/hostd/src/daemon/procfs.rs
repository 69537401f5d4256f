//! `/proc/<pid>/stat`: whether a pid is still the process we recorded. A pid alone can be
//! reused after the worker dies; the start time (field 22, clock ticks since boot) cannot.

use std::fs;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcStat {
    /// Field 3: `R`, `S`, `D`, `Z` (zombie), `X` (dead), ...
    pub state: char,
    /// Field 22.
    pub start_time_ticks: u64,
}

pub fn stat(pid: u32) -> Option<ProcStat> {
    parse(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The command name (field 2) may contain spaces and parentheses, so fields are counted from
/// the last `)`.
pub fn parse(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // `fields` now stands after field 3; field 22 is 19 further on.
    let start_time_ticks = fields.nth(18)?.parse().ok()?;
    Some(ProcStat {
        state,
        start_time_ticks,
    })
}

/// `pid` exists, is not a zombie, and started at `start_time_ticks`.
pub fn alive(pid: u32, start_time_ticks: u64) -> bool {
    matches!(stat(pid), Some(s) if s.start_time_ticks == start_time_ticks && !matches!(s.state, 'Z' | 'X'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_with_spaces_and_parens() {
        let line =
            "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(
            parse(line),
            Some(ProcStat {
                state: 'S',
                start_time_ticks: 987654
            })
        );
        assert_eq!(parse("1 (x) S 1"), None);
        let me = stat(std::process::id()).unwrap();
        assert!(alive(std::process::id(), me.start_time_ticks));
        assert!(!alive(std::process::id(), me.start_time_ticks + 1));
    }
}
