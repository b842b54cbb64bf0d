{{/* ---------- names ---------- */}}

{{- define "shardmesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "shardmesh.fullname" -}}
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

{{- define "shardmesh.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Router Deployment and Service name. */}}
{{- define "shardmesh.routerName" -}}
{{- printf "%s-router" (include "shardmesh.fullname" .) -}}
{{- end -}}

{{/* A shard group's StatefulSet, headless Service and PDB name. Call with (dict "ctx" $ "shard" $shard). */}}
{{- define "shardmesh.groupName" -}}
{{- printf "%s-%s" (include "shardmesh.fullname" .ctx) .shard.name -}}
{{- end -}}

{{- define "shardmesh.routerServiceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- include "shardmesh.routerName" . -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.routerName -}}
{{- end -}}
{{- end -}}

{{/* With connect-inject and ACLs, consul-k8s requires the ServiceAccount name to equal the Consul service name. */}}
{{- define "shardmesh.workerServiceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- if eq (include "shardmesh.consulRegistration" .) "connect-inject" -}}
{{- .Values.consul.serviceName -}}
{{- else -}}
{{- printf "%s-worker" (include "shardmesh.fullname" .) -}}
{{- end -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.workerName -}}
{{- end -}}
{{- end -}}

{{- define "shardmesh.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* ---------- labels ---------- */}}

{{/*
Selector labels: the stable subset only (never version or chart, which change on upgrade and selectors are immutable).
Call with (dict "ctx" $ "component" "worker" "group" "s0"); group is optional.
*/}}
{{- define "shardmesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "shardmesh.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- with .group }}
shardmesh.io/shard-group: {{ . }}
{{- end }}
{{- end -}}

{{- define "shardmesh.labels" -}}
{{ include "shardmesh.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: shardmesh
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
helm.sh/chart: {{ include "shardmesh.chart" .ctx }}
{{- end -}}

{{/* ---------- Consul ---------- */}}

{{/* "true" when workers are discovered through Consul (the subchart or an existing Consul), "" otherwise. */}}
{{- define "shardmesh.consulOn" -}}
{{- if or .Values.consul.enabled .Values.consul.address -}}true{{- end -}}
{{- end -}}

{{/* The registration style in force: agent | connect-inject | catalog-sync, or "none" without Consul. */}}
{{- define "shardmesh.consulRegistration" -}}
{{- if include "shardmesh.consulOn" . -}}{{ .Values.consul.registration }}{{- else -}}none{{- end -}}
{{- end -}}

{{/* Consul HTTP address the router watches: consul.address, else the subchart's server Service. */}}
{{- define "shardmesh.consulAddress" -}}
{{- if .Values.consul.address -}}
{{- .Values.consul.address -}}
{{- else -}}
{{- $consulName := dig "global" "name" "" .Values.consul | default (printf "%s-consul" .Release.Name) -}}
{{- printf "%s-server.%s.svc:8500" ($consulName | trunc 63 | trimSuffix "-") .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/* ---------- secrets: TLS, mesh key, client tokens, Consul ACL token ---------- */}}

{{/* Where TLS certificates come from: "secret" (tls.secretName), "cert-manager", "generated", or "" (TLS off). */}}
{{- define "shardmesh.tlsSource" -}}
{{- if .Values.tls.enabled -}}
{{- if .Values.tls.secretName -}}secret
{{- else if .Values.tls.certManager.enabled -}}cert-manager
{{- else -}}generated
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
The TLS Secret a component mounts: tls.secretName for everyone, else <fullname>-<component>-tls (router, worker,
client: the helm test pod's client certificate). Call with (dict "ctx" $ "component" "router").
*/}}
{{- define "shardmesh.tlsSecretName" -}}
{{- if .ctx.Values.tls.secretName -}}
{{- .ctx.Values.tls.secretName -}}
{{- else -}}
{{- printf "%s-%s-tls" (include "shardmesh.fullname" .ctx) .component -}}
{{- end -}}
{{- end -}}

{{/* DNS names and IPs in the router's certificate: its Service in every form clients use, plus port-forwards. */}}
{{- define "shardmesh.routerCertNames" -}}
{{- $svc := include "shardmesh.routerName" . -}}
{{- $ns := .Release.Namespace -}}
{{- $dns := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.clusterDomain) "localhost" -}}
{{- toJson (dict "dns" (concat $dns .Values.tls.routerDnsNames) "ips" (concat (list "127.0.0.1") .Values.tls.routerIpAddresses)) -}}
{{- end -}}

{{/* DNS names in the workers' certificate: every pod of every shard group (what the router and peers dial). */}}
{{- define "shardmesh.workerCertNames" -}}
{{- $dns := list "localhost" -}}
{{- range $s := .Values.shards -}}
{{- $group := include "shardmesh.groupName" (dict "ctx" $ "shard" $s) -}}
{{- $domain := printf "%s.%s.svc.%s" $group $.Release.Namespace $.Values.clusterDomain -}}
{{- $dns = concat $dns (list (printf "*.%s" $domain) $domain) -}}
{{- end -}}
{{- toJson (dict "dns" $dns "ips" (list "127.0.0.1")) -}}
{{- end -}}

{{/* A worker's per-pod DNS name (what it advertises with TLS). Call with (dict "ctx" $ "shard" $s). */}}
{{- define "shardmesh.workerPodHost" -}}
{{- $group := include "shardmesh.groupName" . -}}
{{- printf "$(POD_NAME).%s.%s.svc.%s" $group .ctx.Release.Namespace .ctx.Values.clusterDomain -}}
{{- end -}}

{{- define "shardmesh.meshKeySecretName" -}}
{{- default (printf "%s-mesh-key" (include "shardmesh.fullname" .)) .Values.meshKey.existingSecret -}}
{{- end -}}

{{/* "true" when the router authenticates clients by bearer token (router.auth), "" otherwise. */}}
{{- define "shardmesh.clientAuthOn" -}}
{{- if or .Values.router.auth.existingSecret .Values.router.auth.tokens -}}true{{- end -}}
{{- end -}}

{{- define "shardmesh.authSecretName" -}}
{{- default (printf "%s-router-tokens" (include "shardmesh.fullname" .)) .Values.router.auth.existingSecret -}}
{{- end -}}

{{/* The Secret holding the Consul ACL token, or "" when there is none. */}}
{{- define "shardmesh.consulAclSecretName" -}}
{{- if .Values.consul.aclToken.secretName -}}
{{- .Values.consul.aclToken.secretName -}}
{{- else if .Values.consul.aclToken.value -}}
{{- printf "%s-consul-acl" (include "shardmesh.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/*
Security flags: --mesh-key-file (router and workers), --auth-tokens-file (router). Call with
(dict "ctx" $ "component" "router").
*/}}
{{- define "shardmesh.securityArgs" -}}
{{- $v := .ctx.Values -}}
{{- $args := list -}}
{{- if $v.meshKey.enabled -}}
{{- $args = concat $args (list "--mesh-key-file" (printf "%s/%s" (trimSuffix "/" $v.meshKey.mountPath) $v.meshKey.secretKey)) -}}
{{- end -}}
{{- if and (eq .component "router") (include "shardmesh.clientAuthOn" .ctx) -}}
{{- $args = concat $args (list "--auth-tokens-file" (printf "%s/%s" (trimSuffix "/" $v.router.auth.mountPath) $v.router.auth.secretKey)) -}}
{{- end -}}
{{- with $args -}}
{{- toYaml . -}}
{{- end -}}
{{- end -}}

{{/*
Read-only Secret volumes of a component: TLS (router, worker, client = the helm test pod), mesh key (router,
worker), client tokens (router). Secret volumes, never subPath mounts, so the kubelet updates changed files.
Call with (dict "ctx" $ "component" "router").
*/}}
{{- define "shardmesh.secretVolumeMounts" -}}
{{- $v := .ctx.Values -}}
{{- if $v.tls.enabled }}
- name: tls
  mountPath: {{ $v.tls.mountPath }}
  readOnly: true
{{- end }}
{{- if and $v.meshKey.enabled (ne .component "client") }}
- name: mesh-key
  mountPath: {{ $v.meshKey.mountPath }}
  readOnly: true
{{- end }}
{{- if and (eq .component "router") (include "shardmesh.clientAuthOn" .ctx) }}
- name: auth-tokens
  mountPath: {{ $v.router.auth.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "shardmesh.secretVolumes" -}}
{{- $v := .ctx.Values -}}
{{- if $v.tls.enabled }}
- name: tls
  secret:
    secretName: {{ include "shardmesh.tlsSecretName" . }}
    defaultMode: 288  # 0440: readable by the pod's fsGroup only
{{- end }}
{{- if and $v.meshKey.enabled (ne .component "client") }}
- name: mesh-key
  secret:
    secretName: {{ include "shardmesh.meshKeySecretName" .ctx }}
    defaultMode: 288
    items:
      - key: {{ $v.meshKey.secretKey }}
        path: {{ $v.meshKey.secretKey }}
{{- end }}
{{- if and (eq .component "router") (include "shardmesh.clientAuthOn" .ctx) }}
- name: auth-tokens
  secret:
    secretName: {{ include "shardmesh.authSecretName" .ctx }}
    defaultMode: 288
    items:
      - key: {{ $v.router.auth.secretKey }}
        path: {{ $v.router.auth.secretKey }}
{{- end }}
{{- end -}}

{{/* ---------- validation the schema cannot express ---------- */}}

{{- define "shardmesh.validate" -}}
{{- $seen := dict -}}
{{- range $i, $s := .Values.shards -}}
{{- if hasKey $seen $s.name -}}
{{- fail (printf "shards[%d]: shard group name %q is used twice; each group needs its own name" $i $s.name) -}}
{{- end -}}
{{- $_ := set $seen $s.name true -}}
{{- $parts := splitList ":" $s.layers -}}
{{- if ne (len $parts) 2 -}}
{{- fail (printf "shards[%d] (%s): layer range %q must be START:END, e.g. 0:3" $i $s.name $s.layers) -}}
{{- end -}}
{{- $start := index $parts 0 | atoi -}}
{{- $end := index $parts 1 | atoi -}}
{{- if le $end $start -}}
{{- fail (printf "shards[%d] (%s): layer range %q is empty: END must be greater than START (half-open range START:END, e.g. %d:%d)" $i $s.name $s.layers $end $start) -}}
{{- end -}}
{{- $group := include "shardmesh.groupName" (dict "ctx" $ "shard" $s) -}}
{{- if gt (len $group) 52 -}}
{{- fail (printf "shards[%d]: StatefulSet name %q is longer than 52 characters; shorten the release name, fullnameOverride or the group name" $i $group) -}}
{{- end -}}
{{- end -}}
{{- if ne .Values.weights.source "image" -}}
{{- if not (hasPrefix (printf "%s/" (trimSuffix "/" .Values.weights.mountPath)) .Values.model) -}}
{{- fail (printf "model %q must be a directory under weights.mountPath %q when weights.source is %q (e.g. %s/smollm2)" .Values.model .Values.weights.mountPath .Values.weights.source (trimSuffix "/" .Values.weights.mountPath)) -}}
{{- end -}}
{{- end -}}
{{- if and (eq .Values.weights.source "pvc") (not .Values.weights.pvc.claimName) -}}
{{- fail "weights.source is pvc: set weights.pvc.claimName to an existing PersistentVolumeClaim" -}}
{{- end -}}
{{- if and (eq .Values.weights.source "init") (not .Values.weights.init.convert) (not .Values.weights.init.copyFrom) -}}
{{- fail "weights.source is init: set weights.init.convert (a built-in model to convert) or weights.init.copyFrom (a directory to copy)" -}}
{{- end -}}
{{- range $component := list "router" "worker" -}}
{{- $cfg := index $.Values $component -}}
{{- if and (not (kindIs "invalid" $cfg.graceS)) (ge (float64 $cfg.graceS) (float64 $cfg.terminationGracePeriodSeconds)) -}}
{{- fail (printf "%s.graceS (%v s) must be shorter than %s.terminationGracePeriodSeconds (%v s), or the kubelet kills the pod before in-flight requests finish" $component $cfg.graceS $component $cfg.terminationGracePeriodSeconds) -}}
{{- end -}}
{{- end -}}
{{- range $component := list "router" "worker" -}}
{{- $cfg := index $.Values $component -}}
{{- $ports := dict -}}
{{- $named := list (list "port" $cfg.port) (list "metricsPort" $cfg.metricsPort) -}}
{{- if $.Values.tls.enabled -}}
{{- $named = append $named (list "healthPort" $cfg.healthPort) -}}
{{- end -}}
{{- range $named -}}
{{- $key := toString (int (index . 1)) -}}
{{- if hasKey $ports $key -}}
{{- fail (printf "%s.%s and %s.%s are both %s: each listener of the %s needs its own port" $component (get $ports $key) $component (index . 0) $key $component) -}}
{{- end -}}
{{- $_ := set $ports $key (index . 0) -}}
{{- end -}}
{{- end -}}
{{- if and .Values.tls.enabled .Values.tls.secretName .Values.tls.certManager.enabled -}}
{{- fail "tls: set either tls.secretName (an existing Secret) or tls.certManager.enabled (cert-manager Certificates), not both" -}}
{{- end -}}
{{- $registration := include "shardmesh.consulRegistration" . -}}
{{- if and .Values.tls.enabled (has $registration (list "connect-inject" "catalog-sync")) -}}
{{- fail (printf "tls.enabled with consul.registration=%s: consul-k8s registers the worker pods' IP addresses, which no certificate names, so the router could not verify the workers; use consul.registration=agent (with TLS, workers register their per-pod DNS names), or set tls.enabled=false" $registration) -}}
{{- end -}}
{{- if and .Values.consul.aclToken.secretName .Values.consul.aclToken.value -}}
{{- fail "consul.aclToken: set either secretName (an existing Secret) or value (the chart creates the Secret), not both" -}}
{{- end -}}
{{- if and .Values.router.auth.existingSecret .Values.router.auth.tokens -}}
{{- fail "router.auth: set either existingSecret (an existing Secret) or tokens (the chart creates the Secret), not both" -}}
{{- end -}}
{{- if and (not .Values.consul.address) .Values.consul.enabled -}}
{{- if and (eq .Values.consul.registration "agent") (not (dig "client" "enabled" false .Values.consul)) -}}
{{- fail "consul.registration=agent needs Consul client agents on the nodes: set consul.client.enabled=true (or use registration connect-inject / catalog-sync)" -}}
{{- end -}}
{{- if and (eq .Values.consul.registration "catalog-sync") (not (dig "syncCatalog" "enabled" false .Values.consul)) -}}
{{- fail "consul.registration=catalog-sync needs consul-k8s catalog sync: set consul.syncCatalog.enabled=true" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* ---------- pod building blocks ---------- */}}

{{/* Environment shared by router and worker containers. */}}
{{- define "shardmesh.env" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: HOST_IP
  valueFrom:
    fieldRef:
      fieldPath: status.hostIP
- name: SHARDMESH_CACHE
  value: {{ .Values.cache.path | quote }}
- name: HF_HOME
  value: {{ printf "%s/huggingface" (trimSuffix "/" .Values.cache.path) | quote }}
- name: HF_HUB_OFFLINE
  value: "1"
{{- $aclSecret := include "shardmesh.consulAclSecretName" . }}
{{- if and (include "shardmesh.consulOn" .) $aclSecret }}
- name: CONSUL_HTTP_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ $aclSecret }}
      key: {{ .Values.consul.aclToken.secretKey }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* TLS flags: --tls-cert/--tls-key (server TLS), plus --tls-ca for mutual TLS. */}}
{{- define "shardmesh.tlsArgs" -}}
{{- if .Values.tls.enabled -}}
{{- $dir := trimSuffix "/" .Values.tls.mountPath -}}
{{- $args := list "--tls-cert" (printf "%s/tls.crt" $dir) "--tls-key" (printf "%s/tls.key" $dir) -}}
{{- if .Values.tls.mutual -}}
{{- $args = concat $args (list "--tls-ca" (printf "%s/ca.crt" $dir)) -}}
{{- end -}}
{{- toYaml $args -}}
{{- end -}}
{{- end -}}

{{/*
Probes: native gRPC probes of grpc.health.v1 (service ""), which reports NOT_SERVING until the process is ready.
The kubelet's gRPC probe cannot speak TLS, so with tls.enabled they call the plaintext health-only listener
(--health-listen, container port "health", see shardmesh.healthListenArgs) instead of the gRPC port.
Call with (dict "ctx" $ "cfg" .Values.worker); cfg provides port, healthPort and the probe settings.
*/}}
{{- define "shardmesh.probePort" -}}
{{- if .ctx.Values.tls.enabled -}}{{ int .cfg.healthPort }}{{- else -}}{{ int .cfg.port }}{{- end -}}
{{- end -}}

{{- define "shardmesh.probes" -}}
{{- $action := dict "grpc" (dict "port" (include "shardmesh.probePort" . | int) "service" "") -}}
startupProbe:
{{- toYaml (merge (deepCopy $action) .cfg.startupProbe) | nindent 2 }}
readinessProbe:
{{- toYaml (merge (deepCopy $action) .cfg.readinessProbe) | nindent 2 }}
livenessProbe:
{{- toYaml (merge (deepCopy $action) .cfg.livenessProbe) | nindent 2 }}
{{- end -}}

{{/* With tls.enabled: --health-listen on cfg.healthPort. Call with (dict "ctx" $ "cfg" .Values.router). */}}
{{- define "shardmesh.healthListenArgs" -}}
{{- if .ctx.Values.tls.enabled -}}
{{- toYaml (list "--health-listen" (printf "0.0.0.0:%d" (int .cfg.healthPort))) -}}
{{- end -}}
{{- end -}}

{{/* With tls.enabled: the "health" container port. Call with (dict "ctx" $ "cfg" .Values.router). */}}
{{- define "shardmesh.healthContainerPort" -}}
{{- if .ctx.Values.tls.enabled -}}
- name: health
  containerPort: {{ .cfg.healthPort }}
  protocol: TCP
{{- end -}}
{{- end -}}

{{/* Volume mounts shared by router, worker and the weights init container. */}}
{{- define "shardmesh.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: cache
  mountPath: {{ .Values.cache.path }}
{{- if ne .Values.weights.source "image" }}
- name: weights
  mountPath: {{ .Values.weights.mountPath }}
  {{- if eq .Values.weights.source "pvc" }}
  readOnly: true
  {{- with .Values.weights.pvc.subPath }}
  subPath: {{ . }}
  {{- end }}
  {{- end }}
{{- end }}
{{- end -}}

{{- define "shardmesh.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
- name: cache
  emptyDir:
    sizeLimit: {{ .Values.cache.sizeLimit }}
{{- if eq .Values.weights.source "pvc" }}
- name: weights
  persistentVolumeClaim:
    claimName: {{ .Values.weights.pvc.claimName }}
    readOnly: true
{{- else if eq .Values.weights.source "init" }}
- name: weights
  emptyDir:
    sizeLimit: {{ .Values.weights.init.sizeLimit }}
{{- end }}
{{- end -}}

{{/* The init container that fills the weights emptyDir (weights.source=init). */}}
{{- define "shardmesh.weightsInitContainer" -}}
{{- if eq .Values.weights.source "init" }}
- name: weights
  {{- $repo := default .Values.image.repository .Values.weights.init.image.repository }}
  {{- $tag := default (default .Chart.AppVersion .Values.image.tag) .Values.weights.init.image.tag }}
  image: {{ printf "%s:%s" $repo $tag | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  {{- if .Values.weights.init.copyFrom }}
  command: ["cp", "-R", {{ printf "%s/." (trimSuffix "/" .Values.weights.init.copyFrom) | quote }}, {{ .Values.model | quote }}]
  {{- else }}
  command: ["shardmesh"]
  args: ["convert", {{ .Values.weights.init.convert | quote }}, {{ .Values.model | quote }}]
  {{- end }}
  env:
    - name: SHARDMESH_CACHE
      value: {{ .Values.cache.path | quote }}
    - name: HF_HOME
      value: {{ printf "%s/huggingface" (trimSuffix "/" .Values.cache.path) | quote }}
    - name: HF_HUB_OFFLINE
      value: "1"
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  {{- with .Values.weights.init.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  volumeMounts:
    - name: tmp
      mountPath: /tmp
    - name: cache
      mountPath: {{ .Values.cache.path }}
    - name: weights
      mountPath: {{ .Values.weights.mountPath }}
{{- end }}
{{- end -}}

{{/* Prometheus scrape annotations. Call with (dict "ctx" $ "port" 9090). */}}
{{- define "shardmesh.metricsAnnotations" -}}
{{- if .ctx.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .port | quote }}
prometheus.io/path: /metrics
{{- end }}
{{- end -}}

{{/* A flag value as text; whole numbers print without exponent or ".0" (values arrive as float64). */}}
{{- define "shardmesh.flagValue" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) -}}
{{- . | int64 -}}
{{- else -}}
{{- . | toString -}}
{{- end -}}
{{- end -}}
