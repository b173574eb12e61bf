"""What FlashInfer's attention calls share on genfast (genfast.integrations.flashinfer): a plan of the
requests' lengths made on the host, as FlashInfer's plan() makes one, and its run through
genfast.attention_varlen (or genfast.attention per request, for custom masks), with FlashInfer's
positional encodings, scales and base-2 log-sum-exps."""

import math
from dataclasses import dataclass, field
from typing import List, Optional

import torch

from .._checks import check_choice
from ..attention import attention, attention_varlen
from ..rotary import rotary
from .float8 import wide_dtype

Tensor = torch.Tensor

POS_ENCODING_MODES = ("NONE", "ROPE_LLAMA", "ALIBI")
KV_LAYOUTS = ("NHD", "HND")
LOG2E = 1.0 / math.log(2.0)


def alibi_slopes(heads: int, device=None) -> Tensor:
    """FlashInfer's (and ALiBi's) slope of each head: 2^(-8 (h + 1) / n) for the first n = 2^floor(log2
    heads), then 2^(-4 (2 j + 1) / n) for the others, float32; made by device ops (no copy from the host)."""
    n = 2 ** int(math.floor(math.log2(heads)))
    first = torch.arange(1, n + 1, dtype=torch.float64, device=device) * (-8.0 / n)
    others = torch.arange(heads - n, dtype=torch.float64, device=device) * (-8.0 / n) - 4.0 / n
    return torch.cat([first, others]).exp2().float()


def scale_value(name: str, value, heads: int, device: torch.device):
    """q_scale, k_scale or v_scale (FlashInfer's scale_q, scale_k, scale_v): a number (1 where None), or
    a tensor on q's device of one value or one per head (`heads`: num_qo_heads for q's, num_kv_heads
    for k's and v's), float32 (heads,) or (1,), read on the device: no synchronisation."""
    if value is None:
        return 1.0
    if not isinstance(value, Tensor):
        return float(value)
    if not value.is_floating_point() or value.numel() not in (1, heads) or value.device != device:
        raise ValueError(f"{name} must be a number or a floating-point tensor of 1 or {heads} values (one a head) "
                         f"on q's device ({device}), got {value.dtype} {tuple(value.shape)} on {value.device}")
    return value.reshape(-1).float()


def _per_qo_head(scale, group: int):
    """A kv heads' scale of scale_value's for each query head (a number or a one-value tensor as it is)."""
    if isinstance(scale, Tensor) and scale.numel() > 1:
        return scale.repeat_interleave(group)
    return scale


def _scaled_heads(x: Tensor, scale) -> Tensor:
    """x (rows, heads, dim) times a per-head tensor scale, rounded once to x's dtype (a 16-bit q
    whose scaled values pass its range would overflow, where FlashInfer scales the scores in float32)."""
    return (x.float() * scale[:, None]).to(x.dtype)


def dtype_value(name: str, value) -> Optional[torch.dtype]:
    """o_dtype or o_data_type: a torch.dtype, its name, or None."""
    if value is None or isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name} must be a torch.dtype or its name, got {value!r}")
    return dtype


def nhd(name: str, t: Tensor, kv_layout: str) -> Tensor:
    """k or v of a single request or a ragged batch, (tokens, heads, dim): HND's (heads, tokens, dim) viewed so."""
    if not isinstance(t, Tensor) or t.dim() != 3:
        dims = "kv_len, num_kv_heads" if kv_layout == "NHD" else "num_kv_heads, kv_len"
        raise ValueError(f"{name} must be a 3-d tensor ({dims}, head_dim), got "
                         f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    return t if kv_layout == "NHD" else t.transpose(0, 1)


def host_ints(name: str, t, length: Optional[int] = None) -> List[int]:
    """An index tensor or sequence read on the host (plan's step, as FlashInfer's plan reads them)."""
    values = t.tolist() if isinstance(t, Tensor) else list(t)
    if length is not None and len(values) != length:
        raise ValueError(f"{name} must hold {length} values, got {len(values)}")
    if any(not float(x).is_integer() or x < 0 for x in values):
        raise ValueError(f"{name} must hold non-negative integers, got {values}")
    return [int(x) for x in values]


def unpack_masks(packed, shapes: List[tuple]) -> List[Tensor]:
    """FlashInfer's packed_custom_mask (uint8, little-endian bits, as segment_packbits makes it): each
    request's (qo_len, kv_len) bool mask flattened and packed from a byte of its own, in order."""
    if not isinstance(packed, Tensor) or packed.dtype not in (torch.uint8, torch.int8):
        raise ValueError("packed_custom_mask must be a uint8 tensor of little-endian bits, got "
                         f"{getattr(packed, 'dtype', type(packed).__name__)}")
    sizes = [n_q * n_k for n_q, n_k in shapes]
    starts = [0]
    for n in sizes:
        starts.append(starts[-1] + -(-n // 8))
    flat = packed.reshape(-1).to(torch.uint8)
    if flat.numel() < starts[-1]:
        raise ValueError(f"packed_custom_mask must hold {starts[-1]} bytes (each request's qo_len * kv_len bits "
                         f"from a byte of its own, {sizes}), got {flat.numel()}")
    bits = ((flat[:, None] >> torch.arange(8, device=flat.device, dtype=torch.uint8)) & 1).reshape(-1).bool()
    return [bits[8 * at:8 * at + n].view(shape) for at, n, shape in zip(starts, sizes, shapes)]


def check_indptr(name: str, indptr: List[int]) -> None:
    if len(indptr) < 1 or indptr[0] != 0 or any(b < a for a, b in zip(indptr, indptr[1:])):
        raise ValueError(f"{name} must start at 0 and never decrease, got {indptr}")


@dataclass
class Plan:
    """The host's view of one batch: each request's query and key counts, and how to attend."""
    qo_lens: List[int]
    kv_lens: List[int]
    num_qo_heads: int
    num_kv_heads: int
    causal: bool = False
    pos_encoding_mode: str = "NONE"
    window_left: int = -1
    window_right: int = -1  # keys past a query's diagonal it sees, -1 any (causal: none)
    logits_soft_cap: Optional[float] = None
    sm_scale: Optional[float] = None
    rope_scale: Optional[float] = None
    rope_theta: Optional[float] = None
    masks: Optional[List[Tensor]] = None  # each request's bool (qo_len, kv_len), True attends
    block_table: Optional[Tensor] = None  # int32 (batch, pages): a paged cache
    o_dtype: Optional[torch.dtype] = None
    head_dim: int = 0  # q's and k's, set by check()
    kv_bound: Optional[int] = None  # the key count bound a run passes, else the longest request's (use_cuda_graph)
    # made by prepare(), on the device of the run
    device: Optional[torch.device] = None
    cu_q: Optional[Tensor] = None
    cu_k: Optional[Tensor] = None
    rope_tables: Optional[tuple] = None  # float32 cos and sin over the positions the requests span
    rope_tables_cast: dict = field(default_factory=dict)  # in each dtype a run took them
    q_rows: Optional[Tensor] = None  # each query's and key's row of the tables
    k_rows: Optional[Tensor] = None
    k_requests: Optional[Tensor] = None  # each key's request and place in it (paged caches gathered: gathers_pages)
    k_places: Optional[Tensor] = None
    slopes: Optional[Tensor] = None
    lse_shift: Optional[Tensor] = None

    def check(self, head_dim: int) -> "Plan":
        self.head_dim = head_dim
        check_choice("pos_encoding_mode", self.pos_encoding_mode, POS_ENCODING_MODES)
        if self.num_kv_heads <= 0 or self.num_qo_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads ({self.num_kv_heads}) must divide num_qo_heads ({self.num_qo_heads})")
        if self.pos_encoding_mode == "ALIBI" and self.logits_soft_cap:
            raise ValueError("pos_encoding_mode='ALIBI' with logits_soft_cap: FlashInfer's versions disagree on "
                             "their order; genfast takes either alone")
        if self.pos_encoding_mode == "ROPE_LLAMA" and head_dim % 2:
            raise ValueError(f"pos_encoding_mode='ROPE_LLAMA' needs an even head dim, got {head_dim}")
        if self.logits_soft_cap is not None and self.logits_soft_cap < 0:
            raise ValueError(f"logits_soft_cap must be >= 0, got {self.logits_soft_cap}")
        return self

    @property
    def per_request(self) -> bool:
        """Custom masks, or ALiBi without causality over more than one query (FlashInfer's bias is
        slope (j - i), which genfast's -slope |i - j| matches only left of the diagonal): attended
        one request at a time with an explicit mask."""
        return self.masks is not None or (self.pos_encoding_mode == "ALIBI" and not self.causal
                                          and any(n > 1 for n in self.qo_lens))

    @property
    def gathers_pages(self) -> bool:
        """A paged cache whose requests' keys a run gathers from their pages (a copy): to turn them by
        ROPE_LLAMA, or to attend one request at a time."""
        return self.block_table is not None and (self.pos_encoding_mode == "ROPE_LLAMA" or self.per_request)

    def prepare(self, device: torch.device, non_blocking: bool = True) -> None:
        """The plan's tensors on `device`, made once, as plan() does for the wrappers' device and a run
        on another device does again: a batch's copied from the host, without waiting (through pinned
        memory: no synchronisation) unless non_blocking is False; one request's (FlashInfer's single_*
        calls, which plan on every call) made by device ops, with no copy from the host, so that a
        CUDA graph can capture those calls."""
        device = torch.device(device)
        if self.device == device:
            return
        if len(self.qo_lens) == 1:
            n_q, n_k = self.qo_lens[0], self.kv_lens[0]
            ends = torch.arange(2, dtype=torch.int32, device=device)
            self.cu_q, self.cu_k = ends * n_q, ends * n_k
        else:
            starts_q, starts_k = (torch.tensor([0] + lens).cumsum(0).int() for lens in (self.qo_lens, self.kv_lens))
            self.cu_q, self.cu_k = to_device(starts_q, device, non_blocking), to_device(starts_k, device, non_blocking)
        if self.pos_encoding_mode == "ROPE_LLAMA":
            # FlashInfer's: key j at j, query i at i + kv_len - qo_len (before key 0 where qo_len > kv_len)
            low = min([0] + [n_k - n_q for n_q, n_k in zip(self.qo_lens, self.kv_lens)])
            self.rope_tables = _rope_tables(range(low, max(self.kv_lens + [low + 1])), self.head_dim,
                                            1e4 if self.rope_theta is None else float(self.rope_theta),
                                            1.0 if self.rope_scale is None else float(self.rope_scale), device)
            self.rope_tables_cast = {}
            if len(self.qo_lens) == 1:
                self.q_rows = torch.arange(n_q, dtype=torch.int32, device=device) + (n_k - n_q - low)
                self.k_rows = torch.arange(n_k, dtype=torch.int32, device=device) - low
            else:
                rows = [i + n_k - n_q - low for n_q, n_k in zip(self.qo_lens, self.kv_lens) for i in range(n_q)]
                self.q_rows = to_device(torch.tensor(rows, dtype=torch.int32), device, non_blocking)
                rows = [j - low for n_k in self.kv_lens for j in range(n_k)]
                self.k_rows = to_device(torch.tensor(rows, dtype=torch.int32), device, non_blocking)
        if self.gathers_pages:  # by device ops: as many keys as the requests hold, no list on the host
            keys = torch.arange(sum(self.kv_lens), device=device)
            self.k_requests = torch.repeat_interleave(torch.arange(len(self.kv_lens), device=device),
                                                      (self.cu_k[1:] - self.cu_k[:-1]).long(), output_size=keys.numel())
            self.k_places = keys - self.cu_k[self.k_requests]
        if self.pos_encoding_mode == "ALIBI":
            self.slopes = alibi_slopes(self.num_qo_heads, device)
        if self.pos_encoding_mode == "ALIBI" and not self.per_request:
            # genfast's bias differs from FlashInfer's slope (j - i) by slope (kv_len - qo_len) in each row
            # it leaves (left of the diagonal): lse gains it back.
            if len(self.qo_lens) == 1:
                self.lse_shift = torch.full((n_q,), float(n_k - n_q), dtype=torch.float32, device=device)
            else:
                shifts = [float(n_k - n_q) for n_q, n_k in zip(self.qo_lens, self.kv_lens) for _ in range(n_q)]
                self.lse_shift = to_device(torch.tensor(shifts, dtype=torch.float32), device, non_blocking)
        if self.block_table is not None:
            self.block_table = to_device(self.block_table, device, non_blocking)
        if self.masks is not None:
            self.masks = [to_device(m, device, non_blocking) for m in self.masks]
        self.device = device


def to_device(t: Tensor, device: torch.device, non_blocking: bool = True) -> Tensor:
    """t on device; from the host through pinned memory, not waiting for the copy (a copy from
    pageable memory would synchronise), unless non_blocking is False."""
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda" and non_blocking:
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _indexed(t: Tensor, *index: Tensor) -> Tensor:
    """t[index]; float8 indexed through its bytes, which every torch indexes."""
    return t.view(torch.uint8)[index].view(t.dtype) if t.dtype in FLOAT8 else t[index]


def _gathered_keys(k: Tensor, v: Tensor, plan: Plan):
    """(k, v, block_table): a paged cache's requests' keys packed, (nnz_kv, heads, dim), where the
    plan gathers them (Plan.gathers_pages), before any widening (an fp8 cache's used keys alone);
    else k, v and the plan's block table as they are."""
    if not plan.gathers_pages:
        return k, v, plan.block_table
    page_size = k.shape[1]
    pages = plan.block_table[plan.k_requests, plan.k_places // page_size].long()
    return _indexed(k, pages, plan.k_places % page_size), _indexed(v, pages, plan.k_places % page_size), None


def _widened(q: Tensor, k: Tensor, v: Tensor, block_table: Optional[Tensor]):
    """(q, k, v, block_table) with float8 ones (FlashInfer's fp8 caches, kv_data_type; fp8 q)
    widened exactly to the others' dtype (where all are float8: bfloat16 on a GPU, float32 on the
    CPU): genfast's kernels take no float8. Of a paged cache, the pages the table names are gathered
    (batch x its width, a copy in the wide dtype, not fp8's speed), the table then numbering them in
    order, unless the table names as many entries as the pool holds pages: then the pool is
    widened whole, under its table. All by device ops, as a CUDA graph captures them."""
    if not any(t.dtype in FLOAT8 for t in (q, k, v)):
        return q, k, v, block_table
    wide = next((t.dtype for t in (q, k, v) if t.dtype not in FLOAT8), None) or wide_dtype(q.device)
    if block_table is not None and block_table.numel() < k.shape[0]:
        pages = block_table.reshape(-1).long()
        k, v = (_indexed(t, pages) for t in (k, v))
        block_table = torch.arange(pages.numel(), dtype=torch.int32, device=pages.device).view(block_table.shape)
    return q.to(wide), k.to(wide), v.to(wide), block_table


def _rope_tables(positions: range, dim: int, theta: float, scale: float, device: torch.device) -> tuple:
    """FlashInfer's ROPE_LLAMA angles, position / rope_scale * rope_theta^(-2 i / dim): cos and sin
    (positions, dim / 2), float32 on `device`, made there. (A run rounds them to q's dtype, which
    genfast.rotary takes: bfloat16 tables, where FlashInfer turns in float32.)"""
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim) / scale
    positions = torch.arange(positions.start, positions.stop, dtype=torch.float64, device=device)
    angles = positions[:, None] * inv_freq[None, :]
    return angles.cos().float(), angles.sin().float()


def _rope(x: Tensor, rows: Tensor, plan: Plan, impl: str) -> Tensor:
    """x (tokens, heads, dim) turned by ROPE_LLAMA's rotate-half pairs, token t at row rows[t] of
    the plan's tables (cast to x's dtype once a plan); a new tensor."""
    if x.dtype not in plan.rope_tables_cast:
        plan.rope_tables_cast[x.dtype] = tuple(t.to(x.dtype) for t in plan.rope_tables)
    cos, sin = plan.rope_tables_cast[x.dtype]
    return rotary(x[None], cos, sin, rows[None], interleaved=False, impl=impl)[0]


def run_plan(plan: Plan, q: Tensor, k: Tensor, v: Tensor, *, impl: str, return_lse: bool, q_scale=None,
             k_scale=None, v_scale=None, out: Optional[Tensor] = None, lse: Optional[Tensor] = None,
             sinks: Optional[Tensor] = None, sm_scale: Optional[float] = None):
    """FlashInfer's attention of the planned requests: q (nnz_qo, num_qo_heads, head_dim), k and v
    (nnz_kv, num_kv_heads, dim) packed (or pages, page_size, num_kv_heads, dim with the plan's
    block table). Returns o (nnz_qo, num_qo_heads, head_dim_vo), or (o, lse base 2 (nnz_qo,
    num_qo_heads) float32), written into out and lse where given. sinks (num_qo_heads,): each
    head's sink logit, natural and unscaled, in every row's softmax (and lse), as FlashInfer's
    AttentionSink variant and its trtllm-gen kernels take them; sm_scale, where given, replaces the
    plan's (the AttentionSink variant's run-time scale)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != 3 or q.shape[1] != plan.num_qo_heads or q.shape[0] != sum(plan.qo_lens):
        raise ValueError(f"q must be ({sum(plan.qo_lens)}, {plan.num_qo_heads}, head_dim) as planned, got "
                         f"{tuple(q.shape)}")
    if k.shape[-2] != plan.num_kv_heads:
        raise ValueError(f"k must have the {plan.num_kv_heads} planned kv heads, got {tuple(k.shape)}")
    head_dim = q.shape[-1]
    if head_dim != plan.head_dim:
        raise ValueError(f"q's head dim must be the planned {plan.head_dim}, got {head_dim}")
    if sinks is not None and plan.pos_encoding_mode == "ALIBI":
        raise ValueError("sinks with pos_encoding_mode='ALIBI': genfast's ALiBi bias differs from FlashInfer's by a "
                         "constant in each row, which a sink's weight would not share; genfast takes either alone")
    plan.prepare(q.device)
    o_dtype = plan.o_dtype or q.dtype
    k, v, block_table = _gathered_keys(k, v, plan)
    q, k, v, block_table = _widened(q, k, v, block_table)
    if sm_scale is None:
        sm_scale = plan.sm_scale
    scale = (1.0 / math.sqrt(head_dim) if sm_scale is None else float(sm_scale))
    group = plan.num_qo_heads // plan.num_kv_heads
    qk_scale = scale_value("q_scale", q_scale, plan.num_qo_heads, q.device) * _per_qo_head(
        scale_value("k_scale", k_scale, plan.num_kv_heads, q.device), group)
    v_scale = _per_qo_head(scale_value("v_scale", v_scale, plan.num_kv_heads, q.device), group)
    if isinstance(qk_scale, Tensor):  # folded into q, rounded once (as the FlashAttention 3 drop-in's descales)
        q = _scaled_heads(q, qk_scale)
    else:
        scale *= qk_scale
    if plan.pos_encoding_mode == "ROPE_LLAMA":
        q = _rope(q, plan.q_rows, plan, impl)
        k = _rope(k, plan.k_rows, plan, impl)
    slopes = plan.slopes
    window = (plan.window_left, plan.window_right) if max(plan.window_left, plan.window_right) >= 0 else None
    softcap = plan.logits_soft_cap or None
    if plan.per_request:
        o, natural = _run_per_request(plan, q, k, v, scale, slopes, window, softcap, impl, sinks)
    else:
        kv_bound = max(plan.kv_lens, default=0) if plan.kv_bound is None else plan.kv_bound
        o, natural = attention_varlen(q, k, v, plan.cu_q, plan.cu_k, max(plan.qo_lens, default=0), kv_bound,
                                      scale=scale,
                                      causal="bottom_right" if plan.causal else None, window=window,
                                      alibi_slopes=slopes, softcap=softcap, return_lse=True, impl=impl,
                                      block_table=block_table, sinks=sinks)
        natural = natural.t()
        if plan.lse_shift is not None:
            natural = natural + plan.lse_shift[:, None] * slopes[None, :]
    if isinstance(v_scale, Tensor):  # scaled in float32, rounded once to o_dtype
        o = o.float() * v_scale[:, None]
    elif v_scale != 1.0:
        o = o.float() * v_scale
    o = o.to(o_dtype)
    if out is not None:
        if out.shape != o.shape or out.dtype != o.dtype or out.device != o.device:
            raise ValueError(f"out must be a {o.dtype} tensor {tuple(o.shape)} on {o.device}, got {out.dtype} "
                             f"{tuple(out.shape)} on {out.device}")
        o = out.copy_(o)
    if not return_lse:
        return o
    base2 = natural * LOG2E
    if lse is not None:
        if lse.shape != base2.shape or lse.dtype != torch.float32 or lse.device != base2.device:
            raise ValueError(f"lse must be a torch.float32 tensor {tuple(base2.shape)} on {base2.device}, got "
                             f"{lse.dtype} {tuple(lse.shape)} on {lse.device}")
        return o, lse.copy_(base2)
    return o, base2.contiguous()


def _run_per_request(plan: Plan, q, k, v, scale, slopes, window, softcap, impl, sinks):
    """Each request alone through genfast.attention, with its custom mask and, for ALiBi without
    causality, FlashInfer's bias slope (j - i) as an additive mask; k and v packed (a paged cache's
    keys gathered first)."""
    outs, lses = [], []
    starts_q, starts_k = 0, 0
    for n, (n_q, n_k) in enumerate(zip(plan.qo_lens, plan.kv_lens)):
        q_n = q[starts_q:starts_q + n_q].transpose(0, 1)[None]
        k_n, v_n = (t[starts_k:starts_k + n_k].transpose(0, 1)[None] for t in (k, v))
        mask = None if plan.masks is None else plan.masks[n]  # on q's device since prepare()
        causal = "bottom_right" if plan.causal and plan.masks is None else None
        if slopes is not None:
            i = torch.arange(n_q, device=q.device, dtype=torch.float32)[:, None]
            j = torch.arange(n_k, device=q.device, dtype=torch.float32)[None, :]
            bias = slopes[:, None, None] * (j - i)
            mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
        o_n, lse_n = attention(q_n, k_n, v_n, mask, scale=scale, enable_gqa=True, causal=causal, window=window,
                               softcap=softcap, return_lse=True, impl=impl, sinks=sinks)
        outs.append(o_n[0].transpose(0, 1))
        lses.append(lse_n[0].t())
        starts_q += n_q
        starts_k += n_k
    if not outs:
        return (q.new_empty(0, plan.num_qo_heads, v.shape[-1]), q.new_empty(0, plan.num_qo_heads,
                                                                             dtype=torch.float32))
    return torch.cat(outs), torch.cat(lses)
