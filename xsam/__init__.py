"""X-SAM: unified segmentation MLLM, as a library (no Ray inside; see pipelines/ for the Ray wiring)."""

__version__ = "0.1.0"
