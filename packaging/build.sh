#!/usr/bin/env bash
# Builds the release packages: two .deb (cargo-deb) and two .rpm (cargo-generate-rpm) in
# target/packages/ (or $1), then lints them (lintian, rpmlint) when those are installed.
# Needs the tools scripts/setup.sh installs.
#
# The binaries are packaged stripped (Debian policy; lintian and rpmlint flag unstripped
# ones): stripped copies staged in target/pkg-stage/release, so that target/release keeps
# the profile's debug info (`[profile.release] debug = 1`) for benchmarks and profiling.
#
# Usage: packaging/build.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
[[ -f "$HOME/.cargo/env" ]] && source "$HOME/.cargo/env"
target=${CARGO_TARGET_DIR:-target}
out=${1:-$target/packages}
mkdir -p "$out"
cargo build --release --locked -p vigil-agent -p vigil-monitor --bins
stage="$target/pkg-stage"
rm -rf "$stage"
mkdir -p "$stage/release"
for b in vigil-agent vigil-monitor vigilctl; do
  strip --remove-section=.comment -o "$stage/release/$b" "$target/release/$b"
done
for p in vigil-agent vigil-monitor; do
  CARGO_TARGET_DIR="$stage" cargo deb --no-build -p "$p" -o "$out/"
  cargo generate-rpm -p "${p#vigil-}" --target-dir "$stage" -o "$out/"
done
rm -rf "$stage"
ls -l "$out"
if command -v lintian >/dev/null 2>&1; then
  lintian --fail-on error,warning "$out"/vigil-agent_*.deb "$out"/vigil-monitor_*.deb
fi
if command -v rpmlint >/dev/null 2>&1; then
  rpmlint -c packaging/rpm/rpmlint.toml "$out"/vigil-agent-*.rpm "$out"/vigil-monitor-*.rpm
fi
