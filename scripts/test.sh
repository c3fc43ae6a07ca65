#!/usr/bin/env bash
# Installs what is needed (idempotent) and runs the whole test suite: formatting, lints,
# unit, property and end-to-end tests, and every benchmark once at its tiny size.
#
# Usage: ./scripts/test.sh        (as root: the lab and libvirt tests need it)
set -euo pipefail
if [[ $EUID -ne 0 ]]; then
  exec sudo -E "$0" "$@"
fi
cd "$(dirname "$0")/.."

bash scripts/setup.sh
# shellcheck disable=SC1091
[[ -f "$HOME/.cargo/env" ]] && source "$HOME/.cargo/env"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "== cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --no-fail-fast 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# Every benchmark once at its tiny size (a few agents, one run per path), so that none stops
# working unnoticed: the heartbeat-load benchmark once measured a monitor that refused its
# config. Built with the test profile above, so this adds their runs only (~1-2 min).
echo "== benchmarks, tiny (VIGIL_BENCH_TINY=1)"
set +e
VIGIL_BENCH_TINY=1 cargo test --workspace --no-fail-fast --bench '*' 2>&1 | tee -a "$log"
bench_status=${PIPESTATUS[0]}
set -e
if [[ $status -eq 0 ]]; then
  status=$bench_status
fi
# The agent's libvirtd-restart test starts and kills a libvirtd of its own, so it is ignored in
# the run above; here it gets a private mount namespace (its own /run, /etc/libvirt and libvirt
# state dirs), so the machine's libvirtd and the lab's are never touched. QEMU runs as root there,
# as in scripts/libvirt-sandbox.sh: as libvirt-qemu, which cannot use /dev/kvm here, libvirt
# throws its capability cache away on every look and each libvirtd start takes ~15 s, which
# is more than the reconnection budget (the CI failure of 2026-12-07). ~5 s.
echo "== agent: survives a libvirtd restart (private mount namespace)"
set +e
unshare --mount --fork sh -c 'mount -t tmpfs tmpfs /run &&
  for d in /var/lib/libvirt /var/cache/libvirt /var/log/libvirt /etc/libvirt; do
    mkdir -p "$d" && mount -t tmpfs tmpfs "$d" || exit 1
  done &&
  printf "%s\n" "user = \"root\"" "group = \"root\"" "cgroup_controllers = [ ]" \
    "security_driver = \"none\"" "namespaces = [ ]" >/etc/libvirt/qemu.conf &&
  VIGIL_TEST_LIBVIRTD=libvirtd cargo test -p vigil-agent --lib survives_a_libvirtd_restart -- --ignored' \
  2>&1 | tee -a "$log"
libvirtd_status=${PIPESTATUS[0]}
set -e
if [[ $status -eq 0 ]]; then
  status=$libvirtd_status
fi
# Each failing test's panic, last: CI shows the head and the tail of this output only, and a
# failure in the middle of a long run was seen there as its name alone (stop 23).
if [[ $status -ne 0 ]]; then
  echo "== failures (each test's panic message; the whole output is above)"
  awk '/^---- .* stdout ----$/ { name = $2; n = 0; next }
       name != "" && /panicked at/ { print "-- " name ": " $0; n = 8; next }
       n > 0 { if ($0 ~ /^(stack backtrace:|note: |---- |failures:)/) { n = 0; next } print "   " substr($0, 1, 400); n-- }' "$log"
fi
# One closing line with the totals over every test binary (cargo prints one line per binary,
# the last of which is usually the doc-tests' "0 passed").
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$status"
