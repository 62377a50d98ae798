"""`.ci/run`: it runs exactly the README's test command, and pytest's exit 5 (no tests collected) fails it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README_COMMAND = 'python -m pip install "torch==2.13.0" -e ".[torch,test]" && python -m pytest'


def fake_repo(tmp_path: Path, pytest_rc: int, pip_rc: int = 0) -> tuple[Path, Path]:
    """A copy of .ci/run and README.md, and a `python` on PATH that logs its arguments and exits with the given
    codes for `-m pip` and `-m pytest`."""
    repo = tmp_path / "repo"
    (repo / ".ci").mkdir(parents=True)
    shutil.copy(REPO / ".ci" / "run", repo / ".ci" / "run")
    shutil.copy(REPO / "README.md", repo / "README.md")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    (bin_dir / "python").write_text(f"""#!/usr/bin/env bash
printf '%s\\n' "$*" >> {log}
case "$2" in pip) exit {pip_rc};; pytest) exit {pytest_rc};; esac
exit 99
""")
    (bin_dir / "python").chmod(0o755)
    return repo, log


def ci(repo: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", str(repo / ".ci" / "run")], capture_output=True, text=True, env=env, timeout=60)


def test_readme_shows_the_command():
    assert README_COMMAND in (REPO / "README.md").read_text().splitlines()


@pytest.mark.parametrize("pytest_rc,message", [(0, None), (1, "CI: FAILED with exit code 1"),
                                                (5, "CI: FAILED: pytest collected no tests (exit code 5)")])
def test_exit_codes(tmp_path, pytest_rc, message):
    repo, log = fake_repo(tmp_path, pytest_rc)
    r = ci(repo, tmp_path)
    assert r.returncode == pytest_rc, r.stderr
    if message:
        assert message in r.stderr, r.stderr
    else:
        assert "FAILED" not in r.stderr, r.stderr
    assert log.read_text().splitlines() == ['-m pip install torch==2.13.0 -e .[torch,test]', "-m pytest"]


def test_a_failed_install_stops_before_pytest(tmp_path):
    repo, log = fake_repo(tmp_path, 0, pip_rc=3)
    r = ci(repo, tmp_path)
    assert r.returncode == 3 and log.read_text().splitlines() == ['-m pip install torch==2.13.0 -e .[torch,test]']


def test_a_readme_without_the_command_fails(tmp_path):
    repo, log = fake_repo(tmp_path, 0)
    (repo / "README.md").write_text("python -m pytest\n")
    r = ci(repo, tmp_path)
    assert r.returncode == 1 and "no longer shows the test command" in r.stderr and not log.exists()
