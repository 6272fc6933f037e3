//! Every environment variable cf reads, in one place.

/// Number of CPU threads candle may use (falls back to `RAYON_NUM_THREADS`, then all cores).
pub const CF_THREADS: &str = "CF_THREADS";
/// Seconds between plain progress lines when stderr is not a terminal (default 30).
pub const CF_PROGRESS_SECS: &str = "CF_PROGRESS_SECS";
/// `--shard auto`: a Slurm job array's task (id, first id, count, step) ...
pub const SLURM_ARRAY_TASK_ID: &str = "SLURM_ARRAY_TASK_ID";
pub const SLURM_ARRAY_TASK_MIN: &str = "SLURM_ARRAY_TASK_MIN";
pub const SLURM_ARRAY_TASK_COUNT: &str = "SLURM_ARRAY_TASK_COUNT";
pub const SLURM_ARRAY_TASK_STEP: &str = "SLURM_ARRAY_TASK_STEP";
/// ... or a Kubernetes Indexed Job's index, with the Job's completions in CF_SHARD_COUNT.
pub const JOB_COMPLETION_INDEX: &str = "JOB_COMPLETION_INDEX";
pub const CF_SHARD_COUNT: &str = "CF_SHARD_COUNT";
/// Where Hugging Face cache lookups start (huggingface_hub's own variables, in its order).
pub const HF_HUB_CACHE: &str = "HF_HUB_CACHE";
pub const HUGGINGFACE_HUB_CACHE: &str = "HUGGINGFACE_HUB_CACHE";
pub const HF_HOME: &str = "HF_HOME";
pub const XDG_CACHE_HOME: &str = "XDG_CACHE_HOME";
/// Disables colour in messages when set to a non-empty value.
pub const NO_COLOR: &str = "NO_COLOR";

/// The value of an environment variable when it is set and not empty.
pub fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}
