{{/* The release's full name, at most 63 characters (a DNS label). */}}
{{- define "cdc-sink.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "cdc-sink.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "cdc-sink.labels" -}}
{{ include "cdc-sink.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "cdc-sink.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "cdc-sink.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name: name an existing service account when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "cdc-sink.secretName" -}}
{{- if and .Values.secrets.create .Values.secrets.existingSecret -}}
{{- fail "secrets: set either secrets.create or secrets.existingSecret, not both" -}}
{{- end -}}
{{- if .Values.secrets.create -}}
{{- include "cdc-sink.fullname" . -}}
{{- else -}}
{{- .Values.secrets.existingSecret -}}
{{- end -}}
{{- end -}}

{{/* SIGTERM comes after the preStop pause; the worker then needs up to its shutdown timeout. */}}
{{- define "cdc-sink.terminationGracePeriodSeconds" -}}
{{- $needed := add (int .Values.preStopSleepSeconds) (int .Values.shutdownTimeoutSeconds) -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds -}}
{{- add $needed 15 -}}
{{- else if le (int .Values.terminationGracePeriodSeconds) $needed -}}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be longer than preStopSleepSeconds + shutdownTimeoutSeconds (%d), or the kubelet kills the worker mid-shutdown" .Values.terminationGracePeriodSeconds $needed) -}}
{{- else -}}
{{- .Values.terminationGracePeriodSeconds -}}
{{- end -}}
{{- end -}}
