{{/*
The name of every object. The driver is one per cluster (its CSIDriver
name is fixed), so the release name is not part of it.
*/}}
{{- define "esc.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "esc.fullname" -}}
{{- default (include "esc.name" .) .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Selector labels: immutable on a DaemonSet once installed. Never add one
that changes between releases (version, chart).
*/}}
{{- define "esc.selectorLabels" -}}
app.kubernetes.io/name: {{ include "esc.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node
{{- end -}}

{{- define "esc.issuerSelectorLabels" -}}
app.kubernetes.io/name: {{ include "esc.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: issuer
{{- end -}}

{{- define "esc.labels" -}}
{{ include "esc.selectorLabels" . }}
{{ include "esc.metaLabels" . }}
{{- end -}}

{{- define "esc.issuerLabels" -}}
{{ include "esc.issuerSelectorLabels" . }}
{{ include "esc.metaLabels" . }}
{{- end -}}

{{/* The issuer's Deployment, Service, service account and Lease. */}}
{{- define "esc.issuerName" -}}
{{- printf "%s-issuer" (include "esc.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object but the selectors'. */}}
{{- define "esc.metaLabels" -}}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: ephemeral-secrets-csi
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
An image reference from {registry, repository, tag, digest}: the digest
wins over the tag; the tag defaults to the chart's appVersion.
Call with (dict "image" .Values.x.image "root" .).
*/}}
{{- define "esc.image" -}}
{{- $i := .image -}}
{{- $ref := $i.repository -}}
{{- if $i.registry }}{{ $ref = printf "%s/%s" $i.registry $i.repository }}{{ end -}}
{{- if $i.digest -}}
{{- printf "%s@%s" $ref $i.digest -}}
{{- else -}}
{{- printf "%s:%s" $ref (default .root.Chart.AppVersion $i.tag | toString) -}}
{{- end -}}
{{- end -}}

{{/* The audiences kubelet requests tokens for: one per enabled provider. */}}
{{- define "esc.audiences" -}}
{{- $a := list -}}
{{- range $name := list "vault" "aws" -}}
{{- $p := index $.Values.providers $name -}}
{{- if $p.enabled }}{{ $a = append $a $p.audience }}{{ end -}}
{{- end -}}
{{- with .Values.providers.gcp -}}
{{- if .enabled }}{{ $a = append $a (required "providers.gcp.tokenAudience is required with providers.gcp.enabled: the audience the backend file's gcp.tokenAudience names (default https: followed by gcp.audience, the workload identity provider)" .tokenAudience) }}{{ end -}}
{{- end -}}
{{- range .Values.extraTokenAudiences }}{{ $a = append $a . }}{{ end -}}
{{- $a | uniq | toJson -}}
{{- end -}}

{{- define "esc.pluginDir" -}}
{{- printf "%s/plugins/ephemeral-secrets.csi.dev" (trimSuffix "/" .Values.kubeletDir) -}}
{{- end -}}

{{/*
Whether kubelet hands pods' tokens in NodePublishVolume's secrets: the
CSIDriver's serviceAccountTokenInSecrets and the driver's
--tokens-in-secrets follow this one value, csiDriver.tokensInSecrets,
never the Kubernetes version helm assumes (an offline render, helm
template or GitOps, would disagree with the cluster). With no token
requested there is none to misplace: "true" (the driver then refuses any
token a pod puts in its volume attributes).
*/}}
{{- define "esc.tokensInSecrets" -}}
{{- $audiences := include "esc.audiences" . | fromJsonArray -}}
{{- if or (not $audiences) .Values.csiDriver.tokensInSecrets -}}true{{- else -}}false{{- end -}}
{{- end -}}

{{/*
Whether the issuer runs: PostgreSQL is in use and served through it.
"true" or "".
*/}}
{{- define "esc.issuerOn" -}}
{{- if and .Values.providers.postgres.enabled .Values.issuer.enabled -}}true{{- end -}}
{{- end -}}

{{/* The housekeeper's Deployment and service account. */}}
{{- define "esc.housekeeperName" -}}
{{- printf "%s-housekeeper" (include "esc.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "esc.housekeeperSelectorLabels" -}}
app.kubernetes.io/name: {{ include "esc.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: housekeeper
{{- end -}}

{{- define "esc.uninstallLabels" -}}
app.kubernetes.io/name: {{ include "esc.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: uninstall
{{ include "esc.metaLabels" . }}
{{- end -}}

{{- define "esc.housekeeperLabels" -}}
{{ include "esc.housekeeperSelectorLabels" . }}
{{ include "esc.metaLabels" . }}
{{- end -}}

{{/*
The rules of files/inventory-rbac.yaml (the rights pkg/inventory's tests
run with), as YAML: a map from each ClusterRole's name to its rules.
*/}}
{{- define "esc.inventoryRules" -}}
{{- $rbac := dict -}}
{{- range splitList "\n---\n" (.Files.Get "files/inventory-rbac.yaml") -}}
{{- $o := fromYaml . -}}
{{- $_ := set $rbac $o.metadata.name $o.rules -}}
{{- end -}}
{{- toYaml $rbac -}}
{{- end -}}

{{/*
The image holds three binaries. The node plugin's own, ephemeral-secrets-csi
(vault, gcp, and postgres through the issuer), links no typed Kubernetes
client, issuer or AWS SDK: a DaemonSet pays for its pages on every node.
ephemeral-secrets-csi-aws is the same node plugin with the aws provider
(the AWS SDK, and nothing of the issuer): the node plugin where aws is
enabled. The all-in-one, ephemeral-secrets-csi-all, runs the issuer, the
housekeeper and the uninstall hook, and is the node plugin only where a
node runs the issuer in process (postgres without the issuer Deployment),
with aws or without.
*/}}
{{- define "esc.nodeBinary" -}}
{{- if and .Values.providers.postgres.enabled (not .Values.issuer.enabled) -}}
/ephemeral-secrets-csi-all
{{- else if .Values.providers.aws.enabled -}}
/ephemeral-secrets-csi-aws
{{- else -}}
/ephemeral-secrets-csi
{{- end -}}
{{- end -}}
