"""Eval fixtures: a config for the tiny random Llama, and a run folder holding a LoRA adapter for it."""

from __future__ import annotations

import pytest

from medcot.config import load_config
from medcot.io import write_atomic

# The held-out CoT loss on 2 rows cut to 256 tokens: a full 49k-vocabulary logit tensor per token
# is what makes it slow on CPU, not the tiny model.
SMALL_COT = ["data.val_size=2", "train.sample_questions=1", "train.max_seq_length=256"]


@pytest.fixture()
def tiny_overrides(tiny_model_dir, tmp_path):
    """Overrides that make an eval run on the tiny model in seconds: 3 items, 8 + 8 new tokens."""
    return [
        f"model.name_or_path={tiny_model_dir}", "model.device=cpu", "model.dtype=fp32",
        "eval.limit=3", "eval.batch_size=2", "eval.thinking_budget=8", "eval.answer_tokens=8",
        f"eval.output_dir={tmp_path / 'eval'}", *SMALL_COT,
    ]


@pytest.fixture(scope="session")
def tiny_adapter_run(tmp_path_factory, tiny_model_dir):
    """A run folder like `medcot train` writes (config.yaml + adapter/), with a random non-zero LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run = tmp_path_factory.mktemp("run")
    cfg = load_config(None, [f"model.name_or_path={tiny_model_dir}", "model.device=cpu", "model.dtype=fp32", *SMALL_COT])
    write_atomic(run / "config.yaml", cfg.to_yaml())
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    # init_lora_weights=False draws B at random too, so the adapter really changes the outputs
    lora = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(run / "adapter")
    return run
