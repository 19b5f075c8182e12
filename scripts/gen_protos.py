"""Generate the Python modules and typing stubs of the protobuf contracts.

Every ``protos/**/*.proto`` file becomes ``carillon/**/<name>_pb2.py`` (messages), ``_pb2_grpc.py``
(service stubs and servicers) and ``.pyi`` stubs from mypy-protobuf. ``--check`` regenerates into a
temporary folder and fails when the committed files differ, so a stale checkout cannot pass the tests.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
PACKAGE = "carillon"


def generate(out: Path) -> None:
    """Run protoc over every contract, writing the generated tree under ``out``."""
    files = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    include = str(resources.files("grpc_tools") / "_proto")
    bindir = Path(sys.executable).parent
    args = [
        "protoc",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *files,
    ]
    code = protoc.main(args)
    if code != 0:
        raise SystemExit(f"protoc failed with exit code {code}")
    for folder in [out / PACKAGE, *(p for p in (out / PACKAGE).rglob("*") if p.is_dir())]:
        init = folder / "__init__.py"
        if not init.exists():
            init.write_text('"""Generated protobuf contracts; do not edit (run `make protos`)."""\n')
    (out / PACKAGE / "py.typed").write_text("")


def generated_files(root: Path) -> set[Path]:
    """Return the generated files below ``root/carillon`` relative to ``root``."""
    return {p.relative_to(root) for p in (root / PACKAGE).rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def main() -> int:
    """Generate in place, or with ``--check`` compare a fresh generation with the checkout."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed files are stale")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        if opts.check:
            want, have = generated_files(fresh), generated_files(ROOT)
            stale = sorted(str(p) for p in want ^ have)
            stale += sorted(str(p) for p in want & have if not filecmp.cmp(fresh / p, ROOT / p, shallow=False))
            if stale:
                print("generated protobuf code is stale; run `make protos`:", *stale, sep="\n  ")
                return 1
            print("generated protobuf code is up to date")
            return 0
        shutil.rmtree(ROOT / PACKAGE, ignore_errors=True)
        shutil.copytree(fresh / PACKAGE, ROOT / PACKAGE)
        print(f"generated {len(generated_files(ROOT))} files under {PACKAGE}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
