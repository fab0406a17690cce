"""Fixtures for the fault-injection tests: a process cluster per test (always killed at
the end, logs printed when the test failed) and the no-fault transcripts to compare with."""

from __future__ import annotations

import asyncio
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.faults.harness import Cluster
from tests.faults.scenarios import clean_run


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """An unstarted cluster; every process it started is killed when the test ends."""
    c = Cluster(tmp_path / "cluster")
    yield c
    c.close()
    call = getattr(request.node, "rep_call", None)
    if call is None or call.failed:
        print(c.logs())


@pytest.fixture(scope="session")
def clean_texts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Transcript of each clip from a no-fault run through the same processes."""
    return asyncio.run(clean_run(Cluster(tmp_path_factory.mktemp("clean"))))
