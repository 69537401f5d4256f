#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine for building and testing Vireo, then builds everything.
# Idempotent: packages already present are skipped, the build is incremental.
set -euo pipefail
cd "$(dirname "$0")"

# qemu-system-x86: the peer in boot benchmarks; qemu-utils: qemu-img/qemu-io for VHDX interop;
# iproute2/iputils-ping/iperf3/tcpdump/ethtool: namespace network tests and switch benchmarks.
PACKAGES=(qemu-system-x86 qemu-utils iproute2 iputils-ping iperf3 tcpdump ethtool)
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# The machine image ships qemu-utils 10 from bookworm-backports; qemu-system-x86 must come from the
# same suite or apt refuses the pair. Backports have a low default priority, so adding the suite
# upgrades nothing by itself.
BACKPORTS=/etc/apt/sources.list.d/vireo-backports.list
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo 'deb http://deb.debian.org/debian bookworm-backports main' | $SUDO tee "$BACKPORTS" >/dev/null
fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
    -t bookworm-backports "${missing[@]}"
fi

echo "setup: building the workspace (release and test profiles)"
cargo build --release --workspace --locked
cargo test --workspace --release --no-run --locked -q
echo "setup: done"
