{{/* Names -------------------------------------------------------------------------- */}}

{{- define "keel.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release's base name. Ray pods get names like <fullname>-<hash>-rollout-worker-xxxxx, so
     it is kept to 40 characters. */}}
{{- define "keel.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "keel.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels: app.kubernetes.io/* on every object. Call with (dict "ctx" $ "component" "...") */}}
{{- define "keel.selectorLabels" -}}
app.kubernetes.io/name: {{ include "keel.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end -}}

{{- define "keel.labels" -}}
{{ include "keel.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: keel
helm.sh/chart: {{ include "keel.chart" .ctx }}
{{- end -}}

{{- define "keel.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "keel.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "keel.tokenSecretName" -}}
{{- default (printf "%s-grpc-token" (include "keel.fullname" .)) .Values.grpcToken.existingSecret -}}
{{- end -}}

{{/* Whether pods get the gRPC token file. */}}
{{- define "keel.tokenEnabled" -}}
{{- if or .Values.grpcToken.create .Values.grpcToken.existingSecret }}true{{ end -}}
{{- end -}}

{{- define "keel.claimName" -}}
{{- default (printf "%s-run" (include "keel.fullname" .)) .Values.persistence.existingClaim -}}
{{- end -}}

{{- define "keel.runDir" -}}
{{- default (printf "%s/runs/%s" .Values.persistence.mountPath (include "keel.fullname" .)) .Values.job.runDir -}}
{{- end -}}

{{/* The Ray job's submission id: names the job's control actor, so `keel scale --job` finds it. */}}
{{- define "keel.jobId" -}}
{{- printf "keel-%s" (include "keel.fullname" .) -}}
{{- end -}}

{{/* image: call with (dict "ctx" $ "image" <a group's image override>) */}}
{{- define "keel.image" -}}
{{- $img := .image | default dict -}}
{{- $repo := default .ctx.Values.image.repository $img.repository -}}
{{- $tag := default (default .ctx.Chart.AppVersion .ctx.Values.image.tag) $img.tag -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}

{{/* A config value (YAML text or a mapping) as a dict. Call with (dict "value" <v> "path" "<values path>") */}}
{{- define "keel.parseConfig" -}}
{{- $v := .value -}}
{{- if kindIs "string" $v -}}
{{- $v = fromYaml $v -}}
{{- if hasKey $v "Error" -}}
{{- fail (printf "%s: not valid YAML: %s" .path (get $v "Error")) -}}
{{- end -}}
{{- end -}}
{{- toYaml ($v | default dict) -}}
{{- end -}}

{{/* The run config as written to the ConfigMap: values' config, with transport.grpc.token_file
     pointing at the mounted token when a token Secret is in use (unless the config names one), and
     with metrics.enabled, logging.metrics_port/metrics_host set so that the metrics Service reaches
     the controller's /metrics (a config value that would break that fails, naming it). */}}
{{- define "keel.trainConfig" -}}
{{- $cfg := include "keel.parseConfig" (dict "value" .Values.config "path" "config") | fromYaml -}}
{{- if include "keel.tokenEnabled" . -}}
{{- $transport := get $cfg "transport" | default dict -}}
{{- $grpc := get $transport "grpc" | default dict -}}
{{- if not (hasKey $grpc "token_file") -}}
{{- $_ := set $grpc "token_file" (printf "%s/%s" .Values.grpcToken.mountPath .Values.grpcToken.key) -}}
{{- end -}}
{{- $_ := set $transport "grpc" $grpc -}}
{{- $_ := set $cfg "transport" $transport -}}
{{- end -}}
{{- if .Values.metrics.enabled -}}
{{- $logging := get $cfg "logging" | default dict -}}
{{- include "keel.checkMetricsPort" (dict "ctx" . "section" $logging "key" "metrics_port" "path" "config.logging.metrics_port") -}}
{{- $host := get $logging "metrics_host" -}}
{{- if and $host (not (has $host (list "0.0.0.0" "::"))) -}}
{{- fail (printf "config.logging.metrics_host: %v is not reachable through the metrics Service (metrics.enabled); drop it (the chart sets 0.0.0.0) or use 0.0.0.0 or ::" $host) -}}
{{- end -}}
{{- $_ := set $logging "metrics_port" (int .Values.metrics.port) -}}
{{- $_ := set $logging "metrics_host" (default "0.0.0.0" $host) -}}
{{- $_ := set $cfg "logging" $logging -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* With metrics.enabled, a config's own metrics port must be unset or metrics.port, the port the
     container declares and the Service targets. Call with (dict "ctx" $ "section" <dict> "key" "metrics_port" "path" "<where>") */}}
{{- define "keel.checkMetricsPort" -}}
{{- $port := int .ctx.Values.metrics.port -}}
{{- $v := index .section .key -}}
{{- if and (hasKey .section .key) (not (kindIs "invalid" $v)) (ne (toString $v) (toString $port)) -}}
{{- fail (printf "%s: %v differs from metrics.port (%d), where the metrics Service looks; drop it from the config or set metrics.port" .path $v $port) -}}
{{- end -}}
{{- end -}}

{{/* The reward server's config: values' rewardServer.config plus port, bind address, token, TLS and
     (metrics.enabled) metrics_port. */}}
{{- define "keel.rewardServerConfig" -}}
{{- $cfg := include "keel.parseConfig" (dict "value" .Values.rewardServer.config "path" "rewardServer.config") | fromYaml -}}
{{- $grpc := get $cfg "grpc" | default dict -}}
{{- $_ := set $grpc "host" "0.0.0.0" -}}
{{- if include "keel.tokenEnabled" . -}}
{{- $_ := set $grpc "token_file" (printf "%s/%s" .Values.grpcToken.mountPath .Values.grpcToken.key) -}}
{{- else -}}
{{- $_ := set $grpc "auth" false -}}
{{- end -}}
{{- if .Values.rewardServer.tls.existingSecret -}}
{{- $_ := set $grpc "tls_cert" "/var/run/secrets/keel-tls/tls.crt" -}}
{{- $_ := set $grpc "tls_key" "/var/run/secrets/keel-tls/tls.key" -}}
{{- end -}}
{{- $_ := set $cfg "grpc" $grpc -}}
{{- $_ := set $cfg "port" (int .Values.rewardServer.port) -}}
{{- if .Values.metrics.enabled -}}
{{- include "keel.checkMetricsPort" (dict "ctx" . "section" $cfg "key" "metrics_port" "path" "rewardServer.config.metrics_port") -}}
{{- $_ := set $cfg "metrics_port" (int .Values.metrics.port) -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* Checks that no schema rule can express: they fail `helm template` naming the value. */}}
{{- define "keel.validate" -}}
{{- range $role, $g := .Values.workerGroups -}}
{{- if and $g.enabled (lt (int $g.maxReplicas) (int $g.minReplicas)) -}}
{{- fail (printf "workerGroups.%s.maxReplicas: %d is below workerGroups.%s.minReplicas (%d)" $role (int $g.maxReplicas) $role (int $g.minReplicas)) -}}
{{- end -}}
{{- if and $g.enabled (or (lt (int $g.replicas) (int $g.minReplicas)) (gt (int $g.replicas) (int $g.maxReplicas))) -}}
{{- fail (printf "workerGroups.%s.replicas: %d is outside [minReplicas %d, maxReplicas %d]" $role (int $g.replicas) (int $g.minReplicas) (int $g.maxReplicas)) -}}
{{- end -}}
{{- end -}}
{{- $rs := .Values.rewardServer -}}
{{- if and $rs.enabled $rs.autoscaling.enabled (lt (int $rs.autoscaling.maxReplicas) (int $rs.autoscaling.minReplicas)) -}}
{{- fail (printf "rewardServer.autoscaling.maxReplicas: %d is below rewardServer.autoscaling.minReplicas (%d)" (int $rs.autoscaling.maxReplicas) (int $rs.autoscaling.minReplicas)) -}}
{{- end -}}
{{- /* every custom resource a role asks for must be offered by an enabled worker group */ -}}
{{- $offered := dict -}}
{{- range $role, $g := .Values.workerGroups -}}
{{- if $g.enabled -}}
{{- range $res, $_ := $g.rayResources -}}
{{- $_ := set $offered $res $role -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- $cfg := include "keel.parseConfig" (dict "value" .Values.config "path" "config") | fromYaml -}}
{{- $grpc := get (get $cfg "transport" | default dict) "grpc" | default dict -}}
{{- range $role := list "rollout" "reward" "reference" "learner" -}}
{{- /* an external reward server (transport.grpc.reward_address) means no reward actors */ -}}
{{- if not (and (eq $role "reward") (get $grpc "reward_address")) -}}
{{- $section := get $cfg $role | default dict -}}
{{- $resources := get $section "resources" | default dict -}}
{{- range $res, $_ := (get $resources "custom" | default dict) -}}
{{- if not (hasKey $offered $res) -}}
{{- fail (printf "config.%s.resources.custom.%s: no enabled worker group offers the Ray resource %q (set workerGroups.<group>.rayResources)" $role $res $res) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and (not .Values.persistence.enabled) .Values.persistence.existingClaim -}}
{{- fail "persistence.existingClaim: set, but persistence.enabled is false" -}}
{{- end -}}
{{- $m := .Values.metrics -}}
{{- if and $m.serviceMonitor.enabled (not $m.enabled) -}}
{{- fail "metrics.serviceMonitor.enabled: true, but metrics.enabled is false (nothing would serve /metrics)" -}}
{{- end -}}
{{- if $m.enabled -}}
{{- $taken := dict "6379" "the Ray GCS port" "8265" "the Ray dashboard port" "10001" "the Ray client port" -}}
{{- if $rs.enabled -}}
{{- $_ := set $taken (toString (int $rs.port)) "rewardServer.port" -}}
{{- end -}}
{{- with get $taken (toString (int $m.port)) -}}
{{- fail (printf "metrics.port: %d is already %s" (int $m.port) .) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Restricted container security context. Call with (dict "readOnly" <bool>) */}}
{{- define "keel.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: {{ .readOnly }}
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "keel.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurityContext.runAsUser }}
runAsGroup: {{ .Values.podSecurityContext.runAsGroup }}
fsGroup: {{ .Values.podSecurityContext.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* requests = limits (Guaranteed QoS, what KubeRay recommends: Ray reads its CPU/GPU/memory
     from the limits). Call with (dict "r" <resources> "gpuName" <name>) */}}
{{- define "keel.resourceList" -}}
cpu: {{ .r.cpu | quote }}
memory: {{ .r.memory | quote }}
{{- if and .r.gpu (gt (int .r.gpu) 0) }}
{{ .gpuName }}: {{ int .r.gpu }}
{{- end }}
{{- end -}}

{{- define "keel.resources" -}}
requests:
  {{- include "keel.resourceList" . | nindent 2 }}
limits:
  {{- include "keel.resourceList" . | nindent 2 }}
{{- end -}}

{{/* Writable scratch for a read-only root filesystem: /tmp, Ray's /tmp/ray, $HOME (~/.cache), /dev/shm. */}}
{{- define "keel.scratchVolumes" -}}
- name: tmp
  emptyDir: {sizeLimit: 2Gi}
- name: ray-tmp
  emptyDir: {sizeLimit: {{ .rayTmpSize | quote }}}
- name: home
  emptyDir: {sizeLimit: 20Gi}
- name: dshm
  emptyDir: {medium: Memory, sizeLimit: {{ .shmSize | quote }}}
{{- end -}}

{{- define "keel.scratchMounts" -}}
- {name: tmp, mountPath: /tmp}
- {name: ray-tmp, mountPath: /tmp/ray}
- {name: home, mountPath: {{ .Values.homeDir }}}
- {name: dshm, mountPath: /dev/shm}
{{- end -}}

{{/* The config, token and run volume every Ray pod mounts. */}}
{{- define "keel.keelVolumes" -}}
- name: config
  configMap:
    name: {{ include "keel.fullname" . }}-config
{{- if include "keel.tokenEnabled" . }}
- name: grpc-token
  secret:
    secretName: {{ include "keel.tokenSecretName" . }}
    defaultMode: 0440
    items:
      - {key: {{ .Values.grpcToken.key }}, path: {{ .Values.grpcToken.key }}}
{{- end }}
{{- if .Values.persistence.enabled }}
- name: run
  persistentVolumeClaim:
    claimName: {{ include "keel.claimName" . }}
{{- end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "keel.keelMounts" -}}
- {name: config, mountPath: /etc/keel, readOnly: true}
{{- if include "keel.tokenEnabled" . }}
- {name: grpc-token, mountPath: {{ .Values.grpcToken.mountPath }}, readOnly: true}
{{- end }}
{{- if .Values.persistence.enabled }}
- {name: run, mountPath: {{ .Values.persistence.mountPath }}}
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "keel.env" -}}
- {name: HOME, value: {{ .Values.homeDir | quote }}}
- {name: TOKENIZERS_PARALLELISM, value: "false"}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The NetworkPolicy ingress rule that admits metrics.allowFrom to the metrics port; nothing when
     both selectors are {} (then only `kubectl port-forward` reaches it). */}}
{{- define "keel.metricsIngress" -}}
{{- $from := .Values.metrics.allowFrom -}}
{{- if or $from.namespaceLabels $from.podLabels -}}
- from:
    - {{- with $from.namespaceLabels }}
      namespaceSelector:
        matchLabels:
          {{- toYaml . | nindent 10 }}
      {{- end }}
      {{- with $from.podLabels }}
      podSelector:
        matchLabels:
          {{- toYaml . | nindent 10 }}
      {{- end }}
  ports:
    - {protocol: TCP, port: {{ .Values.metrics.port }}}
{{- end -}}
{{- end -}}
