"""The fast path really runs the Cython gate when it should, and the reference when told to.

CI and benchmarks set COVERGATE_REQUIRE_EXTENSIONS=1 so that a silent fallback cannot hide.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import fastpath

ROOT = Path(__file__).resolve().parent.parent


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


@pytest.mark.skipif(
    not _flag("COVERGATE_REQUIRE_EXTENSIONS"),
    reason="COVERGATE_REQUIRE_EXTENSIONS is not set: the pure-Python fallback is allowed",
)
def test_the_cython_gate_is_loaded_when_required():
    from fastpath import _gate_c

    assert fastpath.IMPLEMENTATION == "cython"
    assert fastpath.Gate is _gate_c.Gate


def _implementation_in_subprocess(**environment: str) -> str:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("COVERGATE_NO_EXTENSIONS", "COVERGATE_REQUIRE_EXTENSIONS")
    }
    env.update(environment)
    result = subprocess.run(
        [sys.executable, "-c", "import fastpath; print(fastpath.IMPLEMENTATION, fastpath.Gate)"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return result.stdout.strip()


def test_no_extensions_selects_the_reference():
    out = _implementation_in_subprocess(COVERGATE_NO_EXTENSIONS="1")
    assert out.startswith("python ")
    assert "fastpath._gate_py.Gate" in out


def test_both_flags_at_once_is_an_error():
    with pytest.raises(subprocess.CalledProcessError) as raised:
        _implementation_in_subprocess(COVERGATE_NO_EXTENSIONS="1", COVERGATE_REQUIRE_EXTENSIONS="1")
    assert "both set" in raised.value.stderr


@pytest.mark.parametrize("implementation", ["_gate_c", "_gate_py"])
def test_the_gates_refuse_a_protobuf_backend_they_do_not_handle(implementation: str) -> None:
    """The pure-Python protobuf backend raises UnicodeDecodeError (not DecodeError) on bad UTF-8,
    and the Cython gate relies on upb's re-serialisation: a gate refuses to start on it."""
    if implementation == "_gate_c":
        pytest.importorskip("fastpath._gate_c")
    script = (
        "import lmdb, tempfile\n"
        f"from fastpath import {implementation} as m\n"
        "from fastpath.rules import Keys\n"
        "env = lmdb.open(tempfile.mkdtemp(), max_dbs=1)\n"
        "try:\n"
        "    m.Gate(env, env.open_db(b'r'), Keys(b'p' * 32))\n"
        "except RuntimeError as exc:\n"
        "    print(exc)\n"
    )
    env = dict(os.environ, PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION="python")
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
        check=True, timeout=60,
    )  # fmt: skip
    assert "needs protobuf's upb backend" in result.stdout
