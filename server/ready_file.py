"""The ready file: the JSON document a server writes, atomically, once it is SERVING (``--ready-file``).

It holds the pid, the ports it bound (gRPC and metrics), the models and the device, so a supervisor,
a test or a benchmark reads ports from it rather than from log lines (``server.launcher``).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_ready_file(path: str | os.PathLike, document: dict[str, Any]) -> None:
    """Writes ``document`` as JSON to ``path`` atomically: a reader sees the whole file or none."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(document, f)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_ready_file(path: str | os.PathLike) -> None:
    Path(path).unlink(missing_ok=True)


def read_ready_file(path: str | os.PathLike) -> dict[str, Any] | None:
    """The document, or None while there is none (the rename makes a half-written file impossible)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
