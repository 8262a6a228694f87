{{/* Labels every object carries. */}}
{{- define "eastguard.labels" -}}
app.kubernetes.io/part-of: eastguard
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{- define "eastguard.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}

{{/* The control plane Service's name in DNS: what node agents dial and its certificates name. */}}
{{- define "eastguard.serviceHost" -}}
eastguard-control-plane.{{ .Release.Namespace }}.svc
{{- end -}}

{{/* Namespaces the webhook never sees. */}}
{{- define "eastguard.excludedNamespaces" -}}
{{ concat .Values.webhook.excludedNamespaces (list .Release.Namespace) | uniq | toJson }}
{{- end -}}
