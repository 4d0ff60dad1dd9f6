#!/usr/bin/env bash
# Builds the Kubernetes components the tests run (kube-apiserver,
# kube-controller-manager, kube-scheduler, kubelet, kube-proxy; kubectl
# when KUBE_COMMANDS names it) from the Go module proxy (no other download
# is possible here). A wrapper module requires k8s.io/kubernetes and points
# each of its staging modules (the "=> ./staging" replaces of its go.mod) at
# the matching release; the commands share one module graph and build cache.
# Usage: [KUBE_VERSION=1.x.y] build-kube.sh [OUTDIR]
#   (default: ${XDG_CACHE_HOME:-~/.cache}/ephemeral-secrets-csi/bin, kept across clones)
# KUBE_VERSION defaults to the version the real node runs (the "node"
# line of test/kube/versions); the chart's compatibility matrix builds the
# lowest claimed minor's kube-apiserver ("oldest") into a directory of its
# own (see the Makefile's kube target).
set -euo pipefail
K8S=${KUBE_VERSION:-$(awk '$1 == "node" { print $2 }' "$(dirname "$0")/versions")}
[ -n "$K8S" ] || { echo "build-kube.sh: no KUBE_VERSION and no node version in test/kube/versions" >&2; exit 1; }
STAGING=0.${K8S#1.}
MINOR=${K8S#1.}
MINOR=${MINOR%%.*}
out=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/ephemeral-secrets-csi/bin}
mkdir -p "$out"
out=$(cd "$out" && pwd)
COMMANDS=${KUBE_COMMANDS:-"kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy"}
# One build at a time into one directory: `make -j` may run the kube and
# kubectl targets side by side; the second finds the first's commands.
exec 9>"$out/.build-kube.lock"
flock 9
# kubectl (built for "make cluster" only) prints its version differently.
version() { if [ "$1" = kubectl ]; then "$out/$1" version --client; else "$out/$1" --version; fi; }
missing=""
for c in $COMMANDS; do
	if ! { [ -x "$out/$c" ] && version "$c" 2>/dev/null | grep -q "v$K8S"; }; then
		missing="$missing $c"
	fi
done
[ -n "$missing" ] || exit 0
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The staging modules are the "=> ./staging/src/k8s.io/X" replaces of the
# release's own go.mod (the list changes from minor to minor).
gomod=$(cd "$work" && GOFLAGS=-mod=mod go mod download -json "k8s.io/kubernetes@v$K8S" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",*$/\1/p')
modules=$(sed -n 's|^[[:space:]]*k8s.io/\([^[:space:]]*\) => ./staging/src/k8s.io/.*|\1|p' "$gomod" | sort -u)
[ -n "$modules" ] || { echo "build-kube.sh: no staging modules found in $gomod" >&2; exit 1; }
{
	echo "module esc.local/apiserver-build"
	echo
	echo "go 1.25"
	echo
	echo "require k8s.io/kubernetes v$K8S"
	echo
	echo "replace ("
	for m in $modules; do echo "	k8s.io/$m => k8s.io/$m v$STAGING"; done
	echo ")"
} > "$work/go.mod"
cat > "$work/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
cd "$work"
echo "building$missing v$K8S (several minutes) ..."
# tidy reports that the imported packages are programs; it records the
# module graph all the same, which is all the build needs.
GOFLAGS=-mod=mod go mod tidy -e 2>&1 | grep -v "is a program, not an importable package" || true
pkg=k8s.io/kubernetes/pkg/version
base=k8s.io/component-base/version
# Every missing command in one go build: one load of the package graph,
# and each command's link runs beside the other commands' compiles (six
# builds one after the other left a core idle through each link). Without
# DWARF (the linker's -w drops it anyway): less to compile.
build() {
	pkgs=""
	for c in $missing; do pkgs="$pkgs k8s.io/kubernetes/cmd/$c"; done
	# shellcheck disable=SC2086 # one word per package
	GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -o "$out/" -gcflags=all=-dwarf=false \
		-ldflags "-s -w -X $base.gitVersion=v$K8S -X $base.gitMajor=1 -X $base.gitMinor=$MINOR -X $pkg.gitVersion=v$K8S" \
		$pkgs
}
if ! build; then
	echo "retrying after another tidy ..."
	GOFLAGS=-mod=mod go mod tidy -e >/dev/null 2>&1 || true
	build
fi
for c in $missing; do version "$c"; done
