//! cf-mix: not built yet (issue #5). The binary exists so the workspace's shape is fixed;
//! it refuses to run rather than pretend.

use std::process::ExitCode;

fn main() -> ExitCode {
    cf_common::exit::run_main("cf-mix", || {
        anyhow::bail!("cf-mix is not implemented yet (tracked in issue #5)")
    })
}
