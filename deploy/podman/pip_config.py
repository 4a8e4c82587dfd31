"""This machine's pip settings, for a container build: one pip.conf, and the local paths it names.

    python3 deploy/podman/pip_config.py OUT.conf    # writes OUT.conf, prints one path to mount per line

pip here reads its config files and ``PIP_*`` variables (``pip config list`` shows both; a variable
wins over a file). A ``podman build`` sees neither, so build.sh mounts the merged settings at the
container's /etc/pip.conf and, read-only at the same place, every local file or folder they name
(the certificate bundle, a constraints file, wheel folders, ``file://`` indexes). Without them a
build inside the container downloads torch and its CUDA libraries: gigabytes.
"""

from __future__ import annotations

import ast
import configparser
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse


def pip_settings(python: str = sys.executable) -> dict[str, str]:
    """{option: value}, config files first, then the ``PIP_*`` variables over them."""
    out = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True).stdout
    files, env = {}, {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        section, _, option = key.rpartition(".")
        value = ast.literal_eval(value)  # pip prints values with repr()
        if section == ":env:":
            env[option] = value
        elif section in ("global", "install", "download", "wheel"):
            files.setdefault(option, value)  # the build only runs pip install; any section's value will do
    return {**files, **env}


def local_paths(settings: dict[str, str]) -> list[Path]:
    """The existing local files and folders the settings point to."""
    paths = set()
    for value in settings.values():
        for token in value.split():
            path = Path(urlparse(token).path) if token.startswith("file://") else Path(token)
            if not path.is_absolute() or not path.exists():
                continue
            # A PEP 503 index links to its files relative to its root (../../files/x.whl): mount the root.
            paths.add(path.parent if path.name == "simple" else path)
    return sorted(paths)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: pip_config.py OUT.conf", file=sys.stderr)
        return 2
    settings = pip_settings()
    config = configparser.ConfigParser(interpolation=None)
    config["global"] = settings
    with open(argv[0], "w") as f:
        config.write(f)
    os.chmod(argv[0], 0o644)
    for path in local_paths(settings):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
