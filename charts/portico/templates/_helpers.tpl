{{/* Chart name. */}}
{{- define "portico.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name prefix of every object: the release name, plus the chart name unless it is already in it. */}}
{{- define "portico.fullname" -}}
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

{{/* Labels on every object. */}}
{{- define "portico.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "portico.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: controller
{{- end }}

{{/* Pod selector labels (immutable once installed). */}}
{{- define "portico.selectorLabels" -}}
app.kubernetes.io/name: {{ include "portico.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "portico.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "portico.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "portico.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Watched namespaces as a list (empty: all namespaces). */}}
{{- define "portico.watchNamespaces" -}}
{{- $out := list }}
{{- range (splitList "," .Values.controller.watchNamespace) }}
{{- if trim . }}{{ $out = append $out (trim .) }}{{ end }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{/* Namespace/name of the Service published into Ingress status, or "" when not publishing one. */}}
{{- define "portico.publishService" -}}
{{- if and .Values.controller.publishService.enabled (not .Values.controller.publishStatusAddress) }}
{{- if .Values.controller.publishService.pathOverride }}
{{- .Values.controller.publishService.pathOverride }}
{{- else if .Values.controller.service.enabled }}
{{- printf "%s/%s" .Release.Namespace (include "portico.fullname" .) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Parse a Go-style duration such as 5s, 1m30s, 500ms into whole seconds, rounded up. */}}
{{- define "portico.durationSeconds" -}}
{{- $ms := 0 }}
{{- range (regexFindAll "[0-9]+(ms|s|m|h)" . -1) }}
{{- $n := regexFind "^[0-9]+" . | atoi }}
{{- $unit := trimPrefix (regexFind "^[0-9]+" .) . }}
{{- if eq $unit "ms" }}{{ $ms = add $ms $n }}
{{- else if eq $unit "s" }}{{ $ms = add $ms (mul $n 1000) }}
{{- else if eq $unit "m" }}{{ $ms = add $ms (mul $n 60000) }}
{{- else if eq $unit "h" }}{{ $ms = add $ms (mul $n 3600000) }}
{{- end }}
{{- end }}
{{- div (add $ms 999) 1000 }}
{{- end }}

{{/* The container args: `portico run` and its flags (src/config.rs). User-supplied parts are quoted. */}}
{{- define "portico.args" -}}
{{- $c := .Values.controller -}}
{{- $bind := ternary (printf "[%s]" $c.bindAddress) $c.bindAddress (contains ":" $c.bindAddress) -}}
- run
- --http-addr={{ $bind }}:{{ $c.containerPort.http }}
- --https-addr={{ $bind }}:{{ $c.containerPort.https }}
- --admin-addr={{ $bind }}:{{ $c.containerPort.admin }}
- {{ printf "--ingress-class=%s" $c.ingressClassResource.name | quote }}
- {{ printf "--controller-name=%s" $c.ingressClassResource.controllerValue | quote }}
{{- with (include "portico.watchNamespaces" . | fromJsonArray) }}
- {{ printf "--watch-namespace=%s" (join "," .) | quote }}
{{- end }}
{{- with (include "portico.publishService" .) }}
- {{ printf "--publish-service=%s" . | quote }}
{{- end }}
{{- with $c.publishStatusAddress }}
- {{ printf "--publish-status-address=%s" . | quote }}
{{- end }}
{{- with $c.defaultCertificate }}
- {{ printf "--default-certificate=%s" . | quote }}
{{- end }}
- {{ printf "--lease-name=%s-leader" (include "portico.fullname" .) | quote }}
- {{ printf "--lease-namespace=%s" .Release.Namespace | quote }}
- {{ printf "--shutdown-delay=%s" $c.shutdownDelay | quote }}
- {{ printf "--shutdown-grace=%s" $c.shutdownGrace | quote }}
- {{ printf "--log-format=%s" $c.logFormat | quote }}
{{- $owned := dict "http-addr" "controller.bindAddress and controller.containerPort.http" "https-addr" "controller.bindAddress and controller.containerPort.https" "admin-addr" "controller.bindAddress and controller.containerPort.admin" "ingress-class" "controller.ingressClassResource.name" "controller-name" "controller.ingressClassResource.controllerValue" "watch-namespace" "controller.watchNamespace" "publish-service" "controller.publishService" "publish-status-address" "controller.publishStatusAddress" "default-certificate" "controller.defaultCertificate" "lease-name" "(the release name)" "lease-namespace" "(the release namespace)" "shutdown-delay" "controller.shutdownDelay" "shutdown-grace" "controller.shutdownGrace" "log-format" "controller.logFormat" }}
{{- range $key, $value := $c.extraArgs }}
{{- /* portico refuses a flag given twice: the chart's own flags come from their values. */}}
{{- if hasKey $owned $key }}
{{- fail (printf "controller.extraArgs.%s: the chart sets --%s itself; use %s" $key $key (get $owned $key)) }}
{{- end }}
{{- if or (kindIs "bool" $value) (has (toString $value) (list "true" "false")) }}
{{- /* A switch (true or "true" alike): true passes it, false leaves it out (a switch takes no value). */}}
{{- if eq (toString $value) "true" }}
- {{ printf "--%s" $key | quote }}
{{- end }}
{{- else if and (kindIs "float64" $value) (eq $value (float64 (int64 $value))) }}
{{- /* YAML numbers arrive as float64; a whole one is written as an integer, not 1.048576e+07. */}}
- {{ printf "--%s=%d" $key (int64 $value) | quote }}
{{- else }}
- {{ printf "--%s=%v" $key $value | quote }}
{{- end }}
{{- end }}
{{- end }}
