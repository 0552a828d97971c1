//! Wiring: turns the parsed command line into running parts (metrics, publisher, source —
//! manifests directory or Kubernetes API —, rebuild loop, proxy, admin) and runs the shutdown sequence of brief §4.4. The only place
//! besides `main` that uses `anyhow`.

use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;

use crate::admin::{Admin, Health};
use crate::config::{CheckArgs, Cli, Command, RunArgs};
use crate::controller::events::{self, EventReporter, EventsConfig};
use crate::controller::leader::{LeaderConfig, LeaderElector};
use crate::controller::status::{self, PublishAddress, StatusWriter};
use crate::controller::{ClusterSource, SourceConfig, build_client};
use crate::file_source::{FileSource, FileSourceConfig};
use crate::metrics::Metrics;
use crate::proxy::{Proxy, ProxyConfig, ShutdownTrigger};
use crate::publish;
use crate::rebuild::{RebuildConfig, Rebuilder, Source, Trigger};
use crate::translate::{self, Severity};
use tokio::sync::watch;

/// Entry point behind `main`.
pub fn main(cli: Cli) -> ExitCode {
    // One crypto provider for the whole process, chosen explicitly (ring), so rustls never has
    // to guess between providers at runtime.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match cli.command {
        Command::Crd => {
            print!("{}", crate::crd::crd_yaml());
            ExitCode::SUCCESS
        }
        Command::Check(args) => check(&args),
        Command::Run(args) => {
            let workers = args.worker_threads.unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            });
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers.max(1))
                .thread_name("portico-worker")
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("portico: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            // Held until the end, so the last lines (the error below too) are written.
            let log = crate::telemetry::init(args.log_format, !args.no_access_log);
            match runtime.block_on(run(*args, &log)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = format!("{e:#}"), "portico failed");
                    eprintln!("portico: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `portico check DIR`: the file source's and translate's diagnostics, one per line; exit 1 when
/// any is an error (or DIR cannot be read), 0 otherwise.
fn check(args: &CheckArgs) -> ExitCode {
    let (inputs, mut diagnostics) = match crate::file_source::load_dir(&args.dir) {
        Ok(v) => v,
        Err(e) => {
            println!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (snapshot, translated) = translate::translate(&inputs, &args.translate.options());
    diagnostics.extend(translated);
    diagnostics.extend(translate::certificate_diagnostics(
        &snapshot.tls.certificates(),
        &inputs.secrets,
        crate::rebuild::unix_now(),
    ));
    diagnostics.sort();
    diagnostics.dedup();
    let errors = diagnostics
        .iter()
        .filter(|d| d.severity == Severity::Error)
        .count();
    for d in &diagnostics {
        println!("{d}");
    }
    println!(
        "{}: {} Ingresses, {} errors, {} warnings",
        args.dir.display(),
        inputs.ingresses.len(),
        errors,
        diagnostics.len() - errors
    );
    if errors > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn proxy_config(args: &RunArgs) -> ProxyConfig {
    ProxyConfig {
        http_addr: args.http_addr,
        https_addr: args.https_addr,
        max_connections: args.max_connections,
        max_concurrent_requests: (args.max_concurrent_requests > 0)
            .then_some(args.max_concurrent_requests),
        client_header_timeout: args.client_header_timeout,
        client_idle_timeout: args.client_idle_timeout,
        stream_idle_timeout: args.stream_idle_timeout,
        h2_max_concurrent_streams: args.h2_max_concurrent_streams.max(1),
        max_retries: args.max_retries,
        trusted_proxies: args.trusted_proxies.clone(),
        shutdown_grace: args.shutdown_grace,
        access_log: !args.no_access_log,
        rate_limit_max_keys: args.rate_limit_max_keys.max(1),
        max_ejection_percent: args.max_ejection_percent,
        ..ProxyConfig::default()
    }
}

/// `portico run`.
async fn run(args: RunArgs, log: &crate::telemetry::LogGuard) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    log.register_metrics(&metrics.registry)
        .context("registering the log writer's metric")?;
    let shared_metrics = Arc::new(metrics.clone());
    let (publisher, reader) = publish::channel();
    let health = Arc::new(Health::new());

    // Stop signals: `sources` ends the source and the rebuild loop; `proxy_stop` closes the
    // proxy listeners; `admin_stop` is fired last so /readyz keeps answering 503 while draining.
    let sources = ShutdownTrigger::new();
    let proxy_stop = ShutdownTrigger::new();
    let admin_stop = ShutdownTrigger::new();

    // One source feeds the one rebuild loop: the manifests directory, or the Kubernetes API.
    let trigger = Trigger::new();
    let (source, source_task, cluster, origin): (Arc<dyn Source>, _, Option<ClusterParts>, String) =
        match &args.manifests {
            Some(dir) => {
                let (source, task) = FileSource::start(
                    FileSourceConfig::new(dir),
                    metrics.clone(),
                    trigger.clone(),
                    fired(sources.signal()),
                )
                .await
                .with_context(|| format!("cannot load manifests from {}", dir.display()))?;
                (source, task, None, format!("manifests {}", dir.display()))
            }
            None => {
                let client = build_client(args.kubeconfig.as_deref(), args.api_timeout)
                    .await
                    .context("cannot build the Kubernetes client")?;
                let config = SourceConfig {
                    namespaces: args.watch_namespace.clone(),
                    publish_service: args.publish_service.clone(),
                    default_certificate: args.translate.default_certificate.clone(),
                    class: Some((
                        args.translate.ingress_class.clone(),
                        args.translate.controller_name.clone(),
                    )),
                    ..SourceConfig::default()
                };
                let (source, task) = ClusterSource::start(
                    client.clone(),
                    config,
                    trigger.clone(),
                    fired(sources.signal()),
                );
                let origin = match config_namespaces(&args.watch_namespace) {
                    Some(ns) => format!("kubernetes namespaces {ns}"),
                    None => "kubernetes (all namespaces)".to_string(),
                };
                let parts = ClusterParts {
                    client,
                    source: source.clone(),
                };
                (source.clone(), task, Some(parts), origin)
            }
        };
    let rebuilder = Rebuilder::new(
        RebuildConfig::new(args.translate.options()),
        publisher,
        metrics.clone(),
        trigger,
    );
    // Cluster mode: leader election, and the leader's status writes and Events.
    let controller_stop = ShutdownTrigger::new();
    let controller_tasks = match &cluster {
        Some(parts) => start_controller(&args, parts, &rebuilder, &controller_stop)?,
        None => Vec::new(),
    };
    let rebuild_task = {
        let stop = fired(sources.signal());
        let mut stop_early = sources.signal();
        let cluster = cluster.map(|p| p.source);
        crate::rebuild::spawn_off_workers(async move {
            // Never publish (so /readyz stays 503) before every API store has listed once.
            if let Some(cluster) = cluster {
                tokio::select! {
                    () = cluster.synced() => tracing::info!("every Kubernetes store synced"),
                    () = stop_early.fired() => return,
                }
            }
            rebuilder.run(&*source, stop).await
        })
    };

    let admin = Admin::bind(
        args.admin_addr,
        reader.clone(),
        shared_metrics.clone(),
        health.clone(),
    )
    .await
    .with_context(|| format!("cannot listen on admin address {}", args.admin_addr))?;
    let proxy = Proxy::bind(proxy_config(&args), reader, shared_metrics)
        .await
        .with_context(|| format!("cannot listen on {} / {}", args.http_addr, args.https_addr))?;
    tracing::info!(
        http_addr = %proxy.http_addr(),
        https_addr = %proxy.https_addr(),
        admin_addr = %admin.addr(),
        source = %origin,
        "listening"
    );
    let admin_task = tokio::spawn(admin.serve(admin_stop.signal()));
    let proxy_task = tokio::spawn(proxy.serve(proxy_stop.signal()));

    let signal = wait_for_signal().await?;
    // Shutdown sequence (brief §4.4): readiness 503 at once; keep serving for the delay so
    // endpoint removal propagates; then close listeners and drain within the grace period.
    tracing::info!(signal, delay = ?args.shutdown_delay, grace = ?args.shutdown_grace, "shutting down");
    health.set_draining(true);
    tokio::time::sleep(args.shutdown_delay).await;
    proxy_stop.fire();
    let _ = proxy_task.await;
    // What follows the drain is bounded (the chart's terminationGracePeriodSeconds leaves room
    // for it): an API server that does not answer must not turn exit 0 into a SIGKILL.
    let tail = async {
        // Release the Lease (so a successor takes over at once) before the sources stop.
        controller_stop.fire();
        for task in controller_tasks {
            let _ = task.await;
        }
        sources.fire();
        let _ = rebuild_task.await;
        let _ = source_task.await;
    };
    // One deadline for all of it, the admin listener included.
    let deadline = tokio::time::Instant::now() + SHUTDOWN_TAIL;
    if tokio::time::timeout_at(deadline, tail).await.is_err() {
        tracing::warn!(
            timeout = ?SHUTDOWN_TAIL,
            "the Lease release or a status write did not finish after the drain; exiting anyway"
        );
    }
    admin_stop.fire();
    let _ = tokio::time::timeout_at(deadline, admin_task).await;
    tracing::info!("stopped");
    Ok(())
}

/// How long shutdown waits, after the drain, for the controller to release its Lease, the
/// sources and the admin listener to stop, all together. The chart's
/// `terminationGracePeriodSeconds` must leave room for it.
pub const SHUTDOWN_TAIL: std::time::Duration = std::time::Duration::from_secs(3);

/// What cluster mode shares between the source and the controller parts.
struct ClusterParts {
    client: kube::Client,
    source: Arc<ClusterSource>,
}

/// Start the leader elector and, gated on leadership, the status writer and the Event
/// reporter. They end when `stop` fires; the elector then releases the Lease.
fn start_controller(
    args: &RunArgs,
    parts: &ClusterParts,
    rebuilder: &Rebuilder,
    stop: &ShutdownTrigger,
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let leader_config = LeaderConfig::from_run_args(args);
    let identity = leader_config.identity.clone();
    tracing::info!(
        identity,
        lease = format!(
            "{}/{}",
            leader_config.lease_namespace, leader_config.lease_name
        ),
        "leader election"
    );
    let elector = LeaderElector::new(parts.client.clone(), leader_config)
        .context("invalid leader election settings")?;
    let is_leader = elector.subscribe();
    let mut tasks = Vec::new();
    let stopped = fired(stop.signal());
    tasks.push(tokio::spawn(async move {
        if let Err(e) = elector.run(stopped).await {
            tracing::error!(error = %e, "leader election stopped");
        }
    }));

    // The publish Service comes from the stores (its own watcher when its namespace is not
    // watched), never a GET per build.
    let source = parts.source.clone();
    let writer = StatusWriter::new(
        parts.client.clone(),
        PublishAddress::from_flags(&args.publish_status_address, args.publish_service.as_ref()),
    )
    .with_class(
        &args.translate.ingress_class,
        &args.translate.controller_name,
    )
    .with_lookup(Arc::new(move |ns: &str, name: &str| {
        source.service(ns, name)
    }));
    let mut built = rebuilder.built();
    let (leader_rx, stopped, mut stop_wait) =
        (is_leader.clone(), fired(stop.signal()), stop.signal());
    tasks.push(tokio::spawn(async move {
        // Status is written only from a real build: never from an empty view (that would
        // clear the status of every Ingress).
        let first = loop {
            if let Some(b) = built.borrow_and_update().clone() {
                break b;
            }
            tokio::select! {
                r = built.changed() => if r.is_err() { return },
                () = stop_wait.fired() => return,
            }
        };
        let (views, views_rx) = watch::channel(first);
        let forward = async move {
            while built.changed().await.is_ok() {
                if let Some(b) = built.borrow_and_update().clone() {
                    let _ = views.send(b);
                }
            }
        };
        tokio::select! {
            () = status::run(writer, leader_rx, views_rx, status::DEFAULT_RESYNC, stopped) => {}
            () = forward => {}
        }
    }));

    let reporter = EventReporter::new(
        parts.client.clone(),
        EventsConfig::new(args.translate.controller_name.clone(), identity),
    );
    tasks.push(tokio::spawn(events::run(
        reporter,
        is_leader,
        rebuilder.diagnostics(),
        EVENT_RETRY,
        fired(stop.signal()),
    )));
    Ok(tasks)
}

/// How soon Events held back (rate cap, API errors) are tried again.
const EVENT_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

fn config_namespaces(namespaces: &[String]) -> Option<String> {
    let list: Vec<&str> = namespaces
        .iter()
        .map(String::as_str)
        .filter(|n| !n.is_empty())
        .collect();
    (!list.is_empty()).then(|| list.join(","))
}

async fn fired(mut s: crate::proxy::listener::Shutdown) {
    s.fired().await;
}

/// Wait for SIGTERM or SIGINT (Ctrl-C). A second one during the shutdown sequence ends the
/// process at once (exit 128 + the signal's number, as a shell reports it): the handlers stay
/// installed for the life of the process, so without this a second Ctrl-C would do nothing
/// for the whole delay and grace. Kubernetes sends one SIGTERM, then SIGKILL.
async fn wait_for_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?;
    let first = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    // Ends with the process.
    tokio::spawn(async move {
        let (second, code) = tokio::select! {
            _ = term.recv() => ("SIGTERM", 128 + 15),
            _ = int.recv() => ("SIGINT", 128 + 2),
        };
        tracing::warn!(
            signal = second,
            "second signal during shutdown: exiting now"
        );
        std::process::exit(code);
    });
    Ok(first)
}
