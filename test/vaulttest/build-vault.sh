#!/usr/bin/env bash
# Builds HashiCorp Vault v1.13.2 (MPL-2.0) from the Go module proxy for the
# tests of the vault provider: a wrapper module requires it and replaces
# the one dependency the proxy refuses (the Snowflake database plugin) with
# a local stub; the tests never use Snowflake.
# Usage: build-vault.sh [OUTDIR]
#   (default: ${XDG_CACHE_HOME:-~/.cache}/ephemeral-secrets-csi/bin)
set -euo pipefail
VERSION=1.13.2
out=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/ephemeral-secrets-csi/bin}
mkdir -p "$out"
out=$(cd "$out" && pwd)
if [ -x "$out/vault" ] && "$out/vault" version 2>/dev/null | grep -q "v$VERSION"; then
	exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/snowflake"
cat > "$work/snowflake/go.mod" <<'MOD'
module github.com/hashicorp/vault-plugin-database-snowflake

go 1.20
MOD
cat > "$work/snowflake/snowflake.go" <<'GO'
// Package snowflake stands in for Vault's Snowflake database plugin, which
// the module proxy does not serve.
package snowflake

import "errors"

// New refuses: this build has no Snowflake plugin.
func New() (interface{}, error) { return nil, errors.New("snowflake plugin not built in") }
GO
cat > "$work/go.mod" <<MOD
module esc.local/vault-build

go 1.20

require github.com/hashicorp/vault v$VERSION

replace github.com/hashicorp/vault-plugin-database-snowflake => ./snowflake
MOD
cat > "$work/tools.go" <<'GO'
//go:build tools

package tools

import _ "github.com/hashicorp/vault"
GO
cd "$work"
echo "building vault v$VERSION (a few minutes) ..."
GOFLAGS=-mod=mod go mod tidy -e 2>&1 | grep -v "is a program, not an importable package" || true
build() {
	GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath -gcflags=all=-dwarf=false -o "$out/vault" \
		-ldflags "-s -w -X github.com/hashicorp/vault/version.Version=$VERSION" github.com/hashicorp/vault
}
if ! build; then
	echo "retrying after another tidy ..."
	GOFLAGS=-mod=mod go mod tidy -e >/dev/null 2>&1 || true
	build
fi
"$out/vault" version
