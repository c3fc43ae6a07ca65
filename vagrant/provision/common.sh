#!/usr/bin/env bash
# Every lab machine: the lab's names in /etc/hosts, and Vigil's .debs (from packaging/build.sh).
#
# Usage: common.sh --debs DIR [--package vigil-agent|vigil-monitor]... [--host NAME=IPV4]...
#   --debs DIR      where packaging/build.sh put the .debs (the newest vigil-X_*.deb is used)
#   --package P     a Vigil package to install from DIR (repeatable; none: only /etc/hosts)
#   --host N=IP     a line of the lab's block in /etc/hosts (repeatable; the block is replaced)
set -euo pipefail
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"

debs="" packages=() hosts=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --debs) debs=${2:-}; shift 2 || die "--debs needs a value" ;;
    --package) packages+=("${2:-}"); shift 2 || die "--package needs a value" ;;
    --host) hosts+=("${2:-}"); shift 2 || die "--host needs a value" ;;
    *) die "unknown argument '$1' (usage at the top of $0)" ;;
  esac
done
need --debs "$debs"
[[ -d "$debs" ]] || die "--debs $debs: no such directory (run packaging/build.sh first)"

# /etc/hosts: one marked block, replaced as a whole.
if [[ ${#hosts[@]} -gt 0 ]]; then
  block=$(mktemp)
  for h in "${hosts[@]}"; do
    [[ "$h" == *=* ]] || die "--host $h: expected NAME=IPV4"
    name_ok --host "${h%%=*}"
    ipv4 --host "${h#*=}"
    printf '%s\t%s\t# vigil-lab\n' "${h#*=}" "${h%%=*}" >>"$block"
  done
  { grep -v '# vigil-lab$' /etc/hosts 2>/dev/null || true; cat "$block"; } | write_file /etc/hosts 0644 root:root
  rm -f "$block"
fi

for p in "${packages[@]}"; do
  case $p in vigil-agent | vigil-monitor) ;; *) die "--package $p: not a Vigil package (vigil-agent, vigil-monitor)" ;; esac
  deb=$(find "$debs" -maxdepth 1 -name "${p}_*_amd64.deb" | sort -V | tail -n1)
  [[ -n "$deb" ]] || die "no ${p}_*_amd64.deb in $debs (run packaging/build.sh)"
  want=$(dpkg-deb -f "$deb" Version)
  have=$(dpkg-query -W -f='${Version}' "$p" 2>/dev/null || true)
  if [[ "$have" == "$want" ]] && installed "$p"; then
    log "$p $want already installed"
    continue
  fi
  log "installing $deb"
  # apt resolves the dependencies (libvirt0, passwd; fence-agents is only recommended).
  cp "$deb" /tmp/ && deb_copy="/tmp/$(basename "$deb")"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$deb_copy" >/dev/null ||
    die "apt-get install $deb failed"
  rm -f "$deb_copy"
done
