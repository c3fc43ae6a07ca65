#!/usr/bin/env bash
# The Vigil demo on one machine, in the lab (tests/lab): three hypervisor hosts and one monitor,
# each in its own network namespace on one bridge (addresses from 198.18.0.0/15, only inside the
# lab's namespaces), each host with its own private libvirtd and a real QEMU domain marked HA.
#
#  1. vigilctl status / host list / vm list;
#  2. hv1's VM: its qemu is killed with SIGKILL; Vigil restarts it with the next generation;
#  3. hv2 loses power (crash-host): Down, fenced through its BMC (fence_ipmilan against
#     ipmi_sim: the proof), and its VM starts on the ha_tag host hv1; hv2 powers on, rejoins;
#  4. hv3 is cut from the monitor but alive on storage (partition): it fences itself through
#     its storage slot (sbd-style), then its VM moves;
#  5. the replicated event log, and the lab's independent duplicate checker.
#
# Usage: ./scripts/demo.sh        (as root; installs what is missing, builds, runs; ~1 min warm)
set -euo pipefail
if [[ $EUID -ne 0 ]]; then
  exec sudo -E "$0" "$@"
fi
cd "$(dirname "$0")/.."
ROOT=$PWD

bash scripts/setup.sh
# shellcheck disable=SC1091
[[ -f "$HOME/.cargo/env" ]] && source "$HOME/.cargo/env"

say() { printf '\n\033[1;32m==> %s\033[0m\n' "$*"; }

say "building (release)"
cargo build --release --quiet --bins
B=$ROOT/target/release

# A lab of its own, so a person's lab (default /var/lib/vigil-lab, prefix vl) is never touched.
export VIGIL_LAB_DIR=${VIGIL_DEMO_LAB_DIR:-/var/lib/vigil-demo}
export VIGIL_LAB_PREFIX=${VIGIL_DEMO_LAB_PREFIX:-vd}
lab() { "$B/vigil-lab" "$@"; }
ctl() { lab ctl -- "$@"; }
trap 'say "tearing the lab down"; lab down >/dev/null || lab down' EXIT
lab down >/dev/null 2>&1 || true

ms() { date +%s%3N; }
wait_for() { # timeout_s description command...
  local end=$((SECONDS + $1)) what=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= end)); then
      echo "timed out waiting for: $what" >&2
      return 1
    fi
    sleep 0.05
  done
}
liveness() { [[ $(ctl --json host show "$1" | jq -r .liveness) == "$2" ]]; }
vm_is() { [[ $(ctl --json vm show "$1" | jq -r '"\(.generation) \(.phase) \(.state)"') == "$2" ]]; }

say "vigil-lab up: 3 hypervisor hosts (hv1 tagged ha), 3 monitors (Raft, VIP 198.18.0.250) with a fence agent per host, 1 HA VM per host"
lab up --hosts 3 --monitors 3 --vms-per-host 1 --ha-tag ha --tagged-hosts 1 --fencing
defined() { ctl --json vm show "$1" | jq -e '.definition_stored == true'; }
for v in hv1-vm1 hv2-vm1 hv3-vm1; do wait_for 30 "$v's definition stored" defined "$v"; done

say "vigilctl status"
ctl status
say "vigilctl host list"
ctl host list
say "vigilctl vm list"
ctl vm list

VM=hv1-vm1
QPID=$(cat "$VIGIL_LAB_DIR/hosts/hv1/libvirt/run/libvirt/qemu/$VM.pid")
say "killing $VM's qemu with SIGKILL (pid $QPID), as if it crashed"
T0=$(ms)
kill -KILL "$QPID"
wait_for 60 "$VM running again with generation 1" vm_is "$VM" "1 running running"
echo "$VM running again $(($(ms) - T0)) ms after the kill, new qemu pid $(cat "$VIGIL_LAB_DIR/hosts/hv1/libvirt/run/libvirt/qemu/$VM.pid")"
say "vigilctl vm show $VM"
ctl vm show "$VM"

say "vigilctl server list: three voters; the leader holds the VIP"
ctl server list
LEADER=$(lab status --json | jq -r '[.monitors[] | select(.holds_vip)][0].name')
new_holder() { lab status --json | jq -e --arg l "$LEADER" '[.monitors[] | select(.holds_vip and .monitor.alive and .name != $l)] | length == 1'; }
say "killing the leader monitor $LEADER with SIGKILL (hosts and VMs are not touched)"
T0=$(ms)
lab kill-monitor "$LEADER"
wait_for 30 "the VIP on a new leader" new_holder
echo "VIP on $(lab status --json | jq -r --arg l "$LEADER" '[.monitors[] | select(.holds_vip and .name != $l)][0].name') $(($(ms) - T0)) ms after the SIGKILL of $LEADER"
lab restart-monitor "$LEADER"
for h in hv1 hv2 hv3; do wait_for 30 "$h up under the new leader" liveness "$h" up; done
ctl server list

on_host() { [[ $(ctl --json vm show "$1" | jq -r '"\(.host) \(.state)"') == "$2 running" ]]; }

say "hv2 loses power (every process of hv2 SIGKILLed at once)"
T0=$(ms)
lab crash-host hv2
wait_for 60 "hv2-vm1 running on hv1" on_host hv2-vm1 hv1
echo "hv2-vm1 running on hv1 (the ha_tag host) $(($(ms) - T0)) ms after hv2 lost power: detection, fencing through hv2's BMC, restart"
lab bmc hv2 status || true
say "vigilctl vm show hv2-vm1"
ctl vm show hv2-vm1
say "hv2 powers on again (empty) and rejoins"
lab power-on hv2
wait_for 30 "hv2 up" liveness hv2 up

say "partitioning hv3 from the monitor (its processes and VM keep running)"
T0=$(ms)
lab partition hv3
wait_for 60 "hv3-vm1 running on hv1" on_host hv3-vm1 hv1
echo "hv3-vm1 running on hv1 $(($(ms) - T0)) ms after the partition: hv3 fenced itself through its storage slot first (see the events), then Vigil started the VM"

say "vigilctl host list"
ctl host list
say "vigilctl events"
ctl events --limit 40
say "vigil-lab check: the lab's own observer, independent of Vigil, looks for a VM running twice"
lab check
say "demo done"
