"""Shared test data and the command line, for comparing the Python API with the CLI.

The shared folder is ``$NEUROSTEER_SHARED`` (default: ``../shared`` beside the checkout), as for
the Rust tests; without it every test is skipped with a loud reason. The CLI is
``$NEUROSTEER_CLI``, else built here in release mode in ``$CARGO_TARGET_DIR`` or ``target/``,
where ``pip install .`` from the checkout built the extension: with the bindings crate selected
too, cargo resolves the dependencies' features as for the extension and reuses what it compiled.
"""

import json
import os
import struct
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def shared() -> Path:
    d = Path(os.environ.get("NEUROSTEER_SHARED", REPO.parent / "shared"))
    if not (d / "fixtures").is_dir():
        msg = f"*** SKIPPED: shared test data not found at {d} (set NEUROSTEER_SHARED) ***"
        warnings.warn(msg)
        pytest.skip(msg)
    return d


@pytest.fixture(scope="session")
def cli() -> Path:
    exe = os.environ.get("NEUROSTEER_CLI")
    if exe:
        return Path(exe)
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "neurosteer", "-p", "neurosteer-python", "--bin", "neurosteer"], cwd=REPO, check=True)
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    return target / "release" / "neurosteer"


def run_cli(cli: Path, *args) -> subprocess.CompletedProcess:
    """Runs the CLI; raises with its stderr when it fails."""
    p = subprocess.run([str(cli), *map(str, args)], capture_output=True, text=True)
    if p.returncode != 0:
        raise AssertionError(f"neurosteer {' '.join(map(str, args))} failed:\n{p.stderr}")
    return p


def cli_error(cli: Path, *args) -> str:
    """The one-line message of a CLI failure (after `neurosteer: error: `)."""
    p = subprocess.run([str(cli), *map(str, args)], capture_output=True, text=True)
    assert p.returncode != 0, "the command was expected to fail"
    line = [l for l in p.stderr.splitlines() if l.startswith("neurosteer: error: ")][-1]
    return line[len("neurosteer: error: "):]


_DTYPES = {"F32": np.float32, "I64": np.int64, "F64": np.float64, "I32": np.int32, "U32": np.uint32}


def read_safetensors(path: Path) -> dict:
    """A safetensors file's tensors as numpy arrays (no dependency beyond numpy)."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    data = raw[8 + n :]
    out = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(data[start:end], dtype=_DTYPES[info["dtype"]]).reshape(info["shape"])
    return out
