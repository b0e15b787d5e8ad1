//! Every transport at once (needs root; skips loudly without it, fails under
//! CI): `opencode-mcp` on node B of a simulated tailnet with
//! TRANSPORT=local-relay,mdns,tailscale sees
//!
//! 1. an instance on peer A advertised over mDNS on a LAN A and B share (a
//!    veth pair between their namespaces) AND published for the tailnet with
//!    the same id: one entry, reached over the LAN (and over the tailnet once
//!    the mDNS advertisement goes);
//! 2. an instance on peer C published only over the tailnet: reach `tailnet`;
//! 3. a relay registration in B's relay dir whose port differs from its
//!    `localPort` (a tunnel ending on B's loopback): reach `relay`.
//!
//! Exactly three entries, and `send` + `read` work on each. The fake OpenCode
//! servers run in the test process on loopback; TCP forwarders whose listening
//! sockets live in the nodes' namespaces make them reachable there. Multicast
//! happens only inside the namespaces this test creates.

mod common;

use std::fs::File;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::fake_opencode::{DEFAULT_REPLY, FakeOpenCode};
use common::mcp_client::{McpServerProc, RelayDir, iso_utc_now, wait_until_msg};
use common::netns::{require_root, try_poll};
use common::tailnet::{
    AgentSpec, FakeLocalApi, NodeDoc, StatusDoc, Tailnet, helper_main, run_in_ns, start_agent,
};
use mdns_sd::{ServiceDaemon, ServiceInfo};
use opencode_mcp::announce::txt::{Announcement, SERVICE_TYPE};
use serde_json::{Value, json};

/// The agent stand-in run by `start_agent` (does nothing in a normal run).
#[test]
#[ignore = "helper process for the other tests"]
fn tailnet_helper() {
    helper_main();
}

const A: usize = 0;
const B: usize = 1;
const C: usize = 2;

/// A's and B's addresses on their shared LAN.
const LAN_A: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
const LAN_B: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Joins nodes A and B by a LAN: a veth pair `lan0` with 10.78.0.0/24 and a
/// multicast route. It goes with the namespaces.
fn add_lan(net: &Tailnet) {
    let (na, nb) = (net.node(A).ns.clone(), net.node(B).ns.clone());
    for ns in [&na, &nb] {
        // No DAD: link-local IPv6 is usable at once.
        let _ = Command::new("ip")
            .args(["netns", "exec", ns, "sysctl", "-qw"])
            .args([
                "net.ipv6.conf.all.accept_dad=0",
                "net.ipv6.conf.default.accept_dad=0",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
    ip(&[
        "link", "add", "lan0", "netns", &na, "type", "veth", "peer", "name", "lan0", "netns", &nb,
    ]);
    for (ns, addr) in [(&na, LAN_A), (&nb, LAN_B)] {
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "lan0",
        ]);
        ip(&["-n", ns, "link", "set", "lan0", "up"]);
        ip(&["-n", ns, "route", "add", "224.0.0.0/4", "dev", "lan0"]);
    }
    for ns in [&na, &nb] {
        let ready = try_poll(Duration::from_secs(5), || {
            let out = Command::new("ip")
                .args(["-n", ns, "addr", "show", "dev", "lan0"])
                .output()
                .ok()?;
            let s = String::from_utf8_lossy(&out.stdout).into_owned();
            (s.contains("state UP") && !s.contains("tentative")).then_some(())
        });
        assert!(ready.is_some(), "lan0 in {ns} did not come up");
    }
}

/// A TCP forwarder: listens on `bind` inside namespace `ns`, connects to `to`
/// from the test's own namespace (the fakes' loopback). Stops on drop.
struct Forward {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Forward {
    fn start(ns: &str, bind: SocketAddr, to: SocketAddr) -> Forward {
        let std_listener = run_in_ns(ns, move || {
            let l = std::net::TcpListener::bind(bind)
                .unwrap_or_else(|e| panic!("bind forwarder on {bind}: {e}"));
            l.set_nonblocking(true).expect("nonblocking");
            l
        });
        let listener = tokio::net::TcpListener::from_std(std_listener).expect("tokio listener");
        let port = listener.local_addr().expect("local addr").port();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        });
        Forward { port, task }
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An mdns-sd daemon whose thread lives in namespace `ns`; goodbyes on drop.
struct Publisher {
    daemon: ServiceDaemon,
}

impl Publisher {
    fn start(ns: &str) -> Publisher {
        let path = format!("/run/netns/{ns}");
        let daemon = std::thread::spawn(move || {
            let f = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: setns(2) on a valid namespace fd; affects only this thread
            // (and the daemon thread it starts).
            let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            ServiceDaemon::new().expect("mdns-sd daemon")
        })
        .join()
        .expect("mdns-sd thread");
        Publisher { daemon }
    }

    fn publish(&self, instance: &str, addr: Ipv4Addr, port: u16, ann: &Announcement) -> String {
        let mut info = ServiceInfo::new(
            SERVICE_TYPE,
            instance,
            "node-a-lan.local.",
            IpAddr::V4(addr),
            port,
            &ann.to_txt()[..],
        )
        .expect("service info");
        info.set_requires_probe(false);
        let fullname = info.get_fullname().to_string();
        self.daemon.register(info).expect("register");
        fullname
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        let _ = self.daemon.shutdown();
    }
}

async fn instances(server: &McpServerProc) -> Value {
    let (text, is_error, out) = server.call_text("instances", json!({})).await;
    assert!(!is_error, "{text}");
    out.expect("structured instances output")
}

fn find<'a>(out: &'a Value, key: &str) -> Option<&'a Value> {
    out["instances"]
        .as_array()?
        .iter()
        .find(|i| i["key"] == key)
}

/// Waits until the instance `key` is online with reach `reach`.
async fn wait_reach(server: &McpServerProc, key: &str, reach: &str) -> Value {
    wait_until_msg(
        Duration::from_secs(15),
        &format!("{key} online with reach {reach}"),
        || async {
            let out = instances(server).await;
            find(&out, key)
                .filter(|i| i["status"] == "online" && i["reach"] == reach)
                .cloned()
        },
    )
    .await
}

/// `send` then `read` on `instance`; the right fake saw the prompt.
async fn send_and_read(server: &McpServerProc, instance: &str, fake: &FakeOpenCode) {
    let before = fake.prompts().len();
    let (text, is_error, _) = server
        .call_text(
            "send",
            json!({"instance": instance, "message": format!("hi {instance}")}),
        )
        .await;
    assert!(!is_error, "send to {instance}: {text}");
    assert_eq!(text, DEFAULT_REPLY);
    assert_eq!(fake.prompts().len(), before + 1, "{instance}'s fake got it");
    let (text, is_error, out) = server
        .call_text("read", json!({"instance": instance}))
        .await;
    assert!(!is_error, "read {instance}: {text}");
    let msgs = out.expect("structured read")["messages"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(msgs.len() >= 2, "{instance}: {msgs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lan_and_tailnet_tailnet_only_and_relay_only_are_one_entry_each_with_the_right_reach() {
    if !require_root() {
        return;
    }
    let net = blocking(|| Tailnet::create(3));
    blocking(|| add_lan(&net));
    let api = FakeLocalApi::start(&StatusDoc::new(
        NodeDoc::of(&net, B, "node-b"),
        vec![
            NodeDoc::of(&net, A, "node-a"),
            NodeDoc::of(&net, C, "node-c"),
        ],
    ));
    let relay = RelayDir::new();
    let (dir_a, dir_c) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());

    // 1: on A, one OpenCode on 0.0.0.0 (LAN and tailnet address), mDNS + tailnet.
    let fake1 = FakeOpenCode::builder().directory("/srv/both").start().await;
    let fwd1 = Forward::start(
        &net.node(A).ns,
        (Ipv4Addr::UNSPECIFIED, 0).into(),
        fake1.addr(),
    );
    let (_agent1, port1, _) = blocking(|| {
        start_agent(
            Some((&net, A)),
            "tailnet_helper",
            &AgentSpec {
                id: "inst-both".into(),
                name: "both".into(),
                hostname: None,
                addr: net.node(A).v4.into(),
                dir: dir_a.path().to_path_buf(),
                dnssd_port: 5353,
                opencode_port: Some(fwd1.port),
            },
        )
    });
    assert_eq!(port1, fwd1.port);
    let publisher = Publisher::start(&net.node(A).ns);
    let ann1 = Announcement {
        id: "inst-both".into(),
        name: "both".into(),
        cwd: Some("/srv/both".into()),
        version: Some("1.0.0-fake".into()),
        auth: false,
        ..Announcement::default()
    };
    let mdns_name = publisher.publish("both-inst-both", LAN_A, fwd1.port, &ann1);

    // 2: on C, published only for the tailnet.
    let fake2 = FakeOpenCode::builder()
        .directory("/srv/tail-only")
        .start()
        .await;
    let fwd2 = Forward::start(&net.node(C).ns, (net.node(C).v4, 0).into(), fake2.addr());
    let (_agent2, _, _) = blocking(|| {
        start_agent(
            Some((&net, C)),
            "tailnet_helper",
            &AgentSpec {
                id: "inst-tail".into(),
                name: "tail-only".into(),
                hostname: None,
                addr: net.node(C).v4.into(),
                dir: dir_c.path().to_path_buf(),
                dnssd_port: 5353,
                opencode_port: Some(fwd2.port),
            },
        )
    });

    // 3: a tunnel ending on B's loopback, registered in B's relay dir.
    let fake3 = FakeOpenCode::builder()
        .directory("/srv/relayed")
        .start()
        .await;
    let fwd3 = Forward::start(
        &net.node(B).ns,
        (Ipv4Addr::LOCALHOST, 0).into(),
        fake3.addr(),
    );
    assert_ne!(fwd3.port, 4096);
    relay.write_registration(
        "relayed",
        json!({"name": "relayed", "hostname": "far-box", "port": fwd3.port, "localPort": 4096,
               "id": "inst-relay", "cwd": "/srv/relayed", "connectedAt": iso_utc_now()}),
    );

    let bin = common::netns::opencode_mcp_bin();
    let sock = api.socket_str();
    let server = McpServerProc::spawn_program(
        "ip",
        &["netns", "exec", &net.node(B).ns, &bin.display().to_string()],
        &[
            ("TRANSPORT", "local-relay,mdns,tailscale"),
            ("TAILSCALE_SOCKET", &sock),
            ("TAILSCALE_QUERY_TIMEOUT_MS", "300"),
            ("DISCOVERY_INTERVAL_MS", "500"),
            ("HEALTH_CHECK_TIMEOUT_MS", "1000"),
            ("RELAY_REGISTRY_DIR", relay.path_str()),
        ],
    )
    .await;

    let both = wait_reach(&server, "inst-both", "lan").await;
    assert_eq!(both["name"], "both", "{both}");
    assert_eq!(both["transport"], "mdns", "{both}");
    assert_eq!(
        both["url"],
        format!("http://{LAN_A}:{}", fwd1.port),
        "{both}"
    );
    let tail = wait_reach(&server, "inst-tail", "tailnet").await;
    assert_eq!(tail["name"], "tail-only", "{tail}");
    assert_eq!(tail["transport"], "tailscale", "{tail}");
    assert_eq!(
        tail["url"],
        format!("http://{}:{}", net.node(C).v4, fwd2.port),
        "{tail}"
    );
    let relayed = wait_reach(&server, "inst-relay", "relay").await;
    assert_eq!(relayed["name"], "relayed", "{relayed}");
    assert_eq!(relayed["transport"], "local-relay", "{relayed}");
    assert_eq!(
        relayed["url"],
        format!("http://127.0.0.1:{}", fwd3.port),
        "{relayed}"
    );

    let out = instances(&server).await;
    let list = out["instances"].as_array().expect("instances array");
    assert_eq!(list.len(), 3, "exactly three entries: {out}");
    assert_eq!(out["problem_count"], 0, "{out}");

    send_and_read(&server, "both", &fake1).await;
    send_and_read(&server, "tail-only", &fake2).await;
    send_and_read(&server, "relayed", &fake3).await;

    // Instance 1 is one entry with two paths: without its mDNS advertisement
    // (goodbye packets) the same entry is reached over the tailnet.
    publisher.daemon.unregister(&mdns_name).expect("unregister");
    let both = wait_reach(&server, "inst-both", "tailnet").await;
    assert_eq!(both["transport"], "tailscale", "{both}");
    assert_eq!(
        both["url"],
        format!("http://{}:{}", net.node(A).v4, fwd1.port),
        "{both}"
    );
    let out = instances(&server).await;
    assert_eq!(
        out["instances"].as_array().map(Vec::len),
        Some(3),
        "still three entries: {out}"
    );
    send_and_read(&server, "both", &fake1).await;
}
