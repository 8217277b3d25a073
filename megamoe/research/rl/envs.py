"""Environments for the PMOE policy: a bimodal continuous bandit and checked gymnasium lookup.

``BimodalBandit`` is a one-step task whose reward has two equally good, well separated peaks
in action space. A single tanh-Gaussian policy can sit on at most one peak (or waste mass in the
valley between); a mixture can cover both. It is registered with gymnasium as
``megamoe/BimodalBandit-v0``.

``make_env(env_id)`` wraps ``gymnasium.make`` with actionable errors: unknown ids get
close-match suggestions, MuJoCo tasks say how to install ``mujoco`` when it is missing, and
discrete-action tasks are refused.
"""
from __future__ import annotations

import difflib
import importlib
import warnings
from typing import Any

import gymnasium as gym
import numpy as np

BANDIT_ID = "megamoe/BimodalBandit-v0"


class BimodalBandit(gym.Env):
    """One-step continuous bandit: reward = sum of two Gaussian bumps at ``+-mode`` (peak 1).

    The observation is a constant zero vector (a bandit has no state); every episode ends
    after one action.
    """

    metadata = {"render_modes": []}

    def __init__(self, mode: float = 0.6, width: float = 0.15) -> None:
        if not 0.0 < mode < 1.0:
            raise ValueError(f"mode must lie in (0, 1), got {mode}")
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        self.mode, self.width = float(mode), float(width)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        self.observation_space = gym.spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        self._obs = np.zeros(1, dtype=np.float32)

    @property
    def modes(self) -> tuple[float, float]:
        return (-self.mode, self.mode)

    def reward(self, action: np.ndarray | float) -> np.ndarray:
        a = np.asarray(action, dtype=np.float64)
        bump = lambda m: np.exp(-0.5 * ((a - m) / self.width) ** 2)  # noqa: E731
        return bump(-self.mode) + bump(self.mode)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        return self._obs.copy(), {}

    def step(self, action):
        a = float(np.clip(np.asarray(action, dtype=np.float64).reshape(-1)[0], -1.0, 1.0))
        return self._obs.copy(), float(self.reward(a)), True, False, {}


if BANDIT_ID not in gym.registry:
    gym.register(id=BANDIT_ID, entry_point=BimodalBandit)


class EnvError(ValueError):
    """An environment id that cannot be used for SAC, with the reason and the fix."""


def _needs_mujoco(spec: gym.envs.registration.EnvSpec) -> bool:
    entry = spec.entry_point if isinstance(spec.entry_point, str) else getattr(spec.entry_point, "__module__", "")
    return "mujoco" in str(entry)


# What gymnasium's MuJoCo envs import (its ``gymnasium[mujoco]`` extra = megamoe's ``mujoco`` extra).
MUJOCO_MODULES = ("mujoco", "imageio")


def missing_mujoco_modules() -> list[str]:
    """The modules of ``MUJOCO_MODULES`` that cannot be imported here (empty when MuJoCo tasks work)."""
    missing = []
    for name in MUJOCO_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def mujoco_available() -> bool:
    return not missing_mujoco_modules()


# MuJoCo warns about this in gymnasium's own model files (HalfCheetah-v5) on every load; a
# user cannot act on it.
_MUJOCO_ASSET_NOISE = ("compiler attribute 'settotalmass' is deprecated",)


def _mujoco_warning(msg: str) -> None:
    if not msg.startswith(_MUJOCO_ASSET_NOISE):
        warnings.warn(f"MuJoCo: {msg}", RuntimeWarning, stacklevel=2)


def _route_mujoco_warnings() -> None:
    """Send MuJoCo's warnings to Python's ``warnings`` (shown once per message) instead of its
    default, which appends them to ``MUJOCO_LOG.TXT`` in the working directory. A handler the
    user installed is kept."""
    import mujoco

    if mujoco.get_mju_user_warning() is None:
        mujoco.set_mju_user_warning(_mujoco_warning)


def make_env(env_id: str, **kwargs: Any) -> gym.Env:
    """``gymnasium.make(env_id)`` for SAC, with clear errors for unusable ids."""
    if env_id not in gym.registry:
        close = difflib.get_close_matches(env_id, list(gym.registry), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise EnvError(f"--env {env_id!r} is not a registered gymnasium environment.{hint} "
                       f"Continuous-control choices include 'Pendulum-v1', 'MountainCarContinuous-v0', "
                       f"{BANDIT_ID!r} and the MuJoCo tasks (e.g. 'HalfCheetah-v5') when mujoco is installed.")
    spec = gym.spec(env_id)
    missing = missing_mujoco_modules() if _needs_mujoco(spec) else []
    if missing:
        raise EnvError(f"--env {env_id!r} is a MuJoCo task but {' and '.join(repr(m) for m in missing)} "
                       f"cannot be imported. Install them with: pip install 'gymnasium[mujoco]' (megamoe's mujoco "
                       f"extra; from a checkout: pip install -e '.[mujoco]'), or use --env Pendulum-v1.")
    if _needs_mujoco(spec):
        _route_mujoco_warnings()
    try:
        env = gym.make(env_id, **kwargs)
    except gym.error.DependencyNotInstalled as exc:
        raise EnvError(f"--env {env_id!r} needs an extra dependency: {exc}") from exc
    if not isinstance(env.action_space, gym.spaces.Box):
        env.close()
        raise EnvError(f"--env {env_id!r} has a {type(env.action_space).__name__} action space; SAC/PMOE "
                       f"needs continuous (Box) actions, e.g. 'Pendulum-v1'.")
    if not isinstance(env.observation_space, gym.spaces.Box):
        env.close()
        raise EnvError(f"--env {env_id!r} has a {type(env.observation_space).__name__} observation space; "
                       f"SAC/PMOE needs a Box observation space.")
    return env
