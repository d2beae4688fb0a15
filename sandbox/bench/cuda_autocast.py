"""CUDA's autocast cast policy, applied to CPU autocast (``sandbox plan`` traces a GPU step on a CPU).

Autocast decides per operation what dtype it computes in, and the CPU's lists differ from CUDA's:
CUDA computes ``layer_norm``, ``softmax``, ``log_softmax``, the ``upsample_*`` interpolations,
``exp``, ``log``, ``pow``, ``sum`` and the other operations of its float32 lists in float32 (their
outputs are float32 activations), the CPU leaves them in the input's dtype; the CPU computes a few
operations in float32 that CUDA does not touch. A CUDA autocast cannot run on fake CUDA tensors
without a GPU (see :mod:`sandbox.bench.plan`), so :func:`cuda_autocast_policy` registers, for
the duration of a trace, CUDA's policy as the ``AutocastCPU`` kernels: an activation then has the
dtype it would have on a GPU. The lists are those of torch 2.14's ``ATen/autocast_mode.h``
(``AT_FORALL_LOWER_PRECISION_FP``, ``AT_FORALL_FP32``, ``AT_FORALL_FP32_SET_OPT_DTYPE``,
``AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE``, ``AT_FORALL_PROMOTE``), which CUDA's registration
in ``autocast_mode.cpp`` expands.

Operations in both CPU's and CUDA's lower-precision lists (``conv2d``, ``linear``, ``mm``,
``bmm``, ``addmm``, ``matmul``, ``scaled_dot_product_attention``, ...) keep torch's own CPU
kernels, with autocast's cache of the weights' half-precision copies. The few in CUDA's list alone
(``convolution``, ``einsum``, ``mv``, the RNN cells, ...) get a Python kernel without that cache.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

LOWER_PRECISION = (
    "_convolution.deprecated", "_convolution", "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d",
    "conv_transpose2d.input", "conv_transpose3d.input", "convolution", "prelu", "addmm", "addmv", "addr", "matmul",
    "einsum", "mm", "mv", "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm", "chain_matmul", "linalg_multi_dot",
    "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell", "lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell",
    "_scaled_dot_product_flash_attention", "scaled_dot_product_attention", "cudnn_convolution",
    "cudnn_convolution_transpose",
)
"""CUDA computes these in the autocast dtype (``AT_FORALL_LOWER_PRECISION_FP`` and cuDNN's two)."""

FLOAT32 = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt", "sinh",
    "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "layer_norm", "native_layer_norm",
    "rms_norm", "group_norm", "frobenius_norm.dim", "nuclear_norm", "nuclear_norm.dim", "cosine_similarity",
    "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d", "hinge_embedding_loss", "kl_div", "l1_loss",
    "smooth_l1_loss", "huber_loss", "mse_loss", "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss",
    "triplet_margin_loss", "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm",
    "logsumexp", "upsample_nearest1d", "_upsample_nearest_exact1d", "upsample_nearest2d", "_upsample_nearest_exact2d",
    "upsample_nearest3d", "_upsample_nearest_exact3d", "upsample_linear1d", "upsample_bilinear2d",
    "_upsample_bilinear2d_aa", "upsample_trilinear3d", "upsample_bicubic2d", "_upsample_bicubic2d_aa",
)
"""CUDA computes these in float32 (``AT_FORALL_FP32``)."""

FLOAT32_DTYPE_ARGUMENT = (
    "prod", "prod.dim_int", "softmax.int", "log_softmax.int", "cumprod", "cumsum", "linalg_vector_norm",
    "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "sum", "sum.dim_IntList",
)
"""CUDA passes ``dtype=torch.float32`` to these when none is given (``AT_FORALL_FP32_SET_OPT_DTYPE``)."""

FLOAT32_REDISPATCH = {"norm.Scalar": "norm.ScalarOpt_dtype", "norm.ScalarOpt_dim": "norm.ScalarOpt_dim_dtype"}
"""CUDA calls the overload with a ``dtype`` argument, float32 (``AT_FORALL_DIFFERENT_REDISPATCH_SIGNATURE``)."""

PROMOTE = ("addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler", "index_put", "tensordot",
           "scatter_add")
"""CUDA casts the inputs of these to the widest of their floating dtypes (``AT_FORALL_PROMOTE``)."""

AUTOCAST_CPU = "AutocastCPU"
_EXCLUDE = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)


def overload(name: str) -> torch._ops.OpOverload | None:
    """The ``aten`` operator overload ``name`` (``"pow.Scalar"``; no dot: the default one), None if absent."""
    packet_name, _, overload_name = name.partition(".")
    packet = getattr(torch.ops.aten, packet_name, None)
    return getattr(packet, overload_name or "default", None) if packet is not None else None


def eligible(value: Any) -> bool:
    """Whether autocast casts ``value``: a floating-point CPU tensor other than float64."""
    return (isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64
            and value.device.type == "cpu")


def cast(value: Any, dtype: torch.dtype) -> Any:
    """``value`` (a tensor, or a list or tuple of them) cast to ``dtype`` where autocast casts it."""
    if isinstance(value, (list, tuple)):
        return type(value)(cast(item, dtype) for item in value)
    return value.to(dtype) if eligible(value) and value.dtype != dtype else value


def flat_tensors(values: Any) -> Iterator[torch.Tensor]:
    """Every tensor in ``values`` (arguments, lists of tensors)."""
    for value in values:
        if isinstance(value, (list, tuple)):
            yield from flat_tensors(value)
        elif isinstance(value, torch.Tensor):
            yield value


def casting_kernel(op: torch._ops.OpOverload, dtype_of: Callable[[tuple, dict], torch.dtype | None]) -> Callable[..., Any]:
    """A kernel that calls ``op`` below autocast with its eligible inputs cast to ``dtype_of(args, kwargs)``
    (None: unchanged)."""

    def kernel(*args: Any, **kwargs: Any) -> Any:
        dtype = dtype_of(args, kwargs)
        if dtype is not None:
            args = tuple(cast(arg, dtype) for arg in args)
            kwargs = {key: cast(value, dtype) for key, value in kwargs.items()}
        with torch._C._ExcludeDispatchKeyGuard(_EXCLUDE):
            return op(*args, **kwargs)

    return kernel


def lower_precision(_args: tuple, _kwargs: dict) -> torch.dtype:
    return torch.get_autocast_dtype("cpu")


def float32(_args: tuple, _kwargs: dict) -> torch.dtype:
    return torch.float32


def promoted(args: tuple, kwargs: dict) -> torch.dtype:
    """The widest floating dtype of the eligible inputs, at least autocast's."""
    dtype = torch.get_autocast_dtype("cpu")
    for tensor in flat_tensors([*args, *kwargs.values()]):
        if eligible(tensor):
            dtype = torch.promote_types(dtype, tensor.dtype)
    return dtype


def float32_dtype_kernel(op: torch._ops.OpOverload) -> Callable[..., Any]:
    """``op`` called below autocast with ``dtype=torch.float32`` when none is given and its first input is eligible."""
    names = [argument.name for argument in op._schema.arguments]
    position = names.index("dtype")

    def kernel(*args: Any, **kwargs: Any) -> Any:
        given = args[position] if len(args) > position else kwargs.get("dtype")
        if given is None and args and eligible(args[0]):
            if len(args) > position:
                args = (*args[:position], torch.float32, *args[position + 1:])
            else:
                kwargs = {**kwargs, "dtype": torch.float32}
        with torch._C._ExcludeDispatchKeyGuard(_EXCLUDE):
            return op(*args, **kwargs)

    return kernel


def redispatch_kernel(source: torch._ops.OpOverload, target: torch._ops.OpOverload) -> Callable[..., Any]:
    """``source`` (``norm.Scalar``, ``norm.ScalarOpt_dim``) called below autocast as ``target``, its
    overload with a ``dtype`` argument, with float32 when its first input is eligible."""

    def kernel(*args: Any, **kwargs: Any) -> Any:
        with torch._C._ExcludeDispatchKeyGuard(_EXCLUDE):
            if args and eligible(args[0]):
                return target(*args, **kwargs, dtype=torch.float32)
            return source(*args, **kwargs)

    return kernel


def cpu_autocast_ops() -> list[str]:
    """Every ``aten`` operator (``name.overload``) with a CPU autocast kernel of torch's own."""
    return [name.removeprefix("aten::") for name in torch._C._dispatch_get_all_op_names()
            if name.startswith("aten::") and torch._C._dispatch_has_kernel_for_dispatch_key(name, AUTOCAST_CPU)]


def cuda_policy_kernels() -> dict[str, Callable[..., Any]]:
    """The ``AutocastCPU`` kernels that make CPU autocast cast as CUDA's: by operator name."""
    kernels: dict[str, Callable[..., Any]] = {}
    groups: list[tuple[tuple[str, ...], Callable[[torch._ops.OpOverload], Callable[..., Any]]]] = [
        (FLOAT32, lambda op: casting_kernel(op, float32)),
        (PROMOTE, lambda op: casting_kernel(op, promoted)),
        (FLOAT32_DTYPE_ARGUMENT, float32_dtype_kernel),
    ]
    cpu_lower = set(cpu_autocast_ops())
    for name in LOWER_PRECISION:
        op = overload(name)
        if op is not None and name not in cpu_lower:  # torch's own CPU kernel (with the weight cache) stays
            kernels[name] = casting_kernel(op, lower_precision)
    for names, make in groups:
        for name in names:
            op = overload(name)
            if op is not None:
                kernels[name] = make(op)
    for name, target in FLOAT32_REDISPATCH.items():
        source_op, target_op = overload(name), overload(target)
        if source_op is not None and target_op is not None:
            kernels[name] = redispatch_kernel(source_op, target_op)
    return kernels


@contextmanager
def cuda_autocast_policy() -> Iterator[None]:
    """Within the context, CPU autocast casts as CUDA autocast does (the registrations are undone on exit).

    A CPU-only operation of torch's CPU lists falls through (computes in its inputs' dtypes, as on
    CUDA); the operations of CUDA's lists get CUDA's policy.
    """
    kernels = cuda_policy_kernels()
    keep = set(LOWER_PRECISION)
    with torch.library._scoped_library("aten", "IMPL") as library:
        for name in cpu_autocast_ops():
            if name not in kernels and name not in keep:
                library.impl(name, torch.library.fallthrough_kernel, AUTOCAST_CPU)
        for name, kernel in kernels.items():
            library.impl(name, kernel, AUTOCAST_CPU)
        yield
