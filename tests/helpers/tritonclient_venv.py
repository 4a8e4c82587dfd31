"""A venv holding NVIDIA's tritonclient, as a real user's would be: it pins protobuf<7 and this
project needs >=7. ``$TRITONCLIENT_VENV``, or ``.cache/tritonclient-venv`` in the checkout, made with
pip on first use (about a minute) and reused after; without a package registry the tests skip."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
REQUIREMENT = "tritonclient[grpc,http]"  # 2.73.0 when this was written; its own pins choose protobuf and grpcio
INSTALL_TIMEOUT_SECONDS = 900  # a fresh venv and a cold pip cache on a slow link


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def works(python: Path) -> bool:
    if not python.exists():
        return False
    return subprocess.run([str(python), "-c", "import tritonclient.grpc, tritonclient.http"], capture_output=True,
                          timeout=120).returncode == 0


def triton_python() -> Path:
    """The python of a venv holding tritonclient: reused when it works, made when it does not."""
    venv = Path(os.environ.get("TRITONCLIENT_VENV") or ROOT / ".cache" / "tritonclient-venv")
    python = venv_python(venv)
    if works(python):
        return python
    shutil.rmtree(venv, ignore_errors=True)  # a half-made one from an interrupted run
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", REQUIREMENT],
                       check=True, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_SECONDS)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        shutil.rmtree(venv, ignore_errors=True)
        tail = (getattr(exc, "stderr", "") or "").strip().splitlines()[-3:]
        pytest.skip(f"could not make a venv with {REQUIREMENT} at {venv} (no package registry?): {' / '.join(tail)}")
    return python
