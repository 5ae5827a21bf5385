"""metarun: a config-driven meta-learning experiment runner.

``metarun.load(ckpt)`` gives a trained learner for your own examples (`metarun.predict`).
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:  # `load` imports torch and Lightning only when used
    if name == "load":
        from metarun.predict import load

        return load
    raise AttributeError(f"module 'metarun' has no attribute {name!r}")
