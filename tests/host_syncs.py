"""Counting the operations of a piece of code that make the host wait for the device (a test helper).

On a GPU these are host-device synchronisations: a scalar read (``.item()``, ``bool()``, ``float()``),
an operation whose output size depends on the data (``nonzero``, boolean-mask indexing,
``masked_select``, ``unique``, ``bincount``, ``repeat_interleave`` without ``output_size``), a
comparison that returns a Python value (``equal``, ``is_nonzero``) and a copy to host memory
(``tolist``, ``numpy``). Counted on the CPU with a :class:`~torch.utils._python_dispatch.TorchDispatchMode`
(the same operators reach the dispatcher on every device), plus the Python-level conversions that
read memory directly.

Not counted: what runs inside functions marked :func:`sandbox.host_side.host_side` (host work on
CPU tensors by design) and the optimizers' reads of their step counters (``_get_value``: a CPU
tensor unless the optimizer is fused or capturable), which stay in host memory on a GPU too.
"""

from __future__ import annotations

import collections
import sys
import traceback
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch.optim.optimizer import _get_value
from torch.utils._python_dispatch import TorchDispatchMode

from sandbox.host_side import HOST_SIDE_CODE

aten = torch.ops.aten

SYNCING = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.equal.default,
    aten.is_nonzero.default,
    aten.bincount.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
}
"""Operators that make the host wait for the device whatever their arguments."""


def _in_host_code() -> bool:
    """Whether the caller runs inside host-side code (see the module docstring)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code in HOST_SIDE_CODE or frame.f_code is _get_value.__code__:
            return True
        frame = frame.f_back
    return False


def _boolean_index(func: Any, args: tuple, kwargs: dict) -> bool:
    """Indexing or index_put with a boolean mask (its size depends on the data)."""
    if func not in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default):
        return False
    indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


class HostSyncs(TorchDispatchMode):
    """Records each syncing operation (its name and where our code called it) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []

    def record(self, name: str) -> None:
        """One syncing call ``name``, with the innermost frame of the project's code that made it."""
        frames = [f for f in traceback.extract_stack()[:-2] if "/sandbox/" in f.filename or "/plugins/" in f.filename]
        where = f"{frames[-1].filename.rsplit('/', 2)[-2:]}:{frames[-1].lineno} {frames[-1].line}" if frames else "?"
        self.calls.append((name, where))

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if (func in SYNCING or _boolean_index(func, args, kwargs)) and not _in_host_code():
            if not (func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is not None):
                self.record(str(func.overloadpacket.__name__))
        return func(*args, **kwargs)

    def summary(self) -> str:
        """``count x name at file:line code`` for each distinct call site."""
        counts = collections.Counter(self.calls)
        return "\n".join(f"{n} x {name} at {where}" for (name, where), n in counts.most_common())


@contextmanager
def counting_host_syncs() -> Iterator[HostSyncs]:
    """Count syncing operations (and ``tolist``/``numpy`` conversions) inside the block."""
    mode = HostSyncs()
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def wrap(name: str) -> Any:
        original = originals[name]

        def converted(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not _in_host_code():
                mode.record(name)
            return original(self, *args, **kwargs)

        return converted

    for name in originals:
        setattr(torch.Tensor, name, wrap(name))
    try:
        with mode:
            yield mode
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
