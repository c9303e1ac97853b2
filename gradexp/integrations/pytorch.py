"""PyTorch: ``watch`` keeps a model's gradients, parameters and updates as full tensors;
``log_gradient_stats`` logs per-layer statistics instead, for models too large to keep.

Imported on first use of ``gradexp.watch`` (and friends): ``import gradexp`` never imports torch.
"""

from __future__ import annotations

import ctypes
import functools
import json
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


class _Captured(Tensor):
    """A watched tensor's host copy: a view of a slab (see :class:`_Slabs`).

    On CUDA the copy is still running on the stream when the hook returns; ``_ready`` is
    an event recorded after it, and the first reader of ``array`` (the writer thread)
    waits for it there, so the training loop never synchronises per tensor.
    """

    __slots__ = ("_array", "_ready")

    def __init__(self, array: np.ndarray, ready: Any) -> None:
        self._array = array
        self._ready = ready
        self.logical = array.dtype
        self.meta = None

    @property
    def array(self) -> np.ndarray:  # type: ignore[override]  # Tensor's field, read-only here: waits first
        ready = self._ready
        if ready is not None:
            ready.synchronize()
            self._ready = None
        return self._array

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


class _Slabs:
    """Host memory for one fixed list of tensors (one hook's), copied by one call.

    Each capture takes a slab (one buffer holding every tensor, pinned on CUDA) and hands
    the writer NumPy views of it made through a fresh exporter object; once the writer
    has dropped the last view, the exporter dies and the slab comes back here. So a
    steady loop copies into memory it has touched before (fresh pages cost more than the
    copy) and builds no torch views after its first steps. The writer holds small tensors
    until its next flush (about a second) and large ones only until they are encoded, so
    the two sizes never share a slab: a small view never keeps a large slab alive.
    """

    def __init__(self, specs: Sequence[tuple[str, torch.dtype, torch.Size]], device: torch.device) -> None:
        self.device = device
        self.specs = [(key, _numpy_dtype(dtype), tuple(shape)) for key, dtype, shape in specs]
        self._torch = [(dtype, shape, shape.numel()) for _, dtype, shape in specs]
        sizes = [numel * dt.itemsize for (_, dt, _), (_, _, numel) in zip(self.specs, self._torch)]
        self.offsets: list[int] = []
        total = 0
        for n in sizes:
            self.offsets.append(total)
            total += -(-n // _ALIGN) * _ALIGN
        self.nbytes = sum(sizes)
        self._total = max(total, 1)
        self._exporter = ctypes.c_char * self._total
        self._free: list[tuple[np.ndarray, list[torch.Tensor]]] = []
        self._keep = max(2, _KEEP_IDLE_BYTES // self._total)
        self._lent: dict[int, tuple[weakref.ref, tuple[np.ndarray, list[torch.Tensor]]]] = {}

    def _new(self) -> tuple[np.ndarray, list[torch.Tensor]]:
        flat = torch.empty(self._total, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        dsts = [flat[off:].view(dtype)[:numel].view(shape)
                for off, (dtype, shape, numel) in zip(self.offsets, self._torch)]
        return flat.numpy(), dsts

    def _returned(self, ref: weakref.ref) -> None:
        """The writer dropped a capture's last view (runs on whichever thread did)."""
        _, slab = self._lent.pop(id(ref))
        if len(self._free) < self._keep:
            self._free.append(slab)

    def stage(self, tensors: Sequence[torch.Tensor] | None, out: Prepared) -> list[torch.Tensor]:
        """Copy ``tensors`` into a slab (None: leave it to the caller, who fills it before
        handing ``out`` over), add their views to ``out``; return the torch views."""
        try:
            slab = self._free.pop()
        except IndexError:
            slab = self._new()
        memory, dsts = slab
        # an ndarray is a buffer, but numpy's stubs say so only from Python 3.12 on (PEP 688)
        exporter = self._exporter.from_buffer(memory)  # type: ignore[arg-type]
        ref = weakref.ref(exporter, self._returned)  # kept here until it fires
        self._lent[id(ref)] = (ref, slab)
        with torch.no_grad():
            if tensors is None:
                ready = None
            elif self.device.type == "cpu":
                torch._foreach_copy_(dsts, list(tensors))
                ready = None
            else:
                cuda = self.device.type == "cuda"
                for dst, t in zip(dsts, tensors):
                    dst.copy_(t, non_blocking=cuda)
                ready = torch.cuda.Event() if cuda else None
                if ready is not None:
                    ready.record(torch.cuda.current_stream(self.device))
        captured = out.tensors
        for (key, dt, shape), off in zip(self.specs, self.offsets):
            # a ctypes array is a buffer; numpy's stubs list only some buffer types
            captured[key] = _Captured(np.ndarray(shape, dt, buffer=exporter, offset=off), ready)  # type: ignore[arg-type]
        out.nbytes += self.nbytes
        return dsts


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


class _Watch:
    """The hooks of one watched model and what they captured since the last ``log()``."""

    def __init__(self, run: Run, params: list[tuple[str, nn.Parameter]], kinds: tuple[str, ...],
                 log_freq: int, prefix: str, rank: int, when: Callable[[], bool] | None) -> None:
        self.run = run
        self.when = when
        self.params = params
        self.kinds = kinds
        self.log_freq = log_freq
        self.keys = {kind: [f"{kind}/{prefix}{name}" for name, _ in params] for kind in kinds}
        self.handles: list[Any] = []
        self._lock = threading.Lock()
        self._pending: Prepared | None = None
        self._capture: Prepared | None = None  # filled between an optimizer step's two hooks
        self._before: list[torch.Tensor] = []
        self._steps = 0
        self._counts = [0] * len(params)
        self._slabs: dict[tuple[Any, ...], _Slabs] = {}
        self._shards = {f"shard/{prefix}{name}": text for name, p in params
                        if (text := _placement(p, rank)) is not None}

    def _stage(self, items: Iterable[tuple[str, torch.Tensor]], out: Prepared, *,
               copy: bool = True) -> list[torch.Tensor]:
        """Copy each ``(key, tensor)`` to host memory, once, into ``out``; return the host
        tensors, in the order of ``items``. ``copy=False``: host tensors shaped like them, for
        the caller to fill."""
        small = self.run.settings.small_tensor_bytes
        groups: dict[tuple[torch.device, bool], list[int]] = {}
        items = list(items)
        for i, (_, t) in enumerate(items):
            groups.setdefault((t.device, t.numel() * t.element_size() >= small), []).append(i)
        hosts: list[torch.Tensor] = [None] * len(items)  # type: ignore[list-item]
        for (device, _), idx in groups.items():
            layout = (device, tuple((items[i][0], items[i][1].dtype, items[i][1].shape) for i in idx))
            slabs = self._slabs.get(layout)
            if slabs is None:
                slabs = self._slabs[layout] = _Slabs(layout[1], device)
            for i, host in zip(idx, slabs.stage([items[i][1] for i in idx] if copy else None, out)):
                hosts[i] = host
        return hosts

    def _due(self, n: int) -> bool:
        return self.when() if self.when is not None else n % self.log_freq == 0

    # -- with an optimizer: around each step --------------------------------------------------

    def pre_step(self, opt: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self._capture = None
        if not self._due(self._steps) or self.run._finished:
            return None
        cap = self._capture = Prepared()
        params = [_local(p) for _, p in self.params]
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0]: the optimizer
        on_cpu = all(p.device.type == "cpu" for p in params)
        # One copy call for everything known now: parameters, gradients (unless a closure
        # will make them) and, for updates, the values before the step. Those are, on the
        # CPU, the parameters' own host copies, or (not logging those) a copy in the updates'
        # host buffers; elsewhere a device copy that stays on the device.
        items = list(zip(self.keys["param"], params)) if "param" in self.kinds else []
        before_in_updates = "update" in self.kinds and on_cpu and not items
        if before_in_updates:
            items += zip(self.keys["update"], params)
        if "grad" in self.kinds and closure is None:
            items += self._grads()
        hosts = self._stage(items, cap)
        if "update" in self.kinds:
            if not on_cpu:
                with torch.no_grad():
                    self._before = [p.clone() for p in params]
            else:
                self._before = hosts[:len(params)]
        if "grad" not in self.kinds or closure is None:
            return None

        # The gradients exist only once the closure has run (Lightning, LBFGS): capture
        # them right after, before the optimizer uses them.
        def closure_then_capture() -> Any:
            loss = closure()
            if self._capture is cap:
                self._stage_grads(cap)
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_capture}
        return (args[0], closure_then_capture, *args[2:]), kwargs

    def post_step(self, opt: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._steps += 1
        cap, self._capture = self._capture, None
        if cap is None:
            return
        if "update" in self.kinds:
            before, self._before = self._before, []
            after = [_local(p) for _, p in self.params]
            keys = self.keys["update"]
            with torch.no_grad():
                if all(p.device.type == "cpu" for p in after):
                    # straight into the updates' host buffers: no copy besides this one pass
                    if "param" in self.kinds:
                        updates = self._stage(zip(keys, after), cap, copy=False)
                    else:
                        updates = before
                    for a, b, u in zip(after, before, updates):
                        torch.sub(a, b, out=u)
                else:
                    self._stage(zip(keys, torch._foreach_sub(after, before)), cap)
        self._hand_over(cap, replace=True)

    def _grads(self) -> list[tuple[str, torch.Tensor]]:
        return [(key, _local(p.grad)) for key, (_, p) in zip(self.keys["grad"], self.params)
                if p.grad is not None]

    def _stage_grads(self, cap: Prepared) -> None:
        grads = Prepared()
        self._stage(self._grads(), grads)
        _merge(cap, grads)  # a closure run twice in one step (LBFGS) keeps its last gradients

    # -- without an optimizer: as each gradient is accumulated ----------------------------------

    def on_grad(self, i: int, p: nn.Parameter) -> None:
        n = self._counts[i]
        self._counts[i] = n + 1
        if not self._due(n) or self.run._finished:
            return
        cap = Prepared()
        # a post-accumulate-grad hook: p.grad is set
        items = [(self.keys["grad"][i], _local(cast(torch.Tensor, p.grad)))] if "grad" in self.kinds else []
        if "param" in self.kinds:
            items.append((self.keys["param"][i], _local(p)))
        self._stage(items, cap)
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


def watch(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, log: str = "gradients",
          log_freq: int = 1, prefix: str | None = None, *, all_ranks: bool = False,
          run: Run | None = None, when: Callable[[], bool] | None = None) -> None:
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
    """
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
