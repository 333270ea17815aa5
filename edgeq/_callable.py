"""Subpackages that are also the API functions of the same name.

``edgeq.compress``, ``edgeq.export`` and ``edgeq.report`` are both packages (``edgeq.compress.gptq``, ...)
and the Python API's functions (``edgeq.compress(model, CompressConfig(...), out)``). Python binds a
package to its parent's attribute as soon as anything imports it, which would shadow the function, so
each of these packages' module object is made callable: calling it calls ``edgeq.api.<name>``. Both
spellings then work whatever was imported first. Torch-free: the API is imported on the first call.
"""

from __future__ import annotations

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        import importlib

        return getattr(importlib.import_module("edgeq.api"), self.__name__.rpartition(".")[2])(*args, **kwargs)


def make_callable(module_name: str) -> None:
    """Make package ``module_name`` (``edgeq.compress`` / ``edgeq.export`` / ``edgeq.report``) callable."""
    sys.modules[module_name].__class__ = _CallableModule
