"""The command line's frame: help, version, exit codes, and a reference that cannot drift."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from genselfdiff import __version__
from genselfdiff.app.cli import build_parser, main

DOC = Path(__file__).resolve().parents[2] / "docs" / "cli.md"
EXPECTED = {"pretrain", "sample", "finetune", "segment", "evaluate", "export-geojson", "import-geojson", "demo"}


def _subparsers():
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_documented_subcommand_exists():
    assert EXPECTED <= set(_subparsers())


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and __version__ in capsys.readouterr().out
    for name in _subparsers():
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0


def test_no_command_and_bad_usage_exit_2(capsys):
    assert main([]) == 2
    with pytest.raises(SystemExit) as e:
        main(["segment"])  # missing arguments
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["no-such-command"])
    assert e.value.code == 2


def test_user_error_is_one_sentence_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "genselfdiff", "segment", str(tmp_path / "missing.pt"),
                             str(tmp_path / "x.png"), "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("genselfdiff: error:") and len(result.stderr.strip().splitlines()) == 1


def test_segment_of_a_folder_without_images_says_what_it_looked_for(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["segment", str(tmp_path / "model.pt"), str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No images found" in err and ".svs" in err


def test_cli_reference_is_current():
    """docs/cli.md names every subcommand and option (regenerate: python docs/make_cli_reference.py)."""
    sections = {s.split("\n", 1)[0]: s for s in DOC.read_text().split("## genselfdiff ")[1:]}
    for name, parser in _subparsers().items():
        assert name in sections, f"{name} has no section in docs/cli.md"
        for action in parser._actions:
            for opt in action.option_strings:
                assert opt in sections[name], f"{name} {opt} missing from its section of docs/cli.md"
