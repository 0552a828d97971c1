//! Keeps the module dependency rules of the design brief (§3) true: which module may import what.

use std::fs;
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = fs::read_dir(&d).unwrap_or_else(|e| panic!("read {}: {e}", d.display()));
        for entry in entries {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// Source lines that are code (not comments).
fn code_of(path: &Path) -> Vec<(usize, String)> {
    let text = fs::read_to_string(path).expect("read source");
    text.lines()
        .enumerate()
        .filter(|(_, l)| {
            let t = l.trim_start();
            !(t.starts_with("//") || t.starts_with("*") || t.starts_with("/*"))
        })
        .map(|(i, l)| (i + 1, l.to_string()))
        .collect()
}

fn assert_no_imports(module: &str, forbidden: &[&str]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let single = root.join(format!("{module}.rs"));
    let files = if single.exists() {
        vec![single]
    } else {
        rust_files(&root.join(module))
    };
    assert!(!files.is_empty(), "module {module} has no files");
    let mut violations = Vec::new();
    for file in files {
        for (n, line) in code_of(&file) {
            for f in forbidden {
                if line.contains(f) {
                    violations.push(format!(
                        "{}:{n}: uses `{f}`: {}",
                        file.display(),
                        line.trim()
                    ));
                }
            }
        }
    }
    assert!(
        violations.is_empty(),
        "{module} breaks the dependency rule:\n{}",
        violations.join("\n")
    );
}

const RUNTIME_AND_IO: &[&str] = &[
    "tokio",
    "hyper",
    "std::fs",
    "std::net::TcpStream",
    "notify::",
    "std::env",
    "SystemTime::now",
    "Instant::now",
];

#[test]
fn model_is_plain_data() {
    let mut forbidden = RUNTIME_AND_IO.to_vec();
    forbidden.extend([
        "kube",
        "k8s_openapi",
        "crate::translate",
        "crate::proxy",
        "crate::publish",
    ]);
    assert_no_imports("model", &forbidden);
}

#[test]
fn translate_is_pure() {
    let mut forbidden = RUNTIME_AND_IO.to_vec();
    forbidden.extend([
        "kube::",
        "crate::proxy",
        "crate::publish",
        "crate::file_source",
        "crate::controller",
    ]);
    assert_no_imports("translate", &forbidden);
}

#[test]
fn proxy_never_sees_kubernetes_types() {
    assert_no_imports(
        "proxy",
        &[
            "kube",
            "k8s_openapi",
            "crate::translate",
            "crate::file_source",
            "crate::controller",
            "crate::crd",
        ],
    );
}

#[test]
fn publish_imports_only_model() {
    assert_no_imports(
        "publish",
        &[
            "tokio",
            "hyper",
            "kube",
            "k8s_openapi",
            "crate::translate",
            "crate::proxy",
            "crate::metrics",
        ],
    );
}

#[test]
fn every_module_has_a_doc_header() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for file in rust_files(&root) {
        let text = fs::read_to_string(&file).expect("read");
        assert!(
            text.trim_start().starts_with("//!"),
            "{} has no `//!` header",
            file.display()
        );
    }
}

#[test]
fn no_unsafe_anywhere() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    for file in rust_files(&root) {
        for (n, line) in code_of(&file) {
            assert!(
                !line.contains("unsafe "),
                "{}:{n} uses unsafe",
                file.display()
            );
        }
    }
}
