"""Soft Actor-Critic with a PMOE mixture policy: twin critics, target networks, automatic entropy.

The policy step follows PMOE (Ren et al. 2021; docs/methods.md, "PMOE"): draw one reparameterised
action from every mixture component, score each with ``min(Q1, Q2)``, pick the best component
``k*`` per state, apply the SAC policy loss to ``k*`` only, and pull the mixing weights toward
``onehot(k*)`` with an MSE loss. With ``components=1`` the trainer is plain SAC, which is the
unimodal baseline.

Entropy terms: the critic target uses the full mixture log-density of the next action (the
behaviour policy's entropy); the policy loss and the temperature loss use the selected
component's own log-density, since that is the distribution the policy loss shapes.

Shape legend: B batch, K mixture components, A action dims, O observation dims.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from megamoe.config import ConfigError, check_fields, spec
from megamoe.research.rl.policy import MixtureGaussianPolicy, mlp


@dataclass(frozen=True)
class SACConfig:
    """Hyper-parameters of the SAC/PMOE trainer (defaults: the usual SAC values)."""

    components: int = spec(4, ge=1)
    hidden: tuple[int, ...] = spec((256, 256), ge=1, nonempty=True)
    actor_lr: float = spec(3e-4, gt=0)
    critic_lr: float = spec(3e-4, gt=0)
    alpha_lr: float = spec(3e-4, gt=0)
    gamma: float = spec(0.99, ge=0, le=1)
    tau: float = spec(0.005, gt=0, le=1)
    batch_size: int = spec(256, ge=1)
    buffer_size: int = spec(1_000_000, ge=1)
    start_steps: int = spec(1000, ge=0)  # uniform random actions before the policy acts
    update_after: int = spec(1000, ge=0)  # env steps before the first gradient update
    updates_per_step: int = spec(1, ge=1)
    init_alpha: float = spec(0.2, gt=0)
    autotune_alpha: bool = True
    target_entropy: float | None = None  # None: -action_dims
    mixing_coef: float = spec(1.0, ge=0)
    init_log_std: float = spec(-1.0, ge=-20, le=2)  # initial pre-tanh log std of every component

    def __post_init__(self) -> None:
        check_fields(self)
        object.__setattr__(self, "hidden", tuple(self.hidden))
        if self.buffer_size < self.batch_size:
            raise ConfigError(f"SACConfig.buffer_size={self.buffer_size} is invalid: must be >= batch_size="
                              f"{self.batch_size} (each update samples a batch from the replay buffer)")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d


class TwinQ(nn.Module):
    """Two independent Q(s, a) MLPs; ``forward`` returns both, ``[B]`` each."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...]) -> None:
        super().__init__()
        self.q1 = mlp(obs_dim + act_dim, hidden, 1)
        self.q2 = mlp(obs_dim + act_dim, hidden, 1)

    def forward(self, obs_BO: torch.Tensor, act_BA: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([obs_BO, act_BA], dim=-1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


@dataclass
class Batch:
    obs_BO: torch.Tensor
    act_BA: torch.Tensor
    rew_B: torch.Tensor
    next_obs_BO: torch.Tensor
    terminated_B: torch.Tensor  # 1.0 where the episode truly ended (no bootstrap); time limits are 0.0


class ReplayBuffer:
    """Fixed-capacity ring buffer of transitions held as CPU tensors."""

    _FIELDS = ("obs", "act", "rew", "next_obs", "terminated")

    def __init__(self, obs_dim: int, act_dim: int, capacity: int) -> None:
        self.capacity, self.size, self._next, self.added = int(capacity), 0, 0, 0
        # mark(): the ring position then, and the rows overwritten since (slot, old row)
        self._mark: tuple[int, int, int] | None = None
        self._undo: list[tuple[int, tuple[torch.Tensor, ...]]] = []
        self.obs = torch.zeros(capacity, obs_dim)
        self.act = torch.zeros(capacity, act_dim)
        self.rew = torch.zeros(capacity)
        self.next_obs = torch.zeros(capacity, obs_dim)
        self.terminated = torch.zeros(capacity)

    def add(self, obs: np.ndarray, act: np.ndarray, rew: float, next_obs: np.ndarray, terminated: bool) -> None:
        i = self._next
        if self._mark is not None and self.size == self.capacity:  # overwriting a row the mark may need
            self._undo.append((i, tuple(getattr(self, name)[i].clone() for name in self._FIELDS)))
        self.obs[i] = torch.as_tensor(np.asarray(obs, dtype=np.float32).reshape(-1))
        self.act[i] = torch.as_tensor(np.asarray(act, dtype=np.float32).reshape(-1))
        self.rew[i] = float(rew)
        self.next_obs[i] = torch.as_tensor(np.asarray(next_obs, dtype=np.float32).reshape(-1))
        self.terminated[i] = float(terminated)
        self._next = (i + 1) % self.capacity
        self.added += 1
        self.size = min(self.size + 1, self.capacity)

    def state_dict(self) -> dict[str, Any]:
        """The filled rows and the ring position (not the empty tail), for resumable checkpoints."""
        n = self.size
        return {"capacity": self.capacity, "size": n, "next": self._next, "added": self.added,
                **{name: getattr(self, name)[:n].clone() for name in self._FIELDS}}

    def mark(self) -> None:
        """Remember this moment, so that :meth:`state_dict_at_mark` can return the buffer as it is
        now after more rows are added (rows overwritten since are kept aside, one per step)."""
        self._mark = (self.size, self._next, self.added)
        self._undo = []

    def state_dict_at_mark(self) -> dict[str, Any]:
        """``state_dict()`` as it was at the last :meth:`mark`."""
        if self._mark is None:
            raise RuntimeError("state_dict_at_mark() needs a mark() first")
        size, next_, added = self._mark
        rows = {name: getattr(self, name)[:max(size, self.size)].clone() for name in self._FIELDS}
        for i, old in reversed(self._undo):  # newest first, so a slot overwritten twice gets its oldest row
            for name, row in zip(self._FIELDS, old):
                rows[name][i] = row
        return {"capacity": self.capacity, "size": size, "next": next_, "added": added,
                **{name: t[:size] for name, t in rows.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` into this buffer. Its capacity may differ (a run resumed with more
        steps) only while the saved ring has overwritten nothing, i.e. its rows are in insertion order."""
        n, added = int(state["size"]), int(state["added"])
        if self.capacity != int(state["capacity"]) and (added > int(state["capacity"]) or n > self.capacity):
            raise ValueError(f"replay buffer state of capacity {state['capacity']} ({added} transitions added) "
                             f"does not fit a buffer of capacity {self.capacity}")
        for name in self._FIELDS:
            getattr(self, name)[:n] = state[name]
        self.size, self.added = n, added
        self._next = int(state["next"]) if self.capacity == int(state["capacity"]) else n % self.capacity

    def sample(self, batch_size: int, *, generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> Batch:
        if self.size == 0:
            raise RuntimeError("cannot sample from an empty replay buffer")
        idx = torch.randint(self.size, (batch_size,), generator=generator)
        return Batch(*(t[idx].to(device) for t in (self.obs, self.act, self.rew, self.next_obs, self.terminated)))


class SACAgent(nn.Module):
    """Policy, twin critics with polyak-averaged targets, and a learned temperature."""

    def __init__(self, obs_dim: int, act_dim: int, cfg: SACConfig, *, action_low: Any = None,
                 action_high: Any = None) -> None:
        super().__init__()
        self.cfg, self.obs_dim, self.act_dim = cfg, int(obs_dim), int(act_dim)
        self.policy = MixtureGaussianPolicy(obs_dim, act_dim, components=cfg.components, hidden=cfg.hidden,
                                            action_low=action_low, action_high=action_high,
                                            init_log_std=cfg.init_log_std)
        self.critic = TwinQ(obs_dim, act_dim, cfg.hidden)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.tensor(float(np.log(cfg.init_alpha))),
                                      requires_grad=cfg.autotune_alpha)
        self.target_entropy = float(-act_dim if cfg.target_entropy is None else cfg.target_entropy)
        self.actor_opt = torch.optim.Adam(self.policy.parameters(), lr=cfg.actor_lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=cfg.alpha_lr)

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.detach().exp()

    @property
    def device(self) -> torch.device:
        return self.log_alpha.device

    @torch.no_grad()
    def td_target(self, batch: Batch) -> torch.Tensor:
        """Soft Bellman target ``r + gamma (1 - term) (min Q_targ(s', a') - alpha log pi(a'|s'))``."""
        next_action, next_logp, _ = self.policy.sample(self.policy(batch.next_obs_BO))
        q1, q2 = self.critic_target(batch.next_obs_BO, next_action)
        soft_v = torch.minimum(q1, q2) - self.alpha * next_logp
        return batch.rew_B + self.cfg.gamma * (1.0 - batch.terminated_B) * soft_v

    @torch.no_grad()
    def td_error(self, batch: Batch) -> float:
        """Mean squared TD error of both critics against a fresh soft target (a diagnostic)."""
        y = self.td_target(batch)
        q1, q2 = self.critic(batch.obs_BO, batch.act_BA)
        return float(0.5 * ((q1 - y).pow(2).mean() + (q2 - y).pow(2).mean()))

    def update(self, batch: Batch) -> dict[str, float]:
        """One SAC/PMOE gradient step on critics, policy (+ mixing) and temperature."""
        # critics
        y_B = self.td_target(batch)
        q1, q2 = self.critic(batch.obs_BO, batch.act_BA)
        critic_loss = 0.5 * ((q1 - y_B).pow(2).mean() + (q2 - y_B).pow(2).mean())
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()

        # policy: score one reparameterised sample per component, train the best one
        params = self.policy(batch.obs_BO)
        acts_BKA, logp_BK = self.policy.component_samples(params)
        B, K, A = acts_BKA.shape
        self.critic.requires_grad_(False)
        try:
            obs_rep = batch.obs_BO.unsqueeze(1).expand(B, K, self.obs_dim).reshape(B * K, self.obs_dim)
            qa, qb = self.critic(obs_rep, acts_BKA.reshape(B * K, A))
            q_BK = torch.minimum(qa, qb).view(B, K)
        finally:
            self.critic.requires_grad_(True)
        best_B = q_BK.detach().argmax(dim=-1)
        q_best = q_BK.gather(1, best_B[:, None]).squeeze(1)
        logp_best = logp_BK.gather(1, best_B[:, None]).squeeze(1)
        policy_loss = (self.alpha * logp_best - q_best).mean()
        onehot_BK = nn.functional.one_hot(best_B, K).to(q_BK.dtype)
        mixing_loss = (torch.softmax(params.mix_logits_BK, -1) - onehot_BK).pow(2).sum(-1).mean()
        self.actor_opt.zero_grad(set_to_none=True)
        (policy_loss + self.cfg.mixing_coef * mixing_loss).backward()
        self.actor_opt.step()

        # temperature
        alpha_loss = torch.zeros(())
        if self.cfg.autotune_alpha:
            alpha_loss = -(self.log_alpha * (logp_best.detach() + self.target_entropy)).mean()
            self.alpha_opt.zero_grad(set_to_none=True)
            alpha_loss.backward()
            self.alpha_opt.step()

        with torch.no_grad():
            for p, tp in zip(self.critic.parameters(), self.critic_target.parameters()):
                tp.lerp_(p, self.cfg.tau)
        return {"critic_loss": float(critic_loss.detach()), "policy_loss": float(policy_loss.detach()),
                "mixing_loss": float(mixing_loss.detach()), "alpha_loss": float(alpha_loss.detach()), "alpha": float(self.alpha),
                "entropy": float(-logp_best.detach().mean())}

    @torch.no_grad()
    def act(self, obs: np.ndarray, *, deterministic: bool = False) -> np.ndarray:
        obs_BO = torch.as_tensor(np.asarray(obs, dtype=np.float32).reshape(1, -1), device=self.device)
        return self.policy.act(obs_BO, deterministic=deterministic)[0].cpu().numpy()

    # -- checkpoints --------------------------------------------------------------------------
    def checkpoint(self, **extra: Any) -> dict[str, Any]:
        return {"format": "megamoe.rl.sac/1", "obs_dim": self.obs_dim, "act_dim": self.act_dim,
                "config": self.cfg.to_dict(), "action_low": self.policy.action_centre - self.policy.action_scale,
                "action_high": self.policy.action_centre + self.policy.action_scale,
                "model": self.state_dict(), "actor_opt": self.actor_opt.state_dict(),
                "critic_opt": self.critic_opt.state_dict(), "alpha_opt": self.alpha_opt.state_dict(), **extra}

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any], *, map_location: str | torch.device = "cpu") -> "SACAgent":
        if ckpt.get("format") != "megamoe.rl.sac/1":
            raise ValueError(f"not a megamoe.rl SAC checkpoint (format={ckpt.get('format')!r})")
        agent = cls(ckpt["obs_dim"], ckpt["act_dim"], SACConfig(**ckpt["config"]),
                    action_low=ckpt["action_low"], action_high=ckpt["action_high"]).to(map_location)
        agent.load_checkpoint(ckpt)
        return agent

    def load_checkpoint(self, ckpt: dict[str, Any]) -> None:
        """Load networks, targets, temperature and optimizer states from ``checkpoint()`` into this agent."""
        if ckpt.get("format") != "megamoe.rl.sac/1":
            raise ValueError(f"not a megamoe.rl SAC checkpoint (format={ckpt.get('format')!r})")
        if SACConfig(**ckpt["config"]) != self.cfg or (ckpt["obs_dim"], ckpt["act_dim"]) != (self.obs_dim, self.act_dim):
            raise ValueError(f"checkpoint is for a different agent: config {ckpt['config']}, obs/act dims "
                             f"{ckpt['obs_dim']}/{ckpt['act_dim']}; this agent has {self.cfg.to_dict()}, "
                             f"{self.obs_dim}/{self.act_dim}")
        self.load_state_dict(ckpt["model"])
        self.actor_opt.load_state_dict(ckpt["actor_opt"])
        self.critic_opt.load_state_dict(ckpt["critic_opt"])
        self.alpha_opt.load_state_dict(ckpt["alpha_opt"])


def make_agent(env: Any, cfg: SACConfig, *, device: str | torch.device = "cpu") -> SACAgent:
    """Build an agent for a gymnasium env with a flat Box observation and Box action space."""
    import gymnasium as gym

    if not isinstance(env.action_space, gym.spaces.Box):
        raise ValueError(f"SAC needs a continuous (Box) action space; this env has {env.action_space}")
    if not isinstance(env.observation_space, gym.spaces.Box):
        raise ValueError(f"SAC needs a Box observation space; this env has {env.observation_space}")
    low, high = env.action_space.low, env.action_space.high
    if not (np.all(np.isfinite(low)) and np.all(np.isfinite(high))):
        raise ValueError(f"SAC needs a bounded action space; got low={low} high={high}")
    obs_dim = int(np.prod(env.observation_space.shape))
    act_dim = int(np.prod(env.action_space.shape))
    return SACAgent(obs_dim, act_dim, cfg, action_low=low.reshape(-1), action_high=high.reshape(-1)).to(device)


@dataclass
class EpisodeRecord:
    episode: int
    step: int  # env steps taken when the episode ended
    ret: float
    length: int
    kind: str = "train"  # "train" or "eval" (deterministic policy)
    losses: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        if self.kind == "eval":  # episode = evaluation round, length = episodes averaged
            return {"kind": "eval", "round": self.episode, "step": self.step, "return": self.ret,
                    "episodes": self.length}
        return {"kind": self.kind, "episode": self.episode, "step": self.step, "return": self.ret,
                "length": self.length, **self.losses}


def evaluate(env: Any, agent: SACAgent, *, episodes: int, seed: int | None = None) -> list[float]:
    """Undiscounted returns of the deterministic policy over ``episodes`` episodes."""
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=None if seed is None else seed + i)
        done, ret = False, 0.0
        while not done:
            obs, rew, term, trunc, _ = env.step(agent.act(obs, deterministic=True))
            ret += float(rew)
            done = term or trunc
        returns.append(ret)
    return returns


TRAIN_STATE_FORMAT = "megamoe.rl.train/1"


def _np_rng_state(rng: Any) -> dict[str, Any]:
    return copy.deepcopy(rng.bit_generator.state)


def train(env: Any, agent: SACAgent, *, total_steps: int, seed: int = 0, eval_env: Any = None,
          eval_every: int = 0, eval_episodes: int = 5,
          on_episode: Callable[[EpisodeRecord], None] | None = None,
          on_step: Callable[[int], None] | None = None,
          checkpoint_every: int = 0, on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
          resume: dict[str, Any] | None = None) -> list[EpisodeRecord]:
    """Run SAC for ``total_steps`` environment steps; returns every episode's record.

    ``on_episode`` sees each finished (train or eval) episode; ``on_step`` is called after every
    env step with the step count (progress bars, checkpoints). Only true terminations stop the
    bootstrap; time-limit truncations do not.

    Resuming: at the first episode end at or after every multiple of ``checkpoint_every`` steps
    (0: never), and when the run stops, at its last episode end (the start if no episode ended;
    ``total_steps`` itself when it ends an episode), ``on_checkpoint(state)`` gets the whole
    training state: agent (networks, targets, optimizers, temperature), replay buffer, torch /
    sampler / env / action-space RNG states, counters and the records so far. So a run that
    stops mid-episode can still be resumed, or extended to more steps.
    ``train(..., resume=state)`` continues from it and replays exactly what the uninterrupted run
    would have done (CPU). Resume points are episode ends because gymnasium has no general way to
    save an env mid-episode (MuJoCo envs pickle by re-construction); a fresh episode needs only
    the env's RNG state, which every gymnasium env keeps in ``np_random``.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    cfg = agent.cfg
    gen = torch.Generator()
    capacity = min(cfg.buffer_size, total_steps)
    buffer = ReplayBuffer(agent.obs_dim, agent.act_dim, capacity)
    if resume is None:
        gen.manual_seed(seed)
        torch.manual_seed(seed)
        env.action_space.seed(seed)
        records: list[EpisodeRecord] = []
        from gymnasium.utils import seeding

        start_env_rng = _np_rng_state(seeding.np_random(seed)[0])  # what reset(seed=seed) starts from
        obs, _ = env.reset(seed=seed)
        first, episode, evals, losses = 1, 0, 0, {}
    else:
        if resume.get("format") != TRAIN_STATE_FORMAT:
            raise ValueError(f"not a megamoe.rl training state (format={resume.get('format')!r})")
        if resume["seed"] != seed:
            raise ValueError(f"training state is from seed {resume['seed']}, not {seed}")
        if resume["step"] > total_steps:
            raise ValueError(f"training state is at step {resume['step']}, past total_steps={total_steps}")
        agent.load_checkpoint(resume["agent"])
        buffer.load_state_dict(resume["buffer"])
        records = [EpisodeRecord(**r) for r in resume["records"]]
        first, episode, evals, losses = resume["step"] + 1, resume["episode"], resume["evals"], dict(resume["losses"])
        torch.set_rng_state(resume["torch_rng"])
        if agent.device.type == "cuda" and resume.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(resume["cuda_rng"], agent.device)
        gen.set_state(resume["sampler_rng"])
        env.action_space.np_random.bit_generator.state = resume["action_space_rng"]
        env.unwrapped.np_random.bit_generator.state = resume["env_rng"]
        start_env_rng = resume["env_rng"]
        obs, _ = env.reset()  # the reset the interrupted run made right after this episode end

    def state(step: int, env_rng: dict[str, Any], *, with_buffer: bool = True) -> dict[str, Any]:
        """The training state now; without the buffer (only marked), for the latest episode end."""
        return {"format": TRAIN_STATE_FORMAT, "step": step, "total_steps": total_steps, "seed": seed,
                "episode": episode, "evals": evals, "losses": dict(losses),
                "records": [dataclasses.asdict(r) for r in records], "agent": copy.deepcopy(agent.checkpoint()),
                "buffer": buffer.state_dict() if with_buffer else None, "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(agent.device) if agent.device.type == "cuda" else None,
                "sampler_rng": gen.get_state(), "action_space_rng": _np_rng_state(env.action_space.np_random),
                "env_rng": env_rng}

    # The latest resume point (an episode end, or where this call started) and whether it was handed
    # to on_checkpoint; the buffer is marked there and rebuilt only if it is needed at the end.
    latest, latest_saved = None, True
    if on_checkpoint is not None:
        latest, latest_saved = state(first - 1, start_env_rng, with_buffer=False), resume is not None
        buffer.mark()

    ep_ret, ep_len = 0.0, 0
    next_save = (first - 1) // checkpoint_every * checkpoint_every + checkpoint_every if checkpoint_every else None
    for step in range(first, total_steps + 1):
        if step <= cfg.start_steps:
            action = env.action_space.sample()
        else:
            action = agent.act(obs).reshape(env.action_space.shape)
        next_obs, rew, term, trunc, _ = env.step(action)
        buffer.add(obs, action, rew, next_obs, term)
        obs, ep_ret, ep_len = next_obs, ep_ret + float(rew), ep_len + 1
        episode_env_rng = None
        if term or trunc:
            episode += 1
            rec = EpisodeRecord(episode=episode, step=step, ret=ep_ret, length=ep_len, losses=losses)
            records.append(rec)
            if on_episode is not None:
                on_episode(rec)
            episode_env_rng = _np_rng_state(env.unwrapped.np_random)
            obs, _ = env.reset()
            ep_ret, ep_len = 0.0, 0
        if step > cfg.update_after:
            for _ in range(cfg.updates_per_step):
                losses = agent.update(buffer.sample(cfg.batch_size, generator=gen, device=agent.device))
        if eval_env is not None and eval_every > 0 and step % eval_every == 0:
            evals += 1
            rets = evaluate(eval_env, agent, episodes=eval_episodes, seed=10_000 + seed * 1000 + evals * 10)
            rec = EpisodeRecord(episode=evals, step=step, ret=float(np.mean(rets)), length=eval_episodes,
                                kind="eval")
            records.append(rec)
            if on_episode is not None:
                on_episode(rec)
        if on_checkpoint is not None and episode_env_rng is not None:
            if step == total_steps or (next_save is not None and step >= next_save):
                on_checkpoint(state(step, episode_env_rng))
                latest_saved = True
                if next_save is not None:
                    next_save = step // checkpoint_every * checkpoint_every + checkpoint_every
            else:
                latest, latest_saved = state(step, episode_env_rng, with_buffer=False), False
                buffer.mark()
        if on_step is not None:
            on_step(step)
    if latest is not None and not latest_saved:  # stopped mid-episode: the last episode end is resumable
        latest["buffer"] = buffer.state_dict_at_mark()
        on_checkpoint(latest)
    return records
