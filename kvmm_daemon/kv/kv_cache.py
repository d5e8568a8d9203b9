"""KVCache: the preallocated tensor arena that holds every KV block.

One tensor `kv` of shape [L/G, num_blocks, G, 2, block_size, num_kv_heads, head_dim]
(L layers, G = `layers_per_piece`, a divisor of L), allocated once and sized from a byte
budget. Layer l's K and V caches are views `kv[l // G, :, l % G, 0]` and `[..., 1]` of
shape [num_blocks, block_size, num_kv_heads, head_dim] (inner three dims contiguous, block
stride G * 2 * block_size * H * D); kernels accept any block stride. One block is L/G
pieces of G layers each (`block_pieces`, in layer order); their concatenation is the block
as the flash tier stores it ([L, 2, block_size, kv_heads, head_dim]), so swapfs moves a
block with one vectored request over its pieces, without a copy, and slot files and exports
do not depend on G.

G trades attention locality against swap bandwidth (measured 2026-12-03 on a quiet 2-core
machine, `kvmm bench decode --attention-only --kv-layers-per-piece G` and `kvmm bench swap
--layers-per-piece G`, two runs each; SmolLM2, 30 layers):
  G = 1 (layer-major, as vLLM's per-layer tensors): a layer's blocks lie together; worst
        paged/contiguous cell of the native kernel 1.15-1.18; swap 0.68-0.73 write /
        0.65-0.67 read of plain O_DIRECT (30 iovecs per block: the kernel maps each).
  G = 3: 1.16-1.22; swap 0.81-0.83 / 0.75-0.77.
  G = L (block-major, one range per block, the default): 1.18-1.27; swap 0.85-0.88 / 0.77.
The default keeps the swap tier's bandwidth (the weights issue's goal) and pays ~0.05-0.1
of attention in the worst cell; `kv_layers_per_piece` in EngineConfig chooses otherwise.

On CPU the arena is an iosched AlignedBuffer: anonymous, 2 MiB aligned (so pieces of a
page-multiple size suit O_DIRECT), advised to use transparent huge pages, and populated
(zero filled) at start so every page is resident and the hot path never faults. Its
rounding up to whole 2 MiB pages is the arena's only overhead beyond the budget. Prior art:
vLLM's per-layer KV tensors and `check_enough_kv_cache_memory`; nano-vllm
`ModelRunner.allocate_kv_cache` (one tensor for all layers, layer-major). `lock()` pins the
arena (mlock2 MLOCK_ONFAULT, as the weight pool) where RLIMIT_MEMLOCK allows, so the host
never swaps KV out behind kvmm's own flash tier. Left out: quantized KV.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from iosched.aligned_buffer import AlignedBuffer
from kvmm_daemon.errors import ConfigError
from kvmm_daemon.sizes import format_size

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_layers_per_piece(num_layers: int) -> int:
    """The arena layout the engine uses unless configured (see the module docstring)."""
    return num_layers


def _as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ConfigError(f"kv_dtype {dtype!r} is not one of {', '.join(_DTYPES)}") from None


class KVCache:
    """The KV arena.

    Attributes and invariants:
      num_blocks, num_layers, block_size, num_kv_heads, head_dim, dtype, device
                  the layout; fixed for the arena's life.
      kv          the contiguous arena tensor, shape as above; never reallocated, so views
                  and block tables stay valid.
      _layers     per-layer (k_cache, v_cache) views of `kv`.
      _bytes      a flat uint8 memoryview of the arena on CPU (block_pieces slices it),
                  else None.
      _buffer     the AlignedBuffer backing `kv` on CPU (its memory lives as long as `kv`
                  does), else None.
    """

    def __init__(self, num_blocks: int, *, num_layers: int, block_size: int,
                 num_kv_heads: int, head_dim: int, dtype: torch.dtype | str = torch.float32,
                 device: str | torch.device = "cpu", layers_per_piece: int | None = None) -> None:
        for name, value in (("num_blocks", num_blocks), ("num_layers", num_layers),
                            ("block_size", block_size), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if layers_per_piece is None:
            layers_per_piece = default_layers_per_piece(num_layers)
        if not isinstance(layers_per_piece, int) or layers_per_piece <= 0 or num_layers % layers_per_piece:
            raise ConfigError(f"kv layers_per_piece {layers_per_piece!r} must divide the model's "
                              f"{num_layers} layers (1 = layer-major, {num_layers} = block-major)")
        self.layers_per_piece = layers_per_piece
        self.num_blocks = num_blocks
        self.num_layers = num_layers
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = _as_dtype(dtype)
        self.device = torch.device(device)
        g = layers_per_piece
        shape = (num_layers // g, num_blocks, g, 2, block_size, num_kv_heads, head_dim)
        self._buffer: AlignedBuffer | None = None
        self._bytes: memoryview | None = None
        if self.device.type == "cpu":
            nbytes = num_blocks * self.block_bytes
            # populate=True faults every (zero) page in now, not on the hot path
            self._buffer = AlignedBuffer(nbytes, huge_pages=True, populate=True)
            self._bytes = self._buffer.view[:nbytes]
            raw = torch.frombuffer(self._bytes, dtype=torch.uint8)
            self.kv = raw.view(self.dtype).view(shape)
        else:
            self.kv = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self._layers = [(self.kv[l // g, :, l % g, 0], self.kv[l // g, :, l % g, 1]) for l in range(num_layers)]

    # --- sizing --------------------------------------------------------------------------

    @staticmethod
    def bytes_per_block(*, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype | str) -> int:
        """Bytes of one block across all layers, K and V."""
        itemsize = torch.empty((), dtype=_as_dtype(dtype)).element_size()
        return num_layers * 2 * block_size * num_kv_heads * head_dim * itemsize

    @classmethod
    def num_blocks_for_budget(cls, budget_bytes: int, *, num_layers: int, block_size: int,
                              num_kv_heads: int, head_dim: int, dtype: torch.dtype | str) -> int:
        """How many whole blocks fit in `budget_bytes` (may be 0)."""
        per = cls.bytes_per_block(num_layers=num_layers, block_size=block_size,
                                  num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype)
        return max(0, budget_bytes) // per

    @classmethod
    def check_budget(cls, budget_bytes: int, *, max_model_len: int, num_layers: int,
                     block_size: int, num_kv_heads: int, head_dim: int,
                     dtype: torch.dtype | str) -> int:
        """The number of blocks the budget holds; ConfigError if that is fewer than one
        sequence of `max_model_len` tokens needs."""
        per = cls.bytes_per_block(num_layers=num_layers, block_size=block_size,
                                  num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=dtype)
        num_blocks = max(0, budget_bytes) // per
        needed = -(-max_model_len // block_size)
        if num_blocks < needed:
            raise ConfigError(
                f"KV budget of {format_size(budget_bytes)} holds {num_blocks} blocks of "
                f"{format_size(per)}, fewer than the {needed} one sequence of max_model_len "
                f"{max_model_len} needs ({format_size(needed * per)}); raise --kv-budget or "
                f"lower --max-model-len")
        return num_blocks

    @classmethod
    def from_budget(cls, budget_bytes: int, *, max_model_len: int, num_layers: int,
                    block_size: int, num_kv_heads: int, head_dim: int,
                    dtype: torch.dtype | str = torch.float32,
                    device: str | torch.device = "cpu", layers_per_piece: int | None = None) -> KVCache:
        """Check the budget (see `check_budget`) and allocate the largest arena within it."""
        layout = dict(num_layers=num_layers, block_size=block_size, num_kv_heads=num_kv_heads,
                      head_dim=head_dim, dtype=dtype)
        num_blocks = cls.check_budget(budget_bytes, max_model_len=max_model_len, **layout)
        return cls(num_blocks, device=device, layers_per_piece=layers_per_piece, **layout)

    @property
    def block_bytes(self) -> int:
        return self.bytes_per_block(num_layers=self.num_layers, block_size=self.block_size,
                                    num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                                    dtype=self.dtype)

    @property
    def layer_block_bytes(self) -> int:
        """Bytes of one block in one layer (K and V)."""
        return self.block_bytes // self.num_layers

    @property
    def piece_bytes(self) -> int:
        """Bytes of one piece of `block_pieces`: one block in `layers_per_piece` layers."""
        return self.layer_block_bytes * self.layers_per_piece

    @property
    def nbytes(self) -> int:
        return self.num_blocks * self.block_bytes

    def lock(self) -> bool:
        """Pin the CPU arena in RAM (its pages are already resident). False when the kernel
        refuses (`lock_error` says why, naming LimitMEMLOCK); off CPU nothing is locked."""
        return self._buffer is not None and self._buffer.lock()

    @property
    def locked(self) -> bool:
        return self._buffer is not None and self._buffer.locked

    @property
    def lock_error(self) -> str | None:
        return self._buffer.lock_error if self._buffer is not None else None

    def huge_page_fraction(self) -> float | None:
        """The share of the CPU arena backed by huge pages now (None off CPU)."""
        if self._buffer is None:
            return None
        return self._buffer.huge_page_bytes() / self._buffer.nbytes

    # --- access --------------------------------------------------------------------------

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache) of one layer, each [num_blocks, block_size, num_kv_heads,
        head_dim], views into the arena (block stride layers_per_piece*2*block_size*H*D)."""
        return self._layers[layer]

    def copy_blocks(self, pairs: Iterable[tuple[int, int]]) -> None:
        """Copy whole blocks (all layers) src -> dst, in the given order (copy-on-write)."""
        for src, dst in pairs:
            if not (0 <= src < self.num_blocks and 0 <= dst < self.num_blocks):
                raise IndexError(f"block copy {src} -> {dst} outside 0..{self.num_blocks - 1}")
            if src != dst:
                self.kv[:, dst].copy_(self.kv[:, src])

    def block_pieces(self, block_id: int) -> list[memoryview]:
        """The bytes of one block: num_layers / layers_per_piece writable memoryviews of
        `piece_bytes` sharing the arena's memory, in layer order; their concatenation is the
        block as swapfs stores it. CPU arenas only (the flash tier's buffers are host memory)."""
        if not 0 <= block_id < self.num_blocks:
            raise IndexError(f"block {block_id} outside 0..{self.num_blocks - 1}")
        if self._bytes is None:
            raise ValueError(f"block_pieces needs a CPU arena; this one is on {self.device}")
        piece = self.piece_bytes
        group_bytes = self.num_blocks * piece           # one group of layers, every block
        first = block_id * piece
        groups = self.num_layers // self.layers_per_piece
        return [self._bytes[start:start + piece]
                for start in range(first, first + groups * group_bytes, group_bytes)]
