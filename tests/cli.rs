//! The command line: help that explains the settings, configuration errors
//! with exit code 2, and the `instances` debugging subcommand.

mod common;

use std::process::Command;

use common::fake_opencode::{Behaviour, FakeOpenCode};
use common::mcp_client::RelayDir;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_opencode-mcp");

#[test]
fn help_explains_every_seed_variable() {
    let out = Command::new(BIN).arg("--help").output().expect("run");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "RELAY_REGISTRY_DIR",
        "DISCOVERY_INTERVAL_MS",
        "HEALTH_CHECK_TIMEOUT_MS",
        "TRANSPORT",
        "SEND_TIMEOUT_MS",
        "OPENCODE_SERVER_PASSWORD",
    ] {
        assert!(help.contains(var), "--help does not mention {var}:\n{help}");
    }
    assert!(help.contains("instances"), "the subcommand is listed");
}

#[test]
fn an_unknown_transport_exits_2_naming_the_valid_ones() {
    let out = Command::new(BIN)
        .arg("instances")
        .env("TRANSPORT", "local-relay,carrier-pigeon")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("carrier-pigeon") && err.contains("local-relay") && err.contains("auto"),
        "{err}"
    );
}

#[test]
fn tailscale_settings_are_flags_too_and_bad_values_exit_2() {
    let out = Command::new(BIN).arg("--help").output().expect("run");
    let help = String::from_utf8_lossy(&out.stdout);
    for (flag, var) in [
        ("--tailscale-socket", "TAILSCALE_SOCKET"),
        ("--tailscale-dnssd-port", "TAILSCALE_DNSSD_PORT"),
        ("--tailscale-query-timeout-ms", "TAILSCALE_QUERY_TIMEOUT_MS"),
    ] {
        assert!(
            help.contains(flag) && help.contains(var),
            "--help lacks {flag} / {var}:\n{help}"
        );
    }
    for (var, value) in [
        ("TAILSCALE_DNSSD_PORT", "0"),
        ("TAILSCALE_DNSSD_PORT", "dns"),
        ("TAILSCALE_QUERY_TIMEOUT_MS", "5"),
    ] {
        let out = Command::new(BIN)
            .args(["instances", "--settle-ms", "10"])
            .env("TRANSPORT", "local-relay")
            .env("RELAY_REGISTRY_DIR", "/nonexistent/relay")
            .env(var, value)
            .output()
            .expect("run");
        assert_eq!(out.status.code(), Some(2), "{var}={value}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(value) && err.contains("tailscale"),
            "{var}={value}: {err}"
        );
    }
}

#[test]
fn a_password_never_appears_in_debug_output() {
    let out = Command::new(BIN)
        .args(["instances", "--settle-ms", "100"])
        .env("OPENCODE_SERVER_PASSWORD", "hunter2-very-secret")
        .env("RELAY_REGISTRY_DIR", "/nonexistent/relay")
        .env("TRANSPORT", "local-relay")
        .env("RUST_LOG", "trace")
        .output()
        .expect("run");
    assert!(out.status.success());
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!all.contains("hunter2"), "{all}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_subcommand_prints_the_discovered_view_once() {
    let fake = FakeOpenCode::start(Behaviour::Healthy).await;
    fake.create_session(Some("Refactor parser"));
    let relay = RelayDir::new();
    relay.write_registration(
        "one",
        json!({"name": "box-proj", "hostname": "box", "cwd": "/src/proj", "port": fake.port()}),
    );
    relay.write_raw("broken.json", b"{");
    let dir = relay.path().to_path_buf();
    let (json_out, text_out) = tokio::task::spawn_blocking(move || {
        let run = |json: bool| {
            let mut c = Command::new(BIN);
            c.arg("instances")
                .env("RELAY_REGISTRY_DIR", &dir)
                .env("TRANSPORT", "local-relay")
                .env("RUST_LOG", "error");
            if json {
                c.arg("--json");
            }
            c.output().expect("run")
        };
        (run(true), run(false))
    })
    .await
    .expect("join");
    assert!(json_out.status.success());
    let v: Value = serde_json::from_slice(&json_out.stdout).expect("JSON on stdout");
    let inst = &v["instances"][0];
    assert_eq!(inst["name"], "box-proj");
    assert_eq!(inst["status"], "online");
    assert_eq!(inst["activity"], "idle");
    assert_eq!(inst["recent_session"]["title"], "Refactor parser");
    assert_eq!(v["problem_count"], 1);
    let text = String::from_utf8_lossy(&text_out.stdout);
    assert!(text.contains("**box-proj** (box:/src/proj)"), "{text}");
    assert!(
        text.contains("online | idle — \"Refactor parser\""),
        "{text}"
    );
    assert!(text.contains("1 discovery problem(s)"), "{text}");
}
