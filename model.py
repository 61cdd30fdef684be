"""
model.py -- a modern decoder-only transformer (GPT), written out, with a KV cache.

Where it sits: bpe.py (tokenizer) -> prepare.py (token shards) -> model.py (this file)
-> train.py (optimises it) -> sample.py (generates with its KV cache).

Every modern choice is a switch in GPTConfig, so a reader can turn it off and see what it did:
  - RMSNorm, with or without a learnable gain (norm_gain)
  - rotary position embeddings (RoPE) with base rope_theta, and context extension at inference
    by linear position interpolation or YaRN (rope_scaling, rope_factor)
  - attention with one merged QKV projection, grouped-query attention (n_kv_head: 1 = multi-query,
    n_head = multi-head), QK-norm, an attention-logit softcap
  - two attention paths with the same result: F.scaled_dot_product_attention (fast) and a
    hand-written one (scores, mask, softmax, weighted sum) that you can read line by line
  - masks: causal, sliding window (changeable at run time), global prefix tokens that are always
    visible, document masking for packed sequences
  - MLP: ReLU^2, SwiGLU or GELU, hidden size configurable
  - pre-norm residual blocks, zero-initialised output projections, tied or untied embeddings,
    final norm, final-logit softcap
  - multi-token prediction (mtp): an extra head that predicts token t+2
  - mixture of experts (n_experts > 0): token-choice top-k routing, shared experts, capacity
    with token dropping, load-balancing loss, router z-loss, aux-loss-free bias balancing
  - a KV cache: preallocated, prefill + one-token decode, branching one prompt into N samples
  - accounting: parameters per component, FLOPs per token, KV-cache bytes per token, and the
    optimizer parameter groups (Muon for hidden matrices, AdamW for the rest)
  - the runtime that train.py and sample.py share: device, precision, compile, threads and
    determinism decided once (the model gets the hardware choices as a Kernels setting), and the
    one checkpoint format (atomic save with a checksum; verified load)

Run it:
  python model.py                                  # default architecture: table + one fwd/bwd
  python model.py --n_layer=12 --n_embd=768 --n_head=6 --n_kv_head=2 --block_size=1024
  python model.py --n_experts=8 --top_k=2 --moe_hidden=256      # MoE: total vs active params
  python model.py --bench=True                     # time SDPA vs hand-written attention
  python model.py --help                           # every GPTConfig field with its meaning

Use it (train.py and sample.py do this):
  model = GPT(GPTConfig(n_layer=4))                # or GPT(config, rt.kernels) for a Runtime rt
  loss, aux = model(idx, targets)                  # aux: unweighted auxiliary losses ("mtp", ...)
  logits = model(idx)                              # (B, T, vocab_size) float32
  cache = model.make_cache(batch_size=1, max_len=512)
  logits = model(prompt, cache=cache)              # prefill; then one token at a time

Sections:
  1. Configuration (GPTConfig: what the model computes; Kernels: how, on this hardware)
  2. RMSNorm
  3. Rotary position embeddings (RoPE, linear interpolation, YaRN)
  4. Attention masks (causal, sliding window, global prefix, documents)
  5. Attention (merged QKV, GQA, QK-norm, softcap, SDPA and hand-written paths,
     recording the attention probabilities)
  6. MLP (ReLU^2, SwiGLU, GELU)
  7. Mixture of experts (routing, capacity, balancing, statistics)
  8. Transformer block
  9. KV cache
 10. The GPT model (init, forward, loss, multi-token prediction)
 11. Accounting (parameters, FLOPs, KV bytes) and optimizer groups
 12. Runtime: device, precision, compile, threads, determinism (decided once)
 13. Checkpoints: the file format, atomic save with a checksum, verified load, growing the
     vocabulary of a base model for new special tokens (grow_vocab)
 14. main: print the architecture, run a forward/backward, optional benchmark
"""
import contextlib
import ctypes
import dataclasses
import datetime
import errno
import hashlib
import math
import os
import sys
import time
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import bpe

# -----------------------------------------------------------------------------
# 1. Configuration
#
# One dataclass holds every architectural choice. Its trailing comments are the --help text of
# `python model.py`, and train.py stores dataclasses.asdict(config) in each checkpoint, so a model
# can always be rebuilt from its checkpoint alone.

MLP_KINDS = ("relu2", "swiglu", "gelu")
ROPE_SCALINGS = ("none", "linear", "yarn")
ATTN_IMPLS = ("sdpa", "manual")
SWIGLU_ROUND = 64  # hidden sizes that are multiples of 64 map well onto matmul tiles


def dense_hidden(config):
    """Hidden width of the dense MLP: config.mlp_hidden if set, else 4*n_embd; for swiglu
    8/3*n_embd rounded up to a multiple of SWIGLU_ROUND. SwiGLU has three matrices instead
    of two, so 2/3 of the width keeps its parameter count close to the two-matrix MLPs.
    Example: n_embd=48 -> relu2 192, swiglu 128 (8/3*48 = 128 is already a multiple of 64)."""
    if config.mlp_hidden:
        return config.mlp_hidden
    if config.mlp == "swiglu":
        return SWIGLU_ROUND * math.ceil(8 * config.n_embd / 3 / SWIGLU_ROUND)
    return 4 * config.n_embd


@dataclasses.dataclass
class GPTConfig:
    vocab_size: int = 4096          # number of token ids (tokenizer vocab incl. special tokens)
    block_size: int = 256           # training context length in tokens (RoPE tables cover this)
    n_layer: int = 4                # number of transformer blocks
    n_head: int = 4                 # query heads per attention layer
    n_kv_head: int = 4              # key/value heads: n_head = multi-head, 1 = multi-query, between = GQA
    n_embd: int = 256               # width of the residual stream (head_dim = n_embd / n_head)
    mlp: str = "relu2"              # MLP activation: relu2 (ReLU squared) | swiglu | gelu
    mlp_hidden: int = 0             # MLP hidden size; 0 = 4*n_embd (relu2, gelu) or ~8/3*n_embd (swiglu)
    rope_theta: float = 10000.0     # RoPE base: the slowest rotation has wavelength ~2*pi*theta tokens
    rope_scaling: str = "none"      # context extension at inference: none | linear | yarn
    rope_factor: float = 1.0        # extension factor s: usable context = block_size * s (needs scaling)
    qk_norm: bool = True            # RMSNorm queries and keys per head before RoPE (stabilises logits)
    attn_softcap: float = 0.0       # cap*tanh(score/cap) on attention scores; 0 = off (off keeps SDPA)
    logit_softcap: float = 15.0     # cap*tanh(logit/cap) on output logits; 0 = off
    norm_gain: bool = False         # RMSNorm has a learnable per-channel gain (False = parameter-free)
    tie_embeddings: bool = False    # share the token embedding matrix with the output head
    window: int = 0                 # sliding attention window in tokens; 0 = full causal attention
    n_global: int = 0               # first n_global positions stay visible to every query (with a window)
    mtp: bool = False               # multi-token prediction head: extra loss predicting token t+2
    attn_impl: str = "sdpa"         # sdpa = F.scaled_dot_product_attention where it applies | manual
    # Mixture of experts (section 7); n_experts = 0 keeps every MLP dense.
    n_experts: int = 0              # routed experts per MoE layer; 0 = dense model
    moe_every: int = 1              # every k-th block uses MoE (blocks with index % k == k-1)
    top_k: int = 2                  # experts chosen per token
    n_shared_experts: int = 0       # experts every token always uses, on top of the routed ones
    capacity_factor: float = 0.0    # tokens per expert <= factor*tokens*top_k/n_experts; 0 = no dropping
    moe_hidden: int = 0             # hidden size of each expert; 0 = the dense MLP hidden size
    moe_aux_coef: float = 0.01      # weight of the load-balancing loss aux["moe_aux"] (used by train.py)
    moe_z_coef: float = 0.001       # weight of the router z-loss aux["moe_z"] (used by train.py)
    moe_bias_rate: float = 0.0      # step size of aux-loss-free bias balancing; 0 = off

    def __post_init__(self):
        positive = ("vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head={self.n_head} must be divisible by n_kv_head={self.n_kv_head} "
                             "(each key/value head serves a whole group of query heads)")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"head_dim = n_embd/n_head = {self.n_embd // self.n_head} must be even "
                             "(RoPE rotates pairs of channels)")
        if self.mlp not in MLP_KINDS:
            raise ValueError(f"mlp={self.mlp!r}: choose one of {', '.join(MLP_KINDS)}")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"rope_scaling={self.rope_scaling!r}: choose one of {', '.join(ROPE_SCALINGS)}")
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl={self.attn_impl!r}: choose one of {', '.join(ATTN_IMPLS)}")
        if not self.rope_factor >= 1.0:
            raise ValueError(f"rope_factor={self.rope_factor} must be >= 1 (it stretches the context)")
        if self.rope_scaling == "none" and self.rope_factor != 1.0:
            raise ValueError(f"rope_factor={self.rope_factor} needs rope_scaling=linear or yarn")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta={self.rope_theta} must be positive")
        for name in ("mlp_hidden", "window", "n_global", "n_experts", "n_shared_experts", "moe_hidden"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("attn_softcap", "logit_softcap", "capacity_factor", "moe_aux_coef",
                     "moe_z_coef", "moe_bias_rate"):
            if not getattr(self, name) >= 0:  # `not >=` also rejects NaN
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.n_global > self.block_size:
            raise ValueError(f"n_global={self.n_global} must not exceed block_size={self.block_size}")
        if self.moe_every < 1:
            raise ValueError(f"moe_every={self.moe_every} must be at least 1")
        if self.n_experts > 0 and not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k={self.top_k} must be between 1 and n_experts={self.n_experts}")
        if self.n_experts > 0 and self.moe_every > self.n_layer:
            raise ValueError(f"moe_every={self.moe_every} > n_layer={self.n_layer}: no block would "
                             "use the experts; lower moe_every")

    @property
    def head_dim(self):
        return self.n_embd // self.n_head

    @property
    def max_context(self):
        """Longest sequence the RoPE tables cover: block_size, stretched by rope_factor."""
        return int(math.ceil(self.block_size * self.rope_factor))

    @property
    def hidden_size(self):
        return dense_hidden(self)

    @property
    def expert_hidden(self):
        return self.moe_hidden or dense_hidden(self)

    def is_moe_layer(self, layer_index):
        return self.n_experts > 0 and layer_index % self.moe_every == self.moe_every - 1

    @property
    def n_moe_layers(self):
        return sum(self.is_moe_layer(i) for i in range(self.n_layer))


@dataclasses.dataclass(frozen=True)
class Kernels:
    """HOW the model computes, where GPTConfig says WHAT it computes. These are decisions about
    the hardware, made once by the Runtime (section 12) and handed to GPT(config, kernels); the
    model never looks at a tensor's device to decide. Every choice gives the same function (up
    to float rounding), so they are never saved in checkpoints: the same weights run anywhere.
    The defaults are the plain forms, the ones the parity tests read."""
    sdpa_fp32: bool = False        # run SDPA in float32 inside bf16 autocast (CPU: its bf16 attention kernels are slow)
    softcap_sigmoid: bool = False  # write cap*tanh(x/cap) as 2*cap*sigmoid(2x/cap) - cap (inductor's CPU tanh is slow)
    moe_padded: bool = False       # MoE experts as padded batched matmuls when a capacity fixes the shapes (CUDA: static shapes)

# -----------------------------------------------------------------------------
# 2. RMSNorm
#
# RMSNorm(x) = x / sqrt(mean(x^2) + eps) * g         (Zhang & Sennrich, 2019)
# LayerNorm without the mean subtraction and the bias: cheaper, and works as well in transformers.
# With gain=False the norm has no parameters at all (g = 1), as in modded-nanogpt / nanochat.
# (F.rms_norm computes the same thing in one fused kernel; the formula is written out to be read.)

RMS_EPS = 1e-6


class RMSNorm(nn.Module):
    def __init__(self, dim, gain=True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim)) if gain else None

    def forward(self, x):
        xf = x.float()  # the mean of squares in float32 even when x is bfloat16
        y = (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + RMS_EPS)).type_as(x)
        return y * self.weight if self.weight is not None else y

# -----------------------------------------------------------------------------
# 3. Rotary position embeddings (Su et al., 2021)
#
# Split each head's channels into pairs (x1[i], x2[i]) = (x[i], x[i + D/2]) and rotate pair i by
# the angle p * w_i, where p is the token's position and w_i = theta^(-2i/D) its frequency:
#     y1 = x1 cos(p w) - x2 sin(p w)
#     y2 = x1 sin(p w) + x2 cos(p w)
# A rotation by angle a of q and by angle b of k changes their dot product into one that depends
# on a - b only, so q_m . k_n is a function of the relative offset m - n: attention sees relative
# positions without any learned position table (test_model_rope_relative checks it).
#
# Context extension at inference (the model was trained on block_size tokens, we want s times more):
#   linear: w_i -> w_i / s. Positions are squeezed so that s*block_size fits into the angles seen
#           in training (Chen et al., 2023, "position interpolation").
#   yarn:   squeeze only the slow pairs (Peng et al., 2023). A pair that completes r = L / lambda_i
#           turns in the training length L (lambda_i = 2 pi / w_i is its wavelength) is left alone
#           when r > YARN_BETA (fast pairs encode local order, which must not change), fully
#           interpolated when r < YARN_ALPHA (slow pairs never saw the new angles), and blended
#           linearly in between. YaRN also sharpens attention with a temperature: q and k are both
#           multiplied by 0.1 ln(s) + 1, so scores grow by its square.
# At s = 1 both reduce to plain RoPE exactly (test_model_rope_scaling_identity_and_yarn_ramp).

YARN_ALPHA = 1.0   # below this many turns in the training context: full interpolation (YaRN paper)
YARN_BETA = 32.0   # above this many turns: no interpolation (YaRN paper's value for LLaMA)


def rope_frequencies(head_dim, theta, scaling="none", factor=1.0, train_len=None):
    """Angular frequency of each channel pair, shape (head_dim/2,), and the attention scale that
    q and k are multiplied by (1.0 except for YaRN)."""
    w = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling == "linear":
        return w / factor, 1.0
    if scaling == "yarn":
        turns = train_len * w / (2 * math.pi)                         # r_i = L / lambda_i
        keep = ((turns - YARN_ALPHA) / (YARN_BETA - YARN_ALPHA)).clamp(0.0, 1.0)
        w = keep * w + (1.0 - keep) * w / factor
        return w, 0.1 * math.log(factor) + 1.0
    return w, 1.0


def rope_tables(config):
    """cos and sin of p * w_i for every position p < config.max_context: two (max_context, D/2)
    float32 tensors, already multiplied by the YaRN attention scale."""
    w, scale = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling,
                                config.rope_factor, train_len=config.block_size)
    angles = torch.outer(torch.arange(config.max_context, dtype=torch.float64), w)  # (L, D/2)
    return (angles.cos() * scale).float(), (angles.sin() * scale).float()


def apply_rope(x, cos, sin):
    """x: (B, H, T, D); cos, sin: (T, D/2). Rotates channel pairs (i, i + D/2)."""
    x1, x2 = x.chunk(2, dim=-1)                              # each (B, H, T, D/2)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

# -----------------------------------------------------------------------------
# 4. Attention masks
#
# A query at absolute position i may look at a key at position j when all of these hold:
#   causal:    j <= i                                   (never the future)
#   window:    i - j < window, or j < n_global          (window = 0: no limit; the window counts
#              the query itself, so window = 1 sees only itself; the first n_global positions
#              stay visible, an "attention sink" that keeps long sliding-window runs stable)
#   documents: doc[i] == doc[j]                         (packed sequences: never attend across a
#              document start; this holds for the global prefix too)
# Every query can at least see itself, so no row of the mask is empty (an empty row would make
# softmax divide 0 by 0).


def attention_mask(q_pos, k_pos, window=0, n_global=0, q_doc=None, k_doc=None):
    """Boolean mask, True where the query may attend the key.
    q_pos: (Tq,) and k_pos: (Tk,) absolute positions; q_doc: (B, Tq), k_doc: (B, Tk) doc ids.
    Returns (1, 1, Tq, Tk), or (B, 1, Tq, Tk) with documents; broadcasts over heads.

    Example: positions 0..3, window=2 -> [[1,0,0,0],[1,1,0,0],[0,1,1,0],[0,0,1,1]]."""
    qp, kp = q_pos[:, None], k_pos[None, :]                   # (Tq, 1), (1, Tk)
    allowed = kp <= qp
    if window > 0:
        near = (qp - kp) < window
        if n_global > 0:
            near = near | (kp < n_global)
        allowed = allowed & near
    allowed = allowed[None, None]                             # (1, 1, Tq, Tk)
    if q_doc is not None:
        same_doc = q_doc[:, :, None] == k_doc[:, None, :]     # (B, Tq, Tk)
        allowed = allowed & same_doc[:, None]                 # (B, 1, Tq, Tk)
    return allowed


def doc_ids_from_bos(idx, bos_id):
    """Document id of every token in a packed batch: the number of BOS tokens at or before it.
    idx: (B, T) token ids -> (B, T) int64.
    Example (bos_id=0): [[5, 0, 7, 8, 0, 9]] -> [[0, 1, 1, 1, 2, 2]]
    (tokens before the first BOS form document 0, the tail of a document cut by the crop)."""
    return (idx == bos_id).long().cumsum(dim=1)


class AttnLayout(NamedTuple):
    """What every attention layer of one forward call shares (built once in GPT.forward)."""
    cos: torch.Tensor            # (T, D/2) RoPE table rows for the new tokens
    sin: torch.Tensor
    pos: int                     # absolute position of the first new token (cache.pos or 0)
    k_start: int                 # first cached position the new tokens can see (sliding window)
    mask: Optional[torch.Tensor]  # bool (1|B, 1, T, Tk); None = every key visible
    is_causal: bool              # mask is exactly the square causal mask: SDPA's is_causal flag

# -----------------------------------------------------------------------------
# 5. Attention
#
# softmax(q k^T / sqrt(D) + mask) v, with n_head query heads and n_kv_head key/value heads.
# Grouped-query attention (Ainslie et al., 2023): query head h reads key/value head
# h // (n_head / n_kv_head). Fewer kv heads shrink the KV cache (and its memory traffic while
# decoding) by n_head / n_kv_head, at little cost in quality.
# One merged projection c_attn computes q, k and v in a single matmul (one kernel launch, one read
# of x), then the columns are split.


def tanh_softcap(x, cap, sigmoid=False):
    """cap * tanh(x / cap): close to x for |x| << cap, smoothly bounded by +-cap (Gemma 2's soft cap).

    sigmoid=True (Kernels.softcap_sigmoid) writes the same function as 2 cap sigmoid(2 x / cap) - cap,
    using tanh(z) = 2 sigmoid(2z) - 1: the code inductor generates for tanh on CPU is slow, for
    sigmoid it is not (README, performance notes). Eager PyTorch is faster with tanh itself.
    test_model_softcap_forms_agree checks that both forms give the same numbers."""
    if sigmoid:
        return (2.0 * cap) * torch.sigmoid(x * (2.0 / cap)) - cap
    return cap * torch.tanh(x / cap)


def attention_probs(q, k, mask=None, softcap=0.0, softcap_sigmoid=False):
    """softmax(q k^T / sqrt(D)) over the visible keys, in float32. q: (B, H, Tq, D); k: (B, Hkv,
    Tk, D); mask: bool, broadcastable to (B, H, Tq, Tk), True = visible (None = all visible).
    Returns (B, H, Tq, Tk): row i holds how much query i reads from each key (the row sums to 1)."""
    group = q.size(1) // k.size(1)
    k = k.repeat_interleave(group, dim=1)                     # (B, H, Tk, D): head h -> kv h//group
    scores = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5  # (B, H, Tq, Tk)
    if softcap > 0:
        # Gemma 2's softcap: scores stay in (-cap, cap), smoothly, so no single logit can blow up.
        scores = tanh_softcap(scores, softcap, softcap_sigmoid)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return F.softmax(scores.float(), dim=-1)


def manual_attention(q, k, v, mask=None, softcap=0.0, record=None, softcap_sigmoid=False):
    """The hand-written path: attention_probs, then the probability-weighted sum of the values.
    q: (B, H, Tq, D); k, v: (B, Hkv, Tk, D). Returns (B, H, Tq, D). record: a list that receives
    the (B, H, Tq, Tk) probabilities (see record_attention)."""
    probs = attention_probs(q, k, mask, softcap, softcap_sigmoid)
    if record is not None:
        record.append(probs.detach())
    v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)    # (B, H, Tk, D)
    return probs.type_as(v) @ v                               # (B, H, Tq, D)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, kernels=Kernels()):
        super().__init__()
        self.kernels = kernels
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        qkv_dim = (config.n_head + 2 * config.n_kv_head) * config.head_dim
        self.c_attn = nn.Linear(config.n_embd, qkv_dim, bias=False)
        self.c_proj = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=False)
        # QK-norm (Dehghani et al., 2023): normalise every query and key vector, so the attention
        # logits stay bounded by ~sqrt(D) no matter how large the weights grow.
        self.q_norm = RMSNorm(config.head_dim, config.norm_gain) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, config.norm_gain) if config.qk_norm else None
        self.softcap = config.attn_softcap
        # SDPA cannot express a softcap (it is applied between q k^T and softmax), so softcapped
        # attention always takes the hand-written path.
        self.manual = config.attn_impl == "manual" or config.attn_softcap > 0
        self.record = None   # a list while record_attention is on (the probabilities go there)

    def forward(self, x, layout, cache=None, layer=0):
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.c_attn(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)                # (B, H, T, D)
        k = k.view(B, T, Hkv, D).transpose(1, 2)              # (B, Hkv, T, D)
        v = v.view(B, T, Hkv, D).transpose(1, 2)              # (B, Hkv, T, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, layout.cos, layout.sin), apply_rope(k, layout.cos, layout.sin)
        if cache is not None:
            # keys and values are stored after RoPE, so cached ones never need rotating again
            k, v = cache.update(layer, k, v, layout.pos, layout.k_start)  # (B, Hkv, Tk, D)
        if self.manual or self.record is not None:
            mask = layout.mask
            if layout.is_causal:
                mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            y = manual_attention(q, k, v, mask, self.softcap, self.record, self.kernels.softcap_sigmoid)
        else:
            gqa = H != Hkv
            if gqa and layout.mask is not None:
                # SDPA runs GQA only in its flash and math kernels (torch docs), and flash takes
                # no mask: a masked GQA call would fall back to the slow math kernel on GPUs.
                # Repeating the kv heads (one copy of K and V) lets the masked kernels run.
                k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)
                gqa = False
            dtype, upcast = q.dtype, self.kernels.sdpa_fp32 and q.dtype != torch.float32
            if upcast:
                # Kernels.sdpa_fp32 (the CPU with bf16 autocast): PyTorch's CPU flash kernel is
                # much slower backward in bf16 than in float32, and attention is a small share
                # of the FLOPs, so it runs in float32 (autocast would cast the inputs back to
                # bf16: it is switched off around the call).
                q, k, v = q.float(), k.float(), v.float()
            with torch.autocast(q.device.type, enabled=False) if upcast else contextlib.nullcontext():
                y = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=None if layout.is_causal else layout.mask,
                    is_causal=layout.is_causal, enable_gqa=gqa).to(dtype)
        y = y.transpose(1, 2).reshape(B, T, H * D)            # (B, T, C) heads side by side
        return self.c_proj(y)


@contextlib.contextmanager
def record_attention(model):
    """Inside `with record_attention(model) as probs:` every attention layer takes the
    hand-written path and appends its probabilities, (B, n_head, Tq, Tk) float32, to the list
    `probs`: one entry per layer per forward call, in the order the layers ran. It is how
    sample.py draws attention maps. SDPA never materialises the probabilities (that is why it is
    fast), so recording needs the manual path; outside the context nothing changes."""
    layers = [m for m in model.modules() if isinstance(m, CausalSelfAttention)]
    probs = []
    for layer in layers:
        layer.record = probs
    try:
        yield probs
    finally:
        for layer in layers:
            layer.record = None


# -----------------------------------------------------------------------------
# 6. MLP
#
#   relu2:  c_proj(relu(c_fc x)^2)                  (So et al., 2021, "Primer"; sparse, cheap)
#   gelu:   c_proj(gelu(c_fc x))                    (GPT-2)
#   swiglu: c_proj(silu(x W_gate) * (x W_up))       (Shazeer, 2020); W_gate and W_up are one
#           merged matrix c_fc of width 2*hidden, split after the matmul.


def mlp_activation(kind, h, gate=None):
    """The elementwise nonlinearity shared by the dense MLP and the experts of section 7.
    h: pre-activation (..., hidden); gate: x W_gate for swiglu (None otherwise)."""
    if kind == "relu2":
        return F.relu(h).square()
    if kind == "gelu":
        return F.gelu(h)
    return F.silu(gate) * h


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        hidden = config.hidden_size
        self.kind = config.mlp
        fc_out = 2 * hidden if self.kind == "swiglu" else hidden
        self.c_fc = nn.Linear(config.n_embd, fc_out, bias=False)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=False)

    def forward(self, x):
        h = self.c_fc(x)
        if self.kind == "swiglu":
            gate, h = h.chunk(2, dim=-1)                      # (B, T, hidden) each
            return self.c_proj(mlp_activation("swiglu", h, gate))
        return self.c_proj(mlp_activation(self.kind, h))

# -----------------------------------------------------------------------------
# 7. Mixture of experts: a feed-forward layer with many MLPs, each token using a few
#
# A dense MLP spends the same FLOPs on every token. An MoE layer holds n_experts MLPs ("experts")
# plus a small linear "router"; each token is sent to only top_k of them, so parameters grow with
# n_experts while FLOPs per token grow only with top_k. It replaces the MLP in every moe_every-th
# block. One forward, for N = B*T tokens and E = n_experts:
#
#   1. route    logits = x @ W_router                       (N, E)
#               choose top_k experts per token by logits + expert_bias
#               gates  = softmax over the chosen experts' logits (bias NOT included)
#   2. dispatch sort the N*top_k (token, expert) choices by expert, so each expert's tokens sit
#               in one contiguous run; drop the ones past the expert's capacity (training only)
#   3. experts  run every expert's MLP on its run of tokens
#   4. combine  y[token] = sum over its kept choices of gate * expert_out
#               (+ the shared experts, which every token always uses)
#
# Balancing. A router left alone tends to collapse onto a few experts (they get more gradient,
# get better, get chosen more). Three switchable remedies:
#   - moe_aux: Switch-Transformer load-balancing loss, E * sum_i f_i * P_i   (moe_aux_coef)
#   - moe_z:   router z-loss, mean(logsumexp(logits)^2), keeps logits small  (moe_z_coef)
#   - expert_bias: "auxiliary-loss-free" balancing (DeepSeek-V3): a per-expert bias added to
#     the scores used for CHOOSING only, nudged after every optimizer step toward equal load
#     (moe_bias_rate); it never touches the gradients.
#
# Worked example (E=4, top_k=2, one token): logits = [2.0, 0.0, 1.0, -1.0]
#   chosen experts = {0, 2}; gates = softmax([2.0, 1.0]) = [0.731, 0.269]
#   y = 0.731 * expert0(x) + 0.269 * expert2(x)
# With expert_bias = [0, 0, 0, 1.5] the scores are [2.0, 0.0, 1.0, 0.5], so the choice is still
# {0, 2}; with expert_bias = [0, 0, 0, 3.5] the scores are [2.0, 0.0, 1.0, 2.5], the choice
# becomes {3, 0}, and the gates are the softmax of the UNbiased logits [-1.0, 2.0] = [0.047, 0.953].

CAPACITY_EPS = 1e-9  # keeps float noise (1.1 * 10 = 11.000000000000002) from rounding up


def moe_capacity(capacity_factor, n_tokens, top_k, n_experts):
    """Max tokens one expert may take: ceil(capacity_factor * n_tokens * top_k / n_experts).
    Perfect balance needs capacity_factor = 1; 1.25 leaves 25% slack. 0 or inf -> None
    (no limit). Example: factor 1.0, 8 tokens, top_k 1, 4 experts -> 2."""
    if capacity_factor == 0 or math.isinf(capacity_factor):
        return None
    return max(1, math.ceil(capacity_factor * n_tokens * top_k / n_experts - CAPACITY_EPS))


class MoE(nn.Module):
    """Token-choice mixture-of-experts feed-forward layer: (B, T, C) -> (B, T, C).

    After each forward:
      self.aux   = {"moe_aux": scalar, "moe_z": scalar}, UNWEIGHTED (GPT.forward sums them over
                   layers into its aux dict; the trainer multiplies by moe_aux_coef, moe_z_coef)
      self.stats = {"counts": (E,) float, tokens kept per expert (after capacity),
                    "dropped": int tensor, choices dropped by capacity,
                    "routed": int tensor, choices made (= N * top_k)}
    The stats are detached tensors (no host sync in forward); the trainer sums "counts" over
    micro-steps and ranks and hands them to update_bias.

    Parameters (E experts of hidden width H, S shared experts), stored (in, out) so that the
    forward reads x @ W:
      router.weight (E, C)   router (a Linear, no bias)
      c_fc   (E, C, H)       expert input projections
      c_gate (E, C, H)       swiglu only: the gate projections
      c_proj (E, H, C)       expert output projections, zero at init like the dense MLP's,
                             so a fresh layer adds nothing to the residual stream
      shared_fc/shared_gate (C, S*H), shared_proj (S*H, C)   the shared experts
      expert_bias (E,)       a buffer (saved in checkpoints, no gradient)
    Keeping all experts in ONE 3-D tensor per matrix also suits DDP: an expert that got no token
    this micro-batch just has a zero slice in a gradient that exists, so no parameter is ever
    "unused" (no find_unused_parameters needed).
    """

    def __init__(self, config, kernels=Kernels()):
        super().__init__()
        self.kernels = kernels
        C, E, k = config.n_embd, config.n_experts, config.top_k
        # GPTConfig validates all of this already; MoE also accepts any object with these
        # fields (the MoE tests build the layer alone), so it checks again.
        if config.mlp not in MLP_KINDS:
            raise ValueError(f"mlp={config.mlp!r}: choose one of {', '.join(MLP_KINDS)}")
        if E < 1:
            raise ValueError(f"n_experts={E}: an MoE layer needs n_experts >= 1 (0 means a dense MLP)")
        if not 1 <= k <= E:
            raise ValueError(f"top_k={k}: must be between 1 and n_experts={E}")
        if config.n_shared_experts < 0 or not config.capacity_factor >= 0:
            raise ValueError("n_shared_experts and capacity_factor must be >= 0 (0 capacity = no dropping)")
        self.n_embd, self.n_experts, self.top_k = C, E, k
        self.n_shared = config.n_shared_experts
        self.capacity_factor = float(config.capacity_factor)
        self.bias_rate = float(config.moe_bias_rate)
        self.mlp = config.mlp
        self.hidden = H = config.moe_hidden or dense_hidden(config)
        gated = self.mlp == "swiglu"

        self.router = nn.Linear(C, E, bias=False)
        self.c_fc = nn.Parameter(torch.empty(E, C, H))
        self.c_gate = nn.Parameter(torch.empty(E, C, H)) if gated else None
        self.c_proj = nn.Parameter(torch.empty(E, H, C))
        # S shared experts of width H are, summed, exactly ONE MLP of width S*H (the activation
        # is elementwise per hidden unit, so concatenating the hidden units of S MLPs and
        # summing their outputs is the same computation). So we store them as one wider MLP
        # and run it with two plain matmuls.
        SH = self.n_shared * H
        self.shared_fc = nn.Parameter(torch.empty(C, SH)) if SH else None
        self.shared_gate = nn.Parameter(torch.empty(C, SH)) if SH and gated else None
        self.shared_proj = nn.Parameter(torch.empty(SH, C)) if SH else None
        # Persistent buffer: it is part of the model (it changes which expert a token gets),
        # so it is saved in the state_dict and restored on resume.
        self.register_buffer("expert_bias", torch.zeros(E))
        self.aux, self.stats = {}, {}
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Init: input projections and router ~ N(0, 1/C), so on a unit-RMS input their outputs
        have unit variance (router logits ~ N(0, 1): distinct, no ties); output projections
        zero, so the layer starts as the identity on the residual stream. GPT.init_weights
        calls this after its own pass (the (in, out) layout has its fan-in on dim -2)."""
        std = self.n_embd ** -0.5
        self.router.weight.normal_(0.0, std)
        for w in (self.c_fc, self.c_gate, self.shared_fc, self.shared_gate):
            if w is not None:
                w.normal_(0.0, std)
        for w in (self.c_proj, self.shared_proj):
            if w is not None:
                w.zero_()
        self.expert_bias.zero_()

    # -- the pieces of one forward ------------------------------------------------------------

    def route(self, xf):
        """xf (N, C) -> logits (N, E) float32, chosen (N, k) expert ids, gates (N, k).

        The router runs in float32 even under bf16 autocast: top-k is a hard decision, and
        bf16 logits (8 bits of mantissa) tie and flip between experts."""
        with torch.autocast(device_type=xf.device.type, enabled=False):
            logits = F.linear(xf.float(), self.router.weight.float())   # (N, E)
        # The bias shifts which experts are CHOSEN, never how much they are trusted: it is
        # excluded from the gates, so balancing does not distort the output.
        chosen = torch.topk(logits + self.expert_bias, self.top_k, dim=-1).indices  # (N, k)
        chosen_logits = logits.gather(1, chosen)                        # (N, k)
        if self.top_k == 1:
            # Routing weight = the expert's probability under the softmax over ALL experts
            # (Switch Transformer). The softmax over the single chosen expert would be exactly
            # 1, and the router would get no gradient from the language-model loss at all,
            # only from the auxiliary losses.
            gates = torch.softmax(logits, dim=-1).gather(1, chosen)     # (N, 1)
        else:
            # Routing weights = softmax over the chosen experts' logits (Mixtral): the k
            # weights of a token sum to 1, whatever the other experts scored.
            gates = torch.softmax(chosen_logits, dim=-1)                # (N, k)
        return logits, chosen, gates

    def dispatch(self, chosen, capacity):
        """Group the N*k choices by expert and apply the capacity limit.

        Choices are numbered slot-major: choice a = s*N + n is token n's s-th pick (s = 0 its
        best expert). A stable sort by expert id keeps that order inside each expert's group,
        so PRIORITY under capacity is: all first choices before any second choice, then
        earlier token (flattened B*T position) first. A token thus loses its backup expert
        before anyone loses their favourite.

        Returns expert (N*k,) expert of each choice, rank (N*k,) its place in that expert's
        queue, keep (N*k,) bool, counts (E,) choices per expert (before capacity), and order
        (N*k,) the choices sorted by expert."""
        E = self.n_experts
        expert = chosen.t().reshape(-1)                     # (k*N,) slot-major
        order = torch.argsort(expert, stable=True)          # choices grouped by expert
        counts = torch.zeros(E, dtype=torch.long, device=expert.device)
        counts.scatter_add_(0, expert, torch.ones_like(expert))  # (E,) static shape, unlike bincount
        starts = torch.cumsum(counts, 0) - counts           # (E,) where each group begins in `order`
        rank_sorted = torch.arange(expert.numel(), device=expert.device) - starts[expert[order]]
        rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)  # back to choice order
        keep = rank < capacity if capacity is not None else torch.ones_like(expert, dtype=torch.bool)
        return expert, rank, keep, counts, order

    def expert_weights(self):
        """Per-expert views of the 3-D weights: lists of E tensors (C, H) / (H, C).
        unbind() once rather than indexing c_fc[e] inside the loop: the backward of each
        c_fc[e] would allocate and zero a full (E, C, H) gradient per expert (E times the
        work of the gradient itself); unbind's backward stacks once."""
        gate = self.c_gate.unbind(0) if self.c_gate is not None else [None] * self.n_experts
        return self.c_fc.unbind(0), gate, self.c_proj.unbind(0)

    def expert_mlp(self, xe, w_fc, w_gate, w_proj):
        """One expert on its tokens (n, C) with (C, H) weights, or all experts at once on
        (E, cap, C) buffers with the (E, C, H) weights (then @ is a batched matmul)."""
        g = xe @ w_gate if w_gate is not None else None
        return mlp_activation(self.mlp, xe @ w_fc, g) @ w_proj

    def run_experts_padded(self, xf, expert, rank, keep, capacity):
        """All experts at once with two batched matmuls over (E, capacity, C) buffers. Static
        shapes and no host sync, so torch.compile and CUDA graphs like it; the cost is
        capacity*E rows whether or not they are full. Returns (k*N, C)."""
        N, C = xf.shape
        E = self.n_experts
        pad = E * capacity  # index of an all-zero row appended below
        # slot of each choice in the flattened (E*capacity) buffer; dropped -> pad row
        slot = torch.where(keep, expert * capacity + rank, torch.full_like(rank, pad))
        token = torch.arange(expert.numel(), device=xf.device) % N  # choice a = s*N + n -> token n
        token_of_slot = torch.full((pad + 1,), N, dtype=torch.long, device=xf.device)
        token_of_slot[slot] = token  # kept slots point to their token; others to row N (zeros)
        x_pad = torch.cat([xf, xf.new_zeros(1, C)])                   # (N+1, C)
        xe = x_pad[token_of_slot[:pad]].view(E, capacity, C)          # (E, cap, C)
        ye = self.expert_mlp(xe, self.c_fc, self.c_gate, self.c_proj)  # (E, cap, C) via bmm
        ye = torch.cat([ye.reshape(pad, C), ye.new_zeros(1, C)])      # (E*cap+1, C)
        return ye[slot]  # (k*N, C): each choice's expert output, zeros where dropped

    def run_experts_grouped(self, xf, expert, keep, counts_kept, order):
        """One matmul pair per expert on exactly its tokens: no padding waste, but a Python
        loop over experts and one host sync (the group sizes). Returns (k*N, C)."""
        N, C = xf.shape
        kept = order[keep[order]]            # kept choices, grouped by expert
        sizes = counts_kept.tolist()         # host sync: the group sizes drive the split
        xs = xf[kept % N]                    # (n_kept, C) tokens in expert order
        weights = zip(xs.split(sizes), *self.expert_weights())
        outs = [self.expert_mlp(*chunk_and_w) for chunk_and_w in weights if len(chunk_and_w[0])]
        y = xf.new_zeros(expert.numel(), C, dtype=outs[0].dtype if outs else xf.dtype)
        if outs:
            y = y.index_copy(0, kept, torch.cat(outs))  # unique indices: deterministic
        return y

    def shared_mlp(self, xf):
        g = xf @ self.shared_gate if self.shared_gate is not None else None
        return mlp_activation(self.mlp, xf @ self.shared_fc, g) @ self.shared_proj

    def forward(self, x, impl="auto"):
        """x (B, T, C) -> (B, T, C). impl: "grouped", "padded" (the tests run both and check
        they agree) or "auto": padded when Kernels.moe_padded is set (the Runtime sets it on
        CUDA) and a capacity fixes the buffer size (static shapes, no host sync: what
        torch.compile and CUDA graphs need), grouped otherwise. On CPU grouped is faster:
        CPU batched matmuls are slower than plain ones, and padded also computes the padding."""
        B, T, C = x.shape
        E, k = self.n_experts, self.top_k
        xf = x.reshape(B * T, C)                                        # (N, C)
        N = xf.shape[0]
        logits, chosen, gates = self.route(xf)
        # Capacity only while training: at inference every token keeps all its experts, so a
        # token's output never depends on the rest of the batch, and a KV-cached decode (one
        # token at a time) equals the full forward (test_model_moe_cached_decode_equals_full_forward).
        capacity = moe_capacity(self.capacity_factor, N, k, E) if self.training else None
        expert, rank, keep, counts, order = self.dispatch(chosen, capacity)
        counts_kept = counts.clamp(max=capacity) if capacity is not None else counts

        if impl == "auto":
            impl = "padded" if capacity is not None and self.kernels.moe_padded else "grouped"
        if impl == "padded":
            cap = capacity if capacity is not None else max(1, int(counts.max()))  # host sync
            out = self.run_experts_padded(xf, expert, rank, keep, cap)
        else:
            out = self.run_experts_grouped(xf, expert, keep, counts_kept, order)
        # combine: y[n] = sum_s gates[n, s] * out[s*N + n]; dropped choices are zero rows, so
        # a token that lost all its experts passes through on the residual stream alone
        out = out.view(k, N, C)
        y = (out * gates.t().unsqueeze(-1).to(out.dtype)).sum(0)       # (N, C)
        if self.shared_fc is not None:
            y = y + self.shared_mlp(xf)

        # Balancing losses (float32 scalars, UNWEIGHTED).
        # Switch aux loss = E * sum_i f_i * P_i with
        #   f_i = fraction of the N*k choices that picked expert i (before capacity; a count,
        #         so no gradient flows through it)
        #   P_i = mean over tokens of softmax(logits)_i (differentiable)
        # Both sum to 1, so under UNIFORM routing (f_i = P_i = 1/E) it equals exactly 1.0 for
        # every top_k. At the other extreme every token picks the same k experts, f_i = 1/k on
        # those k, and the router's probability sits on them: the loss approaches E * (1/k) * 1
        # = E / top_k (E for top-1). (Normalising f per token instead of per choice would give
        # top_k at balance; dividing by N*k lets one moe_aux_coef fit every top_k.)
        probs = torch.softmax(logits, dim=-1)                           # (N, E)
        f = counts.float() / (N * k)
        aux = E * (f * probs.mean(0)).sum()
        z = torch.logsumexp(logits, dim=-1).square().mean()            # router z-loss (ST-MoE)
        self.aux = {"moe_aux": aux, "moe_z": z}
        kept_total = counts_kept.sum()
        self.stats = {"counts": counts_kept.detach().float(),
                      "dropped": (N * k - kept_total).detach(),
                      "routed": torch.tensor(N * k, device=x.device)}
        return y.view(B, T, C).to(x.dtype)

    # -- balancing without a loss -------------------------------------------------------------

    @torch.no_grad()
    def update_bias(self, counts):
        """Nudge expert_bias toward equal load: b_i += moe_bias_rate * sign(mean - count_i).

        counts: (E,) tokens per expert summed over the micro-steps of one optimizer step AND
        over all ranks (the trainer all-reduces first), so every rank applies the same update
        and the biases stay identical without being broadcast. An overloaded expert's bias
        goes down, an idle one's goes up; sign() makes the step size independent of batch
        size. The biases are re-centred (a shift common to all experts changes no choice) so
        their values stay readable in logs."""
        if self.bias_rate == 0:
            return
        counts = counts.to(self.expert_bias.device, torch.float32)
        self.expert_bias.add_(self.bias_rate * torch.sign(counts.mean() - counts))
        self.expert_bias.sub_(self.expert_bias.mean())

    @staticmethod
    def load_stats(counts):
        """Summary of a load vector (E,): {"min_share", "max_share", "load_entropy"}.
        share_i = count_i / sum(counts) (1/E each when balanced); load_entropy =
        -sum share_i log share_i / log E, 1.0 when balanced, 0.0 when one expert takes
        everything. Example: counts [3, 1, 0, 0] -> min 0.0, max 0.75,
        entropy (0.75 ln(1/0.75) + 0.25 ln 4) / ln 4 = 0.406."""
        counts = torch.as_tensor(counts, dtype=torch.float64).flatten()
        total = counts.sum()
        if total <= 0:
            return {"min_share": 0.0, "max_share": 0.0, "load_entropy": 0.0}
        share = counts / total
        nz = share[share > 0]
        ent = -(nz * nz.log()).sum() / math.log(len(counts)) if len(counts) > 1 else torch.tensor(1.0)
        return {"min_share": share.min().item(), "max_share": share.max().item(),
                "load_entropy": ent.item()}

    # -- accounting ---------------------------------------------------------------------------

    def param_counts(self):
        """{"total": every parameter of the layer, "active": those one token uses}.
        active = router + top_k experts + shared experts (the bias is a buffer)."""
        per_expert = sum(p[0].numel() for p in (self.c_fc, self.c_gate, self.c_proj) if p is not None)
        always = self.router.weight.numel() + sum(
            p.numel() for p in (self.shared_fc, self.shared_gate, self.shared_proj) if p is not None)
        return {"total": always + self.n_experts * per_expert,
                "active": always + self.top_k * per_expert}

    def flops_per_token(self, backward=True):
        """Matmul FLOPs per token counting only ACTIVE experts: 2 per active weight forward,
        6 with the backward pass (the 6N rule of GPT.flops_per_token). An upper bound while
        training with capacity (dropped choices cost nothing); padding in the padded path is
        wasted work not counted here."""
        return (6 if backward else 2) * self.param_counts()["active"]


def moe_reference(moe, x):
    """The slow, obvious MoE forward the fast one must equal (no capacity): for each token,
    for each of its top-k experts, run that expert on that token alone. Reads moe's weights
    and bias; used by the tests and as a reading aid."""
    B, T, C = x.shape
    xf = x.reshape(-1, C)
    y = torch.zeros_like(xf)
    for n in range(xf.shape[0]):
        logits = xf[n] @ moe.router.weight.t()                          # (E,)
        chosen = torch.topk(logits + moe.expert_bias, moe.top_k).indices.tolist()
        if moe.top_k == 1:
            weights = torch.softmax(logits, 0)[chosen]
        else:
            weights = torch.softmax(logits[chosen], 0)
        for w, e in zip(weights, chosen):
            g = xf[n] @ moe.c_gate[e] if moe.c_gate is not None else None
            y[n] = y[n] + w * (mlp_activation(moe.mlp, xf[n] @ moe.c_fc[e], g) @ moe.c_proj[e])
        for s in range(moe.n_shared):  # shared experts one by one, from the concatenated weights
            cols = slice(s * moe.hidden, (s + 1) * moe.hidden)
            g = xf[n] @ moe.shared_gate[:, cols] if moe.shared_gate is not None else None
            y[n] = y[n] + mlp_activation(moe.mlp, xf[n] @ moe.shared_fc[:, cols], g) @ moe.shared_proj[cols]
    return y.view(B, T, C)

# -----------------------------------------------------------------------------
# 8. Transformer block
#
# Pre-norm residual block: x = x + attn(norm(x)); x = x + mlp(norm(x)).
# Normalising the branch inputs (not the residual stream itself) keeps an identity path from the
# embedding to the output, which is what lets deep stacks train without warm-up tricks.
# The feed-forward is an MoE layer in blocks with layer_index % moe_every == moe_every - 1
# (when n_experts > 0), else the dense MLP; both are called self.mlp.


class Block(nn.Module):
    def __init__(self, config, layer_index=0, kernels=Kernels()):
        super().__init__()
        self.ln_1 = RMSNorm(config.n_embd, config.norm_gain)
        self.attn = CausalSelfAttention(config, kernels)
        self.ln_2 = RMSNorm(config.n_embd, config.norm_gain)
        self.mlp = MoE(config, kernels) if config.is_moe_layer(layer_index) else MLP(config)

    def forward(self, x, layout, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), layout, cache, layer)
        x = x + self.mlp(self.ln_2(x))
        return x

# -----------------------------------------------------------------------------
# 9. KV cache
#
# Generating token t+1 needs the keys and values of all tokens <= t in every layer; recomputing them
# costs a full forward per new token. The cache keeps them: one preallocated buffer per layer of
# shape (B, n_kv_head, max_len, D) for keys and for values (with GQA only the kv heads are stored,
# n_head / n_kv_head times less memory). The prompt is run once ("prefill", many tokens at
# cache.pos = 0), then each decode step feeds one new token at cache.pos; every layer writes its
# new keys at [pos, pos + T) and attends to [k_start, pos + T). RoPE uses the absolute position
# pos + t, so cached and uncached runs rotate every token identically.
# Document ids are stored too, so a cache prefilled with packed documents keeps masking them.


class KVCache:
    def __init__(self, n_layer, batch_size, max_len, n_kv_head, head_dim, device=None, dtype=None):
        self.batch_size, self.max_len = batch_size, max_len
        shape = (n_layer, batch_size, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.doc = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.pos = 0             # number of positions filled (the same for every row)
        self.uses_docs = False   # whether any call passed doc_ids (only then is doc masking applied)

    def update(self, layer, k, v, pos, k_start):
        """Write the new keys/values (B, Hkv, T, D) at [pos, pos + T) and return the visible ones
        [k_start, pos + T), in the dtype of the queries."""
        T = k.size(2)
        self.k[layer, :, :, pos:pos + T] = k
        self.v[layer, :, :, pos:pos + T] = v
        return (self.k[layer, :, :, k_start:pos + T].to(k.dtype),
                self.v[layer, :, :, k_start:pos + T].to(v.dtype))

    def branch(self, n):
        """A new cache of batch n whose rows are all copies of row 0 up to pos: prefill a prompt
        once with batch 1, then draw n samples from it without recomputing the prompt."""
        new = KVCache(self.k.size(0), n, self.max_len, self.k.size(2), self.k.size(4),
                      self.k.device, self.k.dtype)
        p = self.pos
        new.k[:, :, :, :p] = self.k[:, :1, :, :p]                # broadcasts row 0 over n rows
        new.v[:, :, :, :p] = self.v[:, :1, :, :p]
        new.doc[:, :p] = self.doc[:1, :p]
        new.pos, new.uses_docs = p, self.uses_docs
        return new

    def reset(self):
        self.pos, self.uses_docs = 0, False

# -----------------------------------------------------------------------------
# 10. The GPT model
#
# tokens -> wte -> n_layer blocks -> final RMSNorm -> lm_head -> (softcap) -> logits
#
# Multi-token prediction (DeepSeek-V3's MTP, one extra depth): besides predicting token t+1 from
# the final hidden state h_t, an extra block predicts t+2 from h_t and the embedding of the true
# token t+1:  h' = block(proj([norm(h_t), norm(wte(x_{t+1}))])),  logits' = lm_head(norm_f(h'))
# It shares wte, the final norm and lm_head with the main model, so it adds one block and one
# (2C x C) matrix. Its loss comes back as aux["mtp"]; the trainer weights (and schedules) it. It
# only runs when targets are given: at inference the model is an ordinary next-token predictor.

TIED_EMBED_STD = 0.02    # GPT-2's init for a tied wte/lm_head matrix
UNTIED_EMBED_STD = 1.0   # untied wte: unit-RMS residual stream at the start (blocks are pre-norm)
LM_HEAD_STD = 0.001      # untied lm_head: near-zero logits, so the initial loss is ~ln(vocab_size)


class MTPHead(nn.Module):
    def __init__(self, config, kernels=Kernels()):
        super().__init__()
        self.norm_h = RMSNorm(config.n_embd, config.norm_gain)
        self.norm_e = RMSNorm(config.n_embd, config.norm_gain)
        self.proj = nn.Linear(2 * config.n_embd, config.n_embd, bias=False)
        dense = dataclasses.replace(config, n_experts=0)  # the MTP block is always a dense block
        self.block = Block(dense, kernels=kernels)

    def forward(self, h, next_emb, layout):
        x = self.proj(torch.cat([self.norm_h(h), self.norm_e(next_emb)], dim=-1))  # (B, T, C)
        return self.block(x, layout)


class GPT(nn.Module):
    def __init__(self, config, kernels=Kernels()):
        super().__init__()
        self.config, self.kernels = config, kernels
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            h=nn.ModuleList([Block(config, i, kernels) for i in range(config.n_layer)]),
            ln_f=RMSNorm(config.n_embd, config.norm_gain),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.mtp = MTPHead(config, kernels) if config.mtp else None
        cos, sin = rope_tables(config)
        # non-persistent: derived from the config, not stored in checkpoints, so a model can be
        # loaded with a different rope_scaling / rope_factor for context extension
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Initialisation, the whole table (C = n_embd):

            parameter                               init
            wte (untied)                            N(0, UNTIED_EMBED_STD^2)
            wte = lm_head (tied)                    N(0, TIED_EMBED_STD^2)
            lm_head (untied)                        N(0, LM_HEAD_STD^2)
            c_attn, c_fc, mtp.proj (input side)     N(0, 1/fan_in): unit-variance outputs for
                                                    unit-variance inputs (inputs are RMS-normed)
            c_proj (attention and MLP outputs)      0: every block starts as the identity, and
                                                    the residual stream is the embedding
            RMSNorm gains                           1
            MoE router, expert inputs               N(0, 1/n_embd); expert outputs 0
        """
        cfg = self.config
        std = TIED_EMBED_STD if cfg.tie_embeddings else UNTIED_EMBED_STD
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=std)
        if not cfg.tie_embeddings:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=LM_HEAD_STD)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.zeros_(p)
            elif name.endswith(("c_attn.weight", "c_fc.weight", "proj.weight")):
                nn.init.normal_(p, mean=0.0, std=p.size(-1) ** -0.5)   # p: (out, in)
            elif p.ndim == 1:
                nn.init.ones_(p)                                        # norm gains
        for layer in self.moe_layers():
            layer.reset_parameters()   # router, experts: see MoE.reset_parameters

    def use_kernels(self, kernels):
        """Change HOW the model computes (section 1's Kernels) after it was built, e.g. for a model
        loaded from a checkpoint on another machine. The weights are untouched."""
        self.kernels = kernels
        for m in self.modules():
            if isinstance(m, (CausalSelfAttention, MoE)):
                m.kernels = kernels
        return self

    # -- forward ------------------------------------------------------------------------------

    def _layout(self, B, T, pos, window, doc_ids, cache, device):
        """Build the RoPE rows and the attention mask shared by all layers of this call."""
        cfg = self.config
        end = pos + T
        if window < 0:
            raise ValueError(f"window={window} must be >= 0 (0 = full causal attention)")
        if end > cfg.max_context:
            raise bpe.UserError(
                f"{end} positions exceed the model's context of {cfg.max_context} tokens; "
                "use a shorter input, or extend the context with --rope_scaling=yarn --rope_factor=S")
        if window >= end:
            window = 0  # the window reaches back to position 0: plain causal (and SDPA's fast flag)
        if cache is not None:
            if end > cache.max_len:
                raise bpe.UserError(f"the KV cache holds {cache.max_len} positions, {end} needed; "
                                    "make a longer cache with model.make_cache(max_len=...)")
            if doc_ids is None and cache.uses_docs:
                doc_ids = cache.doc[:, pos - 1:pos].expand(B, T)  # new tokens continue the last doc
            if doc_ids is not None:
                cache.doc[:, pos:end] = doc_ids
                cache.uses_docs = True
        # A sliding window lets a cached query skip everything older than pos - window + 1.
        k_start = max(0, pos - window + 1) if window and not cfg.n_global else 0
        q_pos = torch.arange(pos, end, device=device)
        k_pos = torch.arange(k_start, end, device=device)
        k_doc = None
        if doc_ids is not None:
            k_doc = cache.doc[:, k_start:end] if cache is not None else doc_ids
        is_causal = window == 0 and doc_ids is None and pos == 0
        if is_causal:
            mask = None                     # SDPA's is_causal; the manual path builds a tril
        elif window == 0 and doc_ids is None and T == 1:
            mask = None                     # one new token sees every cached key
        else:
            mask = attention_mask(q_pos, k_pos, window, cfg.n_global, doc_ids, k_doc)
        return AttnLayout(self.rope_cos[pos:end], self.rope_sin[pos:end], pos, k_start, mask,
                          is_causal)

    def _logits(self, h):
        logits = self.lm_head(self.transformer.ln_f(h)).float()    # (B, T, V) float32
        cap = self.config.logit_softcap
        if cap > 0:
            logits = tanh_softcap(logits, cap, self.kernels.softcap_sigmoid)
        return logits

    def forward(self, idx, targets=None, *, doc_ids=None, window=None, cache=None,
                ignore_index=-1, reduction="mean"):
        """idx: (B, T) token ids. Without targets: logits (B, T, vocab_size) float32.
        With targets (B, T): (loss, aux), loss = next-token cross-entropy ("mean" / "sum": a
        scalar, "none": (B, T)), aux = dict of UNWEIGHTED auxiliary losses (scalar tensors):
        "mtp" (config.mtp, no cache), "moe_aux" and "moe_z" (summed over the MoE layers).
        doc_ids (B, T): tokens attend only within their document. window: overrides
        config.window for this call (0 = full). cache: a KVCache; the new tokens sit at
        cache.pos.. and cache.pos advances by T."""
        B, T = idx.shape
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction={reduction!r}: choose mean, sum or none")
        if doc_ids is not None and doc_ids.shape != idx.shape:
            raise ValueError(f"doc_ids {tuple(doc_ids.shape)} must have the shape of idx {tuple(idx.shape)}")
        pos = cache.pos if cache is not None else 0
        window = self.config.window if window is None else window
        layout = self._layout(B, T, pos, window, doc_ids, cache, idx.device)

        x = self.transformer.wte(idx)                                # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, layout, cache, i)
        if cache is not None:
            cache.pos += T
        logits = self._logits(x)
        if targets is None:
            return logits

        loss = F.cross_entropy(logits.view(B * T, -1), targets.reshape(B * T),
                               ignore_index=ignore_index, reduction=reduction)
        if reduction == "none":
            loss = loss.view(B, T)
        aux = {}
        if self.mtp is not None and cache is None and T > 1:
            aux["mtp"] = self._mtp_loss(x, targets, layout, ignore_index)
        moe = self.moe_layers()
        if moe:  # summed over layers, unweighted: the trainer applies moe_aux_coef, moe_z_coef
            aux["moe_aux"] = sum(layer.aux["moe_aux"] for layer in moe)
            aux["moe_z"] = sum(layer.aux["moe_z"] for layer in moe)
        return loss, aux

    def moe_layers(self):
        """The MoE layers, in depth order (empty for a dense model). The trainer reads their
        .stats after each forward and calls update_bias(counts) once per optimizer step."""
        return [b.mlp for b in self.transformer.h if isinstance(b.mlp, MoE)]

    def _mtp_loss(self, h, targets, layout, ignore_index):
        """Mean cross-entropy of predicting targets[:, t+1] (= token t+2) at position t < T-1."""
        ignored = targets == ignore_index
        nxt = targets.masked_fill(ignored, 0)      # ignored targets get any valid id as input ...
        h2 = self.mtp(h, self.transformer.wte(nxt), layout)
        logits = self._logits(h2[:, :-1])          # (B, T-1, V)
        tgt = targets[:, 1:].masked_fill(ignored[:, :-1], ignore_index)
        # ... and their t+2 prediction is dropped from the loss (the input token was not real)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1),
                               ignore_index=ignore_index)

    def make_cache(self, batch_size, max_len, device=None, dtype=None):
        """A KV cache for batch_size rows and up to max_len positions (prompt + new tokens).
        device/dtype default to the model's."""
        p = self.lm_head.weight
        return KVCache(self.config.n_layer, batch_size, max_len, self.config.n_kv_head,
                       self.config.head_dim, device or p.device, dtype or p.dtype)

    # -----------------------------------------------------------------------------------------
    # 11. Accounting and optimizer groups
    #
    # Parameter counts come from formulas over the config, so the table reads as the
    # architecture's arithmetic (test_model_param_and_flops_formulas_match_count checks them
    # against model.parameters()).

    def _param_table(self):
        """component -> (total params, params active per token)."""
        c = self.config
        C, D, H, Hkv, V = c.n_embd, c.head_dim, c.n_head, c.n_kv_head, c.vocab_size
        g = 1 if c.norm_gain else 0
        attn = C * (H + 2 * Hkv) * D + H * D * C              # c_attn + c_proj
        qk = 2 * D * g if c.qk_norm else 0                     # q_norm, k_norm gains
        mlp = (3 if c.mlp == "swiglu" else 2) * C * c.hidden_size
        n_blocks = c.n_layer + (1 if c.mtp else 0)           # the MTP head has one more block
        gains = n_blocks * (2 * C * g + qk) + C * g + (2 * C * g if c.mtp else 0)  # + ln_f, mtp norms
        n_moe = c.n_moe_layers
        table = {
            "embedding (wte)": (V * C, V * C),
            "attention": (c.n_layer * attn,) * 2,
            "mlp": ((c.n_layer - n_moe) * mlp,) * 2,
            "norm gains": (gains, gains),
            "lm_head": (0, 0) if c.tie_embeddings else (V * C, V * C),
        }
        if n_moe:
            # per MoE layer: router (C x E), E routed experts of which top_k run per token,
            # n_shared shared experts that always run; each expert is an MLP of width moe_hidden
            expert = (3 if c.mlp == "swiglu" else 2) * C * c.expert_hidden
            table["moe router"] = (n_moe * C * c.n_experts,) * 2
            table["moe experts"] = (n_moe * c.n_experts * expert, n_moe * c.top_k * expert)
            if c.n_shared_experts:
                table["moe shared experts"] = (n_moe * c.n_shared_experts * expert,) * 2
        if c.mtp:
            n = 2 * C * C + attn + mlp                        # proj + its block's matrices
            table["mtp head"] = (n, n)
        return table

    def num_params(self, by_component=False, active=False):
        """Total parameter count (tied weights once), or per-token active count (MoE), or the
        dict component -> count."""
        table = {k: v[1 if active else 0] for k, v in self._param_table().items()}
        return table if by_component else sum(table.values())

    def flops_per_token(self, seq_len=None):
        """Training FLOPs (forward + backward) per token:
            6 * N_matmul + 12 * L_attn * n_head * head_dim * ctx
        N_matmul counts the active parameters used in matmuls (everything but the wte lookup and
        the norm gains; a tied wte still counts once, as lm_head). Each such weight costs 2 FLOPs
        per token forward (multiply + add) and 4 backward (grads of input and weight): 6.
        Attention adds q k^T and probs v: 2 * 2 * head_dim * n_head FLOPs per attended key
        forward, times 3 for fwd + bwd. ctx is the mean number of keys a query attends to in a
        seq_len window (causal: (seq_len+1)/2; a sliding window caps it). This counts useful
        FLOPs: nanoGPT's estimate_mfu uses ctx = seq_len (the masked half too).
        Multi-token prediction adds its block (in the table), its attention, and a second pass
        through lm_head for the T-1 positions that have a token t+2 to predict.
        test_model_flops_counted_by_torch checks all of it against torch's own FLOP counter."""
        c = self.config
        T = seq_len or c.block_size
        table = self.num_params(by_component=True, active=True)
        n_matmul = sum(table.values()) - table["norm gains"] - table["embedding (wte)"]
        if c.tie_embeddings:
            n_matmul += c.vocab_size * c.n_embd                        # wte used as lm_head
        if c.mtp:
            n_matmul += c.vocab_size * c.n_embd * (T - 1) / T          # lm_head again, T-1 rows
        w = c.window if 0 < c.window < T else T
        ctx = sum(min(t + 1, w) for t in range(T)) / T
        n_attn_layers = c.n_layer + (1 if c.mtp else 0)
        return int(6 * n_matmul + 12 * n_attn_layers * c.n_head * c.head_dim * ctx)

    def kv_cache_bytes_per_token(self, dtype=torch.bfloat16):
        """Bytes of KV cache per token of context: keys + values, per layer, per kv head."""
        c = self.config
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * c.n_layer * c.n_kv_head * c.head_dim * itemsize

    def optim_groups(self):
        """Parameter groups for the trainer, each {"name", "params", "optimizer"}:
            matrix  (muon):  2-D weights inside the blocks (c_attn, c_proj, c_fc, mtp.proj).
                             Muon orthogonalises each update, which suits hidden linear maps.
            expert  (muon):  MoE expert weights: 3-D stacks (n_experts, in, out), which Muon
                             orthogonalises one expert matrix at a time, and the shared
                             experts' 2-D (in, out) matrices. Note the (in, out) layout: the
                             transpose of nn.Linear's (out, in).
            router  (adamw): MoE router weights (n_experts, n_embd). Not Muon: an orthogonalised
                             update moves every direction of this small matrix by the same
                             amount, so a router whose gradient is tiny (balanced, confident)
                             would still see its logits jump each step and routing flip; AdamW
                             steps each weight by its own gradient statistics.
            embed   (adamw): wte. A lookup table, not a linear map: each row is updated only
                             by the tokens that occur, so Muon's whole-matrix update does not fit.
            head    (adamw): lm_head (left out when tied to wte: the tied matrix is in "embed").
            scalar  (adamw): norm gains and any other 1-D parameters.
        Groups without parameters are left out (e.g. "scalar" when norm_gain=False). Every
        parameter is in exactly one group (test_model_optim_groups_cover_every_parameter_once)."""
        groups = {"matrix": [], "expert": [], "router": [], "embed": [], "head": [], "scalar": []}
        wte, head = self.transformer.wte.weight, self.lm_head.weight
        routers = {id(layer.router.weight) for layer in self.moe_layers()}
        experts = {id(p) for layer in self.moe_layers() for n, p in layer.named_parameters()
                   if not n.startswith("router.")}
        for p in self.parameters():                  # parameters() yields a tied weight once
            if id(p) in routers:
                groups["router"].append(p)
            elif id(p) in experts:
                groups["expert"].append(p)
            elif p is wte:
                groups["embed"].append(p)
            elif p is head:
                groups["head"].append(p)
            elif p.ndim >= 2:
                groups["matrix"].append(p)
            else:
                groups["scalar"].append(p)
        optimizer = {"matrix": "muon", "expert": "muon", "router": "adamw", "embed": "adamw",
                     "head": "adamw", "scalar": "adamw"}
        return [{"name": k, "params": v, "optimizer": optimizer[k]} for k, v in groups.items() if v]

# -----------------------------------------------------------------------------
# 12. Runtime: device, precision, compile, threads, determinism -- decided once
#
# Every decision about the hardware is made here, once, by setup_runtime, and carried in a Runtime
# that train.py and sample.py pass around. The model itself never asks "am I on CUDA?": what
# depends on the hardware reaches it as a Kernels setting (section 1), from rt.kernels.
#
#   device       auto: cuda > mps > cpu. Under torchrun each process takes GPU number LOCAL_RANK.
#   precision    CUDA: bf16 autocast (float32 master weights) where the GPU has bf16, else fp16
#                autocast with a GradScaler (fp16's small exponent range underflows small
#                gradients unless the loss is scaled up first); TF32 for the float32 matmuls.
#                CPU: bf16 autocast only where the CPU multiplies bf16 matrices in hardware
#                (Intel AMX); elsewhere bf16 is emulated and slower than float32. The choice is
#                read from the CPU's feature flags, never from a timing: a timing races with
#                whatever else the machine is doing, so a run and its resume could choose
#                differently.
#   compile      torch.compile on CUDA and CPU (it fuses the many small elementwise ops of a small
#                model); train.py falls back to eager if compiling fails at the first step.
#   threads      CPU threads per process: the cores, shared among the ranks of one machine.
#   determinism  Compiled CPU code accumulates gradients of lookups (the embedding's backward is a
#                scatter-add) with atomic adds from several threads, so the float sums happen in a
#                different order on every run and two runs with one seed drift apart after a few
#                steps. torch.use_deterministic_algorithms makes inductor call the sequential
#                kernel instead. It costs little on CPU (README, performance notes), so it is on by
#                default there; on CUDA it stays off unless asked (deterministic CUDA kernels can
#                be much slower, and CUDA was not measured).
#   resume       the resolved choices are saved in every checkpoint (rt.settings()) and reused on
#                resume, so a resumed run computes exactly as the original did.

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SWITCH = ("auto", "true", "false")   # the values of --compile and --deterministic


@dataclasses.dataclass
class Runtime:
    """The hardware decisions of one process (see the table above)."""
    device: torch.device
    dtype: torch.dtype = torch.float32      # autocast dtype; float32 = no autocast at all
    dtype_reason: str = ""
    compile: bool = False
    compile_options: dict = dataclasses.field(default_factory=dict)  # inductor options
    threads: int = 0
    deterministic: bool = False
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    scaler: object = None                   # torch.amp.GradScaler for float16, else None

    @property
    def ddp(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def kernels(self):
        """How the model should compute on this hardware (section 1's Kernels)."""
        cpu = self.device.type == "cpu"
        return Kernels(sdpa_fp32=cpu and self.dtype == torch.bfloat16,
                       softcap_sigmoid=cpu and self.compile,
                       moe_padded=self.device.type == "cuda")

    @property
    def ns_dtype(self):
        """Precision of Muon's Newton-Schulz iteration: bf16 when the run computes in bf16 (its
        matmuls are fast there; each step maps the band of singular values around 1 back into
        itself, so bf16 rounding does not grow), float32 otherwise."""
        return torch.bfloat16 if self.dtype == torch.bfloat16 else torch.float32

    def autocast(self):
        """The context every forward pass runs in."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def settings(self):
        """The resolved choices that change the numbers, as plain values: saved in checkpoints
        and given back to setup_runtime(saved=...) on resume."""
        name = next(k for k, v in DTYPES.items() if v == self.dtype)
        return {"dtype": name, "compile": self.compile, "threads": self.threads,
                "deterministic": self.deterministic}

    def print(self, *args, **kwargs):
        if self.is_main:
            print(*args, **kwargs, flush=True)

    def __str__(self):
        return f"{self.device} {str(self.dtype).replace('torch.', '')}"


def resolve_device(setting, local_rank=0):
    """'auto' -> cuda > mps > cpu; 'cuda' under torchrun -> cuda:LOCAL_RANK. One line for a
    device that does not exist or is not available here."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    if setting == "cuda":
        setting = f"cuda:{local_rank}"
    try:
        device = torch.device(setting)
    except RuntimeError:
        raise bpe.UserError(f"--device={setting}: not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise bpe.UserError(f"--device={setting}: only cpu, cuda and mps are supported; use --device=auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise bpe.UserError(f"--device={setting}: CUDA is not available here; use --device=cpu")
    if device.type == "mps" and not mps:
        raise bpe.UserError(f"--device={setting}: mps is not available here; use --device=cpu")
    return device


def cpu_has_bf16_matmul(cpuinfo="/proc/cpuinfo"):
    """True where the CPU multiplies bf16 matrices in hardware: Intel's AMX tiles (the amx_bf16
    flag). Read from /proc/cpuinfo (Linux); elsewhere False. AVX-512-BF16 alone (some AMD EPYC)
    has bf16 dot products, but bf16 training there was far slower than on AMX (README), so it
    keeps float32; --dtype=bfloat16 tries it anyway."""
    try:
        with open(cpuinfo) as f:
            return any(line.startswith("flags") and "amx_bf16" in line.split() for line in f)
    except OSError:
        return False


def resolve_precision(setting, device, saved=None):
    """(autocast dtype, reason, GradScaler or None); see the table at the top of this section."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if setting == "auto" and saved:
        setting, reason = saved, "as saved in the checkpoint being resumed"
    else:
        reason = "set by --dtype"
    if setting != "auto":
        if setting not in DTYPES:
            raise bpe.UserError(f"--dtype={setting}: choose auto, {', '.join(DTYPES)}")
        dtype = DTYPES[setting]
        if dtype == torch.float16 and device.type != "cuda":
            raise bpe.UserError("--dtype=float16 needs CUDA (its GradScaler); use bfloat16 or float32")
    elif device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            dtype, reason = torch.bfloat16, "CUDA with bf16"
        else:
            dtype, reason = torch.float16, "CUDA without bf16: fp16 + GradScaler"
    elif device.type == "cpu" and cpu_has_bf16_matmul():
        dtype, reason = torch.bfloat16, "CPU with AMX bf16 matmuls"
    else:
        dtype, reason = torch.float32, f"{device.type} without hardware bf16 matmuls"
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return dtype, reason, scaler


def keep_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the
    kernel, so that a CPU training step stops paying page faults for its own tensors.

    Why: PyTorch on CPU allocates every tensor with malloc. glibc serves large blocks with a
    fresh mmap and unmaps them when they are freed, and trims the top of its heap; the next step
    then touches new pages, and the kernel zero-fills each one on a page fault (a large share of
    a small model's step; README, performance notes). Here no block is mmap-ed (every tensor
    comes from the heap, where freed blocks are reused), the heap is never trimmed and grows
    64 MB at a time. Also off: "fastbins", glibc's lists of freed small blocks, which malloc
    merges back into the heap before serving each large request (malloc_consolidate); without
    them small blocks are merged as they are freed. The cost: the process keeps its peak heap
    size, which a training loop reaches on every step anyway.
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


def _switch(name, value, auto):
    """An auto|true|false setting (or a bool) -> bool; `auto` is what 'auto' means here."""
    value = str(value).lower()
    if value not in SWITCH:
        raise bpe.UserError(f"--{name}={value}: choose auto, true or false")
    return auto if value == "auto" else value == "true"


def setup_runtime(device="auto", dtype="auto", compile="auto", threads=0, deterministic="auto",
                  distributed=False, saved=None):
    """Decide everything once and return the Runtime. The arguments are the scripts' settings of
    the same names ("auto" and threads=0 are resolved here). saved: the "runtime" dict of a
    checkpoint being resumed (rt.settings()); its choices replace the automatic ones, so the
    resumed run computes exactly like the original (an explicit setting still wins).
    distributed: join the process group when torchrun started this process (train.py)."""
    saved = saved or {}
    rank, local_rank, world_size = 0, 0, 1
    if distributed and "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # set by torchrun
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = resolve_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if dev.type == "cpu":
        keep_freed_memory()
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=10))
    if threads < 0:
        raise bpe.UserError(f"--threads={threads}: must be >= 0 (0 = all cores)")
    if not threads:
        threads = saved.get("threads", 0)
    if not threads and dev.type == "cpu":
        # ranks on one machine share its cores; oversubscription makes everyone slow
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        threads = max(1, (os.cpu_count() or 1) // local_world)
    if threads:
        torch.set_num_threads(threads)
    dtype, reason, scaler = resolve_precision(dtype, dev, saved.get("dtype"))
    compile_on = _switch("compile", compile, saved.get("compile", dev.type in ("cuda", "cpu")))
    det = _switch("deterministic", deterministic, saved.get("deterministic", dev.type == "cpu"))
    torch.use_deterministic_algorithms(det, warn_only=True)
    if det:
        # deterministic mode also fills every new tensor with NaN to expose reads of
        # uninitialised memory: a debugging aid that costs a pass over each allocation
        torch.utils.deterministic.fill_uninitialized_memory = False
    # On CPU, inductor's cpp_wrapper calls the compiled kernels from generated C++ instead of
    # generated Python: a small model's step launches a few hundred kernels, and a Python call
    # for each adds up. (CUDA keeps the default: not measured.)
    options = {"cpp_wrapper": True} if dev.type == "cpu" else {}
    return Runtime(device=dev, dtype=dtype, dtype_reason=reason, compile=compile_on,
                   compile_options=options, threads=torch.get_num_threads(), deterministic=det,
                   rank=rank, local_rank=local_rank, world_size=world_size, scaler=scaler)

# -----------------------------------------------------------------------------
# 13. Checkpoints: one file format, written by train.py, read by train.py and sample.py; growing
#     the vocabulary of a base model for new special tokens
#
# A checkpoint is a dict of tensors and plain Python values, saved with torch.save:
#   model                  state_dict of the bare GPT (no DDP or torch.compile prefixes)
#   model_config           dataclasses.asdict(GPTConfig): the model is rebuilt from this alone
#   runtime                the resolved precision / compile / threads / determinism (exact resume)
#   tokenizer              the tokenizer it was trained with, in bpe's (vocab, merges) form: a
#                          checkpoint never depends on a data directory that may be rebuilt
#   tokenizer_fingerprint  its fingerprint (any other tokenizer is refused)
#   checksum               sha256 of every tensor in the file (see tensor_checksum)
# plus what train.py needs to resume: train_config, optimizers, step, rng, best_val_loss, ...
# Plain types only, so everybody loads with torch.load(weights_only=True), which refuses to
# unpickle code: a checkpoint from the internet cannot run anything on load.
#
# Saving is atomic (a temp file in the same folder, fsync, os.replace: bpe.atomic_write), so a
# crash or a full disk mid-save leaves the previous file intact. Loading verifies: torch.load does
# not check the zip's CRCs, so bytes overwritten inside the weights would load silently; the
# checksum catches that, and names the damaged file. A file whose weights are nan or inf (a
# diverged run saved by an older train.py) is refused too: nothing useful can come out of it.

CHECKPOINT_KEYS = ("model", "model_config")


def tensor_checksum(checkpoint):
    """sha256 over every tensor of a (nested) checkpoint dict, in a fixed order: for each, its key
    path, dtype, shape and raw bytes. Plain values (ints, strings) are not covered: a damaged
    one would make the file unreadable or fail validation anyway. The "checksum" key is skipped."""
    h = hashlib.sha256()

    def walk(path, x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"{path}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())       # the raw bytes, no copy
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                if not (path == "" and k == "checksum"):
                    walk(f"{path}/{k}", x[k])
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(f"{path}/{i}", v)
    walk("", checkpoint)
    return h.hexdigest()


def _disk_full(err):
    """Whether an exception from torch.save means the disk (or quota) ran out. torch's zip writer
    reports it as a RuntimeError ('unexpected pos', 'file write failed'), never naming the disk."""
    if isinstance(err, OSError):
        return bpe.is_disk_full(err)
    text = str(err)
    return isinstance(err, RuntimeError) and ("unexpected pos" in text or "write failed" in text)


def save_checkpoint(path, checkpoint):
    """Write checkpoint (a dict as described above) to path atomically, with its checksum.
    A full disk is one line that says the previous file is intact."""
    checkpoint = {**checkpoint, "checksum": tensor_checksum(checkpoint)}
    try:
        bpe.atomic_write(path, lambda f: torch.save(checkpoint, f))
    except (OSError, RuntimeError) as e:
        if not _disk_full(e):
            raise
        folder = os.path.dirname(os.path.abspath(path))
        free = bpe.free_bytes(folder) / 2 ** 20
        raise bpe.UserError(f"cannot write {path}: the disk is full ({free:.0f} MB free in {folder}); "
                            f"the previous {os.path.basename(path)} is intact: free some space and "
                            f"continue with --resume=True") from None


def load_checkpoint(path):
    """Read and verify a checkpoint; returns its dict (tensors on the CPU). Every problem is one
    line naming the file: missing, unreadable or truncated, not a nanostack checkpoint, damaged
    (checksum mismatch), or holding non-finite weights."""
    if not os.path.isfile(path):
        raise bpe.UserError(f"no checkpoint at {path}: train one with `python train.py`, or give "
                            f"the path of one")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, pickled objects beyond plain data
        raise bpe.UserError(f"cannot read checkpoint {path} ({bpe.first_line(e)}); it is truncated or "
                            f"not a checkpoint: use another one (last.pt, best.pt)") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise bpe.UserError(f"{path} is not a nanostack checkpoint (no {', '.join(missing)}); "
                            f"give the path of one that train.py wrote")
    if ckpt.get("checksum") is not None and tensor_checksum(ckpt) != ckpt["checksum"]:
        raise bpe.UserError(f"checkpoint {path} is damaged: its tensors no longer match the checksum "
                            f"written when it was saved; use another checkpoint (last.pt, best.pt)")
    bad = [k for k, t in ckpt["model"].items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise bpe.UserError(f"checkpoint {path} holds non-finite weights (nan or inf in {len(bad)} "
                            f"tensors, e.g. {bad[0]}): the run had diverged; use an earlier checkpoint")
    return ckpt


def model_from_checkpoint(ckpt, path, kernels=Kernels(), overrides=None):
    """The GPT a checkpoint describes, with its weights (on the CPU, in train mode).
    overrides: model_config fields to change at load time; only knobs that leave the weights
    valid make sense (rope_scaling / rope_factor: the RoPE tables are rebuilt, not stored)."""
    try:
        config = GPTConfig(**ckpt["model_config"])
        if overrides:
            config = dataclasses.replace(config, **overrides)
    except (TypeError, ValueError) as e:
        raise bpe.UserError(f"checkpoint {path}: its model_config cannot be built by this model.py "
                            f"({bpe.first_line(e)}); use the model.py it was trained with") from None
    model = GPT(config, kernels)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise bpe.UserError(f"checkpoint {path}: weights do not match its model_config "
                            f"({bpe.first_line(e)})") from None
    return model


# Fine-tuning a base model on chat data adds special tokens to its tokenizer (bpe's
# Tokenizer.with_special_tokens, at ids past the trained ones), and the model needs an input row
# (wte) and an output row (lm_head) for each new id. grow_vocab adds them, each set to the MEAN of
# the trained rows, for two reasons:
#   - as an input, a new token starts as an "average token": a vector of the size and direction
#     the blocks are used to (a fresh N(0, 1) row of an untied wte is far from every trained row,
#     and would send activations the blocks have never seen through every layer);
#   - as an output, its logit starts as the mean of the old logits: the head is linear, so
#     (mean of rows) . h = mean of (row . h) = mean_i z_i. Since exp(mean z) <= mean exp(z)
#     (Jensen: exp is convex), each new token starts with probability at most 1 / V_old, and the
#     k new ones together take at most k / (V_old + k): the base model's predictions of the old
#     tokens barely move. (Exactly so without the logit softcap; with it, cap * tanh(z / cap) bends
#     only the largest logits.) A random row could instead start with a large logit and distort
#     every prediction until training pushed it down. This is the initialisation Hewitt (2021,
#     "Initializing new word embeddings for pretrained language models") recommends.
# test_model_grow_vocab_rows_are_the_mean checks the rows, the unchanged old logits and the bound.

@torch.no_grad()
def grow_vocab(model, n_trained, vocab_size):
    """Make model's vocabulary at least vocab_size ids, and set every row from id n_trained on (new
    ones, and padding rows that were never trained) of wte and lm_head to the mean of the trained
    rows 0..n_trained-1 (see above). In place (model.config too); returns the model."""
    cfg = model.config
    if not 0 < n_trained <= min(cfg.vocab_size, vocab_size):
        raise ValueError(f"n_trained={n_trained} must be in 1..min({cfg.vocab_size}, {vocab_size})")
    size = max(cfg.vocab_size, vocab_size)

    def grown(w):                                   # (V_old, C) -> (size, C)
        out = w.new_empty(size, w.size(1))
        out[:n_trained] = w[:n_trained]
        out[n_trained:] = w[:n_trained].mean(dim=0)
        return nn.Parameter(out)

    model.transformer.wte = nn.Embedding.from_pretrained(grown(model.transformer.wte.weight), freeze=False)
    head = nn.Linear(cfg.n_embd, size, bias=False, device=model.lm_head.weight.device,
                     dtype=model.lm_head.weight.dtype)
    head.weight = model.transformer.wte.weight if cfg.tie_embeddings else grown(model.lm_head.weight)
    model.lm_head = head
    model.config = dataclasses.replace(cfg, vocab_size=size)
    return model


def checkpoint_tokenizer(ckpt, ckpt_path, tokenizer_path=""):
    """The tokenizer a checkpoint was trained with: tokenizer_path if given, else the copy stored
    in the checkpoint, else (a checkpoint of an older train.py) the path recorded in it, or a
    file of that name next to the checkpoint (the run was copied elsewhere). Whichever is used
    must carry the checkpoint's fingerprint: a different merge table maps the same text to
    different ids, and the model would read gibberish silently."""
    want = ckpt.get("tokenizer_fingerprint")
    if not tokenizer_path and ckpt.get("tokenizer"):
        tokenizer = bpe.Tokenizer.from_vocab_merges(**ckpt["tokenizer"])
        if want and tokenizer.fingerprint != want:
            raise bpe.UserError(f"checkpoint {ckpt_path}: its stored tokenizer does not match its "
                                f"fingerprint; the file is damaged: use another checkpoint")
        return tokenizer
    candidates = [tokenizer_path] if tokenizer_path else []
    recorded = ckpt.get("tokenizer_path") or ""
    if not tokenizer_path and recorded:
        candidates += [recorded, os.path.join(os.path.dirname(os.path.abspath(ckpt_path)),
                                              os.path.basename(recorded))]
    found = next((p for p in candidates if os.path.isfile(p)), None)
    if found is None:
        where = tokenizer_path or recorded or "(none recorded in the checkpoint)"
        raise bpe.UserError(f"tokenizer {where} not found; pass --tokenizer=PATH to the tokenizer.bpe "
                            f"of the data directory the model was trained on")
    tokenizer = bpe.Tokenizer.load(found)
    if want and tokenizer.fingerprint != want:
        raise bpe.UserError(f"tokenizer {found} (fingerprint {tokenizer.fingerprint[:12]}) is not the "
                            f"one this checkpoint was trained with ({want[:12]}); pass "
                            f"--tokenizer=PATH to the right tokenizer.bpe")
    return tokenizer

# -----------------------------------------------------------------------------
# 14. main: print the architecture, run a forward/backward on random tokens


def architecture_table(model):
    """The default architecture as text: parameters per component, FLOPs/token, KV bytes/token."""
    c = model.config
    total = model._param_table()
    moe = c.n_experts > 0
    lines = [f"{'component':<22} {'params':>12}" + (f" {'active':>12}" if moe else "")]
    for name, (n, a) in total.items():
        lines.append(f"{name:<22} {n:>12,}" + (f" {a:>12,}" if moe else ""))
    lines.append(f"{'total':<22} {model.num_params():>12,}"
                 + (f" {model.num_params(active=True):>12,}" if moe else ""))
    f = model.flops_per_token()
    lines.append(f"FLOPs/token (fwd+bwd, T={c.block_size}): {f:,} ({f / 1e6:.1f} MFLOP)")
    lines.append(f"KV cache per token: {model.kv_cache_bytes_per_token(torch.bfloat16):,} bytes "
                 f"(bf16), {model.kv_cache_bytes_per_token(torch.float32):,} bytes (fp32)")
    return "\n".join(lines)


def _alternate(fns, repeats):
    """Run the functions in turn, `repeats` rounds, and return each one's median seconds.
    Alternating (a, b, a, b, ...) spreads the noise of a shared machine evenly over all."""
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, t in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [sorted(t)[len(t) // 2] for t in times]


def bench(config, repeats=7):
    """The SDPA path against the hand-written attention: a training step (forward + backward) of
    the same model both ways, in one process, alternating, medians. (What the KV cache buys is
    measured where it is used: `python sample.py --bench=True`.)"""
    torch.manual_seed(0)
    fast = GPT(config)
    slow = GPT(dataclasses.replace(config, attn_impl="manual"))
    slow.load_state_dict(fast.state_dict())
    T = config.block_size
    idx = torch.randint(config.vocab_size, (4, T))

    def train_step(m):
        loss, _ = m(idx, idx)
        loss.backward()
    t_sdpa, t_manual = _alternate([lambda: train_step(fast), lambda: train_step(slow)], repeats)
    print(f"fwd+bwd B=4 T={T}: sdpa {t_sdpa * 1e3:.1f} ms, manual {t_manual * 1e3:.1f} ms "
          f"(manual/sdpa = {t_manual / t_sdpa:.2f}x)")


def gpt_config(settings, **changes):
    """GPTConfig from any settings object that carries its fields (train.py's TrainConfig and
    ModelSettings below extend GPTConfig), with `changes` applied; one line on a bad value."""
    fields = {f.name: getattr(settings, f.name) for f in dataclasses.fields(GPTConfig)}
    try:
        return GPTConfig(**{**fields, **changes})
    except ValueError as e:
        raise bpe.UserError(f"bad model settings: {e}") from None


@dataclasses.dataclass
class ModelSettings(GPTConfig):
    """`python model.py`'s settings: every GPTConfig field, plus what to do with the model."""
    bench: bool = False             # also time SDPA against the hand-written attention (fwd + bwd)


def main():
    settings = bpe.parse_settings(ModelSettings, sys.argv[1:], description=__doc__)
    config = gpt_config(settings)
    torch.manual_seed(0)
    model = GPT(config)
    print(config)
    print(architecture_table(model))
    B, T = 2, config.block_size
    idx = torch.randint(config.vocab_size, (B, T))
    t0 = time.perf_counter()
    loss, aux = model(idx, idx.roll(-1, dims=1))
    loss.backward()
    dt = time.perf_counter() - t0
    aux_text = "".join(f", {k} {v.item():.3f}" for k, v in aux.items())
    print(f"forward/backward on random tokens (B={B}, T={T}): loss {loss.item():.3f} "
          f"(uniform guess: ln(vocab) = {math.log(config.vocab_size):.3f}){aux_text}, "
          f"{dt * 1e3:.0f} ms")
    if settings.bench:
        bench(config)


if __name__ == "__main__":
    bpe.main_guard(main)
