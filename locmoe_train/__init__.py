"""locmoe-train: Megatron-style pre-training of Mixture-of-Experts LMs with LocMoE+ routing."""

from locmoe_train.parallel import megatron_import as _megatron_import

_megatron_import.install()  # before anything imports megatron-core (see that module)
