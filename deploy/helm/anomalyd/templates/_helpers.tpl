{{- define "anomalyd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "anomalyd.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "anomalyd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "anomalyd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "anomalyd.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "anomalyd.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "anomalyd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "anomalyd.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The pod's grace period: above the drain deadline, or the kubelet's SIGKILL cuts the drain short
(unscored windows, uncommitted offsets).
*/}}
{{- define "anomalyd.terminationGracePeriodSeconds" -}}
{{- $drain := div (add (int .Values.drainTimeoutMs) 999) 1000 }}
{{- if eq (toString .Values.terminationGracePeriodSeconds) "" }}
{{- add $drain 15 }}
{{- else if le (int .Values.terminationGracePeriodSeconds) $drain }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed the drain deadline drainTimeoutMs (%v ms)" .Values.terminationGracePeriodSeconds .Values.drainTimeoutMs) }}
{{- else }}
{{- int .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/*
The daemon's config: `config`, then the chart's [kafka.properties] (kafka.properties and, as files
mounted from Secrets, kafka.secretProperties).
*/}}
{{- define "anomalyd.secretsDir" -}}/run/secrets/anomalyd{{- end }}
{{- define "anomalyd.config" -}}
{{- .Values.config }}
{{- if or .Values.kafka.properties .Values.kafka.secretProperties }}
{{- if regexMatch "(?m)^\\s*\\[\\s*kafka\\s*\\.\\s*properties\\s*\\]" .Values.config }}
{{- fail "config has its own [kafka.properties] table: move its keys to kafka.properties (or kafka.secretProperties), which the chart adds as that table" }}
{{- end }}
# Added by the chart (kafka.properties, kafka.secretProperties).
[kafka.properties]
{{- range $key, $value := .Values.kafka.properties }}
{{ $key | quote }} = {{ $value | toString | quote }}
{{- end }}
{{- range $key, $ref := .Values.kafka.secretProperties }}
{{ $key | quote }} = { file = {{ printf "%s/%s" (include "anomalyd.secretsDir" $) $key | quote }} }
{{- end }}
{{- end }}
{{- end }}
