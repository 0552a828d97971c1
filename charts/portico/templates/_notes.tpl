{{/* The NOTES text, as a named template so tests/chart.rs can render it without a cluster (helm 3 `install --dry-run` needs one). */}}
{{- define "portico.notes" -}}
portico {{ .Chart.AppVersion }} is installed as release {{ .Release.Name }} in namespace {{ .Release.Namespace }}.

Wait until it is ready:

  kubectl -n {{ .Release.Namespace }} rollout status {{ .Values.controller.kind | lower }}/{{ include "portico.fullname" . }}

{{- if .Values.controller.service.enabled }}
{{- $svc := include "portico.fullname" . }}
{{- $type := .Values.controller.service.type }}

Reach the controller:
{{- if eq $type "LoadBalancer" }}

  # The load balancer's address (it may take a minute to appear):
  kubectl -n {{ .Release.Namespace }} get service {{ $svc }} -o jsonpath='{.status.loadBalancer.ingress[0]}'
{{- else if eq $type "NodePort" }}

  # Any node address, on the Service's node ports:
  kubectl -n {{ .Release.Namespace }} get service {{ $svc }} -o jsonpath='{range .spec.ports[*]}{.name}={.nodePort} {end}'
{{- end }}
{{- if .Values.controller.hostPort.enabled }}

  # hostPort is on: every node running portico answers on ports {{ .Values.controller.hostPort.ports.http }} and {{ .Values.controller.hostPort.ports.https }}.
{{- end }}

  # From your machine, whatever the Service type:
  kubectl -n {{ .Release.Namespace }} port-forward service/{{ $svc }} 8080:{{ .Values.controller.service.ports.http }}
{{- end }}

Create a first Ingress (class "{{ .Values.controller.ingressClassResource.name }}"{{ if .Values.controller.ingressClassResource.default }}, the cluster default{{ end }}):

  kubectl create deployment web --image=registry.k8s.io/e2e-test-images/agnhost:2.53 -- /agnhost netexec --http-port=8080
  kubectl expose deployment web --port=80 --target-port=8080
  kubectl create ingress web --class={{ .Values.controller.ingressClassResource.name }} --rule="web.example.com/*=web:80"
  curl -H 'Host: web.example.com' http://<address>/

{{- if and (not .Values.controller.publishStatusAddress) (not (include "portico.publishService" .)) }}

Ingress status is not written: no Service is published (controller.service.enabled is off, or
controller.publishService.enabled is). Set controller.publishStatusAddress to the addresses
clients use, or controller.publishService.enabled=true with controller.publishService.pathOverride
naming another Service.
{{- end }}

{{- if .Values.controller.watchNamespace }}

Only these namespaces are watched: {{ .Values.controller.watchNamespace }}. Ingresses elsewhere are ignored.
{{- end }}

Health and metrics are on the admin port {{ .Values.controller.containerPort.admin }} (/healthz, /readyz, /metrics), never on the public Service.
{{- end }}
