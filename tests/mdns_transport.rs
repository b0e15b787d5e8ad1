//! The `mdns` transport end to end, without OpenCode: `opencode-mcp` with
//! TRANSPORT=mdns in one network namespace, advertisements published with
//! mdns-sd by the test (a thread moved into another namespace, or a helper
//! process for the crash case). Nothing multicasts in the host namespace.
//!
//! Needs root (skips loudly otherwise; under `CI` it must run).

mod common;

use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::time::{Duration, Instant};

use common::netns::{
    Mcp, Netns, Proc, TempDir, helper_command, helper_role, in_netns, park_forever, poll,
    require_root, serve_fake_opencode,
};
use mdns_sd::{ServiceDaemon, ServiceInfo};
use opencode_mcp::announce::txt::{Announcement, SERVICE_TYPE};
use serde_json::Value;

/// Name of the helper test below (run by [`helper_command`]).
const HELPER: &str = "netns_helper";

/// An mdns-sd daemon running inside a namespace; shut down (goodbyes) on drop.
struct Publisher {
    daemon: ServiceDaemon,
}

impl Publisher {
    fn start(ns: &str) -> Publisher {
        Publisher {
            daemon: in_netns(ns, || ServiceDaemon::new().expect("mdns-sd daemon")),
        }
    }

    /// Registers (or re-registers) an instance without probing; returns its full name.
    fn publish(
        &self,
        ty: &str,
        instance: &str,
        host: &str,
        addr: Ipv4Addr,
        port: u16,
        txt: &[(String, String)],
    ) -> String {
        let mut info = ServiceInfo::new(ty, instance, host, IpAddr::V4(addr), port, txt)
            .expect("valid service info");
        info.set_requires_probe(false);
        let fullname = info.get_fullname().to_string();
        self.daemon.register(info).expect("register");
        fullname
    }

    fn unpublish(&self, fullname: &str) {
        self.daemon.unregister(fullname).expect("unregister");
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        let _ = self.daemon.shutdown();
    }
}

fn announcement(id: &str, name: &str) -> Announcement {
    Announcement {
        id: id.into(),
        name: name.into(),
        hostname: Some("t-box".into()),
        cwd: Some("/srv/t box/project".into()),
        version: Some("1.18.33".into()),
        pid: Some(4242),
        auth: false,
        ..Announcement::default()
    }
}

fn by_key<'a>(key: &'a str) -> impl Fn(&Value) -> bool + 'a {
    move |i: &Value| i["key"] == key
}

#[test]
fn mdns_advertisements_appear_change_vanish_and_bad_txt_is_a_problem() {
    if !require_root() {
        return;
    }
    let net = Netns::create(2);
    let relay = TempDir::new("relay");
    let relay_dir = relay.path().to_str().expect("utf-8 temp path").to_string();
    let mcp = Mcp::start(
        &net,
        1,
        &[
            ("TRANSPORT", "mdns"),
            ("RELAY_REGISTRY_DIR", &relay_dir),
            ("HEALTH_CHECK_TIMEOUT_MS", "500"),
        ],
    );
    // The default TRANSPORT (`auto`) must include mDNS too.
    let auto = Mcp::start(&net, 1, &[("RELAY_REGISTRY_DIR", &relay_dir)]);
    let publisher = Publisher::start(net.ns(0));
    let addr = net.addr(0);

    // An agent advertisement appears with the TXT's fields and the resolved address.
    let ann = announcement("t1-id-0001", "t1-box-project");
    let agent_name = publisher.publish(
        SERVICE_TYPE,
        "t1-box-project-a1",
        "t-box.local.",
        addr,
        4311,
        &ann.to_txt(),
    );
    let started = Instant::now();
    let inst = poll(
        Duration::from_secs(5),
        "the advertisement in `instances`",
        || mcp.find_instance(by_key(&ann.id)),
    );
    eprintln!("advertisement listed after {:?}", started.elapsed());
    assert_eq!(inst["name"], "t1-box-project", "{inst}");
    assert_eq!(inst["hostname"], "t-box", "{inst}");
    assert_eq!(inst["cwd"], "/srv/t box/project", "{inst}");
    assert_eq!(inst["url"], format!("http://{addr}:4311"), "{inst}");
    assert_eq!(inst["transport"], "mdns", "{inst}");
    assert_eq!(inst["reach"], "lan", "{inst}");
    poll(
        Duration::from_secs(5),
        "the advertisement under TRANSPORT=auto",
        || auto.find_instance(by_key(&ann.id)),
    );

    // A new port is an update of the same instance, not a second one.
    publisher.publish(
        SERVICE_TYPE,
        "t1-box-project-a1",
        "t-box.local.",
        addr,
        4312,
        &ann.to_txt(),
    );
    poll(Duration::from_secs(5), "the new port", || {
        mcp.find_instance(by_key(&ann.id))
            .filter(|i| i["url"] == format!("http://{addr}:4312"))
    });
    let listed = mcp.instances();
    let same_id = listed["instances"]
        .as_array()
        .map(|a| a.iter().filter(|i| i["key"] == ann.id.as_str()).count());
    assert_eq!(same_id, Some(1), "{listed}");

    // OpenCode's own advertisement (`_http._tcp`, `opencode-<port>`, path=/)
    // appears; another HTTP service does not.
    let path = [("path".to_string(), "/".to_string())];
    publisher.publish(
        "_http._tcp.local.",
        "opencode-4313",
        "opencode.local.",
        addr,
        4313,
        &path,
    );
    publisher.publish(
        "_http._tcp.local.",
        "t1-printer",
        "printer.local.",
        addr,
        631,
        &path,
    );
    let key = format!("mdns:{addr}:4313");
    let oc = poll(
        Duration::from_secs(5),
        "OpenCode's own advertisement",
        || mcp.find_instance(by_key(&key)),
    );
    assert_eq!(oc["name"], format!("opencode-4313@{addr}"), "{oc}");
    assert_eq!(oc["url"], format!("http://{addr}:4313"), "{oc}");

    // A TXT record without an id is listed as a problem, not as an instance.
    let bad_txt = vec![
        ("txtvers".to_string(), "1".to_string()),
        ("name".to_string(), "t1-no-id".to_string()),
    ];
    let bad_name = publisher.publish(
        SERVICE_TYPE,
        "t1-bad-txt",
        "t-box.local.",
        addr,
        4314,
        &bad_txt,
    );
    let problem = poll(Duration::from_secs(5), "the bad TXT problem", || {
        let v = mcp.instances();
        v["problems"].as_array().and_then(|ps| {
            ps.iter()
                .find(|p| p["source"] == bad_name.as_str())
                .cloned()
        })
    });
    assert_eq!(problem["transport"], "mdns", "{problem}");
    assert!(
        problem["reason"].as_str().unwrap_or("").contains("id"),
        "{problem}"
    );
    let listed = mcp.instances();
    assert!(
        listed["instances"]
            .as_array()
            .is_some_and(|a| a.iter().all(|i| i["name"] != "t1-no-id"
                && !i["name"].as_str().unwrap_or("").contains("printer"))),
        "{listed}"
    );

    // Unregistered (goodbye packets) ⇒ gone within 2 s; the problem clears too.
    let t0 = Instant::now();
    publisher.unpublish(&agent_name);
    publisher.unpublish(&bad_name);
    poll(
        Duration::from_secs(2),
        "the instance to be gone within 2 s",
        || mcp.find_instance(by_key(&ann.id)).is_none().then_some(()),
    );
    eprintln!("unregister → gone from `instances`: {:?}", t0.elapsed());
    poll(Duration::from_secs(2), "the problem to clear", || {
        mcp.instances()["problems"]
            .as_array()
            .is_some_and(|ps| ps.iter().all(|p| p["source"] != bad_name.as_str()))
            .then_some(())
    });
    // OpenCode's advertisement is untouched.
    assert!(mcp.find_instance(by_key(&key)).is_some());
}

#[test]
fn killed_advertiser_goes_offline_within_5s_and_leaves_mdns_after_verify() {
    if !require_root() {
        return;
    }
    let net = Netns::create(2);
    let relay = TempDir::new("relay");
    let relay_dir = relay.path().to_str().expect("utf-8 temp path").to_string();
    let addr = net.addr(0);
    let mut helper = Proc::spawn("advertiser", {
        let mut cmd = helper_command(&net, 0, HELPER, "publish-and-serve");
        cmd.env("OCT_ADDR", addr.to_string())
            .env("OCT_ID", "t2-id-0001")
            .env("OCT_NAME", "t2-crashy");
        cmd
    });
    helper.wait_line("READY", Duration::from_secs(20));
    let mcp = Mcp::start(
        &net,
        1,
        &[
            ("TRANSPORT", "mdns"),
            ("RELAY_REGISTRY_DIR", &relay_dir),
            ("HEALTH_CHECK_TIMEOUT_MS", "500"),
        ],
    );
    let inst = poll(
        Duration::from_secs(10),
        "the advertised fake to be online",
        || {
            mcp.find_instance(by_key("t2-id-0001"))
                .filter(|i| i["status"] == "online")
        },
    );
    assert_eq!(inst["version"], "fake-netns", "{inst}");

    // kill -9: no goodbye packets, mdns-sd's record would live 120 s.
    let t0 = Instant::now();
    helper.kill();
    poll(
        Duration::from_secs(5),
        "offline (or gone) within 5 s",
        || match mcp.find_instance(by_key("t2-id-0001")) {
            None => Some(()),
            Some(i) if i["status"] == "offline" => Some(()),
            Some(_) => None,
        },
    );
    let offline_after = t0.elapsed();
    // The registry reported it unreachable; the transport asked mdns-sd to
    // verify, which flushes the record after its 10 s verify timeout.
    poll(
        Duration::from_secs(20),
        "the record to be verified away",
        || {
            mcp.find_instance(by_key("t2-id-0001"))
                .is_none()
                .then_some(())
        },
    );
    eprintln!(
        "kill -9 → offline {offline_after:?}, → gone (verify) {:?}",
        t0.elapsed()
    );
}

/// Not a test: the helper process of the tests above (see [`helper_command`]).
#[test]
#[ignore = "helper process of other tests; acts only when OCT_NETNS_HELPER is set"]
fn netns_helper() {
    let Some(role) = helper_role() else {
        return;
    };
    match role.as_str() {
        "publish-and-serve" => {
            let addr: Ipv4Addr = std::env::var("OCT_ADDR")
                .expect("OCT_ADDR")
                .parse()
                .expect("OCT_ADDR is an IPv4 address");
            let listener = TcpListener::bind((addr, 0)).expect("bind the fake OpenCode");
            let port = listener.local_addr().expect("local addr").port();
            serve_fake_opencode(listener, "fake-netns", false);
            let ann = announcement(
                &std::env::var("OCT_ID").expect("OCT_ID"),
                &std::env::var("OCT_NAME").expect("OCT_NAME"),
            );
            let daemon = ServiceDaemon::new().expect("mdns-sd daemon");
            let mut info = ServiceInfo::new(
                SERVICE_TYPE,
                &format!("{}-{port}", ann.name),
                "t-crashy.local.",
                IpAddr::V4(addr),
                port,
                &ann.to_txt()[..],
            )
            .expect("service info");
            info.set_requires_probe(false);
            daemon.register(info).expect("register");
            println!("READY {port}");
            park_forever();
        }
        other => panic!("unknown helper role {other}"),
    }
}
