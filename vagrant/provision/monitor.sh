#!/usr/bin/env bash
# A lab monitor: /etc/vigil/monitor.toml for Raft node N with the VIP, its certificates, an
# admin certificate for vigilctl, fence_virsh fencing, then (unless VIGIL_PROVISION_NO_START=1)
# the database (`--init` on node 1, `--join` on the others) and the unit.
# Run common.sh --package vigil-monitor first.
#
# Usage: monitor.sh --node-id N --address IPV4 --tls-dir DIR [options]
#   --node-id N         Raft node id; the certificate DIR/monN.{crt,key} is used
#   --address IPV4      this monitor's address on the management network
#   --tls-dir DIR       ca.crt, monN.{crt,key} and admin.{crt,key} (certs.sh output)
#   --peer ID=IPV4      another monitor (repeatable); node 1 starts the cluster with them all
#   --vip IPV4          the floating VIP (optional)
#   --interface IF      where the VIP goes (default: the interface holding --address)
#   --fence HOST=DOMAIN a hypervisor and its libvirt domain on the outer host (repeatable)
#   --fence-ip IPV4     the outer host, as the lab reaches it (needed with --fence)
#   --fence-user USER   its account that may run `virsh destroy` (needed with --fence)
#   --fence-key FILE    that account's SSH private key (needed with --fence)
set -euo pipefail
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "$0")/lib.sh"

id="" addr="" tls="" vip="" iface="" fence_ip="" fence_user="" fence_key="" peers=() fences=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --node-id) id=${2:-} ;;
    --address) addr=${2:-} ;;
    --tls-dir) tls=${2:-} ;;
    --peer) peers+=("${2:-}") ;;
    --vip) vip=${2:-} ;;
    --interface) iface=${2:-} ;;
    --fence) fences+=("${2:-}") ;;
    --fence-ip) fence_ip=${2:-} ;;
    --fence-user) fence_user=${2:-} ;;
    --fence-key) fence_key=${2:-} ;;
    *) die "unknown argument '$1' (usage at the top of $0)" ;;
  esac
  [[ $# -ge 2 ]] || die "$1 needs a value"
  shift 2
done
need --node-id "$id"
need --address "$addr"
need --tls-dir "$tls"
[[ "$id" =~ ^[1-9][0-9]*$ ]] || die "--node-id: '$id' is not a positive integer"
ipv4 --address "$addr"
command -v vigil-monitor >/dev/null || die "vigil-monitor is not installed (common.sh --package vigil-monitor)"
for f in ca.crt "mon$id.crt" "mon$id.key" admin.crt admin.key; do
  [[ -f "$tls/$f" ]] || die "--tls-dir $tls has no $f (certs.sh issues it)"
done

# Every argument is checked before anything is written.
peer_ids=() peer_ips=()
for p in "${peers[@]}"; do
  [[ "$p" =~ ^([1-9][0-9]*)=(.+)$ ]] || die "--peer $p: expected ID=IPV4"
  peer_ids+=("${BASH_REMATCH[1]}")
  peer_ips+=("${BASH_REMATCH[2]}")
  ipv4 --peer "${p#*=}"
  [[ "${p%%=*}" != "$id" ]] || die "--peer $p: that is this monitor's own node id"
done
if [[ -n "$vip" ]]; then
  ipv4 --vip "$vip"
  if [[ -z "$iface" ]]; then
    iface=$({ ip -o -4 addr show 2>/dev/null || true; } | awk -v a="$addr" '{split($4, p, "/"); if (p[1] == a) print $2}' | head -n1)
    [[ -n "$iface" ]] || die "no interface holds $addr: pass --interface"
  fi
  [[ "$iface" =~ ^[A-Za-z0-9_.-]{1,15}$ ]] || die "--interface: '$iface' is not an interface name"
fi
if [[ ${#fences[@]} -gt 0 ]]; then
  need --fence-ip "$fence_ip"
  need --fence-user "$fence_user"
  need --fence-key "$fence_key"
  ipv4 --fence-ip "$fence_ip"
  [[ "$fence_user" =~ ^[a-z_][a-z0-9_-]*$ ]] || die "--fence-user: '$fence_user' is not a user name"
  [[ -f "$fence_key" ]] || die "--fence-key $fence_key: no such file"
  for f in "${fences[@]}"; do
    [[ "$f" == *=?* ]] || die "--fence $f: expected HOST=DOMAIN"
    name_ok --fence "${f%%=*}"
    [[ "${f#*=}" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--fence $f: '${f#*=}' is not a libvirt domain name"
  done
fi

conf=/etc/vigil/monitor.toml
toml=$(
  cat <<TOML
# Written by vagrant/provision/monitor.sh (the Vagrant lab). Check: vigil-monitor --check
node_id = $id
data_dir = "/var/lib/vigil/monitor"
listen = "0.0.0.0:7440"              # a wildcard: the VIP is served too
advertise = "$addr:7440"
log_format = "plain"

[tls]
ca = "/etc/vigil/tls/ca.crt"
cert = "/etc/vigil/tls/monitor.crt"
key = "/etc/vigil/tls/monitor.key"

[raft]
listen = "$addr:7441"
TOML
  if [[ "$id" == 1 && ${#peers[@]} -gt 0 ]]; then
    echo "# Read by --init only: the cluster starts with every monitor as a voter."
    for i in "${!peer_ids[@]}"; do
      printf '[[raft.peers]]\nid = %s\naddr = "%s:7441"\n' "${peer_ids[$i]}" "${peer_ips[$i]}"
    done
  fi
  if [[ -n "$vip" ]]; then
    printf '\n[vip]\naddress = "%s"\ninterface = "%s"\n' "$vip" "$iface"
  fi
  if [[ ${#fences[@]} -gt 0 ]]; then
    printf '\n# fence_virsh: SSH to the outer host, then virsh destroy of the hypervisor domain.\n[fencing]\ntimeout_ms = 30000\n'
    for f in "${fences[@]}"; do
      printf '\n[[fencing.hosts]]\nhost = "%s"\nagent = "fence_virsh"\n[fencing.hosts.options]\nip = "%s"\nusername = "%s"\nidentity_file = "/etc/vigil/fence/id_fence"\nplug = "%s"\n' \
        "${f%%=*}" "$fence_ip" "$fence_user" "${f#*=}"
    done
  fi
)
printf '%s\n' "$toml" | write_file "$conf" 0640 root:vigil

# Certificates: the monitor runs as vigil (group-readable key); vigilctl reads admin.* as root.
install_file "$tls/ca.crt" /etc/vigil/tls/ca.crt 0644 root:root
install_file "$tls/mon$id.crt" /etc/vigil/tls/monitor.crt 0644 root:root
install_file "$tls/mon$id.key" /etc/vigil/tls/monitor.key 0640 root:vigil
install_file "$tls/admin.crt" /etc/vigil/tls/admin.crt 0644 root:root
install_file "$tls/admin.key" /etc/vigil/tls/admin.key 0600 root:root

if [[ ${#fences[@]} -gt 0 ]]; then
  distro_install fence-agents openssh-client
  install_file "$fence_key" /etc/vigil/fence/id_fence 0600 vigil:vigil
  # The monitor's sandbox leaves only its data_dir writable: learn the outer host's key there.
  write_file /etc/ssh/ssh_config.d/vigil-fence.conf 0644 root:root <<SSH
# Written by vagrant/provision/monitor.sh: fence_virsh's SSH to the outer host.
Host $fence_ip
    StrictHostKeyChecking accept-new
    UserKnownHostsFile /var/lib/vigil/monitor/fence_known_hosts
SSH
fi

# vigilctl on this monitor: every monitor and the VIP (the admin certificate is the default).
monitors="$addr:7440"
for p in "${peers[@]}"; do monitors+=",${p#*=}:7440"; done
[[ -z "$vip" ]] || monitors="$vip:7440,$monitors"
write_file /etc/profile.d/vigil-lab.sh 0644 root:root <<ENV
# Written by vagrant/provision/monitor.sh: vigilctl finds the monitors.
export VIGIL_MONITORS=$monitors
ENV

vigil-monitor --check --config "$conf" >/dev/null || die "vigil-monitor --check refused $conf"

# The database: created once, by a short run with --init (node 1) or --join (the others).
if [[ ! -f /var/lib/vigil/monitor/raft.redb ]] && starting "creating the monitor database"; then
  mode=--join
  [[ "$id" == 1 ]] && mode=--init
  install -d -o vigil -g vigil -m 0750 /var/lib/vigil/monitor
  out=$(mktemp)
  runuser -u vigil -- vigil-monitor --config "$conf" "$mode" >"$out" 2>&1 &
  pid=$!
  for _ in $(seq 1 300); do
    grep -q 'serving agents and vigilctl' "$out" && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" || true
  grep -q 'serving agents and vigilctl' "$out" || { cat "$out" >&2; die "vigil-monitor $mode did not come up"; }
  rm -f "$out"
fi
enable_unit vigil-monitor.service start
