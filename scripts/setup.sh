#!/usr/bin/env bash
# Installs everything Vigil needs on Debian 12 (bookworm). Idempotent: safe to run again.
#
#  * libvirt 11 + QEMU 10 from bookworm-backports (bookworm's own qemu-system 7.2 conflicts
#    with the backports qemu-utils that many machines already carry);
#  * build tools and the C libraries the Rust crates link against;
#  * a Rust toolchain through rustup when cargo is missing.
set -euo pipefail

log() { printf '\033[1;34m[setup]\033[0m %s\n' "$*"; }

if [[ $EUID -ne 0 ]]; then
  exec sudo -E "$0" "$@"
fi

export DEBIAN_FRONTEND=noninteractive

BACKPORTS=/etc/apt/sources.list.d/vigil-bookworm-backports.sources
if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  log "adding the bookworm-backports suite ($BACKPORTS)"
  # Reuse the mirror of the existing Debian source so the machine's proxy/mirror setup holds.
  uri=$(grep -rhs '^URIs:.*debian/\?$' /etc/apt/sources.list.d/*.sources | head -n1 | awk '{print $2}')
  if [[ -z "${uri}" ]]; then
    uri=$(grep -hs '^deb .*debian/\? bookworm ' /etc/apt/sources.list | head -n1 | awk '{print $2}')
  fi
  uri=${uri:-http://deb.debian.org/debian}
  cat >"$BACKPORTS" <<SRC
Types: deb
URIs: ${uri}
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi

stamp=/var/lib/vigil-setup.stamp
# tcpdump: to watch the VIP's gratuitous ARPs by hand (the VIP tests capture with their own AF_PACKET socket).
# systemd, mmdebstrap, rpm: the packaging tests (tests/packaging: systemd-analyze on the units,
# the .debs installed into a clean bookworm root, the .rpms read back); lintian, rpmlint: the
# packages linted (tests/packaging).
want_base=(build-essential pkg-config ca-certificates curl iproute2 procps psmisc jq fuse3 libfuse3-dev openipmi fence-agents ipmitool tcpdump systemd mmdebstrap rpm lintian rpmlint)
want_bpo=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev qemu-system-x86 qemu-utils)
missing=0
for p in "${want_base[@]}" "${want_bpo[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing=1
done
if [[ $missing -eq 1 ]]; then
  log "installing system packages"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${want_base[@]}" >/dev/null
  apt-get install -y -qq --no-install-recommends -t bookworm-backports "${want_bpo[@]}" >/dev/null
  date >"$stamp"
else
  log "system packages already installed"
fi

# The Vagrant lab (vagrant/): `vagrant validate` and shellcheck of its provisioning scripts in
# tests/packaging/tests/vagrant.rs. Debian's vagrant-libvirt (0.11.2 with Vagrant 2.3.4) is
# found by vagrant as a system plugin: no `vagrant plugin install`.
want_vagrant=(vagrant vagrant-libvirt shellcheck)
missing=0
for p in "${want_vagrant[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing=1
done
if [[ $missing -eq 1 ]]; then
  log "installing ${want_vagrant[*]}"
  apt-get install -y -qq --no-install-recommends "${want_vagrant[@]}" >/dev/null ||
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${want_vagrant[@]}" >/dev/null; }
fi

if ! command -v cargo >/dev/null 2>&1; then
  if [[ -x "$HOME/.cargo/bin/cargo" ]]; then
    :
  else
    log "installing a Rust toolchain with rustup"
    curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal -c clippy,rustfmt
  fi
fi
# The package builders (tests/packaging and packaging/build.sh), pinned; built once (~5 min each
# on 2 cores), then found in ~/.cargo/bin.
[[ -f "$HOME/.cargo/env" ]] && source "$HOME/.cargo/env"
for tool in cargo-deb@3.8.0 cargo-generate-rpm@0.21.1; do
  if ! command -v "${tool%@*}" >/dev/null 2>&1 || ! "${tool%@*}" --version 2>/dev/null | grep -q "${tool#*@}"; then
    log "installing ${tool} (cargo install --locked)"
    cargo install --locked --quiet "${tool%@*}" --version "${tool#*@}"
  fi
done
log "done: $(libvirtd --version 2>/dev/null | head -n1), $(qemu-system-x86_64 --version | head -n1)"
