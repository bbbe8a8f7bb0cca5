//! The etcd client against a real etcd member (Debian's `etcd-server`; the test-deps
//! script installs it): reads, compare-and-swap transactions, leases, watches, endpoint
//! failover, and the fenced leader election the HA store builds on.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use causeway_controller::etcd::{Compare, Etcd, EtcdError, EtcdOptions, Event, Op};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("a free port")
        .local_addr()
        .unwrap()
        .port()
}

/// One etcd member on loopback, stopped and removed on drop.
struct Member {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Member {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_etcd() -> Member {
    let dir = tempfile::tempdir().unwrap();
    let (client, peer) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let log = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
    let child = Command::new("etcd")
        .args([
            "--name",
            "m1",
            "--data-dir",
            dir.path().join("data").to_str().unwrap(),
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
            "--listen-peer-urls",
            &peer_url,
            "--initial-advertise-peer-urls",
            &peer_url,
            "--initial-cluster",
            &format!("m1={peer_url}"),
        ])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot start etcd ({e}); install it with: apt-get install etcd-server (scripts/install-test-deps.sh does)")
        });
    let member = Member {
        child,
        url,
        _dir: dir,
    };
    wait_ready(&member.url, member._dir.path()).await;
    member
}

async fn wait_ready(url: &str, dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let health = format!("{}/health", url);
    while Instant::now() < deadline {
        if let Ok(out) = Command::new("curl")
            .args(["-fsS", "-m", "1", &health])
            .output()
            && String::from_utf8_lossy(&out.stdout).contains("true")
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "etcd at {url} not healthy after 30 s; its log:\n{}",
        std::fs::read_to_string(dir.join("etcd.log")).unwrap_or_default()
    );
}

fn client(endpoints: &[&str]) -> Etcd {
    Etcd::new(&EtcdOptions {
        endpoints: endpoints.iter().map(|s| s.to_string()).collect(),
        request_timeout: Duration::from_secs(5),
        dial_timeout: Duration::from_millis(500),
        ..EtcdOptions::default()
    })
    .unwrap()
}

#[tokio::test]
async fn reads_writes_and_compare_and_swap() {
    let m = start_etcd().await;
    let etcd = client(&[&m.url]);
    assert_eq!(etcd.get(b"/t/a").await.unwrap(), None);

    // Create-if-absent succeeds once: the token-spend and enrolment pattern.
    let first = etcd
        .txn(&[Compare::absent("/t/a")], &[Op::put("/t/a", "1")], &[])
        .await
        .unwrap();
    assert!(first.succeeded);
    let second = etcd
        .txn(
            &[Compare::absent("/t/a")],
            &[Op::put("/t/a", "2")],
            &[Op::Get {
                key: b"/t/a".to_vec(),
            }],
        )
        .await
        .unwrap();
    assert!(!second.succeeded, "the key exists: the compare fails");
    assert_eq!(
        second.reads.len(),
        1,
        "the failure branch's read comes back"
    );
    assert_eq!(second.reads[0][0].value, b"1");

    // Compare on mod revision: a stale writer loses.
    let kv = etcd.get(b"/t/a").await.unwrap().unwrap();
    assert_eq!(kv.create_revision, first.revision);
    let ok = etcd
        .txn(
            &[Compare::unchanged_since("/t/a", kv.mod_revision)],
            &[Op::put("/t/a", "3")],
            &[],
        )
        .await
        .unwrap();
    assert!(ok.succeeded);
    let stale = etcd
        .txn(
            &[Compare::unchanged_since("/t/a", kv.mod_revision)],
            &[Op::put("/t/a", "4")],
            &[],
        )
        .await
        .unwrap();
    assert!(!stale.succeeded);
    assert_eq!(etcd.get(b"/t/a").await.unwrap().unwrap().value, b"3");

    // Prefix reads are sorted, bounded by the prefix, and can be limited.
    for k in ["/t/b", "/t/c", "/u/x"] {
        etcd.put(k.as_bytes(), b"v", 0).await.unwrap();
    }
    let all = etcd.get_prefix(b"/t/", 0, 0).await.unwrap();
    let keys: Vec<_> = all
        .kvs
        .iter()
        .map(|kv| String::from_utf8(kv.key.clone()).unwrap())
        .collect();
    assert_eq!(keys, ["/t/a", "/t/b", "/t/c"]);
    let page = etcd.get_prefix(b"/t/", 0, 2).await.unwrap();
    assert_eq!((page.kvs.len(), page.more, page.count), (2, true, 3));

    // Delete a prefix in a transaction.
    etcd.txn(
        &[],
        &[Op::DeletePrefix {
            prefix: b"/t/".to_vec(),
        }],
        &[],
    )
    .await
    .unwrap();
    assert_eq!(etcd.get_prefix(b"/t/", 0, 0).await.unwrap().count, 0);
    assert!(etcd.get(b"/u/x").await.unwrap().is_some());
}

#[tokio::test]
async fn leases_hold_keys_until_revoked_or_expired() {
    let m = start_etcd().await;
    let etcd = client(&[&m.url]);
    let (lease, ttl) = etcd.lease_grant(Duration::from_secs(30)).await.unwrap();
    assert_eq!(ttl, Duration::from_secs(30));
    etcd.put(b"/l/k", b"v", lease).await.unwrap();
    assert_eq!(etcd.get(b"/l/k").await.unwrap().unwrap().lease, lease);
    assert!(etcd.lease_keep_alive(lease).await.unwrap().is_some());
    etcd.lease_revoke(lease).await.unwrap();
    assert_eq!(etcd.get(b"/l/k").await.unwrap(), None, "revoking deletes");
    assert_eq!(etcd.lease_keep_alive(lease).await.unwrap(), None);

    // A write under a lease that no longer exists is refused with etcd's reason.
    let err = etcd.put(b"/l/k", b"v", lease).await.unwrap_err();
    assert!(
        matches!(&err, EtcdError::Refused { message, .. } if message.contains("lease not found")),
        "{err}"
    );
}

#[tokio::test]
async fn watches_deliver_changes_in_order_and_resume_from_a_revision() {
    let m = start_etcd().await;
    let etcd = client(&[&m.url]);
    let r1 = etcd.put(b"/w/a", b"1", 0).await.unwrap();
    let mut watch = etcd.watch_prefix(b"/w/", r1).await.unwrap();
    etcd.put(b"/w/b", b"2", 0).await.unwrap();
    etcd.put(b"/other", b"x", 0).await.unwrap();
    etcd.txn(
        &[],
        &[Op::Delete {
            key: b"/w/a".to_vec(),
        }],
        &[],
    )
    .await
    .unwrap();

    let mut seen = Vec::new();
    let mut last = 0;
    while seen.len() < 3 {
        let batch = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("watch events within 10 s")
            .unwrap()
            .expect("stream open");
        assert!(batch.revision >= last, "revisions never go back");
        last = batch.revision;
        for e in batch.events {
            seen.push(match e {
                Event::Put(kv) => format!("put {}", String::from_utf8_lossy(&kv.key)),
                Event::Delete(kv) => format!("delete {}", String::from_utf8_lossy(&kv.key)),
            });
        }
    }
    assert_eq!(seen, ["put /w/a", "put /w/b", "delete /w/a"]);

    // A new watch from a later revision sees only what came after it.
    let mut resumed = etcd.watch_prefix(b"/w/", last).await.unwrap();
    let batch = tokio::time::timeout(Duration::from_secs(10), resumed.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(&batch.events[..], [Event::Delete(kv)] if kv.key == b"/w/a"));
}

#[tokio::test]
async fn a_dead_endpoint_is_skipped_and_all_dead_is_a_clear_error() {
    let m = start_etcd().await;
    let dead = format!("http://127.0.0.1:{}", free_port());
    let etcd = client(&[&dead, &m.url]);
    etcd.put(b"/f", b"1", 0).await.unwrap();
    assert_eq!(etcd.get(b"/f").await.unwrap().unwrap().value, b"1");

    let nobody = client(&[&dead]);
    let err = nobody.get(b"/f").await.unwrap_err().to_string();
    assert!(
        err.contains("etcd is unreachable")
            && err.contains(&dead)
            && err.contains("[store] endpoints"),
        "{err}"
    );
}

#[tokio::test]
async fn a_leader_that_lost_its_lease_cannot_write() {
    let m = start_etcd().await;
    let a = client(&[&m.url]);
    let b = client(&[&m.url]);
    let key = b"/causeway/leader";

    let (lease_a, _) = a.lease_grant(Duration::from_secs(2)).await.unwrap();
    let lead_a = a
        .try_lead(key, b"a", lease_a)
        .await
        .unwrap()
        .expect("a leads");
    let (lease_b, _) = b.lease_grant(Duration::from_secs(30)).await.unwrap();
    assert_eq!(
        b.try_lead(key, b"b", lease_b).await.unwrap(),
        None,
        "one leader"
    );

    // A's writes carry its fence and pass while it leads.
    let w = a
        .txn(&[lead_a.fence()], &[Op::put("/reg/x", "from a")], &[])
        .await
        .unwrap();
    assert!(w.succeeded);

    // A stops renewing (paused past its lease); B takes over once the key is gone.
    let deadline = Instant::now() + Duration::from_secs(20);
    let lead_b = loop {
        if let Some(l) = b.try_lead(key, b"b", lease_b).await.unwrap() {
            break l;
        }
        assert!(Instant::now() < deadline, "a's lease never expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(lead_b.fence > lead_a.fence);

    // A wakes up and writes with its old fence: rejected, nothing changes.
    let late = a
        .txn(&[lead_a.fence()], &[Op::put("/reg/x", "late a")], &[])
        .await
        .unwrap();
    assert!(!late.succeeded, "a fenced-off leader's write must fail");
    assert_eq!(a.get(b"/reg/x").await.unwrap().unwrap().value, b"from a");
    assert!(
        b.txn(&[lead_b.fence()], &[Op::put("/reg/x", "from b")], &[])
            .await
            .unwrap()
            .succeeded
    );
}
