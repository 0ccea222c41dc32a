"""Fixtures for the cluster tests: a fresh harness cluster per test (see
tests/cluster/harness), and the pinned helm. The harness needs root (network
and mount namespaces), which CI has; it never skips."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.cluster.harness import ClusterHarness
from tests.support.helm import install_helm


@pytest.fixture(scope="session")
def helm_binary() -> Path:
    return install_helm()


@pytest.fixture
async def k8s(tmp_path: Path, helm_binary: Path) -> AsyncIterator[ClusterHarness]:
    assert os.geteuid() == 0, (
        "the cluster harness needs root: it creates network and mount namespaces (CI runs as root)"
    )
    async with ClusterHarness.started(tmp_path, helm_binary) as harness:
        yield harness
