//! Idempotency of `send`: remembers which `request_id`s already sent their
//! prompt, and their results, so a retried call never sends twice. Bounded
//! (oldest forgotten first) and in memory only.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use rmcp::model::CallToolResult;

/// How many request ids are remembered.
const CAPACITY: usize = 4096;

/// What a new call with a request id should do.
pub enum Claim {
    /// First time: go ahead.
    New,
    /// Already sent; here is the result.
    Done(CallToolResult),
    /// Another call with this id is running now.
    InFlight,
}

/// id → result (None while in flight), and the ids oldest first.
type Entries = (HashMap<String, Option<CallToolResult>>, VecDeque<String>);

/// The remembered request ids.
#[derive(Default)]
pub struct RequestLog {
    /// The entries, behind a lock held only for map operations.
    inner: Mutex<Entries>,
}

impl RequestLog {
    /// Claims `id` for a new send, or says why not.
    pub fn claim(&self, id: &str) -> Claim {
        let Ok(mut g) = self.inner.lock() else {
            return Claim::New;
        };
        let (map, order) = &mut *g;
        match map.get(id) {
            Some(Some(r)) => Claim::Done(r.clone()),
            Some(None) => Claim::InFlight,
            None => {
                map.insert(id.to_string(), None);
                order.push_back(id.to_string());
                while order.len() > CAPACITY {
                    if let Some(old) = order.pop_front() {
                        map.remove(&old);
                    }
                }
                Claim::New
            }
        }
    }

    /// Records the result of a claimed id; `None` releases the claim (nothing was sent).
    pub fn finish(&self, id: &str, result: Option<CallToolResult>) {
        let Ok(mut g) = self.inner.lock() else { return };
        let (map, order) = &mut *g;
        match result {
            Some(r) => {
                map.insert(id.to_string(), Some(r));
            }
            None => {
                map.remove(id);
                order.retain(|o| o != id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finished_id_returns_its_result_and_a_released_one_can_run_again() {
        let log = RequestLog::default();
        assert!(matches!(log.claim("a"), Claim::New));
        assert!(matches!(log.claim("a"), Claim::InFlight));
        log.finish("a", Some(CallToolResult::success(vec![])));
        assert!(matches!(log.claim("a"), Claim::Done(_)));
        assert!(matches!(log.claim("b"), Claim::New));
        log.finish("b", None);
        assert!(matches!(log.claim("b"), Claim::New));
    }
}
