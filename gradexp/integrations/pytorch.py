"""PyTorch: ``watch`` keeps a model's gradients, parameters and updates as full tensors;
``log_gradient_stats`` logs per-layer statistics instead, for models too large to keep.

Imported on first use of ``gradexp.watch`` (and friends): ``import gradexp`` never imports torch.
"""

from __future__ import annotations

import ctypes
import functools
import json
import operator
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from gradexp.core.errors import UsageError
from gradexp.write.run import Run, _merge, current
from gradexp.write.values import TENSOR, TEXT, Keys, Prepared, Tensor, check_key

__all__ = ["log_gradient_stats", "log_model_tensors", "unwatch", "watch"]

KINDS = {
    "gradients": ("grad",),
    "parameters": ("param",),
    "updates": ("update",),
    "all": ("grad", "param", "update"),
}
"""What ``watch(log=...)`` keeps: each kind is a key prefix, ``grad/<name>`` and so on."""

STAT_LEVELS = {
    "min": ("grad_l2", "l2_grad_param_ratio"),
    "default": ("grad_l2", "grad_max", "grad_std", "avg_abs_grad", "param_l2", "l2_grad_param_ratio"),
    "full": ("grad_l2", "grad_max", "grad_std", "avg_abs_grad", "param_l2", "l2_grad_param_ratio",
             "param_std", "avg_grad_std_ratio"),
}
"""The statistics of each ``log_gradient_stats`` level (those of the original gradexp package)."""

_ALIGN = 64  # offset of each tensor in a slab: any dtype can view it
_EMPTY = np.empty(0, dtype=np.uint8)
_KEEP_IDLE_BYTES = 64 << 20  # idle slabs a layout keeps (at least two)
_MAX_LAYOUTS = 16  # layouts a watch keeps; more means tensors change shape: start over

_Spec = tuple[torch.dtype, torch.Size, torch.device]
"""What a host slot depends on: a tensor's dtype, shape and device."""


class _Captured(Tensor):
    """A watched tensor's host copy: a view of a slab (see :class:`_Slabs`), made by the
    first reader of ``array`` (the writer thread), so ``log()`` pays for none of it.

    On CUDA the copy is still running on the stream when the hook returns; ``_ready`` is
    an event recorded after it, and that first reader waits for it, so the training loop
    never synchronises per tensor.
    """

    __slots__ = ("_array", "_memory", "_slot", "_ready")
    meta = None  # a class attribute: the writer reads it, nothing sets it

    def __init__(self, memory: Any, slot: tuple[np.dtype, tuple[int, ...], int], ready: Any) -> None:
        self._array: np.ndarray | None = None
        self._memory = memory
        self._slot = slot
        self._ready = ready

    @property
    def array(self) -> np.ndarray:  # type: ignore[override]  # Tensor's field, read-only here: waits first
        a = self._array
        if a is None:
            ready = self._ready
            if ready is not None:
                ready.synchronize()
                self._ready = None
            dt, shape, offset = self._slot
            a = self._array = np.ndarray(shape, dt, buffer=self._memory, offset=offset)
        return a

    @property
    def logical(self) -> np.dtype:  # type: ignore[override]  # Tensor's field: the slot's dtype
        return self._slot[0]

    @property
    def buffer(self) -> np.ndarray:
        """Nothing for the writer's pool: the slab goes back to its :class:`_Slabs` by itself."""
        return _EMPTY


@functools.cache
def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    name = str(dtype).rpartition(".")[2]
    if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        import ml_dtypes

        return np.dtype(getattr(ml_dtypes, name))
    return torch.empty(0, dtype=dtype).numpy().dtype


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (what this rank holds), else the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return t.detach() if to_local is None else to_local().detach()


_spec = cast(Callable[[torch.Tensor], _Spec], operator.attrgetter("dtype", "shape", "device"))
"""A tensor's :data:`_Spec` (an attrgetter: one C call per tensor, at every step)."""


_dtype = operator.attrgetter("dtype")


def _grad_dtypes(grads: list[torch.Tensor | None]) -> tuple[torch.dtype | None, ...]:
    """Each gradient's dtype, None for a parameter without one (one C call when all are set)."""
    try:
        return tuple(map(_dtype, grads))
    except AttributeError:
        return tuple([None if g is None else g.dtype for g in grads])


def _grad_specs(grads: list[torch.Tensor | None]) -> tuple[_Spec | None, ...]:
    """Each gradient's spec, None for a parameter without one."""
    try:
        return tuple(map(_spec, grads))  # type: ignore[arg-type]  # None raises AttributeError
    except AttributeError:
        return tuple([None if g is None else _spec(g) for g in grads])


_Pairs = tuple[list[torch.Tensor], list[torch.Tensor]]
"""Slots and, position by position, the slots to subtract from them."""

_Slab = tuple[np.ndarray, list[torch.Tensor]]
"""One buffer for a capture's tensors of one size class: its memory and a torch view per tensor."""


class _Slabs:
    """Host memory for one fixed list of tensors of one device.

    Each lease takes a slab (one buffer holding every tensor, pinned on CUDA). The writer
    thread makes its NumPy views through an exporter object over it (:meth:`export`); once
    the writer has dropped the last of them, the exporter dies and the slab comes back here.
    A slab never exported (a capture no ``log()`` took) comes back when it is dropped. So a
    steady loop copies into memory it has touched before (fresh pages cost more than the
    copy) and builds no torch views after its first steps.
    """

    def __init__(self, specs: Sequence[_Spec], device: torch.device) -> None:
        self.device = device
        self._torch = [(dtype, shape, shape.numel()) for dtype, shape, _ in specs]
        sizes = [numel * _numpy_dtype(dtype).itemsize for dtype, _, numel in self._torch]
        self.offsets: list[int] = []
        total = 0
        for n in sizes:
            self.offsets.append(total)
            total += -(-n // _ALIGN) * _ALIGN
        self.nbytes = sum(sizes)
        self._total = max(total, 1)
        self._exporter = ctypes.c_char * self._total
        self._free: list[_Slab] = []
        self._keep = max(2, _KEEP_IDLE_BYTES // self._total)
        self._lent: dict[int, tuple[weakref.ref, _Slab]] = {}

    def _new(self) -> _Slab:
        flat = torch.empty(self._total, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        dsts = [flat[off:].view(dtype)[:numel].view(shape)
                for off, (dtype, shape, numel) in zip(self.offsets, self._torch)]
        return flat.numpy(), dsts

    def _returned(self, ref: weakref.ref) -> None:
        """The writer dropped a lease's last view (runs on whichever thread did)."""
        _, slab = self._lent.pop(id(ref))
        self.give_back(slab)

    def give_back(self, slab: _Slab) -> None:
        """Take back a slab nothing reads any more."""
        if len(self._free) < self._keep:
            self._free.append(slab)

    def lease(self) -> _Slab:
        """A slab: its memory and its torch views, to copy into."""
        try:
            return self._free.pop()
        except IndexError:
            return self._new()

    def export(self, slab: _Slab) -> Any:
        """An exporter over a leased slab's memory, to make NumPy views through (on the writer
        thread): the slab comes back once it dies."""
        # an ndarray is a buffer, but numpy's stubs say so only from Python 3.12 on (PEP 688)
        exporter = self._exporter.from_buffer(slab[0])  # type: ignore[arg-type]
        ref = weakref.ref(exporter, self._returned)  # kept here until it fires
        self._lent[id(ref)] = (ref, slab)
        return exporter


class _Layout:
    """Where one kind of capture puts its tensors: a slot per ``(key, spec)``, in slabs of
    one device and size class each. The writer holds small tensors until its next flush
    (about a second) and large ones only until they are encoded, so the two sizes never
    share a slab: a small view never keeps a large slab alive.

    Built once per distinct list of specs, so a steady loop validates nothing per tensor:
    a changed dtype, shape or device changes the watch's lookup key, hence the layout.
    """

    _NONE = slice(0, 0)

    def __init__(self, keys: Sequence[str], specs: Sequence[_Spec], small: int, *, params: slice = _NONE,
                 updates: slice = _NONE) -> None:
        """``params``, ``updates``: an optimizer step's slots for the values before the step
        (copied then, with the gradients after them) and for its updates (filled after it)."""
        self.keys = list(keys)
        self.keyset = frozenset(keys)
        self.registered: Keys | None = None  # the run's key registry, once it holds these keys
        self.params, self.updates = params, updates
        groups: dict[tuple[torch.device, bool], list[int]] = {}
        for i, (dtype, shape, device) in enumerate(specs):
            big = shape.numel() * _numpy_dtype(dtype).itemsize >= small
            groups.setdefault((device, big), []).append(i)
        self.slabs = [(_Slabs([specs[i] for i in idx], device), idx) for (device, _), idx in groups.items()]
        self.nbytes = sum(s.nbytes for s, _ in self.slabs)
        self.cpu = all(device.type == "cpu" for _, _, device in specs)
        self.devices = sorted({device for _, _, device in specs if device.type == "cuda"}, key=str)
        where: list[tuple[int, tuple[np.dtype, tuple[int, ...], int]]] = [None] * len(specs)  # type: ignore[list-item]
        for g, (slabs, idx) in enumerate(self.slabs):
            for i, off in zip(idx, slabs.offsets):
                dtype, shape, _ = specs[i]
                where[i] = (g, (_numpy_dtype(dtype), tuple(shape), off))
        self._where = where
        self._events = [self.devices.index(s.device) if s.device.type == "cuda" else None for s, _ in self.slabs]
        # the slabs' views, concatenated, into the order of the keys
        slab_order = [i for _, idx in self.slabs for i in idx]
        position = {i: n for n, i in enumerate(slab_order)}
        self._order = operator.itemgetter(*[position[i] for i in range(len(specs))]) if specs else None

    def lease(self) -> _Lease:
        slabs = [s.lease() for s, _ in self.slabs]
        order = self._order
        if order is None:
            return _Lease(self, slabs, [])
        views = slabs[0][1] if len(slabs) == 1 else [v for _, vs in slabs for v in vs]
        dsts = order(views)
        return _Lease(self, slabs, list(dsts) if len(views) > 1 else [dsts])


class _Lease:
    """One capture's slots: torch views to copy into, then :meth:`hand` for the writer."""

    __slots__ = ("layout", "slabs", "dsts")

    def __init__(self, layout: _Layout, slabs: list[_Slab], dsts: list[torch.Tensor]) -> None:
        self.layout = layout
        self.slabs = slabs
        self.dsts = dsts

    def copy(self, dsts: list[torch.Tensor], srcs: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> None:
        """Copy each source into its slot: one call on the CPU, asynchronous on CUDA."""
        if not dsts:
            return
        if self.layout.cpu:
            torch._foreach_copy_(dsts, srcs)
        else:
            for dst, t in zip(dsts, srcs):
                dst.copy_(t, non_blocking=t.device.type == "cuda")

    def hand(self, out: Prepared, subtract: _Pairs | None = None) -> None:
        """Add the slots to ``out``, as one :class:`_Capture`, the copies into them all issued;
        on CUDA, an event per device recorded now, which the views' first reader waits for.
        ``subtract``: slots to subtract other slots from before they are read."""
        layout = self.layout
        if layout.devices:
            events: list[Any] = []
            for device in layout.devices:
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(device))
                events.append(event)
            ready = [None if e is None else events[e] for e in layout._events]
        else:
            ready = None
        out.bundles += (_Capture(layout, self.slabs, ready, subtract),)
        out.nbytes += layout.nbytes


class _Capture:
    """One capture's tensors on their way to the writer, as one item (a
    :class:`~gradexp.write.values.Bundle`): the writer thread makes their placeholders,
    and the exporters they view the slabs through. Dropped unread (no ``log()`` took it),
    it gives its slabs back."""

    __slots__ = ("layout", "slabs", "ready", "subtract", "_memory")

    def __init__(self, layout: _Layout, slabs: list[_Slab], ready: list[Any] | None,
                 subtract: _Pairs | None) -> None:
        self.layout = layout
        self.slabs = slabs
        self.ready = ready
        self.subtract = subtract
        self._memory: list[Any] | None = None

    def __del__(self) -> None:
        if self._memory is None:
            for (s, _), slab in zip(self.layout.slabs, self.slabs):
                s.give_back(slab)

    @property
    def keys(self) -> list[str]:
        return self.layout.keys

    @property
    def keyset(self) -> frozenset[str]:
        return self.layout.keyset

    def items(self) -> Iterable[tuple[str, Tensor]]:
        subtract, self.subtract = self.subtract, None
        if subtract is not None:  # the updates: the values after, minus those before
            for u, b in zip(*subtract):
                torch.sub(u, b, out=u)
        memory = self._memory
        if memory is None:
            memory = self._memory = [s.export(slab) for (s, _), slab in zip(self.layout.slabs, self.slabs)]
        ready = self.ready
        where = self.layout._where
        if ready is None:
            return zip(self.layout.keys, [_Captured(memory[g], slot, None) for g, slot in where])
        return zip(self.layout.keys, [_Captured(memory[g], slot, ready[g]) for g, slot in where])


def _placement(p: Any, rank: int) -> str | None:
    """How a DTensor parameter is laid out, as the JSON text logged beside its shards."""
    placements = getattr(p, "placements", None)
    if placements is None:
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh = p.device_mesh
    local_shape, offset = compute_local_shape_and_global_offset(p.shape, mesh, placements)
    return json.dumps({
        "rank": rank, "mesh_shape": list(mesh.shape), "mesh_coordinate": mesh.get_coordinate(),
        "placements": [repr(pl) for pl in placements], "global_shape": list(p.shape),
        "local_shape": list(local_shape), "global_offset": list(offset),
    })



class _Step:
    """What one optimizer step's capture holds between its two hooks."""

    __slots__ = ("lease", "before", "closure_grads")

    def __init__(self, lease: _Lease) -> None:
        self.lease = lease
        self.before: list[torch.Tensor] = []
        self.closure_grads: Prepared | None = None


class _Watch:
    """The hooks of one watched model and what they captured since the last ``log()``."""

    # slots: the hooks read a dozen attributes at every step, on caches the step has cooled
    __slots__ = ("run", "when", "_ps", "_sharded", "kinds", "log_freq", "keys", "handles", "_lock", "_pending",
                 "_capture", "_steps", "_counts", "_layouts", "_last", "_shards")

    def __init__(self, run: Run, params: list[tuple[str, nn.Parameter]], kinds: tuple[str, ...],
                 log_freq: int, prefix: str, rank: int, when: Callable[[], bool] | None) -> None:
        self.run = run
        self.when = when
        self._ps: list[torch.Tensor] = [p for _, p in params]
        self._sharded = any(hasattr(p, "to_local") for p in self._ps)
        self.kinds = kinds
        self.log_freq = log_freq
        self.keys = {kind: [f"{kind}/{prefix}{name}" for name, _ in params] for kind in kinds}
        self.handles: list[Any] = []
        self._lock = threading.Lock()
        self._pending: Prepared | None = None
        self._capture: _Step | None = None  # filled between an optimizer step's two hooks
        self._steps = 0
        self._counts = [0] * len(params)
        self._layouts: dict[Any, _Layout] = {}
        # the last step's layout and what it was looked up by: a steady loop compares with
        # that instead of hashing two dozen shapes and devices into a dict key
        self._last: tuple[Any, Any, _Layout | None] = (None, None, None)
        self._shards = {f"shard/{prefix}{name}": text for name, p in params
                        if (text := _placement(p, rank)) is not None}

    def _params(self) -> list[torch.Tensor]:
        """The parameters as this rank holds them (read under ``torch.no_grad``)."""
        return [_local(p) for p in self._ps] if self._sharded else self._ps

    def _grads(self) -> list[torch.Tensor | None]:
        if self._sharded:
            return [None if p.grad is None else _local(p.grad) for p in self._ps]
        return [p.grad for p in self._ps]

    def _layout(self, key: Any, slots: Callable[[], tuple[list[str], list[_Spec]]], *,
                params: slice = _Layout._NONE, updates: slice = _Layout._NONE) -> _Layout:
        """The layout for ``key`` (what determines the slots), made on first use from
        ``slots()``: their keys and specs."""
        found = self._layouts.get(key)
        if found is None:
            if len(self._layouts) >= _MAX_LAYOUTS:
                self._layouts.clear()
            keys, specs = slots()
            found = self._layouts[key] = _Layout(keys, specs, self.run.settings.small_tensor_bytes,
                                                 params=params, updates=updates)
        return found

    def _due(self, n: int) -> bool:
        return self.when() if self.when is not None else n % self.log_freq == 0

    # -- with an optimizer: around each step --------------------------------------------------

    def pre_step(self, opt: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._capture = None
        # (the steady loop's path: a few calls each step, on caches the step itself has cooled)
        if (self._steps % self.log_freq if self.when is None else not self.when()) or self.run._finished:
            return None
        params = [_local(p) for p in self._ps] if self._sharded else self._ps
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0]: the optimizer
        kinds = self.kinds
        psig = tuple(map(_spec, params))
        grads = self._grads() if "grad" in kinds and closure is None else None
        # a gradient has its parameter's shape and device (autograd and the .grad setter see
        # to it), not always its dtype (grad_dtype)
        gsig = None if grads is None else _grad_dtypes(grads)
        last_psig, last_gsig, layout = self._last
        if layout is None or psig != last_psig or gsig != last_gsig:
            layout = self._layouts.get((psig, gsig)) or self._main_layout(psig, gsig)
            self._last = (psig, gsig, layout)
        # One copy call for everything known now: parameters, gradients (unless a closure
        # will make them) and, for updates, the values before the step. Those are, on the
        # CPU, the parameters' own host copies, or (not logging those) a copy in the updates'
        # host slots; elsewhere a device copy that stays on the device.
        lease = layout.lease()
        step = self._capture = _Step(lease)
        srcs = list(params) if layout.params.stop else []
        if gsig is not None:
            srcs += [g for g in grads if g is not None]  # type: ignore[union-attr]
        grad_mode = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)  # torch.no_grad(), without a context object per step
        try:
            lease.copy(lease.dsts[:len(srcs)], srcs)
            if "update" in kinds and not layout.cpu:
                step.before = [p.clone() for p in params]
        finally:
            torch._C._set_grad_enabled(grad_mode)
        if "grad" not in kinds or closure is None:
            return None

        # The gradients exist only once the closure has run (Lightning, LBFGS): capture
        # them right after, before the optimizer uses them.
        def closure_then_capture() -> Any:
            loss = closure()
            if self._capture is step:  # a closure run twice in one step (LBFGS) keeps its last gradients
                step.closure_grads = self._capture_grads()
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_capture}
        return (args[0], closure_then_capture, *args[2:]), kwargs

    def _main_layout(self, psig: tuple[_Spec, ...], gsig: tuple[torch.dtype | None, ...] | None) -> _Layout:
        """Slots of a step's capture, those filled before the step first: parameters (or,
        on the CPU not logging those, the values before the step in the updates' slots),
        gradients, then updates."""
        keys: list[str] = []
        specs: list[_Spec] = []
        n = len(psig)
        kinds = self.kinds
        cpu = all(device.type == "cpu" for _, _, device in psig)
        before_in_updates = "update" in kinds and "param" not in kinds and cpu
        if "param" in kinds or before_in_updates:
            keys += self.keys["param" if "param" in kinds else "update"]
            specs += psig
        pslots = slice(0, len(keys))
        if gsig is not None:
            keys += [k for k, g in zip(self.keys["grad"], gsig) if g is not None]
            specs += [(g, shape, device) for g, (_, shape, device) in zip(gsig, psig) if g is not None]
        if before_in_updates:
            uslots = pslots
        elif "update" in kinds:
            keys += self.keys["update"]
            specs += psig
            uslots = slice(len(keys) - n, len(keys))
        else:
            uslots = slice(0, 0)
        return self._layout((psig, gsig), lambda: (keys, specs), params=pslots, updates=uslots)

    def _capture_grads(self) -> Prepared:
        grads = self._grads()
        gsig = _grad_specs(grads)
        present = [g for g in grads if g is not None]
        layout = self._layout(("grad", gsig), lambda: (
            [k for k, s in zip(self.keys["grad"], gsig) if s is not None], [s for s in gsig if s is not None]))
        lease = layout.lease()
        with torch.no_grad():
            lease.copy(lease.dsts, present)
        out = Prepared()
        lease.hand(out)
        return out

    def post_step(self, opt: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._steps += 1
        step, self._capture = self._capture, None
        if step is None:
            return
        lease = step.lease
        layout = lease.layout
        subtract = None
        if layout.updates.stop:
            after = [_local(p) for p in self._ps] if self._sharded else self._ps
            updates = lease.dsts[layout.updates]
            grad_mode = torch.is_grad_enabled()
            torch._C._set_grad_enabled(False)
            try:
                if layout.cpu and layout.updates is not layout.params:
                    # the values after into the updates' slots, one copy call; the writer
                    # thread subtracts the values before (their own slots) in place, so the
                    # training thread pays for a copy, not for a subtraction's extra reads
                    lease.copy(updates, after)
                    subtract = (updates, lease.dsts[layout.params])
                elif layout.cpu:
                    # the values before are in the updates' slots (parameters not logged):
                    # the update, straight into them
                    for a, u in zip(after, updates):
                        torch.sub(a, u, out=u)
                else:
                    lease.copy(updates, torch._foreach_sub(after, step.before))
            finally:
                torch._C._set_grad_enabled(grad_mode)
        cap = Prepared()
        lease.hand(cap, subtract)
        if step.closure_grads is not None:
            _merge(cap, step.closure_grads)
        self._hand_over(cap, replace=True)

    # -- without an optimizer: as each gradient is accumulated ----------------------------------

    def on_grad(self, i: int, p: nn.Parameter) -> None:
        n = self._counts[i]
        self._counts[i] = n + 1
        if not self._due(n) or self.run._finished:
            return
        # a post-accumulate-grad hook: p.grad is set
        srcs = [_local(cast(torch.Tensor, p.grad))] if "grad" in self.kinds else []
        if "param" in self.kinds:
            srcs.append(_local(p))
        sig = [_spec(t) for t in srcs]
        layout = self._layout((i, *sig), lambda: ([self.keys[k][i] for k in ("grad", "param") if k in self.kinds], sig))
        lease = layout.lease()
        with torch.no_grad():
            lease.copy(lease.dsts, srcs)
        cap = Prepared()
        lease.hand(cap)
        self._hand_over(cap, replace=False)

    # -- handing over to log() -----------------------------------------------------------------

    def _hand_over(self, cap: Prepared, *, replace: bool) -> None:
        with self._lock:  # a capture no log() took is dropped (its slabs go back for reuse)
            old = self._pending
            if old is None or replace:
                self._pending = cap
            else:
                _merge(old, cap)

    def take(self, keys: Keys) -> Prepared | None:
        """What was captured since the last ``log()``, its keys registered (log() calls this)."""
        with self._lock:
            p, self._pending = self._pending, None
        if p is None:
            return None
        if self._shards:  # each shard's placement, once, in the first row it has tensors in
            p.scalars.update(self._shards)
            self._shards = {}
        kinds = keys.kinds
        new = {k: TENSOR for k in p.tensors if k not in kinds}
        for b in p.bundles:
            layout = cast(_Capture, b).layout
            if layout.registered is not keys:  # once per layout: keys are never unregistered
                new.update((k, TENSOR) for k in layout.keys if k not in kinds)
                layout.registered = keys
        new.update((k, TEXT) for k in p.scalars if k not in kinds)
        if new:
            keys.add(new)
        return p

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        sources = self.run._row_sources
        if self.take in sources:
            sources.remove(self.take)
        with self._lock:
            self._pending = None


_watches: weakref.WeakKeyDictionary[nn.Module, _Watch] = weakref.WeakKeyDictionary()


def watch(model: nn.Module | Sequence[nn.Module], optimizer: torch.optim.Optimizer | nn.Module | None = None,
          log: str | None = "gradients", log_freq: int = 1, prefix: str | None = None, *,
          all_ranks: bool = False, run: Run | None = None, when: Callable[[], bool] | None = None,
          criterion: nn.Module | None = None, idx: int | None = None, log_graph: bool = False) -> None:
    """Keep ``model``'s gradients, parameters or updates, as full tensors, every ``log_freq`` steps.

    ``log`` is ``"gradients"``, ``"parameters"``, ``"updates"`` or ``"all"``. The tensors are
    logged as ``grad/<prefix><name>``, ``param/<prefix><name>`` and ``update/<prefix><name>``
    in the row of the next ``log()`` (so at its step); a capture no ``log()`` took before the
    next one is dropped, so set ``log_freq`` to your logging interval.

    With ``optimizer``, capture happens around each ``optimizer.step()``: the gradients are
    the ones it uses (after all-reduce, clipping and AMP unscaling), parameters are the values
    they were computed at, and updates are exactly ``param_after - param_before``;
    ``log_freq`` counts steps. Without it, each gradient is captured as it is accumulated
    (``log_freq`` counts backward passes) and updates cannot be known.

    Each tensor costs one device-to-host copy; on CUDA the copies are asynchronous into
    pinned memory and the writer thread waits for them, not the training loop. DTensor
    (FSDP2, tensor parallel) parameters are logged as this rank's local shard, with their
    placement under ``shard/<prefix><name>``. Under plain DDP only rank 0 logs, unless
    ``all_ranks``. The run is ``run``, else the current one. ``when``, if given, replaces
    ``log_freq``: a capture happens at the steps where ``when()`` is true (the framework
    integrations use it to capture exactly at the steps they log).

    wandb's call runs as it is: ``watch(model, criterion, log="all", log_freq=10)`` (a loss
    module where the optimizer goes is wandb's ``criterion``, which only its graph used),
    ``criterion=``, ``idx=``, a list of models (each watched, its keys prefixed ``m0.``,
    ``m1.``, ... after ``prefix``), and ``log=None`` (wandb then
    logs the graph only: here, nothing). ``log_graph=True`` raises: gradexp keeps no graph.
    """
    if log_graph:
        raise TypeError("watch(log_graph=True): gradexp does not log the model graph; it keeps tensors "
                        "(log='gradients', 'parameters', 'updates' or 'all')")
    if isinstance(optimizer, nn.Module):  # wandb's positional criterion: used for its graph only
        optimizer = None
    if isinstance(model, (list, tuple)):  # several models: keys apart by position, m0., m1., ...
        for i, m in enumerate(model):
            watch(m, optimizer, log, log_freq, f"{prefix or ''}m{i}." if len(model) > 1 else prefix,
                  all_ranks=all_ranks, run=run, when=when)
        return
    if log is None:  # wandb: the graph only, which gradexp does not keep
        return
    if log not in KINDS:
        raise ValueError(f"watch(log={log!r}): log must be one of {', '.join(map(repr, KINDS))}")
    if isinstance(log_freq, bool) or not isinstance(log_freq, int) or log_freq < 1:
        raise ValueError(f"watch(log_freq={log_freq!r}): log_freq must be an int >= 1")
    if not isinstance(model, nn.Module):
        raise TypeError(f"watch() takes a torch.nn.Module; got {type(model).__name__}")
    while isinstance(inner := getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = inner  # a wrapper's (accelerate's): its step() calls this one's
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"watch(optimizer=...) takes a torch.optim.Optimizer; got {type(optimizer).__name__}")
    kinds = KINDS[log]
    if optimizer is None:
        if log == "updates":
            raise ValueError("watch(log='updates') needs the optimizer: an update is what its step changed")
        kinds = tuple(k for k in kinds if k != "update")
    old = _watches.get(model)
    if old is not None and not old.run._finished:
        raise UsageError(f"{type(model).__name__} is watched already; call gradexp.unwatch(model) first")
    run = run if run is not None else current()
    if run.disabled:
        return
    dist = torch.distributed
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    in_optimizer = None if optimizer is None else {
        id(p) for group in optimizer.param_groups for p in group["params"]}
    params = [(name, p) for name, p in model.named_parameters()
              if p.requires_grad and (in_optimizer is None or id(p) in in_optimizer)]
    if not params:
        raise ValueError(f"watch(): {type(model).__name__} has no trainable parameters"
                         + ("" if optimizer is None else " that the optimizer updates"))
    sharded = any(hasattr(p, "placements") for _, p in params)
    if rank != 0 and not (all_ranks or sharded):
        return
    w = _Watch(run, params, kinds, log_freq, prefix or "", rank, when)
    kinds_seen = run._keys.kinds
    for key in (k for keys in w.keys.values() for k in keys):
        check_key(key, top_level=True)
        if kinds_seen.get(key, TENSOR) is not TENSOR:
            raise TypeError(f"watch(): key {key!r} was logged as a {kinds_seen[key]}; "
                            "pass prefix= to keep the watched tensors apart")
    if optimizer is not None:
        w.handles += [optimizer.register_step_pre_hook(w.pre_step),
                      optimizer.register_step_post_hook(w.post_step)]
    else:
        w.handles += [p.register_post_accumulate_grad_hook(functools.partial(w.on_grad, i))
                      for i, (_, p) in enumerate(params)]
    if old is not None:  # its run has finished: this watch replaces it
        old.remove()
    _watches[model] = w
    run._row_sources.append(w.take)


def unwatch(model: nn.Module | None = None) -> None:
    """Stop watching ``model`` (every watched model if None); what it captured is dropped."""
    for m in [model] if model is not None else list(_watches):
        w = _watches.pop(m, None)
        if w is not None:
            w.remove()


def log_gradient_stats(model: nn.Module, step: int | None = None, level: str = "default",
                       stats: Sequence[str] | None = None) -> dict[str, float]:
    """Log per-layer statistics of ``model``'s gradients and parameters, without the tensors.

    ``level`` picks the statistics (``STAT_LEVELS``), or ``stats`` names them. Each parameter
    with a gradient gets a history column per statistic, ``grad_stats/<name>/<stat>``, in the
    row of the next ``log()`` (or at ``step``). Computed on the device with fused
    multi-tensor reductions, then one host transfer per device for all of them. Returns
    the logged values.
    """
    if stats is None:
        if level not in STAT_LEVELS:
            raise ValueError(f"log_gradient_stats(level={level!r}): level must be one of "
                             f"{', '.join(map(repr, STAT_LEVELS))}")
        stats = STAT_LEVELS[level]
    unknown = [s for s in stats if s not in STAT_LEVELS["full"]]
    if unknown or not stats:
        raise ValueError(f"log_gradient_stats(stats={list(stats)!r}): known statistics are "
                         f"{', '.join(STAT_LEVELS['full'])}")
    named = [(name, _local(p), _local(p.grad)) for name, p in model.named_parameters() if p.grad is not None]
    by_device: dict[torch.device, list[int]] = {}
    for i, (_, p, _) in enumerate(named):
        by_device.setdefault(p.device, []).append(i)
    rows: list[list[float]] = [[]] * len(named)
    for idx in by_device.values():
        table = _stats_table([named[i][1] for i in idx], [named[i][2] for i in idx])
        for i, row in zip(idx, table.tolist()):
            rows[i] = row
    col = {s: j for j, s in enumerate(_COLUMNS)}
    data = {f"grad_stats/{name}/{s}": row[col[s]] for (name, _, _), row in zip(named, rows) for s in stats}
    current().log(data, step=step, commit=False)
    return data


def log_model_tensors(model: nn.Module, step: int | None = None, *, gradients: bool = True) -> None:
    """Log every parameter of ``model`` in full as ``param/<name>`` and, with ``gradients``,
    each gradient that is set as ``grad/<name>`` (the keys of :func:`watch`), in the row of
    the next ``log()`` (or at ``step``): the original gradexp package's call, once, where
    :func:`watch` keeps them every step."""
    data: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        data[f"param/{name}"] = _local(p.detach())
        if gradients and p.grad is not None:
            data[f"grad/{name}"] = _local(p.grad)
    current().log(data, step=step, commit=False)


_COLUMNS = ("grad_l2", "grad_max", "grad_std", "avg_abs_grad", "param_l2", "param_std",
            "l2_grad_param_ratio", "avg_grad_std_ratio")


def _stats_table(params: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
    """A (layers, _COLUMNS) float64 host tensor of the statistics of one device's tensors."""
    wide = (torch.float32, torch.float64)
    params = [p if p.dtype in wide else p.float() for p in params]
    grads = [g if g.dtype in wide else g.float() for g in grads]
    n = torch.tensor([g.numel() for g in grads], dtype=torch.float64, device=grads[0].device)

    def std(ts: list[torch.Tensor]) -> torch.Tensor:  # 0 for a single value, as the original
        return torch.stack([t.std() if t.numel() > 1 else t.new_zeros(()) for t in ts])

    with torch.no_grad():
        grad_l2, grad_max, grad_l1, param_l2 = (
            torch.stack(v).double() for v in (torch._foreach_norm(grads, 2), torch._foreach_norm(grads, float("inf")),
                                              torch._foreach_norm(grads, 1), torch._foreach_norm(params, 2)))
        grad_std, param_std = std(grads).double(), std(params).double()
        avg_abs = grad_l1 / n
        ratio = torch.where(n > 1, avg_abs / param_std * 100, torch.zeros_like(avg_abs))
        table = torch.stack([grad_l2, grad_max, grad_std, avg_abs, param_l2, param_std,
                             grad_l2 / param_l2 * 100, ratio], dim=1)
    return table.cpu()
