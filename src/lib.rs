//! portico: a Kubernetes ingress controller. Ingress YAML (from the API or a directory) →
//! immutable routing snapshot → TLS-terminating proxy. See `../shared/ARCHITECTURE.md` for the
//! module boundaries; `tests/architecture.rs` keeps the import rules true.

pub mod admin;
pub mod app;
pub mod config;
pub mod controller;
pub mod crd;
pub mod file_source;
pub mod metrics;
pub mod model;
pub mod proxy;
pub mod publish;
pub mod rebuild;
pub mod telemetry;
pub mod translate;
