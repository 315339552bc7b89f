"""The README's quick start is what CI runs, and its stage commands exist."""

from __future__ import annotations

import re

from conftest import REPO

from pipeline import registry


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"## Quick start.*?```bash\n(.*?)\n```.*?```bash\n(.*?)\n```", readme, re.DOTALL)[0]
    install_and_run, install_and_test = blocks
    assert install_and_run.endswith("selfsup run")
    ci = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci == install_and_test


def test_readme_documents_every_stage():
    readme = (REPO / "README.md").read_text()
    for stage in registry.names("stage"):
        assert f"selfsup {stage}" in readme, stage
