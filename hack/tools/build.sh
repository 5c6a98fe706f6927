#!/usr/bin/env bash
# Builds the local Kubernetes tools (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, kwok, helm, crane, KubeRay CRDs and operator, argocd-health, and for
# the real node kubelet, kube-proxy, containerd, runc, CNI plugins and CoreDNS) from their Go
# modules, once, into a cache outside the repository keyed by version; reuses what is there.
#
# Pins live in the wrapper modules next to this script (<tool>/go.mod + go.sum); the
# version in each cache directory name is read from the wrapper's go.mod, so bumping a pin
# there builds into a new directory and leaves the old one alone.
#
# Cache layout (root: ${GPUMARKET_CACHE:-$HOME/.cache/gpumarket}):
#   tools/<name>-<version>/bin/<binary>     the binaries
#   tools/kwok-<version>/stages/*.yaml      KWOK stage files, for `kwok -c`
#   tools/kuberay-<version>/crds/*.yaml     KubeRay CRDs
#   tools/cni-plugins-<version>/bin/*       CNI plugins (a CNI bin dir of their own)
#   tools/argocd-health-<version>-<hash>/bin/argocd-health   (hash: of the wrapper's files)
#   tools/bin/<binary>                      symlinks to the pinned versions (one PATH entry)
#
# Progress goes to stderr; stdout gets exactly one line, GPUMARKET_TOOLS_BIN=<dir>, so
# `eval "$(hack/tools/build.sh)"` works.
# Set GPUMARKET_TOOLS_RETRY_KUBERAY=1 to retry a KubeRay operator build that failed before.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${GPUMARKET_CACHE:-$HOME/.cache/gpumarket}"
tools="$cache/tools"
stable_bin="$tools/bin"

log() { printf '[tools] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

command -v go >/dev/null || die "go not found on PATH (Go >= 1.26 is needed)"

mkdir -p "$tools" "$stable_bin"

# One build at a time per cache: a second caller waits, then finds everything cached.
exec 9>"$tools/.lock"
flock 9

# Temporary build output lives inside the cache so the final mv stays on one filesystem.
# Leftovers of an interrupted run are never taken as done; drop them (we hold the lock).
rm -rf "$tools"/.tmp.*
tmp_root="$(mktemp -d "$tools/.tmp.XXXXXX")"
trap 'rm -rf "$tmp_root"' EXIT

# Reproducible builds from the committed go.mod/go.sum: no go.work, no go.mod rewrites,
# static binaries (no C toolchain needed).
export GOWORK=off CGO_ENABLED=0
export GOFLAGS="-mod=readonly -buildvcs=false -trimpath"

# pin <wrapper-dir> <module>: the version the wrapper's go.mod requires (no go invocation).
pin() {
  local v
  v="$(awk -v m="$2" '$1 == m { print $2; exit } $1 == "require" && $2 == m { print $3; exit }' \
    "$here/$1/go.mod")"
  [[ -n "$v" ]] || die "no requirement on $2 in hack/tools/$1/go.mod"
  printf '%s\n' "$v"
}

# module_dir <wrapper-dir> <module>: the module's source dir in the module cache.
module_dir() {
  (cd "$here/$1" && go mod download -json "$2" | jq -er '.Dir')
}

# link <dir>/bin/<binary>: point tools/bin/<binary> at it (relative, replaced atomically).
link() {
  local target="$1" name
  name="$(basename "$target")"
  ln -sfn "../${target#"$tools"/}" "$stable_bin/.$name.new"
  mv -Tf "$stable_bin/.$name.new" "$stable_bin/$name"
}

# build <wrapper-dir> <cache-name> <version> <binary> <package> <estimate> <version-cmd> [ldflags]
# Builds <package> in the wrapper module unless tools/<cache-name>-<version>/bin/<binary>
# exists; checks that the new binary runs <version-cmd>, then moves it into place.
# Environment for one call: CGO_ENABLED, GOFLAGS (-tags), LINK=0 (see below).
build() {
  local wrapper="$1" name="$2" version="$3" binary="$4" pkg="$5" estimate="$6" vcmd="$7"
  local ldflags="-s -w ${8:-}"
  local dest="$tools/$name-$version/bin/$binary"
  if [[ -x "$dest" ]]; then
    log "$binary $version cached"
  else
    log "building $binary $version (first time: $estimate)..."
    local start=$SECONDS out="$tmp_root/$name-$version/$binary"
    mkdir -p "$(dirname "$out")"
    (cd "$here/$wrapper" && go build -ldflags "$ldflags" -o "$out" "$pkg")
    # shellcheck disable=SC2086 # vcmd is a word list such as "--version"
    "$out" $vcmd >/dev/null 2>&1 || die "$binary built but '$binary $vcmd' fails"
    mkdir -p "$(dirname "$dest")"
    mv -f "$out" "$dest"
    log "built $binary $version in $((SECONDS - start)) s"
  fi
  # LINK=0: not on the tools PATH (CNI plugins, found through their own directory).
  [[ "${LINK:-1}" == 0 ]] || link "$dest"
}

# --- etcd --------------------------------------------------------------------------------
etcd_v="$(pin etcd go.etcd.io/etcd/server/v3)"
# The server module's root package is `package main`.
build etcd etcd "$etcd_v" etcd go.etcd.io/etcd/server/v3 "~2 min" --version

# --- Kubernetes ----------------------------------------------------------------------------
k8s_v="$(pin kubernetes k8s.io/kubernetes)"
k8s_minor="${k8s_v#v*.}"; k8s_minor="${k8s_minor%%.*}"
k8s_major="${k8s_v#v}"; k8s_major="${k8s_major%%.*}"
k8s_ldflags=""
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  k8s_ldflags+=" -X $p.gitVersion=$k8s_v -X $p.gitMajor=$k8s_major -X $p.gitMinor=$k8s_minor"
  k8s_ldflags+=" -X $p.gitTreeState=clean"
done
build kubernetes kubernetes "$k8s_v" kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver \
  "~8 min" --version "$k8s_ldflags"
build kubernetes kubernetes "$k8s_v" kube-controller-manager \
  k8s.io/kubernetes/cmd/kube-controller-manager "~2 min" --version "$k8s_ldflags"
build kubernetes kubernetes "$k8s_v" kube-scheduler k8s.io/kubernetes/cmd/kube-scheduler \
  "~1 min" --version "$k8s_ldflags"
build kubernetes kubernetes "$k8s_v" kubectl k8s.io/kubernetes/cmd/kubectl \
  "~1 min" "version --client" "$k8s_ldflags"

build kubernetes kubernetes "$k8s_v" kubelet k8s.io/kubernetes/cmd/kubelet \
  "~3 min" --version "$k8s_ldflags"
build kubernetes kubernetes "$k8s_v" kube-proxy k8s.io/kubernetes/cmd/kube-proxy \
  "~1 min" --version "$k8s_ldflags"

# --- Real node: container runtime, CNI, cluster DNS ---------------------------------------------
containerd_v="$(pin containerd github.com/containerd/containerd/v2)"
# As containerd's Makefile for a Linux build without the optional snapshotters' C libraries.
containerd_ldflags="-X github.com/containerd/containerd/v2/version.Version=$containerd_v"
for binary in containerd ctr containerd-shim-runc-v2; do
  vflag=--version; [[ $binary == containerd-shim-runc-v2 ]] && vflag=-v
  GOFLAGS="$GOFLAGS -tags=no_btrfs,no_devmapper,no_zfs" build containerd containerd \
    "$containerd_v" "$binary" "github.com/containerd/containerd/v2/cmd/$binary" "~2-5 min" \
    "$vflag" "$containerd_ldflags"
done

runc_v="$(pin runc github.com/opencontainers/runc)"
# runc needs cgo (its nsenter part runs before the Go runtime) and libseccomp for seccomp
# profiles (Debian libseccomp-dev, installed by hack/dev.sh).
[[ -f /usr/include/seccomp.h ]] || die "runc needs libseccomp-dev (apt-get install libseccomp-dev)"
CGO_ENABLED=1 GOFLAGS="$GOFLAGS -tags=seccomp" build runc runc "$runc_v" runc \
  github.com/opencontainers/runc "~1 min" --version

cni_v="$(pin cni-plugins github.com/containernetworking/plugins)"
cni_ldflags="-X github.com/containernetworking/plugins/pkg/utils/buildversion.BuildVersion=$cni_v"
for plugin in main/bridge main/loopback ipam/host-local meta/portmap; do
  # Plugins take no flags; CNI_COMMAND=VERSION makes one print its versions and exit 0.
  LINK=0 CNI_COMMAND=VERSION build cni-plugins cni-plugins "$cni_v" "${plugin#*/}" \
    "github.com/containernetworking/plugins/plugins/$plugin" "~30 s" "" "$cni_ldflags"
done
ln -sfn "cni-plugins-$cni_v/bin" "$tools/.cni-bin.new" && mv -Tf "$tools/.cni-bin.new" "$tools/cni-bin"

coredns_v="$(pin coredns github.com/coredns/coredns)"
build coredns coredns "$coredns_v" coredns github.com/coredns/coredns "~5-15 min" -version

# --- KWOK ------------------------------------------------------------------------------------
kwok_v="$(pin kwok sigs.k8s.io/kwok)"
build kwok kwok "$kwok_v" kwok sigs.k8s.io/kwok/cmd/kwok "~2 min" --version
# kwok >= v0.8 has no built-in stages: pass these with `-c`. Same set kwokctl uses by
# default: fast node init, heartbeat with lease, fast pod ready/complete/delete.
# all.yaml holds them all, for a single `-c`.
kwok_stages="$tools/kwok-$kwok_v/stages"
if [[ -f "$kwok_stages/all.yaml" ]]; then
  log "kwok $kwok_v stages cached"
else
  src="$(module_dir kwok sigs.k8s.io/kwok)/kustomize/stage"
  t="$tmp_root/kwok-stages"
  mkdir -p "$t"
  for f in node/fast/node-initialize.yaml \
           node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
           pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    [[ -f "$src/$f" ]] || die "kwok $kwok_v has no kustomize/stage/$f"
    install -m 0644 "$src/$f" "$t/"
    { printf -- '---\n'; cat "$src/$f"; } >>"$t/all.yaml"
  done
  rm -rf "$kwok_stages"
  mv "$t" "$kwok_stages"
  log "kwok $kwok_v stages copied"
fi
ln -sfn "kwok-$kwok_v/stages" "$tools/.kwok-stages.new" && mv -Tf "$tools/.kwok-stages.new" "$tools/kwok-stages"

# --- Helm ------------------------------------------------------------------------------------
helm_v="$(pin helm helm.sh/helm/v3)"
helm_k8s_minor="$(awk '$1 == "k8s.io/client-go" { split($2, a, "."); print a[2]; exit }' "$here/helm/go.mod")"
# As helm's Makefile: version, and the Kubernetes version it assumes by default (that of
# its client-go, v0.N -> 1.N).
helm_ldflags="-X helm.sh/helm/v3/internal/version.version=$helm_v"
helm_ldflags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for p in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
  helm_ldflags+=" -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$helm_k8s_minor"
done
build helm helm "$helm_v" helm helm.sh/helm/v3/cmd/helm "~2 min" version "$helm_ldflags"

# --- crane (OCI image archives for hack/images/build.sh) ---------------------------------------
crane_v="$(pin crane github.com/google/go-containerregistry)"
build crane crane "$crane_v" crane github.com/google/go-containerregistry/cmd/crane "~1 min" version \
  "-X github.com/google/go-containerregistry/cmd/crane/cmd.Version=$crane_v"

# --- KubeRay -------------------------------------------------------------------------------
kuberay_v="$(pin kuberay github.com/ray-project/kuberay/ray-operator)"
kuberay_dir="$tools/kuberay-$kuberay_v"
crds="$kuberay_dir/crds"
if [[ -f "$crds/ray.io_rayservices.yaml" ]]; then
  log "kuberay $kuberay_v CRDs cached"
else
  src="$(module_dir kuberay github.com/ray-project/kuberay/ray-operator)/config/crd/bases"
  t="$tmp_root/kuberay-crds"
  mkdir -p "$t"
  for f in ray.io_rayclusters.yaml ray.io_rayjobs.yaml ray.io_rayservices.yaml; do
    install -m 0644 "$src/$f" "$t/"
  done
  mkdir -p "$kuberay_dir"
  rm -rf "$crds"
  mv "$t" "$crds"
  log "kuberay $kuberay_v CRDs copied"
fi
ln -sfn "kuberay-$kuberay_v/crds" "$tools/.kuberay-crds.new" && mv -Tf "$tools/.kuberay-crds.new" "$tools/kuberay-crds"

# The operator is optional: a failed build is recorded, not fatal, and not retried unless
# GPUMARKET_TOOLS_RETRY_KUBERAY=1.
unavailable="$kuberay_dir/OPERATOR_UNAVAILABLE"
if [[ -f "$unavailable" && "${GPUMARKET_TOOLS_RETRY_KUBERAY:-0}" != 1 ]]; then
  log "kuberay-operator $kuberay_v unavailable: $(head -n 1 "$unavailable")"
else
  rm -f "$unavailable"
  build_log="$tmp_root/kuberay-operator.log"
  # Not `if (build ...)`: errexit would be off inside the subshell.
  set +e
  (set -e; build kuberay kuberay "$kuberay_v" kuberay-operator \
    github.com/ray-project/kuberay/ray-operator "~2 min" --help) 2>&1 | tee "$build_log" >&2
  rc=$?
  set -e
  if [[ $rc -ne 0 ]]; then
    { echo "go build of github.com/ray-project/kuberay/ray-operator@$kuberay_v failed"
      tail -n 20 "$build_log"; } >"$unavailable"
    rm -f "$stable_bin/kuberay-operator"
    log "kuberay-operator $kuberay_v unavailable: build failed (see $unavailable); CRDs are in $crds"
  fi
fi

# --- Argo CD health checks -------------------------------------------------------------------
# argocd-health runs the chart's Lua health checks through Argo CD's own code (util/lua,
# util/settings, gitops-engine's health). The wrapper holds a main.go of its own, so the cache
# name carries a hash of the wrapper besides the Argo CD version. Argo CD v3.6 needs a newer Go
# than the >= 1.26 the rest needs: with an older go on PATH, the go command fetches the
# toolchain the wrapper's go.mod names from the module proxy (once, into the module cache).
argocd_v="$(pin argocd-health github.com/argoproj/argo-cd/v3)"
argocd_key="$argocd_v-$(cat "$here"/argocd-health/{go.mod,go.sum,main.go} | sha256sum | cut -c1-12)"
(export GOTOOLCHAIN=local+auto
 build argocd-health argocd-health "$argocd_key" argocd-health . "~15 min" --version)

log "kwok stages: $tools/kwok-stages (kwok -c $tools/kwok-stages/all.yaml)"
log "kuberay CRDs: $tools/kuberay-crds"
log "CNI plugins: $tools/cni-bin"
echo "GPUMARKET_TOOLS_BIN=$stable_bin"
