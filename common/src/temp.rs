//! Temporary files and folders beside an output, made so that a finished output has the mode
//! `cp` or a shell redirect would give it (0666 / 0777 less the umask, as `open(2)` applies it),
//! and so that an interrupted tool leaves none behind: each is registered until it is renamed
//! into place or dropped, and [`crate::exit::run_main`] removes what is registered on SIGINT,
//! SIGTERM or SIGHUP.

use anyhow::{Context, Result};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tempfile::{NamedTempFile, TempDir};

static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn register(p: &Path) {
    if let Ok(mut l) = LIVE.lock() {
        l.push(p.to_path_buf());
    }
}

/// Forget a temporary path (it was renamed into place or removed).
pub fn unregister(p: &Path) {
    if let Ok(mut l) = LIVE.lock() {
        l.retain(|x| x != p);
    }
}

/// Remove every registered temporary path (on a signal). Returns how many were removed.
pub fn remove_all() -> usize {
    let paths = match LIVE.lock() {
        Ok(mut l) => std::mem::take(&mut *l),
        Err(_) => return 0,
    };
    paths
        .iter()
        .filter(|p| {
            if p.is_dir() {
                std::fs::remove_dir_all(p).is_ok()
            } else {
                std::fs::remove_file(p).is_ok()
            }
        })
        .count()
}

/// [`remove_all`] from a synchronous signal handler (SIGBUS): never waits for the lock.
pub fn remove_all_now() {
    if let Ok(l) = LIVE.try_lock() {
        for p in l.iter() {
            let _ = std::fs::remove_file(p).or_else(|_| std::fs::remove_dir_all(p));
        }
    }
}

/// The folder an output goes in (`.` for a bare file name).
pub fn parent_of(dest: &Path) -> PathBuf {
    match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn hidden_prefix(dest: &Path) -> String {
    format!(
        ".{}.",
        dest.file_name().and_then(|n| n.to_str()).unwrap_or("out")
    )
}

/// Fail now, not after hours of work, when an output cannot be written: its folder must exist
/// and take a new file. `flag` names the output in the message.
pub fn check_writable(path: &str, flag: &str) -> Result<()> {
    let p = Path::new(path);
    let dir = parent_of(p);
    if p.is_dir() {
        anyhow::bail!("{flag} {path}: is a directory");
    }
    tempfile::Builder::new()
        .prefix(".cf-check.")
        .tempfile_in(&dir)
        .map(drop)
        .with_context(|| format!("{flag} {path}: cannot write in {}", dir.display()))
}

/// A temporary file beside `dest` (`.NAME.XXXXXX.tmp`), for [`persist`] to rename into place.
pub fn file_beside(dest: &Path) -> Result<NamedTempFile> {
    let dir = parent_of(dest);
    let t = tempfile::Builder::new()
        .prefix(&hidden_prefix(dest))
        .suffix(".tmp")
        .permissions(std::fs::Permissions::from_mode(0o666))
        .tempfile_in(&dir)
        .with_context(|| {
            format!(
                "{}: cannot create a file in {}",
                dest.display(),
                dir.display()
            )
        })?;
    register(t.path());
    Ok(t)
}

/// A temporary folder beside `dest`, to fill and then rename into place with [`persist_dir`].
pub fn dir_beside(dest: &Path) -> Result<TempDir> {
    let dir = parent_of(dest);
    let t = tempfile::Builder::new()
        .prefix(&hidden_prefix(dest))
        .suffix(".tmp")
        .permissions(std::fs::Permissions::from_mode(0o777))
        .tempdir_in(&dir)
        .with_context(|| {
            format!(
                "{}: cannot create a directory in {}",
                dest.display(),
                dir.display()
            )
        })?;
    register(t.path());
    Ok(t)
}

/// A scratch file in the system's temporary folder (removed when dropped, or on a signal).
pub fn spool() -> Result<NamedTempFile> {
    let t = NamedTempFile::new().context("cannot create a spool file")?;
    register(t.path());
    Ok(t)
}

/// fsync a folder, so that a rename into it survives a crash.
pub fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("{}: cannot sync", dir.display()))
}

/// fsync the file's data, rename it to `dest`, and fsync the folder.
pub fn persist(tmp: NamedTempFile, dest: &Path) -> Result<()> {
    let path = tmp.path().to_path_buf();
    tmp.as_file()
        .sync_all()
        .with_context(|| format!("{}: cannot write", dest.display()))?;
    let r = tmp
        .persist(dest)
        .map_err(|e| e.error)
        .with_context(|| format!("{}: cannot rename into place", dest.display()));
    unregister(&path);
    r?;
    sync_dir(&parent_of(dest))
}

/// Rename a filled temporary folder to `dest` (replacing an older one) after fsyncing every
/// file in it and the folder itself.
pub fn persist_dir(tmp: TempDir, dest: &Path) -> Result<()> {
    for e in std::fs::read_dir(tmp.path())
        .with_context(|| format!("{}: cannot read", tmp.path().display()))?
    {
        let p = e?.path();
        if p.is_file() {
            std::fs::File::open(&p)
                .and_then(|f| f.sync_all())
                .with_context(|| format!("{}: cannot sync", p.display()))?;
        }
    }
    sync_dir(tmp.path())?;
    if dest.exists() {
        std::fs::remove_dir_all(dest)
            .with_context(|| format!("{}: cannot replace", dest.display()))?;
    }
    let kept = tmp.keep();
    let r = std::fs::rename(&kept, dest)
        .with_context(|| format!("{}: cannot rename into place", dest.display()));
    unregister(&kept);
    if r.is_err() {
        let _ = std::fs::remove_dir_all(&kept);
    }
    r?;
    sync_dir(&parent_of(dest))
}
