"""Megatron-Core's `@jit_fuser` without its import-time cost.

Megatron decorates its fused bias/activation functions with `torch.compile` (`megatron.core.jit.jit_fuser`) as
the modules are imported. Decorating imports TorchDynamo and Inductor: 4.3 s of CPU in every process
(`import megatron.core`: 9.1 s -> 4.7 s), also where no fused function is ever called (CPU runs, converters,
preflight checks, the Transformer Engine spec's own fusions). `install()` makes the decorator lazy: each function
goes through `torch.compile` with the same options at its first call. torch.compile only compiles at the first
call anyway, so a GPU run compiles the same kernels; only the import is cheaper. (0.19.2 also applies a bare
`@torch.compile` in moe/router.py, so there the compiler is imported anyway and the saving is 0.16.1's.)
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import sys

JIT_MODULE = "megatron.core.jit"


def lazy_compile(fn=None, **options):
    """`torch.compile(fn, **options)`, deferred to fn's first call (`@lazy_compile` or `@lazy_compile(...)`)."""
    if fn is None:
        return lambda f: lazy_compile(f, **options)
    compiled = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        nonlocal compiled
        if compiled is None:
            import torch

            compiled = torch.compile(fn, **options)
        return compiled(*args, **kwargs)

    return call


def _make_lazy(module) -> None:
    import torch

    if module.jit_fuser is torch.compile:  # leave disable_jit_fuser()'s no-op, or a future choice, alone
        module.jit_fuser = lazy_compile


class _LazyJitFinder(importlib.abc.MetaPathFinder):
    """Finds megatron.core.jit like the path finder does and makes its jit_fuser lazy once it has run."""

    def find_spec(self, name, path, target=None):
        if name != JIT_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _make_lazy(module)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Idempotent; a no-op for the decorators already applied when Megatron was imported first."""
    if JIT_MODULE in sys.modules:
        _make_lazy(sys.modules[JIT_MODULE])
    elif not any(isinstance(f, _LazyJitFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _LazyJitFinder())
