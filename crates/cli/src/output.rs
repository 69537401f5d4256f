//! `--output`: one vocabulary for every command that prints something a script may read.
//! `text` is for people (tables, aligned key/value lines); `json` is for programs and stable.

use clap::ValueEnum;

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq, Debug, Default)]
pub enum OutputFormat {
    /// For people: tables and aligned lines. `table` is accepted as another name for it.
    #[default]
    #[value(alias = "table")]
    Text,
    /// For programs: one JSON document on stdout.
    Json,
}
