//! Command line and environment: every flag (also as `PORTICO_*`), parsed once into typed,
//! validated values. Each part gets its own small config built from these.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;

use crate::model::duration::parse_duration;

/// portico: a Kubernetes ingress controller. Ingress v1 routing, TLS termination and load
/// balancing straight to pod endpoints.
#[derive(Debug, Parser)]
#[command(name = "portico", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the controller and proxy: fed from the Kubernetes API (in-cluster config or
    /// `--kubeconfig`), or from a manifests directory with `--manifests DIR`.
    Run(Box<RunArgs>),
    /// Parse and translate a manifests directory offline; print diagnostics; exit 1 on errors.
    Check(CheckArgs),
    /// Print the RateLimitPolicy CustomResourceDefinition YAML.
    Crd,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Text,
}

/// Options that shape translation, shared by `run` and `check`.
#[derive(Debug, Clone, Args)]
pub struct TranslateArgs {
    /// IngressClass name served by this controller.
    #[arg(long, env = "PORTICO_INGRESS_CLASS", default_value = crate::translate::DEFAULT_INGRESS_CLASS)]
    pub ingress_class: String,
    /// `spec.controller` value that marks an IngressClass as ours.
    #[arg(long, env = "PORTICO_CONTROLLER_NAME", default_value = crate::translate::DEFAULT_CONTROLLER_NAME)]
    pub controller_name: String,
    /// TLS Secret (`namespace/name`) served for unknown or missing SNI; a self-signed
    /// certificate is generated at start when absent.
    #[arg(long, env = "PORTICO_DEFAULT_CERTIFICATE", value_parser = parse_ns_name)]
    pub default_certificate: Option<(String, String)>,
    /// Upstream connect timeout (annotation `proxy-connect-timeout` overrides).
    #[arg(long, env = "PORTICO_PROXY_CONNECT_TIMEOUT", default_value = "5s", value_parser = parse_positive_dur)]
    pub proxy_connect_timeout: Duration,
    /// Time to wait for upstream response headers (annotation `proxy-read-timeout` overrides).
    #[arg(long, env = "PORTICO_PROXY_READ_TIMEOUT", default_value = "60s", value_parser = parse_positive_dur)]
    pub proxy_read_timeout: Duration,
    /// Request body limit: bytes, or with a k, m or g suffix as the annotation takes it (1m);
    /// 0 = unlimited (annotation `proxy-body-size` overrides).
    #[arg(long, env = "PORTICO_PROXY_BODY_SIZE", default_value = "1m", value_parser = parse_body_size)]
    pub proxy_body_size: u64,
}

/// `portico check DIR`.
#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// Directory of Kubernetes YAML (searched recursively).
    pub dir: PathBuf,
    #[command(flatten)]
    pub translate: TranslateArgs,
}

/// `portico run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Serve this directory of Kubernetes YAML (recursively; watched live) instead of the
    /// Kubernetes API.
    #[arg(long, env = "PORTICO_MANIFESTS")]
    pub manifests: Option<PathBuf>,
    /// Plain HTTP listener (h1 and h2c prior knowledge).
    #[arg(long, env = "PORTICO_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: SocketAddr,
    /// HTTPS listener (ALPN h2, http/1.1).
    #[arg(long, env = "PORTICO_HTTPS_ADDR", default_value = "0.0.0.0:8443")]
    pub https_addr: SocketAddr,
    /// Admin listener: /healthz, /readyz, /metrics.
    #[arg(long, env = "PORTICO_ADMIN_ADDR", default_value = "0.0.0.0:9090")]
    pub admin_addr: SocketAddr,
    #[command(flatten)]
    pub translate: TranslateArgs,
    /// After SIGTERM, keep accepting for this long (readiness already 503) so endpoint removal
    /// propagates before listeners close.
    #[arg(long, env = "PORTICO_SHUTDOWN_DELAY", default_value = "0s", value_parser = parse_dur)]
    pub shutdown_delay: Duration,
    /// After listeners close, in-flight requests get this long before they are cut.
    #[arg(long, env = "PORTICO_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_dur)]
    pub shutdown_grace: Duration,
    /// Peers whose forwarding headers are trusted (comma-separated CIDRs or addresses); from
    /// others, X-Forwarded-* are replaced or removed, and Forwarded, X-Original-*,
    /// X-Rewrite-URL and X-Scheme removed. Their X-Forwarded-Proto (last entry) https counts
    /// as HTTPS (no redirect, HSTS sent).
    #[arg(long, env = "PORTICO_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_net)]
    pub trusted_proxies: Vec<IpNet>,
    /// Log format for logs and access logs.
    #[arg(long, env = "PORTICO_LOG_FORMAT", value_enum, default_value = "json")]
    pub log_format: LogFormat,
    /// Turn off the per-request access log.
    #[arg(long, env = "PORTICO_NO_ACCESS_LOG")]
    pub no_access_log: bool,
    /// Proxy worker threads (default: number of cores).
    #[arg(long, env = "PORTICO_WORKER_THREADS")]
    pub worker_threads: Option<usize>,
    /// Maximum open client connections; above it portico stops accepting (backpressure).
    #[arg(long, env = "PORTICO_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = parse_at_least_one)]
    pub max_connections: usize,
    /// Cap on concurrent requests for the whole proxy; excess → 503. 0 = no cap.
    #[arg(long, env = "PORTICO_MAX_CONCURRENT_REQUESTS", default_value_t = 0)]
    pub max_concurrent_requests: u32,
    /// Time allowed for a client to send the full request head; then 408 / close.
    #[arg(long, env = "PORTICO_CLIENT_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_positive_dur)]
    pub client_header_timeout: Duration,
    /// Idle keep-alive timeout for client connections.
    #[arg(long, env = "PORTICO_CLIENT_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_positive_dur)]
    pub client_idle_timeout: Duration,
    /// Idle timeout of WebSockets and other upgraded streams, and of a response being
    /// streamed on which nothing moves either way (a client not reading, an upstream stalled
    /// mid-body): an HTTP/1.1 connection is closed, an HTTP/2 stream reset (its upstream
    /// exchange ends at once). Waiting for response headers is the read timeout's business.
    /// 0s turns it off.
    #[arg(long, env = "PORTICO_STREAM_IDLE_TIMEOUT", default_value = "1h", value_parser = parse_dur)]
    pub stream_idle_timeout: Duration,
    /// Maximum retries of a failed request on other endpoints.
    #[arg(long, env = "PORTICO_MAX_RETRIES", default_value_t = 2)]
    pub max_retries: u32,
    /// HTTP/2 max concurrent streams per client connection.
    #[arg(long, env = "PORTICO_H2_MAX_CONCURRENT_STREAMS", default_value_t = 100)]
    pub h2_max_concurrent_streams: u32,
    /// Most rate-limit token buckets held at once (all RateLimitPolicies together); beyond it
    /// idle buckets are dropped first, so memory stays bounded under a flood of client keys.
    #[arg(long, env = "PORTICO_RATE_LIMIT_MAX_KEYS", default_value_t = crate::proxy::DEFAULT_RATE_LIMIT_MAX_KEYS)]
    pub rate_limit_max_keys: usize,
    /// Largest share of a backend's endpoints (percent) passive health checking may eject.
    #[arg(long, env = "PORTICO_MAX_EJECTION_PERCENT", default_value_t = crate::proxy::DEFAULT_MAX_EJECTION_PERCENT, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub max_ejection_percent: u8,
    /// Kubeconfig for the cluster source (default: in-cluster service account, else
    /// KUBECONFIG / ~/.kube/config). Ignored with --manifests.
    #[arg(long, env = "PORTICO_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// Deadline for each Kubernetes API request (a list page, a get, a write; for a watch, its
    /// response head): an unanswered request fails after it and is retried with backoff.
    /// 0s = no deadline.
    #[arg(long, env = "PORTICO_API_TIMEOUT", default_value = "60s", value_parser = parse_dur)]
    pub api_timeout: Duration,
    /// Namespaces to watch (comma-separated or repeated); all namespaces when absent.
    /// IngressClasses are cluster-scoped and always watched. Ignored with --manifests.
    #[arg(long, env = "PORTICO_WATCH_NAMESPACE", value_delimiter = ',')]
    pub watch_namespace: Vec<String>,
    /// Service (namespace/name) whose load-balancer address, else external IPs, else cluster
    /// IP, is written into the status of served Ingresses (cluster mode).
    #[arg(long, env = "PORTICO_PUBLISH_SERVICE", value_parser = parse_ns_name)]
    pub publish_service: Option<(String, String)>,
    /// Addresses (IPs or lower-case DNS names without a port, comma-separated) written into
    /// the status of served Ingresses; takes precedence over --publish-service.
    #[arg(long, env = "PORTICO_PUBLISH_STATUS_ADDRESS", value_delimiter = ',', value_parser = parse_publish_address)]
    pub publish_status_address: Vec<String>,
    /// Name of the coordination.k8s.io/v1 Lease used for leader election.
    #[arg(long, env = "PORTICO_LEASE_NAME", default_value = "portico-leader")]
    pub lease_name: String,
    /// Namespace of the leader Lease (default: POD_NAMESPACE, else the service-account
    /// namespace file, else `default`).
    #[arg(long, env = "PORTICO_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// How long a Lease is valid after its last renewal; other replicas take over after it.
    #[arg(long, env = "PORTICO_LEASE_DURATION", default_value = "15s", value_parser = parse_dur)]
    pub lease_duration: Duration,
    /// A leader that could not renew for this long steps down (must be < --lease-duration).
    #[arg(long, env = "PORTICO_RENEW_DEADLINE", default_value = "10s", value_parser = parse_dur)]
    pub renew_deadline: Duration,
    /// Interval between acquire/renew attempts.
    #[arg(long, env = "PORTICO_RETRY_PERIOD", default_value = "2s", value_parser = parse_dur)]
    pub retry_period: Duration,
}

fn parse_dur(s: &str) -> Result<Duration, String> {
    parse_duration(s)
        .ok_or_else(|| format!("invalid duration {s:?} (examples: 500ms, 5s, 1m, 1h30m)"))
}

/// A duration that must not be zero: a zero connect, read, header or idle timeout would fail
/// every request or connection (the annotations refuse it too).
fn parse_positive_dur(s: &str) -> Result<Duration, String> {
    match parse_dur(s)? {
        d if d.is_zero() => Err(format!("{s:?} is zero; it must be longer than that")),
        d => Ok(d),
    }
}

/// A count of at least one (zero would serve nothing).
fn parse_at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_string()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("{s:?}: {e}")),
    }
}

/// The annotation's size syntax (`1048576`, `512k`, `8m`, `1g`; `0` = unlimited).
fn parse_body_size(s: &str) -> Result<u64, String> {
    crate::translate::parse_size(s).ok_or_else(|| {
        format!("invalid size {s:?} (examples: 1048576, 512k, 8m, 1g; 0 = unlimited)")
    })
}

/// A CIDR, or a single address as its /32 or /128.
fn parse_net(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("invalid CIDR or address {s:?} (examples: 10.0.0.0/8, 192.168.1.7)"))
}

/// An IP address or a DNS name as `LoadBalancerIngress.hostname` takes it: the API server
/// refuses anything else (a port, upper case) with 422, and no status would ever be written.
/// Spaces around an entry and empty entries (a trailing comma, an empty variable) are allowed:
/// the status writer trims them and skips the empty ones.
fn parse_publish_address(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.is_empty()
        || s.parse::<std::net::IpAddr>().is_ok()
        || crate::translate::is_dns1123_subdomain(s)
    {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is neither an IP address nor a lower-case DNS name without a port \
             (examples: 203.0.113.7, lb.example.com)"
        ))
    }
}

fn parse_ns_name(s: &str) -> Result<(String, String), String> {
    match s.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok((ns.to_string(), name.to_string()))
        }
        _ => Err(format!("expected namespace/name, got {s:?}")),
    }
}

impl TranslateArgs {
    /// Translate options from these flags.
    pub fn options(&self) -> crate::translate::Options {
        let mut o = crate::translate::Options {
            ingress_class: self.ingress_class.clone(),
            controller_name: self.controller_name.clone(),
            default_certificate: self.default_certificate.clone(),
            ..Default::default()
        };
        o.defaults.connect_timeout = self.proxy_connect_timeout;
        o.defaults.read_timeout = self.proxy_read_timeout;
        o.defaults.body_limit = self.proxy_body_size;
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    /// Values that would fail every request are refused with a message, not taken: zero
    /// timeouts and a zero connection cap; sizes take the annotation's suffixes, and a trusted
    /// proxy may be a single address.
    #[test]
    fn zero_timeouts_and_caps_are_refused_sizes_and_addresses_are_read() {
        let parse = |args: &[&str]| {
            let mut all = vec!["portico", "run"];
            all.extend_from_slice(args);
            Cli::try_parse_from(all)
        };
        for flag in [
            "--client-header-timeout",
            "--client-idle-timeout",
            "--proxy-connect-timeout",
            "--proxy-read-timeout",
        ] {
            let err = parse(&[flag, "0s"]).expect_err(flag).to_string();
            assert!(err.contains("is zero"), "{flag}: {err}");
        }
        let err = parse(&["--max-connections", "0"])
            .expect_err("0")
            .to_string();
        assert!(err.contains("at least 1"), "{err}");
        let Command::Run(args) = parse(&[
            "--proxy-body-size",
            "8m",
            "--trusted-proxies",
            "10.0.0.0/8,192.168.1.7,::1",
            "--stream-idle-timeout",
            "0s",
        ])
        .expect("parses")
        .command
        else {
            panic!("run subcommand");
        };
        assert_eq!(args.translate.proxy_body_size, 8 << 20);
        assert_eq!(
            args.trusted_proxies,
            ["10.0.0.0/8", "192.168.1.7/32", "::1/128"].map(|n| n.parse::<IpNet>().expect("net"))
        );
        assert!(parse(&["--proxy-body-size", "8x"]).is_err());
        assert!(parse(&["--trusted-proxies", "10.0.0.0/33"]).is_err());
        assert_eq!(
            run_defaults().translate.proxy_body_size,
            crate::model::DEFAULT_BODY_LIMIT
        );
    }

    #[test]
    fn max_ejection_percent_is_a_percentage() {
        let parse = |v: &str| Cli::try_parse_from(["portico", "run", "--max-ejection-percent", v]);
        for (v, want) in [("0", 0u8), ("35", 35), ("100", 100)] {
            let Command::Run(args) = parse(v).expect("parses").command else {
                panic!("run subcommand");
            };
            assert_eq!(args.max_ejection_percent, want);
        }
        assert!(parse("101").is_err());
        assert!(parse("-1").is_err());
        let d = run_defaults();
        assert_eq!(
            d.max_ejection_percent,
            crate::proxy::DEFAULT_MAX_EJECTION_PERCENT
        );
    }

    /// `portico run` with no flags.
    fn run_defaults() -> RunArgs {
        let Command::Run(d) = Cli::try_parse_from(["portico", "run"])
            .expect("parses")
            .command
        else {
            panic!("run subcommand");
        };
        *d
    }

    #[test]
    fn api_timeout_defaults_to_the_client_constant() {
        let d = run_defaults();
        assert_eq!(
            d.api_timeout,
            crate::controller::client::DEFAULT_API_TIMEOUT
        );
    }

    #[test]
    fn watch_namespace_is_comma_separated_and_repeatable() {
        let cli = Cli::try_parse_from([
            "portico",
            "run",
            "--watch-namespace",
            "a,b",
            "--watch-namespace",
            "c",
            "--kubeconfig",
            "/tmp/kc",
        ])
        .expect("parses");
        let Command::Run(args) = cli.command else {
            panic!("run subcommand");
        };
        assert_eq!(args.watch_namespace, ["a", "b", "c"]);
        assert_eq!(args.kubeconfig, Some(PathBuf::from("/tmp/kc")));
        let cli = Cli::try_parse_from(["portico", "run"]).expect("parses");
        let Command::Run(args) = cli.command else {
            panic!("run subcommand");
        };
        assert!(args.watch_namespace.is_empty(), "all namespaces by default");
        assert_eq!(args.kubeconfig, None);
    }

    #[test]
    fn every_run_flag_has_help_and_env() {
        let cmd = Cli::command();
        for sub in cmd.get_subcommands() {
            for arg in sub.get_arguments() {
                if arg.is_positional() || arg.get_id() == "help" {
                    continue;
                }
                assert!(
                    arg.get_help().is_some(),
                    "flag {} has no help",
                    arg.get_id()
                );
                assert!(
                    arg.get_env().is_some(),
                    "flag {} has no PORTICO_* env",
                    arg.get_id()
                );
            }
        }
    }

    fn run_args(extra: &[&str]) -> RunArgs {
        let mut argv = vec!["portico", "run"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).expect("parses").command {
            Command::Run(args) => *args,
            other => panic!("expected run, got {other:?}"),
        }
    }

    #[test]
    fn leader_and_publish_flags() {
        let d = run_args(&[]);
        assert_eq!(d.lease_name, "portico-leader");
        assert_eq!(d.lease_namespace, None);
        assert_eq!(d.lease_duration, Duration::from_secs(15));
        assert_eq!(d.renew_deadline, Duration::from_secs(10));
        assert_eq!(d.retry_period, Duration::from_secs(2));
        assert_eq!(d.publish_service, None);
        assert!(d.publish_status_address.is_empty());

        let a = run_args(&[
            "--publish-service",
            "ingress/edge",
            "--publish-status-address",
            "203.0.113.7,lb.example.com",
            "--lease-namespace",
            "ops",
            "--lease-duration",
            "30s",
        ]);
        assert_eq!(
            a.publish_service,
            Some(("ingress".to_string(), "edge".to_string()))
        );
        assert_eq!(a.publish_status_address, ["203.0.113.7", "lb.example.com"]);
        assert_eq!(a.lease_namespace.as_deref(), Some("ops"));
        assert_eq!(a.lease_duration, Duration::from_secs(30));
        assert!(Cli::try_parse_from(["portico", "run", "--publish-service", "edge"]).is_err());
        for bad in ["LB.Example.com", "lb.example.com:443", "10.0.0.1:80", "a b"] {
            assert!(
                Cli::try_parse_from(["portico", "run", "--publish-status-address", bad]).is_err(),
                "{bad:?} accepted"
            );
        }
        // Spaces and empty entries, as PublishAddress::from_flags has always skipped them.
        let a = run_args(&["--publish-status-address", "2001:db8::1, lb-1.example.com,"]);
        assert_eq!(
            a.publish_status_address,
            ["2001:db8::1", "lb-1.example.com", ""]
        );
        let a = run_args(&["--publish-status-address", ""]);
        assert_eq!(a.publish_status_address, [""]);
    }
}
