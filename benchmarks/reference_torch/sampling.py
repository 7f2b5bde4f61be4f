"""KV-cache Gumbel-max sampling for the reference Llama (METHOD.md step 3), no gradient.

Contract (the one ms_dfkd's sampler and training step share):
    z[b, t] = argmax_v(logits[b, t, v] / temperature + g[b, t, v]) over the top-p nucleus,
    g[b, t, :] = kernels.gumbel_noise.gumbel_np(seed, [b * max_new_tokens + t], arange(V)).
A row stops at its first token in {eos_id} | stop_ids: new_mask is 1 before the stop, the stop
token is kept in new_ids, pad_id after it.
"""
import numpy as np
import torch

from kernels.gumbel_noise import gumbel_np


def _pick(logits, noise, temperature, top_p):
    if temperature == 0:
        return logits.argmax(-1)
    scaled = logits / temperature
    if top_p < 1.0:
        probs = scaled.softmax(-1)
        sorted_p, _ = probs.sort(-1, descending=True)
        above = sorted_p.cumsum(-1) - sorted_p              # mass of the tokens ranked before
        threshold = torch.where(above < top_p, sorted_p, torch.full_like(sorted_p, 2.0)).amin(-1, keepdim=True)
        scaled = scaled.masked_fill(probs < threshold, float("-inf"))
    return (scaled + noise).argmax(-1)


@torch.no_grad()
def sample(model, prompt_ids, prompt_mask, max_new_tokens, seed=0, temperature=1.0, top_p=1.0,
           eos_id=2, stop_ids=(), pad_id=2):
    """prompt_ids, prompt_mask: int numpy [B, P], left-padded. Returns numpy (new_ids, new_mask) [B, T]."""
    ids = torch.as_tensor(np.asarray(prompt_ids), dtype=torch.long)
    mask = torch.as_tensor(np.asarray(prompt_mask), dtype=torch.long)
    b, p = ids.shape
    T, V = int(max_new_tokens), model.config.vocab_size
    cache = model.new_cache(b, p + T)
    key_mask = torch.zeros(b, p + T, dtype=torch.bool)
    key_mask[:, :p] = mask.bool()
    lengths = mask.sum(1)
    stops = torch.tensor(sorted({int(eos_id), *map(int, stop_ids)}))
    cols = np.arange(V)

    def noise(t):
        if temperature == 0:
            return 0.0
        return torch.from_numpy(gumbel_np(seed, np.arange(b) * T + t, cols))

    new_ids = torch.full((b, T), pad_id, dtype=torch.long)
    new_mask = torch.zeros(b, T, dtype=torch.long)
    finished = torch.zeros(b, dtype=torch.bool)
    logits = model.forward_cached(ids, (mask.cumsum(1) - 1).clamp_min(0), key_mask, cache, 0)
    for t in range(T):
        if t > 0:
            slot = p + t - 1
            key_mask[:, slot] = True
            logits = model.forward_cached(new_ids[:, t - 1:t], (lengths + t - 1)[:, None], key_mask, cache, slot)
        z = _pick(logits, noise(t), temperature, top_p)
        live = ~finished
        new_ids[live, t] = z[live]
        hit = torch.isin(z, stops)
        new_mask[live & ~hit, t] = 1
        finished |= live & hit
        if finished.all():
            break
    return new_ids.numpy().astype(np.int32), new_mask.numpy().astype(np.int32)
