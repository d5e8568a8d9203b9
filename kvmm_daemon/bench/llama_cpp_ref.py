"""llama.cpp on the same GGUF, for side-by-side figures in `kvmm bench decode --vs-llama-cpp`.

Uses llama-cpp-python's low-level API (an optional extra, `pip install '.[llama]'`) so that
several sequences decode in one llama_decode batch, as llama.cpp's own parallel example does:
prefill tokens/s of one prompt, and aggregate greedy decode tokens/s at each batch size.
"""
from __future__ import annotations

import ctypes
import time

import numpy as np


class LlamaCpp:
    def __init__(self, model_path: str, *, threads: int, max_seqs: int, n_ctx_per_seq: int = 1024) -> None:
        import llama_cpp as lc
        self.lc = lc
        lc.llama_backend_init()
        mp = lc.llama_model_default_params()
        # Extra buffer types repack the weights into anonymous memory (AMX, AVX512 interleaved
        # layouts): the weights would no longer be the mmap'd file pages llama.cpp is known
        # for, and this build's AMX path crashes on Q4_1 here. Plain CPU buffers over the map.
        if hasattr(mp, "use_extra_bufts"):
            mp.use_extra_bufts = False
        if hasattr(mp, "load_mode"):                 # newer llama.cpp: an explicit load mode
            mp.load_mode = lc.LLAMA_LOAD_MODE_MMAP
        else:
            mp.use_mmap = True
        self.settings = {"load": "mmap", "use_extra_bufts": getattr(mp, "use_extra_bufts", None),
                         "llama_cpp_python": getattr(lc, "__version__", None),
                         "llama_cpp_system": lc.llama_print_system_info().decode().strip()}
        self.model = lc.llama_model_load_from_file(model_path.encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {model_path}")
        cp = lc.llama_context_default_params()
        cp.n_ctx = self.n_ctx = -(-max(256, n_ctx_per_seq * max_seqs) // 256) * 256   # sized to the run
        cp.n_batch = cp.n_ubatch = 512
        cp.n_seq_max = max_seqs
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = lc.llama_init_from_model(self.model, cp)
        fa = getattr(cp, "flash_attn_type", None)
        self.settings.update(n_ctx=cp.n_ctx, n_batch=cp.n_batch, kv_cache_type=f"ggml type {cp.type_k}/{cp.type_v} "
                             "(1 = f16, llama.cpp's default)",
                             flash_attn={-1: "auto (llama.cpp default)", 0: "disabled", 1: "enabled"}.get(fa, fa))
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(512, 0, max_seqs)

    def close(self) -> None:
        self.lc.llama_batch_free(self.batch)
        self.lc.llama_free(self.ctx)
        self.lc.llama_model_free(self.model)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> list[int]:
        """items: (token, pos, seq, want_logits); returns argmax for each wanted row."""
        b = self.batch
        b.n_tokens = len(items)
        rows = []
        for i, (tok, pos, seq, want) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i] = tok, pos, 1
            b.seq_id[i][0] = seq
            b.logits[i] = 1 if want else 0
            if want:
                rows.append(i)
        if self.lc.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        out = []
        for i in rows:
            ptr = self.lc.llama_get_logits_ith(self.ctx, i)
            out.append(int(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)),
                                                 shape=(self.n_vocab,)).argmax()))
        return out

    def _clear(self) -> None:
        self.lc.llama_memory_clear(self.lc.llama_get_memory(self.ctx), True)

    def greedy(self, ids: list[int], n: int) -> list[int]:
        """The greedy continuation of `ids` (n tokens), one sequence: checks the harness
        computes what llama.cpp computes before its speed is compared."""
        self._clear()
        out = self._decode([(t, p, 0, p == len(ids) - 1) for p, t in enumerate(ids)])
        while len(out) < n:
            out += self._decode([(out[-1], len(ids) + len(out) - 1, 0, True)])
        return out

    def prefill_tokens_per_s(self, ids: list[int]) -> float:
        self._clear()
        t0 = time.perf_counter()
        for start in range(0, len(ids), 512):
            chunk = ids[start:start + 512]
            self._decode([(t, start + j, 0, start + j == len(ids) - 1) for j, t in enumerate(chunk)])
        return len(ids) / (time.perf_counter() - t0)

    def decode_tokens_per_s(self, prompts: list[list[int]], steps: int,
                            max_seconds: float | None = None) -> float:
        """Aggregate greedy decode tokens/s over `steps` steps after prefilling `prompts`
        (fewer steps when `max_seconds` runs out first, at least one); `last_steps` says how
        many were timed."""
        self._clear()
        items = [(t, p, s, p == len(pr) - 1) for s, pr in enumerate(prompts) for p, t in enumerate(pr)]
        last = self._decode(items)
        pos = [len(p) for p in prompts]
        t0 = time.perf_counter()
        done = 0
        while done < steps and (done == 0 or max_seconds is None or time.perf_counter() - t0 < max_seconds):
            last = self._decode([(tok, pos[s], s, True) for s, tok in enumerate(last)])
            pos = [p + 1 for p in pos]
            done += 1
        self.last_steps = done
        return done * len(prompts) / (time.perf_counter() - t0)
