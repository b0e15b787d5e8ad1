//! OpenCode's own mDNS advertisement (`opencode serve --mdns`: `_http._tcp`,
//! instance `opencode-<port>`, TXT `path=/`) is discovered by `opencode-mcp`
//! with TRANSPORT=mdns in another network namespace, and confirmed online by
//! its `/global/health`. Uses the real OpenCode binary; needs root.

mod common;

use std::time::{Duration, Instant};

use common::netns::{
    Mcp, Netns, Proc, TempDir, opencode_env, poll, project_dir, require_opencode, require_root,
};

#[test]
fn opencode_builtin_mdns_advertisement_is_discovered_across_namespaces() {
    if !require_root() {
        return;
    }
    let Some(opencode) = require_opencode() else {
        return;
    };
    let net = Netns::create(2);
    let tmp = TempDir::new("oc-builtin");
    let project = project_dir(&tmp, "proj");
    let relay_dir = tmp.subdir("relay").display().to_string();
    let port: u16 = 4711;
    let mut cmd = net.command(0, &opencode);
    cmd.args(["serve", "--mdns", "--hostname", "0.0.0.0", "--port"])
        .arg(port.to_string())
        .args(["--print-logs", "--log-level", "INFO"])
        .current_dir(&project)
        .env_clear();
    // No LLM is needed: nothing is prompted.
    for (k, v) in opencode_env(&tmp.subdir("oc"), "http://127.0.0.1:9/v1") {
        cmd.env(k, v);
    }
    let started = Instant::now();
    let mut oc = Proc::spawn("opencode --mdns", cmd);
    oc.wait_line("listening on", Duration::from_secs(60));
    eprintln!("opencode listening after {:?}", started.elapsed());

    let mcp = Mcp::start(
        &net,
        1,
        &[("TRANSPORT", "mdns"), ("RELAY_REGISTRY_DIR", &relay_dir)],
    );
    let addr = net.addr(0);
    let key = format!("mdns:{addr}:{port}");
    let inst = poll(
        Duration::from_secs(15),
        "OpenCode's own advertisement, online",
        || {
            mcp.find_instance(|i| i["key"] == key.as_str())
                .filter(|i| i["status"] == "online")
        },
    );
    assert_eq!(inst["name"], format!("opencode-{port}@{addr}"), "{inst}");
    assert_eq!(inst["url"], format!("http://{addr}:{port}"), "{inst}");
    assert_eq!(inst["transport"], "mdns", "{inst}");
    assert_eq!(inst["reach"], "lan", "{inst}");
    assert!(
        inst["version"].as_str().is_some_and(|v| !v.is_empty()),
        "{inst}"
    );
    // Only one instance: the advertisement's repeats were de-duplicated.
    let all = mcp.instances();
    assert_eq!(all["instances"].as_array().map(Vec::len), Some(1), "{all}");

    // A clean stop withdraws the advertisement (bonjour-service unpublishes on
    // stop) or at least takes the instance offline at once.
    let t0 = Instant::now();
    oc.terminate(Duration::from_secs(10));
    poll(
        Duration::from_secs(5),
        "gone or offline after stop",
        || match mcp.find_instance(|i| i["key"] == key.as_str()) {
            None => Some(()),
            Some(i) if i["status"] == "offline" => Some(()),
            Some(_) => None,
        },
    );
    eprintln!("opencode stopped → gone/offline after {:?}", t0.elapsed());
}
