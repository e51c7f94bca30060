"""anemll-mlx: LLMs defined once on MLX, exported to chunked Core ML programs for the Apple Neural Engine."""

__version__ = "0.1.0"
