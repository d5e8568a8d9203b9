"""swapfs: kvmm's flash tier for KV blocks.

  SwapSpace        the sync, thread-safe API the engine calls (swap, prefix tier, sessions)
  TrioSwapSpace    the same from trio (swapfs.trio_api; calls run in worker threads)
  serve_fuse       the FUSE view at --mount, inside the daemon's trio loop (swapfs.fuse_mount)
  KVLayout         what a block is and which model it belongs to
  AlignedBuffer    huge-page, O_DIRECT-ready memory (re-exported from iosched.aligned_buffer;
                   allocate the engine's KV arena with it so swap I/O goes straight from and
                   into the arena)
Module map: checksum (xxh3_native: libxxhash through ctypes), slot_store (O_DIRECT slot file), metadata (SQLite WAL), slot_map
(SlotMap: free slots, pins, deferred frees, generations), swap_space (SwapSpace, composing
prefix_tier's PrefixTier and stored_sessions' StoredSessions), pending_commit, export_format
(kv.bin / import), fuse_view (the pyfuse3 Operations) over view_nodes, view_inodes,
view_handles, view_entries and view_imports, fuse_mount, trio_api, bench (`kvmm bench swap`).
See docs/swapfs.md, "How the code is laid out".
"""
from iosched.aligned_buffer import AlignedBuffer
from swapfs.errors import (SessionExistsError, SlotCorruptError, SwapBusyError, SwapConfigError,
                           SwapError, SwapFormatError, SwapFullError, SwapIOError,
                           SwapNoSpaceError, SwapNotFoundError)
from swapfs.layout import KVLayout
from swapfs.records import PrefixInfo, SessionInfo, Snapshot, SlotRef, SwapHandle, SwapStats
from swapfs.swap_space import SwapSpace

__all__ = ["AlignedBuffer", "KVLayout", "PrefixInfo", "SessionExistsError", "SessionInfo",
           "SlotCorruptError", "SlotRef", "Snapshot", "SwapBusyError", "SwapConfigError",
           "SwapError", "SwapFormatError", "SwapFullError", "SwapHandle", "SwapIOError",
           "SwapNoSpaceError", "SwapNotFoundError", "SwapSpace", "SwapStats"]
