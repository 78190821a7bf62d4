"""Export: the adapter merged into the base as 16-bit safetensors or GGUF, and the hub upload."""
