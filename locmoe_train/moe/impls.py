"""The MoE implementations ``moe.impl`` chooses between, and what each answers about itself.

* ``native`` (deprecated spelling ``locmoe``): our layer (``moe/layer.py``)
  with every router and dispatcher of their registries.
* ``megatron``: megatron-core's ``MoELayer`` (top-k router, its alltoall or
  allgather dispatcher), kept for comparisons on the same model.

Each impl class says which settings it takes (``validate``), the MLP
``ModuleSpec`` for MoE layers, and builds the ``MoERuntime`` that collects its
statistics. Callers ask the class from ``impl_class(cfg.moe.impl)``, never
compare the name. ``check_impl`` runs these checks on a loaded config; the
config itself never imports this module (its expert tensor-parallel rule is
described in ``moe/config.py``), so it runs where models are built
(``model/gpt.py``) and where entry points load a config, before anything
starts.
"""

from __future__ import annotations

from typing import Optional

import torch

from locmoe_train.errors import UserError


class NativeImpl:
    name = "native"

    @staticmethod
    def validate(moe) -> None:
        from locmoe_train.moe.dispatcher import dispatcher_class
        from locmoe_train.moe.routers import router_class

        from locmoe_train.moe.dispatcher import DISPATCHERS

        import locmoe_train.moe.hierarchical  # noqa: F401  (fills the registry)

        if moe.dispatcher not in DISPATCHERS and moe.dispatcher in MegatronImpl.dispatchers:
            raise UserError(f"moe.dispatcher={moe.dispatcher!r} is only available with "
                            f"moe.impl=megatron; moe.impl=native uses "
                            f"{' or '.join(DISPATCHERS)}.")
        dispatcher_class(moe.dispatcher)
        router_class(moe.router).validate(moe)

    @staticmethod
    def pads_megatron_input(moe) -> bool:
        return False

    @staticmethod
    def mlp_spec(cfg, pctx):
        from megatron.core.transformer.spec_utils import ModuleSpec

        from locmoe_train.moe.layer import MoELayer
        from locmoe_train.moe.routers import RouterSetup

        return ModuleSpec(module=MoELayer, params={
            "moe_cfg": cfg.moe, "ffn_hidden_size": cfg.moe_ffn_hidden_size,
            "parallel": pctx.moe,
            "setup": RouterSetup(vocab_size=cfg.model.vocab_size or 1, seed=cfg.train.seed,
                                 seq_len=cfg.data.seq_len, max_steps=cfg.train.max_steps)})

    @staticmethod
    def runtime(model, cfg, pctx):
        from locmoe_train.moe.runtime import MoERuntime

        return MoERuntime(model, pctx)

    @staticmethod
    def adak_support(moe) -> Optional[str]:
        from locmoe_train.moe.routers import router_class

        return router_class(moe.router).adak_support(moe)


class MegatronImpl:
    name = "megatron"
    # What megatron-core's MoELayer is run with here (its own names).
    dispatchers = ("alltoall", "allgather")
    routers = ("topk",)

    @classmethod
    def validate(cls, moe) -> None:
        if moe.dispatcher not in cls.dispatchers:
            raise UserError(f"moe.dispatcher={moe.dispatcher!r} needs moe.impl=native; "
                            f"megatron-core's MoELayer takes alltoall or allgather.")
        if moe.router not in cls.routers:
            raise UserError(f"moe.router={moe.router!r} needs moe.impl=native; megatron-core's "
                            f"MoELayer is compared with the topk router only.")

    @staticmethod
    def pads_megatron_input(moe) -> bool:
        return moe.pad_to_capacity

    @staticmethod
    def mlp_spec(cfg, pctx):
        from megatron.core.models.backends import LocalSpecProvider
        from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend

        return get_moe_module_spec_for_backend(
            backend=LocalSpecProvider(), num_experts=cfg.moe.num_experts, moe_grouped_gemm=False)

    @staticmethod
    def runtime(model, cfg, pctx):
        return MegatronMoERuntime(model, cfg.moe, pctx)

    @staticmethod
    def adak_support(moe) -> Optional[str]:
        return (f"locmoe-train adak needs moe.impl=native (our MoE layer), got "
                f"moe.impl={moe.impl!r}: megatron-core's MoELayer has no per-token expert "
                f"count. Pre-train with moe.impl=native to use Ada-K.")


IMPLS = {"native": NativeImpl, "megatron": MegatronImpl}


def impl_class(name: str):
    if name not in IMPLS:
        raise UserError(f"moe.impl={name!r} is not one of {', '.join(map(repr, IMPLS))}.")
    return IMPLS[name]


def check_impl(cfg):
    """UserError if ``cfg`` (a validated ``TrainConfig``) asks its MoE implementation or
    router for something they cannot do; returns ``cfg``."""
    impl_class(cfg.moe.impl).validate(cfg.moe)
    return cfg


def build_runtime(model, cfg, pctx):
    return impl_class(cfg.moe.impl).runtime(model, cfg, pctx)


class MegatronMoERuntime:
    """The ``MoERuntime`` interface over megatron-core's MoELayer.

    Forward hooks on its routers count tokens; its process-global tracker
    holds the aux losses (it adds their gradient itself, so ``pop_aux_loss``
    has nothing to add). Its router state (expert bias) is a module buffer.
    """

    def __init__(self, model: torch.nn.Module, moe_cfg, pctx):
        from megatron.core.transformer.moe.router import Router

        from locmoe_train.moe.runtime import layer_index

        self.pctx, self.moe_cfg, self.top_k = pctx, moe_cfg, moe_cfg.top_k
        routers = [(n, m) for n, m in model.named_modules() if isinstance(m, Router)]
        self.layers = [layer_index(n) for n, _ in routers]
        L, E, dev = len(routers), moe_cfg.num_experts, pctx.device
        self.acc = {"tokens_per_expert": torch.zeros(L, E, device=dev),
                    "tokens_seen": torch.zeros(L, device=dev),
                    "requested_slots": torch.zeros(L, device=dev),
                    "unrouted": torch.zeros(L, device=dev)}
        for i, (_, router) in enumerate(routers):
            router.register_forward_hook(self._hook(i))

    def _hook(self, i: int):
        def hook(module, args, output):
            _, routing_map = output
            if module.training:
                routing_map = routing_map.detach()
                self.acc["tokens_per_expert"][i] += routing_map.sum(0).float()
                self.acc["tokens_seen"][i] += routing_map.shape[0]
                self.acc["requested_slots"][i] += routing_map.shape[0] * self.top_k
                self.acc["unrouted"][i] += (~routing_map.any(-1)).sum()
        return hook

    def pop_aux_loss(self):
        return None

    def step_end(self, step: int, loss: torch.Tensor, ok: torch.Tensor | None = None,
                 probe=None) -> None:
        pass

    def collect(self, num_micro_batches: int) -> dict[str, torch.Tensor]:
        from megatron.core.transformer.moe.moe_utils import (
            clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker)

        out = {k: v.clone() for k, v in self.acc.items()}
        for name, entry in get_moe_layer_wise_logging_tracker().items():
            # The tracker sums each micro-batch's unweighted loss per layer.
            out[name] = entry["values"].detach()[self.layers] / num_micro_batches
        clear_aux_losses_tracker()
        for v in self.acc.values():
            v.zero_()
        return {f"moe/{k}": v for k, v in out.items()}

    def gauges(self) -> dict:
        return {}

    def pop_events(self) -> list:
        return []

    def log_record(self, acc, n_steps: int) -> dict:
        from locmoe_train.moe.runtime import moe_record

        return moe_record(self, acc, n_steps)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, sd: dict) -> None:
        pass
