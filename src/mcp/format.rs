//! Small formatting helpers shared by the tools: tool results with text and
//! structured content, and human-readable times.

use rmcp::model::{CallToolResult, ContentBlock};
use serde::Serialize;

/// A successful result: readable `text` plus `data` as structured content.
pub fn ok<T: Serialize>(text: impl Into<String>, data: &T) -> CallToolResult {
    let mut r = CallToolResult::success(vec![ContentBlock::text(text.into())]);
    r.structured_content = serde_json::to_value(data).ok();
    r
}

/// A tool-level failure (isError = true) with the seed's `Error: ` prefix.
pub fn fail(message: impl AsRef<str>) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(format!(
        "Error: {}",
        message.as_ref()
    ))])
}

/// `HH:MM:SS UTC` of an epoch-millisecond time.
pub fn clock(epoch_ms: i64) -> String {
    let secs = epoch_ms.div_euclid(1000).rem_euclid(86_400);
    format!(
        "{:02}:{:02}:{:02} UTC",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

/// "5s", "3m", "2h", "4d" ago, from an epoch-millisecond time.
pub fn ago(epoch_ms: i64) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let s = ((now - epoch_ms) / 1000).max(0);
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86_399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_formats_utc_time_of_day() {
        assert_eq!(clock(0), "00:00:00 UTC");
        assert_eq!(clock(1_795_626_495_288), "17:08:15 UTC");
    }
}
