"""Decoder-only Transformer for symbolic music, in Flax NNX.

Reads top-down: `TransformerConfig`, small layers (norm, MLP, position encodings),
`Attention`, `Block`, `Transformer` (the training forward pass, and the decoding API the
sampler uses: `init_cache`, `prefill`, `decode_step`), converting checkpoints between
scanned and unscanned layers, then parameter and FLOP counts.

Shapes: B batch, T query length, S key length, D emb_dim, H num_heads,
Dh head_dim = qkv_dim // num_heads, F mlp_dim, V padded vocab, L layers.

Three position encodings:
  * "sinusoidal": fixed sin/cos table added to the token embeddings.
  * "rope": rotary embeddings applied to queries and keys.
  * "relative": Music Transformer relative attention (Huang et al. 2018): each head
    has its own learned embedding per relative distance 0..max_len-1, shape
    [H, max_len, Dh] (tensor2tensor's `heads_share_relative_embedding=False`),
    giving logits q_i . E[i - j] added to q_i . k_j, computed with the memory-efficient
    "skewing" trick (per query chunk on accelerators).

Attention runs through the backend `config.attention_impl` names (midijax.models.attention;
`resolve_attention_impl` picks one for a platform). `remat_policy` rematerializes each
block's activations in the backward pass (`jax.checkpoint`); `scan_layers` stores the
blocks' parameters stacked ([L, ...]) and runs them with one `jax.lax.scan`, so compile
time does not grow with depth; `stack_layers` / `unstack_layers` convert parameters (and
optimizer moments) between the two layouts.

LoRA (Hu et al. 2021): with `lora_rank` r > 0 every attention projection (query, key,
value, out) and MLP matrix (wi, wi_gate, wo) W [in, out] gets an adapter pair next to it,
`<name>_lora_a` [in, r] (random) and `<name>_lora_b` [r, out] (zeros), and computes
x W + (lora_alpha / r) (x A) B. B starts at zero, so a fresh adapter leaves the model's
output unchanged; `merge_lora` folds trained adapters into their kernels
(W' = W + (alpha / r) A B), giving the plain model of the same config with lora_rank 0.

Every parameter carries logical axis names (NNX `out_sharding` metadata) that
`midijax.sharding` maps to mesh axes; parameters are created unplaced
(`eager_sharding=False`) so the model builds without a mesh.
"""
from __future__ import annotations

import collections.abc
import dataclasses
import functools
import math
from typing import Any, Callable, List, Optional, Sequence

from flax import nnx
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from midijax.errors import ConfigError
from midijax.models import attention
from midijax.models import kv_cache
from midijax.models.layers import dense, dropout
from midijax.sharding import with_logical_constraint

# Padded vocab entries get this logit: never sampled, and finite so that
# temperature scaling or `0 * logit` in a loss cannot produce inf / NaN.
MASKED_LOGIT = -1e9
# Vocab is padded to a multiple of this for lane-aligned matmuls and so the vocab
# dim splits evenly over tensor-parallel devices.
VOCAB_MULTIPLE = 128

POSITIONS = ("sinusoidal", "rope", "relative")
NORMS = ("rmsnorm", "layernorm")
ACTIVATIONS = ("gelu", "relu", "swiglu")
DTYPES = (jnp.dtype("float32"), jnp.dtype("bfloat16"), jnp.dtype("float16"))
ATTENTION_IMPLS = attention.ATTENTION_IMPLS
# Activation rematerialization per block (MaxText-like):
#   none       keep every activation the backward pass needs (fastest, most memory);
#   full       keep only each block's input, recompute the block in the backward pass;
#   save_dots  keep the outputs of the block's weight matmuls (q, k, v, attention output,
#              MLP in and out), recompute norms, activations and attention;
#   save_qkv   keep only the q, k, v projections.
REMAT_POLICIES = ("none", "full", "save_dots", "save_qkv")
# Names (jax.ad_checkpoint.checkpoint_name) of the matmul outputs the policies keep.
_QKV_NAMES = ("query_proj", "key_proj", "value_proj")
_DOT_NAMES = _QKV_NAMES + ("attention_out", "mlp_in", "mlp_out")

# A decode cache: one LayerCache per layer (midijax.models.kv_cache).
Cache = List[kv_cache.LayerCache]


def remat_policy(name: str) -> Optional[Callable]:
  """The `jax.checkpoint` policy of a REMAT_POLICIES name; None for "none" (no remat)."""
  policies = jax.checkpoint_policies
  return {"none": None, "full": policies.nothing_saveable,
          "save_dots": policies.save_only_these_names(*_DOT_NAMES),
          "save_qkv": policies.save_only_these_names(*_QKV_NAMES)}[name]


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyperparameters of the decoder-only Transformer.

  Attributes:
    vocab_size: number of real token ids; the model pads to `padded_vocab_size`.
    emb_dim: residual stream width D.
    num_heads: attention heads H.
    num_layers: Transformer blocks L.
    qkv_dim: total query/key/value width; per-head dim is qkv_dim // num_heads.
    mlp_dim: hidden width F of the feed-forward block.
    max_len: longest sequence (tokens) the model is used on; also the largest
      relative distance + 1 for "relative" attention.
    dropout_rate: dropout on embeddings and on each residual branch output.
    attention_dropout_rate: dropout on attention probabilities.
    position: "sinusoidal", "rope" or "relative".
    norm: "rmsnorm" or "layernorm" (pre-norm blocks plus a final norm).
    mlp_activation: "gelu" or "relu" (2 matrices; relu is PyTorch's
      nn.TransformerEncoderLayer default, the course project's) or "swiglu" (3
      matrices, gated).
    tied_embeddings: if True the output projection is the embedding table.
    dtype: compute dtype (float32 on CPU, bfloat16 on TPU/GPU); a name or dtype.
    param_dtype: parameter storage dtype.
    deterministic: default for dropout; True disables it (eval / sampling).
    rope_max_wavelength: longest RoPE wavelength (tokens).
    norm_epsilon: added to the variance in norms.
    attention_block: query block (tokens) of the blocked attention backends: at most
      this many queries per block for cpu_blocked (sequences of 64 tokens or more use at
      most T/4), exactly this many per chunk for chunked. Query block i attends only to
      keys 0..(i+1)*block-1, skipping the masked upper triangle (T=1024, block 128: 56%
      of the T x T work). 0 = one dense T x T block.
    attention_impl: attention backend, one of ATTENTION_IMPLS (see
      midijax.models.attention); "auto" picks per platform.
    remat_policy: one of REMAT_POLICIES, applied per block.
    scan_layers: stack the blocks' parameters and run them with one lax.scan.
    pallas_interpret: run Pallas kernels (splash) in interpret mode (CPU tests; slow).
    lora_rank: rank r of the LoRA adapters on the attention and MLP projections; 0 = no
      adapters. At most the smallest width they adapt (emb_dim, qkv_dim, mlp_dim).
    lora_alpha: the adapters' output is scaled by lora_alpha / lora_rank (the LoRA paper's
      convention: with alpha fixed, another rank needs little learning-rate retuning; 16
      gives scale 2 at rank 8).
    bar_positions: a learned embedding of where in the bar each token leaves the music,
      added to the token embeddings (see `bar_times`): time since the last BAR in the
      encoding's steps, 0..bar_positions-1 (longer times share the last row), plus one
      row for "no bar line yet in this window". The model then knows its metrical
      position without adding up its time shifts. 0 = off; needs an encoding with BAR
      tokens (`Encoding.bar_clock`).
    time_rope_heads: with "rope" positions, how many heads (the first ones) rotate queries
      and keys by the music's time instead of the token's index: the steps of the bar
      clock summed from the window's start (`music_times`). Their scores then depend on
      how far apart two hits are in beats, whatever the tokens between them, so "the same
      place one bar ago" is one fixed offset (192 steps in 4/4 at 48 a quarter). Needs
      an encoding with BAR tokens (its bar clock).
    bar_clock: int per token id, the encoding's `bar_clock()` (steps a token moves time
      on, -1 for BAR); filled from the run's encoding (`runs.model_config_from`), not set
      in configs.
    bar_echo: each token's input also says what the drummer (or the model) played at the
      same place in the previous `bar_echo_bars` bars: for each of those bars and each of
      `bar_echo` 16th-note cells from the token's time in the bar on, which drum classes
      were hit there, how loud, and how far off the cell (`bar_echo_features`), through a
      learned projection added to the token embedding. A groove repeats bar to bar, and
      this makes "play what was played here last bar" one lookup instead of an attention
      pattern the model must learn to aim exactly one bar back. 0 = off; needs a drum
      encoding with BAR tokens and velocities before their hits (groove's drums_beats).
    bar_echo_bars: how many earlier bars the echo shows (with bar_echo > 0).
    echo_classes, echo_velocities, echo_cell: the encoding's `echo_tables()` (drum class
      and loudness per token id, steps of a 16th); filled from the run's encoding like
      `bar_clock`, not set in configs.
  """
  vocab_size: int
  emb_dim: int = 512
  num_heads: int = 8
  num_layers: int = 6
  qkv_dim: int = 512
  mlp_dim: int = 2048
  max_len: int = 2048
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  position: str = "rope"
  norm: str = "rmsnorm"
  mlp_activation: str = "swiglu"
  tied_embeddings: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  deterministic: bool = False
  rope_max_wavelength: float = 10_000.0
  norm_epsilon: float = 1e-6
  attention_block: int = 128
  attention_impl: str = "auto"
  remat_policy: str = "none"
  scan_layers: bool = False
  pallas_interpret: bool = False
  lora_rank: int = 0
  lora_alpha: float = 16.0
  bar_positions: int = 0
  bar_clock: tuple = ()
  time_rope_heads: int = 0
  bar_echo: int = 0
  bar_echo_bars: int = 2
  echo_classes: tuple = ()
  echo_velocities: tuple = ()
  echo_cell: int = 0

  def __post_init__(self):
    # The one place model fields are checked. A TransformerConfig is built from a run's
    # config.model (midijax.runs.model_config_from), so errors name that field.
    def bad(field: str, why: str):
      raise ConfigError(f"config.model.{field}={getattr(self, field)!r} {why}")

    for field, allowed in (("position", POSITIONS), ("norm", NORMS),
                           ("mlp_activation", ACTIVATIONS), ("attention_impl", ATTENTION_IMPLS),
                           ("remat_policy", REMAT_POLICIES)):
      if getattr(self, field) not in allowed:
        bad(field, f"; expected one of {allowed}")
    for field in ("dtype", "param_dtype"):
      try:
        dtype = jnp.dtype(getattr(self, field))
      except TypeError:
        dtype = None
      if dtype not in DTYPES:
        bad(field, "; expected float32 | bfloat16 | float16")
      # Accept dtype names from ConfigDicts ("bfloat16").
      object.__setattr__(self, field, dtype)
    for field in ("emb_dim", "num_heads", "num_layers", "qkv_dim", "mlp_dim", "max_len"):
      if getattr(self, field) <= 0:
        bad(field, "must be positive")
    if self.qkv_dim % self.num_heads:
      bad("num_heads", f"must divide config.model.qkv_dim={self.qkv_dim}")
    if self.position == "sinusoidal" and self.emb_dim % 2:
      bad("emb_dim", "must be even for sinusoidal positions")
    if self.position == "rope" and self.head_dim % 2:
      bad("qkv_dim", f"/ num_heads = {self.head_dim} must be even for rope positions")
    for field in ("dropout_rate", "attention_dropout_rate"):
      if not 0 <= getattr(self, field) < 1:
        bad(field, "must be in [0, 1)")
    if self.attention_block < 0:
      bad("attention_block", "must be >= 0 (0 = dense attention)")
    if (isinstance(self.lora_rank, bool) or not isinstance(self.lora_rank, int)
        or self.lora_rank < 0):
      bad("lora_rank", "must be an integer >= 0 (0 = no LoRA adapters)")
    if self.lora_rank:
      # A rank above a projection's smaller side adds parameters and no expressiveness.
      widths = {"emb_dim": self.emb_dim, "qkv_dim": self.qkv_dim, "mlp_dim": self.mlp_dim}
      narrowest = min(widths, key=widths.get)
      if self.lora_rank > widths[narrowest]:
        bad("lora_rank", f"is above the width it adapts: config.model.{narrowest}="
                         f"{widths[narrowest]} (a rank is at most the smaller side of every "
                         "adapted projection)")
      if not self.lora_alpha > 0:
        bad("lora_alpha", "must be positive (adapter outputs are scaled by "
                          "lora_alpha / lora_rank)")
    if (isinstance(self.bar_positions, bool) or not isinstance(self.bar_positions, int)
        or self.bar_positions < 0):
      bad("bar_positions", "must be an integer >= 0 (0 = no bar-position embedding)")
    if (isinstance(self.time_rope_heads, bool) or not isinstance(self.time_rope_heads, int)
        or not 0 <= self.time_rope_heads <= self.num_heads):
      bad("time_rope_heads", f"must be an integer in [0, config.model.num_heads="
                             f"{self.num_heads}] (0 = every head on token positions)")
    if self.time_rope_heads and self.position != "rope":
      bad("time_rope_heads", f"needs config.model.position='rope', not {self.position!r}")
    for field, lowest, meaning in (("bar_echo", 0, "(0 = no echo of earlier bars)"),
                                   ("bar_echo_bars", 1, "(the earlier bars the echo shows)")):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
        bad(field, f"must be an integer >= {lowest} {meaning}")
    object.__setattr__(self, "bar_clock", tuple(int(x) for x in self.bar_clock))
    object.__setattr__(self, "echo_classes", tuple(int(x) for x in self.echo_classes))
    object.__setattr__(self, "echo_velocities", tuple(float(x) for x in self.echo_velocities))
    if len(self.bar_clock) > self.padded_vocab_size:
      raise ConfigError(f"the encoding's bar clock covers {len(self.bar_clock)} ids but "
                        f"config.model.vocab_size is {self.vocab_size}")

  @property
  def padded_vocab_size(self) -> int:
    return -(-self.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

  @property
  def head_dim(self) -> int:
    return self.qkv_dim // self.num_heads

  @property
  def echo_num_classes(self) -> int:
    return max(self.echo_classes, default=-1) + 1

  @property
  def echo_features(self) -> int:
    """Width of `bar_echo_features`: bars x cells x drum classes x (hit, loudness, offset)."""
    return self.bar_echo_bars * self.bar_echo * self.echo_num_classes * 3 if self.bar_echo else 0

  @property
  def lora_scale(self) -> float:
    """lora_alpha / lora_rank, the factor on the adapters' output (0 without them)."""
    return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

  def replace(self, **changes) -> "TransformerConfig":
    return dataclasses.replace(self, **changes)


def resolve_attention_impl(config: TransformerConfig, backend: str, num_devices: int = 1, *,
                           seq_len: Optional[int] = None, packing: bool = False) -> str:
  """The attention backend `config` runs with on `backend` (see
  `midijax.models.attention.resolve_attention_impl`); raises ConfigError naming the field."""
  return attention.resolve_attention_impl(config, backend, num_devices, seq_len=seq_len,
                                          packing=packing)


# ----------------------------------------------------------------------------- small layers


def _param(rngs: nnx.Rngs, init, shape: Sequence[int], names: Sequence[Optional[str]],
           dtype) -> nnx.Param:
  """A parameter initialized by `init`, annotated with logical axis `names`."""
  return nnx.Param(init(rngs.params(), tuple(shape), dtype),
                   out_sharding=tuple(names), eager_sharding=False)


def _fan_in_init(in_axis, out_axis):
  """Truncated-normal init with variance 1 / fan_in over the given kernel axes."""
  return nnx.initializers.variance_scaling(
      1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis)


# ----------------------------------------------------------------------------- LoRA
# Adapter parameters are named <kernel>_lora_a / <kernel>_lora_b, next to their kernel, so
# config.train.trainable=".*lora_[ab]" selects exactly them.
LORA_A, LORA_B = "_lora_a", "_lora_b"


def is_lora_path(path: str) -> bool:
  """Whether a parameter path ("blocks/0/attention/query_lora_a") is a LoRA adapter."""
  return path.endswith(LORA_A) or path.endswith(LORA_B)


def _add_lora(module: nnx.Module, name: str, rank: int, in_axes: int, rngs: nnx.Rngs) -> None:
  """Gives `module` the adapter pair of its kernel `name` (shape in_shape + out_shape, the
  first `in_axes` axes contracted with the input): `name`_lora_a [*in_shape, r], fan-in
  truncated normal, and `name`_lora_b [r, *out_shape], zeros. Each keeps its kernel's
  logical axis names; the rank axis has none (never sharded)."""
  kernel = getattr(module, name)
  shape, names = kernel.shape, tuple(kernel.get_metadata()["out_sharding"])
  dtype = kernel.get_value().dtype
  a_init = _fan_in_init(tuple(range(in_axes)), in_axes)
  setattr(module, name + LORA_A, _param(rngs, a_init, shape[:in_axes] + (rank,),
                                        names[:in_axes] + (None,), dtype))
  setattr(module, name + LORA_B, _param(rngs, nnx.initializers.zeros, (rank,) + shape[in_axes:],
                                        (None,) + names[in_axes:], dtype))


def _lora_delta(module: nnx.Module, name: str, x: jax.Array, scale: float, dtype) -> jax.Array:
  """(x A) B * scale for `module`'s adapters of kernel `name`: x [..., K] (the kernel's
  input axes flattened) -> [..., N] (its output axes flattened)."""
  a = getattr(module, name + LORA_A)[...]
  b = getattr(module, name + LORA_B)[...]
  rank = b.shape[0]
  # Two thin matmuls instead of forming A B: the frozen kernel's own weight gradient is
  # then never needed (XLA drops it when only the adapters train).
  h = dense(x, a.reshape(-1, rank).astype(dtype)) * jnp.asarray(scale, dtype)
  return dense(h, b.reshape(rank, -1).astype(dtype))


class Norm(nnx.Module):
  """RMSNorm or LayerNorm over the last axis, computed in float32."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.kind = config.norm
    self.epsilon = config.norm_epsilon
    self.dtype = config.dtype
    dim, pdt = config.emb_dim, config.param_dtype
    self.scale = _param(rngs, nnx.initializers.ones, (dim,), ("embed",), pdt)
    if self.kind == "layernorm":
      self.bias = _param(rngs, nnx.initializers.zeros, (dim,), ("embed",), pdt)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[..., D] -> [..., D] in the compute dtype."""
    x = x.astype(jnp.float32)
    if self.kind == "layernorm":
      x = x - jnp.mean(x, axis=-1, keepdims=True)
    x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.epsilon)
    x = x * self.scale[...].astype(jnp.float32)
    if self.kind == "layernorm":
      x = x + self.bias[...].astype(jnp.float32)
    return x.astype(self.dtype)


class Mlp(nnx.Module):
  """Feed-forward block: GELU or ReLU (D->F->D), or SwiGLU (silu(x Wg) * (x Wu) -> D)."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.activation = config.mlp_activation
    self.dtype = config.dtype
    d, f, pdt = config.emb_dim, config.mlp_dim, config.param_dtype
    init = _fan_in_init(0, 1)
    self.wi = _param(rngs, init, (d, f), ("embed", "mlp"), pdt)
    if self.activation == "swiglu":
      self.wi_gate = _param(rngs, init, (d, f), ("embed", "mlp"), pdt)
    self.wo = _param(rngs, init, (f, d), ("mlp", "embed"), pdt)
    self.lora_rank, self.lora_scale = config.lora_rank, config.lora_scale

  def kernel_names(self) -> tuple:
    """The matrices (attribute names) LoRA adapts."""
    return ("wi", "wi_gate", "wo") if self.activation == "swiglu" else ("wi", "wo")

  def add_lora(self, rngs: nnx.Rngs) -> None:
    """Adds the LoRA adapters of every matrix (see `_add_lora`)."""
    for name in self.kernel_names():
      _add_lora(self, name, self.lora_rank, 1, rngs)

  def _matmul(self, x: jax.Array, name: str) -> jax.Array:
    y = dense(x, getattr(self, name)[...].astype(self.dtype))
    if self.lora_rank:
      y = y + _lora_delta(self, name, x, self.lora_scale, self.dtype)
    return y

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, T, D] -> [B, T, D]."""
    h = checkpoint_name(self._matmul(x, "wi"), "mlp_in")
    if self.activation == "swiglu":
      gate = checkpoint_name(self._matmul(x, "wi_gate"), "mlp_in")
      h = jax.nn.silu(gate) * h
    elif self.activation == "relu":
      h = jax.nn.relu(h)
    else:
      h = jax.nn.gelu(h)
    h = with_logical_constraint(h, ("batch", "length", "mlp"))
    return checkpoint_name(self._matmul(h, "wo"), "mlp_out")


def sinusoidal_embedding(positions: jax.Array, dim: int) -> jax.Array:
  """Fixed sin/cos position encodings (Vaswani et al. 2017).

  Args:
    positions: int [B, T] token positions.
    dim: encoding width (even).

  Returns:
    float32 [B, T, dim]: sin in the first half, cos in the second, wavelengths
    geometric from 2*pi to 10000*2*pi.
  """
  half = dim // 2
  inv_freq = jnp.exp(-math.log(10_000.0) * jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def apply_rope(x: jax.Array, positions: jax.Array, max_wavelength: float) -> jax.Array:
  """Rotary position embedding (Su et al. 2021), "rotate half" layout.

  Args:
    x: [B, T, H, Dh] queries or keys.
    positions: int [B, T] (or [1, T]) absolute positions, or [B, T, H]: one per head.
    max_wavelength: longest wavelength (tokens).

  Returns:
    [B, T, H, Dh] in the dtype of `x`; rotation computed in float32.
  """
  half = x.shape[-1] // 2
  timescale = max_wavelength ** (jnp.arange(half, dtype=jnp.float32) * 2 / x.shape[-1])
  per_head = positions if positions.ndim == 3 else positions[:, :, None]
  angles = per_head.astype(jnp.float32)[..., None] / timescale  # [B, T, H or 1, Dh/2]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


# ----------------------------------------------------------------------------- attention


class Attention(nnx.Module):
  """Causal multi-head self-attention with sinusoidal / rope / relative positions."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.config = config
    d, h, dh, pdt = config.emb_dim, config.num_heads, config.head_dim, config.param_dtype
    qkv_init = _fan_in_init(0, (1, 2))
    self.query = _param(rngs, qkv_init, (d, h, dh), ("embed", "heads", "kv"), pdt)
    self.key = _param(rngs, qkv_init, (d, h, dh), ("embed", "heads", "kv"), pdt)
    self.value = _param(rngs, qkv_init, (d, h, dh), ("embed", "heads", "kv"), pdt)
    self.out = _param(rngs, _fan_in_init((0, 1), 2), (h, dh, d), ("heads", "kv", "embed"), pdt)
    if config.position == "relative":
      # Row m holds relative distance max_len - 1 - m (distance 0 is the last row),
      # the order the skewing trick reads them in.
      self.relative_embedding = _param(
          rngs, nnx.initializers.normal(dh ** -0.5), (h, config.max_len, dh),
          ("heads", "relpos", "kv"), pdt)

  def add_lora(self, rngs: nnx.Rngs) -> None:
    """Adds the LoRA adapters of query, key, value and out (see `_add_lora`)."""
    for name in ("query", "key", "value"):
      _add_lora(self, name, self.config.lora_rank, 1, rngs)
    _add_lora(self, "out", self.config.lora_rank, 2, rngs)

  def _project_qkv(self, x: jax.Array, positions: jax.Array):
    """[B, T, D] -> q, k, v each [B, T, H, Dh] (rope applied to q and k)."""
    cfg = self.config
    dtype = cfg.dtype
    # Three matmuls: one fused [D, 3*H*Dh] projection measured slower per training step on
    # XLA:CPU (8% with einsums, 3% through `dense`: the split outputs cost transposes).
    def project(name):  # [D, H, Dh] -> [B, T, H, Dh]
      w = getattr(self, name)[...]
      d, h, dh = w.shape
      y = dense(x, w.reshape(d, h * dh).astype(dtype))
      if cfg.lora_rank:
        y = y + _lora_delta(self, name, x, cfg.lora_scale, dtype)
      return checkpoint_name(y.reshape(x.shape[:-1] + (h, dh)), f"{name}_proj")
    q, k, v = project("query"), project("key"), project("value")
    if self.config.position == "rope":
      q = apply_rope(q, positions, self.config.rope_max_wavelength)
      k = apply_rope(k, positions, self.config.rope_max_wavelength)
    names = ("batch", "length", "heads", "kv")
    return (with_logical_constraint(q, names), with_logical_constraint(k, names),
            with_logical_constraint(v, names))

  def _relative_table(self) -> Optional[jax.Array]:
    """[H, max_len, Dh] relative embeddings, or None without relative attention."""
    return self.relative_embedding[...] if self.config.position == "relative" else None

  def _output(self, encoded: jax.Array) -> jax.Array:
    """[B, T, H, Dh] -> [B, T, D]."""
    cfg = self.config
    h, dh, d = self.out.shape
    w = self.out[...].reshape(h * dh, d).astype(cfg.dtype)
    flat = encoded.reshape(encoded.shape[:-2] + (h * dh,))
    y = dense(flat, w)
    if cfg.lora_rank:
      y = y + _lora_delta(self, "out", flat, cfg.lora_scale, cfg.dtype)
    return checkpoint_name(y, "attention_out")

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: Optional[jax.Array],
               dropout_rng: Optional[jax.Array] = None, return_kv: bool = False):
    """Full-sequence causal attention (training, scoring, prefill).

    Args:
      x: [B, T, D] normalized input.
      positions: int [B, T] (or [1, T]) positions, for rope.
      segment_ids: int [B, T] packing ids, or None for one piece per row.
      dropout_rng: key for attention dropout, None for none.
      return_kv: also return the keys and values (for a decode cache).

    Returns:
      [B, T, D]; with return_kv, ([B, T, D], (k, v) each [B, T, H, Dh]).
    """
    cfg = self.config
    q, k, v = self._project_qkv(x, positions)
    encoded = attention.attend(
        q, k, v, impl=cfg.attention_impl, segment_ids=segment_ids,
        relative_table=self._relative_table(), dropout_rate=cfg.attention_dropout_rate,
        dropout_rng=dropout_rng, block=cfg.attention_block, interpret=cfg.pallas_interpret)
    out = self._output(encoded)
    return (out, (k, v)) if return_kv else out

  def decode_step(self, x: jax.Array, cache: kv_cache.LayerCache, pos: jax.Array,
                  rope_positions: Optional[jax.Array] = None):
    """One new token per row at position `pos`, attending to the cache and itself.

    Args:
      x: [B, 1, D] normalized input of the new token.
      cache: this layer's cache holding positions < pos.
      pos: int32 scalar.
      rope_positions: int [B, 1, H] rotary positions of the new token per head (with
        time_rope_heads); default `pos`.

    Returns:
      ([B, 1, D] output, the cache with slot `pos` written).
    """
    cfg = self.config
    if rope_positions is None:
      rope_positions = jnp.reshape(pos, (1, 1))
    q, k, v = self._project_qkv(x, rope_positions)  # [B, 1, H, Dh]
    out, cache = attention.decode_attention(
        q[:, 0], k[:, 0], v[:, 0], cache, pos, relative_table=self._relative_table(),
        use_kernel=attention.decode_uses_cpu_kernel(cfg.attention_impl, cfg.position,
                                                    cfg.dtype))
    return self._output(out[:, None].astype(cfg.dtype)), cache


# ----------------------------------------------------------------------------- block


class Block(nnx.Module):
  """Pre-norm Transformer block: x + Attn(Norm(x)), then x + Mlp(Norm(x))."""

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.dropout_rate = config.dropout_rate
    self.attention_norm = Norm(config, rngs=rngs)
    self.attention = Attention(config, rngs=rngs)
    self.mlp_norm = Norm(config, rngs=rngs)
    self.mlp = Mlp(config, rngs=rngs)

  def add_lora(self, rngs: nnx.Rngs) -> None:
    """Adds LoRA adapters to the attention and MLP projections (config.lora_rank > 0)."""
    self.attention.add_lora(rngs)
    self.mlp.add_lora(rngs)

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: Optional[jax.Array],
               dropout_rng: Optional[jax.Array] = None) -> jax.Array:
    """[B, T, D] -> [B, T, D]; dropout only if `dropout_rng` is given."""
    attn_rng = attn_out_rng = mlp_out_rng = None
    if dropout_rng is not None:
      attn_rng, attn_out_rng, mlp_out_rng = jax.random.split(dropout_rng, 3)
    h = self.attention(self.attention_norm(x), positions, segment_ids, attn_rng)
    if dropout_rng is not None:
      h = dropout(h, self.dropout_rate, attn_out_rng)
    x = x + h
    h = self.mlp(self.mlp_norm(x))
    if dropout_rng is not None:
      h = dropout(h, self.dropout_rate, mlp_out_rng)
    return with_logical_constraint(x + h, ("batch", "length", "embed"))

  def prefill(self, x: jax.Array, positions: jax.Array):
    """Like __call__ without dropout or packing; also returns (k, v) [B, T, H, Dh]."""
    h, kv = self.attention(self.attention_norm(x), positions, None, None, return_kv=True)
    x = x + h
    return x + self.mlp(self.mlp_norm(x)), kv

  def decode_step(self, x: jax.Array, cache: kv_cache.LayerCache, pos: jax.Array,
                  rope_positions: Optional[jax.Array] = None):
    """[B, 1, D] at position `pos` -> ([B, 1, D], updated cache)."""
    h, cache = self.attention.decode_step(self.attention_norm(x), cache, pos, rope_positions)
    x = x + h
    return x + self.mlp(self.mlp_norm(x)), cache


def _apply_block(graphdef, state, x, positions, segment_ids, rng):
  """A block (split into graphdef + state, for jax.checkpoint / lax.scan) applied to x."""
  return nnx.merge(graphdef, state)(x, positions, segment_ids, rng)


def _stacked_block(blocks: Sequence[Block]) -> Block:
  """One Block whose parameters are the given blocks' stacked on a new leading axis
  (logical name None: the layer axis is never sharded)."""
  graphdef, first = nnx.split(blocks[0])
  state = jax.tree.map(lambda *xs: jnp.stack(xs), first, *[nnx.state(b) for b in blocks[1:]])
  for var in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
    names = var.get_metadata().get("out_sharding")
    if names:
      var.set_metadata(out_sharding=(None,) + tuple(names))
  return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------- model


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
  """Positions that restart at 0 wherever the segment id changes.

  Args:
    segment_ids: int [B, T]; equal ids in a run belong to one packed piece.

  Returns:
    int32 [B, T] index of each token within its run.
  """
  index = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
  is_start = jnp.concatenate(
      [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
      axis=1)
  start = jax.lax.cummax(jnp.where(is_start, index, 0), axis=1)
  return index - start


class Transformer(nnx.Module):
  """Decoder-only Transformer language model over (padded) token ids.

  Training: `logits = model(tokens, segment_ids=..., positions=..., dropout_rng=key)`.
  Decoding: `logits, cache = model.prefill(prompt, length, kind)` (kind "float" or
  "int8"), then `logits, cache = model.decode_step(token, cache, pos)` once per new
  token; `LayerCache.grow` lengthens a cache. All are pure and jit / while_loop safe.
  Dropout is off when `deterministic` (the attribute, set from the config and
  flipped by `model.eval()` / `model.train()`, or the call argument).
  """

  def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.deterministic = config.deterministic
    self.embedding = _param(rngs, nnx.initializers.normal(1.0),
                            (config.padded_vocab_size, config.emb_dim), ("vocab", "embed"),
                            config.param_dtype)
    # Scanned or not, the blocks draw the same initial values from `rngs`.
    blocks = [Block(config, rngs=rngs) for _ in range(config.num_layers)]
    final_norm = Norm(config, rngs=rngs)
    output = None
    if not config.tied_embeddings:
      output = _param(rngs, _fan_in_init(0, 1),
                      (config.emb_dim, config.padded_vocab_size), ("embed", "vocab"),
                      config.param_dtype)
    if config.lora_rank:
      # Adapters draw from their own stream, split off after every other parameter: the
      # base parameters equal those of the same config and seed without LoRA.
      lora_rngs = nnx.Rngs(params=rngs.params())
      for block in blocks:
        block.add_lora(lora_rngs)
    self.blocks = _stacked_block(blocks) if config.scan_layers else nnx.List(blocks)
    self.final_norm = final_norm
    if output is not None:
      self.output = output
    if config.time_rope_heads and -1 not in config.bar_clock:
      raise ConfigError(f"config.model.time_rope_heads={config.time_rope_heads} needs an "
                        "encoding with BAR tokens (its clock counts the music's time), e.g. "
                        "groove's drums_beats")
    if config.bar_positions:
      if -1 not in config.bar_clock:
        raise ConfigError(f"config.model.bar_positions={config.bar_positions} needs an "
                          "encoding with BAR tokens (e.g. groove's drums_beats built with "
                          "`midijax build-data`); the run's encoding has none, or none was "
                          "found")
      # Drawn after every other parameter: those equal the same config's without it.
      self.bar_embedding = _param(rngs, nnx.initializers.normal(1.0),
                                  (config.bar_positions + 1, config.emb_dim), (None, "embed"),
                                  config.param_dtype)
    if config.bar_echo:
      if (-1 not in config.bar_clock or not config.echo_num_classes or config.echo_cell < 1
          or len(config.echo_velocities) != len(config.echo_classes)):
        raise ConfigError(f"config.model.bar_echo={config.bar_echo} needs a drum encoding "
                          "with BAR tokens and each hit's velocity before it (groove's "
                          "drums_beats); the run's encoding is not one, or none was found")
      # Drawn last, as the bar embedding: the other parameters equal those without it.
      self.echo_projection = _param(rngs, _fan_in_init(0, 1),
                                    (config.echo_features, config.emb_dim), (None, "embed"),
                                    config.param_dtype)

  # --------------------------------------------------------------------------- bar clock
  def _clock(self) -> jax.Array:
    """int32 [padded vocab]: `bar_clock` padded with ids that take no time."""
    cfg = self.config
    clock = list(cfg.bar_clock) + [0] * (cfg.padded_vocab_size - len(cfg.bar_clock))
    return jnp.asarray(clock, jnp.int32)

  def bar_times(self, tokens: jax.Array, segment_ids: Optional[jax.Array] = None
                ) -> jax.Array:
    """Steps since the last BAR after each token, int32 [B, T]; -1 before the first BAR of
    the row (or of the token's packed segment): the position is unknown there.

    A BAR token is at 0 (bar lines take no time); a time shift adds its steps."""
    steps = jnp.take(self._clock(), tokens)
    is_bar = steps < 0
    time = jnp.cumsum(jnp.maximum(steps, 0), axis=1)
    index = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    restart = is_bar
    if segment_ids is not None:
      restart = restart | (segment_ids != jnp.pad(segment_ids, ((0, 0), (1, 0)),
                                                  constant_values=-1)[:, :-1])
    last = jax.lax.cummax(jnp.where(restart, index, -1), axis=1)
    at = jnp.maximum(last, 0)
    known = (last >= 0) & jnp.take_along_axis(is_bar, at, axis=1)
    return jnp.where(known, time - jnp.take_along_axis(time, at, axis=1), -1)

  def advance_bar_time(self, bar_time: jax.Array, tokens: jax.Array) -> jax.Array:
    """`bar_times` one token on: int32 [B] time since the last BAR before `tokens` [B]
    (-1 unknown) -> after them."""
    steps = jnp.take(self._clock(), tokens)
    return jnp.where(steps < 0, 0, jnp.where(bar_time >= 0, bar_time + steps, -1))

  def music_times(self, tokens: jax.Array, segment_ids: Optional[jax.Array] = None
                  ) -> jax.Array:
    """Steps of the bar clock from the start of the row (or of the token's packed segment)
    to after each token, int32 [B, T]: time-rope heads' positions."""
    steps = jnp.maximum(jnp.take(self._clock(), tokens), 0)
    time = jnp.cumsum(steps, axis=1)
    if segment_ids is None:
      return time
    index = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    starts = segment_ids != jnp.pad(segment_ids, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
    first = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    before = jnp.take_along_axis(time - steps, first, axis=1)
    return time - before

  def advance_music_time(self, music_time: jax.Array, tokens: jax.Array) -> jax.Array:
    """`music_times` one token on: int32 [B] after the tokens before `tokens` [B] -> after
    them."""
    return music_time + jnp.maximum(jnp.take(self._clock(), tokens), 0)

  # Echo sort keys are bar index * _ECHO_BAR + time in the bar, in int32: times are
  # clipped to half of it, so a window may hold up to 2**15 bars.
  _ECHO_BAR = 1 << 16

  def _echo_keys(self, tokens: jax.Array, segment_ids: Optional[jax.Array]):
    """What the echo reads from int [B, T] tokens: (bar index [B, T], counting bar lines
    and segment starts; time since the bar [B, T], -1 unknown; the bar index where each
    token's segment starts [B, T]; the sort key [B, T]; prefix sums float32
    [B, T + 1, C, 3] of one-hot drum class x (1, loudness in force, time in the bar) over
    the hits whose place in the bar is known; the loudness in force [B, T])."""
    cfg = self.config
    pad = lambda table, fill: list(table) + [fill] * (cfg.padded_vocab_size - len(table))
    classes = jnp.take(jnp.asarray(pad(cfg.echo_classes, -1), jnp.int32), tokens)
    loudness = jnp.take(jnp.asarray(pad(cfg.echo_velocities, -1.0), jnp.float32), tokens)
    index = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    segments = jnp.zeros_like(tokens) if segment_ids is None else segment_ids
    starts = segments != jnp.pad(segments, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
    is_bar = jnp.take(self._clock(), tokens) < 0
    bar_index = jnp.cumsum((is_bar | starts).astype(jnp.int32), axis=1)
    first_bar = jax.lax.cummax(jnp.where(starts, bar_index, 0), axis=1)
    bar_time = jnp.minimum(self.bar_times(tokens, segment_ids), self._ECHO_BAR // 2)
    # Within a segment the tokens are in time order, bar by bar, so the key never falls:
    # the hits of one bar in a span of times are one run of tokens, found by binary search.
    key = bar_index * self._ECHO_BAR + bar_time
    # The velocity in force at each token: the last VELOCITY token of its segment so far
    # (0 when none is: the echo then says "hit" with no loudness).
    segment_start = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    last = jax.lax.cummax(jnp.where(loudness >= 0, index, -1), axis=1)
    in_force = jnp.where(last >= segment_start,
                         jnp.take_along_axis(loudness, jnp.maximum(last, 0), axis=1), 0.0)
    hit = (classes >= 0) & (bar_time >= 0)
    onehot = jax.nn.one_hot(classes, cfg.echo_num_classes, dtype=jnp.float32) * hit[..., None]
    values = onehot[..., None] * jnp.stack(
        [jnp.ones_like(in_force), in_force, bar_time.astype(jnp.float32)], axis=-1)[:, :, None]
    # Exact: counts, loudness in 32nds and integer times sum without rounding in float32.
    prefix = jnp.pad(jnp.cumsum(values, axis=1), ((0, 0), (1, 0), (0, 0), (0, 0)))
    return bar_index, bar_time, first_bar, key, prefix, in_force

  def _echo(self, query, keys) -> jax.Array:
    """The echo features float32 [B, Q, F] of queries (bar index, bar time, segment's
    first bar: int [B, Q] each) over keys (`_echo_keys` of [B, N] tokens)."""
    cfg = self.config
    q_bar, q_time, q_first = query
    key, prefix = keys[3], keys[4]
    cell, cells, bars = cfg.echo_cell, cfg.bar_echo, cfg.bar_echo_bars
    # Cell a of lag l holds the hits of bar (this bar - l) at times in [t - cell/2 + a cell,
    # t + cell/2 + a cell) for this token's time t: a hit played a little early or late
    # still lands in the cell of the place it was aimed at.
    lag = jnp.arange(1, bars + 1, dtype=jnp.int32)
    edge = q_time[..., None, None] - cell // 2 + cell * jnp.arange(cells + 1, dtype=jnp.int32)
    bounds = (q_bar[..., None, None] - lag[:, None]) * self._ECHO_BAR + edge  # [B,Q,L,A+1]
    b, q = q_bar.shape
    found = jax.vmap(lambda k, v: jnp.searchsorted(k, v, side="left"))(
        key, bounds.reshape(b, -1)).reshape(bounds.shape)
    gather = lambda at: jnp.take_along_axis(prefix, at.reshape(b, -1)[:, :, None, None],
                                            axis=1).reshape(*at.shape, *prefix.shape[2:])
    sums = gather(found[..., 1:]) - gather(found[..., :-1])  # [B, Q, L, A, C, 3]
    # Only bars of the query's own segment, and only where its place in the bar is known.
    usable = ((q_time >= 0)[..., None] & (q_bar[..., None] - lag >= q_first[..., None]))
    sums = sums * usable[..., None, None, None]
    count = sums[..., 0]
    safe = jnp.maximum(count, 1.0)
    # Offsets in cells ([-0.5, 0.5)): the hits' mean time from the cell's aim, this
    # token's time plus a cells.
    aim = (q_time[..., None, None] + cell * jnp.arange(cells, dtype=jnp.int32)
           ).astype(jnp.float32)[..., None]
    offset = jnp.where(count > 0, (sums[..., 2] / safe - aim) / cell, 0.0)
    features = jnp.stack([jnp.minimum(count, 1.0), sums[..., 1] / safe, offset], axis=-1)
    return features.reshape(b, q, -1)

  def bar_echo_features(self, tokens: jax.Array, segment_ids: Optional[jax.Array] = None
                        ) -> jax.Array:
    """What was hit at the same place in the previous bars, after each token: float32
    [B, T, config.echo_features] (`TransformerConfig.bar_echo`). Cells, bars and drum
    classes are laid out [bars, cells, classes, (hit, loudness, offset)]: hit 1 if the
    class was hit in that cell; its mean loudness (0..1); its mean time from the cell's
    centre, in cells. Zero where this token's place in the bar is unknown (before the
    window's first BAR) and for cells no hit fell in."""
    keys = self._echo_keys(tokens, segment_ids)
    return self._echo(keys[:3], keys)

  def bar_echo_at(self, tokens: jax.Array, index: jax.Array, start: jax.Array = 0
                  ) -> jax.Array:
    """`bar_echo_features` after the token at `index` (int scalar) of `tokens` [B, N] alone,
    float32 [B, F]. Tokens before `start` are left out, as if the window began there (the
    sampler's slid window; its prefix takes no time and holds no hits)."""
    return self.echo_of(self.echo_state(tokens, index, start))

  def echo_state(self, tokens: jax.Array, index: jax.Array, start: jax.Array = 0) -> dict:
    """The sampler's echo state after the token at `index` of `tokens` [B, N] (tokens
    before `start` left out, those after `index` not read): the sort keys and prefix sums
    of `_echo_keys` over the buffer (keys after `index` at the int32 maximum, so the
    binary search never reaches them) and the last token's bar index, bar time and
    loudness in force. `advance_echo` carries it on one token at a time."""
    position = jnp.arange(tokens.shape[1], dtype=jnp.int32)
    after = position > index
    bar_index, bar_time, first_bar, key, prefix, in_force = self._echo_keys(
        jnp.where((position < start) | after, 0, tokens), None)
    at = lambda a: jax.lax.dynamic_index_in_dim(a, index, axis=1, keepdims=False)
    return {"key": jnp.where(after, jnp.iinfo(jnp.int32).max, key), "prefix": prefix,
            "bar": at(bar_index), "time": at(bar_time), "first": at(first_bar),
            "loudness": at(in_force)}

  def advance_echo(self, state: dict, tokens: jax.Array, index: jax.Array) -> dict:
    """`echo_state` one token on: `tokens` [B] written at `index` (the one after the
    state's last token), in O(1) per row where `echo_state` reads the whole buffer."""
    cfg = self.config
    steps = jnp.take(self._clock(), tokens)
    is_bar = steps < 0
    bar = state["bar"] + is_bar.astype(jnp.int32)
    time = jnp.where(is_bar, 0, jnp.where(state["time"] >= 0, jnp.minimum(
        state["time"] + steps, self._ECHO_BAR // 2), -1))
    pad = lambda table, fill: list(table) + [fill] * (cfg.padded_vocab_size - len(table))
    classes = jnp.take(jnp.asarray(pad(cfg.echo_classes, -1), jnp.int32), tokens)
    loud = jnp.take(jnp.asarray(pad(cfg.echo_velocities, -1.0), jnp.float32), tokens)
    loudness = jnp.where(loud >= 0, loud, state["loudness"])
    hit = (classes >= 0) & (time >= 0)
    onehot = jax.nn.one_hot(classes, cfg.echo_num_classes, dtype=jnp.float32) * hit[:, None]
    value = onehot[:, :, None] * jnp.stack(
        [jnp.ones_like(loudness), loudness, time.astype(jnp.float32)], axis=-1)[:, None]
    previous = jax.lax.dynamic_index_in_dim(state["prefix"], index, axis=1, keepdims=False)
    return {**state, "bar": bar, "time": time, "loudness": loudness,
            "key": jax.lax.dynamic_update_index_in_dim(
                state["key"], bar * self._ECHO_BAR + time, index, axis=1),
            "prefix": jax.lax.dynamic_update_index_in_dim(
                state["prefix"], previous + value, index + 1, axis=1)}

  def echo_of(self, state: dict) -> jax.Array:
    """The echo features float32 [B, F] after the last token of an `echo_state`."""
    query = tuple(state[k][:, None] for k in ("bar", "time", "first"))
    return self._echo(query, (None, None, None, state["key"], state["prefix"]))[:, 0]

  def _rope_positions(self, positions: jax.Array, music_time: Optional[jax.Array]
                      ) -> jax.Array:
    """Token positions [B or 1, T] -> per-head rotary positions [B, T, H] when some heads
    run on the music's time (`music_time` [B, T]); unchanged otherwise."""
    n = self.config.time_rope_heads
    if not n:
      return positions
    on_time = jnp.arange(self.config.num_heads) < n
    return jnp.where(on_time, music_time[:, :, None], positions[:, :, None])

  def _bar_rows(self, bar_time: jax.Array) -> jax.Array:
    """Rows of `bar_embedding` for times since the bar (-1 -> row 0)."""
    return jnp.where(bar_time >= 0, 1 + jnp.minimum(bar_time, self.config.bar_positions - 1),
                     0)

  def _embed(self, tokens: jax.Array, positions: jax.Array,
             bar_time: Optional[jax.Array] = None, echo: Optional[jax.Array] = None
             ) -> jax.Array:
    """int [B, T] -> [B, T, D] token (+ sinusoidal position, + bar position, + echo)
    embeddings. bar_time: int [B, T] (`bar_times`) when config.bar_positions is set;
    echo: float [B, T, F] (`bar_echo_features`) when config.bar_echo is."""
    # Gather from a replicated copy of the table so each batch shard looks up its
    # own rows: a gather from a (vocab, embed)-sharded table makes XLA replicate
    # the activations instead. Music vocabularies make the table small.
    table = with_logical_constraint(self.embedding[...], (None, None))
    x = jnp.take(table, tokens, axis=0).astype(self.config.dtype)
    if self.config.position == "sinusoidal":
      x = x + sinusoidal_embedding(positions, self.config.emb_dim).astype(self.config.dtype)
    if self.config.bar_positions:
      bars = with_logical_constraint(self.bar_embedding[...], (None, None))
      x = x + jnp.take(bars, self._bar_rows(bar_time), axis=0).astype(self.config.dtype)
    if self.config.bar_echo:
      x = x + dense(echo.astype(self.config.dtype),
                    self.echo_projection[...].astype(self.config.dtype), self.config.dtype)
    return with_logical_constraint(x, ("batch", "length", "embed"))

  def _logits(self, x: jax.Array) -> jax.Array:
    """[B, T, D] final hidden -> float32 [B, T, V] with padded ids masked."""
    cfg = self.config
    x = self.final_norm(x)
    if cfg.tied_embeddings:
      # Embedding rows have unit variance; 1/sqrt(D) keeps the logits O(1).
      logits = dense(x, self.embedding[...].T.astype(cfg.dtype),
                     jnp.float32) / math.sqrt(cfg.emb_dim)
    else:
      logits = dense(x, self.output[...].astype(cfg.dtype), jnp.float32)
    if cfg.padded_vocab_size > cfg.vocab_size:
      is_real = jnp.arange(cfg.padded_vocab_size) < cfg.vocab_size
      logits = jnp.where(is_real, logits, MASKED_LOGIT)
    return with_logical_constraint(logits, ("batch", "length", "vocab"))

  def _layers(self) -> List[Block]:
    """The blocks one by one (for a scanned model, views of one layer's parameters)."""
    if not self.config.scan_layers:
      return list(self.blocks)
    graphdef, state = nnx.split(self.blocks)
    return [nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], state))
            for i in range(self.config.num_layers)]

  def _run_blocks(self, x, positions, segment_ids, rngs):
    """All blocks over x [B, T, D]: a Python loop or one lax.scan, each block
    rematerialized as `remat_policy` says. rngs: [L] keys or None."""
    cfg = self.config
    policy = remat_policy(cfg.remat_policy)
    if cfg.scan_layers:
      graphdef, state = nnx.split(self.blocks)

      def body(x, layer):
        state, rng = layer
        return _apply_block(graphdef, state, x, positions, segment_ids, rng), None

      if policy is not None:
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
      return jax.lax.scan(body, x, (state, rngs))[0]
    for i, block in enumerate(self.blocks):
      rng = None if rngs is None else rngs[i]
      if policy is None:
        x = block(x, positions, segment_ids, rng)
      else:
        graphdef, state = nnx.split(block)
        x = jax.checkpoint(functools.partial(_apply_block, graphdef), policy=policy)(
            state, x, positions, segment_ids, rng)
    return x

  def __call__(self, tokens: jax.Array, *, positions: Optional[jax.Array] = None,
               segment_ids: Optional[jax.Array] = None, deterministic: Optional[bool] = None,
               dropout_rng: Optional[jax.Array] = None) -> jax.Array:
    """Next-token logits for every position (teacher forcing).

    Args:
      tokens: int [B, T] input ids (< vocab_size).
      positions: int [B, T] position of each token in its piece; defaults to
        0..T-1, or to restarting at each segment boundary if `segment_ids` is given.
        Used by "sinusoidal" and "rope"; "relative" needs none.
      segment_ids: int [B, T] packing ids; tokens attend only within their segment.
      deterministic: overrides `self.deterministic` (True = no dropout).
      dropout_rng: PRNG key, required when dropout is active.

    Returns:
      float32 [B, T, padded_vocab_size] logits; ids >= vocab_size are MASKED_LOGIT.
    """
    cfg = self.config
    deterministic = self.deterministic if deterministic is None else deterministic
    use_dropout = not deterministic and (cfg.dropout_rate > 0 or cfg.attention_dropout_rate > 0)
    if use_dropout and dropout_rng is None:
      raise ValueError("dropout is active (deterministic=False, rate > 0) but no dropout_rng "
                       "was given; pass dropout_rng=key or deterministic=True.")
    if positions is None:
      positions = (positions_from_segments(segment_ids) if segment_ids is not None
                   else jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :])
    rngs = None
    bar_time = self.bar_times(tokens, segment_ids) if cfg.bar_positions else None
    echo = self.bar_echo_features(tokens, segment_ids) if cfg.bar_echo else None
    x = self._embed(tokens, positions, bar_time, echo)
    if use_dropout:
      keys = jax.random.split(dropout_rng, cfg.num_layers + 1)
      rngs = keys[:-1]
      x = dropout(x, cfg.dropout_rate, keys[-1])
    if cfg.time_rope_heads:
      positions = self._rope_positions(positions, self.music_times(tokens, segment_ids))
    x = self._run_blocks(x, positions, segment_ids, rngs)
    return self._logits(x)

  # --------------------------------------------------------------------------- decoding
  def decode_attention_impl(self, mesh=None) -> str:
    """How decode steps (traced now, or under `mesh`) attend over the cache: "cpu_kernel"
    (the C++ decode kernels: they read only the filled slots) or "xla"."""
    cfg = self.config
    uses_kernel = attention.decode_uses_cpu_kernel(cfg.attention_impl, cfg.position, cfg.dtype,
                                                   mesh)
    return "cpu_kernel" if uses_kernel else "xla"

  def _keys_transposed(self, kind: str) -> bool:
    return (kind == "float" and self.config.head_dim >= kv_cache.KEYS_TRANSPOSED_FROM_HEAD_DIM
            and self.decode_attention_impl() != "cpu_kernel")

  def _check_cache_length(self, length: int) -> None:
    cfg = self.config
    if cfg.position == "relative" and length > cfg.max_len:
      raise ValueError(f"cache length {length} exceeds config.max_len={cfg.max_len}, "
                       "the longest relative distance the model knows.")

  def init_cache(self, batch_size: int, length: Optional[int] = None,
                 kind: str = "float") -> Cache:
    """An empty key/value cache.

    Args:
      batch_size: number of sequences decoded together.
      length: cache length in tokens (prompt + generated); defaults to config.max_len,
        and may not exceed it for "relative" attention.
      kind: "float" (the compute dtype) or "int8" (see midijax.models.kv_cache).

    Returns:
      One LayerCache per layer, every slot empty.
    """
    cfg = self.config
    length = cfg.max_len if length is None else length
    self._check_cache_length(length)
    empty = jnp.zeros((batch_size, 0, cfg.num_heads, cfg.head_dim), cfg.dtype)
    return [kv_cache.new_cache(empty, empty, length, kind, self._keys_transposed(kind))
            for _ in range(cfg.num_layers)]

  def prefill(self, tokens: jax.Array, length: Optional[int] = None,
              kind: str = "float") -> tuple[jax.Array, Cache]:
    """Runs a prompt at positions 0..T-1 in one pass and returns its cache.

    The same attention backend as training (causal self-attention over the prompt);
    the keys and values it computes fill the cache.

    Args:
      tokens: int [B, T] prompt ids.
      length: cache length L >= T (default T).
      kind: "float" or "int8" cache.

    Returns:
      (float32 [B, T, padded_vocab_size] logits, the cache: positions < T filled).
    """
    t = tokens.shape[1]
    length = t if length is None else length
    self._check_cache_length(length)
    positions = jnp.arange(t, dtype=jnp.int32)[None, :]
    x = self._embed(tokens, positions,
                    self.bar_times(tokens) if self.config.bar_positions else None,
                    self.bar_echo_features(tokens) if self.config.bar_echo else None)
    if self.config.time_rope_heads:
      positions = self._rope_positions(positions, self.music_times(tokens))
    cache = []
    for block in self._layers():
      x, (k, v) = block.prefill(x, positions)
      cache.append(kv_cache.new_cache(k, v, length, kind, self._keys_transposed(kind)))
    return self._logits(x), cache

  def decode_step(self, tokens: jax.Array, cache: Cache, pos: jax.Array,
                  bar_time: Optional[jax.Array] = None,
                  music_time: Optional[jax.Array] = None,
                  echo: Optional[jax.Array] = None) -> tuple[jax.Array, Cache]:
    """Logits after one more token per row.

    Args:
      tokens: int [B], the tokens at position `pos`.
      cache: from `prefill` / `init_cache` / a previous step, holding positions < pos.
      pos: int32 scalar < the cache's length.
      bar_time: int [B], steps since the last BAR after `tokens` (`bar_times` of the
        window, carried on with `advance_bar_time`); required with config.bar_positions.
      music_time: int [B], `music_times` of the window after `tokens` (carried on with
        `advance_music_time`); required with config.time_rope_heads.
      echo: float [B, F], `bar_echo_at` the token just fed; required with
        config.bar_echo.

    Returns:
      (float32 [B, padded_vocab_size] logits for position pos + 1, the updated cache).
    """
    pos = jnp.asarray(pos, jnp.int32)
    if self.config.bar_positions and bar_time is None:
      raise ValueError("this model embeds bar positions (config.bar_positions): pass "
                       "decode_step(..., bar_time=...)")
    if self.config.time_rope_heads and music_time is None:
      raise ValueError("this model rotates some heads by the music's time "
                       "(config.time_rope_heads): pass decode_step(..., music_time=...)")
    if self.config.bar_echo and echo is None:
      raise ValueError("this model echoes earlier bars (config.bar_echo): pass "
                       "decode_step(..., echo=model.bar_echo_at(tokens so far, index))")
    x = self._embed(tokens[:, None], jnp.reshape(pos, (1, 1)),
                    None if bar_time is None else jnp.asarray(bar_time)[:, None],
                    None if echo is None else jnp.asarray(echo)[:, None])
    rope = None
    if self.config.time_rope_heads:
      rope = self._rope_positions(jnp.reshape(pos, (1, 1)),
                                  jnp.asarray(music_time, jnp.int32)[:, None])
    new_cache = []
    for block, layer_cache in zip(self._layers(), cache):
      x, layer_cache = block.decode_step(x, layer_cache, pos, rope)
      new_cache.append(layer_cache)
    return self._logits(x)[:, 0], new_cache


# ----------------------------------------------------------------------------- checkpoints


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _layer_keys(blocks) -> Optional[list]:
  """The per-layer keys (0, 1, ... or "0", "1", ...) of an unscanned `blocks` node."""
  if not isinstance(blocks, collections.abc.Mapping) or not blocks:
    return None
  keys = list(blocks.keys())
  if all(isinstance(k, int) or (isinstance(k, str) and k.isdigit()) for k in keys):
    return sorted(keys, key=int)
  return None


def _stack_leaves(*leaves):
  first = leaves[0]
  if isinstance(first, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(leaves),) + first.shape, first.dtype)
  return jnp.stack(leaves)


def _stack_blocks(blocks):
  keys = _layer_keys(blocks)
  if keys is None:
    return blocks  # already scanned
  layers = [blocks[k] for k in keys]
  stacked = jax.tree.map(_stack_leaves, *layers)
  for var in jax.tree.leaves(stacked, is_leaf=_is_variable):
    if _is_variable(var) and var.get_metadata().get("out_sharding"):
      var.set_metadata(out_sharding=(None,) + tuple(var.get_metadata()["out_sharding"]))
  return stacked


def _unstack_blocks(blocks):
  if _layer_keys(blocks) is not None:
    return blocks  # already unscanned
  first = jax.tree.leaves(blocks)[0]
  num_layers = first.shape[0]

  def index(leaf, i):
    if isinstance(leaf, jax.ShapeDtypeStruct):
      return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype)
    return leaf[i]

  layers = {}
  for i in range(num_layers):
    layer = jax.tree.map(lambda leaf, i=i: index(leaf, i), blocks)
    for var in jax.tree.leaves(layer, is_leaf=_is_variable):
      names = var.get_metadata().get("out_sharding") if _is_variable(var) else None
      if names and names[0] is None:
        var.set_metadata(out_sharding=tuple(names[1:]))
    layers[i] = layer
  return type(blocks)(layers) if isinstance(blocks, nnx.State) else layers


def _convert_blocks(tree, convert):
  def has_blocks(x):
    return isinstance(x, collections.abc.Mapping) and "blocks" in x

  def apply(x):
    if not has_blocks(x):
      return x
    out = {k: (convert(v) if k == "blocks" else v) for k, v in x.items()}
    return type(x)(out) if isinstance(x, nnx.State) else out

  return jax.tree.map(apply, tree, is_leaf=has_blocks)


def stack_layers(tree: Any) -> Any:
  """Parameters of an unscanned model (`scan_layers=False`) as a scanned model keeps them.

  Works on any tree holding the model's parameter tree (an `nnx.State`, Orbax's restored
  dicts with "0", "1", ... layer keys, an optimizer state's moments): every "blocks"
  node with one entry per layer becomes one node whose leaves are stacked [L, ...].
  Nodes already scanned are left as they are.
  """
  return _convert_blocks(tree, _stack_blocks)


def unstack_layers(tree: Any) -> Any:
  """The inverse of `stack_layers`: stacked [L, ...] "blocks" leaves become one entry
  per layer (0, 1, ...), as an unscanned model (`scan_layers=False`) keeps them."""
  return _convert_blocks(tree, _unstack_blocks)


def params_scanned(tree: Any) -> Optional[bool]:
  """Whether a parameter tree (or any tree holding one) has scanned layers; None if it has
  no "blocks" node. Use it to say which `model.scan_layers` a checkpoint was saved with."""
  found = []

  def has_blocks(x):
    return isinstance(x, collections.abc.Mapping) and "blocks" in x

  def visit(x):
    if has_blocks(x):
      found.append(_layer_keys(x["blocks"]) is None)
    return x

  jax.tree.map(visit, tree, is_leaf=has_blocks)
  return found[0] if found else None


def _merged_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """kernel + scale * A B, contracting the rank axis; a leading layer axis (scanned
  layers: kernel [L, *in, *out], a [L, *in, r], b [L, r, *out]) is kept."""
  lead = a.ndim + b.ndim - 2 - kernel.ndim  # 1 for stacked layers, else 0
  rank = b.shape[lead]
  a2 = a.reshape(a.shape[:lead] + (-1, rank)).astype(jnp.float32)
  b2 = b.reshape(b.shape[:lead] + (rank, -1)).astype(jnp.float32)
  delta = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST) * scale
  return (kernel.astype(jnp.float32) + delta.reshape(kernel.shape)).astype(kernel.dtype)


def merge_lora(params: Any, config: TransformerConfig) -> tuple[Any, TransformerConfig]:
  """Folds LoRA adapters into their kernels: W' = W + (lora_alpha / lora_rank) A B.

  Args:
    params: a model's parameters (`nnx.State`, scanned or not) with adapters.
    config: its TransformerConfig (lora_rank > 0; with 0 nothing changes).

  Returns:
    (parameters without adapter leaves, config with lora_rank=0): the plain model whose
    outputs equal the adapted model's (up to float rounding; the sum is formed in float32).
  """
  if not config.lora_rank:
    return params, config
  flat = dict(nnx.to_flat_state(params))
  merged = {}
  for path, leaf in flat.items():
    name = str(path[-1])
    if name.endswith(LORA_A) or name.endswith(LORA_B):
      continue
    a_path = path[:-1] + (name + LORA_A,)
    if a_path in flat:
      b = flat[path[:-1] + (name + LORA_B,)]
      value = _merged_kernel(leaf.get_value(), flat[a_path].get_value(), b.get_value(),
                             config.lora_scale)
      leaf = leaf.replace(value)
    merged[path] = leaf
  return nnx.from_flat_state(merged), config.replace(lora_rank=0)

# ----------------------------------------------------------------------------- counting


def count_params(model_or_state: Any) -> int:
  """Number of parameter scalars in an `nnx.Module` (its nnx.Param) or a state tree."""
  if isinstance(model_or_state, nnx.Module):
    model_or_state = nnx.state(model_or_state, nnx.Param)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(model_or_state))


def matmul_params(config: TransformerConfig) -> int:
  """Weights used in per-token matmuls: N of the 6N rule.

  L * (4 * D * H * Dh  [q, k, v, out]  +  (2 or 3 for SwiGLU) * D * F  [+ LoRA adapters:
  r * (in + out) per adapted matrix])  +  D * vocab_size [output projection, counted even
  when tied: the matmul runs either way; the real vocab, not the padding]. The embedding
  lookup (a gather), norms and relative-position tables are excluded.
  """
  c = config
  mlp_matrices = 3 if c.mlp_activation == "swiglu" else 2
  per_layer = 4 * c.emb_dim * c.num_heads * c.head_dim + mlp_matrices * c.emb_dim * c.mlp_dim
  # LoRA adapters: A [in, r] and B [r, out] per adapted matrix.
  per_layer += c.lora_rank * (4 * (c.emb_dim + c.qkv_dim)
                              + mlp_matrices * (c.emb_dim + c.mlp_dim))
  return c.num_layers * per_layer + c.emb_dim * c.vocab_size


def flops_per_token(config: TransformerConfig, seq_len: int,
                    trainable_matmul_params: Optional[int] = None) -> float:
  """Training FLOPs per token (forward + backward), PaLM appendix B style.

    6 * N  +  12 * L * H * Dh * T   (+ 6 * L * H * Dh * T for "relative")

  N = `matmul_params(config)`; 2 FLOPs per multiply-add, x3 for forward + backward.
  The attention term counts q.k and probs.v over the full T x T square (as PaLM,
  no causal halving); relative attention adds q.E_r, a third T x T x Dh matmul
  per head.

  With frozen parameters (`config.train.trainable`, e.g. LoRA), only the
  `trainable_matmul_params` of the N need weight gradients: 4 * N + 2 * N_trainable
  instead of 6 * N. Activation gradients are counted through every layer: exact when
  trainable matrices sit in every layer (adapters), an upper bound when only the top
  trains.

  Args:
    config: the model.
    seq_len: training sequence length T (tokens).
    trainable_matmul_params: N_trainable; None = every parameter trains.

  Returns:
    FLOPs per token, for MFU = tokens/s * flops_per_token / peak FLOP/s.
  """
  c = config
  attention_matmuls = 3 if c.position == "relative" else 2
  attention = 6 * attention_matmuls * c.num_layers * c.num_heads * c.head_dim * seq_len
  n = matmul_params(c)
  trained = n if trainable_matmul_params is None else int(trainable_matmul_params)
  return float(4 * n + 2 * trained + attention)
