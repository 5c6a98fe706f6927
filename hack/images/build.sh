#!/usr/bin/env bash
# Builds gpumarket's container images without a container engine or registry, as OCI image
# archives that `ctr images import` and `crane push` take:
#   pause       registry.k8s.io/pause:<the version Kubernetes pins>, from the pinned
#               k8s.io/kubernetes module's build/pause/linux/pause.c, static
#   controller  the chart's controller image: the release binary, the libraries it links,
#               CA certificates; USER and ENTRYPOINT read from controller/Dockerfile
#   agent       the chart's supplier agent image, the same way from device-plugin/Dockerfile
#   ray         Debian bookworm (debootstrap minbase) + Python 3 + ray[default] at the version
#               examples/gpucluster.yaml pins (large: ~10 min cold)
# The Dockerfiles build the same images with Docker (`docker build -f controller/Dockerfile .`).
#
# Usage: hack/images/build.sh <image>...
# Progress goes to stderr; stdout gets one line per image, <image>=<archive path>.
#
# Each archive is cached under ${GPUMARKET_CACHE:-~/.cache/gpumarket}/images/, named by a
# hash of everything that goes into it (the recipe, the Dockerfile, the binary and libraries,
# the sources and pinned versions), and reused when present.
#
# Archive layout: an OCI image layout (oci-layout, index.json, blobs/sha256/...) whose index
# names the image with io.containerd.image.name (what `ctr images import` reads; a bare
# org.opencontainers.image.ref.name tag would be imported under an import-<date> prefix),
# plus a Docker manifest.json over the same blobs (what crane and `docker load` read), as
# `docker save` writes since Docker 25.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cache="${GPUMARKET_CACHE:-$HOME/.cache/gpumarket}"
images="$cache/images"

log() { printf '[images] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

(($#)) || die "usage: hack/images/build.sh pause|controller|agent|ray..."
for tool in jq sha256sum gzip tar; do
  command -v "$tool" >/dev/null || die "$tool not found on PATH"
done
crane="$(command -v crane || echo "${GPUMARKET_TOOLS_BIN:-$cache/tools/bin}/crane")"
[[ -x "$crane" ]] || die "crane not found: build it with hack/tools/build.sh"
mkdir -p "$images"
# Leftovers of interrupted runs (a run in progress holds its own for far less than a day).
find "$images" -maxdepth 1 -name '.tmp.*' -mmin +1440 -exec rm -rf {} +
tmp_root="$(mktemp -d "$images/.tmp.XXXXXX")"
trap 'rm -rf "$tmp_root"' EXIT

case "$(uname -m)" in
  x86_64) arch=amd64 ;;
  aarch64) arch=arm64 ;;
  *) die "unsupported architecture $(uname -m)" ;;
esac

sha() { sha256sum "$@" | cut -d' ' -f1; }
# key <input>...: the hash of the inputs (files are hashed by content, other words as they are).
key() {
  local input
  for input in "$@"; do
    if [[ -f "$input" ]]; then echo "file $(sha "$input")"; else echo "word $input"; fi
  done | sha | cut -c1-16
}

# tar_layer <rootfs> <out.tar> [--keep-owners]: a reproducible tar of the rootfs (sorted,
# zero mtimes); files are owned by root unless --keep-owners.
tar_layer() {
  local rootfs="$1" out="$2" owners=(--owner=0 --group=0)
  [[ "${3:-}" == --keep-owners ]] && owners=()
  local entries
  mapfile -t entries < <(cd "$rootfs" && ls -A)
  tar -C "$rootfs" --sort=name --mtime=@0 --numeric-owner "${owners[@]}" \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    -cf "$out" "${entries[@]}"
}

# blob <file> <dir>: moves the file into <dir>/blobs/sha256/<digest>; prints the digest.
blob() {
  local digest
  digest="$(sha "$1")"
  mkdir -p "$2/blobs/sha256"
  mv "$1" "$2/blobs/sha256/$digest"
  echo "$digest"
}

# oci_archive <out> <ref> <rootfs> <config> [--keep-owners]: writes the image archive with one
# layer holding <rootfs>; <config> is the image's runtime config as JSON (User, Entrypoint, ...).
oci_archive() {
  local out="$1" ref="$2" rootfs="$3" config="$4" keep="${5:-}"
  local work="$tmp_root/oci" tag="${2##*:}"
  rm -rf "$work"
  mkdir -p "$work/layout"
  tar_layer "$rootfs" "$work/layer.tar" $keep
  local diff_id layer layer_size
  diff_id="$(sha "$work/layer.tar")"
  gzip -n "$work/layer.tar"
  layer_size="$(stat -c %s "$work/layer.tar.gz")"
  layer="$(blob "$work/layer.tar.gz" "$work/layout")"

  jq -n --arg arch "$arch" --arg diff "sha256:$diff_id" --argjson config "$config" \
    --arg by "hack/images/build.sh $ref" '{
      architecture: $arch, os: "linux", created: "1970-01-01T00:00:00Z", config: $config,
      rootfs: {type: "layers", diff_ids: [$diff]},
      history: [{created: "1970-01-01T00:00:00Z", created_by: $by}]
    }' >"$work/config.json"
  local config_size config_digest
  config_size="$(stat -c %s "$work/config.json")"
  config_digest="$(blob "$work/config.json" "$work/layout")"

  jq -n --arg c "sha256:$config_digest" --argjson cs "$config_size" \
    --arg l "sha256:$layer" --argjson ls "$layer_size" '{
      schemaVersion: 2, mediaType: "application/vnd.oci.image.manifest.v1+json",
      config: {mediaType: "application/vnd.oci.image.config.v1+json", digest: $c, size: $cs},
      layers: [{mediaType: "application/vnd.oci.image.layer.v1.tar+gzip", digest: $l, size: $ls}]
    }' >"$work/manifest.json"
  local manifest_size manifest_digest
  manifest_size="$(stat -c %s "$work/manifest.json")"
  manifest_digest="$(blob "$work/manifest.json" "$work/layout")"

  jq -n --arg m "sha256:$manifest_digest" --argjson ms "$manifest_size" --arg ref "$ref" \
    --arg tag "$tag" --arg arch "$arch" '{
      schemaVersion: 2, mediaType: "application/vnd.oci.image.index.v1+json",
      manifests: [{
        mediaType: "application/vnd.oci.image.manifest.v1+json", digest: $m, size: $ms,
        platform: {architecture: $arch, os: "linux"},
        annotations: {"io.containerd.image.name": $ref, "org.opencontainers.image.ref.name": $tag}
      }]
    }' >"$work/layout/index.json"
  echo '{"imageLayoutVersion":"1.0.0"}' >"$work/layout/oci-layout"
  jq -n --arg c "blobs/sha256/$config_digest" --arg l "blobs/sha256/$layer" --arg ref "$ref" \
    '[{Config: $c, RepoTags: [$ref], Layers: [$l]}]' >"$work/layout/manifest.json"

  tar -C "$work/layout" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner \
    -cf "$out" oci-layout index.json manifest.json blobs
}

# cached_file <file> <builder> [args]: builds <file> with `<builder> <tmp file> [args]` unless it
# is there. One build per file at a time: a second caller waits, then finds it built.
cached_file() {
  local file="$1" builder="$2" lock
  shift 2
  mkdir -p "$images/.locks"
  exec {lock}>"$images/.locks/$(basename "$file")"
  flock "$lock"
  if [[ -f "$file" ]]; then
    log "cached: $file"
  else
    local start=$SECONDS tmp="$tmp_root/$(basename "$file")"
    "$builder" "$tmp" "$@"
    if [[ "$file" == *.oci.tar ]]; then
      # A second implementation reads it back: digests, sizes and diff_ids must all agree.
      local validated
      validated="$("$crane" validate --tarball "$tmp")"
      log "crane validate: ${validated%%:*}"
    fi
    mv -f "$tmp" "$file"
    log "built $(basename "$file") in $((SECONDS - start)) s ($(du -h "$file" | cut -f1))"
  fi
  exec {lock}>&-
}

# image <image> <key> <builder> [args]: prints <image>=<archive> once the archive is built.
image() {
  local archive="$images/$1-$2.oci.tar"
  cached_file "$archive" "${@:3}"
  echo "$1=$archive"
}

# recipe <function>...: the source of the shell functions that build an image, for its key
# (so that editing one recipe rebuilds only its images).
recipe() {
  declare -f "$@" tar_layer blob oci_archive
}

# --- pause ---------------------------------------------------------------------------------
# The pinned Kubernetes module (hack/tools/kubernetes) carries pause.c and the version its
# Makefile tags; kubeadm's PauseVersion is what kubelet's sandbox is expected to run.
build_pause_archive() {
  local out="$1" src="$2" tag="$3" k8s="$4" ref="$5"
  command -v gcc >/dev/null || die "gcc not found (apt-get install build-essential)"
  local rootfs="$tmp_root/pause-rootfs"
  mkdir -p "$rootfs"
  log "compiling pause $tag (static)"
  # As build/pause/Makefile: CFLAGS = -Os -Wall -Werror -static -DVERSION=v$(TAG)-$(REV).
  gcc -Os -Wall -Werror -static -DVERSION="v$tag-$k8s" -o "$rootfs/pause" "$src/linux/pause.c"
  strip "$rootfs/pause"
  # As build/pause/Dockerfile.
  oci_archive "$out" "$ref" "$rootfs" '{"User": "65535:65535", "Entrypoint": ["/pause"]}'
}

pause() {
  local k8s_dir k8s src tag kubeadm_tag
  k8s="$(awk '$1 == "require" && $2 == "k8s.io/kubernetes" { print $3 }' \
    "$root/hack/tools/kubernetes/go.mod")"
  [[ -n "$k8s" ]] || die "no k8s.io/kubernetes pin in hack/tools/kubernetes/go.mod"
  k8s_dir="$(cd "$root/hack/tools/kubernetes" && GOWORK=off GOFLAGS=-mod=readonly \
    go mod download -json k8s.io/kubernetes | jq -er .Dir)"
  src="$k8s_dir/build/pause"
  tag="$(awk '$1 == "TAG" && $2 == "?=" { print $3 }' "$src/Makefile")"
  kubeadm_tag="$(sed -n 's/^\s*PauseVersion = "\(.*\)"$/\1/p' "$k8s_dir/cmd/kubeadm/app/constants/constants.go")"
  [[ -n "$tag" && "$tag" == "$kubeadm_tag" ]] ||
    die "pause version: build/pause/Makefile says '$tag', kubeadm's PauseVersion '$kubeadm_tag'"
  local ref="registry.k8s.io/pause:$tag"
  image pause "$(key "$(recipe build_pause_archive)" "$src/linux/pause.c" "$ref" "$k8s" \
    "$(gcc --version | head -n1)")" build_pause_archive "$src" "$tag" "$k8s" "$ref"
}

# --- controller and agent --------------------------------------------------------------------
# chart_image <component>: <repository>:<tag> the chart deploys by default (values.yaml's
# <component>.image.repository, tag defaulting to Chart.yaml's appVersion).
chart_image() {
  local repo tag version
  read -r repo tag < <(awk -v c="$1:" '
    /^[^ #]/ { in_c = ($1 == c) }
    in_c && $1 == "repository:" { repo = $2 }
    in_c && $1 == "tag:" { tag = $2; print repo, tag; exit }' "$root/charts/gpumarket/values.yaml")
  [[ -n "$repo" ]] || die "no $1.image.repository in charts/gpumarket/values.yaml"
  tag="${tag//\"/}"
  version="$(awk '$1 == "appVersion:" { gsub(/"/, "", $2); print $2 }' "$root/charts/gpumarket/Chart.yaml")"
  echo "$repo:${tag:-$version}"
}

# dockerfile_config <Dockerfile>: USER and ENTRYPOINT (exec form) of its last stage, as the
# image config JSON.
dockerfile_config() {
  local user entrypoint
  user="$(awk '$1 == "USER" { u = $2 } END { print u }' "$1")"
  entrypoint="$(awk '$1 == "ENTRYPOINT" { $1 = ""; e = $0 } END { print e }' "$1")"
  [[ -n "$user" && -n "$entrypoint" ]] || die "$1 has no USER or no ENTRYPOINT"
  jq -cn --arg user "$user" --argjson entrypoint "$entrypoint" \
    '{User: $user, Entrypoint: $entrypoint, Env: ["PATH=/usr/local/bin:/usr/bin:/bin"]}' ||
    die "$1: ENTRYPOINT must be in exec form (a JSON array)"
}

# libraries <binary>...: the shared libraries they load (and the loader), by path.
libraries() {
  local binary
  for binary; do ldd "$binary"; done |
    awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u
}

# build_binary_archive <out> <binary> <ref> <config> [<more binaries>...]: the binary as the
# entrypoint, more binaries beside it, and the libraries they load.
build_binary_archive() {
  local out="$1" binary="$2" ref="$3" config="$4"
  local more=("${@:5}") rootfs="$tmp_root/rootfs" lib dest extra
  dest="$(jq -r '.Entrypoint[0]' <<<"$config")"
  rm -rf "$rootfs"
  mkdir -p "$rootfs/$(dirname "$dest")" "$rootfs/etc/ssl/certs" "$rootfs/tmp"
  install -m 0755 "$binary" "$rootfs$dest"
  for extra in "${more[@]}"; do
    install -m 0755 "$extra" "$rootfs$(dirname "$dest")/$(basename "$extra")"
  done
  while read -r lib; do
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
  done < <(libraries "$binary" "${more[@]}")
  # Debian's Mozilla bundle only: not the build machine's local CAs (/usr/local/share/...).
  cat /usr/share/ca-certificates/mozilla/*.crt >"$rootfs/etc/ssl/certs/ca-certificates.crt"
  # As distroless: root and the nonroot user (65532) the Dockerfile's USER names.
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' \
    >"$rootfs/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' >"$rootfs/etc/group"
  chmod 1777 "$rootfs/tmp"
  oci_archive "$out" "$ref" "$rootfs" "$config"
}

# rust_image <image> <crate dir> <binary> <chart component> [<more binaries>...]
rust_image() {
  local image="$1" dir="$2" bin="$3" component="$4" more=() extra
  command -v cargo >/dev/null || die "cargo not found"
  # All binaries in one build, always: the dependencies' features are unified the same way
  # every time, so building one image never recompiles what the other's build left.
  log "cargo build --release (gpumarket-controller, gpumarket-device-plugin, gpumarket-fleet)"
  (cd "$root" && cargo build --release --locked -q -p gpumarket-controller \
    --bin gpumarket-controller -p gpumarket-device-plugin --bin gpumarket-device-plugin \
    --bin gpumarket-fleet)
  local target="${CARGO_TARGET_DIR:-$root/target}" dockerfile="$root/$dir/Dockerfile" config ref
  local binary="$target/release/$bin"
  for extra in "${@:5}"; do more+=("$target/release/$extra"); done
  [[ -d /usr/share/ca-certificates/mozilla ]] || die "no CA certificates (apt-get install ca-certificates)"
  config="$(dockerfile_config "$dockerfile")"
  ref="$(chart_image "$component")"
  local inputs=("$(recipe build_binary_archive libraries)" "$dockerfile" "$binary" "${more[@]}"
    "$ref" "$config" /usr/share/ca-certificates/mozilla/*.crt)
  mapfile -t -O ${#inputs[@]} inputs < <(libraries "$binary" "${more[@]}")
  image "$image" "$(key "${inputs[@]}")" build_binary_archive "$binary" "$ref" "$config" "${more[@]}"
}

# --- ray -------------------------------------------------------------------------------------
# A CPU Ray image for local clusters: Debian bookworm minbase, Python 3 in a venv at /opt/ray,
# ray[default] from PyPI, user ray (1000, group users) as in rayproject/ray; bash and wget for
# KubeRay's start command and probes. Needs root (debootstrap, chroot) and deb.debian.org/PyPI.
debian_suite=bookworm
debian_mirror=http://deb.debian.org/debian

build_debian_base() {
  local out="$1" rootfs="$tmp_root/debian"
  command -v debootstrap >/dev/null ||
    die "debootstrap not found (apt-get install debootstrap; hack/dev.sh installs it)"
  [[ "$(id -u)" -eq 0 ]] || die "debootstrap and chroot need root"
  log "debootstrap --variant=minbase $debian_suite (a few minutes)"
  debootstrap --variant=minbase "$debian_suite" "$rootfs" "$debian_mirror" >&2
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" --numeric-owner -cf "$out" .
}

build_ray_archive() {
  local out="$1" base="$2" version="$3" ref="$4" rootfs="$tmp_root/ray-rootfs"
  rm -rf "$rootfs"
  mkdir -p "$rootfs"
  tar -C "$rootfs" --numeric-owner -xf "$base"
  cp /etc/resolv.conf "$rootfs/etc/resolv.conf"
  log "apt-get install python3 python3-venv wget ca-certificates"
  chroot "$rootfs" /bin/sh -ec '
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3 python3-venv wget ca-certificates >/dev/null
    apt-get clean
    rm -rf /var/lib/apt/lists/*
    useradd --uid 1000 --gid users --create-home --shell /bin/bash ray' >&2
  log "pip install ray[default]==$version (a few minutes)"
  # pip trusts the build machine's CAs (a proxy's, say) while it runs; the image keeps
  # Debian's. The index is the build machine's (PIP_INDEX_URL) if it names one.
  cp -L /etc/ssl/certs/ca-certificates.crt "$rootfs/tmp/build-ca.crt"
  chroot "$rootfs" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root LANG=C.UTF-8 \
    PIP_CERT=/tmp/build-ca.crt PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ${PIP_INDEX_URL:+PIP_INDEX_URL="$PIP_INDEX_URL"} /bin/sh -ec "
    python3 -m venv /opt/ray
    /opt/ray/bin/pip install --no-cache-dir --progress-bar off -q 'ray[default]==$version'
    /opt/ray/bin/ray --version" >&2
  rm -rf "$rootfs/tmp/build-ca.crt" "$rootfs/root/.cache"
  : >"$rootfs/etc/resolv.conf"
  oci_archive "$out" "$ref" "$rootfs" '{
    "User": "1000:100", "WorkingDir": "/home/ray", "Cmd": ["/bin/bash"],
    "Env": ["PATH=/opt/ray/bin:/usr/local/bin:/usr/bin:/bin", "HOME=/home/ray", "LANG=C.UTF-8"]
  }' --keep-owners
}

ray() {
  local version base
  version="$(awk '$1 == "ray:" { r = 1 } r && $1 == "version:" { print $2; exit }' \
    "$root/examples/gpucluster.yaml")"
  [[ -n "$version" ]] || die "no spec.ray.version in examples/gpucluster.yaml"
  base="$images/debian-$debian_suite-minbase-$(key "$(declare -f build_debian_base)" \
    "$debian_suite" "$debian_mirror").tar"
  cached_file "$base" build_debian_base
  local ref="ghcr.io/gpumarket/ray:$version"
  image ray "$(key "$(recipe build_ray_archive)" "$base" "$ref")" build_ray_archive "$base" "$version" "$ref"
}

# --- main --------------------------------------------------------------------------------------
for image in "$@"; do
  case "$image" in
    pause) pause ;;
    controller) rust_image controller controller gpumarket-controller controller ;;
    agent) rust_image agent device-plugin gpumarket-device-plugin agent gpumarket-fleet ;;
    ray) ray ;;
    *) die "unknown image '$image' (pause, controller, agent, ray)" ;;
  esac
done
