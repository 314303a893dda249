{{/* The chart name, or nameOverride. */}}
{{- define "arcus-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The release's full name: names every object, the Lease (`<fullname>-leader`) and OPERATOR_NAME.
A release named like the chart (`helm install arcus-operator ...`) is just `arcus-operator`.
*/}}
{{- define "arcus-operator.fullname" -}}
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

{{- define "arcus-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "arcus-operator.labels" -}}
helm.sh/chart: {{ include "arcus-operator.chart" . }}
{{ include "arcus-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The Deployment's selector: immutable, so only labels that never change for a release. */}}
{{- define "arcus-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "arcus-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "arcus-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "arcus-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository@digest when a digest is set, else repository:tag (default: appVersion). */}}
{{- define "arcus-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
The operator's configuration as environment (everything it reads; see `arcus-operator run --help`).
The pod template's checksum/config is taken over this and the args, and nothing else.
*/}}
{{- define "arcus-operator.env" -}}
- name: WATCH_NAMESPACE
  value: {{ join "," .Values.watchNamespaces | quote }}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: OPERATOR_NAME
  value: {{ include "arcus-operator.fullname" . | quote }}
- name: METRICS_BIND
  value: {{ printf "0.0.0.0:%d" (int .Values.metrics.port) | quote }}
{{- with .Values.logLevel }}
- name: RUST_LOG
  value: {{ . | quote }}
{{- end }}
{{- end }}

{{- define "arcus-operator.args" -}}
- run
{{- if not .Values.leaderElection.enabled }}
- --no-leader-election
{{- end }}
{{- end }}

{{/*
RBAC rules, the same as deploy/rbac.yaml's ClusterRole, split by where they are needed:
workload (each watched namespace), lease (the release namespace), events (both), crd (cluster).
*/}}
{{- define "arcus-operator.rules.workload" -}}
# What an ArcusMemcached owns.
- apiGroups: ["apps"]
  resources: ["statefulsets"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
- apiGroups: ["monitoring.coreos.com"]
  resources: ["servicemonitors"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
# Cache pods: readiness and failures for status; delete for rolling restarts and healing;
# patch to record live configuration changes.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "delete", "patch"]
# The custom resource itself (update/patch: the finalizer), its status and finalizers.
- apiGroups: ["jam2in.com"]
  resources: ["memcacheds"]
  verbs: ["get", "list", "watch", "update", "patch"]
- apiGroups: ["jam2in.com"]
  resources: ["memcacheds/status"]
  verbs: ["get", "update", "patch"]
- apiGroups: ["jam2in.com"]
  resources: ["memcacheds/finalizers"]
  verbs: ["update"]
{{- with .Values.zookeeperAuth.secretNames }}
# ZooKeeper digest credentials (spec.zookeeperAuth): get, and only the Secrets named here.
- apiGroups: [""]
  resources: ["secrets"]
  resourceNames: {{ toJson . }}
  verbs: ["get"]
{{- end }}
{{- end }}

{{- define "arcus-operator.rules.lease" -}}
# Leader election.
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["get", "list", "watch", "create", "update", "patch"]
{{- end }}

{{- define "arcus-operator.rules.events" -}}
# Events.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/*
As in deploy/rbac.yaml (cluster-wide mode only). The operator learns whether ServiceMonitors are
served from API discovery (GET /apis/monitoring.coreos.com/v1), which the built-in
system:discovery role allows every authenticated user, so the namespaced mode needs no
cluster-scoped permission at all and grants none.
*/}}
{{- define "arcus-operator.rules.crd" -}}
# Is the Prometheus Operator's ServiceMonitor CRD installed?
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["get", "list"]
{{- end }}
