#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine for building and testing Vireo, then builds everything.
# Idempotent: packages already present are skipped, the backports suite is added once, the build
# is incremental.
set -euo pipefail
cd "$(dirname "$0")"

# Every tool a test requires (vireo-testkit's `Need`s) and what provides it:
# qemu-utils: qemu-img/qemu-io (VHDX/VHD interop); qemu-system-x86: QEMU, the peer in the probe
# and boot tests; iproute2: ip/tc and network namespaces; iputils-ping, iperf3, tcpdump, ethtool:
# namespace network tests and switch benchmarks; nftables: the Linux side of the overlay
# benchmark's policies case; util-linux: setpriv and unshare (the /dev/kvm
# permission test); procps: sysctl; libclang-dev: bindgen in userfaultfd-sys, which the switch's
# vhost-user backend builds for post-copy (its own userfaultfd on guest RAM).
PACKAGES=(qemu-system-x86 qemu-utils iproute2 iputils-ping iperf3 tcpdump ethtool util-linux procps python3-scapy nftables libclang-dev)
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# shellcheck source=/dev/null
. /etc/os-release
CODENAME=${VERSION_CODENAME:-bookworm}
BACKPORTS_SUITE="$CODENAME-backports"

# Prints "OPTIONS<TAB>URI<TAB>SUITE" for every enabled `deb` source under apt directory $1, from
# both formats: one-line (sources.list, *.list: `deb [opts] URI suite components`) and deb822
# (*.sources stanzas with Types/URIs/Suites/Enabled/Signed-By).
apt_sources() {
  local f
  for f in "$1"/sources.list "$1"/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    awk '$1 == "deb" {
      opts = ""; i = 2
      if ($2 ~ /^\[/) { while ($i !~ /\]$/) { opts = opts $i " "; i++ } opts = opts $i; i++ }
      gsub(/^\[ *| *\]$/, "", opts)
      printf "%s\t%s\t%s\n", opts, $i, $(i + 1)
    }' "$f"
  done
  for f in "$1"/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk '
      function flush() {
        if (types ~ /(^| )deb( |$)/ && enabled != "no")
          for (u = 1; u <= nu; u++) for (s = 1; s <= ns; s++)
            printf "%s\t%s\t%s\n", (signed == "" ? "" : "signed-by=" signed), uris[u], suites[s]
        types = ""; enabled = ""; signed = ""; nu = 0; ns = 0
      }
      /^[ \t]*#/ { next }
      /^[ \t]*$/ { flush(); next }
      /^[ \t]/ { next }  # continuation of a multi-line field (an inline Signed-By key)
      {
        key = tolower($1); sub(/:$/, "", key); $1 = ""; sub(/^ +/, "")
        if (key == "types") types = $0
        else if (key == "enabled") enabled = tolower($0)
        else if (key == "signed-by") signed = $0  # empty when the key is inline: not reused
        else if (key == "uris") nu = split($0, uris, " ")
        else if (key == "suites") ns = split($0, suites, " ")
      }
      END { flush() }' "$f"
  done
}

# The Debian mirror this machine already uses for its release suite; backports come from there.
# The image ships qemu-utils 10 from backports; qemu-system-x86 must come from the same suite or
# apt refuses the pair. Backports have a low default priority, so adding the suite upgrades
# nothing by itself.
BACKPORTS=/etc/apt/sources.list.d/vireo-backports.list
sources=$(apt_sources /etc/apt)
if ! awk -F'\t' -v s="$BACKPORTS_SUITE" '$3 == s { found = 1 } END { exit !found }' <<<"$sources"; then
  mirror=$(awk -F'\t' -v s="$CODENAME" '$3 == s { print; exit }' <<<"$sources")
  if [ -z "$mirror" ]; then
    echo "setup: no apt source carries Debian '$CODENAME' (looked in /etc/apt/sources.list and /etc/apt/sources.list.d/*.list, *.sources); add your Debian mirror, then rerun" >&2
    exit 1
  fi
  opts=$(cut -f1 <<<"$mirror")
  uri=$(cut -f2 <<<"$mirror")
  echo "setup: adding $BACKPORTS_SUITE from $uri ($BACKPORTS)"
  echo "deb ${opts:+[$opts] }$uri $BACKPORTS_SUITE main" | $SUDO tee "$BACKPORTS" >/dev/null
  $SUDO apt-get update -q
fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
    -t "$BACKPORTS_SUITE" "${missing[@]}"
fi

# Guest RAM comes from the host's hugetlb pool when it has room (VIREO_GUEST_RAM=auto, the
# default): pool pages stay backed between VMs, so a VM's first touch of its RAM (a migration's
# destination, a restore, a boot) does not pay the host to clear and fault in fresh memory.
# 1 GiB is reserved, raised only if lower; VMs beyond it fall back to huge tmpfs by themselves.
HUGETLB_PAGES=512
NR_HUGEPAGES=/proc/sys/vm/nr_hugepages
have=$(cat "$NR_HUGEPAGES" 2>/dev/null || echo 0)
if [ "$have" -ge "$HUGETLB_PAGES" ]; then
  echo "setup: hugetlb pool has $have 2 MiB pages (wanted $HUGETLB_PAGES)"
elif echo "$HUGETLB_PAGES" | $SUDO tee "$NR_HUGEPAGES" >/dev/null 2>&1; then
  got=$(cat "$NR_HUGEPAGES")
  echo "setup: hugetlb pool raised from $have to $got 2 MiB pages (asked $HUGETLB_PAGES; fewer means the host had no more free memory)"
else
  echo "setup: could not write $NR_HUGEPAGES (a container?); guest RAM stays on huge tmpfs, and the hugetlb tests are skipped" >&2
fi

echo "setup: building the workspace (release and test profiles)"
cargo build --release --workspace --locked
cargo test --workspace --release --no-run --locked -q
echo "setup: done"
