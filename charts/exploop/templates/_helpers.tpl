{{- define "exploop.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains "exploop" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "exploop-%s" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "exploop.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels of one component: include "exploop.selectorLabels" (list . "api") */}}
{{- define "exploop.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "exploop.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "exploop.labels" -}}
{{- $root := index . 0 -}}
helm.sh/chart: {{ printf "%s-%s" $root.Chart.Name $root.Chart.Version | replace "+" "_" }}
{{ include "exploop.selectorLabels" . }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: exploop
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
{{- end -}}

{{- define "exploop.secretName" -}}
{{- default (include "exploop.fullname" .) .Values.existingSecret -}}
{{- end -}}

{{- define "exploop.validate" -}}
{{- if and (not .Values.existingSecret) (not .Values.database.url) -}}
{{- fail "database.url is required (postgresql://user:password@host:5432/exploop), or existingSecret" -}}
{{- end -}}
{{- if and (not .Values.existingSecret) (not .Values.redis.url) -}}
{{- fail "redis.url is required (redis://host:6379/0 or sentinel://host:26379;sentinel://...), or existingSecret" -}}
{{- end -}}
{{- end -}}

{{/* Environment every server component shares: the Secret's URLs and the EXPLOOP_* settings. */}}
{{- define "exploop.env" -}}
- name: EXPLOOP_SQLALCHEMY_DATABASE_URI
  valueFrom:
    secretKeyRef:
      name: {{ include "exploop.secretName" . }}
      key: EXPLOOP_SQLALCHEMY_DATABASE_URI
- name: EXPLOOP_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "exploop.secretName" . }}
      key: EXPLOOP_REDIS_URL
- name: EXPLOOP_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "exploop.secretName" . }}
      key: EXPLOOP_SECRET_KEY
      optional: true
- name: EXPLOOP_REGIONS
  value: {{ .Values.config.regions | quote }}
{{- with .Values.config.agentBrokerUrl }}
- name: EXPLOOP_AGENT_BROKER_URL
  value: {{ . | quote }}
{{- end }}
- name: EXPLOOP_SENTINEL_MASTER_NAME
  value: {{ .Values.redis.sentinelMasterName | default "exploop" | quote }}
{{- with .Values.config.regionBrokers }}
- name: EXPLOOP_REGION_BROKERS
  value: {{ . | quote }}
{{- end }}
- name: EXPLOOP_JOB_TIME_LIMIT
  value: {{ .Values.config.jobTimeLimit | quote }}
- name: EXPLOOP_JOB_MAX_ATTEMPTS
  value: {{ .Values.config.jobMaxAttempts | quote }}
- name: EXPLOOP_TENANT_MAX_ACTIVE
  value: {{ .Values.config.tenantMaxActive | quote }}
- name: LOG_FORMAT
  value: {{ .Values.config.logFormat | quote }}
{{- with .Values.config.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "exploop.podSpecCommon" -}}
serviceAccountName: {{ include "exploop.fullname" . }}
automountServiceAccountToken: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
