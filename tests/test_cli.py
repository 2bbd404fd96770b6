"""`python -m pipeline`: every command documents itself; unknown commands fail."""

from __future__ import annotations

import pytest

from pipeline.__main__ import COMMANDS, main


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert f"python -m pipeline {command}" in out and "--log" in out


def test_unknown_command_fails_and_lists_commands(capsys):
    assert main(["qualty"]) == 2
    assert "quality" in capsys.readouterr().err
