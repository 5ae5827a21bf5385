"""The suite's scheduling over xdist workers (``make test`` runs ``--dist loadgroup``): the tests
that share a module-scoped fixture of their own module form one group, which one worker runs."""

from __future__ import annotations

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Send the tests that share a module-scoped fixture of their own module to one worker
    (``--dist loadgroup``), so that fixture (a trained run, a set of launched commands) is built
    once instead of once per worker. Tests joined by any shared fixture form one group."""
    owner: dict[tuple[str, str], tuple[str, str]] = {}  # union-find over (module, fixture)

    def root(key: tuple[str, str]) -> tuple[str, str]:
        while owner.setdefault(key, key) != key:
            key = owner[key]
        return key

    uses: dict[pytest.Item, list[tuple[str, str]]] = {}
    for item in items:
        module = getattr(item, "module", None)
        if module is None:
            continue
        shared = [
            (module.__name__, name)
            for name, defs in item._fixtureinfo.name2fixturedefs.items()
            if defs and defs[-1].scope == "module" and defs[-1].func.__module__ == module.__name__
        ]
        for key in shared[1:]:
            owner[root(key)] = root(shared[0])
        if shared:
            uses[item] = shared
    for item, shared in uses.items():
        module, fixture = root(shared[0])
        item.add_marker(pytest.mark.xdist_group(f"{module}.{fixture}"))
