"""edgeharvest: serve an ONNX classifier, watch it, and harvest its edge cases."""

__version__ = "0.1.0"
