"""The engine's automatic prefix cache as the simulator sees it: what one box still holds of earlier prompts.

The engine keeps a finished request's full KV blocks cached (evictable, least recently used first) and a
new request reuses its longest cached block-prefix (`backends/local/engine/prefix_cache.py`). A trace
knows which requests share leading tokens: every request with a prefix key starts with that key's
`prefix_tokens` (an agent kind's system prompt, a team's), and an agent turn starts with the whole prompt
and answer of each earlier turn of its session since its history was last cut (`ancestors`; `follows` is
the latest): the engine caches a sequence's generated tokens' blocks too, and an agent sends its model's
answer back. So a box that served any of them holds that much of it, as the engine's block-prefix match
finds, and it holds entries "prefix key", "turn rid" and, for every other finished request, "done rid" (its
blocks too stay cached, though nothing asks for them again), in LRU order, each charged the KV tokens it
added; when entries and running requests pass the box's KV cache, the least recently used go, a system
prompt with the turns under it (the engine evicts a block together with every block indexed under it).
Whole blocks only; the last prompt token is always computed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from bench.routing_eval.workload import Request


@dataclass(slots=True)
class _Entry:
    tokens: int  # leading prompt tokens it holds, whole blocks
    charged: int  # KV tokens it added to the cache
    parent: str | None  # the system prompt it extends


@dataclass(slots=True)
class PrefixCache:
    """One box's cached prompt prefixes (see the module docstring)."""

    block_size: int
    kv_tokens: int
    enabled: bool = True
    _entries: OrderedDict[str, _Entry] = field(default_factory=OrderedDict)
    _charged: int = 0

    def lookup(self, req: Request) -> int:
        """Tokens of `req`'s prompt the cache holds (not yet rounded to blocks); marks them recently used."""
        if not self.enabled:
            return 0
        held = 0
        for key in (req.prefix_key, *(f"turn:{rid}" for rid in req.earlier_turns)):
            entry = self._entries.get(key) if key else None
            if entry is not None:
                held = max(held, entry.tokens)
                self._touch(key)
        return held

    def retain(self, req: Request, cached_tokens: int, running_tokens: int) -> None:
        """A request ended: its prompt's full blocks stay cached; evict past the KV budget (beside the
        `running_tokens` running requests hold)."""
        if not self.enabled:
            return
        bs = self.block_size
        parent = req.prefix_key or None
        if parent is not None and parent not in self._entries:
            self._put(parent, _Entry(req.prefix_tokens // bs * bs, req.prefix_tokens // bs * bs, None))
        elif parent is not None:
            self._touch(parent)
        own = req.prompt_tokens + req.output_tokens - max(cached_tokens, req.prefix_tokens if parent else 0)
        # Every finished request's blocks stay cached, as in the engine, and take their share of the KV cache;
        # only an agent turn's are ever asked for again (by the turn that follows it).
        # A turn's answer is cached too: the engine indexes every full computed block of a sequence, its
        # generated tokens' included (all but the last sampled one, which is never fed back), and the next
        # turn sends that answer back after the prompt (`workload`: history grows by message and answer).
        name = f"turn:{req.rid}" if req.session >= 0 else f"done:{req.rid}"
        computed = req.prompt_tokens + req.output_tokens - 1
        self._put(name, _Entry(computed // bs * bs, max(0, own), parent))
        self._evict(running_tokens)

    def _touch(self, key: str) -> None:
        self._entries.move_to_end(key)
        parent = self._entries[key].parent
        if parent is not None and parent in self._entries:
            self._entries.move_to_end(parent)  # a turn's use is its system prompt's use too

    def _put(self, key: str, entry: _Entry) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._charged -= old.charged
        self._entries[key] = entry
        self._charged += entry.charged
        self._touch(key)

    def _evict(self, running_tokens: int) -> None:
        while self._entries and self._charged + running_tokens > self.kv_tokens:
            key, entry = self._entries.popitem(last=False)
            self._charged -= entry.charged
            if entry.parent is None:  # a system prompt: the turns indexed under it go with it
                for child in [k for k, e in self._entries.items() if e.parent == key]:
                    self._charged -= self._entries.pop(child).charged
