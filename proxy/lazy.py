"""Modules a worker loads the first time it uses them, not at start: a worker that
never uses one does not hold it (the Stripe library and what it brings, about 12 MB).

``module(name)`` puts the module in ``sys.modules`` unexecuted (the standard library's
:class:`importlib.util.LazyLoader`); its first attribute read executes it. Import it as
usual under ``TYPE_CHECKING``, so that mypy sees the real module. Python 3.11's lazy
modules take no lock: use one from the event loop's thread only, or :func:`load` it
before serving begins (then what it makes is frozen with the rest of start-up's, out of
the garbage collector's full passes: :mod:`proxy.app`). A module whose execution fails
leaves ``sys.modules``, as a plain import's does.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType


def module(name: str) -> ModuleType:
    """``name``, executed at its first attribute read (at once if it is loaded)."""
    if (loaded := sys.modules.get(name)) is not None:
        return loaded
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    spec.loader = importlib.util.LazyLoader(_Executing(spec.loader))
    lazy = importlib.util.module_from_spec(spec)
    sys.modules[name] = lazy
    spec.loader.exec_module(lazy)
    return lazy


def load(name: str) -> ModuleType:
    """``name`` executed now (:func:`module`'s, or a plain import)."""
    loaded = module(name)
    getattr(loaded, "__name__")  # noqa: B009 (the read that executes a lazy module)
    return loaded


class _Executing(importlib.abc.Loader):
    """A module's own loader, left on the module once it is executed, as a plain import
    leaves it; a module whose execution fails is taken out of ``sys.modules``."""

    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader  # as a plain import leaves it
        module.__loader__ = self._loader
        try:
            self._loader.exec_module(module)
        except BaseException:
            if sys.modules.get(module.__name__) is module:
                del sys.modules[module.__name__]
            raise
