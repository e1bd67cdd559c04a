"""Configuration of an exported locmoe-train model that Mixtral cannot express.

Shipped next to the weights of ``locmoe-train export-hf`` (loaded with
``trust_remote_code=True``); imports only transformers. It extends
``MixtralConfig`` (transformers >= 5) with the routing rule and the
dense/MoE interleave of the training run.
"""

from transformers.models.mixtral.configuration_mixtral import MixtralConfig


class LocMoEConfig(MixtralConfig):
    """``MixtralConfig`` plus:

    * ``router_type``: ``topk`` (softmax over experts, top-k, gates renormalised
      only if ``renormalize``), ``locmoe_plus`` (fixed block affinity gate,
      top-k by affinity, gate value ``softmax(affinity / tau)``, not
      renormalised) or ``aux_free`` (sigmoid scores, top-k of score + bias,
      chosen scores normalised to sum to 1);
    * ``moe_every``: layer i (0-based) is an MoE layer when ``i % moe_every == 0``,
      the others are dense SwiGLU MLPs of width ``dense_intermediate_size``.

    ``intermediate_size`` is the width of each expert.
    """

    model_type = "locmoe"
    router_type: str = "topk"
    renormalize: bool = True
    moe_every: int = 1
    dense_intermediate_size: int | None = None


__all__ = ["LocMoEConfig"]
