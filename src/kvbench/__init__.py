"""kvbench: compare KV-cache compression codecs on the same captured tensors, byte for byte."""

__version__ = "0.1.0"
