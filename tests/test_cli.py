"""The `fangzhi` command: every subcommand has --help, and `python -m fangzhi` is the same program."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fangzhi.cli import build_parser, main

COMMANDS = [
    ["demo"], ["base"], ["dataset", "check"], ["dataset", "select"], ["train"], ["lora", "export"],
    ["prompts", "check"], ["prompts", "modernize"], ["generate"], ["study", "create"], ["study", "export"],
    ["rate"], ["analyze"], ["clip-score"], ["clip-check"],
]


def test_every_command_is_listed():
    listed = set(build_parser()._subparsers._group_actions[0].choices)
    assert listed == {command[0] for command in COMMANDS}


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    assert "usage: fangzhi " + " ".join(command) in capsys.readouterr().out


def test_python_dash_m_runs_the_same_cli():
    result = subprocess.run([sys.executable, "-m", "fangzhi", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "fangzhi (方志)" in result.stdout
