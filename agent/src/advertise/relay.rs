//! The local relay registration (`--relay-dir DIR`): one JSON file
//! `DIR/<name>-<id>.json` in the shared [`Registration`] format, written
//! atomically (temp file + rename, mode 0600, directory 0700) by the library
//! helper [`write_registration`], rewritten every
//! heartbeat ([`Advert::heartbeat`]; it also restores the file if a server pruned
//! it), and removed on stop.
//!
//! This module must not health-check OpenCode or delete anyone else's files.
//!
//! [`Registration`]: opencode_mcp::announce::Registration

use std::path::{Path, PathBuf};

use opencode_mcp::announce::{remove_registration, write_registration};
use tokio::task::JoinHandle;

use super::Advert;
use crate::error::{AgentError, Result};

/// A local registration kept alive by a heartbeat task.
pub struct RelayDir {
    /// The registration directory.
    dir: PathBuf,
    /// `<name>-<id>.json`.
    file_name: String,
    /// Rewrites the file every heartbeat.
    heartbeat: JoinHandle<()>,
}

fn write(dir: &Path, file_name: &str, advert: &Advert) -> Result<PathBuf> {
    let reg = advert.registration(advert.port);
    write_registration(dir, file_name, &reg).map_err(|source| AgentError::RelayWrite {
        path: dir.join(file_name),
        source,
    })
}

impl RelayDir {
    /// Writes the registration now (an error here is returned) and starts
    /// the heartbeat (whose errors are logged and retried).
    pub fn start(dir: &Path, advert: &Advert) -> Result<Self> {
        let file_name = advert.file_name();
        let path = write(dir, &file_name, advert)?;
        tracing::info!(file = %path.display(), "relay registration written");
        let heartbeat = {
            let (dir, file_name, advert) = (dir.to_path_buf(), file_name.clone(), advert.clone());
            tokio::spawn(async move {
                let every = advert.heartbeat;
                let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                loop {
                    tick.tick().await;
                    match write(&dir, &file_name, &advert) {
                        Ok(p) => {
                            tracing::debug!(file = %p.display(), "relay registration refreshed")
                        }
                        Err(e) => tracing::warn!("{e}"),
                    }
                }
            })
        };
        Ok(RelayDir {
            dir: dir.to_path_buf(),
            file_name,
            heartbeat,
        })
    }

    /// Stops the heartbeat and removes the registration.
    pub async fn stop(self) {
        self.heartbeat.abort();
        let _ = self.heartbeat.await;
        let path = self.dir.join(&self.file_name);
        match remove_registration(&self.dir, &self.file_name) {
            Ok(()) => tracing::info!(file = %path.display(), "relay registration removed"),
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot remove the relay registration; remove it by hand")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::advertise::HEARTBEAT;
    use crate::advertise::tests::sample_advert;
    use opencode_mcp::announce::parse_registration;

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn writes_refreshes_and_removes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("reg");
        let advert = sample_advert();
        let relay = RelayDir::start(&dir, &advert).unwrap();
        let path = dir.join("box-proj-0123456789abcdef.json");
        let reg = parse_registration(&std::fs::read(&path).unwrap(), "x").unwrap();
        assert_eq!(reg.port, 4500);
        assert_eq!(reg.local_port, Some(4500));
        assert_eq!(reg.id.as_deref(), Some("0123456789abcdef"));
        assert_eq!(reg.pid, Some(42));
        assert_eq!(reg.connected_at.as_deref(), Some("2026-03-14T10:30:00Z"));

        // A server pruned it: the next heartbeat puts it back.
        std::fs::remove_file(&path).unwrap();
        tokio::time::sleep(HEARTBEAT + std::time::Duration::from_secs(1)).await;
        assert!(path.exists());

        relay.stop().await;
        assert!(!path.exists());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn every_heartbeat_rewrite_is_signed_anew() {
        let secret = opencode_mcp::secret::FleetSecret::from_text(&"ab".repeat(32)).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("reg");
        let mut advert = sample_advert();
        advert.secret = Some(secret.clone());
        let relay = RelayDir::start(&dir, &advert).unwrap();
        let path = dir.join("box-proj-0123456789abcdef.json");
        let read = || parse_registration(&std::fs::read(&path).unwrap(), "x").unwrap();
        let verify = |reg: &opencode_mcp::announce::Registration| {
            let at = reg.at.expect("signed");
            let sig = reg.sig.as_deref().expect("signed");
            assert_eq!(reg.addrs, vec![std::net::IpAddr::from([127, 0, 0, 1])]);
            secret
                .verify("0123456789abcdef", 4500, &reg.addrs, at, sig)
                .map(|()| at)
        };
        let first = verify(&read()).expect("the first write verifies");

        // The wall clock moves on (the signing time is wall-clock seconds);
        // the next heartbeat signs again, later.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        tokio::time::sleep(HEARTBEAT + std::time::Duration::from_secs(1)).await;
        let second = verify(&read()).expect("the rewrite verifies");
        assert!(second > first, "re-signed: at {first} then {second}");
        relay.stop().await;
    }

    #[test]
    fn unwritable_directory_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("not-a-dir");
        std::fs::write(&file, "x").unwrap();
        let err = match RelayDir::start(&file, &sample_advert()) {
            Err(e) => e,
            Ok(_) => panic!("a file is not a directory"),
        };
        assert!(err.to_string().contains("--relay-dir"), "{err}");
    }
}
