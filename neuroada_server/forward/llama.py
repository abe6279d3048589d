"""Our decoder for Llama-shaped models (llama, mistral, qwen2, qwen3), over their own modules.

The decode step of a small batch is a pass over the weights; what Hugging Face's forward adds
around it (mask building, cache objects, attention dispatch, several small ops per norm) costs
as much again on a CPU. This forward keeps only the model's arithmetic:

- a slot KV cache (`SlotCache`): row b of a batch lives in slot `first + b`, keys and values
  written at its own position, so rows join (their prefill writes fresh slots, and zeroes what
  a previous occupant left past the prompt) and leave (the rows after them move down) without
  rebuilding the cache, and no row is padded;
- a prefill per joining group, right-padded (causal attention keeps padding out of real tokens),
  its products over the real tokens only (packed) wherever every linear computes each token alone;
  past a prompt's blocks found in the prefix cache (`neuroada_server.forward.prefix_cache`), copied into
  its slot, only the rest is computed, attending to them;
- a decode step whose attention (`neuroada_kernels.decode_attention`: rotary, the cache write and the
  attention of every row in one call per layer) reads each row's own keys;
- one product for q, k and v where their weights lie back to back (`PackedWeights` packs a
  layer's linears in order), read as one [q + k + v rows, hidden] matrix; likewise a gated MLP's
  gate and up, where no CPU kernel computes the pair in one call already (a GPU's step);
- on the CPU in float32, a decode step's layers all in one C++ call (`neuroada_kernels.decode_layers`: the
  same kernels as the loop in `_layers`, in its order, to the bit) wherever every layer is on them;
  a prefill of a few tokens (past a cached prefix, most often) too, each token a row of the call.

It calls the model's own embedding, linear, MLP and rotary modules (and RMSNorm's weights), so
switched weights and the mixed path's per-row deltas apply here as in the HF forward. A failed
call changes no row: keys written past a row's length are never read, and are overwritten.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from neuroada_kernels import DecodeLinear, decode_attention, decode_layers, gated_silu, linear, rms_norm
from neuroada_kernels.decode_attention import rotate_half
from neuroada_kernels.decode_linear import DECODE_MAX_ROWS
from neuroada_server.forward.prefilled import Prefilled, PromptLogits
from neuroada_server.forward.prefix_cache import BLOCK, PrefixCache, PrefixKey
from neuroada_server.mixed import MixedForward

if TYPE_CHECKING:
    from neuroada_server.forward.graphs import DecodeGraphs

LLAMA_SHAPED = ("llama", "mistral", "qwen2", "qwen3")
CAPACITY_STEP = 64  # cache positions are reserved in multiples of this


def llama_unsupported(model: nn.Module) -> str | None:
    """Why this model cannot run on `LlamaForward` (None: it can)."""
    config = getattr(model, "config", None)
    if config is None:
        return f"{type(model).__name__} is not a Hugging Face causal LM"
    if config.model_type not in LLAMA_SHAPED:
        return f"model type {config.model_type!r} is not one of {', '.join(LLAMA_SHAPED)}"
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True):
        if window < getattr(config, "max_position_embeddings", 0):
            return f"sliding-window attention ({window} of {config.max_position_embeddings} positions)"
    inner = getattr(model, "model", None)
    if not all(hasattr(inner, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "the model does not have a Llama-shaped module tree"
    return None


class SlotCache:
    """Keys and values per layer, [slots, kv_heads, capacity, head_dim], grown as rows need."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.shape = (kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.keys = [torch.empty(0, kv_heads, 0, head_dim, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.empty_like(k) for k in self.keys]

    @property
    def slots(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def bytes_for(self, slots: int, length: int) -> int:
        """The device bytes of keys and values for `slots` slots of `length` positions, allocated whole."""
        kv_heads, head_dim = self.shape
        capacity = -(-length // CAPACITY_STEP) * CAPACITY_STEP
        return 2 * len(self.keys) * slots * kv_heads * capacity * head_dim * self.dtype.itemsize

    def reserve(self, slots: int, length: int) -> None:
        """Room for `slots` slots of `length` positions; grows geometrically, keeping the contents.
        Every new buffer is allocated before any is swapped in."""
        if slots <= self.slots and length <= self.capacity:
            return
        new_slots = max(slots, 2 * self.slots) if slots > self.slots else self.slots
        new_capacity = max(length, 2 * self.capacity) if length > self.capacity else self.capacity
        new_capacity = -(-new_capacity // CAPACITY_STEP) * CAPACITY_STEP
        kv_heads, head_dim = self.shape

        def grown(old: torch.Tensor) -> torch.Tensor:
            new = torch.zeros(new_slots, kv_heads, new_capacity, head_dim, dtype=self.dtype, device=self.device)
            new[: old.shape[0], :, : old.shape[2]] = old
            return new

        keys, values = [grown(k) for k in self.keys], [grown(v) for v in self.values]
        self.keys, self.values = keys, values

    def write(self, slot: int, kv: torch.Tensor) -> None:
        """Positions [0, n) of `slot` from kv [2, layers, kv_heads, n, head_dim] (keys, then values)."""
        n = kv.shape[3]
        for buffers, layers in zip((self.keys, self.values), kv):
            for b, layer in zip(buffers, layers):
                b[slot, :, :n] = layer

    def read(self, slot: int, start: int, stop: int) -> torch.Tensor:
        """Positions [start, stop) of `slot`: [2, layers, kv_heads, stop - start, head_dim], a copy."""
        return torch.stack(
            [torch.stack([b[slot, :, start:stop] for b in buffers]) for buffers in (self.keys, self.values)]
        )

    def move(self, src: int, dst: int) -> None:
        """Copy slot `src` into slot `dst`, whole: its tail too (see `clear_tails`)."""
        for buffers in (self.keys, self.values):
            for b in buffers:
                b[dst] = b[src]

    def clear_tails(self, first: int, lengths: list[int]) -> None:
        """Zero slots [first, first + len(lengths)) from each one's length on.

        Attention reads a row's slot up to the longest row of the batch and masks the positions past
        the row's own length; a masked position still multiplies its value by a probability of
        zero, and a value left there by the slot's previous occupant may be NaN (a request that
        failed for it). So a slot gets a new occupant with a clean tail: nothing of one request
        reaches another."""
        start = min(lengths, default=self.capacity)  # nothing before it is cleared
        past = (
            torch.arange(start, self.capacity, device=self.device) >= torch.tensor(lengths, device=self.device)[:, None]
        )
        past = past[:, None, :, None]  # [n, 1, capacity - start, 1]
        for buffers in (self.keys, self.values):
            for b in buffers:
                b[first : first + len(lengths), :, start:].masked_fill_(past, 0)


class _BackToBack:
    """Sibling linears that read one input, as one product where their weights lie back to back.

    Packed weights (`neuroada.inplace.PackedWeights`) hold a layer's q, k and v in order in one
    buffer, so [q; k; v] is a view of it: one call reads the three weights in one pass (fewer
    calls, one parallel region). The view is rebuilt when the modules' weights are replaced (the
    packing replaces them), and is None where they are not adjacent or carry a bias."""

    def __init__(self, *modules: nn.Module):
        self.modules = modules
        self._parts: tuple[torch.Tensor, ...] = ()
        self._weight: torch.Tensor | None = None

    def weight(self) -> torch.Tensor | None:  # [sum of d_out, d_in], or None: call each module
        if not all(unwrapped(m) for m in self.modules):
            return None
        return self.packed()

    def packed(self) -> torch.Tensor | None:  # the view, whether or not a module's forward is replaced
        parts = tuple(m.weight for m in self.modules)
        if len(parts) != len(self._parts) or any(a is not b for a, b in zip(parts, self._parts)):
            self._parts, self._weight = parts, _concatenated_view(self.modules)
        return self._weight


def _concatenated_view(modules: tuple[nn.Module, ...]) -> torch.Tensor | None:
    """The weights of `modules` as one matrix, when they are consecutive in one memory block."""
    weights = [m.weight for m in modules]
    if not all(type(m) in (nn.Linear, DecodeLinear) and m.bias is None for m in modules):
        return None
    first = weights[0]
    if not all(w.is_contiguous() and w.dtype == first.dtype and w.shape[1] == first.shape[1] for w in weights):
        return None
    if any(a.data_ptr() + a.nbytes != b.data_ptr() for a, b in zip(weights, weights[1:])):
        return None
    if any(w.untyped_storage().data_ptr() != first.untyped_storage().data_ptr() for w in weights):
        return None
    rows = sum(w.shape[0] for w in weights)
    return first.detach().as_strided((rows, first.shape[1]), (first.shape[1], 1))


@dataclass(frozen=True)
class _Layer:
    """One decoder layer's modules, looked up once (nn.Module attribute lookups cost per call)."""

    input_norm: nn.Module
    q: nn.Module
    k: nn.Module
    v: nn.Module
    o: nn.Module
    q_norm: nn.Module | None  # qwen3: RMSNorm per head before rotary
    k_norm: nn.Module | None
    scale: float
    post_norm: nn.Module
    mlp: nn.Module
    gated_mlp: bool  # down(silu(gate(x)) * up(x)) over plain linears: one kernel call may do its first half
    qkv: _BackToBack
    gate_up: _BackToBack | None  # a gated MLP's
    linears: tuple[nn.Module, ...]  # q, k, v, o, then the MLP's gate, up and down where it has them

    @classmethod
    def of(cls, layer: nn.Module, act: str) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        linears = [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
        gated = act in ("silu", "swish") and all(isinstance(m, nn.Linear) for m in linears)
        return cls(
            layer.input_layernorm,
            attn.q_proj,
            attn.k_proj,
            attn.v_proj,
            attn.o_proj,
            getattr(attn, "q_norm", None),
            getattr(attn, "k_norm", None),
            attn.scaling,
            layer.post_attention_layernorm,
            mlp,
            gated and linears[0].bias is None and linears[1].bias is None,
            _BackToBack(attn.q_proj, attn.k_proj, attn.v_proj),
            _BackToBack(linears[0], linears[1]) if gated else None,
            (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj) + tuple(m for m in linears if m is not None),
        )


@dataclass
class _Newcomers:
    lengths: list[int]  # prompt lengths, their slots following the batch's rows


class LlamaForward:
    def __init__(
        self,
        model: nn.Module,
        cache: SlotCache | None = None,
        first: int = 0,
        prefix_cache: PrefixCache | None = None,  # prompts' leading blocks kept for later prompts
    ):
        self.model = model
        self.prefix_cache = prefix_cache
        config = model.config
        self.embed = model.model.embed_tokens
        self.layers = [_Layer.of(layer, config.hidden_act) for layer in model.model.layers]
        self.norm, self.rotary, self.lm_head = model.model.norm, model.model.rotary_emb, model.lm_head
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        kv_width = self.kv_heads * self.head_dim
        self.q_kv_widths = [self.heads * self.head_dim, kv_width, kv_width]
        # The activations' dtype is the norms': linear weights (and a tied embedding) may be stored
        # narrower (`weight_dtype`) and are widened as they are read.
        self.dtype, self.device = self.norm.weight.dtype, self.norm.weight.device
        self.cache = cache or SlotCache(len(self.layers), self.kv_heads, self.head_dim, self.dtype, self.device)
        self.first = first  # our rows are slots [first, first + len(lengths))
        self.lengths: list[int] = []  # tokens in each row's cache
        self.graphs: DecodeGraphs | None = None  # the compiled step, where the server compiles it
        # A float32 CPU decode step, or short prefill, may run all its layers in one C++ call (`_layers_at_once`)
        # where every layer has the shape that call computes: norms of one epsilon, attention of one
        # scale, no q/k norms, a gated MLP, no output biases.
        self.scale, self.eps = self.layers[0].scale, self.layers[0].input_norm.variance_epsilon
        self.layers_at_once = (
            self.device.type == "cpu"
            and self.dtype == torch.float32
            and all(
                layer.q_norm is None
                and layer.gated_mlp
                and layer.o.bias is None
                and layer.mlp.down_proj.bias is None
                and layer.scale == self.scale
                and layer.input_norm.variance_epsilon == layer.post_norm.variance_epsilon == self.eps
                for layer in self.layers
            )
        )
        self.parted = 0  # halves split off and not merged back: they hold slots past ours

    # --- BatchForward -------------------------------------------------------------------------

    def prefill(
        self,
        prompts: list[list[int]],
        prefix_keys: list[PrefixKey | None] | None = None,
        every_position: list[bool] | None = None,
    ) -> Prefilled:
        n, lengths = len(prompts), [len(p) for p in prompts]
        every_position = every_position or [False] * n
        keys = prefix_keys if self.prefix_cache is not None and prefix_keys is not None else [None] * n
        start = self.first + len(self.lengths)
        # A prompt whose every position's logits are wanted reads only blocks that kept their hidden states.
        chains = self._match(keys, prompts, every_position)
        cached = [len(chain) * BLOCK for chain in chains]  # what each row found, for its usage
        shared = self._shared_stops(keys, prompts, cached)
        if shared is not None:  # blocks several newcomers share, not yet cached: computed once, first
            first_pass = self._compute(prompts, chains, start, shared)
            self._keep(keys, [p[:stop] for p, stop in zip(prompts, shared)], start, chains, _rows(*first_pass))
            chains = self._match(keys, prompts, every_position)
            cached = [c if stop > c else len(chain) * BLOCK for c, stop, chain in zip(cached, shared, chains)]
        hidden, computed, packed = self._compute(prompts, chains, start, lengths)
        self.cache.clear_tails(start, lengths)
        rows = _rows(hidden, computed, packed)  # per row, its computed tokens' [computed[i], hidden]
        prompt_logits: list[PromptLogits | None] = [None] * n
        for i in (i for i, every in enumerate(every_position) if every):
            states = torch.cat([PrefixCache.gather_hidden(chains[i]), rows[i]]) if chains[i] else rows[i]
            prompt_logits[i] = PromptLogits(states[: lengths[i] - 1], self._logits)
        if packed is None:
            last = hidden[torch.arange(n, device=self.device), computed - 1]  # [n, hidden]
        else:
            last = hidden[computed.cumsum(0) - 1]  # each row's last token in the packed [N, hidden]
        logits = self._logits(last)
        self._keep(keys, prompts, start, chains, rows)
        return Prefilled(logits, cached, _Newcomers(lengths), prompt_logits)

    def _match(self, keys: list[PrefixKey | None], prompts: list[list[int]], with_hidden: list[bool]) -> list[list]:
        return [
            [] if key is None else self.prefix_cache.match(key, p, hidden)
            for key, p, hidden in zip(keys, prompts, with_hidden)
        ]

    def _shared_stops(self, keys: list[PrefixKey | None], prompts: list[list[int]], cached: list[int]):
        """Where newcomers that share full blocks past their cached ones (same key, same chain)
        should stop a first pass: per row, the end of the blocks its group shares (one row of each
        group computes them; the others stop where they are cached); None where no group does, or
        where a pass cannot leave rows out (`_packing`)."""
        groups: dict[tuple, list[int]] = {}
        for i, (key, prompt, c) in enumerate(zip(keys, prompts, cached)):
            if key is not None and len(prompt) - c > BLOCK:  # a full block past its chain, a token after it
                groups.setdefault((key, tuple(prompt[: c + BLOCK])), []).append(i)
        stops, room = list(cached), self.prefix_cache.budget_bytes if self.prefix_cache is not None else 0
        for rows in groups.values():
            if len(rows) < 2:
                continue
            first, *others = (prompts[i] for i in rows)
            end = min(len(prompts[i]) - 1 for i in rows) // BLOCK * BLOCK  # each keeps its last token
            stop = cached[rows[0]] + BLOCK
            while stop + BLOCK <= end and all(p[stop : stop + BLOCK] == first[stop : stop + BLOCK] for p in others):
                stop += BLOCK
            # Only what the budget holds at once: a block one group stores and another's evicts before
            # the second pass finds it would be computed twice.
            needed = (stop - cached[rows[0]]) // BLOCK * self._block_bytes()
            if needed <= room:
                stops[rows[0]], room = stop, room - needed
        if stops == cached or self._packing(torch.zeros(len(prompts), dtype=torch.long)) is None:
            return None
        return stops

    def _block_bytes(self) -> int:  # one prefix-cache block: keys and values of every layer, its hidden states
        per_token = 2 * len(self.layers) * self.kv_heads * self.head_dim + self.norm.weight.numel()
        return per_token * BLOCK * self.cache.dtype.itemsize

    def _compute(self, prompts: list[list[int]], chains: list[list], start: int, stops: list[int]):
        """Rows' tokens from their cached blocks (`chains`, copied into their slots) to `stops`, written
        into slots [start, start + n): hidden states ([n, T, hidden], or [N, hidden] where packed), the
        tokens computed per row ([n]) and the packed places (None: not packed)."""
        n = len(prompts)
        cached = [len(chain) * BLOCK for chain in chains]
        T = max(stop - c for stop, c in zip(stops, cached))  # the longest part left to compute
        self.cache.reserve(start + n, max(cached) + T)
        ids = torch.zeros(n, T, dtype=torch.long)
        for i, (prompt, chain) in enumerate(zip(prompts, chains)):
            ids[i, : stops[i] - cached[i]] = torch.tensor(prompt[cached[i] : stops[i]])
            if chain:
                self.cache.write(start + i, PrefixCache.gather(chain))
        positions = torch.tensor(cached, device=self.device)[:, None] + torch.arange(T, device=self.device)  # [n, T]
        spans = [(c, stop - c) for c, stop in zip(cached, stops)] if any(cached) else None
        computed = torch.tensor([stop - c for stop, c in zip(stops, cached)], device=self.device)  # [n]
        # Packed where padding would cost products, or where the one C++ call may take the tokens as its
        # rows (`_layers_at_once`: a prefill of a few tokens past cached prefixes, the usual case).
        N = int(computed.sum())
        packs = N < n * T or (self.layers_at_once and N <= DECODE_MAX_ROWS)
        packed, packing = None, self._packing(computed) if packs else None
        if packing is not None:
            packed = (torch.arange(T, device=self.device) < computed[:, None]).flatten().nonzero()[:, 0]  # [N]
        with packing or nullcontext():
            hidden = self._layers(ids.to(self.device), positions, slice(start, start + n), None, spans, packed)
        return hidden, computed, packed

    def _keep(
        self, keys: list[PrefixKey | None], prompts: list[list[int]], start: int, chains: list[list], rows: list
    ) -> None:
        """Store the prompts' full blocks the prefix cache lacks, from their slots, with the hidden
        states of the tokens the pass computed (`rows[i]`, past row i's cached `chains[i]`)."""
        for i, (key, prompt) in enumerate(zip(keys, prompts)):
            if key is not None:
                hidden = partial(_hidden_between, len(chains[i]) * BLOCK, rows[i])
                self.prefix_cache.insert(key, prompt, partial(self.cache.read, start + i), hidden)

    def join(self, newcomers: _Newcomers) -> None:
        self.lengths += newcomers.lengths

    def decode(self, tokens: list[int]) -> torch.Tensor:
        length = max(self.lengths) + 1
        self.cache.reserve(self.first + len(tokens), length)
        ids = torch.tensor(tokens, device=self.device)  # [B]
        positions = torch.tensor(self.lengths, device=self.device)  # [B]
        if self.graphs is not None and self.graphs.covers(self, len(tokens)):
            try:
                logits = self.graphs(ids, positions)
            except Exception as e:  # what the step wrote, the eager step writes again
                self.graphs.fall_back(e)
                logits = self.step(ids, positions, length)
        else:
            logits = self.step(ids, positions, length)
        self.lengths = [n + 1 for n in self.lengths]
        return logits

    def step(self, ids: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        """One decode step over tensors alone, the unit a compiler captures: row b (slot first + b)
        takes token ids[b] ([B]) at position positions[b] ([B]); `length`, at least every row's
        length after it, is how many cache positions attention reads (a graph captured for a
        fixed length: the cache's whole capacity). Returns logits [B, V] float32. No bookkeeping:
        `decode` reserves the cache and advances the rows' lengths around it."""
        B = ids.shape[0]
        hidden = self._layers(ids[:, None], positions[:, None], slice(self.first, self.first + B), length)
        return self._logits(hidden[:, -1])

    def keep(self, rows: list[int]) -> None:
        for new, old in enumerate(rows):
            if new != old:
                self.cache.move(self.first + old, self.first + new)
        self.lengths = [self.lengths[i] for i in rows]

    def split(self, half: int) -> LlamaForward:
        other = LlamaForward(self.model, self.cache, self.first + half, self.prefix_cache)
        other.lengths, self.lengths = self.lengths[half:], self.lengths[:half]
        self.parted += 1
        return other

    def merge(self, other: LlamaForward) -> None:
        self.parted -= 1
        if not other.lengths:
            return
        if not self.lengths:  # ours may have been released (`clear`): the rows are in other's
            self.cache = other.cache
        start = self.first + len(self.lengths)
        for i in range(len(other.lengths)):
            if other.first + i != start + i:
                self.cache.move(other.first + i, start + i)
        self.lengths += other.lengths
        other.lengths = []

    def clear(self) -> None:
        self.lengths = []
        # The whole batch is empty (a split-off half keeps the old cache): free it, unless a compiled
        # step reads it where it is.
        if self.first == 0 and self.graphs is None:
            self.cache = SlotCache(len(self.layers), self.kv_heads, self.head_dim, self.cache.dtype, self.device)

    # --- the model ----------------------------------------------------------------------------

    def _layers(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        slots: slice,
        decode_length: int | None = None,
        prefill_spans: list[tuple[int, int]] | None = None,
        packed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Hidden states [B, T, hidden] after the last layer ([N, hidden] where `packed`). A prefill
        attends causally within its own tokens, or (`prefill_spans`: per row, the cached tokens it
        starts past and the tokens it computes) to its row's cache up to each token's position; a
        decode step (T = 1; `decode_length`: its longest row's length after this token, known on
        the host) attends to each row's cache. `packed` ([N]: the real tokens' places in the
        flattened [B * T] grid) leaves the padding out of every product: only attention, which
        needs each row's tokens together, runs on the padded grid."""
        B, T = ids.shape
        x = self.embed(ids).to(self.dtype)  # [B, T, hidden]
        cos, sin = self.rotary(x, positions)  # [B, T, head_dim] each
        if packed is not None:
            x = x.view(B * T, -1)[packed]  # [N, hidden]
        if self.layers_at_once and (decode_length is not None or packed is not None):
            hidden = self._layers_at_once(x, cos, sin, positions, slots, packed)
            if hidden is not None:
                return hidden
        if prefill_spans is not None and _attends_padded(prefill_spans):  # reads past what some rows write: zeros
            self.cache.clear_tails(slots.start, [c + T for c, _ in prefill_spans])
        rows = torch.arange(slots.start, slots.stop, device=self.device)[:, None]  # [B, 1]
        for i, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.input_norm)
            qkv = layer.qkv.weight()
            if qkv is not None:
                q, k, v = _unpacked(linear(h, qkv), packed, B, T).split(self.q_kv_widths, dim=-1)  # [B, T, width] each
            else:
                q, k, v = (_unpacked(m(h), packed, B, T) for m in (layer.q, layer.k, layer.v))
            q = q.view(B, T, self.heads, self.head_dim)
            k = k.view(B, T, self.kv_heads, self.head_dim)
            v = v.view(B, T, self.kv_heads, self.head_dim)
            if layer.q_norm is not None:
                q, k = _rms_norm(q, layer.q_norm), _rms_norm(k, layer.k_norm)
            keys, values = self.cache.keys[i], self.cache.values[i]
            if decode_length is not None:  # one token per row: its rotary, cache write and attention in one call
                o = decode_attention(
                    q[:, 0],
                    k[:, 0],
                    v[:, 0],
                    cos[:, 0],
                    sin[:, 0],
                    keys,
                    values,
                    slots.start,
                    positions[:, 0],
                    layer.scale,
                    decode_length,
                )
            else:
                q, k = _rotary(q, cos, sin), _rotary(k, cos, sin)
                keys[rows, :, positions] = k  # [B, T, kv_heads, head_dim] into each row's positions
                values[rows, :, positions] = v
                if prefill_spans is None:
                    o = F.scaled_dot_product_attention(
                        q.transpose(1, 2),
                        k.transpose(1, 2),
                        v.transpose(1, 2),
                        is_causal=True,
                        enable_gqa=True,
                        scale=layer.scale,
                    ).transpose(1, 2)  # [B, T, heads, head_dim]
                else:
                    o = _attend_past_prefixes(q, keys, values, slots.start, prefill_spans, layer.scale)
            o = o.reshape(B, T, -1) if packed is None else o.reshape(B * T, -1)[packed]
            x = x + layer.o(o)
            x = x + _mlp(layer, _rms_norm(x, layer.post_norm))
        return x

    def _packing(self, computed: torch.Tensor):
        """How a prefill of `computed[b]` tokens per row may leave its padding out of the products:
        a context to run it in, or None (it may not). Every linear and MLP must compute each token
        alone: their own forwards (nullcontext), or the mixed path's, told to add each token its
        row's delta (`MixedAdapters.per_token`); a hook, or another replacement, may need the rows."""
        modules = [m for layer in self.layers for m in (*layer.linears, layer.mlp)]
        if not all(unwrapped(m) or mixed_forward(m) for m in modules):
            return None
        mixed = {id(f.adapters): f.adapters for m in modules if (f := mixed_forward(m))}
        if not mixed:
            return nullcontext()
        if len(mixed) > 1:
            return None
        return next(iter(mixed.values())).per_token(computed)

    def _layers_at_once(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, slots: slice, packed
    ) -> torch.Tensor | None:
        """`_layers` in one C++ call, each token a row of it: a decode step's (x [B, 1, hidden];
        returns [B, 1, hidden], the loop's to the bit), or a packed prefill's (x [N, hidden]; returns
        [N, hidden]; each token attends to its slot's positions up to its own, the cached prefix's
        and its row's tokens before it). None where the call cannot take them (`_call_layers`)."""
        B, T = positions.shape
        if packed is None:  # a decode step
            row_slots = torch.arange(slots.start, slots.stop, device=self.device)  # [B]
            hidden = self._call_layers(x[:, 0], cos[:, 0], sin[:, 0], row_slots, positions[:, 0])
            return None if hidden is None else hidden[:, None]
        token_slots = packed // T + slots.start  # [N]
        cos, sin = (t.reshape(B * T, -1)[packed] for t in (cos, sin))  # [N, head_dim] each
        return self._call_layers(x, cos, sin, token_slots, positions.reshape(-1)[packed])

    def _call_layers(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor
    ) -> torch.Tensor | None:
        """The layers of x [R, hidden] (cos and sin [R, head_dim], slots and positions [R]) in one C++
        call, the mixed path's deltas included; None where a layer is not on our kernels: its q, k
        and v not one matrix, a linear a plain `nn.Linear` (`F.linear`'s sums; the server makes them
        `DecodeLinear`s) or hooked or replaced by other than the mixed path, or too many rows."""
        if x.shape[0] > DECODE_MAX_ROWS:
            return None
        weights: tuple[list[torch.Tensor], ...] = ([], [], [], [], [], [], [])
        deltas = []  # per layer, per projection: None (its own forward), or the mixed path's deltas
        for layer in self.layers:
            qkv, mlp = layer.qkv.packed(), layer.mlp
            if qkv is None or not unwrapped(mlp):
                return None
            layer_deltas = [_bound_deltas(m) for m in layer.linears]
            if any(d is _OFF_OUR_KERNEL for d in layer_deltas):
                return None
            deltas.append(layer_deltas)
            _, _, _, o, gate, up, down = layer.linears  # a gated MLP's (`layers_at_once`)
            layer_weights = (layer.input_norm.weight, qkv, o.weight, layer.post_norm.weight)
            layer_weights += (gate.weight, up.weight, down.weight)
            for into, weight in zip(weights, layer_weights):
                into.append(weight)
        if all(d is None for layer_deltas in deltas for d in layer_deltas):
            deltas = []  # no projection wrapped: the merged path's step
        cache = self.cache
        return decode_layers(
            x,
            *weights,
            cache.keys,
            cache.values,
            cos,
            sin,
            slots,
            positions,
            self.heads,
            self.kv_heads,
            self.scale,
            self.eps,
            deltas,
        )

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, hidden] -> [B, V] float32
        return self.lm_head(_rms_norm(hidden, self.norm)).float()


def _rows(hidden: torch.Tensor, computed: torch.Tensor, packed: torch.Tensor | None) -> list[torch.Tensor]:
    """Each row's computed tokens' hidden states [computed[i], hidden], from a pass's [n, T, hidden]
    (or packed [N, hidden])."""
    counts = computed.tolist()
    if packed is None:
        return [hidden[i, :c] for i, c in enumerate(counts)]
    return list(hidden.split(counts))


def _hidden_between(first: int, states: torch.Tensor, start: int, stop: int) -> torch.Tensor | None:
    """Positions [start, stop) of a row whose computed tokens' states (`states`) begin at position
    `first`; None before them (cached blocks: their states are the cache's own)."""
    return states[start - first : stop - first] if start >= first else None


def _mlp(layer: _Layer, x: torch.Tensor) -> torch.Tensor:
    mlp = layer.mlp
    if layer.gated_mlp and unwrapped(mlp) and unwrapped(mlp.gate_proj) and unwrapped(mlp.up_proj):
        return mlp.down_proj(gated_silu(x, mlp.gate_proj.weight, mlp.up_proj.weight, layer.gate_up.packed()))
    return mlp(x)


def unwrapped(module: nn.Module) -> bool:
    """Whether calling the module is its own forward alone: none put in its place (the mixed path's
    per-row deltas) and no hooks on it, so our kernel may compute it instead."""
    return "forward" not in module.__dict__ and not module._forward_hooks and not module._forward_pre_hooks


_OFF_OUR_KERNEL = object()


def mixed_forward(module: nn.Module) -> MixedForward | None:
    """The mixed path's forward put in the module's place, where it is that alone (no hooks)."""
    forward = module.__dict__.get("forward")
    if isinstance(forward, MixedForward) and not module._forward_hooks and not module._forward_pre_hooks:
        return forward
    return None


def _bound_deltas(linear: nn.Module):
    """What the one-call layers need to compute this linear as calling it would: None where it is
    `neuroada_kernels.linear` alone (a `DecodeLinear` of its own), the deltas its mixed-path forward adds
    (`neuroada_server.mixed.MixedForward`, over the same kernel), or _OFF_OUR_KERNEL (a plain `nn.Linear`:
    `F.linear`'s sums; a hook; another replacement)."""
    if type(linear) is not DecodeLinear or linear._forward_hooks or linear._forward_pre_hooks:
        return _OFF_OUR_KERNEL
    forward = linear.__dict__.get("forward")
    if forward is None:
        return None
    return forward.deltas() if isinstance(forward, MixedForward) else _OFF_OUR_KERNEL


def _attend_past_prefixes(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, first: int, spans: list[tuple[int, int]], scale: float
) -> torch.Tensor:
    """Prefill attention where rows start past cached prefixes: row b (slot first + b), with
    (c, t) = spans[b], has its t new tokens' queries (q [B, T, heads, head_dim]) attend to its
    slot's first c + t positions, token j to those up to c + j. Returns [B, T, heads, head_dim].
    One padded call has every row read as far as the longest prefix plus the longest part computed,
    and its mask spares no work; row by row, each reads its own. See `_attends_padded`."""
    B, T = q.shape[:2]
    if _attends_padded(spans):
        context = max(c + T for c, _ in spans)
        positions = torch.tensor([c for c, _ in spans], device=q.device)[:, None] + torch.arange(T, device=q.device)
        visible = torch.arange(context, device=q.device) <= positions[:, :, None]  # [B, T, context]
        return F.scaled_dot_product_attention(
            q.transpose(1, 2),
            keys[first : first + B, :, :context],  # [B, kv_heads, context, head_dim]: tails cleared (`_compute`)
            values[first : first + B, :, :context],
            attn_mask=visible[:, None],
            enable_gqa=True,
            scale=scale,
        ).transpose(1, 2)
    o = torch.zeros_like(q)  # zeros at the padding
    for b, (c, t) in enumerate(spans):
        if t == 0:
            continue
        slot = slice(first + b, first + b + 1)
        visible = torch.ones(t, c + t, dtype=torch.bool, device=q.device).tril(c) if c else None  # [t, c + t]
        o[b, :t] = F.scaled_dot_product_attention(
            q[b : b + 1, :t].transpose(1, 2),  # [1, heads, t, head_dim]
            keys[slot, :, : c + t],  # [1, kv_heads, c + t, head_dim]
            values[slot, :, : c + t],
            attn_mask=visible,
            is_causal=visible is None,
            enable_gqa=True,
            scale=scale,
        )[0].transpose(0, 1)
    return o


def _attends_padded(spans: list[tuple[int, int]]) -> bool:
    """Whether a prefill past cached prefixes (per row: cached tokens, tokens computed) attends in one
    padded call: where that scores at most a quarter more (query, key) pairs than the rows need.
    Rows of one length (one prompt repeated) pay a call per row for nothing; past that, the padding
    costs more than the calls."""
    T = max(t for _, t in spans)
    context = max(c + T for c, _ in spans)
    return 4 * len(spans) * T * context <= 5 * sum(t * (c + t) for c, t in spans)


def _unpacked(t: torch.Tensor, packed: torch.Tensor | None, B: int, T: int) -> torch.Tensor:
    """[N, width] at `packed` of the [B * T] grid -> [B, T, width], zeros at the padding; as is where
    not packed."""
    if packed is None:
        return t
    grid = t.new_zeros(B * T, t.shape[-1])
    grid[packed] = t
    return grid.view(B, T, -1)


def _rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    return rms_norm(x, norm.weight, norm.variance_epsilon)


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, heads, head_dim] rotated by cos/sin [B, T, head_dim] (broadcast over heads)."""
    cos, sin = cos[:, :, None], sin[:, :, None]
    return x * cos + rotate_half(x) * sin
