"""No-grad incremental decoding of LlamaForCausalLM with a preallocated KV cache.

One prefill over the (left-padded) prompt, then one-token steps that read and write
a cache of static shape [B, n_kv, S, D] per layer, S = padded prompt length +
max_new_tokens. Shapes never change inside one call, so in graph mode (ms.jit) the
step compiles once per (batch, S); prompts are left-padded up to a multiple of
``prompt_bucket`` so that batches of similar prompt length reuse the compiled graphs.
Compile cost on CPU for SmolLM2-135M (30 layers): a few seconds each for the prefill
and step graphs, paid once per shape and cached by MindSpore for the process.

Gumbel-max sampling (the noise contract shared with the training step):
    z[b, t] = argmax_v( l[b, t, v] / temperature + g[b, t, v] ),  v in the top-p nucleus
    g[b, t, :] = kernels.gumbel_noise noise of (seed, row = b * max_new_tokens + t, col = v), v = 0..V-1
i.e. exactly ``gumbel_np(seed, [b * max_new_tokens + t], np.arange(V))``. The training
step regenerates the same g from (seed, row, col) instead of storing it. The nucleus is
the smallest set of tokens whose softmax(l / temperature) mass reaches top_p (ties at the
threshold kept; the top token always kept); the rest is set to -inf before the argmax.
temperature == 0 or greedy=True: plain argmax of l.

Stopping and masks: a row stops at the first token that is ``eos_id`` or in ``stop_ids``.
new_mask is 1 for the tokens before the stop and 0 from the stop token on; new_ids keeps
the stop token itself (so callers can see why a row ended) and holds ``pad_id`` after it.
"""
import contextlib
import weakref

import numpy as np
import mindspore as ms
from mindspore import ops, Tensor

from kernels.gumbel_noise import gumbel_np

_NEG_INF = float("-inf")


def pick_tokens(logits, noise, inv_temp, top_p, greedy, use_top_p):
    """logits, noise [B, V] float32 -> int32 [B] by argmax / Gumbel-max over the top-p nucleus."""
    if greedy:
        return ops.argmax(logits, -1).astype(ms.int32)
    scaled = logits * inv_temp
    if use_top_p:
        probs = ops.softmax(scaled, -1)
        sorted_p, _ = ops.sort(probs, -1, True)
        before = ops.cumsum(sorted_p, -1) - sorted_p        # mass strictly above this token
        kept = ops.where(before < top_p, sorted_p, ops.ones_like(sorted_p) * 2.0)
        threshold = ops.amin(kept, -1, True)                # smallest kept probability
        scaled = ops.where(probs >= threshold, scaled, ops.ones_like(scaled) * _NEG_INF)
    return ops.argmax(scaled + noise, -1).astype(ms.int32)


class KVCacheDecoder:
    """Prefill and one-token step functions for one model (jitted when graph=True)."""

    def __init__(self, model, graph=True, greedy=False, use_top_p=False):
        self.model = model
        self.greedy, self.use_top_p = greedy, use_top_p
        self.prefill = ms.jit(self._prefill) if graph else self._prefill
        self.step = ms.jit(self._step) if graph else self._step

    def _prefill(self, ids, mask, cache_len, noise, inv_temp, top_p):
        hidden, caches = self.model.model.prefill(ids, mask, cache_len)
        logits = self.model.logits_from_hidden(hidden[:, -1:])[:, 0]  # left padding: last slot is real
        token = pick_tokens(logits, noise, inv_temp, top_p, self.greedy, self.use_top_p)
        return token, logits, caches

    def _step(self, ids, positions, key_mask, write_slot, caches, noise, inv_temp, top_p):
        # callers pass caches as ms.mutable(tuple): a plain tuple input is a compile-time
        # constant for ms.jit and every new cache would recompile the step
        hidden, caches = self.model.model.decode_step(ids, positions, key_mask, write_slot, caches)
        logits = self.model.logits_from_hidden(hidden)[:, 0]
        token = pick_tokens(logits, noise, inv_temp, top_p, self.greedy, self.use_top_p)
        return token, logits, caches


_DECODERS = weakref.WeakKeyDictionary()


def _decoder(model, graph, greedy, use_top_p):
    per_model = _DECODERS.setdefault(model, {})
    key = (graph, greedy, use_top_p)
    if key not in per_model:
        per_model[key] = KVCacheDecoder(model, graph, greedy, use_top_p)
    return per_model[key]


def sample(model, prompt_ids, prompt_mask, max_new_tokens, seed=0, temperature=1.0, top_p=1.0,
           eos_id=2, stop_ids=(), pad_id=None, greedy=False, return_logits=False, graph=True,
           prompt_bucket=16):
    """Generate up to ``max_new_tokens`` per row without gradient (see the module docstring).

    prompt_ids, prompt_mask: int [B, P] numpy or Tensor, left-padded (mask 1 = real token).
    Returns numpy (new_ids int32 [B, T], new_mask int32 [B, T]) and, with return_logits,
    the float32 logits [B, T, V] each token was drawn from (zeros after every row stopped).
    graph=True runs prefill and step through ms.jit; graph=False runs them eagerly.
    """
    ids = np.asarray(prompt_ids.asnumpy() if isinstance(prompt_ids, Tensor) else prompt_ids, np.int32)
    mask = np.asarray(prompt_mask.asnumpy() if isinstance(prompt_mask, Tensor) else prompt_mask, np.int32)
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise ValueError(f"prompt_ids {ids.shape} and prompt_mask {mask.shape} must be the same [B, P] shape")
    if not mask[:, -1].all():
        raise ValueError("prompts must be left-padded: the last column of prompt_mask must be all 1")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    cfg = model.config
    pad_id = cfg.pad_token_id if pad_id is None else pad_id
    greedy = greedy or temperature == 0
    use_top_p = (not greedy) and top_p < 1.0
    dec = _decoder(model, graph, greedy, use_top_p)

    b, p = ids.shape
    T, V = int(max_new_tokens), cfg.vocab_size
    p2 = -(-p // prompt_bucket) * prompt_bucket
    ids = np.concatenate([np.full((b, p2 - p), pad_id, np.int32), ids], 1)
    mask = np.concatenate([np.zeros((b, p2 - p), np.int32), mask], 1)
    cache_len = p2 + T
    lengths = mask.sum(1).astype(np.int32)
    rows0 = np.arange(b, dtype=np.int64) * T           # row = b * max_new_tokens + t
    cols = np.arange(V, dtype=np.int64)
    inv_temp = Tensor(np.float32(0.0 if greedy else 1.0 / temperature))
    top_p_t = Tensor(np.float32(top_p))
    stops = np.array(sorted({int(eos_id), *map(int, stop_ids)}), np.int64)

    def noise(t):
        # numpy, not MindSpore ops: MindSpore's CPU log is off by ~4e-6 near 1, which moves g by up
        # to 0.06 where u -> 1; gumbel_np is the reference the contract is written against
        if greedy:
            return Tensor(np.zeros((b, 1), np.float32))
        return Tensor(gumbel_np(seed, rows0 + t, cols))

    new_ids = np.full((b, T), pad_id, np.int32)
    new_mask = np.zeros((b, T), np.int32)
    all_logits = np.zeros((b, T, V), np.float32) if return_logits else None
    finished = np.zeros(b, bool)
    key_mask = np.concatenate([mask, np.zeros((b, T), np.int32)], 1)

    # no gradient bookkeeping in PyNative (MindSpore 2.10 keeps this context private)
    with getattr(ms, "_no_grad", contextlib.nullcontext)():
        token, logits, caches = dec.prefill(Tensor(ids), Tensor(mask), cache_len,
                                            noise(0), inv_temp, top_p_t)
        for t in range(T):
            if t > 0:
                slot = p2 + t - 1                      # where z_{t-1}'s key/value goes
                key_mask[:, slot] = 1
                write = np.zeros(cache_len, bool)
                write[slot] = True
                token, logits, caches = dec.step(
                    Tensor(new_ids[:, t - 1:t]), Tensor((lengths + t - 1)[:, None]), Tensor(key_mask),
                    Tensor(write), ms.mutable(caches), noise(t), inv_temp, top_p_t)
            z = token.asnumpy().astype(np.int32)
            if return_logits:
                all_logits[:, t] = logits.asnumpy()
            live = ~finished
            new_ids[live, t] = z[live]
            hit = np.isin(z, stops)
            new_mask[live & ~hit, t] = 1
            finished |= live & hit
            if finished.all():
                break
    return (new_ids, new_mask, all_logits) if return_logits else (new_ids, new_mask)

