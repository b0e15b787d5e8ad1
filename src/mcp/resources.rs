//! MCP resources: `opencode://instances` (every instance and its status) and
//! `opencode://instance/{key}/session` (the instance's current session), with
//! `notifications/resources/list_changed` when instances appear or vanish and
//! `notifications/resources/updated` (for subscribed URIs) when an instance
//! changes status or asks for a permission.
//!
//! The notifier only watches the registry's view; it never polls instances.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use rmcp::RoleServer;
use rmcp::model::{
    ReadResourceResult, Resource, ResourceContents, ResourceUpdatedNotificationParam,
};
use rmcp::service::Peer;

use super::instances::{Selection, instances_output};
use super::messages::{ReadOutput, message_out};
use super::resolve;
use crate::registry::{Instance, Registry, View};

/// URI of the instance list.
pub const INSTANCES_URI: &str = "opencode://instances";

/// URI of one instance's current session.
pub fn session_uri(key: &str) -> String {
    format!("opencode://instance/{key}/session")
}

/// Subscribed URIs, shared by the handler and the notifier.
pub type Subscriptions = Arc<Mutex<HashSet<String>>>;

/// Every resource in the view.
pub fn list(view: &View) -> Vec<Resource> {
    let mut out = vec![
        Resource::new(INSTANCES_URI, "instances")
            .with_description(
                "Every discovered OpenCode instance with its status (JSON, as the instances tool)",
            )
            .with_mime_type("application/json"),
    ];
    for i in &view.instances {
        out.push(
            Resource::new(session_uri(&i.key), format!("{} session", i.name))
                .with_description(format!(
                    "The current session of {} (JSON, as the read tool)",
                    i.name
                ))
                .with_mime_type("application/json"),
        );
    }
    out
}

/// Reads one resource; the error is a sentence.
pub async fn read(registry: &Registry, uri: &str) -> Result<ReadResourceResult, String> {
    let view = registry.view();
    let json = if uri == INSTANCES_URI {
        serde_json::to_string_pretty(&instances_output(&view, &Selection::all()))
            .map_err(|e| e.to_string())?
    } else if let Some(key) = uri
        .strip_prefix("opencode://instance/")
        .and_then(|r| r.strip_suffix("/session"))
    {
        let inst = view
            .get(key)
            .cloned()
            .ok_or_else(|| format!("no instance with key {key}; list resources again"))?;
        serde_json::to_string_pretty(&current_session(&inst).await?).map_err(|e| e.to_string())?
    } else {
        return Err(format!("unknown resource {uri}; call resources/list"));
    };
    Ok(ReadResourceResult::new(vec![
        ResourceContents::text(json, uri).with_mime_type("application/json"),
    ]))
}

async fn current_session(inst: &Arc<Instance>) -> Result<ReadOutput, String> {
    if !inst.is_online() {
        return Err(format!("{} is not online", inst.name));
    }
    let session = resolve::session(&inst.client, &inst.name, None).await?;
    let Some(session) = session else {
        return Ok(ReadOutput {
            instance: inst.name.clone(),
            session_id: None,
            title: None,
            status: "idle".into(),
            messages: vec![],
        });
    };
    let messages = inst
        .client
        .messages(&session.id, Some(20))
        .await
        .map_err(|e| e.to_string())?;
    Ok(ReadOutput {
        instance: inst.name.clone(),
        status: inst
            .statuses
            .get(&session.id)
            .map(|s| s.label())
            .unwrap_or("idle")
            .to_string(),
        session_id: Some(session.id),
        title: Some(session.title),
        messages: messages.iter().map(message_out).collect(),
    })
}

/// What a client would notice about an instance.
fn signature(i: &Instance) -> String {
    let health = i.health.label();
    let mut perms: Vec<&str> = i
        .permissions
        .iter()
        .map(|p| p.request.id.as_str())
        .collect();
    perms.sort_unstable();
    format!(
        "{health}|{}|{}|{}",
        if i.is_busy() { "busy" } else { "idle" },
        perms.join(","),
        i.recent.as_ref().map(|r| r.id.as_str()).unwrap_or("")
    )
}

/// Sends resource notifications for view changes until the client goes away.
pub async fn notify_changes(registry: Registry, peer: Peer<RoleServer>, subs: Subscriptions) {
    let mut rx = registry.watch();
    let mut last: BTreeMap<String, (Arc<Instance>, String)> = BTreeMap::new();
    let mut first = true;
    loop {
        let view = rx.borrow_and_update().clone();
        // Unchanged instances keep their Arc: only changed ones are re-described.
        let now: BTreeMap<String, (Arc<Instance>, String)> = view
            .instances
            .iter()
            .map(|i| {
                let sig = match last.get(&i.key) {
                    Some((old, sig)) if Arc::ptr_eq(old, i) => sig.clone(),
                    _ => signature(i),
                };
                (i.key.clone(), (i.clone(), sig))
            })
            .collect();
        if !first {
            let keys_changed = !now.keys().eq(last.keys());
            let changed: Vec<&String> = now
                .iter()
                .filter(|(k, (_, s))| last.get(*k).map(|(_, o)| o) != Some(s))
                .map(|(k, _)| k)
                .collect();
            let subscribed = subs.lock().map(|s| s.clone()).unwrap_or_default();
            if keys_changed && peer.notify_resource_list_changed().await.is_err() {
                return;
            }
            if (keys_changed || !changed.is_empty())
                && subscribed.contains(INSTANCES_URI)
                && peer
                    .notify_resource_updated(ResourceUpdatedNotificationParam::new(INSTANCES_URI))
                    .await
                    .is_err()
            {
                return;
            }
            for key in changed {
                let uri = session_uri(key);
                if subscribed.contains(&uri)
                    && peer
                        .notify_resource_updated(ResourceUpdatedNotificationParam::new(uri))
                        .await
                        .is_err()
                {
                    return;
                }
            }
        }
        first = false;
        last = now;
        if rx.changed().await.is_err() {
            return;
        }
    }
}
