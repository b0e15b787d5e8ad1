//! Turning what a user typed into an instance and a session.
//!
//! Instance names follow the seed: an exact, case-sensitive match of the name
//! (or of the instance key) wins; otherwise a case-insensitive substring must
//! match exactly one instance. Sessions: an id, an id prefix, or a
//! case-insensitive title substring; by default the most recently updated
//! top-level session. Failures are sentences that say what to do next.
//! An untrusted instance resolves to an error saying why and what to do, so
//! no tool can reach it.

use std::sync::Arc;
use std::time::Duration;

use crate::opencode::{OpenCodeClient, Session};
use crate::registry::{Health, Instance, Registry, View};

/// How long a tool waits for the first discovery pass after start-up.
const STARTUP_WAIT: Duration = Duration::from_secs(2);

/// Finds the one instance `query` names and waits (bounded) for its first
/// health check, so a just-created registration is usable at once. Only the
/// named instance is waited for; others never delay the call.
pub async fn instance(
    registry: &Registry,
    query: &str,
    health_wait: Duration,
) -> Result<Arc<Instance>, String> {
    let view = registry
        .wait_for(STARTUP_WAIT, |v| v.transports_ready)
        .await;
    let inst = match_instance(&view, query)?;
    let inst = if matches!(inst.health, Health::Checking) {
        let key = inst.key.clone();
        let v = registry
            .wait_for(health_wait + Duration::from_millis(500), |v| {
                v.get(&key)
                    .is_none_or(|i| !matches!(i.health, Health::Checking))
            })
            .await;
        v.get(&key).cloned().ok_or_else(|| {
            format!("Instance \"{query}\" disappeared while it was being checked.")
        })?
    } else {
        inst
    };
    match &inst.health {
        Health::Online { .. } => Ok(inst),
        Health::Checking => Err(format!(
            "Instance \"{}\" is still being health-checked; try again in a moment.",
            inst.name
        )),
        Health::Untrusted { reason } => Err(format!(
            "Instance \"{}\" is untrusted, so this server never contacts it: {reason}.",
            inst.name
        )),
        Health::Offline { reason, since } => {
            registry.recheck(&inst.key);
            Err(format!(
                "Instance \"{}\" is offline (unreachable for {}s: {reason}). It is re-checked in the background; call instances to see when it is back.",
                inst.name,
                since.elapsed().unwrap_or_default().as_secs()
            ))
        }
    }
}

/// Pure matching against one view.
pub fn match_instance(view: &View, query: &str) -> Result<Arc<Instance>, String> {
    if view.instances.is_empty() {
        return Err("No opencode instances are currently connected. Run opencode-connected (or opencode-agent) on a machine to register one.".into());
    }
    let exact: Vec<&Arc<Instance>> = view
        .instances
        .iter()
        .filter(|i| i.name == query || i.key == query)
        .collect();
    match exact.len() {
        1 => return Ok(exact[0].clone()),
        n if n > 1 => {
            return Err(format!(
                "Ambiguous instance \"{query}\" — {n} instances share this name: {}. Pass the key instead.",
                exact
                    .iter()
                    .map(|i| format!("{} (key {})", i.name, i.key))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        _ => {}
    }
    let q = query.to_lowercase();
    let subs: Vec<&Arc<Instance>> = view
        .instances
        .iter()
        .filter(|i| contains_ignore_case(&i.name, &q))
        .collect();
    match subs.len() {
        1 => Ok(subs[0].clone()),
        0 => {
            // Seed format, capped: a fleet of hundreds would drown the message.
            let shown: Vec<&str> = view
                .instances
                .iter()
                .take(20)
                .map(|i| i.name.as_str())
                .collect();
            let more = view.instances.len() - shown.len();
            Err(format!(
                "No instance matching \"{query}\". Available: {}{}",
                shown.join(", "),
                if more > 0 {
                    format!(" and {more} more (call instances)")
                } else {
                    String::new()
                }
            ))
        }
        _ => Err(format!(
            "Ambiguous instance \"{query}\" — matches: {}. Be more specific.",
            subs.iter()
                .map(|i| i.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

/// Whether `hay` contains `needle_lower` (already lower-cased), ignoring
/// case. Names are nearly always ASCII: compare in place then, since a
/// fleet of a thousand would otherwise allocate a thousand strings per call.
pub fn contains_ignore_case(hay: &str, needle_lower: &str) -> bool {
    if hay.is_ascii() && needle_lower.is_ascii() {
        let (h, n) = (hay.as_bytes(), needle_lower.as_bytes());
        return n.is_empty() || h.windows(n.len()).any(|w| w.eq_ignore_ascii_case(n));
    }
    hay.to_lowercase().contains(needle_lower)
}

/// Finds the session: `query` (id, id prefix or title substring) or, without
/// it, the most recently updated top-level session. `Ok(None)`: no sessions.
pub async fn session(
    client: &OpenCodeClient,
    name: &str,
    query: Option<&str>,
) -> Result<Option<Session>, String> {
    let sessions = client
        .sessions(None, None)
        .await
        .map_err(|e| e.to_string())?;
    let Some(q) = query.map(str::trim).filter(|q| !q.is_empty()) else {
        return Ok(sessions
            .iter()
            .find(|s| s.parent_id.is_none())
            .or(sessions.first())
            .cloned());
    };
    if let Some(s) = sessions.iter().find(|s| s.id == q) {
        return Ok(Some(s.clone()));
    }
    if q.starts_with("ses_") {
        let by_prefix: Vec<&Session> = sessions.iter().filter(|s| s.id.starts_with(q)).collect();
        if by_prefix.len() == 1 {
            return Ok(Some(by_prefix[0].clone()));
        }
    }
    let ql = q.to_lowercase();
    let by_title: Vec<&Session> = sessions
        .iter()
        .filter(|s| contains_ignore_case(&s.title, &ql))
        .collect();
    match by_title.len() {
        1 => Ok(Some(by_title[0].clone())),
        0 => Err(format!(
            "No session on {name} matches \"{q}\" (by id or title). Call sessions with instance=\"{name}\" to list them."
        )),
        n => Err(format!(
            "Ambiguous session \"{q}\" on {name} — {n} match: {}. Pass the session id.",
            by_title
                .iter()
                .take(10)
                .map(|s| format!("\"{}\" ({})", s.title, s.id))
                .collect::<Vec<_>>()
                .join(", ")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::contains_ignore_case;

    #[test]
    fn substring_match_ignores_case_for_ascii_and_unicode_names() {
        assert!(contains_ignore_case("Laptop-Main", "laptop"));
        assert!(contains_ignore_case("Laptop-Main", "p-ma"));
        assert!(contains_ignore_case("anything", ""));
        assert!(!contains_ignore_case("Laptop", "desk"));
        assert!(!contains_ignore_case("lap", "laptop"));
        assert!(contains_ignore_case("Büro-Rechner", "büro"));
        assert!(contains_ignore_case("ÉTÉ", "été"));
        assert!(!contains_ignore_case("Büro", "buro"));
    }
}
