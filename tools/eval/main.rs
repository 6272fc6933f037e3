//! cf-eval: not built yet (issue #7). The binary exists so the workspace's shape is fixed;
//! it refuses to run rather than pretend.

use std::process::ExitCode;

fn main() -> ExitCode {
    cf_common::exit::run_main("cf-eval", || {
        anyhow::bail!("cf-eval is not implemented yet (tracked in issue #7)")
    })
}
