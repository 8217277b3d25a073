"""Reinforcement learning with a Mixture-of-Experts policy: PMOE (Ren et al. 2021) on SAC.

- ``MixtureGaussianPolicy``: shared trunk, K tanh-Gaussian heads, mixing weights (policy.py).
- ``SACConfig``, ``SACAgent``, ``make_agent``, ``train``, ``evaluate``: the SAC trainer with
  twin critics, target networks, automatic entropy tuning and the PMOE policy step (sac.py).
  ``components=1`` is the unimodal SAC baseline.
- ``BimodalBandit`` (gymnasium id ``megamoe/BimodalBandit-v0``), ``make_env`` (envs.py).
- ``megamoe rl`` on the command line (cli.py); atomic run outputs (artifacts.py).

Names are imported lazily so ``megamoe --help`` (which imports megamoe.research.rl.cli) stays fast.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BANDIT_ID": "envs", "BimodalBandit": "envs", "EnvError": "envs", "make_env": "envs",
    "mujoco_available": "envs", "MixtureGaussianPolicy": "policy", "MixtureParams": "policy", "Batch": "sac",
    "EpisodeRecord": "sac", "ReplayBuffer": "sac", "SACAgent": "sac", "SACConfig": "sac", "evaluate": "sac",
    "make_agent": "sac", "train": "sac",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"megamoe.research.rl.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'megamoe.research.rl' has no attribute {name!r}")
