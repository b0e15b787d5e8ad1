//! OpenCode's `/event` stream, as sent by whatever answered on an announced
//! port: arbitrary bytes, cut into arbitrary chunks, go through the client's
//! own pipeline (`LineCap` → `eventsource-stream` → `Event::parse`) on a
//! one-thread executor. Nothing panics, and `LineCap` fails the stream
//! exactly when some line is longer than the cap.
//!
//! Input layout: byte 0 picks the line cap (16 + 64·b bytes), byte 1 the
//! chunking (chunk lengths in 1..=b+1, varied), the rest is the stream.
#![no_main]

use std::io;

use bytes::Bytes;
use eventsource_stream::Eventsource;
use futures::StreamExt;
use libfuzzer_sys::fuzz_target;
use opencode_mcp::opencode::events::{Event, LineCap};

fn chunks(stream: &[u8], max: usize) -> Vec<Result<Bytes, io::Error>> {
    let mut out = Vec::new();
    let mut rest = stream;
    let mut state = max as u32 ^ 0x9e37_79b9;
    while !rest.is_empty() {
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let len = (1 + (state >> 16) as usize % max).min(rest.len());
        let (head, tail) = rest.split_at(len);
        out.push(Ok(Bytes::copy_from_slice(head)));
        rest = tail;
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let [cap_sel, chunk_sel, stream @ ..] = data else {
        return;
    };
    let cap = 16 + usize::from(*cap_sel) * 64;
    let max_chunk = usize::from(*chunk_sel) + 1;

    // The guard alone: it fails iff a line, or an event (non-empty lines up
    // to a blank line; terminators \r\n, \n, \r), is longer than the cap,
    // whatever the chunking.
    let longest = {
        let text: Vec<u8> = stream.to_vec();
        let mut lines: Vec<usize> = Vec::new();
        let mut i = 0;
        let mut cur = 0;
        while i < text.len() {
            match text[i] {
                b'\r' if text.get(i + 1) == Some(&b'\n') => {
                    lines.push(cur);
                    cur = 0;
                    i += 1;
                }
                b'\r' | b'\n' => {
                    lines.push(cur);
                    cur = 0;
                }
                _ => cur += 1,
            }
            i += 1;
        }
        lines.push(cur);
        let mut longest = 0;
        let mut event = 0;
        for l in lines {
            event = if l == 0 { 0 } else { event + l };
            longest = longest.max(event);
        }
        longest
    };
    let guarded: Vec<_> = futures::executor::block_on(
        LineCap::new(futures::stream::iter(chunks(stream, max_chunk)), cap).collect::<Vec<_>>(),
    );
    let failed = guarded.iter().any(Result::is_err);
    assert_eq!(
        failed,
        longest > cap,
        "LineCap verdict is wrong (cap {cap}, longest event {longest})"
    );

    // The whole pipeline, stopping at the first error as the client does.
    futures::executor::block_on(async {
        let mut events =
            LineCap::new(futures::stream::iter(chunks(stream, max_chunk)), cap).eventsource();
        while let Some(item) = events.next().await {
            let Ok(ev) = item else { break };
            if let Some(e) = Event::parse(&ev.data) {
                let _ = e.session_id();
            }
        }
    });
});
