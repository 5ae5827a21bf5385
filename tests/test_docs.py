"""The documentation site builds strictly (a broken link or a bad docstring fails), and its
generated table of published numbers is up to date."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MKDOCS = Path(sys.executable).parent / "mkdocs"


@pytest.mark.slow
def test_docs_build_strictly(tmp_path):
    if not MKDOCS.exists():
        pytest.fail("mkdocs is not installed: make install-test installs the test extras with it")
    done = subprocess.run(
        [str(MKDOCS), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "index.html").read_text().count("MetaAlgorithm") > 3


def test_generated_pages_are_up_to_date():
    done = subprocess.run(
        [sys.executable, "scripts/docs_tables.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
