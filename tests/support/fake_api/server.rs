//! HTTP front of the fake API server: the accept loop (with the refuse-connections fault), URL
//! routing per the Kubernetes API layout (`/api/v1/...`, `/apis/{group}/{version}/...`), query
//! parameters, bearer-token auth, JSON `Status` errors and the chunked watch stream. Owns no
//! state of its own beyond the socket; everything goes through the store's lock.

use super::selector::{FieldSelector, LabelSelector};
use super::store::{
    ApiError, ApplyOptions, Filter, ListPage, RequestRecord, State, WatchRequest, WatchStart,
    name_of, namespace_of,
};
use bytes::Bytes;
use futures_util::StreamExt;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::Instant;

pub type Body = UnsyncBoxBody<Bytes, Infallible>;

/// What the accept loop and every request share.
pub struct Shared {
    pub state: Mutex<State>,
    pub token: String,
    /// Fault: while set, accepted sockets are closed at once.
    pub refusing: AtomicBool,
    /// How many connections the refuse fault has closed.
    pub refused: AtomicUsize,
    /// Bumped to cut every open connection (and so every watch stream) at once.
    pub kill: tokio::sync::watch::Sender<u64>,
    pub bookmark_interval: Duration,
    /// Server default when a watch has no `timeoutSeconds` (the real server picks 30–60 min).
    pub default_watch_timeout: Duration,
    /// Fault: requests to leave unanswered (see [`Stall`]).
    pub stalls: Mutex<Vec<Stall>>,
    /// Fault: (verb, resource, namespace) the caller has no RBAC permission for: 403.
    pub forbidden: Mutex<Vec<(String, String, String)>>,
    /// When the server started; [`RequestRecord::at`] counts from here.
    pub started: Instant,
}

/// How a stalled request is left hanging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StallMode {
    /// No response at all, like a black-holed connection.
    Head,
    /// A 200 head and the start of the body, then nothing more.
    Body,
    /// Answered normally after this long, from the state at that time (a request queued by
    /// the server, e.g. by API Priority and Fairness).
    Delay(std::time::Duration),
}

/// Fault: the next `remaining` requests with this verb and resource are never completed.
#[derive(Debug, Clone)]
pub struct Stall {
    pub verb: String,
    pub resource: String,
    pub mode: StallMode,
    pub remaining: usize,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock poisons it; the state is still consistent for the
        // fake's purposes (every mutation completes before emit), so keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Serves until the owning `FakeApi` aborts this task.
pub async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            Err(_) => {
                // Transient (e.g. ECONNABORTED); let other tasks run before accepting again.
                tokio::task::yield_now().await;
                continue;
            }
        };
        // Subscribe before looking at `refusing`: `refuse_connections` sets `refusing` and
        // then bumps `kill`, so a connection either sees the flag here or is cut by the bump.
        // (Subscribed after the check, a refusal landing between the two would leave this
        // connection serving right through the outage.)
        let mut kill = shared.kill.subscribe();
        if shared.refusing.load(Ordering::SeqCst) {
            // The client sees its connection closed before any response, like a restarting
            // apiserver behind a load balancer.
            drop(sock);
            shared.refused.fetch_add(1, Ordering::SeqCst);
            continue;
        }
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| handle(shared.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(sock), svc);
            // Kill first: a connection whose task first runs after a refusal must not serve
            // a request it already has buffered.
            tokio::select! {
                biased;
                _ = kill.changed() => {}
                _ = conn => {}
            }
        });
    }
}

/// Consumes one matching [`Stall`], if any.
fn take_stall(shared: &Shared, verb: &str, resource: &str) -> Option<StallMode> {
    let mut stalls = shared.stalls.lock().unwrap_or_else(|p| p.into_inner());
    let s = stalls
        .iter_mut()
        .find(|s| s.remaining > 0 && s.verb == verb && s.resource == resource)?;
    s.remaining -= 1;
    Some(s.mode)
}

/// The never-completed answer of a stalled request.
async fn stalled(mode: StallMode) -> Response<Body> {
    match mode {
        // `Delay` is answered by the caller; never left hanging.
        StallMode::Head | StallMode::Delay(_) => std::future::pending().await,
        StallMode::Body => {
            let start = Bytes::from_static(b"{\"kind\":\"List\",\"apiVersion\":\"v1\",\"items\":[");
            let frames = futures_util::stream::iter([Ok::<_, Infallible>(Frame::data(start))])
                .chain(futures_util::stream::pending());
            let mut resp = Response::new(StreamBody::new(frames).boxed_unsync());
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            resp
        }
    }
}

fn full(code: u16, v: &Value) -> Response<Body> {
    let mut body = serde_json::to_vec(v).unwrap_or_default();
    body.push(b'\n');
    let mut resp = Response::new(Full::new(Bytes::from(body)).boxed_unsync());
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    Ok(match route(&shared, req).await {
        Ok(r) => r,
        Err(e) => full(e.code(), &e.status()),
    })
}

fn parse_query(q: Option<&str>) -> HashMap<String, String> {
    let mut m = HashMap::new();
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let dec = |s: &str| {
            let s = s.replace('+', " ");
            percent_encoding::percent_decode_str(&s)
                .decode_utf8_lossy()
                .into_owned()
        };
        m.insert(dec(k), dec(v));
    }
    m
}

/// A resolved request target.
struct Target {
    ty: usize,
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn resolve(state: &State, path: &str) -> Result<Target, ApiError> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(ApiError::NoRoute),
    };
    let namespaced_plural = |p: &str| {
        state
            .find_type(group, version, p)
            .filter(|&i| state.ty(i).namespaced)
    };
    let (namespace, plural, tail): (Option<&str>, &str, &[&str]) = match rest {
        ["namespaces", ns, plural, tail @ ..] if namespaced_plural(plural).is_some() => {
            (Some(ns), plural, tail)
        }
        [plural, tail @ ..] => (None, plural, tail),
        [] => return Err(ApiError::NoRoute),
    };
    let ty = state
        .find_type(group, version, plural)
        .ok_or(ApiError::NoRoute)?;
    let (name, status) = match tail {
        [] => (None, false),
        [name] => (Some(name.to_string()), false),
        [name, "status"] if state.ty(ty).status_subresource => (Some(name.to_string()), true),
        _ => return Err(ApiError::NoRoute),
    };
    let t = state.ty(ty);
    if (!t.namespaced && namespace.is_some())
        || (t.namespaced && namespace.is_none() && name.is_some())
    {
        return Err(ApiError::NoRoute);
    }
    Ok(Target {
        ty,
        namespace: namespace.map(str::to_string),
        name,
        status,
    })
}

fn filter_from(q: &HashMap<String, String>, namespace: Option<String>) -> Result<Filter, ApiError> {
    let labels = LabelSelector::parse(q.get("labelSelector").map(String::as_str).unwrap_or(""))
        .map_err(|e| ApiError::BadRequest(format!("unable to parse labelSelector: {e}")))?;
    let fields = FieldSelector::parse(q.get("fieldSelector").map(String::as_str).unwrap_or(""))
        .map_err(|e| ApiError::BadRequest(format!("unable to parse fieldSelector: {e}")))?;
    Ok(Filter {
        namespace,
        labels,
        fields,
    })
}

fn parse_rv(s: &str) -> Result<u64, ApiError> {
    s.parse()
        .map_err(|_| ApiError::BadRequest(format!("invalid resource version {s:?}")))
}

fn truthy(q: &HashMap<String, String>, k: &str) -> bool {
    q.get(k).is_some_and(|v| v == "true" || v == "1")
}

async fn route(shared: &Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    // Readable without credentials, like the apiserver's system:public-info-viewer role.
    if let Some(resp) = non_resource(req.uri().path()) {
        return Ok(resp);
    }
    let want = format!("Bearer {}", shared.token);
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok());
    if auth != Some(want.as_str()) {
        return Err(ApiError::Unauthorized);
    }
    let q = parse_query(req.uri().query());
    let method = req.method().clone();
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|h| h.to_str().ok())
        .map(|s| s.split(';').next().unwrap_or("").trim().to_string());
    let target = resolve(&shared.lock(), req.uri().path())?;
    let watch = truthy(&q, "watch");
    let verb = match (&method, target.name.is_some()) {
        (&Method::GET, _) if watch => "watch",
        (&Method::GET, false) => "list",
        (&Method::GET, true) => "get",
        (&Method::POST, false) => "create",
        (&Method::PUT, true) => "update",
        (&Method::PATCH, true) => "patch",
        (&Method::DELETE, true) => "delete",
        (&Method::DELETE, false) => "deletecollection",
        _ => return Err(ApiError::MethodNotAllowed),
    };
    let body = req
        .into_body()
        .collect()
        .await
        .map_err(|e| ApiError::BadRequest(format!("reading body: {e}")))?
        .to_bytes();
    let stall = {
        let mut state = shared.lock();
        let resource = state.ty(target.ty).plural.clone();
        let stall = take_stall(shared, verb, &resource);
        state.requests.push(RequestRecord {
            verb: verb.into(),
            resource,
            subresource: target.status.then(|| "status".to_string()),
            namespace: target.namespace.clone(),
            name: target.name.clone(),
            field_manager: q.get("fieldManager").cloned(),
            content_type: content_type.clone(),
            at: shared.started.elapsed(),
            stalled: stall,
        });
        stall
    };
    match stall {
        Some(StallMode::Delay(d)) => tokio::time::sleep(d).await,
        Some(mode) => return Ok(stalled(mode).await),
        None => {}
    }
    {
        let state = shared.lock();
        let resource = state.ty(target.ty).plural.clone();
        let ns = target.namespace.clone().unwrap_or_default();
        let denied = shared
            .forbidden
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|(v, r, n)| v == verb && *r == resource && *n == ns);
        if denied {
            // As the real server words an RBAC denial.
            return Err(ApiError::Forbidden(format!(
                "{resource} is forbidden: User \"system:serviceaccount:test:portico\" cannot {verb} resource \"{resource}\" in the namespace \"{ns}\""
            )));
        }
    }
    let mut state = shared.lock();
    if q.get("dryRun").is_some_and(|d| !d.is_empty()) && !matches!(verb, "get" | "list" | "watch") {
        // Loud rather than silently persisting a dry run.
        return Err(ApiError::BadRequest(
            "dryRun is not supported by the fake API server".into(),
        ));
    }
    let ns = target.namespace.clone().unwrap_or_default();
    let name = target.name.clone().unwrap_or_default();
    let json_body = || -> Result<Value, ApiError> {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
    };
    match verb {
        "watch" => {
            let mut filter = filter_from(&q, target.namespace.clone())?;
            if let Some(n) = &target.name {
                // Watch on a single object: the same as adding fieldSelector metadata.name=<name>.
                let sel = match q.get("fieldSelector").filter(|s| !s.is_empty()) {
                    Some(s) => format!("{s},metadata.name={n}"),
                    None => format!("metadata.name={n}"),
                };
                filter.fields = FieldSelector::parse(&sel)
                    .map_err(|e| ApiError::BadRequest(format!("unable to parse fieldSelector: {e}")))?;
            }
            let rv = q.get("resourceVersion").map(String::as_str).unwrap_or("");
            let send_initial_events = truthy(&q, "sendInitialEvents");
            let bookmarks = truthy(&q, "allowWatchBookmarks");
            // Streaming-list parameter rules (API concepts, "Streaming lists").
            let rv_match = q.get("resourceVersionMatch").map(String::as_str).unwrap_or("");
            if send_initial_events && rv_match != "NotOlderThan" {
                return Err(ApiError::Invalid(
                    "sendInitialEvents is forbidden unless resourceVersionMatch is NotOlderThan".into(),
                ));
            }
            if send_initial_events && !bookmarks {
                return Err(ApiError::Invalid(
                    "sendInitialEvents requires allowWatchBookmarks=true".into(),
                ));
            }
            if !send_initial_events && !rv_match.is_empty() {
                return Err(ApiError::Invalid(
                    "resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided".into(),
                ));
            }
            let start = match rv {
                "" | "0" => WatchStart::Current,
                _ if send_initial_events => WatchStart::Current,
                n => WatchStart::After(parse_rv(n)?),
            };
            let timeout = match q.get("timeoutSeconds") {
                Some(s) => Duration::from_secs(
                    s.parse()
                        .map_err(|_| ApiError::BadRequest(format!("invalid timeoutSeconds {s:?}")))?,
                ),
                None => shared.default_watch_timeout,
            };
            let (id, rx) = state.watch(WatchRequest {
                ty: target.ty,
                filter,
                start,
                bookmarks,
                send_initial_events,
            });
            drop(state);
            Ok(watch_response(shared.clone(), id, rx, timeout, bookmarks))
        }
        "list" => {
            let filter = filter_from(&q, target.namespace.clone())?;
            let limit = match q.get("limit") {
                Some(l) => Some(
                    l.parse::<usize>()
                        .map_err(|_| ApiError::BadRequest(format!("invalid limit {l:?}")))?,
                ),
                None => None,
            };
            let cont = q.get("continue").filter(|c| !c.is_empty());
            let rv = q.get("resourceVersion").map(String::as_str).unwrap_or("");
            let rv_match = q.get("resourceVersionMatch").map(String::as_str).unwrap_or("");
            if cont.is_some() && !rv.is_empty() && rv != "0" {
                return Err(ApiError::BadRequest(
                    "specifying resource version is not allowed when using continue".into(),
                ));
            }
            if !rv_match.is_empty() && rv.is_empty() {
                return Err(ApiError::Invalid(
                    "resourceVersionMatch is forbidden unless resourceVersion is provided".into(),
                ));
            }
            let exact = match rv_match {
                "" | "NotOlderThan" => None,
                "Exact" if rv == "0" => {
                    return Err(ApiError::Invalid(
                        "resourceVersionMatch \"Exact\" is forbidden for resourceVersion \"0\"".into(),
                    ));
                }
                "Exact" => Some(parse_rv(rv)?),
                other => {
                    return Err(ApiError::Invalid(format!(
                        "unsupported resourceVersionMatch {other:?}"
                    )));
                }
            };
            if !matches!(rv, "" | "0") && parse_rv(rv)? > state.resource_version() {
                return Err(ApiError::TooLargeResourceVersion(rv.to_string()));
            }
            let page = state.list(target.ty, &filter, limit, cont.map(String::as_str), exact)?;
            Ok(full(200, &list_body(&state, target.ty, page)))
        }
        "get" => Ok(full(200, &state.get(target.ty, &ns, &name)?)),
        "create" => {
            let obj = json_body()?;
            Ok(full(201, &state.create(target.ty, &ns, obj)?))
        }
        "update" => {
            let obj = json_body()?;
            Ok(full(200, &state.update(target.ty, &ns, &name, obj, target.status)?))
        }
        "patch" => match content_type.as_deref().unwrap_or("") {
            // Strategic merge patch is served as JSON merge patch: for the fake's kinds the
            // difference is only list merge keys (e.g. Ingress `rules` would merge by host).
            "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
                let p = json_body()?;
                Ok(full(200, &state.merge_patch(target.ty, &ns, &name, &p, target.status)?))
            }
            "application/json-patch+json" => {
                let ops = json_body()?;
                Ok(full(200, &state.json_patch(target.ty, &ns, &name, &ops, target.status)?))
            }
            "application/apply-patch+yaml" => {
                // JSON is YAML; kube sends JSON, kubectl sends YAML.
                let applied: Value = serde_json::from_slice(&body).or_else(|_| {
                    let text = String::from_utf8_lossy(&body);
                    serde_saphyr::from_str::<Value>(&text)
                        .map_err(|e| ApiError::BadRequest(format!("invalid apply body: {e}")))
                })?;
                let existed = state.get(target.ty, &ns, &name).is_ok();
                let out = state.apply(
                    target.ty,
                    &ns,
                    &name,
                    &applied,
                    ApplyOptions {
                        field_manager: q.get("fieldManager").map(String::as_str),
                        force: truthy(&q, "force"),
                        status: target.status,
                    },
                )?;
                Ok(full(if existed { 200 } else { 201 }, &out))
            }
            _ => Err(ApiError::UnsupportedMediaType(
                "application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json, application/apply-patch+yaml".into(),
            )),
        },
        "deletecollection" => {
            let filter = filter_from(&q, target.namespace.clone())?;
            let page = state.list(target.ty, &filter, None, None, None)?;
            let mut deleted = Vec::new();
            for obj in &page.items {
                let (ons, oname) = (namespace_of(obj).to_string(), name_of(obj).to_string());
                deleted.push(state.delete(target.ty, &ons, &oname, None, None)?);
            }
            let page = ListPage {
                items: deleted,
                resource_version: state.resource_version(),
                continue_token: None,
                remaining: None,
            };
            Ok(full(200, &list_body(&state, target.ty, page)))
        }
        "delete" => {
            let opts: Value = if body.is_empty() {
                Value::Null
            } else {
                json_body()?
            };
            let pre_rv = opts.pointer("/preconditions/resourceVersion").and_then(Value::as_str);
            let pre_uid = opts.pointer("/preconditions/uid").and_then(Value::as_str);
            Ok(full(200, &state.delete(target.ty, &ns, &name, pre_rv, pre_uid)?))
        }
        _ => Err(ApiError::MethodNotAllowed),
    }
}

/// Non-resource endpoints a client may probe: `/version` and the health checks.
fn non_resource(path: &str) -> Option<Response<Body>> {
    match path {
        "/version" => Some(full(
            200,
            &json!({"major": "1", "minor": "34", "gitVersion": "v1.34.0-fake", "platform": "linux/amd64"}),
        )),
        "/healthz" | "/livez" | "/readyz" => {
            let mut resp = Response::new(Full::new(Bytes::from_static(b"ok")).boxed_unsync());
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            Some(resp)
        }
        _ => None,
    }
}

/// `kind: <Kind>List`. Items of built-in types omit apiVersion/kind, as the real server's
/// typed JSON encoding does; custom resources keep them (unstructured encoding).
fn list_body(state: &State, ty: usize, page: ListPage) -> Value {
    let t = state.ty(ty);
    let items: Vec<Value> = page
        .items
        .into_iter()
        .map(|mut o| {
            if !t.custom
                && let Some(m) = o.as_object_mut()
            {
                m.remove("apiVersion");
                m.remove("kind");
            }
            o
        })
        .collect();
    let mut meta = json!({"resourceVersion": page.resource_version.to_string()});
    if let Some(c) = page.continue_token {
        meta["continue"] = json!(c);
    }
    if let Some(r) = page.remaining {
        meta["remainingItemCount"] = json!(r);
    }
    json!({"kind": format!("{}List", t.kind), "apiVersion": t.api_version(), "metadata": meta, "items": items})
}

struct WatchState {
    shared: Arc<Shared>,
    id: u64,
    rx: mpsc::UnboundedReceiver<Value>,
    deadline: Instant,
    tick: Option<tokio::time::Interval>,
}

async fn next_tick(t: &mut Option<tokio::time::Interval>) {
    match t {
        Some(i) => {
            i.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// The watch body: one JSON event per line, each its own chunk, flushed as it happens;
/// ends at `timeoutSeconds` or when the server drops the watch.
fn watch_response(
    shared: Arc<Shared>,
    id: u64,
    rx: mpsc::UnboundedReceiver<Value>,
    timeout: Duration,
    bookmarks: bool,
) -> Response<Body> {
    let period = shared.bookmark_interval;
    let tick = bookmarks.then(|| {
        let mut i = tokio::time::interval_at(Instant::now() + period, period);
        // One bookmark per missed period is noise; a late one is enough.
        i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        i
    });
    let ws = WatchState {
        shared,
        id,
        rx,
        deadline: Instant::now() + timeout,
        tick,
    };
    let stream = futures_util::stream::unfold(ws, |mut ws| async move {
        // Bounded by the deadline: every turn either yields, ends, or queues a bookmark.
        loop {
            tokio::select! {
                biased;
                msg = ws.rx.recv() => {
                    let msg = msg?;
                    let mut line = serde_json::to_vec(&msg).unwrap_or_default();
                    line.push(b'\n');
                    return Some((Ok::<_, Infallible>(Frame::data(Bytes::from(line))), ws));
                }
                _ = tokio::time::sleep_until(ws.deadline) => return None,
                _ = next_tick(&mut ws.tick) => {
                    // Queued through the store so it is ordered after every event already sent.
                    if !ws.shared.lock().send_bookmark(ws.id) {
                        ws.tick = None;
                    }
                }
            }
        }
    })
    .boxed();
    let mut resp = Response::new(StreamBody::new(stream).boxed_unsync());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}
