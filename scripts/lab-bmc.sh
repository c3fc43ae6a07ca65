#!/usr/bin/env bash
# A real IPMI peer for one lab host: OpenIPMI's ipmi_sim answering IPMI 2.0 (RMCP+) on IP:PORT/udp,
# whose chassis power is whatever the lab's power script says. fence_ipmilan (or ipmitool) talks
# to it exactly as to a server's BMC; the power script decides what "off" and "on" mean for the
# lab host (crash it, restart it empty).
#
# Usage:
#   lab-bmc.sh run DIR --name HOST --addr IP --port PORT --power-script PATH [--user U] [--password P]
#                        stay in the foreground as the BMC's supervisor (ipmi_sim is its child):
#                        prints "IP PORT" once ipmi_sim answers; exits when ipmi_sim exits; ends
#                        ipmi_sim on SIGTERM/SIGINT/SIGHUP or when its own parent dies (tests use this)
#   lab-bmc.sh start DIR ...same options...
#                        same, detached (the supervisor runs in its own session); returns once ready
#   lab-bmc.sh stop DIR  end the BMC of DIR (supervisor and ipmi_sim, by their recorded PIDs);
#                        idempotent
#   lab-bmc.sh options DIR [ACTION]
#                        print the ClusterLabs fence-agent options for this BMC, one key=value a line
#                        (what fence_ipmilan reads on stdin), with action=ACTION when given
#   lab-bmc.sh fence DIR ACTION [key=value ...]
#                        run fence_ipmilan with those options on stdin (ACTION: status, off, on,
#                        reboot, monitor); extra key=value lines are appended (e.g. power_wait=0);
#                        exits with fence_ipmilan's code (0 done / on, 2 status: off, 1 failure)
#
# Run `run`/`start` inside the network namespace that holds IP (`ip netns exec NS lab-bmc.sh ...`),
# and call fence_ipmilan from a namespace that routes to IP. Defaults: --user admin, --password
# vigil. DIR is created if missing; HOST must match [A-Za-z0-9_.-]+.
#
# The power script PATH is called as `PATH status` (must print 1 for on or 0 for off, exit 0),
# `PATH off` and `PATH on` (exit 0 when done). ipmi_sim runs `DIR/chassis-control 0x20 get power` /
# `... set power 0|1`, which maps to those; every call is logged to DIR/power.log with its time,
# result and duration. A call that fails, times out (VIGIL_BMC_POWER_TIMEOUT seconds, default 30)
# or prints something else than 0/1 makes the IPMI command fail, so fence_ipmilan never reports a
# power state it did not see. ipmi_sim is single-threaded: while a power call runs, the BMC does
# not answer.
#
# IPMI notes (see shared/lab-notes.md): ipmi_sim does not answer "Get Channel Cipher Suites", so
# clients must pin the cipher suite (fence_ipmilan --lanplus --cipher=3, ipmitool -I lanplus -C 3),
# or every call first waits ~10 s. fence_ipmilan sleeps power_wait (default 2 s) after "off"/"on"
# before it polls the status; power_wait=0 confirms "off" in ~0.2 s. An IPMI "power cycle" (fence
# method=cycle) calls "off", then "on" about a second later, from ipmi_sim's own timer, after
# fence_ipmilan has already returned.
#
# Layout of DIR: lan.conf, emu.cmds (ipmi_sim's config and start-up commands), chassis-control,
# state/ (ipmi_sim's -s state dir; its per-BMC part is reset on every start so lan.conf's users
# win), bmc.env (NAME, ADDR, PORT, USER, PASSWORD, POWER_SCRIPT), pids ("supervisor PID",
# "ipmi_sim PID"), ready ("IP PORT" while it runs), power.log, ipmi_sim.log, supervisor.log.
#
# Process tree: caller -> [run: this script, a child subreaper] -> ipmi_sim -> sh -c chassis-control
# -> PATH. Orphans of the power script (for instance a detached `libvirt-sandbox.sh start` keeper)
# are reparented to, and reaped by, the supervisor while it runs. With `start` the supervisor is
# itself orphaned; where PID 1 does not reap, it stays a zombie after `stop` (no resources held):
# use `run DIR ... &` from a process that waits for it to avoid that.
set -euo pipefail

SELF=$(readlink -f "${BASH_SOURCE[0]}")
POWER_TIMEOUT=${VIGIL_BMC_POWER_TIMEOUT:-30}
READY_TIMEOUT=${VIGIL_BMC_READY_TIMEOUT:-15}
MC=0x20

log() { printf 'lab-bmc: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}
usage() {
  sed -n '7,25s/^# \{0,1\}//p' "$SELF" >&2
  exit 2
}

# Absolute DIR, created when $2 is 1; only characters that survive ipmi_sim's config parser and
# `sh -c` unquoted.
canon_dir() {
  local d=$1 create=$2
  [[ -n "$d" ]] || die "DIR is empty"
  if [[ "$create" == 1 ]]; then mkdir -p "$d"; fi
  [[ -d "$d" ]] || die "$d is not a directory"
  d=$(readlink -f "$d")
  [[ "$d" =~ ^/[A-Za-z0-9._/+-]+$ ]] || die "DIR must match [A-Za-z0-9._/+-]: $d"
  echo "$d"
}

recorded_pid() { awk -v n="$2" '$1 == n { print $2 }' "$1/pids" 2>/dev/null || true; }

# True when PID is alive (not a zombie) and its command line mentions both WORD and DIR.
is_ours() {
  local pid=$1 word=$2 d=$3 st cmd
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  st=$(awk '/^State:/ { print $2 }' "/proc/$pid/status" 2>/dev/null) || return 1
  [[ -n "$st" && "$st" != Z ]] || return 1
  cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  [[ "$cmd" == *"$word"* && "$cmd" == *"$d"* ]]
}

# Whether something listens on UDP ADDR:PORT in this network namespace (/proc/net/udp, hex).
udp_bound() {
  local addr=$1 port=$2 hex a b c e
  IFS=. read -r a b c e <<<"$addr"
  hex=$(printf '%02X%02X%02X%02X:%04X' "$e" "$c" "$b" "$a" "$port")
  awk -v h="$hex" 'NR > 1 && $2 == h { f = 1 } END { exit !f }' /proc/net/udp
}

# prctl(PR_SET_CHILD_SUBREAPER) syscall number, for perl's syscall().
prctl_nr() {
  case "$(uname -m)" in
    x86_64) echo 157 ;;
    aarch64 | riscv64) echo 167 ;;
    i?86 | armv7l | s390x) echo 172 ;;
    ppc64le | ppc64) echo 171 ;;
    *) echo "" ;;
  esac
}

# ---------------------------------------------------------------------------------------------
# Options of run/start: sets NAME ADDR PORT POWER USER PASSWORD.
parse_opts() {
  NAME="" ADDR="" PORT="" POWER="" USER_NAME=admin PASSWORD=vigil
  while (($#)); do
    case "$1" in
      --name) NAME=${2:-} && shift 2 ;;
      --addr) ADDR=${2:-} && shift 2 ;;
      --port) PORT=${2:-} && shift 2 ;;
      --power-script) POWER=${2:-} && shift 2 ;;
      --user) USER_NAME=${2:-} && shift 2 ;;
      --password) PASSWORD=${2:-} && shift 2 ;;
      *) die "unknown option: $1" ;;
    esac
  done
  [[ "$NAME" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--name must match [A-Za-z0-9_.-]+: '$NAME'"
  [[ "$ADDR" =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]] || die "--addr must be an IPv4 address: '$ADDR'"
  if ! [[ "$PORT" =~ ^[0-9]{1,5}$ ]] || ((PORT < 1 || PORT > 65535)); then
    die "--port must be 1..65535: '$PORT'"
  fi
  [[ -n "$POWER" ]] || die "--power-script is required"
  POWER=$(readlink -f "$POWER") || die "--power-script: cannot resolve"
  [[ -f "$POWER" && -x "$POWER" ]] || die "--power-script $POWER is not an executable file"
  [[ "$POWER" =~ ^/[A-Za-z0-9._/+-]+$ ]] || die "--power-script path must match [A-Za-z0-9._/+-]: $POWER"
  [[ "$USER_NAME" =~ ^[A-Za-z0-9_.-]{1,16}$ ]] || die "--user must be 1-16 of [A-Za-z0-9_.-]"
  [[ "$PASSWORD" =~ ^[A-Za-z0-9_.+-]{1,20}$ ]] || die "--password must be 1-20 of [A-Za-z0-9_.+-]"
}

write_config() {
  local d=$1
  mkdir -p "$d/state"
  # Persisted users and LAN parameters would override lan.conf: start from the config every time.
  rm -rf "${d:?}/state/ipmi_sim/$NAME"
  cat >"$d/lan.conf" <<EOF
# IPMI BMC of lab host $NAME (scripts/lab-bmc.sh). RMCP+ only for admin: cipher suite 3.
name "$NAME"
set_working_mc $MC
  startlan 1
    addr $ADDR $PORT
    priv_limit admin
    allowed_auths_callback md5
    allowed_auths_user md5
    allowed_auths_operator md5
    allowed_auths_admin md5
    guid $(printf '%s' "$NAME" | md5sum | cut -c1-32)
  endlan
  chassis_control "$d/chassis-control $MC"
  user 2 true "$USER_NAME" "$PASSWORD" admin 10 md5
EOF
  cat >"$d/emu.cmds" <<EOF
mc_add $MC 0 no-device-sdrs 0x23 9 8 0x9f 0x1291 0xf02 persist_sdr
sel_enable $MC 1000 0x0a
mc_setbmc $MC
mc_enable $MC
EOF
  cat >"$d/bmc.env" <<EOF
NAME=$NAME
ADDR=$ADDR
PORT=$PORT
USER=$USER_NAME
PASSWORD=$PASSWORD
POWER_SCRIPT=$POWER
EOF
  # ipmi_sim runs this through `sh -c "DIR/chassis-control 0x20 get power"`.
  cat >"$d/chassis-control" <<EOF
#!/bin/sh
exec bash "$SELF" __chassis "$d" "\$@"
EOF
  chmod 755 "$d/chassis-control"
}

# Called by ipmi_sim: __chassis DIR MC get power | __chassis DIR MC set power 0|1
chassis() {
  local d=$1 verb=${3:-} what=${4:-} val=${5:-} power t0 out rc=0 arg
  power=$(awk -F= '$1 == "POWER_SCRIPT" { print substr($0, index($0, "=") + 1) }' "$d/bmc.env")
  t0=$(date +%s%N)
  case "$verb $what" in
    "get power") arg=status ;;
    "set power")
      case "$val" in
        0) arg=off ;;
        1) arg=on ;;
        *) echo "chassis-control: bad power value '$val'" >&2 && exit 1 ;;
      esac
      ;;
    *)
      echo "chassis-control: unsupported request: ${*:2}" >&2
      exit 1
      ;;
  esac
  out=$(timeout --kill-after=2 "$POWER_TIMEOUT" "$power" "$arg" </dev/null 2>>"$d/power.log") || rc=$?
  out=$(printf '%s' "$out" | tr -d '[:space:]')
  local ms=$((($(date +%s%N) - t0) / 1000000))
  if [[ "$arg" == status ]]; then
    if ((rc == 0)) && [[ "$out" == 0 || "$out" == 1 ]]; then
      printf '%s status -> %s (%d ms)\n' "$(date +%T.%3N)" "$out" "$ms" >>"$d/power.log"
      echo "power:$out"
      exit 0
    fi
    printf '%s status FAILED: exit %d, output "%s" (%d ms)\n' "$(date +%T.%3N)" "$rc" "$out" "$ms" >>"$d/power.log"
    exit 1
  fi
  if ((rc == 0)); then
    printf '%s %s -> done (%d ms)\n' "$(date +%T.%3N)" "$arg" "$ms" >>"$d/power.log"
    exit 0
  fi
  printf '%s %s FAILED: exit %d (%d ms)\n' "$(date +%T.%3N)" "$arg" "$rc" "$ms" >>"$d/power.log"
  exit 1
}

# ---------------------------------------------------------------------------------------------
# The supervisor (a child subreaper): starts ipmi_sim, reaps it and any orphan, ends it on demand.
supervise() {
  local d=$1 parent=$2
  set +e
  local ipmi_sim addr
  addr=$(awk -F= '$1 == "ADDR" { a = $2 } $1 == "PORT" { p = $2 } END { print a ":" p }' "$d/bmc.env")
  ipmi_sim=$(command -v ipmi_sim) || {
    echo "ipmi_sim not found (Debian package openipmi; run scripts/setup.sh)"
    exit 1
  }
  "$ipmi_sim" -n -c "$d/lan.conf" -f "$d/emu.cmds" -s "$d/state" >>"$d/ipmi_sim.log" 2>&1 </dev/null &
  local sim=$!
  printf 'supervisor %d\nipmi_sim %d\n' $$ "$sim" >"$d/pids.tmp" && mv -f "$d/pids.tmp" "$d/pids"
  echo "supervisor $$: ipmi_sim $sim on $addr"
  local stopping=0
  trap 'stopping=1' TERM INT HUP
  local ppid_now i
  while kill -0 "$sim" 2>/dev/null; do
    if ((stopping)); then break; fi
    ppid_now=$(awk '/^PPid:/ { print $2 }' /proc/$$/status)
    if [[ "$parent" != 0 && "$ppid_now" != "$parent" ]]; then
      echo "supervisor $$: parent $parent is gone"
      break
    fi
    sleep 0.5 &
    wait $!
  done
  rm -f "$d/ready"
  if kill -0 "$sim" 2>/dev/null; then
    echo "supervisor $$: ending ipmi_sim $sim"
    kill -TERM "$sim" 2>/dev/null
    for ((i = 0; i < 50; i++)); do
      kill -0 "$sim" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$sim" 2>/dev/null
  fi
  wait "$sim" 2>/dev/null
  local rc=$?
  echo "supervisor $$: ipmi_sim exited ($rc)"
  rm -f "$d/pids"
  # Our own children (the last sleep); adopted orphans that still run go to whoever adopts them next.
  wait
  exit 0
}

# Starts the supervisor in the background (sets SUP), waits until ipmi_sim answers.
launch() {
  local d=$1 detach=$2
  command -v ipmi_sim >/dev/null || die "ipmi_sim not found (Debian package openipmi; run scripts/setup.sh)"
  command -v perl >/dev/null || die "perl not found"
  local sim
  sim=$(recorded_pid "$d" ipmi_sim)
  if is_ours "$sim" ipmi_sim "$d"; then die "a BMC is already running in $d (stop it first)"; fi
  if udp_bound "$ADDR" "$PORT"; then die "UDP $ADDR:$PORT is already in use here"; fi
  rm -f "$d/pids" "$d/ready"
  write_config "$d"
  local nr parent=$$
  nr=$(prctl_nr)
  [[ "$detach" == 1 ]] && parent=0
  local pre=()
  [[ "$detach" == 1 ]] && pre=(setsid)
  if [[ -n "$nr" ]]; then
    "${pre[@]}" perl -e 'syscall('"$nr"', 36, 1, 0, 0, 0) == 0 or die "prctl(PR_SET_CHILD_SUBREAPER): $!\n"; exec @ARGV or die "exec: $!\n"' \
      bash "$SELF" __supervise "$d" "$parent" >>"$d/supervisor.log" 2>&1 </dev/null &
  else
    "${pre[@]}" bash "$SELF" __supervise "$d" "$parent" >>"$d/supervisor.log" 2>&1 </dev/null &
  fi
  SUP=$!
  local deadline=$((SECONDS + READY_TIMEOUT))
  while :; do
    if ! kill -0 "$SUP" 2>/dev/null; then
      tail -n 20 "$d/supervisor.log" "$d/ipmi_sim.log" >&2 2>/dev/null
      die "the BMC died during start-up"
    fi
    sim=$(recorded_pid "$d" ipmi_sim)
    if [[ -n "$sim" ]] && udp_bound "$ADDR" "$PORT"; then
      # A real IPMI 2.0 session (Get Device ID; the power script is not called).
      if ! command -v ipmitool >/dev/null ||
        timeout 5 ipmitool -I lanplus -C 3 -N 1 -R 1 -H "$ADDR" -p "$PORT" -U "$USER_NAME" -P "$PASSWORD" mc info >/dev/null 2>&1; then
        break
      fi
    fi
    if ((SECONDS >= deadline)); then
      tail -n 20 "$d/supervisor.log" "$d/ipmi_sim.log" >&2 2>/dev/null
      stop_bmc "$d"
      die "ipmi_sim did not answer on $ADDR:$PORT within ${READY_TIMEOUT}s"
    fi
    sleep 0.1
  done
  echo "$ADDR $PORT" >"$d/ready.tmp" && mv -f "$d/ready.tmp" "$d/ready"
  log "BMC $NAME ready on $ADDR:$PORT/udp (ipmi_sim $sim)"
}

stop_bmc() {
  local d=$1 sup sim i
  sup=$(recorded_pid "$d" supervisor)
  sim=$(recorded_pid "$d" ipmi_sim)
  if is_ours "$sup" __supervise "$d"; then kill -TERM "$sup" 2>/dev/null || true; fi
  for ((i = 0; i < 60; i++)); do
    is_ours "$sup" __supervise "$d" || is_ours "$sim" ipmi_sim "$d" || break
    # No supervisor (killed hard): end ipmi_sim ourselves.
    if ! is_ours "$sup" __supervise "$d" && is_ours "$sim" ipmi_sim "$d"; then
      kill -TERM "$sim" 2>/dev/null || true
    fi
    sleep 0.1
  done
  if is_ours "$sim" ipmi_sim "$d"; then kill -KILL "$sim" 2>/dev/null || true; fi
  if is_ours "$sup" __supervise "$d"; then kill -KILL "$sup" 2>/dev/null || true; fi
  rm -f "$d/ready" "$d/pids"
  return 0
}

fence_opts() {
  local d=$1 action=${2:-}
  [[ -f "$d/bmc.env" ]] || die "$d/bmc.env missing (no BMC was started in $d)"
  local ADDR PORT USER PASSWORD
  ADDR=$(awk -F= '$1 == "ADDR" { print $2 }' "$d/bmc.env")
  PORT=$(awk -F= '$1 == "PORT" { print $2 }' "$d/bmc.env")
  USER=$(awk -F= '$1 == "USER" { print $2 }' "$d/bmc.env")
  PASSWORD=$(awk -F= '$1 == "PASSWORD" { print $2 }' "$d/bmc.env")
  [[ -n "$action" ]] && echo "action=$action"
  printf 'ip=%s\nipport=%s\nusername=%s\npassword=%s\nlanplus=1\ncipher=3\n' "$ADDR" "$PORT" "$USER" "$PASSWORD"
}

# ---------------------------------------------------------------------------------------------
cmd=${1:-}
case "$cmd" in
  run | start)
    [[ $# -ge 2 ]] || usage
    d=$(canon_dir "$2" 1)
    shift 2
    parse_opts "$@"
    if [[ "$cmd" == start ]]; then
      launch "$d" 1
      cat "$d/ready"
      exit 0
    fi
    stopping=0
    trap 'stopping=1' TERM INT HUP
    launch "$d" 0
    cat "$d/ready"
    while ((stopping == 0)) && kill -0 "$SUP" 2>/dev/null; do
      sleep 0.5 &
      wait $! || true
    done
    if ((stopping)); then stop_bmc "$d"; fi
    wait || true
    ;;
  stop)
    [[ $# -eq 2 ]] || usage
    [[ -d "$2" ]] || exit 0
    d=$(canon_dir "$2" 0)
    stop_bmc "$d"
    ;;
  options)
    [[ $# -ge 2 && $# -le 3 ]] || usage
    d=$(canon_dir "$2" 0)
    fence_opts "$d" "${3:-}"
    ;;
  fence)
    [[ $# -ge 3 ]] || usage
    d=$(canon_dir "$2" 0)
    action=$3
    shift 3
    fa=$(command -v fence_ipmilan || echo /usr/sbin/fence_ipmilan)
    [[ -x "$fa" ]] || die "fence_ipmilan not found (Debian package fence-agents)"
    rc=0
    { fence_opts "$d" "$action" && printf '%s\n' "$@"; } | "$fa" || rc=$?
    exit "$rc"
    ;;
  __supervise) supervise "$2" "$3" ;;
  __chassis)
    shift
    chassis "$@"
    ;;
  -h | --help | help) usage ;;
  *) usage ;;
esac
