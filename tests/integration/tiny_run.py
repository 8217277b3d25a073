"""The tiny model and corpus the train-job tests run on (``configs/tiny.yaml`` overrides): a
step takes milliseconds on one core. Each test file adds the backend, schedule and outputs it needs."""
TINY_RUN = ["model.vocab_size=256", "model.hidden_size=32", "model.num_heads=2", "model.max_seq_len=32",
            "model.moe.num_experts=4", "model.moe.experts.intermediate_size=32",
            "data.embedded_docs=420", "data.seq_len=32", "data.eval_fraction=0.1",
            "train.micro_batch_size=4", "train.warmup_steps=2", "train.threads=1", "train.progress=false"]
