#!/usr/bin/env bash
# Regenerate the images' lock files from pyproject.toml (`make locks`; docs/IMAGES.md):
#   locks/upload.lock  the main dependencies and the `upload` extra
#   locks/writer.lock  the main dependencies and the `writer` extra
#   locks/build.lock   pip and the build backend ([build-system] requires), which build
#                      the project's own wheel in the images' build stage
# Each pins every package with == and the sha256 of each of its files on PyPI, resolved
# for the images' platform: CPython 3.11 on x86_64 Linux with glibc 2.36 (Debian
# bookworm), whatever machine runs this.  Versions already in a lock are kept while
# pyproject.toml admits them; `--upgrade` (make locks-upgrade) takes the newest instead.
#
# Needs uv (UV=path, else the venv's or one on PATH; `make locks` installs the pinned one).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON_VERSION=3.11
PLATFORM=x86_64-manylinux_2_36
UV=${UV:-}
if [[ -z "$UV" ]]; then
    if [[ -x .venv/bin/uv ]]; then UV=.venv/bin/uv; else UV=$(command -v uv || true); fi
fi
if [[ -z "$UV" ]]; then
    echo "locks.sh: uv is not installed (make locks installs it into .venv)" >&2
    exit 2
fi
python=${PYTHON:-python3}
[[ -x .venv/bin/python ]] && python=.venv/bin/python

compile() {
    "$UV" pip compile --quiet --generate-hashes --no-config \
        --python-version "$PYTHON_VERSION" --python-platform "$PLATFORM" \
        --custom-compile-command "make locks" "$@"
}

mkdir -p locks
compile "$@" pyproject.toml --extra upload --output-file locks/upload.lock
compile "$@" pyproject.toml --extra writer --output-file locks/writer.lock
"$python" -c '
import tomllib
with open("pyproject.toml", "rb") as handle:
    print("\n".join(["pip", *tomllib.load(handle)["build-system"]["requires"]]))
' | compile "$@" - --output-file locks/build.lock

for lock in locks/upload.lock locks/writer.lock; do
    if ! grep -q '^gunicorn==' "$lock"; then
        echo "locks.sh: $lock has no gunicorn, which serve.py runs" >&2
        exit 1
    fi
done
echo "locks.sh: wrote locks/upload.lock, locks/writer.lock, locks/build.lock"
