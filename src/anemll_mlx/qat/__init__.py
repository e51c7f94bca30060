"""LUT quantization-aware training: the teacher's KD cache, training of tables and weights in MLX,
and checkpoints that every command loads as a model and the export emits as they are."""
