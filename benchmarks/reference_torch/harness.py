"""The reference's side of a ``benchmarks.cases.Case``: models built from the case's weights (the
generator straight from the GGUF file when the case names one), the same batch and noise, and the
generator / student step as losses + gradients (parity) or as full AdamW steps (benchmark)."""
import contextlib

import numpy as np
import torch

from .bert import BertConfig
from .llama import LlamaConfig
from .loading import bridge_table, build_bert, build_llama, hf_to_pair_layout, pair_layout_to_hf, read_gguf_llama
from .steps import LossWeights, generator_loss, student_loss, train_step

_GEN_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "rms_norm_eps", "rope_theta")
_BERT_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "num_labels", "pooling")


def _trainable(name, mode, top_k, n_layers):
    """Which generator parameters train: ms_dfkd's modes "all" and "top_k" (last k layers + final norm)."""
    if mode == "all":
        return True
    if mode == "top_k":
        return name == "model.norm.weight" or any(name.startswith(f"model.layers.{i}.")
                                                  for i in range(n_layers - top_k, n_layers))
    raise ValueError(f"reference harness: generator trainable mode {mode!r} not supported (all | top_k)")


@contextlib.contextmanager
def frozen_params(module):
    """The student is frozen during the generator step (it trains only in its own step)."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(module.parameters(), flags):
            p.requires_grad_(f)


class TorchSide:
    def __init__(self, case):
        from benchmarks.cases import bridge_matrix, noise
        self.case = case
        a = case.arrays
        self.teacher = build_bert(BertConfig(**{k: case.teacher_cfg[k] for k in _BERT_KEYS}), case.state("teacher"))
        self.student = build_bert(BertConfig(**{k: case.student_cfg[k] for k in _BERT_KEYS}), case.state("student"))
        self.gen_cfg = LlamaConfig(**{k: case.gen_cfg[k] for k in _GEN_KEYS})
        if case.gguf:
            _, state = read_gguf_llama(case.gguf)                    # already in pair layout
        else:
            state = hf_to_pair_layout(case.state("gen"), self.gen_cfg)
        self.frozen = build_llama(self.gen_cfg, state)
        delta = hf_to_pair_layout(case.gen_delta(), self.gen_cfg)
        self.gen = build_llama(self.gen_cfg, {k: v + delta[k] if k in delta else v for k, v in state.items()})
        del state
        self.frozen.requires_grad_(False)
        self.teacher.requires_grad_(False)
        for name, p in self.gen.named_parameters():
            p.requires_grad_(_trainable(name, case.gen_trainable, case.gen_top_k, self.gen_cfg.num_hidden_layers))
        self.proj = torch.nn.Linear(self.student.config.hidden_size, self.teacher.config.hidden_size)
        with torch.no_grad():
            self.proj.weight.copy_(torch.from_numpy(a["proj/weight"]))
            self.proj.bias.copy_(torch.from_numpy(a["proj/bias"]))

        bridge = bridge_matrix(case)
        cls_id, sep_id = (int(i) for i in a["specials"])
        with torch.no_grad():
            E_t, E_s = self.teacher.input_embeddings(), self.student.input_embeddings()
            self.tables = (bridge_table(bridge, E_t), bridge_table(bridge, E_s))
            self.specials = (E_t[cls_id].clone(), E_t[sep_id].clone(), E_s[cls_id].clone(), E_s[sep_id].clone())
        t = lambda k: torch.from_numpy(np.asarray(a[k]).astype(np.int64))
        self.batch = {k: t(f"batch/{k}") for k in ("prompt_ids", "prompt_mask", "gen_ids", "gen_mask", "labels")}
        self.batch["noise"] = torch.from_numpy(noise(case))
        self.sbatch = {k: t(f"sbatch/{k}") for k in ("teacher_ids", "teacher_mask", "student_ids", "student_mask")}
        self.weights = LossWeights(**case.weights)
        self._opt_g = self._opt_s = None

    def _gen_loss(self):
        with frozen_params(self.student):
            return generator_loss(self.gen, self.frozen, self.teacher, self.student, self.batch, self.tables,
                                  self.specials, self.weights, self.case.kd_temperature, self.case.tau)

    def _stu_loss(self):
        return student_loss(self.student, self.teacher, self.sbatch, self.case.kd_temperature, self.case.alpha,
                            self.proj)

    def generator_losses_and_grads(self):
        """({term: float}, teacher logits, {param name: grad in HF layout}); mirrors MSSide."""
        self.gen.zero_grad(set_to_none=True)
        out = self._gen_loss()
        out["total"].backward()
        terms = {k: out[k].item() for k in ("total", "spec", "div", "adv", "flu")}
        grads = {n: pair_layout_to_hf(n, p.grad.numpy(), self.gen_cfg)
                 for n, p in self.gen.named_parameters() if p.grad is not None}
        return terms, out["teacher_logits"].detach().numpy(), grads

    def student_losses_and_grads(self):
        self.student.zero_grad(set_to_none=True)
        self.proj.zero_grad(set_to_none=True)
        out = self._stu_loss()
        out["total"].backward()
        grads = {"student." + n: p.grad.numpy() for n, p in self.student.named_parameters() if p.grad is not None}
        grads.update({"proj." + n: p.grad.numpy() for n, p in self.proj.named_parameters()})
        return {"total": out["total"].item()}, grads

    # --- timing pieces (benchmark profile) -------------------------------------------------------
    def frozen_forward(self):
        a = self.batch
        with torch.no_grad():
            return self.frozen(torch.cat([a["prompt_ids"], a["gen_ids"]], 1),
                               torch.cat([a["prompt_mask"], a["gen_mask"]], 1))[0, 0, 0].item()

    def generator_forward(self):
        with torch.no_grad():
            return self._gen_loss()["total"].item()

    def generator_grad(self):
        self.gen.zero_grad(set_to_none=True)
        out = self._gen_loss()
        out["total"].backward()
        return out["total"].item()

    def sample(self, eos_id=-1):
        from .sampling import sample
        a = self.case.arrays
        ids, _ = sample(self.frozen, a["batch/prompt_ids"], a["batch/prompt_mask"], a["batch/gen_ids"].shape[1],
                        seed=self.case.seed, temperature=1.0, eos_id=eos_id, pad_id=self.case.gen_cfg["pad_token_id"])
        return ids

    def generator_step(self):
        if self._opt_g is None:
            self._opt_g = torch.optim.AdamW([p for p in self.gen.parameters() if p.requires_grad],
                                            lr=self.case.lr_g, weight_decay=0.0)
        return train_step(self._gen_loss, self._opt_g)["total"]

    def student_step(self):
        if self._opt_s is None:
            params = list(self.student.parameters()) + (list(self.proj.parameters()) if self.case.alpha > 0 else [])
            self._opt_s = torch.optim.AdamW(params, lr=self.case.lr_s, weight_decay=0.01)
        return train_step(self._stu_loss, self._opt_s)["total"]
