#!/usr/bin/env bash
# gpumarket's two entry points, for a fresh machine or a warm one:
#   hack/dev.sh demo   the local environment (control plane, a real node, KWOK GPU nodes, Solana
#                      validator), the chart on the real node, simulated suppliers, a buyer's
#                      Ray cluster running and a first job on it; runs until Ctrl-C (needs root)
#   hack/dev.sh test   the whole test suite (what .ci/run calls)
# Everything slow is cached outside the checkout under ${GPUMARKET_CACHE:-~/.cache/gpumarket}:
# Kubernetes tools (hack/tools/build.sh), the validator (hack/solana-validator/build.sh) and
# the cargo target directory. Extra arguments after `demo` go to `gpumarket-env up`.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${GPUMARKET_CACHE:-$HOME/.cache/gpumarket}"
export GPUMARKET_CACHE="$cache"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$cache/target}"
cd "$root"

step() { printf '\n==> [%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Debian packages the builds and tests need: jq (tool build script), libclang/compilers/perl
# (validator's RocksDB), debootstrap (the ray image of hack/images/build.sh), libseccomp-dev
# (runc), iptables (the real node tests check it is left clean), curl (the Ray job test talks to
# Ray's dashboard).
install_packages() {
  local missing=()
  for pkg in jq build-essential libclang-dev perl pkg-config debootstrap libseccomp-dev iptables curl; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  ((${#missing[@]})) || return 0
  step "installing Debian packages: ${missing[*]}"
  local sudo=""
  [[ "$(id -u)" -eq 0 ]] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

prepare() {
  command -v cargo >/dev/null || die "cargo not found: install Rust with rustup (https://rustup.rs)"
  command -v go >/dev/null || die "go not found: install Go >= 1.26 (https://go.dev/dl)"
  install_packages
  step "Kubernetes and Argo CD tools (cached after the first build, ~35 min cold)"
  eval "$(hack/tools/build.sh)"
  step "Solana test validator (cached after the first build, ~35 min cold)"
  hack/solana-validator/build.sh
  export PATH="$GPUMARKET_TOOLS_BIN:$PATH"
  export GPUMARKET_TOOLS_BIN
  forget_other_checkouts
}

# Cargo keeps a workspace crate fresh when the checkout moves, but paths it compiled in
# (env!("CARGO_MANIFEST_DIR")) still point at the old one: rebuild our own crates (not the
# dependencies) when the cached target was built from another path.
forget_other_checkouts() {
  local stamp="$CARGO_TARGET_DIR/.gpumarket-checkout"
  [[ -f "$stamp" && "$(cat "$stamp")" == "$root" ]] && return 0
  if [[ -d "$CARGO_TARGET_DIR" ]]; then
    step "cached build came from another checkout: rebuilding gpumarket's own crates"
    local pkg
    for pkg in $(cargo metadata --no-deps --format-version 1 | jq -r '.packages[].name'); do
      cargo clean -q -p "$pkg"
    done
  fi
  mkdir -p "$CARGO_TARGET_DIR"
  printf '%s' "$root" >"$stamp"
}

case "${1:-}" in
  demo)
    shift
    prepare
    step "building gpumarket"
    cargo build --release --bins
    step "container images (controller, agent, Ray from PyPI; ~25 min cold, cached)"
    hack/images/build.sh pause controller agent ray >/dev/null
    step "starting the local environment (Ctrl-C stops it and cleans up)"
    exec "$CARGO_TARGET_DIR/release/gpumarket-env" up --demo "$@"
    ;;
  test)
    prepare
    step "building the workspace and its tests"
    cargo build --workspace --all-targets
    step "container images (release build of controller and agent, Ray from PyPI; ~25 min cold, cached)"
    hack/images/build.sh pause controller agent ray >/dev/null
    step "running the tests"
    cargo test --workspace --no-fail-fast
    ;;
  *)
    die "usage: hack/dev.sh demo|test"
    ;;
esac
