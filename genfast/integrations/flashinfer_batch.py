"""FlashInfer's batch attention wrappers (BatchPrefillWithRaggedKVCacheWrapper,
BatchPrefillWithPagedKVCacheWrapper, BatchDecodeWithPagedKVCacheWrapper) on genfast's kernels:
plan() reads the batch's index arrays on the host, as FlashInfer's does, and puts genfast's
(cumulative lengths, a block table) on the device once; run() launches genfast.attention_varlen
without synchronising. genfast.integrations.flashinfer documents what is FlashInfer's and where
genfast differs."""

import functools
from typing import List, Optional

import torch

from .._checks import check_choice
from .flashinfer_common import KV_LAYOUTS, Plan, check_indptr, dtype_value, host_ints, nhd, run_plan, unpack_masks
from .flashinfer_graph import CudaGraphPlans

Tensor = torch.Tensor


def _device_of(*tensors) -> torch.device:
    return next((t.device for t in tensors if isinstance(t, Tensor)), torch.device("cpu"))


def _lengths(name: str, indptr) -> List[int]:
    starts = host_ints(name, indptr)
    check_indptr(name, starts)
    return [b - a for a, b in zip(starts, starts[1:])]


def _is_attention_sink_variant(jit_args) -> bool:
    """Whether FlashInfer's jit_args name its AttentionSink variant: one float tensor "sink" and one
    scalar "sm_scale" after the run's q, k and v (the variant of tests/attention/test_attention_sink.py)."""
    try:
        return (jit_args[11] == "AttentionSink" and list(jit_args[7]) == ["sink"]
                and list(jit_args[9]) == ["sm_scale"])
    except (IndexError, KeyError, TypeError):
        return False


class _Wrapper:
    """What the wrappers share: FlashInfer's constructor arguments (the workspace, which genfast does
    not need, and the paged wrappers' CUDA-graph buffers: graph_buffers, their names and tensors),
    the plan, and the old names."""

    def __init__(self, float_workspace_buffer: Optional[Tensor] = None, kv_layout: str = "NHD",
                 use_cuda_graph: bool = False, *, impl: str = "auto", jit_args=None, graph_buffers=None,
                 max_pages_per_request: Optional[int] = None):
        check_choice("kv_layout", kv_layout, KV_LAYOUTS)
        self._kv_layout = kv_layout
        self._graph = None
        if use_cuda_graph:
            if graph_buffers is None:
                raise ValueError(f"use_cuda_graph=True on {type(self).__name__}: genfast captures the paged wrappers' "
                                 "runs (BatchPrefillWithPagedKVCacheWrapper, BatchDecodeWithPagedKVCacheWrapper), "
                                 "whose key counts are bounded by their block table; a ragged run's are not")
            self._graph = CudaGraphPlans(type(self).__name__, *graph_buffers, max_pages_per_request)
        # FlashInfer's JIT variants are CUDA source; genfast runs the one it knows, AttentionSink.
        self._sink_variant = jit_args is not None and _is_attention_sink_variant(jit_args)
        if jit_args is not None and not self._sink_variant:
            raise ValueError("jit_args: FlashInfer's JIT attention variants are CUDA code genfast does not compile; "
                             "it takes the AttentionSink variant (additional tensor 'sink', scalar 'sm_scale'), "
                             "and sinks= on the paged wrappers' run()")
        self._impl = impl
        self._plan: Optional[Plan] = None
        self._page_size = 0
        # FlashInfer's plan puts its tensors on the workspace buffer's device: so does genfast's.
        self._device = float_workspace_buffer.device if isinstance(float_workspace_buffer, Tensor) else None
        if self._device is None and self._graph is not None:
            self._device = self._graph.device  # the CUDA-graph buffers', which the held tensors share

    @property
    def is_cuda_graph_enabled(self) -> bool:
        return self._graph is not None

    def reset_workspace_buffer(self, float_workspace_buffer: Tensor, int_workspace_buffer: Tensor = None) -> None:
        pass  # genfast needs no workspace

    def end_forward(self) -> None:
        pass

    def _set_plan(self, qo_lens, kv_lens, num_qo_heads, num_kv_heads, head_dim, o_data_type, device,
                  page_size=0, non_blocking=True, index_arrays=(), **options) -> None:
        """The plan, its tensors on the workspace buffer's device (else `device`, the index
        arrays'), replacing the last one once it is checked; non_blocking=False waits for their copies,
        as FlashInfer's does, for a run on another stream. With use_cuda_graph, its tensors are the
        wrapper's held ones, and index_arrays (in the graph buffers' order) go to those buffers."""
        plan = Plan(qo_lens, kv_lens, int(num_qo_heads), int(num_kv_heads),
                    o_dtype=dtype_value("o_data_type", o_data_type), **options).check(int(head_dim))
        if self._graph is not None:
            self._graph.check(plan, page_size)
        plan.prepare(self._device or device, non_blocking=bool(non_blocking))
        if self._graph is not None:
            self._graph.write(index_arrays)
            self._graph.hold(plan, page_size)
        self._plan, self._page_size = plan, page_size

    def _planned(self) -> Plan:
        if self._plan is None:
            raise RuntimeError(f"{type(self).__name__}.run before plan(): plan the batch first")
        return self._plan

    def _variant_args(self, args, sinks):
        """(sinks, sm_scale) from the run's positional arguments after its tensors: the AttentionSink
        variant's (sink, sm_scale), else none."""
        if not self._sink_variant:
            if args:
                raise ValueError(f"{type(self).__name__}.run takes its tensors, then keywords; positional arguments "
                                 "after them are a JIT variant's (jit_args)")
            return sinks, None
        if len(args) != 2 or sinks is not None:
            raise ValueError("the AttentionSink variant's run takes (sink, sm_scale) after its tensors, and no sinks=")
        return args[0], float(args[1])

    def _run(self, q, k, v, return_lse, q_scale, k_scale, v_scale, out, lse, window_left=None, sinks=None,
             sm_scale=None):
        plan = self._planned()
        if self._graph is not None and isinstance(q, Tensor) and q.device != plan.device:
            raise ValueError(f"q must be on the planned device ({plan.device}), where use_cuda_graph holds the plan's "
                             f"tensors; got {q.device}")
        if window_left is not None and int(window_left) != plan.window_left:
            raise ValueError(f"window_left ({window_left}) must be the planned one ({plan.window_left})")
        if sm_scale is not None:  # the AttentionSink variant: its scores are sm_scale q.k and nothing else
            if q_scale is not None or k_scale is not None:
                raise ValueError("q_scale and k_scale with the AttentionSink variant: FlashInfer's variant takes "
                                 "its run's sm_scale alone; fold them into it")
            if plan.logits_soft_cap or plan.pos_encoding_mode != "NONE":
                raise ValueError("the AttentionSink variant has no logits_soft_cap or pos_encoding_mode: plan "
                                 "without them")
        return run_plan(plan, q, k, v, impl=self._impl, return_lse=return_lse, q_scale=q_scale, k_scale=k_scale,
                        v_scale=v_scale, out=out, lse=lse, sinks=sinks, sm_scale=sm_scale)

    def _run_paged(self, q, paged_kv_cache, args, return_lse, q_scale, k_scale, v_scale, out, lse, window_left,
                   sinks):
        sinks, sm_scale = self._variant_args(args, sinks)
        self._planned()
        k, v = _paged_cache(paged_kv_cache, self._kv_layout, self._page_size)
        return self._run(q, k, v, return_lse, q_scale, k_scale, v_scale, out, lse, window_left, sinks, sm_scale)


def _paged_table(indptr, indices, last_page_len, page_size: int, names=("paged_kv_indptr", "paged_kv_indices",
                                                                          "paged_kv_last_page_len")):
    """genfast's block table (batch, pages) from FlashInfer's page lists, on the device of `indices`,
    and each request's key count ((pages - 1) page_size + last_page_len; none without pages)."""
    pages = _lengths(names[0], indptr)
    last = host_ints(names[2], last_page_len, len(pages))
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    if any(not 1 <= n <= page_size if p else n for n, p in zip(last, pages)):
        raise ValueError(f"{names[2]} must lie in 1 .. page_size ({page_size}) for requests with pages and be 0 "
                         f"for those without, got {last}")
    kv_lens = [max(p - 1, 0) * page_size + n for p, n in zip(pages, last)]
    if not isinstance(indices, Tensor):
        indices = torch.tensor(list(indices), dtype=torch.int32)
    total = sum(pages)
    if indices.numel() < total:
        raise ValueError(f"{names[1]} must hold {names[0]}[-1] = {total} pages, got {indices.numel()}")
    width = max(pages, default=0) or 1
    # Row b holds indices[indptr[b] .. indptr[b + 1]], then page 0, never read.
    counts = torch.tensor(pages, dtype=torch.int64)
    column = torch.arange(width, dtype=torch.int64)
    starts = torch.cumsum(counts, 0) - counts
    at = torch.where(column < counts[:, None], starts[:, None] + column, -1).to(indices.device)
    flat = indices.reshape(-1).to(torch.int32)
    table = torch.where(at >= 0, flat[at.clamp(min=0)], 0) if total else torch.zeros(at.shape, dtype=torch.int32,
                                                                                     device=indices.device)
    return table.to(torch.int32), kv_lens


def _given_pages(table, kv_lens, block_tables, seq_lens, page_size: int):
    """The decode plan's table and key counts where FlashInfer's block_tables and seq_lens replace
    those of the page lists; each count must lie within its row's pages (of the page lists: the
    table made from them pads rows with page 0)."""
    if block_tables is not None:
        if (not isinstance(block_tables, Tensor) or block_tables.dim() != 2 or block_tables.shape[0] != len(kv_lens)
                or block_tables.dtype not in (torch.int32, torch.int64)):
            raise ValueError(f"block_tables must be an int32 or int64 tensor (batch, pages) with batch = "
                             f"{len(kv_lens)}, got {getattr(block_tables, 'dtype', type(block_tables).__name__)} "
                             f"{tuple(getattr(block_tables, 'shape', ()))}")
        rows = [block_tables.shape[1] * page_size] * len(kv_lens)
        table = block_tables.to(torch.int32)
    else:
        rows = [-(-n // page_size) * page_size for n in kv_lens]
    if seq_lens is not None:
        kv_lens = host_ints("seq_lens", seq_lens, len(kv_lens))
    if any(n > most for n, most in zip(kv_lens, rows)):
        raise ValueError(f"seq_lens must fit each request's pages, at most {rows} keys, got {kv_lens}")
    return table, kv_lens


_PREFILL_GRAPH_BUFFERS = ("qo_indptr_buf", "paged_kv_indptr_buf", "paged_kv_indices_buf", "paged_kv_last_page_len_buf")


def _masks(custom_mask, packed_custom_mask, qo_lens, kv_lens):
    """Each request's bool (qo_len, kv_len) mask from FlashInfer's custom_mask (flattened and
    concatenated) or packed_custom_mask (segment_packbits's), the plan's own; None without."""
    if packed_custom_mask is not None:
        return unpack_masks(packed_custom_mask, list(zip(qo_lens, kv_lens)))
    if custom_mask is None:
        return None
    sizes = [n_q * n_k for n_q, n_k in zip(qo_lens, kv_lens)]
    if not isinstance(custom_mask, Tensor):
        raise ValueError(f"custom_mask must be a bool tensor, got {type(custom_mask).__name__}")
    flat = custom_mask.reshape(-1).bool().clone()  # the plan's own, as FlashInfer packs its own
    if flat.numel() != sum(sizes):
        raise ValueError(f"custom_mask must hold sum(qo_len * kv_len) = {sum(sizes)} values (each request's "
                         f"(qo_len, kv_len) mask flattened, concatenated), got {flat.numel()}")
    return [m.view(n_q, n_k) for m, n_q, n_k in zip(flat.split(sizes), qo_lens, kv_lens)]


def _paged_cache(paged_kv_cache, kv_layout: str, page_size: int):
    """k and v (pages, page_size, num_kv_heads, dim) from FlashInfer's tuple (k, v) or single
    tensor (pages, 2, ...), NHD or HND, viewed in place."""
    if isinstance(paged_kv_cache, (tuple, list)):
        if len(paged_kv_cache) != 2:
            raise ValueError(f"paged_kv_cache must be (k_cache, v_cache), got {len(paged_kv_cache)} tensors")
        k, v = paged_kv_cache
        if k.dim() == 3:  # FlashInfer reads these as pages of one token
            k, v = (t.unsqueeze(1 if kv_layout == "NHD" else 2) for t in (k, v))
    elif isinstance(paged_kv_cache, Tensor) and paged_kv_cache.dim() in (4, 5) and paged_kv_cache.shape[1] == 2:
        cache = paged_kv_cache if paged_kv_cache.dim() == 5 else paged_kv_cache.unsqueeze(2 if kv_layout == "NHD"
                                                                                            else 3)
        k, v = cache[:, 0], cache[:, 1]
    else:
        raise ValueError("paged_kv_cache must be a tuple (k_cache, v_cache) or one tensor (max_num_pages, 2, ...), "
                         f"got {getattr(paged_kv_cache, 'shape', type(paged_kv_cache).__name__)}")
    if kv_layout == "HND":
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    dims = "page_size, num_kv_heads" if kv_layout == "NHD" else "num_kv_heads, page_size"
    for name, t in (("k_cache", k), ("v_cache", v)):
        if t.dim() != 4 or t.shape[1] != page_size:
            raise ValueError(f"{name} must hold pages of the planned page_size {page_size} (max_num_pages, {dims}, "
                             f"head_dim), got {tuple(t.shape)} as NHD")
    return k, v


class BatchPrefillWithRaggedKVCacheWrapper(_Wrapper):
    """FlashInfer's prefill over keys packed without pages: plan(qo_indptr, kv_indptr, ...), then
    run(q (nnz_qo, num_qo_heads, head_dim), k, v (nnz_kv, num_kv_heads, head_dim))."""

    def __init__(self, float_workspace_buffer: Optional[Tensor] = None, kv_layout: str = "NHD",
                 use_cuda_graph: bool = False, qo_indptr_buf=None, kv_indptr_buf=None, custom_mask_buf=None,
                 mask_indptr_buf=None, backend: str = "auto", jit_args=None, jit_kwargs=None, *, impl: str = "auto"):
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph, impl=impl, jit_args=jit_args)

    def plan(self, qo_indptr, kv_indptr, num_qo_heads: int, num_kv_heads: int, head_dim_qk: int,
             head_dim_vo: Optional[int] = None, custom_mask: Optional[Tensor] = None,
             packed_custom_mask: Optional[Tensor] = None, causal: bool = False, pos_encoding_mode: str = "NONE",
             use_fp16_qk_reduction: bool = False, window_left: int = -1, logits_soft_cap: Optional[float] = None,
             sm_scale: Optional[float] = None, rope_scale: Optional[float] = None, rope_theta: Optional[float] = None,
             q_data_type="float16", kv_data_type=None, o_data_type=None, non_blocking: bool = True,
             fixed_split_size: Optional[int] = None, disable_split_kv: bool = False) -> None:
        self._plan = None  # a plan that fails leaves none to run
        qo_lens, kv_lens = _lengths("qo_indptr", qo_indptr), _lengths("kv_indptr", kv_indptr)
        if len(qo_lens) != len(kv_lens):
            raise ValueError(f"qo_indptr and kv_indptr must have one entry per request and one more, got "
                             f"{len(qo_lens) + 1} and {len(kv_lens) + 1}")
        self._set_plan(qo_lens, kv_lens, num_qo_heads, num_kv_heads, head_dim_qk, o_data_type,
                       _device_of(qo_indptr, kv_indptr), causal=bool(causal), pos_encoding_mode=pos_encoding_mode,
                       window_left=int(window_left), logits_soft_cap=logits_soft_cap, sm_scale=sm_scale,
                       rope_scale=rope_scale, rope_theta=rope_theta,
                       masks=_masks(custom_mask, packed_custom_mask, qo_lens, kv_lens), non_blocking=non_blocking)

    begin_forward = plan

    def run(self, q: Tensor, k: Tensor, v: Tensor, *args, q_scale=None, k_scale=None, v_scale=None, o_scale=None,
            out: Optional[Tensor] = None, lse: Optional[Tensor] = None, return_lse: bool = False, enable_pdl=None):
        if o_scale is not None:
            raise ValueError("o_scale (fp8 outputs) is not supported")
        sinks, sm_scale = self._variant_args(args, None)
        k, v = nhd("k", k, self._kv_layout), nhd("v", v, self._kv_layout)
        return self._run(q, k, v, return_lse, q_scale, k_scale, v_scale, out, lse, sinks=sinks, sm_scale=sm_scale)

    run_return_lse = functools.partialmethod(run, return_lse=True)


class BatchPrefillWithPagedKVCacheWrapper(_Wrapper):
    """FlashInfer's prefill or append over a paged KV cache: plan(qo_indptr, paged_kv_indptr,
    paged_kv_indices, paged_kv_last_page_len, ...), then run(q, paged_kv_cache)."""

    def __init__(self, float_workspace_buffer: Optional[Tensor] = None, kv_layout: str = "NHD",
                 use_cuda_graph: bool = False, qo_indptr_buf=None, paged_kv_indptr_buf=None,
                 paged_kv_indices_buf=None, paged_kv_last_page_len_buf=None, custom_mask_buf=None,
                 mask_indptr_buf=None, backend: str = "auto", jit_args=None, jit_kwargs=None, *, impl: str = "auto",
                 max_pages_per_request: Optional[int] = None):
        buffers = (list(_PREFILL_GRAPH_BUFFERS), [qo_indptr_buf, paged_kv_indptr_buf, paged_kv_indices_buf,
                                                  paged_kv_last_page_len_buf])
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph, impl=impl, jit_args=jit_args,
                         graph_buffers=buffers, max_pages_per_request=max_pages_per_request)

    def plan(self, qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, num_qo_heads: int,
             num_kv_heads: int, head_dim_qk: int, page_size: int, head_dim_vo: Optional[int] = None,
             custom_mask: Optional[Tensor] = None, packed_custom_mask: Optional[Tensor] = None, causal: bool = False,
             pos_encoding_mode: str = "NONE", use_fp16_qk_reduction: bool = False, sm_scale: Optional[float] = None,
             window_left: int = -1, logits_soft_cap: Optional[float] = None, rope_scale: Optional[float] = None,
             rope_theta: Optional[float] = None, q_data_type="float16", kv_data_type=None, o_data_type=None,
             non_blocking: bool = True, fixed_split_size: Optional[int] = None,
             disable_split_kv: bool = False) -> None:
        self._plan = None  # a plan that fails leaves none to run
        qo_lens = _lengths("qo_indptr", qo_indptr)
        table, kv_lens = _paged_table(paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len, int(page_size))
        if len(qo_lens) != len(kv_lens):
            raise ValueError(f"qo_indptr and paged_kv_indptr must have one entry per request and one more, got "
                             f"{len(qo_lens) + 1} and {len(kv_lens) + 1}")
        self._set_plan(qo_lens, kv_lens, num_qo_heads, num_kv_heads, head_dim_qk, o_data_type, table.device,
                       int(page_size), causal=bool(causal), pos_encoding_mode=pos_encoding_mode,
                       window_left=int(window_left), logits_soft_cap=logits_soft_cap, sm_scale=sm_scale,
                       rope_scale=rope_scale, rope_theta=rope_theta, block_table=table,
                       masks=_masks(custom_mask, packed_custom_mask, qo_lens, kv_lens),
                       non_blocking=non_blocking,
                       index_arrays=(qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len))

    begin_forward = plan

    def run(self, q: Tensor, paged_kv_cache, *args, q_scale=None, k_scale=None, v_scale=None,
            out: Optional[Tensor] = None, lse: Optional[Tensor] = None, return_lse: bool = False, enable_pdl=None,
            window_left: Optional[int] = None, sinks: Optional[Tensor] = None):
        return self._run_paged(q, paged_kv_cache, args, return_lse, q_scale, k_scale, v_scale, out, lse, window_left,
                               sinks)

    run_return_lse = functools.partialmethod(run, return_lse=True)


class BatchDecodeWithPagedKVCacheWrapper(_Wrapper):
    """FlashInfer's decoding over a paged KV cache, one query per request or q_len_per_req: plan(indptr,
    indices, last_page_len, num_qo_heads, num_kv_heads, head_dim, page_size, ...), then run(q (batch x
    q_len_per_req, num_qo_heads, head_dim), paged_kv_cache)."""

    def __init__(self, float_workspace_buffer: Optional[Tensor] = None, kv_layout: str = "NHD",
                 use_cuda_graph: bool = False, use_tensor_cores: bool = False, paged_kv_indptr_buffer=None,
                 paged_kv_indices_buffer=None, paged_kv_last_page_len_buffer=None, backend: str = "auto",
                 jit_args=None, *, impl: str = "auto", max_pages_per_request: Optional[int] = None):
        if jit_args is not None:
            raise ValueError("jit_args: FlashInfer's JIT decode variants are CUDA code genfast does not compile; "
                             "sinks= on run() takes attention sinks")
        buffers = (["paged_kv_indptr_buffer", "paged_kv_indices_buffer", "paged_kv_last_page_len_buffer"],
                   [paged_kv_indptr_buffer, paged_kv_indices_buffer, paged_kv_last_page_len_buffer])
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph, impl=impl, graph_buffers=buffers,
                         max_pages_per_request=max_pages_per_request)
        self.use_tensor_cores = use_tensor_cores

    def plan(self, indptr, indices, last_page_len, num_qo_heads: int, num_kv_heads: int, head_dim: int,
             page_size: int, *, pos_encoding_mode: str = "NONE", window_left: int = -1, window_right: int = 0,
             logits_soft_cap: Optional[float] = None, q_data_type="float16", kv_data_type=None, o_data_type=None,
             data_type=None, sm_scale: Optional[float] = None, rope_scale: Optional[float] = None,
             rope_theta: Optional[float] = None, non_blocking: bool = True, fixed_split_size: Optional[int] = None,
             disable_split_kv: bool = False, q_len_per_req: int = 1, block_tables: Optional[Tensor] = None,
             seq_lens: Optional[Tensor] = None) -> None:
        """q_len_per_req queries a request (speculative decoding's drafts), the last q_len_per_req
        positions of its keys, causal among themselves (bottom-right); window_right (FlashInfer's
        cute-dsl backend's) lets each see that many keys past its own, -1 all of them. seq_lens
        (batch,) gives each request's key count in place of the page lists' (as FlashInfer's plan
        takes it); block_tables (batch, pages), int32 or int64, each request's pages in place of
        indptr and indices (FlashInfer's trtllm-gen backend's)."""
        self._plan = None  # a plan that fails leaves none to run
        table, kv_lens = _paged_table(indptr, indices, last_page_len, int(page_size),
                                      ("indptr", "indices", "last_page_len"))
        table, kv_lens = _given_pages(table, kv_lens, block_tables, seq_lens, int(page_size))
        q_len = int(q_len_per_req)
        if q_len < 1:
            raise ValueError(f"q_len_per_req must be at least 1, got {q_len_per_req}")
        if q_len > 1 and any(n < q_len for n in kv_lens):
            raise ValueError(f"every request must hold at least q_len_per_req ({q_len}) keys, its queries' own, "
                             f"got {kv_lens}")
        window_right = int(window_right)
        if window_right < -1:
            raise ValueError(f"window_right must be -1 (no bound) or at least 0, got {window_right}")
        self._set_plan([q_len] * len(kv_lens), kv_lens, num_qo_heads, num_kv_heads, head_dim, o_data_type,
                       table.device, int(page_size), causal=window_right == 0, pos_encoding_mode=pos_encoding_mode,
                       window_left=int(window_left), window_right=window_right if window_right else -1,
                       logits_soft_cap=logits_soft_cap, sm_scale=sm_scale, rope_scale=rope_scale,
                       rope_theta=rope_theta, block_table=table, non_blocking=non_blocking,
                       index_arrays=(indptr, indices, last_page_len))

    begin_forward = plan

    def run(self, q: Tensor, paged_kv_cache, *args, q_scale=None, k_scale=None, v_scale=None,
            out: Optional[Tensor] = None, lse: Optional[Tensor] = None, return_lse: bool = False, enable_pdl=None,
            window_left: Optional[int] = None, sinks: Optional[Tensor] = None, q_len_per_req: Optional[int] = None):
        """q (batch x q_len_per_req, num_qo_heads, head_dim); q_len_per_req is plan()'s, and here
        (FlashInfer's older place for it) only checked against it."""
        planned = self._planned().qo_lens
        if q_len_per_req is not None and planned and int(q_len_per_req) != planned[0]:
            raise ValueError(f"q_len_per_req ({q_len_per_req}) must be the planned one ({planned[0]}): pass it to "
                             "plan()")
        return self._run_paged(q, paged_kv_cache, args, return_lse, q_scale, k_scale, v_scale, out, lse, window_left,
                               sinks)

    run_return_lse = functools.partialmethod(run, return_lse=True)


class BatchAttentionWithAttentionSinkWrapper(BatchPrefillWithPagedKVCacheWrapper):
    """FlashInfer's paged prefill with attention sinks (gpt-oss): plan as
    BatchPrefillWithPagedKVCacheWrapper, then run(q, paged_kv_cache, sink (num_qo_heads,) float32,
    sm_scale), the sink a natural-log logit, unscaled, in each row's softmax. The constructor's
    dtypes, head dims and window choose FlashInfer's compiled variant; genfast takes them and plans
    from plan()'s."""

    def __init__(self, float_workspace_buffer: Optional[Tensor] = None, kv_layout: str = "NHD",
                 use_cuda_graph: bool = False, qo_indptr_buf=None, paged_kv_indptr_buf=None,
                 paged_kv_indices_buf=None, paged_kv_last_page_len_buf=None, custom_mask_buf=None,
                 mask_indptr_buf=None, backend: str = "auto", pos_encoding_mode: str = "NONE",
                 use_fp16_qk_reduction: bool = False, q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16,
                 head_dim_qk: int = 128, head_dim_vo: int = 128, window_left: int = -1, *, impl: str = "auto",
                 max_pages_per_request: Optional[int] = None):
        if pos_encoding_mode != "NONE":
            raise ValueError(f"pos_encoding_mode must be 'NONE' with attention sinks, got {pos_encoding_mode!r}")
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph, qo_indptr_buf, paged_kv_indptr_buf,
                         paged_kv_indices_buf, paged_kv_last_page_len_buf, impl=impl,
                         max_pages_per_request=max_pages_per_request)
        self._sink_variant = True
