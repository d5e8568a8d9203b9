"""`kvmm bench swap`: swap-out/swap-in bandwidth through SwapSpace beside plain O_DIRECT
writes/reads of the same bytes of the same file, in the same run.

SwapSpace runs on an IOScheduler built as the engine builds its one (backend "auto",
--threads in flight, --request-mib requests). The plain baseline is the fastest plain Python
gets at the same queue depth: the same huge-page arena, the same slot file (its slot area,
already written), preadv/pwritev of 1, 2 and 4 MiB requests (and the scheduler's request
size) from half and all of --threads threads; the best configuration counts. SwapSpace
moves blocks of
SmolLM2's geometry (30 layers x 16 tokens x 3 KV heads x 64 x fp32 = 720 KiB) from and into
a huge-page arena laid out as the engine's (--layers-per-piece G: a block is 30/G pieces of
G x 24 KiB, moved by one vectored request; G = 30 is block-major, one 720 KiB range) the way the engine will (a batch per preempted request), paying
for its slot headers and checksums (xxh3-64 when the xxhash package is installed, else crc32c or
zlib's crc32, which is CPU-bound below this VM's I/O rate). Each figure is the best of
--repeats rounds; rounds interleave plain and swap runs so that drift of the device hits
both alike. The ratios are swap over plain.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from iosched import DeviceProfile, IOScheduler
from iosched.aligned_buffer import AlignedBuffer
from kvmm_daemon.kv.kv_cache import default_layers_per_piece
from swapfs.layout import KVLayout
from swapfs.slot_store import SUPER_BYTES, slot_stride
from swapfs.swap_space import SLOT_FILE, SwapSpace

SMOLLM2 = dict(num_layers=30, block_size=16, num_kv_heads=3, head_dim=64, dtype="float32")


def register_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default=None,
                        help="directory on the file system to measure (default: a temporary"
                             " directory under /var/tmp)")
    parser.add_argument("--total-mib", type=int, default=256,
                        help="bytes moved per direction and round (default 256 MiB)")
    parser.add_argument("--batch-blocks", type=int, default=64,
                        help="blocks per swap_out/swap_in call (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the best counts")
    parser.add_argument("--threads", type=int, default=8,
                        help="transfers in flight: the swap scheduler's queue depth (default 8);"
                             " the plain runs try half of it and all of it")
    parser.add_argument("--request-mib", type=int, default=4,
                        help="the swap scheduler's request size in MiB (default 4)")
    parser.add_argument("--layers-per-piece", type=int, default=None,
                        help="the arena's layout, as the engine's KVCache: layers per piece of a"
                             " block (1 = layer-major, 30 pieces; 30 = block-major, one range;"
                             " default: the engine's default, EngineConfig.kv_layers_per_piece)")
    parser.add_argument("--backend", default=os.environ.get("KVMM_IOSCHED_BACKEND", "auto"),
                        choices=("auto", "io_uring", "preadv"),
                        help="the swap scheduler's backend (default auto, as the engine)")


def _plain(fd: int, view: memoryview, request: int, threads: int, write: bool) -> float:
    """Bandwidth of moving `view` to/from the file range starting at SUPER_BYTES."""
    size = len(view)
    fn = os.pwritev if write else os.preadv

    def worker(k: int) -> None:
        for off in range(k * request, size, request * threads):
            n = min(request, size - off)
            assert fn(fd, [view[off:off + n]], SUPER_BYTES + off) == n

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(worker, range(threads)))
    return size / (time.perf_counter() - t0)


def run_swap_bench(args: argparse.Namespace) -> dict:
    base = args.dir or tempfile.mkdtemp(prefix="kvmm-bench-swap-", dir="/var/tmp")
    work = os.path.join(base, "kvmm-bench-swap")
    os.makedirs(work, exist_ok=True)
    layout = KVLayout(model_id="bench-swap", **SMOLLM2)
    bb = layout.block_bytes
    nblocks = max(args.batch_blocks, (args.total_mib << 20) // bb)
    total = nblocks * bb
    arena = AlignedBuffer(total)
    space = fd = sched = None
    backend = ""
    try:
        np.frombuffer(arena.view, dtype=np.uint8)[:total] = \
            np.random.default_rng(0).integers(0, 256, total, dtype=np.uint8)
        blocks = _blocks(arena.view, nblocks, layout,
                         args.layers_per_piece or default_layers_per_piece(layout.num_layers))
        request = args.request_mib << 20
        sched = IOScheduler(backend=args.backend, name="bench-swap", profile=DeviceProfile(
            queue_depth=args.threads, request_bytes=request, read_bandwidth=0.0,
            measured_on="kvmm bench swap"))
        space = SwapSpace(work, SUPER_BYTES + (nblocks + 1) * slot_stride(bb), layout,
                          calibrate=False, scheduler=sched)
        batches = [blocks[i:i + args.batch_blocks] for i in range(0, nblocks, args.batch_blocks)]
        _swap_round(space, batches)                    # every slot written once (extents)
        # The plain runs use the slot area of the same file (what swap rounds write anyway).
        fd = os.open(os.path.join(work, SLOT_FILE), os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
        best = {k: 0.0 for k in ("plain_write", "plain_read", "swap_out", "swap_in")}
        data = arena.view[:total]
        sizes = sorted({1 << 20, 2 << 20, 4 << 20, request})
        plain_configs = [(r, t) for r in sizes for t in sorted({max(1, args.threads // 2),
                                                                args.threads})]
        for _ in range(args.repeats):
            for request, threads in plain_configs:
                best["plain_write"] = max(best["plain_write"],
                                          _plain(fd, data, request, threads, True))
            out_bw, in_bw = _swap_round(space, batches)
            for request, threads in plain_configs:
                best["plain_read"] = max(best["plain_read"],
                                         _plain(fd, data, request, threads, False))
            best["swap_out"] = max(best["swap_out"], out_bw)
            best["swap_in"] = max(best["swap_in"], in_bw)
        persist = _persist_round(space, batches[0])
        stats = space.statistics()
        space_checksum = space.checksum_name
        huge = arena.huge_page_bytes()
        del blocks, batches, data
    finally:
        if fd is not None:
            os.close(fd)
        if space is not None:
            space.close()
        if sched is not None:
            backend = sched.backend_reason
            sched.close()
        arena.close()
        shutil.rmtree(work, ignore_errors=True)
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)
    gb = 1e9
    result = {
        "swap_out_bandwidth_ratio": best["swap_out"] / best["plain_write"],
        "swap_in_bandwidth_ratio": best["swap_in"] / best["plain_read"],
        "swap_out_gbps": best["swap_out"] / gb, "swap_in_gbps": best["swap_in"] / gb,
        "plain_write_gbps": best["plain_write"] / gb, "plain_read_gbps": best["plain_read"] / gb,
        "persist_gbps": persist / gb, "commit_seconds": stats.commit_seconds,
        "block_bytes": bb, "bytes_per_round": total, "batch_blocks": args.batch_blocks,
        "io_threads": args.threads, "request_bytes": args.request_mib << 20,
        "layers_per_piece": args.layers_per_piece or default_layers_per_piece(layout.num_layers),
        "pieces_per_block": layout.num_layers // (args.layers_per_piece or default_layers_per_piece(layout.num_layers)),
        "backend": backend, "repeats": args.repeats, "direct_io": stats.direct_io,
        "checksum": space_checksum,
        "arena_huge_page_fraction": huge / arena.nbytes, "file_system_dir": base,
    }
    _print_table(result)
    return result


def _blocks(view: memoryview, nblocks: int, layout: KVLayout, layers_per_piece: int) -> list:
    """Each block's buffer in an arena of `nblocks` laid out as the engine's KVCache with
    `layers_per_piece` (kv_cache.py): one range when that is every layer (block-major), else
    its pieces in layer order."""
    if layout.num_layers % layers_per_piece:
        raise SystemExit(f"--layers-per-piece {layers_per_piece} must divide {layout.num_layers}")
    bb = layout.block_bytes
    if layers_per_piece == layout.num_layers:
        return [view[i * bb:(i + 1) * bb] for i in range(nblocks)]
    piece = bb // layout.num_layers * layers_per_piece
    return [[view[(g * nblocks + i) * piece:(g * nblocks + i + 1) * piece]
             for g in range(layout.num_layers // layers_per_piece)] for i in range(nblocks)]


def _swap_round(space: SwapSpace, batches) -> tuple[float, float]:
    nbytes = sum(len(b) for b in batches) * space.layout.block_bytes
    t0 = time.perf_counter()
    handles = [space.swap_out(batch) for batch in batches]
    t1 = time.perf_counter()
    for hs, batch in zip(handles, batches):
        space.swap_in(hs, batch, release=True)
    t2 = time.perf_counter()
    return nbytes / (t1 - t0), nbytes / (t2 - t1)


def _persist_round(space: SwapSpace, batch) -> float:
    """Durable path (prefix blocks: write, fdatasync, SQLite commit) for one batch."""
    items = [(i.to_bytes(32, "little"), view) for i, view in enumerate(batch)]
    t0 = time.perf_counter()
    space.put_prefix_blocks(items)
    dt = time.perf_counter() - t0
    space.drop_prefix_blocks([h for h, _v in items])
    return len(batch) * space.layout.block_bytes / dt


def _print_table(r: dict) -> None:
    print(f"kvmm bench swap: {r['bytes_per_round'] >> 20} MiB per direction, blocks of"
          f" {r['block_bytes']} B in {r['pieces_per_block']} piece(s) ({r['layers_per_piece']} layers per piece),"
          f" {r['batch_blocks']} blocks per call, {r['io_threads']}"
          f" in flight, {r['request_bytes'] >> 20} MiB requests, best of {r['repeats']}")
    print(f"swap scheduler: {r['backend']}")
    print(f"{'':10}{'swapfs GB/s':>13}{'plain O_DIRECT GB/s':>21}{'ratio':>8}")
    print(f"{'write':10}{r['swap_out_gbps']:13.2f}{r['plain_write_gbps']:21.2f}"
          f"{r['swap_out_bandwidth_ratio']:8.2f}")
    print(f"{'read':10}{r['swap_in_gbps']:13.2f}{r['plain_read_gbps']:21.2f}"
          f"{r['swap_in_bandwidth_ratio']:8.2f}")
    print(f"durable write (fdatasync + commit): {r['persist_gbps']:.2f} GB/s;"
          f" arena huge pages {r['arena_huge_page_fraction']:.0%}; direct_io={r['direct_io']};"
          f" checksum {r['checksum']}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m swapfs.bench", description=__doc__)
    register_args(p)
    run_swap_bench(p.parse_args())
