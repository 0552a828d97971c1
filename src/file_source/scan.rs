//! Directory scanning and per-file last-good state of the manifests dir (blocking I/O; the
//! watch task runs it on the blocking pool).
//!
//! Owns: which files are manifests (walk rules, caps), reading them, remembering each file's
//! last good objects, and turning the whole directory into [`Inputs`] + the file source's own
//! [`Diagnostic`]s. Must not import tokio, notify or the proxy.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs;
use std::hash::{DefaultHasher, Hasher};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::parse::parse_manifests;
use crate::translate::{Diagnostic, Inputs, Severity};

/// Largest manifest file read; a bigger one is reported as invalid (its last good objects keep
/// serving). Kubernetes caps a ConfigMap at 1 MiB and an object at about 1.5 MiB, so 8 MiB is
/// far above any honest manifest while still bounding memory.
pub const MAX_FILE_SIZE: u64 = 8 * 1024 * 1024;
/// Most manifest files read from one directory tree; the rest are reported and ignored.
pub const MAX_FILES: usize = 4096;
/// Deepest directory nesting walked below DIR.
pub const MAX_DEPTH: usize = 16;

/// A file last changed at least this long before a scan started is not read again while its
/// [`Stamp`] stays the same. File timestamps are coarse (the kernel's clock tick, a few ms),
/// so a file rewritten twice within one tick, with the same length and in place, keeps its
/// stamp; a stamp only counts once it is older than this (git's "racily clean" rule).
pub const SETTLE_BEFORE_TRUST: Duration = Duration::from_secs(1);

/// Diagnostic kind for problems with files rather than objects.
pub const KIND_FILE: &str = "File";
/// A manifest file that cannot be read or parsed.
pub const REASON_INVALID_MANIFEST: &str = "InvalidManifest";
/// A directory (DIR itself or a subdirectory) that cannot be listed.
pub const REASON_DIR_UNREADABLE: &str = "ManifestDirUnreadable";
/// More than [`MAX_FILES`] manifests, or nesting deeper than [`MAX_DEPTH`].
pub const REASON_LIMIT_EXCEEDED: &str = "ManifestLimitExceeded";
/// Two files define the same kind/namespace/name; the first file (in path order) wins.
pub const REASON_DUPLICATE_OBJECT: &str = "DuplicateObject";

/// What a file held at the last scan, to tell a real change from a touch.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Content {
    /// Length and 64-bit hash of the bytes.
    Bytes { len: usize, hash: u64 },
    /// The file could not be read, with why.
    Unreadable(String),
}

/// What `stat` says of a file: any write, rename-over, truncation or `..data` swap changes
/// it (inode, size, or the change time the kernel sets on every write, which no user can
/// set back). Used to skip reading files that did not change; see [`SETTLE_BEFORE_TRUST`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    /// The stamp of `meta` when it may be trusted at a scan that started at `scan_start`:
    /// the file's last change (the later of mtime and ctime) is at least
    /// [`SETTLE_BEFORE_TRUST`] older than the scan. `None` otherwise, and off Unix.
    #[cfg(unix)]
    fn settled(meta: &fs::Metadata, scan_start: SystemTime) -> Option<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let stamp = Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        };
        let changed = SystemTime::UNIX_EPOCH
            .checked_add(Duration::new(
                u64::try_from(stamp.mtime.0.max(stamp.ctime.0)).ok()?,
                0,
            ))?
            .checked_add(Duration::from_secs(1))?; // the whole second the change fell in
        (changed + SETTLE_BEFORE_TRUST <= scan_start).then_some(stamp)
    }

    #[cfg(not(unix))]
    fn settled(_meta: &fs::Metadata, _scan_start: SystemTime) -> Option<Stamp> {
        None
    }
}

#[derive(Debug, Clone)]
struct FileEntry {
    /// `stat` at the scan that read this content, when settled: while a later scan sees the
    /// same stamp, the file is not read again.
    stamp: Option<Stamp>,
    content: Content,
    /// Objects of the last version that parsed (empty if none ever did).
    good: Inputs,
    /// Why the current version is not used, if it is not.
    error: Option<String>,
}

/// The manifests directory as last scanned.
#[derive(Debug, Default)]
pub struct DirState {
    /// Keyed by path relative to DIR with `/` separators; `BTreeMap` so inputs come out in a
    /// stable order and duplicate resolution does not depend on directory listing order.
    files: BTreeMap<String, FileEntry>,
    /// Problems with directories and limits found by the last walk.
    walk_problems: Vec<Diagnostic>,
    /// Set while DIR itself cannot be listed (every file keeps its last state meanwhile).
    root_error: Option<String>,
    /// See [`DirState::external_dirs`].
    external_dirs: BTreeSet<PathBuf>,
    /// Bytes of manifest files read so far (what the stamps save; tests).
    bytes_read: u64,
}

struct Found {
    rel: String,
    path: PathBuf,
    /// `stat` from the walk, when the file could be stat'ed.
    meta: Option<fs::Metadata>,
}

#[derive(Default)]
struct Walk {
    files: Vec<Found>,
    /// Relative paths of subdirectories that could not be listed: their files keep their
    /// previous state instead of being treated as deleted.
    unreadable_dirs: Vec<String>,
    problems: Vec<Diagnostic>,
    /// Real directories outside DIR that hold files or directories we read through symlinks.
    external_dirs: BTreeSet<PathBuf>,
}

impl DirState {
    pub fn new() -> Self {
        Self::default()
    }

    /// Rescan `root`, recording a DIR-level diagnostic (and keeping every file as it was) when
    /// DIR itself cannot be listed. Files in `held` (paths as the walk builds them: `root`
    /// joined with the names below it) are open for writing: each keeps the version last read,
    /// and one not read before waits. Returns whether inputs or diagnostics changed.
    pub fn refresh(&mut self, root: &Path, held: &HashSet<PathBuf>) -> bool {
        match self.rescan_at(root, SystemTime::now(), held) {
            Ok(changed) => {
                let cleared = self.root_error.take().is_some();
                changed || cleared
            }
            Err(e) => {
                let msg = e.to_string();
                let changed = self.root_error.as_deref() != Some(msg.as_str());
                self.root_error = Some(msg);
                changed
            }
        }
    }

    /// Rescan `root`. Fails only when `root` itself cannot be listed, leaving the state as it
    /// was. Returns whether inputs or diagnostics changed.
    pub fn rescan(&mut self, root: &Path) -> io::Result<bool> {
        self.rescan_at(root, SystemTime::now(), &HashSet::new())
    }

    /// [`DirState::rescan`] as of `scan_start` (tests move it forward instead of waiting for
    /// files to settle).
    fn rescan_at(
        &mut self,
        root: &Path,
        scan_start: SystemTime,
        held: &HashSet<PathBuf>,
    ) -> io::Result<bool> {
        let walk = walk(root)?;
        let mut changed = walk.problems != self.walk_problems;
        self.walk_problems = walk.problems;
        self.external_dirs = walk.external_dirs;

        let mut next: BTreeMap<String, FileEntry> = BTreeMap::new();
        for found in walk.files {
            // Being written (truncated and not yet closed, say): what it holds now may be a
            // part of the new version, which parses as fewer objects as often as not.
            if held.contains(&found.path) {
                if let Some(prev) = self.files.remove(&found.rel) {
                    next.insert(found.rel, prev);
                }
                continue;
            }
            // Stat'ed before the read: a change after it gives the next scan another stamp.
            let stamp = found
                .meta
                .as_ref()
                .and_then(|m| Stamp::settled(m, scan_start));
            // Unchanged since a read whose stamp was settled: keep it without reading. With a
            // large ConfigMap this is most of the files at every event and every safety-net
            // rescan.
            if let Some(prev) = self.files.get(&found.rel)
                && stamp.is_some()
                && prev.stamp == stamp
            {
                if let Some(prev) = self.files.remove(&found.rel) {
                    next.insert(found.rel, prev);
                }
                continue;
            }
            let content = match read_capped(&found.path) {
                Ok(bytes) => Ok(bytes),
                // Deleted between listing and reading, or a dangling symlink (a ConfigMap
                // update removes the file link after swapping `..data`): the file is gone.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => Err(e.to_string()),
            };
            let summary = match &content {
                Ok(bytes) => {
                    self.bytes_read += bytes.len() as u64;
                    Content::Bytes {
                        len: bytes.len(),
                        hash: hash(bytes),
                    }
                }
                Err(msg) => Content::Unreadable(msg.clone()),
            };
            // Only a file that was read whole is skipped later; an unreadable one is tried
            // at every scan.
            let stamp = stamp.filter(|_| matches!(summary, Content::Bytes { .. }));
            let previous = match self.files.remove(&found.rel) {
                Some(prev) if prev.content == summary => {
                    next.insert(found.rel, FileEntry { stamp, ..prev });
                    continue;
                }
                other => other,
            };
            changed = true;
            let last_good = previous.map(|p| p.good).unwrap_or_default();
            let entry = match content.and_then(|bytes| parse_file(&bytes)) {
                Ok(good) => FileEntry {
                    stamp,
                    content: summary,
                    good,
                    error: None,
                },
                Err(error) => FileEntry {
                    stamp,
                    content: summary,
                    good: last_good,
                    error: Some(error),
                },
            };
            next.insert(found.rel, entry);
        }
        // What is left was not found this time: deleted, unless it sits under a directory we
        // could not list (then we do not know, and keep it).
        for (rel, entry) in std::mem::take(&mut self.files) {
            let under_unreadable = walk.unreadable_dirs.iter().any(|d| is_under(&rel, d));
            if under_unreadable {
                next.insert(rel, entry);
            } else {
                changed = true;
            }
        }
        self.files = next;
        Ok(changed)
    }

    /// Real directories outside DIR that symlinks lead to (a recursive watch of DIR does not
    /// see changes there, so the watch task adds these).
    pub fn external_dirs(&self) -> &BTreeSet<PathBuf> {
        &self.external_dirs
    }

    /// Files whose current version is not used.
    pub fn invalid_files(&self) -> usize {
        self.files.values().filter(|f| f.error.is_some()).count()
    }

    /// All files' objects (last good versions) and the file source's diagnostics.
    pub fn inputs<'a>(&'a self) -> (Inputs, Vec<Diagnostic>) {
        let mut inputs = Inputs::default();
        let mut diagnostics = Vec::new();
        if let Some(e) = &self.root_error {
            diagnostics.push(file_diagnostic(
                ".",
                REASON_DIR_UNREADABLE,
                format!("cannot list the manifests directory (keeping what was loaded): {e}"),
            ));
        }
        diagnostics.extend(self.walk_problems.iter().cloned());
        // Which file defined each object first. Keys borrow from the files' objects and the map
        // uses a fast keyed hasher: at 10 000 Ingresses this runs over 30 000 objects on every
        // change of any file.
        let objects: usize = self.files.values().map(|e| count(&e.good)).sum();
        let mut owners: HashMap<(&'static str, &str, &str), &str, foldhash::fast::RandomState> =
            HashMap::with_capacity_and_hasher(objects, Default::default());
        for (rel, entry) in &self.files {
            if let Some(e) = &entry.error {
                let kept = if is_empty(&entry.good) {
                    String::new()
                } else {
                    " (its last good version keeps serving)".to_string()
                };
                diagnostics.push(file_diagnostic(
                    rel,
                    REASON_INVALID_MANIFEST,
                    format!("{e}{kept}"),
                ));
            }
            let mut add = |kind, ns: Option<&'a str>, name: Option<&'a str>| -> bool {
                let ns = ns.unwrap_or_default();
                let name = name.unwrap_or_default();
                match owners.entry((kind, ns, name)) {
                    Entry::Occupied(first) => {
                        let first = first.get();
                        diagnostics.push(Diagnostic {
                            severity: Severity::Error,
                            kind: kind.to_string(),
                            namespace: ns.to_string(),
                            name: name.to_string(),
                            uid: String::new(),
                            reason: REASON_DUPLICATE_OBJECT.to_string(),
                            message: format!(
                                "defined in {first} and again in {rel}; the copy in {rel} is ignored"
                            ),
                        });
                        false
                    }
                    Entry::Vacant(slot) => {
                        slot.insert(rel.as_str());
                        true
                    }
                }
            };
            let g = &entry.good;
            extend(&mut inputs.ingresses, &g.ingresses, |o| {
                add(
                    "Ingress",
                    o.metadata.namespace.as_deref(),
                    o.metadata.name.as_deref(),
                )
            });
            extend(&mut inputs.ingress_classes, &g.ingress_classes, |o| {
                add(
                    "IngressClass",
                    o.metadata.namespace.as_deref(),
                    o.metadata.name.as_deref(),
                )
            });
            extend(&mut inputs.services, &g.services, |o| {
                add("Service", Some(o.namespace()), Some(o.name()))
            });
            extend(&mut inputs.endpoint_slices, &g.endpoint_slices, |o| {
                add("EndpointSlice", Some(o.namespace()), Some(o.name()))
            });
            extend(&mut inputs.secrets, &g.secrets, |o| {
                add(
                    "Secret",
                    o.metadata.namespace.as_deref(),
                    o.metadata.name.as_deref(),
                )
            });
            extend(
                &mut inputs.rate_limit_policies,
                &g.rate_limit_policies,
                |o| {
                    add(
                        "RateLimitPolicy",
                        o.metadata.namespace.as_deref(),
                        o.metadata.name.as_deref(),
                    )
                },
            );
        }
        (inputs, diagnostics)
    }
}

/// `rel` is a path below directory `dir` (both relative to DIR, `/`-separated).
fn is_under(rel: &str, dir: &str) -> bool {
    rel.strip_prefix(dir).is_some_and(|r| r.starts_with('/'))
}

fn extend<'a, T>(out: &mut Vec<Arc<T>>, from: &'a [Arc<T>], mut keep: impl FnMut(&'a T) -> bool) {
    out.extend(from.iter().filter(|o| keep(o)).cloned());
}

fn is_empty(i: &Inputs) -> bool {
    count(i) == 0
}

fn count(i: &Inputs) -> usize {
    i.ingresses.len()
        + i.ingress_classes.len()
        + i.services.len()
        + i.endpoint_slices.len()
        + i.secrets.len()
        + i.rate_limit_policies.len()
}

fn file_diagnostic(rel: &str, reason: &str, message: String) -> Diagnostic {
    Diagnostic {
        severity: Severity::Error,
        kind: KIND_FILE.to_string(),
        namespace: String::new(),
        name: rel.to_string(),
        uid: String::new(),
        reason: reason.to_string(),
        message,
    }
}

fn hash(bytes: &[u8]) -> u64 {
    // SipHash with fixed keys: stable for the life of the process, which is all a
    // changed-or-not comparison needs.
    let mut h = DefaultHasher::new();
    h.write(bytes);
    h.finish()
}

fn parse_file(bytes: &[u8]) -> Result<Inputs, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8: {e}"))?;
    let objects = parse_manifests(text).map_err(|e| e.to_string())?;
    let mut inputs = Inputs::default();
    inputs.extend_objects(objects);
    Ok(inputs)
}

/// Read at most [`MAX_FILE_SIZE`] bytes; more is an error (checked on the bytes read, not on
/// the metadata, so a file growing between stat and read is still caught).
fn read_capped(path: &Path) -> io::Result<Vec<u8>> {
    let file = fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_SIZE + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE_SIZE {
        return Err(io::Error::other(format!(
            "file is larger than {} MiB",
            MAX_FILE_SIZE / (1024 * 1024)
        )));
    }
    Ok(bytes)
}

fn is_manifest_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    lower.ends_with(".yaml") || lower.ends_with(".yml")
}

/// True when the walk reads `real` (a canonical path) without following a link: it lies in
/// DIR (`root_real`) on a path with no hidden component.
fn walked_anyway(root_real: &Path, real: &Path) -> bool {
    real.strip_prefix(root_real).is_ok_and(|rel| {
        rel.components()
            .all(|c| !c.as_os_str().to_string_lossy().starts_with('.'))
    })
}

/// Walk `root` for manifest files.
///
/// Rules (brief §4.2): names starting with `.` (files and directories) are skipped, which also
/// skips a ConfigMap volume's `..data` and `..<timestamp>` directories; symlinked files are
/// followed (so the ConfigMap's `foo.yaml → ..data/foo.yaml` links are read, and always through
/// the current `..data`); symlinked directories are followed, each target at most once, unless
/// the walk reads their target anyway (inside DIR, no hidden component on the way): that link is
/// an alias, and the visited set rules out cycles. The same holds for a symlinked manifest
/// file whose target the walk reads. Names that are not UTF-8 are reported, not read. A ConfigMap key mounted at a nested path
/// (`team-a → ..data/team-a`) is only reachable through its link, so it is followed. Only regular files are read (never a
/// FIFO or device, which could block). Entries are visited in name order.
fn walk(root: &Path) -> io::Result<Walk> {
    let root_real = fs::canonicalize(root)?;
    // Listing DIR must work: that is the one failure that is not per-file.
    let first = fs::read_dir(root)?;
    let mut out = Walk::default();
    let mut visited: HashSet<PathBuf> = HashSet::from([root_real.clone()]);
    let mut limit_reported = false;
    // Depth-first with an explicit stack; every directory is pushed at most once (visited set
    // or, for real subdirectories, the tree itself), so this terminates.
    let mut stack: Vec<Pending> = vec![Pending {
        dir: root.to_path_buf(),
        rel: String::new(),
        depth: 0,
        via_link: false,
        listing: Some(first),
    }];
    while let Some(Pending {
        dir,
        rel,
        depth,
        via_link,
        listing,
    }) = stack.pop()
    {
        let listing = match listing.map_or_else(|| fs::read_dir(&dir), Ok) {
            Ok(l) => l,
            Err(e) => {
                out.problems.push(file_diagnostic(
                    &rel,
                    REASON_DIR_UNREADABLE,
                    format!("cannot list directory (keeping what was loaded from it): {e}"),
                ));
                out.unreadable_dirs.push(rel);
                continue;
            }
        };
        let mut entries: Vec<(String, PathBuf, bool)> = Vec::new();
        for entry in listing {
            let Ok(entry) = entry else {
                continue;
            };
            let is_link = entry.file_type().is_ok_and(|t| t.is_symlink());
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                // Files are keyed by their path as text: two names that differ only in bytes
                // that are not UTF-8 would be one key, and one file's objects would vanish.
                let lossy = entry.file_name().to_string_lossy().into_owned();
                let could_hold_manifests = is_manifest_name(&lossy)
                    || entry
                        .file_type()
                        .is_ok_and(|t| t.is_dir() || t.is_symlink());
                if !lossy.starts_with('.') && could_hold_manifests {
                    let rel = if rel.is_empty() {
                        lossy
                    } else {
                        format!("{rel}/{lossy}")
                    };
                    out.problems.push(file_diagnostic(
                        &rel,
                        REASON_INVALID_MANIFEST,
                        "the name is not valid UTF-8; not read".to_string(),
                    ));
                }
                continue;
            };
            entries.push((name, entry.path(), is_link));
        }
        entries.sort();
        let mut subdirs = Vec::new();
        for (name, path, is_link) in entries {
            if name.starts_with('.') {
                continue;
            }
            let child_rel = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            // `metadata` follows symlinks.
            let meta = match fs::metadata(&path) {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(_) => {
                    // Cannot even stat it: if it looks like a manifest, let the read report why.
                    if is_manifest_name(&name) {
                        push_file(&mut out, &mut limit_reported, child_rel, path, None);
                    }
                    continue;
                }
            };
            if meta.is_dir() {
                if depth + 1 > MAX_DEPTH {
                    out.problems.push(file_diagnostic(
                        &child_rel,
                        REASON_LIMIT_EXCEEDED,
                        format!("nested deeper than {MAX_DEPTH} directories; not read"),
                    ));
                    continue;
                }
                let Ok(real) = fs::canonicalize(&path) else {
                    continue;
                };
                let link_or_below = via_link || is_link;
                if (link_or_below && walked_anyway(&root_real, &real))
                    || !visited.insert(real.clone())
                {
                    continue;
                }
                // A hidden directory inside DIR changes by a swap of DIR's own entries (the
                // ConfigMap's `..data`), which DIR's watch sees; only outside ones need theirs.
                if link_or_below && !real.starts_with(&root_real) {
                    out.external_dirs.insert(real);
                }
                subdirs.push(Pending {
                    dir: path,
                    rel: child_rel,
                    depth: depth + 1,
                    via_link: link_or_below,
                    listing: None,
                });
            } else if meta.is_file() && is_manifest_name(&name) {
                // A link to a manifest the walk reads anyway (`current.yaml →
                // releases/v2.yaml`) is an alias: read once, under the target's own name.
                if (is_link || via_link)
                    && fs::canonicalize(&path).is_ok_and(|real| {
                        walked_anyway(&root_real, &real)
                            && real
                                .file_name()
                                .and_then(|n| n.to_str())
                                .is_some_and(is_manifest_name)
                    })
                {
                    continue;
                }
                if is_link && !via_link {
                    // Files below an external directory are covered by that directory.
                    if let Some(parent) = fs::canonicalize(&path)
                        .ok()
                        .filter(|real| !real.starts_with(&root_real))
                        .and_then(|real| real.parent().map(Path::to_path_buf))
                    {
                        out.external_dirs.insert(parent);
                    }
                }
                push_file(&mut out, &mut limit_reported, child_rel, path, Some(meta));
            }
        }
        // Reverse so the stack pops them in name order.
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(out)
}

/// A directory waiting to be listed.
struct Pending {
    dir: PathBuf,
    rel: String,
    depth: usize,
    /// Reached through a symlinked directory: paths that lead back into DIR are aliases.
    via_link: bool,
    /// DIR's own listing, opened up front so its failure is the caller's error.
    listing: Option<fs::ReadDir>,
}

fn push_file(
    out: &mut Walk,
    limit_reported: &mut bool,
    rel: String,
    path: PathBuf,
    meta: Option<fs::Metadata>,
) {
    if out.files.len() < MAX_FILES {
        out.files.push(Found { rel, path, meta });
    } else if !*limit_reported {
        *limit_reported = true;
        out.problems.push(file_diagnostic(
            &rel,
            REASON_LIMIT_EXCEEDED,
            format!("more than {MAX_FILES} manifest files; this one and later ones are not read"),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str) -> String {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n")
    }

    fn names(state: &DirState) -> Vec<String> {
        state
            .inputs()
            .0
            .services
            .iter()
            .map(|s| s.name().to_string())
            .collect()
    }

    #[test]
    fn is_under_matches_whole_segments() {
        assert!(is_under("a/b.yaml", "a"));
        assert!(is_under("a/b/c.yaml", "a/b"));
        assert!(!is_under("ab/c.yaml", "a"));
        assert!(!is_under("a", "a"));
    }

    #[test]
    fn settled_unchanged_files_are_not_read_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b) = (dir.path().join("a.yaml"), dir.path().join("b.yaml"));
        fs::write(&a, service("one")).expect("write");
        fs::write(&b, service("two")).expect("write");
        let later = SystemTime::now() + Duration::from_secs(10);
        let mut state = DirState::new();
        assert!(
            state
                .rescan_at(dir.path(), later, &HashSet::new())
                .expect("scan")
        );
        let both = state.bytes_read;
        assert_eq!(both, (service("one").len() + service("two").len()) as u64);

        assert!(
            !state
                .rescan_at(dir.path(), later, &HashSet::new())
                .expect("scan")
        );
        assert_eq!(state.bytes_read, both, "nothing changed: nothing read");

        // Replaced by rename, as a ConfigMap update or an editor does: only b is read.
        let tmp = dir.path().join(".b.tmp");
        fs::write(&tmp, service("three")).expect("write");
        fs::rename(&tmp, &b).expect("rename");
        let later = SystemTime::now() + Duration::from_secs(10);
        assert!(
            state
                .rescan_at(dir.path(), later, &HashSet::new())
                .expect("scan")
        );
        assert_eq!(state.bytes_read, both + service("three").len() as u64);
        assert_eq!(names(&state), ["one", "three"]);
    }

    #[test]
    fn a_rewrite_in_place_right_after_a_scan_is_still_seen() {
        // Same length, same inode, mtime set back: only the change time differs, and on a
        // kernel or filesystem with coarse timestamps, within one tick, not even that. A stamp
        // taken before the file settled is never trusted, so the next scan reads it. (Linux
        // 6.13+ gives a change right after a stat a fine-grained ctime, so there this passes
        // without the rule too; the rule is for the rest.)
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("a.yaml");
        fs::write(&file, service("one")).expect("write");
        let mtime = fs::metadata(&file)
            .and_then(|m| m.modified())
            .expect("mtime");
        let mut state = DirState::new();
        assert!(state.rescan(dir.path()).expect("scan"));
        assert_eq!(names(&state), ["one"]);

        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .expect("open");
        io::Write::write_all(&mut f, service("two").as_bytes()).expect("rewrite");
        f.set_modified(mtime).expect("set mtime back");
        drop(f);
        let later = SystemTime::now() + Duration::from_secs(10);
        assert!(
            state
                .rescan_at(dir.path(), later, &HashSet::new())
                .expect("scan")
        );
        assert_eq!(names(&state), ["two"]);
        // Now settled: the next scan at that time does not read it again.
        let read = state.bytes_read;
        assert!(
            !state
                .rescan_at(dir.path(), later, &HashSet::new())
                .expect("scan")
        );
        assert_eq!(state.bytes_read, read);
    }

    #[test]
    fn last_good_objects_survive_an_invalid_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("a.yaml");
        let mut state = DirState::new();
        fs::write(&file, service("one")).expect("write");
        assert!(state.rescan(dir.path()).expect("scan"));
        assert!(
            !state.rescan(dir.path()).expect("scan"),
            "same bytes: no change"
        );

        fs::write(&file, "kind: [").expect("write");
        assert!(state.rescan(dir.path()).expect("scan"));
        assert_eq!(names(&state), ["one"]);
        assert_eq!(state.invalid_files(), 1);
        assert!(
            !state.rescan(dir.path()).expect("scan"),
            "same bad bytes: no change"
        );

        // Another invalid version still keeps the *good* one, not the previous bad one.
        fs::write(&file, "kind: [[").expect("write");
        assert!(state.rescan(dir.path()).expect("scan"));
        assert_eq!(names(&state), ["one"]);

        fs::write(&file, service("two")).expect("write");
        assert!(state.rescan(dir.path()).expect("scan"));
        assert_eq!(names(&state), ["two"]);
        assert_eq!(state.invalid_files(), 0);
        assert!(state.inputs().1.is_empty());
    }

    #[test]
    fn a_vanished_root_keeps_everything_and_is_reported_until_back() {
        let parent = tempfile::tempdir().expect("tempdir");
        let root = parent.path().join("manifests");
        fs::create_dir(&root).expect("mkdir");
        fs::write(root.join("a.yaml"), service("one")).expect("write");
        let mut state = DirState::new();
        assert!(state.refresh(&root, &HashSet::new()));

        fs::remove_dir_all(&root).expect("rm");
        assert!(
            state.refresh(&root, &HashSet::new()),
            "losing DIR is a change (a diagnostic)"
        );
        assert!(
            !state.refresh(&root, &HashSet::new()),
            "still gone: no further change"
        );
        assert_eq!(names(&state), ["one"]);
        let diags = state.inputs().1;
        assert_eq!(diags.len(), 1, "{diags:?}");
        assert_eq!(
            (diags[0].name.as_str(), diags[0].reason.as_str()),
            (".", REASON_DIR_UNREADABLE)
        );

        fs::create_dir(&root).expect("mkdir");
        fs::write(root.join("b.yaml"), service("two")).expect("write");
        assert!(state.refresh(&root, &HashSet::new()));
        assert_eq!(names(&state), ["two"]);
        assert!(state.inputs().1.is_empty());
    }

    #[test]
    fn nesting_deeper_than_the_cap_is_reported_not_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut path = dir.path().to_path_buf();
        for i in 0..=MAX_DEPTH {
            path.push(format!("d{i}"));
        }
        fs::create_dir_all(&path).expect("mkdir");
        fs::write(path.join("deep.yaml"), service("deep")).expect("write");
        fs::write(dir.path().join("d0/ok.yaml"), service("ok")).expect("write");
        let mut state = DirState::new();
        state.rescan(dir.path()).expect("scan");
        assert_eq!(names(&state), ["ok"]);
        let diags = state.inputs().1;
        assert_eq!(diags.len(), 1, "{diags:?}");
        assert_eq!(diags[0].reason, REASON_LIMIT_EXCEEDED);
    }

    #[test]
    fn more_files_than_the_cap_are_reported_and_the_rest_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        for i in 0..=MAX_FILES {
            // Empty files are valid (no documents); names sort so the last one is the extra.
            fs::write(dir.path().join(format!("f{i:05}.yaml")), "").expect("write");
        }
        let mut state = DirState::new();
        state.rescan(dir.path()).expect("scan");
        assert_eq!(state.files.len(), MAX_FILES);
        let diags = state.inputs().1;
        assert_eq!(diags.len(), 1, "{diags:?}");
        assert_eq!(diags[0].reason, REASON_LIMIT_EXCEEDED);
        assert_eq!(diags[0].name, format!("f{MAX_FILES:05}.yaml"));
    }

    #[test]
    fn fifos_are_never_opened() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("pipe.yaml");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo runs");
        assert!(status.success());
        fs::write(dir.path().join("a.yaml"), service("one")).expect("write");
        let mut state = DirState::new();
        // Opening the FIFO would block this test forever.
        state.rescan(dir.path()).expect("scan");
        assert_eq!(names(&state), ["one"]);
    }
}
