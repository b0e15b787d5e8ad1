//! Issue 5 over the local-relay transport, on loopback only: with a fleet
//! secret, a signed registration is contacted with its derived password,
//! while unsigned, forged and altered ones are listed `untrusted` and never
//! contacted; without a secret, `opencode-connected`'s unsigned files work
//! as before. Also: the per-transport instance cap, configuration errors,
//! and that no secret, password or signature appears in output or logs.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::fake_opencode::{FakeOpenCode, basic_auth_header};
use common::mcp_client::{McpServerProc, RelayDir, wait_until_msg};
use opencode_mcp::announce::Registration;
use opencode_mcp::secret::FleetSecret;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(15);

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn secret(byte: u8) -> FleetSecret {
    FleetSecret::from_text(&format!("{byte:02x}").repeat(32)).expect("valid secret")
}

/// A registration for `id` at `port`, signed with `with` when given.
fn registration(name: &str, id: &str, port: u16, with: Option<&FleetSecret>) -> Registration {
    let mut r = Registration {
        name: name.into(),
        hostname: Some("sec-box".into()),
        port,
        local_port: Some(port),
        cwd: Some(format!("/srv/{name}")),
        id: Some(id.into()),
        ..Registration::default()
    };
    if let Some(s) = with {
        r.sign_with(s, now_s());
    }
    r
}

fn write(relay: &RelayDir, stem: &str, reg: &Registration) {
    relay.write_raw(&format!("{stem}.json"), reg.to_json().as_bytes());
}

async fn instances(server: &McpServerProc) -> (String, Value) {
    let (text, is_error, out) = server.call_text("instances", json!({})).await;
    assert!(!is_error, "{text}");
    (text, out.expect("structured instances"))
}

async fn wait_status(server: &McpServerProc, key: &str, status: &str) -> Value {
    wait_until_msg(WAIT, &format!("{key} to be {status}"), || async {
        let (_, out) = instances(server).await;
        out["instances"]
            .as_array()?
            .iter()
            .find(|i| i["key"] == key && i["status"] == status)
            .cloned()
    })
    .await
}

fn server_env<'a>(relay: &'a RelayDir, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![
        relay.env(),
        ("TRANSPORT", "local-relay"),
        ("HEALTH_CHECK_TIMEOUT_MS", "1000"),
        ("DISCOVERY_INTERVAL_MS", "500"),
        // Never pick up a developer's real secret file.
        (
            "OPENCODE_MCP_SECRET_FILE",
            "/nonexistent/opencode-mcp-secret",
        ),
    ];
    env.extend_from_slice(extra);
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_secret_only_signed_registrations_are_contacted_with_their_derived_password() {
    let ours = secret(0x11);
    let theirs = secret(0x22);
    let relay = RelayDir::new();

    // Signed with our secret: OpenCode demands the derived password.
    let good_pw = ours.instance_password("sec-good-1");
    let good = FakeOpenCode::builder()
        .password("opencode", &good_pw)
        .start()
        .await;
    let good_reg = registration("sec-good", "sec-good-1", good.port(), Some(&ours));
    write(&relay, "sec-good", &good_reg);
    // Unsigned (what opencode-connected writes), signed with another secret,
    // and a signed file altered to point at another port: never contacted.
    let plain = FakeOpenCode::builder().start().await;
    write(
        &relay,
        "sec-plain",
        &registration("sec-plain", "sec-plain-1", plain.port(), None),
    );
    let foreign = FakeOpenCode::builder().start().await;
    write(
        &relay,
        "sec-foreign",
        &registration(
            "sec-foreign",
            "sec-foreign-1",
            foreign.port(),
            Some(&theirs),
        ),
    );
    let moved = FakeOpenCode::builder().start().await;
    let mut altered = registration("sec-moved", "sec-moved-1", 1, Some(&ours));
    altered.port = moved.port();
    write(&relay, "sec-moved", &altered);

    let export = ours.to_export_string();
    let server = McpServerProc::spawn(&server_env(
        &relay,
        &[
            ("OPENCODE_MCP_SECRET", &export),
            // Ignored with a secret: passwords are derived per instance.
            ("OPENCODE_SERVER_PASSWORD", "global-password-not-sent"),
        ],
    ))
    .await;

    let inst = wait_status(&server, "sec-good-1", "online").await;
    assert_eq!(inst["trust"], "signed", "{inst}");
    // It is usable, with the derived password.
    let (text, is_error, _) = server
        .call_text("sessions", json!({"instance": "sec-good"}))
        .await;
    assert!(!is_error, "{text}");
    let want = basic_auth_header("opencode", &good_pw);
    let headers = good.authorization_headers();
    assert!(!headers.is_empty());
    assert!(headers.iter().all(|h| *h == want), "{headers:?}");

    for (key, why) in [
        ("sec-plain-1", "not signed"),
        ("sec-foreign-1", "another fleet secret"),
        ("sec-moved-1", "another fleet secret"),
    ] {
        let inst = wait_status(&server, key, "untrusted").await;
        let reason = inst["untrusted_reason"].as_str().unwrap_or_default();
        assert!(reason.contains(why), "{key}: {inst}");
        assert!(
            reason.contains("OPENCODE_MCP_SECRET"),
            "says what to do: {inst}"
        );
        assert!(inst["trust"].is_null(), "{inst}");
    }
    // Every tool refuses them, saying why.
    let name = "sec-plain";
    for (tool, args) in [
        ("sessions", json!({"instance": name})),
        ("read", json!({"instance": name})),
        ("send", json!({"instance": name, "message": "rm -rf /"})),
    ] {
        let (text, is_error, _) = server.call_text(tool, args).await;
        assert!(is_error, "{tool} must refuse an untrusted instance: {text}");
        assert!(
            text.contains("untrusted") && text.contains("not signed"),
            "{tool}: {text}"
        );
    }
    let (text, _) = instances(&server).await;
    assert!(text.contains("untrusted"), "{text}");

    // Let a few discovery rounds pass (the good one is re-checked), then
    // check nobody untrusted was ever contacted.
    let checks = good.request_count("/global/health");
    wait_until_msg(
        WAIT,
        "more health checks of the trusted instance",
        || async { (good.request_count("/global/health") >= checks + 2).then_some(()) },
    )
    .await;
    for (label, fake) in [
        ("unsigned", &plain),
        ("foreign", &foreign),
        ("altered", &moved),
    ] {
        assert!(
            fake.requests().is_empty(),
            "the {label} instance was contacted: {:?}",
            fake.requests()
        );
    }

    // No secret, derived password or signature in output or logs.
    let (text, out) = instances(&server).await;
    let logs = server.stderr_lines().join("\n");
    let sig = good_reg.sig.clone().expect("signed");
    for needle in [
        export.as_str(),
        good_pw.as_str(),
        sig.as_str(),
        "global-password-not-sent",
    ] {
        assert!(!text.contains(needle), "leak in instances text");
        assert!(!out.to_string().contains(needle), "leak in instances JSON");
        assert!(!logs.contains(needle), "leak in the logs");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_secret_unsigned_registrations_work_as_before() {
    let relay = RelayDir::new();
    let fake = FakeOpenCode::builder().start().await;
    // Exactly what opencode-connected writes: no id, no signature.
    relay.write_registration(
        "legacy",
        json!({"name": "legacy", "hostname": "h", "port": fake.port(), "localPort": 4096,
               "cwd": "/p", "connectedAt": "2026-01-01T00:00:00Z"}),
    );
    // A signed file is fine too (it cannot be verified, so it is `unsigned`).
    let signed_fake = FakeOpenCode::builder().start().await;
    write(
        &relay,
        "signed",
        &registration(
            "signed",
            "signed-1",
            signed_fake.port(),
            Some(&secret(0x33)),
        ),
    );
    let server = McpServerProc::spawn(&server_env(&relay, &[])).await;
    let inst = wait_status(&server, "relay:legacy", "online").await;
    assert_eq!(inst["trust"], "unsigned", "{inst}");
    let inst = wait_status(&server, "signed-1", "online").await;
    assert_eq!(inst["trust"], "unsigned", "{inst}");
    let (text, is_error, _) = server
        .call_text("sessions", json!({"instance": "legacy"}))
        .await;
    assert!(!is_error, "{text}");
    assert!(
        !fake.saw_authorization(),
        "no password configured, none sent"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_beyond_the_per_transport_cap_are_held_back_reported_and_admitted_when_slots_free()
 {
    let relay = RelayDir::new();
    let fake = FakeOpenCode::builder().start().await;
    for i in 0..5 {
        relay.write_registration(
            &format!("cap-{i}"),
            json!({"name": format!("cap-{i}"), "port": fake.port(), "id": format!("cap-{i}")}),
        );
    }
    let server =
        McpServerProc::spawn(&server_env(&relay, &[("MAX_INSTANCES_PER_TRANSPORT", "3")])).await;
    let out = wait_until_msg(WAIT, "the cap problem", || async {
        let (_, out) = instances(&server).await;
        out["problems"]
            .as_array()?
            .iter()
            .any(|p| {
                p["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("MAX_INSTANCES_PER_TRANSPORT=3"))
            })
            .then_some(out)
    })
    .await;
    assert_eq!(out["instances"].as_array().map(Vec::len), Some(3), "{out}");
    let listed: Vec<String> = out["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["name"].as_str().map(str::to_string))
        .collect();
    let held: Vec<String> = (0..5)
        .map(|i| format!("cap-{i}"))
        .filter(|n| !listed.contains(n))
        .collect();
    assert_eq!(held.len(), 2, "{out}");

    // Two listed instances go away: the held-back ones take their places,
    // without being announced again, and the problem clears.
    relay.remove(&listed[0]);
    relay.remove(&listed[1]);
    let out = wait_until_msg(WAIT, "the held-back instances admitted", || async {
        let (_, out) = instances(&server).await;
        let mut names: Vec<String> = out["instances"]
            .as_array()?
            .iter()
            .filter(|i| i["status"] == "online")
            .filter_map(|i| i["name"].as_str().map(str::to_string))
            .collect();
        names.sort();
        let mut want = vec![listed[2].clone(), held[0].clone(), held[1].clone()];
        want.sort();
        (names == want).then_some(out)
    })
    .await;
    assert_eq!(out["problem_count"], 0, "{out}");
    server.shutdown().await;
}

#[test]
fn bad_security_settings_stop_the_server_with_what_to_do() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("secret");
    std::fs::write(&file, secret(0x44).to_export_string()).expect("write secret");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let run = |env: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_opencode-mcp"));
        cmd.arg("instances")
            .arg("--settle-ms")
            .arg("100")
            .env_clear()
            .env("TRANSPORT", "local-relay")
            .env("RELAY_REGISTRY_DIR", dir.path().join("relay"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run opencode-mcp");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let path = file.to_str().expect("utf-8");
    let (code, err) = run(&[("OPENCODE_MCP_SECRET_FILE", path)]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("chmod 600"), "{err}");
    assert!(!err.contains(&secret(0x44).to_export_string()), "{err}");
    let (code, err) = run(&[("OPENCODE_MCP_SECRET", "short")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("OPENCODE_MCP_SECRET") && !err.contains("short\n"),
        "{err}"
    );
    let (code, err) = run(&[("ALLOW_ADDRESSES", "10.0.0.0/8,nonsense")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("ALLOW_ADDRESSES") && err.contains("nonsense"),
        "{err}"
    );
    // A good file works.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let (code, err) = run(&[("OPENCODE_MCP_SECRET_FILE", path)]);
    assert_eq!(code, Some(0), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unrenewed_signature_loses_trust_after_announce_max_age_and_a_renewed_one_regains_it() {
    let ours = secret(0x33);
    let relay = RelayDir::new();
    let fake = FakeOpenCode::builder()
        .password("opencode", &ours.instance_password("sec-aging-1"))
        .start()
        .await;
    write(
        &relay,
        "sec-aging",
        &registration("sec-aging", "sec-aging-1", fake.port(), Some(&ours)),
    );
    let export = ours.to_export_string();
    let server = McpServerProc::spawn(&server_env(
        &relay,
        &[
            ("OPENCODE_MCP_SECRET", &export),
            ("ANNOUNCE_MAX_AGE_S", "4"),
        ],
    ))
    .await;
    let inst = wait_status(&server, "sec-aging-1", "online").await;
    assert_eq!(inst["trust"], "signed", "{inst}");

    // The file stays as it is: its signature ages past the limit and the
    // instance is no longer contacted.
    let inst = wait_status(&server, "sec-aging-1", "untrusted").await;
    let reason = inst["untrusted_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("ANNOUNCE_MAX_AGE_S=4") && reason.contains("re-signs"),
        "{inst}"
    );
    let (text, is_error, _) = server
        .call_text("sessions", json!({"instance": "sec-aging"}))
        .await;
    assert!(is_error && text.contains("untrusted"), "{text}");

    // Re-signed (as the agent does every heartbeat): trusted again.
    write(
        &relay,
        "sec-aging",
        &registration("sec-aging", "sec-aging-1", fake.port(), Some(&ours)),
    );
    let inst = wait_status(&server, "sec-aging-1", "online").await;
    assert_eq!(inst["trust"], "signed", "{inst}");
    server.shutdown().await;
}
