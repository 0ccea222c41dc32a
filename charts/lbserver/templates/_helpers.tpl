{{/*
Names, labels and the derived settings shared by the templates.
*/}}

{{- define "lbserver.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name, at most 54 characters: "-headless" must still fit in 63. */}}
{{- define "lbserver.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 54 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "lbserver.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of the balancer pods (the test pod has another component). */}}
{{- define "lbserver.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lbserver.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: balancer
{{- end }}

{{/* Standard labels without the component. */}}
{{- define "lbserver.baseLabels" -}}
helm.sh/chart: {{ include "lbserver.chart" . }}
app.kubernetes.io/name: {{ include "lbserver.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: lbserver
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "lbserver.labels" -}}
{{ include "lbserver.baseLabels" . }}
app.kubernetes.io/component: balancer
{{- end }}

{{- define "lbserver.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "lbserver.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "lbserver.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "lbserver.tokenSecretName" -}}
{{- default (printf "%s-token" (include "lbserver.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "lbserver.tokenSecretKey" -}}
{{- if .Values.auth.existingSecret }}{{ .Values.auth.existingSecretKey }}{{ else }}token{{ end }}
{{- end }}

{{/* Mount points inside the container. */}}
{{- define "lbserver.configDir" -}}/etc/lbserver/config{{- end }}
{{- define "lbserver.tokenDir" -}}/etc/lbserver/token{{- end }}
{{- define "lbserver.tlsDir" -}}/etc/lbserver/tls{{- end }}
{{- define "lbserver.clientCaDir" -}}/etc/lbserver/client-ca{{- end }}

{{/*
The Service native grpclb clients dial (service-native.yaml), "" when off:
nativeClients.backendService.name, default <fullname>-<nativeClients.service>.
*/}}
{{- define "lbserver.nativeServiceName" -}}
{{- $native := .Values.nativeClients }}
{{- if and $native.service $native.backendService.enabled }}
{{- default (printf "%s-%s" (include "lbserver.fullname" .) $native.service) $native.backendService.name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* "true" when Kubernetes discovery is on (config.kubernetes_services non-empty). */}}
{{- define "lbserver.discovery" -}}
{{- if gt (len (default list .Values.config.kubernetes_services)) 0 }}true{{ end }}
{{- end }}

{{/* "true" when Registry and Admin get their own mTLS port (registry_listen). */}}
{{- define "lbserver.separateRegistry" -}}
{{- if and .Values.tls.enabled .Values.tls.clientAuth.enabled (eq .Values.tls.clientAuth.mode "registry") }}true{{ end }}
{{- end }}

{{/* The namespaces Kubernetes discovery watches (a missing namespace is the release's). */}}
{{- define "lbserver.discoveryNamespaces" -}}
{{- $namespaces := list }}
{{- range (default list .Values.config.kubernetes_services) }}
{{- $namespaces = append $namespaces (default $.Release.Namespace .namespace) }}
{{- end }}
{{- toJson ($namespaces | uniq | sortAlpha) }}
{{- end }}

{{/* The namespaces whose pods the balancer reads: those of services with a
`scrape` block whose `cpus` is not a number (absent, or `limit`: each pod's
CPU capacity from its container's CPU limit, found through the
EndpointSlice's targetRef). A configured number needs no pod access. */}}
{{- define "lbserver.podNamespaces" -}}
{{- $namespaces := list }}
{{- range (default list .Values.config.kubernetes_services) }}
{{- if .scrape }}
{{- /* The balancer reads a member's pod (one GET) for a port given by name
or for `cpus: limit`; a port number and a CPU count need nothing. */}}
{{- $byName := and (kindIs "string" .scrape.port) (not (regexMatch "^[0-9]+$" .scrape.port)) }}
{{- $fromLimit := eq (toString (default "" .scrape.cpus)) "limit" }}
{{- if or $byName $fromLimit }}
{{- $namespaces = append $namespaces (default $.Release.Namespace .namespace) }}
{{- end }}
{{- end }}
{{- end }}
{{- toJson ($namespaces | uniq | sortAlpha) }}
{{- end }}

{{/* Seconds in a duration option: 5, 2.5, "5s", "500ms", "2m", "1h". */}}
{{- define "lbserver.seconds" -}}
{{- $v := toString . | trim }}
{{- if regexMatch "^[0-9]*\\.?[0-9]+ms$" $v }}{{ divf (trimSuffix "ms" $v | float64) 1000 }}
{{- else if regexMatch "^[0-9]*\\.?[0-9]+s?$" $v }}{{ trimSuffix "s" $v | float64 }}
{{- else if regexMatch "^[0-9]*\\.?[0-9]+m$" $v }}{{ mulf (trimSuffix "m" $v | float64) 60 }}
{{- else if regexMatch "^[0-9]*\\.?[0-9]+h$" $v }}{{ mulf (trimSuffix "h" $v | float64) 3600 }}
{{- else }}{{ fail (printf "config.shutdown_grace: expected seconds like 5, 2.5s or 500ms, got %v" .) }}
{{- end }}
{{- end }}

{{/*
The lbserver config file: values.config plus the options the chart owns.
*/}}
{{- define "lbserver.config" -}}
{{- $config := deepCopy (default dict .Values.config) }}
{{- $_ := set $config "listen" (printf "%s:%d" .Values.listenHost (int .Values.ports.grpc)) }}
{{- $_ = set $config "metrics_listen" (printf "%s:%d" .Values.listenHost (int .Values.ports.metrics)) }}
{{- if .Values.auth.enabled }}
{{- $_ = set $config "auth_token_file" (printf "%s/token" (include "lbserver.tokenDir" .)) }}
{{- end }}
{{- if .Values.tls.enabled }}
{{- $_ = set $config "tls_cert_file" (printf "%s/tls.crt" (include "lbserver.tlsDir" .)) }}
{{- $_ = set $config "tls_key_file" (printf "%s/tls.key" (include "lbserver.tlsDir" .)) }}
{{- if .Values.tls.clientAuth.enabled }}
{{- $_ = set $config "tls_client_ca_file" (printf "%s/ca.crt" (include "lbserver.clientCaDir" .)) }}
{{- $_ = set $config "tls_client_auth" .Values.tls.clientAuth.mode }}
{{- end }}
{{- end }}
{{- if include "lbserver.separateRegistry" . }}
{{- $_ = set $config "registry_listen" (printf "%s:%d" .Values.listenHost (int .Values.ports.registry)) }}
{{- end }}
{{- if .Values.config.kubernetes_services }}
{{- $watched := list }}
{{- range .Values.config.kubernetes_services }}
{{- $watched = append $watched (merge (deepCopy .) (dict "namespace" $.Release.Namespace)) }}
{{- end }}
{{- $_ = set $config "kubernetes_services" $watched }}
{{- else }}
{{- $_ = unset $config "kubernetes_services" }}
{{- end }}
{{- if .Values.nativeClients.service }}
{{- $aliases := deepCopy (default dict .Values.config.name_aliases) }}
{{- range $name := list (include "lbserver.fullname" .) (include "lbserver.nativeServiceName" .) }}
{{- if and $name (not (hasKey $aliases $name)) }}
{{- $_ := set $aliases $name $.Values.nativeClients.service }}
{{- end }}
{{- end }}
{{- $_ = set $config "name_aliases" $aliases }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/* Fails the render on inconsistent values that the schema cannot express. */}}
{{- define "lbserver.validate" -}}
{{- if and .Values.tls.enabled (not .Values.tls.secretName) }}
{{- fail "tls.enabled needs tls.secretName (a kubernetes.io/tls Secret)" }}
{{- end }}
{{- if and .Values.tls.clientAuth.enabled (not .Values.tls.enabled) }}
{{- fail "tls.clientAuth.enabled needs tls.enabled" }}
{{- end }}
{{- $grace := include "lbserver.seconds" (default 5 .Values.config.shutdown_grace) | float64 }}
{{- $needed := addf .Values.lifecycle.preStopSleepSeconds $grace }}
{{- if le (float64 .Values.terminationGracePeriodSeconds) $needed }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed lifecycle.preStopSleepSeconds + config.shutdown_grace (%v s), or open calls are killed" .Values.terminationGracePeriodSeconds $needed) }}
{{- end }}
{{- end }}

{{/*
The agent-shim gateway (agentShimGateway): `agent-shim proxy` as a Deployment
and Service that agents use as their collector. Its name is
<fullname>-agent-shim (at most 63 characters), its pods have their own
component, so no Service of the balancer selects them.
*/}}
{{- define "lbserver.gatewayName" -}}
{{- printf "%s-agent-shim" (include "lbserver.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lbserver.gatewaySelectorLabels" -}}
app.kubernetes.io/name: {{ include "lbserver.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: agent-shim-gateway
{{- end }}

{{- define "lbserver.gatewayLabels" -}}
{{ include "lbserver.baseLabels" . }}
app.kubernetes.io/component: agent-shim-gateway
{{- end }}

{{/* The service name the gateway asks the balancer for (--service). */}}
{{- define "lbserver.gatewayBalancedService" -}}
{{- default (default "oap" .Values.nativeClients.service) .Values.agentShimGateway.balancedService }}
{{- end }}

{{/* The gateway's address for agents: <name>.<namespace>.svc:<port>. */}}
{{- define "lbserver.gatewayAddress" -}}
{{- printf "%s.%s.svc:%v" (include "lbserver.gatewayName" .) .Release.Namespace .Values.agentShimGateway.service.port }}
{{- end }}

{{/* Fails the render on gateway values that cannot work. */}}
{{- define "lbserver.validateGateway" -}}
{{- $gw := .Values.agentShimGateway }}
{{- if .Values.tls.enabled }}
{{- fail "agentShimGateway.enabled needs tls.enabled=false: agent-shim proxy has no TLS options, so it cannot reach a balancer that serves TLS" }}
{{- end }}
{{- $needed := addf $gw.preStopSleepSeconds $gw.shutdownGrace }}
{{- if le (float64 $gw.terminationGracePeriodSeconds) $needed }}
{{- fail (printf "agentShimGateway.terminationGracePeriodSeconds (%v) must exceed agentShimGateway.preStopSleepSeconds + agentShimGateway.shutdownGrace (%v s), or running calls are killed" $gw.terminationGracePeriodSeconds $needed) }}
{{- end }}
{{- end }}

{{/* Labels of the `helm test` pod (not selected by the Services). */}}
{{- define "lbserver.testSelectorLabels" -}}
app.kubernetes.io/name: {{ include "lbserver.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: test
{{- end }}

{{- define "lbserver.testVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .Values.auth.enabled }}
- name: token
  mountPath: /etc/lbserver/token
  readOnly: true
{{- end }}
{{- if .Values.tls.enabled }}
- name: tls-ca
  mountPath: /etc/lbserver/tls
  readOnly: true
{{- end }}
{{- if .Values.tests.clientCertSecretName }}
- name: client-cert
  mountPath: /etc/lbserver/client
  readOnly: true
{{- end }}
{{- end }}
