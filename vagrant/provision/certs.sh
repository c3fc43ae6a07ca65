#!/usr/bin/env bash
# The lab's CA and every certificate, made where the CA key may live (the outer host, before
# `vagrant up`; the Vagrantfile runs this as a trigger). Idempotent: an existing CA or
# certificate is kept, so running it again issues only what is missing.
#
# Usage: certs.sh PKI_DIR ROLE:NAME[:SAN[,SAN...]]...
#   PKI_DIR   the CA (PKI_DIR/ca/ca.{crt,key}) and the issued pairs (PKI_DIR/NAME.{crt,key})
#   ROLE      agent, monitor, admin or viewer (vigilctl cert issue --role)
#   NAME      the certificate's name: an agent's host name, monN for Raft node N, an operator
#   SAN       extra subject alternative names (IP addresses or DNS names)
# Environment: VIGILCTL (default: vigilctl on PATH, e.g. target/release/vigilctl),
#   VIGIL_CLUSTER_NAME (default vigil-lab).
set -euo pipefail
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"

[[ $# -ge 2 ]] || die "usage: certs.sh PKI_DIR ROLE:NAME[:SAN,...]..."
pki=$1
shift
vigilctl=${VIGILCTL:-vigilctl}
command -v "$vigilctl" >/dev/null || die "$vigilctl not found: set VIGILCTL (packaging/build.sh builds target/release/vigilctl)"

mkdir -p "$pki"
chmod 0700 "$pki"
if [[ ! -f "$pki/ca/ca.crt" ]]; then
  [[ ! -e "$pki/ca/ca.key" ]] || die "$pki/ca/ca.key exists without ca.crt: move it away or restore ca.crt"
  log "new CA in $pki/ca"
  "$vigilctl" ca init --dir "$pki/ca" --name "${VIGIL_CLUSTER_NAME:-vigil-lab}" >/dev/null
fi
for spec in "$@"; do
  IFS=: read -r role name sans extra <<<"$spec"
  [[ -z "${extra:-}" ]] || die "$spec: expected ROLE:NAME[:SAN,...]"
  case $role in agent | monitor | admin | viewer) ;; *) die "$spec: role '$role' is not agent, monitor, admin or viewer" ;; esac
  name_ok "$spec" "${name:-}"
  if [[ "$role" == monitor && ! "$name" =~ ^mon[0-9]+$ ]]; then
    die "$spec: a monitor's certificate is named mon<node_id> (Raft checks it)"
  fi
  if [[ -f "$pki/$name.crt" && -f "$pki/$name.key" ]]; then
    continue
  fi
  san_args=()
  if [[ -n "${sans:-}" ]]; then
    IFS=, read -r -a list <<<"$sans"
    for s in "${list[@]}"; do san_args+=(--san "$s"); done
  fi
  log "issuing $role certificate $name"
  "$vigilctl" cert issue --ca "$pki/ca" --role "$role" --name "$name" --out "$pki" "${san_args[@]}" >/dev/null
done
# ca.crt next to the pairs (cert issue writes it too): what the machines get.
cp "$pki/ca/ca.crt" "$pki/ca.crt"
