# shellcheck shell=bash
# Helpers sourced by the provisioning scripts of the Vagrant lab (vagrant/provision/*.sh).
#
# Environment, read by every script:
#   VIGIL_PROVISION_NO_START=1  write and enable, but start nothing (no `systemctl start`,
#                               no mount, no exportfs, no monitor bootstrap): for a chroot or
#                               an image build, where systemd is not PID 1.
#   VIGIL_PROVISION_OFFLINE=1   never call apt-get for distribution packages; a missing one is
#                               named on stderr and skipped (the .debs of Vigil are still
#                               installed, from their files).

log() { printf '[vigil-provision] %s\n' "$*" >&2; }
die() {
  printf '[vigil-provision] error: %s\n' "$*" >&2
  exit 1
}

# starting DESCRIPTION: true when this run may start things; logs what it skips otherwise.
starting() {
  if [[ "${VIGIL_PROVISION_NO_START:-0}" == 1 ]]; then
    log "VIGIL_PROVISION_NO_START=1: not $1"
    return 1
  fi
  return 0
}

# enable_unit UNIT [start]: `systemctl enable` works in a chroot too; start only when allowed.
enable_unit() {
  local unit=$1
  systemctl enable "$unit" >/dev/null 2>&1 || die "systemctl enable $unit failed"
  if [[ "${2:-}" == start ]] && starting "starting $unit"; then
    systemctl restart "$unit"
  fi
}

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

# distro_install PACKAGE...: the missing ones, without recommends (nothing when all are there).
distro_install() {
  local missing=() p
  for p in "$@"; do installed "$p" || missing+=("$p"); done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  if [[ "${VIGIL_PROVISION_OFFLINE:-0}" == 1 ]]; then
    log "VIGIL_PROVISION_OFFLINE=1: not installing ${missing[*]}"
    return 0
  fi
  log "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null ||
    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null; } ||
    die "apt-get install ${missing[*]} failed"
}

# need FLAG VALUE: a required option.
need() { [[ -n "${2:-}" ]] || die "missing $1 (see the usage at the top of $(basename "$0"))"; }

# ipv4 FLAG VALUE: VALUE is a dotted IPv4 address.
ipv4() {
  [[ "$2" =~ ^([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})$ ]] || die "$1: '$2' is not an IPv4 address"
  local o
  for o in "${BASH_REMATCH[@]:1}"; do ((o <= 255)) || die "$1: '$2' is not an IPv4 address"; done
}

# name FLAG VALUE: a host or monitor name as the certificates carry it.
name_ok() { [[ "$2" =~ ^[a-z0-9][a-z0-9-]{0,62}$ ]] || die "$1: '$2' is not a host name (a-z, 0-9, -)"; }

# install_file SRC DEST MODE OWNER:GROUP: copy only when different (idempotent, no churn).
install_file() {
  [[ -f "$1" ]] || die "$1: no such file"
  if ! cmp -s "$1" "$2"; then install -D -m "$3" -o "${4%:*}" -g "${4#*:}" "$1" "$2"; fi
  chmod "$3" "$2"
  chown "$4" "$2"
}

# write_file DEST MODE OWNER:GROUP < CONTENT: replace DEST when the content differs.
write_file() {
  local tmp
  tmp=$(mktemp)
  cat >"$tmp"
  install_file "$tmp" "$1" "$2" "$3"
  rm -f "$tmp"
}
