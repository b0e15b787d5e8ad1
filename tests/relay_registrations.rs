//! The local-relay transport against a corpus of malformed registration files
//! and the ways writers really behave: atomic and non-atomic writes, late
//! directory creation, symlinks, FIFOs, removal, and the pruning policy.

mod common;

use std::time::{Duration, Instant};

use common::fake_opencode::{Behaviour, FakeOpenCode, dead_port};
use common::mcp_client::{McpServerProc, RelayDir, instance_names, wait_until_msg};
use serde_json::{Value, json};

async fn instances(server: &McpServerProc) -> Value {
    let (_, is_error, out) = server.call_text("instances", json!({})).await;
    assert!(!is_error);
    out.expect("structured instances")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_registration_files_are_listed_with_reasons_and_never_deleted_early() {
    let fake = FakeOpenCode::start(Behaviour::Healthy).await;
    let relay = RelayDir::new();
    relay.write_registration("good", json!({"name": "good", "port": fake.port()}));
    let corpus: &[(&str, &[u8], &str)] = &[
        ("empty.json", b"", "empty file"),
        ("truncated.json", b"{\"name\":\"t\",\"port\":", "ends early"),
        ("not-json.json", b"hello", "invalid JSON"),
        ("array.json", b"[1,2,3]", "not an object"),
        ("no-port.json", b"{\"name\":\"x\"}", "missing `port`"),
        (
            "bad-port.json",
            b"{\"name\":\"x\",\"port\":\"http\"}",
            "`port` must be",
        ),
        (
            "big-port.json",
            b"{\"name\":\"x\",\"port\":99999}",
            "`port` must be",
        ),
        (
            "latin1.json",
            b"{\"name\":\"caf\xe9\",\"port\":1}",
            "not UTF-8",
        ),
        (
            "control.json",
            b"{\"name\":\"a\\u001bb\",\"port\":1}",
            "control characters",
        ),
        (
            "bad-id.json",
            b"{\"name\":\"x\",\"port\":1,\"id\":\"a/b\"}",
            "`id`",
        ),
    ];
    for (file, bytes, _) in corpus {
        relay.write_raw(file, bytes);
    }
    // Oversized: 100 KiB of valid JSON.
    let big = format!(
        "{{\"name\":\"big\",\"port\":1,\"pad\":\"{}\"}}",
        "x".repeat(100 * 1024)
    );
    relay.write_raw("huge.json", big.as_bytes());
    // A directory named like a registration, a FIFO, and symlinks in and out.
    std::fs::create_dir(relay.path().join("dir.json")).expect("mkdir");
    let fifo = relay.path().join("fifo.json");
    let c = std::ffi::CString::new(fifo.to_str().expect("utf8")).expect("cstr");
    // SAFETY: mkfifo with a valid C string and mode.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let outside = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        outside.path().join("x.json"),
        json!({"name": "outside", "port": fake.port()}).to_string(),
    )
    .expect("write");
    std::os::unix::fs::symlink(
        outside.path().join("x.json"),
        relay.path().join("escape.json"),
    )
    .expect("symlink");
    std::os::unix::fs::symlink(
        relay.path().join("good.json"),
        relay.path().join("alias.json"),
    )
    .expect("symlink");
    // Files that are not registrations at all.
    relay.write_raw("notes.txt", b"ignore me");

    let server = McpServerProc::spawn(&[relay.env()]).await;
    let out = wait_until_msg(
        Duration::from_secs(10),
        "good online and all problems listed",
        || async {
            let out = instances(&server).await;
            let good_online = out["instances"]
                .as_array()?
                .iter()
                .any(|i| i["name"] == "good" && i["status"] == "online");
            (good_online && out["problem_count"].as_u64()? >= 14).then_some(out)
        },
    )
    .await;
    let problems = out["problems"].as_array().expect("problems");
    let reason_of = |file: &str| -> String {
        problems
            .iter()
            .find(|p| {
                p["source"]
                    .as_str()
                    .is_some_and(|s| s.ends_with(&format!("/{file}")))
            })
            .map(|p| p["reason"].as_str().unwrap_or_default().to_string())
            .unwrap_or_else(|| panic!("{file} not listed as a problem: {problems:?}"))
    };
    for (file, _, why) in corpus {
        assert!(reason_of(file).contains(why), "{file}: {}", reason_of(file));
    }
    assert!(
        reason_of("huge.json").contains("limit"),
        "{}",
        reason_of("huge.json")
    );
    assert!(reason_of("dir.json").contains("not a regular file"));
    assert!(reason_of("fifo.json").contains("not a regular file"));
    assert!(reason_of("escape.json").contains("outside"));
    // The in-directory symlink is a second path to the same good instance.
    let listed = instance_names(&out);
    assert!(
        listed.contains(&"good".to_string()) && !listed.contains(&"outside".to_string()),
        "{listed:?}"
    );
    assert!(
        !problems
            .iter()
            .any(|p| p["source"].as_str().unwrap_or("").ends_with("notes.txt"))
    );

    // Text output carries the count and the reasons.
    let (text, _, _) = server.call_text("instances", json!({})).await;
    assert!(
        text.contains("discovery problem(s)") && text.contains("truncated.json"),
        "{text}"
    );

    // Nothing was deleted on a first failure (default grace period: 5 minutes).
    for (file, _, _) in corpus {
        assert!(relay.path().join(file).exists(), "{file} deleted too early");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_changed_and_removed_files_take_effect_within_100ms() {
    let a = FakeOpenCode::start(Behaviour::Healthy).await;
    let b = FakeOpenCode::start(Behaviour::Healthy).await;
    let relay = RelayDir::new();
    // A long rescan interval: only inotify can make these changes visible in time.
    let server = McpServerProc::spawn(&[relay.env(), ("DISCOVERY_INTERVAL_MS", "600000")]).await;
    assert!(instance_names(&instances(&server).await).is_empty());

    let t = Instant::now();
    relay.write_registration("w", json!({"name": "watched", "port": a.port()}));
    wait_until_msg(Duration::from_secs(5), "new file online", || async {
        let out = instances(&server).await;
        out["instances"]
            .as_array()?
            .iter()
            .any(|i| i["name"] == "watched" && i["status"] == "online")
            .then_some(())
    })
    .await;
    let appeared = t.elapsed();

    let t = Instant::now();
    relay.write_registration("w", json!({"name": "watched", "port": b.port()}));
    wait_until_msg(Duration::from_secs(5), "changed port used", || async {
        let out = instances(&server).await;
        let url = format!("http://127.0.0.1:{}", b.port());
        out["instances"]
            .as_array()?
            .iter()
            .any(|i| i["url"] == url.as_str())
            .then_some(())
    })
    .await;
    let changed = t.elapsed();

    let t = Instant::now();
    relay.remove("w");
    wait_until_msg(Duration::from_secs(5), "removed file gone", || async {
        instance_names(&instances(&server).await)
            .is_empty()
            .then_some(())
    })
    .await;
    let removed = t.elapsed();
    // Each includes an MCP round trip and, for new/changed, a health check.
    for (what, d) in [
        ("new", appeared),
        ("changed", changed),
        ("removed", removed),
    ] {
        assert!(d < Duration::from_millis(100), "{what} file took {d:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_directory_is_fine_and_picked_up_once_created() {
    let fake = FakeOpenCode::start(Behaviour::Healthy).await;
    let parent = tempfile::tempdir().expect("tempdir");
    let dir = parent.path().join("later/relay");
    let server = McpServerProc::spawn(&[
        ("RELAY_REGISTRY_DIR", dir.to_str().expect("utf8")),
        ("DISCOVERY_INTERVAL_MS", "600000"),
    ])
    .await;
    let out = instances(&server).await;
    assert!(instance_names(&out).is_empty());
    assert_eq!(
        out["problem_count"], 0,
        "a missing directory is not a problem"
    );
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::write(
        dir.join(".x.tmp"),
        json!({"name": "late", "port": fake.port()}).to_string(),
    )
    .expect("write");
    std::fs::rename(dir.join(".x.tmp"), dir.join("late.json")).expect("rename");
    wait_until_msg(
        Duration::from_secs(5),
        "registration in a late directory",
        || async {
            instance_names(&instances(&server).await)
                .contains(&"late".to_string())
                .then_some(())
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_written_file_keeps_its_last_good_entry_until_fixed() {
    let fake = FakeOpenCode::start(Behaviour::Healthy).await;
    let relay = RelayDir::new();
    let path = relay.path().join("slow-writer.json");
    std::fs::write(
        &path,
        json!({"name": "steady", "port": fake.port()}).to_string(),
    )
    .expect("write");
    let server = McpServerProc::spawn(&[relay.env()]).await;
    wait_until_msg(Duration::from_secs(5), "steady online", || async {
        instance_names(&instances(&server).await)
            .contains(&"steady".to_string())
            .then_some(())
    })
    .await;
    // A non-atomic writer (like the seed's `cat >`) truncates, then writes.
    std::fs::write(&path, b"{\"name\":\"stea").expect("truncate");
    let out = wait_until_msg(
        Duration::from_secs(5),
        "the problem to be listed",
        || async {
            let out = instances(&server).await;
            (out["problem_count"] == 1).then_some(out)
        },
    )
    .await;
    assert!(
        instance_names(&out).contains(&"steady".to_string()),
        "kept while half-written"
    );
    assert!(path.exists(), "never deleted on a first failure");
    std::fs::write(
        &path,
        json!({"name": "steady", "port": fake.port()}).to_string(),
    )
    .expect("write");
    wait_until_msg(Duration::from_secs(5), "problem cleared", || async {
        (instances(&server).await["problem_count"] == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_instances_and_broken_files_are_pruned_only_after_the_grace_period() {
    let relay = RelayDir::new();
    relay.write_registration("gone", json!({"name": "gone", "port": dead_port()}));
    relay.write_raw("broken.json", b"{");
    let grace = Duration::from_millis(1500);
    let started = Instant::now();
    let server = McpServerProc::spawn(&[
        relay.env(),
        ("PRUNE_AFTER_MS", "1500"),
        ("DISCOVERY_INTERVAL_MS", "200"),
    ])
    .await;
    let out = wait_until_msg(Duration::from_secs(5), "gone listed offline", || async {
        let out = instances(&server).await;
        out["instances"]
            .as_array()?
            .iter()
            .find(|i| i["name"] == "gone" && i["status"] == "offline")
            .cloned()
    })
    .await;
    assert!(
        out["offline_reason"]
            .as_str()
            .unwrap_or("")
            .contains("cannot reach"),
        "{out}"
    );
    assert!(relay.exists("gone") && relay.path().join("broken.json").exists());
    wait_until_msg(Duration::from_secs(10), "both files pruned", || async {
        (!relay.exists("gone") && !relay.path().join("broken.json").exists()).then_some(())
    })
    .await;
    assert!(started.elapsed() >= grace, "pruned before the grace period");
    wait_until_msg(Duration::from_secs(5), "dropped from the view", || async {
        let out = instances(&server).await;
        (instance_names(&out).is_empty() && out["problem_count"] == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_with_the_same_name_stay_visible_and_resolve_by_key() {
    let a = FakeOpenCode::start(Behaviour::Healthy).await;
    let b = FakeOpenCode::start(Behaviour::Healthy).await;
    let relay = RelayDir::new();
    relay.write_registration(
        "twin-1",
        json!({"name": "twin", "id": "aaaa1111", "port": a.port()}),
    );
    relay.write_registration(
        "twin-2",
        json!({"name": "twin", "id": "bbbb2222", "port": b.port()}),
    );
    let server = McpServerProc::spawn(&[relay.env()]).await;
    wait_until_msg(Duration::from_secs(5), "both twins online", || async {
        let out = instances(&server).await;
        let n = out["instances"]
            .as_array()?
            .iter()
            .filter(|i| i["name"] == "twin" && i["status"] == "online")
            .count();
        (n == 2).then_some(())
    })
    .await;
    let (text, is_error, _) = server.call_text("read", json!({"instance": "twin"})).await;
    assert!(
        is_error && text.contains("aaaa1111") && text.contains("bbbb2222"),
        "{text}"
    );
    let (text, is_error, _) = server
        .call_text("read", json!({"instance": "bbbb2222"}))
        .await;
    assert!(!is_error, "{text}");
}
