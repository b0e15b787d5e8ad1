//! The real `opencode-agent` binary on a simulated tailnet (needs root;
//! skips loudly without it, fails under CI): `opencode-agent attach --host
//! <node A's tailnet address>` next to an OpenCode (a fake, with a password)
//! on node A learns its tailnet address from its LocalAPI, publishes the
//! instance by unicast DNS-SD on A's tailnet address, and `opencode-mcp` with
//! TRANSPORT=tailscale on node B finds it, drives it, and sees it go when the
//! agent stops. The other tailnet tests publish through the library; this
//! one proves the agent's own path (address detection, `--bind`-less attach
//! scope, responder, withdrawal on SIGTERM).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::fake_opencode::{DEFAULT_REPLY, FakeOpenCode};
use common::mcp_client::{McpServerProc, wait_until_msg};
use common::netns::{Proc, opencode_agent_bin, opencode_mcp_bin, require_root};
use common::tailnet::{FakeLocalApi, NodeDoc, StatusDoc, Tailnet, proxy};
use serde_json::{Value, json};

const A: usize = 0;
const B: usize = 1;
const PASSWORD: &str = "tailnet-agent-secret";

fn find(out: &Value, name: &str) -> Option<Value> {
    out["instances"]
        .as_array()?
        .iter()
        .find(|i| i["name"] == name)
        .cloned()
}

async fn instances(server: &McpServerProc) -> Value {
    let (text, is_error, out) = server.call_text("instances", json!({})).await;
    assert!(!is_error, "{text}");
    out.expect("structured instances")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_binary_publishes_on_the_tailnet_and_withdraws_on_sigterm() {
    if !require_root() {
        return;
    }
    let net = tokio::task::block_in_place(|| Tailnet::create(2));
    let node_a = NodeDoc::of(&net, A, "node-a");
    let node_b = NodeDoc::of(&net, B, "node-b");
    // Each machine's tailscaled answers with itself as `Self`.
    let api_a = FakeLocalApi::start(&StatusDoc::new(node_a.clone(), vec![node_b.clone()]));
    let api_b = FakeLocalApi::start(&StatusDoc::new(node_b, vec![node_a]));

    // OpenCode on A's tailnet address: a fake on the test's loopback, reached
    // through a listener that lives in A's namespace.
    let fake = FakeOpenCode::builder()
        .password("opencode", PASSWORD)
        .start()
        .await;
    fake.create_session(Some("tailnet work"));
    let a_v4 = net.node(A).v4;
    let listener = net
        .run_in(A, move || std::net::TcpListener::bind((a_v4, 0)))
        .expect("listen on A's tailnet address");
    let oc_port = listener.local_addr().expect("local addr").port();
    listener.set_nonblocking(true).expect("nonblocking");
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    let to: SocketAddr = fake.addr();
    let proxying = tokio::spawn(proxy(listener, to));

    let mut cmd = net.command(A, opencode_agent_bin());
    cmd.args([
        "attach",
        "--host",
        &a_v4.to_string(),
        "--port",
        &oc_port.to_string(),
        "--name",
        "tailnet-agent",
        "--no-mdns",
        "--no-secret",
    ])
    .env_clear()
    .env("PATH", std::env::var("PATH").unwrap_or_default())
    .env("TAILSCALE_SOCKET", api_a.socket())
    .env("OPENCODE_SERVER_PASSWORD", PASSWORD)
    .env("OPENCODE_AGENT_LOG", "stderr")
    .env("RUST_LOG", "info");
    let mut agent = Proc::spawn("opencode-agent@A", cmd);

    let ns_b = net.node(B).ns.clone();
    let server = McpServerProc::spawn_program(
        "ip",
        &[
            "netns",
            "exec",
            &ns_b,
            &opencode_mcp_bin().display().to_string(),
        ],
        &[
            ("TRANSPORT", "tailscale"),
            ("TAILSCALE_SOCKET", &api_b.socket_str()),
            ("TAILSCALE_QUERY_TIMEOUT_MS", "300"),
            ("DISCOVERY_INTERVAL_MS", "500"),
            ("OPENCODE_SERVER_PASSWORD", PASSWORD),
        ],
    )
    .await;

    let inst = wait_until_msg(
        Duration::from_secs(20),
        "the agent's instance online over the tailnet",
        || async {
            find(&instances(&server).await, "tailnet-agent").filter(|i| i["status"] == "online")
        },
    )
    .await;
    assert_eq!(inst["transport"], "tailscale", "{inst}");
    assert_eq!(inst["reach"], "tailnet", "{inst}");
    assert_eq!(inst["url"], format!("http://{a_v4}:{oc_port}"), "{inst}");
    assert!(
        api_a.requests() > 0,
        "the agent asked its LocalAPI for the tailnet address"
    );

    // Driven over the tailnet, with the password.
    let (text, is_error, _) = server
        .call_text(
            "send",
            json!({"instance": "tailnet-agent", "message": "hello from B"}),
        )
        .await;
    assert!(!is_error, "{text}");
    assert_eq!(text, DEFAULT_REPLY);
    assert!(fake.saw_authorization(), "the password was sent");

    // SIGTERM: the agent withdraws the record and the instance goes, while
    // OpenCode (not the agent's to stop in attach mode) keeps running.
    agent.signal("TERM");
    let status = tokio::task::block_in_place(|| agent.wait_exit(Duration::from_secs(10)));
    assert!(
        status.is_some_and(|s| s.success()),
        "agent exit: {status:?}\n{:#?}",
        agent.lines()
    );
    wait_until_msg(
        Duration::from_secs(20),
        "the instance gone after the agent stopped",
        || async {
            find(&instances(&server).await, "tailnet-agent")
                .is_none()
                .then_some(())
        },
    )
    .await;
    assert!(!fake.is_dead());
    proxying.abort();
}
