# The node plugin image, for people with Docker. `make image` builds the
# same image without Docker (test/image: DriverSpec); keep the two in
# agreement. On an empty base: the three static binaries (the node plugin,
# the node plugin with the aws provider, and the all-in-one: the issuer,
# the housekeeper, the uninstall hook, the node plugin with every
# provider), Debian's CA certificates
# and test/image/rootfs (/etc/passwd and /etc/group with root, nobody and
# nonroot 65532, so a numeric user has a name). No shell and no tzdata: the
# driver keeps its times in UTC. It runs as root in a privileged container
# (it mounts tmpfs and bind mounts).
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY cmd ./cmd
COPY pkg ./pkg
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -buildvcs=false -tags grpcnotrace -ldflags "-s -w -buildid= -X main.version=${VERSION}" \
    -o /out/ephemeral-secrets-csi ./cmd/ephemeral-secrets-csi
RUN CGO_ENABLED=0 go build -trimpath -buildvcs=false -tags grpcnotrace -ldflags "-s -w -buildid= -X main.version=${VERSION}" \
    -o /out/ephemeral-secrets-csi-aws ./cmd/ephemeral-secrets-csi-aws
RUN CGO_ENABLED=0 go build -trimpath -buildvcs=false -tags grpcnotrace -ldflags "-s -w -buildid= -X main.version=${VERSION}" \
    -o /out/ephemeral-secrets-csi-all ./cmd/ephemeral-secrets-csi-all

FROM scratch
ARG VERSION=dev
ARG REVISION
COPY test/image/rootfs/ /
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/ephemeral-secrets-csi /ephemeral-secrets-csi
COPY --from=build /out/ephemeral-secrets-csi-aws /ephemeral-secrets-csi-aws
COPY --from=build /out/ephemeral-secrets-csi-all /ephemeral-secrets-csi-all
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
LABEL org.opencontainers.image.source=https://github.com/ephemeral-secrets/csi-driver \
      org.opencontainers.image.title=ephemeral-secrets-csi \
      org.opencontainers.image.version=${VERSION} \
      org.opencontainers.image.revision=${REVISION} \
      org.opencontainers.image.licenses=Apache-2.0
WORKDIR /
ENTRYPOINT ["/ephemeral-secrets-csi"]
CMD ["serve"]
