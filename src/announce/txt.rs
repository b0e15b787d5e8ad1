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
//!
//! Every `key=value` entry is at most 255 bytes. Unknown keys are ignored by
//! the parser, so later versions may add keys without bumping `txtvers`.

use std::net::IpAddr;

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
            let mut list = String::new();
            for a in &self.tailnet_addrs {
                let next = if list.is_empty() {
                    a.to_string()
                } else {
                    format!("{list},{a}")
                };
                if next.len() + 3 > MAX_ENTRY_BYTES {
                    break;
                }
                list = next;
            }
            push("ts", &list);
        }
        if let Some(d) = &self.magic_dns {
            push("dns", d);
        }
        out
    }

    /// Parses TXT entries. Errors are sentences; a missing `id` or `name`, or
    /// an unknown `txtvers`, makes the record unusable.
    pub fn from_txt<'a>(
        entries: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, String> {
        let mut a = Announcement::default();
        let mut vers = None;
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
        }
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
