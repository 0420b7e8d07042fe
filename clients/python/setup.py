"""Build step: generates the gRPC stubs of cfrsam.v1 from the repository's protos/ (never committed).

The protos are found in $CFRSAM_PROTOS or ../../protos (this package's place in the repository).
The compiler is protoc with grpc_python_plugin (Debian: protobuf-compiler, protobuf-compiler-grpc),
or grpc_tools.protoc (python3-grpc-tools / the grpcio-tools wheel) when that one knows proto3
`optional` (protoc 3.15+).
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO = "cfrsam/v1/segmentation.proto"


def proto_root():
    root = os.environ.get("CFRSAM_PROTOS") or os.path.join(HERE, "..", "..", "protos")
    if not os.path.isfile(os.path.join(root, PROTO)):
        sys.exit(f"cfrsam-client: {PROTO} not found under {root}; set CFRSAM_PROTOS to the repository's protos/")
    return root


def compilers(root, out):
    plugin = shutil.which("grpc_python_plugin")
    protoc = shutil.which("protoc")
    if protoc and plugin:
        yield [
            protoc,
            f"--plugin=protoc-gen-grpc_python={plugin}",
            f"-I{root}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            PROTO,
        ]
    yield [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"-I{root}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        PROTO,
    ]


def generate(dest):
    root = proto_root()
    errors = []
    with tempfile.TemporaryDirectory() as tmp:
        for cmd in compilers(root, tmp):
            run = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
            if run.returncode == 0:
                break
            errors.append(f"{cmd[0]}: {run.stderr.strip()[:300]}")
        else:
            sys.exit(
                "cfrsam-client: cannot generate the stubs (install protobuf-compiler and protobuf-compiler-grpc):\n"
                + "\n".join(errors)
            )
        os.makedirs(dest, exist_ok=True)
        for name in ("segmentation_pb2.py", "segmentation_pb2_grpc.py"):
            with open(os.path.join(tmp, "cfrsam", "v1", name)) as f:
                text = f.read()
            # The generated import is absolute (cfrsam.v1); inside this package it is relative.
            text = re.sub(r"^from cfrsam\.v1 import", "from . import", text, flags=re.M)
            with open(os.path.join(dest, name), "w") as f:
                f.write(text)
        with open(os.path.join(dest, "__init__.py"), "w") as f:
            f.write("# Generated from protos/cfrsam/v1/segmentation.proto at build time.\n")


# Every build step (metadata, wheel, sdist) needs the package directory, so the stubs are made first.
generate(os.path.join(HERE, "cfrsam_client", "_gen"))
setup()
