"""Per-step MoE bookkeeping shared by the train step and the trainer, for either impl.

Legend: L MoE layers, E experts.

``collect(n)`` returns, local to this rank and reset afterwards:
``tokens_per_expert`` [L, E] (after any capacity drop), ``tokens_seen``,
``requested_slots``, ``unrouted`` (tokens with no expert) and ``same_node``
(slots served by an expert on this rank's node; ours only) [L], the bytes
this rank sent to other ranks of its node and of other nodes, and its
cross-node messages, dispatch and combine together (ours only) [L], and each
auxiliary term (unweighted, mean over the step's micro-batches) [L]. The
trainer sums counts over the world: every token is routed on exactly one
rank (DP ranks and, with sequence parallelism, TP ranks see disjoint tokens).

``pop_aux_loss()`` gives the train step the weighted aux loss of the last
forward, to add to the LM loss (megatron's layer injects its own into the
backward instead). ``step_end(step, loss)`` runs after each optimizer step:
routers that adapt (aux-loss-free bias, LocMoE+ capacity) get the step's
global counts, the step number and the training loss. ``gauges()`` and
``pop_events()`` expose per-layer values that are identical on every rank
(capacity, its target, q, C_min) and capacity changes, read at log time.
"""

from __future__ import annotations

import torch

from locmoe_train.moe.routers import all_reduce_counts


def _layer_index(module_name: str) -> int:
    return int(module_name.split("layers.")[1].split(".")[0])


COUNTS = ("tokens_per_expert", "tokens_seen", "requested_slots", "unrouted", "same_node")
TRAFFIC = ("bytes_intra_node", "bytes_cross_node", "messages_cross_node")


class LocMoEStats:
    AUX = ("load_balancing_loss", "z_loss", "locality_loss")

    def __init__(self, model: torch.nn.Module):
        from locmoe_train.moe.layer import LocMoELayer

        named = [(n, m) for n, m in model.named_modules() if isinstance(m, LocMoELayer)]
        self.layers = [_layer_index(n) for n, _ in named]
        self.modules = [m for _, m in named]
        cfg = self.modules[0].moe_cfg
        self.aux_names = [n for n, c in zip(self.AUX, (cfg.aux_loss_coeff, cfg.z_loss_coeff,
                                                       cfg.locality_loss_coeff)) if c > 0]
        if not any(m.locality_active for m in self.modules) and "locality_loss" in self.aux_names:
            self.aux_names.remove("locality_loss")
        self.adaptive = any(m.router.adapts_to_load for m in self.modules)

    def pop_aux_loss(self):
        total = None
        for m in self.modules:
            aux = m.pop_aux_loss()
            if aux is not None:
                total = aux if total is None else total + aux
        return total

    @torch.no_grad()
    def step_end(self, step: int, loss: torch.Tensor) -> None:
        if not self.adaptive:
            for m in self.modules:
                m.stat_step_tokens_per_expert.zero_()
            return
        counts_LE = all_reduce_counts(torch.stack([m.stat_step_tokens_per_expert for m in self.modules]))
        for m, counts_E in zip(self.modules, counts_LE):
            m.router.step_end(counts_E, step, loss)
            m.stat_step_tokens_per_expert.zero_()

    def state_dict(self) -> dict:
        """Router state that is not a module buffer (LocMoE+ capacity controllers)."""
        return {layer: {"controller": m.router.controller.state_dict()}
                for layer, m in zip(self.layers, self.modules) if hasattr(m.router, "controller")}

    def load_state_dict(self, sd: dict) -> None:
        for layer, m in zip(self.layers, self.modules):
            if layer in sd and hasattr(m.router, "controller"):
                m.router.controller.load_state_dict(sd[layer]["controller"])

    def gauges(self) -> dict[int, dict[str, float]]:
        """Per-layer values that are already identical on every rank (capacity, ...)."""
        return {layer: m.router.gauges() for layer, m in zip(self.layers, self.modules)
                if hasattr(m.router, "gauges")}

    def pop_events(self) -> list[dict]:
        """Capacity changes since the last call, tagged with their layer."""
        events = []
        for layer, m in zip(self.layers, self.modules):
            for e in getattr(m.router, "events", []):
                events.append({"layer": layer, **e})
            if hasattr(m.router, "events"):
                m.router.events.clear()
        return events

    @torch.no_grad()
    def collect(self, num_micro_batches: int) -> dict[str, torch.Tensor]:
        out = {}
        for key in COUNTS:
            out[key] = torch.stack([getattr(m, f"stat_{key}").clone() for m in self.modules])
        traffic = [m.dispatcher.pop_traffic() for m in self.modules]
        device = self.modules[0].stat_tokens_seen.device
        for key in TRAFFIC:  # host-side counts from the split sizes: no sync
            out[key] = torch.tensor([float(t[key]) for t in traffic], device=device)
        for key in self.aux_names:
            out[key] = torch.stack([getattr(m, f"stat_{key}") for m in self.modules]) / num_micro_batches
        for m in self.modules:
            for key in (*COUNTS, *self.AUX):
                getattr(m, f"stat_{key}").zero_()
        return out


class MegatronMoEStats:
    """The same bookkeeping for megatron-core's MoELayer (``moe.impl: megatron``).

    Forward hooks on its routers count tokens; its process-global tracker
    holds the aux losses (it adds their gradient itself).
    """

    def __init__(self, model: torch.nn.Module, num_experts: int, top_k: int, device):
        from megatron.core.transformer.moe.router import Router

        self.top_k = top_k
        routers = [(n, m) for n, m in model.named_modules() if isinstance(m, Router)]
        self.layers = [_layer_index(n) for n, _ in routers]
        L = len(routers)
        self.acc = {"tokens_per_expert": torch.zeros(L, num_experts, device=device),
                    "tokens_seen": torch.zeros(L, device=device),
                    "requested_slots": torch.zeros(L, device=device),
                    "unrouted": torch.zeros(L, device=device)}
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

    def step_end(self, step: int, loss: torch.Tensor) -> None:
        pass

    def state_dict(self) -> dict:
        return {}  # megatron's router state (expert bias) is a module buffer

    def load_state_dict(self, sd: dict) -> None:
        pass

    def gauges(self) -> dict:
        return {}

    def pop_events(self) -> list:
        return []

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
        return out


def build_moe_stats(model: torch.nn.Module, cfg, device):
    if cfg.moe.impl == "megatron":
        return MegatronMoEStats(model, cfg.moe.num_experts, cfg.moe.top_k, device)
    return LocMoEStats(model)
