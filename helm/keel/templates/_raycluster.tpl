{{/* The Ray cluster: a head and one worker group per Keel role. Shared by the RayJob
     (spec.rayClusterSpec) and the RayCluster (spec). */}}
{{- define "keel.rayClusterSpec" -}}
{{- $ := . -}}
{{- $autoscale := .Values.autoscaler.enabled -}}
rayVersion: {{ .Values.rayVersion | quote }}
enableInTreeAutoscaling: {{ $autoscale }}
{{- if $autoscale }}
autoscalerOptions:
  version: {{ .Values.autoscaler.version }}
  upscalingMode: {{ .Values.autoscaler.upscalingMode }}
  idleTimeoutSeconds: {{ .Values.autoscaler.idleTimeoutSeconds }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  resources:
    {{- include "keel.resources" (dict "r" .Values.autoscaler.resources "gpuName" .Values.gpuResourceName) | nindent 4 }}
  securityContext:
    {{- include "keel.containerSecurityContext" (dict "readOnly" true) | nindent 4 }}
  env:
    - {name: HOME, value: /tmp}
  # The autoscaler is the one container that talks to the Kubernetes API (it patches this
  # cluster's worker replicas): it alone gets the service account token, from a projected volume.
  volumeMounts:
    - {name: autoscaler-token, mountPath: /var/run/secrets/kubernetes.io/serviceaccount, readOnly: true}
    - {name: tmp, mountPath: /tmp}
{{- end }}
headGroupSpec:
  serviceType: ClusterIP
  rayStartParams:
    dashboard-host: "0.0.0.0"
    # No role lands on the head: it runs the controller (the job's driver), GCS and the dashboard.
    num-cpus: "0"
    {{- range $k, $v := .Values.head.rayStartParams }}
    {{ $k }}: {{ $v | quote }}
    {{- end }}
  template:
    metadata:
      labels:
        {{- include "keel.labels" (dict "ctx" $ "component" "ray-head") | nindent 8 }}
        {{- with .Values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with .Values.podAnnotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      serviceAccountName: {{ include "keel.serviceAccountName" . }}
      automountServiceAccountToken: false
      securityContext:
        {{- include "keel.podSecurityContext" . | nindent 8 }}
      terminationGracePeriodSeconds: {{ .Values.head.terminationGracePeriodSeconds }}
      {{- with .Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.head.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.head.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.head.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: ray-head
          image: {{ include "keel.image" (dict "ctx" $) }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          ports:
            - {containerPort: 6379, name: gcs-server}
            - {containerPort: 8265, name: dashboard}
            - {containerPort: 10001, name: client}
            {{- if .Values.metrics.enabled }}
            # The controller's Prometheus /metrics (logging.metrics_port), behind <fullname>-metrics.
            # Not named `metrics`: KubeRay gives that name to Ray's own exporter (8080, which its
            # PodMonitor scrapes) and adds it only when no port has it.
            - {containerPort: {{ .Values.metrics.port }}, name: keel-metrics, protocol: TCP}
            {{- end }}
          env:
            {{- include "keel.env" . | nindent 12 }}
          resources:
            {{- include "keel.resources" (dict "r" .Values.head.resources "gpuName" .Values.gpuResourceName) | nindent 12 }}
          securityContext:
            {{- include "keel.containerSecurityContext" (dict "readOnly" true) | nindent 12 }}
          volumeMounts:
            {{- include "keel.scratchMounts" . | nindent 12 }}
            {{- include "keel.keelMounts" . | nindent 12 }}
      volumes:
        {{- include "keel.scratchVolumes" .Values.head | nindent 8 }}
        {{- include "keel.keelVolumes" . | nindent 8 }}
        {{- if $autoscale }}
        - name: autoscaler-token
          projected:
            defaultMode: 0440
            sources:
              - serviceAccountToken: {path: token, expirationSeconds: 3600}
              - configMap:
                  name: kube-root-ca.crt
                  items: [{key: ca.crt, path: ca.crt}]
              - downwardAPI:
                  items:
                    - path: namespace
                      fieldRef: {apiVersion: v1, fieldPath: metadata.namespace}
        {{- end }}
workerGroupSpecs:
{{- range $role := list "learner" "rollout" "reward" "reference" }}
{{- $g := get $.Values.workerGroups $role }}
{{- if $g.enabled }}
  - groupName: {{ $role }}
    replicas: {{ $g.replicas }}
    minReplicas: {{ $g.minReplicas }}
    maxReplicas: {{ $g.maxReplicas }}
    rayStartParams:
      # The Ray resources this group offers; the run config's <role>.resources.custom asks for them.
      resources: {{ toJson $g.rayResources | quote | toJson }}
      {{- range $k, $v := $g.rayStartParams }}
      {{ $k }}: {{ $v | quote }}
      {{- end }}
    template:
      metadata:
        labels:
          {{- include "keel.labels" (dict "ctx" $ "component" (printf "ray-%s" $role)) | nindent 10 }}
          {{- with $.Values.podLabels }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        {{- with $.Values.podAnnotations }}
        annotations:
          {{- toYaml . | nindent 10 }}
        {{- end }}
      spec:
        serviceAccountName: {{ include "keel.serviceAccountName" $ }}
        automountServiceAccountToken: false
        securityContext:
          {{- include "keel.podSecurityContext" $ | nindent 10 }}
        {{- if and $autoscale (eq $.Values.autoscaler.version "v2") }}
        restartPolicy: Never
        {{- end }}
        {{- with $.Values.imagePullSecrets }}
        imagePullSecrets:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- with $g.nodeSelector }}
        nodeSelector:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- with $g.tolerations }}
        tolerations:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- with $g.affinity }}
        affinity:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        containers:
          - name: ray-worker
            image: {{ include "keel.image" (dict "ctx" $ "image" $g.image) }}
            imagePullPolicy: {{ $.Values.image.pullPolicy }}
            env:
              {{- include "keel.env" $ | nindent 14 }}
            resources:
              {{- include "keel.resources" (dict "r" $g.resources "gpuName" $.Values.gpuResourceName) | nindent 14 }}
            securityContext:
              {{- include "keel.containerSecurityContext" (dict "readOnly" $g.readOnlyRootFilesystem) | nindent 14 }}
            volumeMounts:
              {{- include "keel.scratchMounts" $ | nindent 14 }}
              {{- include "keel.keelMounts" $ | nindent 14 }}
        volumes:
          {{- include "keel.scratchVolumes" $g | nindent 10 }}
          {{- include "keel.keelVolumes" $ | nindent 10 }}
{{- end }}
{{- end }}
{{- end -}}
