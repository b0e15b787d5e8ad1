//! Browse one peer's unicast DNS-SD responder: one `PTR _opencode._tcp.local.`
//! datagram from an ephemeral port, one answer (PTR + SRV/TXT/A/AAAA as
//! additionals) within a short timeout, no retry, no cache.
//!
//! The socket is connected to the peer, so an ICMP "port unreachable" (an
//! online peer running no responder) ends the wait at once as
//! [`QueryError::Refused`] instead of a timeout. When a reply lacks an
//! instance's SRV or TXT (a responder that does not send additionals, or a
//! reply cut to fit 512 bytes), the missing records are looked up with
//! hickory-resolver against the same peer within what is left of the timeout.
//!
//! This module owns the client side of the wire format. It must not decide
//! what a missing answer means (the transport does) nor parse TXT contents
//! beyond splitting `key=value`.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hickory_proto::op::{Edns, Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::{Resolver, TokioResolver};
use tokio::net::UdpSocket;
use tokio::time::Instant;

use super::{label_of, service_name, split_txt};

/// EDNS payload size offered to responders.
pub const EDNS_PAYLOAD: u16 = 8192;

/// One instance found on a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundInstance {
    /// Instance label (first label of the service instance name).
    pub label: String,
    /// SRV target host name, when the SRV record was found.
    pub host: Option<String>,
    /// SRV port, when the SRV record was found.
    pub port: Option<u16>,
    /// TXT entries, when the TXT record was found.
    pub txt: Option<Vec<(String, String)>>,
    /// A/AAAA addresses of the SRV target that came with the answer.
    pub addrs: Vec<IpAddr>,
}

/// Why a peer gave no list of instances.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// Nothing answered in time (no responder, or the peer is unreachable).
    #[error("no answer within {} ms", .0.as_millis())]
    Timeout(Duration),
    /// The peer refused the datagram (ICMP port unreachable): no responder there.
    #[error("nothing listens on the DNS-SD port (port unreachable)")]
    Refused,
    /// The local socket failed.
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
    /// The peer answered with something unusable.
    #[error("unusable answer: {0}")]
    Bad(String),
}

impl QueryError {
    /// True when the peer is known to run no responder (as opposed to "did not
    /// hear back", which may be a lost datagram).
    pub fn is_definite(&self) -> bool {
        matches!(self, QueryError::Refused)
    }
}

static NEXT_ID: AtomicU16 = AtomicU16::new(0);

/// A query id unlikely to repeat: a counter mixed with the clock.
fn query_id() -> u16 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    NEXT_ID.fetch_add(1, Ordering::Relaxed).wrapping_mul(40503) ^ (nanos as u16)
}

/// The `PTR _opencode._tcp.local.` query with id `id`, offering EDNS.
pub fn browse_query(id: u16) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.id = id;
    m.metadata.recursion_desired = false;
    m.add_query(Query::query(service_name(), RecordType::PTR));
    let mut e = Edns::new();
    e.set_max_payload(EDNS_PAYLOAD);
    m.set_edns(e);
    // Encoding a fixed, valid question cannot fail.
    m.to_vec().unwrap_or_default()
}

/// The instances described by a browse reply: one per PTR answer, filled from
/// every SRV, TXT, A and AAAA record in the reply (any section).
pub fn parse_browse_reply(reply: &Message) -> Vec<FoundInstance> {
    let service = service_name();
    let all: Vec<&Record> = reply
        .answers
        .iter()
        .chain(reply.additionals.iter())
        .collect();
    let mut out: Vec<(Name, FoundInstance)> = Vec::new();
    for r in &reply.answers {
        let RData::PTR(ptr) = &r.data else { continue };
        if r.name != service {
            continue;
        }
        let Some(label) = label_of(&ptr.0) else {
            continue;
        };
        if out.iter().any(|(n, _)| *n == ptr.0) {
            continue;
        }
        out.push((
            ptr.0.clone(),
            FoundInstance {
                label,
                host: None,
                port: None,
                txt: None,
                addrs: Vec::new(),
            },
        ));
    }
    for (full, inst) in &mut out {
        fill_from(full, inst, &all);
    }
    out.into_iter().map(|(_, i)| i).collect()
}

/// Fills SRV, TXT and addresses of `inst` from `records`.
fn fill_from(full: &Name, inst: &mut FoundInstance, records: &[&Record]) {
    let mut target: Option<Name> = inst.host.as_deref().and_then(|h| Name::from_ascii(h).ok());
    for r in records {
        if r.name != *full {
            continue;
        }
        match &r.data {
            RData::SRV(srv) if inst.port.is_none() => {
                inst.port = Some(srv.port);
                inst.host = Some(srv.target.to_ascii());
                target = Some(srv.target.clone());
            }
            RData::TXT(txt) if inst.txt.is_none() => {
                let strings: Vec<Vec<u8>> = txt.txt_data.iter().map(|s| s.to_vec()).collect();
                inst.txt = Some(split_txt(&strings));
            }
            _ => {}
        }
    }
    if let Some(target) = target {
        for r in records {
            if r.name != target {
                continue;
            }
            let ip = match &r.data {
                RData::A(a) => IpAddr::V4(a.0),
                RData::AAAA(a) => IpAddr::V6(a.0),
                _ => continue,
            };
            if !inst.addrs.contains(&ip) {
                inst.addrs.push(ip);
            }
        }
    }
}

/// A hickory resolver that asks only `server` (UDP), once, with `timeout`,
/// without cache or hosts file.
pub fn resolver_for(server: SocketAddr, timeout: Duration) -> Result<TokioResolver, QueryError> {
    let mut udp = ConnectionConfig::udp();
    udp.port = server.port();
    let ns = NameServerConfig::new(server.ip(), true, vec![udp]);
    let mut b = Resolver::builder_with_config(
        ResolverConfig::from_name_servers(vec![ns]),
        TokioRuntimeProvider::default(),
    );
    let o: &mut ResolverOpts = b.options_mut();
    o.timeout = timeout.max(Duration::from_millis(1));
    o.attempts = 1;
    o.cache_size = 0;
    o.edns0 = true;
    o.use_hosts_file = ResolveHosts::Never;
    o.recursion_desired = false;
    o.ndots = 0;
    b.build()
        .map_err(|e| QueryError::Bad(format!("cannot build a resolver: {e}")))
}

/// Looks up the SRV/TXT (and the SRV target's A/AAAA) that `inst` lacks,
/// through `resolver`. Failures leave the fields empty.
async fn complete(resolver: &TokioResolver, inst: &mut FoundInstance) {
    let Some(full) = super::instance_name(&inst.label) else {
        return;
    };
    let (srv, txt) = tokio::join!(
        async {
            if inst.port.is_none() {
                resolver.lookup(full.clone(), RecordType::SRV).await.ok()
            } else {
                None
            }
        },
        async {
            if inst.txt.is_none() {
                resolver.lookup(full.clone(), RecordType::TXT).await.ok()
            } else {
                None
            }
        }
    );
    let mut records: Vec<Record> = Vec::new();
    for l in [srv, txt].into_iter().flatten() {
        records.extend(l.answers().iter().cloned());
        records.extend(l.additionals().iter().cloned());
    }
    let refs: Vec<&Record> = records.iter().collect();
    fill_from(&full, inst, &refs);
    if inst.addrs.is_empty()
        && let Some(host) = inst.host.as_deref().and_then(|h| Name::from_ascii(h).ok())
    {
        let (a, aaaa) = tokio::join!(
            resolver.lookup(host.clone(), RecordType::A),
            resolver.lookup(host.clone(), RecordType::AAAA)
        );
        for l in [a.ok(), aaaa.ok()].into_iter().flatten() {
            for r in l.answers() {
                match &r.data {
                    RData::A(x) => inst.addrs.push(IpAddr::V4(x.0)),
                    RData::AAAA(x) => inst.addrs.push(IpAddr::V6(x.0)),
                    _ => {}
                }
            }
        }
    }
}

/// Browses the responder at `server`: one datagram, at most `timeout` in all.
/// `Ok(vec![])` means the responder is there and publishes nothing.
pub async fn browse(
    server: SocketAddr,
    timeout: Duration,
) -> Result<Vec<FoundInstance>, QueryError> {
    let deadline = Instant::now() + timeout;
    let local: SocketAddr = match server.ip() {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(local).await?;
    sock.connect(server).await?;
    let id = query_id();
    match sock.send(&browse_query(id)).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Err(QueryError::Refused),
        Err(e) => return Err(QueryError::Io(e)),
    }
    let mut buf = vec![0u8; 65535];
    let reply = loop {
        let n = match tokio::time::timeout_at(deadline, sock.recv(&mut buf)).await {
            Err(_) => return Err(QueryError::Timeout(timeout)),
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                return Err(QueryError::Refused);
            }
            Ok(Err(e)) => return Err(QueryError::Io(e)),
            Ok(Ok(n)) => n,
        };
        // Ignore stray datagrams: wrong id, not a response, undecodable.
        match Message::from_vec(&buf[..n]) {
            Ok(m) if m.metadata.id == id && m.metadata.message_type == MessageType::Response => {
                break m;
            }
            _ => continue,
        }
    };
    match reply.metadata.response_code {
        ResponseCode::NoError => {}
        ResponseCode::NXDomain => return Ok(Vec::new()),
        other => return Err(QueryError::Bad(format!("response code {other}"))),
    }
    let mut found = parse_browse_reply(&reply);
    if found.iter().any(|f| f.port.is_none() || f.txt.is_none()) {
        let left = deadline.saturating_duration_since(Instant::now());
        if !left.is_zero() {
            let resolver = resolver_for(server, left)?;
            let incomplete = found
                .iter_mut()
                .filter(|f| f.port.is_none() || f.txt.is_none());
            let _ = tokio::time::timeout(
                left,
                futures::future::join_all(incomplete.map(|f| complete(&resolver, f))),
            )
            .await;
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::announce::txt::Announcement;
    use crate::dnssd::InstanceRecord;
    use crate::dnssd::responder::answer;

    fn rec(label: &str, port: u16) -> InstanceRecord {
        let a = Announcement {
            id: format!("id-{label}"),
            name: label.into(),
            ..Default::default()
        };
        InstanceRecord::new(
            label,
            "h-1.local",
            port,
            &a,
            vec!["100.64.0.9".parse().unwrap()],
        )
    }

    #[test]
    fn a_responder_reply_parses_into_complete_instances() {
        let recs = vec![rec("a", 1), rec("b", 2)];
        let q = browse_query(7);
        let reply = Message::from_vec(&answer(&q, &recs, 10).unwrap()).unwrap();
        assert_eq!(reply.metadata.id, 7);
        let found = parse_browse_reply(&reply);
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].label, "a");
        assert_eq!(found[0].port, Some(1));
        assert_eq!(found[0].host.as_deref(), Some("h-1.local."));
        assert_eq!(
            found[0].addrs,
            vec!["100.64.0.9".parse::<IpAddr>().unwrap()]
        );
        let txt = found[1].txt.as_ref().unwrap();
        assert!(txt.contains(&("id".to_string(), "id-b".to_string())));
    }

    #[test]
    fn ptrs_for_other_services_are_ignored() {
        let mut m = Message::response(1, hickory_proto::op::OpCode::Query);
        let other = Name::from_ascii("x._http._tcp.local.").unwrap();
        m.add_answer(Record::from_rdata(
            Name::from_ascii("_http._tcp.local.").unwrap(),
            10,
            RData::PTR(hickory_proto::rr::rdata::PTR(other)),
        ));
        assert!(parse_browse_reply(&m).is_empty());
    }

    #[tokio::test]
    async fn a_closed_port_on_loopback_is_refused_at_once() {
        // Find a free port, then close it.
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .map(|a| a.port())
            .unwrap();
        let t0 = std::time::Instant::now();
        let err = browse(
            SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
        assert!(err.is_definite(), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(2));
    }
}
