"""KV memory management: blocks, the free queue, the block pool, per-sequence block tables
and the tensor arena.

Imports point one way: kv_manager -> block_pool -> free_queue -> block; block_hash is a
leaf; kv_cache (torch) stands apart so that the managers stay free of torch.
"""
