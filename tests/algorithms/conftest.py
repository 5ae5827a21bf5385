"""Fixtures shared by the algorithm tests: every module runs on one intra-op thread."""

import pytest


@pytest.fixture(autouse=True, scope="module")
def algorithm_tests_on_one_thread(one_thread):
    yield
