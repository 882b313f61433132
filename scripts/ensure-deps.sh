#!/usr/bin/env bash
# Makes sure the system tools the tests and the service use are installed.
#
#   scripts/ensure-deps.sh ffmpeg prometheus python3-yaml
#
# Each argument is a Debian package and what it provides:
#   ffmpeg        ffmpeg, ffprobe   (the preview backend, media probing)
#   ffmpeg-dev    FFmpeg's headers and pkg-config files, and libclang (bindgen): to build
#                 musetalk-probe-helper, the persistent media probe (packages pkg-config,
#                 libavformat-dev, libavcodec-dev, libavutil-dev, libclang-dev)
#   prometheus    prometheus, promtool (the real Prometheus the e2e tests scrape with)
#   python3-yaml  `python3 -c 'import yaml'`
#   nginx         nginx (the proxy in front of scripts/local-cluster.sh's replicas, and the
#                 cluster tests)
#   curl          curl (the README's quick start, which tests/e2e_quickstart.rs runs as written)
#   chromium      chromium, chromedriver (packages chromium, chromium-driver: the
#                 status page's real-browser test drives headless Chromium over WebDriver)
#   py-spy        py-spy (per-job Python profiles): not a Debian package, so installed
#                 from PyPI with `python3 -m pip install py-spy` (its wheel carries the binary)
# Missing ones are installed with apt-get when running as root; otherwise the exact
# command to run is printed and the script exits 1.
set -euo pipefail

say() { printf '==> %s\n' "$*"; }

have() {
    case "$1" in
        ffmpeg) command -v ffmpeg >/dev/null 2>&1 && command -v ffprobe >/dev/null 2>&1 ;;
        ffmpeg-dev) pkg-config --exists libavformat libavcodec libavutil >/dev/null 2>&1 \
            && compgen -G '/usr/lib/llvm-*/lib/libclang*.so*' >/dev/null ;;
        prometheus) command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 ;;
        python3-yaml) command -v python3 >/dev/null 2>&1 && python3 -c 'import yaml' >/dev/null 2>&1 ;;
        chromium) command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 ;;
        curl) command -v curl >/dev/null 2>&1 ;;
        nginx) command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] ;;
        py-spy) command -v py-spy >/dev/null 2>&1 ;;
        *) printf 'ensure-deps: unknown component %s\n' "$1" >&2; exit 2 ;;
    esac
}

# The Debian packages of a component (most are one package of the same name).
packages() {
    case "$1" in
        chromium) echo chromium chromium-driver ;;
        ffmpeg-dev) echo pkg-config libavformat-dev libavcodec-dev libavutil-dev libclang-dev ;;
        *) echo "$1" ;;
    esac
}

missing=()
for pkg in "$@"; do
    have "$pkg" || missing+=("$pkg")
done

# py-spy comes from PyPI, not apt: install it first, then go on with the Debian packages.
if [[ " ${missing[*]-} " == *" py-spy "* ]]; then
    pip_cmd="python3 -m pip install py-spy"
    if ! command -v python3 >/dev/null 2>&1; then
        printf 'missing: py-spy; install Python 3 and then run: %s\n' "$pip_cmd" >&2
        exit 1
    fi
    say "installing py-spy (pip)"
    # A Debian system Python refuses pip without --break-system-packages (PEP 668); py-spy
    # is a standalone binary in its wheel, so it breaks nothing there.
    python3 -m pip install -q py-spy >/dev/null 2>&1 || python3 -m pip install -q --break-system-packages py-spy >/dev/null 2>&1 || true
    command -v pyenv >/dev/null 2>&1 && pyenv rehash >/dev/null 2>&1
    if ! have py-spy; then
        printf 'py-spy is still not on PATH after pip; run: %s (and put its bin directory on PATH)\n' "$pip_cmd" >&2
        exit 1
    fi
    rest=()
    for pkg in "${missing[@]}"; do
        [ "$pkg" = py-spy ] || rest+=("$pkg")
    done
    missing=("${rest[@]+"${rest[@]}"}")
fi
if [ ${#missing[@]} -eq 0 ]; then
    say "system tools present: $*"
    exit 0
fi

debs=()
for pkg in "${missing[@]}"; do
    read -r -a p <<<"$(packages "$pkg")"
    debs+=("${p[@]}")
done
install_cmd="apt-get update && apt-get install -y --no-install-recommends ${debs[*]}"
if ! command -v apt-get >/dev/null 2>&1; then
    printf 'missing: %s; this is not a Debian/Ubuntu system, install them with your package manager\n' "${missing[*]}" >&2
    exit 1
fi
if [ "$(id -u)" -ne 0 ]; then
    printf 'missing: %s; install them with:\n  sudo sh -c '\''%s'\''\n' "${missing[*]}" "$install_cmd" >&2
    exit 1
fi

say "installing ${missing[*]} (apt-get)"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${debs[@]}" >/dev/null

still=()
for pkg in "${missing[@]}"; do
    if ! have "$pkg" && [ "$pkg" = python3-yaml ]; then
        # The python3 on PATH may not be Debian's (pyenv, venv): give it PyYAML directly.
        python3 -m pip install -q pyyaml >/dev/null 2>&1 || true
    fi
    have "$pkg" || still+=("$pkg")
done
if [ ${#still[@]} -ne 0 ]; then
    printf 'still missing after apt-get install: %s\n' "${still[*]}" >&2
    case " ${still[*]} " in
        *" python3-yaml "*) printf '  python3 on PATH (%s) does not see the system package; run: python3 -m pip install pyyaml\n' "$(command -v python3 || echo none)" >&2 ;;
    esac
    exit 1
fi
say "installed ${missing[*]}"
