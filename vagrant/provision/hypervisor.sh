#!/usr/bin/env bash
# A lab hypervisor: libvirt, the NFS primary pool at /mnt/primary, /etc/vigil/agent.toml and
# the agent's certificate, then (unless VIGIL_PROVISION_NO_START=1) the mount and the unit.
# Run common.sh --package vigil-agent first.
#
# Usage: hypervisor.sh --name HOST --tls-dir DIR --monitor IPV4... [options]
#   --name HOST         the host name, as its certificate DIR/HOST.{crt,key} names it
#   --tls-dir DIR       ca.crt and HOST.{crt,key} (certs.sh output)
#   --monitor IPV4      a monitor, or the VIP (repeatable; list them all)
#   --nfs SERVER:PATH   the primary storage export, mounted at /mnt/primary (optional)
#   --zone ZONE         default "default"
set -euo pipefail
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"

name="" tls="" nfs="" zone=default monitors=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --name) name=${2:-} ;;
    --tls-dir) tls=${2:-} ;;
    --monitor) monitors+=("${2:-}") ;;
    --nfs) nfs=${2:-} ;;
    --zone) zone=${2:-} ;;
    *) die "unknown argument '$1' (usage at the top of $0)" ;;
  esac
  [[ $# -ge 2 ]] || die "$1 needs a value"
  shift 2
done
need --name "$name"
need --tls-dir "$tls"
name_ok --name "$name"
name_ok --zone "$zone"
[[ ${#monitors[@]} -gt 0 ]] || die "missing --monitor (one per monitor, and the VIP)"
command -v vigil-agent >/dev/null || die "vigil-agent is not installed (common.sh --package vigil-agent)"
for f in ca.crt "$name.crt" "$name.key"; do
  [[ -f "$tls/$f" ]] || die "--tls-dir $tls has no $f (certs.sh issues it)"
done
[[ -z "$nfs" || "$nfs" =~ ^[A-Za-z0-9.-]+:/[^[:space:]]*$ ]] || die "--nfs $nfs: expected SERVER:/PATH"
list=""
for m in "${monitors[@]}"; do
  ipv4 --monitor "$m"
  list+="${list:+, }\"$m:7440\""
done

# The hypervisor itself: libvirt and QEMU (KVM when the box has nested virtualisation).
distro_install libvirt-daemon-system libvirt-clients qemu-system-x86 qemu-utils nfs-common
enable_unit libvirtd.service start

toml=$(
  cat <<TOML
# Written by vagrant/provision/hypervisor.sh (the Vagrant lab). Check: vigil-agent --check
host = "$name"
zone = "$zone"
cluster = "default"
monitors = [$list]
log_format = "plain"
systemd_watchdog = true

[tls]
ca = "/etc/vigil/tls/ca.crt"
cert = "/etc/vigil/tls/agent.crt"
key = "/etc/vigil/tls/agent.key"
TOML
  if [[ -n "$nfs" ]]; then
    printf '\n[storage]\n[[storage.pools]]\nname = "primary"\npath = "/mnt/primary"\n'
  fi
  # softdog inside the VM (the unit loads it): a reset restarts this box, not the outer host.
  printf '\n[watchdog]\ndevice = "/dev/watchdog"\ntimeout_secs = 10\n'
)
printf '%s\n' "$toml" | write_file /etc/vigil/agent.toml 0644 root:root

install_file "$tls/ca.crt" /etc/vigil/tls/ca.crt 0644 root:root
install_file "$tls/$name.crt" /etc/vigil/tls/agent.crt 0644 root:root
install_file "$tls/$name.key" /etc/vigil/tls/agent.key 0600 root:root

if [[ -n "$nfs" ]]; then
  mkdir -p /mnt/primary
  line="$nfs /mnt/primary nfs4 rw,hard,timeo=50,retrans=2,_netdev 0 0"
  { grep -v '[[:space:]]/mnt/primary[[:space:]]' /etc/fstab 2>/dev/null || true; echo "$line"; } | write_file /etc/fstab 0644 root:root
  if starting "mounting /mnt/primary"; then
    # The NFS server may still be booting (vagrant up --parallel): retry for a minute.
    for _ in $(seq 1 30); do
      mountpoint -q /mnt/primary || mount /mnt/primary 2>/dev/null || true
      mountpoint -q /mnt/primary && break
      sleep 2
    done
    mountpoint -q /mnt/primary || die "cannot mount $nfs on /mnt/primary"
  fi
fi

vigil-agent --check --config /etc/vigil/agent.toml >/dev/null || die "vigil-agent --check refused /etc/vigil/agent.toml"
enable_unit vigil-agent.service start
