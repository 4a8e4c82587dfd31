"""The configuration explained once: every setting's meaning lives on its field, ``--help`` shows it,
and docs/configuration.md is generated from the same text (and fails here when it drifts)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from cifar10_serving.server import config
from cifar10_serving.server.config import ServerConfig, parse_config

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = dataclasses.fields(ServerConfig)


def test_every_setting_says_what_it_means():
    for f in SETTINGS:
        meaning = f.metadata.get("help", "")
        assert len(meaning.split()) >= 4 and meaning.rstrip().endswith("."), f"{f.name}: {meaning!r}"
        assert f.metadata.get("group"), f.name


def test_help_gives_a_sentence_for_every_flag():
    shown = subprocess.run([sys.executable, "-m", "cifar10_serving.server", "--help"], capture_output=True,
                           text=True, timeout=120, check=True).stdout
    flat = " ".join(shown.split())  # argparse wraps lines
    for f in SETTINGS:
        flag = "--" + f.name.replace("_", "-")
        assert flag in shown, flag
        first_words = " ".join(f.metadata["help"].replace("%%", "%").split()[:4])
        assert first_words in flat, f"{flag}: {first_words!r} not in --help"


def test_the_configuration_page_is_generated_from_the_settings():
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == config.markdown(), ("docs/configuration.md differs from the settings; regenerate it: "
                                       "python -m cifar10_serving.server.config > docs/configuration.md")


def test_the_generated_page_lists_every_flag_and_variable():
    page = config.markdown()
    for f in SETTINGS:
        assert f"`--{f.name.replace('_', '-')}`" in page and f"`CIFAR10_{f.name.upper()}`" in page


def test_a_flag_wins_over_its_variable_and_the_variable_over_the_default():
    assert parse_config([], environ={}).port == 50051
    assert parse_config([], environ={"CIFAR10_PORT": "6000"}).port == 6000
    assert parse_config(["--port", "7000"], environ={"CIFAR10_PORT": "6000"}).port == 7000


def test_a_bad_value_is_refused_naming_the_setting(capsys):
    """A usage error, as argparse gives one: exit status 2 and one line naming the setting, no traceback."""
    with pytest.raises(SystemExit) as exited:
        parse_config(["--compute-nice", "40"], environ={})
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "compute_nice" in error and "Traceback" not in error
