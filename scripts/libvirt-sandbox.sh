#!/usr/bin/env bash
# A private libvirtd "sandbox" for tests and the demo: a virtlogd + libvirtd pair whose whole
# state (/run, /var/lib/libvirt, /var/log/libvirt, /var/cache/libvirt, /etc/libvirt) lives under
# one directory, in a private mount namespace. It neither needs nor touches a system libvirtd.
#
# Usage:
#   libvirt-sandbox.sh start DIR        start detached; prints the URI (last line) when libvirtd answers
#   libvirt-sandbox.sh run DIR          same, but stay in the foreground as the sandbox's supervisor:
#                                       exits when the sandbox stops, and stops the sandbox on
#                                       SIGTERM/SIGINT/SIGHUP or when its own parent dies (tests use this)
#   libvirt-sandbox.sh stop DIR         destroy all domains, end every process of the sandbox, unmount;
#                                       idempotent, also safe after a crash of start/run
#   libvirt-sandbox.sh domain-xml NAME [MEMORY_MIB] [DISK]
#                                       print a minimal type='qemu' test domain (64 MiB default);
#                                       diskless, or with DISK (a qcow2 file) as virtio vda
#
# The URI is  qemu+unix:///system?socket=DIR/run/libvirt/libvirt-sock  (also written to DIR/uri).
# Layout of DIR: run/ (bound on /run inside), lib/ (/var/lib/libvirt), log/ (/var/log/libvirt),
# cache/ (/var/cache/libvirt), etc/ (/etc/libvirt), pids ("NAME PID" lines: keeper, virtlogd,
# libvirtd), mntns (the namespace's id while it is running), uri.
#
# Process tree: caller -> [run: this script] -> keeper (bash in the private mount namespace, a
# child subreaper, in its own session) -> virtlogd, libvirtd (foreground, no -d) and, adopted by
# the keeper, the QEMU processes that libvirtd daemonizes. The keeper reaps all of them, so nothing
# is left as a zombie even where PID 1 does not reap orphans. With `start` the keeper itself is
# orphaned when this script returns; where PID 1 does not reap, that one keeper stays a zombie
# after `stop` (it holds no resources). Use `run DIR &` from a process that waits for it to avoid it.
#
# Environment:
#   VIGIL_LIBVIRT_CACHE    shared QEMU capabilities cache (default /var/cache/vigil/libvirt-qemu-caps):
#                          seeds DIR's private cache (libvirtd answers after ~0.3 s instead of
#                          ~2 s); filled after a start when it was empty, or refreshed when libvirt
#                          rejected and regenerated the seeded files (QEMU or libvirt changed)
#   VIGIL_SANDBOX_TIMEOUT  seconds to wait for libvirtd to answer (default 180)
#   VIGIL_SANDBOX_STOP_TIMEOUT  seconds to wait after SIGTERM before SIGKILL (default 10)
#   VIGIL_SANDBOX_BIND     "SRC:DST" (start/run): inside the private mount namespace, before
#                          libvirtd starts, bind-mount SRC onto DST (an existing directory or
#                          file). The bind exists only in that namespace and goes away with it.
#                          E.g. each host's own view of shared storage at one common path.
set -euo pipefail

SELF=$(readlink -f "${BASH_SOURCE[0]}")
CACHE=${VIGIL_LIBVIRT_CACHE:-/var/cache/vigil/libvirt-qemu-caps}
START_TIMEOUT=${VIGIL_SANDBOX_TIMEOUT:-180}
STOP_TIMEOUT=${VIGIL_SANDBOX_STOP_TIMEOUT:-10}

log() { printf 'libvirt-sandbox: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

usage() {
  sed -n '5,17s/^# \{0,1\}//p' "$SELF" >&2
  exit 2
}

# Finds a binary on PATH or in the sbin directories (not always on a non-login PATH).
bin() {
  local b=$1 d
  if command -v "$b" >/dev/null 2>&1; then
    command -v "$b"
    return 0
  fi
  for d in /usr/sbin /sbin /usr/bin /bin; do
    if [[ -x "$d/$b" ]]; then
      echo "$d/$b"
      return 0
    fi
  done
  return 1
}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# The absolute, canonical DIR; refuses paths that cannot go into a URI unescaped or that lie
# inside the directories the sandbox mounts over.
canon_dir() {
  local d=$1 create=$2
  [[ -n "$d" ]] || die "DIR is empty"
  if [[ "$create" == 1 ]]; then
    mkdir -p "$d"
  fi
  [[ -d "$d" ]] || die "$d is not a directory"
  d=$(readlink -f "$d")
  [[ "$d" =~ ^/[A-Za-z0-9._/+-]+$ ]] || die "DIR must match [A-Za-z0-9._/+-]: $d"
  local t
  for t in /run /var/run /var/lib/libvirt /var/log/libvirt /var/cache/libvirt /etc/libvirt; do
    if [[ "$d" == "$t" || "$d" == "$t"/* ]]; then
      die "DIR may not be inside $t (the sandbox mounts over it): $d"
    fi
  done
  local sock="$d/run/libvirt/libvirt-sock"
  ((${#sock} < 108)) || die "DIR is too long for a unix socket path ($sock)"
  echo "$d"
}

uri_of() { echo "qemu+unix:///system?socket=$1/run/libvirt/libvirt-sock"; }

# The mount namespace id of the running sandbox ("mnt:[N]"), empty when it is not running.
ns_of() {
  local f=$1/mntns
  if [[ -s "$f" ]]; then cat "$f"; fi
}

# True when PID is alive (not a zombie) and in mount namespace NS.
in_ns() {
  local pid=$1 ns=$2 st
  [[ -n "$ns" && "$pid" =~ ^[0-9]+$ ]] || return 1
  [[ "$(readlink "/proc/$pid/ns/mnt" 2>/dev/null)" == "$ns" ]] || return 1
  st=$(awk '/^State:/ { print $2 }' "/proc/$pid/status" 2>/dev/null) || return 1
  [[ -n "$st" && "$st" != Z ]]
}

# PIDs of all live processes in mount namespace NS.
pids_in_ns() {
  local ns=$1 f pid
  [[ -n "$ns" ]] || return 0
  for f in /proc/[0-9]*/ns/mnt; do
    [[ "$(readlink "$f" 2>/dev/null)" == "$ns" ]] || continue
    pid=${f#/proc/}
    pid=${pid%%/*}
    in_ns "$pid" "$ns" && echo "$pid"
  done
  return 0
}

recorded_pid() { awk -v n="$2" '$1 == n { print $2 }' "$1/pids" 2>/dev/null || true; }

# prctl(PR_SET_CHILD_SUBREAPER) number of the prctl syscall, for perl's syscall().
prctl_nr() {
  case "$(uname -m)" in
    x86_64) echo 157 ;;
    aarch64 | riscv64) echo 167 ;;
    i?86 | armv7l | s390x) echo 172 ;;
    ppc64le | ppc64) echo 171 ;;
    *) echo "" ;;
  esac
}

write_config() {
  local d=$1
  mkdir -p "$d/etc/qemu" "$d/etc/hooks"
  cat >"$d/etc/libvirtd.conf" <<'EOF'
# Private libvirtd of a Vigil test sandbox (scripts/libvirt-sandbox.sh).
listen_tls = 0
listen_tcp = 0
unix_sock_ro_perms = "0777"
unix_sock_rw_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
EOF
  cat >"$d/etc/virtlogd.conf" <<'EOF'
log_outputs = "3:file:/var/log/libvirt/virtlogd.log"
EOF
  cat >"$d/etc/qemu.conf" <<'EOF'
# Private QEMU driver settings of a Vigil test sandbox (scripts/libvirt-sandbox.sh).
# QEMU as root: as libvirt-qemu, which cannot use /dev/kvm here, libvirt re-probes QEMU (~10 s)
# on every domain start. No cgroups, no security driver, no per-domain /dev namespace.
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
cgroup_controllers = [ ]
security_driver = "none"
namespaces = [ ]
EOF
  : >"$d/etc/libvirt.conf"
}

# Seeds the private capabilities cache from the shared one; prints "warm" or "cold".
seed_caps() {
  local d=$1 dst=$1/cache/qemu/capabilities f n=0
  mkdir -p "$dst"
  if [[ -d "$CACHE" ]]; then
    for f in "$CACHE"/*.xml; do
      [[ -f "$f" ]] || continue
      cp -p "$f" "$dst/" && n=$((n + 1))
      cp -p "$f" "$d/cache/.seeded-$(basename "$f")"
    done
  fi
  ((n > 0)) && echo warm || echo cold
}

# Copies the generated capabilities back into the shared cache when it was empty, or when
# libvirt replaced a seeded file (QEMU or libvirt changed). Atomic per file; best effort.
save_caps() {
  local d=$1 src=$1/cache/qemu/capabilities f b have=0
  compgen -G "$src/*.xml" >/dev/null || return 0
  compgen -G "$CACHE/*.xml" >/dev/null && have=1
  mkdir -p "$CACHE" 2>/dev/null || return 0
  for f in "$src"/*.xml; do
    b=$(basename "$f")
    if ((have == 0)) || { [[ -f "$d/cache/.seeded-$b" ]] && ! cmp -s "$f" "$d/cache/.seeded-$b"; }; then
      cp -p "$f" "$CACHE/.$b.$$" && mv -f "$CACHE/.$b.$$" "$CACHE/$b" && log "saved QEMU capabilities to $CACHE/$b"
    fi
  done
  return 0
}

tail_logs() {
  local d=$1 f
  for f in "$d/log/keeper.log" "$d/log/libvirtd.stderr" "$d/log/libvirtd.log" "$d/log/virtlogd.stderr" "$d/log/virtlogd.log"; do
    [[ -s "$f" ]] || continue
    echo "----- tail of $f" >&2
    tail -n 25 "$f" >&2
  done
}

# VIGIL_SANDBOX_BIND="SRC:DST": both absolute paths without ':'; DST must exist (SRC is only
# looked at by the mount itself: it may be a FUSE mount that hangs or fails on purpose).
check_bind() {
  local b=${VIGIL_SANDBOX_BIND:-} src dst
  [[ -n "$b" ]] || return 0
  [[ "$b" == *:* && "$b" != *:*:* ]] || die "VIGIL_SANDBOX_BIND must be SRC:DST: '$b'"
  src=${b%%:*}
  dst=${b#*:}
  [[ "$src" == /* && "$dst" == /* ]] || die "VIGIL_SANDBOX_BIND needs absolute paths: '$b'"
  [[ -e "$dst" ]] || die "VIGIL_SANDBOX_BIND: the mount point $dst does not exist (create it first)"
  return 0
}

# ---------------------------------------------------------------------------------------------
# The keeper: runs inside `unshare --mount`, as a child subreaper, and owns the daemons.
keeper() {
  local d=$1
  set +e
  echo "keeper $$: mounting"
  # /run last: DIR itself cannot be below it, but keep the order safe anyway.
  local pair src dst
  for pair in lib:/var/lib/libvirt log:/var/log/libvirt cache:/var/cache/libvirt etc:/etc/libvirt run:/run; do
    src=$d/${pair%%:*}
    dst=${pair#*:}
    [[ -d "$dst" ]] || mkdir -p "$dst"
    mount --bind "$src" "$dst" || {
      echo "keeper: mount --bind $src $dst failed"
      exit 1
    }
  done
  if [[ -n "${VIGIL_SANDBOX_BIND:-}" ]]; then
    src=${VIGIL_SANDBOX_BIND%%:*}
    dst=${VIGIL_SANDBOX_BIND#*:}
    # Bounded: SRC may be a FUSE mount whose server is switched to "hang".
    timeout -s KILL 20 mount --bind "$src" "$dst" || {
      echo "keeper: VIGIL_SANDBOX_BIND: mount --bind $src $dst failed"
      exit 1
    }
    echo "keeper $$: bound $src on $dst"
  fi
  readlink /proc/$$/ns/mnt >"$d/mntns.tmp" && mv -f "$d/mntns.tmp" "$d/mntns"

  local vl ld
  "$(bin virtlogd)" >>"$d/log/virtlogd.stderr" 2>&1 </dev/null &
  vl=$!
  printf 'keeper %d\nvirtlogd %d\n' $$ "$vl" >"$d/pids.tmp" && mv -f "$d/pids.tmp" "$d/pids"
  local i
  for ((i = 0; i < 100; i++)); do
    [[ -S /run/libvirt/virtlogd-sock ]] && break
    kill -0 "$vl" 2>/dev/null || break
    sleep 0.1
  done
  # libvirtd on one fixed CPU: the host CPUID data that libvirt stores in (and checks against) its
  # QEMU capabilities cache includes the x2APIC id of the CPU the probing thread ran on (leaf
  # 0x1f), so unpinned, every other start found the shared cache "stale" and re-probed (~2 s).
  # QEMU processes are not affected: libvirt gives them all host CPUs.
  local pin=()
  if command -v taskset >/dev/null 2>&1; then
    pin=(taskset -c "$(awk '/^Cpus_allowed_list:/ { split($2, a, /[-,]/); print a[1] }' /proc/$$/status)")
  fi
  "${pin[@]}" "$(bin libvirtd)" >>"$d/log/libvirtd.stderr" 2>&1 </dev/null &
  ld=$!
  printf 'keeper %d\nvirtlogd %d\nlibvirtd %d\n' $$ "$vl" "$ld" >"$d/pids.tmp" && mv -f "$d/pids.tmp" "$d/pids"
  echo "keeper $$: virtlogd $vl, libvirtd $ld"

  local stopping=0
  trap 'stopping=1; kill -TERM "$ld" 2>/dev/null' TERM INT HUP
  while kill -0 "$ld" 2>/dev/null; do
    wait "$ld"
  done
  echo "keeper $$: libvirtd exited (stop requested: $stopping); ending the rest"
  # libvirtd is gone: end whatever is left (virtlogd, QEMU processes we adopted) and reap it.
  local t0=$SECONDS kids p
  kill -TERM "$vl" 2>/dev/null
  while :; do
    kids=()
    # shellcheck disable=SC2013 # PIDs, one word each
    for p in $(grep -l "^PPid:[[:space:]]*$$\$" /proc/[0-9]*/status 2>/dev/null | cut -d/ -f3); do
      [[ "$(awk '/^State:/ { print $2 }' "/proc/$p/status" 2>/dev/null)" =~ ^[^Z]$ ]] && kids+=("$p")
    done
    ((${#kids[@]} == 0)) && break
    if ((SECONDS - t0 >= STOP_TIMEOUT + 5)); then
      kill -KILL "${kids[@]}" 2>/dev/null
    elif ((SECONDS - t0 >= 2)); then
      kill -TERM "${kids[@]}" 2>/dev/null
    fi
    sleep 0.2
  done
  wait
  echo "keeper $$: done"
  exit 0
}

# ---------------------------------------------------------------------------------------------
# A failed start: show why, then end everything that was started.
abort_start() {
  local d=$1
  tail_logs "$d"
  stop_sandbox "$d" >/dev/null 2>&1 || true
  kill -KILL "$KEEPER" 2>/dev/null || true
  wait "$KEEPER" 2>/dev/null || true
  exit 1
}

# Starts the keeper in the background and waits until libvirtd answers. Sets KEEPER.
launch() {
  local d=$1
  bin libvirtd >/dev/null || die "libvirtd not found (run scripts/setup.sh)"
  bin virtlogd >/dev/null || die "virtlogd not found (run scripts/setup.sh)"
  bin qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found (run scripts/setup.sh)"
  bin perl >/dev/null || die "perl not found"
  bin virsh >/dev/null || die "virsh not found (run scripts/setup.sh)"
  bin unshare >/dev/null || die "unshare not found"
  [[ $EUID -eq 0 ]] || die "must run as root (mount namespaces, QEMU as root)"
  check_bind

  local ns
  ns=$(ns_of "$d")
  if [[ -n "$ns" ]] && [[ -n "$(pids_in_ns "$ns")" ]]; then
    die "a sandbox is already running in $d (stop it first)"
  fi
  # Leftovers of an earlier run (stale sockets, pid files) must not confuse this one.
  rm -rf "$d/run" "$d/pids" "$d/mntns" "$d/uri"
  mkdir -p "$d/run" "$d/lib" "$d/log" "$d/cache" "$d/etc"
  chmod 755 "$d/run"
  write_config "$d"
  local caps
  caps=$(seed_caps "$d")

  local nr
  nr=$(prctl_nr)
  local t0
  t0=$(now)
  # setsid: terminal signals meant for the caller do not hit the daemons. perl makes the process
  # a child subreaper (kept across exec) so the QEMU processes libvirtd daemonizes are reparented
  # to, and reaped by, the keeper rather than PID 1; then unshare execs the keeper in place.
  if [[ -n "$nr" ]]; then
    setsid -w perl -e 'syscall('"$nr"', 36, 1, 0, 0, 0) == 0 or die "prctl(PR_SET_CHILD_SUBREAPER): $!\n"; exec @ARGV or die "exec: $!\n"' \
      unshare --mount --propagation private -- bash "$SELF" __keeper "$d" >>"$d/log/keeper.log" 2>&1 </dev/null &
  else
    log "warning: unknown architecture, the keeper is no subreaper (QEMU zombies possible)"
    setsid -w unshare --mount --propagation private -- bash "$SELF" __keeper "$d" >>"$d/log/keeper.log" 2>&1 </dev/null &
  fi
  KEEPER=$!

  local uri sock deadline left
  uri=$(uri_of "$d")
  sock=$d/run/libvirt/libvirt-sock
  deadline=$((SECONDS + START_TIMEOUT))
  while :; do
    if ! kill -0 "$KEEPER" 2>/dev/null; then
      log "error: the sandbox died during start-up"
      abort_start "$d"
    fi
    left=$((deadline - SECONDS))
    if ((left <= 0)); then
      log "error: libvirtd did not answer on $sock within ${START_TIMEOUT}s"
      abort_start "$d"
    fi
    if [[ -S "$sock" ]] && timeout "$left" virsh -q -c "$uri" version >/dev/null 2>&1; then
      break
    fi
    sleep 0.2
  done
  log "libvirtd ready after $(elapsed "$t0") s (QEMU capabilities cache: $caps)"
  save_caps "$d"
  echo "$uri" >"$d/uri.tmp" && mv -f "$d/uri.tmp" "$d/uri"
}

# ---------------------------------------------------------------------------------------------
stop_sandbox() {
  local d=$1
  local ns uri p pid name
  ns=$(ns_of "$d")
  uri=$(uri_of "$d")
  if [[ -n "$ns" ]]; then
    local ld
    ld=$(recorded_pid "$d" libvirtd)
    if [[ -n "$ld" ]] && in_ns "$ld" "$ns" && [[ -S "$d/run/libvirt/libvirt-sock" ]]; then
      for name in $(timeout 15 virsh -q -c "$uri" list --name 2>/dev/null); do
        timeout 15 virsh -q -c "$uri" destroy "$name" >/dev/null 2>&1 || log "virsh destroy $name failed"
      done
    fi
    # QEMU processes of this libvirtd (their pid files), then the daemons.
    for p in "$d"/run/libvirt/qemu/*.pid; do
      [[ -f "$p" ]] || continue
      pid=$(tr -dc 0-9 <"$p" 2>/dev/null) || continue
      if in_ns "$pid" "$ns"; then kill -TERM "$pid" 2>/dev/null || true; fi
    done
    for name in libvirtd virtlogd; do
      p=$(recorded_pid "$d" "$name")
      if in_ns "$p" "$ns"; then kill -TERM "$p" 2>/dev/null || true; fi
    done
    # The keeper exits by itself once its children are gone; escalate if anything lingers.
    local keeper deadline rest
    keeper=$(recorded_pid "$d" keeper)
    deadline=$((SECONDS + STOP_TIMEOUT))
    while :; do
      rest=$(pids_in_ns "$ns")
      [[ -z "$rest" ]] && break
      if ((SECONDS >= deadline)); then
        local others=()
        for p in $rest; do
          [[ "$p" == "$keeper" ]] || others+=("$p")
        done
        if ((${#others[@]} > 0)); then
          log "killing processes that ignored SIGTERM: ${others[*]}"
          kill -KILL "${others[@]}" 2>/dev/null || true
          sleep 1 # let the keeper reap them
        else
          log "killing the keeper $keeper"
          kill -TERM "$keeper" 2>/dev/null || true
          sleep 1
          if in_ns "$keeper" "$ns"; then kill -KILL "$keeper" 2>/dev/null || true; fi
        fi
        deadline=$((SECONDS + 3))
      fi
      sleep 0.1
    done
    rm -f "$d/mntns"
  fi
  # Nothing is mounted outside the namespace by design; clean up should that ever change.
  local m
  # shellcheck disable=SC2013 # DIR has no blanks (canon_dir)
  for m in $(awk -v d="$d" '$2 == d || index($2, d "/") == 1 { print $2 }' /proc/mounts | sort -r); do
    if umount -l "$m" 2>/dev/null; then log "unmounted $m"; fi
  done
  rm -f "$d/uri" "$d/run/libvirt/libvirt-sock" "$d/run/libvirt/libvirt-sock-ro" "$d/run/libvirt/libvirt-admin-sock"
  return 0
}

domain_xml() {
  local name=${1:-} mem=${2:-64} disk=${3:-}
  [[ "$name" =~ ^[A-Za-z0-9_.-]+$ ]] || die "domain name must match [A-Za-z0-9_.-]+: '$name'"
  if ! [[ "$mem" =~ ^[0-9]+$ ]] || ((mem < 16)); then
    die "MEMORY_MIB must be a number >= 16: '$mem'"
  fi
  local disk_xml=""
  if [[ -n "$disk" ]]; then
    [[ "$disk" =~ ^/[A-Za-z0-9._/+-]+$ ]] || die "DISK must be an absolute path of [A-Za-z0-9._/+-]: '$disk'"
    # cache='none' (O_DIRECT) works through vigil-faultfs; error_policy='stop' pauses the
    # guest on an I/O error instead of passing it on.
    disk_xml="
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none' error_policy='stop'/>
      <source file='$disk'/>
      <target dev='vda' bus='virtio'/>
    </disk>"
  fi
  cat <<EOF
<domain type='qemu'>
  <name>$name</name>
  <memory unit='MiB'>$mem</memory>
  <currentMemory unit='MiB'>$mem</currentMemory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
  </os>
  <features>
    <acpi/>
  </features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>${disk_xml}
    <controller type='usb' model='none'/>
    <serial type='pty'>
      <target port='0'/>
    </serial>
    <console type='pty'>
      <target type='serial' port='0'/>
    </console>
    <memballoon model='none'/>
  </devices>
</domain>
EOF
}

# ---------------------------------------------------------------------------------------------
cmd=${1:-}
case "$cmd" in
  start)
    [[ $# -eq 2 ]] || usage
    d=$(canon_dir "$2" 1)
    launch "$d"
    cat "$d/uri"
    ;;
  run)
    [[ $# -eq 2 ]] || usage
    d=$(canon_dir "$2" 1)
    parent=$PPID
    stopping=0
    trap 'stopping=1' TERM INT HUP
    launch "$d"
    cat "$d/uri"
    ppid_now() { awk '/^PPid:/ { print $2 }' /proc/$$/status; }
    while ((stopping == 0)) && kill -0 "$KEEPER" 2>/dev/null; do
      if [[ "$(ppid_now)" != "$parent" ]]; then
        log "the parent process $parent is gone: stopping the sandbox"
        stopping=1
        break
      fi
      sleep 0.5 &
      wait $! || true
    done
    if ((stopping)); then
      stop_sandbox "$d"
    fi
    wait || true
    ;;
  stop)
    [[ $# -eq 2 ]] || usage
    [[ -d "$2" ]] || exit 0
    d=$(canon_dir "$2" 0)
    stop_sandbox "$d"
    ;;
  domain-xml)
    [[ $# -ge 2 && $# -le 4 ]] || usage
    domain_xml "$2" "${3:-64}" "${4:-}"
    ;;
  __keeper)
    keeper "$2"
    ;;
  -h | --help | help) usage ;;
  *) usage ;;
esac
