"""The prefix index: full, computed KV blocks by content, reused by requests with the same leading tokens.

A block's key chains over everything before it: (the block before it in the sequence, or -1 for the first;
the block's own token ids). Two blocks have equal keys only if the token ids of the whole prefix up to and
including them are equal, so a key names the K/V exactly (no hash collisions: the dict compares the token
tuples). With automatic prefix caching, indexed blocks outlive their sequences as evictable blocks in the
allocator; when one is evicted (its id reused), it and every block indexed under it leave the index, since
their keys name a parent whose content is gone. Pure Python: the torch-free scheduler owns one.
Invariant: an indexed block is full and holds exactly the K/V its key names; the holders of a block hold
its parent too (a sequence's block table is the whole chain).
"""

from __future__ import annotations

from collections.abc import Sequence

Key = tuple[int, tuple[int, ...]]  # (parent block or -1, the block's token ids)


class PrefixIndex:
    """Content -> block for full, computed blocks; the first block indexed for a content wins."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._block: dict[Key, int] = {}
        self._key: dict[int, Key] = {}
        self._children: dict[int, set[int]] = {}  # parent block -> blocks indexed under it

    def __len__(self) -> int:
        return len(self._key)

    def __contains__(self, block: object) -> bool:
        return block in self._key

    def match(self, tokens: Sequence[int]) -> list[int]:
        """Indexed blocks holding `tokens`' leading full blocks; at least the last token is left over (the
        caller computes it to get logits)."""
        if not self._block:
            return []
        bs = self.block_size
        matched: list[int] = []
        for i in range((len(tokens) - 1) // bs):
            block = self._block.get((matched[-1] if matched else -1, tuple(tokens[i * bs : (i + 1) * bs])))
            if block is None:
                break
            matched.append(block)
        return matched

    def add(self, block_table: Sequence[int], tokens: Sequence[int], start: int, end: int) -> None:
        """Offer blocks `start .. end - 1` of a sequence (all full and computed) to the index. A block is
        indexed only under an indexed parent: a key naming an unindexed block would outlive that block's
        content (nothing tells the index when it is reused), so a sequence whose leading content another
        block already holds adds nothing past it."""
        bs = self.block_size
        for i in range(start, end):
            parent = block_table[i - 1] if i else -1
            if parent >= 0 and parent not in self._key:
                return
            key = (parent, tuple(tokens[i * bs : (i + 1) * bs]))
            block = block_table[i]
            if key not in self._block and block not in self._key:
                self._block[key] = block
                self._key[block] = key
                if parent >= 0:
                    self._children.setdefault(parent, set()).add(block)

    def forget(self, block: int) -> list[int]:
        """Drop `block` and everything indexed under it; returns the descendants dropped (not `block`)."""
        dropped: list[int] = []
        stack = [block]
        while stack:
            b = stack.pop()
            key = self._key.pop(b, None)
            if key is None:
                continue
            del self._block[key]
            if key[0] >= 0 and (siblings := self._children.get(key[0])) is not None:
                siblings.discard(b)
                if not siblings:
                    del self._children[key[0]]
            children = self._children.pop(b, set())
            stack.extend(children)
            dropped.extend(children)
        return dropped
