"""Drivers: one interface over every way of running a model (MLX reference, exported programs)."""
