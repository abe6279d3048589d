"""The adapter catalog: every adapter of the store, in three tiers, and the thread that loads them.

- disk: the store is the source of truth. At start-up only names and headers are read
  (`AdapterLoader.read_header`), so start-up does not grow with the store's bodies; a file whose
  header fails is listed with its error, one whose body fails is listed so at its first load.
- host: validated adapters (`SparseAdapter`: indices and values in host memory), least recently
  used out first past `max_host_bytes`.
- resident: laid out on the model's device (`ResidentAdapter`), least recently used out first
  past `max_resident_adapters` or `max_resident_bytes`; adapters sharing an index set share one
  copy of it (`IndexSetCopy`: offsets, and the base weights there that fidelity is measured on,
  so a load of a known index set never waits for the weights). A resident adapter keeps its host
  copy (the mixed path reads values from it), so every resident adapter is also in the host tier.

Requests `acquire` their adapter when they are queued and `release` it when they end: an adapter
that queued or running requests use, or a pinned one, is never evicted. A request for an adapter
that is not resident waits in the queue (`gate`) while the loader thread, never the worker, reads,
validates and places it; requests for one cold adapter share one load. Loads, uploads, deletes
and evictions are serialised (`_tier_lock`), so what a load made room for is still free when it
lands. An upload or delete replaces the name's entry: no tier keeps the old version, though
requests already running finish on the version they started with.

A store shared with other servers (`follow_store`: Ray Serve replicas) may change under any
name at any time. Every lookup a request makes (listing, queueing, and the admission check each
step) first compares the file under the name with the entry's (`_follow`: one `lstat`), and
replaces or drops the entry when they differ, so a request joins a batch on the version the
store holds at that moment, and no server serves a replaced or deleted version once the write
that replaced it has returned.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from neuroada.errors import AdapterError
from neuroada.format import AdapterHeader, SparseAdapter
from neuroada_server.batch_adapters import SparseDeltaAdapters
from neuroada_server.generation import Failed
from neuroada_server.metrics import ServerMetrics
from neuroada_server.resident import AdapterLoader, Fidelity, IndexSetCopy, ResidentAdapter, UsageStats
from neuroada_server.store import AdapterStore, FileIdentity, InvalidAdapterName, sha256_of
from neuroada_server.threads import serial_torch

log = logging.getLogger(__name__)


class AdapterTooLarge(AdapterError):
    """The adapter alone is larger than a tier's budget."""


@dataclass(frozen=True)
class TierBudgets:
    max_resident_adapters: int
    max_resident_bytes: int  # on the model's device: values, plus one IndexSetCopy per index set
    max_host_bytes: int  # host copies (indices and values) of host and resident adapters


@dataclass(eq=False)
class _Entry:
    """One adapter of the store. An upload or a delete replaces the entry of its name."""

    name: str
    version: int
    header: AdapterHeader | None  # None when the header could not be read (see error)
    identity: FileIdentity | None = None  # the file the entry was made from
    sha256: str | None = None  # the file's content hash, known once its body has been read
    error: str | None = None  # why it cannot be served
    host: SparseAdapter | None = None
    resident: ResidentAdapter | None = None
    fidelity: Fidelity | None = None  # known once placed, kept after eviction
    merged: bool | None = None
    loaded_at: float | None = None
    stats: UsageStats = field(default_factory=UsageStats)

    @property
    def tier(self) -> str:
        return "resident" if self.resident is not None else "host" if self.host is not None else "disk"

    @property
    def index_hash(self) -> str:
        return self.header.metadata.index_hash

    def device_bytes(self, index_set_bytes_per_param: int) -> int:
        """What placing it adds to the resident tier (0 per parameter: its index set is there)."""
        return self.header.values_bytes + index_set_bytes_per_param * self.header.num_params


class AdapterCatalog:
    def __init__(
        self,
        store: AdapterStore,
        loader: AdapterLoader,
        adapters: SparseDeltaAdapters,
        metrics: ServerMetrics,
        budgets: TierBudgets,
        max_concurrent_uploads: int,
        pinned: tuple[str, ...] = (),
        follow_store: bool = False,
    ):
        self.store = store
        self.follow_store = follow_store
        self.loader = loader
        self.adapters = adapters
        self.metrics = metrics
        self.budgets = budgets
        self.pinned = frozenset(pinned)
        self.upload_slots = threading.BoundedSemaphore(max_concurrent_uploads)
        self.on_ready: Callable[[], None] = lambda: None  # a load landed or failed: queued requests may go
        self._entries: dict[str, _Entry] = {}
        self._host: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._resident: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._index_sets: dict[str, IndexSetCopy] = {}  # index_hash -> the copy its resident adapters share
        # int64 offsets plus a base weight, per parameter of an index set on the device
        self._index_set_bytes_per_param = 8 + loader.packed.dtype.itemsize
        self._refs: Counter[str] = Counter()  # name -> queued and running requests
        self._pending: OrderedDict[str, None] = OrderedDict()  # names to load, oldest first
        self._lock = threading.Lock()  # guards the state above; held briefly, never across I/O
        self._loader_wakeup = threading.Condition(self._lock)
        self._tier_lock = threading.Lock()  # serialises loads, uploads and deletes
        self._stopping = False
        self._thread = threading.Thread(target=self._load_loop, name="neuroada-adapter-loader", daemon=True)

    # --- lifecycle ---------------------------------------------------------------------------

    def scan(self) -> None:
        """List the store from headers alone, then load the pinned adapters (they must fit)."""
        started = time.perf_counter()
        for name in self.store.names():
            self._entries[name] = self._entry_from_header(name)
        unknown = sorted(self.pinned - self._entries.keys())
        if unknown:
            raise ValueError(f"pinned adapters not in the store {self.store.folder}: {', '.join(unknown)}")
        for name in sorted(self.pinned):
            if not self._load(name):
                raise ValueError(f"the pinned adapters do not fit the resident and host budgets ({self.budgets})")
        invalid = sum(e.error is not None for e in self._entries.values())
        self.metrics.adapter_scan_seconds.set(time.perf_counter() - started)
        log.info(
            "adapter store %s: %d adapters listed (%d invalid) in %.2f s, %d pinned",
            self.store.folder,
            len(self._entries),
            invalid,
            time.perf_counter() - started,
            len(self.pinned),
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._loader_wakeup.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    # --- what requests use -------------------------------------------------------------------

    def servable(self, name: str) -> bool:
        """In the store and not known to be invalid."""
        self._follow(name)
        with self._lock:
            entry = self._entries.get(name)
            return entry is not None and entry.error is None

    def acquire(self, name: str) -> str | None:
        """A request for `name` was queued: keep the adapter from eviction and load it if it is
        not resident. Returns the tier it was in (resident: a hit), or None (holding nothing)
        if it cannot be served."""
        self._follow(name)
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.error is not None:
                return None
            self._refs[name] += 1
            self._touch(name)
            tier = entry.tier
            if tier != "resident" and name not in self._pending:
                self._pending[name] = None
                self._loader_wakeup.notify()
        self.metrics.adapter_lookups.labels(result="hit" if tier == "resident" else "miss").inc()
        return tier

    def release(self, name: str) -> None:
        """A request that acquired `name` ended."""
        with self._lock:
            self._refs[name] -= 1
            if self._refs[name] <= 0:
                del self._refs[name]
                if self._pending:  # a load that waited for room may find some now
                    self._loader_wakeup.notify()

    def gate(self, name: str) -> bool | Failed:
        """May a queued request for `name` join a batch now (True), not yet (False), or never
        (why, for its client)?"""
        self._follow(name)
        with self._lock:
            entry = self._entries.get(name)
            if entry is None:
                return Failed(404, f"adapter {name!r} was deleted before the request ran", "adapter_not_found")
            if entry.error is not None:
                return self._unavailable(name, entry)
            return entry.resident is not None

    def unavailable(self, name: str) -> Failed:
        """Why `name` cannot be served, for its client: unknown, or invalid (and why)."""
        self._follow(name)
        with self._lock:
            return self._unavailable(name, self._entries.get(name))

    @staticmethod
    def _unavailable(name: str, entry: _Entry | None) -> Failed:
        if entry is not None and entry.error is not None:
            return Failed(404, f"adapter {name!r} is in the store but invalid: {entry.error}", "adapter_invalid")
        return Failed(404, f"adapter {name!r} not found", "adapter_not_found")

    def resident(self, name: str) -> ResidentAdapter | None:
        with self._lock:
            entry = self._entries.get(name)
            return entry.resident if entry is not None else None

    # --- what the routes show ----------------------------------------------------------------

    def describe(self, name: str) -> dict | None:
        self._follow(name)
        with self._lock:
            entry = self._entries.get(name)
            return self._describe(entry) if entry is not None and entry.error is None else None

    def page(self, prefix: str = "", offset: int = 0, limit: int | None = None) -> tuple[int, list[dict]]:
        """Servable adapters whose names start with `prefix`, sorted by name: (how many, one page)."""
        self._follow_all()
        with self._lock:
            names = sorted(n for n, e in self._entries.items() if e.error is None and n.startswith(prefix))
            chosen = names[offset:] if limit is None else names[offset : offset + limit]
            return len(names), [self._describe(self._entries[n]) for n in chosen]

    def invalid(self, prefix: str = "") -> list[dict]:
        self._follow_all()
        with self._lock:
            return [
                {"name": n, "error": e.error}
                for n, e in sorted(self._entries.items())
                if e.error is not None and n.startswith(prefix)
            ]

    def mixed_shapes(self) -> list[tuple[int, list[str]]]:
        """The (k, target layers) of the store's servable adapters, commonest first: what a compiled
        decode step traces mixed steps for at start."""
        with self._lock:
            shapes = Counter(
                (e.header.metadata.k, tuple(e.header.metadata.targets))
                for e in self._entries.values()
                if e.error is None and e.header is not None
            )
        return [(k, list(targets)) for (k, targets), _ in shapes.most_common()]

    def count(self) -> int:
        self._follow_all()
        with self._lock:
            return sum(e.error is None for e in self._entries.values())

    def update_gauges(self) -> None:
        """Tier sizes for /metrics (computed when scraped, not at every change)."""
        with self._lock:
            valid = [e for e in self._entries.values() if e.error is None]
            tiers = {
                "resident": (len(self._resident), self._resident_bytes()),
                "host": (len(self._host), sum(e.header.nbytes for e in self._host.values())),
                "disk": (len(valid), sum(e.header.nbytes for e in valid)),
            }
        for tier, (count, nbytes) in tiers.items():
            self.metrics.adapters.labels(tier=tier).set(count)
            self.metrics.adapter_bytes.labels(tier=tier).set(nbytes)
        device = self.adapters.packed.device
        if device.type == "cuda":
            self.metrics.device_memory.set(torch.cuda.memory_allocated(device))

    # --- management --------------------------------------------------------------------------

    def upload(self, name: str, incoming: Path) -> tuple[dict, bool]:
        """Validate the uploaded file fully, move it into the store atomically, and serve it at
        once (resident if there is room). Raises AdapterError and changes nothing (the caller
        removes `incoming`)."""
        host = self.loader.read(name, incoming)
        identity, sha256 = FileIdentity.of(incoming.stat()), sha256_of(incoming)  # a rename keeps both
        with self._tier_lock:
            with self._lock:
                index_set = self._index_sets.get(host.metadata.index_hash)
            resident = self.loader.place(name, host, self.loader.new_version(), index_set)
            header = AdapterHeader(host.metadata, host.nbytes, int(resident.delta.values.nbytes), host.num_params)
            entry = _Entry(name, resident.version, header, identity, sha256, stats=resident.stats)
            self._check_fits(entry)
            replaced = self.store.commit(incoming, name)
            with self._lock:
                old = self._entries.get(name)
                if old is not None:
                    self._drop(old)
                self._entries[name] = entry
                self._remember_placement(entry, resident)
                if self._make_room(entry):
                    self._insert(entry, host, resident)
                self._pending.pop(name, None)
                described = self._describe(entry)
        self.on_ready()
        return described, replaced or old is not None

    def delete(self, name: str) -> bool:
        with self._tier_lock:
            with self._lock:
                entry = self._entries.pop(name, None)
                if entry is not None:
                    self._drop(entry)
                self._pending.pop(name, None)
            self.adapters.forget(name)
            on_disk = self.store.delete(name)
        self.metrics.forget_adapter(name)
        self.on_ready()  # its queued requests fail now
        return entry is not None or on_disk

    # --- loading ---------------------------------------------------------------------------

    def _load_loop(self) -> None:
        """Load pending adapters, oldest request first; one that finds no room waits for a release."""
        serial_torch()  # the worker alone computes in parallel (neuroada_server.threads)
        while True:
            with self._lock:
                while not self._stopping and not self._pending:
                    self._loader_wakeup.wait()
                if self._stopping:
                    return
                pending = list(self._pending)
            progressed = False
            for name in pending:
                with self._lock:
                    entry = self._entries.get(name)
                if self._load(name):
                    progressed = True
                    with self._lock:  # an entry replaced meanwhile (a shared store) stays pending
                        if self._entries.get(name) is entry:
                            self._pending.pop(name, None)
                    self.on_ready()
            if not progressed:
                with self._lock:  # everything pending waits for room: sleep until a release or a delete
                    if not self._stopping and list(self._pending) == pending:
                        self._loader_wakeup.wait(timeout=1.0)

    def _load(self, name: str) -> bool:
        """Make `name` resident; False if there is no room for it yet. A file that fails marks
        its entry invalid (and counts as done)."""
        with self._tier_lock:
            with self._lock:
                entry = self._entries.get(name)
                if entry is None or entry.error is not None or entry.resident is not None:
                    return True
                if not self._make_room(entry):
                    return False
                host, index_set = entry.host, self._index_sets.get(entry.index_hash)
            started = time.perf_counter()
            try:
                if host is None:
                    stored = self.store.read(name)
                    if self.follow_store and stored.identity != entry.identity:
                        # Replaced since its header was read: the entry makes way for the new file.
                        self._follow(name)
                        return True
                    host = self.loader.read(name, stored.data)
                    entry.identity, entry.sha256 = stored.identity, stored.sha256
                    self.metrics.adapter_loads.labels(tier="host").inc()
                resident = self.loader.place(name, host, entry.version, index_set, entry.stats)
            except (AdapterError, InvalidAdapterName, OSError) as e:
                if self.follow_store and isinstance(e, FileNotFoundError):  # deleted by another server
                    self._follow(name)
                    return True
                log.error("adapter %s could not be loaded: %s", name, e)
                with self._lock:
                    entry.error = str(e)
                    self._drop(entry)
                return True
            with self._lock:
                if self._entries.get(name) is not entry:  # replaced or deleted meanwhile (shared store)
                    return True
                self._remember_placement(entry, resident)
                self._insert(entry, host, resident)
            self.metrics.adapter_loads.labels(tier="resident").inc()
            self.metrics.adapter_load_seconds.observe(time.perf_counter() - started)
            return True

    # --- a shared store ------------------------------------------------------------------------

    def _follow(self, name: str) -> None:
        """With `follow_store`: make `name`'s entry match the file under the name now. A new file
        (written by another server) replaces the entry, and is queued for loading if requests
        wait for it or it is pinned; no file drops the entry. The entry's own file costs one `lstat`."""
        if not self.follow_store:
            return
        try:
            identity = self.store.identity(name)
        except InvalidAdapterName:
            return
        with self._lock:
            seen = self._entries.get(name)
            if (seen.identity if seen is not None else None) == identity:
                return
        fresh = None if identity is None else self._entry_from_header(name)
        with self._lock:
            if self._entries.get(name) is not seen:  # another thread followed it first
                return
            if seen is not None:
                self._drop(seen)
            if fresh is None:
                del self._entries[name]
                self._pending.pop(name, None)
            else:
                self._entries[name] = fresh
                if (self._refs[name] > 0 or name in self.pinned) and fresh.error is None:
                    self._pending[name] = None
                    self._loader_wakeup.notify()
        if fresh is None:
            self.metrics.forget_adapter(name)
        self.on_ready()  # requests waiting for the old version go on the new one, or fail

    def _follow_all(self) -> None:
        """With `follow_store`: every name in the store or in the catalog (a listing)."""
        if not self.follow_store:
            return
        with self._lock:
            known = set(self._entries)
        for name in sorted(known | set(self.store.names())):
            self._follow(name)

    # --- tiers (callers hold _lock) ------------------------------------------------------------

    def _entry_from_header(self, name: str) -> _Entry:
        entry = _Entry(name, self.loader.new_version(), None)
        try:
            entry.identity = self.store.identity(name)
            entry.header = self.loader.read_header(self.store.source(name))
            self._check_fits(entry)
        except (AdapterError, InvalidAdapterName, OSError) as e:
            entry.error = str(e)
            log.error("adapter %s skipped: %s", name, e)
        return entry

    def _check_fits(self, entry: _Entry) -> None:
        """An adapter larger than a tier's whole budget can never be served: refuse it."""
        b = self.budgets
        for what, needed, budget in (
            ("host", entry.header.nbytes, b.max_host_bytes),
            ("resident", entry.device_bytes(self._index_set_bytes_per_param), b.max_resident_bytes),
        ):
            if needed > budget:
                flag = f"max_{what}_adapter_bytes"
                raise AdapterTooLarge(
                    f"it needs {needed} bytes in the {what} tier, whose whole budget ({flag}) is {budget}"
                )

    def _touch(self, name: str) -> None:
        for tier in (self._host, self._resident):
            if name in tier:
                tier.move_to_end(name)

    def _evictable(self, entry: _Entry) -> bool:
        return entry.name not in self.pinned and self._refs[entry.name] == 0

    def _make_room(self, entry: _Entry) -> bool:
        """Evict least recently used adapters until `entry` fits both tiers; evict nothing and
        return False when it cannot fit without evicting what is pinned or in use."""
        b = self.budgets
        evictable = [e for e in self._host.values() if e is not entry and self._evictable(e)]
        # Host-only adapters go first (cheapest to bring back), then resident ones.
        order = [e for e in evictable if e.resident is None] + [e for e in evictable if e.resident is not None]
        host_need = 0 if entry.host is not None else entry.header.nbytes
        host_used = sum(e.header.nbytes for e in self._host.values())
        victims_host = []
        for victim in order:
            if host_used + host_need <= b.max_host_bytes:
                break
            victims_host.append(victim)
            host_used -= victim.header.nbytes
        if host_used + host_need > b.max_host_bytes:
            return False
        kept = [e for e in self._resident.values() if e not in victims_host]
        victims_resident = []
        for victim in [e for e in kept if e is not entry and self._evictable(e)] + [None]:
            shares = any(e.index_hash == entry.index_hash for e in kept)
            needed = entry.device_bytes(0 if shares else self._index_set_bytes_per_param)
            fits_bytes = self._device_bytes(kept) + needed <= b.max_resident_bytes
            if len(kept) + 1 <= b.max_resident_adapters and fits_bytes:
                break
            if victim is None:
                return False
            victims_resident.append(victim)
            kept.remove(victim)
        for victim in victims_resident:
            self._evict_resident(victim)
        for victim in victims_host:
            if victim.resident is not None:
                self._evict_resident(victim)
            del self._host[victim.name]
            victim.host = None
            self.metrics.adapter_evictions.labels(tier="host").inc()
        return True

    def _insert(self, entry: _Entry, host: SparseAdapter, resident: ResidentAdapter) -> None:
        entry.host, entry.resident = host, resident
        for tier in (self._host, self._resident):
            tier[entry.name] = entry
            tier.move_to_end(entry.name)
        self._index_sets.setdefault(entry.index_hash, resident.index_set)

    def _remember_placement(self, entry: _Entry, resident: ResidentAdapter) -> None:
        entry.fidelity, entry.merged, entry.loaded_at = resident.fidelity, resident.merged, resident.loaded_at

    def _evict_resident(self, entry: _Entry) -> None:
        del self._resident[entry.name]
        entry.resident = None
        self._drop_unused_index_sets()
        self.metrics.adapter_evictions.labels(tier="resident").inc()

    def _drop(self, entry: _Entry) -> None:
        """Out of every tier (replaced, deleted or failed): not an eviction."""
        self._resident.pop(entry.name, None)
        if self._host.get(entry.name) is entry:
            del self._host[entry.name]
        entry.host = entry.resident = None
        self._drop_unused_index_sets()

    def _drop_unused_index_sets(self) -> None:
        used = {e.index_hash for e in self._resident.values()}
        for h in list(self._index_sets):
            if h not in used:
                del self._index_sets[h]

    def _resident_bytes(self) -> int:
        return self._device_bytes(list(self._resident.values()))

    def _device_bytes(self, resident: list[_Entry]) -> int:
        """Values of every resident adapter, plus one copy per index set."""
        params_per_set = {e.index_hash: e.header.num_params for e in resident}
        values = sum(e.header.values_bytes for e in resident)
        return values + self._index_set_bytes_per_param * sum(params_per_set.values())

    def _describe(self, entry: _Entry) -> dict:
        meta = entry.header.metadata
        fidelity = entry.fidelity
        return {
            "name": entry.name,
            "version": entry.version,
            "sha256": entry.sha256,
            "tier": entry.tier,
            "pinned": entry.name in self.pinned,
            "k": meta.k,
            "layers": len(meta.targets),
            "parameters": entry.header.num_params,
            "bytes": entry.header.nbytes,
            "fingerprint_match": True,  # checked from the header before it is listed
            "base_model": meta.base_model,
            "selection": meta.selection,
            "index_hash": meta.index_hash,
            "created": meta.created,
            "training": meta.training,
            # Known once the adapter has been placed on the device (at upload or first load).
            "fidelity": None
            if fidelity is None
            else {"survived": fidelity.survived, "relative_error": fidelity.relative_error},
            "path": None if entry.merged is None else "merged" if entry.merged else "unmerged",
            "loaded_at": entry.loaded_at,
            "last_used": entry.stats.last_used,
            "requests_served": entry.stats.requests_served,
        }
