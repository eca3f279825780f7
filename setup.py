"""Build steps pyproject.toml cannot express: protobuf/gRPC stubs and the Cython fast path.

Stubs are generated from protos/ into the `covergate` package at build time and never committed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py
from setuptools.command.egg_info import egg_info

ROOT = Path(__file__).parent.resolve()


def generate_stubs() -> None:
    """Run grpc_tools.protoc over protos/ (also `make proto`)."""
    import google.rpc.status_pb2  # googleapis-common-protos ships status.proto beside it
    import grpc_tools
    from grpc_tools import protoc

    googleapis = Path(google.rpc.status_pb2.__file__).resolve().parent.parent.parent
    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    protos = sorted(str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos").rglob("*.proto"))
    out = ROOT
    args = [
        "grpc_tools.protoc",
        f"-I{ROOT / 'protos'}",
        f"-I{googleapis}",
        f"-I{well_known}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--pyi_out={out}",
        *protos,
    ]
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        if protoc.main(args) != 0:
            sys.exit("protoc failed")
    finally:
        os.chdir(cwd)
    for pkg in {Path(p).parent for p in protos}:
        d = out / pkg
        while d != out:
            (d / "__init__.py").touch()
            d = d.parent


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        generate_stubs()
        super().run()


class EggInfoWithStubs(egg_info):
    # egg_info lists packages before build_py runs; the generated package must exist by then.
    def run(self) -> None:
        generate_stubs()
        super().run()


def extensions() -> list[Extension]:
    if os.environ.get("COVERGATE_NO_EXTENSIONS") == "1":
        return []
    from Cython.Build import cythonize

    return cythonize(
        [
            Extension(
                "fastpath._gate_c",
                ["fastpath/_gate_c.pyx"],
                # The C headers it includes: a change to one rebuilds the extension.
                depends=sorted(str(p.relative_to(ROOT)) for p in (ROOT / "fastpath").glob("*.h")),
                extra_compile_args=["-O3"],
                libraries=["pthread"],  # the quota slot mutexes (in libc since glibc 2.34)
            ),
            # The headers' hashes for tests only: the gate itself exposes no test hooks.
            Extension(
                "fastpath._hashes_for_tests",
                ["fastpath/_hashes_for_tests.pyx"],
                # -O3 as the gate: bench.micro times the hashes here as the gate runs them.
                extra_compile_args=["-O3", "-Wno-unused-function"],
            ),
        ],
        compiler_directives={
            "language_level": 3,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "initializedcheck": False,
        },
    )


if __name__ == "__main__":
    setup(
        ext_modules=extensions(),
        cmdclass={"build_py": BuildPyWithStubs, "egg_info": EggInfoWithStubs},
    )
