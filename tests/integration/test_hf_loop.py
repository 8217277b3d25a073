"""The Hugging Face loop, end to end on tiny models built locally (no hub access).

1. Upcycling: dense Llama / Mistral / Qwen2 -> ``moeify`` (every block, or every other
   block, with and without a shared expert) -> a few optimizer steps (routers and experts
   move) -> ``save_pretrained`` (which stock transformers refuses) -> ``megamoe convert`` ->
   the stock Mixtral / Qwen2-MoE class -> ``megamoe convert`` back -> the same weights.
2. Import and train on: a stock Mixtral -> ``megamoe convert`` (from HF) -> ``megamoe
   train`` with ``train.init_from`` (a few steps on the embedded corpus) -> ``megamoe
   convert`` -> a stock Mixtral with the tokenizer the run trained.

Every export is then loaded by one clean interpreter that cannot import megamoe, with stock
``AutoModelForCausalLM`` / ``AutoTokenizer`` only; its logits, greedy tokens and (for the
trained run) text -> ids -> generate -> text are compared with what megamoe computed.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from megamoe import RouterConfig  # noqa: E402
from megamoe.checkpoint import load_consolidated  # noqa: E402
from megamoe.cli import main  # noqa: E402
from megamoe.integrations.hf import load_moeified, moeify  # noqa: E402
from megamoe.stats import moe_layers  # noqa: E402

V = 97
FAMILIES = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}
# name: (family, moeify arguments, extra config, the format auto must pick)
CASES = {
    "llama_all": ("llama", dict(layers="all"), {}, "mixtral"),
    "mistral_all": ("mistral", dict(layers="all"), {}, "mixtral"),
    "llama_every_other": ("llama", dict(layers="every_other"), {}, "qwen2_moe"),
    "llama_every_other_shared": ("llama", dict(layers="every_other", num_shared_experts=1), {}, "qwen2_moe"),
    "mistral_every_other": ("mistral", dict(layers="every_other"), {}, "qwen2_moe"),
    "mistral_every_other_gated_shared": (
        "mistral", dict(layers="every_other", num_shared_experts=1, shared_expert_gate=True), {}, "qwen2_moe"),
    "qwen2_every_other": ("qwen2", dict(layers="every_other"), {"tie_word_embeddings": True}, "qwen2_moe"),
    "qwen2_every_other_shared": ("qwen2", dict(layers="every_other", num_shared_experts=1), {}, "qwen2_moe"),
}
PROMPT_TEXT = "def parse_names(names, key):"

# Runs in a fresh interpreter: stock transformers only, megamoe cannot even be imported.
CLEAN_CHECK = r'''
import json, sys
class _NoMegamoe:
    def find_spec(self, name, path=None, target=None):
        if name == "megamoe" or name.startswith("megamoe."):
            raise ImportError("the clean interpreter must not import megamoe")
sys.meta_path.insert(0, _NoMegamoe())
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
jobs = json.load(open(sys.argv[1]))
out = {}
for name, job in jobs.items():
    model = AutoModelForCausalLM.from_pretrained(job["dir"], dtype=torch.float32).eval()
    ids = torch.tensor(job["ids"])
    prompt = torch.tensor(job["prompt"])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=job["new"],
                             do_sample=False, pad_token_id=0)
    res = {"type": type(model).__name__, "logits": logits.tolist(), "greedy": gen.tolist()}
    if job.get("text") is not None:
        tok = AutoTokenizer.from_pretrained(job["dir"])
        enc = tok(job["text"], return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=job["new"], do_sample=False)
        res.update(text_ids=enc["input_ids"].tolist(), text_out=tok.decode(gen[0], skip_special_tokens=True),
                   gen_ids=gen.tolist(), eos=tok.eos_token, bos=tok.bos_token, unk=tok.unk_token)
    out[name] = res
assert not [m for m in sys.modules if m.split(".")[0] == "megamoe"]
json.dump(out, open(sys.argv[2], "w"))
'''


def _dense(family, extra, seed):
    cfg_cls, model_cls = FAMILIES[family]
    cfg = cfg_cls(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, **extra)
    torch.manual_seed(seed)
    model = model_cls(cfg)
    with torch.no_grad():  # weights (and Qwen2's q/k/v biases) large enough that routing is far from uniform
        for name, p in model.named_parameters():
            if p.dim() >= 2 or name.endswith("_proj.bias"):
                p.normal_(0.0, 0.2)
    return model


def _train_a_few_steps(model, seed):
    """AdamW steps on random tokens: routers and experts move away from the upcycled start."""
    gen = torch.Generator().manual_seed(seed)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(3):
        ids = torch.randint(0, V, (4, 12), generator=gen)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    for layer in moe_layers(model):
        assert not torch.equal(layer.router.weight, before[_key(model, layer) + ".router.weight"])
        ex = layer.experts.gate_up_proj
        assert not torch.equal(ex[0], ex[1])  # upcycled experts start equal; training separated them


def _key(model, module):
    return next(n for n, m in model.named_modules() if m is module)


def _generate(model, prompt, new):
    with torch.no_grad():
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, do_sample=False,
                              pad_token_id=0)


def _upcycle_case(root: Path, name: str, seed: int) -> dict:
    family, spec, extra, fmt = CASES[name]
    model = _dense(family, extra, seed)
    moeify(model, num_experts=4, router=RouterConfig(top_k=2, aux_loss_coef=0.1), seed=seed, **spec)
    _train_a_few_steps(model, seed)
    model.save_pretrained(root / name / "moe")
    with pytest.raises(ValueError, match="load_moeified.*megamoe convert"):  # not silently read as dense
        transformers.AutoModelForCausalLM.from_pretrained(root / name / "moe")
    assert main(["convert", str(root / name / "moe"), str(root / name / "hf")]) == 0
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (2, 24), generator=gen)
    prompt = ids[:1, :6]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return {"dir": str(root / name / "hf"), "ids": ids.tolist(), "prompt": prompt.tolist(), "new": 10,
            "expect_logits": logits, "expect_greedy": _generate(model, prompt, 10), "format": fmt, "model": model}


def _trained_case(root: Path) -> dict:
    """HF Mixtral -> megamoe -> megamoe train (init_from) -> HF Mixtral with its tokenizer."""
    import sentencepiece as spm

    from megamoe.train.trainer import load_trained_model

    cfg = transformers.MixtralConfig(vocab_size=256, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=32)
    torch.manual_seed(0)
    mixtral = transformers.MixtralForCausalLM(cfg)
    mixtral.save_pretrained(root / "mixtral")
    assert main(["convert", str(root / "mixtral"), str(root / "imported")]) == 0  # direction detected
    # --resume is for a run's checkpoints; weights start a run through train.init_from.
    common = ["parallel.backend=torch", "parallel.ep_size=1", f"train.output_dir={root / 'run'}",
              "data.embedded_docs=300", "data.seq_len=32", "train.micro_batch_size=4", "train.warmup_steps=1",
              "train.lr=3e-3", "train.eval_interval=0", "train.plots=false", "train.tensorboard=false",
              "train.progress=false", "train.threads=1"]
    assert main(["train", *common, "--resume", str(root / "imported")]) == 2
    assert main(["train", *common, f"train.init_from={root / 'imported'}", "train.steps=4"]) == 0
    ckpt = root / "run" / "checkpoints" / "step_00000004"
    assert main(["convert", str(ckpt), str(root / "trained_hf")]) == 0
    model = load_trained_model(str(ckpt))
    init = mixtral.state_dict()
    for k, v in model.state_dict().items():  # started from the Mixtral's weights, and moved
        w = init[k.replace(".mlp.router.", ".mlp.gate.")]
        assert 0 < float((v - w).abs().max()) < 0.05 * float(w.abs().max()) + 0.02, k
    sp = spm.SentencePieceProcessor(model_file=str(ckpt / "tokenizer.model"))
    prompt_ids = torch.tensor([sp.encode(PROMPT_TEXT)])
    greedy = prompt_ids
    with torch.no_grad():
        for _ in range(8):
            greedy = torch.cat([greedy, model(greedy).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))
        logits = model(ids).logits
    new = greedy[0, prompt_ids.shape[1]:].tolist()
    stop = new.index(sp.eos_id()) + 1 if sp.eos_id() in new else len(new)  # generate stops at EOS
    return {"dir": str(root / "trained_hf"), "ids": ids.tolist(), "prompt": prompt_ids.tolist(), "new": 8,
            "text": PROMPT_TEXT, "expect_logits": logits, "expect_greedy": greedy[:, :prompt_ids.shape[1] + stop],
            "expect_text_ids": prompt_ids.tolist(),
            "expect_text": sp.decode(prompt_ids[0].tolist() + [t for t in new[:stop] if t != sp.eos_id()]),
            "format": "mixtral", "sp": sp}


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf-loop")
    cases = {name: _upcycle_case(root, name, seed) for seed, name in enumerate(CASES)}
    cases["trained"] = _trained_case(root)
    jobs = {n: {k: c[k] for k in ("dir", "ids", "prompt", "new", "text") if k in c} for n, c in cases.items()}
    (root / "jobs.json").write_text(json.dumps(jobs))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    proc = subprocess.run([sys.executable, "-c", CLEAN_CHECK, str(root / "jobs.json"), str(root / "out.json")],
                          cwd=root, env=dict(env, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, cases, json.loads((root / "out.json").read_text())


@pytest.mark.parametrize("name", list(CASES) + ["trained"])
def test_stock_transformers_reproduces_the_export(loop, name):
    root, cases, out = loop
    case, got = cases[name], out[name]
    cfg = json.loads((Path(case["dir"]) / "config.json").read_text())
    assert cfg["model_type"] == case["format"]
    assert got["type"] == {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}[case["format"]]
    torch.testing.assert_close(torch.tensor(got["logits"]), case["expect_logits"], rtol=0, atol=1e-4)
    assert got["greedy"] == case["expect_greedy"].tolist()


@pytest.mark.parametrize("name", list(CASES))
def test_convert_back_gives_the_trained_weights(loop, name):
    root, cases, _ = loop
    model = cases[name]["model"]
    assert main(["convert", cases[name]["dir"], str(root / name / "back")]) == 0
    back = load_consolidated(root / name / "back").state_dict()
    mine = model.state_dict()
    assert set(back) == {k for k in mine if "rotary" not in k}
    for k, v in back.items():
        torch.testing.assert_close(v, mine[k], rtol=0, atol=0, msg=k)
    reloaded = load_moeified(str(root / name / "moe"))  # the moeified directory still reloads as it was
    for k, v in reloaded.state_dict().items():
        torch.testing.assert_close(v, mine[k], rtol=0, atol=0, msg=k)


def test_export_carries_the_tokenizer_training_used(loop):
    _, cases, out = loop
    case, got = cases["trained"], out["trained"]
    sp = case["sp"]
    assert (got["unk"], got["bos"], got["eos"]) == (sp.id_to_piece(sp.unk_id()), sp.id_to_piece(sp.bos_id()),
                                                    sp.id_to_piece(sp.eos_id()))
    assert got["text_ids"] == case["expect_text_ids"]  # no BOS: training never saw one
    assert got["gen_ids"] == case["expect_greedy"].tolist()
    assert got["text_out"] == case["expect_text"] and got["text_out"].startswith(PROMPT_TEXT)
    cfg = json.loads((Path(case["dir"]) / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (sp.bos_id(), sp.eos_id())
