"""The op vocabulary (``vocabulary.py``: the ``Ops`` Protocol and the types it passes) and its
two backends: ``mlx_ops.MLXOps`` (eager, the reference) and ``mil_ops.MILOps`` (coremltools MIL
builder calls, the export).  Model code never touches ``mx.*`` or ``mb.*`` directly.
"""

from .mlx_ops import MLXKVCache, MLXOps
from .vocabulary import Embedding, Linear, Norm, Ops, RoPE, Step, Tensor

__all__ = ["Embedding", "Linear", "MLXKVCache", "MLXOps", "Norm", "Ops", "RoPE", "Step", "Tensor"]
