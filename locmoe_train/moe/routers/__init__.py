"""The router registry: ``moe.router`` names a class registered here.

Each router module in this package registers its class with
``@register_router("name")``; importing the package imports every module in
it, so a new router is one new file here (plus its test). Everything else
asks the class (``router_class(name)``) instead of comparing names.
"""

from __future__ import annotations

import importlib
import pkgutil

from locmoe_train.errors import UserError
from locmoe_train.moe.routers.base import (HFExport, LinearGateRouter, Router, RouterSetup,
                                           topk_map)

ROUTERS: dict[str, type[Router]] = {}


def register_router(name: str):
    def wrap(cls: type[Router]) -> type[Router]:
        if name in ROUTERS and ROUTERS[name] is not cls:
            raise ValueError(f"router name {name!r} is registered twice")
        cls.name = name
        ROUTERS[name] = cls
        return cls
    return wrap


def router_class(name: str) -> type[Router]:
    if name not in ROUTERS:
        raise UserError(f"moe.router={name!r} is not one of "
                        f"{', '.join(repr(n) for n in ROUTERS)}.")
    return ROUTERS[name]


for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

# Re-exported for callers that name a router class directly (tests, Ada-K).
from locmoe_train.moe.routers.aux_free import AuxFreeRouter  # noqa: E402
from locmoe_train.moe.routers.expert_choice import ExpertChoiceRouter  # noqa: E402
from locmoe_train.moe.routers.hash import HashRouter  # noqa: E402
from locmoe_train.moe.routers.locmoe_plus import LocMoEPlusRouter  # noqa: E402
from locmoe_train.moe.routers.topk import TopKRouter  # noqa: E402

__all__ = ["ROUTERS", "AuxFreeRouter", "ExpertChoiceRouter", "HFExport", "HashRouter",
           "LinearGateRouter", "LocMoEPlusRouter", "Router", "RouterSetup", "TopKRouter",
           "register_router", "router_class", "topk_map"]
