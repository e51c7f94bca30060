"""The op vocabulary the model files are written in.

Model code never touches ``mx.*`` or ``mb.*`` directly: it calls methods of an ``ops`` object that is
passed in.  ``MLXOps`` runs them eagerly on MLX arrays (the reference); the MIL backend emits
coremltools builder calls for the same methods.  The vocabulary is listed in docs/ARCHITECTURE.md.
"""

from .mlx_ops import MLXOps

__all__ = ["MLXOps"]
