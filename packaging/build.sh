#!/usr/bin/env bash
# Builds the release packages: two .deb (cargo-deb) and two .rpm (cargo-generate-rpm) in
# target/packages/ (or $1). Needs the tools scripts/setup.sh installs.
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
for p in vigil-agent vigil-monitor; do
  cargo deb --no-build -p "$p" -o "$out/"
  cargo generate-rpm -p "${p#vigil-}" --target-dir "$target" -o "$out/"
done
ls -l "$out"
