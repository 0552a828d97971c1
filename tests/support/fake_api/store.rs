//! The fake API server's state: objects per registered type, one global resourceVersion
//! counter (like etcd's revision), the event history, and watcher fan-out, all behind one lock
//! so that a list snapshot and a watch subscription can never miss or reorder an event. Shared by
//! the HTTP front (server.rs) and the in-process test API. Must not import hyper.

use super::patch::{self, Apply, PatchError};
use super::selector::{FieldSelector, LabelSelector};
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, HashMap, VecDeque};
use tokio::sync::mpsc;

/// One registered resource type: (group, version, kind, plural, scope) plus behaviour flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceType {
    pub group: String,
    pub version: String,
    pub kind: String,
    pub plural: String,
    pub namespaced: bool,
    /// Has a `/status` subresource: main-resource writes keep the stored status and `/status`
    /// writes change only status (Kubernetes API conventions, "spec and status").
    pub status_subresource: bool,
    /// Served like a CustomResourceDefinition: list items carry apiVersion/kind (unstructured
    /// encoding); built-in types' list items omit them, as the real server's typed encoder does.
    pub custom: bool,
    /// Sets `metadata.generation` (1 on create, +1 per spec change). The apiserver's registry
    /// strategies do this per type: Ingress, IngressClass, EndpointSlice and every custom
    /// resource do; Service, Secret, Namespace, Lease and Event leave it unset.
    pub generation: bool,
}

impl ResourceType {
    pub fn new(group: &str, version: &str, kind: &str, plural: &str, namespaced: bool) -> Self {
        ResourceType {
            group: group.into(),
            version: version.into(),
            kind: kind.into(),
            plural: plural.into(),
            namespaced,
            status_subresource: false,
            custom: false,
            generation: true,
        }
    }

    pub fn with_status(mut self) -> Self {
        self.status_subresource = true;
        self
    }

    pub fn custom(mut self) -> Self {
        self.custom = true;
        self
    }

    pub fn without_generation(mut self) -> Self {
        self.generation = false;
        self
    }

    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `ingresses.networking.k8s.io`, or `services` for the core group: how Status messages
    /// name a resource.
    pub fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

/// API errors, rendered as `Status` objects (API conventions, "Response Status Kind").
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("Unauthorized")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("{resource} \"{name}\" not found")]
    NotFound { resource: String, name: String },
    #[error("the server could not find the requested resource")]
    NoRoute,
    #[error("{resource} \"{name}\" already exists")]
    AlreadyExists { resource: String, name: String },
    #[error("Operation cannot be fulfilled on {resource} \"{name}\": {detail}")]
    Conflict {
        resource: String,
        name: String,
        detail: String,
    },
    #[error("{0}")]
    ApplyConflict(String),
    #[error("{0}")]
    Expired(String),
    #[error("{0}")]
    Invalid(String),
    /// A list at a resourceVersion the server has not reached (the real server waits, then
    /// answers 504; kube retries 504 by default).
    #[error("Too large resource version: {0}")]
    TooLargeResourceVersion(String),
    #[error("the server does not allow this method on the requested resource")]
    MethodNotAllowed,
    #[error("the body of the request was in an unknown format - accepted media types include: {0}")]
    UnsupportedMediaType(String),
}

impl ApiError {
    pub fn code(&self) -> u16 {
        match self {
            ApiError::BadRequest(_) => 400,
            ApiError::Unauthorized => 401,
            ApiError::Forbidden(_) => 403,
            ApiError::NotFound { .. } | ApiError::NoRoute => 404,
            ApiError::MethodNotAllowed => 405,
            ApiError::AlreadyExists { .. }
            | ApiError::Conflict { .. }
            | ApiError::ApplyConflict(_) => 409,
            ApiError::Expired(_) => 410,
            ApiError::UnsupportedMediaType(_) => 415,
            ApiError::Invalid(_) => 422,
            ApiError::TooLargeResourceVersion(_) => 504,
        }
    }

    pub fn reason(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "BadRequest",
            ApiError::Unauthorized => "Unauthorized",
            ApiError::Forbidden(_) => "Forbidden",
            ApiError::NotFound { .. } | ApiError::NoRoute => "NotFound",
            ApiError::MethodNotAllowed => "MethodNotAllowed",
            ApiError::AlreadyExists { .. } => "AlreadyExists",
            ApiError::Conflict { .. } | ApiError::ApplyConflict(_) => "Conflict",
            ApiError::Expired(_) => "Expired",
            ApiError::UnsupportedMediaType(_) => "UnsupportedMediaType",
            ApiError::Invalid(_) => "Invalid",
            ApiError::TooLargeResourceVersion(_) => "Timeout",
        }
    }

    /// The `Status` object (kind Status, apiVersion v1, status Failure).
    pub fn status(&self) -> Value {
        let mut s = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.to_string(),
            "reason": self.reason(),
            "code": self.code(),
        });
        match self {
            ApiError::NotFound { resource, name }
            | ApiError::AlreadyExists { resource, name }
            | ApiError::Conflict { resource, name, .. } => {
                let (kind, group) = resource.split_once('.').unwrap_or((resource, ""));
                s["details"] = json!({"name": name, "group": group, "kind": kind});
            }
            _ => {}
        }
        s
    }
}

pub type Result<T, E = ApiError> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

#[derive(Debug, Clone)]
struct HistEvent {
    rv: u64,
    ty: usize,
    kind: EventType,
    /// The new state (for Deleted: the last state, carrying the deletion's resourceVersion).
    obj: Value,
    /// The state before this event (None for Added).
    prev: Option<Value>,
}

/// Which objects a list or watch sees: URL namespace plus selectors.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub namespace: Option<String>,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl Filter {
    pub fn matches(&self, obj: &Value) -> bool {
        let ns_ok = self
            .namespace
            .as_deref()
            .is_none_or(|ns| namespace_of(obj) == ns);
        ns_ok && self.labels.matches(obj) && self.fields.matches(obj)
    }
}

/// Where a watch starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchStart {
    /// `resourceVersion` unset, "" or "0": synthetic ADDED for the current state, then live
    /// ("Get State and Start at Most Recent" / "Start at Any").
    Current,
    /// Every event after this resourceVersion, in order, then live.
    After(u64),
}

#[derive(Debug, Clone)]
pub struct WatchRequest {
    pub ty: usize,
    pub filter: Filter,
    pub start: WatchStart,
    pub bookmarks: bool,
    /// `sendInitialEvents=true`: end the synthetic initial events with a BOOKMARK annotated
    /// `k8s.io/initial-events-end: "true"` (streaming lists, KEP-3157).
    pub send_initial_events: bool,
}

struct Watcher {
    id: u64,
    ty: usize,
    filter: Filter,
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Value>,
}

/// One request the HTTP front served, for assertions ("no event storm", "one status writer").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestRecord {
    /// Kubernetes verb: get, list, watch, create, update, patch, delete.
    pub verb: String,
    pub resource: String,
    pub subresource: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub field_manager: Option<String>,
    pub content_type: Option<String>,
    /// When it arrived, from the server's start.
    pub at: std::time::Duration,
    /// Left unanswered by a stall fault.
    pub stalled: Option<super::server::StallMode>,
}

/// Query parameters of an apply request.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApplyOptions<'a> {
    /// `fieldManager`: required for apply.
    pub field_manager: Option<&'a str>,
    /// `force=true`: take ownership of conflicting fields.
    pub force: bool,
    /// Applied to the `/status` subresource.
    pub status: bool,
}

/// A page of a list.
#[derive(Debug, Clone)]
pub struct ListPage {
    pub items: Vec<Value>,
    pub resource_version: u64,
    pub continue_token: Option<String>,
    pub remaining: Option<usize>,
}

pub fn name_of(v: &Value) -> &str {
    v.pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("")
}

pub fn namespace_of(v: &Value) -> &str {
    v.pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("")
}

fn rv_of(v: &Value) -> Option<&str> {
    v.pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

fn now_rfc3339() -> String {
    let now = k8s_openapi::jiff::Timestamp::now();
    k8s_openapi::jiff::Timestamp::from_second(now.as_second())
        .unwrap_or(now)
        .to_string()
}

/// Runs `f` on `obj.metadata`, creating it when missing; a non-object `obj` is left alone
/// (callers validate shape first), so this never panics.
fn with_meta(obj: &mut Value, f: impl FnOnce(&mut Map<String, Value>)) {
    let Value::Object(root) = obj else { return };
    let meta = root.entry("metadata").or_insert_with(|| json!({}));
    if !meta.is_object() {
        *meta = json!({});
    }
    if let Value::Object(m) = meta {
        f(m);
    }
}

/// Continue tokens: hex of `rv:namespace/name` (the last key served). The real server's token
/// is opaque base64 JSON of the same two facts; clients must treat it as opaque either way.
fn encode_continue(rv: u64, ns: &str, name: &str) -> String {
    format!("{rv}:{ns}/{name}")
        .bytes()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn decode_continue(tok: &str) -> Option<(u64, String, String)> {
    if !tok.len().is_multiple_of(2) || !tok.is_ascii() {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..tok.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&tok[i..i + 2], 16).ok())
        .collect();
    let s = String::from_utf8(bytes?).ok()?;
    let (rv, key) = s.split_once(':')?;
    let (ns, name) = key.split_once('/')?;
    Some((rv.parse().ok()?, ns.to_string(), name.to_string()))
}

/// The single-lock state.
pub struct State {
    types: Vec<ResourceType>,
    objects: Vec<BTreeMap<(String, String), Value>>,
    rv: u64,
    history: VecDeque<HistEvent>,
    /// History holds every event with rv > compacted.
    compacted: u64,
    watchers: Vec<Watcher>,
    next_watcher: u64,
    rng: u64,
    pub(crate) requests: Vec<RequestRecord>,
}

impl State {
    pub fn new(types: Vec<ResourceType>) -> Self {
        let objects = types.iter().map(|_| BTreeMap::new()).collect();
        State {
            types,
            objects,
            // Start above zero so "0" keeps its special "any version" meaning.
            rv: 1,
            history: VecDeque::new(),
            compacted: 1,
            watchers: Vec::new(),
            next_watcher: 0,
            rng: 0x9e37_79b9_7f4a_7c15,
            requests: Vec::new(),
        }
    }

    pub fn types(&self) -> &[ResourceType] {
        &self.types
    }

    pub fn ty(&self, i: usize) -> &ResourceType {
        &self.types[i]
    }

    /// The server's current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    pub fn find_type(&self, group: &str, version: &str, plural: &str) -> Option<usize> {
        self.types
            .iter()
            .position(|t| t.group == group && t.version == version && t.plural == plural)
    }

    pub fn type_of_object(&self, obj: &Value) -> Result<usize> {
        let av = obj.get("apiVersion").and_then(Value::as_str).unwrap_or("");
        let kind = obj.get("kind").and_then(Value::as_str).unwrap_or("");
        self.types
            .iter()
            .position(|t| t.api_version() == av && t.kind == kind)
            .ok_or_else(|| ApiError::BadRequest(format!("no type registered for {av} {kind}")))
    }

    fn next_rand(&mut self) -> u64 {
        // xorshift64*: only uniqueness matters (uids, generateName suffixes).
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn uid(&mut self) -> String {
        let a = self.next_rand();
        let b = self.next_rand();
        format!(
            "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            b >> 52,
            b & 0xffff_ffff_ffff
        )
    }

    fn key(&self, ty: usize, ns: &str, name: &str) -> (String, String) {
        if self.types[ty].namespaced {
            (ns.to_string(), name.to_string())
        } else {
            (String::new(), name.to_string())
        }
    }

    fn not_found(&self, ty: usize, name: &str) -> ApiError {
        ApiError::NotFound {
            resource: self.types[ty].qualified(),
            name: name.into(),
        }
    }

    fn conflict(&self, ty: usize, name: &str) -> ApiError {
        ApiError::Conflict {
            resource: self.types[ty].qualified(),
            name: name.into(),
            detail: "the object has been modified; please apply your changes to the latest version and try again".into(),
        }
    }

    /// Records an event and fans it out to matching watchers; the caller already bumped `rv`.
    fn emit(&mut self, ty: usize, kind: EventType, obj: Value, prev: Option<Value>) {
        let ev = HistEvent {
            rv: self.rv,
            ty,
            kind,
            obj,
            prev,
        };
        self.watchers.retain(|w| {
            if w.ty != ty {
                return !w.tx.is_closed();
            }
            match convert(&ev, &w.filter) {
                Some(msg) => w.tx.send(msg).is_ok(),
                None => !w.tx.is_closed(),
            }
        });
        self.history.push_back(ev);
    }

    pub fn get(&self, ty: usize, ns: &str, name: &str) -> Result<Value> {
        self.objects[ty]
            .get(&self.key(ty, ns, name))
            .cloned()
            .ok_or_else(|| self.not_found(ty, name))
    }

    /// The objects of a type as they were at `rv`, rebuilt by undoing newer history.
    fn state_at(&self, ty: usize, rv: u64) -> Result<BTreeMap<(String, String), Value>> {
        if rv < self.compacted {
            return Err(ApiError::Expired(format!(
                "too old resource version: {rv} ({})",
                self.compacted
            )));
        }
        let mut objs = self.objects[ty].clone();
        for ev in self.history.iter().rev().take_while(|e| e.rv > rv) {
            if ev.ty != ty {
                continue;
            }
            let key = (
                namespace_of(&ev.obj).to_string(),
                name_of(&ev.obj).to_string(),
            );
            let key = self.key(ty, &key.0, &key.1);
            match (&ev.kind, &ev.prev) {
                (EventType::Added, _) => {
                    objs.remove(&key);
                }
                (_, Some(prev)) => {
                    objs.insert(key, prev.clone());
                }
                (_, None) => {}
            }
        }
        Ok(objs)
    }

    /// List (API concepts, "Retrieving large results sets in chunks"): objects in key order,
    /// `limit` per page, the continue token pins the snapshot resourceVersion; an expired
    /// token is 410 Expired. `exact_rv` serves `resourceVersionMatch=Exact`.
    pub fn list(
        &self,
        ty: usize,
        filter: &Filter,
        limit: Option<usize>,
        continue_token: Option<&str>,
        exact_rv: Option<u64>,
    ) -> Result<ListPage> {
        let (snapshot_rv, start) = match continue_token {
            Some(tok) => {
                let (rv, ns, name) = decode_continue(tok).ok_or_else(|| {
                    ApiError::BadRequest(format!("invalid continue token {tok:?}"))
                })?;
                if rv < self.compacted {
                    return Err(ApiError::Expired(
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.".into(),
                    ));
                }
                (rv, Some((ns, name)))
            }
            None => (exact_rv.unwrap_or(self.rv), None),
        };
        let objs = if snapshot_rv == self.rv {
            self.objects[ty].clone()
        } else {
            self.state_at(ty, snapshot_rv)?
        };
        let mut matching = objs
            .iter()
            .filter(|(k, _)| start.as_ref().is_none_or(|s| *k > s))
            .filter(|(_, v)| filter.matches(v));
        let limit = limit.filter(|l| *l > 0).unwrap_or(usize::MAX);
        let mut items = Vec::new();
        let mut last_key = None;
        for (k, v) in matching.by_ref().take(limit) {
            items.push(v.clone());
            last_key = Some(k.clone());
        }
        let rest = matching.count();
        let continue_token = match (rest, last_key) {
            (0, _) | (_, None) => None,
            (_, Some((ns, name))) => Some(encode_continue(snapshot_rv, &ns, &name)),
        };
        let unfiltered = filter.labels.is_empty() && filter.fields.is_empty();
        Ok(ListPage {
            items,
            resource_version: snapshot_rv,
            remaining: (continue_token.is_some() && unfiltered).then_some(rest),
            continue_token,
        })
    }

    /// Opens a watch: the initial events are queued under this same lock, so nothing is
    /// missed or reordered between them and live events.
    pub fn watch(&mut self, req: WatchRequest) -> (u64, mpsc::UnboundedReceiver<Value>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = self.next_watcher;
        self.next_watcher += 1;
        match req.start {
            WatchStart::Current => {
                for obj in self.objects[req.ty]
                    .values()
                    .filter(|o| req.filter.matches(o))
                {
                    let _ = tx.send(json!({"type": "ADDED", "object": obj}));
                }
                if req.send_initial_events && req.bookmarks {
                    let mut bm = self.bookmark(req.ty);
                    bm["object"]["metadata"]["annotations"] =
                        json!({"k8s.io/initial-events-end": "true"});
                    let _ = tx.send(bm);
                }
            }
            WatchStart::After(rv) if rv < self.compacted => {
                // In-stream ERROR, then the stream ends (API concepts, "410 Gone responses"):
                // the watcher is not registered, so dropping `tx` closes the stream.
                let err = ApiError::Expired(format!(
                    "too old resource version: {rv} ({})",
                    self.compacted
                ));
                let _ = tx.send(json!({"type": "ERROR", "object": err.status()}));
                return (id, rx);
            }
            WatchStart::After(rv) => {
                for ev in self.history.iter().filter(|e| e.rv > rv && e.ty == req.ty) {
                    if let Some(msg) = convert(ev, &req.filter) {
                        let _ = tx.send(msg);
                    }
                }
            }
        }
        self.watchers.push(Watcher {
            id,
            ty: req.ty,
            filter: req.filter,
            bookmarks: req.bookmarks,
            tx,
        });
        (id, rx)
    }

    fn bookmark(&self, ty: usize) -> Value {
        let t = &self.types[ty];
        json!({"type": "BOOKMARK", "object": {
            "kind": t.kind,
            "apiVersion": t.api_version(),
            "metadata": {"resourceVersion": self.rv.to_string()},
        }})
    }

    /// Queues a BOOKMARK at the current resourceVersion on one watcher; false when it is gone.
    pub fn send_bookmark(&mut self, id: u64) -> bool {
        let Some(w) = self.watchers.iter().find(|w| w.id == id) else {
            return false;
        };
        if w.bookmarks {
            let bm = self.bookmark(w.ty);
            return w.tx.send(bm).is_ok();
        }
        !w.tx.is_closed()
    }

    /// Test hook: a BOOKMARK now on every watch that asked for bookmarks.
    pub fn bookmark_all(&mut self) {
        let marks: Vec<(usize, Value)> = self
            .watchers
            .iter()
            .enumerate()
            .filter(|(_, w)| w.bookmarks)
            .map(|(i, w)| (i, self.bookmark(w.ty)))
            .collect();
        for (i, bm) in marks {
            let _ = self.watchers[i].tx.send(bm);
        }
    }

    /// Fault: ends every open watch stream (queued events are still delivered, then EOF).
    pub fn drop_watches(&mut self) {
        self.watchers.clear();
    }

    pub fn open_watches(&self) -> usize {
        self.watchers.iter().filter(|w| !w.tx.is_closed()).count()
    }

    /// Fault: forget history up to the current resourceVersion, like etcd compaction. Watches
    /// and continue tokens from older versions then get 410 Expired.
    pub fn compact(&mut self) {
        self.compacted = self.rv;
        self.history.clear();
    }

    /// Create (POST). `ns` is the namespace from the URL ("" for cluster-scoped).
    pub fn create(&mut self, ty: usize, ns: &str, mut obj: Value) -> Result<Value> {
        let t = self.types[ty].clone();
        if !obj.is_object() {
            return Err(ApiError::BadRequest("object must be a JSON object".into()));
        }
        self.check_type_meta(ty, &obj)?;
        let body_ns = namespace_of(&obj).to_string();
        let ns = if t.namespaced {
            if ns.is_empty() {
                return Err(ApiError::MethodNotAllowed);
            }
            if !body_ns.is_empty() && body_ns != ns {
                return Err(ApiError::BadRequest(
                    "the namespace of the provided object does not match the namespace sent on the request".into(),
                ));
            }
            ns.to_string()
        } else {
            String::new()
        };
        if rv_of(&obj).is_some() {
            return Err(ApiError::BadRequest(
                "resourceVersion should not be set on objects to be created".into(),
            ));
        }
        let mut name = name_of(&obj).to_string();
        if name.is_empty() {
            let prefix = obj
                .pointer("/metadata/generateName")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            if prefix.is_empty() {
                return Err(ApiError::Invalid(format!(
                    "{} \"\" is invalid: metadata.name: Required value: name or generateName is required",
                    t.kind
                )));
            }
            // Five characters from the apiserver's alphabet (no vowels, no ambiguous digits).
            const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
            for _ in 0..16 {
                let mut r = self.next_rand();
                let suffix: String = (0..5)
                    .map(|_| {
                        let c = ALPHABET[(r % ALPHABET.len() as u64) as usize] as char;
                        r /= ALPHABET.len() as u64;
                        c
                    })
                    .collect();
                name = format!("{prefix}{suffix}");
                if !self.objects[ty].contains_key(&self.key(ty, &ns, &name)) {
                    break;
                }
            }
        }
        let key = self.key(ty, &ns, &name);
        if self.objects[ty].contains_key(&key) {
            return Err(ApiError::AlreadyExists {
                resource: t.qualified(),
                name,
            });
        }
        if t.status_subresource {
            // Create strategies of status-subresource kinds drop the status (e.g. Ingress
            // PrepareForCreate; CRDs with the status subresource enabled).
            if let Some(m) = obj.as_object_mut() {
                m.remove("status");
            }
        }
        let uid = self.uid();
        self.rv += 1;
        obj["apiVersion"] = json!(t.api_version());
        obj["kind"] = json!(t.kind);
        let rv = self.rv.to_string();
        with_meta(&mut obj, |meta| {
            meta.insert("name".into(), json!(name));
            if t.namespaced {
                meta.insert("namespace".into(), json!(ns));
            } else {
                meta.remove("namespace");
            }
            meta.insert("uid".into(), json!(uid));
            meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
            meta.insert("resourceVersion".into(), json!(rv));
            if t.generation {
                meta.insert("generation".into(), json!(1));
            } else {
                meta.remove("generation");
            }
        });
        self.objects[ty].insert(key, obj.clone());
        self.emit(ty, EventType::Added, obj.clone(), None);
        Ok(obj)
    }

    fn check_type_meta(&self, ty: usize, obj: &Value) -> Result<()> {
        let t = &self.types[ty];
        let av = obj.get("apiVersion").and_then(Value::as_str);
        let kind = obj.get("kind").and_then(Value::as_str);
        if av.is_some_and(|a| a != t.api_version()) || kind.is_some_and(|k| k != t.kind) {
            return Err(ApiError::BadRequest(format!(
                "the API version in the data ({}) does not match the expected API version ({}) or kind {} is not {}",
                av.unwrap_or(""),
                t.api_version(),
                kind.unwrap_or(""),
                t.kind
            )));
        }
        Ok(())
    }

    /// Stores `merged` as the new state of an existing object unless it changes nothing (then
    /// no event and the resourceVersion stays). Bumps `metadata.generation` when anything but
    /// metadata (and status, for status-subresource kinds) changed.
    fn commit_update(&mut self, ty: usize, old: Value, mut merged: Value) -> Value {
        let t = self.types[ty].clone();
        if let Some(m) = merged.as_object_mut() {
            m.insert("apiVersion".into(), json!(t.api_version()));
            m.insert("kind".into(), json!(t.kind));
        }
        // Server-owned metadata always comes from the stored object.
        for k in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "generation",
            "resourceVersion",
            "deletionTimestamp",
        ] {
            match old.get("metadata").and_then(|m| m.get(k)) {
                Some(v) => {
                    with_meta(&mut merged, |m| {
                        m.insert(k.into(), v.clone());
                    });
                }
                None => {
                    with_meta(&mut merged, |m| {
                        m.remove(k);
                    });
                }
            }
        }
        if merged.pointer("/metadata/managedFields").is_none()
            && let Some(mf) = old.pointer("/metadata/managedFields")
        {
            with_meta(&mut merged, |m| {
                m.insert("managedFields".into(), mf.clone());
            });
        }
        if merged == old {
            return old;
        }
        let finalized = merged.pointer("/metadata/deletionTimestamp").is_some()
            && merged
                .pointer("/metadata/finalizers")
                .and_then(Value::as_array)
                .is_none_or(Vec::is_empty);
        if finalized {
            // The update that removes the last finalizer of a deleting object deletes it:
            // watchers see one DELETED, as with the apiserver's delete-during-update.
            return self.remove(ty, merged);
        }
        let spec_of = |v: &Value| {
            let mut v = v.clone();
            if let Some(m) = v.as_object_mut() {
                m.remove("metadata");
                if t.status_subresource {
                    m.remove("status");
                }
            }
            v
        };
        if t.generation && spec_of(&merged) != spec_of(&old) {
            let generation = old
                .pointer("/metadata/generation")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            with_meta(&mut merged, |m| {
                m.insert("generation".into(), json!(generation + 1));
            });
        }
        self.rv += 1;
        with_meta(&mut merged, |m| {
            m.insert("resourceVersion".into(), json!(self.rv.to_string()));
        });
        let key = self.key(ty, namespace_of(&old), name_of(&old));
        self.objects[ty].insert(key, merged.clone());
        self.emit(ty, EventType::Modified, merged.clone(), Some(old));
        merged
    }

    /// Combines a requested new state with the stored one per subresource rules: a `/status`
    /// write takes only `.status` from the request; a main write keeps the stored status
    /// for status-subresource kinds.
    fn combine(&self, ty: usize, old: &Value, new: Value, status: bool) -> Result<Value> {
        let t = &self.types[ty];
        if status && !t.status_subresource {
            return Err(ApiError::NoRoute);
        }
        let take_status_from_old = !status && t.status_subresource;
        let mut merged = if status { old.clone() } else { new.clone() };
        let src = if take_status_from_old { old } else { &new };
        match (merged.as_object_mut(), src.get("status")) {
            (Some(m), Some(s)) if status || take_status_from_old => {
                m.insert("status".into(), s.clone());
            }
            (Some(m), None) if status || take_status_from_old => {
                m.remove("status");
            }
            _ => {}
        }
        if status && let Some(mf) = new.pointer("/metadata/managedFields") {
            with_meta(&mut merged, |m| {
                m.insert("managedFields".into(), mf.clone());
            });
        }
        Ok(merged)
    }

    /// Replace (PUT) of the main resource or `/status`. A non-empty
    /// `metadata.resourceVersion` is an optimistic-concurrency precondition (409 when stale);
    /// absent means unconditional (API conventions, "Concurrency Control and Consistency").
    pub fn update(
        &mut self,
        ty: usize,
        ns: &str,
        name: &str,
        new: Value,
        status: bool,
    ) -> Result<Value> {
        if !new.is_object() {
            return Err(ApiError::BadRequest("object must be a JSON object".into()));
        }
        self.check_type_meta(ty, &new)?;
        let body_name = name_of(&new);
        if !name.is_empty() && !body_name.is_empty() && body_name != name {
            return Err(ApiError::BadRequest(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let name = if name.is_empty() {
            body_name.to_string()
        } else {
            name.to_string()
        };
        let old = self.get(ty, ns, &name)?;
        if let Some(rv) = rv_of(&new)
            && Some(rv) != rv_of(&old)
        {
            return Err(self.conflict(ty, &name));
        }
        if let Some(uid) = new.pointer("/metadata/uid").and_then(Value::as_str)
            && !uid.is_empty()
            && Some(uid) != old.pointer("/metadata/uid").and_then(Value::as_str)
        {
            return Err(self.conflict(ty, &name));
        }
        let merged = self.combine(ty, &old, new, status)?;
        Ok(self.commit_update(ty, old, merged))
    }

    /// JSON merge patch (and strategic merge patch, treated the same for the fake's kinds).
    pub fn merge_patch(
        &mut self,
        ty: usize,
        ns: &str,
        name: &str,
        p: &Value,
        status: bool,
    ) -> Result<Value> {
        let old = self.get(ty, ns, name)?;
        let mut new = old.clone();
        patch::merge_patch(&mut new, p);
        if !new.is_object() {
            return Err(ApiError::BadRequest("patch must produce an object".into()));
        }
        // A resourceVersion in the patch is a precondition, like on PUT.
        if let Some(rv) = p
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            && Some(rv) != rv_of(&old)
        {
            return Err(self.conflict(ty, name));
        }
        self.check_type_meta(ty, &new)?;
        let merged = self.combine(ty, &old, new, status)?;
        Ok(self.commit_update(ty, old, merged))
    }

    /// JSON patch (RFC 6902), e.g. kube-runtime's finalizer helper with its `test` guards. A
    /// failed `test` or a bad path is 422 Invalid; changing `metadata.resourceVersion` acts as
    /// a precondition, as on merge patch.
    pub fn json_patch(
        &mut self,
        ty: usize,
        ns: &str,
        name: &str,
        ops: &Value,
        status: bool,
    ) -> Result<Value> {
        let old = self.get(ty, ns, name)?;
        let ops: json_patch::Patch = serde_json::from_value(ops.clone())
            .map_err(|e| ApiError::BadRequest(format!("invalid JSON patch: {e}")))?;
        let mut new = old.clone();
        json_patch::patch(&mut new, &ops.0).map_err(|e| {
            ApiError::Invalid(format!(
                "the server rejected our request due to an error in our request: {e}"
            ))
        })?;
        if !new.is_object() {
            return Err(ApiError::BadRequest("patch must produce an object".into()));
        }
        if rv_of(&new) != rv_of(&old) {
            return Err(self.conflict(ty, name));
        }
        self.check_type_meta(ty, &new)?;
        let merged = self.combine(ty, &old, new, status)?;
        Ok(self.commit_update(ty, old, merged))
    }

    /// Server-side apply. On the main resource it creates or updates; on `/status` only
    /// `.status` changes. `fieldManager` is required.
    pub fn apply(
        &mut self,
        ty: usize,
        ns: &str,
        name: &str,
        applied: &Value,
        opts: ApplyOptions<'_>,
    ) -> Result<Value> {
        let ApplyOptions {
            field_manager: manager,
            force,
            status,
        } = opts;
        let manager = manager.filter(|m| !m.is_empty()).ok_or_else(|| {
            ApiError::BadRequest(
                "PATCH requests with the apply content type must provide a fieldManager".into(),
            )
        })?;
        let t = self.types[ty].clone();
        let av = applied
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("");
        let kind = applied.get("kind").and_then(Value::as_str).unwrap_or("");
        if av.is_empty() || kind.is_empty() {
            return Err(ApiError::BadRequest(
                "apiVersion and kind must be set in an applied configuration".into(),
            ));
        }
        self.check_type_meta(ty, applied)?;
        let body_name = name_of(applied);
        if body_name != name {
            return Err(ApiError::BadRequest(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let body_ns = namespace_of(applied);
        if t.namespaced && !body_ns.is_empty() && body_ns != ns {
            return Err(ApiError::BadRequest(
                "the namespace of the provided object does not match the namespace sent on the request".into(),
            ));
        }
        let now = now_rfc3339();
        let api_version = t.api_version();
        let a = Apply {
            manager,
            force,
            status_only: status,
            drop_status: !status && t.status_subresource,
            api_version: &api_version,
            now: &now,
        };
        let to_err = |e: PatchError| ApiError::ApplyConflict(e.to_string());
        match self.get(ty, ns, name) {
            Err(ApiError::NotFound { .. }) if !status => {
                let skeleton = json!({"metadata": {"name": name}});
                let mut obj = patch::apply(&skeleton, applied, &a).map_err(to_err)?;
                if t.namespaced {
                    with_meta(&mut obj, |m| {
                        m.insert("namespace".into(), json!(ns));
                    });
                }
                self.create(ty, ns, obj)
            }
            Err(e) => Err(e),
            Ok(old) => {
                if status && !t.status_subresource {
                    return Err(ApiError::NoRoute);
                }
                if let Some(rv) = rv_of(applied)
                    && Some(rv) != rv_of(&old)
                {
                    return Err(self.conflict(ty, name));
                }
                let new = patch::apply(&old, applied, &a).map_err(to_err)?;
                Ok(self.commit_update(ty, old, new))
            }
        }
    }

    /// Delete: emits DELETED with the last state carrying the deletion's new resourceVersion;
    /// preconditions (DeleteOptions.preconditions) are checked like on update.
    pub fn delete(
        &mut self,
        ty: usize,
        ns: &str,
        name: &str,
        precondition_rv: Option<&str>,
        precondition_uid: Option<&str>,
    ) -> Result<Value> {
        let old = self.get(ty, ns, name)?;
        if precondition_rv.is_some_and(|rv| Some(rv) != rv_of(&old))
            || precondition_uid
                .is_some_and(|u| Some(u) != old.pointer("/metadata/uid").and_then(Value::as_str))
        {
            return Err(self.conflict(ty, name));
        }
        let has_finalizers = old
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        if has_finalizers {
            // Graceful deletion (API concepts, "Finalizers"): mark with deletionTimestamp and
            // keep the object until the last finalizer is removed by an update.
            if old.pointer("/metadata/deletionTimestamp").is_some() {
                return Ok(old);
            }
            let mut marked = old.clone();
            with_meta(&mut marked, |meta| {
                meta.insert("deletionTimestamp".into(), json!(now_rfc3339()));
                meta.insert("deletionGracePeriodSeconds".into(), json!(0));
            });
            self.rv += 1;
            with_meta(&mut marked, |m| {
                m.insert("resourceVersion".into(), json!(self.rv.to_string()));
            });
            let key = self.key(ty, ns, name);
            self.objects[ty].insert(key, marked.clone());
            self.emit(ty, EventType::Modified, marked.clone(), Some(old));
            return Ok(marked);
        }
        Ok(self.remove(ty, old))
    }

    fn remove(&mut self, ty: usize, old: Value) -> Value {
        let key = self.key(ty, namespace_of(&old), name_of(&old));
        self.objects[ty].remove(&key);
        self.rv += 1;
        let mut last = old.clone();
        with_meta(&mut last, |m| {
            m.insert("resourceVersion".into(), json!(self.rv.to_string()));
        });
        self.emit(ty, EventType::Deleted, last.clone(), Some(old));
        last
    }

    /// All objects of a type, in key order.
    pub fn all(&self, ty: usize) -> Vec<Value> {
        self.objects[ty].values().cloned().collect()
    }

    pub fn requests(&self) -> &[RequestRecord] {
        &self.requests
    }

    /// Distinct field managers (or "" when none was given) of writes to `<resource>/status`.
    pub fn status_writers(&self, resource: &str) -> std::collections::BTreeSet<String> {
        self.requests
            .iter()
            .filter(|r| r.resource == resource && r.subresource.as_deref() == Some("status"))
            .filter(|r| matches!(r.verb.as_str(), "update" | "patch"))
            .map(|r| r.field_manager.clone().unwrap_or_default())
            .collect()
    }

    pub fn request_counts(&self) -> HashMap<(String, String), usize> {
        let mut m = HashMap::new();
        for r in &self.requests {
            let res = match &r.subresource {
                Some(s) => format!("{}/{s}", r.resource),
                None => r.resource.clone(),
            };
            *m.entry((r.verb.clone(), res)).or_insert(0) += 1;
        }
        m
    }
}

/// What one history event looks like to a watcher with `filter` (the apiserver cacher's
/// rule): both states match → MODIFIED; only the new → ADDED; only the old → DELETED with the
/// old state at the event's resourceVersion; neither → nothing.
fn convert(ev: &HistEvent, filter: &Filter) -> Option<Value> {
    let cur = filter.matches(&ev.obj);
    let (ty, obj) = match ev.kind {
        EventType::Added => (cur.then_some("ADDED")?, ev.obj.clone()),
        EventType::Deleted => (cur.then_some("DELETED")?, ev.obj.clone()),
        EventType::Modified => {
            let old = ev.prev.as_ref().is_some_and(|p| filter.matches(p));
            match (old, cur) {
                (true, true) => ("MODIFIED", ev.obj.clone()),
                (false, true) => ("ADDED", ev.obj.clone()),
                (true, false) => {
                    let mut o = ev.prev.clone().unwrap_or(Value::Null);
                    if o.is_object() {
                        with_meta(&mut o, |m| {
                            m.insert("resourceVersion".into(), json!(ev.rv.to_string()));
                        });
                    }
                    ("DELETED", o)
                }
                (false, false) => return None,
            }
        }
    };
    Some(json!({"type": ty, "object": obj}))
}
