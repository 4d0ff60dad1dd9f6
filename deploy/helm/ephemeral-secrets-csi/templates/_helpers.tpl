{{- define "esc.labels" -}}
app.kubernetes.io/name: ephemeral-secrets-csi
{{- end -}}
