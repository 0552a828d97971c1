//! The file provider on real temporary directories: walk rules, ConfigMap layout, per-file
//! last-good state, and the live watch (bounded polling with a deadline).

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use portico::file_source::{
    self, FileSource, FileSourceConfig, FileSourceError, KIND_FILE, REASON_DUPLICATE_OBJECT,
    REASON_INVALID_MANIFEST,
};
use portico::metrics::Metrics;
use portico::publish;
use portico::rebuild::{RebuildConfig, Rebuilder, Source, Trigger};
use portico::translate::{Diagnostic, Inputs, Severity};
use tokio::sync::oneshot;

/// Changes must be visible within this (brief §4.4: "within 1 s").
const DEADLINE: Duration = Duration::from_secs(1);

fn service(name: &str, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  ports:\n  - port: {port}\n"
    )
}

fn service_in(ns: &str, name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  ports:\n  - port: 80\n"
    )
}

/// `namespace/name:port` of every Service, sorted.
fn services(inputs: &Inputs) -> Vec<String> {
    let mut out: Vec<String> = inputs
        .services
        .iter()
        .map(|s| {
            let port = s.ports().first().map_or(0, |p| p.port);
            format!("{}/{}:{port}", s.namespace(), s.name())
        })
        .collect();
    out.sort();
    out
}

fn write(path: &Path, text: &str) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).expect("mkdir");
    }
    fs::write(path, text).expect("write");
}

/// Replace `path` atomically: write a hidden temp file next to it, then rename over it.
fn replace_atomically(path: &Path, text: &str) {
    let tmp = path.with_file_name(".tmp-replace");
    fs::write(&tmp, text).expect("write tmp");
    fs::rename(&tmp, path).expect("rename over");
}

fn invalid_files(diags: &[Diagnostic]) -> Vec<String> {
    diags
        .iter()
        .filter(|d| d.kind == KIND_FILE && d.reason == REASON_INVALID_MANIFEST)
        .map(|d| d.name.clone())
        .collect()
}

struct Live {
    source: Arc<FileSource>,
    metrics: Metrics,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

async fn start_live(config: FileSourceConfig) -> Live {
    let metrics = Metrics::new();
    let (stop, stopped) = oneshot::channel::<()>();
    let (source, task) = FileSource::start(config, metrics.clone(), Trigger::new(), async {
        let _ = stopped.await;
    })
    .await
    .expect("start");
    Live {
        source,
        metrics,
        stop: Some(stop),
        task,
    }
}

impl Live {
    /// Poll the source's inputs until `check` holds; panics after [`DEADLINE`].
    async fn until(&self, what: &str, check: impl Fn(&Inputs, &[Diagnostic]) -> bool) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let (inputs, diags) = self.source.inputs();
            if check(&inputs, &diags) {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                panic!(
                    "not within {DEADLINE:?}: {what}; services now {:?}, diagnostics {diags:?}",
                    services(&inputs)
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(2), self.task)
            .await
            .expect("watch task stops on shutdown")
            .expect("watch task did not panic");
    }
}

// ---------------------------------------------------------------- one-shot scans (load_dir)

#[test]
fn subdirectories_are_read_and_hidden_entries_and_other_files_ignored() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write(&d.join("a.yaml"), &service("a", 80));
    write(&d.join("team/b.yml"), &service("b", 80));
    write(&d.join("team/deeper/c.YAML"), &service("c", 80));
    write(&d.join(".hidden.yaml"), &service("hidden-file", 80));
    write(&d.join(".git/d.yaml"), &service("hidden-dir", 80));
    write(
        &d.join("team/.cache/e.yaml"),
        &service("nested-hidden-dir", 80),
    );
    write(&d.join("notes.txt"), &service("txt", 80));
    write(&d.join("f.json"), "{}");
    let (inputs, diags) = file_source::load_dir(d).expect("load");
    assert_eq!(
        services(&inputs),
        vec!["default/a:80", "default/b:80", "default/c:80"]
    );
    assert!(diags.is_empty(), "{diags:?}");
}

#[test]
fn multi_document_files_and_namespace_defaulting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = format!(
        "# routes for the shop\n---\n{}---\n{}---\n# nothing here\n---\napiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata:\n  name: portico\nspec:\n  controller: portico.dev/ingress-controller\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: ignored\n",
        service("web", 80),
        service_in("shop", "api")
    );
    write(&dir.path().join("all.yaml"), &text);
    let (inputs, diags) = file_source::load_dir(dir.path()).expect("load");
    assert!(diags.is_empty(), "{diags:?}");
    assert_eq!(services(&inputs), vec!["default/web:80", "shop/api:80"]);
    assert_eq!(inputs.ingress_classes.len(), 1);
    // IngressClass is cluster-scoped: no namespace is invented for it.
    assert_eq!(inputs.ingress_classes[0].metadata.namespace, None);
}

#[test]
fn symlinked_files_are_followed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let elsewhere = tempfile::tempdir().expect("tempdir");
    write(&elsewhere.path().join("real.yaml"), &service("linked", 80));
    symlink(
        elsewhere.path().join("real.yaml"),
        dir.path().join("link.yaml"),
    )
    .expect("symlink");
    // A dangling link is just absent, not an error.
    symlink(
        dir.path().join("gone.yaml"),
        dir.path().join("dangling.yaml"),
    )
    .expect("symlink");
    let (inputs, diags) = file_source::load_dir(dir.path()).expect("load");
    assert_eq!(services(&inputs), vec!["default/linked:80"]);
    assert!(diags.is_empty(), "{diags:?}");
}

/// A link to a manifest inside DIR (`current.yaml → releases/v2.yaml`) is an alias of a file
/// the walk reads anyway: its objects are read once, not reported as duplicates of themselves.
#[test]
fn a_symlinked_file_inside_the_dir_is_read_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(&dir.path().join("releases/v2.yaml"), &service("web", 80));
    symlink("releases/v2.yaml", dir.path().join("current.yaml")).expect("symlink");
    // A link to a file the walk does not read by itself (not *.yaml) is still followed.
    write(&dir.path().join("raw/web-api.txt"), &service("api", 80));
    symlink("raw/web-api.txt", dir.path().join("api.yaml")).expect("symlink");
    let (inputs, diags) = file_source::load_dir(dir.path()).expect("load");
    assert_eq!(services(&inputs), ["default/api:80", "default/web:80"]);
    assert!(diags.is_empty(), "{diags:?}");
}

/// Names that are not UTF-8 are reported and not read: as text keys two of them could
/// collide, and one file's objects would vanish.
#[test]
fn file_names_that_are_not_utf8_are_reported() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().expect("tempdir");
    for (byte, name) in [(0xfe_u8, "a"), (0xff, "b")] {
        let bytes = [b'x', byte, b'.', b'y', b'a', b'm', b'l'];
        let file = std::ffi::OsStr::from_bytes(&bytes);
        fs::write(dir.path().join(file), service(name, 80)).expect("write");
    }
    write(&dir.path().join("ok.yaml"), &service("ok", 80));
    // Not a manifest name: ignored like any other file.
    let notes = std::ffi::OsStr::from_bytes(b"notes-caf\xe9.txt");
    fs::write(dir.path().join(notes), "x").expect("write");
    let (inputs, diags) = file_source::load_dir(dir.path()).expect("load");
    assert_eq!(services(&inputs), ["default/ok:80"]);
    let reported: Vec<_> = diags
        .iter()
        .filter(|d| d.reason == REASON_INVALID_MANIFEST && d.message.contains("UTF-8"))
        .collect();
    assert_eq!(reported.len(), 2, "{diags:?}");
}

#[test]
fn symlinked_directories_outside_are_followed_once_and_cycles_are_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    write(&elsewhere.path().join("x.yaml"), &service("outside", 80));
    // A link back to the outside dir itself (a cycle) and back into DIR.
    symlink(elsewhere.path(), elsewhere.path().join("again")).expect("symlink");
    symlink(d, elsewhere.path().join("back-into-dir")).expect("symlink");
    write(&d.join("real/y.yaml"), &service("inside", 80));
    symlink(elsewhere.path(), d.join("ext")).expect("symlink");
    symlink(elsewhere.path(), d.join("ext2")).expect("symlink");
    // Links to directories inside DIR (including DIR itself) are aliases: not read twice.
    symlink(d.join("real"), d.join("alias")).expect("symlink");
    symlink(d, d.join("loop")).expect("symlink");
    let (inputs, diags) = file_source::load_dir(d).expect("load");
    assert_eq!(
        services(&inputs),
        vec!["default/inside:80", "default/outside:80"]
    );
    assert!(diags.is_empty(), "no duplicates expected: {diags:?}");
}

/// The layout kubelet gives a ConfigMap volume. A key with a nested `path` (`items: [{key,
/// path: team-a/a.yaml}]`) is linked by its first component only: `team-a -> ..data/team-a`.
fn configmap_layout(d: &Path, version: &str, files: &[(&str, String)]) {
    let data_dir = d.join(version);
    fs::create_dir_all(&data_dir).expect("mkdir");
    for (name, text) in files {
        let path = data_dir.join(name);
        fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        fs::write(path, text).expect("write");
    }
    let tmp = d.join("..data_tmp");
    symlink(version, &tmp).expect("symlink");
    // rename(2) replaces the old `..data` link atomically, as kubelet's AtomicWriter does.
    fs::rename(&tmp, d.join("..data")).expect("swap ..data");
    for (name, _) in files {
        let top = name.split('/').next().expect("a first component");
        let link = d.join(top);
        if fs::symlink_metadata(&link).is_err() {
            symlink(format!("..data/{top}"), &link).expect("symlink");
        }
    }
}

#[test]
fn configmap_volume_layout_is_read_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    configmap_layout(
        dir.path(),
        "..2026_12_01_10_00_00.000000001",
        &[
            ("web.yaml", service("web", 80)),
            ("api.yml", service("api", 81)),
        ],
    );
    let (inputs, diags) = file_source::load_dir(dir.path()).expect("load");
    assert_eq!(services(&inputs), vec!["default/api:81", "default/web:80"]);
    assert!(diags.is_empty(), "{diags:?}");
}

/// Keys mounted at nested paths live only under the hidden timestamped directory, reached
/// through a link into DIR: that link is followed (it is no alias of anything the walk reads).
#[test]
fn configmap_items_at_nested_paths_are_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    configmap_layout(
        dir.path(),
        "..2026_12_01_10_00_00.000000001",
        &[
            ("team-a/web.yaml", service("web", 80)),
            ("team-a/deep/api.yaml", service("api", 81)),
            ("top.yaml", service("top", 82)),
        ],
    );
    let (inputs, diags) = file_source::load_dir(dir.path()).expect("load");
    assert_eq!(
        services(&inputs),
        vec!["default/api:81", "default/top:82", "default/web:80"]
    );
    assert!(diags.is_empty(), "{diags:?}");
}

#[test]
fn invalid_files_are_diagnostics_and_do_not_affect_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(&dir.path().join("good.yaml"), &service("good", 80));
    write(
        &dir.path().join("sub/bad.yaml"),
        "kind: Service\nspec: [unclosed\n",
    );
    write(
        &dir.path().join("noname.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {namespace: x}\n",
    );
    let (inputs, diags) = file_source::load_dir(dir.path()).expect("load");
    assert_eq!(services(&inputs), vec!["default/good:80"]);
    assert_eq!(invalid_files(&diags), vec!["noname.yaml", "sub/bad.yaml"]);
    for d in &diags {
        assert_eq!(d.severity, Severity::Error);
        assert_eq!(d.namespace, "");
    }
}

#[test]
fn oversized_file_is_invalid() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut text = service("big", 80);
    text.push_str(&"#".repeat(file_source::MAX_FILE_SIZE as usize));
    write(&dir.path().join("big.yaml"), &text);
    let (inputs, diags) = file_source::load_dir(dir.path()).expect("load");
    assert!(inputs.services.is_empty());
    assert_eq!(invalid_files(&diags), vec!["big.yaml"]);
    assert!(diags[0].message.contains("larger than"), "{diags:?}");
}

#[test]
fn an_object_in_two_files_is_taken_from_the_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(&dir.path().join("a.yaml"), &service("web", 80));
    write(&dir.path().join("b.yaml"), &service("web", 9999));
    let (inputs, diags) = file_source::load_dir(dir.path()).expect("load");
    assert_eq!(services(&inputs), vec!["default/web:80"]);
    assert_eq!(diags.len(), 1, "{diags:?}");
    assert_eq!(diags[0].reason, REASON_DUPLICATE_OBJECT);
    assert_eq!(
        (
            diags[0].kind.as_str(),
            diags[0].namespace.as_str(),
            diags[0].name.as_str()
        ),
        ("Service", "default", "web")
    );
    assert!(diags[0].message.contains("b.yaml"));
}

#[test]
fn unreadable_dir_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let missing = dir.path().join("nope");
    match file_source::load_dir(&missing) {
        Err(FileSourceError::ReadDir { path, .. }) => assert_eq!(path, missing),
        other => panic!("expected ReadDir error, got {other:?}"),
    }
    let file = dir.path().join("file.yaml");
    write(&file, &service("x", 80));
    assert!(file_source::load_dir(&file).is_err(), "a file is not a dir");
}

// ---------------------------------------------------------------- live watch

#[tokio::test]
async fn start_fails_on_a_missing_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    let res = FileSource::start(
        FileSourceConfig::new(dir.path().join("missing")),
        Metrics::new(),
        Trigger::new(),
        std::future::pending(),
    )
    .await;
    assert!(matches!(res, Err(FileSourceError::ReadDir { .. })));
}

#[tokio::test]
async fn edits_renames_creates_and_deletes_apply_live() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_path_buf();
    write(&d.join("a.yaml"), &service("a", 80));
    write(&d.join("sub/b.yaml"), &service("b", 80));
    let live = start_live(FileSourceConfig::new(&d)).await;
    assert!(live.source.is_watching());
    assert_eq!(
        services(&live.source.inputs().0),
        vec!["default/a:80", "default/b:80"]
    );

    // In-place edit.
    write(&d.join("a.yaml"), &service("a", 81));
    live.until("edit of a.yaml", |i, _| {
        services(i) == ["default/a:81", "default/b:80"]
    })
    .await;

    // Atomic rename-over (how editors and `kubectl cp`-style tools save).
    replace_atomically(&d.join("sub/b.yaml"), &service("b", 82));
    live.until("rename over sub/b.yaml", |i, _| {
        services(i) == ["default/a:81", "default/b:82"]
    })
    .await;

    // New file in a new subdirectory.
    write(&d.join("new/deeper/c.yaml"), &service("c", 80));
    live.until("new file in a new directory", |i, _| {
        services(i) == ["default/a:81", "default/b:82", "default/c:80"]
    })
    .await;

    // Deletion: its objects go away.
    fs::remove_file(d.join("a.yaml")).expect("rm");
    live.until("delete of a.yaml", |i, _| {
        services(i) == ["default/b:82", "default/c:80"]
    })
    .await;

    // A whole directory removed.
    fs::remove_dir_all(d.join("new")).expect("rm -r");
    live.until("removal of new/", |i, _| services(i) == ["default/b:82"])
        .await;
    live.stop().await;
}

#[tokio::test]
async fn a_file_turning_invalid_keeps_its_last_good_objects_until_fixed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_path_buf();
    write(&d.join("a.yaml"), &service("a", 80));
    write(&d.join("b.yaml"), &service("b", 80));
    let live = start_live(FileSourceConfig::new(&d)).await;
    assert_eq!(live.metrics.manifest_files_invalid.get(), 0);

    replace_atomically(
        &d.join("a.yaml"),
        "apiVersion: v1\nkind: Service\nspec: [oops\n",
    );
    live.until("a.yaml reported invalid", |_, diags| {
        invalid_files(diags) == ["a.yaml"]
    })
    .await;
    let (inputs, diags) = live.source.inputs();
    assert_eq!(
        services(&inputs),
        vec!["default/a:80", "default/b:80"],
        "last good version of a.yaml keeps serving"
    );
    assert!(diags[0].message.contains("last good"), "{diags:?}");
    assert_eq!(live.metrics.manifest_files_invalid.get(), 1);

    // Another file still applies while a.yaml is broken.
    replace_atomically(&d.join("b.yaml"), &service("b", 90));
    live.until("b.yaml edit while a.yaml is invalid", |i, d| {
        services(i) == ["default/a:80", "default/b:90"] && invalid_files(d) == ["a.yaml"]
    })
    .await;

    // Fixed (with new content): report cleared, new version serves.
    replace_atomically(&d.join("a.yaml"), &service("a", 81));
    live.until("a.yaml fixed", |i, d| {
        services(i) == ["default/a:81", "default/b:90"] && d.is_empty()
    })
    .await;
    assert_eq!(live.metrics.manifest_files_invalid.get(), 0);

    // Invalid, then deleted: both the objects and the report go away.
    replace_atomically(&d.join("a.yaml"), "::: not yaml");
    live.until("a.yaml invalid again", |_, d| {
        invalid_files(d) == ["a.yaml"]
    })
    .await;
    fs::remove_file(d.join("a.yaml")).expect("rm");
    live.until("a.yaml deleted", |i, d| {
        services(i) == ["default/b:90"] && d.is_empty()
    })
    .await;
    assert_eq!(live.metrics.manifest_files_invalid.get(), 0);
    live.stop().await;
}

#[tokio::test]
async fn a_new_file_that_is_invalid_from_the_start_serves_nothing_and_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_path_buf();
    write(&d.join("ok.yaml"), &service("ok", 80));
    let live = start_live(FileSourceConfig::new(&d)).await;
    write(
        &d.join("broken.yml"),
        "apiVersion: v1\nkind: Service\nmetadata: [x\n",
    );
    live.until("broken.yml reported", |i, d| {
        invalid_files(d) == ["broken.yml"] && services(i) == ["default/ok:80"]
    })
    .await;
    assert_eq!(live.metrics.manifest_files_invalid.get(), 1);
    live.stop().await;
}

#[tokio::test]
async fn configmap_data_swap_is_picked_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_path_buf();
    configmap_layout(
        &d,
        "..2026_12_01_10_00_00.000000001",
        &[("web.yaml", service("web", 80))],
    );
    let live = start_live(FileSourceConfig::new(&d)).await;
    assert_eq!(services(&live.source.inputs().0), vec!["default/web:80"]);

    // kubelet's update: new timestamped dir, `..data` swapped atomically, old dir removed.
    configmap_layout(
        &d,
        "..2026_12_01_10_05_00.000000002",
        &[
            ("web.yaml", service("web", 8080)),
            ("api.yaml", service("api", 80)),
            ("nested/deep.yaml", service("deep", 80)),
        ],
    );
    fs::remove_dir_all(d.join("..2026_12_01_10_00_00.000000001")).expect("rm old");
    live.until("..data swap", |i, d| {
        services(i) == ["default/api:80", "default/deep:80", "default/web:8080"] && d.is_empty()
    })
    .await;

    // A key removed from the ConfigMap: swap, then kubelet removes the dangling link.
    configmap_layout(
        &d,
        "..2026_12_01_10_10_00.000000003",
        &[("web.yaml", service("web", 8080))],
    );
    fs::remove_dir_all(d.join("..2026_12_01_10_05_00.000000002")).expect("rm old");
    live.until("key removed (dangling link)", |i, d| {
        services(i) == ["default/web:8080"] && d.is_empty()
    })
    .await;
    fs::remove_file(d.join("api.yaml")).expect("rm link");
    fs::remove_file(d.join("nested")).expect("rm link");
    live.stop().await;
}

#[tokio::test]
async fn edits_of_symlink_targets_outside_the_dir_apply_live() {
    let dir = tempfile::tempdir().expect("tempdir");
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_path_buf();
    let e = elsewhere.path().to_path_buf();
    write(&e.join("file/x.yaml"), &service("x", 80));
    write(&e.join("tree/y.yaml"), &service("yy", 80));
    symlink(e.join("file/x.yaml"), d.join("x.yaml")).expect("symlink");
    let live = start_live(FileSourceConfig::new(&d)).await;
    assert_eq!(services(&live.source.inputs().0), vec!["default/x:80"]);

    replace_atomically(&e.join("file/x.yaml"), &service("x", 81));
    live.until("edit of the link target", |i, _| {
        services(i) == ["default/x:81"]
    })
    .await;

    // A directory link made after start, then an edit inside its target.
    symlink(e.join("tree"), d.join("tree")).expect("symlink");
    live.until("new directory link", |i, _| {
        services(i) == ["default/x:81", "default/yy:80"]
    })
    .await;
    write(&e.join("tree/y.yaml"), &service("yy", 82));
    live.until("edit inside the linked directory", |i, _| {
        services(i) == ["default/x:81", "default/yy:82"]
    })
    .await;
    live.stop().await;
}

#[tokio::test]
async fn an_idle_directory_is_not_rescanned_by_its_own_reads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_path_buf();
    for i in 0..5 {
        write(
            &d.join(format!("sub{i}/f.yaml")),
            &service(&format!("s{i}"), 80),
        );
    }
    let mut config = FileSourceConfig::new(&d);
    config.rescan_interval = Duration::from_secs(600);
    let live = start_live(config).await;
    // Our reads open files and directories (inotify IN_OPEN): if those counted as changes
    // the task would rescan in a loop. Observe a window several settle periods long.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(live.source.rescans(), 1, "only the first scan");
    assert_eq!(live.source.changes(), 0);
    live.stop().await;
}

#[tokio::test]
async fn touching_a_file_without_changing_it_is_not_a_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_path_buf();
    write(&d.join("a.yaml"), &service("a", 80));
    let mut config = FileSourceConfig::new(&d);
    // Only event-driven rescans in this test.
    config.rescan_interval = Duration::from_secs(600);
    let live = start_live(config).await;
    let (rescans, changes) = (live.source.rescans(), live.source.changes());

    let file = fs::File::options()
        .append(true)
        .open(d.join("a.yaml"))
        .expect("open");
    file.set_modified(SystemTime::now() + Duration::from_secs(5))
        .expect("touch");
    drop(file);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while live.source.rescans() == rescans {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the touch caused no rescan"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(live.source.changes(), changes, "same bytes are no change");

    // Files that are not manifests (hidden, other extensions) are no change either.
    let rescans = live.source.rescans();
    write(&d.join(".a.yaml.swp"), "swap");
    write(&d.join("notes.txt"), &service("txt", 80));
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while live.source.rescans() == rescans {
        assert!(tokio::time::Instant::now() < deadline, "no rescan");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        live.source.changes(),
        changes,
        "ignored files are no change"
    );

    // A real change is counted.
    write(&d.join("a.yaml"), &service("a", 81));
    live.until("edit", |i, _| services(i) == ["default/a:81"])
        .await;
    assert!(live.source.changes() > changes);
    live.stop().await;
}

#[tokio::test]
async fn periodic_rescan_catches_changes_without_the_watch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_path_buf();
    write(&d.join("a.yaml"), &service("a", 80));
    let mut config = FileSourceConfig::new(&d);
    config.watch = false;
    config.rescan_interval = Duration::from_millis(200);
    let live = start_live(config).await;
    assert!(!live.source.is_watching());
    write(&d.join("a.yaml"), &service("a", 81));
    live.until("edit seen by the periodic rescan", |i, _| {
        services(i) == ["default/a:81"]
    })
    .await;
    live.stop().await;
}

/// A wrapper that counts builds of the rebuild loop over a file source.
struct Counted {
    inner: Arc<FileSource>,
    builds: tokio::sync::mpsc::UnboundedSender<()>,
}

impl Source for Counted {
    fn inputs(&self) -> (Inputs, Vec<Diagnostic>) {
        let _ = self.builds.send(());
        self.inner.inputs()
    }
}

#[tokio::test]
async fn file_changes_reach_the_rebuild_loop_within_a_second() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_path_buf();
    write(&d.join("a.yaml"), &service("a", 80));
    let metrics = Metrics::new();
    let trigger = Trigger::new();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let (source, watch_task) = FileSource::start(
        FileSourceConfig::new(&d),
        metrics.clone(),
        trigger.clone(),
        stopped(stop_rx.clone()),
    )
    .await
    .expect("start");
    let (publisher, reader) = publish::channel();
    let rebuilder = Rebuilder::new(RebuildConfig::default(), publisher, metrics, trigger);
    let mut diagnostics = rebuilder.diagnostics();
    let (builds_tx, mut builds) = tokio::sync::mpsc::unbounded_channel();
    let counted = Counted {
        inner: source,
        builds: builds_tx,
    };
    let rebuild_task = tokio::spawn(async move {
        rebuilder.run(&counted, stopped(stop_rx)).await;
    });
    tokio::time::timeout(DEADLINE, builds.recv())
        .await
        .expect("first build at once")
        .expect("alive");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !reader.is_ready() {
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    write(&d.join("a.yaml"), "kind: [broken\n");
    tokio::time::timeout(
        DEADLINE,
        diagnostics.wait_for(|d| invalid_files(d) == ["a.yaml"]),
    )
    .await
    .expect("invalid file reported through the loop within 1 s")
    .expect("alive");
    write(&d.join("a.yaml"), &service("a", 80));
    tokio::time::timeout(DEADLINE, diagnostics.wait_for(|d| d.is_empty()))
        .await
        .expect("fix reported through the loop within 1 s")
        .expect("alive");

    stop_tx.send_replace(true);
    for task in [watch_task, rebuild_task] {
        tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .expect("stops on shutdown")
            .expect("no panic");
    }
}

/// Wait (bounded) until the source has finished a rescan after `seen` ones.
async fn rescanned_after(live: &Live, seen: u64) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while live.source.rescans() <= seen {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no rescan within {DEADLINE:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `kubectl get -o yaml > a.yaml` and `helm template > a.yaml`: the shell truncates the file
/// first, and the writer may pause before (and while) writing. Until the file is closed its
/// last version keeps serving; a new file is not read before its close either.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_file_being_written_keeps_its_last_version_until_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    being_written(dir.path().to_path_buf()).await;
}

/// The same with `--manifests` given as a relative path (notify reports absolute ones).
#[cfg(target_os = "linux")]
#[tokio::test]
async fn a_file_being_written_is_held_with_a_relative_dir_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cwd = std::env::current_dir().expect("cwd");
    let mut relative = std::path::PathBuf::new();
    for _ in cwd.components().skip(1) {
        relative.push("..");
    }
    relative.push(dir.path().strip_prefix("/").expect("absolute tempdir"));
    assert!(relative.is_relative());
    being_written(relative).await;
}

#[cfg(target_os = "linux")]
async fn being_written(d: std::path::PathBuf) {
    use std::io::Write;
    write(&d.join("a.yaml"), &service("a", 80));
    // Only event-driven rescans, so each one counted below follows the write before it.
    let mut config = FileSourceConfig::new(&d);
    config.rescan_interval = Duration::from_secs(3600);
    let live = start_live(config).await;
    assert_eq!(services(&live.source.inputs().0), ["default/a:80"]);

    let seen = live.source.rescans();
    let mut f = fs::File::create(d.join("a.yaml")).expect("truncate");
    rescanned_after(&live, seen).await;
    assert_eq!(
        services(&live.source.inputs().0),
        ["default/a:80"],
        "the truncated file is not served"
    );
    let text = service("a", 81) + "---\n" + &service("a2", 81);
    let (first, rest) = text.split_at(text.find("---").expect("separator"));
    let seen = live.source.rescans();
    f.write_all(first.as_bytes()).expect("write");
    f.flush().expect("flush");
    rescanned_after(&live, seen).await;
    assert_eq!(
        services(&live.source.inputs().0),
        ["default/a:80"],
        "half the new version is not served"
    );
    // A new file, open and half written.
    let seen = live.source.rescans();
    let mut g = fs::File::create(d.join("b.yaml")).expect("create");
    g.write_all(b"apiVersion: v1\nkind: Serv").expect("write");
    rescanned_after(&live, seen).await;
    let (inputs, diags) = live.source.inputs();
    assert_eq!(services(&inputs), ["default/a:80"]);
    assert!(
        diags.is_empty(),
        "the half-written new file is not read: {diags:?}"
    );

    f.write_all(rest.as_bytes()).expect("write");
    drop(f);
    live.until("a.yaml closed", |i, _| {
        services(i) == ["default/a2:81", "default/a:81"]
    })
    .await;
    g.write_all(b"ice\nmetadata: {name: b}\nspec: {ports: [{port: 80}]}\n")
        .expect("write");
    drop(g);
    live.until("b.yaml closed", |i, d| {
        services(i) == ["default/a2:81", "default/a:81", "default/b:80"] && d.is_empty()
    })
    .await;
    live.stop().await;
}

/// DIR as a symlink pointed at another release directory (`current → release-2`), the usual
/// way to switch a whole set at once: the new directory is read, and from then on watched, so
/// its edits apply live again (before, the watch stayed on the old directory and only the 2 s
/// safety-net rescan saw anything).
#[tokio::test]
async fn a_replaced_dir_is_watched_again() {
    let top = tempfile::tempdir().expect("tempdir");
    let t = top.path().to_path_buf();
    write(&t.join("release-1/web.yaml"), &service("web", 80));
    write(&t.join("release-2/web.yaml"), &service("web", 81));
    symlink("release-1", t.join("current")).expect("symlink");
    let mut config = FileSourceConfig::new(t.join("current"));
    config.rescan_interval = Duration::from_secs(3);
    let live = start_live(config).await;
    assert_eq!(services(&live.source.inputs().0), ["default/web:80"]);

    // Switch atomically: a new link renamed over the old one.
    symlink("release-2", t.join("current.new")).expect("symlink");
    fs::rename(t.join("current.new"), t.join("current")).expect("switch");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while live.source.rearms() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no re-arm");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    live.until("release-2 read", |i, _| services(i) == ["default/web:81"])
        .await;
    // The re-arm asks for one more rescan (changes made before the new watch existed); after
    // it, well before the next periodic rescan, only the new watch can see an edit.
    let seen = live.source.rescans();
    rescanned_after(&live, seen).await;
    write(&t.join("release-2/web.yaml"), &service("web", 82));
    live.until("edit in the new directory", |i, _| {
        services(i) == ["default/web:82"]
    })
    .await;
    live.stop().await;
}
