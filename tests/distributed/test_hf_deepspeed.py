"""A moeified HF model trains under DeepSpeed (ZeRO-1, 2 real gloo ranks, data parallel) and
takes the same step as a single process given the same micro-batches."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

from megamoe import RouterConfig  # noqa: E402
from megamoe.integrations.hf import moeify  # noqa: E402
from megamoe.stats import moe_layers  # noqa: E402
from megamoe.testing import run_distributed  # noqa: E402

V, LR = 53, 0.05


def _model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    m = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
    moeify(m, num_experts=4, router=RouterConfig(top_k=2, aux_loss_coef=0.5), seed=0)
    return m


def _batches():
    gen = torch.Generator().manual_seed(3)
    return torch.randint(0, V, (2, 2, 10), generator=gen)  # [rank, batch, seq]


def _ds_rank(rank, world_size):
    import deepspeed

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": 1}, "zero_allow_untested_optimizer": True, "gradient_clipping": 0.0,
              "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    ids = _batches()[rank].to(engine.device)
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    return {k: v.detach().clone() for k, v in engine.module.state_dict().items()}


@pytest.mark.distributed
@pytest.mark.slow
def test_moeified_model_steps_like_single_process_under_deepspeed():
    results = run_distributed(_ds_rank, 2)
    ref = _model()
    # Gradient of the mean over ranks of (LM loss + the attached aux loss) of each micro-batch.
    for ids in _batches():
        ref(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        for p in ref.parameters():
            if p.grad is not None:
                p -= LR * p.grad / 2
    expected = ref.state_dict()
    moved = expected["model.layers.0.mlp.router.weight"] - _model().state_dict()["model.layers.0.mlp.router.weight"]
    assert moved.abs().max() > 1e-4
    for state in results:
        for k, v in expected.items():
            torch.testing.assert_close(state[k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert len(moe_layers(ref)) == 2
