{{/*
Names scoped to the release, so that two releases (in one namespace or two) never collide.
*/}}
{{- define "pdfleet.fullname" -}}
{{- if contains "pdfleet" .Release.Name -}}
{{- .Release.Name | trunc 54 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-pdfleet" .Release.Name | trunc 54 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "pdfleet.operatorName" -}}
{{- include "pdfleet.fullname" . }}-operator
{{- end -}}

{{/* Cluster-scoped objects also carry the namespace: releases of one name in two namespaces. */}}
{{- define "pdfleet.clusterName" -}}
{{- .Release.Namespace }}:{{ include "pdfleet.fullname" . }}
{{- end -}}

{{- define "pdfleet.routerClusterRole" -}}
{{- include "pdfleet.clusterName" . }}-router
{{- end -}}

{{- define "pdfleet.selectorLabels" -}}
app.kubernetes.io/name: pdfleet-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "pdfleet.labels" -}}
{{ include "pdfleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: pdfleet
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/*
An image reference: <registry>/<repository>:<tag>, the tag the part's own, else image.tag, else
the chart's appVersion. Call with (dict "root" $ "image" .Values.worker.image).
*/}}
{{- define "pdfleet.image" -}}
{{- $registry := .root.Values.image.registry -}}
{{- $tag := .image.tag | default .root.Values.image.tag | default .root.Chart.AppVersion -}}
{{- if $registry -}}
{{- printf "%s/%s:%s" $registry .image.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end -}}
