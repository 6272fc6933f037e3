//! cf-train: not built yet (issue #6). The binary exists so the workspace's shape is fixed;
//! it refuses to run rather than pretend.

use std::process::ExitCode;

fn main() -> ExitCode {
    cf_common::exit::run_main("cf-train", || {
        anyhow::bail!("cf-train is not implemented yet (tracked in issue #6)")
    })
}
