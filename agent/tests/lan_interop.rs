//! Interoperability with a third-party mDNS implementation (python-zeroconf,
//! from the project's venv at `.cache/venv`), across network namespaces:
//!
//! - python-zeroconf in namespace B sees `opencode-agent attach`'s
//!   advertisement from namespace A with the documented TXT record
//!   (`txtvers=1` first, every entry ≤ 255 bytes, the keys of
//!   `opencode_mcp::announce::txt`), and sees it leave on SIGTERM;
//! - `opencode-mcp` (default TRANSPORT, `auto`) in namespace B lists the
//!   agent once although it is seen both by mDNS and through its relay file
//!   (`--relay-dir`), online over the path that works from B;
//! - `opencode-mcp` in namespace B sees an `_opencode._tcp` service that
//!   python-zeroconf publishes in namespace A, and sees it leave when
//!   python-zeroconf unregisters it.
//!
//! The OpenCode side is a small password-protected fake (health, event
//! stream) served by a helper process, so no real OpenCode is needed. Needs root and python-zeroconf: the
//! venv is created and `zeroconf` installed into it when missing (skips loudly
//! when that fails; under `CI` it must run).

#[path = "../../tests/common"]
mod common {
    pub mod netns;
}

use std::net::{Ipv4Addr, TcpListener};
use std::time::{Duration, Instant};

use common::netns::{
    Mcp, Netns, Proc, TempDir, helper_command, helper_role, park_forever, poll,
    require_python_zeroconf, require_root, serve_fake_opencode,
};
use opencode_mcp::announce::txt::{Announcement, MAX_ENTRY_BYTES};
use serde_json::{Value, json};

const HELPER: &str = "netns_helper";
const PASSWORD: &str = "interop-secret";
const FAKE_VERSION: &str = "fake-interop";

/// python-zeroconf browser: one JSON line per add/update/remove of `_opencode._tcp`.
const PY_BROWSE: &str = r#"
import json, signal, sys, time
from zeroconf import ServiceBrowser, ServiceListener, Zeroconf
zc = Zeroconf()
def entries(raw):
    out, i = [], 0
    while i < len(raw):
        n = raw[i]
        out.append(raw[i + 1:i + 1 + n].decode("utf-8", "replace"))
        i += 1 + n
    return out
class Listener(ServiceListener):
    def show(self, event, type_, name):
        info = zc.get_service_info(type_, name, timeout=3000)
        if info is None:
            print(json.dumps({"event": event + "_UNRESOLVED", "name": name}), flush=True)
            return
        print(json.dumps({"event": event, "name": name, "server": info.server, "port": info.port,
                          "addresses": info.parsed_addresses(), "txt": entries(info.text)}), flush=True)
    def add_service(self, zc, type_, name): self.show("ADD", type_, name)
    def update_service(self, zc, type_, name): self.show("UPDATE", type_, name)
    def remove_service(self, zc, type_, name):
        print(json.dumps({"event": "REMOVE", "name": name}), flush=True)
browser = ServiceBrowser(zc, "_opencode._tcp.local.", Listener())
signal.signal(signal.SIGTERM, lambda *a: (zc.close(), sys.exit(0)))
print("READY", flush=True)
while True:
    time.sleep(1)
"#;

/// python-zeroconf publisher: argv = address, port, instance, JSON list of [key, value].
const PY_PUBLISH: &str = r#"
import json, signal, socket, sys, time
from zeroconf import ServiceInfo, Zeroconf
addr, port, instance, props = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
zc = Zeroconf()
info = ServiceInfo("_opencode._tcp.local.", instance + "._opencode._tcp.local.",
                   addresses=[socket.inet_aton(addr)], port=port,
                   properties={k: v for k, v in props}, server="pyzc-host.local.")
zc.register_service(info)
def stop(*a):
    zc.unregister_service(info)
    zc.close()
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("READY", flush=True)
while True:
    time.sleep(1)
"#;

/// A fake OpenCode on host A's address (a helper process) and a
/// python-zeroconf browser in host B, both ready; returns the fake, its port
/// and the browser.
fn fake_in_a_browser_in_b(net: &Netns, python: &std::path::Path) -> (Proc, u16, Proc) {
    let mut fake = Proc::spawn("fake-opencode", {
        let mut cmd = helper_command(net, 0, HELPER, "fake-opencode");
        cmd.env("OCT_ADDR", net.addr(0).to_string());
        cmd
    });
    let ready = fake.wait_line("READY", Duration::from_secs(20));
    let port: u16 = ready
        .text
        .rsplit(' ')
        .next()
        .and_then(|p| p.trim().parse().ok())
        .expect("fake port");
    let mut browser = Proc::spawn("zeroconf-browse", {
        let mut cmd = net.command(1, python);
        cmd.args(["-c", PY_BROWSE]);
        cmd
    });
    browser.wait_line("READY", Duration::from_secs(20));
    (fake, port, browser)
}

/// The next JSON line of `proc` with `event` == `event` (and `name` containing `name_part`).
fn wait_event(proc: &mut Proc, event: &str, name_part: &str, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let found = proc.lines().into_iter().find_map(|l| {
            let v: Value = serde_json::from_str(&l.text).ok()?;
            (v["event"] == event && v["name"].as_str().is_some_and(|n| n.contains(name_part)))
                .then_some(v)
        });
        if let Some(v) = found {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "python-zeroconf did not report {event} {name_part:?} within {timeout:?}; output:\n{}",
            proc.output()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn python_zeroconf_and_our_mdns_see_each_others_advertisements() {
    if !require_root() {
        return;
    }
    let Some(python) = require_python_zeroconf() else {
        return;
    };
    let net = Netns::create(2);
    let tmp = TempDir::new("lan-interop");
    let project = tmp.subdir("interop-proj");
    let relay_dir = tmp.subdir("relay").display().to_string();
    let addr_a = net.addr(0);

    // A fake OpenCode in A, python-zeroconf browsing in B.
    let (_fake, fake_port, mut browser) = fake_in_a_browser_in_b(&net, &python);

    // opencode-mcp in B with the default TRANSPORT (auto: mDNS and relay files).
    let mcp = Mcp::start(
        &net,
        1,
        &[
            ("RELAY_REGISTRY_DIR", &relay_dir),
            ("OPENCODE_SERVER_PASSWORD", PASSWORD),
        ],
    );

    // 1. Our advertisement (the agent attached to the fake, also writing a
    // relay registration), seen by python-zeroconf.
    let mut agent = Proc::spawn("agent-attach", {
        let mut cmd = net.command(0, env!("CARGO_BIN_EXE_opencode-agent"));
        cmd.args([
            "attach",
            "--port",
            &fake_port.to_string(),
            "--host",
            &addr_a.to_string(),
        ])
        .args(["--name", "interop-box", "--relay-dir", &relay_dir])
        .current_dir(&project)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("OPENCODE_SERVER_PASSWORD", PASSWORD)
        .env("OPENCODE_AGENT_LOG", "stderr")
        .env("RUST_LOG", "info");
        cmd
    });
    let seen = wait_event(&mut browser, "ADD", "interop-box", Duration::from_secs(20));
    let txt: Vec<String> = seen["txt"]
        .as_array()
        .expect("txt list")
        .iter()
        .map(|e| e.as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(txt.first().map(String::as_str), Some("txtvers=1"), "{seen}");
    for e in &txt {
        assert!(e.len() <= MAX_ENTRY_BYTES, "entry over 255 bytes: {e}");
    }
    let pairs: Vec<(&str, &str)> = txt
        .iter()
        .map(|e| e.split_once('=').unwrap_or((e.as_str(), "")))
        .collect();
    let ann = Announcement::from_txt(pairs.iter().copied())
        .unwrap_or_else(|e| panic!("python-zeroconf's TXT does not parse ({e}): {seen}"));
    assert_eq!(ann.name, "interop-box");
    assert_eq!(
        ann.cwd.as_deref(),
        Some(project.display().to_string().as_str())
    );
    assert!(
        ann.hostname.as_deref().is_some_and(|h| !h.is_empty()),
        "{seen}"
    );
    assert_eq!(ann.version.as_deref(), Some(FAKE_VERSION), "{seen}");
    assert!(ann.auth, "auth=1 with a password: {seen}");
    for key in ["id", "name", "host", "cwd", "ver", "auth"] {
        assert!(
            pairs.iter().any(|(k, _)| *k == key),
            "no `{key}` in {txt:?}"
        );
    }
    assert_eq!(seen["port"], json!(fake_port), "{seen}");
    assert!(
        seen["addresses"]
            .as_array()
            .is_some_and(|a| a.contains(&json!(addr_a.to_string()))),
        "{seen}"
    );
    // The same instance through both transports is one instance: the relay
    // file's path (127.0.0.1, ranked first) does not work from B, so the
    // registry falls back to the mDNS path.
    let merged = poll(
        Duration::from_secs(10),
        "one instance, online over mDNS",
        || {
            mcp.find_instance(|i| i["key"] == ann.id.as_str())
                .filter(|i| i["status"] == "online" && i["transport"] == "mdns")
        },
    );
    assert_eq!(merged["name"], "interop-box", "{merged}");
    // The relay transport has read the agent's file (same key)…
    poll(
        Duration::from_secs(5),
        "the relay registration to be read",
        || mcp.stderr_line(&["registration seen", &format!("key={}", ann.id)]),
    );
    // …and it is still one instance.
    let listed = mcp.instances();
    assert_eq!(
        listed["instances"].as_array().map(Vec::len),
        Some(1),
        "one instance for two paths: {listed}"
    );
    // Goodbye on SIGTERM reaches python-zeroconf too, and the server drops it.
    agent.signal("TERM");
    wait_event(
        &mut browser,
        "REMOVE",
        "interop-box",
        Duration::from_secs(5),
    );
    poll(
        Duration::from_secs(2),
        "the agent's instance to leave",
        || {
            mcp.find_instance(|i| i["key"] == ann.id.as_str())
                .is_none()
                .then_some(())
        },
    );
    agent.wait_exit(Duration::from_secs(10));

    // 2. python-zeroconf's advertisement, seen by opencode-mcp.
    let theirs = Announcement {
        id: "pyzc-0001".into(),
        name: "pyzc-box-proj".into(),
        hostname: Some("pyzc-box".into()),
        cwd: Some("/home/py/proj".into()),
        version: Some("1.18.33".into()),
        auth: false,
        ..Announcement::default()
    };
    let mut publisher = Proc::spawn("zeroconf-publish", {
        let mut cmd = net.command(0, &python);
        cmd.args(["-c", PY_PUBLISH])
            .arg(addr_a.to_string())
            .arg(fake_port.to_string())
            .arg("pyzc-box-proj")
            .arg(json!(theirs.to_txt()).to_string());
        cmd
    });
    publisher.wait_line("READY", Duration::from_secs(20));
    let inst = poll(
        Duration::from_secs(10),
        "python-zeroconf's service, online",
        || {
            mcp.find_instance(|i| i["key"] == "pyzc-0001")
                .filter(|i| i["status"] == "online")
        },
    );
    assert_eq!(inst["name"], "pyzc-box-proj", "{inst}");
    assert_eq!(inst["hostname"], "pyzc-box", "{inst}");
    assert_eq!(inst["cwd"], "/home/py/proj", "{inst}");
    assert_eq!(
        inst["url"],
        format!("http://{addr_a}:{fake_port}"),
        "{inst}"
    );
    assert_eq!(inst["transport"], "mdns", "{inst}");
    let t0 = Instant::now();
    publisher.signal("TERM");
    poll(
        Duration::from_secs(3),
        "python-zeroconf's service to leave",
        || {
            mcp.find_instance(|i| i["key"] == "pyzc-0001")
                .is_none()
                .then_some(())
        },
    );
    eprintln!("python-zeroconf unregister → gone after {:?}", t0.elapsed());
}

/// Not a test: the helper process of the test above.
#[test]
#[ignore = "helper process of other tests; acts only when OCT_NETNS_HELPER is set"]
fn netns_helper() {
    let Some(role) = helper_role() else {
        return;
    };
    assert_eq!(role, "fake-opencode", "unknown helper role");
    let addr: Ipv4Addr = std::env::var("OCT_ADDR")
        .expect("OCT_ADDR")
        .parse()
        .expect("OCT_ADDR is IPv4");
    let listener = TcpListener::bind((addr, 0)).expect("bind the fake OpenCode");
    let port = listener.local_addr().expect("local addr").port();
    serve_fake_opencode(listener, FAKE_VERSION, true);
    println!("READY {port}");
    park_forever();
}

/// Every announcement of `name_part` python-zeroconf reported so far (ADD or
/// UPDATE), parsed.
fn announcements(proc: &Proc, name_part: &str) -> Vec<Announcement> {
    proc.lines()
        .into_iter()
        .filter_map(|l| {
            let v: Value = serde_json::from_str(&l.text).ok()?;
            if !(v["event"] == "ADD" || v["event"] == "UPDATE")
                || !v["name"].as_str().is_some_and(|n| n.contains(name_part))
            {
                return None;
            }
            let txt: Vec<String> = v["txt"]
                .as_array()?
                .iter()
                .filter_map(|e| e.as_str().map(str::to_string))
                .collect();
            Announcement::from_txt(
                txt.iter()
                    .map(|e| e.split_once('=').unwrap_or((e.as_str(), ""))),
            )
            .ok()
        })
        .collect()
}

/// With a fleet secret the agent re-signs its mDNS TXT every heartbeat, so
/// a server with ANNOUNCE_MAX_AGE_S keeps accepting it; seen here by a
/// third-party browser as TXT updates with later signing times.
#[test]
fn with_a_fleet_secret_the_mdns_record_is_re_signed_every_heartbeat() {
    use opencode_mcp::secret::FleetSecret;
    if !require_root() {
        return;
    }
    let Some(python) = require_python_zeroconf() else {
        return;
    };
    let secret = FleetSecret::from_text(&"5e".repeat(32)).expect("secret");
    let net = Netns::create(2);
    let tmp = TempDir::new("lan-resign");
    let project = tmp.subdir("resign-proj");
    let addr_a = net.addr(0);
    let (_fake, fake_port, mut browser) = fake_in_a_browser_in_b(&net, &python);

    let mut agent = Proc::spawn("agent-attach", {
        let mut cmd = net.command(0, env!("CARGO_BIN_EXE_opencode-agent"));
        cmd.args([
            "attach",
            "--port",
            &fake_port.to_string(),
            "--host",
            &addr_a.to_string(),
            "--name",
            "resign-box",
            "--heartbeat-s",
            "1",
        ])
        .current_dir(&project)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("OPENCODE_MCP_SECRET", secret.to_export_string())
        .env("OPENCODE_SERVER_PASSWORD", PASSWORD)
        .env("OPENCODE_AGENT_LOG", "stderr")
        .env("RUST_LOG", "info,opencode_agent=debug");
        cmd
    });
    wait_event(&mut browser, "ADD", "resign-box", Duration::from_secs(20));
    let first = announcements(&browser, "resign-box")
        .into_iter()
        .next()
        .expect("the first announcement parses");
    let first_signed = first.signature.clone().expect("signed with the secret");
    // A later signature arrives without anything else changing.
    let later = poll(
        Duration::from_secs(15),
        "a re-signed TXT (a later `at`)",
        || {
            announcements(&browser, "resign-box")
                .into_iter()
                .find(|a| a.signature.as_ref().is_some_and(|s| s.at > first_signed.at))
        },
    );
    let signed = later.signature.clone().expect("signed");
    assert_ne!(signed.sig, first_signed.sig);
    assert_eq!(later.id, first.id, "the same instance");
    secret
        .verify(
            &later.id,
            fake_port,
            &later.signed_addrs,
            signed.at,
            &signed.sig,
        )
        .expect("the new signature verifies with the fleet secret");
    assert!(
        later.signed_addrs.contains(&std::net::IpAddr::V4(addr_a)),
        "{:?}",
        later.signed_addrs
    );
    agent.signal("TERM");
    let status = agent.wait_exit(Duration::from_secs(10));
    assert!(
        status.is_some_and(|s| s.success()),
        "agent exit {status:?}:\n{}",
        agent.output()
    );
}
