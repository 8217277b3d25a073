"""Training: ``megamoe train`` and ``megamoe tokenizer``.

config.py (TrainConfig, YAML + overrides), corpus.py (embedded multi-domain corpus), data.py
(documents, tokenizer, packing, resumable shuffling), backends.py (torch / deepspeed, optimizer
choice), trainer.py (the job: loop, eval, checkpoints, resume), metrics.py (JSONL,
TensorBoard, plots), train_cmd.py / tokenizer_cmd.py (CLI), demo.py (``megamoe demo``).
"""
