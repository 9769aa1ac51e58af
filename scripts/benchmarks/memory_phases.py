"""Memory and FLOP accounting for the real-size benchmark (real_size_step.py): resident-set phases (or the CUDA
allocator's counters), tensors autograd saves outside checkpoints, FLOPs with the CPU's fused attention."""
from __future__ import annotations

import os
import time
from pathlib import Path


def _status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


CUDA = os.environ.get("TAV_DEVICE", "cpu") == "cuda"  # on a GPU: the CUDA allocator's counters instead of RSS


def _cuda(name):
    import torch
    torch.cuda.synchronize()
    return getattr(torch.cuda, name)()


def rss():
    return _cuda("memory_allocated") if CUDA else _status("VmRSS")


def reset_peak():
    _cuda("reset_peak_memory_stats") if CUDA else Path("/proc/self/clear_refs").write_text("5")


def peak():
    return _cuda("max_memory_allocated") if CUDA else _status("VmHWM")


class SavedCounter:
    """Bytes autograd saves outside checkpoints (unique storages), split weight copies / activations."""

    def __init__(self, weight_shapes):
        self.weight_shapes, self.seen, self.weights, self.activations = weight_shapes, set(), 0, 0

    def pack(self, t):
        try:
            storage = t.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
        except Exception:
            return t
        if key not in self.seen and key[0]:
            self.seen.add(key)
            if t.ndim >= 2 and tuple(t.shape) in self.weight_shapes:
                self.weights += key[1]
            else:
                self.activations += key[1]
        return t


class Phases:
    """RSS at the phase marks of one step."""

    def __init__(self):
        self.marks = {}

    def base(self):
        self.marks["weights"] = rss()
        self.marks["weights_anon"], self.marks["weights_file"] = _status("RssAnon"), _status("RssFile")
        reset_peak()
        self.t0 = time.perf_counter()

    def end_forward(self):
        self.marks["fwd_peak"] = peak()
        self.marks["kept"] = rss()
        self.t_fwd = time.perf_counter()
        reset_peak()

    def end_step(self):
        self.marks["bwd_peak"] = peak()
        self.marks["after"] = rss()
        self.marks["after_anon"], self.marks["after_file"] = _status("RssAnon"), _status("RssFile")
        self.t1 = time.perf_counter()


class StopAfterForward(Exception):
    pass


def _attention_flop_formulas():
    """FLOP formulas for the CPU's fused attention kernels, which torch's counter does not list
    (torch's own formulas for the CUDA kernels: 2 matmuls forward, 4 backward)."""
    import torch
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    if not hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        return {}
    return {aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, **kw: fc.sdpa_flop_count(q, k, v),
            aten._scaled_dot_product_flash_attention_for_cpu_backward:
                lambda g, q, k, v, *a, **kw: fc.sdpa_backward_flop_count(g, q, k, v)}


def flops_of(fn):
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_attention_flop_formulas()) as counter:
        fn()
    by_op = {str(k): v for k, v in counter.get_flop_counts().get("Global", {}).items()}
    return counter.get_total_flops(), by_op
