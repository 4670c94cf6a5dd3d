"""Modules a worker loads the first time it uses them, not at start: a worker that
never uses one does not hold it (the Stripe library and what it brings, about 12 MB).

``module(name)`` puts the module in ``sys.modules`` unexecuted (the standard library's
:class:`importlib.util.LazyLoader`); its first attribute read executes it. Import it as
usual under ``TYPE_CHECKING``, so that mypy sees the real module.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def module(name: str) -> ModuleType:
    """``name``, executed at its first attribute read (at once if it is loaded)."""
    if (loaded := sys.modules.get(name)) is not None:
        return loaded
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    lazy = importlib.util.module_from_spec(spec)
    sys.modules[name] = lazy
    spec.loader.exec_module(lazy)
    return lazy
