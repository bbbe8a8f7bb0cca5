//! The admin API under a flood of idle and slowly-sent connections (issue 17 D), with the
//! controller's open-files limit at 1,024 (systemd's default soft limit).
#![allow(clippy::disallowed_methods, reason = "tests may block")]

use std::process::{Command, Stdio};
use std::time::Duration;

use causeway_tests::*;

/// Opens `argv[3]` connections to `argv[1]:argv[2]` and keeps them open: even ones idle,
/// odd ones sending a request head that never ends (one byte every 0.2 s). A connection
/// the server closes is opened again, until the file `argv[4]` exists; then it waits
/// until the server has closed every one. Prints its counts every second.
const FLOOD_PY: &str = r#"
import os, resource, socket, sys, time
host, port, n, stop_file = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if hard != resource.RLIM_INFINITY and hard < n + 100:
    sys.exit("the flood needs %d open files, the hard limit is %d: raise it (ulimit -Hn)" % (n + 100, hard))
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
HEAD = b"GET /healthz HTTP/1.1\r\nHost: flood\r\nX-Slow: "
def connect(i):
    s = socket.socket()
    s.settimeout(5)
    s.connect((host, port))
    s.setblocking(False)
    if i % 2:
        s.send(HEAD)
    return s
socks, opened, closed, reopen, last = {}, 0, 0, True, 0.0
while True:
    if reopen and os.path.exists(stop_file):
        reopen = False
        print("stopped reopening with %d open" % len(socks), flush=True)
    if reopen:
        for i in range(n):
            if i not in socks:
                try:
                    socks[i] = connect(i)
                    opened += 1
                except OSError:
                    pass
                if time.time() - last >= 1:
                    last = time.time()
                    print("opened %d closed_by_server %d open %d" % (opened, closed, len(socks)), flush=True)
    for i, s in list(socks.items()):
        try:
            if not s.recv(4096):
                s.close(); del socks[i]; closed += 1
        except BlockingIOError:
            if i % 2:
                try:
                    s.send(b"x")
                except OSError:
                    pass
        except OSError:
            s.close(); del socks[i]; closed += 1
    if time.time() - last >= 1:
        last = time.time()
        print("opened %d closed_by_server %d open %d" % (opened, closed, len(socks)), flush=True)
    if not reopen and not socks:
        print("all closed by the server: opened %d closed_by_server %d" % (opened, closed), flush=True)
        break
    time.sleep(0.2)
"#;

/// With the open-files limit at 1,024 and 2,000 idle or trickling connections held open
/// (reopened as the server closes them), `causewayctl registry list` still gets its
/// answer, the controller never runs out of descriptors, and the server closes every
/// idle connection after `admin.header_read_timeout` (here 2 s). Before issue 17 the
/// admin server had no header timeout and no connection cap: the flood took every
/// descriptor and `causewayctl` timed out for as long as it was held.
#[test]
fn the_admin_api_answers_through_a_flood_of_idle_connections_with_1024_fds() {
    let t = tempfile::tempdir().unwrap();
    let ctl = Controller::start_with_fd_limit(
        &t.path().join("c"),
        "[admin]\nheader_read_timeout = \"2s\"\nidle_timeout = \"4s\"\n",
        1024,
    );
    let pid = ctl.pid().expect("running");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    assert_eq!(
        line.split_whitespace().nth(3),
        Some("1024"),
        "the controller runs with the soft limit at 1024: {line}"
    );
    ctl.create_web_group();
    let addr = ctl.admin.trim_start_matches("http://").to_owned();
    let (host, port) = addr.rsplit_once(':').unwrap();
    let stop = t.path().join("stop-reopening");
    let flood_log = t.path().join("flood.log");
    let mut flood = Command::new("python3")
        .args(["-c", FLOOD_PY, host, port, "2000", stop.to_str().unwrap()])
        .stdout(std::fs::File::create(&flood_log).unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    let counts = || std::fs::read_to_string(&flood_log).unwrap_or_default();
    let opened = |text: &str| -> u64 {
        text.lines()
            .rev()
            .find_map(|l| l.strip_prefix("opened "))
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    // 1,100 were enough to take every descriptor of the old server.
    wait_for(
        "1100 connections opened to the admin port",
        Duration::from_secs(60),
        || (opened(&counts()) >= 1100).then_some(()),
    );
    let list = ctl.ctl_json(&["registry", "list"]);
    assert!(list.is_array(), "{list}");
    wait_for(
        "2000 connections opened to the admin port",
        Duration::from_secs(60),
        || (opened(&counts()) >= 2000).then_some(()),
    );
    // While the flood holds (and reopens) its connections, a real client is served.
    for _ in 0..3 {
        let list = ctl.ctl_json(&["registry", "list"]);
        assert!(list.is_array(), "{list}");
        let groups = ctl.ctl_ok(&["group", "list"]);
        assert!(groups.contains("web"), "{groups}");
    }
    let before = opened(&counts());
    wait_for(
        "the flood to keep reopening",
        Duration::from_secs(60),
        || (opened(&counts()) > before + 2000).then_some(()),
    );
    let list = ctl.ctl_json(&["registry", "list"]);
    assert!(list.is_array(), "{list}");
    // Then the server closes every idle and trickling connection on its own.
    std::fs::write(&stop, "").unwrap();
    let status = wait_for(
        "the server to close every flood connection",
        Duration::from_secs(60),
        || flood.try_wait().unwrap(),
    );
    let mut err = String::new();
    std::io::Read::read_to_string(flood.stderr.as_mut().unwrap(), &mut err).unwrap();
    let text = counts();
    assert!(
        status.success() && text.contains("all closed by the server"),
        "{status}: {err}\n{text}"
    );
    let log = ctl.log();
    assert!(
        !log.contains("Too many open files") && !log.contains("accept failed"),
        "the controller ran out of descriptors:\n{log}"
    );
    assert!(ctl.ctl_ok(&["group", "list"]).contains("web"));
}
