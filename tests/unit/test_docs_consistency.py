"""What the docs say about the product must match what it does.

- The README's test command: it needs root, npm and network access to the
  package registries; the README says so, and scripts/install-system-deps
  names what is missing.
- Weights: a backend without a trusted load report gets the MEDIAN capacity
  (lbserver/domain/weights.py), not the mean."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_says_what_the_test_command_needs() -> None:
    head = (ROOT / "README.md").read_text().split("\n## ")[0]
    assert "./scripts/test" in head
    for needed in ("root", "npm registry", "PyPI", "Debian"):
        assert needed in head, f"the README's first section does not mention {needed!r}"


def test_missing_commands_are_named_with_their_debian_package(tmp_path: Path) -> None:
    # A PATH with what the script itself needs, but not npm or ip.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "env", "id", "git", "openssl"):
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    result = subprocess.run(
        [str(bin_dir / "bash"), str(ROOT / "scripts" / "install-system-deps"), "--check"],
        capture_output=True,
        text=True,
        env={**os.environ, "PATH": str(bin_dir)},
        timeout=30,
    )
    assert result.returncode == 1
    assert "missing: npm (Debian package npm)" in result.stderr
    assert "missing: ip (Debian package iproute2)" in result.stderr


def test_unknown_load_gets_the_median_in_every_doc() -> None:
    source = (ROOT / "lbserver" / "domain" / "weights.py").read_text()
    assert "statistics.median(known)" in source
    for path in (ROOT / "docs" / "weights.md", ROOT / "docs" / "troubleshooting.md"):
        text = " ".join(path.read_text().split())
        for sentence in re.split(r"(?<=[.;:])\s", text):
            if re.search(r"blackout|expir|unknown load|without a trusted", sentence):
                assert not re.search(r"\bmean\b", sentence), f"{path.name}: {sentence}"
