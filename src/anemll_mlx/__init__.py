"""anemll-mlx: LLMs defined once on MLX, exported to chunked Core ML programs for the Apple Neural Engine."""

import logging

from . import blas

blas.load()  # before anything imports mlx.core: a fast BLAS under MLX on Linux (see blas.py)

__version__ = "0.1.0"


class _ImportNotices(logging.Filter):
    """Drops what coremltools (and transformers, which it imports) announce at import time about
    optional backends this package never uses: Core ML's native bindings off macOS, PyTorch,
    scikit-learn versions.  Only these messages, only on those two loggers: everything else they
    log still shows."""

    NOTICES = (
        "Failed to load _ML",
        "PyTorch was not found",
        "has not been tested with coremltools",
        "scikit-learn version",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(notice in message for notice in self.NOTICES)


for _name in ("coremltools", "transformers"):
    logging.getLogger(_name).addFilter(_ImportNotices())
