//! Micro-benchmarks of the routing snapshot (issue 6, "The benchmark" item 1): route matching on
//! 10 000 Ingresses / 50 000 paths (exact hit, prefix hit, wildcard host, miss), full
//! `translate` of 10 000 Ingresses + 100 000 endpoints, and EndpointSlice-only updates through
//! the incremental `translate::Translator` (one Service's slice replaced; every slice replaced;
//! and one slice through the rebuild loop's whole `Rebuilder::build`). Then a p99 of single
//! route lookups, which criterion (means and confidence intervals) does not give.
//!
//! Imports portico's pure halves (model, translate), `rebuild`/`publish`/`metrics` for the
//! per-build row (called synchronously: no runtime), and k8s-openapi; no I/O.
//! Run: `make bench-micro` (or `cargo bench --bench snapshot`). `BENCH_QUICK=1` shortens it.

mod common;

use std::hint::black_box;
use std::time::{Duration, Instant};

use common::{ISSUE_SCALE, Lookup, Query, Scale};
use criterion::{BatchSize, Criterion};
use portico::metrics::Metrics;
use portico::model::{HostMatch, Snapshot};
use portico::rebuild::{RebuildConfig, Rebuilder, Source, Trigger};
use portico::translate::{self, Diagnostic, Inputs, Options, Translator};

/// The Service whose slice the one-slice endpoint update replaces (any one works: the generator
/// gives every Service one slice).
const ONE_SLICE_SERVICE: usize = 4321;

/// A source with fixed inputs, for timing `Rebuilder::build`.
struct Fixed(Inputs);

impl Source for Fixed {
    fn inputs(&self) -> (Inputs, Vec<Diagnostic>) {
        (self.0.clone(), Vec::new())
    }
}

/// Queries per kind: enough to spread over the table, small enough to stay resident.
const QUERIES: usize = 4096;
/// Lookups timed together for the p99: one `Instant::now()` costs ~20-30 ns, the same order as
/// a lookup, so single lookups would measure the clock. The batch mean is what is ranked.
const P99_BATCH: usize = 16;
/// Batches ranked for the p99 (per lookup kind).
const P99_BATCHES: usize = 200_000;

fn quick() -> bool {
    std::env::var_os("BENCH_QUICK").is_some_and(|v| v != "0")
}

/// Check the generated table means what the benchmark claims before timing anything: every hit
/// query resolves to a path rule with the expected host kind, every miss to no rule.
fn check_queries(snapshot: &Snapshot, kind: Lookup, queries: &[Query]) {
    for q in queries {
        let m = snapshot.route(&q.host, &q.path);
        let (want_host, want_rule) = match kind {
            Lookup::ExactHit | Lookup::PrefixHit => (HostMatch::Exact, true),
            Lookup::WildcardHit => (HostMatch::Wildcard, true),
            Lookup::Miss => (HostMatch::Exact, false),
        };
        assert_eq!(m.host, want_host, "{kind:?} {q:?}");
        assert_eq!(
            !m.is_default && m.route.is_some(),
            want_rule,
            "{kind:?} {q:?}"
        );
    }
}

fn bench_route(c: &mut Criterion, snapshot: &Snapshot, scale: Scale) {
    let mut group = c.benchmark_group("route_match_10k_ingresses");
    for kind in Lookup::ALL {
        let queries = common::queries(scale, kind, QUERIES);
        check_queries(snapshot, kind, &queries);
        let mut k = 0usize;
        group.bench_function(kind.name(), |b| {
            b.iter(|| {
                let q = &queries[k % QUERIES];
                k = k.wrapping_add(1);
                black_box(snapshot.route(black_box(&q.host), black_box(&q.path)).route).is_some()
            })
        });
    }
    group.finish();
}

fn bench_translate(c: &mut Criterion, scale: Scale) {
    let inputs = common::inputs(scale);
    let opts = Options::default();
    let (_, diags) = translate::derive_routes(&inputs, &opts);
    assert!(
        diags.is_empty(),
        "generator produced diagnostics: {diags:?}"
    );
    let updated = common::updated_slices(scale);

    let mut group = c.benchmark_group("translate_10k_ingresses_100k_endpoints");
    group.sample_size(10);
    group.bench_function("full_translate", |b| {
        b.iter(|| black_box(translate::translate(black_box(&inputs), &opts)))
    });
    group.bench_function("derive_routes_only", |b| {
        b.iter(|| black_box(translate::derive_routes(black_box(&inputs), &opts)))
    });
    // The endpoint-only path of brief §2, as issue 6 means it: one Service's EndpointSlice is
    // replaced (a pod came or went), everything else is the same objects. Through the
    // incremental `Translator` the rebuild loop uses; iterations alternate between the two
    // versions of that slice, so every one is a real one-slice change.
    let one = common::with_one_slice_updated(&inputs, scale, ONE_SLICE_SERVICE);
    let mut translator = Translator::new();
    assert_eq!(
        translator.translate(&inputs, &opts),
        translate::translate(&inputs, &opts)
    );
    assert_eq!(
        translator.translate(&one, &opts),
        translate::translate(&one, &opts)
    );
    assert!(translator.reused() && translator.resolved_backends() == 1);
    let mut flip = false;
    group.bench_function("endpoint_slice_update", |b| {
        b.iter(|| {
            flip = !flip;
            black_box(translator.translate(if flip { &inputs } else { &one }, &opts))
        })
    });
    // The same with every slice replaced (every backend re-resolved), to keep the table honest.
    let all = translate::Inputs {
        endpoint_slices: updated.clone(),
        ..inputs.clone()
    };
    assert_eq!(
        translator.translate(&all, &opts),
        translate::translate(&all, &opts)
    );
    group.bench_function("endpoint_update_every_slice", |b| {
        b.iter(|| {
            flip = !flip;
            black_box(translator.translate(if flip { &inputs } else { &all }, &opts))
        })
    });
    // What the rebuild loop pays per endpoint-only build on top: the source's inputs clone,
    // translate, publish (comparison with the serving snapshot), the endpoint and diagnostics
    // gauges, the diagnostics channel (`Rebuilder::build`, no tokio runtime needed).
    let source_a = Fixed(inputs.clone());
    let source_b = Fixed(one.clone());
    let mut rebuilder = Rebuilder::new(
        RebuildConfig::new(opts.clone()),
        portico::publish::channel().0,
        Metrics::new(),
        Trigger::new(),
    );
    rebuilder.build(&source_a);
    group.bench_function("rebuild_endpoint_slice_update", |b| {
        b.iter(|| {
            flip = !flip;
            let source = if flip { &source_b } else { &source_a };
            black_box(rebuilder.build(source).published)
        })
    });
    // Freeing a snapshot the proxy no longer serves: the whole snapshot (after a change to an
    // Ingress, hosts and backends are new) and the backend table alone (after an
    // endpoint-only change the host and TLS tables are shared with the next snapshot).
    group.bench_function("drop_snapshot", |b| {
        b.iter_batched(
            || translate::translate(&inputs, &opts).0,
            drop,
            BatchSize::PerIteration,
        )
    });
    group.bench_function("drop_backend_table", |b| {
        b.iter_batched(
            || translate::translate(&inputs, &opts).0.backends,
            drop,
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

/// p50/p99/max of per-lookup time over `P99_BATCHES` timed batches of `P99_BATCH` lookups.
fn route_percentiles(snapshot: &Snapshot, scale: Scale, batches: usize) {
    println!();
    println!("route match percentiles ({batches} batches of {P99_BATCH} lookups, ns per lookup):");
    for kind in Lookup::ALL {
        let queries = common::queries(scale, kind, QUERIES);
        let mut samples: Vec<f64> = Vec::with_capacity(batches);
        let mut k = 0usize;
        for _ in 0..batches {
            let start = Instant::now();
            for _ in 0..P99_BATCH {
                let q = &queries[k % QUERIES];
                k = k.wrapping_add(1);
                black_box(snapshot.route(black_box(&q.host), black_box(&q.path)).route);
            }
            samples.push(start.elapsed().as_nanos() as f64 / P99_BATCH as f64);
        }
        samples.sort_by(f64::total_cmp);
        let at = |p: f64| samples[((samples.len() - 1) as f64 * p) as usize];
        // Machine-readable line, parsed by bench/report.py.
        println!(
            "ROUTE_PCT kind={} p50_ns={:.1} p99_ns={:.1} p999_ns={:.1} max_ns={:.1}",
            kind.name(),
            at(0.50),
            at(0.99),
            at(0.999),
            samples[samples.len() - 1]
        );
    }
}

fn main() {
    let scale = ISSUE_SCALE;
    let inputs = common::inputs(scale);
    let (snapshot, diags) = translate::translate(&inputs, &Options::default());
    assert!(
        diags.is_empty(),
        "generator produced diagnostics: {diags:?}"
    );
    let paths: usize = snapshot
        .hosts
        .exact
        .values()
        .map(|h| h.routes().len())
        .sum::<usize>()
        + snapshot
            .hosts
            .wildcard
            .values()
            .map(|h| h.routes().len())
            .sum::<usize>();
    let endpoints: usize = snapshot
        .backends
        .backends
        .iter()
        .map(|b| b.endpoints.len())
        .sum();
    assert_eq!(paths, scale.ingresses * common::PATHS_PER_INGRESS);
    assert_eq!(endpoints, scale.ingresses * scale.endpoints_per_service);
    println!(
        "snapshot: {} Ingresses, {} hosts, {paths} paths, {} backends, {endpoints} endpoints",
        scale.ingresses,
        snapshot.hosts.exact.len() + snapshot.hosts.wildcard.len(),
        snapshot.backends.backends.len()
    );
    drop(inputs);

    // Criterion's defaults (5 s measurement, 100 samples each) would take ~10 minutes here;
    // these keep the whole suite to a couple of minutes with stable means.
    let (warm, measure) = if quick() {
        (Duration::from_millis(200), Duration::from_millis(500))
    } else {
        (Duration::from_secs(1), Duration::from_secs(3))
    };
    let mut c = Criterion::default()
        .warm_up_time(warm)
        .measurement_time(measure)
        .sample_size(if quick() { 10 } else { 50 })
        .configure_from_args();
    bench_route(&mut c, &snapshot, scale);
    bench_translate(&mut c, scale);
    c.final_summary();
    route_percentiles(
        &snapshot,
        scale,
        if quick() {
            P99_BATCHES / 20
        } else {
            P99_BATCHES
        },
    );
}
