"""Generate the Python modules of the CSI contract from ``proto/csi/v1/csi.proto``.

The .proto is compiled under the virtual include path ``interposer/proto/csi/`` so
that the generated gRPC module imports its messages as
``from interposer.proto.csi import csi_pb2`` (an absolute import that works from an
installed package), while the proto package stays ``csi.v1`` on the wire.

Usage::

    python proto/csi/generate.py [OUT_DIR]

``OUT_DIR`` defaults to ``proto/src``; the modules land in
``OUT_DIR/interposer/proto/csi/``. ``make proto`` runs this; a test runs it into a
temporary directory and compares the result with the committed files.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

#: Directory of this script: ``proto/csi``.
CSI_DIR = Path(__file__).resolve().parent
#: Source of the contract.
CSI_PROTO = CSI_DIR / "v1" / "csi.proto"
#: Where the committed generated modules live (``--python_out`` root).
DEFAULT_OUT_ROOT = CSI_DIR.parent / "src"
#: Import path the .proto is compiled under; decides the generated import lines.
VIRTUAL_PACKAGE_DIR = "interposer/proto/csi"
#: The files protoc writes, relative to the output root.
GENERATED_FILES = tuple(
    f"{VIRTUAL_PACKAGE_DIR}/{name}" for name in ("csi_pb2.py", "csi_pb2.pyi", "csi_pb2_grpc.py")
)


def generate(out_root: Path = DEFAULT_OUT_ROOT) -> list[Path]:
    """Compile the CSI .proto into ``out_root/interposer/proto/csi/``.

    Args:
        out_root: root of the Python package tree to write into; created if missing.

    Returns:
        The paths of the generated files (see :data:`GENERATED_FILES`).

    Raises:
        subprocess.CalledProcessError: protoc (from grpcio-tools) rejected the .proto
            or is not installed.
    """
    out_root.mkdir(parents=True, exist_ok=True)
    (out_root / VIRTUAL_PACKAGE_DIR).mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{VIRTUAL_PACKAGE_DIR}={CSI_PROTO.parent}",
            f"--python_out={out_root}",
            f"--pyi_out={out_root}",
            f"--grpc_python_out={out_root}",
            f"{VIRTUAL_PACKAGE_DIR}/{CSI_PROTO.name}",
        ],
        check=True,
    )
    return [out_root / name for name in GENERATED_FILES]


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT_ROOT
    for path in generate(target):
        print(path)
