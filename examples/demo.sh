#!/usr/bin/env bash
# The main job: forgetting measured and mitigated, end to end, on a model the project builds
# itself. See examples/forgetting/run.sh for the pipeline (every step is a cf tool).
#
# Usage: examples/demo.sh [OUT_DIR]      (default: out/forgetting)
exec "$(dirname "$0")/forgetting/run.sh" "$@"
