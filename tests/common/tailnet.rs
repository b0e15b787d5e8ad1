//! A simulated tailnet for tests, faithful where it matters:
//!
//! * [`Tailnet::create`] makes N network namespaces `otn<pid>x<k>-t<i>`, each
//!   with a TUN device named `tailscale0` (POINTOPOINT, NOARP, multicast off,
//!   MTU 1280, like tailscaled's) holding a /32 in 100.64.0.0/10 and a /128 in
//!   fd7a:115c:a1e0::/48, with routes for both ranges through it.
//! * A forwarder thread in the test process plays wireguard-go: it reads every
//!   TUN and writes a packet to the TUN that owns its destination address,
//!   unicast IPv4/IPv6 inside the tailnet ranges only. Multicast, broadcast and
//!   anything addressed elsewhere is dropped, as Tailscale does.
//! * [`FakeLocalApi`]: tailscaled's LocalAPI on a unix socket (axum), which
//!   enforces `Host: local-tailscaled.sock` and answers `GET
//!   /localapi/v0/status` with a status the test builds ([`StatusDoc`]) and can
//!   change at any time (peers online/offline).
//! * Helper processes: this test binary re-run inside a namespace as an agent
//!   stand-in ([`agent_command`] / [`helper_main`]): a fake OpenCode on the
//!   node's tailnet address plus `dnssd::host::publish`.
//! * [`Tailnet::run_in`]: run a closure on a thread that entered a node's
//!   namespace (sockets it creates live there).
//!
//! Nothing here touches the host's network namespace. Dropping the
//! [`Tailnet`] stops the forwarder, kills what runs in its namespaces (by PID)
//! and deletes them; namespaces of earlier test processes that died are
//! removed by the next [`Tailnet::create`].
#![allow(dead_code)]

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use serde_json::{Value, json};

use super::netns::{Proc, netns_pids, try_poll};

/// Prefix of every namespace created here (distinct from netns.rs's `oct`).
const PREFIX: &str = "otn";
/// Environment variable carrying a helper's role.
pub const ROLE_ENV: &str = "OCT_TAILNET_ROLE";

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn ip_ok(args: &[&str], stdin: Option<&str>) -> Result<(), String> {
    let mut cmd = Command::new("ip");
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(|e| format!("spawn ip: {e}"))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes())
            .map_err(|e| format!("write to ip: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("wait ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn ip(args: &[&str], stdin: Option<&str>) {
    if let Err(e) = ip_ok(args, stdin) {
        panic!("{e}");
    }
}

fn destroy_ns(name: &str) {
    for _ in 0..100 {
        let pids = netns_pids(name);
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            // SAFETY: plain kill(2) on a pid we listed inside our namespace.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = ip_ok(&["netns", "del", name], None);
}

fn remove_stale() {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    for line in out.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(PREFIX) else {
            continue;
        };
        let Some(pid) = rest.split('x').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            destroy_ns(name);
        }
    }
}

/// Runs `f` on a new thread that first entered namespace `ns`.
pub fn run_in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/var/run/netns/{ns}");
    thread::spawn(move || {
        enter_ns(&path);
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// Moves the calling thread into the network namespace at `path`.
pub fn enter_ns(path: &str) {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: setns on a valid fd; affects only the calling thread.
    let r = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

/// Opens the TUN device `tailscale0` of namespace `ns`.
fn open_tun(ns: &str) -> OwnedFd {
    run_in_ns(ns, || {
        const TUNSETIFF: libc::c_ulong = 0x400454ca;
        // SAFETY: open(2) with a constant path.
        let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        assert!(
            fd >= 0,
            "open /dev/net/tun: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fd was just returned by open and is owned from here on.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut ifr = [0u8; 40];
        ifr[..10].copy_from_slice(b"tailscale0");
        let flags: u16 = (libc::IFF_TUN | libc::IFF_NO_PI) as u16;
        ifr[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF reads a struct ifreq (40 bytes) from the pointer.
        let r = unsafe { libc::ioctl(fd, TUNSETIFF as _, ifr.as_mut_ptr()) };
        assert_eq!(r, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
        owned
    })
}

/// Counters of the forwarder.
#[derive(Debug, Default)]
pub struct FwdStats {
    /// Packets delivered to another node.
    pub forwarded: AtomicU64,
    /// Packets dropped (multicast, outside the tailnet, unknown destination).
    pub dropped: AtomicU64,
    /// Of those, multicast packets.
    pub multicast_dropped: AtomicU64,
}

/// Destination of an IP packet, if it is a unicast packet inside the tailnet
/// ranges (what a WireGuard peer's AllowedIPs would carry).
pub fn tailnet_unicast_dst(p: &[u8]) -> Result<IpAddr, bool> {
    match p.first().map(|b| b >> 4) {
        Some(4) if p.len() >= 20 => {
            let d = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
            if d.is_multicast() || d.is_broadcast() {
                return Err(true);
            }
            if p[16] == 100 && (p[17] & 0xC0) == 64 {
                Ok(IpAddr::V4(d))
            } else {
                Err(false)
            }
        }
        Some(6) if p.len() >= 40 => {
            let mut b = [0u8; 16];
            b.copy_from_slice(&p[24..40]);
            let d = Ipv6Addr::from(b);
            if d.is_multicast() {
                return Err(true);
            }
            let s = d.segments();
            if s[0] == 0xfd7a && s[1] == 0x115c && s[2] == 0xa1e0 {
                Ok(IpAddr::V6(d))
            } else {
                Err(false)
            }
        }
        _ => Err(false),
    }
}

struct Forwarder {
    /// Set to end the thread.
    stop: Arc<AtomicBool>,
    /// Write end of the pipe that wakes the thread's poll().
    wake: OwnedFd,
    /// The forwarding thread.
    thread: Option<JoinHandle<()>>,
    /// Counters.
    stats: Arc<FwdStats>,
}

impl Forwarder {
    fn start(tuns: Vec<(OwnedFd, Vec<IpAddr>)>) -> Forwarder {
        let mut pipe = [0i32; 2];
        // SAFETY: pipe2 fills two fds.
        let r = unsafe { libc::pipe2(pipe.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
        assert_eq!(r, 0, "pipe2");
        // SAFETY: both fds were just created and are owned here.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(pipe[0]), OwnedFd::from_raw_fd(pipe[1])) };
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(FwdStats::default());
        let (stop2, stats2) = (stop.clone(), stats.clone());
        let thread = thread::spawn(move || {
            let mut route: HashMap<IpAddr, usize> = HashMap::new();
            for (i, (_, addrs)) in tuns.iter().enumerate() {
                for a in addrs {
                    route.insert(*a, i);
                }
            }
            let mut fds: Vec<libc::pollfd> = tuns
                .iter()
                .map(|(fd, _)| libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            fds.push(libc::pollfd {
                fd: rd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            let mut buf = vec![0u8; 65536];
            while !stop2.load(Ordering::SeqCst) {
                // SAFETY: fds is a valid array of pollfd.
                let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as _, -1) };
                if n < 0 {
                    continue;
                }
                for i in 0..tuns.len() {
                    if fds[i].revents & libc::POLLIN == 0 {
                        continue;
                    }
                    // SAFETY: reading into our buffer from a valid fd.
                    let len = unsafe {
                        libc::read(tuns[i].0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len())
                    };
                    if len <= 0 {
                        continue;
                    }
                    let p = &buf[..len as usize];
                    match tailnet_unicast_dst(p).map(|d| route.get(&d).copied()) {
                        Ok(Some(j)) => {
                            // SAFETY: writing a packet we read to a valid TUN fd.
                            unsafe {
                                libc::write(tuns[j].0.as_raw_fd(), p.as_ptr().cast(), p.len());
                            }
                            stats2.forwarded.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(None) | Err(false) => {
                            stats2.dropped.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(true) => {
                            stats2.dropped.fetch_add(1, Ordering::Relaxed);
                            stats2.multicast_dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            drop(tuns);
        });
        Forwarder {
            stop,
            wake: wr,
            thread: Some(thread),
            stats,
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // SAFETY: one byte to a valid pipe fd.
        unsafe {
            libc::write(self.wake.as_raw_fd(), b"x".as_ptr().cast(), 1);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One simulated node.
#[derive(Debug, Clone)]
pub struct Node {
    /// Namespace name.
    pub ns: String,
    /// Tailnet IPv4 address (/32 on tailscale0).
    pub v4: Ipv4Addr,
    /// Tailnet IPv6 address (/128 on tailscale0).
    pub v6: Ipv6Addr,
}

/// N namespaces joined by a simulated tailnet. Deleted on drop.
pub struct Tailnet {
    /// The nodes, by index.
    nodes: Vec<Node>,
    /// The forwarder joining their TUNs.
    fwd: Option<Forwarder>,
}

/// Tailnet IPv4 address of node `i` (0-based) of any simulation.
pub fn node_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(100, 64, (i / 250) as u8, (i % 250 + 2) as u8)
}

/// Tailnet IPv6 address of node `i`.
pub fn node_v6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd7a, 0x115c, 0xa1e0, 0, 0, 0, 0, (i + 2) as u16)
}

/// A tailnet address that no simulated node owns (packets to it vanish).
pub fn ghost_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(100, 65, (i / 250) as u8, (i % 250 + 2) as u8)
}

impl Tailnet {
    /// Creates `n` nodes. Call `require_root()` first.
    pub fn create(n: usize) -> Tailnet {
        assert!((1..=500).contains(&n));
        remove_stale();
        let k = COUNTER.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("{PREFIX}{}x{k}", std::process::id());
        let mut net = Tailnet {
            nodes: Vec::new(),
            fwd: None,
        };
        for i in 0..n {
            let node = Node {
                ns: format!("{prefix}-t{i}"),
                v4: node_v4(i),
                v6: node_v6(i),
            };
            ip(&["netns", "add", &node.ns], None);
            net.nodes.push(node.clone());
            let script = format!(
                "link set lo up\n\
                 tuntap add dev tailscale0 mode tun\n\
                 link set dev tailscale0 multicast off mtu 1280\n\
                 addr add {}/32 dev tailscale0\n\
                 addr add {}/128 dev tailscale0 nodad\n\
                 link set tailscale0 up\n\
                 route add 100.64.0.0/10 dev tailscale0\n\
                 route add fd7a:115c:a1e0::/48 dev tailscale0\n",
                node.v4, node.v6
            );
            ip(&["-n", &node.ns, "-batch", "-"], Some(&script));
        }
        let tuns = net
            .nodes
            .iter()
            .map(|n| (open_tun(&n.ns), vec![IpAddr::V4(n.v4), IpAddr::V6(n.v6)]))
            .collect();
        net.fwd = Some(Forwarder::start(tuns));
        // Routes through a TUN are usable once its carrier is up.
        for n in &net.nodes {
            try_poll(Duration::from_secs(5), || {
                let out = Command::new("ip")
                    .args(["-n", &n.ns, "link", "show", "tailscale0"])
                    .output()
                    .ok()?;
                let s = String::from_utf8_lossy(&out.stdout).into_owned();
                (!s.contains("NO-CARRIER")).then_some(())
            });
        }
        net
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    /// Every node.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The forwarder's counters.
    pub fn stats(&self) -> Arc<FwdStats> {
        self.fwd
            .as_ref()
            .map(|f| f.stats.clone())
            .unwrap_or_default()
    }

    /// `ip netns exec <node i> <program>` (the child's PID is the program's).
    pub fn command(&self, i: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.nodes[i].ns]).arg(program);
        cmd
    }

    /// Runs `f` on a thread inside node `i`'s namespace.
    pub fn run_in<T: Send + 'static>(&self, i: usize, f: impl FnOnce() -> T + Send + 'static) -> T {
        run_in_ns(&self.nodes[i].ns, f)
    }
}

impl Drop for Tailnet {
    fn drop(&mut self) {
        self.fwd = None;
        for n in &self.nodes {
            destroy_ns(&n.ns);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fake LocalAPI
// ---------------------------------------------------------------------------------------------

/// A node as listed in the fake status.
#[derive(Debug, Clone)]
pub struct NodeDoc {
    /// Host name (MagicDNS name is `<name>.tail1234.ts.net.`).
    pub name: String,
    /// Tailnet addresses.
    pub addrs: Vec<IpAddr>,
    /// `Online`.
    pub online: bool,
}

impl NodeDoc {
    /// A node named `name` at `v4` (and `v6`, when given).
    pub fn new(name: &str, v4: Ipv4Addr, v6: Option<Ipv6Addr>) -> NodeDoc {
        let mut addrs = vec![IpAddr::V4(v4)];
        addrs.extend(v6.map(IpAddr::V6));
        NodeDoc {
            name: name.into(),
            addrs,
            online: true,
        }
    }

    /// The node of simulated node `i`.
    pub fn of(net: &Tailnet, i: usize, name: &str) -> NodeDoc {
        let n = net.node(i);
        NodeDoc::new(name, n.v4, Some(n.v6))
    }

    fn json(&self, id: usize) -> Value {
        json!({
            "ID": format!("n{id}CNTRL"),
            "NodeID": id,
            "PublicKey": format!("nodekey:{id:064x}"),
            "HostName": self.name,
            "DNSName": format!("{}.tail1234.ts.net.", self.name),
            "OS": "linux",
            "UserID": 42,
            "TailscaleIPs": self.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "AllowedIPs": self.addrs.iter().map(|a| match a { IpAddr::V4(_) => format!("{a}/32"), IpAddr::V6(_) => format!("{a}/128") }).collect::<Vec<_>>(),
            "Tags": null,
            "Addrs": null,
            "CurAddr": "",
            "Relay": "fra",
            "Online": self.online,
            "ExitNode": false,
            "Active": self.online,
            "PeerAPIURL": null,
            "InNetworkMap": true,
            "LastSeen": "0001-01-01T00:00:00Z",
        })
    }
}

/// The status document a test serves.
#[derive(Debug, Clone)]
pub struct StatusDoc {
    /// `BackendState`.
    pub state: String,
    /// `Self`.
    pub me: NodeDoc,
    /// `Peer` (keyed by a node key made from the position).
    pub peers: Vec<NodeDoc>,
}

impl StatusDoc {
    /// A running node `me` with `peers`.
    pub fn new(me: NodeDoc, peers: Vec<NodeDoc>) -> StatusDoc {
        StatusDoc {
            state: "Running".into(),
            me,
            peers,
        }
    }

    /// The `ipnstate.Status` JSON.
    pub fn json(&self) -> Value {
        let mut peers = serde_json::Map::new();
        for (i, p) in self.peers.iter().enumerate() {
            peers.insert(format!("nodekey:{:064x}", i + 2), p.json(i + 2));
        }
        json!({
            "Version": "1.103.0-t0123456789-g0123456789",
            "TUN": true,
            "BackendState": self.state,
            "HaveNodeKey": true,
            "AuthURL": "",
            "TailscaleIPs": self.me.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
            "Self": self.me.json(1),
            "Health": [],
            "MagicDNSSuffix": "tail1234.ts.net",
            "CurrentTailnet": {"Name": "user@example.com", "MagicDNSSuffix": "tail1234.ts.net", "MagicDNSEnabled": true},
            "CertDomains": [format!("{}.tail1234.ts.net", self.me.name)],
            "Peer": peers,
            "User": {"42": {"ID": 42, "LoginName": "user@example.com", "DisplayName": "User", "ProfilePicURL": ""}},
            "ClientVersion": null
        })
    }
}

/// tailscaled's LocalAPI on a unix socket, answering with a test-controlled status.
pub struct FakeLocalApi {
    /// The socket.
    path: PathBuf,
    /// The status served now.
    status: Arc<Mutex<Value>>,
    /// Requests served.
    requests: Arc<AtomicU64>,
    /// The server task (aborted on drop).
    task: tokio::task::JoinHandle<()>,
    /// Holds the socket's directory.
    _dir: tempfile::TempDir,
}

impl FakeLocalApi {
    /// Serves `status` on a fresh socket. Must be called inside a tokio runtime.
    pub fn start(status: &StatusDoc) -> FakeLocalApi {
        use axum::extract::{Request, State};
        use axum::http::{StatusCode, header};
        use axum::response::IntoResponse;

        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("tailscaled.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind fake LocalAPI socket");
        let shared = Arc::new(Mutex::new(status.json()));
        let requests = Arc::new(AtomicU64::new(0));
        type Shared = (Arc<Mutex<Value>>, Arc<AtomicU64>);
        async fn handle(
            State((status, n)): State<Shared>,
            req: Request,
        ) -> axum::response::Response {
            n.fetch_add(1, Ordering::SeqCst);
            let host = req
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("");
            if !matches!(
                host,
                "" | "local-tailscaled.sock" | "local-tailscaled.sock:80"
            ) || req.headers().contains_key(header::ORIGIN)
                || req.headers().contains_key(header::REFERER)
            {
                return (StatusCode::FORBIDDEN, "invalid localapi request\n").into_response();
            }
            if req.uri().path() != "/localapi/v0/status" {
                return (StatusCode::NOT_FOUND, "404 page not found\n").into_response();
            }
            let mut st = status.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if req.uri().query().is_some_and(|q| q.contains("peers=false"))
                && let Some(o) = st.as_object_mut()
            {
                o.remove("Peer");
            }
            (
                [
                    (header::CONTENT_TYPE, "application/json"),
                    (
                        header::HeaderName::from_static("tailscale-version"),
                        "1.103.0",
                    ),
                ],
                serde_json::to_string_pretty(&st).unwrap_or_default(),
            )
                .into_response()
        }
        let app = axum::Router::new()
            .fallback(handle)
            .with_state((shared.clone(), requests.clone()));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeLocalApi {
            path,
            status: shared,
            requests,
            task,
            _dir: dir,
        }
    }

    /// The socket path (for TAILSCALE_SOCKET).
    pub fn socket(&self) -> &Path {
        &self.path
    }

    /// The socket path as a string.
    pub fn socket_str(&self) -> String {
        self.path.display().to_string()
    }

    /// Replaces the served status.
    pub fn set(&self, status: &StatusDoc) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = status.json();
    }

    /// Requests served so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for FakeLocalApi {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ---------------------------------------------------------------------------------------------
// Agent stand-ins (helper processes)
// ---------------------------------------------------------------------------------------------

/// What an agent stand-in publishes.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    /// Instance id (TXT `id`).
    pub id: String,
    /// Instance name.
    pub name: String,
    /// TXT `host`, if any (else the MagicDNS name is shown).
    pub hostname: Option<String>,
    /// The tailnet address OpenCode listens on and the record advertises.
    pub addr: IpAddr,
    /// Runtime directory shared by the stand-ins of one node.
    pub dir: PathBuf,
    /// DNS-SD port.
    pub dnssd_port: u16,
    /// `None`: start a fake OpenCode on `addr`; `Some(p)`: advertise port `p`.
    pub opencode_port: Option<u16>,
}

/// This test binary as an agent stand-in, inside node `i` of `net` (or, with
/// `None`, in the test's own namespace, for loopback-only tests): runs the
/// `#[ignore]`d test `helper_test` (which calls [`helper_main`]).
pub fn agent_command(
    net: Option<(&Tailnet, usize)>,
    helper_test: &str,
    spec: &AgentSpec,
) -> Command {
    let exe = std::env::current_exe().expect("current test executable");
    let mut cmd = match net {
        Some((net, i)) => net.command(i, exe),
        None => Command::new(exe),
    };
    cmd.args([
        helper_test,
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env(ROLE_ENV, "agent")
    .env("OCT_TN_ID", &spec.id)
    .env("OCT_TN_NAME", &spec.name)
    .env("OCT_TN_HOST", spec.hostname.clone().unwrap_or_default())
    .env("OCT_TN_ADDR", spec.addr.to_string())
    .env("OCT_TN_DIR", &spec.dir)
    .env("OCT_TN_DNSSD_PORT", spec.dnssd_port.to_string())
    .env(
        "OCT_TN_OPENCODE_PORT",
        spec.opencode_port
            .map(|p| p.to_string())
            .unwrap_or_default(),
    )
    .env("RUST_LOG", "opencode_mcp=debug");
    cmd
}

/// Starts an agent stand-in (see [`agent_command`]) and waits for its
/// `READY` line; returns the process, the OpenCode port it advertises and
/// whether it started as the responder holder.
pub fn start_agent(
    net: Option<(&Tailnet, usize)>,
    helper_test: &str,
    spec: &AgentSpec,
) -> (Proc, u16, bool) {
    let place = net
        .map(|(n, i)| n.node(i).ns.clone())
        .unwrap_or_else(|| "host".into());
    let mut p = Proc::spawn(
        &format!("agent {}@{place}", spec.name),
        agent_command(net, helper_test, spec),
    );
    let line = p.wait_line("READY port=", Duration::from_secs(30));
    let port = line
        .text
        .split("port=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no port in {:?}", line.text));
    (p, port, line.text.contains("role=serving"))
}

/// Proxies TCP connections from `listener` to `to` (both directions).
pub async fn proxy(listener: tokio::net::TcpListener, to: SocketAddr) {
    loop {
        let Ok((mut inbound, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            if let Ok(mut out) = tokio::net::TcpStream::connect(to).await {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
            }
        });
    }
}

/// The body of a helper test: does nothing unless [`ROLE_ENV`] is set; as
/// `agent`, serves a fake OpenCode on the tailnet address (through a proxy to
/// the fixture on loopback), publishes it with `dnssd::host::publish`, prints
/// `READY port=<p>` and every role change (`ROLE serving` / `ROLE standby`),
/// and runs until killed.
pub fn helper_main() {
    let Ok(role) = std::env::var(ROLE_ENV) else {
        return;
    };
    assert_eq!(role, "agent", "unknown helper role");
    let env = |k: &str| std::env::var(k).unwrap_or_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        use opencode_mcp::announce::txt::Announcement;
        use opencode_mcp::dnssd::InstanceRecord;
        use opencode_mcp::dnssd::host::{HostOptions, Role, publish};

        let addr: IpAddr = env("OCT_TN_ADDR").parse().expect("OCT_TN_ADDR");
        let mut _fake = None;
        let port: u16 = match env("OCT_TN_OPENCODE_PORT").parse() {
            Ok(p) => p,
            Err(_) => {
                let fake = super::fake_opencode::FakeOpenCode::builder()
                    .directory(&format!("/srv/{}", env("OCT_TN_NAME")))
                    .start()
                    .await;
                let listener = tokio::net::TcpListener::bind(SocketAddr::new(addr, 0))
                    .await
                    .expect("bind OpenCode stand-in on the tailnet address");
                let port = listener.local_addr().expect("local addr").port();
                tokio::spawn(proxy(listener, fake.addr()));
                _fake = Some(fake);
                port
            }
        };
        let host = env("OCT_TN_HOST");
        let a = Announcement {
            id: env("OCT_TN_ID"),
            name: env("OCT_TN_NAME"),
            hostname: (!host.is_empty()).then_some(host),
            cwd: Some(format!("/srv/{}", env("OCT_TN_NAME"))),
            version: Some("1.0.0-fake".into()),
            pid: Some(std::process::id()),
            auth: false,
            tailnet_addrs: vec![addr],
            magic_dns: None,
            ..Announcement::default()
        };
        let label = format!("{}-{}", a.name, a.id);
        let record = InstanceRecord::new(
            &label,
            &format!("node-{}.local.", a.id),
            port,
            &a,
            vec![addr],
        );
        let mut opts =
            HostOptions::new(env("OCT_TN_DNSSD_PORT").parse().expect("OCT_TN_DNSSD_PORT"));
        opts.dir = PathBuf::from(env("OCT_TN_DIR"));
        opts.takeover_poll = Duration::from_millis(100);
        opts.rescan = Duration::from_millis(300);
        let publication = publish(record, opts).expect("publish");
        let mut roles = publication.watch_role();
        let show = |r: &Role| match r {
            Role::Serving { addrs } => format!("serving {addrs:?}"),
            Role::Standby => "standby".to_string(),
        };
        println!(
            "READY port={port} role={}",
            show(&roles.borrow_and_update())
        );
        loop {
            if roles.changed().await.is_err() {
                break;
            }
            let r = roles.borrow_and_update().clone();
            println!("ROLE {}", show(&r));
        }
        drop(publication);
    });
}

// ---------------------------------------------------------------------------------------------
// Misc
// ---------------------------------------------------------------------------------------------

/// Reads a whole file, for diagnostics.
pub fn slurp(p: &Path) -> String {
    let mut s = String::new();
    let _ = File::open(p).and_then(|mut f| f.read_to_string(&mut s));
    s
}
