//! The fleet secret: one random key shared by every machine of one user, and
//! what is derived from it with HMAC-SHA256: each OpenCode instance's
//! password ([`FleetSecret::instance_password`]) and the signatures on what
//! agents announce ([`FleetSecret::sign`], [`FleetSecret::verify`]).
//!
//! Where the secret comes from: `OPENCODE_MCP_SECRET`, else the file at
//! [`FleetSecret::default_path`] (`$XDG_CONFIG_HOME/opencode-mcp/secret`, else
//! `~/.config/opencode-mcp/secret`), which must not be accessible by group or
//! others. `opencode-agent secret init` creates it; `secret import` copies it.
//!
//! This module owns the secret's text form, its file and every byte string
//! that is signed. It does no I/O beyond that one file and decides nothing
//! about trust: callers verify, then apply their own policy (freshness of
//! `at`, which addresses to contact). It must never put the secret, a derived
//! password or a MAC over chosen data into a message, a log line or `Debug`
//! output; errors name files and say what to do, nothing more.

use std::fmt;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::error::{Error, Result};

/// Environment variable holding the fleet secret; it wins over the file.
pub const SECRET_ENV: &str = "OPENCODE_MCP_SECRET";
/// Length of a generated secret, in bytes.
pub const GENERATED_BYTES: usize = 32;
/// Shortest secret text accepted as raw bytes, in characters.
pub const MIN_TEXT_CHARS: usize = 16;
/// Longest secret text accepted, in bytes (and the most read from a file).
pub const MAX_TEXT_BYTES: usize = 1024;
/// Length of an announcement signature in hex digits (HMAC-SHA256).
pub const SIG_HEX_LEN: usize = 64;
/// Length of a derived instance password in hex digits (128 bits).
pub const PASSWORD_HEX_LEN: usize = 32;

/// Domain-separation prefix of instance passwords.
const PASSWORD_DOMAIN: &[u8] = b"opencode-mcp/v1/password\0";
/// Domain-separation prefix of announcement signatures.
const ANNOUNCE_DOMAIN: &[u8] = b"opencode-mcp/v1/announce\0";
/// Domain-separation prefix of secret equality checks.
const EQ_DOMAIN: &[u8] = b"opencode-mcp/v1/eq\0";

type HmacSha256 = Hmac<Sha256>;

/// The fleet secret. `Debug` prints `FleetSecret(<redacted>)`; there is no
/// `Display`, and equality is decided in constant time. The bytes are
/// overwritten when the value is dropped.
#[derive(Clone)]
pub struct FleetSecret {
    /// The key: 32 random bytes, or the UTF-8 bytes of a user-chosen text.
    bytes: Vec<u8>,
}

/// A signature on an announcement, as carried in TXT records and
/// registration files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// When the agent signed, in seconds since the Unix epoch.
    pub at: u64,
    /// HMAC-SHA256 over the canonical announcement bytes, 64 lowercase hex digits.
    pub sig: String,
}

/// Why [`FleetSecret::verify`] refused a signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// Well-formed, but not made with this secret over these values: the
    /// announcement was signed with another fleet secret, or altered.
    #[error(
        "the signature does not match: the announcement was signed with another fleet secret or altered in transit"
    )]
    BadSignature,
    /// Not a signature at all (wrong length or not hex).
    #[error("malformed signature: expected {SIG_HEX_LEN} hex digits, got {len} characters")]
    Malformed {
        /// Length of what was given, in bytes.
        len: usize,
    },
}

impl fmt::Debug for FleetSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FleetSecret(<redacted>)")
    }
}

impl PartialEq for FleetSecret {
    /// Constant-time: compares MACs of a fixed string keyed by each secret
    /// with [`Mac::verify_slice`], never the bytes themselves.
    fn eq(&self, other: &Self) -> bool {
        let theirs = other.mac(&[EQ_DOMAIN]);
        self.hasher(&[EQ_DOMAIN]).verify_slice(&theirs).is_ok()
    }
}

impl Eq for FleetSecret {}

impl Drop for FleetSecret {
    fn drop(&mut self) {
        self.bytes.fill(0);
        std::hint::black_box(&self.bytes);
    }
}

impl FleetSecret {
    /// Reads the secret's text form, surrounding whitespace ignored:
    ///
    /// - exactly 64 hex digits (either case): the 32 bytes they encode, which
    ///   is what [`generate`](Self::generate) makes and
    ///   [`to_export_string`](Self::to_export_string) prints;
    /// - any other text of at least 16 characters (and at most 1024 bytes,
    ///   without control characters): its UTF-8 bytes, used as they are.
    ///   A passphrase works, but a generated secret is far stronger.
    pub fn from_text(text: &str) -> Result<FleetSecret> {
        let t = text.trim();
        if t.len() == SIG_HEX_LEN
            && let Some(bytes) = hex_decode(t)
        {
            return Ok(FleetSecret { bytes });
        }
        if t.len() > MAX_TEXT_BYTES {
            return Err(Error::Secret(format!(
                "the secret is longer than {MAX_TEXT_BYTES} bytes; use the 64 hex digits printed by `opencode-agent secret init`"
            )));
        }
        if t.chars().any(char::is_control) {
            return Err(Error::Secret(
                "the secret contains control characters; use the 64 hex digits printed by `opencode-agent secret init`".into(),
            ));
        }
        if t.chars().count() < MIN_TEXT_CHARS {
            return Err(Error::Secret(format!(
                "the secret is shorter than {MIN_TEXT_CHARS} characters; run `opencode-agent secret init` to make a strong one"
            )));
        }
        Ok(FleetSecret {
            bytes: t.as_bytes().to_vec(),
        })
    }

    /// A new secret of 32 bytes from the operating system's random source.
    pub fn generate() -> Result<FleetSecret> {
        let mut bytes = vec![0u8; GENERATED_BYTES];
        getrandom::fill(&mut bytes).map_err(|e| {
            Error::Secret(format!(
                "the operating system gave no random bytes ({e}); try again"
            ))
        })?;
        Ok(FleetSecret { bytes })
    }

    /// The text to copy to other machines, which [`from_text`](Self::from_text)
    /// reads back to the same secret: 64 lowercase hex digits for a 32-byte
    /// secret, else the passphrase it was made from. It *is* the secret: show
    /// it only to the user who asked for it, never in logs or errors.
    pub fn to_export_string(&self) -> String {
        if self.bytes.len() == GENERATED_BYTES {
            hex(&self.bytes)
        } else {
            // Only `from_text` makes other lengths, from a `&str`.
            String::from_utf8_lossy(&self.bytes).into_owned()
        }
    }

    /// Where the secret file lives by default:
    /// `$XDG_CONFIG_HOME/opencode-mcp/secret` when XDG_CONFIG_HOME is an
    /// absolute path, else `$HOME/.config/opencode-mcp/secret`.
    pub fn default_path() -> Result<PathBuf> {
        default_path_from(
            std::env::var_os("XDG_CONFIG_HOME").as_deref(),
            std::env::var_os("HOME").as_deref(),
        )
        .ok_or_else(|| {
            Error::Secret(format!(
                "neither XDG_CONFIG_HOME nor HOME is set, so there is no default secret file; set {SECRET_ENV} or name the file explicitly"
            ))
        })
    }

    /// Finds the secret: `env_value` (the value of `OPENCODE_MCP_SECRET`;
    /// blank counts as unset) wins, else `file` if it exists. `Ok(None)` when
    /// there is neither. A file that group or others may access (any of the
    /// mode bits 077), that is not a regular file, or that is larger than
    /// 1024 bytes is refused with what to do about it.
    pub fn load(env_value: Option<&str>, file: &Path) -> Result<Option<FleetSecret>> {
        if let Some(v) = env_value.filter(|v| !v.trim().is_empty()) {
            return FleetSecret::from_text(v)
                .map(Some)
                .map_err(|e| Error::Secret(format!("{SECRET_ENV}: {}", inner_message(e))));
        }
        let mut f = match std::fs::File::open(file) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(io_err("reading the fleet secret", file, source)),
        };
        // Checked on the open file, so a swap after the check cannot matter.
        let meta = f
            .metadata()
            .map_err(|source| io_err("reading the fleet secret", file, source))?;
        if !meta.is_file() {
            return Err(Error::Secret(format!(
                "{} is not a regular file; remove it and run `opencode-agent secret init` or `opencode-agent secret import`",
                file.display()
            )));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(Error::Secret(format!(
                    "{} is accessible by other users (mode {mode:04o}); run `chmod 600 {}`",
                    file.display(),
                    shell_word(&file.display().to_string())
                )));
            }
        }
        let mut text = String::new();
        (&mut f)
            .take(MAX_TEXT_BYTES as u64 + 2)
            .read_to_string(&mut text)
            .map_err(|source| {
                if source.kind() == std::io::ErrorKind::InvalidData {
                    Error::Secret(format!(
                        "{} is not UTF-8 text; it should hold the 64 hex digits printed by `opencode-agent secret init`",
                        file.display()
                    ))
                } else {
                    io_err("reading the fleet secret", file, source)
                }
            })?;
        if text.len() > MAX_TEXT_BYTES + 1 {
            return Err(Error::Secret(format!(
                "{} is larger than {MAX_TEXT_BYTES} bytes; it should hold the 64 hex digits printed by `opencode-agent secret init`",
                file.display()
            )));
        }
        FleetSecret::from_text(&text)
            .map(Some)
            .map_err(|e| Error::Secret(format!("{}: {}", file.display(), inner_message(e))))
    }

    /// Generates a secret and writes it to `path` as [`save`](Self::save)
    /// does; returns it.
    pub fn save_new(path: &Path, force: bool) -> Result<FleetSecret> {
        let secret = FleetSecret::generate()?;
        secret.save(path, force)?;
        Ok(secret)
    }

    /// Writes the secret's export form to `path` with mode 0600, creating
    /// missing parent directories with mode 0700. Without `force`, an
    /// existing file is never touched (the file is created with O_EXCL); with
    /// it, a temp file is written and renamed over the old one, so readers see
    /// the old secret or the new one, never half of one.
    pub fn save(&self, path: &Path, force: bool) -> Result<()> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};

        let action = "writing the fleet secret";
        let file_name = path.file_name().ok_or_else(|| {
            Error::Secret(format!(
                "{} names no file; give a file path such as ~/.config/opencode-mcp/secret",
                path.display()
            ))
        })?;
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| io_err("creating the directory of", path, source))?;
        let target = if force {
            let mut tmp = file_name.to_os_string();
            tmp.push(format!(".{}.tmp", std::process::id()));
            let mut hidden = std::ffi::OsString::from(".");
            hidden.push(tmp);
            dir.join(hidden)
        } else {
            path.to_path_buf()
        };
        let open = || {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&target)
        };
        let mut file = match open() {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && !force => {
                return Err(Error::Secret(format!(
                    "{} already exists; every machine must share one fleet secret, so it is kept. \
                     Pass --force to replace it (then import the new one on every machine)",
                    path.display()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                // A leftover of an interrupted write by this same process id.
                let _ = std::fs::remove_file(&target);
                open().map_err(|source| io_err(action, path, source))?
            }
            Err(source) => return Err(io_err(action, path, source)),
        };
        let mut text = self.to_export_string().into_bytes();
        text.push(b'\n');
        let written = file.write_all(&text).and_then(|()| file.sync_all());
        text.fill(0);
        drop(file);
        let done = written.and_then(|()| {
            if force {
                std::fs::rename(&target, path)
            } else {
                Ok(())
            }
        });
        if let Err(source) = done {
            let _ = std::fs::remove_file(&target);
            return Err(io_err(action, path, source));
        }
        Ok(())
    }

    /// The OpenCode server password of instance `instance_id`:
    /// HMAC-SHA256(secret, `"opencode-mcp/v1/password\0" + id`), the first 32
    /// hex digits. Different ids (or secrets) give unrelated passwords.
    pub fn instance_password(&self, instance_id: &str) -> String {
        let mut h = hex(&self.mac(&[PASSWORD_DOMAIN, instance_id.as_bytes()]));
        h.truncate(PASSWORD_HEX_LEN);
        h
    }

    /// Signs an announcement: HMAC-SHA256 over [`announce_bytes`], as 64
    /// lowercase hex digits. `at` is the signing time in Unix seconds.
    pub fn sign(&self, id: &str, port: u16, addrs: &[IpAddr], at: u64) -> String {
        hex(&self.mac(&[&announce_bytes(id, port, addrs, at)]))
    }

    /// [`sign`](Self::sign), packaged with its time.
    pub fn signed(&self, id: &str, port: u16, addrs: &[IpAddr], at: u64) -> Signed {
        Signed {
            at,
            sig: self.sign(id, port, addrs, at),
        }
    }

    /// Checks `sig` against the announced values, in constant time. The order
    /// and repetition of `addrs` do not matter. Whether `at` is recent enough
    /// is the caller's decision.
    pub fn verify(
        &self,
        id: &str,
        port: u16,
        addrs: &[IpAddr],
        at: u64,
        sig: &str,
    ) -> Result<(), VerifyError> {
        let tag = (sig.len() == SIG_HEX_LEN)
            .then(|| hex_decode(sig))
            .flatten()
            .ok_or(VerifyError::Malformed { len: sig.len() })?;
        self.hasher(&[&announce_bytes(id, port, addrs, at)])
            .verify_slice(&tag)
            .map_err(|_| VerifyError::BadSignature)
    }

    /// Whether `seen`, the address an announcement arrived from or points to,
    /// is one of the addresses it signed (IPv4-mapped IPv6 addresses compare
    /// as IPv4). A valid signature alone proves only that a fleet member said
    /// these things at some time: anyone who recorded it can replay it from,
    /// or point it to, another address. Send credentials only where this
    /// holds too.
    pub fn verify_address(&self, signed_addrs: &[IpAddr], seen: IpAddr) -> bool {
        let seen = seen.to_canonical();
        signed_addrs.iter().any(|a| a.to_canonical() == seen)
    }

    /// A MAC engine keyed with the secret, fed with `parts`.
    fn hasher(&self, parts: &[&[u8]]) -> HmacSha256 {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut m = <HmacSha256 as KeyInit>::new_from_slice(&self.bytes)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        for p in parts {
            m.update(p);
        }
        m
    }

    /// HMAC-SHA256(secret, concatenation of `parts`).
    fn mac(&self, parts: &[&[u8]]) -> Vec<u8> {
        self.hasher(parts).finalize().into_bytes().to_vec()
    }
}

impl Signed {
    /// Checks this signature with `secret` (see [`FleetSecret::verify`]).
    pub fn verify(
        &self,
        secret: &FleetSecret,
        id: &str,
        port: u16,
        addrs: &[IpAddr],
    ) -> Result<(), VerifyError> {
        secret.verify(id, port, addrs, self.at, &self.sig)
    }
}

/// The exact bytes an announcement signature covers:
/// `"opencode-mcp/v1/announce\0" id "\0" port "\0" addrs "\0" at`, with
/// `port` and `at` in decimal and `addrs` sorted, de-duplicated (IPv4-mapped
/// IPv6 as IPv4), in their standard text form and joined by `,`. Only `id`
/// may contain NUL, and it comes first, so reading the fields from the end
/// recovers them: two different announcements never share these bytes.
pub fn announce_bytes(id: &str, port: u16, addrs: &[IpAddr], at: u64) -> Vec<u8> {
    let mut sorted: Vec<IpAddr> = addrs.iter().map(IpAddr::to_canonical).collect();
    sorted.sort_unstable();
    sorted.dedup();
    let list = sorted
        .iter()
        .map(IpAddr::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let mut out = Vec::with_capacity(ANNOUNCE_DOMAIN.len() + id.len() + list.len() + 32);
    out.extend_from_slice(ANNOUNCE_DOMAIN);
    out.extend_from_slice(id.as_bytes());
    out.push(0);
    out.extend_from_slice(port.to_string().as_bytes());
    out.push(0);
    out.extend_from_slice(list.as_bytes());
    out.push(0);
    out.extend_from_slice(at.to_string().as_bytes());
    out
}

/// The default secret file for the given XDG_CONFIG_HOME and HOME (see
/// [`FleetSecret::default_path`]); `None` when neither is usable.
pub fn default_path_from(
    xdg_config_home: Option<&std::ffi::OsStr>,
    home: Option<&std::ffi::OsStr>,
) -> Option<PathBuf> {
    let xdg = xdg_config_home
        .map(PathBuf::from)
        .filter(|p| p.is_absolute());
    let base = match xdg {
        Some(p) => p,
        None => PathBuf::from(home.filter(|h| !h.is_empty())?).join(".config"),
    };
    Some(base.join("opencode-mcp").join("secret"))
}

/// The message inside an [`Error::Secret`], or the whole message otherwise.
fn inner_message(e: Error) -> String {
    match e {
        Error::Secret(m) => m,
        other => other.to_string(),
    }
}

fn io_err(action: &'static str, path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// `s` as one word for a POSIX shell (quoted only when needed).
fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// Lowercase hex of `bytes`.
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// The bytes of an even-length hex string (either case), or `None`.
fn hex_decode(s: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    };
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    b.chunks_exact(2)
        .map(|p| Some((digit(p[0])? << 4) | digit(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(n: u8) -> FleetSecret {
        FleetSecret::from_text(&hex(&[n; 32])).unwrap()
    }

    fn addrs(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn signatures_round_trip_and_refuse_any_change() {
        let s = secret(1);
        let a = addrs(&["100.64.0.7", "fd7a:115c:a1e0::7"]);
        let sig = s.sign("abc123", 4100, &a, 1_700_000_000);
        assert_eq!(sig.len(), SIG_HEX_LEN);
        assert!(sig.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(s.verify("abc123", 4100, &a, 1_700_000_000, &sig), Ok(()));
        let bad = Err(VerifyError::BadSignature);
        assert_eq!(s.verify("abc124", 4100, &a, 1_700_000_000, &sig), bad);
        assert_eq!(s.verify("abc123", 4101, &a, 1_700_000_000, &sig), bad);
        assert_eq!(s.verify("abc123", 4100, &a, 1_700_000_001, &sig), bad);
        let other = addrs(&["100.64.0.8", "fd7a:115c:a1e0::7"]);
        assert_eq!(s.verify("abc123", 4100, &other, 1_700_000_000, &sig), bad);
        assert_eq!(s.verify("abc123", 4100, &a[..1], 1_700_000_000, &sig), bad);
        assert_eq!(s.verify("abc123", 4100, &[], 1_700_000_000, &sig), bad);
        // A wrong secret is refused the same way.
        assert_eq!(
            secret(2).verify("abc123", 4100, &a, 1_700_000_000, &sig),
            bad
        );
        // Upper-case hex is the same signature.
        let upper = sig.to_ascii_uppercase();
        assert_eq!(s.verify("abc123", 4100, &a, 1_700_000_000, &upper), Ok(()));
        // The packaged form agrees.
        let signed = s.signed("abc123", 4100, &a, 1_700_000_000);
        assert_eq!(signed.sig, sig);
        assert_eq!(signed.verify(&s, "abc123", 4100, &a), Ok(()));
    }

    #[test]
    fn fields_cannot_be_shifted_into_each_other() {
        let s = secret(1);
        let sig = s.sign("a1", 2, &[], 3);
        assert!(s.verify("a", 12, &[], 3, &sig).is_err());
        assert!(s.verify("a1", 2, &[], 3, &sig).is_ok());
        assert_ne!(
            announce_bytes("a\u{0}1", 2, &[], 3),
            announce_bytes("a", 1, &[], 3)
        );
    }

    #[test]
    fn address_order_and_duplicates_do_not_matter() {
        let s = secret(3);
        let a = addrs(&["192.168.1.5", "100.64.0.7", "fd7a:115c:a1e0::7"]);
        let b = addrs(&[
            "fd7a:115c:a1e0::7",
            "100.64.0.7",
            "192.168.1.5",
            "100.64.0.7",
        ]);
        let sig = s.sign("id", 1, &a, 9);
        assert_eq!(s.verify("id", 1, &b, 9, &sig), Ok(()));
        // IPv4-mapped IPv6 is the IPv4 address.
        let mapped = addrs(&["::ffff:192.168.1.5", "100.64.0.7", "fd7a:115c:a1e0::7"]);
        assert_eq!(s.verify("id", 1, &mapped, 9, &sig), Ok(()));
    }

    #[test]
    fn malformed_signatures_are_told_apart() {
        let s = secret(1);
        for bad in ["", "zz", &"g".repeat(64), &"a".repeat(63), &"é".repeat(32)] {
            assert_eq!(
                s.verify("id", 1, &[], 1, bad),
                Err(VerifyError::Malformed { len: bad.len() }),
                "{bad:?}"
            );
        }
        assert_eq!(
            s.verify("id", 1, &[], 1, &"0".repeat(64)),
            Err(VerifyError::BadSignature)
        );
    }

    #[test]
    fn replay_to_another_address_is_caught_by_verify_address() {
        let s = secret(1);
        let signed = addrs(&["100.64.0.7", "fd7a:115c:a1e0::7"]);
        assert!(s.verify_address(&signed, "100.64.0.7".parse().unwrap()));
        assert!(s.verify_address(&signed, "::ffff:100.64.0.7".parse().unwrap()));
        assert!(s.verify_address(&signed, "fd7a:115c:a1e0::7".parse().unwrap()));
        assert!(!s.verify_address(&signed, "100.64.0.8".parse().unwrap()));
        assert!(!s.verify_address(&[], "127.0.0.1".parse().unwrap()));
    }

    #[test]
    fn passwords_differ_per_id_and_per_secret() {
        let s = secret(1);
        let p = s.instance_password("aaaa");
        assert_eq!(p.len(), PASSWORD_HEX_LEN);
        assert!(p.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(p, s.instance_password("aaaa"));
        assert_ne!(p, s.instance_password("aaab"));
        assert_ne!(p, secret(2).instance_password("aaaa"));
        // Not the announcement MAC under another name.
        assert!(!s.sign("aaaa", 1, &[], 1).starts_with(&p));
    }

    #[test]
    fn known_answer_matches_rfc_4231_hmac_sha256() {
        // RFC 4231 test case 2: key "Jefe", data "what do ya want for nothing?".
        let s = FleetSecret {
            bytes: b"Jefe".to_vec(),
        };
        assert_eq!(
            hex(&s.mac(&[b"what do ya want ", b"for nothing?"])),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn debug_never_shows_the_bytes_and_errors_never_show_the_text() {
        let s = secret(0xab);
        let dbg = format!("{s:?} {:?}", Some(&s));
        assert!(dbg.contains("FleetSecret(<redacted>)"));
        assert!(!dbg.to_lowercase().contains("abab"));
        let pass = "short secret\u{7}with a bell in it";
        let err = FleetSecret::from_text(pass).unwrap_err().to_string();
        assert!(!err.contains("short secret"), "{err}");
        let err = FleetSecret::from_text("tiny-pass").unwrap_err().to_string();
        assert!(!err.contains("tiny-pass") && err.contains("16"), "{err}");
        let err = FleetSecret::load(Some("tiny-pass"), Path::new("/nonexistent"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(SECRET_ENV) && !err.contains("tiny-pass"),
            "{err}"
        );
    }

    #[test]
    fn text_forms_round_trip() {
        let g = FleetSecret::generate().unwrap();
        let text = g.to_export_string();
        assert_eq!(text.len(), 64);
        assert_eq!(FleetSecret::from_text(&text).unwrap(), g);
        assert_eq!(
            FleetSecret::from_text(&format!("  {}\n", text.to_uppercase())).unwrap(),
            g
        );
        assert_ne!(FleetSecret::generate().unwrap(), g);
        let p = FleetSecret::from_text("correct horse battery staple\n").unwrap();
        assert_eq!(p.to_export_string(), "correct horse battery staple");
        assert_eq!(FleetSecret::from_text(&p.to_export_string()).unwrap(), p);
        // A 32-character passphrase exports as hex and still reads back the same.
        let p32 = FleetSecret::from_text(&"x".repeat(32)).unwrap();
        assert_eq!(
            FleetSecret::from_text(&p32.to_export_string()).unwrap(),
            p32
        );
        assert!(FleetSecret::from_text(&"y".repeat(MAX_TEXT_BYTES + 1)).is_err());
        assert!(FleetSecret::from_text("0123456789abcde").is_err());
        assert!(FleetSecret::from_text("ünïcödé-pässwörd").is_ok());
    }

    #[test]
    fn default_path_prefers_an_absolute_xdg_config_home() {
        use std::ffi::OsStr;
        assert_eq!(
            default_path_from(Some(OsStr::new("/x/cfg")), Some(OsStr::new("/home/u"))),
            Some(PathBuf::from("/x/cfg/opencode-mcp/secret"))
        );
        assert_eq!(
            default_path_from(Some(OsStr::new("rel")), Some(OsStr::new("/home/u"))),
            Some(PathBuf::from("/home/u/.config/opencode-mcp/secret"))
        );
        assert_eq!(
            default_path_from(None, Some(OsStr::new("/home/u"))),
            Some(PathBuf::from("/home/u/.config/opencode-mcp/secret"))
        );
        assert_eq!(default_path_from(Some(OsStr::new("")), None), None);
    }

    #[cfg(unix)]
    #[test]
    fn load_prefers_the_environment_then_the_file_and_checks_its_mode() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("cfg/opencode-mcp/secret");
        // Nothing anywhere.
        assert!(FleetSecret::load(None, &file).unwrap().is_none());
        assert!(FleetSecret::load(Some("  "), &file).unwrap().is_none());
        let saved = FleetSecret::save_new(&file, false).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&file), 0o600);
        assert_eq!(mode(file.parent().unwrap()), 0o700);
        assert_eq!(FleetSecret::load(None, &file).unwrap(), Some(saved.clone()));
        // The environment wins.
        let env = secret(9);
        let got = FleetSecret::load(Some(&env.to_export_string()), &file).unwrap();
        assert_eq!(got, Some(env));
        // A file others may read is refused, with the fix in the message.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = FleetSecret::load(None, &file).unwrap_err().to_string();
        assert!(err.contains("chmod 600") && err.contains("0640"), "{err}");
        assert!(!err.contains(&saved.to_export_string()));
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        // Bad contents are refused without being echoed.
        std::fs::write(&file, "short\n").unwrap();
        let err = FleetSecret::load(None, &file).unwrap_err().to_string();
        assert!(
            err.contains("16 characters") && !err.contains("short\n"),
            "{err}"
        );
        std::fs::write(&file, vec![b'a'; 5000]).unwrap();
        assert!(FleetSecret::load(None, &file).is_err());
        std::fs::write(&file, [0xff, 0xfe, 0x00]).unwrap();
        assert!(FleetSecret::load(None, &file).is_err());
        // A directory is not a secret file.
        assert!(FleetSecret::load(None, tmp.path()).is_err());
    }

    #[cfg(unix)]
    #[test]
    fn save_new_refuses_to_overwrite_unless_forced() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("secret");
        let first = FleetSecret::save_new(&file, false).unwrap();
        let err = FleetSecret::save_new(&file, false).unwrap_err().to_string();
        assert!(
            err.contains("already exists") && err.contains("--force"),
            "{err}"
        );
        assert_eq!(FleetSecret::load(None, &file).unwrap(), Some(first.clone()));
        let second = FleetSecret::save_new(&file, true).unwrap();
        assert_ne!(first, second);
        assert_eq!(FleetSecret::load(None, &file).unwrap(), Some(second));
        let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // No temp file is left behind.
        assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), 1);
        // A symlink in place of the file is not followed.
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(tmp.path().join("elsewhere"), &link).unwrap();
        assert!(FleetSecret::save_new(&link, false).is_err());
        assert!(!tmp.path().join("elsewhere").exists());
    }
}
