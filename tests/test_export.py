"""`medcot export`: merged safetensors and GGUF round-trip to the logits of base + adapter; the
export never overwrites silently, `--dry-run` lists the upload exactly, the card tells the recipe,
and no secret reaches a file or the output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from medcot.cli import main
from medcot.config import load_config
from medcot.data.prompts import PromptFormatter
from medcot.export.export import _llama3_rope_factors, format_plan, upload_plan

QUESTION = "A 45-year-old man has crushing chest pain radiating to the left arm. What is the next step?"


def _adapter_logits(run_dir: Path, text: str):
    """Logits of base + adapter (through PEFT, as `medcot ask` runs it) and of the base alone, in fp32."""
    from medcot.model.load import load_for_inference
    cfg = load_config(run_dir / "config.yaml", ["model.device=cpu", "model.dtype=fp32"])
    model, tokenizer, _ = load_for_inference(cfg, run_dir)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        with_adapter = model(ids).logits
        with model.disable_adapter():
            base = model(ids).logits
    return ids, with_adapter, base


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_run_dir) -> Path:
    """A copy of the 2-step tiny run whose LoRA B matrices are pushed away from zero, so the adapter
    changes the logits clearly and a merge that dropped it would fail the comparison."""
    from safetensors.torch import load_file, save_file

    run = tmp_path_factory.mktemp("export") / "tiny"
    shutil.copytree(tiny_run_dir, run, ignore=shutil.ignore_patterns("checkpoints", "export"))
    path = run / "adapter" / "adapter_model.safetensors"
    weights = load_file(path)
    gen = torch.Generator().manual_seed(0)
    for k, v in weights.items():
        if "lora_B" in k:
            weights[k] = v + 0.05 * torch.randn(v.shape, generator=gen)
    save_file(weights, path)
    return run


def test_merged_export_gives_the_logits_of_base_plus_adapter(run_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    assert main(["export", str(run_dir), "--to", "merged", "--dtype", "fp32", "--out", str(out)]) == 0

    ids, with_adapter, base = _adapter_logits(run_dir, QUESTION)
    assert (with_adapter - base).abs().max() > 0.1  # the adapter matters, so the comparison below means something
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers: no PEFT, no adapter files
    with torch.no_grad():
        merged = model(ids).logits
    torch.testing.assert_close(merged, with_adapter, atol=1e-4, rtol=1e-4)
    assert not (out / "adapter_config.json").exists()
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "export.json",
            "training_config.yaml"} <= {p.name for p in out.iterdir()}
    assert not list(out.parent.glob(".*tmp*"))  # the temporary folder was renamed, nothing left behind

    # The chat template renders the exact prompt the run trained on (seed template), for chat front ends.
    tokenizer = AutoTokenizer.from_pretrained(out)
    expected = PromptFormatter(tokenizer, load_config(run_dir / "config.yaml").prompt).prompt(QUESTION)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == expected


def test_merged_export_defaults_to_bf16_in_the_run_folder(run_dir):
    from safetensors import safe_open

    assert main(["export", str(run_dir), "--to", "merged"]) == 0
    out = run_dir / "export" / "merged-bf16"
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((out / "export.json").read_text())["dtype"] == "bf16"


def test_gguf_export_writes_llama_cpp_tensors_and_vocabulary(run_dir, tmp_path):
    """F32 GGUF of the tiny model, read back with the gguf package (transformers' loader is exercised
    on the embedded model below): merged weights under GGUF names, Q/K in llama.cpp's order, and the
    vocabulary of the GGUF that SmolLM2 ships as."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from medcot.embedded import gguf_path
    from medcot.export.export import merged_model
    out = tmp_path / "gguf"
    assert main(["export", str(run_dir), "--to", "gguf", "--dtype", "fp32", "--out", str(out)]) == 0
    assert (out / "tiny-fp32.gguf").is_file() and (out / "Modelfile").is_file()
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./tiny-fp32.gguf" in modelfile and "{{ .Prompt }}" in modelfile
    assert "### Response:\n<think>" in modelfile  # the seed prompt, as trained

    ours = gguf.GGUFReader(out / "tiny-fp32.gguf")
    tensors = {t.name: torch.from_numpy(t.data.copy()) for t in ours.tensors}
    assert "output.weight" not in tensors  # tied embeddings: llama.cpp reuses token_embd
    merged, _ = merged_model(load_config(run_dir / "config.yaml"), run_dir, "fp32")
    state = merged.state_dict()
    torch.testing.assert_close(tensors["token_embd.weight"], state["model.embed_tokens.weight"])
    torch.testing.assert_close(tensors["blk.1.ffn_down.weight"], state["model.layers.1.mlp.down_proj.weight"])
    # Q/K are stored permuted (not equal to HF's rows), and transformers' GGUF loader permutes them back.
    undo = LlamaTensorProcessor(config={"num_attention_heads": 4, "num_key_value_heads": 2})
    for kind, hf in (("attn_q", "q_proj"), ("attn_k", "k_proj")):
        stored, want = tensors[f"blk.1.{kind}.weight"], state[f"model.layers.1.self_attn.{hf}.weight"]
        assert not torch.equal(stored, want)
        restored = undo.process(stored.numpy(), f"blk.1.{kind}.weight").weights
        torch.testing.assert_close(torch.from_numpy(restored), want)

    theirs = gguf.GGUFReader(gguf_path())
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_bos_token"):
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key
    assert ours.fields["general.architecture"].contents() == "llama"
    assert ours.fields["llama.attention.head_count_kv"].contents() == 2
    assert ours.fields["general.file_type"].contents() == gguf.LlamaFileType.ALL_F32


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory, embedded_dir) -> Path:
    """A run folder on the real embedded SmolLM2-135M-Instruct with a random non-zero LoRA adapter."""
    from medcot.config import Config
    from medcot.model.load import attach_lora, load_base
    run = tmp_path_factory.mktemp("export-embedded") / "smol"
    cfg = Config()  # model.name_or_path=embedded: what users export
    cfg.model.device, cfg.model.dtype, cfg.lora.r = "cpu", "fp32", 4
    model, tokenizer, _ = load_base(cfg.model)
    model = attach_lora(model, cfg.lora, gradient_checkpointing=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(run / "adapter")
    tokenizer.save_pretrained(run / "adapter")
    (run / "config.yaml").write_text(cfg.to_yaml())
    return run


@pytest.mark.slow
def test_gguf_export_of_the_embedded_model_loads_back_with_close_logits(embedded_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert main(["export", str(embedded_run), "--to", "gguf"]) == 0  # the default: F16
    out = embedded_run / "export" / "gguf-fp16"
    name = "smol-fp16.gguf"

    ids, with_adapter, base = _adapter_logits(embedded_run, QUESTION)
    model = AutoModelForCausalLM.from_pretrained(out, gguf_file=name, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    assert (out / name).stat().st_size < 2.1 * n_params  # 16-bit matrices
    with torch.no_grad():
        logits = model(ids).logits
    # F16 weights: close, not equal. The adapter moves the logits far more than F16 rounding does.
    err = (logits - with_adapter).abs().max().item()
    assert err < 0.25 and err < (with_adapter - base).abs().max().item() / 10, err
    assert (logits.argmax(-1) == with_adapter.argmax(-1)).float().mean() >= 0.95

    tokenizer = AutoTokenizer.from_pretrained(out, gguf_file=name)
    run_tokenizer = AutoTokenizer.from_pretrained(embedded_run / "adapter")
    text = "<|im_start|>user\nDose of amoxicillin for a 20 kg child? 3.5 mg/kg — ok<|im_end|>"
    assert tokenizer(text)["input_ids"] == run_tokenizer(text)["input_ids"]
    expected = PromptFormatter(run_tokenizer, load_config(embedded_run / "config.yaml").prompt).prompt(QUESTION)
    assert tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                         add_generation_prompt=True) == expected


def test_llama3_rope_factors_reproduce_transformers_frequencies():
    """llama.cpp divides the plain RoPE frequencies by `rope_freqs`; that must give Llama 3.1's."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
                         rope_parameters=rope)
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / (rope["rope_theta"] ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    torch.testing.assert_close(plain / _llama3_rope_factors(rope, 128), expected.float(), rtol=1e-5, atol=0)


def test_refuses_to_overwrite_without_force(run_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["export", str(run_dir), "--to", "merged", "--out", str(out)]) == 0
    (out / "marker").write_text("keep me")

    assert main(["export", str(run_dir), "--to", "merged", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err
    assert (out / "marker").read_text() == "keep me"  # untouched

    assert main(["export", str(run_dir), "--to", "merged", "--out", str(out), "--force"]) == 0
    assert not (out / "marker").exists() and (out / "model.safetensors").is_file()
    assert not list(tmp_path.glob(".*tmp*"))


def _write_eval_summary(run_dir: Path) -> None:
    bench = {"n": 25, "correct": 9, "accuracy": 0.36, "ci_low": 0.2, "ci_high": 0.55, "chance": 0.25}
    summary = {
        "settings": {"source": "embedded", "limit": None, "adapter": str(run_dir.resolve())},
        "titles": {"medqa": "MedQA (USMLE)"},
        "models": {"base": {"benchmarks": {"medqa": {**bench, "correct": 7, "accuracy": 0.28}}},
                   "adapter": {"benchmarks": {"medqa": bench}}},
        "comparison": {},
    }
    (run_dir / "eval").mkdir(exist_ok=True)
    (run_dir / "eval" / "summary.json").write_text(json.dumps(summary))


def test_dry_run_lists_the_upload_and_the_card_tells_the_recipe(run_dir, tmp_path, capsys, monkeypatch,
                                                                no_secrets_env):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("--dry-run must not touch the hub")

    monkeypatch.setattr(huggingface_hub, "HfApi", no_network)
    _write_eval_summary(run_dir)
    out = tmp_path / "merged"
    argv = ["export", str(run_dir), "--to", "merged", "--out", str(out), "--push", "someone/medcot-tiny", "--dry-run"]
    assert main(argv) == 0
    printed = capsys.readouterr()

    plan = upload_plan(out)
    assert [name for name, _ in plan] == sorted(p.name for p in out.iterdir())  # every file, nothing hidden
    for line in format_plan(plan):  # each file with its size, and the total
        assert line in printed.out.splitlines()
    assert "Would upload" in printed.out and "someone/medcot-tiny" in printed.out
    assert f"({len(plan)} files)" in printed.out

    card = (out / "README.md").read_text()
    cfg = load_config(run_dir / "config.yaml")
    assert "Research use only" in card and "not medical advice" in card
    assert cfg.model.name_or_path in card  # base model
    assert Path(cfg.data.source).name in card and "sha256" in card  # data
    assert f"LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha}" in card and f"{cfg.train.learning_rate:g}" in card  # recipe
    assert "| MedQA (USMLE) | adapter | 36.0% | 9 / 25 |" in card  # eval results from eval/summary.json
    assert 'from_pretrained("someone/medcot-tiny")' in card

    # A second dry run reuses the finished export instead of refusing or re-exporting.
    assert main(argv) == 0
    assert "existing export reused" in capsys.readouterr().out

    # No secret in anything written or printed.
    for secret in no_secrets_env.values():
        assert secret not in printed.out + printed.err
        for f in out.rglob("*"):
            if f.is_file():
                assert secret.encode() not in f.read_bytes(), f


def test_push_uploads_exactly_the_listed_files_with_hf_token(run_dir, tmp_path, capsys, monkeypatch, no_secrets_env):
    import huggingface_hub

    calls = {}

    class FakeApi:
        def __init__(self, token=None):
            calls["token"] = token

        def create_repo(self, repo_id, **kwargs):
            calls["create"] = (repo_id, kwargs)
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, **kwargs):
            calls["upload"] = kwargs

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    out = tmp_path / "gguf"
    assert main(["export", str(run_dir), "--to", "gguf", "--out", str(out), "--push", "someone/medcot-tiny-gguf"]) == 0
    printed = capsys.readouterr()

    assert calls["token"] == no_secrets_env["HF_TOKEN"]
    assert calls["create"] == ("someone/medcot-tiny-gguf", {"repo_type": "model", "private": True, "exist_ok": True})
    assert sorted(calls["upload"]["allow_patterns"]) == [name for name, _ in upload_plan(out)]
    assert Path(calls["upload"]["folder_path"]) == out
    assert no_secrets_env["HF_TOKEN"] not in printed.out + printed.err


def test_push_without_token_fails_before_any_work(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    out = tmp_path / "merged"
    assert main(["export", str(run_dir), "--to", "merged", "--out", str(out), "--push", "someone/x"]) == 2
    assert "HF_TOKEN" in capsys.readouterr().err
    assert not out.exists()


def test_bad_arguments_are_errors_that_say_what_to_do(run_dir, tmp_path, capsys):
    assert main(["export", str(tmp_path), "--to", "merged"]) == 2
    assert "holds no adapter" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--to", "merged", "--out", str(tmp_path / "x"), "--dry-run"]) == 2
    assert "--push REPO_ID" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_export_help_names_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for needle in ("RUN_DIR", "--to", "merged", "gguf", "--out", "--dtype", "--force", "--push", "--dry-run", "HF_TOKEN"):
        assert needle in out, needle
