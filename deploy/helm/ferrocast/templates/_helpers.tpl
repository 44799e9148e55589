{{/* The chart name, or nameOverride. */}}
{{- define "ferrocast.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The objects' name: fullnameOverride, else the release name (with the chart name when
the release name does not contain it). */}}
{{- define "ferrocast.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "ferrocast.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ferrocast.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ferrocast.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "ferrocast.selectorLabels" . }}
app.kubernetes.io/component: gateway
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* terminationGracePeriodSeconds: the preStop sleep, the whole drain
(server.shutdown_grace_ms, rounded up) and 5 s to exit. */}}
{{- define "ferrocast.terminationGraceSeconds" -}}
{{- add (int .Values.preStopSleepSeconds) (div (add (int64 .Values.ferrocast.shutdownGraceMs) 999) 1000) 5 -}}
{{- end -}}

{{/* Proxy timeout for long-lived connections: three heartbeats, never under 60 s. */}}
{{- define "ferrocast.proxyTimeoutSeconds" -}}
{{- max 60 (div (add (mul (int64 .Values.ferrocast.pingIntervalMs) 3) 999) 1000) -}}
{{- end -}}

{{/* The ingress body size (nginx units): the larger of a Socket.IO polling body and a publish. */}}
{{- define "ferrocast.bodySize" -}}
{{- $bytes := max (int64 .Values.ferrocast.maxFrameBytes) (int64 .Values.ferrocast.apiMaxBodyBytes) -}}
{{- if eq (mod $bytes 1048576) 0 -}}
{{- printf "%dm" (div $bytes 1048576) -}}
{{- else if eq (mod $bytes 1024) 0 -}}
{{- printf "%dk" (div $bytes 1024) -}}
{{- else -}}
{{- printf "%d" $bytes -}}
{{- end -}}
{{- end -}}

{{- define "ferrocast.apiKeySecret" -}}
{{- default (include "ferrocast.fullname" .) .Values.apiKey.existingSecret -}}
{{- end -}}
