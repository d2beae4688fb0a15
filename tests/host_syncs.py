"""Counting the operations of a piece of code that make the host wait for the device (a test helper).

On a GPU these are host-device synchronisations: a scalar read (``.item()``, ``bool()``, ``int()``,
``float()``), an operation whose output size depends on the data (``nonzero``, boolean-mask
indexing, ``masked_select``, ``unique``, ``bincount``, ``repeat_interleave`` without
``output_size``), a comparison that returns a Python value (``equal``, ``is_nonzero``) and a copy
to host memory (``tolist``, ``numpy``, ``cpu()`` and ``.to("cpu")`` of a device tensor). The operators are counted with a
:class:`~torch.utils._python_dispatch.TorchDispatchMode` (the same operators reach the dispatcher
on every device); the reads and copies at the Python level with a
:class:`~torch.overrides.TorchFunctionMode`, which sees them on the CPU too, where a copy to the
host dispatches nothing.

Host-side code (functions marked :func:`sandbox.host_side.host_side`: host work on CPU tensors by
design) is trusted only with host tensors. The counter tells the two apart by where a tensor came
from: a *device tensor* is one that an operation outside host-side code made while counting, one
computed from a device tensor, or one marked so (:meth:`HostSyncs.mark_device`, e.g. a batch's
device copies); host-side code that operates on or reads a device tensor is counted. Also not
counted: the optimizers' reads of their step counters (``_get_value``: a CPU tensor unless the
optimizer is fused or capturable), which stay in host memory on a GPU too.
"""

from __future__ import annotations

import collections
import sys
import traceback
import weakref
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch.optim.optimizer import _get_value
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

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


READS = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "__array__", "__repr__",
         "__str__", "__format__"}
"""Tensor methods that read the tensor's memory from the host (the last four print it or hand it to
numpy: they read through ``tolist``/``numpy`` inside, which this mode does not see while it handles them)."""


def _in_code(codes: set | frozenset) -> bool:
    """Whether a function whose code object is in ``codes`` is on the caller's stack."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


def _in_host_code() -> bool:
    """Whether the caller runs inside host-side code (see the module docstring)."""
    return _in_code(HOST_SIDE_CODE)


OPTIMIZER_COUNTERS = frozenset({_get_value.__code__})


def _in_optimizer_counter() -> bool:
    """Whether the caller runs inside an optimizer's read of its step counter (see the module docstring)."""
    return _in_code(OPTIMIZER_COUNTERS)


def _boolean_index(func: Any, args: tuple, kwargs: dict) -> bool:
    """Indexing or index_put with a boolean mask (its size depends on the data)."""
    if func not in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default):
        return False
    indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


def _tensors(*values: Any) -> list[torch.Tensor]:
    """The tensors among ``values``, however nested in lists, tuples and dicts."""
    return [leaf for leaf in tree_leaves(values) if isinstance(leaf, torch.Tensor)]


def _copies_to_host(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether ``func`` copies a tensor to host memory: ``Tensor.cpu``, or ``Tensor.to`` with the device
    ``"cpu"`` written as a string. (On the CPU a move to the run's device, ``.to(device)`` with a
    ``torch.device``, cannot be told from a copy to the host: it is not counted. ``Tensor.copy_`` is
    decided by :class:`PythonReads`, which knows which of its tensors are device tensors.)"""
    name = getattr(func, "__name__", "")
    if name == "cpu":
        return True
    if name != "to":
        return False
    target = kwargs.get("device", args[1] if len(args) > 1 else None)
    return isinstance(target, str) and torch.device(target).type == "cpu"


class DeviceTensors:
    """The device tensors seen while counting (by identity; a tensor that died is forgotten)."""

    def __init__(self) -> None:
        self._references: dict[int, weakref.ref] = {}

    def add(self, tensor: torch.Tensor) -> None:
        """Mark ``tensor`` as being in device memory."""
        self._references[id(tensor)] = weakref.ref(tensor)

    def __contains__(self, tensor: torch.Tensor) -> bool:
        reference = self._references.get(id(tensor))
        return reference is not None and reference() is tensor


class HostSyncs(TorchDispatchMode):
    """Records each syncing operation (its name and where our code called it) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, str]] = []
        self.device = DeviceTensors()
        self.reading = 0
        """Nesting depth of a Python-level read being counted: its operators are not counted again."""

    def mark_device(self, *tensors: torch.Tensor | None) -> None:
        """Mark ``tensors`` (None ignored) as device tensors: code reading them waits for the device."""
        for tensor in tensors:
            if tensor is not None:
                self.device.add(tensor)

    def record(self, name: str) -> None:
        """One syncing call ``name``, with the innermost frame of the project's code that made it."""
        frames = [f for f in traceback.extract_stack()[:-2] if "/sandbox/" in f.filename or "/plugins/" in f.filename]
        where = f"{frames[-1].filename.rsplit('/', 2)[-2:]}:{frames[-1].lineno} {frames[-1].line}" if frames else "?"
        self.calls.append((name, where))

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        syncing = func in SYNCING or _boolean_index(func, args, kwargs)
        if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is not None:
            syncing = False
        if syncing and not self.reading and not _in_host_code() and not _in_optimizer_counter():  # host code: PythonReads
            self.record(str(func.overloadpacket.__name__))
        return func(*args, **kwargs)

    def summary(self) -> str:
        """``count x name at file:line code`` for each distinct call site."""
        counts = collections.Counter(self.calls)
        return "\n".join(f"{n} x {name} at {where}" for (name, where), n in counts.most_common())


class PythonReads(TorchFunctionMode):
    """The Python-level half of :class:`HostSyncs`: reads and copies to the host, device tensors in
    host-side code, and which tensors are device tensors (outputs of operations outside host-side
    code, or of operations on device tensors)."""

    def __init__(self, syncs: HostSyncs) -> None:
        super().__init__()
        self.syncs = syncs

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if _in_optimizer_counter():
            return func(*args, **kwargs)
        inputs = _tensors(args, kwargs)
        on_device = any(t in self.syncs.device for t in inputs)
        host_code = _in_host_code()
        name = getattr(func, "__name__", str(func))
        if getattr(func, "__name__", "") == "copy_":  # a copy into a host tensor from a device tensor
            copy = len(args) > 1 and args[1] in self.syncs.device and args[0] not in self.syncs.device
        else:
            copy = _copies_to_host(func, args, kwargs) and on_device
        read = name in READS and (on_device or not host_code)
        if copy or read:
            self.syncs.record(name)
            self.syncs.reading += 1
            try:
                return func(*args, **kwargs)
            finally:
                self.syncs.reading -= 1
        if host_code and on_device and name not in ("__get__", "__set__"):
            self.syncs.record(f"device tensor in host-side code: {name}")
        result = func(*args, **kwargs)
        if on_device or not host_code:  # a new tensor made outside host-side code, or from a device tensor
            for tensor in _tensors(result):
                if on_device or not any(tensor is given for given in inputs):  # .cpu(), in place: unchanged
                    self.syncs.device.add(tensor)
        return result


@contextmanager
def counting_host_syncs() -> Iterator[HostSyncs]:
    """Count syncing operations, reads and copies to the host inside the block (see the module docstring)."""
    mode = HostSyncs()
    with PythonReads(mode), mode:
        yield mode
