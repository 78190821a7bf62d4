"""medcot: teach a reasoning LLM clinical chain-of-thought (LoRA/QLoRA SFT, eval, serving).

A research tool: nothing it generates is medical advice.
"""

__version__ = "0.1.0"
