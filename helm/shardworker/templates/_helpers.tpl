{{/*
Chart name, truncated to the 63 characters of a DNS label.
*/}}
{{- define "shardworker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: "<release>-<chart>" unless the release name already contains the chart name.
Truncated to 52 characters, because the StatefulSet controller adds a revision hash label
("<name>-<10 chars>") that must stay within 63.
*/}}
{{- define "shardworker.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "shardworker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Standard labels (app.kubernetes.io/*) on every resource.
*/}}
{{- define "shardworker.labels" -}}
helm.sh/chart: {{ include "shardworker.chart" . }}
{{ include "shardworker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: shardworker
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels of the release (no component: see workerSelectorLabels).
*/}}
{{- define "shardworker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "shardworker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Selector of the worker pods. The component label keeps the migration Job's and the test's
pods out of the PodMonitor, the PDB and the NetworkPolicy.
*/}}
{{- define "shardworker.workerSelectorLabels" -}}
{{ include "shardworker.selectorLabels" . }}
app.kubernetes.io/component: worker
{{- end }}

{{/*
commonAnnotations as a YAML block (empty when none).
*/}}
{{- define "shardworker.annotations" -}}
{{- with .Values.commonAnnotations }}
{{- toYaml . }}
{{- end }}
{{- end }}

{{- define "shardworker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "shardworker.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
ServiceAccount of pre-install hooks: a ServiceAccount the chart creates does not exist yet
when they run, so they use it only when it is an existing one.
*/}}
{{- define "shardworker.hookServiceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- "default" }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "shardworker.image" -}}
{{- $repository := .Values.image.repository }}
{{- if .Values.image.registry }}
{{- $repository = printf "%s/%s" .Values.image.registry .Values.image.repository }}
{{- end }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{- define "shardworker.secretName" -}}
{{- default (include "shardworker.fullname" .) .Values.existingSecret }}
{{- end }}

{{/*
One settings value as the environment string shardworker parses. Helm reads numbers as
float64, and printing 1000000 that way gives "1e+06", which an int setting rejects, so
whole numbers are printed as integers; lists become comma-separated.
*/}}
{{- define "shardworker.settingValue" -}}
{{- if kindIs "slice" . }}
{{- join "," . }}
{{- else if and (kindIs "float64" .) (eq (floor .) .) }}
{{- int64 . }}
{{- else }}
{{- . }}
{{- end }}
{{- end }}

{{/*
The drain deadline the pods will use: config.drain_deadline_s, else shardworker's default.
*/}}
{{- define "shardworker.drainDeadline" -}}
{{- if and (hasKey .Values.config "drain_deadline_s") (not (kindIs "invalid" .Values.config.drain_deadline_s)) }}
{{- .Values.config.drain_deadline_s | float64 }}
{{- else }}
{{- 20.0 }}
{{- end }}
{{- end }}

{{/*
Secret-backed environment of the worker pods. secret-keys is optional in an existing
Secret (only the `db` read chain needs it); the admin token only matters with the admin API.
*/}}
{{- define "shardworker.secretEnv" -}}
{{- $name := include "shardworker.secretName" . }}
{{- $keys := .Values.existingSecretKeys -}}
- name: SHARDWORKER_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ $name }}
      key: {{ $keys.databaseUrl }}
- name: SHARDWORKER_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ $name }}
      key: {{ $keys.redisUrl }}
- name: SHARDWORKER_SECRET_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ $name }}
      key: {{ $keys.secretKeys }}
      optional: true
{{- if .Values.admin.enabled }}
- name: SHARDWORKER_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $name }}
      key: {{ $keys.adminToken }}
{{- end }}
{{- end }}

{{/*
Refuse values that would render a broken release, with a message saying what to change.
*/}}
{{- define "shardworker.validateValues" -}}
{{- $drain := include "shardworker.drainDeadline" . | float64 }}
{{- $grace := .Values.terminationGracePeriodSeconds | float64 }}
{{- if le $grace $drain }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be greater than config.drain_deadline_s (%v): Kubernetes would SIGKILL pods before their drain finishes" $grace $drain) }}
{{- end }}
{{- if and .Values.admin.enabled (not .Values.existingSecret) (not .Values.secrets.adminToken) }}
{{- fail "admin.enabled needs secrets.adminToken, or an existingSecret holding the admin token key" }}
{{- end }}
{{- if and .Values.admin.enabled (eq (int .Values.admin.port) (int .Values.metrics.port)) }}
{{- fail "admin.port must differ from metrics.port" }}
{{- end }}
{{- if and .Values.admin.enabled .Values.admin.ingress.enabled (not .Values.admin.ingress.host) }}
{{- fail "admin.ingress.enabled needs admin.ingress.host" }}
{{- end }}
{{- if .Values.autoscaling.enabled }}
{{- if gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas) }}
{{- fail "autoscaling.minReplicas must not exceed autoscaling.maxReplicas" }}
{{- end }}
{{- $a := .Values.autoscaling }}
{{- if not (or $a.targetCPUUtilizationPercentage $a.targetMemoryUtilizationPercentage $a.providersPerPod.enabled) }}
{{- fail "autoscaling.enabled needs at least one metric: targetCPUUtilizationPercentage, targetMemoryUtilizationPercentage or providersPerPod.enabled" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Volumes every pod of the chart needs with a read-only root filesystem.
*/}}
{{- define "shardworker.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpDirSizeLimit }}
{{- end }}
