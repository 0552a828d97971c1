//! The shared rebuild loop: debounce timing (paused tokio time), publish/unchanged, metrics,
//! diagnostics channel and logging of new diagnostics.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use portico::metrics::Metrics;
use portico::model::{Backend, BackendKey, BackendTable, Endpoint, ServicePortRef, Snapshot};
use portico::publish::{self, Published, Reader};
use portico::rebuild::{
    DEFAULT_HOLDOFF, DEFAULT_MAX_DELAY, RebuildConfig, Rebuilder, Source, Trigger,
};
use portico::translate::{Diagnostic, Inputs, Options, Severity, Svc};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// A source whose inputs the test sets, reporting the (tokio) time of every read, i.e. of
/// every build.
struct TestSource {
    state: Mutex<(Inputs, Vec<Diagnostic>)>,
    builds: mpsc::UnboundedSender<Instant>,
    /// Poke this trigger from inside the next `inputs()` call (a change racing a build).
    poke_during_next_build: Mutex<Option<Trigger>>,
}

impl TestSource {
    fn new() -> (Arc<Self>, mpsc::UnboundedReceiver<Instant>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let s = TestSource {
            state: Mutex::new((Inputs::default(), Vec::new())),
            builds: tx,
            poke_during_next_build: Mutex::new(None),
        };
        (Arc::new(s), rx)
    }

    fn set(&self, inputs: Inputs, diagnostics: Vec<Diagnostic>) {
        *self.state.lock().expect("lock") = (inputs, diagnostics);
    }
}

impl Source for TestSource {
    fn inputs(&self) -> (Inputs, Vec<Diagnostic>) {
        let _ = self.builds.send(Instant::now());
        if let Some(t) = self.poke_during_next_build.lock().expect("lock").take() {
            t.poke();
        }
        self.state.lock().expect("lock").clone()
    }
}

struct Running {
    trigger: Trigger,
    reader: Reader,
    metrics: Metrics,
    diagnostics: tokio::sync::watch::Receiver<Arc<Vec<Diagnostic>>>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

fn start(source: Arc<TestSource>, config: RebuildConfig, trigger: Trigger) -> Running {
    let (publisher, reader) = publish::channel();
    let metrics = Metrics::new();
    let rebuilder = Rebuilder::new(config, publisher, metrics.clone(), trigger.clone());
    let diagnostics = rebuilder.diagnostics();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        rebuilder
            .run(&*source, async {
                let _ = stopped.await;
            })
            .await;
    });
    Running {
        trigger,
        reader,
        metrics,
        diagnostics,
        stop: Some(stop),
        task,
    }
}

impl Running {
    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(1), self.task)
            .await
            .expect("loop stops on shutdown")
            .expect("loop task did not panic");
    }
}

async fn next_build(rx: &mut mpsc::UnboundedReceiver<Instant>) -> Instant {
    tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("a build happens")
        .expect("source alive")
}

/// No build within `window` (paused time: this advances the clock, it does not sleep).
async fn assert_no_build(rx: &mut mpsc::UnboundedReceiver<Instant>, window: Duration) {
    if let Ok(Some(t)) = tokio::time::timeout(window, rx.recv()).await {
        panic!("unexpected build at {t:?}");
    }
}

fn diag(kind: &str, name: &str, reason: &str) -> Diagnostic {
    Diagnostic {
        severity: Severity::Error,
        kind: kind.into(),
        namespace: String::new(),
        name: name.into(),
        uid: String::new(),
        reason: reason.into(),
        message: format!("{name} is broken"),
    }
}

fn metric_lines(metrics: &Metrics, family: &str) -> Vec<String> {
    metrics
        .render()
        .lines()
        .filter(|l| l.starts_with(family) && !l.starts_with('#'))
        .map(str::to_string)
        .collect()
}

const MS: Duration = Duration::from_millis(1);

#[tokio::test(start_paused = true)]
async fn first_build_is_immediate_then_a_burst_is_one_build() {
    let (source, mut builds) = TestSource::new();
    let started = Instant::now();
    let run = start(source, RebuildConfig::default(), Trigger::new());
    let first = next_build(&mut builds).await;
    assert_eq!(first, started, "first build must not wait for any debounce");
    assert!(run.reader.is_ready());

    let mut last_poke = first;
    for _ in 0..10 {
        run.trigger.poke();
        last_poke = Instant::now();
        tokio::time::sleep(10 * MS).await;
    }
    let built = next_build(&mut builds).await;
    let quiet = built - last_poke;
    assert!(
        quiet >= DEFAULT_HOLDOFF && quiet <= DEFAULT_HOLDOFF + 2 * MS,
        "build {quiet:?} after the last poke, want the holdoff"
    );
    assert_no_build(&mut builds, Duration::from_secs(5)).await;
    run.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn continuous_changes_force_a_build_every_max_delay() {
    let (source, mut builds) = TestSource::new();
    let run = start(source, RebuildConfig::default(), Trigger::new());
    let _ = next_build(&mut builds).await;

    // Poke every 50 ms for 3 s: the holdoff never elapses, so only the 500 ms cap builds.
    // (Build times are recorded by the source, so they can be read afterwards.)
    let mut pokes = Vec::new();
    for _ in 0..60 {
        run.trigger.poke();
        pokes.push(Instant::now());
        tokio::time::sleep(50 * MS).await;
    }
    let last_poke = *pokes.last().expect("pokes");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut times = Vec::new();
    while let Ok(t) = builds.try_recv() {
        times.push(t);
    }

    // Every poke was built within max_delay, and builds during the storm were forced (never
    // more often than max_delay apart).
    for p in &pokes {
        let built = times.iter().find(|t| *t >= p).expect("every poke is built");
        assert!(
            *built - *p <= DEFAULT_MAX_DELAY + 2 * MS,
            "poke at {p:?} built only after {:?}",
            *built - *p
        );
    }
    let storm: Vec<_> = times.iter().filter(|t| **t <= last_poke).collect();
    assert!(
        (5..=6).contains(&storm.len()),
        "3 s of changes → 5 or 6 forced builds, got {}",
        storm.len()
    );
    for w in storm.windows(2) {
        assert!(
            *w[1] - *w[0] >= DEFAULT_MAX_DELAY,
            "builds too close: {w:?}"
        );
    }
    let after = *times.last().expect("final build") - last_poke;
    // The last change is built by the cap or by the holdoff, whichever comes first.
    assert!(
        after <= DEFAULT_HOLDOFF + 2 * MS,
        "last poke built after {after:?}"
    );
    run.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_poke_during_a_build_is_not_lost() {
    let (source, mut builds) = TestSource::new();
    let trigger = Trigger::new();
    *source.poke_during_next_build.lock().expect("lock") = Some(trigger.clone());
    let run = start(source, RebuildConfig::default(), trigger);
    let first = next_build(&mut builds).await;
    let second = next_build(&mut builds).await;
    assert!(second - first >= DEFAULT_HOLDOFF && second - first <= DEFAULT_HOLDOFF + 2 * MS);
    assert_no_build(&mut builds, Duration::from_secs(2)).await;
    run.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_poke_before_start_is_covered_by_the_first_build() {
    let (source, mut builds) = TestSource::new();
    let trigger = Trigger::new();
    trigger.poke();
    let run = start(source, RebuildConfig::default(), trigger);
    let _ = next_build(&mut builds).await;
    assert_no_build(&mut builds, Duration::from_secs(2)).await;
    run.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_during_a_pending_change_stops_without_building() {
    let (source, mut builds) = TestSource::new();
    let run = start(source, RebuildConfig::default(), Trigger::new());
    let _ = next_build(&mut builds).await;
    run.trigger.poke();
    tokio::time::sleep(10 * MS).await;
    run.shutdown().await;
    assert!(builds.try_recv().is_err(), "no build after shutdown");
}

#[tokio::test(start_paused = true)]
async fn equal_inputs_are_unchanged_and_keep_the_snapshot_pointer() {
    let (source, mut builds) = TestSource::new();
    let run = start(source, RebuildConfig::default(), Trigger::new());
    let _ = next_build(&mut builds).await;
    let before = run.reader.load().expect("first snapshot serves");
    run.trigger.poke();
    let _ = next_build(&mut builds).await;
    tokio::task::yield_now().await;
    let after = run.reader.load().expect("still serving");
    assert!(
        Arc::ptr_eq(&before, &after),
        "unchanged snapshot was swapped"
    );
    let builds_metric = metric_lines(&run.metrics, "portico_snapshot_builds_total");
    assert!(
        builds_metric.contains(&r#"portico_snapshot_builds_total{result="swapped"} 1"#.into()),
        "{builds_metric:?}"
    );
    assert!(
        builds_metric.contains(&r#"portico_snapshot_builds_total{result="unchanged"} 1"#.into()),
        "{builds_metric:?}"
    );
    assert!(
        run.metrics
            .render()
            .contains("portico_snapshot_build_duration_seconds_count 2")
    );
    run.shutdown().await;
}

/// Fake translate: one backend per Service (port 80) with as many endpoints as the Service has
/// ports; Services named `bad-*` also produce a diagnostic.
fn fake_translate(inputs: &Inputs, _: &Options) -> (Snapshot, Vec<Diagnostic>) {
    let mut backends = Vec::new();
    let mut diagnostics = Vec::new();
    for svc in &inputs.services {
        let ns = svc.namespace().to_string();
        let name = svc.name().to_string();
        let ports = svc.ports().len();
        let endpoints: Vec<Endpoint> = (0..ports)
            .map(|i| Endpoint {
                addr: SocketAddr::from(([10, 0, 0, i as u8], 8080)),
            })
            .collect();
        backends.push(Backend {
            key: BackendKey {
                namespace: ns.clone().into(),
                service: name.clone().into(),
                port: ServicePortRef::Number(80),
            },
            endpoints: endpoints.into(),
            draining_fallback: false,
            health_check: None,
        });
        if name.starts_with("bad-") {
            diagnostics.push(Diagnostic {
                severity: Severity::Warning,
                kind: "Service".into(),
                namespace: ns,
                name,
                uid: String::new(),
                reason: "FakeProblem".into(),
                message: "fake".into(),
            });
        }
    }
    let snapshot = Snapshot {
        backends: Arc::new(BackendTable { backends }),
        ..Snapshot::default()
    };
    (snapshot, diagnostics)
}

fn service(name: &str, ports: usize) -> Arc<Svc> {
    Arc::new(Svc::from(Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some("shop".into()),
            ..ObjectMeta::default()
        },
        spec: Some(ServiceSpec {
            ports: Some(
                (0..ports)
                    .map(|i| ServicePort {
                        port: 80 + i as i32,
                        ..ServicePort::default()
                    })
                    .collect(),
            ),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }))
}

#[test]
fn changed_snapshot_is_swapped_and_endpoint_gauges_follow_it() {
    let (source, _builds) = TestSource::new();
    let config = RebuildConfig {
        translate: Some(fake_translate),
        ..RebuildConfig::default()
    };
    let (publisher, reader) = publish::channel();
    let metrics = Metrics::new();
    let mut rebuilder = Rebuilder::new(config, publisher, metrics.clone(), Trigger::new());

    source.set(
        Inputs {
            services: vec![service("web", 3), service("api", 1)],
            ..Inputs::default()
        },
        Vec::new(),
    );
    assert_eq!(rebuilder.build(&*source).published, Published::Swapped);
    let first = reader.load().expect("serving");
    let gauges = metric_lines(&metrics, "portico_backend_ready_endpoints");
    assert!(gauges.contains(
        &r#"portico_backend_ready_endpoints{namespace="shop",port="80",service="web"} 3"#.into()
    ));
    assert!(gauges.contains(
        &r#"portico_backend_ready_endpoints{namespace="shop",port="80",service="api"} 1"#.into()
    ));

    source.set(
        Inputs {
            services: vec![service("web", 2)],
            ..Inputs::default()
        },
        Vec::new(),
    );
    assert_eq!(rebuilder.build(&*source).published, Published::Swapped);
    let second = reader.load().expect("serving");
    assert!(!Arc::ptr_eq(&first, &second));
    let gauges = metric_lines(&metrics, "portico_backend_ready_endpoints");
    assert_eq!(
        gauges,
        vec![r#"portico_backend_ready_endpoints{namespace="shop",port="80",service="web"} 2"#]
    );
    assert_eq!(rebuilder.build(&*source).published, Published::Unchanged);
    assert!(Arc::ptr_eq(&second, &reader.load().expect("serving")));
}

/// Like `fake_translate`, plus, for a Service named `twin-*`, a second backend on the same
/// gauge labels (`port: "80"` by name next to `port: 80`), always with 5 endpoints.
fn twin_translate(inputs: &Inputs, opts: &Options) -> (Snapshot, Vec<Diagnostic>) {
    let (snapshot, diagnostics) = fake_translate(inputs, opts);
    let mut backends = Vec::new();
    for b in &snapshot.backends.backends {
        backends.push(b.clone());
        if b.key.service.starts_with("twin-") {
            backends.push(Backend {
                key: BackendKey {
                    port: ServicePortRef::Name("80".into()),
                    ..b.key.clone()
                },
                endpoints: (1..=5)
                    .map(|i| Endpoint {
                        addr: SocketAddr::from(([10, 1, 0, i], 8080)),
                    })
                    .collect(),
                draining_fallback: false,
                health_check: None,
            });
        }
    }
    let snapshot = Snapshot {
        backends: Arc::new(BackendTable { backends }),
        ..snapshot
    };
    (snapshot, diagnostics)
}

#[test]
fn endpoint_gauges_updated_in_place_equal_a_fresh_reset_and_set() {
    let config = RebuildConfig {
        translate: Some(twin_translate),
        ..RebuildConfig::default()
    };
    let (source, _builds) = TestSource::new();
    let metrics = Metrics::new();
    let mut rebuilder = Rebuilder::new(
        config.clone(),
        publish::channel().0,
        metrics.clone(),
        Trigger::new(),
    );
    // Same backends in the same order each time (the endpoint-only fast path), except the
    // last step, which removes one.
    let steps: Vec<Vec<Arc<Svc>>> = vec![
        vec![service("web", 3), service("api", 1), service("twin-a", 2)],
        vec![service("web", 1), service("api", 1), service("twin-a", 2)],
        vec![service("web", 1), service("api", 2), service("twin-a", 4)],
        vec![service("web", 1), service("api", 2), service("twin-a", 4)],
        vec![service("web", 2), service("twin-a", 1)],
    ];
    for (n, services) in steps.into_iter().enumerate() {
        let inputs = Inputs {
            services,
            ..Inputs::default()
        };
        source.set(inputs.clone(), Vec::new());
        rebuilder.build(&*source);
        // What a reset followed by setting every backend gives.
        let (fresh_source, _b) = TestSource::new();
        fresh_source.set(inputs, Vec::new());
        let fresh_metrics = Metrics::new();
        Rebuilder::new(
            config.clone(),
            publish::channel().0,
            fresh_metrics.clone(),
            Trigger::new(),
        )
        .build(&*fresh_source);
        let family = "portico_backend_ready_endpoints";
        assert_eq!(
            metric_lines(&metrics, family),
            metric_lines(&fresh_metrics, family),
            "step {n}"
        );
    }
    let gauges = metric_lines(&metrics, "portico_backend_ready_endpoints");
    assert!(gauges.contains(
        &r#"portico_backend_ready_endpoints{namespace="shop",port="80",service="twin-a"} 5"#.into()
    ));
    assert!(!gauges.iter().any(|l| l.contains("service=\"api\"")));
}

#[test]
fn diagnostics_gauge_and_channel_are_set_and_cleared() {
    let (source, _builds) = TestSource::new();
    let config = RebuildConfig {
        translate: Some(fake_translate),
        ..RebuildConfig::default()
    };
    let (publisher, _reader) = publish::channel();
    let metrics = Metrics::new();
    let mut rebuilder = Rebuilder::new(config, publisher, metrics.clone(), Trigger::new());
    let mut channel = rebuilder.diagnostics();

    source.set(
        Inputs {
            services: vec![service("bad-one", 1)],
            ..Inputs::default()
        },
        vec![
            diag("File", "b.yaml", "InvalidManifest"),
            diag("File", "a.yaml", "InvalidManifest"),
        ],
    );
    let report = rebuilder.build(&*source);
    assert_eq!(report.diagnostics.len(), 3);
    assert!(channel.has_changed().expect("sender alive"));
    let seen = channel.borrow_and_update().clone();
    // Sorted: sources' and translate's merged in one deterministic order.
    let names: Vec<_> = seen
        .iter()
        .map(|d| (d.kind.as_str(), d.name.as_str()))
        .collect();
    assert_eq!(
        names,
        vec![
            ("Service", "bad-one"),
            ("File", "a.yaml"),
            ("File", "b.yaml")
        ]
    );
    let gauges = metric_lines(&metrics, "portico_config_diagnostics");
    assert!(
        gauges.contains(
            &r#"portico_config_diagnostics{kind="File",reason="InvalidManifest"} 2"#.into()
        )
    );
    assert!(
        gauges.contains(
            &r#"portico_config_diagnostics{kind="Service",reason="FakeProblem"} 1"#.into()
        )
    );

    // Same diagnostics again: the channel does not fire.
    rebuilder.build(&*source);
    assert!(!channel.has_changed().expect("sender alive"));

    // Problems fixed: the gauge series disappear, the channel shows none.
    source.set(Inputs::default(), Vec::new());
    let report = rebuilder.build(&*source);
    assert!(report.diagnostics.is_empty());
    assert!(channel.has_changed().expect("sender alive"));
    assert!(channel.borrow_and_update().is_empty());
    assert!(metric_lines(&metrics, "portico_config_diagnostics").is_empty());
}

/// A `MakeWriter` into a shared buffer, to see what the loop logs.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("lock")).into_owned()
    }
}

#[test]
fn a_new_diagnostic_is_logged_once_with_its_fields() {
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::WARN)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let (source, mut rebuilder, _reader) = real_rebuilder();
    let broken = diag("File", "team/a.yaml", "InvalidManifest");
    source.set(Inputs::default(), vec![broken.clone()]);
    assert_eq!(rebuilder.build(&*source).new_diagnostics, 1);
    for _ in 0..3 {
        assert_eq!(rebuilder.build(&*source).new_diagnostics, 0);
    }
    let text = logs.text();
    assert_eq!(text.matches("team/a.yaml is broken").count(), 1, "{text}");
    let line = text
        .lines()
        .find(|l| l.contains("team/a.yaml is broken"))
        .expect("logged");
    assert!(line.contains("WARN"), "{line}");
    for field in [
        "kind=File",
        "namespace=",
        "name=team/a.yaml",
        "reason=InvalidManifest",
    ] {
        assert!(line.contains(field), "missing {field} in {line}");
    }

    // Fixed, then broken again: logged again (it is new relative to the previous build).
    source.set(Inputs::default(), Vec::new());
    rebuilder.build(&*source);
    source.set(Inputs::default(), vec![broken]);
    assert_eq!(rebuilder.build(&*source).new_diagnostics, 1);
    assert_eq!(logs.text().matches("team/a.yaml is broken").count(), 2);
}

#[tokio::test(start_paused = true)]
async fn diagnostics_flow_from_the_source_to_the_channel_through_the_loop() {
    let (source, mut builds) = TestSource::new();
    let mut run = start(source.clone(), RebuildConfig::default(), Trigger::new());
    let _ = next_build(&mut builds).await;
    source.set(
        Inputs::default(),
        vec![diag("File", "x.yaml", "InvalidManifest")],
    );
    run.trigger.poke();
    tokio::time::timeout(Duration::from_secs(1), run.diagnostics.changed())
        .await
        .expect("diagnostics published within 1 s")
        .expect("sender alive");
    assert_eq!(run.diagnostics.borrow()[0].name, "x.yaml");
    run.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_snapshot_a_request_held_is_freed_by_the_loop_after_the_request() {
    let (source, mut builds) = TestSource::new();
    let config = RebuildConfig {
        translate: Some(fake_translate),
        ..RebuildConfig::default()
    };
    source.set(
        Inputs {
            services: vec![service("web", 1)],
            ..Inputs::default()
        },
        Vec::new(),
    );
    let run = start(source.clone(), config, Trigger::new());
    let _ = next_build(&mut builds).await;
    // A request loads the serving snapshot and is still running when the next one replaces it.
    let held = run.reader.load().expect("serving");
    let replaced = Arc::downgrade(&held);
    source.set(
        Inputs {
            services: vec![service("web", 2)],
            ..Inputs::default()
        },
        Vec::new(),
    );
    run.trigger.poke();
    let _ = next_build(&mut builds).await;
    assert!(!Arc::ptr_eq(&held, &run.reader.load().expect("serving")));
    // The request ends. Dropping its reference frees nothing; the loop frees the snapshot
    // within one release interval (paused time: the sleeps advance the clock).
    drop(held);
    assert!(replaced.upgrade().is_some(), "freed by the request's drop");
    let deadline = Instant::now() + 2 * portico::rebuild::RELEASE_INTERVAL;
    while replaced.upgrade().is_some() {
        assert!(
            Instant::now() < deadline,
            "the loop never freed the snapshot"
        );
        tokio::time::sleep(10 * MS).await;
    }
    run.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn the_loop_runs_off_the_workers_so_a_long_build_does_not_stall_them() {
    let (tx, rx) = std::sync::mpsc::channel();
    // The loop's stand-in: give the runtime's only worker a task, then keep this thread busy
    // the way a long build does, until that task has run (or 10 s pass).
    let work = async move {
        tokio::spawn(async move {
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(10)).is_ok()
    };
    let ran = portico::rebuild::spawn_off_workers(work)
        .await
        .expect("joined");
    assert!(
        ran,
        "the worker was stalled while the loop's thread was busy"
    );
}

// ---- last valid TLS Secret ---------------------------------------------------------------------

fn tls_secret(
    name: &str,
    host: &str,
    pem: Option<(&str, &str)>,
) -> Arc<k8s_openapi::api::core::v1::Secret> {
    let generated;
    let (crt, key) = match pem {
        Some(p) => p,
        None => {
            let ck = rcgen::generate_simple_self_signed(vec![host.to_string()]).expect("rcgen");
            generated = (ck.cert.pem(), ck.signing_key.serialize_pem());
            (generated.0.as_str(), generated.1.as_str())
        }
    };
    let json = serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}")},
        "data": {
            "tls.crt": base64_encode(crt.as_bytes()),
            "tls.key": base64_encode(key.as_bytes()),
        }
    });
    Arc::new(serde_json::from_value(json).expect("secret"))
}

fn base64_encode(bytes: &[u8]) -> String {
    let v = serde_json::to_value(k8s_openapi::ByteString(bytes.to_vec())).expect("bytes");
    v.as_str().expect("base64 string").to_string()
}

fn tls_ingress(secret: &str, host: &str) -> Arc<k8s_openapi::api::networking::v1::Ingress> {
    let json = serde_json::json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
        "metadata": {"name": "web", "namespace": "shop", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {
            "ingressClassName": "portico",
            "tls": [{"hosts": [host], "secretName": secret}],
            "rules": [{"host": host, "http": {"paths": [{"path": "/", "pathType": "Prefix",
                "backend": {"service": {"name": "web", "port": {"number": 80}}}}]}}]
        }
    });
    Arc::new(serde_json::from_value(json).expect("ingress"))
}

/// A self-signed certificate for `host` valid until `not_after` (Unix seconds), PEM.
fn cert_until(host: &str, not_after: u64) -> (String, String) {
    let mut params = rcgen::CertificateParams::new(vec![host.to_string()]).expect("params");
    params.not_before = rcgen::date_time_ymd(2000, 1, 1);
    params.not_after = rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(not_after);
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("certificate");
    (cert.pem(), key.serialize_pem())
}

fn portico_class() -> Arc<k8s_openapi::api::networking::v1::IngressClass> {
    Arc::new(
        serde_json::from_value(serde_json::json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
            "metadata": {"name": "portico"},
            "spec": {"controller": "portico.dev/ingress-controller"}
        }))
        .expect("class"),
    )
}

/// A served certificate is reported on its Secret when it expires, with no input changing:
/// the loop wakes up for the date. Every served certificate's notAfter is exported, for alerts
/// ahead of time.
#[tokio::test]
async fn a_served_certificate_is_reported_when_it_expires() {
    let host = "shop.example";
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    // The property under test is a date: three seconds from now.
    let not_after = now + 3;
    let (crt, key) = cert_until(host, not_after);
    let (source, mut builds) = TestSource::new();
    source.set(
        Inputs {
            ingresses: vec![tls_ingress("cert", host)],
            ingress_classes: vec![portico_class()],
            secrets: vec![tls_secret("cert", host, Some((&crt, &key)))],
            ..Inputs::default()
        },
        Vec::new(),
    );
    let mut run = start(source, RebuildConfig::default(), Trigger::new());
    next_build(&mut builds).await;
    assert_eq!(
        metric_lines(
            &run.metrics,
            "portico_tls_certificate_expiry_timestamp_seconds"
        ),
        [format!(
            "portico_tls_certificate_expiry_timestamp_seconds{{namespace=\"shop\",secret=\"cert\"}} {not_after}"
        )]
    );
    let expired = |d: &Arc<Vec<Diagnostic>>| d.iter().any(|d| d.reason == "CertificateExpired");
    assert!(
        !expired(&run.diagnostics.borrow()),
        "valid at the first build"
    );
    tokio::time::timeout(Duration::from_secs(10), run.diagnostics.wait_for(expired))
        .await
        .expect("reported in time")
        .expect("loop alive");
    let d = run
        .diagnostics
        .borrow()
        .iter()
        .find(|d| d.reason == "CertificateExpired")
        .cloned()
        .expect("diagnostic");
    assert_eq!(
        (d.severity, d.kind.as_str(), d.namespace.as_str()),
        (Severity::Warning, "Secret", "shop")
    );
    assert_eq!((d.name.as_str(), d.uid.as_str()), ("cert", "uid-cert"));
    assert!(d.message.contains(host), "{}", d.message);
    // It expired while nothing changed: the build that said so was the date's own.
    assert!(builds.try_recv().is_ok(), "a build for the date");
    run.shutdown().await;
}

/// Brief §4.4: a TLS Secret whose data turns invalid keeps its last valid version serving, and
/// is reported on the Secret; a valid rotation replaces it, and a Secret that leaves is gone.
#[test]
fn a_tls_secret_turning_invalid_keeps_its_last_valid_version() {
    let (source, mut rebuilder, _reader) = real_rebuilder();
    let host = "shop.example";
    let class: k8s_openapi::api::networking::v1::IngressClass =
        serde_json::from_value(serde_json::json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
            "metadata": {"name": "portico"},
            "spec": {"controller": "portico.dev/ingress-controller"}
        }))
        .expect("class");
    let inputs = |secret: Option<Arc<k8s_openapi::api::core::v1::Secret>>| Inputs {
        ingresses: vec![tls_ingress("cert", host)],
        ingress_classes: vec![Arc::new(class.clone())],
        secrets: secret.into_iter().collect(),
        ..Inputs::default()
    };
    let served = |r: &Rebuilder| -> Option<Vec<u8>> {
        let built = r.built().borrow().clone().expect("built");
        built
            .snapshot
            .tls
            .exact
            .get(host)
            .map(|c| c.material.to_vec())
    };
    let tls_errors = |report: &portico::rebuild::BuildReport| -> Vec<(String, String, String)> {
        report
            .diagnostics
            .iter()
            .filter(|d| d.severity == Severity::Error && d.reason != "ServiceNotFound")
            .map(|d| (d.kind.clone(), d.reason.clone(), d.message.clone()))
            .collect()
    };

    let good = tls_secret("cert", host, None);
    source.set(inputs(Some(good.clone())), Vec::new());
    let report = rebuilder.build(&*source);
    assert!(tls_errors(&report).is_empty(), "{:?}", report.diagnostics);
    let first = served(&rebuilder).expect("the certificate serves");

    // A bad edit: garbage instead of a certificate. The old one keeps serving, reported.
    let (crt, key) = ("not a certificate", "not a key");
    source.set(
        inputs(Some(tls_secret("cert", host, Some((crt, key))))),
        Vec::new(),
    );
    let report = rebuilder.build(&*source);
    assert_eq!(served(&rebuilder).as_ref(), Some(&first));
    let errors = tls_errors(&report);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].0, "Secret");
    assert_eq!(errors[0].1, "InvalidCertificate");
    assert!(
        errors[0]
            .2
            .ends_with("its last valid version keeps serving"),
        "{errors:?}"
    );
    // Built again from the same bad input: same answer.
    let again = rebuilder.build(&*source);
    assert_eq!(tls_errors(&again), errors);

    // A valid rotation serves at once and clears the error.
    let rotated = tls_secret("cert", host, None);
    source.set(inputs(Some(rotated)), Vec::new());
    let report = rebuilder.build(&*source);
    assert!(tls_errors(&report).is_empty(), "{:?}", report.diagnostics);
    let second = served(&rebuilder).expect("served");
    assert_ne!(second, first);

    // The Secret leaves: nothing is kept, the TLS entry reports it missing.
    source.set(inputs(None), Vec::new());
    let report = rebuilder.build(&*source);
    assert_eq!(served(&rebuilder), None);
    assert!(
        report
            .diagnostics
            .iter()
            .any(|d| d.reason == "SecretNotFound"),
        "{:?}",
        report.diagnostics
    );
    // Back, invalid from the start: no earlier version to fall back to.
    source.set(
        inputs(Some(tls_secret("cert", host, Some((crt, key))))),
        Vec::new(),
    );
    let report = rebuilder.build(&*source);
    assert_eq!(served(&rebuilder), None);
    assert!(
        report.diagnostics.iter().all(|d| d.kind != "Secret"),
        "{:?}",
        report.diagnostics
    );
}

/// A test source and a rebuilder with the real translate, built on demand (no loop), and the
/// publisher's reader.
fn real_rebuilder() -> (Arc<TestSource>, Rebuilder, Reader) {
    let (source, _builds) = TestSource::new();
    let (publisher, reader) = publish::channel();
    let rebuilder = Rebuilder::new(
        RebuildConfig::default(),
        publisher,
        Metrics::new(),
        Trigger::new(),
    );
    (source, rebuilder, reader)
}
