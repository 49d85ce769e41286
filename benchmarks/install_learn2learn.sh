#!/usr/bin/env bash
# Install learn2learn 0.2.0 into .venv as the benchmark reference (optional; never a project dependency).
# It has no Python 3.11 wheel and its shipped .c files predate 3.11: regenerate them with Cython 3.x,
# then install --no-deps (its requirements pull torchvision, gym, gsutil, ... which we do not want).
# Its package __init__ imports gym and torchvision (datasets, transforms) at import time, so the benchmark
# loads only learn2learn.algorithms.maml and what that imports (benchmarks/omniglot.py: load_l2l_maml).
# Idempotent: does nothing when learn2learn 0.2.0 is already installed.
#   bash benchmarks/install_learn2learn.sh
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="$ROOT/.venv/bin/python"
VERSION=0.2.0

if "$PY" -m pip show learn2learn 2>/dev/null | grep -x "Version: $VERSION" >/dev/null; then  # no -q: pipefail
    echo "learn2learn $VERSION already installed"
    exit 0
fi
BUILD="$(mktemp -d)"
trap 'rm -rf "$BUILD"' EXIT
"$PY" -m pip download --quiet --no-deps --no-binary :all: "learn2learn==$VERSION" -d "$BUILD"
tar xzf "$BUILD/learn2learn-$VERSION.tar.gz" -C "$BUILD"
SRC="$BUILD/learn2learn-$VERSION"
rm -rf "$SRC/.eggs"  # a bundled Cython 0.29 egg for Python 3.7
"$PY" -m pip install --quiet --target "$BUILD/cython" "cython>=3,<4"
export PYTHONPATH="$BUILD/cython"  # setup_requires=['cython'] is then satisfied without easy_install
"$PY" -m cython -3 --directive embedsignature=True "$SRC"/learn2learn/data/{meta_dataset,task_dataset,transforms}.pyx
"$PY" -m pip install --quiet --no-deps --no-build-isolation "$SRC"
unset PYTHONPATH
cd "$ROOT" && "$PY" -c "import sys; sys.path.insert(0, 'benchmarks'); import omniglot; print('learn2learn', omniglot.load_l2l_maml())"
