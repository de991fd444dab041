"""One token loop for every generation path: the owner's plugged and PEMA generation, and the data owner's remote
PEMA generation, which asks `Represent` for each step's state.

- `sampling.py`: `SamplingConfig` (length, temperature, top-p, seed, stop strings) and the choice of each token.
- `steppers.py`: what a step gives the loop (f(x) and log P_LM per row); `LocalStepper` runs a local model.
- `loop.py`: the loop itself (`decode`, `complete`, `stream`), ending rows on end-of-text, stop strings or the cap.

A `Policy` turns a step's f(x) and log P_LM into the log-probs that are sampled: the plain model's returns log P_LM,
PEMA's mixes in the adapter's (common/pema/policy.py).
"""
