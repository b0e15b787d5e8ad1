//! Issue 5 over mDNS, inside network namespaces the test creates (nothing
//! multicasts in the host namespace). Advertisements are published with a
//! third-party mDNS library (python-zeroconf from `.cache/venv`, installed by
//! scripts/install-test-deps) and point at recording HTTP servers; an
//! `opencode-mcp` with a fleet secret browses from another namespace:
//!
//! - a spoofed (unsigned) `_opencode._tcp` advertisement is listed
//!   `untrusted` and its server never receives a request;
//! - a correctly signed advertisement at address A is trusted and contacted
//!   with the instance's derived password, while the same TXT replayed at
//!   address B is refused (B never receives a request);
//! - an advertisement signed with another secret is untrusted, and only it.
//!
//! Needs root (skips loudly otherwise; under `CI` it must run).

mod common;

use std::io::Write;
use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::netns::{
    Mcp, Netns, Proc, in_netns, poll, read_request_head, request_path, require_python_zeroconf,
    require_root,
};
use opencode_mcp::announce::txt::Announcement;
use opencode_mcp::secret::FleetSecret;
use serde_json::{Value, json};

/// python-zeroconf publisher: argv[1] = JSON list of services
/// `{instance, server, addr, port, txt: [[k, v], …]}`; prints READY once all
/// are registered, unregisters them on SIGTERM.
const PY_PUBLISH: &str = r#"
import json, signal, socket, sys, time
from zeroconf import ServiceInfo, Zeroconf
zc = Zeroconf()
infos = []
for s in json.loads(sys.argv[1]):
    info = ServiceInfo("_opencode._tcp.local.", s["instance"] + "._opencode._tcp.local.",
                       addresses=[socket.inet_aton(s["addr"])], port=s["port"],
                       properties={k: v for k, v in s["txt"]}, server=s["server"])
    zc.register_service(info)
    infos.append(info)
def stop(*a):
    for info in infos:
        zc.unregister_service(info)
    zc.close()
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("READY", flush=True)
while True:
    time.sleep(1)
"#;

/// One request as the recorder saw it.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    authorization: Option<String>,
}

/// A recording HTTP server that answers like OpenCode (health JSON, an event
/// stream, empty lists) inside a namespace. With `password`, requests without
/// exactly that Basic header get 401.
struct Recorder {
    port: u16,
    log: Arc<Mutex<Vec<Seen>>>,
}

impl Recorder {
    fn start(ns: &str, port: u16, password: Option<String>) -> Recorder {
        let listener = in_netns(ns, || {
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).expect("bind recorder")
        });
        let port = listener.local_addr().expect("local addr").port();
        let log: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let rec = log.clone();
        let want = password.map(|p| format!("Basic {}", b64(&format!("opencode:{p}"))));
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let rec = rec.clone();
                let want = want.clone();
                thread::spawn(move || {
                    let Some(head) = read_request_head(&mut conn) else {
                        return;
                    };
                    let path = request_path(&head).to_string();
                    let authorization = head.lines().find_map(|l| {
                        let (k, v) = l.split_once(':')?;
                        k.eq_ignore_ascii_case("authorization")
                            .then(|| v.trim().to_string())
                    });
                    rec.lock().unwrap_or_else(|e| e.into_inner()).push(Seen {
                        path: path.clone(),
                        authorization: authorization.clone(),
                    });
                    if want.is_some() && authorization != want {
                        let _ = conn.write_all(b"HTTP/1.1 401 Unauthorized\r\nwww-authenticate: Basic\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                        return;
                    }
                    if path == "/event" {
                        let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n");
                        let mut frame = json!({"type": "server.connected", "properties": {}});
                        // Serve the stream until the client goes away.
                        while conn
                            .write_all(format!("data: {frame}\n\n").as_bytes())
                            .and_then(|()| conn.flush())
                            .is_ok()
                        {
                            thread::sleep(Duration::from_secs(1));
                            frame = json!({"type": "server.heartbeat", "properties": {}});
                        }
                        return;
                    }
                    let (status, body) = match path.as_str() {
                        "/global/health" => {
                            ("200 OK", json!({"healthy": true, "version": "rec-1"}))
                        }
                        "/session/status" => ("200 OK", json!({})),
                        "/session" | "/permission" | "/question" => ("200 OK", json!([])),
                        _ => ("404 Not Found", json!({"name": "NotFoundError"})),
                    };
                    let body = body.to_string();
                    let _ = conn.write_all(
                        format!("HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len())
                            .as_bytes(),
                    );
                });
            }
        });
        Recorder { port, log }
    }

    fn requests(&self) -> Vec<Seen> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn b64(s: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = s.as_bytes();
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn announcement(id: &str, name: &str) -> Announcement {
    Announcement {
        id: id.into(),
        name: name.into(),
        hostname: Some(format!("{name}-host")),
        cwd: Some(format!("/srv/{name}")),
        version: Some("1.0.0".into()),
        auth: true,
        ..Announcement::default()
    }
}

fn service(
    instance: &str,
    server: &str,
    addr: Ipv4Addr,
    port: u16,
    txt: &[(String, String)],
) -> Value {
    json!({"instance": instance, "server": server, "addr": addr.to_string(), "port": port, "txt": txt})
}

fn publish(net: &Netns, i: usize, python: &PathBuf, label: &str, services: &[Value]) -> Proc {
    let mut cmd = net.command(i, python);
    cmd.args(["-c", PY_PUBLISH])
        .arg(Value::Array(services.to_vec()).to_string());
    let mut p = Proc::spawn(label, cmd);
    p.wait_line("READY", Duration::from_secs(30));
    p
}

fn by_key<'a>(key: &'a str) -> impl Fn(&Value) -> bool + 'a {
    move |i: &Value| i["key"] == key
}

#[test]
fn spoofed_replayed_and_foreign_adverts_are_untrusted_and_never_contacted() {
    if !require_root() {
        return;
    }
    let Some(python) = require_python_zeroconf() else {
        return;
    };
    // Host 0: the owner's machine A (and a stranger on the same LAN);
    // host 1: opencode-mcp; host 2: an attacker at address B.
    let net = Netns::create(3);
    let (addr_a, addr_b) = (net.addr(0), net.addr(2));
    let ours = FleetSecret::generate().expect("secret");
    let theirs = FleetSecret::generate().expect("secret");
    let export = ours.to_export_string();
    let mcp = Mcp::start(
        &net,
        1,
        &[
            ("TRANSPORT", "mdns"),
            ("OPENCODE_MCP_SECRET", &export),
            ("OPENCODE_MCP_SECRET_FILE", "/nonexistent/secret"),
            ("HEALTH_CHECK_TIMEOUT_MS", "1000"),
            ("DISCOVERY_INTERVAL_MS", "1000"),
        ],
    );

    // Recording servers: the real instance wants its derived password.
    let good_id = "sec-mdns-good";
    let good = Recorder::start(net.ns(0), 0, Some(ours.instance_password(good_id)));
    let spoof = Recorder::start(net.ns(0), 0, None);
    let foreign = Recorder::start(net.ns(0), 0, None);
    // The replayer listens at B on the very port the signature names.
    let replay = Recorder::start(net.ns(2), good.port, None);

    // The signed TXT of the real instance, for A only.
    let mut signed = announcement(good_id, "sec-good");
    signed.sign_with(&ours, good.port, &[addr_a.into()], now_s());
    let signed_txt = signed.to_txt();
    let sig = signed.signature.clone().expect("signed").sig;

    // 1. The replay alone first: same TXT, address B. Refused.
    let _attacker = publish(
        &net,
        2,
        &python,
        "zeroconf-replay",
        &[service(
            "sec-good-copy",
            "evil-b.local.",
            addr_b,
            good.port,
            &signed_txt,
        )],
    );
    let inst = poll(Duration::from_secs(15), "the replay, untrusted", || {
        mcp.find_instance(by_key(good_id))
            .filter(|i| i["status"] == "untrusted")
    });
    let reason = inst["untrusted_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(&addr_b.to_string()) && reason.contains("does not cover"),
        "{inst}"
    );

    // 2. The real advertisement at A, a spoof and one signed with another
    // secret, all from host 0 with a third-party mDNS library.
    let mut wrong = announcement("sec-mdns-foreign", "sec-foreign");
    wrong.sign_with(&theirs, foreign.port, &[addr_a.into()], now_s());
    let _lan = publish(
        &net,
        0,
        &python,
        "zeroconf-lan",
        &[
            service("sec-good", "good-a.local.", addr_a, good.port, &signed_txt),
            service(
                "sec-spoof",
                "spoof-a.local.",
                addr_a,
                spoof.port,
                &announcement("sec-mdns-spoof", "sec-spoof").to_txt(),
            ),
            service(
                "sec-foreign",
                "foreign-a.local.",
                addr_a,
                foreign.port,
                &wrong.to_txt(),
            ),
            // Malformed signature entries: a listed problem, nothing else.
            service(
                "sec-garbled",
                "garbled-a.local.",
                addr_a,
                spoof.port,
                &[
                    ("txtvers".to_string(), "1".to_string()),
                    ("id".to_string(), "sec-mdns-garbled".to_string()),
                    ("name".to_string(), "sec-garbled".to_string()),
                    ("at".to_string(), "yesterday".to_string()),
                    ("sig".to_string(), "zz".to_string()),
                ],
            ),
        ],
    );

    // The real one wins over the replay and is contacted at A with its password.
    let inst = poll(
        Duration::from_secs(15),
        "the signed instance online",
        || {
            mcp.find_instance(by_key(good_id))
                .filter(|i| i["status"] == "online")
        },
    );
    assert_eq!(inst["trust"], "signed", "{inst}");
    assert_eq!(
        inst["url"],
        format!("http://{addr_a}:{}", good.port),
        "{inst}"
    );
    let sessions = mcp.call(
        "sessions",
        json!({"instance": "sec-good"}),
        Duration::from_secs(10),
    );
    assert_ne!(sessions["isError"], true, "{sessions}");

    let spoofed = poll(Duration::from_secs(15), "the spoof, untrusted", || {
        mcp.find_instance(by_key("sec-mdns-spoof"))
            .filter(|i| i["status"] == "untrusted")
    });
    let reason = spoofed["untrusted_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("not signed") && reason.contains("OPENCODE_MCP_SECRET"),
        "{spoofed}"
    );
    let other = poll(
        Duration::from_secs(15),
        "the foreign one, untrusted",
        || {
            mcp.find_instance(by_key("sec-mdns-foreign"))
                .filter(|i| i["status"] == "untrusted")
        },
    );
    assert!(
        other["untrusted_reason"]
            .as_str()
            .is_some_and(|r| r.contains("another fleet secret")),
        "{other}"
    );
    poll(
        Duration::from_secs(15),
        "the garbled record as a problem",
        || {
            let out = mcp.instances();
            out["problems"]
                .as_array()?
                .iter()
                .any(|p| {
                    p["source"]
                        .as_str()
                        .is_some_and(|s| s.contains("sec-garbled"))
                        && p["reason"].as_str().is_some_and(|r| r.contains("`at`"))
                })
                .then_some(())
        },
    );
    assert!(mcp.find_instance(by_key("sec-mdns-garbled")).is_none());
    // Tools refuse the spoof.
    let refused = mcp.call(
        "send",
        json!({"instance": "sec-spoof", "message": "hi"}),
        Duration::from_secs(10),
    );
    assert_eq!(refused["isError"], true, "{refused}");
    assert!(
        common::netns::result_text(&refused).contains("untrusted"),
        "{refused}"
    );

    // Let the real one be health-checked a few more times, then: the
    // strangers received nothing at all, the real one only its own password.
    let checks = |r: &Recorder| {
        r.requests()
            .iter()
            .filter(|s| s.path == "/global/health")
            .count()
    };
    let before = checks(&good);
    poll(
        Duration::from_secs(15),
        "more health checks of the signed instance",
        || (checks(&good) >= before + 2).then_some(()),
    );
    for (label, r) in [
        ("spoof", &spoof),
        ("foreign", &foreign),
        ("replay at B", &replay),
    ] {
        assert!(
            r.requests().is_empty(),
            "{label} was contacted: {:?}",
            r.requests()
        );
    }
    let want = format!(
        "Basic {}",
        b64(&format!("opencode:{}", ours.instance_password(good_id)))
    );
    assert!(
        good.requests()
            .iter()
            .all(|s| s.authorization.as_deref() == Some(want.as_str())),
        "{:?}",
        good.requests()
    );

    // Nothing secret in the server's output.
    let listed = mcp.instances().to_string();
    let logs = mcp
        .stderr_line(&[&export])
        .or_else(|| mcp.stderr_line(&[&sig]));
    assert!(logs.is_none(), "leak in the logs: {logs:?}");
    for needle in [
        export.as_str(),
        sig.as_str(),
        ours.instance_password(good_id).as_str(),
    ] {
        assert!(!listed.contains(needle), "leak in instances");
    }
}
