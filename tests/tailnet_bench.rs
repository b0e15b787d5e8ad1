//! Benchmark (not a test; `#[ignore]`d): one full sweep of the tailscale
//! transport over the simulated tailnet with 50 peers in the status — a few
//! running agents, several offline, most running nothing, some online but
//! silent (their packets vanish, as with a peer whose tailscaled hangs).
//! Needs root.
//!
//! ```text
//! cargo test --test tailnet_bench -- --ignored --nocapture tailnet_sweep_benchmark
//! ```
//!
//! Prints, with and without the silent peers: when the transport reported
//! each instance, when it called itself ready (first sweep complete), and the
//! time of raw concurrent sweeps (every online peer browsed at once).

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::netns::require_root;
use common::tailnet::{
    AgentSpec, FakeLocalApi, NodeDoc, StatusDoc, Tailnet, ghost_v4, helper_main, start_agent,
};
use opencode_mcp::dnssd::query::browse;
use opencode_mcp::tailscale::LocalApi;
use opencode_mcp::transport::tailscale::{Tailscale, TailscaleOptions};
use opencode_mcp::transport::{Discovery, Transport, TransportLink};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The agent stand-in run by `start_agent` (does nothing in a normal run).
#[test]
#[ignore = "helper process for the other tests"]
fn tailnet_helper() {
    helper_main();
}

const AGENT_NODES: usize = 4;
const IDLE_NODES: usize = 30;
const OFFLINE: usize = 8;
const SILENT: usize = 8;
const TIMEOUT: Duration = Duration::from_millis(500);

/// Runs the transport inside node 0 until ready and every instance is seen;
/// returns (time of each Seen, time of Ready).
fn transport_run(net: &Tailnet, socket: String, want: usize) -> (Vec<Duration>, Duration) {
    net.run_in(0, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let opts = TailscaleOptions {
                api: LocalApi::new(socket.into(), true).with_cli(None),
                port: 5353,
                query_timeout: TIMEOUT,
                sweep_every: Duration::from_secs(5),
                status_every: Duration::from_secs(2),
                misses_before_gone: 2,
            };
            let t0 = Instant::now();
            let t = Box::new(Tailscale::new(opts).expect("transport"));
            let (tx, mut rx) = mpsc::channel(1024);
            let (_fb_tx, fb_rx) = mpsc::channel(8);
            let shutdown = CancellationToken::new();
            let link = TransportLink {
                events: tx,
                feedback: fb_rx,
                shutdown: shutdown.clone(),
            };
            let task = tokio::spawn(t.run(link));
            let (mut seen, mut ready) = (Vec::new(), None);
            let deadline = t0 + Duration::from_secs(10);
            while seen.len() < want || ready.is_none() {
                match tokio::time::timeout_at(deadline.into(), rx.recv()).await {
                    Ok(Some(Discovery::Seen(_))) => seen.push(t0.elapsed()),
                    Ok(Some(Discovery::Ready { .. })) => ready = Some(t0.elapsed()),
                    Ok(Some(_)) => {}
                    _ => panic!("transport stalled: {} seen, ready {ready:?}", seen.len()),
                }
            }
            shutdown.cancel();
            let _ = task.await;
            (seen, ready.unwrap_or_default())
        })
    })
}

/// Browses every address at once, `rounds` times; returns (time until every
/// answering peer answered, time of the whole sweep) per round.
fn raw_sweeps(
    net: &Tailnet,
    targets: Vec<IpAddr>,
    rounds: usize,
) -> Vec<(Duration, Duration, usize)> {
    net.run_in(0, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let mut out = Vec::new();
            for _ in 0..rounds {
                let t0 = Instant::now();
                let results = futures::future::join_all(targets.iter().map(|ip| async move {
                    let r = browse(SocketAddr::new(*ip, 5353), TIMEOUT).await;
                    (r, t0.elapsed())
                }))
                .await;
                let all = t0.elapsed();
                let answered: Vec<Duration> = results
                    .iter()
                    .filter(|(r, _)| matches!(r, Ok(v) if !v.is_empty()))
                    .map(|(_, t)| *t)
                    .collect();
                let last_answer = answered.iter().max().copied().unwrap_or_default();
                out.push((last_answer, all, answered.len()));
            }
            out
        })
    })
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn tailnet_sweep_benchmark() {
    if !require_root() {
        return;
    }
    let t_build = Instant::now();
    let net = Tailnet::create(1 + AGENT_NODES + IDLE_NODES);
    eprintln!(
        "simulated tailnet: {} namespaces built in {:?}",
        1 + AGENT_NODES + IDLE_NODES,
        t_build.elapsed()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let _enter = rt.enter();
    let dirs: Vec<tempfile::TempDir> = (0..AGENT_NODES)
        .map(|_| tempfile::tempdir().unwrap())
        .collect();
    // One agent per agent node, two on the first: 5 instances.
    let mut agents = Vec::new();
    let mut instances = 0;
    for n in 1..=AGENT_NODES {
        let count = if n == 1 { 2 } else { 1 };
        for k in 0..count {
            let spec = AgentSpec {
                id: format!("inst-{n}-{k}"),
                name: format!("proj-{n}-{k}"),
                hostname: None,
                addr: net.node(n).v4.into(),
                dir: dirs[n - 1].path().to_path_buf(),
                dnssd_port: 5353,
                opencode_port: Some(4096 + k as u16),
            };
            agents.push(start_agent(Some((&net, n)), "tailnet_helper", &spec).0);
            instances += 1;
        }
    }
    let mut peers: Vec<NodeDoc> = (1..=AGENT_NODES + IDLE_NODES)
        .map(|i| NodeDoc::of(&net, i, &format!("node-{i}")))
        .collect();
    for i in 0..OFFLINE {
        let mut p = NodeDoc::new(&format!("offline-{i}"), ghost_v4(100 + i), None);
        p.online = false;
        peers.push(p);
    }
    let silent: Vec<NodeDoc> = (0..SILENT)
        .map(|i| NodeDoc::new(&format!("silent-{i}"), ghost_v4(i), None))
        .collect();
    let with_silent = {
        let mut p = peers.clone();
        p.extend(silent.iter().cloned());
        p
    };
    assert_eq!(with_silent.len(), 50);
    let me = NodeDoc::of(&net, 0, "observer");
    let api = FakeLocalApi::start(&StatusDoc::new(me.clone(), with_silent.clone()));

    eprintln!(
        "\nstatus: 50 peers = {AGENT_NODES} with agents ({instances} instances), {IDLE_NODES} running nothing, \
         {OFFLINE} offline, {SILENT} online but silent; per-peer timeout {TIMEOUT:?}"
    );
    for (label, doc) in [
        (
            "with the 8 silent peers",
            StatusDoc::new(me.clone(), with_silent.clone()),
        ),
        (
            "without them (42 peers)",
            StatusDoc::new(me.clone(), peers.clone()),
        ),
    ] {
        api.set(&doc);
        let (seen, ready) = transport_run(&net, api.socket_str(), instances);
        eprintln!(
            "transport, {label}: first instance {} | all {instances} instances {} | first sweep complete (Ready) {}",
            ms(seen[0]),
            ms(*seen.last().unwrap_or(&Duration::ZERO)),
            ms(ready)
        );
        let mut targets: Vec<IpAddr> = doc
            .peers
            .iter()
            .filter(|p| p.online)
            .map(|p| p.addrs[0])
            .collect();
        targets.push(me.addrs[0]);
        let sweeps = raw_sweeps(&net, targets.clone(), 5);
        for (last, all, n) in &sweeps {
            eprintln!(
                "  raw sweep of {} addresses: {n} peers with agents answered, last of them at {} | sweep done at {}",
                targets.len(),
                ms(*last),
                ms(*all)
            );
        }
    }
    let s = net.stats();
    eprintln!(
        "forwarder: {} packets forwarded, {} dropped ({} multicast)",
        s.forwarded.load(std::sync::atomic::Ordering::Relaxed),
        s.dropped.load(std::sync::atomic::Ordering::Relaxed),
        s.multicast_dropped
            .load(std::sync::atomic::Ordering::Relaxed)
    );
    drop(agents);
}
