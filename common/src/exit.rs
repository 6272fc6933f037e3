//! One `run_main` for every tool: error printing, exit codes, broken pipes.
//!
//! Exit codes follow grep/ripgrep: 0 success, 1 a check answered "no" (e.g. a `--max` gate),
//! 2 an error. A broken pipe (`cf-sample ... | head`) is not an error: the tool exits 0 quietly.

use std::fmt;
use std::io;
use std::process::ExitCode;

/// Returned (inside an `anyhow::Error`) by a tool whose check answered "no". The message is
/// printed to stderr without the `error:` prefix and the tool exits 1.
#[derive(Debug)]
pub struct CheckFailed(pub String);

impl fmt::Display for CheckFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CheckFailed {}

/// True when the error (or any cause in its chain) is a broken pipe on stdout.
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}

/// The error and its causes on one line, joined with `: `, with repeated messages dropped
/// (a context that already quotes its cause should not print it twice).
pub fn one_line(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let msg = cause.to_string().replace('\n', " ");
        let msg = msg.trim().to_string();
        if msg.is_empty() || parts.iter().any(|p| p.contains(&msg)) {
            continue;
        }
        parts.push(msg);
    }
    parts.join(": ")
}

/// A clap error as one line: its message without clap's `error: ` prefix, usage block or tips.
pub fn clap_line(e: &clap::Error) -> String {
    // The message runs to the first blank line (a missing argument is named on the line after
    // "the following required arguments were not provided:"); usage and tips follow it.
    let text = e.render().to_string();
    let msg: Vec<&str> = text
        .lines()
        .skip_while(|l| l.trim().is_empty())
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    msg.join(" ").trim_start_matches("error: ").to_string()
}

/// Parse the command line. `--help` and `--version` print and exit 0; a bad command line is
/// an error like any other (one line, exit 2), not clap's usage block.
pub fn parse<T: clap::Parser>() -> anyhow::Result<T> {
    parse_from(std::env::args_os())
}

/// [`parse`] over given arguments (the first is the program name).
pub fn parse_from<T: clap::Parser, I, S>(argv: I) -> anyhow::Result<T>
where
    I: IntoIterator<Item = S>,
    S: Into<std::ffi::OsString> + Clone,
{
    T::try_parse_from(argv).map_err(|e| match e.kind() {
        clap::error::ErrorKind::DisplayHelp
        | clap::error::ErrorKind::DisplayVersion
        | clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
        _ => anyhow::anyhow!("{}", clap_line(&e)),
    })
}

/// Whether fd 1 was closed when the process started. Rust's runtime then points it at
/// /dev/null before `main`, so this is looked at earlier, from `.init_array`.
static STDOUT_CLOSED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
extern "C" fn note_closed_stdout() {
    // SAFETY: fcntl(F_GETFD) only queries the descriptor's flags.
    if unsafe { libc::fcntl(1, libc::F_GETFD) } == -1 {
        STDOUT_CLOSED.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(target_os = "linux")]
#[used]
#[link_section = ".init_array"]
static NOTE_CLOSED_STDOUT: extern "C" fn() = note_closed_stdout;

/// Standard output, checked to be open: a tool started with stdout closed (`cf-sample … >&-`)
/// would otherwise "write" its data into nothing and exit 0.
pub fn stdout() -> anyhow::Result<io::Stdout> {
    if STDOUT_CLOSED.load(std::sync::atomic::Ordering::Relaxed) {
        anyhow::bail!("stdout is closed: the output would be lost (give -o FILE, or redirect it)");
    }
    Ok(io::stdout())
}

/// What a tool does on SIGINT, SIGTERM or SIGHUP: remove its temporary files and folders
/// (outputs not yet renamed into place), say so, and exit 130 as a shell does for Ctrl-C.
fn on_signal(tool: String) {
    let _ = ctrlc::set_handler(move || {
        let n = crate::temp::remove_all();
        eprintln!("{tool}: interrupted; removed {n} unfinished output(s)");
        std::process::exit(130);
    });
}

static SIGBUS_MESSAGE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

extern "C" fn on_sigbus(_: libc::c_int) {
    if let Some(m) = SIGBUS_MESSAGE.get() {
        // SAFETY: write(2) and _exit(2) are async-signal-safe.
        unsafe { libc::write(2, m.as_ptr().cast(), m.len()) };
    }
    crate::temp::remove_all_now();
    // SAFETY: as above.
    unsafe { libc::_exit(2) };
}

/// A file mapped into memory that shrinks while it is read (another process truncated it)
/// raises SIGBUS, which would kill the tool with no word. Instead: one line, the unfinished
/// outputs removed, exit 2.
pub fn on_sigbus_for_mapped_inputs(tool: &str) {
    let _ = SIGBUS_MESSAGE.set(format!(
        "{tool}: error: an input file changed while it was being read (it shrank under its memory map); nothing was written\n"
    ));
    // SAFETY: installing a handler that only calls async-signal-safe functions.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigbus as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
    }
}

/// `CF_THREADS`: the CPU threads candle's kernels and ours may use (both read
/// `RAYON_NUM_THREADS`). Without either, the count is fixed here once: candle's default (the
/// physical cores) within what this process may run on (its CPU affinity and cgroup quota, as
/// `available_parallelism` reads them). candle 0.11 otherwise works its default out again at
/// every matrix product, reading and parsing /proc/cpuinfo each time (842 times in 20 s of
/// `bench_decoder`), and it ignores the affinity mask and quota.
/// Called while the process has one thread, before any thread pool starts.
pub fn threads_from_env() {
    let given =
        |name: &str| crate::env::var(name).filter(|v| v.parse::<usize>().is_ok_and(|n| n > 0));
    let n = given(crate::env::CF_THREADS)
        .or_else(|| given("RAYON_NUM_THREADS"))
        .unwrap_or_else(|| {
            let allowed = std::thread::available_parallelism().map_or(1, |n| n.get());
            candle_core::utils::get_num_threads()
                .min(allowed)
                .to_string()
        });
    std::env::set_var("RAYON_NUM_THREADS", n);
}

/// glibc's allocator hands every block above a moving threshold (128 KiB at first) back to the
/// kernel when freed, and trims the heap's top above 128 KiB, so each forward pass's activations,
/// logits and gradients arrive as fresh pages that fault in and are zeroed. Keeping freed
/// memory in the process for reuse (blocks up to glibc's largest threshold, 32 MiB, from the
/// heap; no trimming) measured +30% tokens/s for cf-kl on this project's CPU benchmark, with the
/// same peak memory in cf-train's. Glibc only; `GLIBC_TUNABLES` set by the user still wins.
pub fn allocator_reuse() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("GLIBC_TUNABLES").is_none() {
        // SAFETY: mallopt only adjusts allocator parameters; called while the process has one
        // thread, before the tool allocates its working set.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}

/// Run a tool's body and turn its result into the process exit code.
pub fn run_main(tool: &str, body: impl FnOnce() -> anyhow::Result<()>) -> ExitCode {
    threads_from_env();
    allocator_reuse();
    on_signal(tool.to_string());
    match body() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) if is_broken_pipe(&err) => ExitCode::SUCCESS,
        Err(err) => {
            if let Some(check) = err.downcast_ref::<CheckFailed>() {
                eprintln!("{tool}: {check}");
                return ExitCode::from(1);
            }
            eprintln!("{tool}: error: {}", one_line(&err));
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn chain_is_one_line_without_repeats() {
        let e: anyhow::Result<()> = Err(anyhow::anyhow!("missing field \"text\""));
        let e = e.context("sft.jsonl:17").unwrap_err();
        assert_eq!(one_line(&e), "sft.jsonl:17: missing field \"text\"");
    }

    #[test]
    fn broken_pipe_is_detected_through_context() {
        let e: anyhow::Result<()> = Err(io::Error::from(io::ErrorKind::BrokenPipe).into());
        let e = e.context("writing stdout").unwrap_err();
        assert!(is_broken_pipe(&e));
    }
}
