"""CI's rule that nothing is skipped: with CAKE_NO_SKIP=1 any skip, at run time or at collection, fails the run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("no_skip", ["1", None])
def test_a_skip_fails_the_run_only_under_cake_no_skip(tmp_path: Path, no_skip: str | None) -> None:
    (tmp_path / "test_runtime.py").write_text(
        "import pytest\n\ndef test_passes():\n    pass\n\ndef test_skips():\n    pytest.skip('no chromium')\n"
    )
    (tmp_path / "test_module.py").write_text(
        "import pytest\n\npytest.importorskip('no_such_module_for_cake')\n\ndef test_never_runs():\n    pass\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "CAKE_NO_SKIP"}
    if no_skip:
        env["CAKE_NO_SKIP"] = no_skip
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.fixtures.no_skip", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if no_skip:
        assert result.returncode == 1, result.stdout + result.stderr
        assert "test_runtime.py::test_skips" in result.stdout and "test_module.py" in result.stdout
    else:
        assert result.returncode == 0, result.stdout + result.stderr
