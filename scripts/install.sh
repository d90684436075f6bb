#!/usr/bin/env bash
# Install pacs as a systemd service: user `pacs`, a virtualenv with the package,
# /etc/pacs/pacs.yaml, /var/lib/pacs (store and index), the unit. Idempotent:
# run it again to upgrade the package; an existing config is never overwritten.
#
#   sudo scripts/install.sh                      install and enable (not start)
#   scripts/install.sh --dry-run                 print what it would do
#   scripts/install.sh --root DIR --no-venv      lay out the files under DIR only
#                                                (no user, chown or systemctl: for tests, images)
set -euo pipefail

usage() {
    cat <<EOF
usage: $0 [--prefix DIR] [--root DIR] [--no-venv] [--dry-run]
  --prefix DIR  virtualenv for the package (default /opt/pacs); ExecStart uses DIR/bin/pacs
  --root DIR    install every file below DIR (a staging root); skips user, chown, systemctl
  --no-venv     do not create the virtualenv or install the package into it
  --dry-run     print the actions instead of doing them
EOF
}

PREFIX=/opt/pacs
ROOT=""
VENV=1
DRY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) PREFIX="${2:?--prefix needs a folder}"; shift 2 ;;
        --root) ROOT="${2:?--root needs a folder}"; shift 2 ;;
        --no-venv) VENV=0; shift ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "$0: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done
case "$PREFIX" in /*) ;; *) echo "$0: --prefix must be an absolute path" >&2; exit 2 ;; esac

SOURCE="$(cd "$(dirname "$0")/.." && pwd)"
USER_NAME=pacs
CONFIG_DIR="$ROOT/etc/pacs"
STATE_DIR="$ROOT/var/lib/pacs"
UNIT_DIR="$ROOT/etc/systemd/system"
SYSTEM=1   # touch the running system: user, ownership, systemctl
if [ -n "$ROOT" ]; then SYSTEM=0; fi

run() {
    if [ "$DRY" = 1 ]; then echo "+ $*"; else "$@"; fi
}

# write_file PATH MODE: stdin to PATH (atomically, via a temporary file beside it)
write_file() {
    if [ "$DRY" = 1 ]; then echo "+ write $1 (mode $2)"; cat >/dev/null; return; fi
    local tmp
    tmp="$(mktemp "$1.XXXXXX")"
    cat >"$tmp"
    chmod "$2" "$tmp"
    mv -f "$tmp" "$1"
}

if [ "$SYSTEM" = 1 ] && [ "$DRY" = 0 ] && [ "$(id -u)" != 0 ]; then
    echo "$0: run as root (or use --root DIR / --dry-run)" >&2
    exit 2
fi

# 1. The service user: a system account without a login shell, home = state folder.
if [ "$SYSTEM" = 1 ] && ! getent passwd "$USER_NAME" >/dev/null; then
    run useradd --system --user-group --home-dir /var/lib/pacs --no-create-home \
        --shell /usr/sbin/nologin --comment "pacs DICOM node" "$USER_NAME"
fi

# 2. The package, in its own virtualenv.
if [ "$VENV" = 1 ]; then
    [ -x "$ROOT$PREFIX/bin/python" ] || run python3 -m venv "$ROOT$PREFIX"
    run "$ROOT$PREFIX/bin/pip" install --quiet --upgrade "$SOURCE"
fi

# 3. Folders: config readable by the service, state writable only by it.
run install -d -m 0755 "$ROOT/etc" "$UNIT_DIR"
run install -d -m 0750 "$CONFIG_DIR" "$STATE_DIR" "$STATE_DIR/store"
if [ "$SYSTEM" = 1 ]; then
    run chown "root:$USER_NAME" "$CONFIG_DIR"
    run chown "$USER_NAME:$USER_NAME" "$STATE_DIR" "$STATE_DIR/store"
fi

# 4. The config, only if there is none yet (an admin's edits are kept).
if [ -e "$CONFIG_DIR/pacs.yaml" ]; then
    echo "keeping $CONFIG_DIR/pacs.yaml"
else
    write_file "$CONFIG_DIR/pacs.yaml" 0640 <<'EOF'
# pacs config: see the README for every key. `systemctl reload pacs` re-reads
# remote_aes and security; other changes need `systemctl restart pacs`.
ae_title: MINIPACS
host: 0.0.0.0
port: 11112                 # 104 works too: the unit grants CAP_NET_BIND_SERVICE
storage:
  root: /var/lib/pacs/store
database:
  url: sqlite:////var/lib/pacs/index.sqlite
remote_aes: {}
security:
  allow_unknown_callers: true
  require_called_ae: true
EOF
    if [ "$SYSTEM" = 1 ]; then run chown "root:$USER_NAME" "$CONFIG_DIR/pacs.yaml"; fi
fi

# 5. The unit, pointing at this prefix.
sed "s#/opt/pacs/bin/pacs#$PREFIX/bin/pacs#" "$SOURCE/scripts/pacs.service" \
    | write_file "$UNIT_DIR/pacs.service" 0644

# 6. Tell systemd (where it runs).
if [ "$SYSTEM" = 1 ] && [ -d /run/systemd/system ]; then
    run systemctl daemon-reload
    run systemctl enable pacs.service
    echo "installed; start it with: systemctl start pacs"
else
    echo "installed under ${ROOT:-/}; systemd not touched"
fi
