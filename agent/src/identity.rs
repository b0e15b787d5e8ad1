//! Who this agent is: the random instance id, the machine's hostname, the
//! default instance name, the mDNS names derived from them, random numbers for
//! port picks and jitter, and ISO-8601 timestamps.
//!
//! Everything here is pure or reads only local facts (hostname, clock, the
//! kernel's random source); it must not touch the network or the filesystem
//! beyond that.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::Read;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

/// Longest DNS label (an mDNS instance name or host label), in bytes.
pub const MAX_LABEL_BYTES: usize = 63;
/// How many hex digits of the id are appended to mDNS names.
pub const SHORT_ID_LEN: usize = 6;

/// A random 64-bit number from the kernel (`/dev/urandom`); if that cannot be
/// read, from std's per-process random hash keys mixed with the clock and pid.
pub fn random_u64() -> u64 {
    let mut buf = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .is_ok()
    {
        return u64::from_ne_bytes(buf);
    }
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// A uniformly-ish distributed number in `low..=high` (`low <= high`).
pub fn random_in(low: u16, high: u16) -> u16 {
    let span = u64::from(high.saturating_sub(low)) + 1;
    low + (random_u64() % span) as u16
}

/// A fresh instance id: 16 lowercase hex digits, unique per agent process.
pub fn new_instance_id() -> String {
    format!("{:016x}", random_u64())
}

/// The machine's hostname as `hostname` prints it, or `localhost`.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for `buf.len()` bytes; gethostname writes at
    // most that many and we stop at the first NUL (or the end).
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc == 0 {
        let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
        let name = String::from_utf8_lossy(&buf[..end]).trim().to_string();
        if !name.is_empty() {
            return name;
        }
    }
    "localhost".to_string()
}

/// The default instance name, `$(hostname)-$(basename $PWD)`, or just the
/// hostname when the directory has no final component (`/`).
pub fn default_name(hostname: &str, cwd: &Path) -> String {
    match cwd.file_name().map(|n| n.to_string_lossy()) {
        Some(base) if !base.is_empty() => format!("{hostname}-{base}"),
        _ => hostname.to_string(),
    }
}

/// Cuts `s` to at most `max` bytes at a char boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The mDNS instance name: `<name>-<first 6 of id>`, at most 63 bytes. Unique
/// by construction (the id is random), which is what lets the agent skip
/// name probing. Control characters become spaces.
pub fn mdns_instance_name(name: &str, id: &str) -> String {
    let short = cut(id, SHORT_ID_LEN);
    let clean: String = name
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let room = MAX_LABEL_BYTES - short.len() - 1;
    format!("{}-{short}", cut(clean.trim(), room))
}

/// The mDNS host name of this agent's SRV record:
/// `<hostname label>-<first 6 of id>.local.`, lowercase letters, digits and
/// `-` only. Unique per agent, so two agents on one machine never contend for
/// one host name (and its A/AAAA records).
pub fn mdns_host_name(hostname: &str, id: &str) -> String {
    let short = cut(id, SHORT_ID_LEN);
    let first = hostname.split('.').next().unwrap_or_default();
    let mut label: String = first
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    label.truncate(MAX_LABEL_BYTES - short.len() - 1);
    let label = label.trim_matches('-');
    let label = if label.is_empty() { "opencode" } else { label };
    format!("{label}-{short}.local.")
}

/// `t` as ISO 8601 in UTC with second precision, e.g. `2026-03-14T10:30:00Z`.
pub fn iso8601_utc(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn ids_are_16_hex_digits_and_distinct() {
        let a = new_instance_id();
        let b = new_instance_id();
        assert_eq!(a.len(), 16);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(a, b);
    }

    #[test]
    fn random_in_stays_in_range() {
        for _ in 0..2000 {
            let p = random_in(4096, 5095);
            assert!((4096..=5095).contains(&p));
        }
        assert_eq!(random_in(7, 7), 7);
    }

    #[test]
    fn default_name_is_host_dash_basename() {
        assert_eq!(default_name("box", Path::new("/home/u/proj")), "box-proj");
        assert_eq!(default_name("box", Path::new("/")), "box");
    }

    #[test]
    fn mdns_names_are_unique_by_id_and_fit_a_label() {
        let id = "0123456789abcdef";
        assert_eq!(mdns_instance_name("box-proj", id), "box-proj-012345");
        let long = mdns_instance_name(&"é".repeat(100), id);
        assert!(long.len() <= MAX_LABEL_BYTES);
        assert!(long.ends_with("-012345"));
        assert_eq!(mdns_instance_name("a\u{7}b", id), "a b-012345");
        assert_eq!(mdns_host_name("Box.lan", id), "box-012345.local.");
        assert_eq!(mdns_host_name("my_box", id), "my-box-012345.local.");
        assert_eq!(mdns_host_name("__", id), "opencode-012345.local.");
        assert!(mdns_host_name(&"h".repeat(300), id).len() <= MAX_LABEL_BYTES + 7);
    }

    #[test]
    fn timestamps_are_iso8601_utc() {
        assert_eq!(iso8601_utc(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_773_484_200); // 2026-03-14T10:30:00Z
        assert_eq!(iso8601_utc(t), "2026-03-14T10:30:00Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(iso8601_utc(leap), "2000-02-29T00:00:00Z");
    }
}
