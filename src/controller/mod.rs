//! The cluster source's controller side: leader election, status writes and Events (this
//! branch's part; the reflectors and source live beside it). May import translate, publish,
//! rebuild, metrics, kube, k8s-openapi, tokio; must not import `crate::proxy`.
//!
//! # Wiring (cluster mode, in `app`)
//!
//! ```text
//! let elector = leader::LeaderElector::new(client.clone(), leader::LeaderConfig::from_run_args(&args))?;
//! let is_leader = elector.subscribe();                      // watch::Receiver<bool>
//! spawn(elector.run(shutdown.clone()));                     // releases the Lease on shutdown
//! spawn(status::run(status::StatusWriter::new(client.clone(),
//!           status::PublishAddress::from_flags(&args.publish_status_address, args.publish_service.as_ref())),
//!       is_leader.clone(), views /* watch::Receiver<Arc<StatusView>> after each build */,
//!       status::DEFAULT_RESYNC, shutdown.clone()));
//! spawn(events::run(events::EventReporter::new(client,
//!           events::EventsConfig::new(&args.translate.controller_name, identity)),
//!       is_leader, rebuilder.diagnostics(), Duration::from_secs(5), shutdown));
//! ```
//!
//! Every replica serves traffic; only the leader writes status and Events. The status and
//! Event loops end when the elector's channel closes (the elector returned).

pub mod events;
pub mod leader;
pub mod status;
