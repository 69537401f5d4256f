#!/usr/bin/env bash
# Runs every test of the workspace (unit, property, interop and end-to-end under /dev/kvm).
# Tests that need KVM are named `kvm_*`; they return early without /dev/kvm, and this script then
# says so loudly instead of letting them pass silently.
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
  n=$(cargo test --workspace --release --locked -q -- --list 2>/dev/null | grep -c 'kvm_.*: test' || true)
  echo "=================================================================="
  echo "SKIPPED (no /dev/kvm): $n tests"
  echo "=================================================================="
fi

cargo test --workspace --release --locked "$@"
