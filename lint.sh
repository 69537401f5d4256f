#!/usr/bin/env bash
# Formatting and lints, to run before each commit: `cargo fmt` and `cargo clippy -D warnings` over
# the workspace and the probe guest. Not part of ./test.sh: clippy builds the whole workspace a
# second time (check mode), about 7 minutes of a clean CI run that must build once.
set -euo pipefail
cd "$(dirname "$0")"

cargo fmt --all --check
# The probe guest is its own workspace (no_std, its own target): `--all` does not reach it.
(cd guest/probe && cargo fmt --check)
cargo clippy --workspace --all-targets --release --locked -- -D warnings
(cd guest/probe && cargo clippy --release --locked -- -D warnings)
