//! `instances` on a fleet larger than one page: online instances first,
//! paging with `limit`/`offset`, filters by `status` and `query`, whole-fleet
//! counts, and the seed's plain layout when everything fits.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::fake_opencode::{Behaviour, FakeOpenCode, dead_port};
use common::mcp_client::{McpServerProc, RelayDir, instance_names, wait_until_msg};
use serde_json::{Value, json};

async fn list(server: &McpServerProc, args: Value) -> (String, Value) {
    let (text, is_error, out) = server.call_text("instances", args.clone()).await;
    assert!(!is_error, "instances {args}: {text}");
    (text, out.expect("structured instances"))
}

/// Six online instances on two hosts and three dead ones whose names sort
/// first, so that "online first" is visible.
async fn fleet() -> (FakeOpenCode, RelayDir, McpServerProc) {
    let fake = FakeOpenCode::start(Behaviour::Healthy).await;
    let relay = RelayDir::new();
    for i in 0..6 {
        let host = if i % 2 == 0 { "box-even" } else { "box-odd" };
        relay.write_registration(
            &format!("app-{i}"),
            json!({"name": format!("app-{i}"), "hostname": host, "port": fake.port(), "cwd": format!("/code/app-{i}")}),
        );
    }
    for i in 0..3 {
        relay.write_registration(
            &format!("aa-dead-{i}"),
            json!({"name": format!("aa-dead-{i}"), "hostname": "gone", "port": dead_port(), "cwd": "/x"}),
        );
    }
    let server = McpServerProc::spawn(&[relay.env(), ("HEALTH_CHECK_TIMEOUT_MS", "500")]).await;
    wait_until_msg(
        Duration::from_secs(15),
        "6 online and 3 offline",
        || async {
            let (_, out) = list(&server, json!({})).await;
            (out["counts"]["online"] == 6 && out["counts"]["offline"] == 3).then_some(())
        },
    )
    .await;
    (fake, relay, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_that_fits_one_page_keeps_the_seed_layout_with_online_instances_first() {
    let (_fake, _relay, server) = fleet().await;
    let (text, out) = list(&server, json!({})).await;
    assert_eq!(
        instance_names(&out),
        [
            "app-0",
            "app-1",
            "app-2",
            "app-3",
            "app-4",
            "app-5",
            "aa-dead-0",
            "aa-dead-1",
            "aa-dead-2"
        ]
    );
    assert_eq!(out["counts"]["total"], 9, "{out}");
    assert_eq!(out["matched"], 9, "{out}");
    assert!(out.get("next_offset").is_none(), "{out}");
    // No summary or paging lines: the seed's two lines per instance.
    assert!(
        text.starts_with("**app-0** (box-even:/code/app-0)"),
        "{text}"
    );
    assert!(
        !text.contains("Showing") && !text.contains("offset="),
        "{text}"
    );
    // Absent optional fields are left out rather than sent as null.
    let online = &out["instances"][0];
    assert!(online.get("offline_reason").is_none(), "{online}");
    let dead = &out["instances"][6];
    assert!(dead["offline_reason"].is_string(), "{dead}");
    assert!(dead.get("activity").is_none(), "{dead}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_and_offset_page_through_every_instance_exactly_once() {
    let (_fake, _relay, server) = fleet().await;
    let (text, first) = list(&server, json!({"limit": 4})).await;
    assert_eq!(instance_names(&first), ["app-0", "app-1", "app-2", "app-3"]);
    assert_eq!(first["next_offset"], 4, "{first}");
    assert!(
        text.contains("9 instance(s): 6 online (0 busy), 3 offline"),
        "{text}"
    );
    assert!(text.contains("Showing 1–4 of 9"), "{text}");
    assert!(text.contains("offset=4"), "{text}");

    let mut seen = Vec::new();
    let mut offset = 0u64;
    loop {
        let (_, page) = list(&server, json!({"limit": 4, "offset": offset})).await;
        assert_eq!(page["offset"], offset, "{page}");
        seen.extend(instance_names(&page));
        match page["next_offset"].as_u64() {
            Some(next) => offset = next,
            None => break,
        }
    }
    assert_eq!(seen.len(), 9, "{seen:?}");
    assert_eq!(seen.iter().collect::<BTreeSet<_>>().len(), 9, "{seen:?}");
    assert_eq!(&seen[6..], ["aa-dead-0", "aa-dead-1", "aa-dead-2"]);

    // An offset past the end is an empty last page, not an error.
    let (_, past) = list(&server, json!({"offset": 50})).await;
    assert!(instance_names(&past).is_empty(), "{past}");
    assert!(past.get("next_offset").is_none(), "{past}");
    assert_eq!(past["counts"]["total"], 9, "{past}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_query_narrow_the_listing_and_counts_still_cover_the_fleet() {
    let (_fake, _relay, server) = fleet().await;
    let (_, offline) = list(&server, json!({"status": "offline"})).await;
    assert_eq!(
        instance_names(&offline),
        ["aa-dead-0", "aa-dead-1", "aa-dead-2"]
    );
    assert_eq!(offline["matched"], 3, "{offline}");
    assert_eq!(offline["counts"]["online"], 6, "{offline}");

    // query matches the hostname, the directory or the name, ignoring case.
    let (_, odd) = list(&server, json!({"query": "BOX-ODD"})).await;
    assert_eq!(instance_names(&odd), ["app-1", "app-3", "app-5"]);
    let (_, by_cwd) = list(&server, json!({"query": "/code/app-4"})).await;
    assert_eq!(instance_names(&by_cwd), ["app-4"]);
    let (_, both) = list(&server, json!({"status": "online", "query": "even"})).await;
    assert_eq!(instance_names(&both), ["app-0", "app-2", "app-4"]);

    let (text, none) = list(&server, json!({"query": "nowhere"})).await;
    assert!(instance_names(&none).is_empty());
    assert!(text.contains("No instance matches"), "{text}");

    let (text, is_error, _) = server
        .call_text("instances", json!({"status": "sleeping"}))
        .await;
    assert!(is_error, "{text}");
    assert!(text.contains("online, busy, idle, offline"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_busy_lists_the_instance_that_is_working() {
    let (_fake, relay, server) = fleet().await;
    let slow = FakeOpenCode::start(Behaviour::Healthy).await;
    slow.create_session(Some("long task"));
    relay.write_registration("slowpoke", json!({"name": "slowpoke", "port": slow.port()}));
    wait_until_msg(Duration::from_secs(10), "slowpoke online", || async {
        let (_, out) = list(&server, json!({"query": "slowpoke", "status": "idle"})).await;
        (instance_names(&out) == ["slowpoke"]).then_some(())
    })
    .await;
    let call = server
        .call_cancellable(
            "send",
            json!({"instance": "slowpoke", "message": "FAKE_SLOW forever"}),
        )
        .await;
    let busy = wait_until_msg(Duration::from_secs(10), "slowpoke busy", || async {
        let (_, out) = list(&server, json!({"status": "busy"})).await;
        (instance_names(&out) == ["slowpoke"]).then_some(out)
    })
    .await;
    assert_eq!(busy["counts"]["busy"], 1, "{busy}");
    assert_eq!(busy["instances"][0]["activity"], "busy", "{busy}");
    let (_, idle) = list(&server, json!({"status": "idle"})).await;
    assert!(
        !instance_names(&idle).contains(&"slowpoke".to_string()),
        "{idle}"
    );
    assert_eq!(instance_names(&idle).len(), 6, "{idle}");
    call.cancel("test done").await;
}
