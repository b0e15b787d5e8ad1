//! Unicast DNS-SD over the tailnet, both directions, as sent by any peer:
//!
//! - the responder's pure `dnssd::responder::answer` on an arbitrary query
//!   datagram (two published records) drops it or returns a reply that
//!   decodes and fits the largest datagram the responder sends;
//! - an arbitrary datagram decoded as a reply (`hickory_proto` `Message`) →
//!   `dnssd::query::parse_browse_reply` → `Announcement::from_txt` on each
//!   instance's TXT entries.
//!
//! Nothing may panic.
#![no_main]

use std::net::IpAddr;
use std::sync::OnceLock;

use hickory_proto::op::Message;
use libfuzzer_sys::fuzz_target;
use opencode_mcp::announce::txt::Announcement;
use opencode_mcp::dnssd::InstanceRecord;
use opencode_mcp::dnssd::query::parse_browse_reply;
use opencode_mcp::dnssd::responder::{MAX_REPLY_BYTES, answer};

fn records() -> &'static [InstanceRecord] {
    static RECORDS: OnceLock<Vec<InstanceRecord>> = OnceLock::new();
    RECORDS.get_or_init(|| {
        let addrs: Vec<IpAddr> = ["100.64.0.7", "fd7a:115c:a1e0::7"]
            .iter()
            .filter_map(|a| a.parse().ok())
            .collect();
        let a = Announcement {
            id: "0a1b2c3d4e5f6071".into(),
            name: "box-proj".into(),
            hostname: Some("box".into()),
            cwd: Some("/home/u/proj".into()),
            version: Some("1.18.33".into()),
            pid: Some(4242),
            auth: true,
            tailnet_addrs: addrs.clone(),
            magic_dns: Some("box.tail1234.ts.net".into()),
            ..Announcement::default()
        };
        let mut b = a.clone();
        b.id = "ffeeddccbbaa9988".into();
        b.name = "box-other project".into();
        vec![
            InstanceRecord::new(
                "box-proj-0a1b2c",
                "box-0a1b2c.local",
                4100,
                &a,
                addrs.clone(),
            ),
            InstanceRecord::new("box-other project", "box-0a1b2c.local", 4101, &b, addrs),
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    if let Some(reply) = answer(data, records(), 10) {
        assert!(
            reply.len() <= MAX_REPLY_BYTES,
            "reply of {} bytes to a {}-byte query",
            reply.len(),
            data.len()
        );
        assert!(
            Message::from_vec(&reply).is_ok(),
            "the responder's reply does not decode"
        );
    }
    if let Ok(msg) = Message::from_vec(data) {
        for found in parse_browse_reply(&msg) {
            if let Some(txt) = &found.txt {
                let _ = Announcement::from_txt(txt.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            }
        }
    }
});
