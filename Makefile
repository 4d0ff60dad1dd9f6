# ephemeral-secrets-csi. Run as root on Linux: the driver and its tests
# mount tmpfs. `make demo` and `make test` install what they need.

GO        ?= go
BIN       := bin/ephemeral-secrets-csi
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -s -w -X main.version=$(VERSION)
GOBIN     := $(shell $(GO) env GOPATH)/bin
STATICCHECK_VERSION ?= 2025.1.1
FUZZTIME  ?= 30s
# Tests that start servers and mount filesystems: one package at a time
# keeps a two-core machine responsive; -race is part of the standard run.
TESTFLAGS ?= -race -count=1 -timeout 30m -p 1

.PHONY: all build test demo lint fuzz bench postgres kube vault aws clean

all: build

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/ephemeral-secrets-csi

# PostgreSQL server binaries from the distribution, for the demo and the tests.
postgres:
	@if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then \
		echo "installing PostgreSQL (apt)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null; \
	fi

# For the Kubernetes tests: a real kube-apiserver (built from the Go module
# proxy), helm and kustomize, cached in $(TOOLS); etcd from apt.
TOOLS     := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/ephemeral-secrets-csi/bin
HELM_VERSION      ?= v3.22.0
KUSTOMIZE_VERSION ?= v5.8.0
kube:
	@command -v etcd >/dev/null || { echo "installing etcd (apt)"; apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends etcd-server >/dev/null; }
	test/kube/build-kube.sh $(TOOLS)
	@test -x $(TOOLS)/helm || GOBIN=$(TOOLS) $(GO) install helm.sh/helm/v3/cmd/helm@$(HELM_VERSION)
	@test -x $(TOOLS)/kustomize || GOBIN=$(TOOLS) $(GO) install sigs.k8s.io/kustomize/kustomize/v5@$(KUSTOMIZE_VERSION)

# A real Vault server for the vault provider's tests (built from the Go
# module proxy into $(TOOLS); several minutes the first time).
vault:
	test/vaulttest/build-vault.sh $(TOOLS)

# MinIO (STS and S3) for the aws provider's tests, from the Go module proxy.
MINIO_VERSION ?= v0.0.0-20260212201848-7aac2a2c5b7c
aws:
	@test -x $(TOOLS)/minio || GOBIN=$(TOOLS) $(GO) install github.com/minio/minio@$(MINIO_VERSION)

demo: postgres build
	$(GO) run ./test/demo --driver $(BIN)

test: postgres kube vault aws
	$(GO) test $(TESTFLAGS) ./...

lint:
	$(GO) vet ./...
	@test -x $(GOBIN)/staticcheck || $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)
	$(GOBIN)/staticcheck ./...
	@out=$$(gofmt -l .); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi

# Each fuzz target for FUZZTIME (their seed corpora already run in `make test`).
fuzz:
	$(GO) test ./pkg/storage -run '^$$' -fuzz '^FuzzValidatePath$$' -fuzztime $(FUZZTIME)
	$(GO) test ./pkg/storage -run '^$$' -fuzz '^FuzzTargetPolicy$$' -fuzztime $(FUZZTIME)
	$(GO) test ./pkg/spc -run '^$$' -fuzz '^FuzzParseVolumeContext$$' -fuzztime $(FUZZTIME)
	$(GO) test ./pkg/spc -run '^$$' -fuzz '^FuzzParseClasses$$' -fuzztime $(FUZZTIME)
	$(GO) test ./pkg/render -run '^$$' -fuzz '^FuzzParseSpec$$' -fuzztime $(FUZZTIME)
	$(GO) test ./pkg/render -run '^$$' -fuzz '^FuzzRenderIsBounded$$' -fuzztime $(FUZZTIME)

clean:
	rm -rf bin bench-results.json

# The benchmark: the driver over its real socket beside the syscall floor;
# prints a table and writes bench-results.json. Then the hot functions.
bench: postgres
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o bin/bench-driver ./test/bench/driver
	$(GO) run ./test/bench --driver bin/bench-driver --out bench-results.json
	$(GO) test -run '^$$' -bench . -benchmem -benchtime 2000x ./pkg/storage ./pkg/render
