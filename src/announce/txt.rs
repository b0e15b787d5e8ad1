//! The DNS-SD TXT record of `_opencode._tcp` advertisements.
//!
//! Keys, in this order (`txtvers` first, as RFC 6763 §6.7 recommends):
//!
//! | key | value |
//! |---|---|
//! | `txtvers` | `1` |
//! | `id` | stable unique instance id (letters, digits, `-_.:`) |
//! | `name` | instance name users match against |
//! | `host` | machine hostname |
//! | `cwd` | working directory, cut at a character boundary to fit |
//! | `ver` | OpenCode version |
//! | `pid` | OpenCode's process id |
//! | `auth` | `1` when OpenCode requires a password, else `0` |
//! | `ts` | tailnet addresses, comma-separated (absent when none) |
//! | `dns` | MagicDNS name (absent when none) |
//! | `addrs` | addresses the agent signed, comma-separated (absent ⇒ unsigned) |
//! | `at` | when the agent signed, in Unix seconds (with `sig`) |
//! | `sig` | 64 hex digits: [`FleetSecret::sign`]`(id, SRV port, addrs, at)` |
//!
//! Every `key=value` entry is at most 255 bytes. Unknown keys are ignored by
//! the parser, so later versions may add keys without bumping `txtvers`.
//!
//! # Signatures
//!
//! The signed tuple is (`id`, the SRV port, `addrs`, `at`). `addrs` is cut at
//! whole addresses to fit one entry, and the signature must cover exactly
//! the list carried: sign with [`Announcement::sign_with`], which cuts the
//! list first ([`fit_addrs`]). `at`, `sig` and `addrs` go together: `sig`
//! without `at` (or the reverse) makes the record unusable, `addrs` without
//! `sig` is an unsigned record. The `sig` value is public (it is a MAC, not a
//! password) but nothing in the server echoes it.

use std::net::IpAddr;

use crate::secret::{FleetSecret, SIG_HEX_LEN, Signed};

/// DNS-SD service type of agent advertisements.
pub const SERVICE_TYPE: &str = "_opencode._tcp.local.";
/// TXT record version written by this build.
pub const TXT_VERSION: &str = "1";
/// Largest `key=value` entry allowed in a TXT record.
pub const MAX_ENTRY_BYTES: usize = 255;

/// What an agent announces about one instance.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Announcement {
    /// Stable unique instance id (the registry key).
    pub id: String,
    /// Instance name.
    pub name: String,
    /// Machine hostname.
    pub hostname: Option<String>,
    /// Working directory (possibly cut).
    pub cwd: Option<String>,
    /// OpenCode version.
    pub version: Option<String>,
    /// OpenCode's pid.
    pub pid: Option<u32>,
    /// Whether OpenCode requires a password.
    pub auth: bool,
    /// Tailnet addresses of the machine.
    pub tailnet_addrs: Vec<IpAddr>,
    /// MagicDNS name of the machine.
    pub magic_dns: Option<String>,
    /// Addresses the signature covers (TXT `addrs`); empty when unsigned.
    pub signed_addrs: Vec<IpAddr>,
    /// The signature (TXT `at` and `sig`); `None` when unsigned.
    pub signature: Option<Signed>,
}

/// Longest address list [`Announcement::to_txt`] carries in `key`: whole
/// addresses, in the given order, as long as `key=a,b,…` fits in
/// [`MAX_ENTRY_BYTES`].
fn fit_list(key: &str, addrs: &[IpAddr]) -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut len = key.len() + 1;
    for a in addrs {
        let add = a.to_string().len() + usize::from(!out.is_empty());
        if len + add > MAX_ENTRY_BYTES {
            break;
        }
        len += add;
        out.push(*a);
    }
    out
}

/// The part of `addrs` that fits in the TXT `addrs` entry (whole addresses,
/// in order). An agent signs this list, so that the signature covers exactly
/// what the record carries.
pub fn fit_addrs(addrs: &[IpAddr]) -> Vec<IpAddr> {
    fit_list("addrs", addrs)
}

fn join_addrs(addrs: &[IpAddr]) -> String {
    addrs
        .iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Parses a comma-separated address list; any bad element is an error.
fn parse_addr_list(key: &str, v: &str) -> Result<Vec<IpAddr>, String> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<IpAddr>()
                .map_err(|_| format!("TXT entry `{key}` holds {s:?}, which is not an IP address"))
        })
        .collect()
}

/// Cuts `s` so that `key=` + result fits in [`MAX_ENTRY_BYTES`], at a char
/// boundary, marking a cut with `…`.
fn fit(key: &str, s: &str) -> String {
    let room = MAX_ENTRY_BYTES - key.len() - 1;
    if s.len() <= room {
        return s.to_string();
    }
    let mut end = room - '…'.len_utf8();
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

impl Announcement {
    /// TXT entries as ordered `(key, value)` pairs, each within 255 bytes.
    pub fn to_txt(&self) -> Vec<(String, String)> {
        let mut out = vec![("txtvers".to_string(), TXT_VERSION.to_string())];
        let mut push = |k: &str, v: &str| out.push((k.to_string(), fit(k, v)));
        push("id", &self.id);
        push("name", &self.name);
        if let Some(h) = &self.hostname {
            push("host", h);
        }
        if let Some(c) = &self.cwd {
            push("cwd", c);
        }
        if let Some(v) = &self.version {
            push("ver", v);
        }
        if let Some(p) = self.pid {
            push("pid", &p.to_string());
        }
        push("auth", if self.auth { "1" } else { "0" });
        if !self.tailnet_addrs.is_empty() {
            // Keep whole addresses only: a cut address would be wrong, not short.
            push("ts", &join_addrs(&fit_list("ts", &self.tailnet_addrs)));
        }
        if let Some(d) = &self.magic_dns {
            push("dns", d);
        }
        if let Some(s) = &self.signature {
            // Cut exactly like `fit_addrs`, which `sign_with` signed.
            push("addrs", &join_addrs(&fit_addrs(&self.signed_addrs)));
            push("at", &s.at.to_string());
            push("sig", &s.sig);
        }
        out
    }

    /// Signs the announcement for SRV port `port` at time `at` (Unix
    /// seconds): `signed_addrs` becomes the part of `addrs` that fits in the
    /// record ([`fit_addrs`]) and `signature` the MAC over
    /// (`id`, `port`, that list, `at`).
    pub fn sign_with(&mut self, secret: &FleetSecret, port: u16, addrs: &[IpAddr], at: u64) {
        self.signed_addrs = fit_addrs(addrs);
        self.signature = Some(secret.signed(&self.id, port, &self.signed_addrs, at));
    }

    /// Parses TXT entries. Errors are sentences; a missing `id` or `name`, or
    /// an unknown `txtvers`, makes the record unusable.
    pub fn from_txt<'a>(
        entries: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, String> {
        let mut a = Announcement::default();
        let mut vers = None;
        let (mut at, mut sig) = (None, None);
        for (k, v) in entries {
            if k.len() + v.len() + 1 > MAX_ENTRY_BYTES {
                return Err(format!(
                    "TXT entry `{k}` is longer than {MAX_ENTRY_BYTES} bytes"
                ));
            }
            if v.chars().any(char::is_control) {
                return Err(format!("TXT entry `{k}` contains control characters"));
            }
            match k.to_ascii_lowercase().as_str() {
                "txtvers" => vers = Some(v.to_string()),
                "id" => a.id = v.to_string(),
                "name" => a.name = v.to_string(),
                "host" => a.hostname = Some(v.to_string()).filter(|s| !s.is_empty()),
                "cwd" => a.cwd = Some(v.to_string()).filter(|s| !s.is_empty()),
                "ver" => a.version = Some(v.to_string()).filter(|s| !s.is_empty()),
                "pid" => a.pid = v.parse().ok(),
                "auth" => a.auth = v == "1",
                "ts" => {
                    a.tailnet_addrs = v.split(',').filter_map(|s| s.trim().parse().ok()).collect();
                }
                "dns" => a.magic_dns = Some(v.to_string()).filter(|s| !s.is_empty()),
                "addrs" => a.signed_addrs = parse_addr_list("addrs", v)?,
                "at" => {
                    at = Some(v.trim().parse::<u64>().map_err(|_| {
                        "TXT entry `at` is not a whole number of seconds".to_string()
                    })?);
                }
                "sig" => {
                    if v.len() != SIG_HEX_LEN || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(format!("TXT entry `sig` is not {SIG_HEX_LEN} hex digits"));
                    }
                    sig = Some(v.to_ascii_lowercase());
                }
                _ => {}
            }
        }
        match vers.as_deref() {
            Some(TXT_VERSION) => {}
            Some(other) => {
                return Err(format!(
                    "unsupported txtvers {other:?} (this build reads {TXT_VERSION})"
                ));
            }
            None => return Err("no txtvers entry; not an opencode-agent advertisement".into()),
        }
        if a.id.is_empty()
            || !a
                .id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
        {
            return Err("missing or malformed `id`".into());
        }
        if a.name.trim().is_empty() {
            return Err("missing `name`".into());
        }
        a.signature = match (at, sig) {
            (Some(at), Some(sig)) => Some(Signed { at, sig }),
            (None, None) => None,
            (Some(_), None) => return Err("TXT entry `at` without `sig`".into()),
            (None, Some(_)) => return Err("TXT entry `sig` without `at`".into()),
        };
        if a.signature.is_none() {
            // Unsigned: addresses nobody vouches for mean nothing.
            a.signed_addrs.clear();
        }
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Announcement {
        Announcement {
            id: "a1b2c3d4".into(),
            name: "box-proj".into(),
            hostname: Some("box".into()),
            cwd: Some("/home/u/proj".into()),
            version: Some("1.18.33".into()),
            pid: Some(4242),
            auth: true,
            tailnet_addrs: vec![
                "100.101.102.103".parse().unwrap(),
                "fd7a:115c:a1e0::1".parse().unwrap(),
            ],
            magic_dns: Some("box.tail1234.ts.net".into()),
            ..Announcement::default()
        }
    }

    fn secret() -> FleetSecret {
        FleetSecret::from_text(&"ab".repeat(32)).unwrap()
    }

    #[test]
    fn signed_records_round_trip_and_verify() {
        let mut a = sample();
        let addrs: Vec<IpAddr> = vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()];
        a.sign_with(&secret(), 4242, &addrs, 1_700_000_000);
        let txt = a.to_txt();
        let keys: Vec<&str> = txt.iter().map(|(k, _)| k.as_str()).collect();
        assert!(keys.ends_with(&["addrs", "at", "sig"]), "{keys:?}");
        let back =
            Announcement::from_txt(txt.iter().map(|(k, v)| (k.as_str(), v.as_str()))).unwrap();
        assert_eq!(back, a);
        let s = back.signature.as_ref().unwrap();
        assert!(
            s.verify(&secret(), &back.id, 4242, &back.signed_addrs)
                .is_ok()
        );
        assert!(
            s.verify(&secret(), &back.id, 4243, &back.signed_addrs)
                .is_err()
        );
    }

    #[test]
    fn long_address_lists_are_cut_at_whole_addresses_and_the_signature_covers_the_cut() {
        let mut a = sample();
        let many: Vec<IpAddr> = (0..40)
            .map(|i| format!("fd7a:115c:a1e0::{i:x}").parse().unwrap())
            .collect();
        a.sign_with(&secret(), 1, &many, 5);
        assert!(a.signed_addrs.len() < many.len());
        for (k, v) in a.to_txt() {
            assert!(k.len() + 1 + v.len() <= MAX_ENTRY_BYTES, "{k} too long");
        }
        let txt = a.to_txt();
        let back =
            Announcement::from_txt(txt.iter().map(|(k, v)| (k.as_str(), v.as_str()))).unwrap();
        assert_eq!(back.signed_addrs, a.signed_addrs);
        let s = back.signature.unwrap();
        assert!(s.verify(&secret(), &a.id, 1, &back.signed_addrs).is_ok());
    }

    #[test]
    fn malformed_signature_entries_make_the_record_unusable() {
        let base = [("txtvers", "1"), ("id", "x"), ("name", "n")];
        let sig = "a".repeat(64);
        let with = |extra: &[(&'static str, &str)]| {
            let mut v: Vec<(&str, &str)> = base.to_vec();
            v.extend_from_slice(extra);
            v.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        };
        let parse = |e: Vec<(String, String)>| {
            Announcement::from_txt(e.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        };
        assert!(parse(with(&[("at", "1"), ("sig", &sig), ("addrs", "10.0.0.1")])).is_ok());
        assert!(parse(with(&[("at", "x"), ("sig", &sig)])).is_err());
        assert!(parse(with(&[("at", "1"), ("sig", "zz")])).is_err());
        assert!(parse(with(&[("at", "1")])).is_err());
        assert!(parse(with(&[("sig", &sig)])).is_err());
        assert!(
            parse(with(&[
                ("at", "1"),
                ("sig", &sig),
                ("addrs", "10.0.0.1,nope")
            ]))
            .is_err()
        );
        // Addresses without a signature are dropped: the record is unsigned.
        let a = parse(with(&[("addrs", "10.0.0.1")])).unwrap();
        assert!(a.signature.is_none() && a.signed_addrs.is_empty());
    }

    #[test]
    fn txt_round_trips_with_txtvers_first() {
        let a = sample();
        let txt = a.to_txt();
        assert_eq!(txt[0], ("txtvers".into(), "1".into()));
        let back =
            Announcement::from_txt(txt.iter().map(|(k, v)| (k.as_str(), v.as_str()))).unwrap();
        assert_eq!(back, a);
    }

    #[test]
    fn long_values_are_cut_at_a_char_boundary_within_255_bytes() {
        let mut a = sample();
        a.cwd = Some(format!("/home/{}", "é".repeat(300)));
        for (k, v) in a.to_txt() {
            assert!(k.len() + 1 + v.len() <= MAX_ENTRY_BYTES, "{k} too long");
        }
        let cwd = a.to_txt().into_iter().find(|(k, _)| k == "cwd").unwrap().1;
        assert!(cwd.ends_with('…'));
    }

    #[test]
    fn records_without_version_or_id_are_refused() {
        assert!(Announcement::from_txt([("id", "x"), ("name", "n")]).is_err());
        assert!(Announcement::from_txt([("txtvers", "2"), ("id", "x"), ("name", "n")]).is_err());
        assert!(Announcement::from_txt([("txtvers", "1"), ("name", "n")]).is_err());
        assert!(Announcement::from_txt([("txtvers", "1"), ("id", "a b"), ("name", "n")]).is_err());
    }
}
