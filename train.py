"""
train.py -- pretrain a GPT on prepare.py's shards, from one laptop CPU to many GPUs.

Where it sits:  bpe.py -> prepare.py -> model.py -> [train.py] -> sample.py
It reads the token shards and tokenizer that prepare.py wrote, builds model.GPT,
trains it with Muon (hidden matrices) + AdamW (everything else), evaluates bits
per byte on a fixed validation set, and writes checkpoints that sample.py loads.

Run it:
    python prepare.py && python train.py           # CPU quick start (~6 min, Python-ish samples)
    python train.py --n_layer=6 --n_embd=384 --max_steps=5000    # any setting: --key=value
    python train.py --resume=True                  # continue out/last.pt exactly where it stopped
    python train.py --init_from=out/best.pt --data_dir=data/custom --matrix_lr=0.005   # fine-tune
    python train.py --bench=True                   # tokens/s, MFU and ms per phase of a step
    torchrun --standalone --nproc_per_node=8 train.py --data_dir=data/fineweb   # 8 GPUs, DDP
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --master_addr=HOST0 train.py   # 2 nodes, R=0,1
    python train.py --help                         # every setting with its default and meaning

Outputs in --out_dir (default out/): last.pt, best.pt (lowest val loss), metrics.jsonl
(one JSON object per step / eval), loss.svg (train and val loss, drawn by hand).

Sections:
    1. Settings               the TrainConfig table (model fields pass through to GPTConfig)
    2. Runtime                distributed setup, device, precision policy, compile -- decided once
    3. Data                   batches as a pure function of (seed, step, rank); fixed val set
    4. Optimizers             AdamW and Muon, written out
    5. Schedules              learning rate, Muon momentum, staged (step, value) lists
    6. Evaluation             val loss and bits per byte, greedy sample
    7. Metrics and pictures   MFU, metrics.jsonl, loss.svg, a text plot
    8. Checkpoints            atomic save, exact resume, weights_only loading
    9. The training loop      train(cfg): what main() and the tests call
   10. main
"""
import collections
import contextlib
import ctypes
import dataclasses
import datetime
import json
import math
import os
import random
import signal
import statistics
import sys
import threading
import time
import xml.sax.saxutils

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import bpe
import prepare
from model import GPT, GPTConfig, doc_ids_from_bos

# -----------------------------------------------------------------------------
# 1. Settings
#
# One table; the trailing comment of each field is its --help line. The model
# fields below have the same names as GPTConfig's and are copied into it
# (vocab_size comes from the data), so `--n_layer=6` works just as in nanoGPT.

BATCH_MODES = ("random", "packed")
WARMDOWN_SHAPES = ("linear", "cosine")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SWITCH = ("auto", "true", "false")


@dataclasses.dataclass
class TrainConfig:
    # --- data and files ---
    data_dir: str = "data/stdlib"          # prepare.py's output: shards, tokenizer.bpe, meta.json
    out_dir: str = "out"                   # where last.pt, best.pt, metrics.jsonl, loss.svg go
    resume: bool = False                   # continue from <out_dir>/last.pt, bitwise-exactly on CPU
    init_from: str = ""                    # start from this checkpoint's weights (new optimizer, step 0)
    batch_mode: str = "random"             # "random" windows, or "packed" whole documents + doc mask
    # --- model (copied into model.GPTConfig) ---
    n_layer: int = 4                       # transformer blocks
    n_head: int = 4                        # query heads
    n_kv_head: int = 4                     # key/value heads (< n_head = grouped-query attention)
    n_embd: int = 256                      # model width d_model
    block_size: int = 256                  # longest context the model is built for
    mlp: str = "relu2"                     # feed-forward: "relu2" | "swiglu" | "gelu"
    mlp_hidden: int = 0                    # feed-forward width (0 = the model's default, ~4 x n_embd)
    rope_theta: float = 10000.0            # rotary base frequency
    rope_scaling: str = "none"             # "none" | "linear" | "yarn" context extension
    rope_factor: float = 1.0               # context extension factor for rope_scaling
    qk_norm: bool = True                   # RMS-normalise queries and keys before attention
    attn_softcap: float = 0.0              # tanh soft cap on attention logits (0 = off)
    logit_softcap: float = 15.0            # tanh soft cap on output logits (0 = off)
    norm_gain: bool = False                # learnable gain in RMSNorm
    tie_embeddings: bool = False           # share wte and lm_head weights
    window: int = 0                        # sliding attention window in tokens (0 = full causal)
    n_global: int = 0                      # leading "sink" tokens every window also sees
    mtp: bool = False                      # multi-token prediction head (predict token t+2 too)
    attn_impl: str = "sdpa"                # attention path: "sdpa" (fast) | "manual" (readable) | "triton" (model.py 5b, GPU)
    n_experts: int = 0                     # MoE: routed experts per MoE layer (0 = dense MLPs)
    moe_every: int = 1                     # MoE: every k-th block uses experts
    top_k: int = 2                         # MoE: experts chosen per token
    n_shared_experts: int = 0              # MoE: experts every token always uses
    capacity_factor: float = 0.0           # MoE: max tokens per expert / fair share (0 = no dropping)
    moe_hidden: int = 0                    # MoE: hidden size per expert (0 = the MLP's)
    moe_aux_coef: float = 0.01             # MoE: weight of the load-balancing loss
    moe_z_coef: float = 0.001              # MoE: weight of the router z-loss
    moe_bias_rate: float = 0.0             # MoE: aux-loss-free balancing bias step (0 = off)
    # --- batch and length ---
    seq_len: int = 256                     # training context T (<= block_size)
    batch_size: int = 16                   # sequences per micro-batch per rank
    grad_accum: int = 1                    # micro-batches per optimizer step (per rank)
    max_steps: int = 1200                  # optimizer steps in the run
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
    warmup_steps: int = 0                  # linear lr warmup from 0
    warmdown_frac: float = 0.4             # fraction of max_steps spent decaying the lr at the end
    warmdown: str = "linear"               # warmdown shape: "linear" | "cosine"
    final_lr_frac: float = 0.0             # lr at the last step as a fraction of the peak
    grad_clip: float = 1.0                 # clip the global gradient norm to this (0 = off)
    skip_nonfinite: bool = False           # skip steps with a nan/inf loss instead of stopping
    # --- staged schedules: [(from_step, value), ...]; empty = the setting above ---
    seq_len_schedule: list = dataclasses.field(default_factory=list)     # seq_len from each step on, e.g. [(0, 64), (500, 256)]
    batch_size_schedule: list = dataclasses.field(default_factory=list)  # batch_size from each step on, e.g. [(0, 8), (200, 16)]
    window_schedule: list = dataclasses.field(default_factory=list)      # attention window from each step on, e.g. [(0, 64), (800, 0)]
    mtp_weight_schedule: list = dataclasses.field(default_factory=list)  # mtp_weight from each step on, e.g. [(0, 0.5), (900, 0.0)]
    mtp_weight: float = 0.3                # weight of the MTP loss (when mtp=True)
    # --- evaluation and logging ---
    eval_interval: int = 200               # steps between validation evals (and at the end)
    eval_tokens: int = 32768               # val tokens per eval (a fixed, deterministic set)
    sample_interval: int = 400             # steps between greedy samples (0 = only at the end)
    sample_prompt: str = "    def __init__(self"  # prompt of the greedy sample (after a BOS)
    sample_tokens: int = 64                # tokens per greedy sample
    log_interval: int = 1                  # steps between log lines
    ckpt_interval: int = 200               # steps between last.pt saves (and at the end)
    # --- system ---
    device: str = "auto"                   # "auto" (cuda > mps > cpu) | "cpu" | "cuda" | "cuda:1" | "mps"
    dtype: str = "auto"                    # "auto" | "float32" | "bfloat16" | "float16" (+GradScaler)
    compile: str = "auto"                  # torch.compile the model and the optimizer steps: "auto" (on for CUDA and CPU) | "true" | "false"
    threads: int = 0                       # CPU threads per process (0 = all cores / ranks per node)
    bench: bool = False                    # only time bench_steps steps: tok/s, MFU, ms per phase
    bench_steps: int = 10                  # timed steps in --bench mode (after 3 warm-up steps)

    def __post_init__(self):
        self.compile = str(self.compile).lower()  # --compile=False arrives as "False"
        choices = {"batch_mode": BATCH_MODES, "warmdown": WARMDOWN_SHAPES, "dtype": DTYPES,
                   "compile": SWITCH}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name}={getattr(self, name)} must be one of {allowed}")
        positive = ("n_layer", "n_head", "n_embd", "block_size", "seq_len", "batch_size",
                    "grad_accum", "max_steps", "eval_interval", "eval_tokens", "log_interval",
                    "ckpt_interval", "bench_steps")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.warmdown_frac <= 1.0 or not 0.0 <= self.final_lr_frac <= 1.0:
            raise ValueError("--warmdown_frac and --final_lr_frac must lie in [0, 1]")
        if self.resume and self.init_from:
            raise ValueError("--resume=True and --init_from are exclusive: resume continues a run, "
                             "init_from starts a new one")
        for name in ("seq_len_schedule", "batch_size_schedule", "window_schedule",
                     "mtp_weight_schedule"):
            check_schedule(name, getattr(self, name))
        for t in [self.seq_len] + [v for _, v in self.seq_len_schedule]:
            if not 0 < t <= self.block_size:
                raise ValueError(f"sequence length {t} must be in 1..block_size={self.block_size}; "
                                 f"raise --block_size")
        if any(v <= 0 for _, v in self.batch_size_schedule):
            raise ValueError("--batch_size_schedule values must be positive")


def check_schedule(name, schedule):
    """A staged schedule is [(step, value), ...] with increasing steps >= 0."""
    steps = []
    for entry in schedule:
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], int)):
            raise ValueError(f"--{name} must be a list of (step, value) pairs, got {entry!r}")
        steps.append(entry[0])
    if steps and (steps[0] < 0 or any(b <= a for a, b in zip(steps, steps[1:]))):
        raise ValueError(f"--{name}: steps must be >= 0 and strictly increasing, got {steps}")


def model_config_from(cfg, vocab_size):
    """GPTConfig from the model fields of the TrainConfig (same names)."""
    names = {f.name for f in dataclasses.fields(GPTConfig)}
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k in names}
    fields["vocab_size"] = vocab_size
    try:
        return GPTConfig(**fields)
    except ValueError as e:
        raise bpe.UserError(f"bad model settings: {e}") from None


# -----------------------------------------------------------------------------
# 2. Runtime: distributed setup, device, precision, compile
#
# Every hardware decision is made here, once, and stored in a Runtime. The rest
# of the file asks the Runtime ("rt.autocast()", "rt.is_main") instead of
# testing for CUDA in a dozen places.

# Peak dense bf16 tensor-core FLOP/s per GPU (vendor data sheets, no sparsity),
# used as the MFU denominator. Unknown GPUs fall back to a measured matmul peak.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
                  "A10": 125e12, "4090": 165e12, "3090": 71e12, "V100": 125e12, "T4": 65e12}
BF16_MIN_SPEEDUP = 1.3      # CPU uses bf16 autocast only if its matmuls are this much faster
PEAK_MATMUL_N = 1024        # size of the square matmul timed as the CPU's "peak" FLOP/s


@dataclasses.dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    dtype: torch.dtype = torch.float32      # autocast dtype (float32 = no autocast)
    dtype_reason: str = ""
    scaler: object = None                   # torch.amp.GradScaler for float16, else None
    peak_flops: float = 0.0                 # per device, for MFU
    compile: bool = False
    compile_options: dict = dataclasses.field(default_factory=dict)  # inductor options

    @property
    def ddp(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0

    def autocast(self):
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def print(self, *args, **kwargs):
        if self.is_main:
            print(*args, **kwargs, flush=True)


def _time_matmul(n_rows, n_in, n_out, dtype, device, reps=7):
    """Fastest of reps timings of one (n_rows, n_in) @ (n_in, n_out) matmul. The minimum,
    not the median: on a shared machine, other processes only ever add time."""
    a = torch.randn(n_rows, n_in, device=device, dtype=dtype)
    b = torch.randn(n_in, n_out, device=device, dtype=dtype)
    times = []
    for _ in range(reps + 1):  # the first call is warm-up (allocations, kernel selection)
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def resolve_device(setting, local_rank):
    if setting == "auto":
        if torch.cuda.is_available():
            setting = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            setting = "mps"
        else:
            setting = "cpu"
    if setting == "cuda":
        setting = f"cuda:{local_rank}"  # one GPU per torchrun process
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise bpe.UserError(f"--device={setting} but CUDA is not available; use --device=cpu")
    return device


def resolve_precision(cfg, device):
    """The precision policy, all of it: returns (autocast dtype, reason, GradScaler or None).

    CUDA: bf16 autocast (fp32 master weights) where the GPU has bf16, else fp16
      autocast with a GradScaler (fp16's small exponent range underflows small
      gradients unless the loss is scaled up first). TF32 is enabled for the
      matmuls that stay in fp32.
    CPU: bf16 autocast only if bf16 matmuls of this model's shape are measurably
      faster here (CPUs with AMX/AVX512-BF16 are several times faster; others
      emulate bf16 and are slower), else fp32.
    --dtype overrides the policy."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.dtype != "auto":
        dtype = getattr(torch, cfg.dtype)
        if dtype == torch.float16 and device.type != "cuda":
            raise bpe.UserError("--dtype=float16 needs CUDA (GradScaler); use bfloat16 or float32")
        reason = "set by --dtype"
    elif device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            dtype, reason = torch.bfloat16, "CUDA with bf16"
        else:
            dtype, reason = torch.float16, "CUDA without bf16: fp16 + GradScaler"
    elif device.type == "cpu":
        # time one matmul of the feed-forward's shape: (B*T, C) @ (C, 4C)
        rows = min(cfg.batch_size * cfg.seq_len, 4096)
        shape = (rows, cfg.n_embd, 4 * cfg.n_embd)
        t32 = _time_matmul(*shape, torch.float32, device)
        t16 = _time_matmul(*shape, torch.bfloat16, device)
        speedup = t32 / t16
        if speedup >= BF16_MIN_SPEEDUP:
            dtype, reason = torch.bfloat16, f"CPU bf16 matmul {speedup:.1f}x faster than fp32"
        else:
            dtype, reason = torch.float32, f"CPU bf16 matmul only {speedup:.1f}x fp32"
    else:
        dtype, reason = torch.float32, f"{device.type}: float32"
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return dtype, reason, scaler


def measure_peak_flops(device, dtype):
    """FLOP/s of one large square matmul in the compute dtype: the CPU's "peak" for MFU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, flops in GPU_PEAK_FLOPS.items():
            if key in name:
                return flops
    n = PEAK_MATMUL_N
    seconds = _time_matmul(n, n, n, dtype, device)
    return 2 * n ** 3 / seconds  # a matmul of (n, n) @ (n, n) is n^3 multiply-adds


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the
    kernel, so that a CPU training step stops paying page faults for its own tensors.

    Why: PyTorch on CPU allocates every tensor with malloc. glibc serves blocks of 128 KB
    and more (adaptively raised, up to 32 MB) with a fresh mmap and unmaps them when they
    are freed, and it trims the top of the heap; the next step then touches new pages, and
    the kernel zero-fills each one on a page fault. At 4 x 128 (nanoGPT's CPU size) that
    was ~3,500 page faults per step and a fifth of the step time; the default model's
    64 MB logits alone are 16k faults per step. Now no block is mmap-ed (every tensor
    comes from the heap, where freed blocks are reused), the heap is never trimmed and
    grows 64 MB at a time. Measured with --bench, back to back: at 4 x 128 about one
    fault per step once running and 31.4 -> 25.4 ms per step (with the mmap threshold
    at 32 MB), then 1-3% more with mmap off altogether; the default model 283 -> 263 ms
    per step (with mmap off; medians of 3 alternating runs). The cost is that the process
    keeps its peak heap size, which a training loop reaches every step anyway.
    Also off: "fastbins", glibc's lists of freed small blocks. Before serving a large
    request, malloc merges every fastbin block back into the heap (malloc_consolidate),
    and a step makes a few hundred large requests; with fastbins off small blocks are
    merged when freed. At 4 x 128, switching it every 13 steps inside one process: 21.8
    -> 21.4 ms per step (2%, medians over 300 steps each, twice).
    Linux with glibc only; elsewhere nothing happens (returns False)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library (musl) or none found
        return False
    M_MXFAST, M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = 1, -1, -2, -4  # from glibc's malloc.h
    ok = mallopt(M_MMAP_MAX, 0)               # never serve a block with its own mmap
    ok &= mallopt(M_TRIM_THRESHOLD, 1 << 30)  # mallopt takes an int: 1 GB stands for "never"
    ok &= mallopt(M_TOP_PAD, 64 << 20)
    ok &= mallopt(M_MXFAST, 0)                # no fastbins
    return bool(ok)


def setup_runtime(cfg):
    """Start DDP if torchrun launched us, pick the device, precision and compile."""
    rank, local_rank, world_size = 0, 0, 1
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # set by torchrun
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        world_size = int(os.environ["WORLD_SIZE"])
    device = resolve_device(cfg.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if device.type == "cpu":
        keep_freed_memory()
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=10))
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    elif device.type == "cpu" and world_size > 1:
        # ranks on one machine share its cores; oversubscription makes everyone slow
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    dtype, reason, scaler = resolve_precision(cfg, device)
    if world_size > 1 and cfg.dtype == "auto" and device.type == "cpu":
        # the CPU choice comes from a timing, which can differ between ranks: use rank 0's
        flag = torch.tensor([dtype == torch.bfloat16], dtype=torch.int32)
        dist.broadcast(flag, src=0)
        if bool(flag.item()) != (dtype == torch.bfloat16):
            dtype, reason = (torch.bfloat16 if flag.item() else torch.float32), "rank 0's choice"
    # torch.compile fuses the many small elementwise ops (norms, RoPE, relu^2, softcap)
    # that dominate a small model's step on CPU. Measured on the 2-core dev CPU with the
    # default model (python train.py --bench=True, with and without --compile=false):
    # 243.1 vs 387.3 ms per step, 1.59x, for a one-off compile of ~10 s (warm cache) to
    # ~45 s (cold cache); the README's quick start includes a cold compile.
    compile_on = cfg.compile == "true" or (cfg.compile == "auto" and device.type in ("cuda", "cpu"))
    # On CPU, inductor's cpp_wrapper calls the compiled kernels from generated C++ instead
    # of generated Python: a small model's step launches ~150 kernels, and a Python call
    # each adds up. At 4 x 128: 23.34 -> 22.22 ms per step (A/B in one process), 1.04-1.15x
    # in --bench rounds (median 1.06x), for ~6 s more of a cold compile; the default model
    # (bigger kernels) gains nothing measurable. (CUDA keeps the default: not measured.)
    options = {"cpp_wrapper": True} if device.type == "cpu" else {}
    return Runtime(device=device, rank=rank, local_rank=local_rank, world_size=world_size,
                   dtype=dtype, dtype_reason=reason, scaler=scaler,
                   peak_flops=measure_peak_flops(device, dtype), compile=compile_on,
                   compile_options=options)


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
    Both return x = tokens[:-1], y = tokens[1:] as (B, T) int64 arrays."""

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

    def get(self, step, index, batch_size, seq_len):
        rng = np.random.default_rng([self.seed, step, index])
        if self.mode == "random":
            rows = self._random_rows(rng, batch_size, seq_len)
        else:
            rows = [self._packed_row(rng, seq_len) for _ in range(batch_size)]
        buf = np.stack(rows).astype(np.int64)  # (B, T+1)
        return buf[:, :-1], buf[:, 1:]

    def _random_rows(self, rng, batch_size, seq_len):
        n_windows = np.maximum(self.lengths - seq_len, 0)  # valid window starts per shard
        ends = np.cumsum(n_windows)                         # window w < ends[i]: shard <= i
        if ends[-1] == 0:
            raise bpe.UserError(f"train split has fewer than {seq_len + 1} tokens per shard; "
                                f"lower --seq_len or prepare more data")
        # all rows' positions in one draw (numpy gives the same numbers as one draw per
        # row; 12 rows of 65 tokens: 46 us per batch against 124 with a loop over rows)
        pos = rng.integers(ends[-1], size=batch_size)
        shard = np.searchsorted(ends, pos, side="right")
        start = pos - (ends[shard] - n_windows[shard])
        return [np.asarray(self.shards[i].tokens[a:a + seq_len + 1])
                for i, a in zip(shard.tolist(), start.tolist())]

    def _packed_row(self, rng, seq_len):
        need, pieces, tries = seq_len + 1, [], 0
        while need > 0:
            d = int(rng.integers(len(self.doc_start)))
            start, end = int(self.doc_start[d]), int(self.doc_end[d])
            if end - start > need:
                if pieces and tries < MAX_PACK_TRIES:
                    tries += 1
                    continue
                end = start + need  # crop: still starts at its document start
            pieces.append(self.shards[int(self.doc_shard[d])].tokens[start:end])
            need -= end - start
        return np.concatenate(pieces)


def val_windows(shards, seq_len, n_tokens):
    """The fixed validation set: consecutive, non-overlapping windows of T+1 tokens
    (stride T) from the start of the val split, n_tokens // T of them (fewer if the
    split is smaller). Returns x, y as (N, T) int64 arrays."""
    want = (n_tokens // seq_len) * seq_len + 1
    parts, have = [], 0
    for s in shards:  # read only what we need: the val split can be large
        take = min(len(s.tokens), want - have)
        parts.append(np.asarray(s.tokens[:take], dtype=np.int64))
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


ADAM_BETAS = (0.9, 0.95)  # beta2 = 0.95 (not torch's 0.999): forgets old grads faster,
                          # the usual choice for LLM pretraining (GPT-3, nanoGPT, Llama)
ADAM_EPS = 1e-8
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
    """

    def __init__(self, params, lr=1e-3, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=0.0,
                 cautious=False, compiled=False, compile_options=None):
        if lr < 0.0 or eps < 0.0 or weight_decay < 0.0:
            raise ValueError(f"AdamW needs lr, eps, weight_decay >= 0, got {lr}, {eps}, {weight_decay}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"AdamW betas must lie in [0, 1), got {betas}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        cautious=cautious)
        super().__init__(params, defaults)
        # compiled: run the update through torch.compile (the trainer passes its compile
        # setting): one fused pass over each parameter's state instead of ~8 (at 4 x 128,
        # inside the training step: 22.27 -> 22.01 ms, A/B in one process); falls back to
        # eager if compiling fails
        self._update = CompiledStep(adamw_update, "AdamW", compiled, compile_options)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # one entry per param that has a grad, all groups: adamw_update's arguments
        params, grads, exp_avgs, exp_avg_sqs, numbers, settings = [], [], [], [], [], []
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
        if params:
            self._update(params, grads, exp_avgs, exp_avg_sqs, numbers, settings)
        return loss


def adamw_update(params, grads, exp_avgs, exp_avg_sqs, numbers, settings):
    """The AdamW update of every param, in place. One entry per param in every list:
    numbers[i] = (lr, 1 - beta1^t, sqrt(1 - beta2^t)), floats or (compiled) 0-d tensors;
    settings[i] = (beta1, beta2, eps, weight_decay, cautious), constants of the run.
    Plain tensor code without data-dependent branches, so that torch.compile fuses each
    param's update into one kernel. The operation order is torch.optim.AdamW's (eps
    added after dividing sqrt(v) by sqrt(1 - beta2^t)): results agree to float32 rounding."""
    for p, g, m, v, (lr, bias1, bias2_sqrt), (beta1, beta2, eps, weight_decay, cautious) in zip(
            params, grads, exp_avgs, exp_avg_sqs, numbers, settings):
        m.lerp_(g, 1.0 - beta1)                                   # m = b1 m + (1-b1) g
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)           # v = b2 v + (1-b2) g^2
        denom = (v.sqrt() / bias2_sqrt).add_(eps)                 # sqrt(v_hat) + eps
        if cautious and weight_decay != 0.0:
            _decay_(p, m / denom, lr, weight_decay, cautious=True)
        else:
            _decay_(p, None, lr, weight_decay, cautious=False)
        p.sub_(m / denom * (lr / bias1))                          # p -= lr m_hat / denom


# 4.2 Muon: orthogonalised momentum for hidden matrices

def default_ns_dtype(device):
    """The one switch for Newton-Schulz precision: bf16 on CUDA (tensor cores; each
    step maps the band around 1 back into itself, so bf16 rounding does not grow:
    the result differs from fp32 by ~2% and lands in the same band, tested), float32
    elsewhere (CPU bf16 matmuls are not always fast, and exact CPU tests want fp32)."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def newton_schulz5(G, steps=NS_STEPS, dtype=None):
    """Approximately orthogonalise G: return ~U V^T where G = U S V^T (its SVD).

    G is (..., rows, cols); leading dims are a batch (e.g. MoE experts, one matrix
    each), each matrix is orthogonalised on its own. Returns the same shape, computed
    in `dtype` (default: default_ns_dtype(G.device)).

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
    scale-and-add passes: measured 1.2-1.4x faster than the plain expression on CPU
    in float32 (in bf16 under torch.compile, which fuses the adds, the two tied)."""
    assert G.ndim >= 2, "newton_schulz5 needs a matrix or a batch of matrices"
    a, b, c = NS_COEFFS
    X = G.to(dtype or default_ns_dtype(G.device))
    tall = G.size(-2) > G.size(-1)
    if tall:
        # (..., m, n), m = min(rows, cols); copied into that layout once (with a
        # transposed view every baddbmm below copied X again: 69 us per call here)
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
        # ns_dtype: precision of Newton-Schulz; None = default_ns_dtype(device) (bf16 on
        # CUDA, float32 elsewhere). A trainer running bf16 on a CPU with fast bf16
        # matmuls may pass torch.bfloat16 (the 16 matrices of a 4 x 128 model, batched by
        # shape: 5.3 ms in bf16 vs 10.4 ms in float32 here). Not a group setting, so it
        # stays out of state_dict (a checkpoint can resume on other hardware).
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
            dtype = self.ns_dtype or default_ns_dtype(device)
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
    Plain per-tensor ops: compiled, they fuse with what follows; torch._foreach_lerp
    with a tensor weight stayed one un-fused call per tensor (0.9 ms per step here)."""
    for buf, g in zip(bufs, grads):
        buf.lerp_(g, 1.0 - mu)
    return [g.lerp(buf, mu) for g, buf in zip(grads, bufs)] if nesterov else bufs


def muon_orthogonalise(directions, ns_steps, dtype):
    """Newton-Schulz on a list of same-shape directions (wide: rows <= cols), batched:
    returns the (n, *shape) stack of ~orthogonal matrices, in dtype.
    Batching matters for small models: at 4 x 128 wide (16 matrices of 4 shapes) one
    batched bf16 call per shape took 5.3 ms against 13.6 ms for one call per matrix
    (measured here; tall and wide buckets merged, 3 calls: 2-3% less again). A batch
    holds at most MUON_BATCH_NUMEL elements, so that a big model's stack (and the
    iteration's temporaries, a few times its size) stays bounded."""
    per_call = max(1, MUON_BATCH_NUMEL // directions[0].numel())
    parts = []
    for i in range(0, len(directions), per_call):
        # (compiled, the stack, the cast and the momentum lerps fuse into one pass; an
        # empty stack filled row by row was 0.1 ms faster eagerly, but compiled it made
        # inductor fuse everything into one slow 3.7 ms kernel)
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
    batched matmuls of Newton-Schulz (4 x 128 model, bf16: 5.9 ms against 7.9 ms eager
    per step here). lr, mu: 0-d tensors."""
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
    orthogonalised update would move every routing logit by the same amount each step."""
    scale = (REFERENCE_WIDTH / cfg.n_embd) ** 0.5
    adam_lr = {"embed": cfg.embed_lr * scale, "head": cfg.head_lr * scale,
               "router": cfg.head_lr * scale, "scalar": cfg.scalar_lr * scale}
    if raw_model.config.tie_embeddings:
        # One matrix is both wte and lm_head (it sits in the "embed" group). Its gradient
        # is dominated by the read-out, so it must move at the head's small lr: at
        # embed_lr (50x larger) the tied model diverged within 15 steps (measured here).
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
            wd = 0.0 if name == "scalar" else cfg.adam_weight_decay  # never decay gains
            group = dict(params=params, lr=adam_lr.get(name, adam_lr["scalar"]), weight_decay=wd)
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
        # Newton-Schulz in bf16 when the run computes in bf16 (CUDA, or a CPU with fast
        # bf16 matmuls); in float32 otherwise, e.g. for the exact CPU tests
        ns_dtype = torch.bfloat16 if rt.dtype == torch.bfloat16 else None
        optimizers.append(Muon(muon_groups, lr=cfg.matrix_lr, momentum=cfg.muon_momentum,
                               cautious=cfg.cautious_wd, ns_dtype=ns_dtype, compiled=compiled,
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
    steps: 0.4-0.7 against 1.0 at 4 x 128; there the training step went from 22.01 to
    21.45 ms, A/B in one process)."""
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


def muon_momentum(cfg, step):
    """Low momentum early (the gradient direction changes fast), ramped linearly."""
    frac = min(1.0, step / cfg.muon_momentum_warmup) if cfg.muon_momentum_warmup > 0 else 1.0
    return (1 - frac) * cfg.muon_momentum_start + frac * cfg.muon_momentum


def staged(schedule, step, default):
    """Value of a staged schedule [(from_step, value), ...] at step: the value of the
    last stage that has started, or the default before the first one.
    staged([(0, 64), (100, 256)], 99, 512) == 64; at step 100 it is 256."""
    value = default
    for start, v in schedule:
        if step >= start:
            value = v
    return value


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

def forward_loss(model, x, y, doc_ids, plan, model_cfg):
    """(total loss to backpropagate, main next-token loss, aux dict).

    total = loss + mtp_weight * aux["mtp"] + the MoE coefficients * their aux losses.
    The model returns auxiliary losses unweighted; the weights live with the trainer
    because some of them follow a schedule."""
    loss, aux = model(x, y, doc_ids=doc_ids, window=plan.window)
    weights = {"mtp": plan.mtp_weight,
               "moe_aux": getattr(model_cfg, "moe_aux_coef", 0.0),
               "moe_z": getattr(model_cfg, "moe_z_coef", 0.0)}
    total = loss
    for name, value in (aux or {}).items():
        if name in weights:  # added even at weight 0, so DDP sees every parameter used
            total = total + weights[name] * value
    return total, loss, aux


@torch.no_grad()
def evaluate(rt, model, val_x, val_y, batch_size, token_bytes, doc_mask, bos_id):
    """Validation loss (nats per token) and bits per byte on the fixed val windows.

        bpb = sum of nats over target tokens / (ln 2 * sum of bytes of the target tokens)

    Dividing by bytes instead of tokens makes models with different tokenizers
    comparable: it is the compression rate of the text itself. Special tokens decode
    to 0 bytes. Ranks split the windows and sum (nats, tokens, bytes)."""
    model.eval()
    nats = tokens = n_bytes = 0.0
    idx = np.arange(rt.rank, len(val_x), rt.world_size)
    for i in range(0, len(idx), batch_size):
        rows = idx[i:i + batch_size]
        x, y = to_device(rt, val_x[rows]), to_device(rt, val_y[rows])
        doc_ids = doc_ids_from_bos(x, bos_id) if doc_mask else None
        with rt.autocast():
            loss, _ = model(x, y, doc_ids=doc_ids, reduction="sum")
        nats += loss.item()
        tokens += y.numel()
        n_bytes += token_bytes[y].sum().item()
    model.train()
    nats, tokens, n_bytes = all_reduce_sum(rt, [nats, tokens, n_bytes])
    return nats / tokens, nats / (math.log(2) * max(n_bytes, 1.0))


@torch.no_grad()
def greedy_sample(rt, model, tokenizer, prompt, n_tokens, block_size):
    """Greedy continuation of the prompt (argmax each step, no KV cache: short and simple)."""
    model.eval()
    ids = [tokenizer.eot_id] + tokenizer.encode(prompt)  # documents start with BOS in training
    x = torch.tensor([ids], dtype=torch.long, device=rt.device)
    for _ in range(n_tokens):
        with rt.autocast():
            logits = model(x[:, -block_size:])           # (1, T, vocab)
        x = torch.cat([x, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    model.train()
    return tokenizer.decode(x[0, 1:].tolist())


# -----------------------------------------------------------------------------
# 7. Metrics and pictures
#
# MFU (model FLOPs utilisation) = achieved model FLOP/s / peak FLOP/s, with the
# achieved rate = tokens/s * flops_per_token (6 N for the matmuls of forward +
# backward plus the attention term; see model.flops_per_token). On CPU the "peak"
# is a large matmul timed at start-up, so MFU there reads "fraction of what this
# CPU's matmul reaches".

def format_seconds(s):
    return str(datetime.timedelta(seconds=int(max(0, s))))


def write_text_atomic(path, text):
    bpe.atomic_write_bytes(path, text.encode("utf-8"))


class MetricsLog:
    """metrics.jsonl: one JSON object per line; train and eval records share 'step'."""

    def __init__(self, path, resume_step=None):
        """A fresh log, or (resume_step given) the old one cut back to that step: a run
        that crashed after its last checkpoint logged steps that will now be redone."""
        self.path = path
        self.train, self.val = [], []   # (step, loss) for the plots
        kept = []
        if resume_step is not None and os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if json.loads(line)["step"] <= resume_step]
        write_text_atomic(path, "".join(kept))
        for line in kept:
            self._remember(json.loads(line))

    def _remember(self, rec):
        if "loss" in rec:
            self.train.append((rec["step"], rec["loss"]))
        if "val_loss" in rec:
            self.val.append((rec["step"], rec["val_loss"]))

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


def loss_svg(train, val, title="loss"):
    """An SVG line plot of train and val loss vs step, drawn by hand: map data to
    pixels with x_px = left + (step - s0) / (s1 - s0) * width (y likewise, flipped
    because SVG's y axis points down), then one <polyline> per curve."""
    W, H, left, right, top, bottom = 640, 400, 60, 20, 30, 40
    points = train + val
    s0, s1 = 0, max([s for s, _ in points] + [1])
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
# Written only by rank 0, atomically: torch.save into a temp file in the same
# directory, fsync, then os.replace, which swaps the name in one step -- a crash
# mid-save leaves the previous last.pt intact and at worst a stray temp file.
# Everything inside is a tensor or a plain Python type, so every script can load
# with torch.load(weights_only=True), which refuses to run pickled code.

def unwrap(model):
    """The plain GPT inside DDP (.module) and torch.compile (._orig_mod) wrappers."""
    while True:
        if isinstance(model, DDP):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


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


def save_checkpoint(path, checkpoint):
    """torch.save into path atomically (temp file + fsync + os.replace, see bpe.atomic_write):
    a crash or a full disk mid-save leaves the previous checkpoint intact."""
    bpe.atomic_write(path, lambda f: torch.save(checkpoint, f))


def load_checkpoint(path):
    if not os.path.exists(path):
        raise bpe.UserError(f"checkpoint {path} not found; train first or fix the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated / foreign file
        raise bpe.UserError(f"cannot load checkpoint {path} ({type(e).__name__}: {e}); "
                            f"it is damaged or not a train.py checkpoint") from None


# -----------------------------------------------------------------------------
# 9. The training loop

class NonFiniteLoss(bpe.UserError):
    """The loss became nan/inf; the message names the step."""


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, saves last.pt and exits 0.
    A second signal interrupts immediately."""

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


@dataclasses.dataclass
class TrainResult:
    """What train() returns (the tests read it)."""
    step: int
    losses: list            # (step, loss) of every step run in this call
    val_loss: float
    val_bpb: float
    stopped: bool           # ended by a signal before max_steps
    model: object = None    # the trained (unwrapped) model


def build_model(cfg, rt, vocab_size, checkpoint=None):
    """A GPT from the settings, or from a checkpoint's model_config + weights."""
    if checkpoint is not None:
        names = {f.name for f in dataclasses.fields(GPTConfig)}
        model_cfg = GPTConfig(**{k: v for k, v in checkpoint["model_config"].items() if k in names})
        ignored = [k for k, v in dataclasses.asdict(model_cfg).items()
                   if k != "vocab_size" and getattr(cfg, k, v) != v]
        if ignored:
            rt.print(f"note: the architecture comes from the checkpoint; ignoring --{', --'.join(ignored)}")
        if model_cfg.vocab_size != vocab_size:
            raise bpe.UserError(f"checkpoint vocab_size {model_cfg.vocab_size} != data vocab_size "
                                f"{vocab_size}; use data made with the checkpoint's tokenizer")
    else:
        model_cfg = model_config_from(cfg, vocab_size)
    torch.manual_seed(cfg.seed)  # the same init on every rank
    model = GPT(model_cfg)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    return model.to(rt.device), model_cfg


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


def train(cfg, rt=None):
    """Run (or resume) training as cfg says; returns a TrainResult. main() calls it
    under torchrun as well: every rank runs this same function."""
    rt = rt or setup_runtime(cfg)
    t_start = time.time()
    os.makedirs(cfg.out_dir, exist_ok=True)
    last_path, best_path = os.path.join(cfg.out_dir, "last.pt"), os.path.join(cfg.out_dir, "best.pt")

    # --- data and tokenizer; shards must have been made with this tokenizer ---
    meta = prepare.load_meta(cfg.data_dir)
    tokenizer = prepare.load_tokenizer(cfg.data_dir)
    train_shards = prepare.load_split(cfg.data_dir, "train", expected_fingerprint=tokenizer.fingerprint)
    val_shards = prepare.load_split(cfg.data_dir, "val", expected_fingerprint=tokenizer.fingerprint)
    bos_id = int(meta.get("bos_id", tokenizer.eot_id))
    token_bytes = torch.tensor(tokenizer.token_bytes(), dtype=torch.long, device=rt.device)

    # --- model: fresh, resumed or initialised from a checkpoint ---
    checkpoint = None
    if cfg.resume:
        checkpoint = load_checkpoint(last_path)
    elif cfg.init_from:
        checkpoint = load_checkpoint(cfg.init_from)
    if checkpoint is not None and checkpoint.get("tokenizer_fingerprint") != tokenizer.fingerprint:
        raise bpe.UserError(f"the checkpoint was trained with another tokenizer than {cfg.data_dir}'s; "
                            f"use data prepared with the checkpoint's tokenizer")
    raw_model, model_cfg = build_model(cfg, rt, tokenizer.vocab_size, checkpoint)
    optimizers = build_optimizers(cfg, raw_model, rt)
    start_step, best_val_loss = 0, float("inf")
    if cfg.resume:
        for opt, state in zip(optimizers, checkpoint["optimizers"]):
            opt.load_state_dict(state)
        start_step = checkpoint["step"]
        best_val_loss = checkpoint.get("best_val_loss", float("inf"))
        set_rng_state(checkpoint["rng"])
        rt.print(f"resumed from {last_path} at step {start_step}")
    elif cfg.init_from:
        rt.print(f"initialised weights from {cfg.init_from} (step 0, fresh optimizer)")
    checkpoint = None  # free the memory

    model = wrap_ddp(rt, maybe_compile(rt, raw_model))
    params = list(raw_model.parameters())  # listed once: walking the modules every step costs
    batches = BatchSource(train_shards, cfg.batch_mode, cfg.seed)
    eval_len = staged(cfg.seq_len_schedule, cfg.max_steps, cfg.seq_len)  # the final context length
    val_x, val_y = val_windows(val_shards, eval_len, cfg.eval_tokens)
    doc_mask = cfg.batch_mode == "packed"
    flops_per_token = raw_model.flops_per_token(cfg.seq_len)

    rt.print(f"device {rt.device} x {rt.world_size} | precision {rt.dtype} ({rt.dtype_reason}) | "
             f"compile {rt.compile} | peak {rt.peak_flops / 1e12:.2f} TFLOP/s per device")
    rt.print(f"model {raw_model.num_params():,} params | {flops_per_token / 1e6:.1f} MFLOP/token | "
             f"{cfg.batch_size * cfg.seq_len * cfg.grad_accum * rt.world_size:,} tokens/step | "
             f"{len(val_x)} val windows of {eval_len}")
    log = MetricsLog(os.path.join(cfg.out_dir, "metrics.jsonl"),
                     resume_step=start_step if cfg.resume else None) \
        if rt.is_main and not cfg.bench else None

    def checkpoint_dict(step, val_bpb):
        return {"model": clean_state_dict(raw_model), "model_config": dataclasses.asdict(model_cfg),
                "train_config": dataclasses.asdict(cfg),
                "optimizers": [opt.state_dict() for opt in optimizers], "step": step,
                "data_state": {"step": step, "seed": cfg.seed, "batch_mode": cfg.batch_mode},
                "rng": rng_state(), "tokenizer_path": os.path.abspath(
                    os.path.join(cfg.data_dir, meta.get("tokenizer", "tokenizer.bpe"))),
                "tokenizer_fingerprint": tokenizer.fingerprint, "best_val_loss": best_val_loss,
                "val_bpb": val_bpb, "bos_id": bos_id}

    def write_plots():
        write_text_atomic(os.path.join(cfg.out_dir, "loss.svg"), loss_svg(log.train, log.val))

    moe = MoEStats(raw_model)
    phases = collections.defaultdict(list)   # --bench: seconds per phase, one entry per step
    this_step = collections.defaultdict(float)

    def phase_end(name, since):
        """--bench only: wait for the device, add the time since `since` to phase `name`
        of this step; returns now. (Off the bench, a no-op: syncs would slow training.)"""
        if not cfg.bench:
            return since
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        this_step[name] += now - since
        return now

    def accumulate_gradients(model, plan, step):
        """Forward + backward of grad_accum micro-batches; returns the sum of their losses."""
        loss_sum = torch.zeros((), device=rt.device)
        mark = time.perf_counter()
        for micro in range(cfg.grad_accum):
            x, y = batches.get(step, rt.rank * cfg.grad_accum + micro, plan.batch_size, plan.seq_len)
            x, y = to_device(rt, x), to_device(rt, y)
            doc_ids = doc_ids_from_bos(x, bos_id) if doc_mask else None
            mark = phase_end("data", mark)
            # DDP all-reduces gradients during backward; skip that on all but the last
            # micro-step, whose backward then averages the accumulated sums once
            last_micro = micro == cfg.grad_accum - 1
            with (model.no_sync() if rt.ddp and not last_micro else contextlib.nullcontext()):
                with rt.autocast():
                    total, loss, aux = forward_loss(model, x, y, doc_ids, plan, model_cfg)
                mark = phase_end("forward", mark)
                # mean over micro-steps here and over ranks by DDP: N ranks x M micro-steps
                # give the gradient of the mean loss of one N*M times larger batch
                scaled = total / cfg.grad_accum
                (rt.scaler.scale(scaled) if rt.scaler else scaled).backward()
                mark = phase_end("backward", mark)
            moe.add()
            loss_sum += loss.detach().float()
        return loss_sum.item()  # one device sync per step (the non-finite check needs it)

    losses, val_loss, val_bpb = [], float("nan"), float("nan")
    step, stopped, compile_checked = start_step, False, not rt.compile
    step_times = []  # seconds per step, excluding the first (compile / warm-up)
    end_step = start_step + cfg.bench_steps + 3 if cfg.bench else cfg.max_steps
    with StopFlag() as stop:
        while True:
            last = step >= end_step
            # --- evaluate, sample, checkpoint (between steps, so resume sees the same state) ---
            if not cfg.bench:
                if (step % cfg.eval_interval == 0 and step != start_step) or last \
                        or (step == 0 and not cfg.resume):
                    val_loss, val_bpb = evaluate(rt, raw_model, val_x, val_y, cfg.batch_size,
                                                 token_bytes, doc_mask, bos_id)
                    rt.print(f"step {step} | val loss {val_loss:.4f} | val bpb {val_bpb:.4f}")
                    if rt.is_main:
                        log.write({"step": step, "val_loss": val_loss, "val_bpb": val_bpb,
                                   "elapsed": time.time() - t_start})
                        write_plots()
                        if val_loss < best_val_loss and step > 0:
                            best_val_loss = val_loss
                            save_checkpoint(best_path, checkpoint_dict(step, val_bpb))
                if rt.is_main and (last or (cfg.sample_interval and step % cfg.sample_interval == 0
                                            and step > start_step)):
                    text = greedy_sample(rt, raw_model, tokenizer, cfg.sample_prompt,
                                         cfg.sample_tokens, model_cfg.block_size)
                    rt.print(f"--- greedy sample at step {step} ---\n{text}\n---")
                if rt.is_main and step > start_step and (step % cfg.ckpt_interval == 0 or last
                                                         or stopped):
                    save_checkpoint(last_path, checkpoint_dict(step, val_bpb))
            if last or stopped:
                break

            # --- one optimizer step: grad_accum micro-batches, then clip and update ---
            t0 = time.time()
            plan = plan_step(cfg, step)
            apply_schedules(optimizers, plan)
            try:
                loss_sum = accumulate_gradients(model, plan, step)
            except Exception as e:
                if compile_checked:
                    raise
                # torch.compile fails lazily, at the first call: warn once, redo the step eagerly
                rt.print(f"warning: torch.compile failed ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''}); continuing without it")
                rt.compile = False
                model = wrap_ddp(rt, raw_model)
                for p in raw_model.parameters():
                    p.grad = None
                moe.reset()
                loss_sum = accumulate_gradients(model, plan, step)
            compile_checked = True
            mark = time.perf_counter()
            loss_sum, stop_votes = all_reduce_sum(rt, [loss_sum, float(stop.requested)])
            step_loss = loss_sum / (cfg.grad_accum * rt.world_size)
            stopped = stop_votes > 0  # every rank stops after the same step
            if rt.scaler:
                for opt in optimizers:
                    rt.scaler.unscale_(opt)
            grad_norm = clip_grad_norm(params, cfg.grad_clip)
            mark = phase_end("loss sync, clip", mark)
            # with fp16 an inf gradient is routine: the GradScaler skips the step and lowers its scale
            finite = math.isfinite(step_loss) and (math.isfinite(grad_norm) or rt.scaler is not None)
            if not finite:
                if not cfg.skip_nonfinite:
                    raise NonFiniteLoss(f"non-finite loss ({step_loss}) or gradient norm "
                                        f"({grad_norm}) at step {step}; checkpoints in "
                                        f"{cfg.out_dir}/ were left untouched; lower the learning "
                                        f"rates, or pass --skip_nonfinite=True to skip such steps")
                rt.print(f"step {step}: non-finite loss/gradient, step skipped")
            elif rt.scaler:
                for opt in optimizers:
                    rt.scaler.step(opt)
            else:
                for opt in optimizers:
                    opt.step()
            if rt.scaler:
                rt.scaler.update()
            for p in params:
                p.grad = None
            moe_stats = moe.finish(rt, update_bias=finite)  # MoE: balance once per step
            phase_end("optimizer steps", mark)
            for name, seconds in this_step.items():
                phases[name].append(seconds)
            this_step.clear()
            step += 1

            # --- log ---
            if rt.device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.time() - t0
            if step > start_step + 1:
                step_times.append(dt)
            tokens = plan.batch_size * plan.seq_len * cfg.grad_accum * rt.world_size
            tok_s = tokens / dt
            mfu = tok_s * raw_model.flops_per_token(plan.seq_len) / (rt.peak_flops * rt.world_size)
            losses.append((step, step_loss))
            if log is not None:
                log.write({"step": step, "loss": step_loss, "lr_mult": plan.lr_mult,
                           "grad_norm": grad_norm, "tok_s": tok_s, "mfu": mfu,
                           "seq_len": plan.seq_len, "batch_size": plan.batch_size,
                           "elapsed": time.time() - t_start, **moe_stats})
            if step % cfg.log_interval == 0 or step == end_step:
                recent = step_times[-20:] or [dt]
                eta = (end_step - step) * sorted(recent)[len(recent) // 2]
                rt.print(f"step {step}/{end_step} | loss {step_loss:.4f} | lr x{plan.lr_mult:.3f} | "
                         f"gnorm {grad_norm:.3f} | {tok_s / 1e3:.1f}k tok/s | mfu {100 * mfu:.1f}% | "
                         + (f"moe drop {100 * moe_stats['moe_dropped']:.1f}% load "
                            f"{moe_stats['moe_min_load']:.2f}-{moe_stats['moe_max_load']:.2f}x | "
                            if moe_stats else "") +
                         f"{format_seconds(time.time() - t_start)} elapsed | "
                         f"eta {format_seconds(eta)}")

    if cfg.bench:
        times = sorted(step_times[2:]) or sorted(step_times)  # drop the warm-up steps
        dt = times[len(times) // 2]
        tokens = cfg.batch_size * cfg.seq_len * cfg.grad_accum * rt.world_size
        mfu = tokens / dt * flops_per_token / (rt.peak_flops * rt.world_size)
        rt.print(f"bench: {tokens / dt:,.0f} tokens/s | MFU {100 * mfu:.1f}% | "
                 f"{1000 * dt:.1f} ms/step (median of {len(times)} steps)")
        # where a step's time goes (medians per phase, same steps; they need not add up exactly)
        rt.print("bench: ms per step by phase: " + ", ".join(
            f"{name} {1000 * statistics.median(ts[3:] or ts):.1f}" for name, ts in phases.items()))
    elif rt.is_main:
        write_plots()
        print(text_plot(log.train, log.val), flush=True)
        print(f"{'stopped by signal' if stopped else 'done'}: step {step}, last val loss "
              f"{val_loss:.4f}, val bpb {val_bpb:.4f}, "
              f"{format_seconds(time.time() - t_start)}; checkpoints in {cfg.out_dir}/", flush=True)
    return TrainResult(step=step, losses=losses, val_loss=val_loss, val_bpb=val_bpb, stopped=stopped,
                       model=raw_model)


# -----------------------------------------------------------------------------
# 10. main

def main():
    cfg = bpe.parse_settings(TrainConfig, sys.argv[1:], description=__doc__)
    try:
        train(cfg)
    except BaseException as e:
        if dist.is_initialized():
            # other ranks may be blocked in a collective that this rank will never join;
            # leaving without destroy_process_group lets torchrun tear the group down
            # (their pending collectives fail as soon as this process is gone)
            print(f"rank {dist.get_rank()}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            sys.stderr.flush()
            raise
        raise
    if dist.is_initialized():
        # every rank reaches this line before any tears down: without the barrier one
        # gloo rank could close its connections while the other was still using them,
        # which aborted a rank now and then ("terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    bpe.main_guard(main)
