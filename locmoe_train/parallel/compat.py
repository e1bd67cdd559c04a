"""Make the megatron-core 0.16.1 code paths we use run without CUDA.

megatron-core assumes a GPU on paths every model takes, even when its modules
are built with ``use_cpu_initialization=True``. Our quickstart, our CI and our
distributed tests run on CPU with gloo, so this layer is part of the product,
not a test trick. ``apply()`` is idempotent and does nothing for CUDA except the
TE-less router fix (item 1), which is a megatron bug on every device.

What it patches, and why (call sites verified against megatron-core 0.16.1):

1. ``megatron.core.transformer.moe.moe_utils.te_general_gemm``: the name is
   bound only inside a ``try`` that fails without Transformer Engine, yet
   ``router_gating_linear`` reads it on every router forward (NameError on CPU
   and GPU alike). Defining it as ``None`` selects the plain ``torch.mm`` path.
   Applied only when the name is missing (fixed upstream by 0.19).

2. ``megatron.core.tensor_parallel.mappings._AllToAll.forward``: the alltoall
   token dispatcher passes split sizes as NumPy arrays, which
   ``ProcessGroup.all_to_all_single`` in torch 2.13 rejects ("incompatible
   function arguments"; it takes Python sequences of ints). The wrapper turns
   NumPy arrays and CPU tensors into lists before the call. Applied on every
   device: it depends on the torch version, not on CUDA.

Only when ``torch.cuda.is_available()`` is False:

3. ``torch.cuda.current_device`` returns ``torch.device("cpu")``. It is called
   as a ``device=`` argument by the router (``router.py`` weight move and
   tracker tensors), RoPE (``rotary_pos_embedding.py`` inv_freq),
   ``GlobalMemoryBuffer`` (``core/utils.py``), the TP mappings and
   linear layers (``tensor_parallel/mappings.py``, ``layers.py``) and the
   SequentialMLP padding buffers (``moe/experts.py``). A CPU build of torch
   raises there instead.
4. ``torch.cuda.Stream``, ``Event``, ``stream``, ``current_stream`` and
   ``synchronize`` become no-op stand-ins: the alltoall token dispatcher
   creates a device-to-host side stream in its constructor
   (``token_dispatcher.py``) and synchronises on it; on CPU every op is
   already synchronous.
5. The tensor-parallel RNG tracker (``tensor_parallel/random.py``) keeps its
   named states on the CPU generator: ``_get_cuda_rng_state`` /
   ``_set_cuda_rng_state`` read and write ``torch.get_rng_state`` and
   ``CudaRNGStatesTracker.add`` seeds a CPU generator, so
   ``model_parallel_cuda_manual_seed`` and ``get_cuda_rng_tracker().fork()``
   (used around attention dropout and TP weight init) work.

Not covered (we do not use them on CPU): Megatron's own optimizer,
distributed optimizer, DDP buffers and pipeline schedules, which hard-code
``device="cuda"`` literals; fused kernels; Transformer Engine.
"""

from __future__ import annotations

import contextlib

import torch

_APPLIED = False


class _NoOpStream:
    """Stands in for ``torch.cuda.Stream`` on CPU, where work is synchronous."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def synchronize(self):
        pass

    def record_event(self, event=None):
        return event or _NoOpEvent()

    def __eq__(self, other):
        return isinstance(other, _NoOpStream)

    def __hash__(self):
        return 0


class _NoOpEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True


_CPU_STREAM = _NoOpStream()


def _patch_te_general_gemm() -> None:
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _as_split_list(splits):
    if splits is None or isinstance(splits, list):
        return splits
    if isinstance(splits, torch.Tensor) and splits.is_cuda:
        return splits  # leave device tensors alone: converting would sync
    return [int(s) for s in splits.tolist()]


def _patch_all_to_all_splits() -> None:
    from megatron.core.tensor_parallel import mappings

    original = mappings._AllToAll.forward

    def forward(ctx, group, input, output_split_sizes, input_split_sizes):
        return original(ctx, group, input, _as_split_list(output_split_sizes),
                        _as_split_list(input_split_sizes))

    mappings._AllToAll.forward = staticmethod(forward)


def _patch_cuda_device_api() -> None:
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.Stream = _NoOpStream
    torch.cuda.Event = _NoOpEvent
    torch.cuda.current_stream = lambda device=None: _CPU_STREAM
    torch.cuda.stream = lambda s=None: contextlib.nullcontext()
    torch.cuda.synchronize = lambda device=None: None


def _patch_rng_tracker() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state
    mrandom.CudaRNGStatesTracker.add = add


def apply() -> None:
    """Apply the patches listed in the module docstring (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    _patch_te_general_gemm()
    _patch_all_to_all_splits()
    if not torch.cuda.is_available():
        _patch_cuda_device_api()
        _patch_rng_tracker()
    _APPLIED = True
