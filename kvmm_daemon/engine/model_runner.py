"""ModelRunner: turns one scheduled step into tensors, runs the model, returns logits.

Input: for each scheduled sequence, its token ids, the range of positions computed this step
[start, start + n) and its block table. Output: float32 logits for the rows asked for (the
last token of sequences whose chunk reaches their end, or every token for scoring).
Copy-on-write block copies the KV manager queued are applied before any K/V is written.
"""
from __future__ import annotations

import threading

from dataclasses import dataclass

import numpy as np
import torch

from kvmm_daemon.kv.kv_cache import KVCache
from kvmm_daemon.model.attention_metadata import AttentionMetadata
from kvmm_daemon.model.llama import LlamaModel


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    """Positions [start, start + num_tokens) of `token_ids` are computed this step."""

    token_ids: list[int]
    start: int
    num_tokens: int
    block_table: list[int]
    want_logits: bool          # logits of the chunk's last token are needed


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, *, threads: int | None = None) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.threads = threads          # torch intra-op threads; None = torch's default
        self._threads_in: int | None = None   # the thread whose thread count was last set

    def _set_threads(self) -> None:
        """torch's thread count is an OpenMP setting of the thread that computes: set it in
        whichever thread runs the step (the daemon steps in a worker thread), once per thread."""
        me = threading.get_ident()
        if self.threads is not None and self._threads_in != me:
            torch.set_num_threads(self.threads)
            self._threads_in = me

    def build_metadata(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        bs = self.block_size
        lens = np.fromiter((c.num_tokens for c in chunks), dtype=np.int64, count=len(chunks))
        total = int(lens.sum())
        input_ids = np.empty(total, dtype=np.int64)
        positions = np.empty(total, dtype=np.int64)
        max_blocks = max(len(c.block_table) for c in chunks)
        tables = np.full((len(chunks), max_blocks), -1, dtype=np.int32)
        seq_lens = np.empty(len(chunks), dtype=np.int32)
        off = 0
        for i, c in enumerate(chunks):
            end = c.start + c.num_tokens
            assert 0 < c.num_tokens and end <= len(c.token_ids), (c.start, c.num_tokens, len(c.token_ids))
            assert len(c.block_table) * bs >= end, "block table too short for the chunk"
            input_ids[off:off + c.num_tokens] = c.token_ids[c.start:end]
            positions[off:off + c.num_tokens] = np.arange(c.start, end)
            tables[i, :len(c.block_table)] = c.block_table
            seq_lens[i] = end
            off += c.num_tokens
        seq_index = np.repeat(np.arange(len(chunks)), lens)
        slots = tables[seq_index, positions // bs].astype(np.int64) * bs + positions % bs
        qsl = np.zeros(len(chunks) + 1, dtype=np.int32)
        np.cumsum(lens, out=qsl[1:])
        meta = AttentionMetadata(
            slot_mapping=torch.from_numpy(slots),
            block_tables=torch.from_numpy(tables),
            seq_lens=torch.from_numpy(seq_lens),
            query_start_loc=torch.from_numpy(qsl),
            is_decode=bool((lens == 1).all()),
        )
        return torch.from_numpy(input_ids), torch.from_numpy(positions), meta

    def execute(self, chunks: list[ScheduledChunk], copies: list[tuple[int, int]] = (),
                all_logits: bool = False) -> torch.Tensor:
        """Run one step. Returns logits [rows, vocab]: one row per chunk with want_logits
        (in chunk order), or one per token of every chunk when all_logits."""
        self._set_threads()
        if copies:
            self.kv_cache.copy_blocks(list(copies))
        input_ids, positions, meta = self.build_metadata(chunks)
        hidden = self.model.forward(input_ids, positions, meta, self.kv_cache)
        if not all_logits:
            rows = [int(meta.query_start_loc[i + 1]) - 1 for i, c in enumerate(chunks) if c.want_logits]
            if not rows:
                return hidden.new_empty((0, self.model.spec.vocab_size))
            hidden = hidden[rows]
        return self.model.logits(hidden)
