"""The MoE runtime: everything about the MoE layers that happens around a step.

Legend: L MoE layers, E experts.

Owns, for the whole model:
* the one schema of MoE counters (``COUNTERS``, ``TRAFFIC``) and, through
  ``moe/aux.py``, of the aux terms, used by the layers (``LayerStats``), the
  reduction and the sinks;
* the aux-loss sum of the last forward, for the train step to add
  (``pop_aux_loss``);
* ``step_end(step, loss, ok, probe)`` after each optimizer step: routers that
  adapt get the step's global tokens per expert and the non-finite guard's
  verdict (``ok`` false: the step was skipped, so they leave their state
  alone), and the events they return are kept for the next record; on a step
  where a capacity controller re-estimates with the loss probe, the probe
  runs first (``moe/capacity_probe.py``) through the train step's ``probe``;
* ``collect(n)``: the step's MoE metrics as device tensors (``moe/<name>``,
  local to this rank, no host sync) and ``log_record(acc, n_steps)``: the
  per-log-interval reduction across ranks into the record's ``moe`` fields;
* the MoE part of a checkpoint (``state_dict``: router state that is not a
  module buffer, e.g. LocMoE+ capacity controllers).

The trainer and the checkpointer get it as one of their parts; neither
knows anything about MoE. Counts are summed over the world: every token is
routed on exactly one rank (DP ranks and, with sequence parallelism, TP
ranks see disjoint tokens). Aux terms are partial over the TP
(sequence-parallel) group and averaged over DP, megatron's convention.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from locmoe_train.moe.aux import AUX_NAMES, AUX_TERMS
from locmoe_train.moe.capacity_probe import run_probe

# Per layer, accumulated over a step's micro-batches, reset at collect().
COUNTERS = ("tokens_per_expert",  # [E] slots kept per expert (after any capacity drop)
            "tokens_seen",  # tokens routed
            "requested_slots",  # slots the router wanted (T*K for token choice)
            "unrouted",  # tokens that reached no expert
            "same_node")  # slots served by an expert on this rank's node
# Per layer, host-side counts from the dispatcher's split sizes (no sync).
TRAFFIC = ("bytes_intra_node", "bytes_cross_node", "messages_cross_node")


def layer_index(module_name: str) -> int:
    return int(module_name.split("layers.")[1].split(".")[0])


class LayerStats(nn.Module):
    """One MoE layer's device counters (non-persistent buffers: they follow ``.to``)."""

    def __init__(self, num_experts: int, aux_names: tuple[str, ...]):
        super().__init__()
        self.aux_names = aux_names
        for name in COUNTERS + ("step_tokens_per_expert",) + aux_names:
            shape = (num_experts,) if name.endswith("tokens_per_expert") else ()
            self.register_buffer(name, torch.zeros(shape), persistent=False)

    @torch.no_grad()
    def record(self, routing, aux_values: dict[str, torch.Tensor],
               local_experts_E: torch.Tensor) -> None:
        for name, value in aux_values.items():
            getattr(self, name).add_(value.detach())
        map_TE = routing.routing_map_TE
        counts = map_TE.sum(0).float()
        self.tokens_per_expert += counts
        self.step_tokens_per_expert += counts
        self.tokens_seen += map_TE.shape[0]
        self.requested_slots += routing.requested_slots
        self.unrouted += (~map_TE.any(-1)).sum()
        self.same_node += (map_TE & local_experts_E).sum()

    def pop(self, name: str) -> torch.Tensor:
        value = getattr(self, name).clone()
        getattr(self, name).zero_()
        return value


class MoERuntime:
    """For our layer (``moe.impl: native``); ``megatron_runtime`` covers megatron's."""

    def __init__(self, model: nn.Module, pctx):
        from locmoe_train.moe.layer import MoELayer

        named = [(n, m) for n, m in model.named_modules() if isinstance(m, MoELayer)]
        self.pctx = pctx
        self.layers = [layer_index(n) for n, _ in named]
        self.modules = [m for _, m in named]
        self.moe_cfg = self.modules[0].moe_cfg if self.modules else None
        # Logged aux terms: those any layer computes, in schema order.
        computed = {t.name for m in self.modules for t in m.aux_terms}
        self.aux_names = tuple(n for n in AUX_NAMES if n in computed)
        self.adaptive = any(m.router.adapts_to_load for m in self.modules)
        self.events: list[dict] = []

    # ---- per step -------------------------------------------------------------
    def pop_aux_loss(self) -> torch.Tensor | None:
        total = None
        for m in self.modules:
            aux = m.pop_aux_loss()
            if aux is not None:
                total = aux if total is None else total + aux
        return total

    @torch.no_grad()
    def step_end(self, step: int, loss: torch.Tensor, ok: torch.Tensor | None = None,
                 probe=None) -> None:
        """``probe()``: this rank's loss of the step's last micro-batch, run forward again
        (no grad) at whatever capacities the routers hold; the loss probe calls it."""
        if not self.adaptive:
            for m in self.modules:
                m.stats.step_tokens_per_expert.zero_()
            return
        counts_LE = torch.stack([m.stats.pop("step_tokens_per_expert") for m in self.modules])
        if self.pctx.world_size > 1:
            dist.all_reduce(counts_LE)
        probed = [c for m in self.modules if (c := m.router.probe_controller(step)) is not None]
        # (ok is read only on a probe step, where the controllers read it anyway.)
        if probed and probe is not None and (ok is None or bool(ok)):
            run_probe(probed, probe)
        for layer, m, counts_E in zip(self.layers, self.modules, counts_LE):
            self.events += [{"layer": layer, **e} for e in m.router.step_end(counts_E, step, loss, ok)]

    @torch.no_grad()
    def collect(self, num_micro_batches: int) -> dict[str, torch.Tensor]:
        out = {key: torch.stack([m.stats.pop(key) for m in self.modules]) for key in COUNTERS}
        traffic = [m.dispatcher.pop_traffic() for m in self.modules]
        device = out["tokens_seen"].device
        for key in TRAFFIC:
            out[key] = torch.tensor([float(t[key]) for t in traffic], device=device)
        for key in self.aux_names:
            out[key] = torch.stack([m.stats.pop(key) if key in m.stats.aux_names
                                    else torch.zeros((), device=device)
                                    for m in self.modules]) / num_micro_batches
        return {f"moe/{k}": v for k, v in out.items()}

    def gauges(self) -> dict[int, dict[str, float]]:
        """Per-layer values that are already identical on every rank (capacity, ...)."""
        return {layer: g for layer, m in zip(self.layers, self.modules) if (g := m.router.gauges())}

    def pop_events(self) -> list[dict]:
        events, self.events = self.events, []
        return events

    # ---- per log interval -------------------------------------------------------
    def log_record(self, acc: dict[str, torch.Tensor], n_steps: int) -> dict:
        """The record's MoE fields from a window of summed step metrics (all ranks)."""
        return moe_record(self, acc, n_steps)

    # ---- checkpoint -------------------------------------------------------------
    def state_dict(self) -> dict:
        """Router state that is not a module buffer, by layer index."""
        return {layer: state for layer, m in zip(self.layers, self.modules)
                if (state := m.router.checkpoint_state())}

    def load_state_dict(self, sd: dict) -> None:
        for layer, m in zip(self.layers, self.modules):
            if layer in sd:
                m.router.load_checkpoint_state(sd[layer])


def moe_record(runtime, acc: dict[str, torch.Tensor], n_steps: int) -> dict:
    """A runtime's record fields (either impl: it gives ``layers``, ``pctx``, ``moe_cfg``,
    ``gauges()`` and ``pop_events()``) from a window of summed step metrics."""
    if "moe/tokens_per_expert" not in acc:
        return {}
    counts = {k: acc[f"moe/{k}"] for k in COUNTERS + TRAFFIC if f"moe/{k}" in acc}
    aux_names = [k for k in AUX_NAMES if f"moe/{k}" in acc]
    aux = torch.stack([acc[f"moe/{k}"] / n_steps for k in aux_names]) if aux_names else None
    if runtime.pctx.world_size > 1:
        for v in counts.values():
            dist.all_reduce(v)
        if aux is not None:
            dist.all_reduce(aux)
            aux = aux / runtime.pctx.dp
    gauges = runtime.gauges()
    out: dict = {"moe": {}}
    for i, layer in enumerate(runtime.layers):
        entry = _layer_entry(counts, i, n_steps)
        if aux is not None:
            entry.update({name: aux[j][i].item() for j, name in enumerate(aux_names)})
        # NaN (not measured yet) becomes null: metrics.jsonl stays strict JSON.
        entry.update({k: (None if v != v else v) for k, v in gauges.get(layer, {}).items()})
        out["moe"][f"layer_{layer}"] = entry
    out["moe_imbalance"] = max(e["max_over_mean"] for e in out["moe"].values())
    if "bytes_cross_node" in counts:
        out["bytes_cross_node"] = counts["bytes_cross_node"].sum().item() / n_steps
        out["bytes_intra_node"] = counts["bytes_intra_node"].sum().item() / n_steps
    capacities = [g["capacity"] for g in gauges.values() if "capacity" in g]
    if capacities:
        out["moe_capacity"] = int(min(capacities))
    if aux is not None:
        weights = {t.name: t.weight(runtime.moe_cfg) for t in AUX_TERMS}
        out["aux_loss"] = sum(weights[k] * aux[j].sum().item()
                              for j, k in enumerate(aux_names))
    events = runtime.pop_events()
    if events:
        out["capacity_events"] = events
    return out


def _layer_entry(counts: dict[str, torch.Tensor], i: int, n_steps: int) -> dict:
    tpe = counts["tokens_per_expert"][i]
    entry = {"tokens_per_expert": [int(c) for c in tpe.tolist()],
             "max_over_mean": (tpe.max() / tpe.mean().clamp_min(1e-9)).item(),
             "dropped_fraction": 1.0 - (tpe.sum() / counts["requested_slots"][i]
                                        .clamp_min(1e-9)).item(),
             "unrouted_fraction": (counts["unrouted"][i] / counts["tokens_seen"][i]
                                   .clamp_min(1e-9)).item()}
    if "same_node" in counts:
        entry["same_node_share"] = (counts["same_node"][i] / tpe.sum().clamp_min(1e-9)).item()
    for key in TRAFFIC:
        if key in counts:  # per step, summed over all ranks
            entry[key] = counts[key][i].item() / n_steps
    return entry
