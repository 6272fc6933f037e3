//! The output folder a run owns. A lock (`flock` on `OUT/.cf-train.lock`) keeps a second run
//! out while this one lives; a folder holding an earlier run's checkpoints or model is refused
//! unless the run continues it (`--resume`) or replaces it (`--overwrite`); temporary folders
//! and files that a killed run left (`.NAME.*.tmp`) are removed, which the lock makes safe:
//! nobody else is writing here.

use anyhow::{bail, Context, Result};
use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Held for the run's lifetime; dropping it releases the lock. A folder this run created is
/// removed again if the run ends before writing anything into it.
pub struct OutDir {
    _lock: File,
    dir: PathBuf,
    created: bool,
}

impl Drop for OutDir {
    fn drop(&mut self) {
        if !self.created {
            return;
        }
        let only_lock = std::fs::read_dir(&self.dir).is_ok_and(|rd| {
            rd.filter_map(|e| e.ok())
                .all(|e| e.file_name() == ".cf-train.lock")
        });
        if only_lock {
            let _ = std::fs::remove_file(self.dir.join(".cf-train.lock"));
            let _ = std::fs::remove_dir(&self.dir);
        }
    }
}

/// Files a finished cf-train run leaves (a model folder or a PEFT adapter).
const MODEL_FILES: [&str; 2] = ["model.safetensors", "adapter_model.safetensors"];

fn checkpoints(out: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(out) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("checkpoint-"))
                .is_some_and(|n| n.parse::<u64>().is_ok())
        })
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

/// Take the folder for this run. `resume`: this run continues what is there.
pub fn claim(out: &Path, resume: bool, overwrite: bool) -> Result<(OutDir, Vec<String>)> {
    let created = !out.exists();
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let lock_path = out.join(".cf-train.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("{}: cannot open", lock_path.display()))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!(
            "{}: another cf-train run is writing to this folder (it holds {})",
            out.display(),
            lock_path.display()
        );
    }
    let owned = OutDir {
        _lock: lock,
        dir: out.to_path_buf(),
        created,
    };
    let mut notes = Vec::new();
    // What a killed run left half-written: nobody else holds the lock, so it is orphaned.
    let mut stale = 0;
    for e in std::fs::read_dir(out).with_context(|| format!("{}: cannot read", out.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with('.') && name.ends_with(".tmp") {
            let p = e.path();
            let r = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            r.with_context(|| format!("{}: cannot remove a stale temporary", p.display()))?;
            stale += 1;
        }
    }
    if stale > 0 {
        notes.push(format!(
            "removed {stale} unfinished temporary output(s) an interrupted run left in {}",
            out.display()
        ));
    }
    if !resume {
        let old = checkpoints(out);
        let model = MODEL_FILES.iter().any(|f| out.join(f).is_file());
        if !old.is_empty() || model {
            if !overwrite {
                let what = if old.is_empty() {
                    "a model".to_string()
                } else {
                    format!("{} checkpoint(s)", old.len())
                };
                bail!(
                    "{}: holds {what} of an earlier run: --resume continues it, --overwrite replaces it",
                    out.display()
                );
            }
            for c in old.iter().chain(std::iter::once(&out.join("merged"))) {
                if c.is_dir() {
                    std::fs::remove_dir_all(c)
                        .with_context(|| format!("{}: cannot remove", c.display()))?;
                }
            }
            notes.push(format!(
                "--overwrite: replacing the earlier run in {}",
                out.display()
            ));
        }
    }
    Ok((owned, notes))
}
