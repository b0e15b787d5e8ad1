//! Sharing one responder between every agent of one user on one machine.
//!
//! Only one UDP socket per address receives a given unicast datagram, so the
//! agents on a machine cannot each answer for themselves. Instead:
//!
//! - Every publisher writes its record as `<id>.rec.json` into a per-user
//!   runtime directory (`$XDG_RUNTIME_DIR/opencode-agent/dnssd`, else
//!   `/tmp/opencode-agent-<uid>/dnssd`; mode 0700, owned by the user) and
//!   keeps an exclusive `flock` on that file for as long as it publishes. The
//!   file is written under a hidden temporary name, locked, then renamed into
//!   place, so a visible record file is always locked while its publisher
//!   lives. The kernel drops the lock when the publisher exits, however it
//!   exits (SIGKILL included): a record whose lock can be taken is stale and
//!   is deleted by whoever notices. No pids, no heartbeats.
//! - Every publisher competes for `responder-<port>.lock` (non-blocking
//!   `flock`, retried every [`HostOptions::takeover_poll`]). The holder binds
//!   `<addr>:<port>` for every tailnet (or loopback) address found in the live
//!   records and answers each query from the records on disk at that moment.
//!   When the holder exits, its lock goes with it and the next publisher to
//!   poll takes over: the socket moves, the records stay.
//!
//! This module owns the runtime directory and the election. It must not
//! decide what is published (the agent builds the [`InstanceRecord`]) nor
//! find the tailnet addresses (see [`crate::tailscale`]).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::responder::{RecordSource, bind_udp, serve};
use super::{DEFAULT_PORT, DEFAULT_TTL, InstanceRecord, is_servable};
use crate::error::{Error, Result};

/// Suffix of record files.
const RECORD_SUFFIX: &str = ".rec.json";
/// Largest record file read.
const MAX_RECORD_BYTES: u64 = 64 * 1024;
/// Version of the record file format.
const FILE_VERSION: u32 = 1;

/// Settings of [`publish`].
#[derive(Debug, Clone)]
pub struct HostOptions {
    /// The per-user runtime directory shared by the publishers.
    pub dir: PathBuf,
    /// UDP port answered on (every publisher of a host must use the same one
    /// to share it; the MCP servers must query it).
    pub port: u16,
    /// TTL on the records.
    pub ttl: u32,
    /// How often a standby publisher tries to take the responder over.
    pub takeover_poll: Duration,
    /// How often the holder re-reads the directory to bind new addresses.
    pub rescan: Duration,
}

impl HostOptions {
    /// The defaults with `port`: [`default_dir`], TTL 10 s, take-over poll
    /// 250 ms, rescan 1 s.
    pub fn new(port: u16) -> Self {
        Self {
            dir: default_dir(),
            port,
            ttl: DEFAULT_TTL,
            takeover_poll: Duration::from_millis(250),
            rescan: Duration::from_secs(1),
        }
    }
}

impl Default for HostOptions {
    fn default() -> Self {
        Self::new(DEFAULT_PORT)
    }
}

/// What a publication is doing about the responder socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Another publisher holds the responder; this one waits to take over.
    Standby,
    /// This publication holds the responder and answers on these addresses
    /// (empty while no address could be bound yet).
    Serving {
        /// Bound addresses.
        addrs: Vec<SocketAddr>,
    },
}

/// The current user's effective uid.
fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// `$XDG_RUNTIME_DIR/opencode-agent/dnssd` when XDG_RUNTIME_DIR names an
/// existing absolute directory, else `/tmp/opencode-agent-<uid>/dnssd`.
pub fn default_dir() -> PathBuf {
    match std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from) {
        Some(p) if p.is_absolute() && p.is_dir() => p.join("opencode-agent").join("dnssd"),
        _ => std::env::temp_dir()
            .join(format!("opencode-agent-{}", euid()))
            .join("dnssd"),
    }
}

/// On disk: one record and who wrote it.
#[derive(Debug, Serialize, Deserialize)]
struct RecordFile {
    /// File format version.
    v: u32,
    /// Writer's pid (for humans; liveness is the lock).
    pid: u32,
    /// The record.
    record: InstanceRecord,
}

fn io_err(action: &'static str, path: &Path, source: io::Error) -> Error {
    Error::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Creates `dir` (and the parents it needs) with mode 0700 and checks that
/// it is a real directory owned by us that nobody else can write: in the
/// `/tmp` fallback, another user could have created it first.
pub fn ensure_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        fs::create_dir_all(dir).map_err(|e| io_err("creating", dir, e))?;
        // The parent we may have created in /tmp must be private too.
        for d in [dir.parent(), Some(dir)].into_iter().flatten() {
            if let Ok(m) = fs::symlink_metadata(d)
                && m.uid() == euid()
                && m.is_dir()
            {
                let _ = fs::set_permissions(d, fs::Permissions::from_mode(0o700));
            }
        }
    }
    let m = fs::symlink_metadata(dir).map_err(|e| io_err("inspecting", dir, e))?;
    if !m.is_dir() {
        return Err(Error::Dnssd(format!(
            "{} is not a directory (a symlink or file is in the way); remove it",
            dir.display()
        )));
    }
    if m.uid() != euid() {
        return Err(Error::Dnssd(format!(
            "{} belongs to uid {}, not to us (uid {}); remove it or set XDG_RUNTIME_DIR",
            dir.display(),
            m.uid(),
            euid()
        )));
    }
    if m.mode() & 0o022 != 0 {
        return Err(Error::Dnssd(format!(
            "{} is writable by others (mode {:o}); run `chmod 700` on it",
            dir.display(),
            m.mode() & 0o777
        )));
    }
    Ok(())
}

/// `flock(fd, op | LOCK_NB)`: Ok(true) when taken, Ok(false) when someone
/// else holds a conflicting lock.
fn try_flock(f: &File, op: libc::c_int) -> io::Result<bool> {
    // SAFETY: the fd is valid for the lifetime of `f`.
    let r = unsafe { libc::flock(f.as_raw_fd(), op | libc::LOCK_NB) };
    if r == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// The record file name for `record`: its TXT `id` (else its label), cut
/// and reduced to `A-Z a-z 0-9 . _ -`.
pub fn record_file_name(record: &InstanceRecord) -> String {
    let key = record
        .txt
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("id"))
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
        .unwrap_or(&record.label);
    let mut clean: String = key
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(120)
        .collect();
    if clean.starts_with('.') || clean.is_empty() {
        clean.insert(0, '_');
    }
    format!("{clean}{RECORD_SUFFIX}")
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Writes `record` to `path` through a locked temporary file; returns the
/// file, still locked.
fn write_locked(dir: &Path, path: &Path, record: &InstanceRecord) -> Result<File> {
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("record"),
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let body = serde_json::to_vec_pretty(&RecordFile {
        v: FILE_VERSION,
        pid: std::process::id(),
        record: record.clone(),
    })
    .map_err(|e| Error::Dnssd(format!("cannot encode the record: {e}")))?;
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(|e| io_err("creating", &tmp, e))?;
        if !try_flock(&f, libc::LOCK_EX).map_err(|e| io_err("locking", &tmp, e))? {
            return Err(Error::Dnssd(format!(
                "{} is locked by someone else",
                tmp.display()
            )));
        }
        f.write_all(&body).map_err(|e| io_err("writing", &tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| io_err("renaming into", path, e))?;
        Ok(f)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Removes `path` if it still is the inode `f` has open.
fn remove_if_same(path: &Path, f: &File) {
    if let (Ok(ours), Ok(there)) = (f.metadata(), fs::symlink_metadata(path))
        && ours.ino() == there.ino()
        && ours.dev() == there.dev()
    {
        let _ = fs::remove_file(path);
    }
}

/// The records of every live publisher in `dir`, sorted by file name.
/// Records whose publisher is gone (their lock can be taken) are deleted.
pub fn live_records(dir: &Path) -> Vec<InstanceRecord> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(RECORD_SUFFIX) && !n.starts_with('.'))
        })
        .collect();
    names.sort();
    let mut out = Vec::new();
    for path in names {
        let Ok(f) = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
        else {
            continue;
        };
        if !f.metadata().is_ok_and(|m| m.is_file()) {
            continue;
        }
        match try_flock(&f, libc::LOCK_SH) {
            Ok(true) => {
                // Nobody holds it: its publisher is gone.
                tracing::debug!(path = %path.display(), "removing a record whose publisher is gone");
                remove_if_same(&path, &f);
                continue;
            }
            Ok(false) => {}
            Err(_) => continue,
        }
        let mut body = Vec::new();
        if (&f).take(MAX_RECORD_BYTES).read_to_end(&mut body).is_err() {
            continue;
        }
        match serde_json::from_slice::<RecordFile>(&body) {
            Ok(rf) if rf.v == FILE_VERSION && rf.record.is_valid() => out.push(rf.record),
            Ok(_) => tracing::debug!(path = %path.display(), "ignoring an unusable record file"),
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "ignoring an unreadable record file")
            }
        }
    }
    out
}

/// The records of a runtime directory, read afresh at each query.
struct DirSource {
    /// The runtime directory.
    dir: PathBuf,
}

impl RecordSource for DirSource {
    fn records(&self) -> Vec<InstanceRecord> {
        live_records(&self.dir)
    }
}

/// A published record. Dropping it withdraws the record and, if it holds
/// the responder, hands the socket over to the next publisher.
pub struct Publication {
    /// The record file.
    path: PathBuf,
    /// The record file, open and exclusively locked (the liveness token).
    file: File,
    /// The runtime directory.
    dir: PathBuf,
    /// The publication's role, as the election task sees it.
    role: watch::Receiver<Role>,
    /// Stops the election task (and the responder, if held).
    stop: CancellationToken,
}

impl std::fmt::Debug for Publication {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publication")
            .field("path", &self.path)
            .field("role", &*self.role.borrow())
            .finish()
    }
}

/// Publishes `record` for this host: writes its record file and joins the
/// election for the responder on `opts.port`. Returns once the record is on
/// disk and, if this call won the election, the responder is bound (so an
/// answerable record is answerable when this returns). Must be called inside
/// a tokio runtime.
///
/// Fails when the record is unusable, the runtime directory is unsafe, or the
/// same instance id is already published by a live publisher.
pub fn publish(record: InstanceRecord, opts: HostOptions) -> Result<Publication> {
    let handle = tokio::runtime::Handle::try_current()
        .map_err(|_| Error::Dnssd("publish() must be called inside a tokio runtime".into()))?;
    if !record.is_valid() {
        return Err(Error::Dnssd(format!(
            "record {:?} / host {:?} cannot be encoded as DNS names",
            record.label, record.host
        )));
    }
    ensure_dir(&opts.dir)?;
    let path = opts.dir.join(record_file_name(&record));
    if let Ok(existing) = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&path)
        && !try_flock(&existing, libc::LOCK_SH).unwrap_or(true)
    {
        return Err(Error::Dnssd(format!(
            "instance {} is already published on this host by a running process ({})",
            record.label,
            path.display()
        )));
    }
    let file = write_locked(&opts.dir, &path, &record)?;
    let stop = CancellationToken::new();
    let source: Arc<dyn RecordSource> = Arc::new(DirSource {
        dir: opts.dir.clone(),
    });
    let lock_path = opts.dir.join(format!("responder-{}.lock", opts.port));
    let mut election = Election {
        opts: opts.clone(),
        lock_path,
        source,
        holder: None,
    };
    // First attempt now, so that a winner serves before publish() returns.
    let first = election.try_take();
    let (role_tx, role_rx) = watch::channel(election.role());
    if let Err(e) = first {
        tracing::warn!(error = %e, "cannot compete for the tailnet DNS-SD responder yet");
    }
    handle.spawn(election.run(stop.clone(), role_tx));
    Ok(Publication {
        path,
        file,
        dir: opts.dir,
        role: role_rx,
        stop,
    })
}

impl Publication {
    /// Replaces the published record (new TXT, port or addresses); the
    /// instance id must stay the same (it names the file).
    pub fn update(&mut self, record: InstanceRecord) -> Result<()> {
        if !record.is_valid() {
            return Err(Error::Dnssd(format!(
                "record {:?} cannot be encoded as DNS names",
                record.label
            )));
        }
        let path = self.dir.join(record_file_name(&record));
        if path != self.path {
            return Err(Error::Dnssd(
                "update() cannot change the instance id; withdraw and publish again".into(),
            ));
        }
        self.file = write_locked(&self.dir, &self.path, &record)?;
        Ok(())
    }

    /// The current role.
    pub fn role(&self) -> Role {
        self.role.borrow().clone()
    }

    /// A receiver that sees every role change.
    pub fn watch_role(&self) -> watch::Receiver<Role> {
        self.role.clone()
    }

    /// The record file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Publication {
    fn drop(&mut self) {
        remove_if_same(&self.path, &self.file);
        self.stop.cancel();
    }
}

/// The responder, while this publication holds it.
struct Holder {
    /// `responder-<port>.lock`, exclusively locked.
    _lock: File,
    /// One serving task per bound address.
    sockets: BTreeMap<SocketAddr, (CancellationToken, JoinHandle<()>)>,
    /// Addresses whose bind failed, to log each failure once.
    failed: BTreeSet<SocketAddr>,
}

/// One publication's side of the election.
struct Election {
    /// Settings.
    opts: HostOptions,
    /// The lock file path.
    lock_path: PathBuf,
    /// The records to answer with.
    source: Arc<dyn RecordSource>,
    /// Set while holding the responder.
    holder: Option<Holder>,
}

impl Election {
    fn role(&self) -> Role {
        match &self.holder {
            None => Role::Standby,
            Some(h) => Role::Serving {
                addrs: h.sockets.keys().copied().collect(),
            },
        }
    }

    /// Tries to take the responder lock; binds when taken.
    fn try_take(&mut self) -> Result<()> {
        if self.holder.is_some() {
            return Ok(());
        }
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&self.lock_path)
            .map_err(|e| io_err("opening", &self.lock_path, e))?;
        if try_flock(&lock, libc::LOCK_EX).map_err(|e| io_err("locking", &self.lock_path, e))? {
            tracing::info!(
                port = self.opts.port,
                "serving tailnet DNS-SD for this host"
            );
            self.holder = Some(Holder {
                _lock: lock,
                sockets: BTreeMap::new(),
                failed: BTreeSet::new(),
            });
            self.sync();
        }
        Ok(())
    }

    /// Binds every servable address of the live records, and stops serving
    /// addresses no record has any more.
    fn sync(&mut self) {
        let Some(h) = self.holder.as_mut() else {
            return;
        };
        let want: BTreeSet<SocketAddr> = self
            .source
            .records()
            .iter()
            .flat_map(|r| r.addrs.iter().copied())
            .filter(is_servable)
            .map(|ip| SocketAddr::new(ip, self.opts.port))
            .collect();
        h.sockets.retain(|a, (stop, _)| {
            let keep = want.contains(a);
            if !keep {
                stop.cancel();
            }
            keep
        });
        h.failed.retain(|a| want.contains(a));
        for a in want {
            if h.sockets.contains_key(&a) {
                continue;
            }
            match bind_udp(a) {
                Ok(sock) => {
                    h.failed.remove(&a);
                    let stop = CancellationToken::new();
                    let task = tokio::spawn(serve(
                        sock,
                        self.source.clone(),
                        self.opts.ttl,
                        stop.clone(),
                    ));
                    tracing::debug!(addr = %a, "tailnet DNS-SD responder bound");
                    h.sockets.insert(a, (stop, task));
                }
                Err(e) => {
                    if h.failed.insert(a) {
                        tracing::warn!(addr = %a, error = %e, "cannot bind the tailnet DNS-SD responder; retrying");
                    }
                }
            }
        }
    }

    /// Closes every socket, waits for their tasks, then drops the lock (so the
    /// next holder never shares the address with a closing socket).
    async fn release(&mut self) {
        if let Some(mut h) = self.holder.take() {
            let tasks: Vec<JoinHandle<()>> = std::mem::take(&mut h.sockets)
                .into_values()
                .map(|(stop, task)| {
                    stop.cancel();
                    task
                })
                .collect();
            for t in tasks {
                let _ = t.await;
            }
            drop(h);
        }
    }

    async fn run(mut self, stop: CancellationToken, role_tx: watch::Sender<Role>) {
        loop {
            let wait = if self.holder.is_some() {
                self.opts.rescan
            } else {
                self.opts.takeover_poll
            };
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
            if self.holder.is_some() {
                self.sync();
            } else if let Err(e) = self.try_take() {
                tracing::debug!(error = %e, "tailnet DNS-SD election attempt failed");
            }
            let role = self.role();
            role_tx.send_if_modified(|r| {
                if *r != role {
                    *r = role;
                    true
                } else {
                    false
                }
            });
        }
        self.release().await;
        let _ = role_tx.send(Role::Standby);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::announce::txt::Announcement;

    fn rec(id: &str) -> InstanceRecord {
        let a = Announcement {
            id: id.into(),
            name: format!("n-{id}"),
            ..Default::default()
        };
        InstanceRecord::new(
            &format!("n-{id}"),
            "h.local",
            4096,
            &a,
            vec!["127.0.0.1".parse().unwrap()],
        )
    }

    fn tmpdir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn file_names_are_safe() {
        let mut r = rec("ab:cd/..");
        assert_eq!(record_file_name(&r), "ab_cd_...rec.json");
        r.txt.retain(|(k, _)| k != "id");
        r.label = ".hidden".into();
        assert_eq!(record_file_name(&r), "_.hidden.rec.json");
    }

    #[test]
    fn unsafe_directories_are_refused() {
        let t = tmpdir();
        let d = t.path().join("x");
        ensure_dir(&d).unwrap();
        assert_eq!(fs::metadata(&d).unwrap().mode() & 0o777, 0o700);
        fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(
            ensure_dir(&d)
                .unwrap_err()
                .to_string()
                .contains("writable by others")
        );
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&d, &link).unwrap();
        assert!(ensure_dir(&link).is_err());
    }

    #[test]
    fn locked_records_are_live_and_unlocked_ones_are_removed() {
        let t = tmpdir();
        let d = t.path().join("d");
        ensure_dir(&d).unwrap();
        let r = rec("live");
        let path = d.join(record_file_name(&r));
        let f = write_locked(&d, &path, &r).unwrap();
        assert_eq!(live_records(&d), vec![r.clone()]);
        // Same content, but its writer is gone.
        let stale = rec("stale");
        let spath = d.join(record_file_name(&stale));
        drop(write_locked(&d, &spath, &stale).unwrap());
        assert!(spath.exists());
        assert_eq!(live_records(&d), vec![r]);
        assert!(!spath.exists(), "stale record removed");
        // No temporary files left behind.
        let names: Vec<String> = fs::read_dir(&d)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        drop(f);
        assert!(live_records(&d).is_empty());
    }

    #[tokio::test]
    async fn one_id_cannot_be_published_twice() {
        let t = tmpdir();
        let mut o = HostOptions::new(0);
        o.dir = t.path().join("d");
        // Port 0 binds an ephemeral port: fine for this test.
        let p = publish(rec("one"), o.clone()).unwrap();
        let err = publish(rec("one"), o.clone()).unwrap_err();
        assert!(err.to_string().contains("already published"), "{err}");
        drop(p);
        let _again = publish(rec("one"), o).unwrap();
    }
}
