"""xformers.ops.fmha.attn_bias's attention biases without xformers: the same classes, fields and
constructors, so that code building them runs where xformers does not, and
genfast.integrations.xformers.ops.memory_efficient_attention reads them as genfast's causal masks,
windows and packed sequences, nothing materialized. It reads xformers' own objects the same way,
by class name (`band`).

materialize() builds the dense additive bias (0 or -inf), as xformers' does: for tests and
debugging. Each bias is a band of keys around a diagonal of each block of queries and keys: the
top-left one (key i for query i) or the bottom-right one (the last key for the last query)."""

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar, Iterable, List, Optional, Sequence, Tuple, Type

import torch

Tensor = torch.Tensor


def _default_device(device) -> torch.device:
    """xformers' default for the sequence lengths' tensors: the GPU where there is one."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


class AttentionBias:
    """A bias added to q k^T before the softmax, given by its structure rather than a tensor."""

    def materialize(self, shape: Tuple[int, ...], dtype: torch.dtype = torch.float32,
                    device="cpu") -> Tensor:
        raise NotImplementedError(f"{type(self).__name__}.materialize")

    def to(self, device) -> "AttentionBias":
        """The bias with its tensors on `device`."""
        if not dataclasses.is_dataclass(self):
            return self
        moved = {f.name: _moved(getattr(self, f.name), device) for f in dataclasses.fields(self) if f.init}
        return type(self)(**moved)


def _moved(value, device):
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, _SeqLenInfo):
        return value.to(device)
    return value


def band(bias) -> Tuple[str, Optional[int], Optional[int]]:
    """(diagonal, left, right) of a bias, this module's or xformers' own, read by its class name:
    each block's query i sees the keys from `left` before to `right` after its place on the
    diagonal ("top_left": key i; "bottom_right": key i + keys - queries); None is unbounded."""
    for cls in type(bias).__mro__:
        read = _BANDS.get(cls.__name__)
        if read is not None:
            return read(bias)
    raise NotImplementedError(f"attn_bias of type {type(bias).__name__}: genfast takes xformers' causal, local, "
                              "block-diagonal, padded-keys, gappy-keys and paged biases and tensors, not this one")


_BANDS = {
    "LowerTriangularMask": lambda b: ("top_left", None, 0),
    "LowerTriangularFromBottomRightMask": lambda b: ("bottom_right", None, 0),
    "LowerTriangularFromBottomRightLocalAttentionMask": lambda b: ("bottom_right", b._window_size - 1, 0),
    "LocalAttentionFromBottomRightMask": lambda b: ("bottom_right", b.window_left, b.window_right),
    "BlockDiagonalCausalLocalAttentionFromBottomRightMask": lambda b: ("bottom_right", b._window_size - 1, 0),
    "BlockDiagonalCausalLocalAttentionMask": lambda b: ("top_left", b._window_size - 1, 0),
    "BlockDiagonalCausalFromBottomRightMask": lambda b: ("bottom_right", None, 0),
    "BlockDiagonalCausalMask": lambda b: ("top_left", None, 0),
    "BlockDiagonalMask": lambda b: ("bottom_right", None, None),
    "BlockDiagonalCausalWithOffsetPaddedKeysMask": lambda b: ("bottom_right", None, 0),
    "BlockDiagonalLocalAttentionPaddedKeysMask": lambda b: ("bottom_right", b.window_left, b.window_right),
    "BlockDiagonalCausalLocalAttentionPaddedKeysMask": lambda b: ("bottom_right", b._window_size - 1, 0),
    "BlockDiagonalPaddedKeysMask": lambda b: ("bottom_right", None, None),
    "PagedBlockDiagonalCausalWithOffsetPaddedKeysMask": lambda b: ("bottom_right", None, 0),
    "PagedBlockDiagonalPaddedKeysMask": lambda b: ("bottom_right", None, None),
    "BlockDiagonalCausalWithOffsetGappyKeysMask": lambda b: ("bottom_right", None, 0),
    "BlockDiagonalGappyKeysMask": lambda b: ("bottom_right", None, None),
    "PagedBlockDiagonalCausalWithOffsetGappyKeysMask": lambda b: ("bottom_right", None, 0),
    "PagedBlockDiagonalGappyKeysMask": lambda b: ("bottom_right", None, None),
}


def _band_bias(bias, queries: int, keys: int, dtype, device) -> Tensor:
    """The (queries, keys) block of a bias: 0 in its band, -inf out of it."""
    diagonal, left, right = band(bias)
    shift = keys - queries if diagonal == "bottom_right" else 0
    offset = torch.arange(keys, device=device)[None, :] - torch.arange(queries, device=device)[:, None] - shift
    keep = torch.ones(queries, keys, dtype=torch.bool, device=device)
    if left is not None:
        keep &= offset >= -left
    if right is not None:
        keep &= offset <= right
    return torch.zeros(queries, keys, dtype=dtype, device=device).masked_fill(~keep, -math.inf)


def _check_window(name: str, value: int, least: int) -> None:
    if value < least:
        raise ValueError(f"{name} must be >= {least}, got {value}")


class LowerTriangularMask(AttentionBias):
    """Causal from the top-left corner: query i sees keys 0 .. i."""

    def __init__(self, device=None) -> None:
        """device: unused, as in xformers."""

    def materialize(self, shape, dtype=torch.float32, device="cpu") -> Tensor:
        return _band_bias(self, shape[-2], shape[-1], dtype, device).expand(shape).contiguous()

    def add_bias(self, bias: Tensor) -> "LowerTriangularMaskWithTensorBias":
        return LowerTriangularMaskWithTensorBias(bias)


class LowerTriangularMaskWithTensorBias(LowerTriangularMask):
    """LowerTriangularMask plus a tensor bias, (batch, heads, queries, keys) or broadcast to it."""

    def __init__(self, bias: Tensor) -> None:
        self._bias = bias

    def to(self, device) -> "LowerTriangularMaskWithTensorBias":
        return LowerTriangularMaskWithTensorBias(self._bias.to(device))

    def materialize(self, shape, dtype=torch.float32, device="cpu") -> Tensor:
        return super().materialize(shape, dtype, device) + self._bias


class LowerTriangularFromBottomRightMask(AttentionBias):
    """Causal from the bottom-right corner: the last query sees every key."""

    def materialize(self, shape, dtype=torch.float32, device="cpu") -> Tensor:
        return _band_bias(self, shape[-2], shape[-1], dtype, device).expand(shape).contiguous()

    def make_local_attention(self, window_size: int) -> "LowerTriangularFromBottomRightLocalAttentionMask":
        return LowerTriangularFromBottomRightLocalAttentionMask(window_size)


@dataclass
class LowerTriangularFromBottomRightLocalAttentionMask(LowerTriangularFromBottomRightMask):
    """Causal from the bottom-right corner, each query seeing its last _window_size keys."""

    _window_size: int

    def __post_init__(self) -> None:
        _check_window("window_size", self._window_size, 1)


@dataclass
class LocalAttentionFromBottomRightMask(AttentionBias):
    """Query i sees keys window_left before to window_right after its place on the bottom-right
    diagonal."""

    window_left: int
    window_right: int

    def __post_init__(self) -> None:
        _check_window("window_left", self.window_left, 0)
        _check_window("window_right", self.window_right, 0)

    def materialize(self, shape, dtype=torch.float32, device="cpu") -> Tensor:
        return _band_bias(self, shape[-2], shape[-1], dtype, device).expand(shape).contiguous()


def _lengths(seqlens) -> List[int]:
    """Sequence lengths as Python ints, which the host reads (a tensor of them would synchronize)."""
    if isinstance(seqlens, Tensor):
        raise TypeError("seqlens must be a sequence of ints, not a tensor (reading one would synchronize)")
    return [int(length) for length in seqlens]


@dataclass
class _SeqLenInfo:
    """A dimension cut into blocks: block n at seqstart_py[n] .. seqstart_py[n + 1] (seqstart the same,
    int32 on the device)."""

    seqstart: Tensor
    max_seqlen: int
    min_seqlen: int
    seqstart_py: List[int]

    def to(self, device) -> "_SeqLenInfo":
        if self.seqstart.device == torch.device(device):
            return self
        return dataclasses.replace(self, **{f.name: _moved(getattr(self, f.name), device)
                                            for f in dataclasses.fields(self)})

    def intervals(self) -> Iterable[Tuple[int, int]]:
        yield from zip(self.seqstart_py, self.seqstart_py[1:])

    @staticmethod
    def _starts(seqlens: Sequence[int]) -> List[int]:
        starts = [0]
        for length in seqlens:
            starts.append(starts[-1] + int(length))
        return starts

    @classmethod
    def from_seqlens(cls, seqlens: Iterable[int], *, device=None) -> "_SeqLenInfo":
        seqlens = _lengths(seqlens)
        starts = cls._starts(seqlens)
        return cls(seqstart=torch.tensor(starts, dtype=torch.int32, device=_default_device(device)),
                   max_seqlen=max(seqlens, default=-1), min_seqlen=min(seqlens, default=-1), seqstart_py=starts)

    def from_seqlens_inplace(self, seqlens: Iterable[int]) -> None:
        """New lengths, as many and no longer than the longest before, written into the same tensor
        (for CUDA graphs)."""
        seqlens = _lengths(seqlens)
        starts = self._starts(seqlens)
        if len(starts) != len(self.seqstart_py):
            raise ValueError(f"seqlens must keep the {len(self.seqstart_py) - 1} blocks, got {len(seqlens)}")
        if max(seqlens, default=-1) > self.max_seqlen:
            raise ValueError(f"seqlens must be at most the max_seqlen {self.max_seqlen}, got {max(seqlens)}")
        self.seqstart_py[:] = starts
        self.seqstart.copy_(torch.tensor(starts, dtype=torch.int32), non_blocking=True)

    def split(self, x: Tensor, batch_sizes: Optional[Sequence[int]] = None) -> List[Tensor]:
        """x (1, total, ...) cut into its blocks, batch_sizes[i] blocks of one length as one (bs, length, ...)."""
        if x.shape[0] != 1 or x.shape[1] != self.seqstart_py[-1]:
            raise ValueError(f"x must have shape (1, {self.seqstart_py[-1]}, ...), got {tuple(x.shape)}")
        batch_sizes = [1] * (len(self.seqstart_py) - 1) if batch_sizes is None else batch_sizes
        chunks, block = [], 0
        for size in batch_sizes:
            chunks.append(self.seqstart_py[block + size] - self.seqstart_py[block])
            block += size
        return [part.reshape(size, -1, *part.shape[2:]) for size, part in zip(batch_sizes, x.split(chunks, dim=1))]


@dataclass
class _PaddedSeqLenInfo(_SeqLenInfo):
    """Blocks of `padding` rows each, block n using its first seqlen_py[n] (seqlen the same, int32 on
    the device)."""

    seqlen: Tensor
    seqlen_py: List[int]
    padding: int

    def intervals(self) -> Iterable[Tuple[int, int]]:
        for start, length in zip(self.seqstart_py, self.seqlen_py):
            yield start, start + length

    @classmethod
    def from_seqlens(cls, seqlens, *, device=None):
        raise RuntimeError("use _SeqLenInfo.from_seqlens or _PaddedSeqLenInfo.from_seqlens_padded")

    @classmethod
    def from_seqlens_padded(cls, seqlens: Sequence[int], padding: int, *, device=None) -> "_PaddedSeqLenInfo":
        seqlens = _lengths(seqlens)
        if any(length > padding or length < 0 for length in seqlens):
            raise ValueError(f"each of seqlens must lie in 0 .. padding = {padding}, got {seqlens}")
        device = _default_device(device)
        starts = list(range(0, len(seqlens) * padding + 1, padding))
        return cls(seqstart=torch.tensor(starts, dtype=torch.int32, device=device),
                   max_seqlen=max(seqlens, default=-1), min_seqlen=min(seqlens, default=-1), seqstart_py=starts,
                   seqlen=torch.tensor(seqlens, dtype=torch.int32, device=device), seqlen_py=seqlens,
                   padding=padding)

    def from_seqlens_padded_inplace(self, seqlens: Sequence[int]) -> None:
        """New used lengths, as many and no longer than the longest before, written into the same
        tensor (for CUDA graphs)."""
        seqlens = _lengths(seqlens)
        if len(seqlens) != len(self.seqlen_py):
            raise ValueError(f"seqlens must keep the {len(self.seqlen_py)} blocks, got {len(seqlens)}")
        if max(seqlens, default=-1) > self.max_seqlen:
            raise ValueError(f"seqlens must be at most the max_seqlen {self.max_seqlen}, got {max(seqlens)}")
        self.seqlen_py[:] = seqlens
        self.seqlen.copy_(torch.tensor(seqlens, dtype=torch.int32), non_blocking=True)

    def split(self, x, batch_sizes=None):
        raise NotImplementedError("_PaddedSeqLenInfo.split")


def _paged_bias(bias, logical: Tensor, dtype, device) -> Tensor:
    """A paged bias's columns from its unpaged form's (..., queries, blocks x the table's keys a
    block): (..., queries, (the largest page named + 1) x page_size), -inf on rows no table names."""
    row_len = bias.block_tables.shape[1] * bias.page_size
    pages = bias.block_tables.tolist()
    width = (max((max(row, default=-1) for row in pages), default=-1) + 1) * bias.page_size
    physical = torch.full((*logical.shape[:-1], width), -math.inf, dtype=dtype, device=device)
    for n, (q0, q1) in enumerate(bias.q_seqinfo.intervals()):
        for page_index, page in enumerate(pages[n]):
            source = n * row_len + page_index * bias.page_size
            physical[..., q0:q1, page * bias.page_size:(page + 1) * bias.page_size] = \
                logical[..., q0:q1, source:source + bias.page_size]
    return physical


def _block_diagonal_bias(bias, shape, dtype, device) -> Tensor:
    """-inf but each block's own band, over (total queries, total keys) rows."""
    total_q, total_k = bias.q_seqinfo.seqstart_py[-1], bias.k_seqinfo.seqstart_py[-1]
    if tuple(shape[-2:]) != (total_q, total_k):
        raise ValueError(f"shape must end in ({total_q}, {total_k}), the bias's queries and keys, got {tuple(shape)}")
    mask = torch.full((total_q, total_k), -math.inf, dtype=dtype, device=device)
    for (q0, q1), (k0, k1) in zip(bias.q_seqinfo.intervals(), bias.k_seqinfo.intervals()):
        mask[q0:q1, k0:k1] = _band_bias(bias, q1 - q0, k1 - k0, dtype, device)
    return mask.expand(shape)


@dataclass
class BlockDiagonalMask(AttentionBias):
    """Packed sequences: the queries of block i see the keys of block i alone. q, k and v are
    (1, total, heads, dim)."""

    q_seqinfo: _SeqLenInfo
    k_seqinfo: _SeqLenInfo
    _batch_sizes: Optional[Sequence[int]] = None

    def materialize(self, shape, dtype=torch.float32, device="cpu") -> Tensor:
        return _block_diagonal_bias(self, shape, dtype, device)

    @classmethod
    def from_seqlens(cls, q_seqlen: Sequence[int], kv_seqlen: Optional[Sequence[int]] = None, *, device=None):
        if kv_seqlen is not None and len(kv_seqlen) != len(q_seqlen):
            raise ValueError(f"kv_seqlen must have q_seqlen's {len(q_seqlen)} blocks, got {len(kv_seqlen)}")
        q_seqinfo = _SeqLenInfo.from_seqlens(q_seqlen, device=device)
        same = kv_seqlen is None or list(kv_seqlen) == list(q_seqlen)
        k_seqinfo = q_seqinfo if same else _SeqLenInfo.from_seqlens(kv_seqlen, device=device)
        return cls(q_seqinfo=q_seqinfo, k_seqinfo=k_seqinfo)

    @classmethod
    def from_tensor_list(cls, tensors: Sequence[Tensor]) -> Tuple["BlockDiagonalMask", Tensor]:
        """The bias of tensors (B_i, M_i, ...) packed as blocks, and the tensors packed, (1, sum B_i M_i, ...)."""
        bias = cls.from_seqlens([x.shape[1] for x in tensors for _ in range(x.shape[0])],
                                device=tensors[0].device)
        bias._batch_sizes = [x.shape[0] for x in tensors]
        return bias, torch.cat([x.reshape(1, -1, *x.shape[2:]) for x in tensors], dim=1)

    @classmethod
    def from_tensor_lists_qkv(cls, tensors_q: Sequence[Tensor], tensors_k: Sequence[Tensor],
                              tensors_v: Optional[Sequence[Tensor]] = None):
        """from_tensor_list of queries and keys (and values) of their own lengths."""
        if len(tensors_k) != len(tensors_q) or (tensors_v is not None and len(tensors_v) != len(tensors_q)):
            raise ValueError("tensors_q, tensors_k and tensors_v must be as many")
        bias = cls.from_seqlens([x.shape[1] for x in tensors_q for _ in range(x.shape[0])],
                                [x.shape[1] for x in tensors_k for _ in range(x.shape[0])],
                                device=tensors_q[0].device)
        bias._batch_sizes = [x.shape[0] for x in tensors_q]

        def packed(ts):
            return None if ts is None else torch.cat([x.reshape(1, -1, *x.shape[2:]) for x in ts], dim=1)
        return bias, packed(tensors_q), packed(tensors_k), packed(tensors_v)

    def split_queries(self, tensor: Tensor) -> Sequence[Tensor]:
        return self.q_seqinfo.split(tensor, self._batch_sizes)

    def split_kv(self, tensor: Tensor) -> Sequence[Tensor]:
        return self.k_seqinfo.split(tensor, self._batch_sizes)

    def split(self, tensor: Tensor) -> Sequence[Tensor]:
        """from_tensor_list undone: (1, total, ...) back to the list."""
        if self.q_seqinfo.seqstart_py != self.k_seqinfo.seqstart_py:
            raise ValueError("split needs blocks of queries and keys of one length: use split_queries or split_kv")
        return self.q_seqinfo.split(tensor, self._batch_sizes)

    def _with(self, cls, **fields):
        return cls(q_seqinfo=self.q_seqinfo, k_seqinfo=self.k_seqinfo, _batch_sizes=self._batch_sizes, **fields)

    def make_causal(self) -> "BlockDiagonalCausalMask":
        return self._with(BlockDiagonalCausalMask)

    def make_causal_from_bottomright(self) -> "BlockDiagonalCausalFromBottomRightMask":
        return self._with(BlockDiagonalCausalFromBottomRightMask)

    def make_local_attention(self, window_size: int) -> "BlockDiagonalCausalLocalAttentionMask":
        return self._with(BlockDiagonalCausalLocalAttentionMask, _window_size=window_size)

    def make_local_attention_from_bottomright(self, window_size: int):
        return self._with(BlockDiagonalCausalLocalAttentionFromBottomRightMask, _window_size=window_size)


@dataclass
class BlockDiagonalCausalMask(BlockDiagonalMask):
    """BlockDiagonalMask, each block causal from its top-left corner."""


@dataclass
class BlockDiagonalCausalFromBottomRightMask(BlockDiagonalMask):
    """BlockDiagonalMask, each block causal from its bottom-right corner (no block with fewer keys
    than queries)."""

    def __post_init__(self) -> None:
        for n, ((q0, q1), (k0, k1)) in enumerate(zip(self.q_seqinfo.intervals(), self.k_seqinfo.intervals())):
            if k1 - k0 < q1 - q0:
                raise ValueError(f"block {n} has {k1 - k0} keys and {q1 - q0} queries: each block needs as many "
                                 "keys as queries or more")


@dataclass
class BlockDiagonalCausalLocalAttentionMask(BlockDiagonalCausalMask):
    """BlockDiagonalCausalMask, query i of a block seeing its keys i - _window_size + 1 .. i."""

    _window_size: int = 0

    def __post_init__(self) -> None:
        _check_window("window_size", self._window_size, 1)
        for n, ((q0, q1), (k0, k1)) in enumerate(zip(self.q_seqinfo.intervals(), self.k_seqinfo.intervals())):
            if q1 - q0 - self._window_size >= k1 - k0:
                raise ValueError(f"block {n}'s last queries see no key: {q1 - q0} queries, {k1 - k0} keys, window "
                                 f"{self._window_size}")


@dataclass
class BlockDiagonalCausalLocalAttentionFromBottomRightMask(BlockDiagonalCausalFromBottomRightMask):
    """BlockDiagonalCausalFromBottomRightMask, each query seeing its last _window_size keys."""

    _window_size: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_window("window_size", self._window_size, 1)


@dataclass
class BlockDiagonalPaddedKeysMask(AttentionBias):
    """Packed queries over keys in blocks of k_seqinfo.padding rows, block i using its first
    k_seqinfo.seqlen_py[i] keys (a padded KV cache, (1, batch x padding, heads, dim))."""

    q_seqinfo: _SeqLenInfo
    k_seqinfo: _PaddedSeqLenInfo

    def materialize(self, shape, dtype=torch.float32, device="cpu") -> Tensor:
        return _block_diagonal_bias(self, shape, dtype, device)

    @classmethod
    def from_seqlens(cls, q_seqlen: Sequence[int], kv_padding: int, kv_seqlen: Sequence[int], causal_diagonal=None,
                     *, device=None):
        """causal_diagonal: unused, as in xformers."""
        if len(kv_seqlen) != len(q_seqlen):
            raise ValueError(f"kv_seqlen must have q_seqlen's {len(q_seqlen)} blocks, got {len(kv_seqlen)}")
        return cls(q_seqinfo=_SeqLenInfo.from_seqlens(q_seqlen, device=device),
                   k_seqinfo=_PaddedSeqLenInfo.from_seqlens_padded(kv_seqlen, kv_padding, device=device))

    def make_paged(self, block_tables: Tensor, page_size: int,
                   paged_type: Type["PagedBlockDiagonalPaddedKeysMask"]) -> "PagedBlockDiagonalPaddedKeysMask":
        k_seqinfo = dataclasses.replace(self.k_seqinfo, padding=block_tables.shape[1] * page_size)
        return paged_type(q_seqinfo=self.q_seqinfo, k_seqinfo=k_seqinfo, block_tables=block_tables,
                          page_size=page_size)

    def make_local_attention(self, window_left: int, window_right: int):
        return BlockDiagonalLocalAttentionPaddedKeysMask(q_seqinfo=self.q_seqinfo, k_seqinfo=self.k_seqinfo,
                                                         window_left=window_left, window_right=window_right)


@dataclass
class BlockDiagonalCausalWithOffsetPaddedKeysMask(BlockDiagonalPaddedKeysMask):
    """BlockDiagonalPaddedKeysMask, each block causal from the bottom-right corner of its used keys."""

    causal_diagonal: object = None  # unused, as in xformers


@dataclass
class BlockDiagonalLocalAttentionPaddedKeysMask(BlockDiagonalPaddedKeysMask):
    """BlockDiagonalPaddedKeysMask, each query seeing window_left keys before to window_right after its
    place on its block's bottom-right diagonal."""

    window_left: int
    window_right: int

    @classmethod
    def from_seqlens_local(cls, q_seqlen, kv_padding, kv_seqlen, window_left, window_right):
        padded = BlockDiagonalPaddedKeysMask.from_seqlens(q_seqlen, kv_padding, kv_seqlen)
        return cls(q_seqinfo=padded.q_seqinfo, k_seqinfo=padded.k_seqinfo, window_left=window_left,
                   window_right=window_right)


@dataclass
class BlockDiagonalCausalLocalAttentionPaddedKeysMask(BlockDiagonalPaddedKeysMask):
    """BlockDiagonalCausalWithOffsetPaddedKeysMask, each query seeing its last _window_size keys."""

    _window_size: int

    def __post_init__(self) -> None:
        _check_window("window_size", self._window_size, 1)

    @classmethod
    def from_seqlens_local(cls, q_seqlen, kv_padding, kv_seqlen, window_size):
        padded = BlockDiagonalPaddedKeysMask.from_seqlens(q_seqlen, kv_padding, kv_seqlen)
        return cls(q_seqinfo=padded.q_seqinfo, k_seqinfo=padded.k_seqinfo, _window_size=window_size)


@dataclass
class PagedBlockDiagonalPaddedKeysMask(AttentionBias):
    """BlockDiagonalPaddedKeysMask over a paged cache: k and v (1, pages x page_size, heads, dim),
    key j of block i at row j % page_size of page block_tables[i, j // page_size]."""

    q_seqinfo: _SeqLenInfo
    k_seqinfo: _PaddedSeqLenInfo
    block_tables: Tensor
    page_size: int

    _UNPAGED_TYPE: ClassVar[Type[BlockDiagonalPaddedKeysMask]] = BlockDiagonalPaddedKeysMask

    def materialize(self, shape, dtype=torch.float32, device="cpu") -> Tensor:
        """shape (..., queries, blocks x the table's keys a block), the unpaged bias's: its columns
        moved to the rows of their pages, (..., queries, (the largest page named + 1) x page_size),
        -inf on rows no table names."""
        row_len = self.block_tables.shape[1] * self.page_size
        unpaged = self._UNPAGED_TYPE(
            q_seqinfo=self.q_seqinfo,
            k_seqinfo=_PaddedSeqLenInfo.from_seqlens_padded(self.k_seqinfo.seqlen_py, row_len, device=device))
        return _paged_bias(self, unpaged.materialize(shape, dtype, device), dtype, device)

    @classmethod
    def from_seqlens(cls, q_seqlen: Sequence[int], kv_seqlen: Sequence[int], block_tables: Tensor, page_size: int,
                     *, device=None):
        if len(kv_seqlen) != len(q_seqlen):
            raise ValueError(f"kv_seqlen must have q_seqlen's {len(q_seqlen)} blocks, got {len(kv_seqlen)}")
        return cls(q_seqinfo=_SeqLenInfo.from_seqlens(q_seqlen, device=device),
                   k_seqinfo=_PaddedSeqLenInfo.from_seqlens_padded(kv_seqlen, block_tables.shape[1] * page_size,
                                                                   device=device),
                   block_tables=block_tables, page_size=page_size)


@dataclass
class PagedBlockDiagonalCausalWithOffsetPaddedKeysMask(PagedBlockDiagonalPaddedKeysMask):
    """PagedBlockDiagonalPaddedKeysMask, each block causal from the bottom-right corner of its keys."""

    _UNPAGED_TYPE: ClassVar[Type[BlockDiagonalPaddedKeysMask]] = BlockDiagonalCausalWithOffsetPaddedKeysMask


@dataclass
class _GappySeqInfo(_SeqLenInfo):
    """Blocks anywhere: block n at seqstart_py[n] .. + seqlen_py[n] (seqstart_py's last entry the
    whole length); for a paged bias, at seqstart_py[n] .. seqlen_py[n] (its end) of its own table
    row, seqstart_py's last entry -1."""

    seqlen: Tensor
    seqlen_py: List[int]

    def intervals(self) -> Iterable[Tuple[int, int]]:
        for start, length in zip(self.seqstart_py, self.seqlen_py):
            yield start, start + length

    @classmethod
    def from_seqlens(cls, seqlens, *, device=None):
        raise NotImplementedError("use _GappySeqInfo.from_seqlens_gappy")

    @classmethod
    def from_seqlens_gappy(cls, seqstarts: Sequence[int], seqlens: Sequence[int], paged: bool, *,
                           device) -> "_GappySeqInfo":
        starts, seqlens = _lengths(seqstarts), _lengths(seqlens)
        if not seqlens or min(seqlens) < 0:
            raise ValueError(f"seqlens must name at least one block, each of 0 keys or more, got {seqlens}")
        if len(starts) != len(seqlens) + (0 if paged else 1):
            raise ValueError(f"seqstarts must have {len(seqlens) + (0 if paged else 1)} entries for {len(seqlens)} "
                             f"blocks{'' if paged else ' (and the whole length last)'}, got {len(starts)}")
        ends = seqlens
        if paged:
            starts = starts + [-1]
            ends = [start + length for start, length in zip(starts, seqlens)]
        device = _default_device(device)
        return cls(seqstart=torch.tensor(starts, dtype=torch.int32, device=device), max_seqlen=max(seqlens),
                   min_seqlen=min(seqlens), seqstart_py=starts,
                   seqlen=torch.tensor(ends, dtype=torch.int32, device=device), seqlen_py=ends)

    def split(self, x, batch_sizes=None):
        raise NotImplementedError("_GappySeqInfo.split")


@dataclass
class BlockDiagonalGappyKeysMask(AttentionBias):
    """Packed queries over keys anywhere: block i's at k_seqinfo.seqstart_py[i] .. + seqlen_py[i]
    (blocks may leave gaps between them, or share keys)."""

    q_seqinfo: _SeqLenInfo
    k_seqinfo: _GappySeqInfo

    def materialize(self, shape, dtype=torch.float32, device="cpu") -> Tensor:
        return _block_diagonal_bias(self, shape, dtype, device)

    @classmethod
    def from_seqlens(cls, q_seqlen: Sequence[int], kv_seqstarts: Sequence[int], kv_seqlen: Sequence[int], *,
                     device=None):
        if len(kv_seqlen) != len(q_seqlen):
            raise ValueError(f"kv_seqlen must have q_seqlen's {len(q_seqlen)} blocks, got {len(kv_seqlen)}")
        return cls(q_seqinfo=_SeqLenInfo.from_seqlens(q_seqlen, device=device),
                   k_seqinfo=_GappySeqInfo.from_seqlens_gappy(kv_seqstarts, kv_seqlen, False, device=device))

    def make_paged(self, block_tables: Tensor, page_size: int, notional_padding: int,
                   paged_type: Type["PagedBlockDiagonalGappyKeysMask"]) -> "PagedBlockDiagonalGappyKeysMask":
        """The same keys in a paged cache, block i's row i x notional_padding of the unpaged keys
        being its table row's start (starts and ends moved on the host and the device alike)."""
        if notional_padding % page_size:
            raise ValueError(f"notional_padding must be a multiple of page_size {page_size}, got {notional_padding}")
        row_len = block_tables.shape[1] * page_size
        starts = [start - n * notional_padding for n, start in enumerate(self.k_seqinfo.seqstart_py[:-1])]
        lengths = self.k_seqinfo.seqlen_py
        if not all(0 <= start and start + length <= row_len for start, length in zip(starts, lengths)):
            raise ValueError(f"each block's keys must lie in its table row of {row_len} keys, got starts {starts} and "
                             f"lengths {lengths}")
        shift = notional_padding * torch.arange(len(starts) + 1, device=self.k_seqinfo.seqstart.device,
                                                dtype=torch.int32)
        moved = self.k_seqinfo.seqstart - shift
        k_seqinfo = _GappySeqInfo(seqstart=torch.cat([moved[:-1], moved.new_full((1,), -1)]),
                                  max_seqlen=self.k_seqinfo.max_seqlen, min_seqlen=self.k_seqinfo.min_seqlen,
                                  seqstart_py=starts + [-1], seqlen=self.k_seqinfo.seqlen + moved[:-1],
                                  seqlen_py=[start + length for start, length in zip(starts, lengths)])
        return paged_type(q_seqinfo=self.q_seqinfo, k_seqinfo=k_seqinfo, block_tables=block_tables,
                          page_size=page_size)


@dataclass
class BlockDiagonalCausalWithOffsetGappyKeysMask(BlockDiagonalGappyKeysMask):
    """BlockDiagonalGappyKeysMask, each block causal from the bottom-right corner of its keys."""


@dataclass
class PagedBlockDiagonalGappyKeysMask(AttentionBias):
    """BlockDiagonalGappyKeysMask over a paged cache: block i's keys at positions
    k_seqinfo.seqstart_py[i] .. seqlen_py[i] (its end) of its table row, position j at row
    j % page_size of page block_tables[i, j // page_size]."""

    q_seqinfo: _SeqLenInfo
    k_seqinfo: _GappySeqInfo
    block_tables: Tensor
    page_size: int

    _UNPAGED_TYPE: ClassVar[Type[BlockDiagonalGappyKeysMask]] = BlockDiagonalGappyKeysMask

    def materialize(self, shape, dtype=torch.float32, device="cpu") -> Tensor:
        """As PagedBlockDiagonalPaddedKeysMask's: shape the unpaged one, the pages' columns returned."""
        row_len = self.block_tables.shape[1] * self.page_size
        starts = [start + n * row_len for n, start in enumerate(self.k_seqinfo.seqstart_py[:-1])]
        lengths = [end - start for start, end in zip(self.k_seqinfo.seqstart_py, self.k_seqinfo.seqlen_py)]
        unpaged = self._UNPAGED_TYPE(
            q_seqinfo=self.q_seqinfo,
            k_seqinfo=_GappySeqInfo.from_seqlens_gappy(starts + [shape[-1]], lengths, False, device=device))
        return _paged_bias(self, unpaged.materialize(shape, dtype, device), dtype, device)

    @classmethod
    def from_seqlens(cls, q_seqlen: Sequence[int], kv_seqstarts: Sequence[int], kv_seqlen: Sequence[int],
                     block_tables: Tensor, page_size: int, *, device=None):
        """kv_seqstarts: where each block's keys start in its own table row, one a block (as xformers'
        docstring says; its own check asks for one more, which its from_seqlens then refuses)."""
        if not len(q_seqlen) == len(kv_seqlen) == len(kv_seqstarts):
            raise ValueError(f"q_seqlen, kv_seqstarts and kv_seqlen must be as many, got {len(q_seqlen)}, "
                             f"{len(kv_seqstarts)} and {len(kv_seqlen)}")
        device = block_tables.device if device is None else device
        return cls(q_seqinfo=_SeqLenInfo.from_seqlens(q_seqlen, device=device),
                   k_seqinfo=_GappySeqInfo.from_seqlens_gappy(kv_seqstarts, kv_seqlen, True, device=device),
                   block_tables=block_tables, page_size=page_size)


@dataclass
class PagedBlockDiagonalCausalWithOffsetGappyKeysMask(PagedBlockDiagonalGappyKeysMask):
    """PagedBlockDiagonalGappyKeysMask, each block causal from the bottom-right corner of its keys."""

    _UNPAGED_TYPE: ClassVar[Type[BlockDiagonalGappyKeysMask]] = BlockDiagonalCausalWithOffsetGappyKeysMask


VARLEN_BIASES = (BlockDiagonalMask, BlockDiagonalGappyKeysMask, BlockDiagonalPaddedKeysMask,
                 PagedBlockDiagonalGappyKeysMask, PagedBlockDiagonalPaddedKeysMask)
