"""PEMA (Kim, Kim & Bak, NAACL 2024): a plug-in adapter trained on the model's final-layer representations.

- `head.py`: the owner's LM head with its true final norm, as a small signed artifact.
- `representation.py`: `f(c)`, the last block's output before the final norm, from a local model.
- `memory.py`: the external memory of `(f(c), next token)` pairs, memory-mapped.
- `adapter.py`, `config.py`: the adapter `A`, `B_rct`, `B_pd` and its hyper-parameters.
- `training.py`: phase 1 (reconstruction) and phase 2 (κ·reconstruction + (1−κ)·prediction), early stopping.
- `unrolling.py`: Gradual Unrolling, the λ schedule that mixes PEMA's distribution with the model's.
- `policy.py`: that mixing as a policy of the shared token loop (common/generation).
"""
