#!/usr/bin/env bash
# Fills .whl/ (git-ignored, never committed) with what the lent GPU machine's image lacks, for Python 3.12
# x86_64: pydantic and Ray (RAY_VERSION of scripts/versions.env) with Ray's pure-Python dependencies.
# Ray's wheel (79 MB) is repacked without its Java jars (32 MB; Python workers never load them) so the
# whole folder fits the device tool's 64 MiB carry. scripts/gpu/setup.sh installs the folder there.
# Usage (repository root, with PyPI reachable): bash scripts/gpu/fetch-wheels.sh
set -euo pipefail
. scripts/versions.env
out=.whl tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out"
get() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform any -d "$1" "${@:2}"
}
get "$out" pydantic==2.13.4 pydantic_core==2.46.4 annotated_types==0.7.0 typing_inspection==0.4.2 \
  click msgpack protobuf jsonschema jsonschema-specifications referencing rpds-py attrs
get "$tmp" "ray==$RAY_VERSION"
python3 - "$tmp"/ray-*.whl "$out" <<'EOF'
import os, sys, zipfile
src, out = sys.argv[1], sys.argv[2]
dst = os.path.join(out, os.path.basename(src))
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
    for item in zin.infolist():
        if item.filename.startswith("ray/jars/"):
            continue
        data = zin.read(item)
        if item.filename.endswith(".dist-info/RECORD"):
            data = b"\n".join(line for line in data.splitlines() if not line.startswith(b"ray/jars/"))
        zout.writestr(item, data)
EOF
du -sh "$out"
