#!/usr/bin/env bash
# Serve the SAM2-LoRA fundus bundle with MONAI Label 0.8.5 (this folder's app), on 127.0.0.1 by default.
#
#   bash monailabel_app/serve.sh --studies FOLDER [--bundle ARCHIVE.zip|FOLDER] [--app FOLDER] [--port 8000]
#                                [--host 127.0.0.1] [-- extra start_server options, e.g. --conf skip_trainers true]
#
# --studies  the datastore: fundus images (png, jpg, jpeg, tif, tiff); labels go to FOLDER/labels/final.
# --bundle   an archive (or extracted folder) of `python -m tools.export --weights full`, installed once into
#            APP/model/sam2lora_fundus. Omit it to serve what is installed there (training replaces its
#            models/model.pt, so re-installing would throw the fine-tuned model away: refused if present).
# --app      the app folder (default: this folder). Another folder gets a copy of this folder's main.py.
# --host     127.0.0.1 unless you put an authenticating, path-sanitising reverse proxy in front: MONAI Label 0.8.5
#            has known path-traversal issues in its datastore and session APIs, and its own default is 0.0.0.0.
#
# Runs MONAI Label from .venv-monailabel (bash monailabel_app/install.sh) with `python -m monailabel.main`, not
# the `monailabel` script, which would put this repository on PYTHONPATH and serve its `scripts` package instead
# of the bundle's own. The server replaces this shell (exec): stopping it stops the server.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
python="$root/.venv-monailabel/bin/python"
name=sam2lora_fundus
app="$here"
studies=""
bundle=""
host=127.0.0.1
port=8000
die() { echo "serve.sh: $*" >&2; exit 2; }
# The refusal of a bundle without models/model.pt: $1 the archive or folder given, $2 "adapters" when it holds
# models/adapters.pt.
adapters_only() {
    local held="no models/model.pt"
    [ "$2" != adapters ] || held="the LoRA adapters only (models/adapters.pt, no models/model.pt)"
    echo "$1 holds $held: MONAI Label loads full weights; export with \`python -m tools.export --weights full\`" \
        "(or merged) and pass that archive. Nothing was installed."
}
while [ $# -gt 0 ]; do
    case "$1" in
        --studies) studies="${2:?--studies needs a folder}"; shift 2 ;;
        --bundle) bundle="${2:?--bundle needs an archive or folder}"; shift 2 ;;
        --app) app="${2:?--app needs a folder}"; shift 2 ;;
        --host) host="${2:?--host needs an address}"; shift 2 ;;
        --port) port="${2:?--port needs a number}"; shift 2 ;;
        --) shift; break ;;
        -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done
# start_server takes the last of repeated options (and abbreviations of them): what comes after -- must not
# replace the checked host, port, app or studies, e.g. `-- --host 0.0.0.0` without the warning below.
for option in "$@"; do
    case "$option" in
        -i*|-p*|-a*|-s*|--h|--ho*|--p|--po*|--a|--ap*|--st*)
            die "$option after -- is not passed on: use serve.sh's own --host, --port, --app or --studies" ;;
    esac
done
[ -n "$studies" ] || die "--studies FOLDER is required (the fundus images to label)"
[ -d "$studies" ] || die "studies folder $studies does not exist"
studies="$(cd "$studies" && pwd)"  # the server runs in the app folder: a relative path would name another folder
[ -x "$python" ] || die "$python not found: run 'bash monailabel_app/install.sh' first"
[[ "$port" =~ ^[0-9]+$ ]] && [ "${#port}" -le 5 ] && [ "$port" -ge 1 ] && [ "$port" -le 65535 ] \
    || die "--port must be a number from 1 to 65535, got $port"
if [ "$host" != 127.0.0.1 ] && [ "$host" != localhost ] && [ "$host" != ::1 ]; then
    echo "serve.sh: WARNING: listening on $host. MONAI Label 0.8.5 has known path-traversal issues in its datastore" \
        "and session APIs; expose it only behind an authenticating, path-sanitising reverse proxy." >&2
fi
# The bundle is checked whole before anything is written: an installed bundle is kept (it may hold a fine-tuned
# model), so a wrong one would then refuse the right one, and the app refuses a bundle without full weights.
if [ -d "$bundle" ]; then
    [ -f "$bundle/configs/inference.json" ] || die "$bundle is not a bundle folder (no configs/inference.json)"
    held=""; [ ! -f "$bundle/models/adapters.pt" ] || held=adapters
    [ -f "$bundle/models/model.pt" ] || die "$(adapters_only "$bundle" "$held")"
elif [ -f "$bundle" ]; then
    # The archive holds one folder, sam2lora_fundus/ (tools.export).
    contents='import sys, zipfile
try:
    names = set(zipfile.ZipFile(sys.argv[1]).namelist())
except (OSError, zipfile.BadZipFile):
    sys.exit(3)
folder = sys.argv[2]
if f"{folder}/configs/inference.json" not in names:
    sys.exit(4)
if f"{folder}/models/model.pt" not in names:
    sys.exit(5 if f"{folder}/models/adapters.pt" in names else 6)'
    status=0; "$python" -c "$contents" "$bundle" "$name" 2>/dev/null || status=$?
    case "$status" in
        0) ;;
        4) die "$bundle holds no $name/configs/inference.json (not an export archive?)" ;;
        5) die "$(adapters_only "$bundle" adapters)" ;;
        6) die "$(adapters_only "$bundle" "")" ;;
        *) die "$bundle cannot be extracted (not a zip archive of tools.export?)" ;;
    esac
elif [ -n "$bundle" ]; then
    die "bundle $bundle does not exist"
fi
# Checked before installing anything: a server that cannot listen fails only once the app has started, and the
# bundle it installed would then refuse the retry (an installed bundle is kept). Bound as uvicorn's asyncio server
# binds: every address of the host, a family the machine lacks (IPv6 off) passed over, IPv6 sockets IPv6 only.
listen='import socket, sys
for family, kind, proto, _, address in socket.getaddrinfo(
    sys.argv[1], int(sys.argv[2]), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
):
    try:
        probe = socket.socket(family, kind, proto)
    except OSError:
        continue
    with probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        probe.bind(address)'
"$python" -c "$listen" "$host" "$port" 2>/dev/null \
    || die "cannot listen on $host port $port (in use by another server?): choose another --port"
mkdir -p "$app/model"
app="$(cd "$app" && pwd)"
[ "$app" = "$here" ] || cp "$here/main.py" "$app/main.py"
target="$app/model/$name"
if [ -n "$bundle" ]; then
    [ ! -e "$target" ] || die "$target already exists (it may hold a fine-tuned model); remove it, or omit --bundle"
    if [ -d "$bundle" ]; then
        cp -r "$bundle" "$target"
    else
        # Extracted beside its place, then moved in: an interrupted extraction leaves no bundle half installed.
        staging="$(mktemp -d "$app/model/.extract.XXXXXX")"
        unzip='import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])'
        "$python" -c "$unzip" "$bundle" "$staging" 2>/dev/null \
            || { rm -rf "$staging"; die "$bundle cannot be extracted into $app/model (disk full?)"; }
        mv "$staging/$name" "$target"
        rm -rf "$staging"
    fi
fi
[ -f "$target/configs/inference.json" ] \
    || die "no bundle in $target: pass --bundle ARCHIVE.zip (python -m tools.export --weights full)"
# Fundus images come as JPEG, PNG or TIFF (MONAI Label's default list lacks .jpeg and .tiff); its patterns are
# case-sensitive.
export MONAI_LABEL_DATASTORE_FILE_EXT='["*.png","*.jpg","*.jpeg","*.tif","*.tiff","*.PNG","*.JPG","*.JPEG","*.TIF",'\
'"*.TIFF","*.Png","*.Jpg","*.Jpeg","*.Tif","*.Tiff"]'
cd "$app"
exec "$python" -m monailabel.main start_server --app "$app" --studies "$studies" --host "$host" --port "$port" \
    --conf models "$name" "$@"
