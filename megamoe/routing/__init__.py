"""Routers: the interface (``base``), the built-in routers, their losses and the ALF-LB rule.

Importing this package registers every built-in router. What a training loop does with them
once per step or per forward (the ALF-LB update, estimator_loss, THOR's objective) is in
``megamoe.train`` (step_state, objectives).
"""
from megamoe.routing.base import (Router, RoutingContext, RoutingDecision, build_router,
                                  known_routers, register_router, router_options)
from megamoe.routing import topk as _topk  # noqa: F401  (registers "topk")
from megamoe.routing import expert_choice as _expert_choice  # noqa: F401  (registers "expert_choice")
from megamoe.routing import estimators as _estimators  # noqa: F401  (registers "skip", "balanced")
from megamoe.routing.estimators import seed_estimator_draws
from megamoe.routing import compete as _compete  # noqa: F401  (registers "compete")
from megamoe.routing import stochastic as _stochastic  # noqa: F401  (registers "stochastic")

__all__ = ["Router", "RoutingContext", "RoutingDecision", "build_router", "known_routers",
           "register_router", "router_options", "seed_estimator_draws"]
