//! Leader election, status writes and Events of the controller (issue 3 items 3–5), driven by
//! the real kube client against the in-tree fake API server over HTTP.
//!
//! Leader timings are short (lease 1 s, renew deadline 700 ms, retry 200 ms) and every wait is
//! bounded polling with a deadline.

#[path = "support/fake_api/mod.rs"]
mod fake_api;

use std::sync::Arc;
use std::time::Duration;

use fake_api::{FakeApi, StallMode, poll_until};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::networking::v1::Ingress;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::Api;
use portico::controller::events::{self, EventReporter, EventsConfig};
use portico::controller::leader::{LeaderConfig, LeaderElector};
use portico::controller::status::{self, PublishAddress, StatusView, StatusWriter};
use portico::crd::RateLimitPolicy;
use portico::model::Snapshot;
use portico::translate::{self, Diagnostic, Inputs, Options, Severity, Svc};
use serde_json::{Value, json};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

const NS: &str = "portico";
const DEADLINE: Duration = Duration::from_secs(5);
const LEASE: Duration = Duration::from_secs(1);
const RENEW_DEADLINE: Duration = Duration::from_millis(700);
const RETRY: Duration = Duration::from_millis(200);

fn lease_config(identity: &str) -> LeaderConfig {
    let mut c = LeaderConfig::new(NS, identity);
    c.lease_duration = LEASE;
    c.renew_deadline = RENEW_DEADLINE;
    c.retry_period = RETRY;
    c
}

/// A running elector: its leader flag, a graceful-shutdown switch and its task.
struct Running {
    leader: watch::Receiver<bool>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Running {
    fn is_leader(&self) -> bool {
        *self.leader.borrow()
    }

    /// Graceful shutdown: the run loop releases the Lease before it returns.
    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("elector stops before the deadline")
            .expect("elector task does not panic");
    }
}

async fn start_elector(fake: &FakeApi, identity: &str) -> Running {
    let elector = LeaderElector::new(fake.client().await, lease_config(identity)).expect("valid");
    let leader = elector.subscribe();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        let shutdown = async {
            let _ = stopped.await;
        };
        elector.run(shutdown).await.expect("release succeeds");
    });
    Running {
        leader,
        stop: Some(stop),
        task,
    }
}

async fn wait(what: &str, f: impl FnMut() -> bool) {
    assert!(
        poll_until(DEADLINE, f).await,
        "timed out waiting for {what}"
    );
}

fn lease_json(fake: &FakeApi) -> Value {
    fake.get("coordination.k8s.io/v1", "Lease", NS, "portico-leader")
        .expect("lease exists")
}

fn holder(fake: &FakeApi) -> String {
    lease_json(fake)["spec"]["holderIdentity"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

/// `(acquireTime, renewTime)` of the Lease.
fn lease_times(fake: &FakeApi) -> (Timestamp, Timestamp) {
    let lease: Lease = serde_json::from_value(lease_json(fake)).expect("lease parses");
    let spec = lease.spec.expect("lease spec");
    (
        spec.acquire_time.expect("acquireTime").0,
        spec.renew_time.expect("renewTime").0,
    )
}

fn transitions(fake: &FakeApi) -> i64 {
    lease_json(fake)["spec"]["leaseTransitions"]
        .as_i64()
        .unwrap_or(0)
}

#[tokio::test]
async fn two_electors_exactly_one_leader() {
    let fake = FakeApi::start().await;
    let a = start_elector(&fake, "replica-a").await;
    let b = start_elector(&fake, "replica-b").await;
    wait("a leader", || a.is_leader() || b.is_leader()).await;
    // For more than a full lease duration (several renewals by the leader, several attempts by
    // the follower) there is never a second leader and the Lease names the one leader.
    let mut samples = 0;
    let stable = poll_until(LEASE + RENEW_DEADLINE, || {
        samples += 1;
        assert!(!(a.is_leader() && b.is_leader()), "two leaders at once");
        let expected = if a.is_leader() {
            "replica-a"
        } else {
            "replica-b"
        };
        assert_eq!(holder(&fake), expected);
        false
    })
    .await;
    assert!(!stable && samples > 10);
    assert_eq!(transitions(&fake), 0, "no takeover happened");
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn crashed_leader_is_replaced_after_the_lease_expires() {
    let fake = FakeApi::start().await;
    let a = start_elector(&fake, "replica-a").await;
    wait("a leads", || a.is_leader()).await;
    let b = start_elector(&fake, "replica-b").await;
    // b has made attempts and stays a follower while a renews.
    wait("b attempted", || fake.count("get", "leases") >= 2).await;
    assert!(!b.is_leader());

    // A crash: the task goes away without releasing the Lease.
    a.task.abort();
    let last_renewal = lease_times(&fake).1;
    wait("b takes over", || b.is_leader()).await;
    // b acquired only once a's last renewal plus the lease duration had passed.
    let (acquired, _) = lease_times(&fake);
    let expiry = last_renewal
        .checked_add(SignedDuration::try_from(LEASE).expect("duration"))
        .expect("timestamp");
    assert!(
        acquired > expiry,
        "took over at {acquired}, before the lease expired at {expiry}"
    );
    assert_eq!(holder(&fake), "replica-b");
    assert_eq!(transitions(&fake), 1);
    b.shutdown().await;
}

/// Expiry is judged on the follower's own clock, from when it saw the Lease record change: a
/// holder whose clock runs an hour behind (every `renewTime` an hour old) but keeps renewing
/// is never taken over; once it stops, the follower takes over a lease duration later.
#[tokio::test]
async fn a_holder_with_a_skewed_clock_keeps_its_lease_while_it_renews() {
    let fake = FakeApi::start().await;
    let hour_ago = |ms: i64| {
        Timestamp::now()
            .checked_sub(SignedDuration::from_secs(3600))
            .expect("timestamp")
            .checked_add(SignedDuration::from_millis(ms))
            .expect("timestamp")
            .to_string()
    };
    fake.create(json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "portico-leader", "namespace": NS},
        "spec": {"holderIdentity": "skewed", "leaseDurationSeconds": 1,
                 "acquireTime": hour_ago(0), "renewTime": hour_ago(0), "leaseTransitions": 0}
    }))
    .expect("create lease");
    let b = start_elector(&fake, "replica-b").await;
    // The skewed holder renews every retry period for three lease durations.
    let renewals = (LEASE * 3).as_millis() / RETRY.as_millis();
    let mut last_renewal = tokio::time::Instant::now();
    for i in 1..=renewals {
        tokio::time::sleep(RETRY).await;
        last_renewal = tokio::time::Instant::now();
        let mut lease = lease_json(&fake);
        lease["spec"]["renewTime"] = json!(hour_ago(i64::try_from(i).expect("small") * 200));
        fake.update(lease).expect("renew");
        assert!(!b.is_leader(), "took a Lease that is still being renewed");
    }
    assert_eq!(holder(&fake), "skewed");
    // The holder stops renewing: b takes over, not before a lease duration has passed since
    // the last renewal (which b can only have seen after it was written).
    wait("b takes over", || b.is_leader()).await;
    assert!(
        last_renewal.elapsed() >= LEASE,
        "took over {:?} after the last renewal",
        last_renewal.elapsed()
    );
    assert_eq!(holder(&fake), "replica-b");
    b.shutdown().await;
}

#[tokio::test]
async fn graceful_release_hands_over_at_once() {
    let fake = FakeApi::start().await;
    let a = start_elector(&fake, "replica-a").await;
    wait("a leads", || a.is_leader()).await;
    let b = start_elector(&fake, "replica-b").await;
    wait("b attempted", || fake.count("get", "leases") >= 2).await;
    assert!(!b.is_leader());

    let mut a_leader = a.leader.clone();
    let released = tokio::time::Instant::now();
    a.shutdown().await;
    assert!(!*a_leader.borrow_and_update(), "a stepped down");
    assert_eq!(holder(&fake), "", "a cleared holderIdentity");
    wait("b takes over", || b.is_leader()).await;
    // Well before the lease (1 s) could have expired: b's next attempt saw a free Lease.
    assert!(
        released.elapsed() < LEASE,
        "handover took {:?}",
        released.elapsed()
    );
    assert_eq!(holder(&fake), "replica-b");
    assert_eq!(transitions(&fake), 1);
    b.shutdown().await;
}

/// A follower counts a Lease record's expiry from when its read *returned* (client-go's
/// `observedTime`), not from when it was sent: a read the server queued can carry a renewal
/// made while it waited, and counting from the send would end that renewal's lease early,
/// while its holder still leads.
#[tokio::test]
async fn expiry_counts_from_when_the_read_returned() {
    let fake = FakeApi::start().await;
    fake.create(json!({
        "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "portico-leader", "namespace": NS},
        "spec": {"holderIdentity": "replica-a", "leaseDurationSeconds": 1,
                 "acquireTime": Timestamp::now().to_string(),
                 "renewTime": Timestamp::now().to_string(), "leaseTransitions": 0}
    }))
    .expect("create lease");
    let mut b = LeaderElector::new(fake.client().await, lease_config("replica-b")).expect("valid");
    // b's read waits 600 ms at the server; the holder renews while it waits.
    fake.stall(
        "get",
        "leases",
        StallMode::Delay(Duration::from_millis(600)),
        1,
    );
    let first = tokio::spawn(async move {
        let r = b.try_acquire_or_renew().await;
        (b, r)
    });
    wait("b's read arrived", || fake.count("get", "leases") == 1).await;
    // The renewal lands 400 ms into the read's 600 ms wait (the scenario's timing, not a
    // wait for something).
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut lease = lease_json(&fake);
    lease["spec"]["renewTime"] = json!(Timestamp::now().to_string());
    fake.update(lease).expect("renew");
    let renewed = tokio::time::Instant::now();
    let (mut b, r) = first.await.expect("attempt task");
    assert!(!r.expect("attempt"), "a valid Lease is not taken");
    // The holder renews no more: b takes over, a lease duration after it saw the renewal.
    let deadline = renewed + DEADLINE;
    while !b.try_acquire_or_renew().await.expect("attempt") {
        assert!(tokio::time::Instant::now() < deadline, "b never took over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        renewed.elapsed() >= LEASE,
        "took over {:?} after a renewal it saw up to 600 ms later",
        renewed.elapsed()
    );
    assert_eq!(holder(&fake), "replica-b");
}

/// A shutdown while a renewal hangs still clears `holderIdentity`, so the successor need not
/// wait for the lease to expire.
#[tokio::test]
async fn shutdown_during_a_hung_renewal_still_releases() {
    let fake = FakeApi::start().await;
    let a = start_elector(&fake, "replica-a").await;
    wait("a leads", || a.is_leader()).await;
    fake.stall("update", "leases", StallMode::Head, 1);
    wait("a renewal hangs", || {
        fake.requests()
            .iter()
            .any(|r| r.verb == "update" && r.stalled.is_some())
    })
    .await;
    a.shutdown().await;
    assert_eq!(holder(&fake), "", "released");
}

/// The Lease version the leader holds is stale at release (a renewal interrupted after the
/// server applied it, or here an edit of the Lease): the release re-reads it and, still
/// holding it, clears holderIdentity.
#[tokio::test]
async fn release_with_a_stale_version_rereads_and_releases() {
    let fake = FakeApi::start().await;
    let mut a = LeaderElector::new(fake.client().await, lease_config("replica-a")).expect("valid");
    assert!(a.try_acquire_or_renew().await.expect("acquire"));
    let mut lease = lease_json(&fake);
    lease["metadata"]["labels"] = json!({"edited": "yes"});
    fake.update(lease).expect("edit");
    a.release().await.expect("release");
    assert_eq!(holder(&fake), "", "released");
    assert!(!a.is_leader());
}

#[tokio::test]
async fn renewal_conflict_rereads_and_does_not_overwrite() {
    let fake = FakeApi::start().await;
    let mut a = LeaderElector::new(fake.client().await, lease_config("replica-a")).expect("valid");
    let flag = a.subscribe();
    assert!(a.try_acquire_or_renew().await.expect("acquire"));
    assert!(*flag.borrow());
    assert_eq!(fake.count("create", "leases"), 1);

    // Someone else writes the Lease behind our back (a newer resourceVersion).
    let mut lease = lease_json(&fake);
    lease["spec"]["holderIdentity"] = json!("intruder");
    lease["spec"]["leaseDurationSeconds"] = json!(60);
    fake.update(lease).expect("update");
    let updates_before = fake.count("update", "leases");

    // Our renewal carries the old resourceVersion: 409, then a re-read, no second write.
    assert!(!a.try_acquire_or_renew().await.expect("attempt"));
    assert!(!*flag.borrow(), "stepped down on seeing another holder");
    assert_eq!(fake.count("update", "leases"), updates_before + 1);
    assert_eq!(holder(&fake), "intruder");

    // Next attempt: the intruder's Lease is valid, so a reads and writes nothing.
    assert!(!a.try_acquire_or_renew().await.expect("attempt"));
    assert_eq!(fake.count("update", "leases"), updates_before + 1);
    assert_eq!(holder(&fake), "intruder");
}

#[tokio::test]
async fn create_race_loser_does_not_lead() {
    let fake = FakeApi::start().await;
    let mut a = LeaderElector::new(fake.client().await, lease_config("replica-a")).expect("valid");
    let mut b = LeaderElector::new(fake.client().await, lease_config("replica-b")).expect("valid");
    let (ra, rb) = tokio::join!(a.try_acquire_or_renew(), b.try_acquire_or_renew());
    let (ra, rb) = (ra.expect("a attempt"), rb.expect("b attempt"));
    assert!(ra ^ rb, "exactly one wins: a={ra} b={rb}");
    let winner = if ra { "replica-a" } else { "replica-b" };
    assert_eq!(holder(&fake), winner);
    assert_eq!(a.is_leader(), ra);
    assert_eq!(b.is_leader(), rb);
}

#[tokio::test]
async fn leader_steps_down_when_it_cannot_renew() {
    let fake = FakeApi::start().await;
    let a = start_elector(&fake, "replica-a").await;
    wait("a leads", || a.is_leader()).await;
    fake.refuse_connections();
    wait("a steps down", || !a.is_leader()).await;
    // It stopped acting before its Lease could expire for others (renewTime + duration).
    let stepped_down = Timestamp::now();
    let expiry = lease_times(&fake)
        .1
        .checked_add(SignedDuration::try_from(LEASE).expect("duration"))
        .expect("timestamp");
    assert!(
        stepped_down < expiry,
        "stepped down at {stepped_down}, after the lease expired at {expiry}"
    );
    fake.accept_connections();
    wait("a leads again", || a.is_leader()).await;
    a.shutdown().await;
}

// ---- status ---------------------------------------------------------------------------------

fn ingress_json(name: &str, class: &str) -> Value {
    json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {
            "ingressClassName": class,
            "rules": [{"host": format!("{name}.example.com"), "http": {"paths": [{
                "path": "/", "pathType": "Prefix",
                "backend": {"service": {"name": "web", "port": {"number": 80}}}
            }]}}]
        }
    })
}

async fn ingresses(fake: &FakeApi) -> Vec<Arc<Ingress>> {
    let api: Api<Ingress> = Api::all(fake.client().await);
    api.list(&Default::default())
        .await
        .expect("list ingresses")
        .items
        .into_iter()
        .map(Arc::new)
        .collect()
}

async fn policies(fake: &FakeApi) -> Vec<Arc<RateLimitPolicy>> {
    let api: Api<RateLimitPolicy> = Api::all(fake.client().await);
    api.list(&Default::default())
        .await
        .expect("list policies")
        .items
        .into_iter()
        .map(Arc::new)
        .collect()
}

fn translate_inputs(inputs: &Inputs) -> Snapshot {
    translate::translate(inputs, &Options::default()).0
}

fn lb(fake: &FakeApi, name: &str) -> Value {
    fake.get("networking.k8s.io/v1", "Ingress", "shop", name)
        .expect("ingress exists")
        .pointer("/status/loadBalancer/ingress")
        .cloned()
        .unwrap_or(json!([]))
}

fn status_patches(fake: &FakeApi) -> usize {
    fake.requests()
        .iter()
        .filter(|r| {
            r.verb == "patch"
                && r.resource == "ingresses"
                && r.subresource.as_deref() == Some("status")
        })
        .count()
}

#[tokio::test]
async fn ingress_status_from_publish_status_address_written_skipped_and_cleared() {
    let fake = FakeApi::start().await;
    fake.create(ingress_json("served", "portico"))
        .expect("create");
    fake.create(ingress_json("foreign", "nginx"))
        .expect("create");
    let client = fake.client().await;
    let mut writer = StatusWriter::new(
        client,
        PublishAddress::from_flags(&["10.0.0.7".into(), "lb.example.com".into()], None),
    );
    let mut inputs = Inputs {
        ingresses: ingresses(&fake).await,
        ..Inputs::default()
    };
    let snapshot = translate_inputs(&inputs);
    assert_eq!(status::served_ingresses(&snapshot).len(), 1);

    let r = writer.sync(&inputs, &snapshot, &[]).await.expect("sync");
    assert_eq!((r.ingresses_written, r.failed), (1, 0));
    assert_eq!(
        lb(&fake, "served"),
        json!([{"hostname": "lb.example.com"}, {"ip": "10.0.0.7"}])
    );
    assert_eq!(lb(&fake, "foreign"), json!([]), "not ours: untouched");
    assert_eq!(
        fake.status_writers("ingresses"),
        ["portico".to_string()].into()
    );
    assert_eq!(status_patches(&fake), 1);

    // Same (stale) objects again, as a lagging reflector would show them: no write.
    let r = writer.sync(&inputs, &snapshot, &[]).await.expect("sync");
    assert_eq!(r.ingresses_written, 0);
    // Fresh objects that already carry the status: no write either.
    inputs.ingresses = ingresses(&fake).await;
    let r = writer.sync(&inputs, &snapshot, &[]).await.expect("sync");
    assert_eq!(r.ingresses_written, 0);
    assert_eq!(r.unchanged, 1);
    assert_eq!(status_patches(&fake), 1);
    // A fresh writer (e.g. after a restart) with fresh objects does not write either.
    let mut restarted = StatusWriter::new(
        fake.client().await,
        PublishAddress::Static(vec!["lb.example.com".into(), "10.0.0.7".into()]),
    );
    restarted.sync(&inputs, &snapshot, &[]).await.expect("sync");
    assert_eq!(status_patches(&fake), 1);

    // No longer served (not in the snapshot): our address is removed.
    let r = writer
        .sync(&inputs, &Snapshot::default(), &[])
        .await
        .expect("sync");
    assert_eq!(r.ingresses_cleared, 1);
    assert_eq!(lb(&fake, "served"), json!([]));
    assert_eq!(status_patches(&fake), 2);
    inputs.ingresses = ingresses(&fake).await;
    let r = writer
        .sync(&inputs, &Snapshot::default(), &[])
        .await
        .expect("sync");
    assert_eq!((r.ingresses_cleared, r.ingresses_written), (0, 0));
    assert_eq!(status_patches(&fake), 2);
}

#[tokio::test]
async fn ingress_status_from_publish_service_by_its_type() {
    let fake = FakeApi::start().await;
    fake.create(ingress_json("served", "portico"))
        .expect("create");
    fake.create(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "edge", "namespace": NS},
        "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10",
                 "externalIPs": ["192.0.2.5"], "ports": [{"port": 80}]}
    }))
    .expect("create service");
    let mut svc = fake.get("v1", "Service", NS, "edge").expect("service");
    svc["status"] = json!({"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}, {"hostname": "edge.example.net"}]}});
    fake.update_status(svc).expect("service status");

    let mut writer = StatusWriter::new(
        fake.client().await,
        PublishAddress::from_flags(&[], Some(&(NS.to_string(), "edge".to_string()))),
    );
    // The Service is not among the inputs (e.g. outside --watch-namespace): read from the API.
    let mut inputs = Inputs {
        ingresses: ingresses(&fake).await,
        ..Inputs::default()
    };
    let snapshot = translate_inputs(&inputs);
    let r = writer.sync(&inputs, &snapshot, &[]).await.expect("sync");
    assert_eq!(r.ingresses_written, 1);
    assert_eq!(fake.count("get", "services"), 1);
    // type LoadBalancer: the load balancer's addresses and the external IPs (as ingress-nginx).
    assert_eq!(
        lb(&fake, "served"),
        json!([{"hostname": "edge.example.net"}, {"ip": "192.0.2.5"}, {"ip": "203.0.113.7"}])
    );

    // No load-balancer status: the external IPs. The Service comes from the inputs now.
    let mut svc = fake.get("v1", "Service", NS, "edge").expect("service");
    svc["status"] = json!({});
    fake.update_status(svc).expect("service status");
    let services = |fake: &FakeApi| {
        let v = fake.get("v1", "Service", NS, "edge").expect("service");
        // As the reflector stores it: translate's compact form.
        let svc: Service = serde_json::from_value(v).expect("service parses");
        vec![Arc::new(Svc::from(svc))]
    };
    inputs.services = services(&fake);
    inputs.ingresses = ingresses(&fake).await;
    let r = writer.sync(&inputs, &snapshot, &[]).await.expect("sync");
    assert_eq!(r.ingresses_written, 1);
    assert_eq!(fake.count("get", "services"), 1, "found in inputs");
    assert_eq!(lb(&fake, "served"), json!([{"ip": "192.0.2.5"}]));

    // Neither (a load balancer still pending): nothing to publish, the status stays. The
    // cluster IP is internal and never published for a LoadBalancer Service.
    let mut svc = fake.get("v1", "Service", NS, "edge").expect("service");
    svc["spec"]["externalIPs"] = json!([]);
    fake.update(svc).expect("service update");
    inputs.services = services(&fake);
    inputs.ingresses = ingresses(&fake).await;
    let r = writer.sync(&inputs, &snapshot, &[]).await.expect("sync");
    assert_eq!(r.ingresses_written, 0);
    assert_eq!(lb(&fake, "served"), json!([{"ip": "192.0.2.5"}]));
    assert_eq!(status_patches(&fake), 2);

    // Any other type with no external IPs: the cluster IP.
    let mut svc = fake.get("v1", "Service", NS, "edge").expect("service");
    svc["spec"]["type"] = json!("ClusterIP");
    fake.update(svc).expect("service update");
    inputs.services = services(&fake);
    inputs.ingresses = ingresses(&fake).await;
    let r = writer.sync(&inputs, &snapshot, &[]).await.expect("sync");
    assert_eq!(r.ingresses_written, 1);
    assert_eq!(lb(&fake, "served"), json!([{"ip": "10.96.0.10"}]));
    assert_eq!(status_patches(&fake), 3);

    // Unchanged: nothing more.
    inputs.ingresses = ingresses(&fake).await;
    writer.sync(&inputs, &snapshot, &[]).await.expect("sync");
    assert_eq!(status_patches(&fake), 3);
}

/// With the controller's stores as the lookup, the publish Service is never fetched: status
/// syncs run on every build, and a GET each time would load the API server under churn.
#[tokio::test]
async fn publish_service_from_the_lookup_is_never_fetched() {
    let fake = FakeApi::start().await;
    fake.create(ingress_json("served", "portico"))
        .expect("create");
    let edge: Service = serde_json::from_value(json!({
        "metadata": {"name": "edge", "namespace": "portico-system"},
        "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10"},
        "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.9"}]}}
    }))
    .expect("service");
    let store: Arc<std::sync::Mutex<Option<Arc<Svc>>>> = Arc::default();
    let seen = store.clone();
    let mut writer = StatusWriter::new(
        fake.client().await,
        PublishAddress::from_flags(
            &[],
            Some(&("portico-system".to_string(), "edge".to_string())),
        ),
    )
    .with_lookup(Arc::new(move |ns: &str, name: &str| {
        assert_eq!((ns, name), ("portico-system", "edge"));
        seen.lock().expect("lock").clone()
    }));
    let inputs = Inputs {
        ingresses: ingresses(&fake).await,
        ..Inputs::default()
    };
    let snapshot = translate_inputs(&inputs);
    // Not in the store (yet): no address, no write, and no GET either.
    let r = writer.sync(&inputs, &snapshot, &[]).await.expect("sync");
    assert_eq!((r.ingresses_written, r.failed), (0, 0));
    *store.lock().expect("lock") = Some(Arc::new(Svc::from(edge)));
    for _ in 0..3 {
        let inputs = Inputs {
            ingresses: ingresses(&fake).await,
            ..Inputs::default()
        };
        writer.sync(&inputs, &snapshot, &[]).await.expect("sync");
    }
    assert_eq!(lb(&fake, "served"), json!([{"ip": "203.0.113.9"}]));
    assert_eq!(status_patches(&fake), 1);
    assert_eq!(fake.count("get", "services"), 0);
}

fn policy_json(name: &str) -> Value {
    json!({
        "apiVersion": "portico.dev/v1alpha1",
        "kind": "RateLimitPolicy",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"targetRef": {"kind": "Ingress", "name": "served"},
                 "limit": {"requests": 10, "period": "1m"}}
    })
}

fn policy_error(name: &str, reason: &str, message: &str) -> Diagnostic {
    Diagnostic {
        severity: Severity::Error,
        kind: "RateLimitPolicy".into(),
        namespace: "shop".into(),
        name: name.into(),
        uid: String::new(),
        reason: reason.into(),
        message: message.into(),
    }
}

fn accepted(fake: &FakeApi, name: &str) -> Value {
    let v = fake
        .get("portico.dev/v1alpha1", "RateLimitPolicy", "shop", name)
        .expect("policy exists");
    let conditions = v
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    assert_eq!(conditions.len(), 1, "one condition: {conditions:?}");
    conditions[0].clone()
}

#[tokio::test]
async fn rate_limit_policy_accepted_true_and_false_with_observed_generation() {
    let fake = FakeApi::start().await;
    fake.create(policy_json("good")).expect("create");
    fake.create(policy_json("bad")).expect("create");
    let diagnostics = vec![
        policy_error(
            "bad",
            "TargetNotFound",
            "Ingress shop/nothing does not exist",
        ),
        // A warning does not make a policy unaccepted.
        Diagnostic {
            severity: Severity::Warning,
            ..policy_error("good", "Defaulted", "burst defaulted to requests")
        },
    ];
    let mut writer = StatusWriter::new(fake.client().await, PublishAddress::None);
    let mut inputs = Inputs {
        rate_limit_policies: policies(&fake).await,
        ..Inputs::default()
    };
    let r = writer
        .sync(&inputs, &Snapshot::default(), &diagnostics)
        .await
        .expect("sync");
    assert_eq!((r.policies_written, r.failed), (2, 0));

    let good = accepted(&fake, "good");
    assert_eq!(good["type"], "Accepted");
    assert_eq!(good["status"], "True");
    assert_eq!(good["reason"], "Accepted");
    assert_eq!(good["observedGeneration"], 1);
    let first_transition = good["lastTransitionTime"].clone();
    assert!(first_transition.is_string());
    let bad = accepted(&fake, "bad");
    assert_eq!(bad["status"], "False");
    assert_eq!(bad["reason"], "TargetNotFound");
    assert_eq!(bad["message"], "Ingress shop/nothing does not exist");
    assert_eq!(bad["observedGeneration"], 1);
    assert_eq!(
        fake.status_writers("ratelimitpolicies"),
        ["portico".to_string()].into()
    );
    let patches = fake.count("patch", "ratelimitpolicies/status");
    assert_eq!(patches, 2);

    // Unchanged: no writes.
    inputs.rate_limit_policies = policies(&fake).await;
    let r = writer
        .sync(&inputs, &Snapshot::default(), &diagnostics)
        .await
        .expect("sync");
    assert_eq!((r.policies_written, r.unchanged), (0, 2));
    assert_eq!(fake.count("patch", "ratelimitpolicies/status"), patches);

    // A spec change bumps the generation: the condition follows, its transition time stays.
    let mut good = fake
        .get("portico.dev/v1alpha1", "RateLimitPolicy", "shop", "good")
        .expect("policy");
    good["spec"]["limit"]["requests"] = json!(20);
    fake.update(good).expect("update");
    inputs.rate_limit_policies = policies(&fake).await;
    let r = writer
        .sync(&inputs, &Snapshot::default(), &diagnostics)
        .await
        .expect("sync");
    assert_eq!(r.policies_written, 1);
    let good = accepted(&fake, "good");
    assert_eq!(good["observedGeneration"], 2);
    assert_eq!(good["status"], "True");
    assert_eq!(good["lastTransitionTime"], first_transition);

    // The bad one is fixed: Accepted turns True.
    inputs.rate_limit_policies = policies(&fake).await;
    writer
        .sync(&inputs, &Snapshot::default(), &diagnostics[1..])
        .await
        .expect("sync");
    let bad = accepted(&fake, "bad");
    assert_eq!(bad["status"], "True");
    assert_eq!(bad["reason"], "Accepted");

    // Another writer's condition beside ours is no reason to write (the CRD keys the list by
    // type, so server-side apply would leave it alone anyway).
    let mut bad = fake
        .get("portico.dev/v1alpha1", "RateLimitPolicy", "shop", "bad")
        .expect("policy");
    let ours = bad["status"]["conditions"][0].clone();
    bad["status"]["conditions"] = json!([
        ours,
        {"type": "Audited", "status": "True", "reason": "Checked", "message": "",
         "lastTransitionTime": "2026-12-07T00:00:00Z"}
    ]);
    fake.update_status(bad).expect("update status");
    inputs.rate_limit_policies = policies(&fake).await;
    let patches = fake.count("patch", "ratelimitpolicies/status");
    let r = writer
        .sync(&inputs, &Snapshot::default(), &diagnostics[1..])
        .await
        .expect("sync");
    assert_eq!((r.policies_written, r.unchanged), (0, 2));
    assert_eq!(fake.count("patch", "ratelimitpolicies/status"), patches);
}

// ---- events ---------------------------------------------------------------------------------

fn diag(name: &str, reason: &str, message: &str) -> Diagnostic {
    Diagnostic {
        severity: Severity::Error,
        kind: "Ingress".into(),
        namespace: "shop".into(),
        name: name.into(),
        uid: format!("uid-of-{name}"),
        reason: reason.into(),
        message: message.into(),
    }
}

fn events_of(fake: &FakeApi) -> Vec<Value> {
    fake.list("events.k8s.io/v1", "Event")
}

#[tokio::test]
async fn an_event_per_new_diagnostic_none_for_a_repeat() {
    let fake = FakeApi::start().await;
    let mut reporter = EventReporter::new(
        fake.client().await,
        EventsConfig::new("portico.dev/ingress-controller", "replica-a"),
    );
    let d1 = diag("shop", "ServiceNotFound", "Service shop/web does not exist");
    let d2 = diag(
        "shop",
        "PathConflict",
        "path / on a.example.com is served by shop/old",
    );
    let s = reporter.report(&[d1.clone(), d2.clone()]).await;
    assert_eq!((s.emitted, s.duplicates, s.failed), (2, 0, 0));
    let evs = events_of(&fake);
    assert_eq!(evs.len(), 2);
    let ev = evs
        .iter()
        .find(|e| e["reason"] == "ServiceNotFound")
        .expect("event for d1");
    assert_eq!(ev["type"], "Warning");
    assert_eq!(ev["action"], "Translate");
    assert_eq!(ev["reportingController"], "portico.dev/ingress-controller");
    assert_eq!(ev["reportingInstance"], "replica-a");
    assert_eq!(ev["metadata"]["namespace"], "shop");
    // The uid too: `kubectl describe` selects Events by involvedObject.uid as well as name.
    assert_eq!(
        ev["regarding"],
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "namespace": "shop",
               "name": "shop", "uid": "uid-of-shop"})
    );
    assert_eq!(ev["note"], "Service shop/web does not exist");
    assert!(ev["eventTime"].is_string());

    // The same diagnostics again (a rebuild): nothing new.
    let s = reporter.report(&[d2.clone(), d1.clone()]).await;
    assert_eq!((s.emitted, s.duplicates), (0, 2));
    assert_eq!(fake.count("create", "events"), 2);
    // Same object and reason, new message: a new Event.
    let d3 = diag("shop", "ServiceNotFound", "Service shop/api does not exist");
    let s = reporter.report(&[d1.clone(), d2.clone(), d3]).await;
    assert_eq!(s.emitted, 1);
    assert_eq!(events_of(&fake).len(), 3);
    // Fixed, then broken again: reported again.
    reporter.report(std::slice::from_ref(&d1)).await;
    let s = reporter.report(&[d1, d2]).await;
    assert_eq!(s.emitted, 1);
    assert_eq!(fake.count("create", "events"), 4);
    // No patches: repeats are not Event series updates.
    assert_eq!(fake.count("patch", "events"), 0);
}

#[tokio::test]
async fn an_event_burst_is_capped() {
    let fake = FakeApi::start().await;
    let mut config = EventsConfig::new("portico.dev/ingress-controller", "replica-a");
    config.burst = 5;
    config.per_minute = 1;
    let mut reporter = EventReporter::new(fake.client().await, config);
    let many: Vec<Diagnostic> = (0..20)
        .map(|i| diag(&format!("ing-{i:02}"), "ServiceNotFound", "missing"))
        .collect();
    let s = reporter.report(&many).await;
    assert_eq!((s.emitted, s.rate_limited), (5, 15));
    // A rebuild loop repeating the list does not get past the cap either.
    for _ in 0..5 {
        let s = reporter.report(&many).await;
        assert_eq!(s.emitted, 0);
    }
    assert_eq!(events_of(&fake).len(), 5);
    assert_eq!(fake.count("create", "events"), 5);
}

/// An Event RBAC refuses (no `events create` in that namespace) is not retried while the
/// diagnostic stands: the retry loop would otherwise POST it every few seconds for as long as
/// the replica leads. Events elsewhere are unaffected.
#[tokio::test]
async fn an_event_refused_by_rbac_is_not_retried() {
    let fake = FakeApi::start().await;
    fake.forbid("create", "events", "shop");
    let mut reporter = EventReporter::new(
        fake.client().await,
        EventsConfig::new("portico.dev/ingress-controller", "replica-a"),
    );
    let denied = diag("shop", "ServiceNotFound", "Service shop/web does not exist");
    let elsewhere = Diagnostic {
        namespace: "other".into(),
        ..diag(
            "other",
            "ServiceNotFound",
            "Service other/web does not exist",
        )
    };
    let s = reporter.report(&[denied.clone(), elsewhere.clone()]).await;
    assert_eq!((s.emitted, s.refused, s.failed), (1, 1, 0));
    for _ in 0..3 {
        let s = reporter.report(&[denied.clone(), elsewhere.clone()]).await;
        assert_eq!((s.emitted, s.refused, s.failed, s.duplicates), (0, 0, 0, 2));
    }
    assert_eq!(
        fake.count("create", "events"),
        2,
        "the refused one was tried once"
    );
    assert_eq!(events_of(&fake).len(), 1);
}

/// A diagnostic that stands longer than the Event cache TTL is reported again with nothing
/// else changing, so it outlives the API server's garbage collection of its Event (1 h).
#[tokio::test]
async fn a_standing_diagnostic_is_reported_again_after_the_cache_ttl() {
    let fake = FakeApi::start().await;
    let mut config = EventsConfig::new("portico.dev/ingress-controller", "replica-a");
    config.cache_ttl = Duration::from_millis(300);
    let reporter = EventReporter::new(fake.client().await, config);
    let (_leader_tx, leader) = watch::channel(true);
    let (_diags_tx, diags) = watch::channel(Arc::new(vec![diag(
        "shop",
        "ServiceNotFound",
        "Service shop/web does not exist",
    )]));
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(events::run(
        reporter,
        leader,
        diags,
        Duration::from_secs(5),
        stopped(stop_rx),
    ));
    assert!(
        poll_until(DEADLINE, || fake.count("create", "events") >= 3).await,
        "re-reported: {} creates",
        fake.count("create", "events")
    );
    let _ = stop.send(true);
    tokio::time::timeout(DEADLINE, task)
        .await
        .expect("loop stops")
        .expect("no panic");
}

// ---- only the leader writes ----------------------------------------------------------------

struct Replica {
    elector: Running,
    loops: Vec<JoinHandle<()>>,
    stop: watch::Sender<bool>,
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

async fn start_replica(
    fake: &FakeApi,
    identity: &str,
    views: &watch::Sender<Arc<StatusView>>,
    diagnostics: &watch::Sender<Arc<Vec<Diagnostic>>>,
) -> Replica {
    let elector = start_elector(fake, identity).await;
    let (stop, stop_rx) = watch::channel(false);
    let writer = StatusWriter::new(
        fake.client().await,
        PublishAddress::Static(vec!["10.0.0.7".into()]),
    );
    let reporter = EventReporter::new(
        fake.client().await,
        EventsConfig::new("portico.dev/ingress-controller", identity),
    );
    let loops = vec![
        tokio::spawn(status::run(
            writer,
            elector.leader.clone(),
            views.subscribe(),
            status::DEFAULT_RESYNC,
            stopped(stop_rx.clone()),
        )),
        tokio::spawn(events::run(
            reporter,
            elector.leader.clone(),
            diagnostics.subscribe(),
            Duration::from_secs(1),
            stopped(stop_rx),
        )),
    ];
    Replica {
        elector,
        loops,
        stop,
    }
}

impl Replica {
    async fn shutdown(self) {
        let _ = self.stop.send(true);
        for l in self.loops {
            tokio::time::timeout(DEADLINE, l)
                .await
                .expect("loop stops")
                .expect("loop does not panic");
        }
        self.elector.shutdown().await;
    }
}

#[tokio::test]
async fn only_the_leader_writes_status_and_events() {
    let fake = FakeApi::start().await;
    fake.create(ingress_json("served", "portico"))
        .expect("create");
    let inputs = Inputs {
        ingresses: ingresses(&fake).await,
        ..Inputs::default()
    };
    let snapshot = Arc::new(translate_inputs(&inputs));
    let (views, _) = watch::channel(Arc::new(StatusView {
        inputs,
        snapshot,
        diagnostics: Arc::default(),
    }));
    let list = Arc::new(vec![
        diag(
            "served",
            "ServiceNotFound",
            "Service shop/web does not exist",
        ),
        diag("served", "Other", "something else"),
    ]);
    let (diagnostics, _) = watch::channel(list.clone());

    let a = start_replica(&fake, "replica-a", &views, &diagnostics).await;
    let b = start_replica(&fake, "replica-b", &views, &diagnostics).await;
    wait("a leader", || {
        a.elector.is_leader() || b.elector.is_leader()
    })
    .await;
    let leader = if a.elector.is_leader() {
        "replica-a"
    } else {
        "replica-b"
    };
    wait("status written", || status_patches(&fake) >= 1).await;
    wait("events written", || fake.count("create", "events") >= 2).await;

    // Both replicas see the same (stale) view and the same diagnostics, and are woken again;
    // an ungated follower would write within one round trip. Observe for several retry
    // periods that nobody but the leader wrote.
    views.send_modify(|_| {});
    diagnostics.send_modify(|_| {});
    let quiet = poll_until(RETRY * 4, || {
        status_patches(&fake) > 1 || fake.count("create", "events") > 2
    })
    .await;
    assert!(!quiet, "a follower wrote");
    for ev in events_of(&fake) {
        assert_eq!(ev["reportingInstance"], leader);
    }
    assert_eq!(lb(&fake, "served"), json!([{"ip": "10.0.0.7"}]));

    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn a_new_leader_takes_over_status_writes() {
    let fake = FakeApi::start().await;
    fake.create(ingress_json("served", "portico"))
        .expect("create");
    let inputs = Inputs {
        ingresses: ingresses(&fake).await,
        ..Inputs::default()
    };
    let snapshot = Arc::new(translate_inputs(&inputs));
    let (views, _) = watch::channel(Arc::new(StatusView {
        inputs,
        snapshot,
        diagnostics: Arc::default(),
    }));
    let (diagnostics, _) = watch::channel(Arc::new(Vec::new()));
    let a = start_replica(&fake, "replica-a", &views, &diagnostics).await;
    wait("a leads", || a.elector.is_leader()).await;
    let b = start_replica(&fake, "replica-b", &views, &diagnostics).await;
    wait("status written", || {
        lb(&fake, "served") == json!([{"ip": "10.0.0.7"}])
    })
    .await;

    // The reflectors catch up with a's write (the next view carries it).
    let caught_up = StatusView {
        inputs: Inputs {
            ingresses: ingresses(&fake).await,
            ..Inputs::default()
        },
        // Clone out first: holding the borrow across send_replace would deadlock.
        ..StatusView::clone(&views.borrow())
    };
    views.send_replace(Arc::new(caught_up));

    // The leader goes away gracefully; b takes over (nothing to fix: no write) and acts on the
    // next build's view.
    a.shutdown().await;
    wait("b leads", || b.elector.is_leader()).await;
    views.send_replace(Arc::new(StatusView {
        inputs: Inputs {
            ingresses: ingresses(&fake).await,
            ..Inputs::default()
        },
        snapshot: Arc::new(Snapshot::default()),
        diagnostics: Arc::default(),
    }));
    wait("b clears the unserved Ingress", || {
        lb(&fake, "served") == json!([])
    })
    .await;
    assert_eq!(status_patches(&fake), 2, "one write by each leader");
    b.shutdown().await;
}

/// A leader that loses the Lease in the middle of a status sync abandons the rest of it, as
/// client-go cancels a leader's work: the new leader may be writing already.
#[tokio::test]
async fn losing_the_lease_mid_sync_stops_the_writes() {
    let fake = FakeApi::start().await;
    for i in 0..5 {
        fake.create(ingress_json(&format!("served-{i}"), "portico"))
            .expect("create");
    }
    let inputs = Inputs {
        ingresses: ingresses(&fake).await,
        ..Inputs::default()
    };
    let snapshot = Arc::new(translate_inputs(&inputs));
    let (_views, views_rx) = watch::channel(Arc::new(StatusView {
        inputs,
        snapshot,
        diagnostics: Arc::default(),
    }));
    // The first write is held 500 ms at the server; leadership is lost meanwhile.
    fake.stall(
        "patch",
        "ingresses",
        StallMode::Delay(Duration::from_millis(500)),
        1,
    );
    let (leader, leader_rx) = watch::channel(true);
    let (stop, stop_rx) = watch::channel(false);
    let writer = StatusWriter::new(
        fake.client().await,
        PublishAddress::Static(vec!["10.0.0.7".into()]),
    );
    let task = tokio::spawn(status::run(
        writer,
        leader_rx,
        views_rx,
        status::DEFAULT_RESYNC,
        stopped(stop_rx),
    ));
    wait("the first write arrived", || status_patches(&fake) == 1).await;
    leader.send_replace(false);
    // The held write would have completed after 500 ms, and the four others followed at once.
    let more = poll_until(Duration::from_millis(1500), || status_patches(&fake) > 1).await;
    assert!(
        !more,
        "{} status writes after losing the Lease",
        status_patches(&fake) - 1
    );
    let _ = stop.send(true);
    tokio::time::timeout(DEADLINE, task)
        .await
        .expect("loop stops")
        .expect("loop does not panic");
}

/// A write the API refuses (403 without RBAC, 422) is not repeated on every sync, and every
/// build syncs: it waits with backoff while the status to write stays the same, and goes
/// through once the API accepts it.
#[tokio::test]
async fn refused_status_writes_back_off() {
    let fake = FakeApi::start().await;
    for i in 0..3 {
        fake.create(ingress_json(&format!("served-{i}"), "portico"))
            .expect("create");
    }
    let inputs = Inputs {
        ingresses: ingresses(&fake).await,
        ..Inputs::default()
    };
    let snapshot = translate_inputs(&inputs);
    fake.forbid("patch", "ingresses", "shop");
    let mut w = StatusWriter::new(
        fake.client().await,
        PublishAddress::Static(vec!["10.0.0.7".into()]),
    );
    let r = w.sync(&inputs, &snapshot, &[]).await.expect("sync");
    assert_eq!((r.failed, r.ingresses_written), (3, 0));
    // Ten builds in quick succession: nothing is sent again.
    for _ in 0..10 {
        let r = w.sync(&inputs, &snapshot, &[]).await.expect("sync");
        assert_eq!((r.deferred, r.failed), (3, 0));
    }
    assert_eq!(status_patches(&fake), 3);
    // RBAC fixed: the writes go through once their retry is due.
    fake.allow("patch", "ingresses", "shop");
    let mut written = 0;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while written < 3 {
        assert!(tokio::time::Instant::now() < deadline, "never retried");
        tokio::time::sleep(Duration::from_millis(100)).await;
        written += w
            .sync(&inputs, &snapshot, &[])
            .await
            .expect("sync")
            .ingresses_written;
    }
    assert_eq!(status_patches(&fake), 6);
    assert_eq!(lb(&fake, "served-0"), json!([{"ip": "10.0.0.7"}]));
}

/// The writer forgets what it wrote to objects that are gone: a leader that sees many
/// short-lived Ingresses (preview environments) keeps entries for the ones that exist.
#[tokio::test]
async fn the_status_writer_forgets_deleted_objects() {
    let fake = FakeApi::start().await;
    for i in 0..5 {
        fake.create(ingress_json(&format!("served-{i}"), "portico"))
            .expect("create");
    }
    let all = Inputs {
        ingresses: ingresses(&fake).await,
        ..Inputs::default()
    };
    let mut w = StatusWriter::new(
        fake.client().await,
        PublishAddress::Static(vec!["10.0.0.7".into()]),
    );
    let r = w
        .sync(&all, &translate_inputs(&all), &[])
        .await
        .expect("sync");
    assert_eq!(r.ingresses_written, 5);
    assert!(format!("{w:?}").contains("written: 5"), "{w:?}");
    // Four deleted: their entries go.
    let one = Inputs {
        ingresses: all.ingresses[..1].to_vec(),
        ..Inputs::default()
    };
    w.sync(&one, &translate_inputs(&one), &[])
        .await
        .expect("sync");
    assert!(format!("{w:?}").contains("written: 1,"), "{w:?}");
}

/// A refused RateLimitPolicy status write backs off like an Ingress one, although its
/// condition carries a time: a sync in a later second computes the same transition (it keeps
/// the time of the first attempt), so it is not a new status to send at once. Before, every
/// build (one per EndpointSlice change) sent it again.
#[tokio::test]
async fn refused_policy_status_writes_back_off_across_seconds() {
    let fake = FakeApi::start().await;
    fake.create(policy_json("p")).expect("create");
    fake.forbid("patch", "ratelimitpolicies", "shop");
    let inputs = Inputs {
        rate_limit_policies: policies(&fake).await,
        ..Inputs::default()
    };
    let mut w = StatusWriter::new(fake.client().await, PublishAddress::None);
    let r = w
        .sync(&inputs, &Snapshot::default(), &[])
        .await
        .expect("sync");
    assert_eq!((r.failed, r.policies_written), (1, 0));
    let attempted = Timestamp::now().as_second();
    // metav1.Time has second precision: the next syncs run in a later second.
    assert!(
        poll_until(DEADLINE, || Timestamp::now().as_second() > attempted).await,
        "the clock moved on"
    );
    for _ in 0..5 {
        let r = w
            .sync(&inputs, &Snapshot::default(), &[])
            .await
            .expect("sync");
        assert_eq!((r.deferred, r.failed), (1, 0), "{r:?}");
    }
    let policy_patches = || {
        fake.requests()
            .iter()
            .filter(|r| r.verb == "patch" && r.resource == "ratelimitpolicies")
            .count()
    };
    assert_eq!(policy_patches(), 1);
    // RBAC fixed: the retry, when due, says when the transition happened: at the first try.
    fake.allow("patch", "ratelimitpolicies", "shop");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let r = w
            .sync(&inputs, &Snapshot::default(), &[])
            .await
            .expect("sync");
        if r.policies_written == 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never retried");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(policy_patches(), 2);
    let c = accepted(&fake, "p");
    assert_eq!(c["status"], "True");
    let at: Timestamp = c["lastTransitionTime"]
        .as_str()
        .expect("time")
        .parse()
        .expect("RFC 3339");
    assert!(at.as_second() <= attempted, "{at} is the retry's time");
}

/// An Ingress another controller claims is its controller's, even when its status carries our
/// address (a shared load balancer, or it was ours before): it is never written, so two
/// controllers never take turns rewriting it, and the other controller's entries are never
/// wiped. An unserved Ingress nobody claims loses our address.
#[tokio::test]
async fn another_controllers_status_is_left_alone_even_with_our_address() {
    let fake = FakeApi::start().await;
    for (name, class, addrs) in [
        (
            "foreign",
            "nginx",
            json!([{"ip": "10.0.0.7"}, {"ip": "10.9.9.9"}]),
        ),
        ("dropped", "portico", json!([{"ip": "10.0.0.7"}])),
        // A class nobody defines: nobody's, so our stale address goes.
        ("orphaned", "gone", json!([{"ip": "10.0.0.7"}])),
    ] {
        let created = fake.create(ingress_json(name, class)).expect("create");
        let mut with_status = created;
        with_status["status"] = json!({"loadBalancer": {"ingress": addrs}});
        fake.update_status(with_status).expect("status");
    }
    let inputs = Inputs {
        ingresses: ingresses(&fake).await,
        ingress_classes: vec![Arc::new(nginx_class())],
        ..Inputs::default()
    };
    let mut writer = StatusWriter::new(
        fake.client().await,
        PublishAddress::Static(vec!["10.0.0.7".into()]),
    )
    .with_class("portico", "portico.dev/ingress-controller");
    // Nothing served: ours and the orphan are cleared, ingress-nginx's is untouched.
    let r = writer
        .sync(&inputs, &Snapshot::default(), &[])
        .await
        .expect("sync");
    assert_eq!((r.ingresses_cleared, r.failed), (2, 0));
    assert_eq!(lb(&fake, "dropped"), json!([]));
    assert_eq!(lb(&fake, "orphaned"), json!([]));
    assert_eq!(
        lb(&fake, "foreign"),
        json!([{"ip": "10.0.0.7"}, {"ip": "10.9.9.9"}])
    );
    assert_eq!(status_patches(&fake), 2);
}

/// A policy attached to another controller's Ingress is that controller's to report on: ours
/// would write `Accepted=False` (TargetNotServed) where the other writes `True`, in turn.
/// A policy whose target nobody claims still gets our answer.
#[tokio::test]
async fn a_policy_on_another_controllers_ingress_is_left_alone() {
    let fake = FakeApi::start().await;
    fake.create(ingress_json("foreign", "nginx"))
        .expect("create");
    fake.create(ingress_json("orphaned", "gone"))
        .expect("create");
    for (name, target) in [("theirs", "foreign"), ("nobodys", "orphaned")] {
        let mut p = policy_json(name);
        p["spec"]["targetRef"]["name"] = json!(target);
        fake.create(p).expect("create policy");
    }
    let inputs = Inputs {
        ingresses: ingresses(&fake).await,
        ingress_classes: vec![Arc::new(nginx_class())],
        rate_limit_policies: policies(&fake).await,
        ..Inputs::default()
    };
    let (_, diagnostics) = translate::translate(&inputs, &Options::default());
    let mut writer = StatusWriter::new(fake.client().await, PublishAddress::None)
        .with_class("portico", "portico.dev/ingress-controller");
    let r = writer
        .sync(&inputs, &Snapshot::default(), &diagnostics)
        .await
        .expect("sync");
    assert_eq!((r.policies_written, r.failed), (1, 0));
    let nobodys = accepted(&fake, "nobodys");
    assert_eq!(nobodys["status"], "False");
    assert_eq!(nobodys["reason"], "TargetNotServed");
    let theirs = fake
        .get("portico.dev/v1alpha1", "RateLimitPolicy", "shop", "theirs")
        .expect("policy");
    assert!(theirs.pointer("/status/conditions").is_none(), "{theirs}");
}

/// ingress-nginx's IngressClass.
fn nginx_class() -> k8s_openapi::api::networking::v1::IngressClass {
    serde_json::from_value(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
        "metadata": {"name": "nginx"}, "spec": {"controller": "k8s.io/ingress-nginx"}
    }))
    .expect("class")
}
