//! Golden tests: each `tests/testdata/<case>/` holds Kubernetes YAML (`*.yaml`) and
//! `expected.txt`, the `model::describe` dump of the translated snapshot followed by the
//! diagnostics, one per line. The YAML goes through the real file-provider parser.
//!
//! `UPDATE_GOLDEN=1 cargo test --test golden` rewrites the expected files; review the diff.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use portico::file_source::parse_manifests;
use portico::model::describe;
use portico::translate::{Inputs, Options, translate};

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/testdata")
}

fn sorted_entries(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("dir entry").path())
        .collect();
    v.sort();
    v
}

/// Translate one case directory into its golden text.
fn render(case: &Path) -> String {
    let mut inputs = Inputs::default();
    for file in sorted_entries(case) {
        if file.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = fs::read_to_string(&file).expect("read yaml");
        let objects = parse_manifests(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        inputs.extend_objects(objects);
    }
    let (snapshot, diagnostics) = translate(&inputs, &Options::default());
    let mut out = describe(&snapshot);
    out.push_str("diagnostics:\n");
    if diagnostics.is_empty() {
        out.push_str("  (none)\n");
    }
    for d in &diagnostics {
        let _ = writeln!(out, "  {d}");
    }
    out
}

#[test]
fn golden_cases() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| v == "1");
    let mut failures = Vec::new();
    let mut cases = 0;
    for case in sorted_entries(&testdata()) {
        if !case.is_dir() {
            continue;
        }
        cases += 1;
        let got = render(&case);
        let expected_path = case.join("expected.txt");
        if update {
            fs::write(&expected_path, &got).expect("write expected.txt");
            continue;
        }
        let want = fs::read_to_string(&expected_path).unwrap_or_default();
        if got != want {
            let first = got
                .lines()
                .zip(want.lines().chain(std::iter::repeat("<eof>")))
                .position(|(g, w)| g != w)
                .unwrap_or(0);
            failures.push(format!(
                "{}: differs from expected.txt at line {} (run with UPDATE_GOLDEN=1 to \
                 rewrite)\n--- got ---\n{got}--- want ---\n{want}",
                case.display(),
                first + 1
            ));
        }
    }
    assert!(
        cases >= 5,
        "expected at least 5 golden cases, found {cases}"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Rendering is deterministic: the same directory twice gives the same text.
#[test]
fn golden_render_is_stable() {
    for case in sorted_entries(&testdata()) {
        if case.is_dir() {
            assert_eq!(render(&case), render(&case), "{}", case.display());
        }
    }
}
