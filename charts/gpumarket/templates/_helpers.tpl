{{/* Chart name, for the app.kubernetes.io/name label. */}}
{{- define "gpumarket.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Prefix of every resource name: <release>-<chart>, or the release alone when it already names the chart. */}}
{{- define "gpumarket.fullname" -}}
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

{{- define "gpumarket.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "gpumarket.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: gpumarket
{{- end }}

{{/* Selector labels of one component: pass (dict "root" $ "component" "controller"). */}}
{{- define "gpumarket.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gpumarket.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "gpumarket.controller.name" -}}
{{- printf "%s-controller" (include "gpumarket.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "gpumarket.agent.name" -}}
{{- printf "%s-agent" (include "gpumarket.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The user name the API server gives the agent's service account (the admission policy matches on it). */}}
{{- define "gpumarket.agent.username" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "gpumarket.agent.name" .) }}
{{- end }}

{{- define "gpumarket.image" -}}
{{- printf "%s:%s" .image.repository (default .root.Chart.AppVersion .image.tag) }}
{{- end }}

{{/* Container hardening shared by both components. */}}
{{- define "gpumarket.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Whether the controller runs leader election: asked for (the default), or needed by more than one replica. */}}
{{- define "gpumarket.controller.leaderElection" -}}
{{- if or .Values.controller.leaderElection (gt (int .Values.controller.replicas) 1) }}true{{ end }}
{{- end }}

{{/* The label the supplier agent puts on every market node (MODEL_LABEL, device-plugin/src/node.rs). */}}
{{- define "gpumarket.supplierNodeLabel" -}}
gpumarket.io/gpu-model
{{- end }}

{{/*
The controller's affinity: controller.affinity, and (controller.avoidSupplierNodes) a required
node affinity that keeps it off market nodes, where the supplier has root and the controller
would bring the settlement key. The rule is added to each of the user's required node selector
terms (terms are alternatives, so each must exclude market nodes), or is the only term.
*/}}
{{- define "gpumarket.controller.affinity" -}}
{{- $affinity := deepCopy (.Values.controller.affinity | default dict) }}
{{- if .Values.controller.avoidSupplierNodes }}
{{- $offMarket := dict "key" (include "gpumarket.supplierNodeLabel" .) "operator" "DoesNotExist" }}
{{- $node := deepCopy (get $affinity "nodeAffinity" | default dict) }}
{{- $required := deepCopy (get $node "requiredDuringSchedulingIgnoredDuringExecution" | default dict) }}
{{- $terms := list }}
{{- range (get $required "nodeSelectorTerms" | default list) }}
{{- $expressions := append (get . "matchExpressions" | default list) $offMarket }}
{{- $terms = append $terms (merge (dict "matchExpressions" $expressions) .) }}
{{- end }}
{{- if not $terms }}
{{- $terms = list (dict "matchExpressions" (list $offMarket)) }}
{{- end }}
{{- $_ := set $required "nodeSelectorTerms" $terms }}
{{- $_ = set $node "requiredDuringSchedulingIgnoredDuringExecution" $required }}
{{- $_ = set $affinity "nodeAffinity" $node }}
{{- end }}
{{- if $affinity }}
{{- toYaml $affinity }}
{{- end }}
{{- end }}

{{- define "gpumarket.fleet.name" -}}
{{- printf "%s-fleet" (include "gpumarket.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
