"""Behaviour held across refactors: every GGUF mixture of every tiny architecture, byte for byte as
recorded before the package was laid out by format (tests/golden.py; re-record an intended change with
`python -m tests.golden --record CASE` in its own commit, saying why)."""

from __future__ import annotations

import pytest

from tests import golden

pytestmark = pytest.mark.slow
CASES = [c for c in golden.cases() if c.startswith("gguf/")]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("golden")


@pytest.mark.parametrize("case", CASES)
def test_same_bytes_as_recorded(case, work):
    assert golden.produce(case, work) == golden.recorded()[case]
