//! Building the `kube::Client` the controller uses: from `--kubeconfig PATH` when given, else
//! the in-cluster service-account config, else kube's default discovery (`KUBECONFIG`,
//! `~/.kube/config`).
//!
//! Owns: that choice and its error messages. May import kube; must not import the proxy.

use std::path::{Path, PathBuf};

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

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

/// A client for `--kubeconfig` (see [`load_config`] for the order). No request is made yet:
/// an unreachable API server shows up as watcher errors (retried with backoff), not here.
pub async fn build_client(kubeconfig: Option<&Path>) -> Result<Client> {
    let (config, origin) = load_config(kubeconfig).await?;
    tracing::info!(source = %origin, server = %config.cluster_url, "Kubernetes client configured");
    Client::try_from(config).map_err(|source| ClientError::Build {
        origin: origin.to_string(),
        source,
    })
}
