#!/usr/bin/env bash
# Builds the Kubernetes components the tests run (kube-apiserver,
# kube-controller-manager, kube-scheduler, kubelet, kube-proxy; kubectl
# when KUBE_COMMANDS names it) from the Go module proxy (no other download
# is possible here). A wrapper module requires k8s.io/kubernetes and points
# each of its staging modules (the "=> ./staging" replaces of its go.mod) at
# the matching release; the commands share one module graph and build cache.
# Usage: build-kube.sh [OUTDIR]
#   (default: ${XDG_CACHE_HOME:-~/.cache}/ephemeral-secrets-csi/bin, kept across clones)
set -euo pipefail
K8S=1.35.4
STAGING=0.35.4
out=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/ephemeral-secrets-csi/bin}
mkdir -p "$out"
out=$(cd "$out" && pwd)
COMMANDS=${KUBE_COMMANDS:-"kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy"}
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
modules="api apiextensions-apiserver apimachinery apiserver cli-runtime client-go cloud-provider
cluster-bootstrap code-generator component-base component-helpers controller-manager cri-api cri-client
csi-translation-lib dynamic-resource-allocation endpointslice externaljwt kms kube-aggregator
kube-controller-manager kube-proxy kube-scheduler kubectl kubelet metrics mount-utils
pod-security-admission sample-apiserver sample-cli-plugin sample-controller"
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
build() {
	for c in $missing; do
		GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -o "$out/$c" \
			-ldflags "-s -w -X $base.gitVersion=v$K8S -X $base.gitMajor=1 -X $base.gitMinor=35 -X $pkg.gitVersion=v$K8S" \
			"k8s.io/kubernetes/cmd/$c" || return 1
	done
}
if ! build; then
	echo "retrying after another tidy ..."
	GOFLAGS=-mod=mod go mod tidy -e >/dev/null 2>&1 || true
	build
fi
for c in $missing; do version "$c"; done
