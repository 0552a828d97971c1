//! Building the `kube::Client` the controller uses: from `--kubeconfig PATH` when given, else
//! the in-cluster service-account config, else kube's default discovery (`KUBECONFIG`,
//! `~/.kube/config`), with a deadline on every API request (`--api-timeout`).
//!
//! Owns: that choice, its error messages and the request deadline ([`ApiDeadline`]). May
//! import kube; must not import the proxy.
//!
//! # Why a deadline
//!
//! kube 5 sets no read timeout (`Config::read_timeout` is `None`) and no TCP keep-alive;
//! kube-runtime's watcher guards only its watch streams (an idle timeout), not the LIST before
//! them. A request whose connection is black-holed (an API server or load balancer that went
//! away without a reset) would so wait forever: at start-up portico would never become ready,
//! later a relist would never finish and the status writer would stall. [`ApiDeadline`]
//! fails such a request after `--api-timeout`, and the caller's own retry takes over (the
//! watchers' backoff, the status writer's next pass). The default, 60 s, is the API server's
//! own limit on a non-long-running request (`kube-apiserver --request-timeout`), so a server
//! that is merely slow is never cut short. The deadline covers the call as kube's caller sees
//! it, kube's own retries of 429/503/504 included. For a watch only the response head is
//! bounded: its body is an open-ended stream that kube-runtime's idle timeout already watches.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use kube::client::ClientBuilder;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use tokio::time::{Instant, Sleep};
use tower_layer::Layer;
use tower_service::Service;

/// `--api-timeout`'s default: kube-apiserver's own `--request-timeout` default.
pub const DEFAULT_API_TIMEOUT: Duration = Duration::from_secs(60);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why no client could be built. Each message says which source was tried.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot load kubeconfig {}: {source}", path.display())]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error(
        "no Kubernetes configuration found: not running in a cluster ({in_cluster}) and no \
         usable kubeconfig ({discovery}); pass --kubeconfig PATH, or --manifests DIR to run \
         without a cluster"
    )]
    NotFound {
        in_cluster: kube::config::InClusterError,
        discovery: kube::config::InferConfigError,
    },
    #[error("cannot build a Kubernetes client from {origin}: {source}")]
    Build {
        origin: String,
        #[source]
        source: kube::Error,
    },
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

/// Where the configuration came from (for the start-up log line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigOrigin {
    Kubeconfig(PathBuf),
    InCluster,
    Discovered,
}

impl std::fmt::Display for ConfigOrigin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigOrigin::Kubeconfig(p) => write!(f, "kubeconfig {}", p.display()),
            ConfigOrigin::InCluster => f.write_str("in-cluster service account"),
            ConfigOrigin::Discovered => f.write_str("default kubeconfig discovery"),
        }
    }
}

/// The client configuration, without connecting. `kubeconfig` is `--kubeconfig`.
pub async fn load_config(kubeconfig: Option<&Path>) -> Result<(Config, ConfigOrigin)> {
    if let Some(path) = kubeconfig {
        let kc = Kubeconfig::read_from(path).map_err(|source| ClientError::Kubeconfig {
            path: path.to_path_buf(),
            source,
        })?;
        let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
            .await
            .map_err(|source| ClientError::Kubeconfig {
                path: path.to_path_buf(),
                source,
            })?;
        return Ok((config, ConfigOrigin::Kubeconfig(path.to_path_buf())));
    }
    // In a pod the service account is the intended identity, so it goes first even when a
    // kubeconfig happens to be mounted; `Config::infer` is the fallback for local runs.
    match Config::incluster() {
        Ok(config) => Ok((config, ConfigOrigin::InCluster)),
        Err(in_cluster) => match Config::infer().await {
            Ok(config) => Ok((config, ConfigOrigin::Discovered)),
            Err(discovery) => Err(ClientError::NotFound {
                in_cluster,
                discovery,
            }),
        },
    }
}

/// A client for `--kubeconfig` (see [`load_config`] for the order) whose every request has
/// `api_timeout` to complete ([`ApiDeadline`]; zero: no deadline). No request is made yet: an
/// unreachable API server shows up as watcher errors (retried with backoff), not here.
pub async fn build_client(kubeconfig: Option<&Path>, api_timeout: Duration) -> Result<Client> {
    let (config, origin) = load_config(kubeconfig).await?;
    tracing::info!(
        source = %origin,
        server = %config.cluster_url,
        api_timeout = ?api_timeout,
        "Kubernetes client configured"
    );
    let builder = ClientBuilder::try_from(config).map_err(|source| ClientError::Build {
        origin: origin.to_string(),
        source,
    })?;
    Ok(builder.with_layer(&ApiDeadlineLayer(api_timeout)).build())
}

/// The error a request gets when its deadline passes: the message names the flag.
#[derive(Debug, thiserror::Error)]
#[error("no complete answer from the Kubernetes API within {0:?} (--api-timeout)")]
pub struct ApiTimeout(pub Duration);

/// Puts [`ApiDeadline`] on a client's service stack.
#[derive(Debug, Clone, Copy)]
pub struct ApiDeadlineLayer(pub Duration);

impl<S> Layer<S> for ApiDeadlineLayer {
    type Service = ApiDeadline<S>;

    fn layer(&self, inner: S) -> ApiDeadline<S> {
        ApiDeadline {
            inner,
            timeout: self.0,
        }
    }
}

/// A deadline on every Kubernetes API request: the response head must arrive, and (for
/// anything but a watch) the whole body must be read, within `timeout` of the call; otherwise
/// the request fails with [`ApiTimeout`] and its connection is dropped. A zero `timeout` (or
/// one past what the clock can represent) passes everything through unbounded.
#[derive(Debug, Clone)]
pub struct ApiDeadline<S> {
    inner: S,
    timeout: Duration,
}

impl<S, ReqBody, B> Service<Request<ReqBody>> for ApiDeadline<S>
where
    S: Service<Request<ReqBody>, Response = Response<B>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Response = Response<DeadlineBody<B>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let timeout = self.timeout;
        let bound_body = !is_watch(req.uri());
        let call = self.inner.call(req);
        Box::pin(async move {
            // Zero means no deadline; so does one too far away for the clock to represent.
            let deadline = (!timeout.is_zero())
                .then(|| Instant::now().checked_add(timeout))
                .flatten();
            let Some(deadline) = deadline else {
                let resp = call.await.map_err(Into::into)?;
                return Ok(resp.map(|inner| DeadlineBody::unbounded(inner, timeout)));
            };
            let resp = tokio::time::timeout_at(deadline, call)
                .await
                .map_err(|_| ApiTimeout(timeout))?
                .map_err(Into::into)?;
            Ok(resp.map(|inner| DeadlineBody {
                inner,
                deadline: bound_body.then(|| Box::pin(tokio::time::sleep_until(deadline))),
                timeout,
                timed_out: false,
            }))
        })
    }
}

/// Whether a request is a watch (`?watch=true` or `?watch=1`, as the API server reads it).
fn is_watch(uri: &Uri) -> bool {
    uri.query().is_some_and(|q| {
        q.split('&')
            .any(|pair| matches!(pair, "watch=true" | "watch=1"))
    })
}

/// A response body that fails with [`ApiTimeout`] once its deadline passes (no deadline for a
/// watch's stream).
#[derive(Debug)]
pub struct DeadlineBody<B> {
    inner: B,
    deadline: Option<Pin<Box<Sleep>>>,
    timeout: Duration,
    timed_out: bool,
}

impl<B> DeadlineBody<B> {
    fn unbounded(inner: B, timeout: Duration) -> Self {
        Self {
            inner,
            deadline: None,
            timeout,
            timed_out: false,
        }
    }
}

impl<B> Body for DeadlineBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.timed_out {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let expired = this
            .deadline
            .as_mut()
            .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready());
        if expired {
            this.timed_out = true;
            return Poll::Ready(Some(Err(ApiTimeout(this.timeout).into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.timed_out || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers every request at once with a fixed body.
    struct Answer;

    impl Service<Request<()>> for Answer {
        type Response = Response<http_body_util::Full<Bytes>>;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: Request<()>) -> Self::Future {
            std::future::ready(Ok(Response::new(http_body_util::Full::new(
                Bytes::from_static(b"ok"),
            ))))
        }
    }

    #[tokio::test]
    async fn zero_and_unrepresentable_timeouts_mean_no_deadline() {
        use http_body_util::BodyExt;
        for timeout in [Duration::ZERO, Duration::MAX, Duration::from_secs(60)] {
            let mut svc = ApiDeadlineLayer(timeout).layer(Answer);
            let resp = svc
                .call(Request::new(()))
                .await
                .unwrap_or_else(|e| panic!("{timeout:?}: {e}"));
            let body = resp
                .into_body()
                .collect()
                .await
                .unwrap_or_else(|e| panic!("{timeout:?}: {e}"));
            assert_eq!(&body.to_bytes()[..], b"ok", "{timeout:?}");
        }
    }

    #[test]
    fn only_watch_queries_are_watches() {
        let watch = |s: &str| is_watch(&s.parse::<Uri>().expect("uri"));
        assert!(watch("/api/v1/services?watch=true&resourceVersion=5"));
        assert!(watch("/api/v1/services?resourceVersion=5&watch=1"));
        assert!(!watch("/api/v1/services?limit=500"));
        assert!(!watch("/api/v1/services?watch=false"));
        assert!(!watch("/api/v1/services?allowWatchBookmarks=true"));
        assert!(!watch("/api/v1/namespaces/watch/services"));
    }
}
