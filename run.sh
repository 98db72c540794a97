#!/usr/bin/env bash
# Bootstrap (idempotent), then hand over to the installed `codex-proxy` (addons/commands.py):
# `./run.sh X ...` is `codex-proxy X ...`, the same program; `./run.sh help` lists the commands.
#   ./run.sh demo          the proxy in front of a local Responses stand-in, no key, no network
#   ./run.sh [FLAGS]       the strict proxy; the API key is read from stdin:
#       printenv OPENAI_API_KEY | env -u OPENAI_API_KEY ./run.sh --server-info /tmp/info.json
#   ./run.sh gateway|web|record|replay|compare|standin|codex-config ...   (./run.sh help)
# Kept here, as they need a checkout:
#   ./run.sh test [ARGS]   the whole test suite (pytest ARGS...)
#   ./run.sh refresh-models [--check]   rewrite config/codex-models.yaml from the pinned Codex
#   ./run.sh bench [--seconds N] [--streams N]   benchmark against direct, mitmdump, the reference
#   ./run.sh bench --sessions [--turns N]   Codex's session over HTTP and WebSocket, gateway vs direct
# Bootstrap output goes to stderr and never reads stdin (the key stays there for the proxy).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$ROOT/.venv"

# The Codex CLI version the tests drive is named once, in package.json (devDependencies).
codex_version() {
    sed -n 's/^ *"@openai\/codex": *"\([^"]*\)".*/\1/p' "$ROOT/package.json" | head -n 1
}

log() { printf 'run.sh: %s\n' "$*" >&2; }

python_ok() {
    # Runs at all (a pyenv shim may refuse) and is >= 3.12.
    "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' </dev/null >/dev/null 2>&1
}

find_python() {
    local candidates=()
    [[ -n "${PYTHON:-}" ]] && candidates+=("$PYTHON")
    candidates+=(python3.13 python3.12)
    if command -v pyenv >/dev/null 2>&1; then
        local root
        root="$(pyenv root 2>/dev/null || true)"
        if [[ -n "$root" ]]; then
            local v
            for v in "$root"/versions/3.1[2-9]*/bin/python3; do
                [[ -x "$v" ]] && candidates+=("$v")
            done
        fi
    fi
    candidates+=(python3 python)
    local c
    for c in "${candidates[@]}"; do
        if python_ok "$c"; then
            command -v "$c" 2>/dev/null || echo "$c"
            return 0
        fi
    done
    return 1
}

ensure_venv() {
    local stamp="$VENV/.installed" want
    want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
    if [[ -x "$VENV/bin/python" ]] && python_ok "$VENV/bin/python" \
        && [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return 0
    fi
    local py
    if ! py="$(find_python)"; then
        log "error: no Python >= 3.12 that runs was found (tried \$PYTHON, python3.13, python3.12,"
        log "       pyenv versions 3.12+, python3). Install Python 3.12 or newer, or set PYTHON=/path."
        exit 1
    fi
    if [[ ! -x "$VENV/bin/python" ]] || ! python_ok "$VENV/bin/python"; then
        log "creating $VENV with $py"
        rm -rf "$VENV"
        "$py" -m venv "$VENV" </dev/null >&2
    fi
    log "installing the project into $VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade 'pip>=25.1' </dev/null >&2
    (cd "$ROOT" && "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
        -e '.[demo]' --group dev </dev/null >&2)
    echo "$want" >"$stamp"
}

node_deps_ok() {
    # Every devDependency of package.json (the Codex CLI, oidc-provider for the device-flow
    # tests) is in node_modules at its pinned version.
    command -v node >/dev/null 2>&1 || return 1
    (cd "$ROOT" && node -e '
        const want = require("./package.json").devDependencies || {};
        for (const [name, version] of Object.entries(want)) {
            let got;
            try { got = require(`./node_modules/${name}/package.json`).version; } catch { process.exit(1); }
            if (got !== version) process.exit(1);
        }' </dev/null >/dev/null 2>&1)
}

ensure_codex() {
    local want
    want="$(codex_version)"
    if [[ -z "$want" ]]; then
        log "error: package.json names no @openai/codex version"
        exit 1
    fi
    if [[ -x "$ROOT/node_modules/.bin/codex" ]] \
        && "$ROOT/node_modules/.bin/codex" --version </dev/null 2>/dev/null | grep -qF " $want" \
        && node_deps_ok; then
        return 0
    fi
    if ! command -v npm >/dev/null 2>&1; then
        log "warning: npm not found; the Codex CLI and OpenID provider tests cannot run"
        return 0
    fi
    log "installing @openai/codex@$want and package.json's other devDependencies into $ROOT/node_modules"
    (cd "$ROOT" && npm install --no-audit --no-fund --loglevel=error </dev/null >&2)
}

can_apt() {
    # Debian packages can be installed here: root, with apt-get.
    [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1
}

apt_install() {
    # Install Debian packages (a plain install first; if that fails, `apt-get update` and again).
    log "installing $* (Debian packages)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "$@" </dev/null >&2 \
        || { apt-get update -q </dev/null >&2 && apt-get install -y -q "$@" </dev/null >&2; }
}

ensure_chromium() {
    # Headless Chromium + ChromeDriver from Debian for the mitmweb UI test.
    if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
        return 0
    fi
    if ! can_apt; then
        log "warning: chromium/chromedriver missing and cannot apt-get them; the UI test will not run"
        return 0
    fi
    apt_install chromium chromium-driver \
        || log "warning: could not install chromium; the UI test will not run"
}

ensure_tmux() {
    # tmux drives Codex's TUI in the gateway test (tests/test_gateway_codex.py).
    command -v tmux >/dev/null 2>&1 && return 0
    if ! can_apt; then
        log "warning: tmux missing and cannot apt-get it; the Codex TUI test will not run"
        return 0
    fi
    apt_install tmux || log "warning: could not install tmux; the Codex TUI test will not run"
}

ensure_wrk() {
    command -v wrk >/dev/null 2>&1 && return 0
    can_apt && apt_install wrk || true
    command -v wrk >/dev/null 2>&1 || { log "error: wrk is needed for the benchmark"; exit 1; }
}

have_nginx() {
    [[ -x /usr/sbin/nginx && -e /usr/lib/nginx/modules/ngx_http_echo_module.so ]]
}

ensure_nginx() {
    # nginx and its echo module (Debian) are the benchmark's upstream (bench/upstreams.py).
    have_nginx && return 0
    can_apt && apt_install nginx libnginx-mod-http-echo || true
    have_nginx || { log "error: nginx and libnginx-mod-http-echo are needed for the benchmark"; exit 1; }
}

ensure_postgresql() {
    # Debian's PostgreSQL server binaries for the tests that need a real, throwaway cluster
    # (tests/pg_cluster.py runs initdb/pg_ctl from /usr/lib/postgresql/<ver>/bin).
    compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null && return 0
    if ! can_apt; then
        log "warning: postgresql missing and cannot apt-get it; the PostgreSQL tests will not run"
        return 0
    fi
    apt_install postgresql \
        || log "warning: could not install postgresql; the PostgreSQL tests will not run"
}

ensure_prometheus() {
    # Debian's Prometheus scrapes the gateway's /metrics with examples/prometheus.yml's
    # bearer-token setup in tests/test_exposure.py.
    command -v prometheus >/dev/null 2>&1 && return 0
    if ! can_apt; then
        log "warning: prometheus missing and cannot apt-get it; the scrape test will not run"
        return 0
    fi
    apt_install --no-install-recommends prometheus \
        || log "warning: could not install prometheus; the scrape test will not run"
}

cmd="${1:-}"
case "$cmd" in
    refresh-models)
        shift
        ensure_venv
        ensure_codex
        cd "$ROOT"
        exec "$VENV/bin/python" -m addons.codex_models "$@" </dev/null
        ;;
    bench)
        shift
        ensure_venv
        ensure_codex
        ensure_wrk
        ensure_nginx
        cd "$ROOT"
        exec "$VENV/bin/python" -m bench.bench "$@" </dev/null
        ;;
    test)
        shift
        ensure_venv
        ensure_codex
        ensure_chromium
        ensure_tmux
        ensure_wrk
        ensure_nginx
        ensure_postgresql
        ensure_prometheus
        cd "$ROOT"
        exec "$VENV/bin/python" -m pytest "$@" </dev/null
        ;;
    *)
        # Every other command, and none (the strict proxy), is codex-proxy's; stdin is left
        # alone (the key, or the gateway's upstream keys, is on it). Help and errors name
        # ./run.sh as invoked (addons/invocation.py).
        ensure_venv
        export CODEX_PROXY_PROG="$0"
        exec "$VENV/bin/codex-proxy" "$@"
        ;;
esac
