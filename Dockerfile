# The node plugin image: a static binary on a minimal base. It runs as
# root in a privileged container (it mounts tmpfs and bind mounts).
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY cmd ./cmd
COPY pkg ./pkg
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" \
    -o /out/ephemeral-secrets-csi ./cmd/ephemeral-secrets-csi

FROM gcr.io/distroless/static-debian12
COPY --from=build /out/ephemeral-secrets-csi /ephemeral-secrets-csi
ENTRYPOINT ["/ephemeral-secrets-csi"]
CMD ["serve"]
