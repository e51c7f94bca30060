"""The MIL op kernels of the off-Mac executor (``runtime.mil_executor``), one module per op family.

Only ops that exports emit have kernels: ours (with coremltools' default pass pipeline or without
it) and ANEMLL 0.3.5's (its tiny LLaMA fixtures add ``linear``, ``exp``, ``real_div``,
``reduce_sum``).  A few more stay because the programs we are asked to run need them on the way:
``rsqrt``/``pow``/``reduce_mean`` (RMSNorm as other converters spell it), ``topk`` and
``gather_along_axis`` (mixture-of-experts routing), ``scaled_dot_product_attention`` (coremltools
fuses explicit attention into it), the comparison ops (masks).  Anything else is a clear error
naming the op.
"""

from . import elementwise, products, reductions, shapes, states  # noqa: F401  (registers the kernels)
from .core import (
    BuildContext,
    ConstPool,
    Kernel,
    builder_for,
    host_matmul,
    mx_dtype,
    np_dtype,
    static_shape,
    supported_ops,
)
from .states import StateCell

__all__ = [
    "BuildContext",
    "ConstPool",
    "Kernel",
    "StateCell",
    "builder_for",
    "host_matmul",
    "mx_dtype",
    "np_dtype",
    "static_shape",
    "supported_ops",
]
