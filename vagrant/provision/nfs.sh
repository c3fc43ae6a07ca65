#!/usr/bin/env bash
# The lab's NFS server: one export for the hypervisors' primary storage pool.
#
# Usage: nfs.sh --export DIR --clients CIDR
#   --export DIR     the exported directory (created; e.g. /srv/primary)
#   --clients CIDR   who may mount it (the management network, e.g. 198.18.10.0/24)
set -euo pipefail
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"

dir="" clients=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --export) dir=${2:-} ;;
    --clients) clients=${2:-} ;;
    *) die "unknown argument '$1' (usage at the top of $0)" ;;
  esac
  [[ $# -ge 2 ]] || die "$1 needs a value"
  shift 2
done
need --export "$dir"
need --clients "$clients"
[[ "$dir" == /* ]] || die "--export $dir: an absolute path"
[[ "$clients" =~ ^([0-9.]+)/([0-9]{1,2})$ ]] || die "--clients $clients: expected IPV4/PREFIX"
net=${BASH_REMATCH[1]} len=${BASH_REMATCH[2]}
((10#$len <= 32)) || die "--clients $clients: prefix above 32"
ipv4 --clients "$net"

distro_install nfs-kernel-server
mkdir -p "$dir"
chmod 0755 "$dir"
# no_root_squash: the agents write their heartbeat and fence-slot files as root.
mkdir -p /etc/exports.d
printf '%s %s(rw,sync,no_subtree_check,no_root_squash)\n' "$dir" "$clients" |
  write_file /etc/exports.d/vigil.exports 0644 root:root
enable_unit nfs-server.service start
if starting "exporting $dir"; then exportfs -ra; fi
