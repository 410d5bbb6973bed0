#!/usr/bin/env bash
# Installs what whisper-triton needs into ./.venv (and, for --test, Debian packages the tests use).
# Idempotent: a second run with an unchanged pyproject.toml does nothing.
set -euo pipefail

mode="serve"
if [[ "${1:-}" == "--test" ]]; then
  mode="test"
fi
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "${root}"

apt_install() {
  local missing=()
  local pkg
  for pkg in "$@"; do
    dpkg -s "${pkg}" >/dev/null 2>&1 || missing+=("${pkg}")
  done
  if [[ ${#missing[@]} -eq 0 ]]; then
    return 0
  fi
  local sudo=""
  if [[ "$(id -u)" -ne 0 ]]; then
    sudo="sudo"
  fi
  echo "installing Debian packages: ${missing[*]}"
  ${sudo} apt-get update -qq
  DEBIAN_FRONTEND=noninteractive ${sudo} apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

if [[ "${mode}" == "test" ]] && command -v apt-get >/dev/null 2>&1; then
  # espeak-ng speaks the test sentences; procps gives the tests `ps`
  apt_install espeak-ng procps
fi

python="${PYTHON:-python3}"
"${python}" - <<'PY'
import sys
if sys.version_info < (3, 10):
    sys.exit(f"whisper-triton needs Python >= 3.10, found {sys.version.split()[0]}")
PY
if [[ ! -x .venv/bin/python ]]; then
  "${python}" -m venv .venv
fi

extras="model,triton,vad,speakers"
if [[ "${mode}" == "test" ]]; then
  extras="model,triton,vad,speakers,test,export,aws"
fi
stamp=".venv/.installed-${mode}"
wanted="$(sha256sum pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)"
fetch_real_speech() {
  # recorded speech with texts for the tests (Debian packages, pinned and sha256-checked; cached in .work/)
  if [[ "${mode}" == "test" ]]; then
    .venv/bin/python -m testkit.real_speech --fixture
  fi
}
if [[ -f "${stamp}" && "$(cat "${stamp}")" == "${wanted}" ]]; then
  fetch_real_speech
  exit 0
fi

pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip
if [[ "${mode}" == "test" ]] && ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  # the export tests need torch; the CPU build keeps the install small where one is offered
  "${pip[@]}" "torch==2.13.0"
fi
"${pip[@]}" -e ".[${extras}]"
# silero-vad's wheel ships the ONNX model we run with onnxruntime; its torch requirement is not needed
"${pip[@]}" --no-deps "silero-vad==6.2.3"
# resemblyzer's wheel ships the speaker encoder's weights, converted once here into the numpy file that
# speaker diarization loads (no torch at run time; the conversion checks the file's sha256)
"${pip[@]}" --no-deps "resemblyzer==0.1.4"
.venv/bin/python -m whisper_triton.speakers.weights >/dev/null
if [[ "${mode}" == "test" ]]; then
  # the reference oracle of the tests (decoding rules, hallucination benchmark); its own requirements
  # pull a GPU compiler (triton) we do not need, so they are listed in the test extra instead
  "${pip[@]}" --no-deps "openai-whisper==20250625"
  # recorded voices for the speaker diarization tests and benchmark (Debian packages and pocketsphinx's
  # sources; pinned, sha256-checked, cached under .work/real_voices)
  .venv/bin/python -m testkit.real_voices >/dev/null
fi
echo "${wanted}" > "${stamp}"
fetch_real_speech
