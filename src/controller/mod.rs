//! The cluster source's controller side: leader election, status writes and Events (this
//! branch's part; the reflectors and source live beside it). May import translate, publish,
//! rebuild, metrics, kube, k8s-openapi, tokio; must not import `crate::proxy`.

pub mod events;
pub mod leader;
pub mod status;
