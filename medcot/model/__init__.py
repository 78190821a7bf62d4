"""Model: the base model (hub, local folder or the embedded default) → 4/8-bit → LoRA; base + adapter
for inference (load.py)."""
