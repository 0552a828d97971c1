{{/* RBAC rule blocks shared by rbac.yaml (follow API_NEEDS in src/controller/rbac.rs). */}}
{{- define "portico.rules.watched" -}}
# Reflectors (list + watch); Secret data of referenced TLS Secrets (get).
- apiGroups: [""]
  resources: [services]
  verbs: [list, watch]
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch]
- apiGroups: [networking.k8s.io]
  resources: [ingresses]
  verbs: [list, watch]
- apiGroups: [discovery.k8s.io]
  resources: [endpointslices]
  verbs: [list, watch]
- apiGroups: [portico.dev]
  resources: [ratelimitpolicies]
  verbs: [list, watch]
# Status writes (leader only, server-side apply) and diagnostics as Events.
- apiGroups: [networking.k8s.io]
  resources: [ingresses/status]
  verbs: [patch]
- apiGroups: [portico.dev]
  resources: [ratelimitpolicies/status]
  verbs: [patch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create]
{{- end }}
{{- define "portico.subjects" -}}
subjects:
  - kind: ServiceAccount
    name: {{ include "portico.serviceAccountName" . }}
    namespace: {{ .Release.Namespace }}
{{- end }}
