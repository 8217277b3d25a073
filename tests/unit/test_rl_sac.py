"""SAC/PMOE trainer: critic TD error falls on a fixed batch, the PMOE update's pieces, the bimodal
bandit (PMOE keeps mass on both modes, K=1 cannot), checkpoints and config validation."""
import numpy as np
import pytest
import torch

from megamoe.config import ConfigError
from megamoe.research.rl import BANDIT_ID, Batch, ReplayBuffer, SACAgent, SACConfig, make_agent, make_env, train
from megamoe.atomic import atomic_torch_save
from megamoe.research.rl.envs import BimodalBandit, mujoco_available


def _fixed_batch(n=64, obs_dim=3, act_dim=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Batch(obs_BO=torch.randn(n, obs_dim, generator=g),
                 act_BA=torch.rand(n, act_dim, generator=g) * 4 - 2,
                 rew_B=torch.randn(n, generator=g),
                 next_obs_BO=torch.randn(n, obs_dim, generator=g),
                 terminated_B=(torch.rand(n, generator=g) < 0.2).float())


def _td(agent, batch):
    torch.manual_seed(123)  # the same next-action noise for every measurement
    return agent.td_error(batch)


@pytest.mark.parametrize("components", [1, 4])
def test_sac_updates_lower_the_critic_td_error_on_a_fixed_batch(components):
    cfg = SACConfig(components=components, hidden=(32, 32), critic_lr=3e-3, actor_lr=1e-3)
    agent = SACAgent(3, 1, cfg, action_low=[-2.0], action_high=[2.0])
    batch = _fixed_batch()
    before = _td(agent, batch)
    agent.update(batch)
    after_one = _td(agent, batch)
    for _ in range(60):
        agent.update(batch)
    after = _td(agent, batch)
    assert after_one < before
    assert after < 0.5 * before, (before, after_one, after)


def test_update_moves_targets_by_polyak_and_tunes_alpha_toward_target_entropy():
    cfg = SACConfig(components=4, hidden=(16,), tau=0.1, alpha_lr=1e-2, target_entropy=5.0)
    agent = SACAgent(3, 1, cfg, action_low=[-1.0], action_high=[1.0])
    batch = _fixed_batch(act_dim=1)
    old_target = [p.clone() for p in agent.critic_target.parameters()]
    alpha0 = float(agent.alpha)
    agent.update(batch)
    for p, tp, old in zip(agent.critic.parameters(), agent.critic_target.parameters(), old_target):
        assert torch.allclose(tp, 0.9 * old + 0.1 * p, atol=1e-6)
    # entropy far below the (unreachably high) target: the temperature must rise
    assert float(agent.alpha) > alpha0


def test_mixing_loss_pulls_weights_toward_the_best_component():
    # Q prefers large actions; the component whose mean starts highest keeps winning the argmax
    cfg = SACConfig(components=3, hidden=(16,), actor_lr=1e-2, init_alpha=1e-3, autotune_alpha=False)
    agent = SACAgent(2, 1, cfg)
    with torch.no_grad():  # an analytic critic Q(s, a) = 5 relu(a): hidden unit 0 reads the action
        for q in (agent.critic.q1, agent.critic.q2):
            for m in q:
                if isinstance(m, torch.nn.Linear):
                    m.weight.zero_()
                    m.bias.zero_()
            q[0].weight[0, 2] = 1.0
            q[2].weight[0, 0] = 5.0
    batch = _fixed_batch(n=128, obs_dim=2)
    crit_state = {k: v.clone() for k, v in agent.critic.state_dict().items()}
    agent.critic_opt = torch.optim.SGD(agent.critic.parameters(), lr=0.0)  # keep this analytic critic fixed
    w0 = torch.softmax(agent.policy(batch.obs_BO).mix_logits_BK, -1).mean(0)
    for _ in range(60):
        agent.update(batch)
    w = torch.softmax(agent.policy(batch.obs_BO).mix_logits_BK, -1).mean(0)
    assert all(torch.equal(v, agent.critic.state_dict()[k]) for k, v in crit_state.items())
    # spread init: component 2 starts at the top of the box, so it wins the argmax under Q = 5 relu(a)
    assert float(w0[2]) < 0.5
    assert float(w[2]) > 0.8, w


def _mode_masses(agent, env, n=4000):
    with torch.no_grad():
        a = agent.policy.act(torch.zeros(n, 1)).squeeze(-1).numpy()
    return [float(np.mean(np.abs(a - m) < 0.25)) for m in env.unwrapped.modes]


def test_bimodal_bandit_pmoe_keeps_mass_on_both_modes_where_unimodal_cannot():
    masses = {}
    for k in (4, 1):
        env = make_env(BANDIT_ID)
        cfg = SACConfig(components=k, hidden=(32, 32), batch_size=64, start_steps=100, update_after=100,
                        critic_lr=3e-3, actor_lr=1e-3, alpha_lr=1e-3, gamma=0.0, init_alpha=0.05,
                        init_log_std=-2.0)
        torch.manual_seed(0)
        agent = make_agent(env, cfg)
        records = train(env, agent, total_steps=400, seed=0)
        assert len(records) == 400  # one-step episodes
        masses[k] = _mode_masses(agent, env)
        # the policy learned something: most of its mass sits on a reward peak
        assert sum(masses[k]) > 0.8, masses
    assert min(masses[4]) > 0.05, masses
    assert min(masses[1]) < 0.01, masses


def test_bandit_env_follows_the_gymnasium_api():
    from gymnasium.utils.env_checker import check_env

    env = BimodalBandit()
    check_env(env, skip_render_check=True)
    obs, _ = env.reset(seed=0)
    for a, expect_peak in ((-0.6, True), (0.6, True), (0.0, False)):
        _, r, term, trunc, _ = env.step(np.array([a], dtype=np.float32))
        assert term and not trunc
        assert (r > 0.99) == expect_peak
    with pytest.raises(ValueError, match="mode"):
        BimodalBandit(mode=1.5)


def test_checkpoint_round_trip_restores_the_agent(tmp_path):
    env = make_env("Pendulum-v1")
    agent = make_agent(env, SACConfig(components=2, hidden=(16,)))
    agent.update(_fixed_batch(n=8))
    path = tmp_path / "ckpt.pt"
    torch.save(agent.checkpoint(step=7), path)
    ckpt = torch.load(path, weights_only=False)
    restored = SACAgent.from_checkpoint(ckpt)
    assert ckpt["step"] == 7 and restored.cfg == agent.cfg
    obs = np.array([0.1, -0.3, 0.5], dtype=np.float32)
    assert np.allclose(restored.act(obs, deterministic=True), agent.act(obs, deterministic=True))
    for (n1, t1), (n2, t2) in zip(agent.state_dict().items(), restored.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2)
    with pytest.raises(ValueError, match="not a megamoe.rl SAC checkpoint"):
        SACAgent.from_checkpoint({"format": "something else"})


def test_replay_buffer_is_a_ring():
    buf = ReplayBuffer(2, 1, capacity=3)
    for i in range(5):
        buf.add(np.full(2, i), np.array([i]), float(i), np.full(2, i + 1), i == 4)
    assert buf.size == 3
    assert sorted(buf.rew.tolist()) == [2.0, 3.0, 4.0]
    b = buf.sample(10, generator=torch.Generator().manual_seed(0))
    assert set(b.rew_B.tolist()) <= {2.0, 3.0, 4.0}
    assert torch.equal(b.next_obs_BO[:, 0], b.obs_BO[:, 0] + 1)
    assert torch.equal(b.terminated_B, (b.rew_B == 4.0).float())


@pytest.mark.parametrize("field,value", [("components", 0), ("gamma", 1.5), ("tau", 0.0), ("batch_size", 0),
                                         ("actor_lr", -1.0), ("hidden", ()), ("start_steps", -1)])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ConfigError, match=f"SACConfig.{field}"):
        SACConfig(**{field: value})


def test_make_agent_rejects_discrete_actions():
    import gymnasium as gym

    env = gym.make("CartPole-v1")
    with pytest.raises(ValueError, match="continuous"):
        make_agent(env, SACConfig())


def test_replay_buffer_state_restores_into_a_larger_buffer_until_it_has_wrapped():
    buf = ReplayBuffer(2, 1, capacity=4)
    for i in range(3):
        buf.add(np.full(2, i), np.array([i]), float(i), np.full(2, i + 1), False)
    bigger = ReplayBuffer(2, 1, capacity=6)
    bigger.load_state_dict(buf.state_dict())
    bigger.add(np.full(2, 3), np.array([3]), 3.0, np.full(2, 4), False)
    assert bigger.size == 4 and bigger.rew[:4].tolist() == [0.0, 1.0, 2.0, 3.0]
    for i in range(3, 6):  # now the 4-slot ring overwrites its oldest rows
        buf.add(np.full(2, i), np.array([i]), float(i), np.full(2, i + 1), False)
    with pytest.raises(ValueError, match="does not fit a buffer of capacity 6"):
        ReplayBuffer(2, 1, capacity=6).load_state_dict(buf.state_dict())
    same = ReplayBuffer(2, 1, capacity=4)
    same.load_state_dict(buf.state_dict())
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(same.sample(16, generator=g1).obs_BO, buf.sample(16, generator=g2).obs_BO)


def test_replay_buffer_state_at_mark_survives_later_rows_and_wraps():
    buf = ReplayBuffer(2, 1, capacity=4)
    for i in range(3):
        buf.add(np.full(2, i), np.array([i]), float(i), np.full(2, i + 1), False)
    buf.mark()
    want = buf.state_dict()
    for i in range(3, 12):  # fills the ring, then overwrites every row twice
        buf.add(np.full(2, i), np.array([i]), float(i), np.full(2, i + 1), i % 2 == 0)
    got = buf.state_dict_at_mark()
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert torch.equal(got[key], value) if torch.is_tensor(value) else got[key] == value, key
    buf.mark()  # a new mark starts from the current ring
    assert torch.equal(buf.state_dict_at_mark()["rew"], buf.state_dict()["rew"])


class _Interrupted(Exception):
    pass


def _interrupted_then_resumed_equals_uninterrupted(tmp_path, env_id, total, every, cut):
    cfg = SACConfig(components=3, hidden=(16, 16), batch_size=32, start_steps=100, update_after=100)

    def fresh(init_seed):
        torch.manual_seed(init_seed)
        env = make_env(env_id)
        return env, make_agent(env, cfg)

    env, ref = fresh(0)
    ref_records = train(env, ref, total_steps=total, seed=1)

    def stop_at_cut(step):
        if step == cut:
            raise _Interrupted

    saved = []

    def save(state):
        saved.append(state["step"])
        atomic_torch_save(state, tmp_path / "resume.pt")

    env, agent = fresh(0)
    with pytest.raises(_Interrupted):
        train(env, agent, total_steps=total, seed=1, checkpoint_every=every, on_checkpoint=save, on_step=stop_at_cut)
    assert saved and saved[-1] < cut  # the run is cut after its last resume point, mid-episode
    state = torch.load(tmp_path / "resume.pt", weights_only=False)
    env, resumed = fresh(123)  # other initial weights: everything must come from the state
    records = train(env, resumed, total_steps=total, seed=1, resume=state)

    assert [r.to_json() for r in records] == [r.to_json() for r in ref_records]
    for (name, t_ref), (name2, t) in zip(ref.state_dict().items(), resumed.state_dict().items()):
        assert name == name2 and torch.equal(t_ref, t), name  # policy, critics, targets, log alpha
    for opt in ("actor_opt", "critic_opt", "alpha_opt"):
        s_ref, s = getattr(ref, opt).state_dict()["state"], getattr(resumed, opt).state_dict()["state"]
        assert s_ref.keys() == s.keys()
        assert all(torch.equal(s_ref[i][k], s[i][k]) for i in s_ref for k in s_ref[i]), opt
    return saved


def test_train_interrupted_and_resumed_matches_the_uninterrupted_run(tmp_path):
    # Pendulum episodes are 200 steps: resume points at the first episode end after 250 -> 400
    saved = _interrupted_then_resumed_equals_uninterrupted(tmp_path, "Pendulum-v1", total=500, every=250, cut=450)
    assert saved == [400]


@pytest.mark.skipif(not mujoco_available(), reason="needs the mujoco extra (pip install -e '.[mujoco]')")
def test_train_resume_is_exact_on_a_mujoco_task(tmp_path):
    # Hopper's random-action episodes end early (falls), so resets (which draw from the env RNG) are frequent
    _interrupted_then_resumed_equals_uninterrupted(tmp_path, "Hopper-v5", total=400, every=150, cut=330)


def test_resume_rejects_a_foreign_state():
    env = make_env("Pendulum-v1")
    agent = make_agent(env, SACConfig(components=2, hidden=(8,)))
    with pytest.raises(ValueError, match="not a megamoe.rl training state"):
        train(env, agent, total_steps=10, resume={"format": "x"})


def _pendulum_run(total: int, *, resume=None, on_checkpoint=None):
    cfg = SACConfig(components=3, hidden=(16, 16), batch_size=32, start_steps=100, update_after=100)
    torch.manual_seed(0 if resume is None else 123)  # a resumed agent's weights must all come from the state
    env = make_env("Pendulum-v1")
    agent = make_agent(env, cfg)
    records = train(env, agent, total_steps=total, seed=1, on_checkpoint=on_checkpoint, resume=resume)
    return records, agent


@pytest.mark.parametrize("short,last_end", [(300, 200), (120, 0)])
def test_a_run_that_ends_mid_episode_can_be_extended_exactly(short, last_end):
    # Pendulum episodes are 200 steps: a 300-step run ends mid-episode (its last episode end is
    # step 200), a 120-step run ends inside its first episode (resumable from the start).
    saved = []
    _pendulum_run(short, on_checkpoint=saved.append)
    assert [s["step"] for s in saved] == [last_end]
    ref_records, ref = _pendulum_run(400)
    records, extended = _pendulum_run(400, resume=saved[-1])
    assert [r.to_json() for r in records] == [r.to_json() for r in ref_records]
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), extended.state_dict().values()))
