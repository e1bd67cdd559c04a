"""Per-MoE-layer routing statistics for megatron-core's MoE layer (``moe.impl: megatron``).

Forward hooks on every router accumulate, on device and without syncing,
how many tokens each expert received (after any capacity drop) and how many
token slots were asked for; megatron's process-global loss tracker holds
the auxiliary losses. ``collect`` reads and resets both once per optimizer
step. Counts are local to this rank; the trainer sums them over the world
(every token is routed on exactly one rank: DP ranks and, with sequence
parallelism, TP ranks see disjoint tokens).
"""

from __future__ import annotations

import torch


class MegatronMoEStats:
    def __init__(self, model: torch.nn.Module, num_experts: int, top_k: int, device):
        from megatron.core.transformer.moe.router import Router

        self.top_k = top_k
        self.layers: list[int] = []  # 0-based index of each MoE layer in the decoder
        routers = [(n, m) for n, m in model.named_modules() if isinstance(m, Router)]
        self.tokens_per_expert = torch.zeros(len(routers), num_experts, device=device)
        self.tokens_seen = torch.zeros(len(routers), device=device)
        for i, (name, router) in enumerate(routers):
            self.layers.append(int(name.split("layers.")[1].split(".")[0]))
            router.register_forward_hook(self._hook(i))

    def _hook(self, i: int):
        def hook(module, args, output):
            _, routing_map = output
            if module.training:
                self.tokens_per_expert[i] += routing_map.detach().sum(0).float()
                self.tokens_seen[i] += routing_map.shape[0]
        return hook

    def collect(self, num_micro_batches: int) -> dict[str, torch.Tensor]:
        """Stats of the last step (local to this rank); resets the accumulators."""
        from megatron.core.transformer.moe.moe_utils import (
            clear_aux_losses_tracker, get_moe_layer_wise_logging_tracker)

        out = {"tokens_per_expert": self.tokens_per_expert.clone(),
               "tokens_seen": self.tokens_seen.clone()}
        tracker = get_moe_layer_wise_logging_tracker()
        for name, entry in tracker.items():
            # The tracker sums each micro-batch's unweighted loss per layer.
            values = entry["values"].detach()
            out[name] = values[self.layers] / num_micro_batches
        clear_aux_losses_tracker()
        self.tokens_per_expert.zero_()
        self.tokens_seen.zero_()
        return out
