//! The file source: external services from a TOML file, reloaded on change.

mod common;

use causeway_registry::{FileSource, FileSourceConfig};
use common::{Harness, eps, fast_options, stale_of, synced};

const V1: &str = r#"
[[services]]
name = "payments"
namespace = "external"
hosts = ["payments.example.com"]
ports = { https = 443 }

[[services.endpoints]]
address = "203.0.113.10"
"#;

const V2: &str = r#"
[[services]]
name = "payments"
namespace = "external"
hosts = ["payments.example.com"]
ports = { https = 443 }

[[services.endpoints]]
address = "203.0.113.10"

[[services.endpoints]]
address = "203.0.113.11"
"#;

#[tokio::test]
async fn file_changes_are_picked_up_and_bad_files_keep_last_known_good() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("external.toml");
    std::fs::write(&path, V1).unwrap();
    let (mut h, tx) = Harness::new();
    let cfg = FileSourceConfig {
        name: "ext".into(),
        path: path.clone(),
    };
    let task = tokio::spawn(FileSource::new(&cfg, &fast_options()).run(tx));
    h.until("initial", |r| eps(r, "external", "payments").len() == 1)
        .await;
    assert_eq!(h.endpoints("external", "payments")[0].ports["https"], 443);

    std::fs::write(&path, V2).unwrap();
    let d = h
        .until("second endpoint", |r| {
            eps(r, "external", "payments").len() == 2
        })
        .await;
    let added: Vec<_> = d
        .iter()
        .flat_map(|d| d.services.iter())
        .flat_map(|s| s.added.iter())
        .collect();
    assert_eq!(added.len(), 1, "only the new endpoint is a change");
    assert_eq!(added[0].address, "203.0.113.11");
    assert!(
        d.iter()
            .flat_map(|d| d.services.iter())
            .all(|s| s.updated.is_empty() && s.removed.is_empty())
    );

    std::fs::write(
        &path,
        "[[services]]\nname = \"payments\"\nports = { https = \"x\" }\n",
    )
    .unwrap();
    h.until("stale on a bad file", |r| stale_of(r, "ext")).await;
    let err = h.last_error("ext");
    assert!(err.contains("external.toml"), "error names the file: {err}");
    let kept = h.endpoints("external", "payments");
    assert_eq!(kept.len(), 2, "last known good kept");
    assert!(kept.iter().all(|e| e.stale));

    std::fs::remove_file(&path).unwrap();
    h.until("missing file reported", |r| {
        r.sources()["ext"]
            .state
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("cannot read"))
    })
    .await;
    assert_eq!(h.endpoints("external", "payments").len(), 2);

    std::fs::write(&path, V1).unwrap();
    let d = h
        .until("recovered", |r| {
            synced(r, "ext") && eps(r, "external", "payments").len() == 1
        })
        .await;
    assert!(
        d.iter()
            .flat_map(|d| d.services.iter())
            .any(|s| s.removed.len() == 1)
    );
    assert!(h.endpoints("external", "payments").iter().all(|e| !e.stale));
    task.abort();
}
