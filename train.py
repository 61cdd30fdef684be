"""
train.py -- pretrain a GPT on prepare.py's shards, from one laptop CPU to many GPUs.

Where it sits:  bpe.py -> prepare.py -> model.py -> [train.py] -> sample.py
It reads the token shards and tokenizer that prepare.py wrote, builds model.GPT,
trains it with Muon (hidden matrices) + AdamW (everything else), evaluates bits
per byte on a fixed validation set, and writes checkpoints that sample.py loads.
The same loop fine-tunes a base model into an assistant (section 9): supervised on
conversations (sft), on preference pairs (dpo) and by reinforcement on tasks whose
answers a program checks (rl), each from --init_from and with prepare.py's chat data.

Run it:
    python prepare.py && python train.py           # CPU quick start (Python-ish samples; README for times)
    python train.py --n_layer=6 --n_embd=384 --max_steps=5000    # any setting: --key=value
    python train.py --resume=True                  # continue out/last.pt exactly where it stopped
    python train.py --overwrite=True               # start over in an out_dir that holds a run
    python train.py --init_from=out/best.pt --data_dir=data/custom --matrix_lr=0.005   # fine-tune
    python prepare.py --input='my/*.txt' --tokenizer=DIR/tokenizer.json --out_dir=data/mine &&
      python train.py --init_from=hf:DIR --data_dir=data/mine   # fine-tune a Llama/Qwen3 folder
    python train.py --objective=sft --init_from=out/best.pt --data_dir=data/sft --out_dir=out/sft  # chat (SFT)
    python train.py --objective=dpo --init_from=out/sft/best.pt --data_dir=data/dpo --out_dir=out/dpo
    python train.py --objective=rl --init_from=out/sft/best.pt --data_dir=data/sft --out_dir=out/rl
    python train.py --bench=True                   # tokens/s, MFU and ms per phase of a step
    python train.py --flops_budget=3e14            # as many steps as 3e14 FLOPs pay for (printed)
    python train.py --sweep="[{}, {'attn': 'mla'}, {'layer_pattern': 'LLLG'}]" --seeds=3 --flops_budget=3e14
    torchrun --standalone --nproc_per_node=8 train.py --data_dir=data/fineweb   # 8 GPUs, DDP
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --master_addr=HOST0 train.py   # 2 nodes, R=0,1
    python train.py --help                         # every setting with its default and meaning

Outputs in --out_dir (default out/): last.pt, best.pt (lowest val loss), metrics.jsonl
(one JSON object per step / eval), loss.svg (train and val loss, drawn by hand); a sweep writes
sweep.md and sweep.svg there, and each of its runs into a folder of its own. A run never
replaces an earlier one unless told to (--resume=True or --overwrite=True). Exit codes: 0 the
run reached max_steps, 2 a bad setting or input (one line says what to do), 75 stopped by
SIGINT/SIGTERM after saving last.pt (continue it with --resume=True).

Sections:
    1. Settings               the TrainConfig table (it extends model.py's GPTConfig)
    2. Runtime                model.py's Runtime, plus DDP and compile wrapping
    3. Data                   batches as a pure function of (seed, step, rank); fixed val set
    4. Optimizers             AdamW and Muon, written out
    5. Schedules              learning rate, Muon momentum, staged (step, value) lists
    6. Evaluation             val loss and bits per byte, greedy sample
    7. Metrics and pictures   MFU, metrics.jsonl (torn lines dropped), loss.svg, a text plot
    8. Checkpoints            what a run saves; never over another run, never non-finite
    9. Objectives             pretrain, SFT (masked loss), DPO (frozen reference), RL (GRPO), one class each
   10. The training loop      train(cfg), one screen, calling the named steps above it
   11. Sweeps                 --sweep: entries x seeds at equal compute (--flops_budget); sweep.md, sweep.svg
   12. main
"""
import collections
import contextlib
import copy
import dataclasses
import datetime
import hashlib
import json
import math
import os
import random
import re
import signal
import statistics
import sys
import threading
import time
import xml.sax.saxutils
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import bpe
import prepare
import sample
from model import (DTYPES, GPT, HF_PREFIX, SWITCH, GPTConfig, Runtime, checkpoint_tokenizer,
                   doc_ids_from_bos, gpt_config, grow_vocab, model_from_checkpoint,
                   open_checkpoint, save_checkpoint, setup_runtime)

# -----------------------------------------------------------------------------
# 1. Settings
#
# One table; the trailing comment of each field is its --help line. TrainConfig extends
# model.py's GPTConfig, so every architecture switch (--n_layer=6, --mlp=swiglu, ...) is a
# setting here too, with its help text from model.py, and a new model switch needs no copy.
# The fields below are the training ones. Values are Python literals: --matrix_lr=1 is read as
# 1.0 where a float is expected, --seq_len_schedule=[(0,64),(500,256)] as a list.

BATCH_MODES = ("auto", "random", "packed")
OBJECTIVES_NAMES = ("pretrain", "sft", "dpo", "rl")
WARMDOWN_SHAPES = ("linear", "cosine")
EXIT_INTERRUPTED = 75    # exit code of a run stopped by a signal: resumable, not finished
                         # (sysexits.h's EX_TEMPFAIL: "try again later"); 0 = reached max_steps


@dataclasses.dataclass
class TrainConfig(GPTConfig):
    vocab_size: int = 0                    # model vocabulary; 0 = the tokenizer's size (larger pads the embedding)
    # --- data and files ---
    data_dir: str = "data/stdlib"          # prepare.py's output: shards, tokenizer.bpe, meta.json
    out_dir: str = "out"                   # where last.pt, best.pt, metrics.jsonl, loss.svg go
    resume: bool = False                   # continue from <out_dir>/last.pt, bitwise-exactly
    overwrite: bool = False                # start a new run in an out_dir that holds one (deletes it)
    init_from: str = ""                    # start from this checkpoint's weights, or hf:DIR's (a Hugging Face folder); new optimizer, step 0
    batch_mode: str = "auto"               # "random" windows, or "packed" whole documents + doc mask; auto = random (sft: packed)
    # --- objective (section 9): what the model is trained to do ---
    objective: str = "pretrain"            # pretrain | sft (loss on assistant tokens) | dpo (preference pairs) | rl (GRPO on tasks)
    dpo_beta: float = 0.1                  # DPO: implicit reward = beta * log(policy / reference); larger = stay closer
    rl_group: int = 8                      # RL: replies sampled per prompt; advantages are normalised within the group
    rl_temperature: float = 1.0            # RL: sampling temperature of the replies
    rl_max_tokens: int = 16                # RL: longest reply in tokens (one that has not ended by then gets reward 0)
    rl_kl: float = 0.0                     # RL: weight of a KL penalty that keeps the policy near the starting model
    # --- batch and length ---
    seq_len: int = 256                     # training context T (<= block_size)
    batch_size: int = 16                   # sequences per micro-batch per rank
    grad_accum: int = 1                    # micro-batches per optimizer step (per rank)
    max_steps: int = 1200                  # optimizer steps in the run (replaced by the steps of --flops_budget)
    flops_budget: float = 0.0              # total training FLOPs: max_steps = budget / (FLOPs/token x tokens/step), printed; 0 = off
    seed: int = 1337                       # model init and the data order
    # --- optimisation ---
    matrix_lr: float = 0.02                # Muon lr of the 2-D hidden matrices (width-independent)
    embed_lr: float = 0.2                  # AdamW lr of the token embedding, at d_model=768
    head_lr: float = 0.004                 # AdamW lr of lm_head, at d_model=768
    scalar_lr: float = 0.02                # AdamW lr of gains and scalars, at d_model=768
    weight_decay: float = 0.0              # decoupled weight decay of Muon matrices (x lr)
    adam_weight_decay: float = 0.0         # decoupled weight decay of embeddings and head (x lr)
    cautious_wd: bool = True               # decay only where update and weight agree in sign
    beta1: float = 0.8                     # AdamW first-moment decay
    beta2: float = 0.95                    # AdamW second-moment decay
    adam_eps: float = 1e-10                # AdamW epsilon
    muon_momentum: float = 0.95            # Muon momentum after warmup
    muon_momentum_start: float = 0.85      # Muon momentum at step 0
    muon_momentum_warmup: int = 300        # steps to ramp Muon momentum from start to final
    warmup_steps: int = 0                  # linear lr warmup over this many steps (step 0 runs at 1/warmup_steps)
    warmdown_frac: float = 0.4             # fraction of max_steps spent decaying the lr at the end
    warmdown: str = "linear"               # warmdown shape: "linear" | "cosine"
    final_lr_frac: float = 0.0             # lr at the last step as a fraction of the peak
    grad_clip: float = 1.0                 # clip the global gradient norm to this (0 = off)
    skip_nonfinite: bool = False           # skip steps with a nan/inf loss or gradient instead of stopping
    max_skips: int = 10                    # with skip_nonfinite: give up after this many skipped steps in a row
    # --- staged schedules: [(from_step, value), ...]; empty = the setting above ---
    seq_len_schedule: list = dataclasses.field(default_factory=list)     # seq_len from each step on, e.g. [(0, 64), (500, 256)]
    batch_size_schedule: list = dataclasses.field(default_factory=list)  # batch_size from each step on, e.g. [(0, 8), (200, 16)]
    window_schedule: list = dataclasses.field(default_factory=list)      # attention window from each step on, e.g. [(0, 64), (800, 0)]
    mtp_weight_schedule: list = dataclasses.field(default_factory=list)  # mtp_weight from each step on, e.g. [(0, 0.5), (900, 0.0)]
    mtp_weight: float = 0.3                # weight of the MTP loss (when mtp=True)
    # --- evaluation and logging ---
    eval_interval: int = 200               # steps between validation evals (and at the end)
    eval_tokens: int = 32768               # val tokens per eval (a fixed, deterministic set)
    eval_tasks: str = ""                   # also score multiple-choice tasks at each eval: "builtin" and/or JSONL files (sample.py --eval)
    eval_examples: int = 200               # examples per task of eval_tasks; DPO: held-out pairs, RL: held-out prompts (pass@1) per eval
    sample_interval: int = 400             # steps between greedy samples (0 = only at the end)
    sample_prompt: str = "    def __init__(self"  # prompt of the greedy sample (after a BOS)
    sample_tokens: int = 64                # tokens per greedy sample
    log_interval: int = 1                  # steps between log lines
    ckpt_interval: int = 200               # steps between last.pt saves (and at the end)
    # --- system (model.py's Runtime decides what "auto" means; saved and reused on resume) ---
    device: str = "auto"                   # "auto" (cuda > mps > cpu) | "cpu" | "cuda" | "cuda:1" | "mps"
    dtype: str = "auto"                    # "auto" (bf16 on CUDA and AMX CPUs, else float32) | "float32" | "bfloat16" | "float16"
    compile: str = "auto"                  # torch.compile the model and the optimizer steps: "auto" (on for CUDA and CPU) | "true" | "false"
    deterministic: str = "auto"            # bitwise-repeatable runs: "auto" (on for CPU, off for CUDA) | "true" | "false"
    threads: int = 0                       # CPU threads per process (0 = all cores / ranks per node)
    bench: bool = False                    # only time bench_steps steps: tok/s, MFU, ms per phase
    bench_steps: int = 10                  # timed steps in --bench mode (after 3 warm-up steps)
    # --- sweeps (section 11): variants compared at equal compute ---
    sweep: list = dataclasses.field(default_factory=list)  # setting dicts to compare, e.g. [{}, {'attn': 'mla'}]: every entry x seed in <out_dir>/<entry>/seed<N>
    seeds: int = 1                         # --sweep: runs per entry, seeds seed, seed+1, ...: their spread is the noise bar

    def __post_init__(self):
        # the architecture fields are checked by building the GPTConfig they describe
        gpt_config(self, vocab_size=max(1, self.vocab_size))
        self.compile, self.deterministic = str(self.compile).lower(), str(self.deterministic).lower()
        choices = {"batch_mode": BATCH_MODES, "warmdown": WARMDOWN_SHAPES, "objective": OBJECTIVES_NAMES,
                   "dtype": ("auto", *DTYPES), "compile": SWITCH, "deterministic": SWITCH}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name}={getattr(self, name)} must be one of {allowed}")
        positive = ("seq_len", "batch_size", "grad_accum", "max_steps", "eval_interval",
                    "eval_tokens", "log_interval", "ckpt_interval", "bench_steps", "max_skips",
                    "dpo_beta", "rl_group", "rl_max_tokens", "eval_examples")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")
        non_negative = ("vocab_size", "matrix_lr", "embed_lr", "head_lr", "scalar_lr", "weight_decay",
                        "adam_weight_decay", "adam_eps", "grad_clip", "warmup_steps",
                        "muon_momentum_warmup", "mtp_weight", "sample_interval", "threads",
                        "flops_budget", "rl_temperature", "rl_kl")
        for name in non_negative:
            if not getattr(self, name) >= 0:  # `not >=` also rejects nan
                raise ValueError(f"--{name}={getattr(self, name)} must be >= 0")
        for name in ("beta1", "beta2", "muon_momentum", "muon_momentum_start"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"--{name}={getattr(self, name)} must lie in [0, 1)")
        if not 0.0 <= self.warmdown_frac <= 1.0 or not 0.0 <= self.final_lr_frac <= 1.0:
            raise ValueError("--warmdown_frac and --final_lr_frac must lie in [0, 1]")
        if self.resume and (self.init_from or self.overwrite):
            raise ValueError("--resume=True continues a run; --init_from and --overwrite start a "
                             "new one: give only one of them")
        if self.objective != "pretrain" and not (self.init_from or self.resume or self.bench):
            raise ValueError(f"--objective={self.objective} fine-tunes a trained model: give "
                             f"--init_from=CHECKPOINT (e.g. out/best.pt of a pretraining run)")
        if self.objective == "sft" and self.batch_mode == "random":
            raise ValueError("--objective=sft trains on whole conversations, packed with document "
                             "masks: use --batch_mode=packed (or auto)")
        if self.rl_group < 2 and self.objective == "rl":
            raise ValueError("--rl_group must be at least 2: advantages compare the replies of a group")
        for name in ("seq_len_schedule", "batch_size_schedule", "window_schedule",
                     "mtp_weight_schedule"):
            check_schedule(name, getattr(self, name))
        for t in [self.seq_len] + [v for _, v in self.seq_len_schedule]:
            if not 0 < t <= self.block_size:
                raise ValueError(f"sequence length {t} must be in 1..block_size={self.block_size}; "
                                 f"raise --block_size")
        eval_len = staged(self.seq_len_schedule, self.max_steps, self.seq_len)
        if self.eval_tokens < eval_len:
            raise ValueError(f"--eval_tokens={self.eval_tokens} is less than one validation window "
                             f"of {eval_len} tokens (the final seq_len); raise --eval_tokens")
        if any(v <= 0 for _, v in self.batch_size_schedule):
            raise ValueError("--batch_size_schedule values must be positive")
        if self.window_schedule and not gpt_config(self, vocab_size=max(1, self.vocab_size)).has_window_layers:
            raise ValueError("--window_schedule changes the window of sliding-window layers, and this model "
                             "has none: remove it, or use a layer_pattern with W layers")
        if not (isinstance(self.sweep, list) and all(isinstance(e, dict) for e in self.sweep)):
            raise ValueError(f"--sweep={self.sweep!r}: give a list of setting dicts, e.g. "
                             f"[{{}}, {{'attn': 'mla'}}, {{'layer_pattern': 'LLLG'}}]")
        if self.seeds < 1 or (self.seeds > 1 and not self.sweep):
            raise ValueError(f"--seeds={self.seeds}: the number of runs per --sweep entry, at least 1 "
                             f"(and only with --sweep)")
        if self.sweep and (self.bench or self.init_from):
            raise ValueError("--sweep trains every entry from scratch and evaluates it: drop --bench and --init_from")


def check_schedule(name, schedule):
    """A staged schedule is [(step, value), ...] with increasing steps >= 0."""
    steps = []
    for entry in schedule:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], int)):
            raise ValueError(f"--{name} must be a list of (step, value) pairs, got {entry!r}")
        steps.append(entry[0])
    if steps and (steps[0] < 0 or any(b <= a for a, b in zip(steps, steps[1:]))):
        raise ValueError(f"--{name}: steps must be >= 0 and strictly increasing, got {steps}")


def staged(schedule, step, default):
    """Value of a staged schedule [(from_step, value), ...] at step: the value of the
    last stage that has started, or the default before the first one.
    staged([(0, 64), (100, 256)], 99, 512) == 64; at step 100 it is 256."""
    value = default
    for start, v in schedule:
        if step >= start:
            value = v
    return value


# -----------------------------------------------------------------------------
# 2. Runtime: what training adds to model.py's Runtime
#
# model.setup_runtime decides device, precision, compile, threads and determinism once (and
# joins the torchrun process group). Training adds: wrapping the model for DDP and
# torch.compile, and sums over ranks.

def runtime_for(cfg, saved=None):
    """The Runtime of this process for these settings (saved: a resumed checkpoint's choices)."""
    return setup_runtime(cfg.device, cfg.dtype, cfg.compile, cfg.threads, cfg.deterministic,
                         distributed=True, saved=saved)


def maybe_compile(rt, raw_model):
    if not rt.compile:
        return raw_model
    try:
        return torch.compile(raw_model, options=rt.compile_options or None)
    except Exception as e:  # the backend can be missing altogether
        rt.print(f"warning: torch.compile unavailable ({type(e).__name__}: {e}); running eager")
        rt.compile = False
        return raw_model


def wrap_ddp(rt, model):
    """DDP averages gradients during backward. broadcast_buffers=False: our buffers
    (RoPE tables, MoE balancing biases) are computed identically on every rank, so
    re-sending rank 0's copies before every forward would only cost time (and would
    hide a bug that let the ranks' biases drift apart)."""
    if not rt.ddp:
        return model
    return DDP(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None,
               broadcast_buffers=False)


def unwrap(model):
    """The plain GPT inside DDP (.module) and torch.compile (._orig_mod) wrappers."""
    while True:
        if isinstance(model, DDP):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def all_reduce_sum(rt, values):
    """Sum a list of floats over ranks (one collective), return a list of floats."""
    if not rt.ddp:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64 if rt.device.type != "mps" else torch.float32,
                     device=rt.device)
    dist.all_reduce(t)
    return t.tolist()


# -----------------------------------------------------------------------------
# 3. Data
#
# A batch is a pure function of (seed, step, global micro-batch index): each
# micro-batch seeds its own numpy generator with those numbers. Nothing depends
# on what was read before, so resuming at step s reads exactly the batches the
# uninterrupted run would have read, and 2 ranks x 1 micro-batch read the same
# rows as 1 rank x 2 micro-batches (global index = rank * grad_accum + micro).
# Consequently the whole "data position" of a run is its step number.

MAX_PACK_TRIES = 8   # "packed" mode: documents drawn to fill a row's leftover before cropping


class BatchSource:
    """Training batches from the train shards, in one of two modes.

    random: each row is a window of T+1 tokens at a uniformly random position of the
            token stream (it may start mid-document and cross documents, like nanoGPT).
    packed: each row starts at a document start; random whole documents are packed
            into it while they fit. When the next document does not fit, up to
            MAX_PACK_TRIES other documents are tried; after that (or when a single
            document is longer than the row) the last one is cropped. The model gets
            doc_ids so tokens attend only within their own document.
    Both return x = tokens[:-1], y = tokens[1:] as (B, T) int64 arrays, and with with_mask=True
    also m = the loss mask of y's tokens (B, T) (conversation shards, --objective=sft). Each row
    is cut from the shards as spans (shard, start, end), read for the tokens and the mask alike."""

    def __init__(self, shards, mode, seed):
        self.shards, self.mode, self.seed = shards, mode, seed
        self.lengths = np.array([len(s.tokens) for s in shards], dtype=np.int64)
        if mode == "packed":
            # document d spans [doc_start[d], doc_end[d]) of shard doc_shard[d]. A document
            # that prepare.py continued into the next shard is cut at the shard's end here
            # (its tail is never a row start: it does not begin with BOS).
            self.doc_shard = np.concatenate([np.full(len(s.doc_starts), i, dtype=np.int64)
                                             for i, s in enumerate(shards)])
            self.doc_start = np.concatenate([np.asarray(s.doc_starts, dtype=np.int64)
                                             for s in shards])
            self.doc_end = np.concatenate([np.append(np.asarray(s.doc_starts[1:], dtype=np.int64),
                                                     len(s.tokens)) for s in shards])
            if len(self.doc_start) == 0:
                raise bpe.UserError("the train split has no documents; re-run prepare.py")

    def get(self, step, index, batch_size, seq_len, with_mask=False):
        rng = np.random.default_rng([self.seed, step, index])
        if self.mode == "random":
            rows = self._random_rows(rng, batch_size, seq_len)
        else:
            rows = [self._packed_row(rng, seq_len) for _ in range(batch_size)]
        buf = np.stack([self._read(spans, "tokens") for spans in rows]).astype(np.int64)  # (B, T+1)
        if not with_mask:
            return buf[:, :-1], buf[:, 1:]
        if self.shards[0].mask is None:
            raise bpe.UserError("these shards have no loss mask: --objective=sft needs conversations made by "
                                "`prepare.py --chat=...`")
        mask = np.stack([self._read(spans, "mask") for spans in rows]).astype(np.int64)     # (B, T+1)
        return buf[:, :-1], buf[:, 1:], mask[:, 1:]

    def _read(self, spans, field):
        """The concatenation of [start, end) of each (shard, start, end) in spans, from the shards'
        tokens or masks."""
        return np.concatenate([getattr(self.shards[i], field)[a:b] for i, a, b in spans])

    def _random_rows(self, rng, batch_size, seq_len):
        n_windows = np.maximum(self.lengths - seq_len, 0)  # valid window starts per shard
        ends = np.cumsum(n_windows)                         # window w < ends[i]: shard <= i
        if ends[-1] == 0:
            raise bpe.UserError(f"train split has fewer than {seq_len + 1} tokens per shard; "
                                f"lower --seq_len or prepare more data")
        # all rows' positions in one draw: numpy gives the same numbers as one draw per
        # row, with one call instead of batch_size
        pos = rng.integers(ends[-1], size=batch_size)
        shard = np.searchsorted(ends, pos, side="right")
        start = pos - (ends[shard] - n_windows[shard])
        return [[(i, a, a + seq_len + 1)] for i, a in zip(shard.tolist(), start.tolist())]

    def _packed_row(self, rng, seq_len):
        need, spans, tries = seq_len + 1, [], 0
        while need > 0:
            d = int(rng.integers(len(self.doc_start)))
            start, end = int(self.doc_start[d]), int(self.doc_end[d])
            if end - start > need:
                if spans and tries < MAX_PACK_TRIES:
                    tries += 1
                    continue
                end = start + need  # crop: still starts at its document start
            spans.append((int(self.doc_shard[d]), start, end))
            need -= end - start
        return spans


def val_windows(shards, seq_len, n_tokens, field="tokens"):
    """The fixed validation set: consecutive, non-overlapping windows of T+1 tokens
    (stride T) from the start of the val split, n_tokens // T of them (fewer if the
    split is smaller). Returns x, y as (N, T) int64 arrays; field="mask" gives the same
    windows of the loss mask (then y is the mask of the targets)."""
    want = (n_tokens // seq_len) * seq_len + 1
    parts, have = [], 0
    for s in shards:  # read only what we need: the val split can be large
        take = min(len(s.tokens), want - have)
        parts.append(np.asarray(getattr(s, field)[:take], dtype=np.int64))
        have += take
        if have >= want:
            break
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    n = (len(stream) - 1) // seq_len
    if n == 0:
        raise bpe.UserError(f"val split has fewer than {seq_len + 1} tokens; lower --seq_len or "
                            f"prepare a larger validation split")
    x = stream[:n * seq_len].reshape(n, seq_len)            # (N, T)
    y = stream[1:n * seq_len + 1].reshape(n, seq_len)        # (N, T), shifted by one
    return x, y


def documents(shards):
    """Every whole document of a split, in order, as (tokens, mask) int64 arrays (mask None for
    shards without one). A document that prepare.py continued into the next shard is stitched
    back together (the next shard's index does not list its offset 0)."""
    docs = []
    for s in shards:
        bounds = [int(a) for a in s.doc_starts] + [len(s.tokens)]
        if bounds[0] > 0 and docs:                           # the tail of the previous document
            tokens, mask = docs[-1]
            docs[-1] = (np.concatenate([tokens, s.tokens[:bounds[0]]]),
                        None if mask is None else np.concatenate([mask, s.mask[:bounds[0]]]))
        for a, b in zip(bounds, bounds[1:]):
            docs.append((np.asarray(s.tokens[a:b], dtype=np.int64),
                         None if s.mask is None else np.asarray(s.mask[a:b], dtype=np.int64)))
    return docs


PAD_MULTIPLE = 16   # DPO and RL rows are padded to a multiple of this: few distinct shapes to compile


def pad_rows(docs, pad_id=0, limit=None):
    """[(tokens, mask), ...] of varied lengths -> x, y, m as (N, L) int64 arrays: x = tokens[:-1],
    y = tokens[1:], m = mask[1:] (the loss mask of the targets), padded on the right with pad_id and
    mask 0 to L = the longest, rounded up to PAD_MULTIPLE (but not past limit, the model's context,
    unless the longest is). Right padding changes nothing before it: attention is causal, so a pad
    is only ever seen by later pads, whose targets are masked."""
    longest = max(len(t) - 1 for t, _ in docs)
    L = max(longest, min(-(-longest // PAD_MULTIPLE) * PAD_MULTIPLE, limit or math.inf))
    x = np.full((len(docs), L), pad_id, dtype=np.int64)
    y, m = x.copy(), np.zeros_like(x)
    for r, (tokens, mask) in enumerate(docs):
        n = len(tokens) - 1
        x[r, :n], y[r, :n], m[r, :n] = tokens[:-1], tokens[1:], mask[1:]
    return x, y, m


def to_device(rt, array):
    t = torch.from_numpy(np.ascontiguousarray(array))
    if rt.device.type == "cuda":
        return t.pin_memory().to(rt.device, non_blocking=True)
    return t.to(rt.device)


# -----------------------------------------------------------------------------
# 4. Optimizers: AdamW and Muon, written out in full
#
# Two optimizers share the model (model.optim_groups() says which parameter goes where):
#   * Muon  for the 2-D hidden matrices (attention and MLP weights, and 3-D stacks of
#           expert matrices in MoE layers): momentum, then the update is replaced by its
#           nearest (semi-)orthogonal matrix, computed by a Newton-Schulz iteration.
#   * AdamW for everything else (token embedding, output head, norm gains, scalars):
#           these are not "matrices acting on a hidden vector", so orthogonalising
#           their update has no meaning (an embedding row is looked up, not multiplied).
# Both take the usual param groups; the trainer writes group["lr"] (and Muon's
# group["momentum"]) every step, so schedules need nothing from the optimizer.
# Weight decay is decoupled (applied to the weights, not the gradient) and scaled by
# the group's *current* lr, so it follows the lr schedule down to zero in warmdown.
#
# Optimizer state holds only tensors and plain Python numbers, so
# optimizer.state_dict() survives torch.save + torch.load(weights_only=True).


ADAM_BETAS = (0.9, 0.95)  # the AdamW class's defaults, for other callers (the trainer passes
ADAM_EPS = 1e-8           # its own --beta1, --beta2, --adam_eps); beta2 = 0.95 rather than
                          # torch's 0.999 forgets old gradients faster, as GPT-3 and Llama did
NS_COEFFS = (3.4445, -4.7750, 2.0315)  # quintic Newton-Schulz coefficients (a, b, c), from
                                       # Keller Jordan's Muon (2024); derivation in newton_schulz5
NS_STEPS = 5
NS_BAND = (0.68, 1.21)   # where 5 quintic steps put singular values (see newton_schulz5)
NS_BAND_FROM = 2e-3      # ... for those that start >= this fraction of the Frobenius norm
NS_EPS = 1e-7  # keeps the Frobenius normalisation finite for an all-zero update
MUON_BATCH_NUMEL = 1 << 26  # at most this many elements per batched Newton-Schulz call (256 MB
                            # in float32): e.g. 21 matrices of 3072 x 1024


def _cautious_mask(update, param):
    """1.0 where the update and the parameter have the same sign, else 0.0.

    Cautious weight decay (Chen, Liang et al. 2025, "Cautious Weight Decay",
    arXiv:2510.12402): the optimizer step is p -= lr * update, so where sign(update) ==
    sign(p) the step already shrinks |p| and decay pulls the same way; where they
    disagree the loss wants |p| to *grow*, and ordinary decay would fight it. Decaying
    only the agreeing coordinates keeps the regularising effect while leaving the
    directions the loss is actively growing alone. The paper shows this keeps the
    original objective (plain decoupled decay implicitly optimises loss + a penalty)
    and reports lower final loss, with no new hyperparameter.
    Zero on either side counts as "not agreeing" (a zero weight has nothing to decay)."""
    return (update * param > 0).to(param.dtype)


def _decay_(p, update, lr, weight_decay, cautious):
    """Decoupled weight decay, in place: p <- p - lr * wd * p (optionally masked).

    Multiplying by the current lr (as torch.optim.AdamW does) ties decay to the lr
    schedule: with a warmdown to lr=0 the decay fades out with it."""
    if weight_decay == 0.0:
        return
    if cautious:
        p.sub_(p * _cautious_mask(update, p) * (lr * weight_decay))  # lr: a float or a 0-d tensor
    else:
        p.mul_(1.0 - lr * weight_decay)


class CompiledStep:
    """fn, run through torch.compile(dynamic=False, fullgraph=True, options=options) when
    `enabled` (the optimizers' update functions). Compiling happens at the first call,
    before fn writes anything; if it fails (say, no C++ compiler), warn once and run fn
    eagerly from then on. An error after a compiled call has succeeded is a real one
    and is raised."""

    def __init__(self, fn, name, enabled, options=None):
        self.fn, self.name, self.enabled, self.options = fn, name, enabled, options or None
        self.compiled_fn, self.ran = None, False

    def __call__(self, *args, **kwargs):
        if self.enabled:
            try:
                if self.compiled_fn is None:
                    self.compiled_fn = torch.compile(self.fn, dynamic=False, fullgraph=True,
                                                     options=self.options)
                out = self.compiled_fn(*args, **kwargs)
                self.ran = True
                return out
            except Exception as e:
                if self.ran:
                    raise
                print(f"warning: torch.compile of {self.name}'s step failed ({type(e).__name__}); "
                      f"running it eagerly", file=sys.stderr)
                self.compiled_fn, self.enabled = None, False
        return self.fn(*args, **kwargs)


# 4.1 AdamW

class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter 2019), from scratch.

    For each parameter p with gradient g, at step t = 1, 2, ...:
        m = beta1 * m + (1 - beta1) * g          first moment  (running mean of g)
        v = beta2 * v + (1 - beta2) * g^2        second moment (running mean of g^2)
        m_hat = m / (1 - beta1^t)                bias corrections: m and v start at 0,
        v_hat = v / (1 - beta2^t)                so early averages are too small
        p = p - lr * wd * p                      decoupled weight decay (before the step)
        p = p - lr * m_hat / (sqrt(v_hat) + eps)
    With cautious=False this equals torch.optim.AdamW to float32 rounding (tested):
    same operation order, and eps added after dividing sqrt(v) by sqrt(1 - beta2^t).
    With cautious=True the decay only touches coordinates where the Adam step and the
    weight agree in sign (see _cautious_mask).

    Worked example (one step, wd=0): g = [0.5, -2.0] -> m_hat = g, v_hat = g^2,
    step = lr * g / (|g| + eps) ~= lr * [1, -1]: Adam's first step is sign descent.

    Lazy rows (a group with lazy_rows=True: model.py's Engram tables, section 7c). A lookup
    table's gradient is zero on every row the step did not look up. Plain AdamW would still move
    those rows: m of a row used earlier is not zero and keeps stepping it (decaying) for many steps
    after its last use, and decoupled decay shrinks every row, every step. For a memory whose rows
    are n-grams, most of which occur rarely, that erases a rare n-gram's row between its uses. So,
    per row: a row whose gradient is all zero this step (looked up by no token on any rank: DDP
    averages before the step) is left exactly as it is: weight, m and v. A used row gets the
    ordinary update, and the decay, so a row decays per use rather than per step. t stays the
    global step count (as torch's SparseAdam): a row first used at step 100 has bias corrections
    near 1, and its first step is lr * (1 - beta1) g / sqrt((1 - beta2) g^2), about 0.9 lr sign(g)
    with the default betas: bounded, like Adam's usual first step. A used row whose gradient is
    exactly zero (at step 0 Engram's output projection is still 0, so no table row has a
    gradient) is treated as unused, which on a first step is what plain Adam does too. The
    gradient stays dense (one tensor the size of the table): DDP's all-reduce, clipping and
    torch.compile work unchanged; a real sparse gradient would save that memory traffic for
    tables far larger than these.
    """

    def __init__(self, params, lr=1e-3, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=0.0,
                 cautious=False, compiled=False, compile_options=None):
        if lr < 0.0 or eps < 0.0 or weight_decay < 0.0:
            raise ValueError(f"AdamW needs lr, eps, weight_decay >= 0, got {lr}, {eps}, {weight_decay}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"AdamW betas must lie in [0, 1), got {betas}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        cautious=cautious, lazy_rows=False)
        super().__init__(params, defaults)
        # compiled: run the update through torch.compile (the trainer passes its compile
        # setting): one fused pass over each parameter's state instead of ~8 separate ones;
        # falls back to eager if compiling fails
        self._update = CompiledStep(adamw_update, "AdamW", compiled, compile_options)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # one entry per param that has a grad, all groups: adamw_update's arguments
        params, grads, exp_avgs, exp_avg_sqs, numbers, settings, used = [], [], [], [], [], [], []
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW here does not support sparse gradients")
                state = self.state[p]
                if not state:  # lazy init on the first step that sees a gradient
                    state["step"] = 0  # a plain int: no device, round-trips everywhere
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                t = state["step"]
                # the numbers that change from step to step: lr and the bias corrections
                step_numbers = (group["lr"], 1.0 - beta1 ** t, (1.0 - beta2 ** t) ** 0.5)
                if self._update.enabled:
                    # inputs of the compiled code, not constants (a new value would recompile)
                    step_numbers = tuple(torch.tensor(x, dtype=torch.float32, device=p.device)
                                         for x in step_numbers)
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                numbers.append(step_numbers)
                settings.append((beta1, beta2, group["eps"], group["weight_decay"], group["cautious"]))
                # lazy rows: which rows this step looked up, (rows, 1) bool. Found here, outside
                # the compiled update: inductor (torch 2.13, CPU) fails to compile a reduction of
                # the gradient in the graph that also rewrites and rereads the moments.
                lazy = group.get("lazy_rows", False)   # .get: checkpoints from before lazy rows
                used.append((p.grad != 0).any(dim=-1, keepdim=True) if lazy else None)
        if params:
            self._update(params, grads, exp_avgs, exp_avg_sqs, numbers, settings, used)
        return loss


def adamw_update(params, grads, exp_avgs, exp_avg_sqs, numbers, settings, used_rows=None):
    """The AdamW update of every param, in place. One entry per param in every list:
    numbers[i] = (lr, 1 - beta1^t, sqrt(1 - beta2^t)), floats or (compiled) 0-d tensors;
    settings[i] = (beta1, beta2, eps, weight_decay, cautious), constants of the run.
    Plain tensor code without data-dependent branches, so that torch.compile fuses each
    param's update into one kernel. The operation order is torch.optim.AdamW's (eps
    added after dividing sqrt(v) by sqrt(1 - beta2^t)): results agree to float32 rounding.
    used_rows[i]: None, or for lazy rows a (rows, 1) bool tensor, True where the gradient row
    is not all zero: the other rows stay as they are, weights and moments (see "Lazy rows" in
    the class docstring)."""
    used_rows = used_rows or [None] * len(params)
    for p, g, m, v, (lr, bias1, bias2_sqrt), (beta1, beta2, eps, weight_decay, cautious), used in zip(
            params, grads, exp_avgs, exp_avg_sqs, numbers, settings, used_rows):
        lazy = used is not None
        if lazy:
            m.copy_(torch.where(used, m.lerp(g, 1.0 - beta1), m))
            v.copy_(torch.where(used, v * beta2 + g * g * (1.0 - beta2), v))
        else:
            m.lerp_(g, 1.0 - beta1)                               # m = b1 m + (1-b1) g
            v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)       # v = b2 v + (1-b2) g^2
        denom = (v.sqrt() / bias2_sqrt).add_(eps)                 # sqrt(v_hat) + eps
        update = m / denom
        if lazy:
            update = update * used                                # an unused row neither moves ...
        if cautious and weight_decay != 0.0:
            _decay_(p, update, lr, weight_decay, cautious=True)   # (a zero update: no decay)
        elif lazy and weight_decay != 0.0:
            p.sub_(p * used * (lr * weight_decay))                # ... nor decays
        else:
            _decay_(p, None, lr, weight_decay, cautious=False)
        p.sub_(update * (lr / bias1))                             # p -= lr m_hat / denom


# 4.2 Muon: orthogonalised momentum for hidden matrices

def newton_schulz5(G, steps=NS_STEPS, dtype=None):
    """Approximately orthogonalise G: return ~U V^T where G = U S V^T (its SVD).

    G is (..., rows, cols); leading dims are a batch (e.g. MoE experts, one matrix
    each), each matrix is orthogonalised on its own. Returns the same shape, computed
    in `dtype` (default float32; the trainer passes its Runtime's ns_dtype: bf16 when the
    run computes in bf16, where the result differs from float32 by ~2% and lands in the
    same band, tested).

    Why it works: with X = U S V^T, the map
        X <- a X + b (X X^T) X + c (X X^T)^2 X  =  U phi(S) V^T,
        phi(s) = a s + b s^3 + c s^5,
    keeps the singular vectors and applies the odd polynomial phi to every singular
    value. Dividing G by its Frobenius norm first puts every s in [0, 1]
    (the largest singular value <= Frobenius norm). Iterating phi pushes each s in
    (0, 1] towards ~1, so the result is ~U V^T, the orthogonal matrix nearest to G.

    The coefficients: a = phi'(0) = 3.4445 is as large as possible so that tiny singular
    values grow fast (x3.4 per step), while b and c keep phi from overshooting far.
    The price is that phi has no fixed point at 1: 5 steps leave singular values in a
    band around 1 instead of exactly at 1. Iterating phi on a grid shows: every input
    singular value >= NS_BAND_FROM (relative to the Frobenius norm) ends in NS_BAND
    (tested); smaller ones (nearly singular matrices) grow by at most a^5 ~ 490x and
    stay below. For a training update that is good enough: what matters is that no
    direction dominates, not that each gets exactly 1.

    Cost: all matmuls use the smaller side. For rows > cols we work on the transpose,
    so X X^T is (cols, cols). torch.baddbmm(M, P, Q, beta=x, alpha=y) computes
    x M + y (P @ Q) in one BLAS call (gemm's own alpha/beta), which saves the separate
    scale-and-add passes over the result (under torch.compile, which fuses such adds
    anyway, it makes no difference)."""
    assert G.ndim >= 2, "newton_schulz5 needs a matrix or a batch of matrices"
    a, b, c = NS_COEFFS
    X = G.to(dtype or torch.float32)
    tall = G.size(-2) > G.size(-1)
    if tall:
        # (..., m, n), m = min(rows, cols); copied into that layout once (with a
        # transposed view, every baddbmm below would copy X again)
        X = X.mT.contiguous()
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + NS_EPS)     # all singular values <= 1
    batch_shape = X.shape[:-2]
    X = X.reshape(-1, *X.shape[-2:])                          # (batch, m, n); batch = 1 for 2-D
    for _ in range(steps):
        A = torch.bmm(X, X.mT)                                # A = X X^T        (batch, m, m)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)           # B = b A + c A^2  (batch, m, m)
        X = torch.baddbmm(X, B, X, beta=a)                    # X = a X + B X    (batch, m, n)
    X = X.reshape(*batch_shape, *X.shape[-2:])                # (..., m, n)
    if tall:
        X = X.mT                                              # back to (..., rows, cols)
    return X


def muon_scale(shape):
    """Aspect-ratio factor of the Muon update: max(1, rows / cols) ** 0.5.

    An orthogonalised (rows, cols) matrix has all singular values ~1, so its spectral
    norm is 1 whatever its shape. The "spectral condition" for feature learning (Yang,
    Simon & Bernstein 2023) asks an update of a fan_in -> fan_out matrix (a torch
    Linear weight is (fan_out, fan_in) = (rows, cols)) to have spectral norm
    ~ sqrt(fan_out / fan_in): then each output coordinate changes by O(1) when the
    input coordinates are O(1). We apply that factor to tall matrices only
    (max(1, .)), as in Keller Jordan's Muon; for the wide ones it keeps the per-entry
    RMS of the update at 1/sqrt(cols) in every case:
        RMS = sqrt(min(r, c) / (r c)) * max(1, r / c) ** 0.5 = 1 / sqrt(c).
    Example: the MLP c_fc of a 128-wide model is (512, 128): factor 2; c_proj
    (128, 512): factor 1."""
    rows, cols = shape[-2], shape[-1]
    return max(1.0, rows / cols) ** 0.5


def _dist_world():
    """(rank, world_size) if torch.distributed is running with >1 ranks, else (0, 1)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz (Keller Jordan et al. 2024), from scratch.

    For each hidden matrix W (rows, cols) with gradient g:
        buf = mu * buf + (1 - mu) * g            momentum (an EMA of gradients)
        u   = (1 - mu) * g + mu * buf            Nesterov: look one step ahead
              (nesterov=False: u = buf)
        O   = newton_schulz5(u) ~= U V^T         orthogonalise: same directions as u,
                                                 every singular value ~1
        W   = W - lr * wd * W                    decoupled (optionally cautious) decay
        W   = W - lr * muon_scale(W.shape) * O
    Why: the gradient of a weight matrix is typically dominated by a few directions
    (low stable rank); orthogonalising gives rare directions the same step size as the
    dominant ones. It is steepest descent under the spectral norm; in Keller Jordan's
    NanoGPT speedrun it reached the target loss ~1.35x faster than AdamW.
    (Scaling the momentum EMA by (1 - mu) vs. Keller's buf = mu buf + g does not matter:
    the Frobenius normalisation inside newton_schulz5 removes any overall scale.)

    Only for 2-D matrices, or 3-D stacks of matrices (each orthogonalised separately).
    Embeddings, the output head, gains and scalars go to AdamW. A group with
    fan_in_first=True holds matrices stored (fan_in, fan_out), the transpose of a
    torch Linear weight (MoE experts keep (n_experts, in, out) for batched matmuls):
    the aspect-ratio factor then reads the shape the other way round.

    Matrices of the same shape are orthogonalised together: one batched newton_schulz5
    call per shape instead of one per matrix (small models have many small matrices,
    and per-call overhead dominates there). Tall matrices join the bucket of their
    transpose: Newton-Schulz of G^T is the transpose of Newton-Schulz of G (U V^T
    transposed is V U^T), so an MLP's (4d, d) c_fc and (d, 4d) c_proj are one batch.

    Distributed (torch.distributed initialised, world_size > 1): grads are already
    averaged by DDP, so every rank holds the same grads and the same momentum. The
    expensive part, Newton-Schulz, is shared: each same-shape bucket (same order on
    every rank: the group's order) is padded with zero matrices to a multiple of
    world_size and cut into world_size equal slices. Rank r orthogonalises slice r;
    one all_gather per bucket hands every rank all the updates, and every rank applies
    all of them. Every matrix is orthogonalised on its own inside the batch, so the
    result equals a single process's (bitwise in the test with 2 gloo ranks).
    Momentum stays on every rank (elementwise, cheap), so rank 0's state_dict is
    complete and resuming with another world size works.
    """

    def __init__(self, params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=NS_STEPS,
                 weight_decay=0.0, cautious=False, fan_in_first=False, ns_dtype=None, compiled=False,
                 compile_options=None):
        # ns_dtype: precision of Newton-Schulz (None = float32); the trainer passes its
        # Runtime's choice (bf16 when the run computes in bf16, where bf16 matmuls are
        # fast). Not a group setting, so it stays out of state_dict (a checkpoint can
        # resume on other hardware).
        self.ns_dtype = ns_dtype
        # compiled: run each single-process step through torch.compile(muon_step) (the
        # trainer passes its compile setting and options); if compiling fails, warn
        # once, go eager
        self._update = CompiledStep(muon_step, "Muon", compiled, compile_options)
        if lr < 0.0 or weight_decay < 0.0 or not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon needs lr, weight_decay >= 0 and 0 <= momentum < 1, "
                             f"got {lr}, {weight_decay}, {momentum}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        weight_decay=weight_decay, cautious=cautious, fan_in_first=fan_in_first)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim not in (2, 3):
                    raise ValueError(f"Muon takes 2-D matrices or 3-D stacks of them, got a "
                                     f"parameter of shape {tuple(p.shape)}: give it to AdamW")

    def _buckets(self, group):
        """The group's params that have a grad, in buckets: wide shape (rows <= cols) ->
        params of that shape or its transpose, in group order. Every rank builds the same
        buckets in the same order (DDP gives every rank the same grads, so the same
        params have grad None everywhere)."""
        buckets = {}
        for p in group["params"]:
            if p.grad is not None:
                rows, cols = p.shape[-2:]
                buckets.setdefault((*p.shape[:-2], min(rows, cols), max(rows, cols)), []).append(p)
        for plist in buckets.values():  # momentum buffers are created on first use
            for p in plist:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        return list(buckets.values())

    def _scales(self, params, group):
        """muon_scale of each param, its shape read as (rows, cols) = (fan_out, fan_in)."""
        flip = group["fan_in_first"]
        return [muon_scale(p.shape[:-2] + p.shape[-2:][::-1] if flip else p.shape) for p in params]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rank, world = _dist_world()
        for group in self.param_groups:
            buckets = self._buckets(group)
            if not buckets:
                continue
            grads = [[p.grad for p in plist] for plist in buckets]
            bufs = [[self.state[p]["momentum_buffer"] for p in plist] for plist in buckets]
            scales = [self._scales(plist, group) for plist in buckets]
            device = buckets[0][0].device
            dtype = self.ns_dtype or torch.float32
            # lr and momentum follow schedules: as 0-d tensors they are inputs of the
            # compiled code, not constants baked into it (a new value would recompile)
            lr = torch.tensor(group["lr"], dtype=torch.float32, device=device)
            mu = torch.tensor(group["momentum"], dtype=torch.float32, device=device)
            static = dict(weight_decay=group["weight_decay"], cautious=group["cautious"],
                          nesterov=group["nesterov"], ns_steps=group["ns_steps"], ns_dtype=dtype)
            if world > 1:
                self._step_distributed(buckets, grads, bufs, scales, lr, mu, rank, world, **static)
                continue
            self._update(buckets, grads, bufs, scales, lr, mu, **static)
        return loss

    def _step_distributed(self, buckets, grads, bufs, scales, lr, mu, rank, world, *,
                          weight_decay, cautious, nesterov, ns_steps, ns_dtype):
        """Like muon_step, with the Newton-Schulz work shared: each bucket is padded with
        zero matrices to a multiple of world_size and cut into world_size equal slices;
        rank r orthogonalises slice r, and one all_gather hands every rank all the
        updates (async: a bucket's communication overlaps the next bucket's compute; the
        gathered updates of the group, as much as its params in ns dtype, are held until
        the end). Momentum is updated on every rank for every param (cheap)."""
        pending = []
        for plist, glist, blist in zip(buckets, grads, bufs):
            directions = [_wide(u) for u in muon_directions(glist, blist, mu, nesterov)]
            per_rank = -(-len(plist) // world)                   # ceil(len / world)
            padded = directions + [torch.zeros_like(directions[0])] * (per_rank * world - len(plist))
            mine = muon_orthogonalise(padded[rank * per_rank:(rank + 1) * per_rank], ns_steps, ns_dtype)
            gathered = torch.empty((world * per_rank, *mine.shape[1:]), dtype=mine.dtype, device=mine.device)
            handle = dist.all_gather(list(gathered.chunk(world)), mine.contiguous(), async_op=True)
            pending.append((plist, gathered, handle))
        for (plist, gathered, handle), slist in zip(pending, scales):
            handle.wait()
            muon_apply(plist, gathered, lr, slist, weight_decay, cautious)


def _wide(u):
    """u, or its transpose (a view) if u is tall: Newton-Schulz works on rows <= cols."""
    return u.mT if u.size(-2) > u.size(-1) else u


def muon_directions(grads, bufs, mu, nesterov):
    """Momentum update of every buffer, in place, then the Nesterov look-ahead:
        buf = mu * buf + (1 - mu) * g,   u = (1 - mu) * g + mu * buf   (nesterov=False: u = buf)
    Returns the u of every param (new tensors; the buffers stay for the next step).
    Plain per-tensor ops: compiled, they fuse with what follows, where torch._foreach_lerp
    with a tensor weight stays one un-fused call per tensor."""
    for buf, g in zip(bufs, grads):
        buf.lerp_(g, 1.0 - mu)
    return [g.lerp(buf, mu) for g, buf in zip(grads, bufs)] if nesterov else bufs


def muon_orthogonalise(directions, ns_steps, dtype):
    """Newton-Schulz on a list of same-shape directions (wide: rows <= cols), batched:
    returns the (n, *shape) stack of ~orthogonal matrices, in dtype.
    Batching matters for small models, whose many small matrices would otherwise pay
    a call's fixed cost each (README, performance notes). A batch holds at most
    MUON_BATCH_NUMEL elements, so that a big model's stack (and the iteration's
    temporaries, a few times its size) stays bounded."""
    per_call = max(1, MUON_BATCH_NUMEL // directions[0].numel())
    parts = []
    for i in range(0, len(directions), per_call):
        # (compiled, the stack, the cast and the momentum lerps fuse into one pass; an
        # empty stack filled row by row made inductor fuse everything into one slow kernel)
        stack = torch.stack(directions[i:i + per_call]).to(dtype)
        parts.append(newton_schulz5(stack, ns_steps, dtype))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def muon_apply(params, updates, lr, scales, weight_decay, cautious):
    """For every W of params and its row of updates (wide; transposed back for a tall W):
        W -= lr wd W (maybe cautious),  then  W -= lr * scale * update.
    Rows of updates past len(params) (distributed padding) are ignored. The scale is
    folded into the update (the cautious mask only reads signs, which it keeps)."""
    for p, update, scale in zip(params, updates.unbind(0), scales):
        update = (update.mT if update.shape != p.shape else update).to(p.dtype)
        _decay_(p, update, lr, weight_decay, cautious)
        p.sub_(update * (lr * scale))


def muon_step(buckets, grads, bufs, scales, lr, mu, *, weight_decay, cautious, nesterov,
              ns_steps, ns_dtype):
    """One Muon step of one param group in one process, bucket after bucket (only one
    bucket's updates in memory at a time). Plain tensor code with no data-dependent
    branches, so that torch.compile can turn it into one graph: the momentum lerps, the
    stacking, the norms and the final update fuse into a few kernels around the
    batched matmuls of Newton-Schulz. lr, mu: 0-d tensors."""
    for plist, glist, blist, slist in zip(buckets, grads, bufs, scales):
        directions = [_wide(u) for u in muon_directions(glist, blist, mu, nesterov)]
        muon_apply(plist, muon_orthogonalise(directions, ns_steps, ns_dtype), lr, slist,
                   weight_decay, cautious)


REFERENCE_WIDTH = 768   # the AdamW learning rates in the settings are tuned at d_model = 768


def build_optimizers(cfg, raw_model, rt):
    """Muon for 2-D hidden matrices, AdamW for the rest, one lr per group.

    The d_model scaling rule: AdamW lrs are given at REFERENCE_WIDTH and scaled by
    (REFERENCE_WIDTH / n_embd) ** 0.5, so a narrower model takes larger steps (its
    activations change less per unit of weight change). Muon's update has unit
    spectral norm scaled by the matrix aspect ratio, which already makes its lr
    transfer across widths, so matrix_lr is not scaled.

    MoE: expert matrices (3-D stacks, "expert") go to Muon at matrix_lr like the dense
    MLP they replace; the router ("router", (n_experts, n_embd)) goes to AdamW at the
    head's lr, because like lm_head it is a linear read-out to logits, and an
    orthogonalised update would move every routing logit by the same amount each step.

    Hyper-connections (model.py 7b): their coefficients ("hc") at the scalar lr without
    decay, like the gains (decay would pull the identity mix toward 0); the dynamic
    projections ("hc_dyn") at the head's lr, read-outs of a few coefficients like the
    router. Engram (7c): the tables ("memory") at the embedding's lr (also when wte is
    tied: they are only looked up), with lazy rows (see AdamW)."""
    scale = (REFERENCE_WIDTH / raw_model.config.n_embd) ** 0.5  # the model's width (--init_from's, not --n_embd)
    adam_lr = {"embed": cfg.embed_lr * scale, "head": cfg.head_lr * scale,
               "router": cfg.head_lr * scale, "scalar": cfg.scalar_lr * scale,
               "hc": cfg.scalar_lr * scale, "hc_dyn": cfg.head_lr * scale, "memory": cfg.embed_lr * scale}
    if raw_model.config.tie_embeddings:
        # One matrix is both wte and lm_head (it sits in the "embed" group). Its gradient
        # is dominated by the read-out, so it must move at the head's small lr: at
        # embed_lr (50x larger) the tied model diverges within a few steps.
        adam_lr["embed"] = adam_lr["head"]
    muon_groups, adam_groups = [], []
    compiled = bool(rt.compile)  # both optimizers' updates compiled when the model is
    for g in raw_model.optim_groups():
        name, kind = g["name"], g["optimizer"]
        params = [p for p in g["params"] if p.requires_grad]
        if not params:
            continue
        if kind == "muon":
            # expert stacks are stored (n_experts, in, out): see Muon's fan_in_first
            group = dict(params=params, lr=cfg.matrix_lr, weight_decay=cfg.weight_decay,
                         fan_in_first=(name == "expert"))
            muon_groups.append(group)
        else:
            wd = 0.0 if name in ("scalar", "hc") else cfg.adam_weight_decay  # never decay gains
            group = dict(params=params, lr=adam_lr.get(name, adam_lr["scalar"]), weight_decay=wd,
                         lazy_rows=name == "memory")
            adam_groups.append(group)
        group.update(name=name, initial_lr=group["lr"])
        n = sum(p.numel() for p in params)
        rt.print(f"  optimizer group {name:<8} {kind:<6} {n:>11,} params  lr {group['lr']:.4g}")
    optimizers = []
    if adam_groups:
        optimizers.append(AdamW(adam_groups, lr=adam_lr["scalar"], betas=(cfg.beta1, cfg.beta2),
                                eps=cfg.adam_eps, cautious=cfg.cautious_wd, compiled=compiled,
                                compile_options=rt.compile_options))
    if muon_groups:
        optimizers.append(Muon(muon_groups, lr=cfg.matrix_lr, momentum=cfg.muon_momentum,
                               cautious=cfg.cautious_wd, ns_dtype=rt.ns_dtype, compiled=compiled,
                               compile_options=rt.compile_options))
    return optimizers


def clip_grad_norm(params, max_norm):
    """Global-norm clipping: if ||g|| (all grads as one vector) exceeds max_norm, scale
    every grad by max_norm / (||g|| + 1e-6), so the update keeps its direction but not a
    spike's size. Returns ||g|| before clipping, as a float (it is logged, and a
    non-finite one stops the run). max_norm <= 0: only measure.

    Same result as torch.nn.utils.clip_grad_norm_, with one pass fewer when no clipping
    is needed: torch always multiplies by min(1, coef), which rewrites every grad even
    when the factor is 1 (in a healthy run the norm sits below the threshold on most
    steps)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    # per-tensor norms in one fused call, then the norm of those norms
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    norm = total.item()
    if max_norm > 0 and norm > max_norm:  # false for nan: such a step is skipped or stops
        torch._foreach_mul_(grads, max_norm / (total + 1e-6))
    return norm


# -----------------------------------------------------------------------------
# 5. Schedules
#
# lr multiplier over the run (max_steps = S, warmup W, warmdown from step D = S - frac*S):
#
#   1.0 |    ______________________
#       |   /                      \            linear: 1 - p (1 - final)
#       |  /                        \           cosine: final + (1 - final)(1 + cos(pi p)) / 2
#  final| /                          \____      p = (step - D) / (S - D), in [0, 1]
#       0   W                        D    S
#
# warmup: step s < W runs at (s + 1) / W, so step 0 already moves (at 1/W, not at 0: a step at
# lr 0 would be wasted) and step W - 1 reaches the full rate.
#
# --flops_budget fixes the compute instead of the number of steps: max_steps becomes the number of
# steps the budget pays for (steps_for_budget, printed at the start), and what is measured in
# fractions of max_steps follows it: the warmdown covers the last warmdown_frac of those steps,
# so a run of a cheaper model takes more steps and still ends at the final lr. What is set in
# steps stays as set: warmup_steps, muon_momentum_warmup, the staged schedules, the intervals.

def lr_multiplier(cfg, step):
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    warmdown_start = cfg.max_steps - round(cfg.warmdown_frac * cfg.max_steps)
    if step < warmdown_start:
        return 1.0
    p = min(1.0, (step - warmdown_start) / max(1, cfg.max_steps - warmdown_start))
    if cfg.warmdown == "linear":
        return 1.0 - p * (1.0 - cfg.final_lr_frac)
    return cfg.final_lr_frac + (1.0 - cfg.final_lr_frac) * 0.5 * (1.0 + math.cos(math.pi * p))


def steps_for_budget(cfg, model, world_size):
    """How many optimizer steps --flops_budget pays for: the most steps whose FLOPs add up to at
    most the budget. A step at step s trains batch_size(s) * seq_len(s) * grad_accum * world_size
    tokens at model.flops_per_token(seq_len(s)) each (MoE: the active FLOPs); the staged
    schedules are constant between their start steps, so the budget is spent stage by stage.
    Example: 26.7 MFLOP/token x 4,096 tokens = 1.09e11 FLOPs a step; a budget of 1e12 buys 9."""
    starts = sorted({0} | {s for s, _ in cfg.seq_len_schedule} | {s for s, _ in cfg.batch_size_schedule})
    steps, left = 0, cfg.flops_budget
    for i, start in enumerate(starts):
        seq_len = staged(cfg.seq_len_schedule, start, cfg.seq_len)
        tokens = staged(cfg.batch_size_schedule, start, cfg.batch_size) * seq_len * cfg.grad_accum * world_size
        per_step = model.flops_per_token(seq_len) * tokens
        stage = starts[i + 1] - start if i + 1 < len(starts) else math.inf
        n = min(stage, int(left // per_step))
        steps, left = steps + n, left - n * per_step
        if n < stage:
            return steps
    return steps


def apply_flops_budget(cfg, model, rt):
    """cfg with max_steps = steps_for_budget (unchanged without --flops_budget); says so."""
    if not cfg.flops_budget:
        return cfg
    steps = steps_for_budget(cfg, model, rt.world_size)
    tokens = cfg.batch_size * cfg.seq_len * cfg.grad_accum * rt.world_size
    per_token = model.flops_per_token(cfg.seq_len)
    if steps < 1:
        raise bpe.UserError(f"--flops_budget={cfg.flops_budget:.3g} does not pay for one step "
                            f"({per_token * tokens:.3g} FLOPs: {tokens:,} tokens x {per_token:,} FLOPs/token); "
                            f"raise it, or train fewer tokens per step")
    rt.print(f"flops_budget {cfg.flops_budget:.3g} FLOPs: {steps:,} steps of {tokens:,} tokens at "
             f"{per_token / 1e6:.2f} MFLOP/token (max_steps={cfg.max_steps} replaced)")
    return dataclasses.replace(cfg, max_steps=steps)


def muon_momentum(cfg, step):
    """Low momentum early (the gradient direction changes fast), ramped linearly."""
    frac = min(1.0, step / cfg.muon_momentum_warmup) if cfg.muon_momentum_warmup > 0 else 1.0
    return (1 - frac) * cfg.muon_momentum_start + frac * cfg.muon_momentum


@dataclasses.dataclass
class StepPlan:
    """Everything a training step needs from the schedules."""
    lr_mult: float
    momentum: float
    seq_len: int
    batch_size: int
    window: object          # int, or None to use the model's configured window
    mtp_weight: float


def plan_step(cfg, step):
    return StepPlan(lr_mult=lr_multiplier(cfg, step), momentum=muon_momentum(cfg, step),
                    seq_len=staged(cfg.seq_len_schedule, step, cfg.seq_len),
                    batch_size=staged(cfg.batch_size_schedule, step, cfg.batch_size),
                    window=staged(cfg.window_schedule, step, None),
                    mtp_weight=staged(cfg.mtp_weight_schedule, step, cfg.mtp_weight))


def apply_schedules(optimizers, plan):
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * plan.lr_mult
            if "momentum" in group and isinstance(opt, Muon):
                group["momentum"] = plan.momentum


# -----------------------------------------------------------------------------
# 6. Evaluation

IGNORE_INDEX = -1   # a target the loss skips (the model's cross_entropy ignore_index)


def add_aux(total, aux, plan, model_cfg):
    """total + the model's auxiliary losses with their weights: mtp_weight * aux["mtp"] + the MoE
    coefficients * theirs. Added even at weight 0, so that DDP sees every parameter used."""
    weights = {"mtp": plan.mtp_weight, "moe_aux": getattr(model_cfg, "moe_aux_coef", 0.0),
               "moe_z": getattr(model_cfg, "moe_z_coef", 0.0)}
    for name, value in (aux or {}).items():
        if name in weights:
            total = total + weights[name] * value
    return total



def forward_loss(model, x, y, doc_ids, plan, model_cfg, mask=None):
    """(total loss to backpropagate, main next-token loss, aux dict).

    total = loss + mtp_weight * aux["mtp"] + the MoE coefficients * their aux losses.
    The model returns auxiliary losses unweighted; the weights live with the trainer
    because some of them follow a schedule.

    mask (B, T) of 0/1, for SFT: the loss is the mean over the targets whose mask is 1,
        loss = sum_t m_t * (-log p(y_t)) / sum_t m_t,
    the others are ignored (their logits get no gradient at all). With an all-ones mask this is
    the plain mean. A micro-batch with nothing to learn gives 0 (sum_t m_t is clamped to 1)."""
    if mask is None:
        loss, aux = model(x, y, doc_ids=doc_ids, window=plan.window)
    else:
        targets = y.masked_fill(mask == 0, IGNORE_INDEX)
        loss, aux = model(x, targets, doc_ids=doc_ids, window=plan.window, ignore_index=IGNORE_INDEX,
                          reduction="sum")
        loss = loss / mask.sum().clamp(min=1)
    return add_aux(loss, aux, plan, model_cfg), loss, aux


@torch.no_grad()
def evaluate(rt, model, val_x, val_y, batch_size, token_bytes, doc_mask, bos_id, val_mask=None):
    """Validation loss (nats per token) and bits per byte on the fixed val windows.

        bpb = sum of nats over target tokens / (ln 2 * sum of bytes of the target tokens)

    Dividing by bytes instead of tokens makes models with different tokenizers
    comparable: it is the compression rate of the text itself. Special tokens decode
    to 0 bytes. Ranks split the windows and sum (nats, tokens, bytes). val_mask (N, T):
    only the targets whose mask is 1 count (SFT: the assistant's tokens)."""
    model.eval()
    nats = tokens = n_bytes = 0.0
    idx = np.arange(rt.rank, len(val_x), rt.world_size)
    for i in range(0, len(idx), batch_size):
        rows = idx[i:i + batch_size]
        x, y = to_device(rt, val_x[rows]), to_device(rt, val_y[rows])
        m = torch.ones_like(y) if val_mask is None else to_device(rt, val_mask[rows])
        doc_ids = doc_ids_from_bos(x, bos_id) if doc_mask else None
        with rt.autocast():
            loss, _ = model(x, y.masked_fill(m == 0, IGNORE_INDEX), doc_ids=doc_ids, reduction="sum",
                            ignore_index=IGNORE_INDEX)
        nats += loss.item()
        tokens += m.sum().item()
        n_bytes += (token_bytes[y] * m).sum().item()
    model.train()
    nats, tokens, n_bytes = all_reduce_sum(rt, [nats, tokens, n_bytes])
    return nats / tokens, nats / (math.log(2) * max(n_bytes, 1.0))


def greedy_sample(rt, model, tokenizer, prompt, n_tokens):
    """The prompt and its greedy continuation, generated by sample.py's KV-cached generator (one
    home for generation). Like a training document, the prompt starts after a BOS."""
    ids = [tokenizer.eot_id] + tokenizer.encode(prompt)
    model.eval()
    with rt.autocast():
        done = sample.generate_text(model, tokenizer, ids, n_tokens, cache_dtype=rt.dtype)
    model.train()
    return prompt + done[0].text


# -----------------------------------------------------------------------------
# 7. Metrics and pictures
#
# MFU (model FLOPs utilisation) = achieved model FLOP/s / peak FLOP/s of the hardware, with the
# achieved rate = tokens/s * flops_per_token (6 N for the matmuls of forward + backward plus the
# attention term; see model.flops_per_token). The peak of a known GPU comes from its data sheet.
# A CPU has no data sheet figure we can trust, so its "peak" is the fastest of many timings of a
# large matmul in the run's precision, taken before training: MFU on CPU reads "fraction of what
# this CPU's matmul reaches". Other processes can only make a timing slower, so the fastest of
# many is the one to trust; if the machine was busy all along, the peak comes out too low and
# MFU above 100%: that is impossible, so it is shown as n/a rather than as a wrong number.

# Peak dense tensor-core FLOP/s per GPU (vendor data sheets, no sparsity) in the precision the
# Runtime picks there: bf16, or fp16 on V100 and T4, which have no bf16. First match wins, so
# the more specific names come first. Other GPUs fall back to a timed matmul, like CPUs.
GPU_PEAK_FLOPS = {"H100 PCIe": 756e12, "H200": 989e12, "H100": 989e12, "A100": 312e12,
                  "L40S": 362e12, "L4": 121e12, "A10": 125e12, "V100": 125e12, "T4": 65e12}
PEAK_MATMUL_N = 1024   # size of the square matmul timed as a CPU's peak
PEAK_REPEATS = 20      # timings of it; the fastest counts


def peak_flops(rt):
    """Peak FLOP/s of one device, for MFU (see above); None on devices we cannot time (mps)."""
    if rt.device.type == "cuda":
        name = torch.cuda.get_device_name(rt.device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops
    elif rt.device.type != "cpu":
        return None
    n = PEAK_MATMUL_N
    a = torch.randn(n, n, device=rt.device, dtype=rt.dtype)
    b = torch.randn(n, n, device=rt.device, dtype=rt.dtype)
    best = math.inf
    for i in range(PEAK_REPEATS + 1):  # the first call is a warm-up (allocation, kernel choice)
        t0 = time.perf_counter()
        a @ b
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        if i:
            best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best  # (n, n) @ (n, n) is n^3 multiply-adds


def mfu(tokens_per_s, flops_per_token, peak, world_size=1):
    """Model FLOPs utilisation as a fraction, or None when it cannot be known: no peak, or a
    value above 1 (a peak timed on a busy machine; see above)."""
    if not peak:
        return None
    value = tokens_per_s * flops_per_token / (peak * world_size)
    return value if value <= 1.0 else None


def format_mfu(value):
    return "n/a" if value is None else f"{100 * value:.1f}%"


def format_seconds(s):
    return str(datetime.timedelta(seconds=int(max(0, s))))


def write_text_atomic(path, text):
    bpe.atomic_write_bytes(path, text.encode("utf-8"))


def read_metrics(path):
    """The records of a metrics.jsonl, and how many lines were dropped. Each record was appended
    as one whole line, so a crash or a full disk can only tear the last line: a line without its
    newline, or one that is not a JSON object with a step, is dropped rather than trusted."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    records, dropped = [], int(lines[-1] != b"")   # the text after the last newline is torn
    for line in lines[:-1]:
        try:
            rec = json.loads(line)
            if not (isinstance(rec, dict) and isinstance(rec.get("step"), int)):
                raise ValueError("not a record")
            records.append(rec)
        except ValueError:                         # JSONDecodeError and bad UTF-8 are ValueErrors
            dropped += 1
    return records, dropped


ACC_PREFIX = "acc_"   # metrics.jsonl keys of the task accuracies (--eval_tasks): acc_<task>


class MetricsLog:
    """metrics.jsonl: one JSON object per line; train and eval records share 'step'. Each
    write appends one whole line in one call, so an interruption can only tear the last line."""

    def __init__(self, path, resume_step=None):
        """A fresh log, or (resume_step given) the old one cut back to that step (a run that
        crashed after its last checkpoint logged steps that will now be redone), without a
        torn last line."""
        self.path = path
        self.train, self.val = [], []   # (step, loss) for the plots
        self.accuracy = {}              # task -> [(step, accuracy)] (--eval_tasks)
        kept = []
        if resume_step is not None and os.path.exists(path):
            records, dropped = read_metrics(path)
            if dropped:
                print(f"note: dropped {dropped} damaged line(s) of {path} (an interrupted write)",
                      file=sys.stderr)
            kept = [rec for rec in records if rec["step"] <= resume_step]
        write_text_atomic(path, "".join(json.dumps(rec) + "\n" for rec in kept))
        for rec in kept:
            self._remember(rec)

    def _remember(self, rec):
        if "loss" in rec:
            self.train.append((rec["step"], rec["loss"]))
        if "val_loss" in rec:
            self.val.append((rec["step"], rec["val_loss"]))
        for key, value in rec.items():
            if key.startswith(ACC_PREFIX):
                self.accuracy.setdefault(key[len(ACC_PREFIX):], []).append((rec["step"], value))

    def write(self, rec):
        self._remember(rec)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def _nice_ticks(lo, hi, n=5):
    """About n round tick values covering [lo, hi]."""
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


ACC_COLORS = ("#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")  # task accuracy curves


def loss_svg(train, val, title="loss", accuracy=None):
    """An SVG line plot of train and val loss vs step, drawn by hand: map data to
    pixels with x_px = left + (step - s0) / (s1 - s0) * width (y likewise, flipped
    because SVG's y axis points down), then one <polyline> per curve.
    accuracy: {task: [(step, acc)]} (--eval_tasks), drawn dashed against a right-hand
    axis from 0 to 1."""
    accuracy = accuracy or {}
    W, H, left, right, top, bottom = 640, 400, 60, 50 if accuracy else 20, 30, 40
    points = train + val
    s0, s1 = 0, max([s for s, _ in points + [p for c in accuracy.values() for p in c]] + [1])
    losses = [v for _, v in points if math.isfinite(v)] or [0.0, 1.0]
    y0, y1 = min(losses), max(losses)
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.5, y1 + 0.5
    px = lambda s: left + (s - s0) / (s1 - s0) * (W - left - right)
    py = lambda v: top + (y1 - v) / (y1 - y0) * (H - top - bottom)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="18" text-anchor="middle">{xml.sax.saxutils.escape(title)}</text>',
           f'<line x1="{left}" y1="{H - bottom}" x2="{W - right}" y2="{H - bottom}" stroke="black"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{H - bottom}" stroke="black"/>']
    for v in _nice_ticks(y0, y1):
        out.append(f'<line x1="{left - 4}" y1="{py(v):.1f}" x2="{W - right}" y2="{py(v):.1f}" '
                   f'stroke="#ddd"/><text x="{left - 6}" y="{py(v) + 4:.1f}" '
                   f'text-anchor="end">{v:g}</text>')
    for s in _nice_ticks(s0, s1):
        out.append(f'<text x="{px(s):.1f}" y="{H - bottom + 16}" text-anchor="middle">{s:g}</text>')
    out.append(f'<text x="{W / 2}" y="{H - 6}" text-anchor="middle">step</text>')
    for name, curve, color, y_legend in (("train", train, "#1f77b4", 40), ("val", val, "#ff7f0e", 56)):
        pts = " ".join(f"{px(s):.1f},{py(v):.1f}" for s, v in curve if math.isfinite(v))
        out.append(f'<polyline id="{name}" fill="none" stroke="{color}" stroke-width="1.5" '
                   f'points="{pts}"/>')
        out.append(f'<text x="{W - right - 60}" y="{y_legend}" fill="{color}">{name} loss</text>')
    if accuracy:
        pa = lambda a: top + (1.0 - a) * (H - top - bottom)    # accuracy 0..1, right axis
        out.append(f'<line x1="{W - right}" y1="{top}" x2="{W - right}" y2="{H - bottom}" stroke="black"/>')
        for a in (0.0, 0.25, 0.5, 0.75, 1.0):
            out.append(f'<text x="{W - right + 6}" y="{pa(a) + 4:.1f}">{a:g}</text>')
        out.append(f'<text x="{W - 12}" y="{top + (H - top - bottom) / 2}" text-anchor="middle" '
                   f'transform="rotate(90 {W - 12} {top + (H - top - bottom) / 2})">accuracy</text>')
        for i, (task, curve) in enumerate(sorted(accuracy.items())):
            color, y_legend = ACC_COLORS[i % len(ACC_COLORS)], 72 + 16 * i
            pts = " ".join(f"{px(s):.1f},{pa(a):.1f}" for s, a in curve if math.isfinite(a))
            out.append(f'<polyline id="acc_{xml.sax.saxutils.escape(task)}" fill="none" stroke="{color}" '
                       f'stroke-dasharray="4 3" stroke-width="1.5" points="{pts}"/>')
            out.append(f'<text x="{W - right - 60}" y="{y_legend}" fill="{color}">'
                       f'{xml.sax.saxutils.escape(task)} acc</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def text_plot(train, val, width=60, height=10):
    """The same curves as characters: '.' train, 'o' val (val drawn on top)."""
    points = [(s, v) for s, v in train + val if math.isfinite(v)]
    if not points:
        return ""
    s1 = max(s for s, _ in points) or 1
    y0, y1 = min(v for _, v in points), max(v for _, v in points)
    y1 = y1 if y1 > y0 else y0 + 1.0
    grid = [[" "] * width for _ in range(height)]
    for curve, mark in ((train, "."), (val, "o")):
        for s, v in curve:
            if math.isfinite(v):
                col = min(width - 1, int(s / s1 * (width - 1)))
                row = min(height - 1, int((y1 - v) / (y1 - y0) * (height - 1)))
                grid[row][col] = mark
    lines = [f"{y1 - r * (y1 - y0) / (height - 1):7.3f} |" + "".join(g) for r, g in enumerate(grid)]
    lines.append(" " * 8 + "+" + "-" * width)
    lines.append(" " * 9 + f"step 0{' ' * (width - 12 - len(str(s1)))}{s1}   (. train  o val)")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# 8. Checkpoints
#
# The file format, the atomic save with its checksum and the verified load are model.py's
# (section 13), shared with sample.py. Training adds what a run needs to continue exactly: the
# optimizers' state, the step (which is the whole data position: batches are a function of the
# step), the RNG states, and the Runtime's resolved choices. Only rank 0 writes. Two promises:
# a new run never replaces an earlier one unless told to, and weights that have become nan or
# inf are never saved (the files keep the last finite ones).

RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "loss.svg")


class NonFinite(bpe.UserError):
    """The loss, the gradient or the weights became nan/inf; the message says what to do."""


def check_out_dir(cfg):
    """Refuse to start a new run over an earlier one: --resume=True continues it, --overwrite=True
    replaces it (its files are deleted when the run starts). Returns the earlier run's files."""
    existing = [n for n in RUN_FILES if os.path.exists(os.path.join(cfg.out_dir, n))]
    if existing and not (cfg.resume or cfg.overwrite or cfg.bench):
        raise bpe.UserError(f"{cfg.out_dir}/ already holds a run ({', '.join(existing)}); continue it "
                            f"with --resume=True, replace it with --overwrite=True, or choose "
                            f"another --out_dir")
    return existing


def claim_out_dir(cfg, existing):
    """Rank 0, before the first write: create out_dir, delete what --overwrite=True replaces, and
    remove the temp files of saves that were killed (kill -9) in earlier runs."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    if cfg.overwrite:
        for name in existing:
            os.remove(os.path.join(cfg.out_dir, name))
    bpe.remove_stale_temp_files(cfg.out_dir)


def clean_state_dict(model):
    """state_dict without wrapper prefixes, so sample.py loads it into a bare GPT."""
    out = {}
    for k, v in unwrap(model).state_dict().items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def rng_state():
    np_state = np.random.get_state()
    state = {"python": _plain(random.getstate()),
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _plain(obj):
    """tuples -> lists, recursively (plain types survive weights_only loading)."""
    return [_plain(o) for o in obj] if isinstance(obj, (list, tuple)) else obj


def set_rng_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def weights_finite(params):
    """Whether every weight is a finite number (one device sync)."""
    return bool(torch.stack([torch.isfinite(p).all() for p in params]).all())


def save(run, name):
    """Write <out_dir>/<name> (last.pt or best.pt) for the current step; never non-finite weights."""
    if not weights_finite(run.params):
        raise NonFinite(f"the weights became nan or inf by step {run.step} (an update overflowed "
                        f"before the loss showed it); not saving {name}: the checkpoints in "
                        f"{run.cfg.out_dir}/ keep the last finite weights; lower the learning rates")
    checkpoint = {
        "model": clean_state_dict(run.raw_model), "model_config": dataclasses.asdict(run.model_cfg),
        "runtime": run.rt.settings(), "train_config": dataclasses.asdict(run.cfg),
        "optimizers": [opt.state_dict() for opt in run.optimizers], "step": run.step,
        "rng": rng_state(), "tokenizer": run.tokenizer.as_vocab_merges(),
        "tokenizer_path": run.tokenizer_path, "tokenizer_fingerprint": run.tokenizer.fingerprint,
        "bos_id": run.bos_id,
        "best_val_loss": run.best_val_loss, "val_bpb": run.val_bpb}
    if run.reference is not None:  # DPO's (and RL's KL) reference: a resumed run needs the same one
        checkpoint["reference"] = run.reference.state_dict()
    save_checkpoint(os.path.join(run.cfg.out_dir, name), checkpoint)


# -----------------------------------------------------------------------------
# 9. Objectives: what a step optimises (pretrain, SFT, DPO, RL)
#
# The loop (section 10) is the same for every objective. What differs is what a micro-batch is,
# which loss it gives and how held-out data judges the model, so each objective is one small class,
# chosen once by --objective (OBJECTIVES, at the end of this section):
#     batch(run, plan, micro)  the micro-batch, on the device: a pure function of (seed, step,
#                              rank, micro-step), like section 3's batches, so every objective
#                              resumes exactly
#     loss(run, batch, plan)   (total to backpropagate, the loss to log, {stat: tensor} to log)
#     evaluate(run)            (the number best.pt minimises, logged as val_loss; {metric: value}
#                              for metrics.jsonl; the log line)
#     sample(run)              the greedy text printed every sample_interval steps
#
# pretrain  next-token cross-entropy on windows of the token stream, as nanoGPT.
# sft       the same on whole conversations, packed into rows with document masks (a conversation
#           never attends to another) and with the loss mask of prepare.py's chat template: the
#           targets are the assistant's tokens and its <|end|>, the user's words are only read
#           (forward_loss's mask). Held out: the masked val loss, and on synthetic tasks the
#           pass@1 of greedy replies to val-split prompts (the skill, not only the loss).
#
# dpo       Direct Preference Optimisation (Rafailov et al. 2023). For a prompt x and two replies,
#           y_w (chosen) and y_l (rejected), the "implicit reward" of a reply is
#               r(y) = beta * (log pi(y | x) - log pi_ref(y | x))
#           with pi the model being trained, pi_ref a frozen copy of the starting model, and
#           log pi(y | x) the summed log-probability of the reply's tokens (its loss mask). The loss
#               L = -log sigmoid(r(y_w) - r(y_l))
#           is the logistic (Bradley-Terry) loss of preferring y_w: it raises the chosen reply's
#           likelihood and lowers the rejected one's, each relative to the reference, so the model
#           cannot win by raising both, and beta sets how far it may move (a small beta lets the log
#           ratios grow large). At the start pi = pi_ref, both rewards are 0 and L = ln 2 = 0.693
#           (test_train_dpo_loss_by_hand). Logged on train and held-out pairs: the reward accuracy
#           (the share of pairs with r(y_w) > r(y_l)) and the margin, mean r(y_w) - r(y_l).
#
# rl        GRPO, group relative policy optimisation (Shao et al. 2024, DeepSeekMath), on tasks a
#           program checks. A micro-batch draws batch_size prompts from the train split of the
#           data's tasks and samples rl_group replies to each with sample.py's KV-cached generator
#           (at rl_temperature, ending at <|end|>, at most rl_max_tokens). The task's checker gives
#           each reply a reward R: 1 if it is right and ended with <|end|>, else 0. Within the group
#           of k replies to one prompt the advantage is
#               A_i = (R_i - mean(R)) / (std(R) + eps)         (std over the group: divided by k)
#           The group mean is the baseline, so no learned value function (critic) is needed; a
#           group whose replies are all right or all wrong has A = 0: it shows nothing to prefer.
#           Worked example (test_train_grpo_advantages_by_hand): rewards (1, 0, 0, 0): mean 0.25,
#           std sqrt(0.25 * 0.75) = 0.433, A = (1.732, -0.577, -0.577, -0.577). The loss over every
#           reply token t of every reply i, N the number of reply tokens:
#               L = -sum_it A_i log pi(y_it) / N  +  rl_kl * sum_it k3_it / N
#               k3 = exp(d) - d - 1,   d = log pi_ref(y_it) - log pi(y_it)
#           Its gradient is the policy gradient A_i grad log pi (REINFORCE with the group baseline),
#           each token weighted alike (a token-level mean, as DAPO, Yu et al. 2025: a per-reply
#           mean would give the tokens of long replies less weight each). GRPO's clipped ratio
#           pi / pi_old is 1 here: every batch is sampled by the current weights and used for one
#           update (on-policy), so the clip never acts and is left out. k3 estimates KL(pi || pi_ref)
#           without bias from samples of pi (E[exp(d)] = 1 under pi), and is never negative.
#           Held out: pass@1 of greedy replies to val-split prompts.
#
# The reference model of DPO (and of RL with rl_kl > 0) is the starting model, frozen; it travels
# in the checkpoints, so a resumed run keeps exactly the same reference.

GRPO_EPS = 1e-4   # keeps A finite for a group of equal rewards (std 0), whose advantages are 0 anyway


def token_logprobs(model, x, y, mask):
    """log p(y_t | x_<=t) for every target, (B, T), 0 where mask is 0; and the model's aux losses."""
    ce, aux = model(x, y.masked_fill(mask == 0, IGNORE_INDEX), ignore_index=IGNORE_INDEX, reduction="none")
    return -ce, aux   # cross_entropy is 0 at ignored targets


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """DPO from summed reply log-probabilities, (P,) each -> (mean loss, reward accuracy, mean margin)."""
    margin = beta * (policy_chosen - ref_chosen) - beta * (policy_rejected - ref_rejected)   # r(y_w) - r(y_l)
    return -F.logsigmoid(margin).mean(), (margin > 0).float().mean(), margin.mean()


def grpo_advantages(rewards):
    """(P, k) rewards of k replies to each of P prompts -> (P, k) advantages (see above)."""
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True, correction=0)
    return (rewards - mean) / (std + GRPO_EPS)


def grpo_loss(logp, ref_logp, mask, advantages, kl_coef):
    """Token-level GRPO loss (see above). logp, ref_logp (None without a KL term), mask: (R, T);
    advantages: (R,). Returns (loss, the mean k3 KL estimate)."""
    m = mask.float()
    n = m.sum().clamp(min=1)
    loss = -(advantages[:, None] * logp * m).sum() / n
    if ref_logp is None:
        return loss, torch.zeros((), device=logp.device)
    d = ref_logp - logp
    kl = ((torch.exp(d) - d - 1) * m).sum() / n
    return loss + kl_coef * kl, kl


def resolved_batch_mode(cfg):
    """--batch_mode=auto: packed whole conversations for SFT, random windows otherwise."""
    if cfg.batch_mode != "auto":
        return cfg.batch_mode
    return "packed" if cfg.objective == "sft" else "random"


def require_kind(meta, cfg, kind, hint):
    """One line if the data directory holds another kind of data than the objective needs."""
    have = meta.get("kind", "text")
    if have != kind:
        raise bpe.UserError(f"--objective={cfg.objective} needs {hint}, but {cfg.data_dir} holds "
                            f"{'plain text' if have == 'text' else have + ' data'}; {HINTS[have]}")


HINTS = {"text": "pretrain on it (--objective=pretrain)", "chat": "use it with --objective=sft or rl",
         "pairs": "use it with --objective=dpo"}


def chat_reply(run, prompt_ids, sampling=sample.GREEDY, n=1, seed=0):
    """n replies of the bare model to a rendered chat prompt (sample.py's generator, ending at
    <|end|>), as sample.Completion (finish "eot" when the reply ended with <|end|>)."""
    raw, end = run.raw_model, prepare.chat_ids(run.tokenizer)["end"]
    was_training = raw.training
    raw.eval()
    with run.rt.autocast():
        done = sample.generate_text(raw, run.tokenizer, prompt_ids, run.cfg.rl_max_tokens, sampling, n,
                                    seed=seed, cache_dtype=run.rt.dtype, end_ids=(end,))
    raw.train(was_training)
    return done


def first_prompt(docs, tokenizer):
    """The prompt of the first document: its tokens up to and including the first <|assistant|>."""
    ids = docs[0][0].tolist()
    cut = ids.index(prepare.chat_ids(tokenizer)["assistant"]) + 1
    return ids[:cut]


def show_reply(run, prompt_ids):
    """A chat prompt and the model's greedy reply, as text (special tokens written out)."""
    return run.tokenizer.decode(prompt_ids) + chat_reply(run, prompt_ids)[0].text


class TaskPrompts:
    """The data's synthetic tasks (meta.json's "chat", prepare.py section 11) as chat prompts: train
    problems drawn by a seeded generator, a fixed held-out set from the val split (eval_examples,
    spread over the tasks), and rewards from the tasks' checkers."""

    def __init__(self, run, chat):
        self.tasks, self.digits, self.task_seed = chat["tasks"], chat["task_digits"], chat["task_seed"]
        per_task = -(-run.cfg.eval_examples // len(self.tasks))
        self.held_out = [p for name in self.tasks
                         for p in prepare.task_problems(name, "val", per_task, self.task_seed, self.digits)]
        self.end = prepare.chat_ids(run.tokenizer)["end"]

    def prompt(self, run, problem):
        return prepare.render([{"role": "user", "content": problem.question}], run.tokenizer, reply=True)[0]

    def reward(self, problem, completion):
        """1.0 if the reply ended with <|end|> and the task's checker says it is right, else 0.0."""
        return float(completion.finish == "eot" and prepare.TASKS[problem.task].check(problem, completion.text))

    @torch.no_grad()
    def pass_at_1(self, run):
        """Greedy replies to the held-out prompts (ranks split them): ({"val_pass1": p, "val_pass1_<task>":
        p_task, ...}, a log text)."""
        rt = run.rt
        right = {name: [0.0, 0.0] for name in self.tasks}     # task -> [right, asked]
        for problem in self.held_out[rt.rank::rt.world_size]:
            right[problem.task][0] += self.reward(problem, chat_reply(run, self.prompt(run, problem))[0])
            right[problem.task][1] += 1
        totals = all_reduce_sum(rt, [v for name in self.tasks for v in right[name]])
        per_task = {name: totals[2 * k] / max(1.0, totals[2 * k + 1]) for k, name in enumerate(self.tasks)}
        pass1 = sum(totals[0::2]) / max(1.0, sum(totals[1::2]))
        detail = ", ".join(f"{k} {v:.3f}" for k, v in per_task.items())
        return ({"val_pass1": pass1, **{f"val_pass1_{k}": v for k, v in per_task.items()}},
                f"val pass@1 {pass1:.3f} ({detail}; greedy, {len(self.held_out)} held-out prompts)")


class Pretrain:
    """--objective=pretrain: next-token loss on the token stream; val loss and bits per byte."""
    masked = False

    def __init__(self, run, meta, train_shards, val_shards):
        cfg = run.cfg
        require_kind(meta, cfg, "chat" if self.masked else "text",
                     "conversations (prepare.py --chat=...)" if self.masked else "plain text (prepare.py)")
        self.batches = BatchSource(train_shards, resolved_batch_mode(cfg), cfg.seed)
        eval_len = staged(cfg.seq_len_schedule, cfg.max_steps, cfg.seq_len)  # the final context length
        self.val_x, self.val_y = val_windows(val_shards, eval_len, cfg.eval_tokens)
        self.val_m = val_windows(val_shards, eval_len, cfg.eval_tokens, "mask")[1] if self.masked else None
        self.described = f"{len(self.val_x)} val windows of {eval_len}"

    def batch(self, run, plan, micro):
        cfg, rt = run.cfg, run.rt
        arrays = self.batches.get(run.step, rt.rank * cfg.grad_accum + micro, plan.batch_size, plan.seq_len,
                                  with_mask=self.masked)
        x, y, *mask = [to_device(rt, a) for a in arrays]
        return x, y, mask[0] if mask else None, doc_ids_from_bos(x, run.bos_id) if run.doc_mask else None

    def loss(self, run, batch, plan):
        x, y, mask, doc_ids = batch
        total, loss, _ = forward_loss(run.model, x, y, doc_ids, plan, run.model_cfg, mask)
        return total, loss, {}

    def evaluate(self, run):
        loss, bpb = evaluate(run.rt, run.raw_model, self.val_x, self.val_y, run.cfg.batch_size,
                             run.token_bytes, run.doc_mask, run.bos_id, self.val_m)
        return loss, {"val_loss": loss, "val_bpb": bpb}, f"val loss {loss:.4f} | val bpb {bpb:.4f}"

    def sample(self, run):
        return greedy_sample(run.rt, run.raw_model, run.tokenizer, run.cfg.sample_prompt, run.cfg.sample_tokens)


class SFT(Pretrain):
    """--objective=sft: Pretrain's loss on whole conversations, masked to the assistant's tokens;
    on synthetic tasks the evaluation adds the held-out pass@1, to watch the skill being learned."""
    masked = True

    def __init__(self, run, meta, train_shards, val_shards):
        super().__init__(run, meta, train_shards, val_shards)
        self.prompt = first_prompt(documents(val_shards), run.tokenizer)
        chat = meta.get("chat") or {}
        self.tasks = TaskPrompts(run, chat) if chat.get("tasks") else None

    def evaluate(self, run):
        loss, metrics, line = super().evaluate(run)
        if self.tasks is not None:
            more, text = self.tasks.pass_at_1(run)
            metrics, line = {**metrics, **more}, f"{line} | {text}"
        return loss, metrics, line

    def sample(self, run):
        return show_reply(run, self.prompt)


def spread_evenly(items, n):
    """At most n of items, evenly spaced from the first: every (len // n)-th. Held-out pairs are
    chosen so because prepare.py writes the val split task by task (or in the order of a JSONL
    file): the first n alone could all be one task. Example: 10 items, n = 3 -> items 0, 3, 6."""
    return items[::max(1, len(items) // n)][:n]


class DPO:
    """--objective=dpo: the DPO loss on preference pairs against a frozen reference (see above)."""

    def __init__(self, run, meta, train_shards, val_shards):
        cfg = run.cfg
        require_kind(meta, cfg, "pairs", "preference pairs (prepare.py --pairs=...)")
        self.train, val = self.pairs(documents(train_shards), cfg), self.pairs(documents(val_shards), cfg)
        self.val = spread_evenly(val, cfg.eval_examples)
        self.prompt = first_prompt([val[0][0]], run.tokenizer)
        self.described = f"{len(self.train):,} train pairs, {len(self.val)} held-out pairs"

    @staticmethod
    def pairs(docs, cfg):
        """Documents 2k (chosen) and 2k + 1 (rejected) are pair k (prepare.py section 11)."""
        if len(docs) % 2:
            raise bpe.UserError(f"{cfg.data_dir}: an odd number of documents, not pairs; re-run prepare.py --pairs")
        longest = max(len(t) for t, _ in docs)
        if longest > cfg.block_size + 1:
            raise bpe.UserError(f"{cfg.data_dir}: a pair's reply ends {longest} tokens in, past the model's "
                                f"context of {cfg.block_size}; shorten the prompts and replies")
        return list(zip(docs[0::2], docs[1::2]))

    def rows(self, run, pairs):
        """Chosen rows, then rejected rows, padded: x, y, mask (2P, L) on the device."""
        x, y, m = pad_rows([c for c, _ in pairs] + [r for _, r in pairs], limit=run.model_cfg.block_size)
        return [to_device(run.rt, a) for a in (x, y, m)]

    def batch(self, run, plan, micro):
        rng = np.random.default_rng([run.cfg.seed, run.step, run.rt.rank * run.cfg.grad_accum + micro])
        return self.rows(run, [self.train[k] for k in rng.integers(len(self.train), size=plan.batch_size)])

    def margins(self, run, model, batch):
        """(loss, reward accuracy, margin, aux) of model on a batch of rows."""
        x, y, m = batch
        logp, aux = token_logprobs(model, x, y, m)
        with torch.no_grad():
            ref, _ = token_logprobs(run.reference, x, y, m)
        logp, ref, P = logp.sum(dim=1), ref.sum(dim=1), len(x) // 2   # (2P,) summed over each reply
        return (*dpo_loss(logp[:P], logp[P:], ref[:P], ref[P:], run.cfg.dpo_beta), aux)

    def loss(self, run, batch, plan):
        loss, acc, margin, aux = self.margins(run, run.model, batch)
        return add_aux(loss, aux, plan, run.model_cfg), loss, {"reward_acc": acc, "margin": margin}

    @torch.no_grad()
    def evaluate(self, run):
        rt, sums = run.rt, [0.0, 0.0, 0.0, 0.0]          # loss, right, margin (each times pairs), pairs
        mine = self.val[rt.rank::rt.world_size]
        run.raw_model.eval()
        for i in range(0, len(mine), run.cfg.batch_size):
            part = mine[i:i + run.cfg.batch_size]
            with rt.autocast():
                loss, acc, margin, _ = self.margins(run, run.raw_model, self.rows(run, part))
            sums = [a + b * len(part) for a, b in zip(sums, (loss.item(), acc.item(), margin.item(), 1.0))]
        run.raw_model.train()
        loss, right, margin, n = all_reduce_sum(rt, sums)
        metrics = {"val_loss": loss / n, "val_reward_acc": right / n, "val_margin": margin / n}
        return loss / n, metrics, (f"val dpo loss {loss / n:.4f} | reward acc {right / n:.3f} | "
                                   f"margin {margin / n:.3f} ({int(n)} held-out pairs)")

    def sample(self, run):
        return show_reply(run, self.prompt)


class RL:
    """--objective=rl: GRPO on the data's tasks, rewards from their checkers (see above)."""

    def __init__(self, run, meta, train_shards, val_shards):
        cfg, chat = run.cfg, meta.get("chat") or {}
        require_kind(meta, cfg, "chat", "checkable tasks (prepare.py --chat=tasks:...)")
        if not chat.get("tasks"):
            raise bpe.UserError(f"--objective=rl needs prompts whose replies a program can check, but "
                                f"{cfg.data_dir} holds your own conversations; prepare --chat=tasks:add,...")
        self.tasks = TaskPrompts(run, chat)
        self.described = f"tasks {','.join(self.tasks.tasks)}, {len(self.tasks.held_out)} held-out prompts"

    def batch(self, run, plan, micro):
        """Roll out: rl_group sampled replies to each of batch_size train prompts, their rewards,
        and the rows (prompt + reply, the mask on the reply) to score them with."""
        cfg, tasks = run.cfg, self.tasks
        rng = random.Random(f"{cfg.seed}:{run.step}:{run.rt.rank * cfg.grad_accum + micro}")
        docs, rewards = [], []
        for _ in range(plan.batch_size):
            problem = prepare.draw_problem(rng.choice(tasks.tasks), "train", rng, tasks.digits)
            prompt = tasks.prompt(run, problem)
            for c in chat_reply(run, prompt, sample.Sampling(temperature=cfg.rl_temperature), cfg.rl_group,
                                seed=rng.getrandbits(62)):
                reply = c.ids + [tasks.end] * (c.finish == "eot")
                docs.append((np.array(prompt + reply), np.array([0] * len(prompt) + [1] * len(reply))))
                rewards.append(tasks.reward(problem, c))
        x, y, m = pad_rows(docs, limit=run.model_cfg.block_size)
        rewards = torch.tensor(rewards, device=run.rt.device).view(plan.batch_size, cfg.rl_group)   # (P, k)
        return (*[to_device(run.rt, a) for a in (x, y, m)], rewards)

    def loss(self, run, batch, plan):
        x, y, m, rewards = batch
        logp, aux = token_logprobs(run.model, x, y, m)
        ref = None
        if run.reference is not None:
            with torch.no_grad():
                ref, _ = token_logprobs(run.reference, x, y, m)
        loss, kl = grpo_loss(logp, ref, m, grpo_advantages(rewards).flatten(), run.cfg.rl_kl)
        return add_aux(loss, aux, plan, run.model_cfg), loss, {"reward": rewards.mean(), "kl": kl}

    def evaluate(self, run):
        metrics, line = self.tasks.pass_at_1(run)
        return 1.0 - metrics["val_pass1"], {"val_loss": 1.0 - metrics["val_pass1"], **metrics}, line

    def sample(self, run):
        return show_reply(run, self.tasks.prompt(run, self.tasks.held_out[0]))


OBJECTIVES = {"pretrain": Pretrain, "sft": SFT, "dpo": DPO, "rl": RL}


# -----------------------------------------------------------------------------
# 10. The training loop
#
# train(cfg) is the loop a reader should see whole, nanoGPT-shaped: between steps evaluate,
# sample and save; then one optimizer step: plan it (schedules), forward and backward over the
# micro-batches, clip, update, log. Everything else is a named function above or below it,
# and a Run carries the state they share.

class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, saves last.pt and exits with
    EXIT_INTERRUPTED (a scheduler can tell "stopped, resumable" from "finished"). A second
    signal interrupts immediately."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving and exiting",
              file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be installed from the main thread
        for sig in (signal.SIGINT, signal.SIGTERM):
            self.previous[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class MoEStats:
    """Mixture-of-experts bookkeeping for one optimizer step.

    Every MoE layer leaves detached statistics of its last forward in layer.stats
    ("counts": tokens kept per expert (E,), "dropped", "routed"). add() sums them over
    the micro-steps without a host sync; finish() sums them over ranks with ONE
    all_reduce, then nudges each layer's balancing bias once per optimizer step. Since
    every rank applies the same update to the same global counts, the biases stay
    identical on all ranks without being broadcast (tested with 2 gloo ranks).
    A dense model has no MoE layers and all of this does nothing."""

    def __init__(self, raw_model):
        self.layers = list(raw_model.moe_layers()) if hasattr(raw_model, "moe_layers") else []
        self.reset()

    def reset(self):
        self.counts = self.dropped = self.routed = None

    def add(self):
        if not self.layers:
            return
        counts = torch.stack([layer.stats["counts"].float() for layer in self.layers])  # (L, E)
        dropped = sum(layer.stats["dropped"].float() for layer in self.layers)
        routed = sum(torch.as_tensor(layer.stats["routed"]).float().to(counts.device)
                     for layer in self.layers)
        if self.counts is None:
            self.counts, self.dropped, self.routed = counts, dropped, routed
        else:
            self.counts, self.dropped, self.routed = (self.counts + counts, self.dropped + dropped,
                                                      self.routed + routed)

    def finish(self, rt, update_bias=True):
        """All-reduce, update the biases, return the numbers for the log (or {})."""
        if not self.layers or self.counts is None:
            return {}
        packed = torch.cat([self.counts.flatten(), self.dropped.view(1), self.routed.view(1)])
        if rt.ddp:
            dist.all_reduce(packed)
        counts = packed[:-2].view(self.counts.shape)   # (L, E) summed over micro-steps and ranks
        if update_bias:
            for layer, layer_counts in zip(self.layers, counts):
                layer.update_bias(layer_counts)
        # load of each expert relative to its fair share (1.0 = perfectly balanced)
        load = counts / counts.sum(-1, keepdim=True).clamp(min=1) * counts.size(-1)
        self.reset()
        return {"moe_dropped": (packed[-2] / packed[-1].clamp(min=1)).item(),
                "moe_min_load": load.min().item(), "moe_max_load": load.max().item()}


class PhaseTimer:
    """--bench only: where a step's time goes. mark(name) adds the time since the previous mark
    to phase `name` (waiting for the GPU first); end_step() files the step's phases. Off the
    bench every call returns at once: a device sync per phase would slow training down."""

    def __init__(self, enabled, device):
        self.enabled, self.device = enabled, device
        self.phases = collections.defaultdict(list)      # name -> seconds, one entry per step
        self.this_step = collections.defaultdict(float)
        self.last = 0.0

    def start(self):
        self.last = time.perf_counter()

    def mark(self, name):
        if not self.enabled:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.this_step[name] += now - self.last
        self.last = now

    def end_step(self):
        for name, seconds in self.this_step.items():
            self.phases[name].append(seconds)
        self.this_step.clear()

    def report(self, warmup):
        """Median ms per phase over the steps after `warmup` (the phases need not add up)."""
        return ", ".join(f"{name} {1000 * statistics.median(ts[warmup:] or ts):.1f}"
                         for name, ts in self.phases.items())


@dataclasses.dataclass
class Run:
    """The state one training run's steps share (made by start_run, advanced by train)."""
    cfg: TrainConfig
    rt: Runtime
    raw_model: GPT               # the bare model: saved, evaluated, sampled
    model: torch.nn.Module       # the same model compiled and/or wrapped in DDP: trained
    model_cfg: GPTConfig
    optimizers: list
    params: list                 # listed once: walking the modules every step costs time
    tokenizer: bpe.Tokenizer
    tokenizer_path: str
    bos_id: int
    token_bytes: torch.Tensor    # bytes of each token id, for bits per byte
    log: Optional[MetricsLog]    # rank 0 and not --bench only
    peak: Optional[float]        # FLOP/s of one device for MFU
    start_step: int
    end_step: int
    step: int
    best_val_loss: float = math.inf
    val_loss: float = math.nan
    val_bpb: float = math.nan
    skipped: int = 0             # non-finite steps skipped in a row
    step_tokens: int = 0         # tokens the model read in this step, all ranks (DPO, RL: padded rows)
    compile_checked: bool = False
    losses: list = dataclasses.field(default_factory=list)      # (step, loss) of each step run
    step_times: list = dataclasses.field(default_factory=list)  # seconds per step after the first
    tok_rates: list = dataclasses.field(default_factory=list)   # tokens/s of the same steps
    moe: Optional[MoEStats] = None
    timer: Optional[PhaseTimer] = None
    suite: Optional[dict] = None  # --eval_tasks: sample.py's multiple-choice tasks (rank 0)
    objective: object = None     # Pretrain, SFT, DPO or RL (section 9), made once by start_run
    reference: Optional[GPT] = None  # the frozen starting model of DPO and of RL with a KL penalty
    t_start: float = dataclasses.field(default_factory=time.time)

    @property
    def doc_mask(self):
        return resolved_batch_mode(self.cfg) == "packed"


def build_model(cfg, rt, vocab_size, checkpoint=None, checkpoint_path="", n_trained=None):
    """A GPT from the settings, or from a checkpoint's model_config + weights; on rt.device.
    n_trained: the data's tokenizer extends the checkpoint's, whose n_trained ids the model knows;
    the new ids get rows by model.grow_vocab (the mean of the trained ones)."""
    torch.manual_seed(cfg.seed)  # the same init on every rank
    if checkpoint is None:
        if cfg.vocab_size and cfg.vocab_size < vocab_size:
            raise bpe.UserError(f"--vocab_size={cfg.vocab_size} is smaller than the tokenizer's "
                                f"{vocab_size} tokens; leave it at 0 (= the tokenizer's size)")
        model_cfg = gpt_config(cfg, vocab_size=cfg.vocab_size or vocab_size)
        model = GPT(model_cfg, rt.kernels)
    else:
        model = model_from_checkpoint(checkpoint, checkpoint_path, rt.kernels)
        if n_trained is not None:
            grow_vocab(model, n_trained, vocab_size)
            rt.print(f"extended the vocabulary {n_trained} -> {vocab_size} tokens (new rows of wte and "
                     f"lm_head: the mean of the trained ones)")
        model_cfg = model.config
        ignored = [k for k, v in dataclasses.asdict(model_cfg).items()
                   if k != "vocab_size" and getattr(cfg, k) != v]
        if ignored:
            rt.print(f"note: the architecture comes from the checkpoint; ignoring --{', --'.join(ignored)}")
        if model_cfg.vocab_size < vocab_size:
            raise bpe.UserError(f"checkpoint vocab_size {model_cfg.vocab_size} < the data's "
                                f"{vocab_size} tokens; use data made with the checkpoint's tokenizer")
    return model.to(rt.device), model_cfg


def base_vocab(cfg, checkpoint, ckpt_path, tokenizer):
    """The checkpoint's tokenizer must be the data's, or (--init_from only) one that the data's
    extends with new special tokens (a base model fine-tuned on chat data): then the number of ids
    the model was trained with, for grow_vocab; else None."""
    if checkpoint is None or checkpoint.get("tokenizer_fingerprint") == tokenizer.fingerprint:
        return None
    base = checkpoint_tokenizer(checkpoint, ckpt_path) if checkpoint.get("tokenizer") else None
    if cfg.init_from and base is not None and tokenizer.extends(base):
        return base.vocab_size
    how = (f"prepare.py --tokenizer={ckpt_path[len(HF_PREFIX):]}/tokenizer.json" if ckpt_path.startswith(HF_PREFIX)
           else "for chat data: prepare.py --tokenizer=<that tokenizer> --chat=...")
    raise bpe.UserError(f"{ckpt_path} was trained with another tokenizer than {cfg.data_dir}'s; "
                        f"use data prepared with the checkpoint's tokenizer ({how})")


def build_reference(cfg, raw_model, checkpoint):
    """The frozen reference model of DPO (and of RL with a KL penalty), or None: the starting model
    itself, or on --resume the copy saved in the checkpoint."""
    if not (cfg.objective == "dpo" or (cfg.objective == "rl" and cfg.rl_kl > 0)):
        return None
    reference = copy.deepcopy(raw_model)
    if cfg.resume:
        reference.load_state_dict(checkpoint["reference"])
    return reference.eval().requires_grad_(False)


def start_run(cfg, rt=None):
    """Everything before the first step: the out_dir check, the data and tokenizer, the checkpoint
    to resume or start from, the Runtime, the model (and the reference of DPO), its optimizers, and
    the objective with its held-out data."""
    existing = check_out_dir(cfg)
    meta = prepare.load_meta(cfg.data_dir)
    tokenizer = prepare.load_tokenizer(cfg.data_dir)
    ckpt_path = os.path.join(cfg.out_dir, "last.pt") if cfg.resume else cfg.init_from
    checkpoint = open_checkpoint(ckpt_path) if ckpt_path else None
    n_trained = base_vocab(cfg, checkpoint, ckpt_path, tokenizer)
    rt = rt or runtime_for(cfg, checkpoint.get("runtime") if cfg.resume else None)
    if rt.is_main and not cfg.bench:
        claim_out_dir(cfg, existing)
    train_shards = prepare.load_split(cfg.data_dir, "train", expected_fingerprint=tokenizer.fingerprint)
    val_shards = prepare.load_split(cfg.data_dir, "val", expected_fingerprint=tokenizer.fingerprint)
    raw_model, model_cfg = build_model(cfg, rt, tokenizer.vocab_size, checkpoint, ckpt_path, n_trained)
    cfg = apply_flops_budget(cfg, raw_model, rt)
    optimizers = build_optimizers(cfg, raw_model, rt)
    step = checkpoint["step"] if cfg.resume else 0
    run = Run(cfg=cfg, rt=rt, raw_model=raw_model, model=wrap_ddp(rt, maybe_compile(rt, raw_model)),
              model_cfg=model_cfg, optimizers=optimizers, params=list(raw_model.parameters()),
              tokenizer=tokenizer, tokenizer_path=os.path.abspath(
                  os.path.join(cfg.data_dir, meta.get("tokenizer", "tokenizer.bpe"))),
              bos_id=int(meta.get("bos_id", tokenizer.eot_id)),
              token_bytes=torch.tensor(tokenizer.token_bytes(), dtype=torch.long, device=rt.device),
              log=None, peak=peak_flops(rt), start_step=step, step=step,
              end_step=step + cfg.bench_steps + 3 if cfg.bench else cfg.max_steps,
              compile_checked=not rt.compile, moe=MoEStats(raw_model),
              timer=PhaseTimer(cfg.bench, rt.device), reference=build_reference(cfg, raw_model, checkpoint))
    run.objective = OBJECTIVES[cfg.objective](run, meta, train_shards, val_shards)
    if cfg.resume:
        for opt, state in zip(optimizers, checkpoint["optimizers"]):
            opt.load_state_dict(state)
        run.best_val_loss = checkpoint.get("best_val_loss", math.inf)
        set_rng_state(checkpoint["rng"])
        rt.print(f"resumed from {ckpt_path} at step {step}")
    elif cfg.init_from:
        rt.print(f"initialised weights from {cfg.init_from} (step 0, fresh optimizer)")
    if rt.is_main and not cfg.bench:
        run.log = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"), step if cfg.resume else None)
        if cfg.eval_tasks:
            run.suite = sample.load_suite(cfg.eval_tasks, tokenizer, cfg.data_dir, cfg.eval_examples,
                                          cfg.seed, rt.print)
    peak = f"{run.peak / 1e12:.2f} TFLOP/s" if run.peak else "unknown"
    rt.print(f"device {rt.device} x {rt.world_size} | precision {str(rt.dtype)[6:]} ({rt.dtype_reason}) "
             f"| compile {rt.compile} | deterministic {rt.deterministic} | threads {rt.threads} | "
             f"peak {peak} per device")
    summary = raw_model.param_summary()
    memory = f" + {summary['memory']:,} memory" if summary["memory"] else ""   # Engram tables
    rt.print(f"model {summary['dense']:,}{memory} params | "
             f"{raw_model.flops_per_token(cfg.seq_len) / 1e6:.1f} MFLOP/token | "
             f"{cfg.batch_size * cfg.seq_len * cfg.grad_accum * rt.world_size:,} tokens/step | "
             f"objective {cfg.objective}: {run.objective.described}")
    return run


def accumulate_gradients(run, plan):
    """Forward + backward of grad_accum micro-batches of the objective (section 9); returns the
    sum of their losses and of their stats, as floats (one device sync per step, which the
    non-finite check needs anyway)."""
    cfg, rt = run.cfg, run.rt
    loss_sum, stats_sum = torch.zeros((), device=rt.device), {}
    run.step_tokens = 0
    run.timer.start()
    for micro in range(cfg.grad_accum):
        batch = run.objective.batch(run, plan, micro)
        run.step_tokens += batch[0].numel() * rt.world_size   # x (rows, T): every objective's first
        run.timer.mark("data")
        # DDP all-reduces gradients during backward; skip that on all but the last
        # micro-step, whose backward then averages the accumulated sums once
        last_micro = micro == cfg.grad_accum - 1
        with (run.model.no_sync() if rt.ddp and not last_micro else contextlib.nullcontext()):
            with rt.autocast():
                total, loss, stats = run.objective.loss(run, batch, plan)
            run.timer.mark("forward")
            # mean over micro-steps here and over ranks by DDP: N ranks x M micro-steps
            # give the gradient of the mean loss of one N*M times larger batch
            scaled = total / cfg.grad_accum
            (rt.scaler.scale(scaled) if rt.scaler else scaled).backward()
            run.timer.mark("backward")
        run.moe.add()
        loss_sum += loss.detach().float()
        for name, value in stats.items():
            stats_sum[name] = stats_sum.get(name, 0.0) + value.detach().float()
    return loss_sum.item(), {name: float(v) for name, v in stats_sum.items()}


def forward_backward(run, plan):
    """accumulate_gradients, with the compile fallback: torch.compile fails lazily, at the first
    call, so if the first step of a compiled run fails, warn once and redo it eagerly."""
    if run.compile_checked:
        return accumulate_gradients(run, plan)
    run.compile_checked = True
    try:
        return accumulate_gradients(run, plan)
    except Exception as e:
        message = str(e).splitlines()[0][:200] if str(e) else ""
        run.rt.print(f"warning: torch.compile failed ({type(e).__name__}: {message}); "
                     f"continuing without it")
        run.rt.compile = False
        run.model = wrap_ddp(run.rt, run.raw_model)
        for p in run.params:
            p.grad = None
        run.moe.reset()
        return accumulate_gradients(run, plan)


def sync_loss_and_stop(run, loss_sum, stats_sum, stop_requested):
    """The step's mean loss and stats over micro-steps and ranks, and whether any rank was asked to
    stop (then every rank stops after this same step). One collective for all of them."""
    names = sorted(stats_sum)
    loss_sum, votes, *sums = all_reduce_sum(run.rt, [loss_sum, float(stop_requested)] +
                                            [stats_sum[k] for k in names])
    n = run.cfg.grad_accum * run.rt.world_size
    return loss_sum / n, {k: v / n for k, v in zip(names, sums)}, votes > 0


def clip_gradients(run):
    """Unscale (fp16), clip to grad_clip; returns the norm before clipping."""
    if run.rt.scaler:
        for opt in run.optimizers:
            run.rt.scaler.unscale_(opt)
    norm = clip_grad_norm(run.params, run.cfg.grad_clip)
    run.timer.mark("loss sync, clip")
    return norm


def optimizer_step(run, loss, grad_norm):
    """Update the weights, unless the loss or the gradient is not finite: then stop, or with
    --skip_nonfinite=True skip the step (giving up after max_skips in a row). With fp16 an inf
    gradient is routine: the GradScaler skips that step itself and lowers its scale.
    Returns whether the weights were updated."""
    cfg, rt = run.cfg, run.rt
    finite = math.isfinite(loss) and (math.isfinite(grad_norm) or rt.scaler is not None)
    if finite:
        run.skipped = 0
        for opt in run.optimizers:
            rt.scaler.step(opt) if rt.scaler else opt.step()
    else:
        run.skipped += 1
        what = f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {run.step}"
        keep = f"the checkpoints in {cfg.out_dir}/ keep the last finite weights"
        if not cfg.skip_nonfinite:
            raise NonFinite(f"{what}; {keep}; lower the learning rates, or pass "
                            f"--skip_nonfinite=True to skip such steps")
        if run.skipped > cfg.max_skips:
            raise NonFinite(f"{what}, the {run.skipped}th step in a row; giving up (--max_skips="
                            f"{cfg.max_skips}); {keep}; lower the learning rates")
        rt.print(f"step {run.step}: {what}; step skipped ({run.skipped} in a row)")
    if rt.scaler:
        rt.scaler.update()
    for p in run.params:
        p.grad = None
    run.timer.mark("optimizer steps")
    return finite


def evaluate_and_keep_best(run):
    """The objective's held-out evaluation (pretrain and SFT: val loss and bits per byte); rank 0
    logs it, redraws the chart, saves best.pt when its number is the lowest yet."""
    run.val_loss, metrics, line = run.objective.evaluate(run)
    run.val_bpb = metrics.get("val_bpb", math.nan)
    run.rt.print(f"step {run.step} | {line}")
    if run.rt.is_main:
        record = {"step": run.step, **metrics}
        if run.suite:  # --eval_tasks: multiple choice by log-likelihood (sample.py section 13)
            accuracy = sample.run_eval_suite(run.raw_model, run.tokenizer, run.suite, run.rt)
            record.update({ACC_PREFIX + task: acc for task, acc in accuracy.items()})
            run.rt.print(f"step {run.step} | " + " | ".join(f"{task} acc {acc:.3f}"
                                                             for task, acc in accuracy.items()))
        run.log.write({**record, "elapsed": time.time() - run.t_start})
        write_plots(run)
        if run.val_loss < run.best_val_loss and run.step > 0:
            run.best_val_loss = run.val_loss
            save(run, "best.pt")


def write_plots(run):
    write_text_atomic(os.path.join(run.cfg.out_dir, "loss.svg"),
                      loss_svg(run.log.train, run.log.val, accuracy=run.log.accuracy))


def log_step(run, plan, loss, grad_norm, stats, seconds):
    """A metrics.jsonl record for every step, and a log line every log_interval steps: step,
    loss, lr, gradient norm, tokens/s, MFU, the objective's and MoE's stats (stats), elapsed
    time and ETA (from the steps after the first, which compiles and warms up)."""
    cfg, rt, step = run.cfg, run.rt, run.step
    tok_s = run.step_tokens / seconds      # pretrain: batch_size * seq_len * grad_accum * world_size
    if step > run.start_step + 1:
        run.step_times.append(seconds)
        run.tok_rates.append(tok_s)
    util = mfu(tok_s, run.raw_model.flops_per_token(plan.seq_len), run.peak, rt.world_size)
    run.losses.append((step, loss))
    if run.log is not None:
        run.log.write({"step": step, "loss": loss, "lr_mult": plan.lr_mult, "grad_norm": grad_norm,
                       "tok_s": tok_s, "mfu": util, "seq_len": plan.seq_len,
                       "batch_size": plan.batch_size, "elapsed": time.time() - run.t_start,
                       **stats})
    if step % cfg.log_interval == 0 or step == run.end_step:
        recent = run.step_times[-20:]
        eta = format_seconds((run.end_step - step) * statistics.median(recent)) if recent else "n/a"
        extra = (f"moe drop {100 * stats['moe_dropped']:.1f}% load {stats['moe_min_load']:.2f}-"
                 f"{stats['moe_max_load']:.2f}x | " if "moe_dropped" in stats else "")
        extra += "".join(f"{k.replace('_', ' ')} {v:.3f} | " for k, v in stats.items() if not k.startswith("moe"))
        rt.print(f"step {step}/{run.end_step} | loss {loss:.4f} | lr x{plan.lr_mult:.3f} | "
                 f"gnorm {grad_norm:.3f} | {tok_s / 1e3:.1f}k tok/s | mfu {format_mfu(util)} | {extra}"
                 f"{format_seconds(time.time() - run.t_start)} elapsed | eta {eta}")


@dataclasses.dataclass
class TrainResult:
    """What train() returns (the tests read it)."""
    step: int
    losses: list            # (step, loss) of every step run in this call
    val_loss: float
    val_bpb: float
    stopped: bool           # ended by a signal before max_steps
    model: object = None    # the trained (unwrapped) model
    tok_s: float = math.nan  # median training tokens/s of the steps after the first (compile, warm-up)


def train(cfg, rt=None):
    """Run (or resume) training as cfg says; returns a TrainResult. Under torchrun every rank
    runs this same function."""
    run = start_run(cfg, rt)
    cfg, rt, stopped = run.cfg, run.rt, False
    with StopFlag() as stop:
        while True:
            last = run.step >= run.end_step
            # between steps (so that a resumed run sees the same state): evaluate, sample, save
            if not cfg.bench:
                if (run.step % cfg.eval_interval == 0 and run.step != run.start_step) or last \
                        or (run.step == 0 and not cfg.resume):
                    evaluate_and_keep_best(run)
                if rt.is_main and (last or (cfg.sample_interval and run.step > run.start_step
                                            and run.step % cfg.sample_interval == 0)):
                    text = run.objective.sample(run)
                    rt.print(f"--- greedy sample at step {run.step} ---\n{text}\n---")
                if rt.is_main and run.step > run.start_step and (
                        run.step % cfg.ckpt_interval == 0 or last or stopped):
                    save(run, "last.pt")
            if last or stopped:
                break

            # one optimizer step: plan, grad_accum micro-batches forward + backward, clip, update
            t0 = time.time()
            plan = plan_step(cfg, run.step)
            apply_schedules(run.optimizers, plan)
            loss, stats = forward_backward(run, plan)
            loss, stats, stopped = sync_loss_and_stop(run, loss, stats, stop.requested)
            grad_norm = clip_gradients(run)
            updated = optimizer_step(run, loss, grad_norm)
            stats.update(run.moe.finish(rt, update_bias=updated))  # MoE: balance once per step
            run.timer.end_step()
            run.step += 1
            if rt.device.type == "cuda":
                torch.cuda.synchronize()  # so that the step time is the GPU's, not the launch's
            log_step(run, plan, loss, grad_norm, stats, time.time() - t0)
    return finish(run, stopped)


def finish(run, stopped):
    """The closing report (--bench: speed and phases; else the chart and the last figures)."""
    cfg, rt = run.cfg, run.rt
    if cfg.bench:
        times = sorted(run.step_times[2:]) or sorted(run.step_times)  # after 3 warm-up steps
        dt = times[len(times) // 2]
        tokens = cfg.batch_size * cfg.seq_len * cfg.grad_accum * rt.world_size
        util = mfu(tokens / dt, run.raw_model.flops_per_token(cfg.seq_len), run.peak, rt.world_size)
        rt.print(f"bench: {tokens / dt:,.0f} tokens/s | MFU {format_mfu(util)} | "
                 f"{1000 * dt:.1f} ms/step (median of {len(times)} steps)")
        rt.print(f"bench: ms per step by phase: {run.timer.report(warmup=3)}")
    elif rt.is_main:
        write_plots(run)
        print(text_plot(run.log.train, run.log.val), flush=True)
        ending = (f"stopped by signal (exit code {EXIT_INTERRUPTED}); continue with --resume=True"
                  if stopped else "done")
        print(f"{ending}: step {run.step}, last val loss {run.val_loss:.4f}, val bpb "
              f"{run.val_bpb:.4f}, {format_seconds(time.time() - run.t_start)}; checkpoints in "
              f"{cfg.out_dir}/", flush=True)
    tok_s = statistics.median(run.tok_rates) if run.tok_rates else math.nan
    return TrainResult(step=run.step, losses=run.losses, val_loss=run.val_loss, val_bpb=run.val_bpb,
                       stopped=stopped, model=run.raw_model, tok_s=tok_s)


# -----------------------------------------------------------------------------
# 11. Sweeps: variants compared at equal compute
#
#   python train.py --sweep="[{}, {'attn': 'mla'}, {'layer_pattern': 'LLLG'}]" --seeds=3 --flops_budget=1e15
#
# runs every entry x seed in turn, each an ordinary train() in its own folder
# <out_dir>/<entry>/seed<S>: the entry's settings applied over the command line's, and seed
# S = --seed, --seed + 1, ... An entry is named by its settings (attn=mla; {} is "defaults").
# With --flops_budget every run gets the same total FLOPs and its steps follow from its own FLOPs
# per token (section 5), so a cheaper variant trains on more tokens: the fair question is what an
# idea buys per unit of compute. Any setting can be an entry's (the model's, the optimizer's, the
# batch's); only the sweep's own bookkeeping (SWEEP_OWN) cannot.
# Every entry is checked before the first run starts, like a command line (unknown settings,
# types, bad combinations: one line that names the entry), so a typo in the last entry does not
# surface hours later.
# After each run, result.json (its figures) goes into its folder, and sweep.md (a table: params,
# the Engram tables' share of them apart, FLOPs/token, KV bytes/token, tok/s, val bpb mean ± std
# over seeds) and sweep.svg (the same as a chart) are rewritten in out_dir. The seed-to-seed std
# is the noise bar: "vs first" marks a difference as beyond noise when it exceeds twice its
# standard error, 2 sqrt(s_a^2/n_a + s_b^2/n_b) (s: an entry's std over its n seeds; a rough 95%
# bar, which needs 2 seeds each).
# Resuming: the same command with --resume=True. Runs with a result.json are skipped, an
# interrupted run continues from its last.pt (exactly, as any run resumes), the others start;
# entries or seeds may be added in between. The other settings must be the ones recorded in
# <out_dir>/sweep.json, or the runs would not compare.

SWEEP_OWN = ("out_dir", "sweep", "seeds", "seed", "resume", "overwrite", "init_from", "bench")
SWEEP_NAME_MAX = 80   # longer entry names are cut and end in a hash: folder names stay short


def sweep_folder(label):
    """An entry's folder: its label with anything but letters, digits and ._=,+- as '_'.
    Example: "layer_pattern=LLLG,attn_gate=output" stays; "sweep=[1]" -> "sweep=_1_"."""
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", label)
    if len(name) > SWEEP_NAME_MAX:
        name = name[:SWEEP_NAME_MAX - 9] + "-" + hashlib.sha1(label.encode()).hexdigest()[:8]
    return name


@dataclasses.dataclass
class SweepEntry:
    label: str      # the entry's settings as text, e.g. "attn=mla"
    folder: str     # its runs live in <out_dir>/<folder>/seed<S>
    runs: list      # one TrainConfig per seed


def plan_sweep(cfg):
    """Every run of the sweep, each entry checked before any run starts: [SweepEntry]."""
    base = dataclasses.replace(cfg, sweep=[], seeds=1, resume=False, overwrite=False)
    entries, folders = [], {}
    for i, entry in enumerate(cfg.sweep):
        label = bpe.settings_label(entry)
        where = f"--sweep entry {i} ({label}): "
        own = [k for k in entry if k in SWEEP_OWN]
        if own:
            raise bpe.UserError(f"{where}--{own[0]} belongs to the sweep, not to an entry; remove it")
        entry_cfg = bpe.settings_with(TrainConfig, base, entry, where)
        folder = sweep_folder(label)
        if folder in folders:
            raise bpe.UserError(f"{where}the same runs as entry {folders[folder]}; remove one of them")
        folders[folder] = i
        runs = [dataclasses.replace(entry_cfg, seed=cfg.seed + k,
                                    out_dir=os.path.join(cfg.out_dir, folder, f"seed{cfg.seed + k}"))
                for k in range(cfg.seeds)]
        entries.append(SweepEntry(label, folder, runs))
    return entries


def sweep_settings(cfg):
    """The settings every run of the sweep shares (what sweep.json records), as JSON values."""
    own = ("sweep", "seeds", "resume", "overwrite")
    return json.loads(json.dumps({k: v for k, v in dataclasses.asdict(cfg).items() if k not in own}))


def claim_sweep_dir(cfg):
    """Rank 0, before the first run: refuse to start over another sweep (as a run refuses to start
    over another run), and record this one in sweep.json. --resume=True continues the sweep there
    (with the same settings); --overwrite=True starts it over (every run replaced)."""
    path = os.path.join(cfg.out_dir, "sweep.json")
    settings = sweep_settings(cfg)
    if os.path.exists(path):
        if not (cfg.resume or cfg.overwrite):
            raise bpe.UserError(f"{cfg.out_dir}/ already holds a sweep; continue it with --resume=True, "
                                f"start it over with --overwrite=True, or choose another --out_dir")
        if cfg.resume:
            with open(path) as f:
                old = json.load(f)["settings"]
            changed = [k for k in settings if old.get(k) != settings[k]]
            if changed:
                k = changed[0]
                raise bpe.UserError(f"{cfg.out_dir}/ holds a sweep with --{k}={old.get(k)!r} (now {settings[k]!r}); "
                                    f"resume it with its settings, or choose another --out_dir")
    elif cfg.resume:
        raise bpe.UserError(f"--resume=True: {cfg.out_dir}/ holds no sweep to continue (no sweep.json); "
                            f"drop --resume to start one")
    os.makedirs(cfg.out_dir, exist_ok=True)
    write_text_atomic(path, json.dumps({"settings": settings, "sweep": cfg.sweep, "seeds": cfg.seeds},
                                       indent=1) + "\n")


def sweep_record(run_cfg, res):
    """What a finished run adds to the sweep's table (its result.json)."""
    m = res.model
    finite = lambda x: x if math.isfinite(x) else None
    return {"seed": run_cfg.seed, "steps": res.step, "params": m.num_params(),
            "active_params": m.num_params(active=True), "flops_per_token": m.flops_per_token(run_cfg.seq_len),
            "kv_bytes_per_token": m.kv_cache_bytes_per_token(torch.bfloat16),
            "state_bytes": m.cache_state_bytes(), "tok_s": finite(res.tok_s),
            "val_loss": finite(res.val_loss), "val_bpb": finite(res.val_bpb)}


def sweep_rows(plan, results):
    """One summary per entry: its figures (first seed's) and val bpb over the seeds done."""
    rows = []
    for entry in plan:
        recs = [results[c.out_dir] for c in entry.runs if c.out_dir in results]
        bpb = [r["val_bpb"] for r in recs if r["val_bpb"] is not None]
        tok_s = [r["tok_s"] for r in recs if r["tok_s"] is not None]
        memory = gpt_config(entry.runs[0], vocab_size=1).engram_memory_params   # no vocab in it
        rows.append({**(recs[0] if recs else {}), "label": entry.label, "done": len(recs), "memory": memory,
                     "of": len(entry.runs), "bpb": bpb, "mean": statistics.mean(bpb) if bpb else math.nan,
                     "std": statistics.stdev(bpb) if len(bpb) > 1 else math.nan,
                     "tok_s": statistics.mean(tok_s) if tok_s else math.nan})
    return rows


def beyond_noise(a, b):
    """Whether entry b's mean val bpb differs from a's by more than 2 standard errors of the
    difference, 2 sqrt(s_a^2/n_a + s_b^2/n_b); None when either has fewer than 2 seeds."""
    if len(a["bpb"]) < 2 or len(b["bpb"]) < 2:
        return None
    bar = 2 * math.sqrt(a["std"] ** 2 / len(a["bpb"]) + b["std"] ** 2 / len(b["bpb"]))
    return abs(b["mean"] - a["mean"]) > bar


def sweep_markdown(cfg, rows, tokens_per_step):
    """sweep.md: the table described at the top of this section."""
    budget = (f"--flops_budget={cfg.flops_budget:.3g} FLOPs per run" if cfg.flops_budget
              else f"max_steps={cfg.max_steps} per run (no --flops_budget: equal steps, not equal FLOPs)")
    defaults = TrainConfig()
    shared = " ".join(f"--{k}={v}" for k, v in dataclasses.asdict(cfg).items()
                      if k not in ("sweep", "seeds", "resume", "overwrite", "out_dir") and v != getattr(defaults, k))
    lines = ["# Sweep: validation bits per byte at equal compute", "",
             f"{budget}, {tokens_per_step:,} tokens per step, {cfg.seeds} seed(s) per entry from "
             f"--seed={cfg.seed}; shared settings: {shared or '(defaults)'}.",
             "Noise bar: a difference is beyond noise when it exceeds 2 sqrt(s_a^2/n_a + s_b^2/n_b) "
             "(s: the seed-to-seed std of an entry, n: its seeds).", "",
             "| entry | params | FLOPs/token | KV bytes/token (bf16) | state bytes | steps | train tok/s "
             "| val bpb (mean ± std) | vs first | seeds |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for i, row in enumerate(rows):
        if not row["done"]:
            lines.append(f"| {row['label']} | | | | | | | | | 0/{row['of']} |")
            continue
        params = f"{row['params'] / 1e6:.2f}M"
        if row["active_params"] != row["params"]:
            params = f"{row['active_params'] / 1e6:.2f}M active of {params}"
        if row["memory"]:
            params += f" ({row['memory'] / 1e6:.2f}M memory)"
        bpb = f"{row['mean']:.4f}" + (f" ± {row['std']:.4f}" if math.isfinite(row["std"]) else "")
        versus = ""
        if i > 0 and rows[0]["bpb"] and row["bpb"]:
            noise = beyond_noise(rows[0], row)
            versus = f"{row['mean'] - rows[0]['mean']:+.4f}" + {None: " (too few seeds)", True: " (beyond noise)",
                                                                False: " (within noise)"}[noise]
        tok_s = f"{row['tok_s']:,.0f}" if math.isfinite(row["tok_s"]) else "n/a"
        lines.append(f"| {row['label']} | {params} | {row['flops_per_token'] / 1e6:.2f}M | "
                     f"{row['kv_bytes_per_token']:,} | {row['state_bytes']:,} | {row['steps']:,} | {tok_s} | "
                     f"{bpb} | {versus} | {row['done']}/{row['of']} |")
    return "\n".join(lines) + "\n"


LABEL_PX = 7          # width of one character of a 12 px sans-serif label, roughly
SWEEP_PLOT_PX = 440   # width of the chart's plotting area


def sweep_svg(rows, title="val bits per byte at equal compute (mean ± std over seeds)"):
    """The table's val bpb as a chart drawn by hand, like loss_svg: one row per entry, its label
    on the left; each seed a small circle, the mean a dot, mean ± std a line. x maps bpb to pixels
    with x_px = left + (v - v0) / (v1 - v0) * width."""
    row_h, right, top, bottom = 28, 30, 40, 46
    left = 20 + LABEL_PX * max([len(row["label"]) for row in rows] + [10])   # room for the longest label
    W, H = left + SWEEP_PLOT_PX + right, top + row_h * len(rows) + bottom
    values = [v for row in rows for v in row["bpb"]] or [0.0, 1.0]
    v0, v1 = min(values), max(values)
    pad = max((v1 - v0) * 0.1, 1e-3)
    v0, v1 = v0 - pad, v1 + pad
    px = lambda v: left + (v - v0) / (v1 - v0) * (W - left - right)
    esc = xml.sax.saxutils.escape
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
           f'viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="20" text-anchor="middle">{esc(title)}</text>',
           f'<line x1="{left}" y1="{H - bottom}" x2="{W - right}" y2="{H - bottom}" stroke="black"/>']
    for v in _nice_ticks(v0, v1):
        if v0 <= v <= v1:
            out.append(f'<line x1="{px(v):.1f}" y1="{top}" x2="{px(v):.1f}" y2="{H - bottom + 4}" '
                       f'stroke="#ddd"/><text x="{px(v):.1f}" y="{H - bottom + 18}" '
                       f'text-anchor="middle">{v:g}</text>')
    out.append(f'<text x="{(left + W - right) / 2}" y="{H - 8}" text-anchor="middle">'
               f'val bits per byte (lower is better)</text>')
    for i, row in enumerate(rows):
        y = top + (i + 0.5) * row_h
        out.append(f'<g class="entry" data-label={xml.sax.saxutils.quoteattr(row["label"])} '
                   f'data-mean="{row["mean"]:.6f}" data-std="{row["std"]:.6f}">')
        out.append(f'<text x="{left - 8}" y="{y + 4:.1f}" text-anchor="end">{esc(row["label"])}</text>')
        if math.isfinite(row["std"]):
            out.append(f'<line class="std" x1="{px(row["mean"] - row["std"]):.1f}" y1="{y:.1f}" '
                       f'x2="{px(row["mean"] + row["std"]):.1f}" y2="{y:.1f}" stroke="#1f77b4" stroke-width="2"/>')
        for v in row["bpb"]:
            out.append(f'<circle class="seed" cx="{px(v):.1f}" cy="{y:.1f}" r="3" fill="none" stroke="#555"/>')
        if math.isfinite(row["mean"]):
            out.append(f'<circle class="mean" cx="{px(row["mean"]):.1f}" cy="{y:.1f}" r="5" fill="#1f77b4"/>')
        out.append("</g>")
    out.append("</svg>")
    return "\n".join(out) + "\n"


def write_sweep_report(cfg, plan, results, world_size):
    rows = sweep_rows(plan, results)
    tokens = cfg.batch_size * cfg.seq_len * cfg.grad_accum * world_size
    write_text_atomic(os.path.join(cfg.out_dir, "sweep.md"), sweep_markdown(cfg, rows, tokens))
    write_text_atomic(os.path.join(cfg.out_dir, "sweep.svg"), sweep_svg(rows))


def run_sweep(cfg):
    """Run every entry x seed of --sweep in turn (see the top of this section); returns whether
    a signal stopped it (then the interrupted run has saved its last.pt: --resume=True goes on)."""
    plan = plan_sweep(cfg)
    rt = runtime_for(cfg)   # for the rank only: each run decides its own (a resumed one reuses its saved)
    if rt.is_main:
        claim_sweep_dir(cfg)
    results, total, n = {}, sum(len(e.runs) for e in plan), 0
    for entry in plan:
        for run_cfg in entry.runs:
            n += 1
            path = os.path.join(run_cfg.out_dir, "result.json")
            if os.path.exists(path) and not cfg.overwrite:
                with open(path) as f:
                    results[run_cfg.out_dir] = json.load(f)
                rt.print(f"sweep: run {n}/{total}, {entry.label} seed {run_cfg.seed}: finished before, skipped")
                continue
            resume = os.path.exists(os.path.join(run_cfg.out_dir, "last.pt")) and not cfg.overwrite
            rt.print(f"sweep: run {n}/{total}, {entry.label} seed {run_cfg.seed}{' (resuming)' if resume else ''}")
            res = train(dataclasses.replace(run_cfg, resume=resume, overwrite=not resume))
            if res.stopped:
                return True
            results[run_cfg.out_dir] = sweep_record(run_cfg, res)
            if rt.is_main:
                write_text_atomic(path, json.dumps(results[run_cfg.out_dir]) + "\n")
                write_sweep_report(cfg, plan, results, rt.world_size)
    if rt.is_main:
        write_sweep_report(cfg, plan, results, rt.world_size)
        rt.print(f"sweep: {total} runs done; {cfg.out_dir}/sweep.md, {cfg.out_dir}/sweep.svg")
    return False


# -----------------------------------------------------------------------------
# 12. main

def main():
    cfg = bpe.parse_settings(TrainConfig, sys.argv[1:], description=__doc__)
    try:
        stopped = run_sweep(cfg) if cfg.sweep else train(cfg).stopped
    except BaseException as e:
        if dist.is_initialized():
            # other ranks may be blocked in a collective that this rank will never join;
            # leaving without destroy_process_group lets torchrun tear the group down
            # (their pending collectives fail as soon as this process is gone)
            print(f"rank {dist.get_rank()}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise
    if dist.is_initialized():
        # every rank reaches this line before any tears down: without the barrier one
        # gloo rank could close its connections while the other was still using them,
        # which aborted a rank now and then ("terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()
    if stopped:
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    bpe.main_guard(main)
