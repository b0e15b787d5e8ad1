//! Wire formats shared by the server and the agent: the relay registration
//! file (here) and the DNS-SD TXT record ([`txt`]). Nothing else in either
//! binary builds or parses these bytes, so the two sides cannot drift apart.
//!
//! Parsing is strict about what matters (a usable port, sane text) and lenient
//! about the rest (unknown fields are ignored, `port` may be a number or a
//! numeric string), because the seed's bash script wrote these files by hand.
//!
//! # Signed registrations
//!
//! Three optional fields carry an agent's signature: `at` (number, Unix
//! seconds), `sig` (64 hex digits) and `addrs` (array of IP address
//! strings). The signature is [`crate::secret::FleetSecret::sign`] over
//! (`id`, `port`, `addrs`, `at`), where `port` is the file's `port` (what the
//! reader connects to) and `addrs` is `["127.0.0.1"]` for a relay file (the
//! tunnel's end, or the machine itself). A file without `sig` is unsigned
//! (what `opencode-connected` writes); a malformed or partial signature makes
//! the file unusable, with a reason.

pub mod txt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Longest accepted instance name, in bytes.
pub const MAX_NAME_BYTES: usize = 256;
/// Longest accepted hostname, in bytes.
pub const MAX_HOSTNAME_BYTES: usize = 255;
/// Longest accepted cwd, in bytes.
pub const MAX_CWD_BYTES: usize = 4096;
/// Longest accepted instance id, in bytes.
pub const MAX_ID_BYTES: usize = 128;

/// One relay registration file, as written by `opencode-connected` and
/// `opencode-agent`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Registration {
    /// Instance name that users match against.
    pub name: String,
    /// Machine OpenCode runs on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Port on the relay machine (the tunnel's end) where OpenCode answers.
    pub port: u16,
    /// Port OpenCode listens on at its own machine.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local_port: Option<u16>,
    /// Working directory of OpenCode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// When the instance registered (ISO 8601, UTC).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connected_at: Option<String>,
    /// Stable unique instance id (newer writers only); the registry key when present.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// PID of OpenCode on its machine (newer writers only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// When the agent signed, Unix seconds (signed files only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at: Option<u64>,
    /// The signature, 64 hex digits (signed files only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sig: Option<String>,
    /// Addresses the signature covers; `["127.0.0.1"]` for relay files.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub addrs: Vec<std::net::IpAddr>,
}

/// The addresses a relay registration signs: the reader connects to the
/// tunnel's end (or the machine itself) on loopback.
pub fn relay_signed_addrs() -> Vec<std::net::IpAddr> {
    vec![std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)]
}

impl Registration {
    /// Serialises the registration as a single JSON document.
    pub fn to_json(&self) -> String {
        // Serialising plain strings and integers cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The signature, when the file carries one.
    pub fn signature(&self) -> Option<crate::secret::Signed> {
        Some(crate::secret::Signed {
            at: self.at?,
            sig: self.sig.clone()?,
        })
    }

    /// Signs the registration (which must have an `id`) at `at`: `addrs`
    /// becomes [`relay_signed_addrs`] and `at`/`sig` the signature over
    /// (`id`, `port`, addrs, `at`). Without an id nothing is signed.
    pub fn sign_with(&mut self, secret: &crate::secret::FleetSecret, at: u64) {
        let Some(id) = &self.id else {
            return;
        };
        self.addrs = relay_signed_addrs();
        self.at = Some(at);
        self.sig = Some(secret.sign(id, self.port, &self.addrs, at));
    }
}

/// Longest file stem produced by [`registration_file_name`], in bytes
/// (file names are limited to 255 bytes; leave room for `.`, `.tmp`, `.json`).
pub const MAX_FILE_STEM_BYTES: usize = 200;

/// The registration file name an agent uses: `<name>-<id>.json`.
///
/// Every character outside `A-Z a-z 0-9 . _ -` becomes `_`, a leading `.`
/// becomes `_` (the file must not be hidden: writers use hidden temp files),
/// and the stem is cut to [`MAX_FILE_STEM_BYTES`] keeping the id whole, so the
/// result is safe in a path and inside single quotes in a shell command.
pub fn registration_file_name(name: &str, id: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "._-".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    let id = clean(id);
    let mut name = clean(name);
    let room = MAX_FILE_STEM_BYTES.saturating_sub(id.len() + 1);
    name.truncate(room); // ASCII only by now, so any index is a char boundary
    let mut stem = format!("{name}-{id}");
    if stem.starts_with('.') {
        stem.replace_range(..1, "_");
    }
    format!("{stem}.json")
}

/// Writes `reg` as `dir/file_name` atomically: a temp file `.<file_name>.tmp`
/// in the same directory (created with mode 0600, never through a symlink) is
/// written, synced and renamed over the target, so readers see the old file or
/// the new one, never half of one. `dir` is created (mode 0700) if missing.
/// Returns the final path.
#[cfg(unix)]
pub fn write_registration(
    dir: &std::path::Path,
    file_name: &str,
    reg: &Registration,
) -> std::io::Result<std::path::PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};

    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let target = dir.join(file_name);
    let tmp = dir.join(format!(".{file_name}.tmp"));
    let open = || {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
    };
    let mut file = match open() {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            // A leftover of an interrupted write by this same writer.
            std::fs::remove_file(&tmp)?;
            open()?
        }
        other => other?,
    };
    let written = file
        .write_all(reg.to_json().as_bytes())
        .and_then(|()| file.write_all(b"\n"))
        .and_then(|()| file.sync_all());
    drop(file);
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, &target)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(target)
}

/// Removes a registration written by [`write_registration`] (and its temp
/// file, if an interrupted write left one). A file that is already gone is
/// not an error.
pub fn remove_registration(dir: &std::path::Path, file_name: &str) -> std::io::Result<()> {
    let _ = std::fs::remove_file(dir.join(format!(".{file_name}.tmp")));
    match std::fs::remove_file(dir.join(file_name)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Loose shape used while parsing: every field optional, any JSON type.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRegistration {
    name: Option<Value>,
    hostname: Option<Value>,
    port: Option<Value>,
    local_port: Option<Value>,
    cwd: Option<Value>,
    connected_at: Option<Value>,
    id: Option<Value>,
    pid: Option<Value>,
    at: Option<Value>,
    sig: Option<Value>,
    addrs: Option<Value>,
}

/// Most addresses accepted in a registration's `addrs`.
pub const MAX_SIGNED_ADDRS: usize = 64;

/// Parses a registration file. `fallback_name` (the file stem) is used when
/// the file has no `name`. The error is a sentence for the user.
pub fn parse_registration(bytes: &[u8], fallback_name: &str) -> Result<Registration, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        format!(
            "not UTF-8 (invalid byte at offset {}); registration files are JSON text",
            e.valid_up_to()
        )
    })?;
    if text.trim().is_empty() {
        return Err("empty file (a writer may still be writing it; use write-then-rename)".into());
    }
    let raw: RawRegistration = match serde_json::from_str::<Value>(text) {
        Ok(v @ Value::Object(_)) => {
            serde_json::from_value(v).map_err(|e| format!("unexpected JSON shape: {e}"))?
        }
        Ok(_) => return Err("JSON is not an object".into()),
        Err(e) if e.is_eof() => {
            return Err(format!(
                "JSON ends early at line {} (half-written? writers should write a temp file and rename it)",
                e.line()
            ));
        }
        Err(e) => return Err(format!("invalid JSON: {e}")),
    };

    let port = match raw.port {
        Some(v) => port_value(&v).ok_or_else(|| {
            format!("`port` must be a number 1-65535 (or such a number as a string), got {v}")
        })?,
        None => return Err("missing `port`".into()),
    };
    let local_port = match raw.local_port {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            port_value(&v).ok_or_else(|| format!("`localPort` must be a port number, got {v}"))?,
        ),
    };
    let name = match raw.name {
        None | Some(Value::Null) => clean_text("file name", fallback_name, MAX_NAME_BYTES)?,
        Some(v) => clean_text("name", &string_value("name", &v)?, MAX_NAME_BYTES)?,
    };
    if name.trim().is_empty() {
        return Err("`name` is empty".into());
    }
    let opt = |field: &str, v: Option<Value>, max: usize| -> Result<Option<String>, String> {
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(v) => Ok(Some(clean_text(field, &string_value(field, &v)?, max)?)),
        }
    };
    let pid = match raw.pid {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .and_then(|p| u32::try_from(p).ok())
                .ok_or_else(|| format!("`pid` must be a positive integer, got {v}"))?,
        ),
    };
    let id = opt("id", raw.id, MAX_ID_BYTES)?;
    if let Some(id) = &id
        && (id.is_empty()
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c)))
    {
        return Err("`id` may only contain letters, digits and - _ . :".into());
    }
    let at = match raw.at {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .ok_or_else(|| format!("`at` must be Unix seconds (a whole number), got {v}"))?,
        ),
    };
    let sig = match raw.sig {
        None | Some(Value::Null) => None,
        Some(Value::String(s))
            if s.len() == crate::secret::SIG_HEX_LEN
                && s.bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            Some(s.to_ascii_lowercase())
        }
        Some(_) => {
            return Err(format!(
                "`sig` must be a string of {} hex digits",
                crate::secret::SIG_HEX_LEN
            ));
        }
    };
    let addrs = match raw.addrs {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) if items.len() <= MAX_SIGNED_ADDRS => items
            .iter()
            .map(|v| {
                v.as_str()
                    .and_then(|s| s.trim().parse().ok())
                    .ok_or_else(|| format!("`addrs` must hold IP address strings, got {v}"))
            })
            .collect::<Result<Vec<_>, String>>()?,
        Some(_) => {
            return Err(format!(
                "`addrs` must be an array of at most {MAX_SIGNED_ADDRS} IP address strings"
            ));
        }
    };
    match (&at, &sig) {
        (Some(_), None) => return Err("`at` without `sig`: a partial signature".into()),
        (None, Some(_)) => return Err("`sig` without `at`: a partial signature".into()),
        (Some(_), Some(_)) if id.is_none() => {
            return Err("signed (`sig`) but without an `id`, which the signature covers".into());
        }
        _ => {}
    }
    Ok(Registration {
        name,
        hostname: opt("hostname", raw.hostname, MAX_HOSTNAME_BYTES)?,
        port,
        local_port,
        cwd: opt("cwd", raw.cwd, MAX_CWD_BYTES)?,
        connected_at: opt("connectedAt", raw.connected_at, 64)?,
        id,
        pid,
        at,
        sig,
        addrs,
    })
}

fn port_value(v: &Value) -> Option<u16> {
    let n = match v {
        Value::Number(n) => n.as_u64()?,
        Value::String(s) => s.trim().parse::<u64>().ok()?,
        _ => return None,
    };
    u16::try_from(n).ok().filter(|p| *p != 0)
}

fn string_value(field: &str, v: &Value) -> Result<String, String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        other => Err(format!("`{field}` must be a string, got {other}")),
    }
}

fn clean_text(field: &str, s: &str, max: usize) -> Result<String, String> {
    if s.len() > max {
        return Err(format!("`{field}` is longer than {max} bytes"));
    }
    if s.chars().any(char::is_control) {
        return Err(format!("`{field}` contains control characters"));
    }
    Ok(s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_format_parses_with_numeric_or_string_port() {
        let r = parse_registration(
            br#"{"name":"laptop-proj","hostname":"laptop","port":10042,"localPort":4823,
                 "cwd":"/home/u/proj","connectedAt":"2026-03-14T10:30:00Z","extra":[1,2]}"#,
            "x",
        )
        .unwrap();
        assert_eq!(r.name, "laptop-proj");
        assert_eq!(r.port, 10042);
        assert_eq!(r.local_port, Some(4823));
        let r = parse_registration(br#"{"name":"a","port":"4811"}"#, "x").unwrap();
        assert_eq!(r.port, 4811);
    }

    #[test]
    fn missing_name_falls_back_to_the_file_stem() {
        let r = parse_registration(br#"{"port":4811}"#, "stem").unwrap();
        assert_eq!(r.name, "stem");
    }

    #[test]
    fn bad_files_are_rejected_with_a_reason() {
        let cases: &[(&[u8], &str)] = &[
            (b"", "empty"),
            (b"{\"name\":\"a\",\"po", "half-written"),
            (b"[1,2]", "not an object"),
            (b"{\"name\":\"a\"}", "missing `port`"),
            (b"{\"name\":\"a\",\"port\":0}", "port"),
            (b"{\"name\":\"a\",\"port\":70000}", "port"),
            (b"{\"name\":\"a\",\"port\":\"http\"}", "port"),
            (b"{\"name\":\"a\\u0007b\",\"port\":1}", "control"),
            (b"{\"name\":{},\"port\":1}", "string"),
            (b"\xff\xfe{}", "UTF-8"),
            (b"{\"name\":\"a\",\"port\":1,\"id\":\"../x y\"}", "`id`"),
        ];
        for (bytes, want) in cases {
            let err = parse_registration(bytes, "f").unwrap_err();
            assert!(
                err.contains(want),
                "{:?}: {err}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn file_names_are_safe_and_keep_the_id() {
        assert_eq!(
            registration_file_name("box-proj", "a1b2"),
            "box-proj-a1b2.json"
        );
        assert_eq!(
            registration_file_name("../we ird/\"x\"", "a1b2"),
            "_._we_ird__x_-a1b2.json"
        );
        assert_eq!(registration_file_name("é", "id"), "_-id.json");
        let long = registration_file_name(&"n".repeat(1000), "0123456789abcdef");
        assert!(long.len() <= MAX_FILE_STEM_BYTES + ".json".len());
        assert!(long.ends_with("-0123456789abcdef.json"));
    }

    #[cfg(unix)]
    #[test]
    fn registrations_are_written_atomically_private_and_removed() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("relay");
        let reg = Registration {
            name: "n".into(),
            hostname: None,
            port: 4100,
            local_port: Some(4100),
            cwd: None,
            connected_at: None,
            id: Some("abc".into()),
            pid: None,
            ..Registration::default()
        };
        // A stale temp file from an interrupted write does not block the next one.
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join(".n-abc.json.tmp"), "{").unwrap();
        let path = write_registration(&dir, "n-abc.json", &reg).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let back = parse_registration(&std::fs::read(&path).unwrap(), "x").unwrap();
        assert_eq!(back, reg);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["n-abc.json".to_string()]);
        remove_registration(&dir, "n-abc.json").unwrap();
        assert!(!path.exists());
        remove_registration(&dir, "n-abc.json").unwrap();
        // A new directory is private.
        let fresh = tmp.path().join("a/b");
        write_registration(&fresh, "n-abc.json", &reg).unwrap();
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn rendering_round_trips_and_escapes() {
        let r = Registration {
            name: "we\"ird \\ name".into(),
            hostname: Some("h".into()),
            port: 10001,
            local_port: Some(4100),
            cwd: Some("/tmp/a \"b\"".into()),
            connected_at: Some("2026-01-01T00:00:00Z".into()),
            id: Some("abc123".into()),
            pid: Some(42),
            ..Registration::default()
        };
        let back = parse_registration(r.to_json().as_bytes(), "x").unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn signed_registrations_round_trip_and_bad_signatures_are_reasons() {
        let secret = crate::secret::FleetSecret::from_text(&"cd".repeat(32)).unwrap();
        let mut r = Registration {
            name: "n".into(),
            port: 10001,
            id: Some("abc123".into()),
            ..Registration::default()
        };
        r.sign_with(&secret, 1_700_000_000);
        let back = parse_registration(r.to_json().as_bytes(), "x").unwrap();
        assert_eq!(back, r);
        let s = back.signature().unwrap();
        assert!(s.verify(&secret, "abc123", 10001, &back.addrs).is_ok());
        let sig = "a".repeat(64);
        let cases: Vec<(String, &str)> = vec![
            (
                format!(r#"{{"id":"i","port":1,"at":"x","sig":"{sig}"}}"#),
                "`at`",
            ),
            (r#"{"id":"i","port":1,"at":1,"sig":"zz"}"#.into(), "`sig`"),
            (r#"{"id":"i","port":1,"at":1}"#.into(), "partial"),
            (format!(r#"{{"id":"i","port":1,"sig":"{sig}"}}"#), "partial"),
            (format!(r#"{{"port":1,"at":1,"sig":"{sig}"}}"#), "`id`"),
            (
                format!(r#"{{"id":"i","port":1,"at":1,"sig":"{sig}","addrs":["nope"]}}"#),
                "`addrs`",
            ),
            (
                format!(r#"{{"id":"i","port":1,"at":1,"sig":"{sig}","addrs":"127.0.0.1"}}"#),
                "`addrs`",
            ),
        ];
        for (text, want) in cases {
            let err = parse_registration(text.as_bytes(), "f").unwrap_err();
            assert!(err.contains(want), "{text}: {err}");
            assert!(!err.contains(&sig), "the signature is not echoed: {err}");
        }
        // Unsigned files (opencode-connected) still parse.
        let plain = parse_registration(br#"{"name":"a","port":4811}"#, "x").unwrap();
        assert!(plain.signature().is_none());
    }
}
