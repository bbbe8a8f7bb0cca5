//! The wire messages are generated from `api/proto/*.proto` by prost-build, with protox
//! as the protobuf compiler (pure Rust: no `protoc` to install), and the generated code is
//! committed (`src/wire/causeway.v1.rs`), so a build needs nothing but the Rust
//! toolchain. This test generates it again and fails when the committed file is stale;
//! `CAUSEWAY_REGENERATE=1 cargo test -p causeway-api --test generated` rewrites it.

use std::path::Path;

/// Extra derives: the admin API shows denials and refused services as JSON, and the
/// agent sorts refused services and removed-service names.
const TYPE_ATTRIBUTES: &[(&str, &str)] = &[
    (
        ".causeway.v1.Denial",
        "#[derive(::serde::Serialize, ::serde::Deserialize)]",
    ),
    (
        ".causeway.v1.ServiceRejection",
        "#[derive(PartialOrd, Ord, ::serde::Serialize, ::serde::Deserialize)]",
    ),
    (".causeway.v1.ServiceRef", "#[derive(PartialOrd, Ord)]"),
    (
        ".causeway.v1.AgentFacts",
        "#[derive(::serde::Serialize, ::serde::Deserialize)]",
    ),
];

fn generate(out: &Path) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fds = protox::compile(
        ["errors.proto", "control.proto", "push.proto"],
        [root.join("proto")],
    )
    .unwrap_or_else(|e| panic!("api/proto does not compile: {e}"));
    let mut config = prost_build::Config::new();
    config.out_dir(out).btree_map(["."]);
    for (path, attr) in TYPE_ATTRIBUTES {
        config.type_attribute(path, attr);
    }
    config
        .compile_fds(fds)
        .unwrap_or_else(|e| panic!("prost-build failed: {e}"));
}

#[test]
fn the_committed_wire_code_is_generated_from_the_proto_files() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let committed = root.join("src/wire/causeway.v1.rs");
    let tmp = tempfile::tempdir().unwrap();
    generate(tmp.path());
    let fresh = std::fs::read_to_string(tmp.path().join("causeway.v1.rs")).unwrap();
    if std::env::var_os("CAUSEWAY_REGENERATE").is_some() {
        std::fs::write(&committed, &fresh).unwrap();
        return;
    }
    let old = std::fs::read_to_string(&committed).unwrap_or_default();
    assert!(
        old == fresh,
        "{} is stale: api/proto changed without regenerating it; run \
         `CAUSEWAY_REGENERATE=1 cargo test -p causeway-api --test generated` and commit the result",
        committed.display()
    );
}
