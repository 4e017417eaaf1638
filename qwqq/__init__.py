"""qwqq: quantize and run Qwen-family reasoning models on consumer hardware."""

__version__ = "0.1.0"
