//! Cluster mode: the Kubernetes API as a source of [`crate::translate::Inputs`], and what the
//! elected leader writes back (Ingress status, RateLimitPolicy conditions, Events).
//!
//! Owns: the kube client ([`client`]), the reflectors ([`source`]), the API-needs table
//! ([`rbac`]), referenced Secrets' key material ([`secret_data`]), leader election on a Lease ([`leader`]), status writes ([`status`]) and
//! Diagnostics → Events ([`events`]). May import translate, publish, rebuild, metrics, crd,
//! config, model, kube, k8s-openapi, tokio. Must never import `crate::proxy` (brief §3).
//!
//! Wiring (in `app`): build the client; start [`ClusterSource`] and await
//! [`ClusterSource::synced`] before the rebuild loop's first build (never publish a partial
//! view); run the [`leader::LeaderElector`]; feed [`status::run`] a [`status::StatusView`] after
//! every build and [`events::run`] the rebuild loop's diagnostics. Every replica serves
//! traffic; only the leader writes status and Events.

pub mod client;
pub mod events;
pub mod leader;
pub mod rbac;
pub mod secret_data;
pub mod source;
pub mod status;

pub use client::{ClientError, ConfigOrigin, build_client, load_config};
pub use rbac::{API_NEEDS, ApiNeed, Scope};
pub use source::{ClusterSource, SourceConfig};
