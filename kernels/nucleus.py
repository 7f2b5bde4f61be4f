"""The top-p nucleus of rows of token probabilities, for a language model's sampler.

    nuclei(probs, top_p, cuts=NUCLEUS_CUTS, path="cpu" | "numpy") -> [int64 column ids, ascending] per row

Path "numpy" is ``nucleus`` row by row, the reference; path "cpu" the C++ loops of kernels/cpu/nucleus.cc
(kernels.cpu_ops.nucleus_columns, called through ctypes on the host, whatever the device target), which
compute the same float32 sums in the same order and so give the same columns. On 8 rows of SmolLM2's
49152 tokens the numpy calls took about half of the ~4 ms a decode step spent picking its tokens.
"""
import numpy as np

NUCLEUS_CUTS = (1e-3, 1e-4, 1e-5)  # probability floors of the candidate sets, tried in turn


def nucleus(probs, top_p, cuts=NUCLEUS_CUTS):
    """Column ids of the top-p nucleus of one row of probabilities (float32 [V]).

    The smallest set of most probable tokens whose mass reaches top_p, every token tied with its least
    probable member included, the top token always. Looked for among the tokens of probability >= each
    cut in turn (at most 1/cut of them), then the whole row: a candidate set holds every token at least
    as probable as its least one, so its sorted masses are the first ones of the whole row's, and it
    suffices once the mass above its least probable token reaches top_p (the masses above only grow)."""
    for cut in tuple(cuts) + (None,):
        cand = np.arange(probs.shape[0]) if cut is None else np.flatnonzero(probs >= np.float32(cut))
        top = np.sort(probs[cand])[::-1]
        before = np.cumsum(top, dtype=np.float32) - top      # mass strictly above each token
        if cut is None or (len(top) and before[-1] >= top_p):
            threshold = top[before < top_p].min()            # before[0] = 0: the top token is kept
            return np.flatnonzero(probs >= threshold)


def nuclei(probs, top_p, cuts=NUCLEUS_CUTS, path="numpy"):
    """The nucleus of each row of probs (float32 [B, V]): a list of B int64 column arrays, ascending."""
    if path == "cpu":
        from kernels import cpu_ops
        return cpu_ops.nucleus_columns(probs, top_p, cuts)
    if path != "numpy":
        raise ValueError(f"nucleus path {path!r}: choose 'cpu' or 'numpy'")
    return [nucleus(row, np.float32(top_p), cuts) for row in probs]
