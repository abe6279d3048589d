"""PrefixCache: the keys and values of prompts' leading blocks, kept after their prefill so that a
later prompt that starts with the same tokens, on the same weights, does not compute them again.

As in vLLM's automatic prefix caching, a prompt is cut into blocks of `BLOCK` tokens and a block is
found from the block before it and its own tokens: an entry stands for the whole prefix up to its
end. The chain starts at the prompt's `PrefixKey` (the adapter version it runs with: keys and
values depend on the weights), so one adapter's entries never serve another's prompts.

Entries are copies ([2, layers, kv_heads, BLOCK, head_dim]: keys, then values), written into a
row's slot before its prefill computes the rest of the prompt; they stay whatever happens to the
row. An entry also holds the last layer's output at its positions ([BLOCK, hidden]) where it was
given them: a prompt that wants the logits after every position (its tokens' logprobs) reads only
entries that do. Under the byte budget the least recently used entry with no entry after it goes
first (a prefix is touched whenever a longer one is, so this is the least recently used entry
nearly always). One thread uses it: the worker's.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import torch

BLOCK = 16  # tokens per entry

PrefixKey = Hashable  # what a prompt's keys and values depend on besides its tokens (its adapter version)

_serial = itertools.count()


@dataclass(eq=False)
class _Entry:
    key: tuple  # (the entry before it, or the chain's PrefixKey; its BLOCK tokens)
    kv: torch.Tensor  # [2, layers, kv_heads, BLOCK, head_dim]
    parent: _Entry | None
    children: int = 0  # entries after this one: it is evicted only once they are
    chain: tuple = field(default_factory=lambda: ("entry", next(_serial)))  # what the entry after it is found under
    hidden: torch.Tensor | None = None  # [BLOCK, hidden]: the last layer's output at its positions

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes + (self.hidden.nbytes if self.hidden is not None else 0)


class PrefixCache:
    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.bytes = 0
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()  # least recently used first

    def match(self, key: PrefixKey, prompt: Sequence[int], with_hidden: bool = False) -> list[_Entry]:
        """The longest chain of entries that starts `prompt` under `key` (`with_hidden`: of entries
        holding their hidden states), leaving at least the last token to compute (its logits are the
        prefill's output). Touches the chain."""
        chain: list[_Entry] = []
        for start in range(0, len(prompt) - BLOCK, BLOCK):  # every full block before the last token
            entry = self._entries.get(_entry_key(key, chain[-1] if chain else None, prompt[start : start + BLOCK]))
            if entry is None or (with_hidden and entry.hidden is None):
                break
            chain.append(entry)
        for entry in reversed(chain):  # the shortest prefix most recent: leaves are evicted first
            self._entries.move_to_end(entry.key)
        return chain

    @staticmethod
    def gather(chain: list[_Entry]) -> torch.Tensor:  # [2, layers, kv_heads, len(chain) * BLOCK, head_dim]
        return torch.cat([entry.kv for entry in chain], dim=3)

    @staticmethod
    def gather_hidden(chain: list[_Entry]) -> torch.Tensor:  # [len(chain) * BLOCK, hidden], a `with_hidden` chain
        return torch.cat([entry.hidden for entry in chain])

    def insert(
        self,
        key: PrefixKey,
        prompt: Sequence[int],
        kv: Callable[[int, int], torch.Tensor],
        hidden: Callable[[int, int], torch.Tensor | None] | None = None,
    ) -> None:
        """Add `prompt`'s full blocks that are not cached under `key`, `kv(start, stop)` giving the
        keys and values of its tokens [start, stop) ([2, layers, kv_heads, stop - start, head_dim])
        and `hidden(start, stop)` their hidden states ([stop - start, hidden]; None where unknown),
        which cached blocks lacking theirs take too. Blocks a prompt found by `match` may have been
        evicted since (by other prompts' blocks): they are stored again. Entries of non-finite
        values are not kept; nor, when the budget cannot hold them without evicting the prompt's own
        earlier blocks, are the blocks past that."""

        def states(start: int) -> torch.Tensor | None:  # [BLOCK, hidden] of the block at `start`, finite, or None
            found = hidden(start, start + BLOCK) if hidden is not None else None
            return found if found is not None and bool(found.isfinite().all()) else None

        parent, first, stop = None, 0, len(prompt) // BLOCK * BLOCK
        while first < stop:
            found = self._entries.get(_entry_key(key, parent, prompt[first : first + BLOCK]))
            if found is None:
                break
            if found.hidden is None and (known := states(first)) is not None and self._make_room(known.nbytes, found):
                found.hidden = known.clone()
                self.bytes += known.nbytes
            parent, first = found, first + BLOCK
        new = kv(first, stop) if first < stop else None  # [2, layers, kv_heads, stop - first, head_dim]
        for start in range(first, stop, BLOCK):
            block = new[:, :, :, start - first : start - first + BLOCK]
            known = states(start)
            nbytes = block.nbytes + (known.nbytes if known is not None else 0)
            if not bool(block.isfinite().all()) or not self._make_room(nbytes, keep=parent):
                break
            entry = _Entry(_entry_key(key, parent, prompt[start : start + BLOCK]), block.clone(), parent)
            entry.hidden = known.clone() if known is not None else None
            self._entries[entry.key] = entry
            self.bytes += entry.nbytes
            if parent is not None:
                parent.children += 1
            parent = entry
        while parent is not None:  # the shortest prefix most recent, as in `match`
            self._entries.move_to_end(parent.key)
            parent = parent.parent

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def __len__(self) -> int:  # entries
        return len(self._entries)

    def describe(self) -> dict:
        return {"entries": len(self._entries), "bytes": self.bytes, "budget_bytes": self.budget_bytes}

    def _make_room(self, nbytes: int, keep: _Entry | None) -> bool:
        """Evict least recently used leaves until `nbytes` more fit; never `keep` or what it extends."""
        kept = set()
        while keep is not None:
            kept.add(id(keep))
            keep = keep.parent
        while self.bytes + nbytes > self.budget_bytes:
            victim = next((e for e in self._entries.values() if e.children == 0 and id(e) not in kept), None)
            if victim is None:
                return False
            del self._entries[victim.key]
            self.bytes -= victim.nbytes
            if victim.parent is not None:
                victim.parent.children -= 1
        return True


def _entry_key(key: PrefixKey, parent: _Entry | None, block: Sequence[int]) -> tuple:
    """What a block's entry is found under: the entry before it (the chain's key for the first), its tokens."""
    return (parent.chain if parent else ("root", key), tuple(block))
