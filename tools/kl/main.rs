//! cf-kl: not built yet (issue #4). The binary exists so the workspace's shape is fixed;
//! it refuses to run rather than pretend.

use std::process::ExitCode;

fn main() -> ExitCode {
    cf_common::exit::run_main("cf-kl", || {
        anyhow::bail!("cf-kl is not implemented yet (tracked in issue #4)")
    })
}
