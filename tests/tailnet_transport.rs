//! The `tailscale` transport end to end in a simulated tailnet (needs root;
//! skips loudly without it, fails under CI): TUN devices named tailscale0 in
//! namespaces the test creates, a forwarder that passes tailnet unicast only,
//! a fake LocalAPI serving a status the test writes, agent stand-ins (this
//! binary, publishing through `dnssd::host::publish`) next to a fake or the
//! real OpenCode on node A, and `opencode-mcp` with TRANSPORT=tailscale on
//! node B, driven over MCP.

mod common;

use std::time::Duration;

use common::fake_opencode::DEFAULT_REPLY;
use common::mcp_client::{McpServerProc, wait_until_msg};
use common::netns::{Proc, require_opencode, require_root};
use common::tailnet::{
    AgentSpec, FakeLocalApi, NodeDoc, StatusDoc, Tailnet, ghost_v4, helper_main, start_agent,
};
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

/// B's view: itself, A and C online, a silent ghost online, an offline node.
fn status(net: &Tailnet, a_online: bool) -> StatusDoc {
    let mut a = NodeDoc::of(net, A, "node-a");
    a.online = a_online;
    let mut offline = NodeDoc::new("gone-box", ghost_v4(1), None);
    offline.online = false;
    StatusDoc::new(
        NodeDoc::of(net, B, "node-b"),
        vec![
            a,
            NodeDoc::of(net, C, "node-c"),
            NodeDoc::new("silent-box", ghost_v4(0), None),
            offline,
        ],
    )
}

fn spec(net: &Tailnet, dir: &std::path::Path, id: &str, name: &str) -> AgentSpec {
    AgentSpec {
        id: id.into(),
        name: name.into(),
        hostname: None,
        addr: net.node(A).v4.into(),
        dir: dir.to_path_buf(),
        dnssd_port: 5353,
        opencode_port: None,
    }
}

async fn mcp_on_b(net: &Tailnet, api: &FakeLocalApi, relay: &std::path::Path) -> McpServerProc {
    mcp_on_b_with(net, api, relay, "500", "1000").await
}

async fn mcp_on_b_with(
    net: &Tailnet,
    api: &FakeLocalApi,
    relay: &std::path::Path,
    interval_ms: &str,
    health_ms: &str,
) -> McpServerProc {
    let bin = common::netns::opencode_mcp_bin();
    let ns = net.node(B).ns.clone();
    let sock = api.socket_str();
    let relay = relay.display().to_string();
    McpServerProc::spawn_program(
        "ip",
        &["netns", "exec", &ns, &bin.display().to_string()],
        &[
            ("TRANSPORT", "tailscale"),
            ("TAILSCALE_SOCKET", &sock),
            ("TAILSCALE_QUERY_TIMEOUT_MS", "300"),
            ("DISCOVERY_INTERVAL_MS", interval_ms),
            ("HEALTH_CHECK_TIMEOUT_MS", health_ms),
            ("RELAY_REGISTRY_DIR", &relay),
        ],
    )
    .await
}

async fn instances(server: &McpServerProc) -> Value {
    let (_, is_error, out) = server.call_text("instances", json!({})).await;
    assert!(!is_error);
    out.expect("structured instances output")
}

fn find<'a>(out: &'a Value, name: &str) -> Option<&'a Value> {
    out["instances"]
        .as_array()?
        .iter()
        .find(|i| i["name"] == name)
}

async fn wait_online(server: &McpServerProc, name: &str) -> Value {
    wait_until_msg(
        Duration::from_secs(20),
        &format!("{name} online over the tailnet"),
        || async {
            let out = instances(server).await;
            find(&out, name)
                .filter(|i| i["status"] == "online")
                .cloned()
        },
    )
    .await
}

async fn wait_absent(server: &McpServerProc, name: &str) {
    wait_until_msg(Duration::from_secs(20), &format!("{name} gone"), || async {
        let out = instances(server).await;
        find(&out, name).is_none().then_some(())
    })
    .await
}

fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_on_a_peer_is_discovered_driven_and_dropped_when_the_peer_goes_offline() {
    if !require_root() {
        return;
    }
    let net = blocking(|| Tailnet::create(3));
    let dir = tempfile::tempdir().unwrap();
    let relay = tempfile::tempdir().unwrap();
    let api = FakeLocalApi::start(&status(&net, true));
    let (_agent, oc_port, serving) = blocking(|| {
        start_agent(
            Some((&net, A)),
            "tailnet_helper",
            &spec(&net, dir.path(), "inst-a1", "alpha"),
        )
    });
    assert!(serving);

    let server = mcp_on_b(&net, &api, relay.path()).await;
    let alpha = wait_online(&server, "alpha").await;
    assert_eq!(alpha["key"], "inst-a1");
    assert_eq!(alpha["reach"], "tailnet");
    assert_eq!(alpha["transport"], "tailscale");
    // No host in the TXT: the MagicDNS name from the LocalAPI is shown.
    assert_eq!(alpha["hostname"], "node-a.tail1234.ts.net");
    assert_eq!(alpha["url"], format!("http://{}:{oc_port}", net.node(A).v4));
    // Silent and offline peers, and C (nothing there), are not problems.
    let out = instances(&server).await;
    assert_eq!(out["instances"].as_array().map(Vec::len), Some(1), "{out}");
    assert_eq!(out["problem_count"], 0, "{out}");

    // send and read over the tailnet address.
    let (text, is_error, _) = server
        .call_text(
            "send",
            json!({"instance": "alpha", "message": "hi over the tailnet"}),
        )
        .await;
    assert!(!is_error, "{text}");
    assert_eq!(text, DEFAULT_REPLY);
    let (text, is_error, out) = server.call_text("read", json!({"instance": "alpha"})).await;
    assert!(!is_error, "{text}");
    let msgs = out.expect("structured read")["messages"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(msgs.len() >= 2, "{msgs:?}");

    // The LocalAPI now says A is offline: its instance goes at once.
    api.set(&status(&net, false));
    wait_absent(&server, "alpha").await;
    // And back.
    api.set(&status(&net, true));
    wait_online(&server, "alpha").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_on_one_peer_are_both_discovered_and_the_survivor_stays_after_the_holder_dies() {
    if !require_root() {
        return;
    }
    let net = blocking(|| Tailnet::create(3));
    let dir = tempfile::tempdir().unwrap();
    let relay = tempfile::tempdir().unwrap();
    let api = FakeLocalApi::start(&status(&net, true));
    let (first, _, first_serves) = blocking(|| {
        start_agent(
            Some((&net, A)),
            "tailnet_helper",
            &spec(&net, dir.path(), "inst-1", "one"),
        )
    });
    let (second, _, second_serves) = blocking(|| {
        start_agent(
            Some((&net, A)),
            "tailnet_helper",
            &spec(&net, dir.path(), "inst-2", "two"),
        )
    });
    assert!(
        first_serves && !second_serves,
        "exactly the first one holds the socket"
    );

    let server = mcp_on_b(&net, &api, relay.path()).await;
    wait_online(&server, "one").await;
    wait_online(&server, "two").await;

    // The holder dies hard: the other agent takes the socket over.
    let (mut holder, mut survivor, gone, kept) = (first, second, "one", "two");
    blocking(|| holder.kill());
    blocking(|| survivor.wait_line("ROLE serving", Duration::from_secs(10)));
    wait_absent(&server, gone).await;
    let out = instances(&server).await;
    let inst = find(&out, kept).unwrap_or_else(|| panic!("{kept} is still listed: {out}"));
    assert_eq!(inst["status"], "online");
    assert_eq!(inst["reach"], "tailnet");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tailscale_not_running_fails_when_asked_for_and_is_skipped_under_auto() {
    if !require_root() {
        return;
    }
    let net = blocking(|| Tailnet::create(2));
    let relay = tempfile::tempdir().unwrap();
    let mut st = status_two(&net);
    st.state = "Stopped".into();
    let api = FakeLocalApi::start(&st);
    let bin = common::netns::opencode_mcp_bin();
    let run = |transport: &str| {
        let mut cmd = net.command(B, &bin);
        cmd.args(["instances", "--json", "--settle-ms", "300"])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("TRANSPORT", transport)
            .env("TAILSCALE_SOCKET", api.socket())
            .env("RELAY_REGISTRY_DIR", relay.path());
        cmd.output().expect("run opencode-mcp")
    };
    let out = blocking(|| run("tailscale"));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("transport tailscale cannot run here"), "{err}");
    assert!(
        err.contains("state Stopped") && err.contains("tailscale up"),
        "{err}"
    );
    // `auto` leaves it out quietly (mDNS multicasts only inside this namespace).
    let out = blocking(|| run("auto"));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("ERROR") && !err.contains("WARN"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_opencode_on_a_peer_is_driven_over_the_tailnet() {
    if !require_root() {
        return;
    }
    let Some(opencode) = require_opencode() else {
        return;
    };
    let net = blocking(|| Tailnet::create(2));
    let dir = tempfile::tempdir().unwrap();
    let relay = tempfile::tempdir().unwrap();
    let base = common::netns::TempDir::new("tailnet-oc");
    let api = FakeLocalApi::start(&status_two(&net));

    // The fake LLM on A's loopback, OpenCode on A's tailnet address only.
    let mut llm_cmd = net.command(A, "python3");
    llm_cmd.arg(common::netns::fixture("fake_llm.py")).args([
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--reply",
        common::netns::FAKE_REPLY,
    ]);
    let mut llm = Proc::spawn("fake-llm@A", llm_cmd);
    let line =
        blocking(|| llm.wait_line("listening on http://127.0.0.1:", Duration::from_secs(20)));
    let llm_port: u16 = line
        .text
        .rsplit(':')
        .next()
        .and_then(|p| p.trim().trim_end_matches('/').parse().ok())
        .expect("llm port");
    let project = common::netns::project_dir(&base, "proj");
    let oc_port = 4096u16;
    let mut oc_cmd = net.command(A, &opencode);
    oc_cmd
        .args([
            "serve",
            "--hostname",
            &net.node(A).v4.to_string(),
            "--port",
            &oc_port.to_string(),
        ])
        .current_dir(&project)
        .env_clear();
    for (k, v) in
        common::netns::opencode_env(base.path(), &format!("http://127.0.0.1:{llm_port}/v1"))
    {
        oc_cmd.env(k, v);
    }
    let _oc = Proc::spawn("opencode@A", oc_cmd);
    let mut s = spec(&net, dir.path(), "inst-real", "real-oc");
    s.opencode_port = Some(oc_port);
    s.hostname = Some("node-a".into());
    let (_agent, _, _) = blocking(|| start_agent(Some((&net, A)), "tailnet_helper", &s));

    // Real OpenCode is slower to answer than the fixtures: default deadlines.
    let server = mcp_on_b_with(&net, &api, relay.path(), "1000", "3000").await;
    let inst = wait_until_msg(
        Duration::from_secs(90),
        "real OpenCode online over the tailnet",
        || async {
            let out = instances(&server).await;
            find(&out, "real-oc")
                .filter(|i| i["status"] == "online")
                .cloned()
        },
    )
    .await;
    assert_eq!(inst["reach"], "tailnet");
    assert_eq!(inst["hostname"], "node-a");
    assert_eq!(inst["url"], format!("http://{}:{oc_port}", net.node(A).v4));
    let (text, is_error, _) = server
        .call_text(
            "send",
            json!({"instance": "real-oc", "message": "say hello"}),
        )
        .await;
    assert!(!is_error, "{text}");
    assert!(text.contains(common::netns::FAKE_REPLY), "{text}");
    let (text, is_error, out) = server
        .call_text("read", json!({"instance": "real-oc"}))
        .await;
    assert!(!is_error, "{text}");
    let msgs = out.expect("structured read")["messages"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(msgs.len(), 2, "{msgs:?}");
    assert_eq!(msgs[0]["role"], "user");
}

/// B's view with just A online.
fn status_two(net: &Tailnet) -> StatusDoc {
    StatusDoc::new(
        NodeDoc::of(net, B, "node-b"),
        vec![NodeDoc::of(net, A, "node-a")],
    )
}

/// A TCP forwarder living in namespace `ns`: `127.0.0.1:<port>` there →
/// `to` (what an SSH reverse tunnel ending on that machine does). Its threads
/// run inside the namespace; they end with the namespace's sockets.
fn tunnel_in(ns: &str, to: std::net::SocketAddr) -> u16 {
    use std::io::copy;
    use std::net::{TcpListener, TcpStream};
    let path = format!("/var/run/netns/{ns}");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        common::tailnet::enter_ns(&path);
        let l = TcpListener::bind("127.0.0.1:0").expect("bind tunnel end");
        let _ = tx.send(l.local_addr().expect("addr").port());
        for conn in l.incoming() {
            let Ok(inbound) = conn else { continue };
            // Threads spawned here inherit the namespace.
            std::thread::spawn(move || {
                let Ok(out) = TcpStream::connect(to) else {
                    return;
                };
                let (Ok(mut i2), Ok(mut o2)) = (inbound.try_clone(), out.try_clone()) else {
                    return;
                };
                let (mut i1, mut o1) = (inbound, out);
                let t = std::thread::spawn(move || {
                    let _ = copy(&mut i2, &mut o2);
                    let _ = o2.shutdown(std::net::Shutdown::Write);
                });
                let _ = copy(&mut o1, &mut i1);
                let _ = i1.shutdown(std::net::Shutdown::Write);
                let _ = t.join();
            });
        }
    });
    rx.recv_timeout(Duration::from_secs(5))
        .expect("tunnel listening")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_instance_over_tailnet_and_relay_is_one_entry_that_prefers_the_tailnet_and_falls_back()
{
    if !require_root() {
        return;
    }
    let net = blocking(|| Tailnet::create(2));
    let dir = tempfile::tempdir().unwrap();
    let relay = common::mcp_client::RelayDir::new();
    let api = FakeLocalApi::start(&status_two(&net));
    let (_agent, oc_port, _) = blocking(|| {
        start_agent(
            Some((&net, A)),
            "tailnet_helper",
            &spec(&net, dir.path(), "inst-both", "both"),
        )
    });
    // The same OpenCode through a "tunnel" ending on B, registered in B's relay dir.
    let tunnel = tunnel_in(&net.node(B).ns, (net.node(A).v4, oc_port).into());
    relay.write_registration(
        "both",
        json!({"name": "both", "port": tunnel, "id": "inst-both", "hostname": "node-a", "cwd": "/srv/both"}),
    );
    // And an instance only the relay knows, served on B itself.
    let only = net.run_in(B, || {
        std::net::TcpListener::bind("127.0.0.1:0").expect("bind")
    });
    let only_port = only.local_addr().unwrap().port();
    common::netns::serve_fake_opencode(only, "1.0.0-relay", false);
    relay.write_registration(
        "relay-only",
        json!({"name": "relay-only", "port": only_port, "id": "inst-relay", "cwd": "/srv/r"}),
    );

    let bin = common::netns::opencode_mcp_bin();
    let ns = net.node(B).ns.clone();
    let sock = api.socket_str();
    let server = McpServerProc::spawn_program(
        "ip",
        &["netns", "exec", &ns, &bin.display().to_string()],
        &[
            ("TRANSPORT", "local-relay,tailscale"),
            ("TAILSCALE_SOCKET", &sock),
            ("TAILSCALE_QUERY_TIMEOUT_MS", "300"),
            ("DISCOVERY_INTERVAL_MS", "500"),
            ("HEALTH_CHECK_TIMEOUT_MS", "1000"),
            ("RELAY_REGISTRY_DIR", relay.path_str()),
        ],
    )
    .await;
    let both = wait_until_msg(
        Duration::from_secs(20),
        "both online over the tailnet",
        || async {
            let out = instances(&server).await;
            find(&out, "both")
                .filter(|i| i["status"] == "online" && i["reach"] == "tailnet")
                .cloned()
        },
    )
    .await;
    assert_eq!(both["key"], "inst-both");
    let r = wait_online(&server, "relay-only").await;
    assert_eq!(r["reach"], "relay");
    let out = instances(&server).await;
    let names: Vec<&str> = out["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["name"].as_str())
        .collect();
    assert_eq!(names.iter().filter(|n| **n == "both").count(), 1, "{out}");
    assert_eq!(names.len(), 2, "{out}");

    // The tailnet path goes (node marked offline): the relay path takes over.
    let mut st = status_two(&net);
    st.peers[0].online = false;
    api.set(&st);
    wait_until_msg(
        Duration::from_secs(20),
        "both falls back to the relay",
        || async {
            let out = instances(&server).await;
            find(&out, "both")
                .filter(|i| i["status"] == "online" && i["reach"] == "relay")
                .cloned()
        },
    )
    .await;
}
