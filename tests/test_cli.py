"""The command line: a listing that imports nothing heavy, one-line errors, plain commands."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def test_help_lists_every_stage_without_importing_torch():
    code = ("import sys\nfrom pipeline.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'LIGHT')")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=REPO,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("LIGHT")
    for stage in ("pretrain", "shard", "tokenize", "validate"):
        assert stage in done.stdout


def test_a_misspelt_option_names_the_closest_one(capsys):
    from pipeline.cli import main

    try:
        main(["validate", "x", "--ful"])
    except SystemExit as e:
        assert e.code == 2
    assert "did you mean --full?" in capsys.readouterr().err
