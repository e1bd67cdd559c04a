"""The first import of megatron-core skips the compiler and wandb, and changes nothing else."""

import json
import subprocess
import sys

from helpers import REPO
from locmoe_train.parallel.megatron_import import lazy_compile

PROBE = """
import json, sys
import locmoe_train  # installs the cheap import, as every entry point does
import torch
compile_before = torch.compile
import megatron.core
from megatron.core import jit
from megatron.core.fusions.fused_bias_geglu import geglu
seen = {"compiler": "torch._inductor.compile_fx" in sys.modules,
        "wandb_in_megatron": sys.modules["megatron.core.inference.contexts.dynamic_context"].wandb
        is not None,
        "compile_restored": torch.compile is compile_before,
        "jit_fuser_is_torch_compile": jit.jit_fuser is torch.compile}
import wandb  # still importable afterwards, for our wandb sink
seen["wandb_after"] = wandb.__name__
print(json.dumps(seen))
"""


def test_megatron_imports_without_the_compiler_or_wandb():
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert seen == {"compiler": False, "wandb_in_megatron": False, "compile_restored": True,
                    "jit_fuser_is_torch_compile": False, "wandb_after": "wandb"}


def test_lazy_compile_compiles_once_at_the_first_call_with_the_same_arguments():
    calls = []

    def compile_now(fn, **kwargs):
        calls.append((fn, kwargs))
        return lambda *a, **kw: ("compiled", fn(*a, **kw))

    def add(a, b=1):
        """Adds."""
        return a + b

    lazy = lazy_compile(compile_now)(add, mode="max-autotune")
    assert calls == [] and lazy.__name__ == "add" and lazy.__doc__ == "Adds."
    assert lazy(1, b=2) == ("compiled", 3) and lazy(5) == ("compiled", 6)
    assert calls == [(add, {"mode": "max-autotune"})]
    # The decorator-factory form, @torch.compile(dynamic=False).
    sub = lazy_compile(compile_now)(dynamic=False)(lambda a: a - 1)
    assert sub(3) == ("compiled", 2) and calls[-1][1] == {"dynamic": False}
