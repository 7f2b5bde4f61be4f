"""The DFKD-T3 training driver: rounds of k_G generator steps and k_S student steps.

The five methods of METHOD.md share this driver so that they compare like for like:
each round produces gen_steps_per_round x generator.batch_size samples (generated,
drawn or random), labelled by the teacher, appended to the replay buffer and to
generated.jsonl; then student.steps_per_round student steps draw from the buffer.
dfkd-t3 may first take run.gen_warmup_steps generator-only steps whose samples are dropped.

A run is resumable: checkpoint.safetensors (run_checkpoint.py, written atomically) holds
every trainable parameter, the optimizer states and the loop's state. Ctrl-C saves and exits.
"""
import json
import logging
import resource
import time
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import nn, ops
from tqdm import tqdm

from . import build
from . import interrupts
from . import losses
from . import metrics as M
from . import run_checkpoint
from .classify import EncoderRunner, evaluate, softmax_np
from .config import save_config
from .corpus import Corpus, CorpusSampler, balanced_labels
from .data import load_split
from .distributed import ranks_agree
from kernels.adamw import adam_weight_decay
from kernels.gumbel_noise import derive_seed
from .models.checkpoint_io import CheckpointError
from .replay import ReplayBuffer
from .run_checkpoint import CKPT_NAME
from .run_files import JsonlWriter, RunLock, remove_stale_temp_files, shard_name
from .steps import GeneratorLoss, StudentStep, loss_scaler_for, make_train_step, soft_sequence_layout
from .vocab_bridge import build_vocab_bridge

log = logging.getLogger("ms_dfkd")

NOISE_STREAM_SAMPLE = 1
NOISE_STREAM_WARMUP = 2  # warm-up samples draw their own noise: the rounds' samples stay as without warm-up
NOISE_STREAM_AHEAD = 3  # rows drawn ahead (generator.sample_batch_size) draw noise of their own
MAX_DRAWS_PER_BATCH = 50  # run.min_confidence: batches drawn for one kept batch before giving up


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class StopRequested(Exception):
    pass


class Distiller:
    """The loop for a sequence task; token_distill.TokenDistiller overrides the hooks marked "task:"."""
    generator_loss_cls = GeneratorLoss

    def __init__(self, cfg, rank=0, world_size=1, grad_reducer_factory=None):
        self.cfg, self.rank, self.world = cfg, rank, world_size
        self.is_main = rank == 0
        self.method = cfg.run.method
        self.K = len(cfg.task.label_names)
        self.jit = cfg.run.mode == "graph"
        self.out = Path(cfg.fmt(cfg.run.out_dir))
        self.reducer_factory = grad_reducer_factory
        self.stop_flag = False
        self._last_save = time.time()  # run.checkpoint_seconds count from here
        self._finishing = None  # the last save's background part (save_checkpoint)
        self.counters = {"round": 0, "gen_in_round": 0, "stu_in_round": 0, "gen_steps": 0, "stu_steps": 0,
                         "samples": 0, "warmup_steps": 0}
        self.history = []
        self.ahead, self.ahead_batch = None, None  # sample_without_gradient's batch being handed out
        # the current phase's (warm-up's or round's) step metrics, kept in the checkpoint so that an
        # interrupted round writes the same metrics.jsonl line as a straight one
        self.acc = _empty_acc()
        self._phase_t0 = time.time()
        self.label_vectors = None  # dfkd-t3 with generator.label_vectors: a Parameter [K, H]
        self._setup()

    # ------------------------------------------------------------------ setup
    def _setup(self):
        cfg = self.cfg
        import kernels
        if cfg.run.kernels != "auto":
            kernels.set_kernel_backend(cfg.run.kernels)
        self.t_tok = build.teacher_tokenizer(cfg)
        self.s_tok = build.student_tokenizer(cfg)
        self.teacher = build.load_teacher(cfg)
        self.student = build.build_student(cfg)
        self.teacher_run = EncoderRunner(self.teacher, self.t_tok, cfg.teacher.max_length, jit=self.jit)
        self.student_eval = self._student_runner()
        self.student_step = self._make_student_step()
        # what the checkpoint saves and the metrics report
        self.student_loss, self.opt_s = self.student_step.loss_cell, self.student_step.optimizer
        self.scaler_s = self.student_step.loss_scaler
        # data sources
        self.replay = ReplayBuffer(cfg.run.replay_size, derive_seed(cfg.run.seed, self.rank, 7))
        self.corpus_sampler = None
        if self.method in ("corpus", "prompted", "dfkd-t3"):
            corpus = Corpus(cfg.corpus.sources, cfg.corpus.min_words, cfg.corpus.max_words)
            self.corpus_sampler = CorpusSampler(corpus, cfg.run.seed, self.rank, self.world)
        # two_phase: the generator phase reads passages of its own, so that the data phase of dfkd-t3 rewrites
        # the same passages as prompted's (interleaved runs keep one stream, as before)
        self.warmup_sampler = None
        if self.method == "dfkd-t3" and cfg.run.schedule == "two_phase":
            self.warmup_sampler = CorpusSampler(corpus, derive_seed(cfg.run.seed, 0, 13), self.rank, self.world)
        self.real_examples = self._load_rows("train") if self.method == "real" else None
        self.data_rng = np.random.default_rng(derive_seed(cfg.run.seed, self.rank, 11))
        self.generator = None
        if self.method in ("prompted", "dfkd-t3"):
            self._setup_generator()
        self.texts_out = JsonlWriter(self.out / shard_name(self.rank, self.world))
        self.metrics_out = JsonlWriter(self.out / "metrics.jsonl") if self.is_main else None

    def _setup_generator(self):
        cfg, g = self.cfg, self.cfg.generator
        self.g_tok = build.generator_tokenizer(cfg)
        self.generator, self.g_cfg = build.build_generator(cfg)
        from .models.llama import set_trainable
        from .models.llama_sampling import captures_states, sample
        self._sample = sample
        self.reuse_trunk = False
        self._frozen_prefixes = {}  # the frozen generator's shared prompt starts, kept across sampling calls
        self._trunk_prefixes = {}  # the trained generator's: what its frozen layers below the top ones made
        self.stop_ids = self._stop_ids()
        self.P, self.T = g.prompt_max_length, g.max_new_tokens
        if self.method != "dfkd-t3":
            set_trainable(self.generator, "none")
            self.generator.set_train(False)
            self.frozen = self.generator  # prompted: the generator never trains, it is G_theta0
            return
        set_trainable(self.generator, g.trainable, g.top_k_layers)
        self.frozen, _ = build.build_generator(cfg)  # G_theta0: the same pretrained (or same-seed) weights
        set_trainable(self.frozen, "none")
        self.frozen.set_train(False)
        self.bridge = build_vocab_bridge(self.g_tok, self.t_tok)
        log.info(self.bridge.summary())
        self.refresh_tables(teacher=True)
        # with the top k layers training, the layers below are the frozen model's: run them once a step
        self.trunk_layers = (g.top_k_layers if g.trainable == "top_k" and hasattr(self.generator, "trunk_states")
                             else 0)
        # ... and those states come from the sampler, which has just run the same layers over the same ids
        self.reuse_trunk = bool(self.trunk_layers) and captures_states(self.generator)
        # ... and so do the LM head's logits of the sample, which the generator step then takes as they are
        self.gen_loss = self.generator_loss_cls(self.generator, self.teacher, self.student, self.P, self.T, self.K,
                                      cfg.loss, cfg.loss.kd_temperature, g.gumbel_tau, self.trunk_layers,
                                      label_vectors=g.label_vectors, sampled_logits=self.reuse_trunk)
        self.label_vectors = self.gen_loss.label_vectors
        # the label vectors enter the first layer that trains: the sampler adds them there too
        self.steer_layer = self.g_cfg.num_hidden_layers - self.trunk_layers if self.trunk_layers else 0
        groups = self.generator.trainable_params()
        if self.label_vectors is not None:  # a group of their own, at their own learning rate
            groups = [{"params": groups}, {"params": [self.label_vectors], "lr": g.label_vector_lr}]
        self.opt_g = adam_weight_decay(groups, learning_rate=g.lr, weight_decay=0.0)
        red = self.reducer_factory(self.opt_g.parameters) if self.reducer_factory else None
        self.scaler_g = loss_scaler_for(self.teacher, self.student, self.generator)
        self.gen_step = make_train_step(self.gen_loss, self.opt_g, jit=self.jit, grad_reducer=red,
                                        loss_scaler=self.scaler_g)
        self._make_frozen_fwd()

    def _make_frozen_fwd(self):
        """No-grad G_θ0 on [prompt; sample] ids [B, P+T]: (the generator step's first input, G_θ0's logits
        at the sample's positions [B, T, V]). That input is the ids themselves, or with trunk layers the
        states entering the top k layers, which the trained generator shares with G_θ0."""
        P, T, frozen, k = self.P, self.T, self.frozen, self.trunk_layers

        def frozen_fwd(ids, mask):
            if k:
                gen_input = ops.stop_gradient(frozen.trunk_states(ids, mask, k))
                hidden = frozen.top_hidden_states(gen_input, mask, k, rows=(P - 1, T))
            else:
                gen_input = ids
                hidden = frozen.hidden_states(input_ids=ids, attention_mask=mask)[:, P - 1:P - 1 + T, :]
            return gen_input, ops.stop_gradient(frozen.logits_from_hidden(hidden))

        def frozen_top(trunk, mask):  # the same from the trunk states the sampler handed out
            hidden = frozen.top_hidden_states(trunk, mask, k, rows=(P - 1, T))
            return ops.stop_gradient(frozen.logits_from_hidden(hidden))

        self.frozen_fwd = ms.jit(frozen_fwd) if self.jit else frozen_fwd
        self.frozen_top = (ms.jit(frozen_top) if self.jit else frozen_top) if k else None
        # perplexity_g0 from G_θ0's logits where they are: numpy's log-softmax of the [B, T, V] copy took 45 ms
        self.token_nll = ms.jit(losses.token_nll) if self.jit else losses.token_nll

    def _frozen_outputs(self, s, full_ids, full_mask):
        """frozen_fwd's (generator step input, G_θ0's logits) for a batch and its _full_sequence; from the
        sampler's trunk states when it kept them (generate_batch(trunk=True)), without running the lower
        layers again."""
        if "trunk" not in s:
            return self.frozen_fwd(full_ids, full_mask)
        gen_input = ms.Tensor(s["trunk"])
        return gen_input, self.frozen_top(gen_input, full_mask)

    def _perplexity_g0(self, frozen_logits, s):
        """The perplexity under G_θ0 of a batch's sampled tokens, from G_θ0's logits (a Tensor [B, T, V])."""
        return _perplexity_of(self.token_nll(frozen_logits, ms.Tensor(s["ids"])).asnumpy(), s["mask"])

    def refresh_tables(self, teacher=False):
        """E_hat = B @ E for the student (it trains) and, once, the teacher."""
        def tab(model):  # from_numpy shares the fresh array (ms.Tensor copied its 75 MB: 62 ms a refresh)
            return ms.Tensor.from_numpy(self.bridge.table(model.get_input_embeddings().asnumpy()))

        def special(model, tok):
            E = model.get_input_embeddings().asnumpy()
            return ms.Tensor(E[tok.bos_id]), ms.Tensor(E[tok.eos_id])
        if teacher:
            self.table_t = tab(self.teacher)
            self.cls_t, self.sep_t = special(self.teacher, self.t_tok)
        self.table_s = tab(self.student)
        self.cls_s, self.sep_s = special(self.student, self.s_tok)

    def _stop_ids(self):
        tok = self.g_tok
        ids = {tok.eos_id}
        for name in ("<|im_end|>", "<|endoftext|>"):
            i = tok.token_to_id(name)
            if i is not None:
                ids.add(i)
        if self.cfg.generator.stop_at_newline:
            for i in range(tok.vocab_size):
                if "\n" in tok.backend.decode([i], skip_special_tokens=False):
                    ids.add(i)
        return tuple(sorted(ids))

    # ------------------------------------------------------------------ prompts and sampling
    def _prompt_ids(self, passages, labels):
        """Left-padded [B, P] prompt ids: template(label, passage), chat-wrapped; the passage is cut to fit."""
        cfg, tok, P = self.cfg, self.g_tok, self.P
        words = cfg.task.label_words or cfg.task.label_names
        rows = []
        for text, y in zip(passages, labels):
            body = cfg.task.prompt_template.replace("{label}", words[y])
            if cfg.generator.chat_template:
                body = tok.chat_prompt(body)  # the generator's own format (SmolLM2's, Qwen2.5's ChatML)
            pre, _, post = body.partition("{text}")
            a = tok.encode(pre, add_special_tokens=False)
            c = tok.encode(post, add_special_tokens=False)
            budget = P - len(a) - len(c)
            if budget < 8:
                raise ValueError(f"generator.prompt_max_length={P} leaves {budget} tokens for the passage; "
                                 f"raise it (the template alone takes {len(a) + len(c)} tokens)")
            rows.append(a + tok.encode(" " + text if pre and not pre.endswith((" ", "\n")) else text,
                                       add_special_tokens=False)[:budget] + c)
        ids = np.full((len(rows), P), tok.pad_id, np.int32)
        mask = np.zeros((len(rows), P), np.int32)
        for i, r in enumerate(rows):
            ids[i, P - len(r):] = r
            mask[i, P - len(r):] = 1
        return ids, mask

    def generate_batch(self, n_step_id, stream=NOISE_STREAM_SAMPLE, return_logits=False, frozen=False,
                       sampler=None, rows=None, trunk=False):
        """One batch of generator.batch_size (or ``rows``) samples, labels balanced, from the next corpus passages.

        frozen=True samples from G_θ0 (the pretrained generator, no label vectors) instead of the
        trained one; sampler: the passage stream (default: the run's). The noise is a pure function of (run.seed, rank, n_step_id, stream). Returns a dict: passages,
        labels, p_ids / p_mask (the prompts), seed, ids / mask (the sampled tokens) and texts, and with
        return_logits the generator's logits [B, T, V] each token was drawn from, with trunk (when
        self.reuse_trunk) the states entering the generator's top layers over [prompt; sample] [B, P+T, H]."""
        g = self.cfg.generator
        n = rows or g.batch_size
        passages = (sampler or self.corpus_sampler).next_batch(n)
        labels = np.asarray(balanced_labels(n, self.K, n_step_id), np.int32)
        p_ids, p_mask = self._prompt_ids(passages, labels)
        seed = derive_seed(self.cfg.run.seed, self.rank, n_step_id, stream)
        model = self.frozen if frozen else self.generator
        steer = {}
        if self.label_vectors is not None and not frozen:
            steer = dict(steer=self.label_vectors.asnumpy()[labels], steer_layer=self.steer_layer)
        capture = self.steer_layer if trunk and self.reuse_trunk else 0
        kept = {}  # the shared prompt starts' frozen part, kept across calls (sample's prefix_cache)
        if model is self.frozen:
            kept = dict(prefix_cache=self._frozen_prefixes)
        elif self.reuse_trunk:  # only the top layers train: the layers below keep theirs
            kept = dict(prefix_cache=self._trunk_prefixes, prefix_cache_layers=self.steer_layer)
        new_ids, new_mask, *extra = self._sample(model, p_ids, p_mask, self.T, seed,
                                                 temperature=g.sample_temperature, top_p=g.top_p,
                                                 eos_id=self.g_tok.eos_id, stop_ids=self.stop_ids,
                                                 graph=self.jit, return_logits=return_logits,
                                                 share_prefix=g.share_prompt_prefix, capture_layer=capture,
                                                 fused_decode=g.fused_decode, fused_prefill=g.fused_prefill,
                                                 gguf_blocks=g.decode_from_gguf_blocks,
                                                 **kept, **steer)
        new_ids, new_mask = np.asarray(new_ids, np.int32), np.asarray(new_mask, np.int32)
        texts = [self.g_tok.decode(r[m == 1]).strip() for r, m in zip(new_ids, new_mask)]
        out = dict(passages=passages, labels=labels, p_ids=p_ids, p_mask=p_mask, seed=seed,
                   ids=new_ids, mask=new_mask, texts=texts)
        if return_logits:
            out["logits"] = extra[0]
        if capture:
            out["trunk"] = extra[-1]
        return out

    def sample_without_gradient(self, step_id, return_logits=False, trunk=False):
        """generate_batch(step_id) for a batch no gradient goes through. With generator.sample_batch_size
        = m x batch_size, one call samples m batches' rows at once (batch j = step_id // m: the passages
        of m batches, their labels, noise of its own) and the m steps take their slices of it in turn.
        Only the batch being handed out is kept: ``ahead`` (its index and the passage cursor before it)
        goes into the checkpoint, and a run resumed halfway through it samples it again."""
        g = self.cfg.generator
        m = (g.sample_batch_size or g.batch_size) // g.batch_size
        if m == 1:
            return self.generate_batch(step_id, return_logits=return_logits, trunk=trunk)
        j, r = divmod(step_id, m)
        if self.ahead is None or self.ahead["j"] != j or self.ahead_batch is None:
            if self.ahead is not None and self.ahead["j"] == j:  # resumed halfway: the same batch again
                self.corpus_sampler.load_state_dict(self.ahead["cursor"])
            self.ahead = {"j": j, "cursor": self.corpus_sampler.state_dict()}
            # a method asks the same each time; logits only when it reads them (B x T x V floats)
            self.ahead_batch = self.generate_batch(j, stream=NOISE_STREAM_AHEAD, return_logits=return_logits,
                                                   rows=m * g.batch_size, trunk=trunk)
        rows = slice(r * g.batch_size, (r + 1) * g.batch_size)
        return {k: v if k == "seed" else v[rows] for k, v in self.ahead_batch.items()}

    # ------------------------------------------------------------------ one unit of data per method
    def _produce(self):
        """One batch of samples for the replay buffer; returns (records, the step metrics of every batch
        drawn, the teacher's logits and features on the records). With run.min_confidence, batches are
        drawn until generator.batch_size samples pass (each draw is a step: a generator update for
        interleaved dfkd-t3), and each draw's metrics carry its acceptance rate."""
        producer = {"random": self._random_texts, "corpus": self._corpus_texts, "real": self._real_texts,
                    "prompted": self._prompted_texts, "dfkd-t3": self._dfkd_t3_texts}[self.method]
        B, threshold = self.cfg.generator.batch_size, self.cfg.run.min_confidence
        recs, infos, keep_logits, keep_feats = [], [], [], []
        while len(recs) < B:
            step_id = self.counters["gen_steps"]
            texts, labels, info = producer(B, step_id)
            logits, feats = self.teacher_run.logits(texts, with_features=True)
            probs = softmax_np(logits)
            if self.method in ("prompted", "dfkd-t3"):
                self._label_stats(probs, labels, info)
            keep = np.ones(len(texts), bool)
            if threshold:
                keep = probs[np.arange(len(texts)), labels] >= threshold
                info["acceptance"] = float(keep.mean())
            recs += [{"text": t, "target": int(y), **self._teacher_fields(t, p),
                      "round": self.counters["round"], "step": step_id, "rank": self.rank}
                     for t, y, p, k in zip(texts, labels, probs, keep) if k]
            keep_logits.append(logits[keep])
            keep_feats.append(feats[keep])
            infos.append(info)
            self.counters["gen_steps"] += 1
            if threshold and len(infos) >= MAX_DRAWS_PER_BATCH and len(recs) < B:
                raise RuntimeError(f"run.min_confidence {threshold}: {len(recs)} of {len(infos) * B} samples "
                                   f"passed in {len(infos)} batches; lower it")
        self.counters["samples"] += B
        return recs[:B], infos, (np.concatenate(keep_logits)[:B], np.concatenate(keep_feats)[:B])

    # Each producer: (n, step id) -> (texts, target labels (-1: none), step metrics).
    def _random_texts(self, n, step_id):
        V = self.t_tok.vocab_size
        lo = 999 if V > 2000 else 5  # skip [PAD]/[unusedN]/[CLS]/[SEP]/[MASK] of the uncased vocab
        texts = []
        for _ in range(n):
            L = int(self.data_rng.integers(5, self.cfg.generator.max_new_tokens + 1))
            texts.append(self.t_tok.decode(self.data_rng.integers(lo, V, size=L)))
        return texts, np.full(n, -1), {}

    def _corpus_texts(self, n, step_id):
        return self.corpus_sampler.next_batch(n), np.full(n, -1), {}

    def _real_texts(self, n, step_id):
        idx = self.data_rng.integers(0, len(self.real_examples), size=n)
        return ([self.real_examples[i][0] for i in idx], np.array([self.real_examples[i][1] for i in idx]), {})

    def _prompted_texts(self, n, step_id):
        # the prompted generator is G_θ0 itself: the logits its tokens were drawn from give their
        # perplexity under G_θ0, with no second forward
        s = self.sample_without_gradient(step_id, return_logits=True)
        return s["texts"], s["labels"], {"perplexity_g0": _perplexity(s["logits"], s["ids"], s["mask"])}

    def _dfkd_t3_texts(self, n, step_id):
        if self.cfg.run.schedule == "two_phase":  # the data phase: the trained generator, no update
            s = self.sample_without_gradient(step_id, trunk=True)
            _, frozen = self._frozen_outputs(s, *self._full_sequence(s))
            return s["texts"], s["labels"], {"perplexity_g0": self._perplexity_g0(frozen, s),
                                             "gen_tokens": int(s["mask"].sum())}
        s = self.generate_batch(step_id, trunk=True, return_logits=self.reuse_trunk)
        return s["texts"], s["labels"], self._generator_update(s)

    def _label_stats(self, probs, labels, info):
        """Adds to info the specificity rate of the teacher's probabilities on generated texts and, after
        a generator update (whose info carries the soft embedding's argmax), the bridge agreement."""
        info["specificity"] = M.specificity_rate(probs.argmax(-1), labels)
        labels = np.asarray(labels)
        for y, name in enumerate(self.cfg.task.label_names):  # per label: a generator may learn one class only
            if (labels == y).any():
                info[f"specificity_{name}"] = M.specificity_rate(probs[labels == y].argmax(-1), labels[labels == y])
                info[f"target_prob_{name}"] = float(probs[labels == y, y].mean())
        if "soft_argmax" in info:
            info["bridge_agreement"] = float(np.mean(info.pop("soft_argmax") == probs.argmax(-1)))

    @staticmethod
    def _full_sequence(s):
        """[prompt; sample] ids and mask of a batch, as tensors."""
        return (ms.Tensor(np.concatenate([s["p_ids"], s["ids"]], 1)),
                ms.Tensor(np.concatenate([s["p_mask"], s["mask"]], 1)))

    def _generator_update(self, s, what=None):
        B_, T = s["ids"].shape
        full_ids, full_mask = self._full_sequence(s)
        gen_input, frozen = self._frozen_outputs(s, full_ids, full_mask)
        perplexity = self._perplexity_g0(frozen, s)
        cls_sel, tok_sel, sep_sel, enc_mask = soft_sequence_layout(s["mask"])
        t0 = time.time()
        out = self.gen_step(gen_input, full_mask, ms.Tensor(s["ids"]), ms.Tensor(s["mask"]),
                            frozen.reshape(B_ * T, -1), ms.Tensor(s["labels"]),
                            ms.Tensor(np.int64(s["seed"])), self.table_t, self.table_s, self.cls_t, self.sep_t,
                            self.cls_s, self.sep_s, ms.Tensor(cls_sel), ms.Tensor(tok_sel), ms.Tensor(sep_sel),
                            ms.Tensor(enc_mask), *self._sampled_logits(s))
        loss, spec, div, adv, flu, t_logits, rwl = [o.asnumpy() for o in out]
        for name, v in (("loss_g", loss), ("spec", spec), ("div", div), ("adv", adv), ("flu", flu), ("rwl", rwl)):
            if not np.isfinite(v):
                raise FloatingPointError(f"{what or 'generator step %d' % self.counters['gen_steps']}: {name} = {v}")
        rwl = {"loss_rwl": float(rwl)} if self.cfg.loss.rwl else {}
        return {"loss_g": float(loss), "loss_spec": float(spec), "loss_div": float(div), "loss_adv": float(adv),
                "loss_flu": float(flu), **rwl, "gen_step_s": time.time() - t0,
                "perplexity_g0": perplexity,
                "soft_argmax": t_logits.argmax(-1), "gen_tokens": int(s["mask"].sum())}

    def _sampled_logits(self, s):
        """The generator step's last argument, where it takes the sampler's logits (the trunk's case)."""
        if not self.reuse_trunk:
            return ()
        if "logits" not in s:
            raise RuntimeError("the generator step takes the sampler's logits: sample with return_logits=True")
        return (ms.Tensor.from_numpy(np.ascontiguousarray(s["logits"], np.float32)),)

    def _student_update(self):
        # the teacher's outputs from when these samples were labelled: a student step runs no teacher
        batch, t_logits, t_feat = self.replay.sample(self.cfg.student.batch_size)
        loss = self.student_step([r["text"] for r in batch], t_logits, t_feat,
                                 what=f"student step {self.counters['stu_steps']}")
        self.counters["stu_steps"] += 1
        return loss

    # ------------------------------------------------------------------ the loop
    def run(self, resume=True):
        """The whole run: warm-up, then rounds. Returns the per-round metrics, or None when Ctrl-C stopped
        it (after saving). Rank 0 holds the run folder's lock throughout: a second process on the same
        folder gets RunFolderBusy before it reads or writes anything there."""
        if not self.is_main:
            return self._run(resume)
        with RunLock(self.out):
            remove_stale_temp_files(self.out)
            try:
                return self._run(resume)
            finally:  # the folder is this process's until its last checkpoint is in place
                self.wait_for_checkpoint()

    def _run(self, resume):
        cfg = self.cfg
        if resume and (self.out / CKPT_NAME).exists():
            self._check_resume_config()
            self.load_checkpoint()
            log.info(f"resumed from {self.out / CKPT_NAME} at round {self.counters['round']}")
        else:
            if cfg.run.generator_from:  # before the folder is made: a source that does not fit leaves nothing behind
                steps = run_checkpoint.load_generator_from(self, cfg.run.generator_from)
                log.info(f"generator from {cfg.run.generator_from} ({steps} generator-phase steps)")
            if self.is_main:
                self.out.mkdir(parents=True, exist_ok=True)
                save_config(cfg, self.out / "config.yaml")
        if self.world > 1 and not ranks_agree([self.counters["round"], self.counters["gen_steps"]]):
            # e.g. run.out_dir on a disk that only some nodes see: ranks would start from different weights
            raise CheckpointError(f"rank {self.rank}: the ranks did not all resume from the same checkpoint in "
                                  f"{self.out} (this rank is at round {self.counters['round']}); put run.out_dir "
                                  f"on a filesystem every node sees")
        kG, kS, kW = cfg.run.gen_steps_per_round, cfg.run.student_steps_per_round, cfg.run.gen_warmup_steps
        c = self.counters
        c.setdefault("warmup_steps", kW)  # a checkpoint from before warm-up existed is past it
        total = kW + cfg.run.rounds * (kG + kS)
        done = c["warmup_steps"] + c["round"] * (kG + kS) + c["gen_in_round"] + c["stu_in_round"]
        bar = tqdm(total=total, initial=done, desc=f"{self.method}", unit="step", disable=not self.is_main)
        with interrupts.on_sigint(self._on_sigint):
            try:
                self._warmup(bar, kW)
                self._rounds(bar, kG, kS)
            except StopRequested:
                bar.close()
                self.save_checkpoint()
                log.warning(f"interrupted: checkpoint saved to {self.out / CKPT_NAME}; rerun the same command to resume")
                return None
            finally:
                bar.close()  # before any error is printed: the bar's last line ends with its own newline
        return self.history

    def _warmup(self, bar, kW):
        """dfkd-t3 only: kW generator steps before the first round. Their samples train the generator
        and nothing else (not the replay buffer, not generated.jsonl), so the student still sees as
        many samples as every other method while the generator has trained longer."""
        c = self.counters
        if c["warmup_steps"] >= kW:
            return
        self._phase_t0 = time.time()
        while c["warmup_steps"] < kW:
            self._check_stop()
            w = c["warmup_steps"]
            s = self.generate_batch(w, stream=NOISE_STREAM_WARMUP, sampler=self.warmup_sampler, trunk=True,
                                    return_logits=self.reuse_trunk)
            info = self._generator_update(s, what=f"warm-up step {w}")
            self._label_stats(self.teacher_run.probs(s["texts"]), s["labels"], info)
            info["degenerate"] = M.degenerate_share(s["texts"])
            info["batch_distinct_2"] = M.distinct_n(s["texts"], 2)  # the texts are not kept: per batch
            self.acc["tokens"] += info.pop("gen_tokens", 0)
            _accumulate(self.acc["info"], info)
            c["warmup_steps"] += 1
            bar.update(1)
            bar.set_postfix(_postfix(info))
            every = self.cfg.run.gen_phase_log_every
            if every and c["warmup_steps"] % every == 0 and c["warmup_steps"] < kW:
                self._warmup_record()  # the generator-learning curve of a long phase
            if (c["warmup_steps"] % max(self.cfg.run.gen_steps_per_round, 1) == 0 and c["warmup_steps"] < kW
                    and self._save_due()):
                self.save_checkpoint()  # resumable within a long warm-up
        self._warmup_record()
        self.save_checkpoint()

    def _warmup_record(self):
        """A metrics line of the warm-up steps since the last one (the whole warm-up without
        run.gen_phase_log_every). phase=warmup: readers of metrics.jsonl that aggregate rounds skip it."""
        info_sum, toks, seconds = self._close_phase()
        rec = {k: float(np.mean(v)) for k, v in info_sum.items()}
        rec.update(phase="warmup", warmup_steps=self.counters["warmup_steps"],
                   steps_in_record=len(info_sum.get("loss_g", [])), warmup_s=seconds,
                   gen_tokens_per_s=toks / max(seconds, 1e-9), peak_rss_mb=peak_rss_mb())
        if self.is_main:
            self.metrics_out.write([rec])

    def _rounds(self, bar, kG, kS):
        cfg = self.cfg
        while self.counters["round"] < cfg.run.rounds:
            self._phase_t0 = time.time()
            acc = self.acc
            while self.counters["gen_in_round"] < kG:
                self._check_stop()
                recs, infos, (t_logits, t_feats) = self._produce()
                for info in infos:
                    acc["tokens"] += info.pop("gen_tokens", 0)
                    _accumulate(acc["info"], info)
                self.replay.add([self._replay_fields(r) for r in recs], t_logits, t_feats)
                self.texts_out.write(recs)
                self.counters["gen_in_round"] += 1
                bar.update(1)
                bar.set_postfix(_postfix(info))
            while self.counters["stu_in_round"] < kS:
                self._check_stop()
                loss = self._student_update()
                _accumulate(acc["info"], {"loss_s": loss})
                self.counters["stu_in_round"] += 1
                bar.update(1)
                bar.set_postfix(loss_s=f"{loss:.3f}")
            if self.method == "dfkd-t3" and kS and cfg.run.schedule == "interleaved":
                self.refresh_tables()  # the next generator steps' adversarial term reads the student's table
            self._end_round(*self._close_phase())

    def _on_sigint(self, signum, frame):
        if self.stop_flag:  # second Ctrl-C: stop now, without saving
            if interrupts.installed():  # called on the watcher thread: exit from there
                interrupts.abort()
            raise KeyboardInterrupt
        self.stop_flag = True
        log.warning("Ctrl-C: finishing the current step, then saving a checkpoint (Ctrl-C again to abort)")

    def _check_stop(self):
        if self.stop_flag:
            raise StopRequested

    def _end_round(self, round_info, toks, seconds):
        cfg, c = self.cfg, self.counters
        rec = {k: float(np.mean(v)) for k, v in round_info.items()}
        rec.update(round=c["round"], gen_steps=c["gen_steps"], stu_steps=c["stu_steps"], samples=c["samples"],
                   round_s=seconds, peak_rss_mb=peak_rss_mb(), world_size=self.world)  # samples: per rank
        if toks:
            rec["gen_tokens_per_s"] = toks / max(seconds, 1e-9)
        for name in ("scaler_g", "scaler_s"):
            if getattr(self, name, None) is not None:
                rec["loss_scale_" + name[-1]] = float(getattr(self, name).scale_value.asnumpy())
        recent = [r for r in self.replay.records if r["round"] == c["round"]]
        if recent:
            texts = [r["text"] for r in recent]
            rec["distinct_1"] = M.distinct_n(texts, 1)
            rec["distinct_2"] = M.distinct_n(texts, 2)
            rec["self_bleu"] = M.self_bleu(texts, max_samples=64)
            t_arg = np.array([self._predicted_label(r) for r in recent])
            bal = M.label_balance(t_arg, self.K)
            rec["label_balance"] = bal if not isinstance(bal, dict) else bal.get("entropy_ratio", bal)
        last = c["round"] + 1 == cfg.run.rounds
        if self.is_main and ((cfg.run.eval_every and (c["round"] + 1) % cfg.run.eval_every == 0) or last):
            dev = self._eval_set("dev")
            if dev:
                rec["student_dev_" + cfg.task.metric] = self._score("student", dev)[cfg.task.metric]
        c["round"] += 1
        c["gen_in_round"] = c["stu_in_round"] = 0
        self.history.append(rec)
        if self.is_main:
            self.metrics_out.write([rec])
        if (cfg.run.checkpoint_every and c["round"] % cfg.run.checkpoint_every == 0 and self._save_due()) or last:
            self.save_checkpoint()

    # ------------------------------------------------------------------ task: the sequence task's hooks
    def _student_runner(self):
        return EncoderRunner(self.student, self.s_tok, self.cfg.student.max_length, jit=self.jit)

    def _make_student_step(self):
        cfg = self.cfg
        return StudentStep(self.student, self.s_tok, cfg.student.max_length, cfg.student.batch_size, cfg.student.lr,
                           cfg.loss.kd_temperature, cfg.student.hidden_mse, teacher=self.teacher, jit=self.jit,
                           grad_reducer_factory=self.reducer_factory)

    def _load_rows(self, which):
        return load_split(self.cfg, which)

    def _teacher_fields(self, text, probs):
        """What a generated.jsonl record holds of the teacher's output on its text."""
        return {"teacher_probs": [round(float(x), 6) for x in probs]}

    def _replay_fields(self, rec):
        """What of a record the replay buffer keeps (it is saved in every checkpoint's header)."""
        return rec

    def _predicted_label(self, rec):
        """The label a record's teacher output says (the label balance counts them)."""
        return int(np.argmax(rec["teacher_probs"]))

    def _score(self, who, rows, progress=None):
        """{task.metric: value, 'n': count} of the teacher or the student on rows."""
        runner = self.teacher_run if who == "teacher" else self.student_eval
        return evaluate(runner, rows, self.cfg.task.metric, progress=progress)

    def _eval_set(self, which):
        try:
            rows = self._load_rows(which)
        except (FileNotFoundError, ValueError) as e:
            log.warning(f"no {which} evaluation: {e}")
            return None
        n = self.cfg.run.eval_examples if which == "dev" else 0  # the test set is always whole
        return rows[:n] if n else rows

    def _close_phase(self):
        """(step metrics, generated tokens, seconds) of the phase that ends, over every resume; resets them."""
        acc = self.acc
        seconds = acc["seconds"] + time.time() - self._phase_t0
        self.acc, self._phase_t0 = _empty_acc(), time.time()
        return acc["info"], acc["tokens"], seconds

    # ------------------------------------------------------------------ checkpoints (run_checkpoint.py)
    def save_checkpoint(self):
        """Write the run's checkpoint; its flush to disk and rename finish in the background (wait_for_checkpoint)."""
        self.wait_for_checkpoint()
        now = time.time()  # the phase's seconds so far go into the checkpoint with its metrics
        self.acc["seconds"] += now - self._phase_t0
        self._phase_t0 = now
        self._finishing = run_checkpoint.save(self)
        self._last_save = time.time()

    def wait_for_checkpoint(self):
        """Until the last save's flush and rename are done; CheckpointWriteError if they failed."""
        finishing, self._finishing = self._finishing, None
        if finishing is not None:
            finishing()

    def _save_due(self):
        """run.checkpoint_seconds have passed since the last save (or the start): a save of the 292 MB
        checkpoint took 6-7% of a default round when every round wrote one."""
        return time.time() - self._last_save >= self.cfg.run.checkpoint_seconds

    def _check_resume_config(self):
        """Refuse to resume with other settings than the run folder's config.yaml, except those that only
        extend the run or change its evaluation; those are recorded (config.yaml is rewritten)."""
        changes = run_checkpoint.compare_resume_config(self.cfg, self.out)
        if changes and self.is_main:
            save_config(self.cfg, self.out / "config.yaml")
            JsonlWriter(self.out / "config_changes.jsonl").write(
                [{"time": time.strftime("%Y-%m-%d %H:%M:%S"), "changed": changes}])
            log.warning("resuming with changed settings (recorded in config_changes.jsonl): "
                        + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items()))

    def load_checkpoint(self):
        run_checkpoint.load(self)

    # ------------------------------------------------------------------ end of run
    def final_report(self):
        """Teacher and student test metric, and a few generated texts per label."""
        cfg = self.cfg
        out = {}
        test = self._eval_set("test")
        if test:
            if cfg.run.teacher_test:
                out["teacher_test"] = self._score("teacher", test, progress="eval teacher")
            out["student_test"] = self._score("student", test, progress="eval student")
        samples = {}
        for y, name in enumerate(cfg.task.label_names):
            recs = [r for r in self.replay.records if r["target"] == y][-cfg.run.show_samples:]
            samples[name] = [r["text"] for r in recs]
        out["samples"] = samples
        if self.is_main:
            (self.out / "final.json").write_text(json.dumps(out, indent=2))
        return out


def distill_from_texts(cfg, records, steps):
    """A new student trained by ``steps`` student steps on saved generated texts; returns it.

    The targets are the teacher probabilities stored with each text (as log-probabilities: the KD loss
    only needs them up to a constant per row). Batches are drawn with replacement, seeded by run.seed."""
    student = build.build_student(cfg)
    step = StudentStep(student, build.student_tokenizer(cfg), cfg.student.max_length, cfg.student.batch_size,
                       cfg.student.lr, cfg.loss.kd_temperature, jit=cfg.run.mode == "graph")
    texts = [r["text"] for r in records]
    t_logits = np.log(np.clip(np.array([r["teacher_probs"] for r in records], np.float32), 1e-8, 1.0))
    rng = np.random.default_rng(cfg.run.seed)
    bar = tqdm(range(steps), desc="distill-from-texts", unit="step")
    for i in bar:
        idx = rng.integers(0, len(records), size=cfg.student.batch_size)
        loss = step([texts[j] for j in idx], t_logits[idx], np.zeros((len(idx), 1), np.float32),
                    what=f"distill-from-texts step {i}")
        bar.set_postfix(loss=f"{loss:.3f}")
    return student


def _perplexity(logits, ids, mask):
    """exp(mean NLL) of ids under logits [B, T, V] (numpy) over mask. NLL = logsumexp - the id's logit, with the
    exponentials in float32 and their sums in float64: a float64 log-softmax of the whole [8, 24, 49152]
    took a quarter of a second a batch, about 5% of a dfkd-t3 round."""
    b, t = ids.shape
    lo = np.asarray(logits, np.float32).reshape(b, t, -1)
    top = lo.max(-1, keepdims=True)
    lse = top[..., 0].astype(np.float64) + np.log(np.exp(lo - top).sum(-1, dtype=np.float64))
    return _perplexity_of(lse - np.take_along_axis(lo, ids[..., None].astype(np.int64), -1)[..., 0], mask)


def _perplexity_of(nll, mask):
    """exp(mean of the per-token NLL [B, T] over mask), 1.0 with nothing to score."""
    m = np.asarray(mask, np.float64)
    return float(np.exp((np.asarray(nll, np.float64) * m).sum() / max(m.sum(), 1.0)))


def _empty_acc():
    return {"info": {}, "tokens": 0, "seconds": 0.0}


def _accumulate(acc, info):
    for k, v in info.items():
        if k.startswith("_") or isinstance(v, np.ndarray):
            continue
        acc.setdefault(k, []).append(float(v))  # python floats: the checkpoint keeps them as JSON


def _postfix(info):
    keys = ("loss_g", "spec", "specificity", "loss_flu")
    return {k: f"{info[k]:.3f}" for k in keys if k in info and isinstance(info[k], float)}
