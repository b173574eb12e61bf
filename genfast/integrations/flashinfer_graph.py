"""use_cuda_graph=True on FlashInfer's paged wrappers (genfast.integrations.flashinfer): a run captured
in a CUDA graph reads the plan's tensors at the addresses they had at capture, so each plan() writes
its values into tensors the wrapper holds for its life, as FlashInfer's plan() writes into the
buffers given to its constructor. What a replay cannot change is fixed at the first plan: the batch
size (the buffers'), each request's query count, the heads, head dim, page size and every other
setting. The key count bound a run passes (the CUDA kernels size their grids and key splits by
it) is the held block table's, max_pages_per_request pages of page_size keys."""

from typing import Dict, List, Optional

import torch

from .flashinfer_common import Plan

Tensor = torch.Tensor

# the plan's tensors a run reads, in the order prepare() makes them
_HELD = ("cu_q", "cu_k", "block_table", "slopes", "lse_shift")
# a held block table of batch x the indices buffer's pages (max_pages_per_request's default) up to 4 MiB
_MOST_TABLE_ENTRIES_BY_DEFAULT = 1 << 20


def _index_buffer(wrapper: str, name: str, t) -> Tensor:
    if not isinstance(t, Tensor) or t.dim() != 1 or t.dtype != torch.int32:
        raise ValueError(f"{wrapper}(use_cuda_graph=True) needs {name}, a 1-d int32 tensor, as FlashInfer's does; got "
                         f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    return t


class CudaGraphPlans:
    """The buffers given to a wrapper's constructor (FlashInfer's names, in `names` order: qo_indptr's
    where the wrapper takes one, then the page lists' indptr, indices and last_page_len) and the
    tensors held for its runs."""

    def __init__(self, wrapper: str, names: List[str], buffers: List, max_pages_per_request: Optional[int]):
        self.wrapper = wrapper
        self.buffers = {name: _index_buffer(wrapper, name, t) for name, t in zip(names, buffers)}
        self.names = names
        indptr, indices, last = (self.buffers[n] for n in names[-3:])
        self.batch = last.numel()
        for name in names[:-3] + names[-3:-2]:
            if self.buffers[name].numel() != self.batch + 1:
                raise ValueError(f"{wrapper}: {name} must hold batch_size + 1 = {self.batch + 1} values ({names[-1]} "
                                 f"holds batch_size), got {self.buffers[name].numel()}")
        self.capacity = indices.numel()
        if max_pages_per_request is None and self.batch * self.capacity > _MOST_TABLE_ENTRIES_BY_DEFAULT:
            raise ValueError(f"{wrapper}(use_cuda_graph=True) needs max_pages_per_request (genfast's keyword: the most "
                             f"pages one request holds) where {names[-2]} is this large: the held block table is batch "
                             f"x that ({self.batch} x {self.capacity} by default), and its width bounds the keys the "
                             "kernels split")
        self.max_pages = self.capacity if max_pages_per_request is None else int(max_pages_per_request)
        if self.max_pages < 1:
            raise ValueError(f"max_pages_per_request must be at least 1, got {max_pages_per_request}")
        self.device = indptr.device  # the buffers', where FlashInfer's plan puts its tensors
        self.held: Dict[str, Tensor] = {}
        self.frozen: Optional[tuple] = None

    def check(self, plan: Plan, page_size: int) -> None:
        """Raises where this plan does not fit the buffers or differs from the first in what a replay keeps."""
        pages = [-(-n // page_size) for n in plan.kv_lens]
        if plan.per_request:
            raise ValueError(f"{self.wrapper}(use_cuda_graph=True): custom masks, and ALiBi without causal over "
                             "several queries, run one request at a time, which a CUDA graph does not replay for "
                             "another plan; plan without them")
        if plan.pos_encoding_mode == "ROPE_LLAMA":
            raise ValueError(f"{self.wrapper}(use_cuda_graph=True): pos_encoding_mode='ROPE_LLAMA' gathers each "
                             "plan's keys to turn them, as many as it holds, which a replay does not follow; turn "
                             "the keys as they are written (genfast.kvcache_append's rotary_cos and rotary_sin) and "
                             "plan with 'NONE'")
        if len(pages) != self.batch:
            raise ValueError(f"{self.wrapper}(use_cuda_graph=True): the batch size is fixed at {self.batch} (its "
                             f"buffers'), got {len(pages)} requests")
        if max(pages, default=0) > self.max_pages:
            raise ValueError(f"{self.wrapper}(use_cuda_graph=True): a request holds {max(pages)} pages, more than "
                             f"max_pages_per_request ({self.max_pages}), the block table's width")
        settings = (plan.qo_lens, plan.num_qo_heads, plan.num_kv_heads, plan.head_dim, page_size, plan.causal,
                    plan.pos_encoding_mode, plan.window_left, plan.window_right, plan.logits_soft_cap, plan.sm_scale,
                    plan.rope_scale, plan.rope_theta, plan.o_dtype)
        if self.frozen is not None and settings != self.frozen:
            raise ValueError(f"{self.wrapper}(use_cuda_graph=True): a captured run keeps the first plan's query "
                             "counts, heads, head dim, page size and settings; plan the same ones (only the pages "
                             "and key counts change), or use another wrapper")
        self.settings, self.pages = settings, sum(pages)  # frozen once the plan is held

    def write(self, values: List) -> None:
        """FlashInfer's plan(): the constructor's buffers get the checked plan's index arrays, the indices
        cut to the pages the requests hold (genfast's runs read the held tensors, made from the same values)."""
        values = [torch.as_tensor(value, dtype=torch.int32).reshape(-1) for value in values]
        values[-2] = values[-2][:self.pages]  # (fewer where block_tables stand in for the page lists)
        if values[-2].numel() > self.capacity:
            raise ValueError(f"{self.wrapper}(use_cuda_graph=True): the requests hold {values[-2].numel()} pages, "
                             f"more than {self.names[-2]} ({self.capacity})")
        for name, value in zip(self.names, values):
            self.buffers[name][:value.numel()].copy_(value, non_blocking=True)

    def hold(self, plan: Plan, page_size: int) -> None:
        """The plan's tensors replaced by the held ones, written with their values (the block table
        into its first columns, the rest zeroed: the kernels read no entry past a request's keys)."""
        for name in _HELD:
            fresh = getattr(plan, name)
            if fresh is None:
                continue
            held = self.held.get(name)
            if held is None:
                shape = (self.batch, self.max_pages) if name == "block_table" else fresh.shape
                held = self.held[name] = torch.zeros(shape, dtype=fresh.dtype, device=fresh.device)
            if name == "block_table":  # columns past max_pages_per_request name no request's keys (checked)
                fresh = fresh[:, :self.max_pages]
                held[:, fresh.shape[1]:].zero_()  # no earlier plan's pages (an fp8 cache gathers every entry)
            held[tuple(slice(0, n) for n in fresh.shape)].copy_(fresh)
            setattr(plan, name, held)
            plan.device = held.device  # where a run must be (a later plan's index arrays may lie elsewhere)
        plan.kv_bound = self.max_pages * page_size
        self.frozen = self.settings
