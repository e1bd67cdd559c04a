"""Metric sinks: where a finished record (plain numbers, reduced across ranks) goes.

``base.py``: the ``Sink`` interface, console, JSONL and ``MultiSink``.
``trackers.py``: the optional TensorBoard and wandb sinks, imported only when
their ``logging.*`` key is on. Only rank 0 builds sinks.
"""

from locmoe_train.sinks.base import ConsoleSink, JsonlSink, MultiSink, Sink, truncate_after

__all__ = ["ConsoleSink", "JsonlSink", "MultiSink", "Sink", "truncate_after"]
