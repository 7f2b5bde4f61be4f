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

The graphs return logits; the token is picked on the host (``pick_tokens``). A sort of the whole
vocabulary in the step graph took most of a decode step on CPU (about 0.1 s of it for 8 rows of
49,152), so the nucleus is found among the tokens above a probability floor (``nucleus_cuts``: 1e-3,
then 1e-4, then 1e-5, at most 1,000, 10,000 and 100,000 tokens), the whole row only when their mass
stays below top_p, and the noise is drawn for the nucleus's columns only: the same tokens, a fraction
of the work. (The 256 most probable tokens by a partial sort, as before, fell back to the whole row
for 40% of SmolLM2's rows in a dfkd-t3 round at top_p 0.95: 24 ms for 8 rows, now 6.)

Shared prompt prefixes: rows whose prompts begin with the same tokens (the same template and label:
a third of an 80-token prompt here) have the same keys/values there, since nothing before a position
changes them. ``share_prefix`` computes such a prefix once per group of rows (``shared_prefix`` picks
its length to save the most positions), then each row's remaining prompt as a chunk after it
(``LlamaModel.prefill_after``). The cache then holds the prefix in its first slots, the rest of the
prompt left-padded after it. The logits equal the full prefill's up to float rounding (a tested
tolerance), so a rare near-tie of the Gumbel-max can pick another token than the full prefill would.
For a model whose weights never change (the frozen generator) the caller can keep the prefixes across
calls (``prefix_cache``): a label's prompt start is then computed once per run.

States for the trained generator's step: ``capture_layer=k`` also returns the states entering decoder
layer k at every position of [prompt; new tokens], which the prefill and the decode steps compute anyway.
The driver's generator step needs exactly these (``LlamaForCausalLM.trunk_states`` over the same ids, up
to float rounding: a cached decode sums in another order than a full forward), so it need not run the
lower layers again.

The decode steps on CPU: with ``fused_decode`` (the default) each decoder layer of a one-token step runs as
one C++ op (llama.LlamaDecoderLayer.decode_fused, kernels/cpu/llama_decode.cc) in place of about 30
MindSpore ops, whose launches took most of a step. Float32 only, no gradient (sampling needs none); the
gradient graphs keep MindSpore's ops. Its sums run in another order, so the logits equal
the MindSpore ops' up to float rounding, and a rare near-tie of the Gumbel-max can pick another token.
Which path runs is logged once a model; other device targets, other compute dtypes and the mindformers
backend use MindSpore's ops.

The prefill on CPU: with ``fused_prefill`` (the default) each decoder layer of the prompt's prefill (the
shared start and the rest of each prompt alike) runs as one C++ op too (LlamaDecoderLayer.chunk_fused):
the real tokens of the left-padded batch are packed into rows before every product, so padding costs
nothing, and the attention is two products a row and key/value head. A prompt of the offline default
is about a third padding after the shared start (the rest is padded to the longest row, rounded up to
``prompt_bucket``). Again the logits equal MindSpore's ops' up to float rounding.

GGUF blocks in the fused decode steps: a model loaded from a GGUF file keeps the file's Q4_1 / Q8_0
matrices (``model.gguf_blocks``), and with ``gguf_blocks`` (the default) the fused steps read the weights
that do not train from them: the leading layers whose 7 matrices are all frozen, and the LM head if it
is (SmolLM2: 96 MB of blocks where the float32 weights are 538 MB; each block is expanded in registers and
used by every row). The loops are AVX-512 or AVX2 ones, chosen at run time (the AVX2 ones read a copy of
the blocks interleaved by 8 weight rows, made once: one vector then holds a weight of 8 outputs, and the
products need no horizontal sums); on a CPU with neither the
portable loops would be slower than float32 weights, so the steps keep those (the log says which), as
they do with the AVX2 loops above AVX2_BLOCK_ROWS rows (not measured there). The blocks give the float32 weights to the bit
(both are gguf's dequantisation), so the logits again equal the other paths' up to the order of the
sums. The trained layers, the prefill and every gradient graph keep the float32 weights.

Stopping and masks: a row stops at the first token that is ``eos_id`` or in ``stop_ids``.
new_mask is 1 for the tokens before the stop and 0 from the stop token on; new_ids keeps
the stop token itself (so callers can see why a row ended) and holds ``pad_id`` after it.
"""
import contextlib
import inspect
import logging

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from kernels import cpu_ops
from kernels.gumbel_noise import gumbel_np, gumbel_pairs_np
from kernels.nucleus import NUCLEUS_CUTS, nuclei

log = logging.getLogger("ms_dfkd")


PREFIX_CACHE_SIZE = 8  # shared prompt starts a prefix_cache keeps (a few MB each for SmolLM2)


def pick_tokens(logits, seed, rows, inv_temp, top_p, greedy, cuts=NUCLEUS_CUTS, nucleus_path="numpy"):
    """int32 [B] from logits [B, V] (numpy float32): argmax, or Gumbel-max over the top-p nucleus with the
    noise of (seed, rows[b], column) drawn for the nucleus's columns only; the nuclei by kernels.nucleus
    (nucleus_path "cpu" or "numpy": the same columns)."""
    if greedy:
        return logits.argmax(-1).astype(np.int32)
    scaled = (logits * np.float32(inv_temp)).astype(np.float32, copy=False)
    if top_p >= 1.0:
        g = gumbel_np(seed, rows, np.arange(scaled.shape[1], dtype=np.int64))
        return (scaled + g).argmax(-1).astype(np.int32)
    e = np.exp(scaled - scaled.max(-1, keepdims=True))
    probs = (e / e.sum(-1, keepdims=True)).astype(np.float32, copy=False)
    columns = nuclei(probs, top_p, cuts, nucleus_path)
    sizes = [len(cols) for cols in columns]
    g = gumbel_pairs_np(seed, np.repeat(np.asarray(rows, np.int64), sizes), np.concatenate(columns))
    out = np.empty(len(scaled), np.int32)
    start = 0
    for b, cols in enumerate(columns):
        out[b] = cols[np.argmax(scaled[b, cols] + g[start:start + sizes[b]])]
        start += sizes[b]
    return out


def _one_row(logits):
    """[B, 1, V] -> [B, V] by a reshape: MindSpore's CPU StridedSlice (logits[:, 0]) took 9 ms on these 1.5 MB,
    a tenth of a decode step."""
    return logits.reshape(logits.shape[0], logits.shape[-1])


class KVCacheDecoder:
    """Prefill and one-token step functions for one model (jitted when graph=True); they return the
    logits of the next token, and the caches."""

    def __init__(self, model, graph=True):
        self.model = model
        self.prefill = ms.jit(self._prefill) if graph else self._prefill
        self.step = ms.jit(self._step) if graph else self._step
        # the shared-prefix path needs LlamaModel.prefill_after (the mindformers backend has none)
        self.prefill_after = (ms.jit(self._prefill_after) if graph else self._prefill_after) \
            if hasattr(model.model, "prefill_after") else None
        # a shared start's top layers from the kept states entering them (sample's prefix_cache_layers)
        self.prefill_from = (ms.jit(self._prefill_from) if graph else self._prefill_from) \
            if hasattr(model.model, "prefill_from") else None
        self.said_which_path = False
        # sets of GGUF blocks (block_set) as Parameters: graph parameters rather than 197 inputs of every step,
        # whose argument handling took 6 of a 46 ms step; append-only, so an index always names the same set
        self._block_sets = []

    def block_set(self, blocks, head):
        """The index (a compile-time constant of ``step``) of the decode steps' GGUF blocks: ``blocks`` (7 a
        layer) and the LM head's ``head`` (or None), registered once per set as Parameters; -1 for none."""
        if not blocks and head is None:
            return -1
        for i, (source, _, _) in enumerate(self._block_sets):
            if len(source) == len(blocks) + 1 and all(a is b for a, b in zip(source, tuple(blocks) + (head,))):
                return i
        tag = f"gguf_blocks_{id(self):x}_{len(self._block_sets)}"
        def param(b, name):  # the loader's blocks are Parameters already (a Tensor would be copied)
            return b if isinstance(b, ms.Parameter) else ms.Parameter(b, name=f"{tag}.{name}", requires_grad=False)
        params = ms.ParameterTuple(param(b, j) for j, b in enumerate(blocks))
        head_param = None if head is None else param(head, "head")
        self._block_sets.append((tuple(blocks) + (head,), params, head_param))
        return len(self._block_sets) - 1

    # steer (label vectors) and capture_layer are passed on only when given: models without them (the
    # mindformers backend, whose config refuses label vectors) keep their own prefill/decode_step signatures.
    # capture_layer > 0 adds a third output: the states entering that decoder layer (llama.LlamaModel).
    @staticmethod
    def _call(fn, args, steer, steer_layer, capture_layer):
        if steer is None and not capture_layer:
            return fn(*args)
        return fn(*args, steer, steer_layer, capture_layer)

    def _prefill(self, ids, mask, cache_len, steer=None, steer_layer=0, capture_layer=0, fused=False):
        if fused:
            out = self.model.model.prefill(ids, mask, cache_len, steer, steer_layer, capture_layer, True)
        else:
            out = self._call(self.model.model.prefill, (ids, mask, cache_len), steer, steer_layer, capture_layer)
        return (_one_row(self.model.logits_from_hidden(out[0][:, -1:])),) + out[1:]  # left padding: last slot is real

    def _prefill_from(self, states, mask, cache_len, first_layer, steer=None, steer_layer=0, fused=False):
        return self.model.model.prefill_from(states, mask, cache_len, first_layer, steer, steer_layer, fused)[1]

    def _prefill_after(self, ids, positions, key_mask, prefix_caches, group, cache_len, steer=None,
                       steer_layer=0, capture_layer=0, fused=False):
        # prefix_caches: one row per group; each row reads its group's (a gather inside the graph)
        past = tuple(ops.gather(c, group, 0) for c in prefix_caches)
        args = (ids, positions, key_mask, past, cache_len)
        if fused:
            out = self.model.model.prefill_after(*args, steer, steer_layer, capture_layer, True)
        else:
            out = self._call(self.model.model.prefill_after, args, steer, steer_layer, capture_layer)
        return (_one_row(self.model.logits_from_hidden(out[0][:, -1:])),) + out[1:]

    def _step(self, ids, positions, key_mask, write_slot, caches, steer=None, steer_layer=0, capture_layer=0,
              fused=False, block_set=-1):
        # callers pass caches as ms.mutable(tuple): a plain tuple input is a compile-time constant for ms.jit
        # and every new cache would recompile the step. block_set: an index from block_set(), or -1
        blocks, head_blocks = ((), None) if block_set < 0 else self._block_sets[block_set][1:]
        args = (ids, positions, key_mask, write_slot, caches)
        if fused:
            out = self.model.model.decode_step(*args, steer, steer_layer, capture_layer, True, blocks)
        else:
            out = self._call(self.model.model.decode_step, args, steer, steer_layer, capture_layer)
        if head_blocks is None:
            return (_one_row(self.model.logits_from_hidden(out[0])),) + out[1:]
        return (_one_row(cpu_ops.gguf_linear(out[0], head_blocks)),) + out[1:]


def fused_decode_problem(model):
    """None if the decode steps and the prefill can run each layer as one C++ op here (module docstring),
    else why not."""
    target = ms.get_context("device_target")
    if target != "CPU":
        return f"the fused decoder layer runs on the CPU device target only, and it is {target}"
    if not all("fused" in inspect.signature(f).parameters for f in (model.model.decode_step, model.model.prefill)):
        return f"{type(model.model).__name__} has no fused decode step and prefill"
    if model.config.compute_dtype != "float32":
        return f"the fused decoder layer is float32 and the model's compute dtype is {model.config.compute_dtype}"
    return cpu_ops.unavailable_reason("llama_decode")


LAYER_MATRICES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # the order decode_fused takes blocks in


AVX2_BLOCK_ROWS = 32  # the interleaved blocks beat float32 weights up to here (measured at 8, 16 and 32 rows)


def decode_blocks(model, rows=8, interleaved=None):
    """(blocks, head, message): the GGUF blocks (``model.gguf_blocks``, uint8 Parameters) that the fused decode
    steps can read in place of float32 weights: ``blocks`` 7 a layer for the leading layers whose matrices
    all have blocks and none of which trains; ``head`` the LM head's (None if it trains or has none);
    ``message`` says which (for the log). None with the portable loops, nor with the AVX2 loops for a
    batch of more than AVX2_BLOCK_ROWS ``rows`` (SmolLM2, interleaved blocks against float32 weights: 28
    against 61 ms a step at 8 rows, 56 against 81 at 16, 107 against 148 at 32; each group of 8 rows reads
    the blocks again). interleaved: the blocks in the layout of kernels.cpu_ops.interleave_blocks (None:
    with the AVX2 loops, which read it fastest)."""
    per_name = getattr(model, "gguf_blocks", None) or {}
    if not per_name:
        return (), None, "float32 weights (the model has no GGUF blocks)"
    loops = cpu_ops.gguf_loops()
    if loops == "portable":  # 2-3x slower than float32 weights (measured on an AVX2 CPU)
        return (), None, "float32 weights (this CPU has neither AVX2 nor AVX-512, and the blocks' portable loops " \
                         "are slower than float32 weights)"
    if loops == "avx2" and rows > AVX2_BLOCK_ROWS:  # each group of 8 rows expands the blocks again
        return (), None, f"float32 weights ({rows} rows: the blocks' AVX2 loops are not measured against " \
                         f"float32 weights above {AVX2_BLOCK_ROWS})"
    frozen = {name for name, p in model.parameters_and_names() if not p.requires_grad}

    def usable(name):
        return name in per_name and name in frozen

    if interleaved is None:  # the AVX2 loops read blocks interleaved by 8 weight rows about 1.3x as fast
        interleaved = loops == "avx2"

    def layout(name):  # (a matrix of weight rows in no whole groups of 8 keeps ggml's)
        blocks = per_name[name]
        return _interleaved_blocks(model, name) if interleaved and blocks.shape[0] % 8 == 0 else blocks

    blocks, n = (), 0
    for i in range(model.config.num_hidden_layers):
        names = [f"model.layers.{i}.{m}.weight" for m in LAYER_MATRICES]
        if not all(map(usable, names)):
            break
        blocks += tuple(map(layout, names))
        n += 1
    head_name = "model.embed_tokens.weight" if model.config.tie_word_embeddings else "lm_head.weight"
    head = layout(head_name) if usable(head_name) else None
    last = model.config.num_hidden_layers - 1
    from_blocks = ([f"layers 0-{n - 1}"] if n else []) + (["the LM head"] if head is not None else [])
    from_floats = ([f"layers {n}-{last}"] if n <= last else []) + (["the LM head"] if head is None else [])
    loops_said = f"{loops} loops" + (", interleaved by 8 rows" if interleaved else "")
    message = "; ".join(
        ([" and ".join(from_blocks) + f" from the GGUF blocks ({loops_said})"] if from_blocks else [])
        + ([" and ".join(from_floats) + " from float32 weights (they train, or have no blocks)"] if from_floats else []))
    return blocks, head, message


def _interleaved_blocks(model, name):
    """model.gguf_blocks[name] in the interleaved layout (kernels.cpu_ops.interleave_blocks), made once per
    matrix and kept on the model (SmolLM2: 0.1 GB more, beside the blocks the other loops read)."""
    kept = model.__dict__.setdefault("_interleaved_gguf_blocks", {})
    if name not in kept:
        kept[name] = ms.Parameter(Tensor(cpu_ops.interleave_blocks(model.gguf_blocks[name].asnumpy())),
                                  name=f"gguf_blocks_interleaved.{name}", requires_grad=False)
    return kept[name]


def captures_states(model):
    """Whether ``sample(..., capture_layer=k)`` works for this model: its decoder layers can hand out the
    states entering layer k while they decode (llama.LlamaModel; not the mindformers backend)."""
    return "capture_layer" in inspect.signature(model.model.decode_step).parameters


def _decoder(model, graph):
    """The model's decoder (compiled once per model and mode), kept on the model itself: a module-level
    WeakKeyDictionary would never free a model, since its decoder (the value) holds the model."""
    per_model = model.__dict__.setdefault("_kv_decoders", {})
    if graph not in per_model:
        per_model[graph] = KVCacheDecoder(model, graph)
    return per_model[graph]


def shared_prefix(ids, mask, steer=None, min_saved_per_row=4):
    """The prompt prefix worth computing once per group of rows, for left-padded prompts ids/mask [B, P].

    Returns (n, group [B], first [G]): rows with the same first n real tokens (and the same steer row)
    form a group, ``first`` holds a row of each; n maximises the positions saved, (B - G) * n, and leaves
    every row at least one token after the prefix. None when that saves under ``min_saved_per_row``
    positions a row (a prompt without a shared start)."""
    b = len(ids)
    lengths = mask.sum(1).astype(np.int64)
    limit = int(lengths.min()) - 1
    if b < 2 or limit < 1:
        return None
    heads = np.stack([ids[i, ids.shape[1] - lengths[i]:][:limit] for i in range(b)])   # [B, limit]
    extra = (np.zeros((b, 0), np.int64) if steer is None
             else np.ascontiguousarray(np.asarray(steer, np.float32)).view(np.int32).reshape(b, -1))
    best = None
    for n in range(1, limit + 1):
        _, first, group = np.unique(np.concatenate([heads[:, :n], extra], 1), axis=0, return_index=True,
                                    return_inverse=True)
        saved = (b - len(first)) * n
        if best is None or saved > best[0]:
            best = (saved, n, group.reshape(-1).astype(np.int32), first.astype(np.int32))
        if len(first) == b:  # every row its own group from here on: nothing more to save
            break
    if best[0] < min_saved_per_row * b:
        return None
    return best[1:]


def _prefix_prefill(dec, prefix_ids, steer, steer_key, steer_layer, capture_layer, fused, cache, cache_layers):
    """(caches, [captured states]) of the shared prompt starts prefix_ids [G, n] (numpy), steer [G, 1, H] or
    None; from ``cache`` where it holds them (sample's prefix_cache and prefix_cache_layers)."""
    n = prefix_ids.shape[1]
    ids, ones = Tensor(prefix_ids), Tensor(np.ones_like(prefix_ids))
    if cache is None:
        _, caches, *states = dec.prefill(ids, ones, n, steer, steer_layer, capture_layer, fused)
        return caches, states
    k = cache_layers
    key = (prefix_ids.tobytes(), prefix_ids.shape, fused) + (
        (steer_key, steer_layer, capture_layer) if k is None else ("layers below", k))
    kept = cache.get(key)
    if k is None:  # the whole start
        if kept is None:
            _, caches, *states = dec.prefill(ids, ones, n, steer, steer_layer, capture_layer, fused)
            kept = _keep(cache, key, (caches, states))
        return kept
    # the layers below k: their caches and the states entering layer k; the layers above run from those
    if kept is None:
        _, caches, below = dec.prefill(ids, ones, n, steer, steer_layer, k, fused)
        _keep(cache, key, (tuple(caches[:2 * k]), below))
    else:
        lower, below = kept
        caches = lower + tuple(dec.prefill_from(below, ones, n, k, steer, steer_layer, fused))
    return caches, [below] if capture_layer else []


def _keep(cache, key, value):
    while len(cache) >= PREFIX_CACHE_SIZE:
        cache.pop(next(iter(cache)))
    cache[key] = value
    return value


def sample(model, prompt_ids, prompt_mask, max_new_tokens, seed=0, temperature=1.0, top_p=1.0,
           eos_id=2, stop_ids=(), pad_id=None, greedy=False, return_logits=False, graph=True,
           prompt_bucket=16, nucleus_cuts=NUCLEUS_CUTS, steer=None, steer_layer=0, share_prefix=True,
           capture_layer=0, fused_decode=True, gguf_blocks=True, fused_prefill=True, prefix_cache=None,
           prefix_cache_layers=None):
    """Generate up to ``max_new_tokens`` per row without gradient (see the module docstring).

    steer: optional float32 [B, H], added to the states entering decoder layer ``steer_layer`` at every
    position, prompt and new tokens alike (the trained generator's per-label vectors, train.py).

    prompt_ids, prompt_mask: int [B, P] numpy or Tensor, left-padded (mask 1 = real token).
    Returns numpy (new_ids int32 [B, T], new_mask int32 [B, T]) and, with return_logits,
    the float32 logits [B, T, V] each token was drawn from (zeros after every row stopped).
    graph=True runs prefill and step through ms.jit; graph=False runs them eagerly.
    share_prefix: compute a prompt start that rows share once per group (module docstring); the path
    taken is logged once per model.
    capture_layer: k > 0 also returns (last) the states entering decoder layer k, [B, P + T, H] in the
    layout of [prompt_ids; new_ids] (the caller's left padding); zeros at the prompt's padding, at the
    last new token (its state is never computed) and at steps not run after every row stopped. Where the
    mask of [prompt; new] is 1 (the last token aside) they are ``trunk_states`` of those ids up to float
    rounding; ``steer`` is added after them, as in ``prefill``.
    fused_decode: run each decoder layer of a decode step as one C++ op where that can run (module
    docstring); the path is logged once a model. False: MindSpore's ops.
    gguf_blocks: the fused decode steps read the frozen weights from the model's GGUF blocks (module
    docstring). False: the float32 weights.
    fused_prefill: run each decoder layer of the prefill as one C++ op over the prompts' real tokens where
    that can run (module docstring). False: MindSpore's ops.
    prefix_cache: a dict the caller keeps for a model whose weights never change (the frozen generator):
    the shared prompt starts computed in earlier calls, by their tokens (and label vectors, layers and
    path), are taken from it rather than computed again; the same numbers. The last PREFIX_CACHE_SIZE stay.
    prefix_cache_layers: k, for a model whose first k decoder layers (and embeddings) never change but
    whose layers above do (the trained generator's top layers): prefix_cache keeps only those k layers'
    part of a start (their caches and the states entering layer k, by tokens), and the layers above run
    again on every call from the kept states; the same numbers. Needs steer_layer >= k and capture_layer
    0 or k.
    nucleus_cuts: the probability floors of the top-p candidate sets (kernels.nucleus); any give the same tokens.
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
    capture_layer = int(capture_layer)
    if capture_layer and not (captures_states(model) and 0 < capture_layer < cfg.num_hidden_layers):
        raise ValueError(f"capture_layer {capture_layer}: needs llama.LlamaModel's decoder and 0 < k < "
                         f"{cfg.num_hidden_layers} (this model: {type(model.model).__name__})")
    dec = _decoder(model, graph)
    if prefix_cache_layers is not None:
        k = prefix_cache_layers
        if not (dec.prefill_from is not None and 0 < k < cfg.num_hidden_layers and capture_layer in (0, k)
                and (steer is None or steer_layer >= k)):
            raise ValueError(f"prefix_cache_layers {k}: needs llama.LlamaModel's prefill_from, 0 < k < "
                             f"{cfg.num_hidden_layers}, capture_layer 0 or k (got {capture_layer}) and no steer "
                             f"below layer k (steer_layer {steer_layer})")

    b, p = ids.shape
    T, V = int(max_new_tokens), cfg.vocab_size
    lengths = mask.sum(1).astype(np.int32)
    use_prefix = share_prefix and dec.prefill_after is not None
    shared = shared_prefix(ids, mask, steer) if use_prefix else None
    problem = fused_decode_problem(model) if fused_decode or fused_prefill else None
    fused = fused_decode and problem is None
    fused_pre = fused_prefill and problem is None
    blocks, head_blocks, weights = (), None, ""
    if fused:
        if gguf_blocks:
            blocks, head_blocks, weights = decode_blocks(model, b)
        else:
            weights = "float32 weights (gguf_blocks is off)"
    nucleus_problem = cpu_ops.unavailable_reason("nucleus")
    nucleus_path = "numpy" if nucleus_problem else "cpu"
    paths = (("a prompt start that rows share is computed once per group" if use_prefix else
              "every prompt row in full" + (" (this model has no shared-prefix prefill)" if share_prefix else ""))
             + "; prefill: " + ("each decoder layer as one C++ op over the real tokens" if fused_pre
                                else f"MindSpore's ops ({problem or 'fused_prefill is off'})")
             + "; decode steps: " + (f"each decoder layer as one C++ op, {weights}" if fused
                                     else f"MindSpore's ops ({problem or 'fused_decode is off'})")
             + ("" if greedy or top_p >= 1.0 else "; top-p nuclei: " + (
                 f"numpy ({nucleus_problem})" if nucleus_problem else "C++")))
    if dec.said_which_path != paths:
        dec.said_which_path = paths
        log.info("KV-cache sampling: %s", paths)
    block_set = dec.block_set(blocks, head_blocks)
    if shared:
        # the cache: [shared prefix (n) | the rest of each prompt, left-padded (c) | new tokens (T)]
        n, group, first = shared
        rest = lengths - n
        c = -(-int(rest.max()) // prompt_bucket) * prompt_bucket
        chunk = np.full((b, c), pad_id, np.int32)
        chunk_mask = np.zeros((b, c), np.int32)
        for i in range(b):
            chunk[i, c - rest[i]:] = ids[i, p - rest[i]:]
            chunk_mask[i, c - rest[i]:] = 1
        prefix_ids = np.stack([ids[i, p - lengths[i]:p - lengths[i] + n] for i in first])
        chunk_pos = np.maximum(np.cumsum(chunk_mask, 1) - 1, 0) + n
        mask = np.concatenate([np.ones((b, n), np.int32), chunk_mask], 1)
        p2 = n + c
    else:
        p2 = -(-p // prompt_bucket) * prompt_bucket
        ids = np.concatenate([np.full((b, p2 - p), pad_id, np.int32), ids], 1)
        mask = np.concatenate([np.zeros((b, p2 - p), np.int32), mask], 1)
    cache_len = p2 + T
    rows0 = np.arange(b, dtype=np.int64) * T           # row = b * max_new_tokens + t
    inv_temp = np.float32(0.0 if greedy else 1.0 / temperature)
    stops = np.array(sorted({int(eos_id), *map(int, stop_ids)}), np.int64)
    # the noise is numpy's (gumbel_np, in pick_tokens): MindSpore's CPU log is off by ~4e-6 near 1,
    # which moves g by up to 0.06 where u -> 1; gumbel_np is the reference the contract is written against

    new_ids = np.full((b, T), pad_id, np.int32)
    new_mask = np.zeros((b, T), np.int32)
    all_logits = np.zeros((b, T, V), np.float32) if return_logits else None
    finished = np.zeros(b, bool)
    key_mask = np.concatenate([mask, np.zeros((b, T), np.int32)], 1)
    # capture_layer: the graphs' states, read back after the loop (reading one before the step's logits
    # made each decode step about 85 ms slower on CPU)
    step_states = []

    # no gradient bookkeeping in PyNative (MindSpore 2.10 keeps this context private)
    with getattr(ms, "_no_grad", contextlib.nullcontext)():
        steer_t = None if steer is None else Tensor(np.asarray(steer, np.float32)[:, None, :])
        if shared:
            st = None if steer_t is None else ops.gather(steer_t, Tensor(first), 0)
            steer_key = None if steer is None else np.asarray(steer, np.float32)[first].tobytes()
            prefix_caches, prefix_states = _prefix_prefill(dec, prefix_ids, st, steer_key, int(steer_layer),
                                                           capture_layer, fused_pre, prefix_cache, prefix_cache_layers)
            logits, caches, *chunk_states = dec.prefill_after(
                Tensor(chunk), Tensor(chunk_pos.astype(np.int32)), Tensor(mask), ms.mutable(prefix_caches),
                Tensor(group), cache_len, steer_t, int(steer_layer), capture_layer, fused_pre)
            prompt_states = prefix_states + chunk_states
        else:
            logits, caches, *prompt_states = dec.prefill(Tensor(ids), Tensor(mask), cache_len, steer_t,
                                                         int(steer_layer), capture_layer, fused_pre)
        for t in range(T):
            if t > 0:
                slot = p2 + t - 1                      # where z_{t-1}'s key/value goes
                key_mask[:, slot] = 1
                write = np.zeros(cache_len, bool)
                write[slot] = True
                logits, stepped, *captured = dec.step(
                    Tensor(new_ids[:, t - 1:t]), Tensor((lengths + t - 1)[:, None]), Tensor(key_mask),
                    Tensor(write), ms.mutable(caches), steer_t, int(steer_layer), capture_layer, fused, block_set)
                caches = caches if fused else stepped  # the fused step writes the caches where they are
                step_states += captured
            step_logits = logits.asnumpy()
            z = pick_tokens(step_logits, seed, rows0 + t, inv_temp, top_p, greedy, nucleus_cuts, nucleus_path)
            if return_logits:
                all_logits[:, t] = step_logits
            live = ~finished
            new_ids[live, t] = z[live]
            hit = np.isin(z, stops)
            new_mask[live & ~hit, t] = 1
            finished |= live & hit
            if finished.all():
                break
    out = (new_ids, new_mask) + ((all_logits,) if return_logits else ())
    if not capture_layer:
        return out
    # [B, p + T, H] in the caller's layout: the prompt's real positions, then new token t-1 from step t
    pre = [x.asnumpy() for x in prompt_states]
    states = np.zeros((b, p + T, pre[0].shape[-1]), pre[0].dtype)
    if shared:
        for i in range(b):
            start = p - lengths[i]
            states[i, start:start + n] = pre[0][group[i]]
            states[i, start + n:p] = pre[1][i, c - rest[i]:]
    else:
        states[:, :p] = np.where(mask[:, p2 - p:, None] > 0, pre[0][:, p2 - p:], 0)
    for t, x in enumerate(step_states, start=1):
        states[:, p + t - 1] = x.asnumpy()[:, 0]
    return out + (states,)

