//! Memory this machine can give: a request that cannot fit is a one-line error with the
//! bytes it needs, not an allocation abort half-way.

use anyhow::{bail, Result};

/// `MemAvailable` of /proc/meminfo, in bytes (None where it cannot be read).
pub fn available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn gib(bytes: f64) -> String {
    format!("{:.1} GiB", bytes / (1u64 << 30) as f64)
}

/// Fail when `bytes` of host memory are needed for `what` and fewer are available.
pub fn require(bytes: f64, what: &str) -> Result<()> {
    if let Some(avail) = available() {
        if bytes > avail as f64 {
            bail!(
                "{what} needs about {} of memory and {} is available",
                gib(bytes),
                gib(avail as f64)
            );
        }
    }
    Ok(())
}
