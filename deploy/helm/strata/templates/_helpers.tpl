{{/* Names and labels. */}}
{{- define "strata.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "strata.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else if contains (include "strata.name" .) .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "strata.name" .) | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "strata.selectorLabels" -}}
app.kubernetes.io/name: {{ include "strata.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "strata.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "strata.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: strata
{{- end -}}

{{- define "strata.workerService" -}}
{{- printf "%s-worker" (include "strata.fullname" .) -}}
{{- end -}}

{{/* The StatefulSet of one device kind: `<fullname>-worker` for cpu, `<fullname>-worker-cuda`. */}}
{{- define "strata.workerSet" -}}
{{- if eq .kind "cpu" -}}
{{- include "strata.workerService" .root -}}
{{- else -}}
{{- printf "%s-%s" (include "strata.workerService" .root) .kind -}}
{{- end -}}
{{- end -}}

{{- define "strata.image" -}}
{{- $tag := .root.Values.image.tag | default .root.Chart.AppVersion -}}
{{- if eq .kind "cuda" -}}
{{- $tag = .root.Values.image.cudaTag | default (printf "%s-cuda" .root.Chart.AppVersion) -}}
{{- end -}}
{{- printf "%s:%s" .root.Values.image.repository $tag -}}
{{- end -}}

{{/*
The devices of the topology, as JSON: {"cpu": N, "cuda": M}, the number of worker pods of each
kind. Pod i of a kind serves device kind[i], so a kind's devices must be numbered 0 to N-1. A
topology that names no device runs on one CPU worker (`cpu[0]` is the default device). Fails,
with a message that names the value and the device, when the chart cannot place the topology.
*/}}
{{- define "strata.devices" -}}
{{- $topology := dict -}}
{{- if .Values.topology -}}
{{- $topology = fromYaml .Values.topology -}}
{{- if hasKey $topology "Error" -}}
{{- fail (printf "values.topology is not valid YAML: %s" (get $topology "Error")) -}}
{{- end -}}
{{- end -}}
{{- $ordinals := dict "cpu" (list) "cuda" (list) -}}
{{- range $key, $entry := $topology -}}
{{- if and $entry (not (kindIs "map" $entry)) -}}
{{- fail (printf "values.topology: `%s` must map to `isq` and/or `device`, not `%v`" $key $entry) -}}
{{- end -}}
{{- if and $entry (hasKey $entry "device") -}}
{{- $device := toString (get $entry "device") | trim -}}
{{- $kind := "" -}}
{{- $n := 0 -}}
{{- if eq $device "cpu" -}}
{{- $kind = "cpu" -}}
{{- else if regexMatch "^(cpu|cuda)\\[[0-9]+\\]$" $device -}}
{{- $kind = regexFind "^[a-z]+" $device -}}
{{- $n = regexFind "[0-9]+" $device | atoi -}}
{{- else -}}
{{- fail (printf "values.topology: `%s` names device `%s`; this chart places `cpu`, `cpu[N]` and `cuda[N]` devices, one worker pod each" $key $device) -}}
{{- end -}}
{{- $_ := set $ordinals $kind (append (get $ordinals $kind) $n | uniq) -}}
{{- end -}}
{{- end -}}
{{- if and (empty (get $ordinals "cpu")) (empty (get $ordinals "cuda")) -}}
{{- $_ := set $ordinals "cpu" (list 0) -}}
{{- end -}}
{{- $counts := dict -}}
{{- $names := list -}}
{{- range $kind := list "cpu" "cuda" -}}
{{- $have := get $ordinals $kind -}}
{{- range $i := until (len $have) -}}
{{- if not (has $i $have) -}}
{{- $named := list -}}
{{- range $n := $have | sortAlpha -}}{{- $named = append $named (printf "%s[%s]" $kind $n) -}}{{- end -}}
{{- fail (printf "values.topology names %s but not %s[%d]: worker pods are numbered from 0, so a topology's %s devices must be %s[0] to %s[%d]" (join ", " $named) $kind $i $kind $kind $kind (sub (len $have) 1)) -}}
{{- end -}}
{{- $names = append $names (printf "%s[%d]" $kind $i) -}}
{{- end -}}
{{- $_ := set $counts $kind (len $have) -}}
{{- end -}}
{{- if gt (len $names) (int .Values.workers.maxPods) -}}
{{- fail (printf "values.topology names %d devices (%s) but workers.maxPods is %d: this release may place at most %d worker pods, one per device" (len $names) (join ", " $names) (int .Values.workers.maxPods) (int .Values.workers.maxPods)) -}}
{{- end -}}
{{- toJson $counts -}}
{{- end -}}

{{/* The environment every Strata container gets. */}}
{{- define "strata.env" -}}
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: RUST_LOG
  value: {{ .Values.logLevel | quote }}
- name: STRATA_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
{{- with .Values.tracing.otlpEndpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ . | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ $.Values.tracing.sampler | quote }}
{{- with $.Values.tracing.samplerArg }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ . | quote }}
{{- end }}
{{- end }}
- name: STRATA_CACHE
  value: /cache/strata
- name: HF_HOME
  value: /cache/huggingface
- name: PIP_CACHE_DIR
  value: /cache/pip
- name: HOME
  value: /cache/home
- name: TMPDIR
  value: /tmp
{{- if .Values.model.tokenSecret.name }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.model.tokenSecret.name }}
      key: {{ .Values.model.tokenSecret.key }}
{{- end }}
{{- end -}}

{{- define "strata.volumeMounts" -}}
- name: cache
  mountPath: /cache
- name: tmp
  mountPath: /tmp
- name: topology
  mountPath: /etc/strata
  readOnly: true
{{- if not .Values.tls.insecure }}
- name: tls
  mountPath: /etc/strata-tls
  readOnly: true
{{- end }}
{{- if .Values.model.volume }}
- name: model
  mountPath: {{ .Values.model.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{- define "strata.volumes" -}}
- name: cache
{{- if .Values.cache.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.cache.existingClaim }}
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.cache.sizeLimit }}
{{- end }}
- name: tmp
  emptyDir: {}
- name: topology
  configMap:
    name: {{ include "strata.fullname" . }}-topology
{{- if not .Values.tls.insecure }}
- name: tls
  secret:
    secretName: {{ include "strata.tlsSecret" . }}
    defaultMode: 0440
{{- end }}
{{- if .Values.model.volume }}
- name: model
{{ toYaml .Values.model.volume | indent 2 }}
{{- end }}
{{- end -}}

{{/* The model path must be on a mounted volume: no model is baked into the image. */}}
{{- define "strata.checkModel" -}}
{{- if and (hasPrefix "/" .Values.model.id) (not .Values.model.volume) -}}
{{- fail (printf "model.id is a path (%s) but model.volume is empty: set model.volume to the volume that holds it (mounted at model.mountPath, %s)" .Values.model.id .Values.model.mountPath) -}}
{{- end -}}
{{- if and .Values.model.volume (hasPrefix "/" .Values.model.id) (not (hasPrefix .Values.model.mountPath .Values.model.id)) -}}
{{- fail (printf "model.id (%s) is not under model.mountPath (%s), where model.volume is mounted" .Values.model.id .Values.model.mountPath) -}}
{{- end -}}
{{- end -}}

{{/* The Secret with the links' certificates: the user's, or the chart's own. */}}
{{- define "strata.tlsSecret" -}}
{{- .Values.tls.secretName | default (printf "%s-links-tls" (include "strata.fullname" .)) -}}
{{- end -}}

{{/* The flags that secure a process's links: mutual TLS with the mounted Secret, or
`--insecure`. */}}
{{- define "strata.linkArgs" -}}
{{- if .Values.tls.insecure -}}
- --insecure
{{- else -}}
- --tls-cert=/etc/strata-tls/tls.crt
- --tls-key=/etc/strata-tls/tls.key
- --tls-ca=/etc/strata-tls/ca.crt
- --tls-server-name={{ .Values.tls.serverName }}
{{- end -}}
{{- end -}}
