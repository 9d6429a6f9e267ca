"""The README's two commands stay the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())


def test_readme_opens_with_the_main_job_and_the_tests():
    main_job, tests = readme_commands()[:2]
    assert main_job.endswith("sparsecode compare")
    assert tests.endswith("python -m pytest tests")


def test_ci_runs_the_readme_install_and_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    install, test_command = readme_commands()[1].rsplit(" && ", 1)
    for step in install.split(" && "):
        assert step in ci, f"CI does not run the README's install step: {step}"
    assert test_command in ci
