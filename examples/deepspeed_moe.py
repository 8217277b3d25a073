"""Train a megamoe MoE language model with DeepSpeed and expert parallelism (a user's script).

Rows are arithmetic sequences mod 256, so the loss falls within a few steps. The global batch
is the same for any number of processes (each rank takes its slice), so the printed loss (the
mean over ranks) does not depend on the layout.
"""
import argparse

import torch
import torch.distributed as dist

from megamoe import ExpertConfig, MoEConfig, RouterConfig
from megamoe.checkpoint import reshardable
from megamoe.integrations import deepspeed as mds
from megamoe.model import ModelConfig, MoETransformerLM
from megamoe.parallel import apply_expert_parallel, build_expert_parallel_groups, init_distributed

p = argparse.ArgumentParser()
p.add_argument("--ep-size", type=int, default=1)  # must divide the number of processes
p.add_argument("--zero-stage", type=int, default=1)
p.add_argument("--ds-config", help="a DeepSpeed JSON config file, instead of the dict below")
p.add_argument("--steps", type=int, default=30)
p.add_argument("--batch", type=int, default=8)  # sequences per step, over all processes
p.add_argument("--out", default="runs/examples/deepspeed_moe")
p.add_argument("--local_rank", type=int)  # the deepspeed launcher passes it; ranks come from the environment
args = p.parse_args()

init_distributed()  # joins the launcher's process group; run alone, makes a one-process group
groups = build_expert_parallel_groups(ep_size=args.ep_size)  # every rank calls it
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)  # the same full model on every rank ...
model = MoETransformerLM(ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, max_seq_len=64,
                                     moe=MoEConfig(num_experts=4, experts=ExpertConfig(intermediate_size=128),
                                                   router=RouterConfig(top_k=2, aux_loss_coef=0.01))))
apply_expert_parallel(model, groups)  # ... of which each rank keeps its experts

micro = args.batch // world
ds_config = args.ds_config or {
    "train_micro_batch_size_per_gpu": micro,
    "gradient_clipping": 1.0,
    "zero_optimization": {"stage": args.zero_stage},
    "bf16": {"enabled": torch.cuda.is_available()},
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01, "torch_adam": True}},
}
engine = mds.initialize(model, ds_config, groups)  # ZeRO 0-3; the optimizer comes from ds_config


def batch(step):  # this rank's rows of the global batch of `step`
    g = torch.Generator().manual_seed(step)
    start = torch.randint(0, 256, (args.batch, 1), generator=g)
    stride = torch.randint(1, 8, (args.batch, 1), generator=g)
    ids = (start + stride * torch.arange(64)) % 256
    return ids[rank * micro:(rank + 1) * micro].to(engine.device)


def mean_over_ranks(loss):
    loss = loss.detach().float().clone()
    dist.all_reduce(loss)
    return loss.item() / world


for step in range(args.steps):
    ids = batch(step)
    loss = engine(ids, labels=ids).loss  # a scalar; the MoE aux loss rides on the graph
    engine.backward(loss)
    engine.step()
    shown = mean_over_ranks(loss)
    if rank == 0:
        print(f"step {step + 1} loss {shown:.6f}", flush=True)

engine.eval()
with torch.no_grad():
    probe = batch(10_000)
    before = mean_over_ranks(engine(probe, labels=probe).loss)
    reshardable.save_checkpoint(engine, args.out)  # every rank; staged, sealed by a sha256 manifest, swapped in
    reshardable.load_checkpoint(engine, args.out)  # also works at another EP size, world size or ZeRO stage
    after = mean_over_ranks(engine(probe, labels=probe).loss)
if rank == 0:
    print(f"saved and loaded {args.out}: held-out loss {before:.6f} before, {after:.6f} after")
