#!/usr/bin/env bash
# The Vigil demo on one machine: a cluster CA, one monitor, two agents on loopback, a real
# libvirtd (private, in its own mount namespace) with a real QEMU domain marked HA; its qemu
# is killed with SIGKILL and Vigil brings it back with the next activation generation; then an
# agent is killed and its host seen Down. The event log explains every step.
#
# Usage: sudo ./scripts/demo.sh        (installs what is missing, builds, runs; ~1 min warm)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

bash scripts/setup.sh
# shellcheck disable=SC1091
[[ -f "$HOME/.cargo/env" ]] && source "$HOME/.cargo/env"

say() { printf '\n\033[1;32m==> %s\033[0m\n' "$*"; }

say "building (release)"
cargo build --release --quiet --bins
BIN=$ROOT/target/release

W=${VIGIL_DEMO_DIR:-$ROOT/demo-run}
rm -rf "$W"
mkdir -p "$W"
PORT=${VIGIL_DEMO_PORT:-17440}
MON=127.0.0.1:$PORT

PIDS=()
SANDBOX_PID=
cleanup() {
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [[ -n $SANDBOX_PID ]]; then
    bash scripts/libvirt-sandbox.sh stop "$W/libvirt" >/dev/null 2>&1 || true
    wait "$SANDBOX_PID" 2>/dev/null || true
  fi
}
trap cleanup EXIT

ctl() { "$BIN/vigilctl" --monitor "$MON" --ca "$W/tls/ca.crt" --cert "$W/tls/admin.crt" --key "$W/tls/admin.key" "$@"; }

say "creating a cluster CA and certificates"
"$BIN/vigilctl" ca init --dir "$W/ca" --name demo
"$BIN/vigilctl" cert issue --ca "$W/ca" --role monitor --name mon1 --out "$W/tls"
"$BIN/vigilctl" cert issue --ca "$W/ca" --role admin --name admin --out "$W/tls"
for h in hv1 hv2; do
  "$BIN/vigilctl" cert issue --ca "$W/ca" --role agent --name "$h" --out "$W/tls"
done

cat >"$W/monitor.toml" <<TOML
node_id = 1
data_dir = "$W/monitor-data"
listen = "$MON"
[tls]
ca = "$W/tls/ca.crt"
cert = "$W/tls/mon1.crt"
key = "$W/tls/mon1.key"
[detector]
heartbeat_interval_ms = 500
suspect_after_ms = 1250
down_after_ms = 2500
TOML

say "starting the monitor on udp $MON"
"$BIN/vigil-monitor" --config "$W/monitor.toml" >"$W/monitor.log" 2>&1 &
PIDS+=($!)

say "starting a private libvirtd for hv1 (its own mount namespace; the system's is untouched)"
bash scripts/libvirt-sandbox.sh run "$W/libvirt" >"$W/libvirt-sandbox.log" 2>&1 &
SANDBOX_PID=$!
for _ in $(seq 1 900); do [[ -s "$W/libvirt/uri" ]] && break; sleep 0.2; done
[[ -s "$W/libvirt/uri" ]] || { cat "$W/libvirt-sandbox.log"; exit 1; }
URI=$(cat "$W/libvirt/uri")
virsh() { command virsh -c "$URI" "$@"; }
echo "libvirt URI: $URI"

for h in hv1 hv2; do
  if [[ $h == hv1 ]]; then LIBVIRT="libvirt_uri = \"$URI\""; else LIBVIRT="libvirt_enabled = false"; fi
  cat >"$W/agent-$h.toml" <<TOML
zone = "zone-a"
cluster = "cluster-1"
monitors = ["$MON"]
state_dir = "$W/agent-$h-state"
poll_interval_ms = 1000
$LIBVIRT
[tls]
ca = "$W/tls/ca.crt"
cert = "$W/tls/$h.crt"
key = "$W/tls/$h.key"
TOML
done

until ctl status >/dev/null 2>&1; do sleep 0.2; done
say "starting agents hv1 and hv2"
"$BIN/vigil-agent" --config "$W/agent-hv1.toml" >"$W/agent-hv1.log" 2>&1 &
AGENT1=$!
PIDS+=("$AGENT1")
"$BIN/vigil-agent" --config "$W/agent-hv2.toml" >"$W/agent-hv2.log" 2>&1 &
PIDS+=($!)

wait_state() { # host state timeout_s
  local end=$((SECONDS + $3))
  while ((SECONDS < end)); do
    [[ $(ctl --json host show "$1" 2>/dev/null | jq -r .liveness) == "$2" ]] && return 0
    sleep 0.2
  done
  echo "timed out waiting for $1 to be $2" >&2
  return 1
}
wait_state hv1 up 20
wait_state hv2 up 20
ctl host tag add hv1 ha

say "vigilctl status"
ctl status
say "vigilctl host list"
ctl host list

say "defining and starting a real QEMU domain 'web1' on hv1 (TCG, 64 MiB, diskless)"
bash scripts/libvirt-sandbox.sh domain-xml web1 64 >"$W/web1.xml"
virsh define "$W/web1.xml"
virsh start web1
until ctl --json vm show web1 2>/dev/null | jq -e '.state == "running"' >/dev/null; do sleep 0.2; done
ctl vm ha enable web1 --priority 10
say "vigilctl vm list"
ctl vm list

QPID=$(cat "$W/libvirt/run/libvirt/qemu/web1.pid")
say "killing web1's qemu with SIGKILL (pid $QPID), as if it crashed"
T0=$(date +%s%N)
kill -KILL "$QPID"
until [[ $(ctl --json vm show web1 2>/dev/null | jq -r '"\(.generation) \(.phase) \(.state)"') == "1 running running" ]]; do sleep 0.05; done
T1=$(date +%s%N)
echo "web1 running again $(( (T1 - T0) / 1000000 )) ms after the kill, new qemu pid $(cat "$W/libvirt/run/libvirt/qemu/web1.pid"), $(virsh domstate --reason web1)"
say "vigilctl vm show web1"
ctl vm show web1

HV2_PID=${PIDS[-1]}
say "killing hv2's agent with SIGKILL (pid $HV2_PID), as if the host lost power"
T0=$(date +%s%N)
kill -KILL "$HV2_PID"
wait "$HV2_PID" 2>/dev/null || true
wait_state hv2 down 30
T1=$(date +%s%N)
echo "hv2 seen down $(( (T1 - T0) / 1000000 )) ms after the kill (down_after_ms = 2500)"

say "vigilctl host list"
ctl host list
say "vigilctl events"
ctl events
say "demo done; logs and state are in $W"
