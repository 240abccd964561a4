"""Operator and host-sync counts of PyTorch code, measured on a CPU: what a small model's step
costs on a GPU, where every operator is a kernel launch and every host read a stall."""

from __future__ import annotations

import platform
from collections import Counter
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Operators whose output shape or value the host must wait for on a GPU.
SYNC_OPS = {
    aten._local_scalar_dense,  # .item(), bool(t), float(t), .tolist()
    aten.nonzero,
    aten.masked_select,
    aten._unique,
    aten._unique2,
    aten.unique_dim,
    aten.unique_consecutive,
    aten.bincount,
    aten.equal,
}
# Host-made tensors (`torch.tensor(data)`): a copy from host memory before the GPU can use them.
HOST_COPY_OPS = {aten.lift_fresh}


def is_view(func) -> bool:
    """True for operators that return a view of an input, or like `_unsafe_view` (what a
    reshape returns for a fresh tensor) only new metadata: no kernel runs for them."""
    if func.overloadpacket is aten._unsafe_view:
        return True
    returns = func._schema.returns
    return bool(returns) and all(
        r.alias_info is not None and not r.alias_info.is_write for r in returns
    )


def would_sync(func, args, kwargs) -> bool:
    """True when `func(*args, **kwargs)` makes the host wait for a GPU."""
    packet = func.overloadpacket
    if packet in SYNC_OPS:
        return True
    if packet in (aten.index, aten.index_put, aten.index_put_):  # boolean-mask indexing
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(i is not None and i.dtype in (torch.bool, torch.uint8) for i in indices or ())
    if packet == aten.repeat_interleave:  # the output size is read unless given
        return (
            kwargs.get("output_size") is None
            and isinstance(args[0], torch.Tensor)
            and (len(args) == 1 or isinstance(args[1], torch.Tensor))
        )
    return False


class OperatorCounter(TorchDispatchMode):
    """Counts every operator run inside it (views excluded), the ones that would force a host
    sync on a GPU, and host-made tensors; `ops`, `syncs` and `host_copies` name them."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()
        self.host_copies: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if not is_view(func):
            self.ops[name] += 1
        if would_sync(func, args, kwargs):
            self.syncs[name] += 1
        if func.overloadpacket in HOST_COPY_OPS:
            self.host_copies[name] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def total_syncs(self) -> int:
        return sum(self.syncs.values())


class StepOperatorCounter(Callback):
    """Counts operators and would-sync operators of each training step inside Lightning's loop
    (forward, backward, optimizer step and logging), skipping the first `skip` steps, whose
    lazy initialisation (optimizer state) happens once."""

    def __init__(self, skip: int = 1):
        self.skip, self.steps = skip, []
        self._counter: OperatorCounter | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step >= self.skip:
            self._counter = OperatorCounter().__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.steps.append(self._counter)
            self._counter = None


def cpu_name() -> str:
    """This CPU's model name and its bf16-relevant instruction sets, e.g. `AMD EPYC (avx512_bf16,
    avx512f)`: the name to give beside every absolute CPU figure."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if "model name" in ln), "")
    flags = next((ln for ln in info.splitlines() if ln.startswith("flags")), "")
    isa = [f for f in ("amx_bf16", "avx512_bf16", "avx512f") if f" {f}" in flags]
    return f"{name or platform.machine()} ({', '.join(isa) or 'no AVX-512'})"
