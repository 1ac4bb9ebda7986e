"""How the browser tests find Chromium, and what happens without it (README, "Run the tests").

Locally a missing Chromium (or Playwright) skips them, saying why; under ``CI=true`` it
fails them, so that a CI machine without a browser cannot pass by running nothing. Checked
by running the browser tests in a child pytest pointed at a Chromium that does not exist.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOWHERE = "/nonexistent/chromium"
try:
    import playwright  # noqa: F401 - only whether it is there

    WHY = f"no Chromium at {NOWHERE}"
except ImportError:  # pragma: no cover - depends on the machine
    WHY = "playwright is not installed"


def run_browser_tests(ci: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SHARDCHAT_CHROMIUM=NOWHERE, CI=ci)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs"]
        + ["tests/e2e/test_browser.py", "-k", "name_taken"],
        capture_output=True,
        text=True,
        cwd=str(ROOT),
        env=env,
        timeout=120,
    )


@pytest.mark.timeout(150)
def test_without_chromium_the_browser_tests_skip_and_say_why() -> None:
    done = run_browser_tests(ci="")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 skipped" in done.stdout
    assert f"browser tests need Playwright and Chromium: {WHY}" in done.stdout


@pytest.mark.timeout(150)
def test_under_ci_a_missing_chromium_fails_instead_of_skipping() -> None:
    done = run_browser_tests(ci="true")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "skipped" not in done.stdout
    assert f"CI must run the browser tests: {WHY}" in done.stdout
