//! Fleet-secret signatures on announcements, whose every field an attacker
//! chooses: `FleetSecret::verify` on arbitrary id, port, addresses, time and
//! signature text never panics; a signature made by `sign` over the same
//! values always verifies; a signature of the wrong length is `Malformed`;
//! `from_text` on arbitrary text and `instance_password` never panic.
//!
//! Input layout: port (2 bytes), at (8), address count (1, mod 8), then per
//! address a kind byte (even: IPv4, 4 bytes; odd: IPv6, 16 bytes), then the
//! rest split at NUL bytes into id, signature and secret text.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::fuzz_target;
use opencode_mcp::secret::{FleetSecret, SIG_HEX_LEN, VerifyError};

/// Takes `n` bytes (fewer at the end, zero-padded).
fn take<const N: usize>(data: &mut &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    let n = N.min(data.len());
    out[..n].copy_from_slice(&data[..n]);
    *data = &data[n..];
    out
}

fuzz_target!(|input: &[u8]| {
    let mut data = input;
    let port = u16::from_be_bytes(take(&mut data));
    let at = u64::from_be_bytes(take(&mut data));
    let [count] = take::<1>(&mut data);
    let mut addrs = Vec::new();
    for _ in 0..count % 8 {
        let [kind] = take::<1>(&mut data);
        addrs.push(if kind % 2 == 0 {
            IpAddr::V4(Ipv4Addr::from(take::<4>(&mut data)))
        } else {
            IpAddr::V6(Ipv6Addr::from(take::<16>(&mut data)))
        });
    }
    let mut parts = data.splitn(3, |b| *b == 0);
    let id = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let sig = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let secret_text = String::from_utf8_lossy(parts.next().unwrap_or_default());

    let secret = FleetSecret::from_text(&secret_text)
        .or_else(|_| FleetSecret::from_text("fuzzing-fleet-secret-0123456789"))
        .expect("the fallback secret is valid");
    let _ = secret.instance_password(&id);

    let verdict = secret.verify(&id, port, &addrs, at, &sig);
    if sig.len() != SIG_HEX_LEN {
        assert_eq!(verdict, Err(VerifyError::Malformed { len: sig.len() }));
    }
    let good = secret.sign(&id, port, &addrs, at);
    assert_eq!(secret.verify(&id, port, &addrs, at, &good), Ok(()));
    let mut reversed = addrs.clone();
    reversed.reverse();
    assert_eq!(secret.verify(&id, port, &reversed, at, &good), Ok(()));
    if verdict.is_ok() {
        // Only the real signature (in either case) verifies.
        assert!(sig.eq_ignore_ascii_case(&good));
    }
    for a in &addrs {
        assert!(secret.verify_address(&addrs, *a));
    }
});
