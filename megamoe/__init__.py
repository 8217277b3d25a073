"""megamoe: Mixture-of-Experts layers, routers and training for large models.

The core (config, routing, experts, dispatch, layer) imports without deepspeed or
transformers; integrations import them lazily.
"""
from megamoe.config import ConfigError, ExpertConfig, MoEConfig, RouterConfig, from_dict, to_dict
from megamoe.layer import MoELayer, MoEOutput, MoEStats
from megamoe.routing import RoutingContext, RoutingDecision, build_router, known_routers, register_router
from megamoe.routing.topk import TopKOptions

__version__ = "0.1.0"

__all__ = ["ConfigError", "ExpertConfig", "MoEConfig", "RouterConfig", "from_dict", "to_dict", "MoELayer",
           "MoEOutput", "MoEStats", "RoutingContext", "RoutingDecision", "build_router", "known_routers",
           "register_router", "TopKOptions", "__version__"]
