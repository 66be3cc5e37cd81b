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
# The refusal of a bundle without models/model.pt: $1 the archive or folder given, $2 its models folder.
adapters_only() {
    local held="no models/model.pt"
    [ ! -f "$2/adapters.pt" ] || held="the LoRA adapters only (models/adapters.pt, no models/model.pt)"
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
[[ "$port" =~ ^[0-9]+$ ]] || die "--port must be a number, got $port"
if [ "$host" != 127.0.0.1 ] && [ "$host" != localhost ] && [ "$host" != ::1 ]; then
    echo "serve.sh: WARNING: listening on $host. MONAI Label 0.8.5 has known path-traversal issues in its datastore" \
        "and session APIs; expose it only behind an authenticating, path-sanitising reverse proxy." >&2
fi
mkdir -p "$app/model"
app="$(cd "$app" && pwd)"
[ "$app" = "$here" ] || cp "$here/main.py" "$app/main.py"
target="$app/model/$name"
if [ -n "$bundle" ]; then
    [ ! -e "$target" ] || die "$target already exists (it may hold a fine-tuned model); remove it, or omit --bundle"
    if [ -d "$bundle" ]; then
        [ -f "$bundle/configs/inference.json" ] || die "$bundle is not a bundle folder (no configs/inference.json)"
        [ -f "$bundle/models/model.pt" ] || die "$(adapters_only "$bundle" "$bundle/models")"
        cp -r "$bundle" "$target"
    elif [ -f "$bundle" ]; then
        # The archive holds one folder, sam2lora_fundus/ (tools.export); extract beside it, then move in place.
        staging="$(mktemp -d "$app/model/.extract.XXXXXX")"
        unzip='import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])'
        "$python" -c "$unzip" "$bundle" "$staging" 2>/dev/null \
            || { rm -rf "$staging"; die "$bundle cannot be extracted (not a zip archive of tools.export?)"; }
        [ -f "$staging/$name/configs/inference.json" ] \
            || { rm -rf "$staging"; die "$bundle holds no $name/configs/inference.json (not an export archive?)"; }
        # Checked before installing: the app refuses a bundle without full weights, and an installed bundle is
        # kept (it may hold a fine-tuned model), so the right archive would then be refused as well.
        [ -f "$staging/$name/models/model.pt" ] \
            || { message="$(adapters_only "$bundle" "$staging/$name/models")"; rm -rf "$staging"; die "$message"; }
        mv "$staging/$name" "$target"
        rm -rf "$staging"
    else
        die "bundle $bundle does not exist"
    fi
fi
[ -f "$target/configs/inference.json" ] \
    || die "no bundle in $target: pass --bundle ARCHIVE.zip (python -m tools.export --weights full)"
# Fundus images come as JPEG, PNG or TIFF (MONAI Label's default list lacks .jpeg and .tiff).
export MONAI_LABEL_DATASTORE_FILE_EXT='["*.png","*.jpg","*.jpeg","*.tif","*.tiff","*.PNG","*.JPG","*.JPEG","*.TIF"]'
cd "$app"
exec "$python" -m monailabel.main start_server --app "$app" --studies "$studies" --host "$host" --port "$port" \
    --conf models "$name" "$@"
