"""Child process of the SIGKILL crash test: saves, deletes and swaps forever.

Before each operation it prints "B <sid> <version|-1>" and after its commit
"C <sid> <version|-1>" (-1 = delete). Session KV is a pure function of the token ids (as a
model's KV is), so incremental saves and any surviving version can be checked.

Run: python crash_writer.py SWAP_DIR FIRST_VERSION
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from tests.swapfs.conftest import LAYOUT, payload, swap_size
from swapfs.swap_space import SwapSpace

SESSIONS = ("s0", "s1", "s2", "s3")


def session_tokens(k: int, version: int) -> list[int]:
    base = version // 3
    body = [(base * 7 + j) % 1000 for j in range(20 + (version % 4) * 15)]
    return [k, base] + body + [version]     # the last token has no KV yet, like the engine's


def session_blocks(tokens: list[int]) -> list:
    nkv = len(tokens) - 1
    bs = LAYOUT.block_size
    return [payload(tuple(tokens[:min((i + 1) * bs, nkv)])) for i in range(LAYOUT.blocks_for(nkv))]


def main(swap_dir: str, version: int) -> None:
    space = SwapSpace(swap_dir, swap_size(48), LAYOUT, io_threads=2, calibrate=False)
    print("ready", flush=True)
    while True:
        version += 1
        k = version % len(SESSIONS)
        sid = SESSIONS[k]
        if version % 7 == 0:
            print(f"B {sid} -1", flush=True)
            try:
                space.delete_session(sid)
            except KeyError:
                pass
            print(f"C {sid} -1", flush=True)
        else:
            tokens = session_tokens(k, version)
            print(f"B {sid} {version}", flush=True)
            space.save_session(sid, 1000 + k, tokens, session_blocks(tokens),
                               num_kv_tokens=len(tokens) - 1)
            print(f"C {sid} {version}", flush=True)
        h = (version % 10).to_bytes(32, "little")
        space.drop_prefix_blocks([h]) if version % 3 == 0 else \
            space.put_prefix_blocks([(h, payload(h))])
        handles = space.swap_out([payload(version)])
        space.free(handles)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
