"""The expert store: routed experts read from a checkpoint on demand, cached under a byte
budget.

Legend: E experts, D model dim, F expert hidden dim, H = 2F (swiglu) or F (gelu) rows of
the input projection, L MoE layers.

One expert is all its projections: ``W_in [H, D]`` (``gate_up_proj[e]`` or
``up_proj[e]``) and ``W_out [D, F]`` (``down_proj[e]``). In a safetensors file a stacked
``[E, ...]`` tensor keeps expert e's rows contiguous, so an expert is two byte ranges of
the file, found from the header.

**Reading.** Each range is read with ``os.preadv`` straight into a cache slot (one copy
from the page cache). Not through the file mapping of ``safe_open``: its
``get_slice(name)[e]`` is a view of the mapping, and every page touched through it stays
in the process's RSS (RssFile) while the file is open -- measured: 16 experts of 24 MiB
read through it, 2 kept: RSS +720 MiB (RssFile +387 MiB, the rest freed copies the heap
kept); with ``preadv`` into 2 slots: +50 MiB. So the budget would hold for the cache but
not for the process.

**Budget.** The cache is fixed slots of one expert each (allocated on first use, then
reused: no allocator churn, so freed memory cannot pile up in the heap either), and
``resident_bytes = slots allocated x expert_bytes <= expert_memory`` always.
``scope="layer"`` (the default) splits the budget evenly over the MoE layers, each its
own pool: every layer then has the same number of slots, and one layer's burst cannot
evict every other layer's experts (at decode each layer runs once per token, so a
global LRU evicts layer l's experts just before they are needed again by token t+1 when
the budget is under one layer's worth). ``scope="global"`` is one pool for all layers
(uneven layers may use more). A budget below one expert per pool is a `ConfigError`
naming ``expert_memory`` and the smallest allowed value.

**Prefetch** (``prefetch=True``, scope "layer" only): `prefetch(layer, experts)` loads
experts into a layer's pool on a background thread while the forward computes the layer
before it (`OffloadedExperts` asks with the next layer's router applied to this layer's
input: the Pre-gated MoE / MoE-Infinity guess). Each pool has a lock; a forward holds its
layer's pool (`using`) from the layer's first expert to its last, and a prefetch that
arrives for a pool in use is dropped, so a slot is never overwritten while the forward
reads it. Waiting for a prefetch in flight counts as stall. `OffloadStats` says how many
experts were loaded ahead, how many of them were then used, and how many were evicted
unused.

**On a GPU** (``device="cuda"``): the slots -- the hot experts, under the budget -- are
GPU memory, and every expert read from the file is also kept in pinned CPU memory (the
host tier, read once: llama.cpp's ``-ot exps=CPU`` layout with a GPU cache in front), so
a miss after the first is one host-to-device copy, issued on the current stream (kernels
that read the slot before are queued ahead of it). The budget counts GPU bytes; the host
tier holds up to all the experts (``host_bytes`` in the stats). Not measured on a GPU yet:
tests/offload/test_cuda_offload.py runs it where CUDA exists.

**Quantised experts** (an int8 or int4 run of `moelab quantize`; ``ExpertLayout.quant``):
an expert is its projections' stored parts (int8: ``<proj>_qweight`` and ``<proj>_scale``;
int4: the nibbles, ``_scale`` and ``_zero``), each a byte range of the file, and a slot
holds them in the form the CPU kernel takes (`ExpertLayout.slot_parts`): int8 as stored;
int4 repacked on each miss into the kernel's blocked layout
(`moelab.quant.experts.kernel_pack_int4`, which `QuantizedExperts` uses at load; the
portable form where that kernel does not run), through one staging expert per thread.
The budget counts the slots' bytes, so at a given budget the store holds ~4x (int8) or
~7.5x (int4, group 128) as many experts as in float32: mixtral-offloading's design, an
LRU cache of low-bit experts. CPU only.

One forward at a time (the prefetch thread is the only other party).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from moelab.errors import CheckpointError, ConfigError
from moelab.offload.policies import POLICIES, CachePolicy

SCOPES = ("layer", "global")
# "keep": read experts through the kernel's page cache, as any read does. "drop": tell the
# kernel to drop the pages of each expert after reading it (POSIX_FADV_DONTNEED), so a miss
# is a read from the disk, not from a page cache that a machine too small for the weights
# would not have (benchmarks/memory.py --cold), and the file does not push other pages out.
PAGE_CACHE = ("keep", "drop")

_NO_PREFETCH = contextlib.nullcontext()

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_ST_NAMES = {torch.int8: "I8", torch.uint8: "U8", torch.bfloat16: "BF16"}
_ALIGN = 64  # bytes: each part of a quantised slot starts on a cache line (views of any dtype)
QUANT_FORMATS = ("int8", "int4")


# A tensor of a quantised expert: (shape, dtype); with a name, where it is in the file.
Shape = tuple[int, ...]


@dataclass(frozen=True)
class ExpertLayout:
    """Where one MoE layer's experts are in the file and what shape they have."""

    prefix: str  # state-dict prefix, e.g. "layers.3.mlp.experts"
    num_experts: int
    d_model: int
    d_expert: int
    activation: str = "swiglu"
    quant: str | None = None  # "int8" / "int4": the stored format of a quantised run
    group_size: int = 0  # int4
    kernel_form: bool = True  # int4: slots hold the kernel's packed layout (its kernel runs here)

    @property
    def in_name(self) -> str:
        return f"{self.prefix}.{'gate_up_proj' if self.activation == 'swiglu' else 'up_proj'}"

    @property
    def out_name(self) -> str:
        return f"{self.prefix}.down_proj"

    @property
    def in_rows(self) -> int:
        return 2 * self.d_expert if self.activation == "swiglu" else self.d_expert

    @property
    def expert_numel(self) -> int:
        return self.in_rows * self.d_model + self.d_model * self.d_expert

    def _projections(self) -> tuple[tuple[str, int, int], ...]:
        return (self.in_name, self.in_rows, self.d_model), (self.out_name, self.d_model, self.d_expert)

    def file_parts(self) -> tuple[tuple[str, Shape, torch.dtype], ...]:
        """A quantised expert's tensors as stored (``[E, *shape]`` each), the input
        projection's first: int8 ``_qweight [O, I]``, ``_scale [O]``; int4 ``_qweight
        [O, I/2]`` (nibbles), ``_scale``, ``_zero [O, N]``."""
        out: list[tuple[str, Shape, torch.dtype]] = []
        for name, O, I in self._projections():  # noqa: E741 - the legend's names
            if self.quant == "int8":
                out += [(f"{name}_qweight", (O, I), torch.int8), (f"{name}_scale", (O,), torch.bfloat16)]
            else:
                N = I // self.group_size
                out += [(f"{name}_qweight", (O, I // 2), torch.uint8), (f"{name}_scale", (O, N), torch.bfloat16),
                        (f"{name}_zero", (O, N), torch.bfloat16)]
        return tuple(out)

    def slot_parts(self) -> tuple[tuple[Shape, torch.dtype], ...]:
        """The same in a slot: as stored, but int4 in the kernel's form where it runs
        (per projection the packed ``[O, I/2]`` uint8 and the ``[N, O, 2]`` (scale, zero)
        pairs: the same bytes, `moelab.quant.experts.int4_scales_and_zeros`)."""
        if self.quant == "int4" and self.kernel_form:
            return tuple(p for _, O, I in self._projections()  # noqa: E741
                         for p in (((O, I // 2), torch.uint8), ((I // self.group_size, O, 2), torch.bfloat16)))
        return tuple((shape, dtype) for _, shape, dtype in self.file_parts())

    def slot_bytes(self) -> int:
        """Bytes of one quantised expert in a slot: its parts, each aligned."""
        return sum(_aligned(math.prod(shape) * dtype.itemsize) for shape, dtype in self.slot_parts())


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _part_views(buf: torch.Tensor, parts) -> tuple[torch.Tensor, ...]:
    """Views of the uint8 buffer `buf` as the ``(shape, dtype)`` `parts`, each aligned."""
    views, off = [], 0
    for shape, dtype in parts:
        n = math.prod(shape) * dtype.itemsize
        views.append(buf[off: off + n].view(dtype).view(shape))
        off += _aligned(n)
    return tuple(views)


@dataclass(frozen=True)
class OffloadStats:
    """What the store did since it was made (or since `reset_stats`).

    ``hits + misses`` is every expert the model asked for (one per layer per expert with
    rows, per forward); a miss reads the expert from the file (``bytes_read`` is what was
    read, the stored dtype's bytes) and evicts one when its pool is full.
    ``stall_s`` is the wall time spent reading on the forward's critical path.
    """

    hits: int
    misses: int
    evictions: int
    bytes_read: int
    stall_s: float
    expert_bytes: int  # one expert resident (the compute dtype; a quantised run's: its slot)
    budget_bytes: int  # expert_memory as given
    resident_bytes: int  # slots allocated now x expert_bytes
    peak_resident_bytes: int
    slots: int  # the most experts the store may hold (all pools)
    total_experts: int  # experts in the model (L x E)
    policy: str
    scope: str
    # prefetch (zeros without it): experts loaded ahead by the background thread, those
    # then asked for (their accesses are hits), those evicted before any use, and requests
    # dropped because the forward had already reached their layer.
    prefetched: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0
    prefetch_dropped: int = 0
    prefetch_bytes_read: int = 0
    device: str = "cpu"  # where the slots are (cuda: the host tier is pinned CPU memory)
    host_bytes: int = 0  # the host tier (device cuda): experts kept in pinned CPU memory

    @property
    def accesses(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else float("nan")

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d.update(accesses=self.accesses, hit_rate=self.hit_rate)
        return d

    def summary(self) -> str:
        """One line for a log or a terminal."""
        return (f"experts offloaded ({self.policy}, per {self.scope}): {self.slots}/{self.total_experts} slots, "
                f"{_size(self.resident_bytes)} resident of {_size(self.budget_bytes)} budget; "
                f"{self.accesses} accesses, hit rate {self.hit_rate:.1%}, {self.misses} misses, "
                f"{self.evictions} evictions, read {_size(self.bytes_read)}, stall {self.stall_s:.2f} s"
                + (f"; prefetched {self.prefetched} ({_size(self.prefetch_bytes_read)}), {self.prefetch_used} used, "
                   f"{self.prefetch_wasted} evicted unused, {self.prefetch_dropped} requests too late"
                   if self.prefetched or self.prefetch_dropped else ""))


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


class _TensorFile:
    """A safetensors file read by byte range: the header parsed once, then ``preadv``.

    Format: 8 bytes little-endian header length N, N bytes of JSON ``{name: {"dtype",
    "shape", "data_offsets": [begin, end]}}`` (offsets from the end of the header), data.
    """

    def __init__(self, path: Path, drop_pages: bool = False):
        self.path, self.drop_pages = path, drop_pages
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint file {path} does not exist") from None
        except OSError as e:
            raise CheckpointError(f"{path}: cannot open ({e})") from None
        try:
            self._read_header()
        except BaseException:
            os.close(self.fd)
            raise

    def _read_header(self) -> None:
        size = os.fstat(self.fd).st_size
        raw = os.pread(self.fd, 8, 0)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if n < 2 or 8 + n > size:
            raise CheckpointError(f"{self.path} is not a readable safetensors file (bad header length)")
        try:
            header = json.loads(os.pread(self.fd, n, 8))
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{self.path} is not a readable safetensors file (header: {e})") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.header: dict[str, dict] = header
        for name, entry in header.items():
            end = entry.get("data_offsets", [0, 0])[1]
            if self.data_start + end > size:
                raise CheckpointError(f"{self.path}: tensor {name!r} ends at byte {self.data_start + end}, past the "
                                      f"end of the file ({size} bytes): truncated?")

    def check_stacked(self, name: str, shape: tuple[int, ...], exact: torch.dtype | None = None) -> torch.dtype:
        """The stored dtype of `name`, which must have `shape` and a float dtype (or be
        stored exactly as `exact`)."""
        entry = self.header.get(name)
        if entry is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing (shape {shape} expected)")
        got = tuple(entry["shape"])
        if got != shape:
            raise CheckpointError(f"{self.path}: tensor {name!r} has shape {got}, the model expects {shape} "
                                  "(the checkpoint was saved from a different model config)")
        if exact is not None:
            if entry["dtype"] != _ST_NAMES[exact]:
                raise CheckpointError(f"{self.path}: tensor {name!r} is stored as {entry['dtype']}, expected "
                                      f"{_ST_NAMES[exact]} (the run's \"quant\" format)")
            return exact
        dtype = _ST_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} is stored as {entry['dtype']}; offloaded experts "
                                  f"read float tensors only ({', '.join(_ST_DTYPES)})")
        return dtype

    def read_row(self, name: str, index: int, out: torch.Tensor) -> int:
        """Read row `index` of the stacked tensor `name` into the contiguous `out` (same
        dtype as stored, same byte count as one row); returns the bytes read."""
        buf = memoryview(out.view(-1).view(torch.uint8).numpy())
        offset = self.data_start + self.header[name]["data_offsets"][0] + index * len(buf)
        done = 0
        while done < len(buf):
            n = os.preadv(self.fd, [buf[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(f"{self.path}: tensor {name!r} ends early at byte {offset + done}: truncated?")
            done += n
        if self.drop_pages:
            os.posix_fadvise(self.fd, offset, done, os.POSIX_FADV_DONTNEED)
        return done

    def drop_cached_pages(self) -> None:
        """Drop every page of the file from the page cache (clean pages: a hint the kernel
        honours unless another process maps them)."""
        os.posix_fadvise(self.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Pool:
    """Up to `capacity` slots of one expert each, and the policy that evicts among them."""

    def __init__(self, capacity: int, policy: CachePolicy):
        self.capacity, self.policy = capacity, policy
        self.slots: list[torch.Tensor] = []  # flat buffers of one expert each
        self.where: dict[tuple[int, int], int] = {}  # (layer, expert) -> slot
        self.lock = threading.Lock()  # the forward's thread and the prefetch thread
        self.in_use = False  # a forward is reading this pool's slots (prefetches are dropped)
        self.ahead: set[tuple[int, int]] = set()  # loaded by a prefetch, not asked for yet


class ExpertStore:
    """The routed experts of `layouts` in the safetensors file `path`, read on demand.

    ``get(layer, e) -> (W_in [H, D], W_out [D, F])`` returns views of a cache slot, valid
    until the next `get` of the same pool (the model uses them at once). See the module
    docstring for the budget (``expert_memory`` bytes, split per layer or global) and
    why the file is read with ``preadv``.
    """

    def __init__(self, path: str | Path, layouts: list[ExpertLayout], *, expert_memory: int,
                 policy: str = "lru", scope: str = "layer", dtype: torch.dtype = torch.float32,
                 page_cache: str = "keep", prefetch: bool = False, device: str | torch.device = "cpu"):
        if not layouts:
            raise ConfigError("ExpertStore: the model has no MoE layers; there are no experts to offload")
        if policy not in POLICIES:
            raise ConfigError(f"offload policy={policy!r} is not a policy; allowed: {', '.join(POLICIES)}")
        if scope not in SCOPES:
            raise ConfigError(f"offload scope={scope!r} is not allowed; allowed: {', '.join(SCOPES)}")
        if page_cache not in PAGE_CACHE:
            raise ConfigError(f"offload page_cache={page_cache!r} is not allowed; allowed: {', '.join(PAGE_CACHE)}")
        if prefetch and scope != "layer":
            raise ConfigError("offload prefetch needs scope='layer' (a prefetch fills the next layer's own pool; "
                              "with one global pool every prefetch would land in the pool the forward is reading)")
        if len({(lay.d_model, lay.d_expert, lay.activation) for lay in layouts}) != 1:
            raise ConfigError("ExpertStore: every MoE layer's experts must have the same shape")
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ConfigError(f"offload device={str(self.device)!r} is not supported; allowed: cpu, cuda")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError("offload device='cuda' but torch sees no CUDA device")
        if self.device.type == "cuda" and (self.device.index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"offload device={str(self.device)!r}: this machine has {torch.cuda.device_count()} "
                              "CUDA device(s)")
        self._host: dict[tuple[int, int], torch.Tensor] = {}  # device cuda: (layer, e) -> pinned expert
        self.layouts, self.dtype, self.policy_name, self.scope = layouts, dtype, policy, scope
        lay = layouts[0]
        self.quant = lay.quant
        if len({(la.quant, la.group_size, la.kernel_form) for la in layouts}) != 1:
            raise ConfigError("ExpertStore: every MoE layer's experts must be in the same format")
        if self.quant is not None and self.quant not in QUANT_FORMATS:
            raise ConfigError(f"ExpertStore: quant={self.quant!r} is not a format; allowed: {', '.join(QUANT_FORMATS)}")
        if self.quant is not None and self.device.type != "cpu":
            raise ConfigError(f"offload device={str(self.device)!r} with {self.quant} experts: quantised experts run "
                              "on torch's CPU kernels only; use device='cpu', or offload the float run")
        self.expert_bytes = lay.expert_numel * dtype.itemsize if self.quant is None else lay.slot_bytes()
        if isinstance(expert_memory, bool) or not isinstance(expert_memory, int):
            raise ConfigError(f"expert_memory must be an integer number of bytes, got {expert_memory!r}")
        n_pools = len(layouts) if scope == "layer" else 1
        smallest = n_pools * self.expert_bytes
        if expert_memory < smallest:
            per = f"one expert per MoE layer ({len(layouts)} layers x {self.expert_bytes} bytes)" \
                if scope == "layer" else f"one expert ({self.expert_bytes} bytes)"
            raise ConfigError(f"expert_memory={expert_memory} bytes is smaller than {per}; the smallest allowed "
                              f"value is {smallest} bytes ({_size(smallest)})")
        self.budget = expert_memory
        per_pool = expert_memory // n_pools // self.expert_bytes
        if scope == "layer":
            self._pools = [_Pool(min(per_pool, layout.num_experts), POLICIES[policy]()) for layout in layouts]
            self._pool_of = list(range(len(layouts)))
        else:
            total = sum(layout.num_experts for layout in layouts)
            self._pools = [_Pool(min(per_pool, total), POLICIES[policy]())]
            self._pool_of = [0] * len(layouts)
        self.file = _TensorFile(Path(path), drop_pages=page_cache == "drop")
        self._stored: list[torch.dtype] = []
        for layout in layouts if self.quant is not None else ():
            for name, shape, dt in layout.file_parts():
                self.file.check_stacked(name, (layout.num_experts, *shape), exact=dt)
        for layout in layouts if self.quant is None else ():
            E = layout.num_experts
            a = self.file.check_stacked(layout.in_name, (E, layout.in_rows, layout.d_model))
            b = self.file.check_stacked(layout.out_name, (E, layout.d_model, layout.d_expert))
            if a != b:
                raise CheckpointError(f"{path}: {layout.in_name} is {a} but {layout.out_name} is {b}")
            self._stored.append(a)
        self._local = threading.local()  # per thread: one expert in a stored dtype != dtype
        self._slot_views: dict[int, tuple[torch.Tensor, ...]] = {}  # quantised: a slot's data_ptr -> its parts
        self._count_lock = threading.Lock()  # resident bytes: both threads allocate slots
        self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="moelab-prefetch") if prefetch else None
        self.reset_stats()

    # -- the cache

    def get(self, layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert `e` of MoE layer `layer` (its index in `layouts`): ``(W_in, W_out)``."""
        pool = self._pools[self._pool_of[layer]]
        key = (layer, e)
        with pool.lock:  # held by a prefetch only outside `using`, where the forward does not wait for it
            slot = pool.where.get(key)
            if slot is not None:
                self._hits += 1
                pool.policy.on_hit(key)
                if key in pool.ahead:
                    pool.ahead.discard(key)
                    self._pf_used += 1
            else:
                t0 = time.perf_counter()
                self._misses += 1
                slot = self._take_slot(pool, key)
                self._bytes_read += self._load(layer, e, pool.slots[slot])
                self._stall += time.perf_counter() - t0
            return self._views(layer, pool.slots[slot])

    def _take_slot(self, pool: _Pool, key: tuple[int, int]) -> int:
        """A slot for `key` (a new one while the pool has room, else the victim's), now
        holding `key` as far as the pool knows; call with ``pool.lock`` held."""
        if len(pool.slots) < pool.capacity:
            slot = len(pool.slots)
            pool.slots.append(torch.empty(self.layouts[key[0]].expert_numel, dtype=self.dtype, device=self.device)
                              if self.quant is None else torch.empty(self.expert_bytes, dtype=torch.uint8))
            with self._count_lock:
                self._resident += self.expert_bytes
                self._peak = max(self._peak, self._resident)
        else:
            victim = pool.policy.victim()
            pool.policy.on_evict(victim)
            slot = pool.where.pop(victim)
            self._evictions += 1
            if victim in pool.ahead:
                pool.ahead.discard(victim)
                self._pf_wasted += 1
        pool.where[key] = slot
        pool.policy.on_insert(key)
        return slot

    # -- prefetch

    def using(self, layer: int) -> contextlib.AbstractContextManager[None]:
        """While a forward reads `layer`'s experts: a prefetch in flight for its pool is
        waited for (stall), and one that arrives later is dropped. Without prefetch a
        shared no-op (no generator per layer per token on the decode path)."""
        return _NO_PREFETCH if self._prefetcher is None else self._using(layer)

    @contextlib.contextmanager
    def _using(self, layer: int) -> Iterator[None]:
        pool = self._pools[self._pool_of[layer]]
        t0 = time.perf_counter()
        with pool.lock:
            pool.in_use = True
        self._stall += time.perf_counter() - t0
        try:
            yield
        finally:
            with pool.lock:
                pool.in_use = False

    def prefetch(self, layer: int, experts: Sequence[int]) -> None:
        """Load `experts` of `layer` (most wanted first; as many as its pool holds) on the
        background thread. A no-op without ``prefetch=True``."""
        if self._prefetcher is not None and experts:
            self._prefetcher.submit(self._prefetch, layer, list(experts))

    def _prefetch(self, layer: int, experts: list[int]) -> None:
        pool = self._pools[self._pool_of[layer]]
        with pool.lock:
            if pool.in_use or self.file.fd < 0:
                self._pf_dropped += 1
                return
            for e in experts[: pool.capacity]:
                key = (layer, e)
                if key in pool.where:
                    continue
                slot = self._take_slot(pool, key)
                self._pf_bytes += self._load(layer, e, pool.slots[slot])
                pool.ahead.add(key)
                self._pf_loaded += 1

    def wait_prefetch(self) -> None:
        """Block until every prefetch asked for so far is done (tests, benchmarks)."""
        if self._prefetcher is not None:
            self._prefetcher.submit(lambda: None).result()

    def _views(self, layer: int, buf: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A slot's tensors: float ``(W_in, W_out)``; quantised, `ExpertLayout.slot_parts`."""
        lay = self.layouts[layer]
        if self.quant is not None:
            # Made once per slot: every layer's experts have one layout, and a get() that
            # hits would otherwise rebuild the parts and their views (~10 us) every time.
            views = self._slot_views.get(buf.data_ptr())
            if views is None:
                # Normal views even under inference_mode: a later miss outside it writes them.
                with torch.inference_mode(False):
                    views = self._slot_views[buf.data_ptr()] = _part_views(buf, lay.slot_parts())
            return views
        n_in = lay.in_rows * lay.d_model
        return buf[:n_in].view(lay.in_rows, lay.d_model), buf[n_in:].view(lay.d_model, lay.d_expert)

    def _load(self, layer: int, e: int, buf: torch.Tensor) -> int:
        """Expert e of `layer` into the slot `buf`; returns the bytes read from the file."""
        if self.device.type == "cpu":
            return self._read(layer, e, buf)
        key, n = (layer, e), 0
        host = self._host.get(key)
        if host is None:  # first use: from the file into the pinned host tier, kept
            host = torch.empty(buf.numel(), dtype=self.dtype, pin_memory=True)
            n = self._read(layer, e, host)
            with self._count_lock:
                self._host[key] = host
        buf.copy_(host, non_blocking=True)  # the host copy is never written again: safe to overlap
        return n

    def _read(self, layer: int, e: int, buf: torch.Tensor) -> int:
        """Read expert e of `layer` from the file into the CPU tensor `buf`; the bytes read."""
        if self.quant is not None:
            return self._read_quantized(layer, e, buf)
        stored = self._stored[layer]
        target = buf
        if stored != self.dtype:  # read in the stored dtype, then cast into the slot
            staging = self._local.__dict__.setdefault("staging", {})
            if stored not in staging:
                staging[stored] = torch.empty(buf.numel(), dtype=stored)
            target = staging[stored]
        w_in, w_out = self._views(layer, target)
        lay = self.layouts[layer]
        n = self.file.read_row(lay.in_name, e, w_in) + self.file.read_row(lay.out_name, e, w_out)
        if target is not buf:
            buf.copy_(target)
        return n

    def _read_quantized(self, layer: int, e: int, buf: torch.Tensor) -> int:
        """Expert e's stored parts into the slot `buf` (int4 in the kernel's form: through a
        per-thread staging buffer, then converted)."""
        lay = self.layouts[layer]
        file_parts = lay.file_parts()
        if lay.quant == "int8" or not lay.kernel_form:
            return sum(self.file.read_row(name, e, t)
                       for (name, _, _), t in zip(file_parts, self._views(layer, buf), strict=True))
        from moelab.quant.experts import int4_scales_and_zeros, kernel_pack_int4

        flat = getattr(self._local, "int4", None)  # one expert per thread (every layer's have one shape)
        if flat is None:
            flat = self._local.int4 = torch.empty(sum(_aligned(math.prod(s) * d.itemsize) for _, s, d in file_parts),
                                                  dtype=torch.uint8)
        stored = _part_views(flat, [(shape, dt) for _, shape, dt in file_parts])
        n = sum(self.file.read_row(name, e, t) for (name, _, _), t in zip(file_parts, stored, strict=True))
        slot = self._views(layer, buf)
        for p in range(2):  # in, out: nibbles -> the kernel's packing; scale, zero -> its pairs
            q, scale, zero = stored[3 * p: 3 * p + 3]
            slot[2 * p].copy_(kernel_pack_int4(q))
            slot[2 * p + 1].copy_(int4_scales_and_zeros(scale, zero))
        return n

    def resident(self, layer: int) -> list[int]:
        """The experts of `layer` in the cache now (sorted)."""
        pool = self._pools[self._pool_of[layer]]
        return sorted(e for (lay, e) in pool.where if lay == layer)

    @property
    def resident_bytes(self) -> int:
        """Bytes of expert weights the store holds now (its slots; <= the budget)."""
        return self._resident

    # -- stats

    def reset_stats(self) -> None:
        if getattr(self, "_prefetcher", None) is not None:
            self.wait_prefetch()  # a prefetch in flight would count into the new stats
        self._hits = self._misses = self._evictions = self._bytes_read = 0
        self._pf_loaded = self._pf_used = self._pf_wasted = self._pf_dropped = self._pf_bytes = 0
        self._stall = 0.0
        self._resident = sum(len(p.slots) for p in getattr(self, "_pools", [])) * self.expert_bytes
        self._peak = self._resident

    def stats(self) -> OffloadStats:
        return OffloadStats(
            hits=self._hits, misses=self._misses, evictions=self._evictions, bytes_read=self._bytes_read,
            stall_s=self._stall, expert_bytes=self.expert_bytes, budget_bytes=self.budget,
            resident_bytes=self._resident, peak_resident_bytes=self._peak,
            slots=sum(p.capacity for p in self._pools),
            total_experts=sum(lay.num_experts for lay in self.layouts), policy=self.policy_name, scope=self.scope,
            prefetched=self._pf_loaded, prefetch_used=self._pf_used, prefetch_wasted=self._pf_wasted,
            prefetch_dropped=self._pf_dropped, prefetch_bytes_read=self._pf_bytes, device=str(self.device),
            host_bytes=sum(t.numel() * t.element_size() for t in list(self._host.values())),
        )

    def close(self) -> None:
        """Close the file and drop the cache."""
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True)
            self._prefetcher = None
        self.file.close()
        for p in self._pools:
            p.slots.clear()
            p.where.clear()
        self._slot_views.clear()
        self._host.clear()
        self._resident = 0

    def __del__(self) -> None:
        file = getattr(self, "file", None)
        if file is not None:
            file.close()
