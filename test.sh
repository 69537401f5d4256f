#!/usr/bin/env bash
# Checks formatting, then runs every test of the workspace (unit, property, interop and
# end-to-end under /dev/kvm). Extra arguments go to `cargo test`.
#
# A test that needs something this machine lacks (a tool, root, /dev/kvm, ...) goes through
# vireo-testkit: under CI=true it fails; elsewhere it returns early and appends a line to
# $VIREO_SKIP_LOG. This script empties that file first and ends with every skip listed, then one
# line of workspace totals in cargo's own format, so nothing that did not run passes unnoticed.
set -euo pipefail
cd "$(dirname "$0")"

cargo fmt --all --check
# The probe guest is its own workspace (no_std, its own target): `--all` does not reach it.
(cd guest/probe && cargo fmt --check)
# Lints are ./lint.sh (before each commit): clippy would build the workspace a second time here.

mkdir -p target
export VIREO_SKIP_LOG="$PWD/target/skipped-tests.log"
: >"$VIREO_SKIP_LOG"
output="$PWD/target/test-output.log"
# The workspace build below makes every binary (all packages' tests run): the vhdx crate's cli
# tests use its `vireo` instead of building their own with other features.
export VIREO_WORKSPACE_BUILT=1

# Not `set -e` here: the summary must be printed whatever the tests did.
set +e
# --no-fail-fast: one failing test binary must not hide what the others (and their skips) say.
cargo test --workspace --release --locked --no-fail-fast "$@" 2>&1 | tee "$output"
status=${PIPESTATUS[0]}
set -e

skipped=$(grep -c . "$VIREO_SKIP_LOG" || true)
if [ "$skipped" -gt 0 ]; then
  echo "=================================================================="
  echo "SKIPPED ($skipped): these tests did not run, or ran only in part, on this machine:"
  sort "$VIREO_SKIP_LOG" | sed 's/^/  /'
  echo "./setup.sh installs the tools; under CI=true each is a failure (except those marked not required)."
  echo "=================================================================="
fi

# The totals of every test binary, last, in the shape of cargo's own line.
awk -v skipped="$skipped" -v status="$status" '
  /^test result: / {
    for (i = 1; i <= NF; i++) {
      if ($i ~ /^passed;?$/) p += $(i - 1)
      if ($i ~ /^failed;?$/) f += $(i - 1)
      if ($i ~ /^ignored;?$/) g += $(i - 1)
    }
    n++
  }
  END {
    if (n == 0) { print "no test ran (build failed?)"; exit }
    printf "test result: %s. %d passed; %d failed; %d ignored; 0 measured; 0 filtered out (workspace, %d skips listed above)\n",
      (status == 0 ? "ok" : "FAILED"), p, f, g, skipped
  }' "$output"
exit "$status"
