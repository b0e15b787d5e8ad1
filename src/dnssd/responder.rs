//! The unicast DNS-SD responder: answers plain DNS queries for
//! `_opencode._tcp.local.` from a set of [`InstanceRecord`]s.
//!
//! - `PTR _opencode._tcp.local.` → one PTR per instance, with SRV, TXT and
//!   A/AAAA as additionals (one round trip is enough for a client);
//! - `PTR _services._dns-sd._udp.local.` → the service type;
//! - `SRV`/`TXT`/`ANY <label>._opencode._tcp.local.` → those records (+ A/AAAA);
//! - `A`/`AAAA`/`ANY <host>` → the host's addresses;
//! - any other name → NXDOMAIN.
//!
//! Replies go back unicast to the querier's address and port (5353 included),
//! echo the ID and questions (mDNS QU bit cleared), set AA, never set the mDNS
//! cache-flush bit, and fit the querier's limit (512 bytes, or its EDNS
//! payload size): additionals are dropped first, then the reply is truncated
//! (TC). Datagrams from outside the tailnet ranges and loopback are ignored.
//!
//! This module owns the DNS encoding and the UDP loop. It must not decide
//! what is published (its [`RecordSource`] does) nor which addresses to bind
//! (its caller does).

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, PTR, SRV, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

use super::{InstanceRecord, META_QUERY, is_servable, service_name};

/// Largest reply ever sent, whatever a querier's EDNS says.
pub const MAX_REPLY_BYTES: usize = 9000;
/// Reply size limit for queriers without EDNS (RFC 1035).
pub const PLAIN_DNS_LIMIT: usize = 512;

/// Where the responder gets the records to answer with, at each query.
pub trait RecordSource: Send + Sync + 'static {
    /// The records to publish now.
    fn records(&self) -> Vec<InstanceRecord>;
}

impl RecordSource for RwLock<Vec<InstanceRecord>> {
    fn records(&self) -> Vec<InstanceRecord> {
        match self.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

impl<F> RecordSource for F
where
    F: Fn() -> Vec<InstanceRecord> + Send + Sync + 'static,
{
    fn records(&self) -> Vec<InstanceRecord> {
        self()
    }
}

fn addr_records(r: &InstanceRecord, ttl: u32, want: RecordType) -> Vec<Record> {
    let Some(host) = r.host_name() else {
        return Vec::new();
    };
    r.addrs
        .iter()
        .filter_map(|ip| match (ip, want) {
            (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => {
                Some(Record::from_rdata(host.clone(), ttl, RData::A(A(*v4))))
            }
            (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => Some(Record::from_rdata(
                host.clone(),
                ttl,
                RData::AAAA(AAAA(*v6)),
            )),
            _ => None,
        })
        .collect()
}

fn srv_record(r: &InstanceRecord, full: &Name, ttl: u32) -> Option<Record> {
    let host = r.host_name()?;
    Some(Record::from_rdata(
        full.clone(),
        ttl,
        RData::SRV(SRV::new(0, 0, r.port, host)),
    ))
}

fn txt_record(r: &InstanceRecord, full: &Name, ttl: u32) -> Record {
    let strings = r.txt_strings();
    // An empty TXT record is one empty string (RFC 6763 §6.1).
    let strings = if strings.is_empty() {
        vec![String::new()]
    } else {
        strings
    };
    Record::from_rdata(full.clone(), ttl, RData::TXT(TXT::new(strings)))
}

/// Appends `recs` to `out`, skipping exact duplicates (same name, type, data).
fn push_unique(out: &mut Vec<Record>, seen: &mut HashSet<String>, recs: Vec<Record>) {
    for r in recs {
        let k = format!("{}|{}", r.name.to_lowercase(), r.data);
        if seen.insert(k) {
            out.push(r);
        }
    }
}

/// The reply to one query datagram, or `None` to drop it silently (not a
/// standard query, undecodable, or a response).
pub fn answer(query: &[u8], records: &[InstanceRecord], ttl: u32) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    if q.metadata.message_type != MessageType::Query
        || q.metadata.op_code != OpCode::Query
        || q.queries.is_empty()
    {
        return None;
    }
    let limit = match &q.edns {
        Some(e) => usize::from(e.max_payload()).clamp(PLAIN_DNS_LIMIT, MAX_REPLY_BYTES),
        None => PLAIN_DNS_LIMIT,
    };
    let records: Vec<(&InstanceRecord, Name)> = records
        .iter()
        .filter(|r| r.is_valid())
        .filter_map(|r| r.fullname().map(|n| (r, n)))
        .collect();
    let service = service_name();
    let meta = Name::from_ascii(META_QUERY).ok()?;

    let mut r = Message::response(q.metadata.id, OpCode::Query);
    r.metadata.authoritative = true;
    r.metadata.recursion_desired = q.metadata.recursion_desired;
    let (mut answers, mut additionals) = (Vec::new(), Vec::new());
    let (mut seen_an, mut seen_ad) = (HashSet::new(), HashSet::new());
    let mut known_name = false;
    for question in &q.queries {
        let mut question = question.clone();
        question.mdns_unicast_response = false;
        let qn = question.name.clone();
        let qt = question.query_type;
        r.add_query(question);
        if qn == service {
            known_name = true;
            if matches!(qt, RecordType::PTR | RecordType::ANY) {
                for (rec, full) in &records {
                    let ptr =
                        Record::from_rdata(service.clone(), ttl, RData::PTR(PTR(full.clone())));
                    push_unique(&mut answers, &mut seen_an, vec![ptr]);
                    let mut extra: Vec<Record> = srv_record(rec, full, ttl).into_iter().collect();
                    extra.push(txt_record(rec, full, ttl));
                    extra.extend(addr_records(rec, ttl, RecordType::ANY));
                    push_unique(&mut additionals, &mut seen_ad, extra);
                }
            }
        } else if qn == meta {
            known_name = true;
            if matches!(qt, RecordType::PTR | RecordType::ANY) && !records.is_empty() {
                let ptr = Record::from_rdata(meta.clone(), ttl, RData::PTR(PTR(service.clone())));
                push_unique(&mut answers, &mut seen_an, vec![ptr]);
            }
        } else if let Some((rec, full)) = records.iter().find(|(_, full)| *full == qn) {
            known_name = true;
            if matches!(qt, RecordType::SRV | RecordType::ANY) {
                push_unique(
                    &mut answers,
                    &mut seen_an,
                    srv_record(rec, full, ttl).into_iter().collect(),
                );
                push_unique(
                    &mut additionals,
                    &mut seen_ad,
                    addr_records(rec, ttl, RecordType::ANY),
                );
            }
            if matches!(qt, RecordType::TXT | RecordType::ANY) {
                push_unique(&mut answers, &mut seen_an, vec![txt_record(rec, full, ttl)]);
            }
        } else {
            let hosts: Vec<&InstanceRecord> = records
                .iter()
                .map(|(rec, _)| *rec)
                .filter(|rec| rec.host_name().is_some_and(|h| h == qn))
                .collect();
            if !hosts.is_empty() {
                known_name = true;
                for rec in hosts {
                    push_unique(&mut answers, &mut seen_an, addr_records(rec, ttl, qt));
                }
            }
        }
    }
    if !known_name {
        r.metadata.response_code = ResponseCode::NXDomain;
    }
    if q.edns.is_some() {
        let mut e = Edns::new();
        e.set_max_payload(MAX_REPLY_BYTES as u16);
        r.set_edns(e);
    }
    r.add_answers(answers);
    let full = {
        let mut m = r.clone();
        m.add_additionals(additionals);
        m.to_vec().ok()?
    };
    if full.len() <= limit {
        return Some(full);
    }
    // Too big for the querier: without additionals it can ask for SRV/TXT/A
    // one by one.
    let bare = r.to_vec().ok()?;
    if bare.len() <= limit {
        return Some(bare);
    }
    let mut t = r.truncate();
    t.metadata.truncation = true;
    // Keep as many answers as fit.
    for rec in &r.answers {
        let mut next = t.clone();
        next.add_answer(rec.clone());
        match next.to_vec() {
            Ok(b) if b.len() <= limit => t = next,
            _ => break,
        }
    }
    t.to_vec().ok()
}

/// A UDP socket for the responder on `addr`, with SO_REUSEADDR and
/// SO_REUSEPORT so that it coexists with mDNS stacks on the wildcard address
/// (a socket bound to the specific address receives the unicast sent to it).
/// IPv6 sockets are v6-only. Must be called inside a tokio runtime.
pub fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

/// Answers queries on `socket` from `source` until `shutdown` is cancelled.
pub async fn serve(
    socket: UdpSocket,
    source: Arc<dyn RecordSource>,
    ttl: u32,
    shutdown: CancellationToken,
) {
    let mut buf = vec![0u8; MAX_REPLY_BYTES];
    let local = socket.local_addr().ok();
    loop {
        let (len, from) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = socket.recv_from(&mut buf) => match r {
                Ok(x) => x,
                Err(e) => {
                    // Transient (e.g. an ICMP error queued on the socket): keep serving.
                    tracing::debug!(local = ?local, error = %e, "unicast DNS-SD receive error");
                    continue;
                }
            },
        };
        if !is_servable(&from.ip()) || from.port() == 0 {
            tracing::trace!(%from, "ignoring a query from outside the tailnet");
            continue;
        }
        let records = source.records();
        if let Some(reply) = answer(&buf[..len], &records, ttl)
            && let Err(e) = socket.send_to(&reply, from).await
        {
            tracing::debug!(%from, error = %e, "cannot send a unicast DNS-SD reply");
        }
    }
}

/// A running responder on a set of sockets; stops when dropped.
pub struct Responder {
    /// The addresses actually bound (with the real port when 0 was asked).
    local: Vec<SocketAddr>,
    /// Stops every socket's task.
    stop: CancellationToken,
}

impl Responder {
    /// Binds every address in `addrs` and serves `source` on each. Fails if
    /// any bind fails (nothing is left running then). Must be called inside a
    /// tokio runtime.
    pub fn start(
        addrs: &[SocketAddr],
        source: Arc<dyn RecordSource>,
        ttl: u32,
    ) -> io::Result<Responder> {
        let mut sockets = Vec::new();
        for a in addrs {
            let s = bind_udp(*a).map_err(|e| io::Error::new(e.kind(), format!("bind {a}: {e}")))?;
            sockets.push(s);
        }
        let stop = CancellationToken::new();
        let mut local = Vec::new();
        for s in sockets {
            local.push(s.local_addr()?);
            tokio::spawn(serve(s, source.clone(), ttl, stop.clone()));
        }
        Ok(Responder { local, stop })
    }

    /// The bound addresses.
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::announce::txt::Announcement;
    use hickory_proto::op::Query;
    use std::str::FromStr;

    fn rec(label: &str, id: &str, host: &str, port: u16, addrs: &[&str]) -> InstanceRecord {
        let a = Announcement {
            id: id.into(),
            name: label.into(),
            hostname: Some("box".into()),
            cwd: Some("/home/u/p".into()),
            ..Default::default()
        };
        InstanceRecord::new(
            label,
            host,
            port,
            &a,
            addrs.iter().map(|s| s.parse().unwrap()).collect(),
        )
    }

    fn query(name: &str, t: RecordType, edns: Option<u16>, qu: bool) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 4242;
        let mut q = Query::query(Name::from_str(name).unwrap(), t);
        q.mdns_unicast_response = qu;
        m.add_query(q);
        if let Some(p) = edns {
            let mut e = Edns::new();
            e.set_max_payload(p);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    fn parse(b: &[u8]) -> Message {
        Message::from_vec(b).unwrap()
    }

    fn types(rs: &[Record]) -> Vec<RecordType> {
        rs.iter().map(|r| r.data.record_type()).collect()
    }

    #[test]
    fn ptr_query_gets_ptr_plus_srv_txt_a_in_one_reply() {
        let recs = vec![rec(
            "a-1",
            "id1",
            "box-1.local.",
            4096,
            &["100.64.0.2", "fd7a:115c:a1e0::2"],
        )];
        let m = parse(
            &answer(
                &query("_opencode._tcp.local.", RecordType::PTR, None, true),
                &recs,
                10,
            )
            .unwrap(),
        );
        assert_eq!(m.metadata.id, 4242);
        assert_eq!(m.metadata.message_type, MessageType::Response);
        assert!(m.metadata.authoritative);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(!m.queries[0].mdns_unicast_response);
        assert_eq!(types(&m.answers), vec![RecordType::PTR]);
        assert_eq!(
            types(&m.additionals),
            vec![
                RecordType::SRV,
                RecordType::TXT,
                RecordType::A,
                RecordType::AAAA
            ]
        );
        assert!(m.all_sections().all(|r| !r.mdns_cache_flush && r.ttl == 10));
        let RData::SRV(srv) = &m.additionals[0].data else {
            panic!()
        };
        assert_eq!(
            (srv.port, srv.target.to_ascii()),
            (4096, "box-1.local.".to_string())
        );
    }

    #[test]
    fn srv_txt_a_and_meta_queries() {
        let recs = vec![
            rec("a-1", "id1", "box-1.local.", 4096, &["100.64.0.2"]),
            rec("b-2", "id2", "box-1.local.", 4097, &["100.64.0.2"]),
        ];
        let m = parse(
            &answer(
                &query("b-2._opencode._tcp.local.", RecordType::SRV, None, false),
                &recs,
                10,
            )
            .unwrap(),
        );
        assert_eq!(types(&m.answers), vec![RecordType::SRV]);
        assert_eq!(types(&m.additionals), vec![RecordType::A]);
        let m = parse(
            &answer(
                &query("B-2._OpenCode._tcp.local.", RecordType::TXT, None, false),
                &recs,
                10,
            )
            .unwrap(),
        );
        assert_eq!(types(&m.answers), vec![RecordType::TXT]);
        // Two records share a host: its address is answered once.
        let m = parse(
            &answer(
                &query("box-1.local.", RecordType::A, None, false),
                &recs,
                10,
            )
            .unwrap(),
        );
        assert_eq!(types(&m.answers), vec![RecordType::A]);
        let m = parse(
            &answer(
                &query("box-1.local.", RecordType::AAAA, None, false),
                &recs,
                10,
            )
            .unwrap(),
        );
        assert_eq!(
            (m.metadata.response_code, m.answers.len()),
            (ResponseCode::NoError, 0)
        );
        let m =
            parse(&answer(&query(META_QUERY, RecordType::PTR, None, false), &recs, 10).unwrap());
        assert_eq!(types(&m.answers), vec![RecordType::PTR]);
        let m = parse(
            &answer(
                &query("x._opencode._tcp.local.", RecordType::SRV, None, false),
                &recs,
                10,
            )
            .unwrap(),
        );
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain);
    }

    #[test]
    fn no_instances_is_an_empty_noerror_answer() {
        let m = parse(
            &answer(
                &query("_opencode._tcp.local.", RecordType::PTR, None, false),
                &[],
                10,
            )
            .unwrap(),
        );
        assert_eq!(
            (m.metadata.response_code, m.answers.len()),
            (ResponseCode::NoError, 0)
        );
    }

    #[test]
    fn responses_and_garbage_are_dropped() {
        assert!(answer(b"\x00\x01garbage", &[], 10).is_none());
        let mut resp = Message::response(1, OpCode::Query);
        resp.add_query(Query::query(service_name(), RecordType::PTR));
        assert!(answer(&resp.to_vec().unwrap(), &[], 10).is_none());
    }

    #[test]
    fn big_replies_drop_additionals_then_truncate_within_the_limit() {
        let recs: Vec<InstanceRecord> = (0..12)
            .map(|i| {
                rec(
                    &format!("instance-{i}-{}", "x".repeat(30)),
                    &format!("id{i}"),
                    "h.local.",
                    4000 + i,
                    &["100.64.0.2"],
                )
            })
            .collect();
        let plain = answer(
            &query("_opencode._tcp.local.", RecordType::PTR, None, false),
            &recs,
            10,
        )
        .unwrap();
        assert!(plain.len() <= PLAIN_DNS_LIMIT, "{}", plain.len());
        let m = parse(&plain);
        assert!(
            m.additionals
                .iter()
                .all(|r| r.data.record_type() == RecordType::OPT)
                || m.additionals.is_empty()
        );
        assert!(m.metadata.truncation || m.answers.len() == 12);
        let big = answer(
            &query("_opencode._tcp.local.", RecordType::PTR, Some(4096), false),
            &recs,
            10,
        )
        .unwrap();
        let m = parse(&big);
        assert!(big.len() <= 4096);
        assert_eq!(m.answers.len(), 12);
        assert!(!m.metadata.truncation);
        assert!(
            m.additionals
                .iter()
                .any(|r| r.data.record_type() == RecordType::SRV)
        );
    }
}
