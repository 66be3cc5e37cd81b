#!/usr/bin/env bash
# Creates .venv-monailabel beside .venv: MONAI Label 0.8.5 layered over the project's venv.
#
# `pip install monailabel==0.8.5` into the project venv would downgrade numpy to 1.26 and jsonschema to 3.2
# (pins of numpymaxflow and pydicom-seg), which breaks numpy-2 builds of torch, scipy and friends. This venv
# therefore holds only MONAI Label and its extra dependencies, and reads everything else (torch, monai, sam2...)
# from the project's venv through a .pth file. The project's own editable install is NOT visible in it, so a
# served bundle imports its own `scripts` package, as it would on a clinical workstation.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
project="$root/.venv"
target="$root/.venv-monailabel"
site_of() { "$1/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }
[ -x "$project/bin/python" ] || { echo "error: $project does not exist; create the project venv first" >&2; exit 1; }
# The project venv's own Python version: the layered venv reads packages built for it.
base_python="$("$project/bin/python" -c 'import os, sys; print(os.path.join(sys.base_prefix, "bin", "python%d.%d" % sys.version_info[:2]))')"
version() { "$1" -c 'import sys; print(sys.version)'; }
# Run again, it keeps a working venv and installs what changed: a failed download then leaves it as it was.
if [ ! -x "$target/bin/python" ] || [ "$(version "$target/bin/python")" != "$(version "$base_python")" ]; then
    rm -rf "$target"
    "$base_python" -m venv "$target"
fi
site_of "$project" > "$(site_of "$target")/project_venv.pth"
"$target/bin/pip" install -q --no-deps "monailabel==0.8.5" "pydicom-seg==0.4.1"
"$target/bin/pip" install -q -r "$root/monailabel_app/requirements.txt"
"$target/bin/python" -c 'import monailabel, numpy; print("MONAI Label", monailabel.__version__, "numpy", numpy.__version__)'
