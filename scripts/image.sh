#!/usr/bin/env bash
# Build the shardmesh image with podman and smoke-test it the way the Helm chart runs it.
#
#   scripts/image.sh build    build $SHARDMESH_IMAGE (default localhost/shardmesh:<version>) from ./Dockerfile
#   scripts/image.sh smoke    run the container mesh test (tests/image/test_image.py, marker `image`)
#   scripts/image.sh base     make the local Debian 12 base image (debootstrap) without building
#
# The Dockerfile is used as it is; only build arguments and build-time mounts differ between machines:
# - PYTHON_IMAGE: the base image. Unset: the Dockerfile's default (python:3.11-slim-bookworm) when it is present
#   or can be pulled, otherwise localhost/bookworm-py, made here with debootstrap (Debian 12, Python 3.11).
# - SHARDMESH_HOST_PIP=auto|1|0: use this machine's pip configuration for the build (auto: when it names local
#   find-links or file:// indexes). The merged configuration is mounted at /etc/pip.conf, and the local paths it
#   names (wheel directories, indexes, constraint file, CA bundle) read-only at the same paths, with
#   --network host and the host's /etc/hosts and /etc/resolv.conf. The torch index then is PyPI's
#   (TORCH_INDEX_URL), so torch 2.13.0+cpu comes from those local wheels. None of it is copied into the image.
# - SHARDMESH_GIT_REF: build from `git archive <ref>` (a clean tree) instead of the working tree.
# - CONTAINER_ENGINE: podman (default); docker works for `build` without the host-pip mounts.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
ENGINE="${CONTAINER_ENGINE:-podman}"
VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/pyproject.toml" | head -1)"
IMAGE="${SHARDMESH_IMAGE:-localhost/shardmesh:${VERSION}}"
DEFAULT_BASE="python:3.11-slim-bookworm"
LOCAL_BASE="localhost/bookworm-py"
WORK="${SHARDMESH_IMAGE_WORKDIR:-/var/tmp/shardmesh-image}"

log() { printf '[image.sh] %s\n' "$*" >&2; }

# Debian 12 minbase with python3, venv and pip, imported as $LOCAL_BASE (about a minute; needs root).
make_local_base() {
  if "$ENGINE" image exists "$LOCAL_BASE" 2>/dev/null; then return; fi
  command -v debootstrap >/dev/null || { log "debootstrap missing: apt-get install debootstrap"; exit 1; }
  local root="$WORK/bookworm-root"
  rm -rf "$root"; mkdir -p "$WORK"
  log "debootstrap bookworm -> $root"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip bookworm "$root" >"$WORK/debootstrap.log" 2>&1 \
    || { log "debootstrap failed: see $WORK/debootstrap.log"; exit 1; }
  tar -C "$root" -c . | "$ENGINE" import - "$LOCAL_BASE" >/dev/null
  rm -rf "$root"
  log "imported $LOCAL_BASE"
}

choose_base() {
  if [[ -n "${PYTHON_IMAGE:-}" ]]; then
    if [[ "$PYTHON_IMAGE" == "$LOCAL_BASE" ]]; then make_local_base; fi
    echo "$PYTHON_IMAGE"; return
  fi
  if "$ENGINE" image exists "$DEFAULT_BASE" 2>/dev/null \
     || timeout 60 "$ENGINE" pull -q "docker.io/library/$DEFAULT_BASE" >/dev/null 2>&1; then
    echo ""; return  # the Dockerfile's default
  fi
  log "$DEFAULT_BASE cannot be pulled: using $LOCAL_BASE"
  make_local_base
  echo "$LOCAL_BASE"
}

# Host pip settings as one config file; prints the local paths it references, one per line, after writing it.
host_pip_config() {
  local out="$1"
  python3 - "$out" <<'EOF'
import configparser, os, subprocess, sys
out = sys.argv[1]
listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
values = {}
for line in listing.splitlines():
    key, _, value = line.partition("=")
    section, _, name = key.rpartition(".")
    if name in ("find-links", "index-url", "extra-index-url", "constraint", "cert", "timeout", "default-timeout"):
        values[name] = value.strip().strip("'")
for name in ("find-links", "index-url", "extra-index-url", "constraint", "cert"):  # environment wins, as in pip
    env = os.environ.get("PIP_" + name.upper().replace("-", "_"))
    if env:
        values[name] = env
cfg = configparser.ConfigParser()
cfg["global"] = values
with open(out, "w") as f:
    cfg.write(f)
paths = set()
for name in ("find-links", "index-url", "extra-index-url", "constraint", "cert"):
    for item in values.get(name, "").split():
        path = item[len("file://"):] if item.startswith("file://") else item
        # A local index's pages link to files beside it (e.g. /opt/pypi/simple -> /opt/pypi/files).
        if item.startswith("file://") and os.path.basename(path.rstrip("/")) == "simple":
            path = os.path.dirname(path.rstrip("/"))
        if path.startswith("/") and os.path.exists(path):
            paths.add(path)
print("\n".join(sorted(paths)))
EOF
}

cmd_build() {
  local base context ref host_pip="${SHARDMESH_HOST_PIP:-auto}"
  base="$(choose_base)"
  local args=(build -t "$IMAGE" -f "$ROOT/Dockerfile")
  [[ -n "$base" ]] && args+=(--build-arg "PYTHON_IMAGE=$base")
  mkdir -p "$WORK"
  trap 'rm -rf "$WORK/context" "$WORK/pip.conf"' EXIT
  if [[ "$host_pip" != 0 && "$ENGINE" == podman ]]; then
    local conf="$WORK/pip.conf" paths
    paths="$(host_pip_config "$conf")"
    if [[ "$host_pip" == 1 || -n "$paths" ]]; then
      log "using this machine's pip configuration ($conf): $(echo $paths)"
      args+=(--network host -v "$conf:/etc/pip.conf:ro" -v /etc/hosts:/etc/hosts:ro -v /etc/resolv.conf:/etc/resolv.conf:ro)
      [[ -d /etc/ssl/certs ]] && args+=(-v /etc/ssl/certs:/etc/ssl/certs:ro)
      local p
      while IFS= read -r p; do
        [[ -z "$p" || "$p" == /etc/ssl/certs* ]] && continue
        args+=(-v "$p:$p:ro")
      done <<<"$paths"
      args+=(--build-arg "TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://pypi.org/simple}")
    fi
  elif [[ -n "${TORCH_INDEX_URL:-}" ]]; then
    args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
  fi
  ref="${SHARDMESH_GIT_REF:-}"
  if [[ -n "$ref" ]]; then
    context="$WORK/context"
    rm -rf "$context"; mkdir -p "$context"
    git -C "$ROOT" archive "$ref" | tar -x -C "$context"
    cp "$ROOT/.dockerignore" "$context/" 2>/dev/null || true
  else
    context="$ROOT"
  fi
  args+=("$context")
  log "$ENGINE ${args[*]}"
  local start end
  start=$(date +%s)
  "$ENGINE" "${args[@]}"
  end=$(date +%s)
  rm -rf "$WORK/context" "$WORK/pip.conf"; rmdir "$WORK" 2>/dev/null || true
  log "built $IMAGE in $((end - start)) s; size: $("$ENGINE" image inspect "$IMAGE" --format '{{.Size}}') bytes"
}

cmd_smoke() {
  cd "$ROOT"
  SHARDMESH_IMAGE="$IMAGE" exec python3 -m pytest -q -m image -p no:cacheprovider tests/image/test_image.py "$@"
}

case "${1:-}" in
  build) shift; cmd_build "$@" ;;
  smoke) shift; cmd_smoke "$@" ;;
  base) make_local_base ;;
  *) echo "usage: $0 build|smoke|base   (see the comment at the top of this file)" >&2; exit 2 ;;
esac
