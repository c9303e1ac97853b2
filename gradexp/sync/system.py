"""System metrics, sampled by the sender process (never a thread of the training process).

Every ``system_interval`` seconds one row of the ``system`` stream: the host's CPU and
memory, the training process's CPU and resident memory, disk and network throughput since
the previous sample, and per GPU its utilisation, memory, temperature and power where
NVIDIA's management library (``pynvml``, from ``nvidia-ml-py``) is importable and reports
devices. A figure that cannot be read is absent from the row, never zero.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from gradexp.sync.streams import StreamWriter

__all__ = ["SystemSampler", "gpu_figures"]


class SystemSampler:
    """A thread writing a sample of ``pid`` and its host every ``interval`` seconds."""

    def __init__(self, pid: int, writer: StreamWriter, *, interval: float, log: Callable[[str], None]) -> None:
        import psutil

        self._psutil = psutil
        self._writer = writer
        self._interval = interval
        self._log = log
        try:
            self._proc: Any = psutil.Process(pid)
            self._proc.cpu_percent(None)  # the first call starts the measurement
        except psutil.Error:
            self._proc = None
        psutil.cpu_percent(None)
        self._disk = _counters(psutil.disk_io_counters)
        self._net = _counters(psutil.net_io_counters)
        self._last = time.monotonic()
        self._nvml = _nvml()
        self._step = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gradexp-system", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        next_at = time.monotonic() + self._interval
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            next_at += self._interval
            if next_at < time.monotonic():  # fell behind (a suspended machine): no burst of catch-up samples
                next_at = time.monotonic() + self._interval
            self._write_sample()
        self._write_sample()  # the last state, so even a run shorter than the interval has one

    def _write_sample(self) -> None:
        try:
            self._writer.write([self._step], [time.time()], [self.sample()])
            self._step += 1
            self._writer.seal_if_old()
        except Exception as e:  # a figure's failure must not end the sender
            self._log(f"system metrics: {e!r}")

    def sample(self) -> dict[str, float]:
        ps = self._psutil
        now = time.monotonic()
        dt = max(now - self._last, 1e-6)
        self._last = now
        row: dict[str, float] = {"system/cpu_percent": ps.cpu_percent(None)}
        vm = ps.virtual_memory()
        row.update({"system/memory/used_bytes": vm.total - vm.available, "system/memory/available_bytes":
                    vm.available, "system/memory/percent": vm.percent})
        if self._proc is not None:
            try:
                with self._proc.oneshot():
                    row["system/proc/cpu_percent"] = self._proc.cpu_percent(None)
                    row["system/proc/rss_bytes"] = self._proc.memory_info().rss
                    row["system/proc/threads"] = self._proc.num_threads()
            except ps.Error:  # the trainer is gone
                self._proc = None
        disk = _counters(ps.disk_io_counters)
        if disk is not None and self._disk is not None:
            row["system/disk/read_bytes_per_s"] = max(0, disk.read_bytes - self._disk.read_bytes) / dt
            row["system/disk/write_bytes_per_s"] = max(0, disk.write_bytes - self._disk.write_bytes) / dt
        self._disk = disk
        net = _counters(ps.net_io_counters)
        if net is not None and self._net is not None:
            row["system/net/sent_bytes_per_s"] = max(0, net.bytes_sent - self._net.bytes_sent) / dt
            row["system/net/recv_bytes_per_s"] = max(0, net.bytes_recv - self._net.bytes_recv) / dt
        self._net = net
        if self._nvml is not None:
            row.update(gpu_figures(self._nvml))
        return row

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._writer.seal()


def _counters(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except (OSError, RuntimeError):  # no disks or interfaces visible (some containers)
        return None


def _nvml() -> Any:
    """The initialised ``pynvml`` module when it reports at least one device, else None."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        return pynvml if pynvml.nvmlDeviceGetCount() > 0 else None
    except Exception:  # no driver, no device: no GPU figures
        return None


def gpu_figures(nvml: Any) -> dict[str, float]:
    """Per device ``system/gpu/<i>/...``: each figure the device reports (one it does not, such
    as power on some boards, is left out)."""
    out: dict[str, float] = {}
    for i in range(nvml.nvmlDeviceGetCount()):
        out.update(_device_figures(nvml, nvml.nvmlDeviceGetHandleByIndex(i), f"system/gpu/{i}/"))
    return out


def _device_figures(nvml: Any, h: Any, prefix: str) -> dict[str, float]:
    readings: dict[str, Callable[[], float]] = {
        "utilization_percent": lambda: nvml.nvmlDeviceGetUtilizationRates(h).gpu,
        "memory_used_bytes": lambda: nvml.nvmlDeviceGetMemoryInfo(h).used,
        "memory_total_bytes": lambda: nvml.nvmlDeviceGetMemoryInfo(h).total,
        "temperature_c": lambda: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU),
        "power_w": lambda: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0,
    }
    out: dict[str, float] = {}
    for name, read in readings.items():
        try:
            out[prefix + name] = read()
        except Exception:  # NVMLError_NotSupported and kin
            continue
    return out
