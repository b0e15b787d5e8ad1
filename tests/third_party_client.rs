//! An MCP client this project did not write, the official Python SDK
//! (`mcp` from PyPI, installed by scripts/test into .cache/venv), lists the
//! tools and calls `instances` and `read` over stdio.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::fake_opencode::{Behaviour, FakeOpenCode};
use common::mcp_client::RelayDir;
use common::real_opencode::is_ci;
use serde_json::{Value, json};

const CLIENT: &str = r#"
import asyncio, json, sys
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

def g(obj, *names):
    # The SDK renamed attributes to snake_case in 2.x; accept both spellings.
    for n in names:
        if obj is not None and hasattr(obj, n):
            return getattr(obj, n)
    return None

async def main():
    params = StdioServerParameters(command=sys.argv[1], args=[], env={
        "RELAY_REGISTRY_DIR": sys.argv[2], "TRANSPORT": "local-relay", "RUST_LOG": "error"})
    async with stdio_client(params) as (r, w):
        async with ClientSession(r, w) as s:
            init = await s.initialize()
            tools = await s.list_tools()
            inst = await s.call_tool("instances", {})
            read = await s.call_tool("read", {"instance": "py"})
            print(json.dumps({
                "server": g(g(init, "server_info", "serverInfo"), "name"),
                "tools": {t.name: {"output_schema": g(t, "output_schema", "outputSchema") is not None,
                                   "read_only": bool(g(g(t, "annotations"), "read_only_hint", "readOnlyHint"))}
                          for t in tools.tools},
                "instances": {"is_error": g(inst, "is_error", "isError"), "text": inst.content[0].text,
                              "structured": g(inst, "structured_content", "structuredContent")},
                "read": {"is_error": g(read, "is_error", "isError"),
                         "structured": g(read, "structured_content", "structuredContent")},
            }))

asyncio.run(main())
"#;

fn python_with_mcp() -> Option<PathBuf> {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/venv/bin/python");
    let py = std::env::var_os("MCP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or(venv);
    let ok = Command::new(&py)
        .args(["-c", "import mcp"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(py);
    }
    assert!(
        !is_ci(),
        "the Python MCP SDK is missing under CI: scripts/test must install it"
    );
    eprintln!("SKIPPED: no Python with the `mcp` SDK (run scripts/test to install it)");
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_sdk_lists_tools_and_calls_them() {
    let Some(py) = python_with_mcp() else { return };
    let fake = FakeOpenCode::start(Behaviour::Healthy).await;
    fake.create_session(Some("py session"));
    let relay = RelayDir::new();
    relay.write_registration(
        "py",
        json!({"name": "py", "hostname": "h", "cwd": "/p", "port": fake.port()}),
    );
    let dir = relay.path().to_path_buf();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(py)
            .args(["-c", CLIENT, env!("CARGO_BIN_EXE_opencode-mcp")])
            .arg(dir)
            .output()
            .expect("run python")
    })
    .await
    .expect("join");
    assert!(
        out.status.success(),
        "python client failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("client printed JSON");
    assert_eq!(v["server"], "opencode-mcp");
    for tool in ["instances", "send", "read", "sessions"] {
        assert_eq!(
            v["tools"][tool]["output_schema"], true,
            "{tool} declares an output schema: {v}"
        );
    }
    assert_eq!(v["tools"]["instances"]["read_only"], true);
    assert_eq!(v["tools"]["send"]["read_only"], false);
    assert_eq!(v["instances"]["is_error"], false);
    assert!(
        v["instances"]["text"]
            .as_str()
            .unwrap_or("")
            .contains("**py** (h:/p)"),
        "{v}"
    );
    // The SDK validates structuredContent against the declared output schema.
    assert_eq!(v["instances"]["structured"]["instances"][0]["name"], "py");
    assert_eq!(v["read"]["is_error"], false, "{v}");
    assert_eq!(v["read"]["structured"]["title"], "py session");
}
