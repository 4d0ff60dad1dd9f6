# ephemeral-secrets-csi. Run as root on Linux: the driver and its tests
# mount tmpfs. `make demo` and `make test` install what they need.

GO        ?= go
# The image's three binaries: the node plugin (the DaemonSet), the node
# plugin with the aws provider (the DaemonSet with providers.aws.enabled),
# and the all-in-one (the issuer, the housekeeper, the uninstall hook, and
# the node plugin with every provider and the issuer in process).
BIN       := bin/ephemeral-secrets-csi
BIN_AWS   := bin/ephemeral-secrets-csi-aws
BIN_ALL   := bin/ephemeral-secrets-csi-all
VERSION   ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS   := -s -w -X main.version=$(VERSION)
# Build tags of the shipped binaries (test/image.BuildTags, the
# Dockerfile's): grpcnotrace leaves out gRPC's request tracing, never
# enabled here, whose html/template would keep the linker from dropping
# unused methods (3.5 MB of the node plugin, about 1.7 MiB resident).
GOTAGS    := grpcnotrace
GOBIN     := $(shell $(GO) env GOPATH)/bin
# Lint tools, at versions the Go module proxy serves (module versions,
# not the tools' release names).
STATICCHECK_VERSION ?= v0.8.2
ACTIONLINT_VERSION  ?= v1.7.12
FUZZTIME  ?= 30s
# Tests that start servers and mount filesystems: one package at a time
# keeps a two-core machine responsive; -race is part of the standard run.
TESTFLAGS ?= -race -count=1 -timeout 30m -p 1

.PHONY: all build generate print-controller-gen print-crd-dir test demo lint fuzz bench bench-memory bench-cluster postgres kube node vault aws clean cluster cluster-down manifests release release-check release-artifacts release-push print-crane print-helm sbom docs kubectl promtool print-promtool packages tools etcd kube-node kube-oldest node-packages test-hosted manifests-check chart-test workflows-check image-sbom release-sign

all: build

build:
	CGO_ENABLED=0 $(GO) build -trimpath -tags $(GOTAGS) -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/ephemeral-secrets-csi
	CGO_ENABLED=0 $(GO) build -trimpath -tags $(GOTAGS) -ldflags "$(LDFLAGS)" -o $(BIN_AWS) ./cmd/ephemeral-secrets-csi-aws
	CGO_ENABLED=0 $(GO) build -trimpath -tags $(GOTAGS) -ldflags "$(LDFLAGS)" -o $(BIN_ALL) ./cmd/ephemeral-secrets-csi-all

# The images, without Docker (test/image/cmd/mkimage): archives for
# `ctr -n k8s.io images import`, `kind load image-archive` or `docker load`.
# The same commit and Go toolchain give the same digests (SOURCE_DATE_EPOCH,
# if set, stamps them; else 1970). IMAGE_PLATFORMS: e.g. linux/amd64,linux/arm64.
IMAGE_REPO          ?= ghcr.io/ephemeral-secrets/csi-driver
IMAGE_TAG           ?= $(VERSION)
IMAGE_PLATFORMS     ?= $(shell $(GO) env GOOS)/$(shell $(GO) env GOARCH)
DB_CHECK_IMAGE_REPO ?= ghcr.io/ephemeral-secrets/db-check
AGENT_TASKS_IMAGE_REPO ?= ghcr.io/ephemeral-secrets/agent-tasks
MKIMAGE = $(GO) run ./test/image/cmd/mkimage --platforms $(IMAGE_PLATFORMS)
.PHONY: image
image:
	@mkdir -p bin
	$(MKIMAGE) --image driver --name $(IMAGE_REPO):$(IMAGE_TAG) --version $(VERSION) --out bin/ephemeral-secrets-csi-image.tar
	$(MKIMAGE) --image db-check --name $(DB_CHECK_IMAGE_REPO):$(IMAGE_TAG) --out bin/db-check-image.tar
	$(MKIMAGE) --image agent-tasks --name $(AGENT_TASKS_IMAGE_REPO):$(IMAGE_TAG) --out bin/agent-tasks-image.tar
	$(MKIMAGE) --image pause --out bin/pause-image.tar

# apt-get install of the packages named after it, one at a time: `make -j`
# runs targets side by side, and a second apt-get fails at once on the
# lock the first holds.
APT_INSTALL = flock /var/lock/ephemeral-secrets-csi-apt.lock sh -c 'apt-get update -qq && \
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$$@" >/dev/null' apt-install
# The shell that installs those of the packages $(1) not installed yet.
apt-missing = missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "installing$$missing (apt)"; $(APT_INSTALL) $$missing; fi

# PostgreSQL server binaries from the distribution, for the demo and the tests.
postgres:
	@if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then \
		echo "installing PostgreSQL (apt)"; $(APT_INSTALL) postgresql; \
	fi

# Every package `make test` takes from apt, in one apt-get (CI runs it
# before the tools: one update, one dpkg run).
TEST_PACKAGES = postgresql etcd-server $(NODE_PACKAGES)
packages:
	@$(call apt-missing,$(TEST_PACKAGES))

# The tools `make test` builds (or fetches), side by side: each Go build
# already compiles on every core, but its downloads, links and last
# packages run on one; TOOLS_JOBS builds fill the other cores then. The
# longest builds first, so that none runs alone at the end.
TOOLS_JOBS ?= 3
tools:
	@$(MAKE) --no-print-directory -j$(TOOLS_JOBS) kube-node vault aws kube-oldest promtool kube node

# For the Kubernetes tests: a real kube-apiserver (built from the Go module
# proxy), helm and kustomize, cached in $(TOOLS); etcd from apt. Two
# Kubernetes versions (test/kube/versions): the node's, every command and
# kubectl, in $(TOOLS) (kube-node); the oldest the chart claims,
# kube-apiserver alone, in $(TOOLS)/kube-VERSION (kube-oldest: test/chart's
# compatibility matrix). Tool builds leave out DWARF (TOOL_BUILDFLAGS):
# the linker's -w drops it anyway, and the compiler has less to do.
TOOLS     := $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/ephemeral-secrets-csi/bin
KUBE_NODE_VERSION   := $(shell awk '$$1 == "node" { print $$2 }' test/kube/versions)
KUBE_OLDEST_VERSION := $(shell awk '$$1 == "oldest" { print $$2 }' test/kube/versions)
HELM_VERSION      ?= v3.22.0
KUSTOMIZE_VERSION ?= v5.8.0
TOOL_BUILDFLAGS   := -trimpath -gcflags=all=-dwarf=false
KUBE_NODE_COMMANDS := kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl
kube: etcd kube-node kube-oldest $(TOOLS)/helm $(TOOLS)/kustomize
etcd:
	@command -v etcd >/dev/null || { echo "installing etcd (apt)"; $(APT_INSTALL) etcd-server; }
kube-node:
	KUBE_VERSION=$(KUBE_NODE_VERSION) KUBE_COMMANDS="$(KUBE_NODE_COMMANDS)" test/kube/build-kube.sh $(TOOLS)
kube-oldest:
	KUBE_VERSION=$(KUBE_OLDEST_VERSION) KUBE_COMMANDS=kube-apiserver test/kube/build-kube.sh $(TOOLS)/kube-$(KUBE_OLDEST_VERSION)
# The Kubernetes version helm assumes without a cluster (helm template,
# helm lint): the minor the tests run, KUBE_NODE_VERSION's (helm's release
# builds use their client-go's). Each helm in a directory of its version
# and minor, so that a change of either builds a new one; $(TOOLS)/helm,
# the name the tests and the targets below use, links to it.
HELM_KUBE_MINOR   ?= $(word 2,$(subst ., ,$(KUBE_NODE_VERSION)))
HELM_LDFLAGS      := -s -w -X helm.sh/helm/v3/internal/version.version=$(HELM_VERSION) \
	$(foreach p,chartutil lint/rules,-X helm.sh/helm/v3/pkg/$(p).k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/$(p).k8sVersionMinor=$(HELM_KUBE_MINOR))
HELM := $(TOOLS)/helm-$(HELM_VERSION)-kube1.$(HELM_KUBE_MINOR)/helm
$(HELM):
	GOBIN=$(dir $@) $(GO) install $(TOOL_BUILDFLAGS) -ldflags "$(HELM_LDFLAGS)" helm.sh/helm/v3/cmd/helm@$(HELM_VERSION)
.PHONY: $(TOOLS)/helm
$(TOOLS)/helm: $(HELM)
	@ln -sfn $(HELM) $@
$(TOOLS)/kustomize:
	GOBIN=$(TOOLS) $(GO) install $(TOOL_BUILDFLAGS) -ldflags "-s -w" sigs.k8s.io/kustomize/kustomize/v5@$(KUSTOMIZE_VERSION)

# kubectl, for the commands of the docs that test/docs runs (and make
# cluster); kube-node builds it with the node's commands.
kubectl:
	@KUBE_VERSION=$(KUBE_NODE_VERSION) KUBE_COMMANDS=kubectl test/kube/build-kube.sh $(TOOLS)

# What a real node needs beside the Kubernetes commands: containerd, runc,
# the CNI plugins, iptables (kube-proxy) and iproute2 (the node's network), from apt.
NODE_PACKAGES := containerd runc containernetworking-plugins iptables conntrack iproute2
node: kube node-packages
node-packages:
	@$(call apt-missing,$(NODE_PACKAGES))

# A single-node cluster for a person: kubelet, containerd, the control
# plane, PostgreSQL with the example's database, the driver from the chart.
# It prints what to export to use kubectl. cluster-down removes all of it.
cluster: postgres node kubectl
	$(GO) run ./test/node/cmd/cluster up --dir bin/cluster

cluster-down:
	$(GO) run ./test/node/cmd/cluster down --dir bin/cluster

# promtool, for the alerts' tests (test/alerts: `promtool test rules` on
# series scraped from the real driver and issuer), at a module version the
# Go module proxy serves (v0.316.0 is Prometheus 3.16.0). Built from source
# with the module cache warm and the build cache empty: 544 s of CPU
# (30 min of wall time on two cores shared with six other builds).
# Debian 12's own promtool (prometheus 2.42, no build) fails one case of
# test/alerts: a recorded rate one unit off in its last digit
# (0.6666666666666667 for 0.6666666666666666).
PROMTOOL_VERSION ?= v0.316.0
PROMTOOL := $(TOOLS)/promtool-$(PROMTOOL_VERSION)/promtool
$(PROMTOOL):
	GOBIN=$(dir $@) $(GO) install $(TOOL_BUILDFLAGS) -ldflags "-s -w" github.com/prometheus/prometheus/cmd/promtool@$(PROMTOOL_VERSION)
promtool: $(PROMTOOL)
	@ln -sfn $(PROMTOOL) $(TOOLS)/promtool
print-promtool:
	@echo $(PROMTOOL)

# A real Vault server for the vault provider's tests (built from the Go
# module proxy into $(TOOLS); several minutes the first time).
vault:
	test/vaulttest/build-vault.sh $(TOOLS)

# MinIO (STS and S3) for the aws provider's tests, from the Go module proxy.
MINIO_VERSION ?= v0.0.0-20260212201848-7aac2a2c5b7c
aws:
	@test -x $(TOOLS)/minio || GOBIN=$(TOOLS) $(GO) install $(TOOL_BUILDFLAGS) -ldflags "-s -w" github.com/minio/minio@$(MINIO_VERSION)

# The demo's node plugin is its own issuer: the all-in-one binary.
demo: postgres build
	$(GO) run ./test/demo --driver $(BIN_ALL)

test: postgres tools
	$(GO) test $(TESTFLAGS) ./...

# What a hosted CI runner can run (the pull-request workflow): every test
# but test/realcluster, which needs a node of its own (kubelet, containerd).
test-hosted: postgres kube kubectl vault aws promtool
	$(GO) test $(TESTFLAGS) $$($(GO) list ./... | grep -v '/test/realcluster$$')

# The inventory API (pkg/apis): its deep-copy functions and its CRD, in the
# chart's files/crds/ (templates/crd-credentials.yaml renders it, so that
# helm upgrade updates it), generated from the Go types by controller-gen
# (a test in pkg/apis fails when they are stale: run make generate).
CONTROLLER_GEN_VERSION ?= v0.20.1
CONTROLLER_GEN := $(TOOLS)/controller-gen-$(CONTROLLER_GEN_VERSION)/controller-gen
$(CONTROLLER_GEN):
	GOBIN=$(dir $@) $(GO) install sigs.k8s.io/controller-tools/cmd/controller-gen@$(CONTROLLER_GEN_VERSION)
CONTROLLER_GEN_ARGS = object paths=./pkg/apis/... crd:crdVersions=v1
CRD_DIR = $(CHART)/files/crds
generate: $(CONTROLLER_GEN)
	$(CONTROLLER_GEN) $(CONTROLLER_GEN_ARGS) output:crd:dir=$(CRD_DIR)
print-controller-gen:
	@echo $(CONTROLLER_GEN) $(CONTROLLER_GEN_ARGS)
print-crd-dir:
	@echo $(CRD_DIR)

# The generated parts of docs/ (the backend file's reference, from the Go
# types' doc comments); a test in test/docs fails when they are stale.
docs:
	$(GO) run ./test/docs/cmd/gendocs

# Each lint tool in a directory of its version, so a version bump
# installs the new one.
STATICCHECK := $(TOOLS)/staticcheck-$(STATICCHECK_VERSION)/staticcheck
ACTIONLINT  := $(TOOLS)/actionlint-$(ACTIONLINT_VERSION)/actionlint
$(STATICCHECK):
	GOBIN=$(dir $@) $(GO) install honnef.co/go/tools/cmd/staticcheck@$(STATICCHECK_VERSION)
$(ACTIONLINT):
	GOBIN=$(dir $@) $(GO) install github.com/rhysd/actionlint/cmd/actionlint@$(ACTIONLINT_VERSION)

lint: $(STATICCHECK) $(ACTIONLINT) $(TOOLS)/helm
	$(GO) vet ./...
	$(STATICCHECK) ./...
	@out=$$(gofmt -l .); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(ACTIONLINT) .github/workflows/*.yaml
	$(TOOLS)/helm lint --strict $(CHART)
	$(TOOLS)/helm lint --strict $(CHART) --set monitoring.enabled=true,providers.vault.enabled=true,providers.aws.enabled=true

# deploy/kustomize, rendered from the chart's defaults (the chart is the
# one source; test/cluster fails when they differ).
CHART := deploy/helm/ephemeral-secrets-csi
manifests: $(TOOLS)/helm
	deploy/render.sh $(TOOLS)/helm deploy/kustomize

# deploy/kustomize is what the chart renders now.
manifests-check: $(TOOLS)/helm
	@tmp=$$(mktemp -d) && deploy/render.sh $(TOOLS)/helm $$tmp && diff -r $$tmp deploy/kustomize >/dev/null; rc=$$?; rm -rf $$tmp; \
		[ $$rc = 0 ] || { echo "deploy/kustomize is stale: make manifests"; exit 1; }

# The chart's tests (helm template against the expected objects) and the
# rendered manifests' freshness.
chart-test: manifests-check
	$(GO) test -count=1 ./test/chart

# The workflows, offline: every action pinned to a commit SHA (with its
# tag in a comment), the same action at the same commit everywhere; pull
# requests run the linters and the tests; a release runs the tests first,
# signs, and attests SBOM and provenance (test/workflows).
workflows-check:
	$(GO) test -count=1 ./test/workflows

# A release, from a tag vX.Y.Z (see "Versions" in docs/development.md): the driver's
# image for amd64 and arm64 and the chart, packaged; release-push sends
# both to their registries (log in first: crane auth login, helm registry
# login). `make image` writes IMAGE_ARCHIVE: a tar of an OCI image layout
# whose index.json holds one descriptor, the image index of the platforms
# in IMAGE_PLATFORMS, with the binary's version set from VERSION.
RELEASE          = $(VERSION:v%=%)
IMAGE_REPOSITORY ?= ghcr.io/ephemeral-secrets/csi-driver
CHART_REPOSITORY ?= oci://ghcr.io/ephemeral-secrets/charts
IMAGE_ARCHIVE    ?= bin/ephemeral-secrets-csi-image.tar
CRANE_VERSION    ?= v0.22.1
CRANE            := $(TOOLS)/crane-$(CRANE_VERSION)/crane
$(CRANE):
	GOBIN=$(dir $@) $(GO) install github.com/google/go-containerregistry/cmd/crane@$(CRANE_VERSION)

# The tag, Chart.yaml, the generated manifests and CHANGELOG.md agree.
release-check: $(TOOLS)/helm manifests-check workflows-check
	@echo "$(VERSION)" | grep -Eq '^v[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.-]+)?$$' || { echo "release: VERSION=$(VERSION) is not a tag vX.Y.Z"; exit 1; }
	@grep -qx 'version: $(RELEASE)' $(CHART)/Chart.yaml || { echo "release: $(CHART)/Chart.yaml version is not $(RELEASE)"; exit 1; }
	@grep -qx 'appVersion: "$(RELEASE)"' $(CHART)/Chart.yaml || { echo "release: $(CHART)/Chart.yaml appVersion is not \"$(RELEASE)\""; exit 1; }
	@grep -Eq '^## $(subst .,\.,$(RELEASE)) \([0-9]{4}-[0-9]{2}-[0-9]{2}\)$$' CHANGELOG.md || { echo "release: CHANGELOG.md has no section \"## $(RELEASE) (YYYY-MM-DD)\""; exit 1; }

# An SBOM (CycloneDX) of the binary for each platform, from the module
# graph: no network beyond the module proxy, the same bytes each run.
CYCLONEDX_VERSION ?= v1.10.0
CYCLONEDX         := $(TOOLS)/cyclonedx-gomod-$(CYCLONEDX_VERSION)/cyclonedx-gomod
$(CYCLONEDX):
	GOBIN=$(dir $@) $(GO) install github.com/CycloneDX/cyclonedx-gomod/cmd/cyclonedx-gomod@$(CYCLONEDX_VERSION)
sbom: $(CYCLONEDX)
	@mkdir -p bin
	for arch in amd64 arm64; do for b in ephemeral-secrets-csi ephemeral-secrets-csi-aws ephemeral-secrets-csi-all; do \
		CGO_ENABLED=0 GOOS=linux GOARCH=$$arch $(CYCLONEDX) app -main cmd/$$b -json -licenses \
			-notimestamp -noserial -output bin/$$b-$(RELEASE)-linux-$$arch.cdx.json . || exit 1; \
	done; done

# The image's SBOM for each platform (test/image/cmd/imagesbom): the
# image's manifest digest, every file of its layers with its SHA-256 (the
# CA bundle, /etc/passwd, /etc/group) and each binary with the Go modules
# of its own SBOM (make sbom).
image-sbom: sbom
	rm -rf bin/image-layout && mkdir -p bin/image-layout && tar -xf $(IMAGE_ARCHIVE) -C bin/image-layout
	for arch in amd64 arm64; do \
		$(GO) run ./test/image/cmd/imagesbom --layout bin/image-layout --platform linux/$$arch --name $(IMAGE_REPOSITORY) \
			--binary /ephemeral-secrets-csi --binary-sbom bin/ephemeral-secrets-csi-$(RELEASE)-linux-$$arch.cdx.json \
			--binary /ephemeral-secrets-csi-aws --binary-sbom bin/ephemeral-secrets-csi-aws-$(RELEASE)-linux-$$arch.cdx.json \
			--binary /ephemeral-secrets-csi-all --binary-sbom bin/ephemeral-secrets-csi-all-$(RELEASE)-linux-$$arch.cdx.json \
			--out bin/ephemeral-secrets-csi-image-$(RELEASE)-linux-$$arch.cdx.json || exit 1; \
	done

release-artifacts: release-check sbom
	$(MAKE) image VERSION=$(VERSION) IMAGE_PLATFORMS=linux/amd64,linux/arm64 IMAGE_ARCHIVE=$(IMAGE_ARCHIVE)
	$(MAKE) image-sbom VERSION=$(VERSION) IMAGE_ARCHIVE=$(IMAGE_ARCHIVE)
	$(TOOLS)/helm package $(CHART) --destination bin
	awk '/^## /{if (p) exit; if ($$2 == "$(RELEASE)") p=1} p' CHANGELOG.md >bin/release-notes.md

release-push: $(CRANE)
	rm -rf bin/image-layout && mkdir -p bin/image-layout && tar -xf $(IMAGE_ARCHIVE) -C bin/image-layout
	$(CRANE) push bin/image-layout $(IMAGE_REPOSITORY):$(RELEASE)
	$(TOOLS)/helm push bin/ephemeral-secrets-csi-$(RELEASE).tgz $(CHART_REPOSITORY)

# Keyless signatures (cosign, Sigstore's Fulcio and Rekor; in the release
# workflow the certificate names the workflow at the tag): the image index
# and each platform's image (--recursive), the chart as pushed, and the
# chart's archive (a bundle beside it). Each platform's image gets its own
# SBOM (make image-sbom) as a signed CycloneDX attestation. DIGESTS
# receives name=value lines (the workflow's $$GITHUB_OUTPUT) for the
# provenance step.
COSIGN    ?= cosign
CHART_REF  = $(CHART_REPOSITORY:oci://%=%)/ephemeral-secrets-csi
DIGESTS   ?= bin/digests.txt
release-sign: $(CRANE)
	@command -v $(COSIGN) >/dev/null || { echo "release-sign: cosign not found (COSIGN=$(COSIGN))"; exit 1; }
	set -e; \
	image=$$($(CRANE) digest $(IMAGE_REPOSITORY):$(RELEASE)); \
	chart=$$($(CRANE) digest $(CHART_REF):$(RELEASE)); \
	$(COSIGN) sign --yes --recursive $(IMAGE_REPOSITORY)@$$image; \
	for arch in amd64 arm64; do \
		platform=$$($(CRANE) digest --platform linux/$$arch $(IMAGE_REPOSITORY):$(RELEASE)); \
		$(COSIGN) attest --yes --type cyclonedx --predicate bin/ephemeral-secrets-csi-image-$(RELEASE)-linux-$$arch.cdx.json \
			$(IMAGE_REPOSITORY)@$$platform; \
	done; \
	$(COSIGN) sign --yes $(CHART_REF)@$$chart; \
	$(COSIGN) sign-blob --yes --bundle bin/ephemeral-secrets-csi-$(RELEASE).tgz.sigstore.json bin/ephemeral-secrets-csi-$(RELEASE).tgz; \
	printf 'image=%s\nimage-digest=%s\nchart=%s\nchart-digest=%s\n' $(IMAGE_REPOSITORY) $$image $(CHART_REF) $$chart >>$(DIGESTS)

release: release-artifacts release-push release-sign

# Where the release tools are, for the workflow's registry logins.
print-crane:
	@echo $(CRANE)
print-helm:
	@echo $(TOOLS)/helm

# Each fuzz target for FUZZTIME (their seed corpora already run in `make test`).
fuzz:
	$(GO) test ./pkg/volumepath -run '^$$' -fuzz '^FuzzValidatePath$$' -fuzztime $(FUZZTIME)
	$(GO) test ./pkg/storage -run '^$$' -fuzz '^FuzzTargetPolicy$$' -fuzztime $(FUZZTIME)
	$(GO) test ./pkg/spc -run '^$$' -fuzz '^FuzzParseVolumeContext$$' -fuzztime $(FUZZTIME)
	$(GO) test ./pkg/spc -run '^$$' -fuzz '^FuzzParseClasses$$' -fuzztime $(FUZZTIME)
	$(GO) test ./pkg/render -run '^$$' -fuzz '^FuzzParseSpec$$' -fuzztime $(FUZZTIME)
	$(GO) test ./pkg/render -run '^$$' -fuzz '^FuzzRenderIsBounded$$' -fuzztime $(FUZZTIME)

clean:
	rm -rf bin bench-results.json bench-memory-results.json bench-issuer-results.json bench-cluster-results.json

# The benchmark: the driver over its real socket beside the syscall floor;
# prints a table and writes bench-results.json. Then the hot functions.
# The node plugin's memory and size are compared, in the same run, with
# the node plugin of BENCH_BEFORE (the commit before the second round of
# issue 20's memory work), built from its source as it was then built.
BENCH_BEFORE ?= 028f765
bench: postgres kube
	CGO_ENABLED=0 $(GO) build -trimpath -tags $(GOTAGS) -ldflags "$(LDFLAGS)" -o bin/bench-driver ./test/bench/driver
	CGO_ENABLED=0 $(GO) build -trimpath -tags $(GOTAGS) -ldflags "$(LDFLAGS)" -o bin/bench-driver-all ./test/bench/driver/all
	CGO_ENABLED=0 $(GO) build -trimpath -tags $(GOTAGS) -ldflags "$(LDFLAGS)" -o bin/bench-driver-aws ./test/bench/driver/aws
	rm -rf bin/bench-before-src && mkdir -p bin/bench-before-src && git archive $(BENCH_BEFORE) | tar -x -C bin/bench-before-src
	cd bin/bench-before-src && CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o ../bench-driver-before ./test/bench/driver
	rm -rf bin/bench-before-src
	$(GO) run ./test/bench --driver bin/bench-driver --driver-aws bin/bench-driver-aws --driver-all bin/bench-driver-all --before bin/bench-driver-before --out bench-results.json
	$(GO) run ./test/bench/issuer --out bench-issuer-results.json
	$(GO) test -run '^$$' -bench . -benchmem -benchtime 2000x ./pkg/storage ./pkg/render
	$(GO) test -run '^$$' -bench . -benchtime 200x ./pkg/issuer
	$(GO) test -run '^$$' -bench SampleSessions -benchtime 200x ./pkg/issuer/postgres

# The memory rows alone (no PostgreSQL, no API server): the node plugin,
# the aws node plugin (with an aws section) and BENCH_BEFORE's node
# plugin, idle and with 1,000 volumes, in turn for BENCH_ROUNDS rounds;
# medians, every sample in bench-memory-results.json.
BENCH_ROUNDS ?= 5
bench-memory:
	CGO_ENABLED=0 $(GO) build -trimpath -tags $(GOTAGS) -ldflags "$(LDFLAGS)" -o bin/bench-driver ./test/bench/driver
	CGO_ENABLED=0 $(GO) build -trimpath -tags $(GOTAGS) -ldflags "$(LDFLAGS)" -o bin/bench-driver-aws ./test/bench/driver/aws
	rm -rf bin/bench-before-src && mkdir -p bin/bench-before-src && git archive $(BENCH_BEFORE) | tar -x -C bin/bench-before-src
	cd bin/bench-before-src && CGO_ENABLED=0 $(GO) build -trimpath -ldflags "$(LDFLAGS)" -o ../bench-driver-before ./test/bench/driver
	rm -rf bin/bench-before-src
	$(GO) run ./test/bench --only memory --rounds $(BENCH_ROUNDS) --driver bin/bench-driver --driver-aws bin/bench-driver-aws --before bin/bench-driver-before --out bench-memory-results.json

# Pod start-up in a real cluster (the node of `make cluster`, the driver
# built with the static provider): pods with our volume against pods with
# an emptyDir, interleaved; prints a table, writes bench-cluster-results.json.
bench-cluster: postgres node
	$(GO) run ./test/bench/cluster --out bench-cluster-results.json
