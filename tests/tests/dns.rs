//! The agent's DNS end to end, in network namespaces the test creates: a controller with
//! a fake Consul, a fake Eureka and a file source (namespace `ctl`), a "VM" with the agent
//! and capture on (`vm1`), a server without an agent (`vm2`), and a real dnsmasq as the
//! VM's upstream resolver (`dns`). The VM's /etc/resolv.conf (its per-namespace file under
//! /etc/netns) names dnsmasq only: every query of `getent`, `dig` and Python reaches the
//! agent through the port-53 capture. Needs root; fails loudly without it.
#![allow(clippy::disallowed_methods, reason = "tests may block")]

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use causeway_api::push::MeshState;
use causeway_tests::netns::{Lab, Node, Proc, require_root};
use causeway_tests::{bin, describe, wait_for};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

/// Echo server: first line names the server, then echoes until EOF.
const SERVER_PY: &str = r#"
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(128)
def h(c):
    c.sendall(("name=%s\n" % sys.argv[2]).encode())
    while True:
        d = c.recv(65536)
        if not d: break
        c.sendall(d)
    c.close()
while True:
    c, a = s.accept(); threading.Thread(target=h, args=(c,), daemon=True).start()
"#;

/// A libc client: resolves argv[1] with getaddrinfo (as any application does), connects,
/// prints the peer address and what the server says.
const CONNECT_PY: &str = r#"
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
print("peer=%s" % c.getpeername()[0])
c.sendall(b"hello"); c.shutdown(socket.SHUT_WR)
b = b""
while True:
    d = c.recv(65536)
    if not d: break
    b += d
sys.stdout.write(b.decode())
"#;

/// Hostile and unusual queries against the VM's resolver (argv[1], port 53: captured).
const PROBE_PY: &str = r#"
import socket, struct, sys
srv = (sys.argv[1], 53)
def q(name, qtype=1, qid=0x1234):
    hdr = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    return hdr + b"".join(bytes([len(l)]) + l.encode() for l in name.split(".")) + b"\0" + struct.pack(">HH", qtype, 1)
def head(b):
    qid, flags, qd, an, ns, ar = struct.unpack(">HHHHHH", b[:12])
    return qid, flags & 0xf, an
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)
def ask(pkt):
    # One resend after 5 s of silence, as a DNS client would, from a new socket (a new
    # source port: a stale conntrack entry of an earlier flow on the same ports would
    # carry the packet past the capture again). What is checked is the answer. A resend
    # is reported on stderr.
    global u
    for attempt in (1, 2):
        u.sendto(pkt, srv)
        try:
            return head(u.recv(65535))
        except socket.timeout:
            if attempt == 2:
                raise
            print("RESENT after 5 s without an answer", file=sys.stderr)
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)
# Malformed: too short for a header (no answer), then a header promising a question
# followed by garbage (FORMERR), then the server still answers.
u.sendto(b"\x00", srv)
u.sendto(b"\xff" * 7, srv)
bad = struct.pack(">HHHHHH", 0x0bad, 0x0100, 1, 0, 0, 0) + b"\xc0\xff\xff"
qid, rc, an = ask(bad); assert (qid, rc) == (0x0bad, 1), (qid, rc); print("OK malformed formerr")
# Oversized: a valid question padded to 5000 bytes.
qid, rc, an = ask(q("web.service.consul", qid=0x0b16) + b"\0" * 5000); assert (qid, rc) == (0x0b16, 1), rc; print("OK oversized formerr")
# Unsupported types for a mesh name: NODATA.
for t in (15, 16, 28, 65280):
    qid, rc, an = ask(q("web.service.consul", t, qid=t)); assert (qid, rc, an) == (t, 0, 0), (t, rc, an)
print("OK unsupported types nodata")
qid, rc, an = ask(q("web.service.consul", qid=7)); assert (qid, rc, an) == (7, 0, 1), (rc, an); print("OK still answering")
# TCP pipelining: three queries in one write, three answers.
t = socket.create_connection(srv, timeout=10)
qs = [q("web.service.consul", qid=1), q("outside.test", qid=2), q("nope.service.consul", qid=3)]
t.sendall(b"".join(struct.pack(">H", len(x)) + x for x in qs))
got = {}
buf = b""
while len(got) < 3:
    d = t.recv(65535)
    assert d, "connection closed early"
    buf += d
    while len(buf) >= 2 and len(buf) >= 2 + struct.unpack(">H", buf[:2])[0]:
        n = struct.unpack(">H", buf[:2])[0]; m = buf[2:2+n]; buf = buf[2+n:]
        qid, rc, an = head(m); got[qid] = (rc, an)
assert got == {1: (0, 1), 2: (0, 1), 3: (3, 0)}, got
print("OK tcp pipelining")
"#;

/// `/etc/netns/<ns>/resolv.conf`: what `ip netns exec` bind-mounts over /etc/resolv.conf
/// in that namespace. Removed on drop.
struct NetnsResolvConf {
    dir: PathBuf,
}

impl NetnsResolvConf {
    fn new(node: &Node, text: &str) -> Self {
        let dir = Path::new("/etc/netns").join(&node.ns);
        std::fs::create_dir_all(&dir).expect("create /etc/netns/<ns>");
        std::fs::write(dir.join("resolv.conf"), text).expect("write resolv.conf");
        Self { dir }
    }
}

impl Drop for NetnsResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn config(state: &Path) -> MeshState {
    std::fs::read(state.join("config.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn applied_version(state: &Path) -> u64 {
    std::fs::read_to_string(state.join("status.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v["config_version"].as_u64())
        .unwrap_or(0)
}

fn dns_capture_reported(state: &Path) -> bool {
    std::fs::read_to_string(state.join("dns.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .is_some_and(|v| v["capture"] == true)
}

fn table_live(node: &Node) -> bool {
    node.sh("nft list table ip causeway_dns").status.success()
}

fn table6_live(node: &Node) -> bool {
    node.sh("nft list table ip6 causeway_dns").status.success()
}

/// The node's IPv6 address on the lab network (added by [`Resolver::V6Only`] set-ups).
fn addr6(node: &Node) -> String {
    format!("fd77::{}", node.addr.octets()[3])
}

/// Which address vm1's resolver (dnsmasq in `dns`) has in vm1's resolv.conf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resolver {
    /// Its IPv4 address.
    V4,
    /// Only an IPv6 address (dnsmasq listens on nothing else); its answers have TTL 300.
    V6Only,
}

/// dnsmasq in `dns` as vm1's upstream: knows `outside.test` (192.0.2.7; `changed`:
/// 192.0.2.9), `host1.lab.test` and `ttl3.lab.test` (192.0.2.30; `changed`: .31; TTL 3 s).
fn dnsmasq(dnsn: &Node, log: &Path, resolver: Resolver, changed: bool) -> Proc {
    let (outside_ip, ttl3_ip) = if changed {
        ("192.0.2.9", "192.0.2.31")
    } else {
        ("192.0.2.7", "192.0.2.30")
    };
    let listen = match resolver {
        Resolver::V4 => dnsn.addr.to_string(),
        Resolver::V6Only => addr6(dnsn),
    };
    let mut args = vec![
        "--keep-in-foreground".to_owned(),
        "--no-resolv".into(),
        "--no-hosts".into(),
        "--bind-interfaces".into(),
        format!("--listen-address={listen}"),
        format!("--address=/outside.test/{outside_ip}"),
        "--host-record=host1.lab.test,192.0.2.8".into(),
        format!("--host-record=ttl3.lab.test,{ttl3_ip},3"),
        "--log-queries".into(),
        "--log-facility=-".into(),
        "--pid-file".into(),
    ];
    if resolver == Resolver::V6Only {
        // Answers worth caching.
        args.push("--local-ttl=300".into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Proc::spawn(dnsn, log, "dnsmasq", &args)
}

/// `causeway-agent doctor` in `node`.
fn doctor(node: &Node, state: &Path) -> Output {
    node.cmd(bin("causeway-agent"))
        .args(["doctor", "--state-dir", state.to_str().unwrap()])
        .output()
        .unwrap()
}

fn out_text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

struct Lab1 {
    // Field order = drop order: processes, then resolv.conf files, then namespaces.
    procs: Vec<Proc>,
    _resolv: NetnsResolvConf,
    root: PathBuf,
    ctl_admin: String,
    services: PathBuf,
    lab: Lab,
    _dir: tempfile::TempDir,
}

impl Lab1 {
    fn vm1(&self) -> &Node {
        self.lab.node("vm1")
    }

    fn ctl_ok(&self, args: &[&str]) -> String {
        self.lab
            .node("ctl")
            .causewayctl(&self.ctl_admin, &self.root.join("controller"), args)
    }

    fn logs(&self) -> String {
        self.procs
            .iter()
            .map(|p| format!("== {}\n{}", p.log.display(), p.log()))
            .collect()
    }

    fn sh(&self, script: &str) -> Output {
        self.vm1().sh(script)
    }

    fn agent(&mut self, state: &Path) -> usize {
        let cfg = self.root.join("agent.toml");
        let node = self.vm1().clone();
        let addr = node.addr.to_string();
        let p = Proc::spawn(
            &node,
            &self
                .root
                .join(format!("vm1.agent.{}.log", self.procs.len())),
            bin("causeway-agent"),
            &[
                "run",
                "--config",
                cfg.to_str().unwrap(),
                "--state-dir",
                state.to_str().unwrap(),
                "--address",
                &addr,
            ],
        );
        self.procs.push(p);
        self.procs.len() - 1
    }
}

/// Resolves `name` in vm1 with getent, dig (UDP and TCP) and getaddrinfo; all must say `ip`.
fn resolves_everywhere(l: &Lab1, name: &str, ip: &str) {
    for (how, script) in [
        ("getent", format!("getent hosts {name}")),
        ("dig", format!("dig +short +time=3 +tries=1 {name} A")),
        (
            "dig +tcp",
            format!("dig +tcp +short +time=3 +tries=1 {name} A"),
        ),
        (
            "getaddrinfo",
            format!(
                "python3 -c 'import socket,sys; print(socket.getaddrinfo(sys.argv[1], 80, socket.AF_INET)[0][4][0])' {name}"
            ),
        ),
    ] {
        let out = l.sh(&script);
        let text = out_text(&out);
        assert!(
            out.status.success() && text.split_whitespace().next() == Some(ip),
            "{how} {name}: expected {ip}, got {}\n{}",
            describe(&out),
            l.logs()
        );
    }
}

struct Setup {
    l: Lab1,
    state: PathBuf,
    root: PathBuf,
    vm2: Node,
    controller: usize,
    agent: usize,
    web_vip: String,
    inv_vip: String,
}

/// The lab, registries, controller and a joined agent in vm1 running with `agent_toml`,
/// up to the moment web and inventory (with VIPs) reached it.
fn setup(agent_toml: &str) -> Setup {
    setup_with(agent_toml, Resolver::V4)
}

fn setup_with(agent_toml: &str, resolver: Resolver) -> Setup {
    require_root("the DNS tests");
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_owned();
    let lab = Lab::new(&["ctl", "vm1", "vm2", "dns"]);
    let (vm2, dnsn) = (lab.node("vm2").clone(), lab.node("dns").clone());
    let nameserver = match resolver {
        Resolver::V4 => dnsn.addr.to_string(),
        Resolver::V6Only => {
            // IPv6 on the lab network for vm1 and the resolver (no duplicate address
            // detection: usable at once).
            for n in [lab.node("vm1"), &dnsn] {
                n.sh_ok(&format!("ip -6 addr add {}/64 dev eth0 nodad", addr6(n)));
            }
            addr6(&dnsn)
        }
    };
    let resolv = NetnsResolvConf::new(
        lab.node("vm1"),
        &format!("nameserver {nameserver}\nsearch lab.test\noptions ndots:1\n"),
    );
    let mut procs = Vec::new();

    // The upstream: a real dnsmasq that knows two names outside the mesh.
    procs.push(dnsmasq(&dnsn, &root.join("dnsmasq.log"), resolver, false));
    // Services: web (Consul, tag v1) and inventory (Eureka VIP inventory-service) on vm2.
    let ctl = lab.node("ctl").clone();
    let regs = root.join("registries.json");
    let mut fakes = Proc::spawn(
        &ctl,
        &root.join("fake-registries.log"),
        bin("fake-registries"),
        &[
            regs.to_str().unwrap(),
            &format!("consul:web-1,web,{},8080,v1", vm2.addr),
            &format!("eureka:INVENTORY,inv-1,{},9090,inventory-service", vm2.addr),
        ],
    );
    // Fails at once with the fakes' output if they exit (e.g. a missing fixture).
    let urls: Value = fakes.wait_for("fake registries", WAIT, || {
        serde_json::from_str(&std::fs::read_to_string(&regs).ok()?).ok()
    });
    procs.push(fakes);
    let services = root.join("services.toml");
    std::fs::write(&services, "").unwrap();
    let cfg = root.join("controller.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[sources.consul]]\nname = \"consul-dc1\"\naddress = {:?}\ndatacenter = \"dc1\"\nnamespace = \"default\"\n\n[[sources.eureka]]\nname = \"eureka\"\nurl = {:?}\nnamespace = \"shop\"\n\n[[sources.file]]\nname = \"ext\"\npath = {:?}\n",
            urls["consul"].as_str().unwrap(),
            urls["eureka"].as_str().unwrap(),
            services.to_str().unwrap()
        ),
    )
    .unwrap();
    let data = root.join("controller");
    let control = format!("{}:15012", ctl.addr);
    procs.push(Proc::spawn(
        &ctl,
        &root.join("controller.log"),
        bin("causeway-controller"),
        &[
            "--data-dir",
            data.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
            "--admin-listen",
            "127.0.0.1:0",
            "--control-listen",
            &control,
        ],
    ));
    let controller = procs.len() - 1;
    let endpoints: Value = wait_for("controller endpoints.json", WAIT, || {
        serde_json::from_str(&std::fs::read_to_string(data.join("endpoints.json")).ok()?).ok()
    });
    procs.push(Proc::spawn(
        &vm2,
        &root.join("vm2.server.log"),
        "python3",
        &["-c", SERVER_PY, "8080", "vm2-web"],
    ));
    let mut l = Lab1 {
        procs,
        _resolv: resolv,
        root: root.clone(),
        ctl_admin: endpoints["admin"].as_str().unwrap().to_owned(),
        services: services.clone(),
        lab,
        _dir: dir,
    };
    l.ctl_ok(&[
        "group",
        "create",
        "client",
        "--namespace",
        "default",
        "--service-account",
        "client",
        "--service",
        "client",
        "--port",
        "http:7070",
    ]);
    let token = l.ctl_ok(&["token", "create", "--group", "client"]);
    let state = root.join("vm1");
    let out = l
        .vm1()
        .cmd(bin("causeway-agent"))
        .args(["join", token.trim(), "--state-dir", state.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "join: {}", describe(&out));
    std::fs::write(root.join("agent.toml"), agent_toml).unwrap();
    let agent = l.agent(&state);

    // The registry reaches the agent; the capture table is up.
    let (web_vip, inv_vip) = wait_for("web and inventory with VIPs at the agent", WAIT, || {
        let s = config(&state);
        let web = s.services.get("default/web")?.vip?;
        let inv = s.services.get("shop/inventory")?.vip?;
        Some((web.to_string(), inv.to_string()))
    });
    Setup {
        l,
        state,
        root,
        vm2,
        controller,
        agent,
        web_vip,
        inv_vip,
    }
}

#[test]
fn mesh_names_forwarding_fail_open_and_cache() {
    let Setup {
        mut l,
        state,
        root,
        vm2,
        controller: controller_idx,
        agent,
        web_vip,
        inv_vip,
    } = setup("[dns]\neureka_bare_names = true\nttl = \"3s\"\n");
    wait_for("DNS capture installed", WAIT, || {
        (dns_capture_reported(&state) && table_live(l.vm1())).then_some(())
    });

    // 1. The four name forms (and a Consul tag and datacenter) resolve to the VIP through
    //    the resolvers of resolv.conf, unchanged.
    for name in [
        "web.default.svc.cluster.local",
        "web.service.consul",
        "web.service.dc1.consul",
        "v1.web.service.consul",
        "web.default.causeway",
    ] {
        resolves_everywhere(&l, name, &web_vip);
    }
    resolves_everywhere(&l, "inventory-service", &inv_vip);
    resolves_everywhere(&l, "inventory.shop.causeway", &inv_vip);
    // SRV carries the port; unknown names in mesh zones are NXDOMAIN.
    let srv = out_text(&l.sh("dig +short web.service.consul SRV"));
    assert!(srv.contains(" 8080 web.service.consul."), "{srv}");
    let nx = out_text(&l.sh("dig +time=3 +tries=1 nope.service.consul A"));
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");

    // 2. A connection by name reaches the service through the mesh.
    let out = l.sh(&format!(
        "python3 -c '{CONNECT_PY}' web.service.consul 8080"
    ));
    let text = out_text(&out);
    assert!(
        out.status.success()
            && text.starts_with(&format!("peer={web_vip}\n"))
            && text.contains("name=vm2-web")
            && text.ends_with("hello"),
        "connect by name: {}\n{}",
        describe(&out),
        l.logs()
    );
    let agent_log = l.procs[agent].log();
    assert!(
        agent_log.contains("outbound"),
        "the agent proxied it:\n{agent_log}"
    );

    // 3. Outside the mesh: forwarded to dnsmasq; the search domain still applies.
    resolves_everywhere(&l, "outside.test", "192.0.2.7");
    let out = l.sh("getent hosts host1");
    assert!(
        out_text(&out).starts_with("192.0.2.8"),
        "search domain: {}",
        describe(&out)
    );
    assert!(
        std::fs::read_to_string(root.join("dnsmasq.log"))
            .unwrap_or_default()
            .contains("outside.test"),
        "dnsmasq saw the forwarded query"
    );

    // 4. Malformed, oversized, unsupported types, TCP pipelining.
    let dns_addr = l.lab.node("dns").addr.to_string();
    let out = l.sh(&format!("python3 -c '{PROBE_PY}' {dns_addr}"));
    assert!(
        out.status.success(),
        "probe: {}\n{}\n== nft list ruleset (vm1)\n{}\n== doctor\n{}",
        describe(&out),
        l.logs(),
        out_text(&l.sh("nft list ruleset")),
        describe(
            &l.vm1()
                .cmd(bin("causeway-agent"))
                .args(["doctor", "--state-dir", state.to_str().unwrap()])
                .output()
                .unwrap()
        ),
    );
    for line in [
        "malformed formerr",
        "oversized formerr",
        "unsupported types nodata",
        "still answering",
        "tcp pipelining",
    ] {
        assert!(
            out_text(&out).contains(&format!("OK {line}")),
            "{}",
            out_text(&out)
        );
    }

    // Only queries to the resolvers of resolv.conf are captured: a server named
    // explicitly is asked itself (vm2 runs none: no reply, not the agent's answer).
    let out = l.sh(&format!(
        "dig +short +time=1 +tries=1 @{} web.service.consul",
        vm2.addr
    ));
    assert!(
        !out.status.success() && !out_text(&out).contains(&web_vip),
        "an explicit server was captured: {}",
        describe(&out)
    );

    // 5. A new service resolves once the push that brings it is applied.
    std::fs::write(
        l.services.with_extension("tmp"),
        format!(
            "[[services]]\nname = \"newsvc\"\nnamespace = \"ext\"\nports = {{ tcp = 7000 }}\n[[services.endpoints]]\naddress = \"{}\"\n",
            vm2.addr
        ),
    )
    .unwrap();
    std::fs::rename(l.services.with_extension("tmp"), &l.services).unwrap();
    let (v, new_vip) = wait_for("newsvc pushed and applied", WAIT, || {
        let s = config(&state);
        let vip = s.services.get("ext/newsvc")?.vip?;
        (applied_version(&state) >= s.version).then(|| (s.version, vip.to_string()))
    });
    let out = l.sh("dig +short +time=3 +tries=1 newsvc.ext.causeway");
    assert_eq!(
        out_text(&out).trim(),
        new_vip,
        "first query after push {v}: {}",
        describe(&out)
    );

    // 6. doctor agrees.
    let doc = doctor(l.vm1(), &state);
    assert!(
        doc.status.success() && out_text(&doc).contains("dns capture: as expected"),
        "doctor: {}",
        describe(&doc)
    );

    // 7. kill -9: the kernel drops the redirect; outside names keep resolving.
    l.procs[agent].kill();
    wait_for(
        "the DNS capture table gone with the agent",
        Duration::from_secs(10),
        || (!table_live(l.vm1())).then_some(()),
    );
    let out = l.sh("getent hosts outside.test && dig +short +time=3 +tries=1 outside.test");
    assert!(
        out.status.success() && out_text(&out).contains("192.0.2.7"),
        "fail open after SIGKILL: {}",
        describe(&out)
    );
    // doctor: nothing expected, nothing live. A stray table is reported.
    let doc = doctor(l.vm1(), &state);
    // (The data plane's iptables rules of the killed agent are its own leftovers, which
    // the next start removes; DNS has none.)
    assert!(
        out_text(&doc).contains("dns capture: as expected"),
        "doctor after kill: {}",
        describe(&doc)
    );
    l.sh("nft add table ip causeway_dns");
    let doc = doctor(l.vm1(), &state);
    assert!(
        !doc.status.success() && out_text(&doc).contains("nft delete table ip causeway_dns"),
        "doctor with a stray table: {}",
        describe(&doc)
    );

    // 8. Restart with the controller down: mesh names come from the disk cache.
    l.procs[controller_idx].kill();
    let agent = l.agent(&state);
    // (The stray table is replaced by the agent's own.)
    wait_for("DNS capture after restart", WAIT, || {
        let installed = l.procs[agent].log().contains("DNS capture installed");
        let listing = out_text(&l.sh("nft list table ip causeway_dns"));
        (installed && listing.contains("redirect to :15053")).then_some(())
    });
    resolves_everywhere(&l, "web.service.consul", &web_vip);
    resolves_everywhere(&l, "outside.test", "192.0.2.7");
    let log = l.procs[agent].log();
    assert!(
        !log.contains("connected to the controller"),
        "the controller was down:\n{log}"
    );

    // 9. Graceful stop removes the capture; resolution goes straight to dnsmasq.
    l.procs[agent].stop();
    assert!(!table_live(l.vm1()), "capture left after stop");
    resolves_everywhere(&l, "outside.test", "192.0.2.7");
    let out = l.sh("dig +short +time=2 +tries=1 web.service.consul");
    assert_eq!(
        out_text(&out).trim(),
        "",
        "without the agent, mesh names are not answered"
    );
}

#[test]
fn resolv_conf_mode_points_libc_at_the_agent_and_restores_the_file() {
    let Setup {
        mut l,
        state,
        agent,
        web_vip,
        ..
    } = setup("[dns]\nmode = \"resolv-conf\"\n");
    let dns_addr = l.lab.node("dns").addr.to_string();
    let original = format!("nameserver {dns_addr}\nsearch lab.test\noptions ndots:1\n");
    // The agent runs without capture rules in this mode and rewrote resolv.conf.
    wait_for("resolv.conf pointing at the agent", WAIT, || {
        let text = out_text(&l.sh("cat /etc/resolv.conf"));
        text.starts_with("# Written by causeway-agent")
            .then_some(())
    });
    let text = out_text(&l.sh("cat /etc/resolv.conf"));
    assert!(
        text.contains("nameserver 127.0.0.153\n")
            && text.contains(&format!("nameserver {dns_addr}\n"))
            && text.contains("search lab.test"),
        "{text}"
    );
    assert!(!table_live(l.vm1()), "no capture table in resolv-conf mode");
    for name in ["web.service.consul", "web.default.causeway"] {
        let out = l.sh(&format!("getent hosts {name}"));
        assert!(
            out_text(&out).starts_with(&web_vip),
            "{name}: {}\n{}",
            describe(&out),
            l.logs()
        );
    }
    let out = l.sh("getent hosts outside.test && getent hosts host1");
    assert!(out.status.success(), "forwarded: {}", describe(&out));
    // Killed: libc falls through to the original server after the agent's address.
    l.procs[agent].kill();
    let out = l.sh("getent hosts outside.test");
    assert!(
        out_text(&out).starts_with("192.0.2.7"),
        "fail open: {}",
        describe(&out)
    );
    // The next start restores the original first, then points at itself again; a
    // graceful stop restores it for good.
    let agent = l.agent(&state);
    wait_for("the agent serving again", WAIT, || {
        out_text(&l.sh("getent hosts web.service.consul"))
            .starts_with(&web_vip)
            .then_some(())
    });
    assert!(
        l.procs[agent]
            .log()
            .contains("restored the resolver configuration"),
        "{}",
        l.logs()
    );
    // Killed again: `causeway-agent cleanup` (the packaged unit's ExecStopPost) restores it.
    l.procs[agent].kill();
    let out = l
        .vm1()
        .cmd(bin("causeway-agent"))
        .args(["cleanup", "--state-dir", state.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success()
            && out_text(&out).contains("restored the original resolver configuration"),
        "cleanup: {}",
        describe(&out)
    );
    assert_eq!(out_text(&l.sh("cat /etc/resolv.conf")), original);
    // Started once more and stopped gracefully: the original again.
    let agent = l.agent(&state);
    wait_for("the agent serving again", WAIT, || {
        out_text(&l.sh("getent hosts web.service.consul"))
            .starts_with(&web_vip)
            .then_some(())
    });
    l.procs[agent].stop();
    assert_eq!(out_text(&l.sh("cat /etc/resolv.conf")), original);
}

/// vm1's resolv.conf names only an IPv6 resolver (dnsmasq on an IPv6 address in another
/// namespace): the ip6 capture table sends its queries to the agent on [::1], which
/// answers mesh names and forwards the rest to that resolver over IPv6, caching the
/// answers until resolv.conf changes; killed, the agent's tables go with it and the
/// resolver answers directly.
#[test]
fn ipv6_only_resolver_is_captured_cached_and_fails_open() {
    let Setup {
        mut l,
        state,
        root,
        agent,
        web_vip,
        inv_vip,
        ..
    } = setup_with("[dns]\neureka_bare_names = true\n", Resolver::V6Only);
    wait_for("DNS capture installed (ip and ip6)", WAIT, || {
        (dns_capture_reported(&state) && table_live(l.vm1()) && table6_live(l.vm1())).then_some(())
    });
    let dnsn = l.lab.node("dns").clone();
    let listing = out_text(&l.sh("nft list table ip6 causeway_dns"));
    assert!(
        listing.contains(&format!(
            "ip6 daddr {} udp dport 53 redirect to :15053",
            addr6(&dnsn)
        )),
        "{listing}"
    );
    // Mesh names: answered by the agent (over IPv6 transport: UDP and TCP to [::1]).
    resolves_everywhere(&l, "web.service.consul", &web_vip);
    resolves_everywhere(&l, "inventory-service", &inv_vip);
    // Outside names: forwarded to dnsmasq over IPv6.
    resolves_everywhere(&l, "outside.test", "192.0.2.7");
    let out = l.sh("getent hosts host1");
    assert!(
        out_text(&out).starts_with("192.0.2.8"),
        "search domain: {}",
        describe(&out)
    );
    let dnsmasq_log = std::fs::read_to_string(root.join("dnsmasq.log")).unwrap_or_default();
    assert!(
        dnsmasq_log.contains("outside.test")
            && dnsmasq_log.contains(&format!("from {}", addr6(l.vm1()))),
        "dnsmasq saw the forwarded query from vm1's IPv6 address:\n{dnsmasq_log}"
    );
    // A name with TTL 3 s, asked once: cached for those 3 s.
    let ttl3_asked = std::time::Instant::now();
    let out = l.sh("dig +short +time=3 +tries=1 ttl3.lab.test A");
    assert_eq!(out_text(&out).trim(), "192.0.2.30", "{}", describe(&out));
    // The answer is cached (TTL 300): dnsmasq restarted with a new address for the name
    // does not change it ...
    l.procs[0].kill();
    l.procs[0] = dnsmasq(&dnsn, &root.join("dnsmasq2.log"), Resolver::V6Only, true);
    wait_for("the new dnsmasq answering", WAIT, || {
        out_text(&dnsn.sh(&format!(
            "dig +short +time=1 +tries=1 @{} outside.test",
            addr6(&dnsn)
        )))
        .contains("192.0.2.9")
        .then_some(())
    });
    let out = l.sh("dig +short +time=3 +tries=1 outside.test A");
    assert_eq!(
        out_text(&out).trim(),
        "192.0.2.7",
        "served from the agent's cache: {}",
        describe(&out)
    );
    let metrics = out_text(&l.sh(
        "python3 -c 'import urllib.request; print(urllib.request.urlopen(\"http://127.0.0.1:15020/metrics\").read().decode())'",
    ));
    let hits: u64 = metrics
        .lines()
        .find_map(|m| m.strip_prefix("causeway_agent_dns_cache_hits_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no cache hit counter:\n{metrics}"));
    assert!(hits >= 1, "{metrics}");
    assert!(metrics.contains("causeway_agent_dns_upstream_duration_seconds_count"));
    // The TTL-3 name changed too: its new address comes once the 3 s have passed, not
    // before (the entry was stored after `ttl3_asked`, so it cannot expire sooner).
    wait_for("ttl3.lab.test's new address", WAIT, || {
        (out_text(&l.sh("dig +short +time=3 +tries=1 ttl3.lab.test A")).trim() == "192.0.2.31")
            .then_some(())
    });
    let waited = ttl3_asked.elapsed();
    assert!(
        waited >= Duration::from_secs(3),
        "the new answer came after {waited:?}, before the old one's TTL of 3 s had passed"
    );
    // ... until resolv.conf changes (rewritten with the same resolver): then the new one.
    let conf = Path::new("/etc/netns")
        .join(&l.vm1().ns)
        .join("resolv.conf");
    let text = std::fs::read_to_string(&conf).unwrap();
    std::fs::write(&conf, format!("# rewritten\n{text}")).unwrap();
    wait_for("the new answer after the resolv.conf change", WAIT, || {
        (out_text(&l.sh("dig +short +time=3 +tries=1 outside.test A")).trim() == "192.0.2.9")
            .then_some(())
    });
    resolves_everywhere(&l, "web.service.consul", &web_vip);

    // kill -9: both tables go with the agent; the resolver answers directly.
    l.procs[agent].kill();
    wait_for(
        "the DNS capture tables gone with the agent",
        Duration::from_secs(10),
        || (!table_live(l.vm1()) && !table6_live(l.vm1())).then_some(()),
    );
    let out = l.sh("getent hosts outside.test && dig +short +time=3 +tries=1 outside.test");
    assert!(
        out.status.success() && out_text(&out).contains("192.0.2.9"),
        "fail open after SIGKILL: {}",
        describe(&out)
    );
    let out = l.sh("dig +short +time=2 +tries=1 web.service.consul");
    assert_eq!(
        out_text(&out).trim(),
        "",
        "without the agent, mesh names are not answered"
    );
    // A stray ip6 table alone is reported by doctor.
    l.sh("nft add table ip6 causeway_dns");
    let doc = doctor(l.vm1(), &state);
    assert!(
        !doc.status.success() && out_text(&doc).contains("nft delete table ip6 causeway_dns"),
        "doctor with a stray ip6 table: {}",
        describe(&doc)
    );
}
