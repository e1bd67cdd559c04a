"""A cheaper first import of megatron-core: every process starts about 1.7 s sooner.

Importing ``megatron.core`` 0.16.1 costs about 2 s of CPU beyond torch, and
most of it pays for things a run does not use at that point:

- ``megatron/core/jit.py`` makes ``torch.compile`` the decorator of its fused
  functions (bias-GeLU, SwiGLU, GeGLU, router and norm helpers), and the
  package ``__init__`` imports some of them. ``torch.compile(fn)`` imports
  TorchDynamo and Inductor on the spot (about 1.2 s on one core), although
  nothing is compiled until such a function is first called. The native MoE
  layer never calls one; megatron's MoELayer (``moe.impl=megatron``) does, and
  then pays for the compiler at that call, as it did before.
- its inference context imports ``wandb`` when it is installed (about 0.5 s),
  for inference logging we do not use.

``install()`` puts a finder in front of Python's import system that steps in
once, for the first import of ``megatron.core``, and for the length of that
import only: ``torch.compile`` becomes a lazy version (the decorated function
is compiled with the same arguments at its first call, as before; megatron's
``jit_fuser`` keeps it for modules imported later) and ``wandb`` reads as not
installed. Afterwards ``torch.compile`` is restored and ``import wandb`` works
as usual (our wandb sink imports it itself). ``locmoe_train/__init__.py``
installs it, so every entry point (the CLI, torchrun workers, the tests'
ranks) gets it. It imports nothing heavy itself: it runs before torch loads.
"""

from __future__ import annotations

import functools
import importlib.abc
import sys

TARGET = "megatron.core"
HIDDEN = "wandb"  # megatron imports it only for inference logging


def lazy_compile(compile_now):
    """``torch.compile`` that compiles at the first call instead of at decoration."""

    def compile_later(fn=None, **kwargs):
        if fn is None:  # used as @torch.compile(mode=...)
            return lambda f: compile_later(f, **kwargs)
        compiled = []

        @functools.wraps(fn)
        def call(*args, **kw):
            if not compiled:
                compiled.append(compile_now(fn, **kwargs))
            return compiled[0](*args, **kw)

        return call

    return compile_later


class _CheapImport(importlib.abc.MetaPathFinder):
    """Finds ``megatron.core`` through the other finders and wraps its loading."""

    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)  # once: later imports go the usual way
        spec = None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(name, path, target) if find else None
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader.exec_module = _wrapped(spec.loader.exec_module)
        return spec


def _wrapped(exec_module):
    def exec_cheaply(module):
        import torch

        compile_now = torch.compile
        hide = HIDDEN not in sys.modules
        if hide:
            sys.modules[HIDDEN] = None  # `import wandb` raises ImportError
        torch.compile = lazy_compile(compile_now)
        try:
            exec_module(module)
        finally:
            torch.compile = compile_now
            if hide and HIDDEN in sys.modules and sys.modules[HIDDEN] is None:
                del sys.modules[HIDDEN]

    return exec_cheaply


def install() -> None:
    """Make the first import of megatron-core cheap (no-op once it is imported)."""
    if TARGET in sys.modules or any(isinstance(f, _CheapImport) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _CheapImport())
