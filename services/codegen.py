"""Generates the Python gRPC stubs from ``protos/`` (one command) and checks they are fresh.

Run ``python -m services.codegen`` after editing a .proto; ``--check`` exits 1 when the committed
stubs differ from what the protos produce (a test runs it, so stale stubs fail CI).
"""

from __future__ import annotations

import argparse
import filecmp
import re
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"
GEN_ROOT = REPO_ROOT / "services" / "gen"
PACKAGE = "services.gen"

# Generated modules import their siblings by proto package path (``from shardmesh.v1 import ...``,
# ``from inference import ...``); rewritten to live under services.gen.
_PROTO_PACKAGES = ("shardmesh.v1", "inference")
_IMPORT_RE = re.compile(r"^from (" + "|".join(re.escape(p) for p in _PROTO_PACKAGES) + r") import", re.MULTILINE)


def _proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Compiles every .proto into ``out_dir`` and rewrites imports under ``services.gen``."""
    from grpc_tools import protoc  # dev-only dependency: imported lazily
    import grpc_tools

    include = Path(grpc_tools.__file__).parent / "_proto"
    files = [str(p.relative_to(PROTO_ROOT)) for p in _proto_files()]
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *files,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    written: list[Path] = []
    for path in sorted(out_dir.rglob("*.py*")):
        text = path.read_text()
        path.write_text(_IMPORT_RE.sub(rf"from {PACKAGE}.\1 import", text))
        written.append(path)
    for pkg in {out_dir, *[p.parent for p in written]}:
        for parent in [pkg, *pkg.parents]:
            if parent == out_dir.parent:
                break
            init = parent / "__init__.py"
            if not init.exists():
                init.write_text("")
    return written


def _relative_files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts}


def check() -> list[str]:
    """Returns the generated files that are missing, extra or different from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "gen"
        fresh.mkdir()
        generate(fresh)
        expected, actual = _relative_files(fresh), _relative_files(GEN_ROOT)
        problems = [f"missing {p}" for p in sorted(expected - actual)]
        problems += [f"extra {p}" for p in sorted(actual - expected)]
        problems += [
            f"stale {p}"
            for p in sorted(expected & actual)
            if not filecmp.cmp(fresh / p, GEN_ROOT / p, shallow=False)
        ]
        return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if the committed stubs are stale")
    args = parser.parse_args(argv)
    if args.check:
        problems = check()
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            print("generated code is stale: run `python -m services.codegen`", file=sys.stderr)
            return 1
        print("generated code is fresh")
        return 0
    GEN_ROOT.mkdir(parents=True, exist_ok=True)
    for stale in GEN_ROOT.rglob("*_pb2*.py*"):
        stale.unlink()
    for path in generate(GEN_ROOT):
        print(path.relative_to(REPO_ROOT))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
