"""PaLM: the decoder-only transformer of "PaLM: Scaling Language Modeling with Pathways".

Paper: https://arxiv.org/abs/2204.02311. The architecture follows the paper and lucidrains'
reference implementation (PaLM-pytorch / PaLM-rlhf-pytorch `palm.py`), all of it in this file:

    bias-free LayerNorm -> rotary embedding (+ optional xPos) -> parallel block
    (x + attn(LN(x)) + ff(LN(x)), one fused input projection, multi-query attention, SwiGLU)
    -> PaLM (token embedding, blocks, final LayerNorm, output projection tied to the embedding)

plus a preallocated key/value cache for decoding. No layer has a bias.

Shape letters used in the comments: B batch, T tokens in this call, S key slots (cached + new),
D model width, H query heads, K key/value heads, G = H // K query heads per key/value head,
E head width, F feed-forward inner width, V vocabulary.

Batches are LEFT-padded: `attention_mask` (B, T) is True on real tokens. A token's rotary position
is the number of real tokens before it, and no query attends to a pad key, so a padded sequence
gets exactly the logits it would get alone.

Speed on CPU: a key/value head is shared by G query heads, so those G heads are folded into the
query length (B, K, T*G, E): with multi-query attention (K = 1) attention becomes one batched
matmul per layer instead of H. Causal attention then skips the blocks no query can see.

On a GPU, an unpadded batch without a cache (pretraining, scoring) takes SDPA with `is_causal=True`
on unfolded (B, H, T, E) queries and no mask tensor, which is what lets PyTorch pick the flash
kernel; padded batches and cached decoding keep the folded path with its additive mask.

Rows that begin alike (RL samples several responses to each prompt) can share that beginning:
`shared_prefix=P` computes the first P positions once per distinct (tokens, mask) block and lets
every row's later positions attend to its copy of those keys and values (`trunk`).

`activation_checkpointing = True` recomputes each block in the backward pass instead of keeping its
activations (non-reentrant torch.utils.checkpoint): about one more forward per step for memory
that no longer grows with depth.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from palmrl.errors import UserError
from palmrl.model.loss import cross_entropy


@dataclass
class ModelConfig:
    """Hyperparameters of a PaLM model; the keys of configs/model/*.yaml are exactly these fields."""

    vocab_size: int = 8192  # must equal the tokenizer's vocabulary size
    dim: int = 256  # model width D
    depth: int = 6  # number of parallel blocks
    heads: int = 8  # query heads H
    dim_head: int = 32  # width E of each attention head (heads * dim_head need not equal dim)
    kv_heads: int = 1  # 1 = multi-query attention as in PaLM; == heads gives standard MHA
    ff_mult: int = 4  # SwiGLU inner width F = ff_mult * dim, as in the paper
    max_seq_len: int = 256  # longest sequence (prompt + response) the model is used with
    rotary_base: float = 10000.0  # rotary frequency base from RoFormer
    xpos: bool = False  # xPos length-extrapolation scaling of rotary (https://arxiv.org/abs/2212.10554)
    xpos_scale_base: int = 512  # xPos decay length scale, as in the xPos paper
    qk_norm: bool = False  # RMSNorm on queries and keys per head, for stability at high learning rates
    init_std: float = 0.02  # std of the normal init of embeddings and projections (GPT-2 / PaLM-style)

    def __post_init__(self) -> None:
        for key in ("vocab_size", "dim", "depth", "heads", "dim_head", "kv_heads", "ff_mult",
                    "max_seq_len", "xpos_scale_base"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"model.{key} must be a positive integer, got {value!r}")
        for key in ("rotary_base", "init_std"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise UserError(f"model.{key} must be a positive number, got {value!r}")
            setattr(self, key, float(value))
        for key in ("xpos", "qk_norm"):
            if not isinstance(getattr(self, key), bool):
                raise UserError(f"model.{key} must be true or false, got {getattr(self, key)!r}")
        if self.heads % self.kv_heads:
            raise UserError(f"model.kv_heads ({self.kv_heads}) must divide model.heads ({self.heads})")
        if self.dim_head % 2:
            raise UserError(f"model.dim_head must be even for rotary embeddings, got {self.dim_head}")

    @classmethod
    def from_dict(cls, d: Mapping) -> ModelConfig:
        """Build from a mapping (YAML / DictConfig); an unknown key raises UserError naming it."""
        known = {f.name for f in fields(cls)}
        for key in d:
            if key not in known:
                raise UserError(f"model.{key} is not a model setting (known: {', '.join(sorted(known))})")
        return cls(**{key: d[key] for key in d})

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def ff_inner(self) -> int:
        return self.ff_mult * self.dim


# normalization


class LayerNorm(nn.Module):
    """LayerNorm with a learned scale and no bias, as in PaLM."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], self.weight)


class RMSNorm(nn.Module):
    """RMSNorm (https://arxiv.org/abs/1910.07467), used per head on queries and keys (qk_norm)."""

    def __init__(self, dim: int, eps: float = 1e-6):  # eps: far below any real mean square
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, x.shape[-1:], self.weight, self.eps)


# rotary positional embedding (https://arxiv.org/abs/2104.09864) with optional xPos


class Rotary(nn.Module):
    """Rotary tables for given positions; xPos adds a per-frequency scale that decays with distance.

    No buffers: the frequencies are recomputed in float32 on each call (a few hundred numbers), so
    casting the model to bf16 never degrades them and the state dict holds only weights.
    """

    def __init__(self, dim_head: int, base: float, xpos: bool, xpos_scale_base: int, center: int):
        super().__init__()
        self.dim_head, self.base = dim_head, base
        self.xpos, self.xpos_scale_base = xpos, xpos_scale_base
        self.center = center  # xPos exponents are taken relative to a fixed position to keep them small

    def forward(self, positions: Tensor, dtype: torch.dtype) -> RotaryTables:
        """positions: (B|1, T) long -> cos, sin (B|1, T, 1, E) and the xPos scales (or None)."""
        half = torch.arange(0, self.dim_head, 2, device=positions.device, dtype=torch.float32)
        inv_freq = self.base ** (-half / self.dim_head)  # (E/2,)
        angles = positions.float()[..., None] * inv_freq  # (B|1, T, E/2)
        angles = torch.cat((angles, angles), dim=-1)[:, :, None, :]  # (B|1, T, 1, E)
        cos, sin = angles.cos(), angles.sin()
        if not self.xpos:
            return RotaryTables(cos.to(dtype), sin.to(dtype), None, None)

        # xPos: q is scaled by s**n and k by s**-n, so q.k decays as s**(i - j)
        scale = (half + 0.4 * self.dim_head) / (1.4 * self.dim_head)  # (E/2,)
        power = (positions.float() - self.center) / self.xpos_scale_base  # (B|1, T)
        scale = scale ** power[..., None]  # (B|1, T, E/2)
        scale = torch.cat((scale, scale), dim=-1)[:, :, None, :]  # (B|1, T, 1, E)
        return RotaryTables((cos * scale).to(dtype), (sin * scale).to(dtype),
                            (cos / scale).to(dtype), (sin / scale).to(dtype))


class RotaryTables:
    """cos/sin tables for queries, and for keys when xPos makes them differ.

    RoFormer's x * cos + rotate_half(x) * sin, with rotate_half(x) = (-x2, x1) for x = (x1, x2), is taken
    as x * cos + roll(x, E/2) * sin', sin' = sin with its first half negated: roll(x) = (x2, x1), and
    (-a) * b == a * (-b) exactly in floating point, so the values are the same to the last bit, in four
    operators instead of six.
    """

    def __init__(self, q_cos: Tensor, q_sin: Tensor, k_cos: Tensor | None, k_sin: Tensor | None):
        self.shared = k_cos is None  # queries and keys rotate alike (no xPos): one pass can do both
        self.q_cos, self.q_sin = q_cos, _signed(q_sin)
        self.k_cos = self.q_cos if k_cos is None else k_cos
        self.k_sin = self.q_sin if k_sin is None else _signed(k_sin)

    def at(self, positions: Tensor) -> RotaryTables:
        """Tables made for positions 0..N-1 ((1, N, 1, E)), taken at `positions` (B, T) -> (B, T, 1, E):
        a decoding step indexes its cache's tables instead of computing cos and sin again."""
        out = object.__new__(RotaryTables)
        out.shared = self.shared
        out.q_cos, out.q_sin = self.q_cos[0, positions], self.q_sin[0, positions]
        out.k_cos = out.q_cos if self.shared else self.k_cos[0, positions]
        out.k_sin = out.q_sin if self.shared else self.k_sin[0, positions]
        return out

    # the tables follow q/k's dtype: under autocast q is bf16 while the residual stream is fp32
    def queries(self, q: Tensor) -> Tensor:
        return _rotate(q, self.q_cos, self.q_sin)

    def keys(self, k: Tensor) -> Tensor:
        return _rotate(k, self.k_cos, self.k_sin)


def _signed(sin: Tensor) -> Tensor:
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _rotate(x: Tensor, cos: Tensor, signed_sin: Tensor) -> Tensor:
    if cos.dtype != x.dtype:
        cos, signed_sin = cos.to(x.dtype), signed_sin.to(x.dtype)
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


# key/value cache for decoding


class KVCache:
    """Preallocated keys and values of every layer, plus which slots hold real tokens.

    The first call with a cache writes the (left-padded) prompts into slots [0, P); each later call
    appends its tokens at `offset`. `lengths` counts each row's real tokens so far: the rotary
    position of its next real token. `weights` says how one-token steps multiply by the weight
    matrices (DECODE_WEIGHTS): None through the layers themselves; "fp32" through contiguous (in, out)
    copies; "fp16" through fp16 copies packed for FBGEMM (x86 CPUs), fp32 activations and sums.
    """

    def __init__(self, keys: list[Tensor], values: list[Tensor], key_mask: Tensor, lengths: Tensor,
                 weights: str | None = None, copies: dict | None = None):
        self.keys = keys  # per layer (B, K, max_len, E)
        self.values = values  # per layer (B, K, max_len, E)
        self.key_mask = key_mask  # (B, max_len) bool, True on slots holding real tokens
        self.lengths = lengths  # (B,) long, real tokens written so far
        self.offset = 0  # slots written so far (same for every row)
        self.rotary: RotaryTables | None = None  # the model's tables for positions 0..max_len-1, made once
        self.weights = weights
        # (weights, id(weight)) -> (data_ptr, version, rows, copy): a Tensor, MKL's packed fp32 matrix for
        # `rows` rows (0: any) or FBGEMM's packed fp16 one; this loop's own, or the model's kept ones
        # (PaLM.keep_decode_copies), one per weight
        self._copies: dict[tuple[str, int], tuple[int, int, int, object]] = {} if copies is None else copies

    @property
    def max_len(self) -> int:
        return self.key_mask.shape[1]

    def select(self, index: Tensor) -> KVCache:
        """A cache holding this one's rows `index` (B',), in that order: a prompt prefilled once, handed
        to each of its rows (generate.py). Weight copies are shared, not copied."""
        out = KVCache([k[index] for k in self.keys], [v[index] for v in self.values], self.key_mask[index],
                      self.lengths[index], self.weights, self._copies)
        out.offset, out.rotary = self.offset, self.rotary
        return out

    def product(self, x: Tensor, weight: Tensor) -> Tensor:
        """x (..., in) @ weight (out, in).T through a copy of `weight`, made on first use and kept for
        this cache's decode loop (the weights do not change while one loop runs; the next loop makes
        new copies), or for as long as the model keeps them (inference engines); a copy whose weight
        was written in place or replaced since, or that was packed for another number of rows, is
        made again."""
        rows = x.numel() // x.shape[-1]
        packed = self.weights == "fp32" and rows > 1 and _mkl_packing_works()  # see DECODE_WEIGHTS
        key, stamp = (self.weights, id(weight)), (weight.data_ptr(), weight._version, rows if packed else 0)
        kept = self._copies.get(key)
        if kept is not None and kept[:3] == stamp:
            copy = kept[3]
        else:
            w = weight.detach()
            if self.weights == "fp16":
                copy = torch.ops.quantized.linear_prepack_fp16(w.float(), None)
            elif packed:
                copy = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
            else:
                copy = w.t().contiguous()
            self._copies[key] = (*stamp, copy)
        if self.weights == "fp16":  # FBGEMM takes fp32 activations
            return torch.ops.quantized.linear_dynamic_fp16(x.float(), copy).to(x.dtype)
        if packed:
            out = torch.ops.mkl._mkl_linear(x.reshape(rows, x.shape[-1]), copy, weight.detach(), None, rows)
            return out.view(*x.shape[:-1], out.shape[-1])
        return x @ copy  # (..., in) @ (in, out)


# How a one-token decoding step multiplies by the weights. Each row is multiplied by every weight matrix
# once per token, so on the CPU the matrix products are the step's cost:
#   fp32 (the CPU default): contiguous (in, out) copies of fp32 weights. Streaming them row by row measured
#     1.6x faster than F.linear's (out, in) product at one row (the whole bench model's 19 matrices: 3.2 vs
#     5.2 ms, one thread) and no slower at 8-128 rows. Same logits as F.linear to float rounding. bf16
#     weights get no copies: oneDNN's bf16 product was no faster through them (palm_small's fused
#     projection at 16 rows, AMX Xeon: 0.59 against 0.48 ms), and making one took ~5 ms, once per loop;
#     the bench model's bf16 decode step went 4.3 -> 3.4-3.7 ms at batch 1, 5.6 -> 5.0 at 16. At two or
#     more rows the fp32 copy is MKL's packed matrix for that many rows (torch.ops.mkl, where the build has
#     MKL) instead, made once per loop: MKL's plain product packs the matrix again at every call. PPO's
#     16-row rollouts on palm_small (one thread) went 1.03 -> 0.83 s an iteration; at one row packing
#     was slower. The same values to float rounding (bit-identical for matrices up to 512 wide on the
#     AMX Xeon; ~1e-6 apart at 2048, where MKL splits the sum differently).
#   fp16: fp16 copies packed for FBGEMM's small-batch kernel (torch.ops.quantized, x86 only): half the
#     bytes to read, and MKL's fp32 product is slow at a few rows on this AVX2 machine (the 19 matrices,
#     one thread, FBGEMM fp16 against the fp32 copies: 2.9 vs 3.7 ms at one row, 3.7 vs 10.5 at 8,
#     4.6 vs 9.5 at 16). Weights are rounded
#     to fp16 (10-bit mantissa), so sampled tokens can differ from fp32's: opt-in (decode_weights=fp16).
# Copies exist only for weights held whole on the CPU (not ZeRO-3 partitions), up to this many bytes of
# fp32 weights; each decode loop holds them once more (fp16: half as much).
DECODE_WEIGHTS = ("fp32", "fp16")
DECODE_COPY_MAX_BYTES = 2 * 2**30


def check_decode_weights(weights: str) -> None:
    """Raise UserError for a value outside DECODE_WEIGHTS, or fp16 on a PyTorch build without FBGEMM."""
    if weights not in DECODE_WEIGHTS:
        raise UserError(f"decode_weights must be one of {', '.join(DECODE_WEIGHTS)}, got {weights!r}")
    if weights == "fp16" and _fbgemm_fp16_missing():
        raise UserError("decode_weights=fp16 needs PyTorch's FBGEMM kernels (x86 CPU builds); this build "
                        f"has none ({_fbgemm_fp16_missing()}): use decode_weights=fp32")


@functools.cache
def _mkl_packing_works() -> bool:
    """Whether this build multiplies by MKL-packed fp32 matrices (x86 builds with MKL; tried once)."""
    try:
        packed = torch.ops.mkl._mkl_reorder_linear_weight(torch.ones(4, 8), 2)
        return bool(torch.ops.mkl._mkl_linear(torch.ones(2, 8), packed, torch.ones(4, 8), None, 2).eq(8).all())
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


@functools.cache
def _fbgemm_fp16_missing() -> str:
    """'' when this build multiplies by packed fp16 weights, else why not (tried once per process)."""
    try:
        torch.ops.quantized.linear_dynamic_fp16(torch.zeros(1, 8),
                                                torch.ops.quantized.linear_prepack_fp16(torch.zeros(8, 8), None))
    except (RuntimeError, AttributeError, NotImplementedError) as err:
        return str(err).splitlines()[0][:120]
    return ""


def project(layer: nn.Module, x: Tensor, cache: KVCache | None) -> Tensor:
    """layer(x) for a Linear (or LoRALinear) of this model; during a one-token decoding step with a
    cache that holds weight copies, the base product through the copy, plus the layer's active
    LoRA update (`add_lora_update`) when it has one."""
    if cache is None or cache.weights is None or x.shape[1] != 1:
        return layer(x)
    out = cache.product(x, layer.weight)
    if layer.bias is not None:
        out = out + layer.bias
    add_update = getattr(layer, "add_lora_update", None)
    return out if add_update is None else add_update(out, x)


# parallel attention + feed-forward block


class ParallelBlock(nn.Module):
    """x + attn(LN(x)) + ff(LN(x)): one LayerNorm and one fused projection feed both branches."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.heads, self.kv_heads, self.dim_head = config.heads, config.kv_heads, config.dim_head
        self.split_sizes = (config.heads * config.dim_head, config.kv_heads * config.dim_head,
                            config.kv_heads * config.dim_head, config.ff_inner, config.ff_inner)
        self.norm = LayerNorm(config.dim)
        self.fused_proj = nn.Linear(config.dim, sum(self.split_sizes), bias=False)
        self.attn_out = nn.Linear(config.heads * config.dim_head, config.dim, bias=False)
        self.ff_out = nn.Linear(config.ff_inner, config.dim, bias=False)
        self.q_norm = RMSNorm(config.dim_head) if config.qk_norm else None
        self.k_norm = RMSNorm(config.dim_head) if config.qk_norm else None

    def forward(self, x: Tensor, rotary: RotaryTables, bias: Tensor | None,
                cache: KVCache | None = None, layer: int = 0) -> Tensor:
        """x (B, T, D); bias (B|1, 1, T*G, S): 0 where a query row may attend to a key slot, else -inf;
        None: plain causal attention over this call's tokens (no padding, no cache) through SDPA."""
        B, T, _ = x.shape
        if cache is not None and T == 1:
            return self.decode_step(x, rotary, bias, cache, layer)
        H, K, E = self.heads, self.kv_heads, self.dim_head
        q, k, v, ff_in, gate = self.project_input(x, rotary, cache)

        # keys and values: this call's, or everything cached so far including this call's
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, K, T, E)
        if cache is not None:
            start, end = cache.offset, cache.offset + T
            cache.keys[layer][:, :, start:end] = k
            cache.values[layer][:, :, start:end] = v
            k, v = cache.keys[layer][:, :, :end], cache.values[layer][:, :, :end]  # (B, K, S, E)

        if bias is None:  # flash-eligible: causal, no mask tensor, the key/value heads shared by SDPA
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True,
                                                 enable_gqa=K != H)  # (B, H, T, E)
            out = out.transpose(1, 2).reshape(B, T, H * E)
        else:
            out = self.attention(q, k, v, bias)
        return self.project_output(x, out, ff_in, gate, cache)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor) -> Tensor:
        """q (B, T, H, E) of this call's tokens, the last T of the key slots k/v (B, K, S, E), bias
        (B|1, 1, T*G, S) -> (B, T, H*E). The G query heads that share a key/value head are folded into
        the query length (row t*G + g), free when K == 1."""
        B, T, H, E = q.shape
        K = self.kv_heads
        G = H // K
        q = q.view(B, T, K, G, E).transpose(1, 2).reshape(B, K, T * G, E)
        out = attend(q, k, v, bias, T)  # (B, K, T*G, E)
        return out.reshape(B, K, T, G, E).transpose(1, 2).reshape(B, T, H * E)

    def forward_shared(self, prefix: Tensor, rest: Tensor, rotary: tuple[RotaryTables, RotaryTables],
                       bias: tuple[Tensor, Tensor], owner: Tensor) -> tuple[Tensor, Tensor]:
        """forward() of rows whose first P positions are shared (PaLM.trunk's `shared_prefix`):
        prefix (U, P, D) once per distinct beginning, rest (B, T-P, D) every row's later positions,
        owner (B,) each row's prefix. The prefix attends to itself; the rest to its row's prefix keys
        and values and to its own. rotary and bias: (the prefix's, the rest's), as forward() takes them."""
        qp, kp, vp, ffp, gatep = self.project_input(prefix, rotary[0], None)
        qr, kr, vr, ffr, gater = self.project_input(rest, rotary[1], None)
        kp, vp = kp.transpose(1, 2), vp.transpose(1, 2)  # (U, K, P, E)
        keys = torch.cat((kp[owner], kr.transpose(1, 2)), dim=2)  # (B, K, T, E)
        values = torch.cat((vp[owner], vr.transpose(1, 2)), dim=2)
        return (self.project_output(prefix, self.attention(qp, kp, vp, bias[0]), ffp, gatep, None),
                self.project_output(rest, self.attention(qr, keys, values, bias[1]), ffr, gater, None))

    def decode_step(self, x: Tensor, rotary: RotaryTables, bias: Tensor, cache: KVCache, layer: int) -> Tensor:
        """forward() for one new token per row (x (B, 1, D)) through the cache: the same products on the
        same values in ~20% fewer operator calls (the one-token query is not folded into and out of the
        query length, keys and values go to their slot without (B, K, 1, E) transposes). At batch 1 a
        step's time is mostly per-operator overhead: the bench model's decode step went ~3% faster."""
        B = x.shape[0]
        H, K, E = self.heads, self.kv_heads, self.dim_head
        q, k, v, ff_in, gate = self.project_input(x, rotary, cache)

        # this token's key and value into its slot, then attention over every slot so far
        slot = cache.offset
        keys, values = cache.keys[layer], cache.values[layer]  # (B, K, max_len, E)
        keys.select(2, slot).copy_(k.view(B, K, E))
        values.select(2, slot).copy_(v.view(B, K, E))
        q = q.reshape(B, K, H // K, E)  # a key/value head's G query heads as its G query rows
        out = attend(q, keys[:, :, :slot + 1], values[:, :, :slot + 1], bias, 1).view(B, 1, H * E)
        return self.project_output(x, out, ff_in, gate, cache)

    def project_input(self, x: Tensor, rotary: RotaryTables,
                      cache: KVCache | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """One projection of LN(x) (B, T, D) for queries, keys, values and the SwiGLU input and gate ->
        q (B, T, H, E) and k (B, T, K, E) with their rotary positions, v (B, T, K, E), ff_in, gate (B, T, F)."""
        B, T, _ = x.shape
        H, K, E = self.heads, self.kv_heads, self.dim_head
        fused = project(self.fused_proj, self.norm(x), cache)
        # optional qk-norm, then rotary positions: queries and keys side by side in one pass when they
        # rotate alike (they are adjacent in the projection). One split per path: its backward is one
        # cat, where a slice beside it would add a zero-filled copy of the whole projection's gradient
        if self.q_norm is None and rotary.shared:
            qk, v, ff_in, gate = fused.split(((H + K) * E, *self.split_sizes[2:]), dim=-1)
            q, k = rotary.queries(qk.view(B, T, H + K, E)).split((H, K), dim=2)
        else:
            q, k, v, ff_in, gate = fused.split(self.split_sizes, dim=-1)
            q, k = q.view(B, T, H, E), k.view(B, T, K, E)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = rotary.queries(q), rotary.keys(k)
        return q, k, v.view(B, T, K, E), ff_in, gate

    def project_output(self, x: Tensor, attended: Tensor, ff_in: Tensor, gate: Tensor,
                       cache: KVCache | None) -> Tensor:
        """x + the attention output (attended: (B, T, H*E)) + the SwiGLU feed-forward
        (https://arxiv.org/abs/2002.05202), each through its output projection."""
        ff_hidden = F.silu(gate) * ff_in  # (B, T, F)
        return x + project(self.attn_out, attended, cache) + project(self.ff_out, ff_hidden, cache)


def attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, num_tokens: int) -> Tensor:
    """Causal softmax attention of `num_tokens` new tokens (T) with G = L / T query rows each.

    q (B, K, L, E), k/v (B, K, S, E), bias (B|1, 1, L, S) additive (0 or -inf) -> (B, K, L, E).
    On CPU two batched matmuls measured faster than SDPA's flash kernel (~10% of a bf16 training
    step for the bench model); elsewhere SDPA's fused kernels keep memory linear in S.
    """
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
    return attend_bmm(q, k, v, bias, num_tokens)


def attend_bmm(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, num_tokens: int) -> Tensor:
    """`attend` as baddbmm (scores + bias in one pass) -> softmax -> bmm.

    Causal skipping: the query rows of the first half of the new tokens cannot see any key of the
    second half, so they are multiplied against the keys before it only (3/4 of the full work).
    """
    B, K, L, E = q.shape
    S, T = k.shape[2], num_tokens
    G = L // T
    q, k, v = q.reshape(B * K, L, E), k.reshape(B * K, S, E), v.reshape(B * K, S, E)
    if T == 1 and bias.shape[2] == 1:  # a decoding step: one bias row, broadcast over the G query rows
        bias = bias.to(q.dtype).expand(B, K, 1, S).reshape(B * K, 1, S)
        scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=E ** -0.5)  # (B*K, G, S)
        return (scores.softmax(dim=-1) @ v).view(B, K, L, E)
    bias = bias.to(q.dtype).expand(B, K, L, S).reshape(B * K, L, S)

    # split (not slice) the query rows: its backward is one cat instead of zero-filled copies
    halves = (T // 2, T - T // 2) if T > 1 else (T,)
    out = []
    for q_part, bias_part, last in zip(q.split([n * G for n in halves], dim=1),
                                       bias.split([n * G for n in halves], dim=1),
                                       itertools.accumulate(halves)):
        keys = S - T + last  # the keys this block of queries may see
        scores = torch.baddbmm(bias_part[:, :, :keys], q_part, k[:, :keys].transpose(1, 2),
                               alpha=E ** -0.5)  # (B*K, rows, keys)
        out.append(scores.softmax(dim=-1) @ v[:, :keys])  # (B*K, rows, E)
    return torch.cat(out, dim=1).view(B, K, L, E)


# the model


def zero3_partitioned(module: nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 holds `module`'s parameters in shards (each then carries a `ds_id`)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def _whole(param: nn.Parameter):
    """The full tensor of a ZeRO-3-partitioned parameter while inside (rank 0's changes kept), else
    nothing to do."""
    if not hasattr(param, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([param], modifier_rank=0)


def additive_bias(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """A bool attention pattern (True: may attend) as the additive mask attention takes: 0 or -inf."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, float("-inf"))


# The shared path (PaLM.trunk's shared_prefix) is taken when it leaves at least this share of a batch's
# positions uncomputed: it splits each product in two and adds a few operator calls a layer. The bench
# model's training step (8 x 256, 2 threads, AMX Xeon) against the plain path with P of 16/32/64 shared
# positions (5/11/22% of the positions): fp32 1.00/0.95/0.86x the time, bf16 1.02/1.02/0.95x.
MIN_SHARED_SAVING = 1 / 8


def distinct_prefixes(tokens: Tensor, attention_mask: Tensor | None, P: int) -> tuple[Tensor, Tensor] | None:
    """Rows of tokens (B, T) grouped by their first P tokens and mask: (first (U,) a row of each
    distinct beginning, owner (B,) each row's index into first), or None when sharing them would
    leave fewer than MIN_SHARED_SAVING of the B * T positions uncomputed (all distinct: none)."""
    key = tokens[:, :P]
    if attention_mask is not None:  # a pad id may also be a real token
        key = torch.cat((key, attention_mask[:, :P].long()), dim=1)
    distinct, owner = torch.unique(key, dim=0, return_inverse=True)
    B, T = tokens.shape
    if (B - distinct.shape[0]) * P < MIN_SHARED_SAVING * B * T:
        return None
    rows = torch.arange(B, device=tokens.device)
    first = torch.full((distinct.shape[0],), B, device=tokens.device).scatter_reduce(0, owner, rows, reduce="amin")
    return first, owner


def paired_prefix(tokens: Tensor, attention_mask: Tensor | None = None) -> int:
    """Rows that are the two halves of pairs (row i and row i + B/2: a prompt's chosen and rejected
    replies, as the reward and DPO stages batch them): how many leading positions every pair has in
    common, tokens and mask. Passed as `shared_prefix`, each prompt is computed once for its two replies."""
    half = tokens.shape[0] // 2
    same = tokens[:half] == tokens[half:2 * half]
    if attention_mask is not None:
        same &= attention_mask[:half] == attention_mask[half:2 * half]
    return int(same.long().cumprod(dim=1).sum(dim=1).min()) if half else 0


def kept_positions(hidden: Tensor, keep: slice | Tensor | None, last_only: bool = False) -> Tensor:
    """hidden (B, T, D) at the positions whose logits are read: the last (`last_only`, (B, 1, D)), all
    (None), a slice (B, T', D), a bool mask (n, D). Always contiguous: torch's matmul folds only a
    contiguous (B, T', D) into one product and multiplies a strided one batch by batch against the
    output matrix expanded B times, which in bf16 on the CPU copies that matrix B times (palm_small's
    head on a (16, 32, 512) slice, one thread: 545 ms strided against 5.3 ms; fp32 50 against 31 ms,
    the same values)."""
    if last_only:
        keep = slice(-1, None)
    if keep is None:
        return hidden
    return hidden[:, keep].contiguous() if isinstance(keep, slice) else hidden[keep]


class PaLM(nn.Module):
    """PaLM decoder (https://arxiv.org/abs/2204.02311): embedding, parallel blocks, tied output."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # built on the meta device (checkpoint checks, memory plans) nothing is initialised: there is nothing
        # to draw, and torch's meta normal_ imports torch._dynamo (~1.5 s of every `palmrl sample`)
        on_meta = torch.get_default_device().type == "meta"
        self.token_emb = nn.Embedding(config.vocab_size, config.dim,
                                      _weight=torch.empty(config.vocab_size, config.dim) if on_meta else None)
        self.rotary = Rotary(config.dim_head, config.rotary_base, config.xpos,
                             config.xpos_scale_base, center=config.max_seq_len // 2)
        self.layers = nn.ModuleList(ParallelBlock(config) for _ in range(config.depth))
        self.norm = LayerNorm(config.dim)
        self.activation_checkpointing = False  # recompute each block in backward (train.activation_checkpointing)
        self.causal_sdpa: bool | None = None  # unpadded, uncached calls through SDPA is_causal; None: off the CPU
        self.decode_copies: dict | None = None  # keep_decode_copies: weight copies shared by every decode loop
        if not on_meta:
            self.reset_parameters()

    def keep_decode_copies(self) -> PaLM:
        """Keep the weight copies CPU decoding makes (DECODE_WEIGHTS) across decode loops, for a model
        that only serves (sample, serve, palmrl.LLM): making them costs a few hundred ms per loop at
        palm_small (fp16 packing more than the fp32 transpose), which a server would pay per batch.
        They cost the memory of one more copy of the weights (fp16: half) for the model's lifetime;
        a weight written in place or replaced is copied again."""
        self.decode_copies = {}
        return self

    def reset_parameters(self) -> None:
        """Normal(0, init_std) embeddings and projections; residual outputs scaled by 1/sqrt(2*depth).

        Built under DeepSpeed's `zero.Init` (ZeRO-3: each rank holds only its shard from the start) a
        parameter is gathered for its init and re-partitioned, rank 0's values kept: the same
        weights, drawn in the same order, as a model built whole."""
        std = self.config.init_std
        residual = std / math.sqrt(2 * self.config.depth)  # GPT-2's scaling keeps the residual stream flat
        inits = [(self.token_emb.weight, std)]
        for block in self.layers:
            inits += [(block.fused_proj.weight, std), (block.attn_out.weight, residual),
                      (block.ff_out.weight, residual)]
        for param, scale in inits:
            with _whole(param):
                nn.init.normal_(param, std=scale)

    def num_params(self) -> int:
        """Number of parameters; the tied output projection is counted once (with the embedding)."""
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, batch_size: int, max_len: int, *, dtype: torch.dtype | None = None,
                  device: torch.device | str | None = None, weights: str = "fp32") -> KVCache:
        """An empty KV cache for `batch_size` rows of up to `max_len` tokens (prompt + new); `weights`
        (DECODE_WEIGHTS): the copies one-token steps multiply by on the CPU (elsewhere: the layers)."""
        check_decode_weights(weights)
        weight = self.token_emb.weight
        dtype = dtype or weight.dtype
        device = device or weight.device
        c = self.config
        shape = (batch_size, c.kv_heads, max_len, c.dim_head)
        # weight copies only on the CPU, for weights held whole here (not ZeRO-3 partitions)
        fp32_bytes = sum(p.numel() * 4 for p in self.parameters())
        copies = (torch.device(device).type == "cpu" and fp32_bytes <= DECODE_COPY_MAX_BYTES
                  and not zero3_partitioned(self) and (weights == "fp16" or weight.dtype == torch.float32))
        # (bf16 weights with decode_weights=fp32: the layers themselves, see DECODE_WEIGHTS)
        return KVCache(keys=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(c.depth)],
                       values=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(c.depth)],
                       key_mask=torch.zeros(batch_size, max_len, dtype=torch.bool, device=device),
                       lengths=torch.zeros(batch_size, dtype=torch.long, device=device),
                       weights=weights if copies else None, copies=self.decode_copies)

    def trunk(self, tokens: Tensor, *, attention_mask: Tensor | None = None,
              cache: KVCache | None = None, shared_prefix: int = 0) -> Tensor:
        """tokens (B, T) long -> final-normed hidden states (B, T, D).

        `shared_prefix=P` (no cache): rows whose first P tokens and mask are equal (RL's several
        responses to one prompt) compute those positions once; each row's later positions attend to
        its copy of them. The same hidden states to float rounding (the sums are split differently);
        fewer rows of every product: at PPO's 4 responses to a prompt of P tokens and N new ones, 3P
        of each group's 4(P+N) positions are not computed. A batch whose sharing would save little
        (MIN_SHARED_SAVING; none when every beginning differs) takes the plain path."""
        if shared_prefix > 0 and cache is None and shared_prefix < tokens.shape[1]:
            shared = distinct_prefixes(tokens, attention_mask, shared_prefix)
            if shared is not None:
                return self._shared_trunk(tokens, attention_mask, shared_prefix, *shared)
        B, T = tokens.shape
        G = self.config.heads // self.config.kv_heads
        x = self.token_emb(tokens)  # (B, T, D)

        # positions and the attention pattern, shared by all layers
        causal_sdpa = tokens.device.type != "cpu" if self.causal_sdpa is None else self.causal_sdpa
        bias = None
        if cache is None and attention_mask is None:
            positions = torch.arange(T, device=tokens.device)[None]  # (1, T)
            if not causal_sdpa:
                allowed = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()[None]  # (1, T, S)
        else:
            positions, allowed = self._positions_and_pattern(tokens, attention_mask, cache)
            causal_sdpa = False
        if not causal_sdpa:
            # (B|1, 1, T*G, S), query row t*G + g; one new token (decoding): its G rows share one pattern,
            # (B, 1, 1, S) broadcasts over them
            bias = additive_bias(allowed[:, None] if T == 1 else allowed.repeat_interleave(G, dim=1)[:, None],
                                 x.dtype)
        if cache is None:
            rotary = self.rotary(positions, x.dtype)
        else:  # the tables of every slot once per cache; each call takes its rows
            if cache.rotary is None or cache.rotary.q_cos.dtype != x.dtype:
                cache.rotary = self.rotary(torch.arange(cache.max_len, device=tokens.device)[None], x.dtype)
            rotary = cache.rotary.at(positions)

        # blocks
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for i, block in enumerate(self.layers):
            if recompute:
                x = checkpoint(block, x, rotary, bias, None, i, use_reentrant=False)
            else:
                x = block(x, rotary, bias, cache, i)
        if cache is not None:
            cache.offset += T

        return self.norm(x)  # (B, T, D)

    def _shared_trunk(self, tokens: Tensor, attention_mask: Tensor | None, P: int, first: Tensor,
                      owner: Tensor) -> Tensor:
        """trunk() with the first P positions computed for the rows `first` (U,) only; owner (B,): each
        row's index into `first` (distinct_prefixes)."""
        G = self.config.heads // self.config.kv_heads
        positions, allowed = self._positions_and_pattern(tokens, attention_mask, None)  # (B, T), (B, T, T)
        x = self.token_emb(tokens)  # (B, T, D)
        prefix, rest = x[first, :P], x[:, P:]  # (U, P, D), (B, T-P, D)
        rotary = (self.rotary(positions[first, :P], x.dtype), self.rotary(positions[:, P:], x.dtype))
        pattern_rows = first
        if attention_mask is None:  # no padding: one causal pattern broadcast over the rows, as trunk's
            allowed, pattern_rows = allowed[:1], first.new_zeros(1)
        bias = (additive_bias(allowed[pattern_rows, :P, :P].repeat_interleave(G, dim=1)[:, None], x.dtype),
                additive_bias(allowed[:, P:].repeat_interleave(G, dim=1)[:, None], x.dtype))
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.layers:
            if recompute:
                prefix, rest = checkpoint(block.forward_shared, prefix, rest, rotary, bias, owner, use_reentrant=False)
            else:
                prefix, rest = block.forward_shared(prefix, rest, rotary, bias, owner)
        return self.norm(torch.cat((prefix[owner], rest), dim=1))  # (B, T, D)

    def _positions_and_pattern(self, tokens: Tensor, attention_mask: Tensor | None,
                               cache: KVCache | None) -> tuple[Tensor, Tensor]:
        """Rotary positions (B, T) and allowed (B, T, S) for a padded batch and/or a cache."""
        B, T = tokens.shape
        mask = attention_mask
        if mask is None:
            mask = torch.ones(B, T, dtype=torch.bool, device=tokens.device)
        if mask.shape != tokens.shape:
            raise ValueError(f"attention_mask {tuple(mask.shape)} must match tokens {tuple(tokens.shape)}")
        mask = mask.bool()
        start = 0 if cache is None else cache.offset
        if cache is not None and start + T > cache.max_len:
            raise ValueError(f"KV cache holds {cache.max_len} tokens; {start + T} requested")
        if cache is not None and T == 1 and start > 0:
            # a decoding step, in fewer operators than below: its slot is the last, so every key slot is
            # causally visible, and its position is the row's length so far
            positions = cache.lengths[:, None].clone()  # (B, 1)
            cache.key_mask[:, start] = mask[:, 0]
            cache.lengths += mask[:, 0]
            return positions, cache.key_mask[:, None, :start + 1] | ~mask[:, :, None]  # a pad query sees all

        # a token's position is the number of real tokens before it (pads sit at 0)
        positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T)
        if cache is not None:
            positions = positions + cache.lengths[:, None]
            cache.key_mask[:, start:start + T] = mask
            cache.lengths += mask.sum(dim=1)
            key_mask = cache.key_mask[:, :start + T]  # (B, S)
        else:
            key_mask = mask

        # causal over slots, real keys only; a pad query may see every earlier key, which keeps
        # its softmax finite and never reaches a real token
        S = key_mask.shape[1]
        query_slot = torch.arange(start, start + T, device=tokens.device)
        causal = torch.arange(S, device=tokens.device)[None, :] <= query_slot[:, None]  # (T, S)
        allowed = causal[None] & (key_mask[:, None, :] | ~mask[:, :, None])  # (B, T, S)
        return positions, allowed

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden (B, T, D) -> logits (B, T, V) through the embedding matrix (tied weights)."""
        return F.linear(hidden, self.token_emb.weight)

    def forward(self, tokens: Tensor, *, attention_mask: Tensor | None = None, cache: KVCache | None = None,
                targets: Tensor | None = None, ignore_index: int | None = -100, last_only: bool = False,
                keep: slice | Tensor | None = None, shared_prefix: int = 0) -> Tensor:
        """tokens (B, T) long -> logits (B, T, V); `last_only`: the last position's only (B, 1, V), what
        decoding needs (a prompt's other positions skip the output projection); `keep`: only the
        positions whose logits are read, a slice of positions (B, T', V) or a (B, T) bool mask (n, V)
        (RL scores responses, DPO sums replies: the prompt's logits are never made); with targets (B, T):
        their mean cross-entropy (fp32), computed in chunks without the full logits, over the positions
        whose target is not `ignore_index` (None: every position; model/loss.py); `shared_prefix`: see trunk."""
        hidden = self.trunk(tokens, attention_mask=attention_mask, cache=cache, shared_prefix=shared_prefix)
        if targets is not None:
            return cross_entropy(hidden, self.token_emb.weight, targets, ignore_index=ignore_index)
        hidden = kept_positions(hidden, keep, last_only)
        if cache is not None and cache.weights is not None and hidden.shape[1] == 1:  # a decoding step: the copy
            return cache.product(hidden, self.token_emb.weight)
        return self.logits(hidden)
