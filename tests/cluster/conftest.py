"""Fixtures of the cluster tests: ``kind(scenario)`` runs an async scenario on a fresh stand-in kind node."""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from podnet import unavailable  # noqa: E402


@pytest.fixture
def kind(tmp_path):
    """Call with ``async def scenario(cluster)``; a deadline bounds it, pod logs are printed on failure."""
    why = unavailable()
    if why:
        pytest.skip(why)
    from cluster import kind_node

    async def main(scenario, timeout):
        async with kind_node(tmp_path) as cluster:
            try:
                await asyncio.wait_for(scenario(cluster), timeout)
            except BaseException:
                print(cluster.logs("")[-20000:])
                raise

    def run(scenario, timeout: float = 300) -> None:
        asyncio.run(main(scenario, timeout))
    return run
