{{/*
Names are fixed rather than derived from the release name, because the operator finds its
Lease, webhook configuration and certificate Secret by these names. One release per cluster.
*/}}
{{- define "llmroute.name" -}}llmroute-operator{{- end }}
{{- define "llmroute.webhookService" -}}llmroute-operator-webhook{{- end }}
{{- define "llmroute.webhookConfiguration" -}}llmroute-sidecar-injector{{- end }}
{{- define "llmroute.dataDir" -}}/var/lib/llmroute{{- end }}
{{- define "llmroute.certDir" -}}/etc/llmroute/webhook-tls{{- end }}

{{/* Labels that select the operator's pods. They never change, so they may sit in selectors. */}}
{{- define "llmroute.selectorLabels" -}}
app.kubernetes.io/name: llmroute
app.kubernetes.io/component: operator
{{- end }}

{{/* Labels of every object the chart renders. */}}
{{- define "llmroute.helmLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}

{{- define "llmroute.labels" -}}
{{ include "llmroute.selectorLabels" . }}
{{ include "llmroute.helmLabels" . }}
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
{{- end }}

{{- define "llmroute.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end }}

{{- define "llmroute.sidecarImage" -}}
{{- default (include "llmroute.image" .) .Values.sidecar.image -}}
{{- end }}

{{/* Name of the Secret that holds the webhook's serving certificate when another tool keeps it. */}}
{{- define "llmroute.certSecret" -}}
{{- if eq .Values.webhook.certificate.source "certManager" -}}
{{- default "llmroute-webhook-cert-manager" .Values.webhook.certificate.secretName -}}
{{- else -}}
{{- .Values.webhook.certificate.secretName -}}
{{- end -}}
{{- end }}
