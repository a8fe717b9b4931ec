"""Causal attention over packed documents: one reference path and three fused kernels.

Shapes: B rows, T query length, S key length (= T in training), N query heads, K key/value heads,
G = N // K, H head_dim. Query head n reads key/value head ``n // G`` everywhere (as
``jax.nn.dot_product_attention`` and HF ``repeat_kv``). A query attends a key at or before it in
the same segment (``segment_ids_BxT``: one id per packed document, 0 on padding).

Implementations (``model.attention``):
  ``xla``         einsum/softmax in float32; runs everywhere and is the reference the tests use.
  ``cudnn``       ``jax.nn.dot_product_attention(implementation="cudnn")``. Its public API takes no
                  segment ids, so packed segments enter as a dense boolean ``B x 1 x T x T`` mask.
  ``splash``      Pallas splash attention for TPU (``jax.experimental.pallas.ops.tpu``): a causal
                  mask plus ``SegmentIds``, so no ``T x T`` array is ever built. Needs T a multiple
                  of 128; block sizes come from ``model.attention_block_q`` / ``_block_kv``.
  ``pallas_gpu``  Pallas/Triton flash attention for GPU (``jax.experimental.pallas.ops.gpu``) with
                  segment ids and no dense mask; K/V heads are repeated to N (the kernel has no GQA).
  ``auto``        ``splash`` on TPU, ``cudnn`` on GPU when dtype/head_dim/tensor axis allow it,
                  ``xla`` otherwise (and, with one warning, when a fused kernel rejects the shapes).

The Pallas kernels are opaque to XLA's sharding propagation, so they run under ``shard_map``:
rows split over ``data`` x ``fsdp``, heads over ``tensor`` (when it divides N and K), which is the
layout the projections already produce. Off their own platform (CPU tests) they run in Pallas
interpret mode. The platform is the mesh's when one is set (ahead-of-time compiles for a TPU
topology trace on a CPU host), else the default backend.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec

from gf_jax.model.sharding import constrain, logical_to_spec

# Name of the saved attention output (and of splash's residuals) for the ``minimal`` remat policy.
ATTENTION_OUT = "attention_out"
# Additive mask value: finite so a fully masked row (never produced here) cannot create NaNs.
_MASK_VALUE = -1e30
_HEADS = ("batch", "length", "act_heads", None)
# Splash tiles the key axis in steps of the TPU lane width.
_LANES = 128


def causal_segment_mask(segment_ids_BxT):
    """``mask_BxTxT[b, t, s]``: query t may attend key s (s <= t and same segment id)."""
    t = segment_ids_BxT.shape[1]
    causal_TxT = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]
    same_BxTxT = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
    return causal_TxT[None] & same_BxTxT


def attention_xla(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxTxS):
    """Softmax attention with grouped K/V heads, scores and softmax in float32.

    The grouping is a reshape of the queries, so K/V are never repeated in memory.
    Returns ``out_BxTxNxH`` in the dtype of ``v``.
    """
    b, t, n, h = q_BxTxNxH.shape
    k = k_BxSxKxH.shape[2]
    q_BxTxKxGxH = q_BxTxNxH.reshape(b, t, k, n // k, h)
    scores = jnp.einsum(
        "btkgh,bskh->bkgts", q_BxTxKxGxH, k_BxSxKxH, preferred_element_type=jnp.float32
    ) / math.sqrt(h)
    scores = jnp.where(mask_BxTxS[:, None, None], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_BxSxKxH.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_BxSxKxH)
    return out.reshape(b, t, n, h)


def attention_fused(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, implementation="cudnn"):
    """Causal ``jax.nn.dot_product_attention``; packed segments enter as a boolean B x 1 x T x T mask.

    cuDNN's SPMD rule wants Q, K, V split the same way (batch and heads only) and the mask split
    like Q's batch: the constraints below say so when a mesh is set.
    """
    q_BxTxNxH = constrain(q_BxTxNxH, _HEADS)
    k_BxTxKxH = constrain(k_BxTxKxH, _HEADS)
    v_BxTxKxH = constrain(v_BxTxKxH, _HEADS)
    mask = None
    if segment_ids_BxT is not None:
        mask = constrain(causal_segment_mask(segment_ids_BxT)[:, None], ("batch", None, None, None))
    return jax.nn.dot_product_attention(
        q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask=mask, is_causal=True, implementation=implementation
    )


# --------------------------------------------------------------------------------------------
# Pallas kernels (per device, then under shard_map)
# --------------------------------------------------------------------------------------------


def _fit_block(block: int, t: int) -> int:
    """The largest multiple of 128 that is <= ``block`` and divides ``t`` (t % 128 == 0)."""
    b = max(_LANES, min(block, t) // _LANES * _LANES)
    while t % b:
        b -= _LANES
    return b


def _splash_local(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, *, block_q, block_kv, interpret):
    """Splash attention on one device's rows and heads (kernel layout: heads before length)."""
    # the TPU kernel's module: imported only where it runs
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, t, n, h = q_BxTxNxH.shape
    bq, bkv = _fit_block(block_q, t), _fit_block(block_kv, t)
    blocks = splash.BlockSizes(
        block_q=bq, block_kv=bkv, block_kv_compute=bkv,
        block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
        block_q_dq=bq, block_kv_dq=bkv,
    )
    mask = splash.MultiHeadMask([splash.CausalMask((t, t))] * n)
    kernel = splash.make_splash_mha(
        mask, block_sizes=blocks, head_shards=1, q_seq_shards=1,
        residual_checkpoint_name=ATTENTION_OUT, interpret=interpret,
    )
    # The kernel does not scale the scores; scaling q first matches 1/sqrt(H) on the scores.
    q_BxNxTxH = (q_BxTxNxH * (1.0 / math.sqrt(h))).astype(q_BxTxNxH.dtype).swapaxes(1, 2)
    k_BxKxTxH, v_BxKxTxH = k_BxTxKxH.swapaxes(1, 2), v_BxTxKxH.swapaxes(1, 2)
    if segment_ids_BxT is None:
        out_BxNxTxH = jax.vmap(kernel)(q_BxNxTxH, k_BxKxTxH, v_BxKxTxH)
    else:
        segments = splash.SegmentIds(q=segment_ids_BxT, kv=segment_ids_BxT)
        out_BxNxTxH = jax.vmap(kernel)(q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, segment_ids=segments)
    return out_BxNxTxH.swapaxes(1, 2)


def _pallas_gpu_local(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, *, interpret):
    """Pallas GPU flash attention on one device's rows and heads, with jax's default tiles."""
    # the GPU (Triton) kernel's module: imported only where it runs
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention

    b, t, n, h = q_BxTxNxH.shape
    g = n // k_BxTxKxH.shape[2]
    # The kernel pairs query head n with K/V head n; repeating K/V G times gives head n // G.
    k_BxTxNxH = jnp.repeat(k_BxTxKxH, g, axis=2)
    v_BxTxNxH = jnp.repeat(v_BxTxKxH, g, axis=2)
    default = gpu_attention.BlockSizes.get_default()
    blocks = gpu_attention.BlockSizes(
        block_q=min(default.block_q, t), block_k=min(default.block_k, t),
        block_q_dkv=min(default.block_q_dkv, t), block_kv_dkv=min(default.block_kv_dkv, t),
        block_q_dq=min(default.block_q_dq, t), block_kv_dq=min(default.block_kv_dq, t),
    )
    return gpu_attention.mha(
        q_BxTxNxH, k_BxTxNxH, v_BxTxNxH, segment_ids_BxT,
        sm_scale=1.0 / math.sqrt(h), causal=True, block_sizes=blocks, interpret=interpret,
    )


def _per_device(local_fn, q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT):
    """``local_fn`` on each device's rows and heads (``shard_map``) when a mesh is set.

    Rows follow the ``batch`` rule (data x fsdp); heads split over ``tensor`` only when it divides
    both N and K (so every device keeps whole query groups), else they are replicated.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or not {"data", "fsdp", "tensor"} & set(mesh.axis_names):
        return local_fn(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)
    b, _, n, _ = q_BxTxNxH.shape
    k = k_BxTxKxH.shape[2]
    rows = logical_to_spec(("batch",), mesh, (b,))[0]
    tensor = dict(mesh.shape).get("tensor", 1)
    heads = "tensor" if tensor > 1 and n % tensor == 0 and k % tensor == 0 else None
    qkv_spec = PartitionSpec(rows, None, heads, None)
    if segment_ids_BxT is None:
        fn = lambda q, kk, v: local_fn(q, kk, v, None)  # noqa: E731
        in_specs = (qkv_spec,) * 3
        args = (q_BxTxNxH, k_BxTxKxH, v_BxTxKxH)
    else:
        fn = local_fn
        in_specs = (qkv_spec,) * 3 + (PartitionSpec(rows, None),)
        args = (q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)
    # check_vma=False: pallas_call has no replication rule to check.
    return jax.shard_map(fn, in_specs=in_specs, out_specs=qkv_spec, check_vma=False)(*args)


def attention_splash(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, *, block_q=512, block_kv=512,
                     interpret=False):
    """Causal splash attention with segment ids (None: one segment per row); ``out_BxTxNxH``.

    T must be a multiple of 128; each block size is cut to the largest multiple of 128 that divides T.
    """
    t = q_BxTxNxH.shape[1]
    if t % _LANES:
        raise ValueError(f"splash attention needs a sequence length that is a multiple of 128, got {t}; "
                         "change train.seq_len or use model.attention=xla.")

    def local(q, k, v, s):
        return _splash_local(q, k, v, s, block_q=block_q, block_kv=block_kv, interpret=interpret)

    return _per_device(local, q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)


def attention_pallas_gpu(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, *, interpret=False):
    """Causal Pallas GPU flash attention with segment ids (None: one segment per row); ``out_BxTxNxH``."""

    def local(q, k, v, s):
        return _pallas_gpu_local(q, k, v, s, interpret=interpret)

    return _per_device(local, q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


def target_platform() -> str:
    """The platform the traced code will run on: the set mesh's devices, else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh is None or mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def _cudnn_fits(config, dtype, seq_len: int, has_segments: bool) -> bool:
    # The shapes/dtypes cuDNN flash attention accepts on every supported GPU, and a tensor axis
    # that splits query and key/value heads alike (cuDNN's partitioning rule).
    h = config.resolved_head_dim
    mesh = jax.sharding.get_abstract_mesh()
    tensor = dict(mesh.shape).get("tensor", 1) if mesh is not None and not mesh.empty else 1
    return (
        dtype in (jnp.bfloat16, jnp.float16)
        and h % 8 == 0
        and h <= 128
        and not (has_segments and seq_len % 2)  # bias + odd length is unsupported in training
        and config.n_heads % tensor == 0
        and config.n_kv_heads % tensor == 0
    )


def resolve(config, dtype, seq_len: int, has_segments: bool, platform: str) -> str:
    """The implementation ``config.attention`` means for these shapes on ``platform``."""
    if config.attention != "auto":
        return config.attention
    if platform == "tpu" and seq_len % _LANES == 0:
        return "splash"
    if platform == "gpu" and _cudnn_fits(config, dtype, seq_len, has_segments):
        return "cudnn"
    return "xla"


_warned_fallback = False


def attend(config, q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, dtype):
    """Training attention of ``config.attention`` (a ModelConfig); ``out_BxTxNxH`` in ``dtype``.

    The output is named ``ATTENTION_OUT`` so the ``minimal`` remat policy keeps it; splash names
    its own output (and softmax statistics) inside the kernel, so its result is not named again:
    a second copy per layer (``B x T x N x H``) would only save a transpose.
    """
    global _warned_fallback
    platform = target_platform()
    impl = resolve(config, dtype, q_BxTxNxH.shape[1], segment_ids_BxT is not None, platform)
    args = (q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)
    out = None
    try:
        if impl == "cudnn":
            out = attention_fused(*args)
        elif impl == "splash":
            out = attention_splash(*args, block_q=config.attention_block_q, block_kv=config.attention_block_kv,
                                   interpret=platform != "tpu")
        elif impl == "pallas_gpu":
            out = attention_pallas_gpu(*args, interpret=platform != "gpu")
    except (ValueError, NotImplementedError) as e:  # shape/dtype/version checks at trace time
        if config.attention != "auto":
            raise
        if not _warned_fallback:
            warnings.warn(f"{impl} attention unavailable ({e}); using the XLA attention path.", stacklevel=2)
            _warned_fallback = True
    if out is None:
        if segment_ids_BxT is None:
            segment_ids_BxT = jnp.zeros(q_BxTxNxH.shape[:2], jnp.int32)
        out = attention_xla(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, causal_segment_mask(segment_ids_BxT))
    elif impl == "splash":
        return out.astype(dtype)
    return checkpoint_name(out.astype(dtype), ATTENTION_OUT)
