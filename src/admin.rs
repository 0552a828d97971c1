//! Admin listener: /healthz, /readyz, /metrics. Exposes nothing that changes state.
