//! `crds/` must hold exactly what `portico crd` prints.

#[test]
fn crds_dir_matches_generated_crd() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/ratelimitpolicies.portico.dev.yaml"
    );
    let on_disk = std::fs::read_to_string(path).expect("crds/ file exists");
    let generated = portico::crd::crd_yaml();
    assert!(!generated.is_empty());
    assert_eq!(
        on_disk, generated,
        "crds/ is out of date: run `cargo run -- crd > crds/ratelimitpolicies.portico.dev.yaml`"
    );
}

#[test]
fn binary_prints_the_crd() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portico"))
        .arg("crd")
        .output()
        .expect("run portico crd");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        portico::crd::crd_yaml()
    );
}
