#!/usr/bin/env bash
# The install that quickstart.sh and CI (.ci/run) share: the project's venv (.venv) with the package and its test
# dependencies, and the MONAI Label annotation server's own venv (docs/monailabel.md).
set -euo pipefail
cd "$(dirname "$0")"

python3 -m venv .venv
# Without sam2's CUDA extension: it labels connected components for its own predictors, which the bundle does not use.
SAM2_BUILD_CUDA=0 .venv/bin/pip install -q -e ".[dev]"
bash monailabel_app/install.sh
