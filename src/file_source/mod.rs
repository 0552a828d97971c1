//! The file provider: a directory of Kubernetes YAML → [`Inputs`], with a live watch
//! (brief §4.2).
//!
//! Owns: directory scanning, per-file last-good objects, change notification to the rebuild
//! loop. May import: translate (Inputs), publish, rebuild, metrics, tokio, notify. Not the proxy.
//!
//! # API
//!
//! - [`load_dir`]: one scan, for `portico check DIR`. Fails only when DIR cannot be listed;
//!   everything else (a bad file, an unreadable subdirectory) is a [`Diagnostic`].
//! - [`FileSource::start`]: scan once (same failure rule), then keep watching; returns the
//!   source to hand to [`crate::rebuild::Rebuilder::run`] and the watch task's handle. It pokes
//!   the given [`Trigger`] whenever a file's *content* changed (a touch, a chmod or our own
//!   reads never cause a rebuild).
//!
//! # Behaviour
//!
//! - Walk rules (see `scan`): `*.yaml` / `*.yml` (any case) in DIR and below; names starting
//!   with `.` skipped; symlinked files followed (so a ConfigMap volume, `foo.yaml →
//!   ..data/foo.yaml` with `..data` swapped atomically, works); symlinked directories followed
//!   only when they point outside DIR, each target once (cycle-safe). Caps: 8 MiB per file,
//!   4096 files, 16 levels.
//! - Per file, the last version that parsed keeps serving while the file is invalid; the file
//!   is reported as a Diagnostic (kind `File`, namespace "", name = path relative to DIR,
//!   reason `InvalidManifest`, Error) and counted in `portico_manifest_files_invalid`. A
//!   deleted file's objects go away. If DIR itself (or a subdirectory) cannot be listed, what
//!   was loaded from it stays (reason `ManifestDirUnreadable`). An object defined in two files
//!   is taken from the first in path order (reason `DuplicateObject` for the other).
//! - Watch: `notify` on DIR, recursive, so edits, atomic rename-over, deletions and `..data`
//!   swaps are seen; each burst of events (after a [`DEFAULT_SETTLE`] pause so a file being
//!   written is read whole) triggers a rescan. A rescan every [`DEFAULT_RESCAN_INTERVAL`] is
//!   the safety net for missed events and for when the watch cannot be set up at all (then it
//!   is the only mechanism, with a warning in the log). Directories outside DIR that symlinks
//!   lead to (a linked file's directory, a linked directory) get their own non-recursive
//!   watches, kept in step with each rescan. A rescan reads only the files whose `stat`
//!   changed since they were last read (see `scan::SETTLE_BEFORE_TRUST`). After every rescan
//!   DIR's identity (real path and inode) is compared with the watched one: a DIR made again,
//!   or a symlink DIR pointed elsewhere, gets a new watch.
//! - Files being written: on Linux, inotify reports when a file written to is closed. A file
//!   written to (or truncated) and not closed since, keeps the version last read (a new one is
//!   not read yet) for up to [`WRITE_HOLD_CAP`], so `kubectl get -o yaml > f` or `helm
//!   template > f` with a pause between the truncation and the writing never serves the empty
//!   or partial file in between.
//!
//! # Wiring (what `app` does for `portico run --manifests DIR`)
//!
//! ```no_run
//! use portico::file_source::{FileSource, FileSourceConfig};
//! use portico::metrics::Metrics;
//! use portico::publish;
//! use portico::rebuild::{RebuildConfig, Rebuilder, Trigger};
//! use tokio::sync::watch;
//!
//! async fn serve(dir: std::path::PathBuf, stop: watch::Receiver<bool>) -> anyhow::Result<()> {
//!     let stopped = |mut rx: watch::Receiver<bool>| async move {
//!         let _ = rx.wait_for(|s| *s).await;
//!     };
//!     let metrics = Metrics::new();
//!     let trigger = Trigger::new();
//!     let (source, watch_task) = FileSource::start(
//!         FileSourceConfig::new(dir),
//!         metrics.clone(),
//!         trigger.clone(),
//!         stopped(stop.clone()),
//!     )
//!     .await?;
//!     let (publisher, _reader) = publish::channel(); // the reader goes to the proxy, /readyz
//!     let rebuilder = Rebuilder::new(RebuildConfig::default(), publisher, metrics, trigger);
//!     let _diagnostics = rebuilder.diagnostics(); // for anything that reports them
//!     rebuilder.run(&*source, stopped(stop)).await;
//!     watch_task.await?;
//!     Ok(())
//! }
//! ```
//!
//! For `portico check DIR`: [`load_dir`], then `translate`, then
//! [`crate::rebuild::merge_diagnostics`] for one sorted list.

pub mod parse;
mod scan;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::metrics::Metrics;
use crate::rebuild::{Source, Trigger};
use crate::translate::{Diagnostic, Inputs};

pub use parse::{DEFAULT_NAMESPACE, Object, ParseError, parse_manifests};
pub use scan::{
    KIND_FILE, MAX_DEPTH, MAX_FILE_SIZE, MAX_FILES, REASON_DIR_UNREADABLE, REASON_DUPLICATE_OBJECT,
    REASON_INVALID_MANIFEST, REASON_LIMIT_EXCEEDED,
};

/// Safety-net rescan period (an event may be missed, e.g. on inotify queue overflow).
pub const DEFAULT_RESCAN_INTERVAL: Duration = Duration::from_secs(2);
/// Quiet time after filesystem events before rescanning, so the rest of a burst (truncate,
/// write, close) lands first and a file still being written is not read half-done: each event
/// restarts it, up to [`MAX_SETTLE`]. Well inside the 1 s budget.
pub const DEFAULT_SETTLE: Duration = Duration::from_millis(25);
/// The longest a rescan waits for a quiet moment after the first event.
pub const MAX_SETTLE: Duration = Duration::from_millis(300);
/// The longest a file written to and not closed keeps its last version (a writer that holds
/// it open longer, or a close event lost to an inotify overflow, costs this much delay).
pub const WRITE_HOLD_CAP: Duration = Duration::from_secs(5);

/// Files written to and not closed since, with when that was first seen (see the module doc).
type Writing = Arc<Mutex<HashMap<PathBuf, std::time::Instant>>>;

/// Errors of the file source.
#[derive(Debug, thiserror::Error)]
pub enum FileSourceError {
    #[error("cannot read manifests directory {}: {source}", path.display())]
    ReadDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("scanning manifests directory {} failed: {message}", path.display())]
    Scan { path: PathBuf, message: String },
}

pub type Result<T, E = FileSourceError> = std::result::Result<T, E>;

/// Scan `dir` once: its objects and the file source's diagnostics (invalid files etc.).
pub fn load_dir(dir: &Path) -> Result<(Inputs, Vec<Diagnostic>)> {
    let mut state = scan::DirState::new();
    state
        .rescan(dir)
        .map_err(|source| FileSourceError::ReadDir {
            path: dir.to_path_buf(),
            source,
        })?;
    Ok(state.inputs())
}

/// Settings of a [`FileSource`].
#[derive(Debug, Clone)]
pub struct FileSourceConfig {
    pub dir: PathBuf,
    pub rescan_interval: Duration,
    pub settle: Duration,
    /// Set up the `notify` watch (off only in tests of the periodic rescan).
    pub watch: bool,
}

impl FileSourceConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        FileSourceConfig {
            dir: dir.into(),
            rescan_interval: DEFAULT_RESCAN_INTERVAL,
            settle: DEFAULT_SETTLE,
            watch: true,
        }
    }
}

/// The manifests directory as a rebuild [`Source`]; see the module doc.
#[derive(Debug)]
pub struct FileSource {
    dir: PathBuf,
    /// What `inputs()` hands out, recomputed after each rescan that changed something.
    current: Mutex<Arc<(Inputs, Vec<Diagnostic>)>>,
    watching: bool,
    /// Rescans finished since start (the first scan included).
    rescans: AtomicU64,
    /// Rescans that found a change (and poked the trigger).
    changes: AtomicU64,
    /// Times the watch was set up again because DIR was replaced.
    rearms: Arc<AtomicU64>,
}

impl Source for FileSource {
    fn inputs(&self) -> (Inputs, Vec<Diagnostic>) {
        let current = self
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        (current.0.clone(), current.1.clone())
    }
}

impl FileSource {
    /// Scan `config.dir`, start watching it, and return the source plus the watch task, which
    /// ends when `shutdown` completes. Fails only when the directory cannot be listed.
    pub async fn start<F>(
        config: FileSourceConfig,
        metrics: Metrics,
        trigger: Trigger,
        shutdown: F,
    ) -> Result<(Arc<FileSource>, JoinHandle<()>)>
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        // notify reports absolute paths (it joins a relative DIR to the working directory);
        // the walk builds its paths from DIR as given, and the two must compare equal (files
        // being written are matched by path).
        let mut config = config;
        if let Ok(absolute) = std::path::absolute(&config.dir) {
            config.dir = absolute;
        }
        let events = Arc::new(Notify::new());
        let writing = Writing::default();
        // Watch before the first scan, so a change made during the scan is not missed.
        let watcher = if config.watch {
            match make_watcher(&config.dir, events.clone(), writing.clone()) {
                Ok(w) => Some(w),
                Err(e) => {
                    tracing::warn!(
                        dir = %config.dir.display(),
                        error = %e,
                        interval = ?config.rescan_interval,
                        "cannot watch the manifests directory; falling back to periodic rescans"
                    );
                    None
                }
            }
        } else {
            None
        };

        let state = Arc::new(Mutex::new(scan::DirState::new()));
        let first = {
            let state = state.clone();
            let dir = config.dir.clone();
            // Events so far are covered by the scan about to start.
            let _ = take_pending(&events);
            tokio::task::spawn_blocking(move || {
                let mut st = state.lock().unwrap_or_else(PoisonError::into_inner);
                st.rescan(&dir)
                    .map(|_| (st.inputs(), st.invalid_files(), st.external_dirs().clone()))
            })
            .await
        };
        let (current, invalid, external) = match first {
            Ok(Ok(v)) => v,
            Ok(Err(source)) => {
                return Err(FileSourceError::ReadDir {
                    path: config.dir,
                    source,
                });
            }
            Err(e) => {
                return Err(FileSourceError::Scan {
                    path: config.dir,
                    message: e.to_string(),
                });
            }
        };
        set_invalid_gauge(&metrics, invalid);
        let source = Arc::new(FileSource {
            dir: config.dir.clone(),
            current: Mutex::new(Arc::new(current)),
            watching: watcher.is_some(),
            rescans: AtomicU64::new(1),
            changes: AtomicU64::new(0),
            rearms: Arc::default(),
        });
        // The rebuild loop may already be running: make sure it reads the first scan.
        trigger.poke();
        let mut watch = WatchState {
            root: root_identity(&config.dir),
            watcher,
            external: BTreeSet::new(),
            rearms: source.rearms.clone(),
        };
        watch.sync_external(external);
        let task = tokio::spawn(watch_loop(
            source.clone(),
            state,
            events,
            writing,
            watch,
            config,
            metrics,
            trigger,
            shutdown,
        ));
        Ok((source, task))
    }

    /// The watched directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the live `notify` watch is active (else only periodic rescans run).
    pub fn is_watching(&self) -> bool {
        self.watching
    }

    /// Rescans finished so far, the first scan included (for tests and debugging).
    pub fn rescans(&self) -> u64 {
        self.rescans.load(Ordering::Acquire)
    }

    /// Rescans after the first that found changed content and poked the rebuild trigger.
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    /// Times the watch was set up again because DIR itself was replaced (removed and made
    /// again, or a symlink DIR pointed elsewhere).
    pub fn rearms(&self) -> u64 {
        self.rearms.load(Ordering::Acquire)
    }
}

#[allow(clippy::too_many_arguments)] // private task body; the arguments are its whole state
async fn watch_loop<F>(
    source: Arc<FileSource>,
    state: Arc<Mutex<scan::DirState>>,
    events: Arc<Notify>,
    writing: Writing,
    // Owned by the task, so the watch lives exactly as long as it.
    mut watch: WatchState,
    config: FileSourceConfig,
    metrics: Metrics,
    trigger: Trigger,
    shutdown: F,
) where
    F: std::future::Future<Output = ()> + Send,
{
    let mut shutdown = std::pin::pin!(shutdown);
    // Runs until shutdown; every pass waits for an event or the rescan period.
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => return,
            () = events.notified() => {
                tokio::select! {
                    biased;
                    () = &mut shutdown => return,
                    () = quiet(&events, config.settle, MAX_SETTLE) => {}
                }
            }
            () = tokio::time::sleep(config.rescan_interval) => {}
        }
        let st = state.clone();
        let dir = config.dir.clone();
        let held = being_written(&writing);
        let result = tokio::task::spawn_blocking(move || {
            let mut st = st.lock().unwrap_or_else(PoisonError::into_inner);
            let changed = st.refresh(&dir, &held);
            let update = changed.then(|| (st.inputs(), st.invalid_files()));
            (update, st.external_dirs().clone())
        })
        .await
        .map(|(update, external)| {
            watch.rearm_if_replaced(&config.dir, &events, &writing);
            watch.sync_external(external);
            update
        });
        match result {
            Ok(Some((current, invalid))) => {
                set_invalid_gauge(&metrics, invalid);
                *source
                    .current
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Arc::new(current);
                source.changes.fetch_add(1, Ordering::AcqRel);
                source.rescans.fetch_add(1, Ordering::AcqRel);
                trigger.poke();
            }
            Ok(None) => {
                source.rescans.fetch_add(1, Ordering::AcqRel);
            }
            Err(e) => {
                // A panic in the scan (a bug): keep serving what we have and try again later.
                tracing::error!(dir = %config.dir.display(), error = %e, "manifest rescan failed");
            }
        }
    }
}

/// The files written to and not closed since, for at most [`WRITE_HOLD_CAP`] (older entries
/// are forgotten).
fn being_written(writing: &Writing) -> HashSet<PathBuf> {
    let mut writing = writing.lock().unwrap_or_else(PoisonError::into_inner);
    writing.retain(|_, since| since.elapsed() < WRITE_HOLD_CAP);
    writing.keys().cloned().collect()
}

/// Keep [`Writing`] in step with one event. Only where the watch reports closes (inotify):
/// elsewhere nothing would end a hold but the cap.
#[cfg(target_os = "linux")]
fn track_writes(writing: &Writing, event: &notify::Event) {
    use notify::event::{AccessKind, AccessMode, ModifyKind};
    // A write (a truncation included) opens the hold, not a creation: a symlink (a ConfigMap
    // key) is created without ever being written or closed, and an empty new file serves
    // nothing anyway.
    let opened = match event.kind {
        EventKind::Modify(ModifyKind::Data(_)) => true,
        EventKind::Access(AccessKind::Close(AccessMode::Write))
        | EventKind::Remove(_)
        | EventKind::Modify(ModifyKind::Name(_)) => false,
        _ => return,
    };
    let mut writing = writing.lock().unwrap_or_else(PoisonError::into_inner);
    for path in &event.paths {
        if opened {
            writing
                .entry(path.clone())
                .or_insert_with(std::time::Instant::now);
        } else {
            writing.remove(path);
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn track_writes(_writing: &Writing, _event: &notify::Event) {}

/// Drop a stored wake-up, if any: polling a fresh `Notified` once consumes the permit.
/// Consume a notification stored while nobody waited; true when there was one.
fn take_pending(events: &Notify) -> bool {
    let notified = std::pin::pin!(events.notified());
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    notified.poll(&mut cx).is_ready()
}

/// Wait until no event came for `settle` (a writer still writing keeps restarting it), or
/// `cap` passed since the first one (a directory that never stops changing is still read).
/// Events up to then are covered by the rescan that follows.
async fn quiet(events: &Notify, settle: Duration, cap: Duration) {
    let until = tokio::time::Instant::now() + cap;
    loop {
        tokio::time::sleep(settle).await;
        if !take_pending(events) || tokio::time::Instant::now() >= until {
            return;
        }
    }
}

/// The `notify` watcher plus the extra, non-recursive watches on directories outside DIR
/// that symlinks lead to (the recursive watch on DIR sees the links, not their targets).
struct WatchState {
    /// The directory the watch was set up on (see [`root_identity`]).
    root: Option<RootId>,
    watcher: Option<notify::RecommendedWatcher>,
    external: BTreeSet<PathBuf>,
    rearms: Arc<AtomicU64>,
}

/// What DIR is: its real path and inode. A watch follows the directory it was set up on, so
/// when DIR is removed and made again, or is a symlink pointed at another directory, the
/// watch sees nothing more and must be set up again.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RootId {
    real: PathBuf,
    #[cfg(unix)]
    inode: (u64, u64),
}

fn root_identity(dir: &Path) -> Option<RootId> {
    let real = std::fs::canonicalize(dir).ok()?;
    #[cfg(unix)]
    let inode = {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&real).ok()?;
        (meta.dev(), meta.ino())
    };
    Some(RootId {
        real,
        #[cfg(unix)]
        inode,
    })
}

impl WatchState {
    /// Set the watch up again when DIR is another directory than the one watched (checked
    /// after every rescan, so the 2 s safety-net rescan finds it at the latest). Only when a
    /// watch was set up at start, and only once DIR exists again.
    fn rearm_if_replaced(&mut self, dir: &Path, events: &Arc<Notify>, writing: &Writing) {
        if self.watcher.is_none() {
            return;
        }
        let Some(now) = root_identity(dir) else {
            return;
        };
        if self.root.as_ref() == Some(&now) {
            return;
        }
        match make_watcher(dir, events.clone(), writing.clone()) {
            Ok(w) => {
                tracing::info!(dir = %dir.display(), "manifests directory replaced; watching the new one");
                self.watcher = Some(w);
                // The new watcher has none of the old external watches.
                self.external.clear();
                self.root = Some(now);
                self.rearms.fetch_add(1, Ordering::AcqRel);
                // Changes made before the new watch existed are covered by a rescan now.
                events.notify_one();
            }
            Err(e) => {
                // Tried again after the next rescan; the periodic rescan covers it meanwhile.
                tracing::debug!(dir = %dir.display(), error = %e, "cannot watch the replaced manifests directory yet");
            }
        }
    }

    fn sync_external(&mut self, wanted: BTreeSet<PathBuf>) {
        let Some(watcher) = self.watcher.as_mut() else {
            return;
        };
        for gone in self.external.difference(&wanted) {
            // Already gone with its directory, most likely; nothing to do either way.
            let _ = watcher.unwatch(gone);
        }
        let mut watched = BTreeSet::new();
        for dir in wanted {
            if self.external.contains(&dir)
                || watcher.watch(&dir, RecursiveMode::NonRecursive).is_ok()
            {
                watched.insert(dir);
            } else {
                // Retried after the next rescan; the periodic rescan covers it meanwhile.
                tracing::debug!(dir = %dir.display(), "cannot watch symlink target directory");
            }
        }
        self.external = watched;
    }
}

fn set_invalid_gauge(metrics: &Metrics, invalid: usize) {
    metrics
        .manifest_files_invalid
        .set(i64::try_from(invalid).unwrap_or(i64::MAX));
}

fn make_watcher(
    dir: &Path,
    events: Arc<Notify>,
    writing: Writing,
) -> notify::Result<notify::RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        match res {
            Ok(event) => {
                track_writes(&writing, &event);
                if is_relevant(&event.kind) {
                    events.notify_one();
                }
            }
            Err(e) => {
                // E.g. an inotify queue overflow: events may be lost, so rescan now.
                tracing::warn!(error = %e, "manifests directory watch error");
                events.notify_one();
            }
        }
    })?;
    watcher.watch(dir, RecursiveMode::Recursive)?;
    Ok(watcher)
}

/// Opening and reading files (our own rescans among them) changes nothing; everything else
/// (create, write, close-after-write, rename, delete, metadata) may.
fn is_relevant(kind: &EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode};
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Events keep restarting the quiet time; it ends `settle` after the last one, or at the
    /// cap when they never stop.
    #[tokio::test(start_paused = true)]
    async fn quiet_waits_for_a_pause_in_events_up_to_a_cap() {
        let settle = Duration::from_millis(25);
        let events = Arc::new(Notify::new());
        let start = tokio::time::Instant::now();
        // A writer that writes every 20 ms, six times.
        let writer = {
            let events = events.clone();
            tokio::spawn(async move {
                for _ in 0..6 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    events.notify_one();
                }
            })
        };
        quiet(&events, settle, MAX_SETTLE).await;
        let waited = start.elapsed();
        assert!(
            writer.is_finished(),
            "returned while the writer was still writing"
        );
        assert!(waited >= Duration::from_millis(120) + settle, "{waited:?}");
        assert!(waited < Duration::from_millis(200), "{waited:?}");

        // Events that never stop: the cap ends the wait.
        let start = tokio::time::Instant::now();
        let endless = {
            let events = events.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    events.notify_one();
                }
            })
        };
        quiet(&events, settle, MAX_SETTLE).await;
        endless.abort();
        let waited = start.elapsed();
        assert!(
            waited >= MAX_SETTLE && waited < MAX_SETTLE + settle * 2,
            "{waited:?}"
        );
    }
}
