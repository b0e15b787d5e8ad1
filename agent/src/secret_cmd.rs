//! `opencode-agent secret init | import | path`: create the fleet secret file,
//! store one copied from another machine, or say where the file is.
//!
//! This module owns what these commands read and print. The secret's text
//! form, its file and its permissions belong to [`opencode_mcp::secret`].
//! The secret is printed only by `init`, on the standard output of the user
//! who asked for it; it must never reach a log line, an error or stderr.

use std::io::{BufRead, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};

use opencode_mcp::secret::{FleetSecret, MAX_TEXT_BYTES, SECRET_ENV};
use opencode_mcp::{Error, Result};

use crate::advertise::ssh::sh_quote;
use crate::cli::SecretCommand;

/// Runs a `secret` subcommand against the real environment, stdin and
/// stdout; returns the exit code (errors are printed to stderr).
pub fn main(cmd: &SecretCommand) -> i32 {
    let env_set = std::env::var_os(SECRET_ENV).is_some_and(|v| !v.is_empty());
    let mut out = std::io::stdout().lock();
    let mut note = std::io::stderr();
    let result = match cmd {
        SecretCommand::Init(a) => file_path(a.path.as_deref())
            .and_then(|p| init(&p, a.force, env_set, &mut out, &mut note)),
        SecretCommand::Import(a) => file_path(a.path.as_deref()).and_then(|p| {
            let input = read_input(&mut note)?;
            import(&p, a.force, &input, env_set, &mut out, &mut note)
        }),
        SecretCommand::Path(a) => {
            file_path(a.path.as_deref()).and_then(|p| show_path(&p, env_set, &mut out, &mut note))
        }
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("opencode-agent: {e}");
            1
        }
    }
}

/// `--path`, or the library's default secret file.
fn file_path(given: Option<&Path>) -> Result<PathBuf> {
    match given {
        Some(p) if p.as_os_str().is_empty() => {
            Err(Error::Secret("--path must not be empty".into()))
        }
        Some(p) => Ok(p.to_path_buf()),
        None => FleetSecret::default_path(),
    }
}

/// `secret init`: creates the file, then prints the secret and how to copy it.
pub fn init(
    path: &Path,
    force: bool,
    env_set: bool,
    out: &mut dyn Write,
    note: &mut dyn Write,
) -> Result<()> {
    let secret = FleetSecret::save_new(path, force)?;
    let shown = path.display().to_string();
    let text = secret.to_export_string();
    let agent = "opencode-agent";
    let message = format!(
        "Created the fleet secret in {shown} (mode 0600).\n\
         \n\
         Every machine that runs opencode-agent or opencode-mcp needs this same secret.\n\
         Copy it to another machine without showing it, from here:\n\
         \n  ssh OTHER-MACHINE {agent} secret import < {file}\n\
         \n\
         or run this there and paste the secret when asked:\n\
         \n  {agent} secret import\n\
         \n\
         or give it to opencode-agent and opencode-mcp in their environment instead:\n\
         \n  export {SECRET_ENV}={quoted}\n\
         \n\
         The secret (shown this once; `{agent} secret path` finds the file later):\n\
         \n  {text}\n\
         \n\
         Treat it like a password: whoever has it can drive your OpenCode instances.\n",
        file = sh_quote(&shown),
        quoted = sh_quote(&text),
    );
    write_all(out, &message)?;
    if env_set {
        env_note(note)?;
    }
    Ok(())
}

/// `secret import`: stores the secret in `input` (text, as `init` prints it).
pub fn import(
    path: &Path,
    force: bool,
    input: &str,
    env_set: bool,
    out: &mut dyn Write,
    note: &mut dyn Write,
) -> Result<()> {
    if input.trim().is_empty() {
        return Err(Error::Secret(
            "nothing was read from standard input; pipe the secret in \
             (opencode-agent secret import < FILE) or paste it when asked"
                .into(),
        ));
    }
    let secret = FleetSecret::from_text(input)?;
    let existed = path.exists();
    let current = if existed && !force {
        // An unreadable or unsafe file is reported as it is, with the way out.
        FleetSecret::load(None, path).map_err(|e| match e {
            Error::Secret(m) => Error::Secret(format!("{m}; or pass --force to replace the file")),
            other => other,
        })?
    } else {
        None
    };
    if current.is_some_and(|c| c == secret) {
        write_all(
            out,
            &format!(
                "{} already holds this fleet secret; nothing changed.\n",
                path.display()
            ),
        )?;
    } else {
        secret.save(path, force)?;
        let verb = if existed { "Replaced" } else { "Stored" };
        write_all(
            out,
            &format!(
                "{verb} the fleet secret in {} (mode 0600).\n",
                path.display()
            ),
        )?;
    }
    if env_set {
        env_note(note)?;
    }
    Ok(())
}

/// `secret path`: prints the file's path on stdout, and on stderr whether it
/// exists and whether the environment overrides it.
pub fn show_path(
    path: &Path,
    env_set: bool,
    out: &mut dyn Write,
    note: &mut dyn Write,
) -> Result<()> {
    write_all(out, &format!("{}\n", path.display()))?;
    if !path.exists() {
        write_all(
            note,
            "(no file there yet: create one with `opencode-agent secret init`, \
             or copy one with `opencode-agent secret import`)\n",
        )?;
    }
    if env_set {
        env_note(note)?;
    }
    Ok(())
}

fn env_note(note: &mut dyn Write) -> Result<()> {
    write_all(
        note,
        &format!(
            "note: {SECRET_ENV} is set in this environment, and it wins over the file; \
             unset it where the file should be used\n"
        ),
    )
}

/// Reads the secret from stdin: one line on a terminal (after a prompt on
/// `note`), else everything up to the size cap.
fn read_input(note: &mut dyn Write) -> Result<String> {
    let stdin = std::io::stdin();
    let read_err = |source| Error::Io {
        action: "reading the secret from",
        path: PathBuf::from("standard input"),
        source,
    };
    let mut text = String::new();
    if stdin.is_terminal() {
        write_all(note, "Paste the fleet secret and press Enter: ")?;
        stdin
            .lock()
            .take(MAX_TEXT_BYTES as u64 + 2)
            .read_line(&mut text)
            .map_err(read_err)?;
    } else {
        stdin
            .lock()
            .take(MAX_TEXT_BYTES as u64 + 2)
            .read_to_string(&mut text)
            .map_err(read_err)?;
    }
    Ok(text)
}

fn write_all(w: &mut dyn Write, s: &str) -> Result<()> {
    w.write_all(s.as_bytes())
        .and_then(|()| w.flush())
        .map_err(|source| Error::Io {
            action: "printing to",
            path: PathBuf::from("the terminal"),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn init_creates_a_private_file_and_prints_how_to_copy_it() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("cfg/opencode-mcp/secret");
        let (mut out, mut note) = (Vec::new(), Vec::new());
        init(&path, false, false, &mut out, &mut note).unwrap();
        let out = String::from_utf8(out).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        let secret = FleetSecret::load(None, &path).unwrap().unwrap();
        let text = secret.to_export_string();
        assert!(
            out.contains(&format!("export {SECRET_ENV}='{text}'")),
            "{out}"
        );
        assert!(out.contains("secret import <"), "{out}");
        assert!(note.is_empty());
        // A second init keeps the first secret; --force replaces it.
        let (mut out2, mut note2) = (Vec::new(), Vec::new());
        let err = init(&path, false, false, &mut out2, &mut note2).unwrap_err();
        assert!(err.to_string().contains("--force"), "{err}");
        assert!(out2.is_empty());
        assert_eq!(
            FleetSecret::load(None, &path).unwrap(),
            Some(secret.clone())
        );
        init(&path, true, true, &mut out2, &mut note2).unwrap();
        assert_ne!(FleetSecret::load(None, &path).unwrap(), Some(secret));
        assert!(String::from_utf8(note2).unwrap().contains(SECRET_ENV));
    }

    #[test]
    fn import_stores_what_init_printed_and_keeps_a_different_secret() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("secret");
        let given = FleetSecret::generate().unwrap();
        let input = format!("{}\n", given.to_export_string());
        let (mut out, mut note) = (Vec::new(), Vec::new());
        import(&path, false, &input, false, &mut out, &mut note).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(FleetSecret::load(None, &path).unwrap(), Some(given.clone()));
        assert!(String::from_utf8(out).unwrap().starts_with("Stored"));
        // Importing the same secret again is fine and changes nothing.
        let mut out = Vec::new();
        import(&path, false, &input, false, &mut out, &mut note).unwrap();
        assert!(String::from_utf8(out).unwrap().contains("nothing changed"));
        // Another secret needs --force.
        let other = FleetSecret::generate().unwrap().to_export_string();
        let mut out = Vec::new();
        let err = import(&path, false, &other, false, &mut out, &mut note).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("--force") && !msg.contains(&other), "{msg}");
        assert_eq!(FleetSecret::load(None, &path).unwrap(), Some(given));
        import(&path, true, &other, false, &mut out, &mut note).unwrap();
        assert_eq!(
            FleetSecret::load(None, &path).unwrap(),
            Some(FleetSecret::from_text(&other).unwrap())
        );
        assert!(String::from_utf8(out).unwrap().contains("Replaced"));
    }

    #[test]
    fn import_refuses_empty_or_weak_input_without_echoing_it() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("secret");
        let (mut out, mut note) = (Vec::new(), Vec::new());
        let err = import(&path, false, " \n", false, &mut out, &mut note).unwrap_err();
        assert!(err.to_string().contains("standard input"), "{err}");
        let err = import(&path, false, "hunter2\n", false, &mut out, &mut note).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("16") && !msg.contains("hunter2"), "{msg}");
        assert!(!path.exists());
        assert!(out.is_empty());
        // An unsafe existing file is reported with both ways out.
        let good = FleetSecret::generate().unwrap();
        good.save(&path, false).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let text = good.to_export_string();
        let err = import(&path, false, &text, false, &mut out, &mut note).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("chmod 600") && msg.contains("--force"),
            "{msg}"
        );
        import(&path, true, &text, false, &mut out, &mut note).unwrap();
        assert_eq!(mode(&path), 0o600);
    }

    #[test]
    fn path_prints_the_file_and_notes_what_matters() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("secret");
        let (mut out, mut note) = (Vec::new(), Vec::new());
        show_path(&path, true, &mut out, &mut note).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            format!("{}\n", path.display())
        );
        let note = String::from_utf8(note).unwrap();
        assert!(
            note.contains("secret init") && note.contains(SECRET_ENV),
            "{note}"
        );
        assert!(file_path(Some(Path::new(""))).is_err());
        assert_eq!(file_path(Some(&path)).unwrap(), path);
    }
}
