{{/* The chart's name, or nameOverride. */}}
{{- define "meshward.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-wide name of the objects: fullnameOverride, else the release
name (with the chart's name added unless it contains it). */}}
{{- define "meshward.fullname" -}}
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

{{- define "meshward.selectorLabels" -}}
app.kubernetes.io/name: {{ include "meshward.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "meshward.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "meshward.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: meshward
{{- end }}

{{- define "meshward.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "meshward.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "meshward.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* host:port for healthAddress; IPv6 hosts get brackets. */}}
{{- define "meshward.healthAddress" -}}
{{- if contains ":" .Values.health.host }}
{{- printf "[%s]:%d" .Values.health.host (int .Values.health.port) }}
{{- else }}
{{- printf "%s:%d" .Values.health.host (int .Values.health.port) }}
{{- end }}
{{- end }}

{{/* observeAddress: the health endpoint's host, observe.tcp.port. */}}
{{- define "meshward.observeAddress" -}}
{{- if contains ":" .Values.health.host }}
{{- printf "[%s]:%d" .Values.health.host (int .Values.observe.tcp.port) }}
{{- else }}
{{- printf "%s:%d" .Values.health.host (int .Values.observe.tcp.port) }}
{{- end }}
{{- end }}

{{/* Where the observe token Secret is mounted in the agent container. */}}
{{- define "meshward.observeTokenDir" -}}
/etc/meshward-observe
{{- end }}

{{/* The agent's configuration file (agent/src/config.rs). */}}
{{- define "meshward.agentConfig" -}}
{{- $a := .Values.agent -}}
{{- $cidr := required "agent.clusterCIDR is required: the cluster's whole IPv4 pod range (see the profile's comment on where to find it)" $a.clusterCIDR -}}
# meshward agent configuration. nodeName and endpoint come per node from
# the DaemonSet (--node-name, --endpoint).
datastore: kubernetes
stateDir: {{ $a.stateDir }}
socketPath: {{ printf "%s/agent.sock" $a.runDir }}
listenPort: {{ int $a.listenPort }}
underlayMTU: {{ int $a.underlayMTU }}
{{- if $a.mtu }}
mtu: {{ int $a.mtu }}
{{- end }}
clusterCIDR: {{ $cidr }}
strictMode: {{ $a.strictMode }}
{{- if not $a.mesh }}
# Policy only: the cloud's CNI addresses and routes pods; no WireGuard.
mesh: false
{{- end }}
{{- if $a.keyRotationInterval }}
keyRotationInterval: {{ $a.keyRotationInterval | quote }}
{{- end }}
healthAddress: {{ include "meshward.healthAddress" . | quote }}
# The DNS proxy's sockets are held by the pod's dns-keeper container while
# the agent container restarts.
dnsSocketKeeper: {{ ternary "external" "off" .Values.dnsSocketKeeper.enabled }}
# Answers the DNS proxy keeps (by their TTL) and serves to pods the policy
# lets ask; 0: every query goes to the pod's resolver.
dnsAnswerCacheEntries: {{ int $a.dnsAnswerCacheEntries }}
{{- if not .Values.observe.flowEvents }}
flowEvents: false
{{- end }}
{{- if .Values.observe.tcp.enabled }}
{{- $_ := required "observe.tcp.tokenSecret is required with observe.tcp.enabled: a Secret with the token under the key `token`" .Values.observe.tcp.tokenSecret }}
observeAddress: {{ include "meshward.observeAddress" . | quote }}
observeTokenFile: {{ printf "%s/token" (include "meshward.observeTokenDir" .) }}
{{- end }}
{{- end }}

{{/* The Node's name and address, for --node-name and --endpoint. */}}
{{- define "meshward.nodeEnv" -}}
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
- name: HOST_IP
  valueFrom:
    fieldRef:
      fieldPath: status.hostIP
{{- end }}
