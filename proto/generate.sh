#!/usr/bin/env bash
# Regenerates the Python code of the gRPC API from proto/ into server/proto_gen/ (checked in).
#
#   proto/generate.sh            # into server/proto_gen/
#   proto/generate.sh OUT_DIR    # elsewhere (tests/e2e/test_grpc.py compares the two, so they cannot drift)
#
# PYTHON picks the interpreter (default: python); it needs grpcio-tools at the version pinned in
# pyproject.toml's test extra, since other versions write different code.
#
# protoc names modules after the .proto path: vqdiff/v1/generate.proto -> vqdiff/v1/generate_pb2.py,
# and generate_pb2_grpc.py imports it as `from vqdiff.v1 import generate_pb2`. That absolute import
# would resolve to this repository's own top-level `vqdiff` package (the CLI), so the one import line
# is rewritten to `from vqdiff.server.proto_gen.vqdiff.v1 import ...`.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$root/server/proto_gen}"
python="${PYTHON:-python}"
protos=(vqdiff/v1/generate.proto)

mkdir -p "$out"
"$python" -m grpc_tools.protoc -I"$root/proto" --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
    "${protos[@]/#/$root/proto/}"

for proto in "${protos[@]}"; do
    pkg="$(dirname "$proto")"  # vqdiff/v1
    grpc_py="$out/${proto%.proto}_pb2_grpc.py"
    dotted="${pkg//\//.}"      # vqdiff.v1
    sed -i "s/^from ${dotted//./\\.} import /from vqdiff.server.proto_gen.${dotted} import /" "$grpc_py"
    grep -q "^from vqdiff.server.proto_gen.${dotted} import " "$grpc_py" || { echo "generate.sh: import rewrite failed in $grpc_py" >&2; exit 1; }
    # every directory on the way is a package
    d="$pkg"
    while [ "$d" != "." ]; do
        touch "$out/$d/__init__.py"
        d="$(dirname "$d")"
    done
done
touch "$out/__init__.py"
