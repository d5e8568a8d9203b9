"""Tenant salts: where a sequence's prefix-hash chain starts.

The prefix cache finds KV by the chained hash of a sequence's full blocks (block_hash.py).
If that chain were the same for every client, a second uid could read KV that another uid
computed (or imported, forged) just by sending the same tokens, and its
`cached_prompt_tokens` would tell it whether anybody else had sent a prompt. So each chain
starts from a *root*: the hash of a tenant salt, by default the peer's uid. Blocks of
different tenants then never share a hash, in memory or on flash, and a hit only ever
returns a tenant's own KV. A single-tenant board may share the cache across all uids
(`share_prefix_cache`): every chain then starts from the shared root.

Prior art: vLLM's `cache_salt` (mixed into the first block's extra keys). Left out: salts
chosen by the client (vLLM lets a request name one; here identity is the kernel's uid only).

`PREFIX_HASH_SCHEME` names this scheme; the flash prefix tier records it, and blocks stored
under any other scheme (the unsalted chains before it) are discarded at open, never served.
"""
from __future__ import annotations

import hashlib

from kvmm_daemon.kv.block_hash import DIGEST_SIZE

PREFIX_HASH_SCHEME = "tenant-root-v1"
_TAG = b"kvmm-kv-tenant-root-v1\0"
SHARED_SALT = b"shared"
LOCAL_SALT = b"local"          # in-process use (kvmm run/score): no peer, one tenant


def tenant_salt(owner: object, *, shared: bool = False) -> bytes:
    """The salt of a request's owner: b"uid:<n>" for a peer uid, LOCAL_SALT for an
    in-process caller (owner None), SHARED_SALT for everybody when the cache is shared."""
    if shared:
        return SHARED_SALT
    if owner is None:
        return LOCAL_SALT
    if isinstance(owner, bool) or not isinstance(owner, int) or owner < 0:
        raise ValueError(f"a tenant is a uid (an integer >= 0), got {owner!r}")
    return b"uid:%d" % owner


def root_hash(salt: bytes) -> bytes:
    """The 32-byte parent of a tenant's first block: SHA-256 of a tag and the salt (a tag
    of its own, so a root never equals a block hash)."""
    digest = hashlib.sha256(_TAG + salt).digest()
    assert len(digest) == DIGEST_SIZE
    return digest


def tenant_root(owner: object, *, shared: bool = False) -> bytes:
    """Where `owner`'s hash chains start."""
    return root_hash(tenant_salt(owner, shared=shared))
