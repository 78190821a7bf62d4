"""`medcot export`: merged safetensors and GGUF round-trip to the logits of base + adapter; the fp16
GGUF runs in real llama.cpp with transformers' greedy tokens; quantized GGUFs (q8_0, q4_0, q4_k_m)
hold the merged weights within their rounding, in the bytes their types promise, and report their
greedy agreement with fp16; the export never overwrites silently, `--dry-run` lists the upload
exactly, the card tells the recipe, and no secret reaches a file or the output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from medcot.cli import main
from medcot.config import load_config
from medcot.data.prompts import PromptFormatter
from medcot.export.export import format_plan, upload_plan
from medcot.export.gguf_writer import _llama3_rope_factors

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


@pytest.mark.slow
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

    # The card's llama.cpp commands run on current llama.cpp: `llama-cli` is the chat (it rejects the
    # old `-cnv`), `llama-completion` answers one prompt and exits.
    card = (out / "README.md").read_text()
    assert "llama-cli -m tiny-fp32.gguf --jinja" in card and "-cnv" not in card
    assert "llama-completion -m tiny-fp32.gguf --jinja --single-turn" in card


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


def _needs_llama_cpp():
    """Skip (with the reason) where llama-cpp-python is not installed: it has no prebuilt Linux wheel
    on PyPI and compiles llama.cpp on install (a few minutes; `pip install llama-cpp-python`)."""
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python "
                                                   "compiles llama.cpp): the real-llama.cpp checks need it")


def _gguf_tensors(path: Path) -> dict:
    import gguf

    return {t.name: t for t in gguf.GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def tiny_fp16_gguf(run_dir, tmp_path_factory) -> tuple[Path, dict]:
    """The tiny run's default (F16) GGUF and its tensors (read once: gguf's reader takes seconds)."""
    out = tmp_path_factory.mktemp("gguf-fp16") / "gguf"
    assert main(["export", str(run_dir), "--to", "gguf", "--out", str(out)]) == 0
    return out / "tiny-fp16.gguf", _gguf_tensors(out / "tiny-fp16.gguf")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["q8_0", "q4_0"])
def test_quantized_gguf_holds_the_merged_weights_in_the_bytes_its_type_promises(dtype, run_dir, tmp_path,
                                                                               tiny_fp16_gguf, capsys):
    """q8_0/q4_0 by the gguf package: every matrix in the promised GGML type, its bytes exactly
    (block bytes / 32 values) per weight, dequantized within the type's rounding of the fp16 merge;
    the command reports the size against fp16; the fp16 reference is gone. (The agreement check
    reads each GGUF's 50k-token vocabulary back, tens of seconds without llama.cpp: it is skipped
    here and measured on the embedded model below.)"""
    import gguf

    Q = gguf.GGMLQuantizationType
    out = tmp_path / dtype
    assert main(["export", str(run_dir), "--to", "gguf", "--dtype", dtype, "--out", str(out), "--no-check"]) == 0
    printed = capsys.readouterr().out
    name = f"tiny-{dtype}.gguf"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [name, "Modelfile", "README.md", "export.json", "training_config.yaml"])  # no fp16 reference left
    assert f"FROM ./{name}" in (out / "Modelfile").read_text()

    reader = gguf.GGUFReader(out / name)
    want_ftype = {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[dtype]
    assert reader.fields["general.file_type"].contents() == want_ftype
    tensors = {t.name: t for t in reader.tensors}
    matrix_type = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0}[dtype]
    for t in tensors.values():
        if t.name.endswith("norm.weight"):
            assert t.tensor_type == Q.F32, t.name
        elif t.name == "token_embd.weight":  # Q8_0 in q4_0 too: it is also the (tied) output layer
            assert t.tensor_type == Q.Q8_0
        else:
            assert t.tensor_type == matrix_type, t.name
        block, block_bytes = gguf.GGML_QUANT_SIZES[t.tensor_type]
        assert t.n_bytes == t.n_elements // block * block_bytes, t.name  # 34 (Q8_0) / 18 (Q4_0) bytes per 32

    # Sizes: matrices at 8.5 (Q8_0) or 4.5 (Q4_0) bits against fp16's 16, as reported.
    fp16_path, fp16 = tiny_fp16_gguf
    ratio = sum(t.n_bytes for t in tensors.values()) / sum(t.n_bytes for t in fp16.values())
    assert 0.52 < ratio < 0.54  # the tiny model is mostly its Q8_0 embedding, in q4_0 as well
    layers = [n for n in tensors if n.startswith("blk.") and not n.endswith("norm.weight")]
    layer_ratio = sum(tensors[n].n_bytes for n in layers) / sum(fp16[n].n_bytes for n in layers)
    assert layer_ratio == pytest.approx({"q8_0": 34 / 64, "q4_0": 18 / 64}[dtype])
    meta = json.loads((out / "export.json").read_text())["quantization"]
    assert meta["bytes"] == (out / name).stat().st_size and meta["fp16_bytes"] == fp16_path.stat().st_size
    assert f"{meta['bytes'] / 1e6:.1f} MB" in printed and f"fp16: {meta['fp16_bytes'] / 1e6:.1f} MB" in printed

    # Dequantized weights: within half a quantization step of the fp16 merge they were made from (the
    # fp16 export's tensors; step = block max / 127 for Q8_0, / 8 for Q4_0; the fp16 scale adds < 7%).
    # Q4_0 maps a block onto levels -8..7 of its signed max: a value of the opposite sign and the same
    # size clips at 7, one whole step off; everything else rounds to within half a step.
    levels, bound = {Q.Q8_0: 127, Q.Q4_0: 8}, {Q.Q8_0: 0.57, Q.Q4_0: 1.07}
    for gguf_name in ("blk.1.ffn_down.weight", "blk.0.attn_q.weight", "token_embd.weight"):
        t = tensors[gguf_name]
        got = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist()))))
        want = torch.from_numpy(fp16[gguf_name].data.astype("float32"))
        assert got.shape == want.shape
        blocks_want, err = want.reshape(-1, 32), (got - want).reshape(-1, 32).abs()
        step = blocks_want.abs().amax(1, keepdim=True) / levels[t.tensor_type]
        assert (err <= bound[t.tensor_type] * step + 1e-7).all(), gguf_name
        assert err.mean() <= 0.3 * step.mean(), gguf_name  # rounding to nearest: ~a quarter step on average
        rel = (got - want).norm() / want.norm()
        assert rel < {Q.Q8_0: 0.01, Q.Q4_0: 0.12}[t.tensor_type], (gguf_name, rel)

    assert meta["agreement"] is None and "not checked (--no-check)" in printed
    assert f"Quantization: {dtype.upper()} by gguf" in (out / "README.md").read_text()


@pytest.mark.slow
def test_agreement_check_falls_back_to_transformers_without_llama_cpp(run_dir, tmp_path, monkeypatch, capsys):
    """Where llama-cpp-python is missing, the check still runs: both files dequantized in transformers.
    (The value on a random 2-layer model means little; the embedded-model test holds the thresholds.)"""
    import medcot.export.quantize as quantize

    monkeypatch.setattr(quantize, "llama_cpp_available", lambda: False)
    out = tmp_path / "q8"
    assert main(["export", str(run_dir), "--to", "gguf", "--dtype", "q8_0", "--out", str(out)]) == 0
    a = json.loads((out / "export.json").read_text())["quantization"]["agreement"]
    assert a["backend"] == "transformers on the dequantized weights"
    assert a["prompts"] == 4 and 4 <= a["tokens"] <= 4 * 32 and 0 <= a["token_agreement"] <= 1
    assert f"{100 * a['token_agreement']:.1f}% of {a['tokens']} greedy tokens match fp16" in capsys.readouterr().out


def test_q4_k_m_without_llama_cpp_fails_before_any_work(run_dir, tmp_path, capsys, monkeypatch):
    import medcot.export.quantize as quantize

    monkeypatch.setattr(quantize, "llama_cpp_quantizer", lambda: None)
    out = tmp_path / "q4km"
    assert main(["export", str(run_dir), "--to", "gguf", "--dtype", "q4_k_m", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "pip install llama-cpp-python" in err and "llama-quantize" in err and "q8_0" in err
    assert not out.exists() and not list(tmp_path.glob(".*tmp*"))


def test_q4_k_m_runs_llama_quantize_from_path_with_its_documented_arguments(run_dir, tmp_path, monkeypatch, capsys):
    """`llama-quantize INPUT OUTPUT TYPE [THREADS]` (llama.cpp's tools/quantize): a stand-in on PATH
    records its arguments and copies the input, so this runs without llama.cpp."""
    import sys

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "argv.json"
    script = bin_dir / "llama-quantize"
    script.write_text(f"#!{sys.executable}\nimport json, shutil, sys\n"
                      f"json.dump(sys.argv[1:], open({str(record)!r}, 'w'))\nshutil.copyfile(sys.argv[1], sys.argv[2])\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    out = tmp_path / "q4km"
    assert main(["export", str(run_dir), "--to", "gguf", "--dtype", "q4_k_m", "--out", str(out), "--no-check"]) == 0
    argv = json.loads(record.read_text())
    assert argv[1].endswith("/tiny-q4_k_m.gguf") and argv[2] == "Q4_K_M" and int(argv[3]) >= 1
    assert Path(argv[0]).name.endswith("fp16.reference.gguf") and not Path(argv[0]).exists()  # removed after
    meta = json.loads((out / "export.json").read_text())["quantization"]
    assert meta["quantizer"] == "llama.cpp llama-quantize" and meta["agreement"] is None
    assert "not checked (--no-check)" in capsys.readouterr().out


@pytest.mark.slow
def test_fp16_gguf_runs_in_llama_cpp_with_the_greedy_tokens_of_transformers(embedded_run):
    """The exported F16 file in real llama.cpp: same prompt tokens as the run's tokenizer, and greedy
    decoding identical token for token to transformers running the same file's weights."""
    _needs_llama_cpp()
    from llama_cpp import Llama
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from medcot.export.quantize import _LlamaCppRunner
    out = embedded_run / "export" / "gguf-fp16"
    if not out.is_dir():
        assert main(["export", str(embedded_run), "--to", "gguf"]) == 0
    path = out / "smol-fp16.gguf"
    tokenizer = AutoTokenizer.from_pretrained(embedded_run / "adapter")
    model = AutoModelForCausalLM.from_pretrained(out, gguf_file=path.name, dtype=torch.float32)
    questions = [QUESTION, "Which electrolyte disturbance causes peaked T waves on the ECG?"]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=True,
                                             add_generation_prompt=True, return_dict=False) for q in questions]
    n = 48
    llm = Llama(model_path=str(path), n_ctx=512, n_threads=torch.get_num_threads(), verbose=False)
    runner = _LlamaCppRunner(path, prompts, n)
    for question, prompt in zip(questions, prompts):
        text = tokenizer.decode(prompt)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == prompt  # llama.cpp's own tokenizer
        with torch.no_grad():
            ids = torch.tensor([prompt])
            want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
        want = want[0, len(prompt):].tolist()
        assert runner.greedy(prompt, n, tokenizer.eos_token_id) == want, question
        # llama.cpp's own sampler at temperature 0 (what `llama-cli --temp 0` runs) writes the same text.
        done = llm.create_completion(prompt, max_tokens=n, temperature=0.0)
        assert done["choices"][0]["text"] == tokenizer.decode(want, skip_special_tokens=True), question
    runner.close()
    llm.close()


@pytest.mark.slow
def test_quantized_ggufs_of_the_embedded_model_agree_with_fp16(embedded_run, capsys):
    """SmolLM2-135M (+ adapter) quantized: sizes against the fp16 file, and greedy agreement with it,
    measured in llama.cpp when installed (else on the dequantized weights in transformers)."""
    import gguf

    from medcot.export.quantize import greedy_agreement, llama_cpp_available
    results = {}
    types = ["q8_0", "q4_0"] + (["q4_k_m"] if llama_cpp_available() else [])
    for dtype in types:
        assert main(["export", str(embedded_run), "--to", "gguf", "--dtype", dtype]) == 0
        out = embedded_run / "export" / f"gguf-{dtype}"
        results[dtype] = q = json.loads((out / "export.json").read_text())["quantization"]
        a, printed = q["agreement"], capsys.readouterr().out
        assert a["prompts"] == 4 and 4 <= a["tokens"] <= 4 * 32
        assert f"{100 * a['token_agreement']:.1f}% of {a['tokens']} greedy tokens match fp16" in printed
        assert f"{q['bytes'] / 1e6:.1f} MB" in printed
        assert f"{a['identical']} of {a['prompts']} answers are identical" in (out / "README.md").read_text()
    print({k: (round(v["bytes"] / v["fp16_bytes"], 3), v["agreement"]) for k, v in results.items()})

    # Measured (llama.cpp 0.3.36 | transformers fallback): q8_0 53% of the fp16 bytes, 96.4% | 97.7% of
    # greedy tokens agree, 3 | 2 of 4 answers identical; q4_0 34%, 77.7% | 77.3%; q4_k_m 39%, 86.6% | 86.7%.
    q8, q4 = results["q8_0"], results["q4_0"]
    assert 0.52 < q8["bytes"] / q8["fp16_bytes"] < 0.55  # 8.5 bits per weight of 16
    assert 0.31 < q4["bytes"] / q4["fp16_bytes"] < 0.36  # 4.5 bits, the tied embedding at 8.5
    # Q8_0 is near-lossless: at least 93% of fp16's greedy tokens are Q8_0's greedy choice too.
    assert q8["agreement"]["token_agreement"] >= 0.93 and q8["agreement"]["identical"] >= 1
    # 4-bit types round far more; on a 135M model they still follow fp16 on most tokens.
    assert q4["agreement"]["token_agreement"] >= 0.7
    if "q4_k_m" in results:
        q4km = results["q4_k_m"]
        assert q4km["quantizer"].startswith("llama.cpp")
        assert q4km["bytes"] < q8["bytes"] and q4km["agreement"]["token_agreement"] >= 0.8
        # llama.cpp's mixed K-quants beat plain Q4_0 at a similar size.
        assert q4km["agreement"]["token_agreement"] > q4["agreement"]["token_agreement"]
        path = embedded_run / "export" / "gguf-q4_k_m" / "smol-q4_k_m.gguf"
        reader = gguf.GGUFReader(path)
        assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M
        kinds = {t.tensor_type for t in reader.tensors}
        assert gguf.GGMLQuantizationType.Q4_K in kinds  # ffn_down rows (1536) are whole 256-value super-blocks
        assert llama_cpp_available()

    # Both backends of the check agree that Q8_0 follows fp16 (the fp16 file from the F16 test above).
    fp16 = embedded_run / "export" / "gguf-fp16" / "smol-fp16.gguf"
    if not fp16.is_file():
        assert main(["export", str(embedded_run), "--to", "gguf"]) == 0
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(embedded_run / "export" / "gguf-q8_0", gguf_file="smol-q8_0.gguf")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=True,
                                           add_generation_prompt=True, return_dict=False)
    a = greedy_agreement(fp16, embedded_run / "export" / "gguf-q8_0" / "smol-q8_0.gguf", [list(prompt)],
                         eos_id=tokenizer.eos_token_id, new_tokens=16, backend="transformers")
    assert a.backend.startswith("transformers") and a.token_agreement >= 0.9


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
    assert main(["export", str(run_dir), "--to", "merged", "--dtype", "q8_0", "--out", str(tmp_path / "x")]) == 2
    assert "quantized types are for --to gguf" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_export_help_names_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for needle in ("RUN_DIR", "--to", "merged", "gguf", "--out", "--dtype", "--force", "--push", "--dry-run", "HF_TOKEN",
                   "q8_0", "q4_0", "q4_k_m", "--no-check", "llama-cpp-python"):
        assert needle in out, needle


def test_docs_give_llama_cpp_commands_that_current_llama_cpp_accepts():
    """Current `llama-cli` is the interactive chat and rejects `-cnv`; one-shot runs are `llama-completion`'s."""
    docs = (Path(__file__).resolve().parents[1] / "docs" / "export.md").read_text()
    assert " -cnv" not in docs
    assert "llama-cli -m runs/demo/export/gguf-fp16/demo-fp16.gguf --jinja" in docs
    assert "llama-completion -m runs/demo/export/gguf-fp16/demo-fp16.gguf --jinja --single-turn" in docs
    for dtype in ("q8_0", "q4_0", "q4_k_m"):
        assert f"--dtype {dtype}" in docs or f"`{dtype}`" in docs
