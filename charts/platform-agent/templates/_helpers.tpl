{{/*
Names. The runbook's kubectl commands address deployment/exploop-platform-agent: a release
named "platform-agent" gets exactly that name ("exploop-" + release name, unless the
release name already says exploop).
*/}}
{{- define "platform-agent.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains "exploop" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "exploop-%s" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "platform-agent.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "platform-agent.selectorLabels" -}}
app.kubernetes.io/name: {{ include "platform-agent.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "platform-agent.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "platform-agent.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: platform-agent
app.kubernetes.io/part-of: exploop
app.kubernetes.io/managed-by: {{ .Release.Service }}
exploop.io/region: {{ .Values.agent.region | quote }}
{{- end -}}

{{- define "platform-agent.secretName" -}}
{{- default (include "platform-agent.fullname" .) .Values.existingSecret -}}
{{- end -}}

{{- define "platform-agent.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "platform-agent.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The queues this release consumes: <capability>.<region>, as the agent computes them. */}}
{{- define "platform-agent.queues" -}}
{{- $queues := list -}}
{{- range (splitList "," .Values.agent.capabilities) -}}
{{- $queues = append $queues (printf "%s.%s" (trim .) $.Values.agent.region) -}}
{{- end -}}
{{- toJson $queues -}}
{{- end -}}

{{/* Refuse values that would deploy agents that cannot work, with one clear line. */}}
{{- define "platform-agent.validate" -}}
{{- if not .Values.apiUrl -}}
{{- fail "apiUrl is required: --set apiUrl=https://api.exploop.io" -}}
{{- end -}}
{{- if not (regexMatch "^https?://[^/\\s]+" .Values.apiUrl) -}}
{{- fail (printf "apiUrl: expected an http(s) URL, got %q" .Values.apiUrl) -}}
{{- end -}}
{{- if and (not .Values.existingSecret) (not .Values.bootstrapToken) (not .Values.apiKey) -}}
{{- fail "an identity is required: --set bootstrapToken=<token> (exploop-admin create token), or apiKey, or existingSecret" -}}
{{- end -}}
{{- if and .Values.bootstrapToken .Values.apiKey (not .Values.existingSecret) -}}
{{- fail "set bootstrapToken or apiKey, not both" -}}
{{- end -}}
{{- if and .Values.apiKey (not .Values.existingSecret) (or (gt (int .Values.replicaCount) 1) .Values.autoscaling.enabled) -}}
{{- fail "apiKey is one agent's identity: it allows replicaCount=1 and no autoscaling; use bootstrapToken for several replicas" -}}
{{- end -}}
{{- if not (has .Values.workload (list "Deployment" "StatefulSet")) -}}
{{- fail (printf "workload: expected Deployment or StatefulSet, got %q" .Values.workload) -}}
{{- end -}}
{{- if not (has .Values.autoscaling.metric (list "jobsRunning" "queueDepth")) -}}
{{- fail (printf "autoscaling.metric: expected jobsRunning or queueDepth, got %q" .Values.autoscaling.metric) -}}
{{- end -}}
{{- if and .Values.autoscaling.enabled (lt (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas)) -}}
{{- fail "autoscaling.maxReplicas must be >= autoscaling.minReplicas" -}}
{{- end -}}
{{- end -}}
