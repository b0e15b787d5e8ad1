//! DNS-SD TXT records, as received from anyone on the LAN or tailnet: the
//! bytes are split into character-strings at `\n`, each string into
//! `key=value` by `dnssd::split_txt` (as the tailnet client does), and fed to
//! `Announcement::from_txt`. It never panics, and what it accepts renders
//! back (`to_txt`) into a record it accepts again with the same id and name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use opencode_mcp::announce::txt::{Announcement, MAX_ENTRY_BYTES};
use opencode_mcp::dnssd::split_txt;

fuzz_target!(|data: &[u8]| {
    let strings: Vec<Vec<u8>> = data.split(|b| *b == b'\n').map(<[u8]>::to_vec).collect();
    let pairs = split_txt(&strings);
    let Ok(a) = Announcement::from_txt(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))) else {
        return;
    };
    let txt = a.to_txt();
    for (k, v) in &txt {
        assert!(
            k.len() + 1 + v.len() <= MAX_ENTRY_BYTES,
            "to_txt entry `{k}` too long"
        );
    }
    let back = Announcement::from_txt(txt.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .expect("to_txt output of a parsed record must parse");
    assert_eq!((&back.id, &back.name), (&a.id, &a.name));
});
