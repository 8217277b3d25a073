"""Research models: MoE methods from papers that stand apart from the MoE layer and its
training job, kept runnable and tested but not part of the library's core.

- ``single_gate``: the single-gated MoE (base branch, one nearest-centroid gate per sample,
  asynchronous expert training).
- ``rl``: a probabilistic mixture-of-experts policy (PMOE) trained with SAC (``megamoe rl``).
"""
