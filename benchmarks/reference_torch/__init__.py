"""A plain PyTorch eager reference of the DFKD-T3 steps (METHOD.md), for parity tests and benchmarks.

bert.py (teacher/student encoders), llama.py (generator, KV cache), loading.py (GGUF, safetensors,
numpy state dicts, bridge tables), steps.py (generator and student losses), sampling.py (KV-cache
Gumbel-max sampler). Needs torch (the ``bench`` extra); ms_dfkd never imports it.
"""
