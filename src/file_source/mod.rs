//! The file provider: a directory of Kubernetes YAML → [`Inputs`], with a live watch
//! (brief §4.2).
//!
//! Owns: directory scanning, per-file last-good objects, change notification to the rebuild
//! loop. May import: translate (Inputs), publish, tokio, notify. Not the proxy.

pub mod parse;

pub use parse::{Object, ParseError, parse_manifests};
