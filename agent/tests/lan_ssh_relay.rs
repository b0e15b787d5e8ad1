//! A real SSH reverse tunnel: Debian's openssh-server, started by the test on
//! 127.0.0.1 inside a network namespace (its own sshd_config, a host key and a
//! client key generated into a temp dir), `opencode-agent run --serve
//! --no-mdns --relay-ssh "ssh …"` with the real OpenCode registers through it
//! into a relay directory, and `opencode-mcp` (TRANSPORT=local-relay) drives
//! the instance through the tunnel: `send` gets the fake LLM's reply, `read`
//! shows it. SIGTERM to the agent removes the registration.
//!
//! Needs root, openssh-server and the real OpenCode (skips loudly otherwise;
//! under `CI` it must run). Nothing is written to the real root's ~/.ssh.

#[path = "../../tests/common"]
mod common {
    pub mod netns;
}

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::{
    FAKE_REPLY, FakeLlm, Mcp, Netns, Proc, TempDir, opencode_env, poll, project_dir, require_bin,
    require_opencode, require_root, result_text, try_poll,
};
use serde_json::{Value, json};

const SSH_PORT: u16 = 2222;

fn keygen(path: &Path) {
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "opencode-test", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "ssh-keygen {}", path.display());
}

/// Starts sshd on 127.0.0.1:SSH_PORT in host `i`; returns it once it accepts.
fn start_sshd(net: &Netns, i: usize, sshd: &Path, dir: &Path) -> Proc {
    let host_key = dir.join("host_ed25519");
    keygen(&host_key);
    let config = dir.join("sshd_config");
    fs::write(
        &config,
        format!(
            "Port {SSH_PORT}\n\
             ListenAddress 127.0.0.1\n\
             HostKey {host_key}\n\
             PidFile none\n\
             AuthorizedKeysFile {keys}\n\
             PubkeyAuthentication yes\n\
             PasswordAuthentication no\n\
             KbdInteractiveAuthentication no\n\
             PermitRootLogin prohibit-password\n\
             StrictModes no\n\
             UsePAM no\n\
             AllowTcpForwarding yes\n\
             GatewayPorts no\n\
             PermitTTY no\n\
             X11Forwarding no\n\
             LogLevel VERBOSE\n",
            host_key = host_key.display(),
            keys = dir.join("authorized_keys").display(),
        ),
    )
    .expect("write sshd_config");
    // sshd refuses to start without its privilege separation directory.
    if !Path::new("/run/sshd").exists() {
        fs::create_dir_all("/run/sshd").expect("create /run/sshd");
        let _ = fs::set_permissions("/run/sshd", fs::Permissions::from_mode(0o755));
    }
    let (ok, out) = net.run(
        i,
        sshd.to_str().expect("utf-8"),
        &["-t", "-f", config.to_str().expect("utf-8")],
    );
    assert!(ok, "sshd -t rejected the config: {out}");
    let mut cmd = net.command(i, sshd);
    cmd.args(["-D", "-e", "-f"]).arg(&config);
    let mut proc = Proc::spawn("sshd", cmd);
    poll(Duration::from_secs(10), "sshd to listen", || {
        if let Some(status) = proc.try_wait() {
            panic!("sshd exited ({status}): {}", proc.output());
        }
        proc.find_line(&format!("listening on 127.0.0.1 port {SSH_PORT}"))
    });
    proc
}

#[test]
fn agent_registers_through_a_real_ssh_tunnel_and_mcp_drives_it() {
    if !require_root() {
        return;
    }
    let Some(sshd) = require_bin("sshd", "openssh-server") else {
        return;
    };
    if require_bin("ssh", "openssh-client").is_none() {
        return;
    }
    let Some(opencode) = require_opencode() else {
        return;
    };
    let net = Netns::create(1);
    let tmp = TempDir::new("lan-ssh");
    let ssh_dir = tmp.subdir("ssh");
    let client_key = ssh_dir.join("id_ed25519");
    keygen(&client_key);
    fs::copy(
        client_key.with_extension("pub"),
        ssh_dir.join("authorized_keys"),
    )
    .expect("authorized_keys");
    let mut sshd_proc = start_sshd(&net, 0, &sshd, &ssh_dir);

    let relay = tmp.subdir("relay");
    let relay_dir = relay.display().to_string();
    let project = project_dir(&tmp, "tunnelled-proj");
    let llm = FakeLlm::start(&net, 0, FAKE_REPLY);
    let ssh_cmd = format!(
        "ssh -F /dev/null -i {key} -p {SSH_PORT} -o StrictHostKeyChecking=no \
         -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR root@127.0.0.1",
        key = client_key.display()
    );
    let mut agent = Proc::spawn("agent-ssh", {
        let mut cmd = net.command(0, env!("CARGO_BIN_EXE_opencode-agent"));
        cmd.args([
            "run",
            "--serve",
            "--no-mdns",
            "--name",
            "tunnelled",
            "--relay-ssh",
            &ssh_cmd,
        ])
        .current_dir(&project)
        .env_clear();
        for (k, v) in opencode_env(&tmp.subdir("oc"), &llm.base_url()) {
            cmd.env(k, v);
        }
        cmd.env("OPENCODE_BIN", &opencode)
            .env("RELAY_REGISTRY_DIR", &relay_dir)
            .env("OPENCODE_AGENT_LOG", "stderr")
            .env("RUST_LOG", "info");
        cmd
    });

    // The registration appears only once the tunnel accepts connections.
    let registration: Value = poll(
        Duration::from_secs(90),
        "a registration on the relay",
        || {
            if let Some(status) = agent.try_wait() {
                panic!("agent exited ({status}): {}", agent.output());
            }
            let entry = fs::read_dir(&relay).ok()?.flatten().find(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n.ends_with(".json") && !n.starts_with('.')
            })?;
            serde_json::from_str(&fs::read_to_string(entry.path()).ok()?).ok()
        },
    );
    let port = registration["port"].as_u64().expect("port in registration");
    assert!(
        (10000..=10999).contains(&port),
        "tunnel port: {registration}"
    );
    assert_ne!(
        registration["port"], registration["localPort"],
        "the registration points at the tunnel: {registration}"
    );
    assert_eq!(registration["name"], "tunnelled", "{registration}");
    assert!(
        sshd_proc.find_line("Accepted publickey").is_some(),
        "sshd saw no login: {}",
        sshd_proc.output()
    );

    // opencode-mcp on the relay side drives the instance through the tunnel.
    let mcp = Mcp::start(
        &net,
        0,
        &[
            ("TRANSPORT", "local-relay"),
            ("RELAY_REGISTRY_DIR", &relay_dir),
        ],
    );
    let inst = poll(
        Duration::from_secs(20),
        "the tunnelled instance online",
        || {
            mcp.find_instance(|i| i["name"] == "tunnelled")
                .filter(|i| i["status"] == "online")
        },
    );
    assert_eq!(inst["reach"], "relay", "{inst}");
    assert_eq!(inst["url"], format!("http://127.0.0.1:{port}"), "{inst}");
    let sent = mcp.call(
        "send",
        json!({ "instance": "tunnelled", "message": "Say hello through the tunnel" }),
        Duration::from_secs(180),
    );
    assert!(result_text(&sent).contains(FAKE_REPLY), "send: {sent}");
    let read = mcp.call(
        "read",
        json!({ "instance": "tunnelled" }),
        Duration::from_secs(30),
    );
    assert!(result_text(&read).contains(FAKE_REPLY), "read: {read}");

    // SIGTERM: the registration is removed from the relay and the instance leaves.
    let t0 = Instant::now();
    agent.signal("TERM");
    poll(
        Duration::from_secs(10),
        "the registration to be removed",
        || {
            let left = fs::read_dir(&relay)
                .map(|rd| {
                    rd.flatten()
                        .any(|e| e.file_name().to_string_lossy().ends_with(".json"))
                })
                .unwrap_or(false);
            (!left).then_some(())
        },
    );
    poll(
        Duration::from_secs(5),
        "the instance to leave `instances`",
        || {
            mcp.find_instance(|i| i["name"] == "tunnelled")
                .is_none()
                .then_some(())
        },
    );
    eprintln!(
        "SIGTERM → registration removed and instance gone after {:?}",
        t0.elapsed()
    );
    assert!(
        try_poll(Duration::from_secs(15), || agent.try_wait()).is_some(),
        "agent did not exit after SIGTERM"
    );
    sshd_proc.terminate(Duration::from_secs(5));
}
