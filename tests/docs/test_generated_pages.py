"""The docs pages that hold figures are what docs/generate.py writes from the files they come from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_committed_pages_equal_the_generator_output():
    r = subprocess.run([sys.executable, "docs/generate.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_the_results_page_carries_the_shipped_figures():
    import json

    page = (ROOT / "docs" / "results.md").read_text()
    tests = json.loads((ROOT / "docs" / "data" / "test_sets.json").read_text())
    shipped = next(r for r in tests["rows"] if r["model"] == "X-LoRA (shipped)")
    assert shipped["gap"] in page and shipped["amp"] in page
    manifest = json.loads((ROOT / "src/xlora/science/shipped/xlora-science/manifest.json").read_text())
    assert f"total {manifest['wall_time_s']['total']} s" in page


def test_the_check_fails_on_a_stale_page(tmp_path):
    """Copy the docs folder, edit a generated page, and the check must fail."""
    import shutil

    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    (tmp_path / "src").symlink_to(ROOT / "src")
    (tmp_path / "README.md").write_text((ROOT / "README.md").read_text())
    (tmp_path / "CHANGELOG.md").write_text((ROOT / "CHANGELOG.md").read_text())
    page = tmp_path / "docs" / "results.md"
    page.write_text(page.read_text().replace("0.452", "0.400"))
    r = subprocess.run([sys.executable, "docs/generate.py", "--check"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 1 and "results.md" in r.stderr
