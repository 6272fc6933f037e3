# Recipes for cf. `just --list` shows them. None of them is needed: each says the plain command.

# Build the five tools (release)
build:
    cargo build --release --bins

# The test suite (what CI runs)
test:
    cargo test --release

# The main job: the forgetting experiment in miniature, 5 seeds with 95% intervals (about 4 minutes on 2 cores)
demo:
    examples/forgetting/run.sh out/forgetting

# The forgetting pipeline as make targets (redoes only what changed); OUT=... to choose the folder
pipeline:
    cargo build --release --bins --examples
    make -C examples/forgetting

# Decoder forward/decode and cf-sample throughput on CPU, beside transformers (when installed), same run
bench:
    cargo build --release --bins
    cargo run --release --example bench_decoder -- out/bench
    python3 scripts/bench_transformers.py out/bench
    python3 scripts/bench_eval.py out/bench
    scripts/bench_mix.sh 2 out/bench-mix

# cf-train beside a PyTorch loop and TRL (CPU: tokens/s, peak memory), and --plan against measured memory
bench-train:
    cargo build --release --bins --examples
    python3 scripts/bench_train.py out/bench-train
    scripts/bench_train_memory.sh out/bench-train-memory

# Regenerate the test models and their float64 references (needs torch + transformers)
fixtures:
    python3 scripts/make_fixtures.py

# Lints
lint:
    cargo fmt --check
    cargo clippy --release --all-targets -- -D warnings

# CUDA build (needs a CUDA 12/13 toolkit and CUDA_COMPUTE_CAP, see README)
cuda:
    cargo build --release --features cuda --bins

# GPU benchmarks beside PyTorch (after `just cuda`): olmo-1b and llama3-8b shapes, random weights
bench-gpu:
    cargo build --release --features cuda --bins --examples
    scripts/bench_gpu.sh olmo-1b cuda
    scripts/bench_gpu.sh llama3-8b cuda

# GPU tests (skip themselves where no CUDA device is visible)
test-gpu:
    cargo test --release --features cuda gpu:: -- --test-threads=1
