#!/usr/bin/env bash
# Builds gpumarket-validator (a real Agave test validator, see src/main.rs) once into the cache:
#   $GPUMARKET_CACHE/tools/gpumarket-validator-<hash>/gpumarket-validator
#   $GPUMARKET_CACHE/tools/bin/gpumarket-validator -> the above
# <hash> = first 12 hex of sha256(Cargo.toml + Cargo.lock + src/main.rs): rebuilt only when the
# source changes, otherwise a no-op. Cold build: ~34 min on 2 busy cores, 2.4 GB target dir
# (kept at $GPUMARKET_CACHE/solana-validator-target so later rebuilds are incremental).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${GPUMARKET_CACHE:-$HOME/.cache/gpumarket}"
hash="$(cat "$here/Cargo.toml" "$here/Cargo.lock" "$here/src/main.rs" | sha256sum | cut -c1-12)"
dest="$cache/tools/gpumarket-validator-$hash"
bin="$dest/gpumarket-validator"
link="$cache/tools/bin/gpumarket-validator"

log() { echo "[validator] $*" >&2; }

publish_link() {
  mkdir -p "$cache/tools/bin"
  ln -sfn "../gpumarket-validator-$hash/gpumarket-validator" "$link" # relative, like the others
}

if [[ -x "$bin" ]]; then
  publish_link
  log "cached: $link -> $bin"
  exit 0
fi

# Native build dependencies: libclang for bindgen (RocksDB bindings); C/C++ compilers, make
# and perl for the bundled RocksDB, OpenSSL (vendored), protobuf (protobuf-src) and jemalloc.
missing=()
for pkg in libclang-dev build-essential perl; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
  sudo=""
  [[ "$(id -u)" -eq 0 ]] || sudo="sudo"
  log "installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

export CARGO_TARGET_DIR="$cache/solana-validator-target"
log "building $hash into $CARGO_TARGET_DIR (first time ~30 min)..."
start=$SECONDS
cargo build --release --locked --manifest-path "$here/Cargo.toml"
log "cargo build finished in $((SECONDS - start)) s"

mkdir -p "$dest"
tmp="$dest/.gpumarket-validator.tmp.$$"
cp "$CARGO_TARGET_DIR/release/gpumarket-validator" "$tmp"
mv -f "$tmp" "$bin"
publish_link
log "built: $link -> $bin"
