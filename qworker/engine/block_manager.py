"""Paged KV-cache bookkeeping in pure Python: fixed-size blocks, ref counts, prefix cache.

A block holds the K/V of ``block_size`` consecutive tokens of one or more requests (more
than one when they share a prefix). Full blocks are named by a hash chained over every
token before and in them, so two requests with the same first ``k * block_size`` tokens
share their first ``k`` blocks. A block whose ref count drops to zero keeps its contents
and its hash ("cached free") until it is handed out again; cached free blocks are reused
least-recently-used, blocks with no hash first.
"""

from __future__ import annotations

from collections import OrderedDict

from qworker.engine.request import Request


class BlockManager:
    """Owns the pool of KV blocks. Never touches tensors: the runner maps ids to memory.

    Invariants (checked by ``check_invariants``, exercised by the property tests):
    every block is either in the free queue with ref count 0, or out of it with a ref
    count equal to the number of live requests listing it; a hash maps to at most one
    block and that block carries the hash.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"the KV pool needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        # Tokens of each cached block, to verify a hash hit (hash collisions never alias).
        self._block_tokens: dict[int, tuple[int, ...]] = {}
        self.hash_to_block: dict[int, int] = {}
        # Free blocks in eviction order: the first is handed out next.
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        # Per request: the chain hashes of its cached full blocks, in order.
        self._req_hashes: dict[str, list[int]] = {}
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    # ---- queries -------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live requests (0.0-1.0)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Longest cached prefix of ``request``: (block ids, number of tokens they hold).

        At least one token is always left to compute, so the step that admits the request
        still produces its next-token logits.
        """
        if not self.enable_prefix_caching:
            return [], 0
        tokens = request.all_token_ids
        max_blocks = (len(tokens) - 1) // self.block_size
        blocks: list[int] = []
        parent: int | None = None
        for i in range(max_blocks):
            chunk = tuple(tokens[i * self.block_size:(i + 1) * self.block_size])
            h = hash((parent, chunk))
            block = self.hash_to_block.get(h)
            if block is None or self._block_tokens.get(block) != chunk:
                break
            blocks.append(block)
            parent = h
        return blocks, len(blocks) * self.block_size

    # ---- allocation ----------------------------------------------------------------
    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[int] | None = None) -> bool:
        """Make ``request.block_ids`` cover its computed tokens plus ``num_new_tokens``.

        ``computed_blocks`` (from ``get_computed_blocks``) are taken first, for a request
        that holds no blocks yet. Returns False, changing nothing, when the pool is short:
        the scheduler then preempts someone and tries again.
        """
        if not computed_blocks and (request.num_computed_tokens + num_new_tokens
                                    <= len(request.block_ids) * self.block_size):
            return True         # the hot path: a decode inside its last block
        computed_blocks = computed_blocks or []
        num_cached = len(computed_blocks) * self.block_size
        start = max(request.num_computed_tokens, num_cached)
        need_total = self.blocks_for(start + num_new_tokens)
        have = len(request.block_ids) + len(computed_blocks)
        num_new_blocks = max(0, need_total - have)
        # Cached free blocks we are about to reuse stop being free.
        revived = sum(1 for b in computed_blocks if self.ref_counts[b] == 0)
        if num_new_blocks > self.num_free_blocks - revived:
            return False
        for b in computed_blocks:
            if self.ref_counts[b] == 0:
                del self.free_queue[b]
            self.ref_counts[b] += 1
        request.block_ids.extend(computed_blocks)
        if computed_blocks:
            self._req_hashes[request.request_id] = [self.block_hash[b] for b in computed_blocks]
        for _ in range(num_new_blocks):
            b, _ = self.free_queue.popitem(last=False)
            self._forget_hash(b)
            self.ref_counts[b] = 1
            request.block_ids.append(b)
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Register the hashes of ``request``'s blocks that became full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        hashes = self._req_hashes.setdefault(request.request_id, [])
        # only blocks whose every token id is known (none pending on the device)
        num_full = min(request.num_computed_tokens, request.num_known_tokens) // self.block_size
        if num_full <= len(hashes):
            return
        tokens = request.all_token_ids
        parent = hashes[-1] if hashes else None
        for i in range(len(hashes), num_full):
            chunk = tuple(tokens[i * self.block_size:(i + 1) * self.block_size])
            h = hash((parent, chunk))
            hashes.append(h)
            block = request.block_ids[i]
            if h not in self.hash_to_block and self.block_hash[block] is None:
                self.hash_to_block[h] = block
                self.block_hash[block] = h
                self._block_tokens[block] = chunk
            parent = h

    def free(self, request: Request) -> None:
        """Release every block of ``request`` (finished, aborted or preempted)."""
        # Tail blocks first, so that when they are evicted the shared prefix outlives them.
        for b in reversed(request.block_ids):
            self.ref_counts[b] -= 1
            if self.ref_counts[b] < 0:
                raise AssertionError(f"block {b} freed twice")
            if self.ref_counts[b] == 0:
                self.free_queue[b] = None
                if self.block_hash[b] is None:
                    # Holds nothing reusable: hand it out before any cached block.
                    self.free_queue.move_to_end(b, last=False)
        request.block_ids = []
        self._req_hashes.pop(request.request_id, None)

    def reset_prefix_cache(self) -> None:
        """Forget every cached-free block's contents (live blocks keep theirs)."""
        for b in list(self.free_queue):
            self._forget_hash(b)

    def _forget_hash(self, block: int) -> None:
        h = self.block_hash[block]
        if h is not None:
            if self.hash_to_block.get(h) == block:
                del self.hash_to_block[h]
            self.block_hash[block] = None
            self._block_tokens.pop(block, None)

    # ---- checks --------------------------------------------------------------------
    def check_invariants(self, live: list[Request]) -> None:
        """Raise AssertionError if the bookkeeping disagrees with the live requests."""
        expected = [0] * self.num_blocks
        for r in live:
            for b in r.block_ids:
                expected[b] += 1
        assert expected == self.ref_counts, "ref counts disagree with live block tables"
        for b in range(self.num_blocks):
            assert (b in self.free_queue) == (self.ref_counts[b] == 0), f"block {b} misfiled"
        for h, b in self.hash_to_block.items():
            assert self.block_hash[b] == h, f"hash of block {b} out of sync"
