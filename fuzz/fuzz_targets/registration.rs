//! Relay registration files, as read from a shared directory anyone on the
//! relay may write to: `parse_registration` on arbitrary bytes returns a
//! registration or a reason, never panics, and what it accepts survives
//! `to_json` unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use opencode_mcp::announce::parse_registration;

fuzz_target!(|data: &[u8]| {
    if let Ok(reg) = parse_registration(data, "fallback-name") {
        let again = parse_registration(reg.to_json().as_bytes(), "other-name");
        assert_eq!(again.as_ref(), Ok(&reg), "to_json did not round-trip");
    }
});
