"""The `vg-ros` dispatcher: help, unknown commands, and one-line errors instead of tracebacks."""
from __future__ import annotations

import subprocess
import sys

from vg_ros.cli import COMMANDS, main


def test_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_unknown_command(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_train_unknown_model_is_one_line(capsys):
    assert main(["train", "teleportation"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'teleportation'" in err and "Traceback" not in err


def test_every_command_module_exists():
    import importlib
    for name, (target, _) in COMMANDS.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name


def test_console_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "vg_ros.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "usage: vg-ros" in proc.stdout
