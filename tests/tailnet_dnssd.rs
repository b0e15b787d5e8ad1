//! Unicast DNS-SD on loopback (no root, no namespaces, nothing leaves 127.0.0.1):
//! the responder's answers read by hickory-resolver, one-shot browsing, and
//! several publishers sharing one responder socket with take-over when the
//! holder goes away (dropped in-process, or SIGKILLed as a separate process).
//! Also: `TRANSPORT=tailscale` without Tailscale fails with the reason.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use common::tailnet::{AgentSpec, helper_main, start_agent};
use hickory_resolver::proto::rr::{RData, RecordType};
use opencode_mcp::announce::txt::{Announcement, SERVICE_TYPE};
use opencode_mcp::dnssd::host::{HostOptions, Role, publish};
use opencode_mcp::dnssd::query::{FoundInstance, browse, resolver_for};
use opencode_mcp::dnssd::responder::{RecordSource, Responder};
use opencode_mcp::dnssd::{InstanceRecord, split_txt};

/// The agent stand-in run by `start_agent` (does nothing in a normal run).
#[test]
#[ignore = "helper process for the other tests"]
fn tailnet_helper() {
    helper_main();
}

fn announcement(id: &str, name: &str) -> Announcement {
    Announcement {
        id: id.into(),
        name: name.into(),
        hostname: Some("box".into()),
        cwd: Some(format!("/home/u/{name}")),
        version: Some("1.2.3".into()),
        pid: Some(42),
        auth: false,
        tailnet_addrs: vec!["100.101.102.103".parse().unwrap()],
        magic_dns: Some("box.tail1234.ts.net".into()),
        ..Announcement::default()
    }
}

fn record(id: &str, name: &str, port: u16) -> InstanceRecord {
    InstanceRecord::new(
        &format!("{name}-{id}"),
        "box-1.local.",
        port,
        &announcement(id, name),
        vec!["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()],
    )
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn ids(found: &[FoundInstance]) -> Vec<String> {
    let mut v: Vec<String> = found
        .iter()
        .filter_map(|f| {
            let txt = f.txt.as_ref()?;
            Announcement::from_txt(txt.iter().map(|(k, v)| (k.as_str(), v.as_str())))
                .ok()
                .map(|a| a.id)
        })
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responder_answers_ptr_srv_txt_a_aaaa_that_hickory_resolver_parses() {
    let records = Arc::new(RwLock::new(vec![
        record("id-1", "alpha", 4096),
        record("id-2", "beta", 4097),
    ]));
    let source: Arc<dyn RecordSource> = records.clone();
    let responder = Responder::start(&["127.0.0.1:0".parse().unwrap()], source, 10).expect("bind");
    let server = responder.local_addrs()[0];

    let r = resolver_for(server, Duration::from_secs(2)).expect("resolver");
    let t0 = Instant::now();
    let ptr = r.lookup(SERVICE_TYPE, RecordType::PTR).await.expect("PTR");
    let mut targets = Vec::new();
    for rec in ptr.answers() {
        if let RData::PTR(p) = &rec.data {
            targets.push(p.0.clone());
        }
    }
    assert_eq!(targets.len(), 2, "{ptr:?}");
    let mut seen_ids = Vec::new();
    for t in &targets {
        let srv = r.lookup(t.clone(), RecordType::SRV).await.expect("SRV");
        let RData::SRV(s) = &srv.answers()[0].data else {
            panic!("not an SRV: {srv:?}")
        };
        assert!([4096, 4097].contains(&s.port));
        assert_eq!(s.target.to_ascii(), "box-1.local.");
        let txt = r.lookup(t.clone(), RecordType::TXT).await.expect("TXT");
        let RData::TXT(x) = &txt.answers()[0].data else {
            panic!("not a TXT: {txt:?}")
        };
        let strings: Vec<Vec<u8>> = x.txt_data.iter().map(|d| d.to_vec()).collect();
        let pairs = split_txt(&strings);
        let a = Announcement::from_txt(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .expect("TXT parses as an announcement");
        assert_eq!(
            a.tailnet_addrs,
            vec!["100.101.102.103".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(a.magic_dns.as_deref(), Some("box.tail1234.ts.net"));
        seen_ids.push(a.id);
        let v4 = r.lookup(s.target.clone(), RecordType::A).await.expect("A");
        assert!(
            matches!(&v4.answers()[0].data, RData::A(a) if a.0 == std::net::Ipv4Addr::LOCALHOST),
            "{v4:?}"
        );
        let v6 = r
            .lookup(s.target.clone(), RecordType::AAAA)
            .await
            .expect("AAAA");
        assert!(matches!(&v6.answers()[0].data, RData::AAAA(_)), "{v6:?}");
    }
    seen_ids.sort();
    assert_eq!(seen_ids, vec!["id-1", "id-2"]);
    eprintln!(
        "hickory-resolver full discovery (PTR, 2×SRV/TXT/A/AAAA): {:?}",
        t0.elapsed()
    );

    // An unknown instance is NXDOMAIN, which hickory reports as "no records".
    let err = r
        .lookup("nobody._opencode._tcp.local.", RecordType::SRV)
        .await
        .unwrap_err();
    assert!(err.is_no_records_found(), "{err}");

    // One round trip with the raw client carries everything.
    let t0 = Instant::now();
    let found = browse(server, Duration::from_secs(2))
        .await
        .expect("browse");
    let rtt = t0.elapsed();
    assert_eq!(ids(&found), vec!["id-1", "id-2"]);
    assert!(
        found.iter().all(|f| f.port.is_some() && f.addrs.len() == 2),
        "{found:?}"
    );
    eprintln!("one-datagram browse on loopback: {rtt:?}");

    // The record set is read at each query.
    records.write().unwrap().pop();
    let found = browse(server, Duration::from_secs(2))
        .await
        .expect("browse");
    assert_eq!(ids(&found), vec!["id-1"]);
    records.write().unwrap().clear();
    assert!(
        browse(server, Duration::from_secs(2))
            .await
            .expect("browse")
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browse_completes_records_the_reply_left_out_with_hickory_lookups() {
    // Thirty instances with long TXTs exceed even the 8 KiB our client offers
    // through EDNS: the responder drops the additionals, and the client
    // completes SRV/TXT through hickory-resolver within the same timeout.
    let many: Vec<InstanceRecord> = (0..30)
        .map(|i| {
            let mut a = announcement(&format!("id-{i:02}"), &format!("n{i:02}"));
            a.cwd = Some(format!("/home/u/{}", "x".repeat(200)));
            InstanceRecord::new(
                &format!("n{i:02}"),
                "box-1.local.",
                4000 + i,
                &a,
                vec!["127.0.0.1".parse().unwrap()],
            )
        })
        .collect();
    let source: Arc<dyn RecordSource> = Arc::new(RwLock::new(many));
    let responder = Responder::start(&["127.0.0.1:0".parse().unwrap()], source, 10).expect("bind");
    let found = browse(responder.local_addrs()[0], Duration::from_secs(3))
        .await
        .expect("browse");
    assert_eq!(found.len(), 30);
    assert!(
        found.iter().all(|f| f.port.is_some() && f.txt.is_some()),
        "{found:?}"
    );
}

fn opts(dir: &Path, port: u16) -> HostOptions {
    let mut o = HostOptions::new(port);
    o.dir = dir.to_path_buf();
    o.takeover_poll = Duration::from_millis(50);
    o.rescan = Duration::from_millis(200);
    o
}

async fn wait_ids(server: SocketAddr, want: &[&str]) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = browse(server, Duration::from_millis(300))
            .await
            .map(|f| ids(&f))
            .unwrap_or_default();
        if got == want {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "responder at {server} kept answering {got:?}, wanted {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_on_one_host_share_the_responder_and_the_standby_takes_over() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_udp_port();
    let server: SocketAddr = ([127, 0, 0, 1], port).into();
    let a = publish(record("id-a", "alpha", 4001), opts(dir.path(), port)).expect("publish a");
    assert!(
        matches!(a.role(), Role::Serving { ref addrs } if addrs.contains(&server)),
        "{:?}",
        a.role()
    );
    let b = publish(record("id-b", "beta", 4002), opts(dir.path(), port)).expect("publish b");
    assert_eq!(b.role(), Role::Standby);
    // The holder answers for both at once.
    let found = browse(server, Duration::from_secs(2))
        .await
        .expect("browse");
    assert_eq!(ids(&found), vec!["id-a", "id-b"]);

    // The holder withdraws: the standby binds and keeps answering for itself.
    let mut roles = b.watch_role();
    drop(a);
    tokio::time::timeout(
        Duration::from_secs(5),
        roles.wait_for(|r| matches!(r, Role::Serving { .. })),
    )
    .await
    .expect("standby took over within 5 s")
    .expect("role channel open");
    assert_eq!(wait_ids(server, &["id-b"]).await, vec!["id-b"]);
    drop(b);
    // Nobody left: the port is closed (refused at once).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match browse(server, Duration::from_millis(300)).await {
            Err(e) if e.is_definite() => break,
            other => assert!(Instant::now() < deadline, "still answered: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_killed_with_sigkill_hands_over_and_its_record_goes_away() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_udp_port();
    let server: SocketAddr = ([127, 0, 0, 1], port).into();
    let spec = |id: &str, name: &str| AgentSpec {
        id: id.into(),
        name: name.into(),
        hostname: None,
        addr: "127.0.0.1".parse().unwrap(),
        dir: dir.path().to_path_buf(),
        dnssd_port: port,
        opencode_port: Some(4100),
    };
    let (mut first, _, first_serves) =
        tokio::task::block_in_place(|| start_agent(None, "tailnet_helper", &spec("id-1", "one")));
    assert!(
        first_serves,
        "the first publisher serves:\n{}",
        first.output()
    );
    let (mut second, _, second_serves) =
        tokio::task::block_in_place(|| start_agent(None, "tailnet_helper", &spec("id-2", "two")));
    assert!(
        !second_serves,
        "the second publisher waits:\n{}",
        second.output()
    );
    assert_eq!(
        wait_ids(server, &["id-1", "id-2"]).await,
        vec!["id-1", "id-2"]
    );

    // SIGKILL: no cleanup runs in the holder; the kernel drops its locks.
    let t0 = Instant::now();
    first.kill();
    tokio::task::block_in_place(|| second.wait_line("ROLE serving", Duration::from_secs(10)));
    assert_eq!(wait_ids(server, &["id-2"]).await, vec!["id-2"]);
    eprintln!("take-over after SIGKILL answered within {:?}", t0.elapsed());
    // The dead publisher's record file was removed by the new holder.
    let files: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".rec.json"))
        .collect();
    assert_eq!(files, vec!["id-2.rec.json".to_string()]);
    second.kill();
}

#[test]
fn tailscale_transport_without_tailscale_says_why_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("no-such-tailscaled.sock");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_opencode-mcp"))
        .args(["instances", "--json", "--settle-ms", "100"])
        .env_clear()
        .env("PATH", "/nonexistent-bin")
        .env("TRANSPORT", "tailscale")
        .env("TAILSCALE_SOCKET", &sock)
        .env("RELAY_REGISTRY_DIR", dir.path())
        .output()
        .expect("run opencode-mcp");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail; stderr:\n{err}");
    assert!(err.contains("transport tailscale cannot run here"), "{err}");
    assert!(err.contains(&sock.display().to_string()), "{err}");
    assert!(err.contains("TAILSCALE_SOCKET"), "{err}");
    // Without TRANSPORT=tailscale (relay only), the same environment is fine.
    let ok = std::process::Command::new(env!("CARGO_BIN_EXE_opencode-mcp"))
        .args(["instances", "--json", "--settle-ms", "100"])
        .env_clear()
        .env("TRANSPORT", "local-relay")
        .env("RELAY_REGISTRY_DIR", dir.path())
        .output()
        .expect("run opencode-mcp");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
}
