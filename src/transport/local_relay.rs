//! The `local-relay` transport: registration JSON files in one directory
//! (RELAY_REGISTRY_DIR), written by `opencode-connected` or
//! `opencode-agent`, usually through an SSH reverse tunnel that ends on this
//! machine.
//!
//! It owns the directory: it watches it with inotify (a change takes effect
//! in milliseconds), rescans it every DISCOVERY_INTERVAL_MS as a safety net,
//! and is the only code that deletes a registration file. It must not
//! health-check anything.
//!
//! Pruning policy: a file is never deleted on its first failure. A file that
//! stays unreadable or invalid for PRUNE_AFTER_MS is deleted; so is a file
//! whose instance the registry reports unreachable for that long (see
//! [`Feedback::Expired`]). A file that turns invalid after having been valid
//! (a non-atomic writer caught mid-write) keeps its last good endpoint until it
//! is fixed or pruned. Symlinks are followed only when they resolve to a
//! regular file inside the directory; anything else (FIFOs, sockets,
//! directories named `*.json`, files over MAX_REGISTRATION_BYTES) is reported
//! and left alone.
//!
//! A file's signature (`at`, `sig`, `addrs`; see [`crate::announce`]) is
//! checked here against (`id`, `port`, `addrs`); the verdict travels on the
//! endpoint.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use futures::FutureExt;
use futures::future::BoxFuture;
use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::{
    Discovery, Endpoint, Feedback, Problem, Reach, Transport, TransportKind, TransportLink,
    TrustCheck,
};
use crate::announce::{Registration, parse_registration};
use crate::config::Config;
use crate::error::Result;

/// Watches RELAY_REGISTRY_DIR and reports its registrations.
pub struct LocalRelay {
    /// The registration directory.
    dir: PathBuf,
    /// Full rescan period.
    interval: Duration,
    /// How long a file may stay broken before it is deleted.
    prune_after: Duration,
    /// Largest file read.
    max_bytes: u64,
    /// Signature checks.
    trust: TrustCheck,
}

impl LocalRelay {
    /// A relay transport configured from `config`.
    pub fn new(config: &Config) -> Self {
        Self {
            dir: config.relay_dir.clone(),
            interval: config.discovery_interval,
            prune_after: config.prune_after,
            max_bytes: config.max_registration_bytes,
            trust: TrustCheck::from_config(config),
        }
    }
}

impl Transport for LocalRelay {
    fn kind(&self) -> TransportKind {
        TransportKind::LocalRelay
    }

    fn run(self: Box<Self>, link: TransportLink) -> BoxFuture<'static, Result<()>> {
        run(*self, link).boxed()
    }
}

/// What we know about one file.
#[derive(Debug)]
struct FileState {
    /// (inode, size, mtime ns, ctime ns): when unchanged, the file is not re-read.
    fingerprint: Option<(u64, u64, i128, i128)>,
    /// The key of the endpoint this file announces, once it parsed.
    key: Option<String>,
    /// The last endpoint reported for the file.
    endpoint: Option<Endpoint>,
    /// The current problem and when it started, if the file is bad now.
    problem: Option<(String, SystemTime)>,
}

/// The transport's state between events.
struct Scanner {
    /// The registration directory.
    dir: PathBuf,
    /// How long a file may stay broken before it is deleted.
    prune_after: Duration,
    /// Largest file read.
    max_bytes: u64,
    /// Signature checks.
    trust: TrustCheck,
    /// Per file name.
    files: HashMap<PathBuf, FileState>,
    /// A problem with the directory itself.
    dir_problem: Option<(String, SystemTime)>,
    /// Last problem list sent, to send only changes.
    last_problems: Vec<Problem>,
}

async fn run(relay: LocalRelay, mut link: TransportLink) -> Result<()> {
    let (fs_tx, mut fs_rx) = mpsc::unbounded_channel::<notify::Result<notify::Event>>();
    let mut scanner = Scanner {
        dir: relay.dir.clone(),
        prune_after: relay.prune_after,
        max_bytes: relay.max_bytes,
        trust: relay.trust.clone(),
        files: HashMap::new(),
        dir_problem: None,
        last_problems: Vec::new(),
    };
    let mut watch = WatchState::new(relay.dir.clone(), fs_tx);
    scanner.full_scan(&link.events).await;
    let _ = link
        .events
        .send(Discovery::Ready {
            via: TransportKind::LocalRelay,
        })
        .await;
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + relay.interval, relay.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    loop {
        tokio::select! {
            _ = link.shutdown.cancelled() => return Ok(()),
            _ = tick.tick() => {
                watch.ensure();
                scanner.full_scan(&link.events).await;
            }
            Some(first) = fs_rx.recv() => {
                // Coalesce a burst of inotify events into one pass.
                let mut paths: HashSet<PathBuf> = HashSet::new();
                let mut full = false;
                let note = |ev: notify::Result<notify::Event>, paths: &mut HashSet<PathBuf>, full: &mut bool| match ev {
                    Ok(ev) if is_read_only(&ev.kind) => {}
                    Ok(ev) => {
                        if matches!(ev.kind, EventKind::Other) || ev.need_rescan() || ev.paths.is_empty() {
                            *full = true;
                        }
                        paths.extend(ev.paths);
                    }
                    Err(_) => *full = true,
                };
                note(first, &mut paths, &mut full);
                while let Ok(ev) = fs_rx.try_recv() {
                    note(ev, &mut paths, &mut full);
                }
                let dir_touched = paths.iter().any(|p| p == &relay.dir || !p.starts_with(&relay.dir));
                if watch.ensure() || dir_touched || full {
                    scanner.full_scan(&link.events).await;
                } else {
                    for p in paths {
                        if let Some(name) = p.file_name() {
                            scanner.scan_one(Path::new(name), &link.events).await;
                        }
                    }
                    scanner.send_problems(&link.events).await;
                }
            }
            Some(fb) = link.feedback.recv() => {
                match fb {
                    Feedback::Expired { key } => scanner.expire(&key, &link.events).await,
                    Feedback::Unreachable { .. } => {}
                }
            }
        }
    }
}

/// Keeps an inotify watch on the directory, or on its nearest existing
/// ancestor while the directory does not exist yet.
struct WatchState {
    /// The registration directory.
    dir: PathBuf,
    /// Where the raw events go.
    tx: mpsc::UnboundedSender<notify::Result<notify::Event>>,
    /// The live watcher, the path it watches and that path's inode (a
    /// directory deleted and re-created under the same name is a new inode
    /// and needs a new watch).
    current: Option<(notify::RecommendedWatcher, PathBuf, u64)>,
}

impl WatchState {
    fn new(dir: PathBuf, tx: mpsc::UnboundedSender<notify::Result<notify::Event>>) -> Self {
        let mut s = Self {
            dir,
            tx,
            current: None,
        };
        s.ensure();
        s
    }

    /// Re-targets the watch if the directory appeared, vanished or was
    /// re-created. Returns true when the watch changed (callers then rescan).
    fn ensure(&mut self) -> bool {
        let target = if self.dir.is_dir() {
            self.dir.clone()
        } else {
            match self.dir.ancestors().skip(1).find(|p| p.is_dir()) {
                Some(p) => p.to_path_buf(),
                None => return false,
            }
        };
        let Ok(inode) = fs::metadata(&target).map(|m| m.ino()) else {
            return false;
        };
        if let Some((_, watched, ino)) = &self.current
            && *watched == target
            && *ino == inode
        {
            return false;
        }
        self.current = None;
        let tx = self.tx.clone();
        let watcher = notify::recommended_watcher(move |ev| {
            let _ = tx.send(ev);
        });
        match watcher {
            Ok(mut w) => match w.watch(&target, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    tracing::debug!(path = %target.display(), "watching");
                    self.current = Some((w, target, inode));
                    true
                }
                Err(e) => {
                    tracing::warn!(path = %target.display(), error = %e, "cannot watch; relying on periodic rescans");
                    false
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "inotify unavailable; relying on periodic rescans");
                false
            }
        }
    }
}

impl Scanner {
    async fn full_scan(&mut self, events: &mpsc::Sender<Discovery>) {
        let entries = match fs::read_dir(&self.dir) {
            Ok(rd) => {
                self.dir_problem = None;
                rd
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Fine: nothing registered yet. Everything we knew is gone.
                self.dir_problem = None;
                let names: Vec<PathBuf> = self.files.keys().cloned().collect();
                for n in names {
                    self.forget(&n, events).await;
                }
                self.send_problems(events).await;
                return;
            }
            Err(e) => {
                let since = self
                    .dir_problem
                    .as_ref()
                    .map(|p| p.1)
                    .unwrap_or_else(SystemTime::now);
                let reason =
                    format!("cannot read the registry directory: {e}; check its permissions");
                if self.dir_problem.as_ref().map(|p| &p.0) != Some(&reason) {
                    tracing::warn!(dir = %self.dir.display(), "{reason}");
                }
                self.dir_problem = Some((reason, since));
                self.send_problems(events).await;
                return;
            }
        };
        let mut present = HashSet::new();
        for entry in entries.flatten() {
            let name = PathBuf::from(entry.file_name());
            if is_candidate(&name) {
                present.insert(name);
            }
        }
        let known: Vec<PathBuf> = self.files.keys().cloned().collect();
        for n in known {
            if !present.contains(&n) {
                self.forget(&n, events).await;
            }
        }
        for n in present {
            self.scan_one(&n, events).await;
        }
        self.send_problems(events).await;
    }

    /// Re-reads one file (by name inside the directory) if it changed.
    async fn scan_one(&mut self, name: &Path, events: &mpsc::Sender<Discovery>) {
        if !is_candidate(name) {
            return;
        }
        let path = self.dir.join(name);
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(_) => {
                self.forget(name, events).await;
                return;
            }
        };
        let fingerprint = Some((
            meta.ino(),
            meta.size(),
            i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            i128::from(meta.ctime()) * 1_000_000_000 + i128::from(meta.ctime_nsec()),
        ));
        if let Some(st) = self.files.get(name)
            && st.fingerprint == fingerprint
            && !meta.file_type().is_symlink()
        {
            self.maybe_prune(name, events).await;
            return;
        }
        let outcome = self.read_registration(&path, &meta, name);
        let st = self.files.entry(name.to_path_buf()).or_insert(FileState {
            fingerprint: None,
            key: None,
            endpoint: None,
            problem: None,
        });
        st.fingerprint = fingerprint;
        match outcome {
            Ok(reg) => {
                let endpoint = endpoint_for(&reg, name, &path, &self.trust);
                st.problem = None;
                if st.key.as_deref() != Some(endpoint.key.as_str())
                    && let Some(old) = st.key.take()
                {
                    let _ = events
                        .send(Discovery::Gone {
                            key: old,
                            via: TransportKind::LocalRelay,
                        })
                        .await;
                }
                st.key = Some(endpoint.key.clone());
                if st.endpoint.as_ref() != Some(&endpoint) {
                    st.endpoint = Some(endpoint.clone());
                    tracing::debug!(file = %path.display(), key = %endpoint.key, "registration seen");
                    let _ = events.send(Discovery::Seen(endpoint)).await;
                }
            }
            Err(reason) => {
                let since = match &st.problem {
                    Some((_, since)) => *since,
                    None => {
                        tracing::warn!(file = %path.display(), "ignoring registration: {reason}");
                        SystemTime::now()
                    }
                };
                st.problem = Some((reason, since));
                self.maybe_prune(name, events).await;
            }
        }
    }

    fn read_registration(
        &self,
        path: &Path,
        meta: &fs::Metadata,
        name: &Path,
    ) -> std::result::Result<Registration, String> {
        let meta = if meta.file_type().is_symlink() {
            let target = fs::canonicalize(path).map_err(|e| format!("dangling symlink ({e})"))?;
            let dir = fs::canonicalize(&self.dir).unwrap_or_else(|_| self.dir.clone());
            if target.parent() != Some(dir.as_path()) {
                return Err("symlink leads outside the registry directory; ignored".into());
            }
            fs::metadata(&target).map_err(|e| format!("cannot stat symlink target: {e}"))?
        } else {
            meta.clone()
        };
        if !meta.is_file() {
            return Err("not a regular file; ignored".into());
        }
        if meta.len() > self.max_bytes {
            return Err(format!(
                "{} bytes is over the {}-byte limit (MAX_REGISTRATION_BYTES)",
                meta.len(),
                self.max_bytes
            ));
        }
        // O_NONBLOCK: a FIFO swapped in after the check must not hang us.
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| format!("cannot open: {e}"))?;
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.take(self.max_bytes + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| format!("cannot read: {e}"))?;
        if bytes.len() as u64 > self.max_bytes {
            return Err(format!(
                "over the {}-byte limit (MAX_REGISTRATION_BYTES)",
                self.max_bytes
            ));
        }
        let stem = name
            .file_stem()
            .and_then(OsStr::to_str)
            .unwrap_or("unnamed");
        parse_registration(&bytes, stem)
    }

    /// Deletes a file that has been broken for the whole grace period.
    async fn maybe_prune(&mut self, name: &Path, events: &mpsc::Sender<Discovery>) {
        let Some(st) = self.files.get(name) else {
            return;
        };
        let Some((reason, since)) = &st.problem else {
            return;
        };
        let broken_for = since.elapsed().unwrap_or_default();
        if broken_for < self.prune_after {
            return;
        }
        let path = self.dir.join(name);
        // Only regular files are ours to delete; odd objects stay reported.
        let is_plain_file = fs::symlink_metadata(&path)
            .map(|m| m.is_file())
            .unwrap_or(false);
        if !is_plain_file {
            return;
        }
        tracing::info!(file = %path.display(), "deleting registration broken for {}s: {reason}", broken_for.as_secs());
        if let Err(e) = fs::remove_file(&path) {
            tracing::warn!(file = %path.display(), error = %e, "cannot delete stale registration");
            return;
        }
        self.forget(name, events).await;
    }

    /// The registry gave up on `key`: delete the file that announces it.
    async fn expire(&mut self, key: &str, events: &mpsc::Sender<Discovery>) {
        let names: Vec<PathBuf> = self
            .files
            .iter()
            .filter(|(_, st)| st.key.as_deref() == Some(key))
            .map(|(n, _)| n.clone())
            .collect();
        for name in names {
            let path = self.dir.join(&name);
            if fs::symlink_metadata(&path)
                .map(|m| m.is_file())
                .unwrap_or(false)
            {
                tracing::info!(file = %path.display(), "deleting registration of an instance unreachable for the whole grace period");
                if let Err(e) = fs::remove_file(&path) {
                    tracing::warn!(file = %path.display(), error = %e, "cannot delete stale registration");
                    continue;
                }
            }
            self.forget(&name, events).await;
        }
        self.send_problems(events).await;
    }

    async fn forget(&mut self, name: &Path, events: &mpsc::Sender<Discovery>) {
        if let Some(st) = self.files.remove(name)
            && let Some(key) = st.key
        {
            // Another file may announce the same key (a rename); keep it then.
            let still = self
                .files
                .values()
                .any(|s| s.key.as_deref() == Some(key.as_str()));
            if !still {
                let _ = events
                    .send(Discovery::Gone {
                        key,
                        via: TransportKind::LocalRelay,
                    })
                    .await;
            }
        }
    }

    async fn send_problems(&mut self, events: &mpsc::Sender<Discovery>) {
        let mut problems: Vec<Problem> = self
            .files
            .iter()
            .filter_map(|(name, st)| {
                st.problem.as_ref().map(|(reason, since)| {
                    Problem::new(
                        self.dir.join(name).display().to_string(),
                        reason.clone(),
                        *since,
                    )
                })
            })
            .collect();
        if let Some((reason, since)) = &self.dir_problem {
            problems.push(Problem::new(
                self.dir.display().to_string(),
                reason.clone(),
                *since,
            ));
        }
        problems.sort_by(|a, b| a.source.cmp(&b.source));
        if problems != self.last_problems {
            self.last_problems = problems.clone();
            let _ = events
                .send(Discovery::Problems {
                    via: TransportKind::LocalRelay,
                    problems,
                })
                .await;
        }
    }
}

/// Registration files are `*.json`; dot-files are writers' temp files.
/// Whether an inotify event only says that something was opened or read.
/// notify watches IN_OPEN and IN_CLOSE_NOWRITE too, and every scan opens the
/// directory and reads files: acting on those would make each scan trigger
/// the next, a busy loop. A finished write is `Close(Write)` and still counts.
fn is_read_only(kind: &EventKind) -> bool {
    use notify::event::{AccessKind, AccessMode};
    matches!(
        kind,
        EventKind::Access(
            AccessKind::Open(_)
                | AccessKind::Read
                | AccessKind::Close(AccessMode::Read | AccessMode::Execute)
                | AccessKind::Any
                | AccessKind::Other
        )
    )
}

fn is_candidate(name: &Path) -> bool {
    let s = name.as_os_str().as_encoded_bytes();
    name.extension() == Some(OsStr::new("json")) && !s.starts_with(b".") && s.len() > 5
}

fn endpoint_for(reg: &Registration, name: &Path, path: &Path, check: &TrustCheck) -> Endpoint {
    let stem = name
        .file_stem()
        .and_then(OsStr::to_str)
        .unwrap_or("unnamed");
    let key = match &reg.id {
        Some(id) => id.clone(),
        None => format!("relay:{stem}"),
    };
    // In local mode the script registers OpenCode's own port: no tunnel.
    let reach = if reg.local_port == Some(reg.port) {
        Reach::Loopback
    } else {
        Reach::Relay
    };
    let trust = match &reg.id {
        Some(id) => check.assess(
            id,
            reg.port,
            &reg.addrs,
            reg.signature().as_ref(),
            SystemTime::now(),
        ),
        None => super::Trust::Unsigned,
    };
    Endpoint {
        trust,
        key,
        name: reg.name.clone(),
        hostname: reg.hostname.clone(),
        cwd: reg.cwd.clone(),
        addrs: vec![std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)],
        port: reg.port,
        via: TransportKind::LocalRelay,
        reach,
        source: path.display().to_string(),
        connected_at: reg.connected_at.clone(),
        signed_addrs: reg.addrs.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_visible_json_files_are_candidates() {
        assert!(is_candidate(Path::new("a.json")));
        assert!(!is_candidate(Path::new(".a.json.tmp")));
        assert!(!is_candidate(Path::new(".a.json")));
        assert!(!is_candidate(Path::new("a.txt")));
        assert!(!is_candidate(Path::new(".json")));
    }

    /// What the scanner itself does (list the directory, read a file) must
    /// not look like a change, or each scan would trigger the next; a write
    /// must. The events are real inotify events, in the order they happened.
    #[test]
    fn our_own_reads_are_not_changes_but_writes_are() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("a.json");
        fs::write(&file, b"{}").expect("write");
        let (tx, rx) = std::sync::mpsc::channel();
        let mut watcher = notify::recommended_watcher(move |ev| {
            let _ = tx.send(ev);
        })
        .expect("inotify");
        watcher
            .watch(dir.path(), RecursiveMode::NonRecursive)
            .expect("watch");

        // What a scan does.
        let listed = fs::read_dir(dir.path()).expect("read_dir").count();
        assert_eq!(listed, 1);
        assert_eq!(fs::read(&file).expect("read"), b"{}");
        // Then a real change, whose closing write ends the sequence.
        fs::write(dir.path().join("b.json"), b"{}").expect("write");

        let mut from_reads = Vec::new();
        let mut from_write = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let ev = rx
                .recv_timeout(left)
                .expect("inotify events within 10 s")
                .expect("event");
            let is_b = ev.paths.iter().any(|p| p.ends_with("b.json"));
            let done = is_b
                && matches!(
                    ev.kind,
                    EventKind::Access(notify::event::AccessKind::Close(
                        notify::event::AccessMode::Write
                    ))
                );
            if is_b {
                from_write.push(ev.kind);
            } else {
                from_reads.push(ev.kind);
            }
            if done {
                break;
            }
        }
        assert!(
            !from_reads.is_empty(),
            "inotify reports opens and reads (IN_OPEN, IN_CLOSE_NOWRITE)"
        );
        assert!(
            from_reads.iter().all(is_read_only),
            "reads taken for changes: {from_reads:?}"
        );
        // The write's create, modify and close-after-write all count.
        let counted: Vec<&EventKind> = from_write.iter().filter(|k| !is_read_only(k)).collect();
        assert!(
            counted.len() >= 2 && counted.iter().any(|k| matches!(k, EventKind::Create(_))),
            "a write ignored: {from_write:?}"
        );
    }
}
