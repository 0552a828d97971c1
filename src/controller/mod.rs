//! Cluster mode: the Kubernetes API as a source of [`crate::translate::Inputs`], plus the
//! RBAC it needs. (Leader election, status and Events live in sibling modules.)
//!
//! Owns: building the kube client ([`client`]), the reflectors ([`source`]) and the API-needs
//! table ([`rbac`]). May import translate, publish, rebuild, metrics, crd, kube, k8s-openapi,
//! tokio. Must never import `crate::proxy` (brief §3).
//!
//! # Wiring (what `app` does for `portico run` without `--manifests`)
//!
//! ```no_run
//! use portico::controller::{build_client, ClusterSource, SourceConfig};
//! use portico::metrics::Metrics;
//! use portico::publish;
//! use portico::rebuild::{RebuildConfig, Rebuilder, Trigger};
//! use tokio::sync::watch;
//!
//! async fn serve(args: &portico::config::RunArgs, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
//!     let stopped = |mut rx: watch::Receiver<bool>| async move {
//!         let _ = rx.wait_for(|s| *s).await;
//!     };
//!     let client = build_client(args.kubeconfig.as_deref()).await?;
//!     let trigger = Trigger::new();
//!     let config = SourceConfig {
//!         namespaces: args.watch_namespace.clone(),
//!         ..Default::default()
//!     };
//!     let (source, watch_task) =
//!         ClusterSource::start(client, config, trigger.clone(), stopped(stop.clone()));
//!     // Never publish (and never turn /readyz 200) before every kind listed once.
//!     tokio::select! {
//!         () = source.synced() => {}
//!         () = stopped(stop.clone()) => return Ok(()),
//!     }
//!     let (publisher, _reader) = publish::channel();
//!     let rebuilder = Rebuilder::new(RebuildConfig::default(), publisher, Metrics::new(), trigger);
//!     rebuilder.run(&*source, stopped(stop)).await;
//!     watch_task.await?;
//!     Ok(())
//! }
//! ```

pub mod client;
pub mod rbac;
pub mod source;

pub use client::{ClientError, ConfigOrigin, build_client, load_config};
pub use rbac::{API_NEEDS, ApiNeed, Scope};
pub use source::{ClusterSource, SourceConfig};
