"""`medcot doctor` and train's preflight: the report on this CPU machine, and the failure cases a
user meets (no GPU for the 4-bit 8B recipe, a GPU without bf16, a bitsandbytes that cannot load
its CUDA library, a library outside the supported range, secrets that must never be printed).

GPUs are simulated by patching torch.cuda; the real bitsandbytes probe runs only on the device.
"""

from __future__ import annotations

import builtins
import sys
import types
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from medcot import doctor
from medcot.cli import main
from medcot.config import load_config
from medcot.errors import ModelSetupError

REPO = Path(__file__).resolve().parents[1]
R1 = str(REPO / "configs" / "r1-distill-llama-8b.yaml")
BNB_CUDA_ERROR = (
    "Configured CUDA binary not found at /venv/lib/python3.11/site-packages/bitsandbytes/libbitsandbytes_cuda128.so\n"
    "CUDA Setup failed despite CUDA being available. Please run the following command to get more information:\n"
    "python -m bitsandbytes"
)


def _by_check(findings):
    return {f.check: f for f in findings}


def _cfg(tmp_path, *overrides):
    """A config that reads nothing from the hub: a local model folder and the data fixture."""
    return load_config(None, [f"model.name_or_path={tmp_path}", f"train.output_dir={tmp_path / 'runs'}", *overrides])


@pytest.fixture()
def fake_gpu(monkeypatch):
    """Make torch report one CUDA GPU. Call it with the GPU's name, compute capability and bf16 support."""

    def install(name="NVIDIA A100-SXM4-80GB", capability=(8, 0), bf16=True, emulated_bf16=False):
        props = types.SimpleNamespace(name=name, total_memory=16 * 2**30, major=capability[0], minor=capability[1])
        cuda = torch.cuda
        monkeypatch.setattr(torch.version, "cuda", "12.8")
        monkeypatch.setattr(cuda, "is_available", lambda: True)
        monkeypatch.setattr(cuda, "device_count", lambda: 1)
        monkeypatch.setattr(cuda, "get_device_properties", lambda i=0: props)
        monkeypatch.setattr(cuda, "get_device_name", lambda i=0: name)
        monkeypatch.setattr(cuda, "get_device_capability", lambda i=0: capability)
        monkeypatch.setattr(cuda, "mem_get_info", lambda i=0: (15 * 2**30, 16 * 2**30))
        monkeypatch.setattr(cuda, "is_bf16_supported",
                            lambda including_emulation=True: bf16 or (emulated_bf16 and including_emulation))

    return install


# -- the report on this machine -------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU report; the device prints the GPU one")
def test_cpu_report_has_every_line_and_exits_0(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    for check in ["python", "torch", "gpu", "bf16", "bitsandbytes", "attention", "transformers", "peft",
                  "accelerate", "datasets", "trl", "hf token", "wandb key", "embedded model", "cache", "runs"]:
        assert any(line.split()[1:2] == check.split()[:1] for line in out.splitlines()
                   if line.startswith(("ok ", "warning ", "error "))), f"no {check!r} line in:\n{out}"
    assert "CPU-only build" in out and "this config trains on the CPU" in out
    assert "can run here" in out


def test_every_line_is_ok_warning_or_error_and_non_ok_lines_say_what_to_change(tmp_path, monkeypatch):
    monkeypatch.setattr(doctor, "_free_gib", lambda path: 0.5)  # force the disk warnings
    findings = doctor.run_checks(_cfg(tmp_path, "model.quantization=8bit", "train.report_to=wandb"))
    assert {f.status for f in findings} <= {"ok", "warning", "error"}
    assert _by_check(findings)["runs"].status == "warning"
    for f in findings:
        if f.status == "error" or f.check in ("cache", "runs"):
            assert f.fix, f"{f.check}: {f.detail} has no fix"


# -- no GPU, the 4-bit 8B recipe ------------------------------------------------------------------


def test_8b_recipe_without_gpu_fails_fast_with_one_message_saying_what_to_change(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    # Training stops in preflight: before the hub dataset or the model would be fetched.
    monkeypatch.setattr("medcot.train.sft.load_records", lambda *a: pytest.fail("train() ran past preflight"))
    assert main(["train", "--config", R1]) == 2
    err = capsys.readouterr().err
    assert err.count("\n  - ") == 1, err  # one problem, one message
    assert "none visible" in err and "model.quantization=4bit needs a CUDA GPU" in err
    assert "train.optimizer=adamw_8bit" in err
    for change in ["configs/demo-cpu.yaml", "model.quantization=none", "train.optimizer=adamw",
                   "model.allow_fallback=true", "pip install 'medcot[cuda]'"]:
        assert change in err
    assert "Traceback" not in err

    assert main(["doctor", "--config", R1]) == 1
    out = capsys.readouterr().out
    assert "error    gpu" in out and "cannot run here" in out


def test_quantization_with_fallback_on_cpu_is_a_warning_not_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = _cfg(tmp_path, "model.quantization=4bit", "model.allow_fallback=true")
    assert [f for f in doctor.preflight(cfg) if f.status == "error"] == []
    doctor.check_ready(cfg)  # does not raise


def test_gpu_present_but_model_device_cpu_with_4bit_is_an_error(tmp_path, fake_gpu):
    fake_gpu()
    gpu = _by_check(doctor.preflight(_cfg(tmp_path, "model.device=cpu", "model.quantization=4bit")))["gpu"]
    assert gpu.status == "error" and "model.device=auto" in gpu.fix


def test_resumed_run_is_checked_with_its_saved_config(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "config.yaml").write_text(_cfg(tmp_path, "model.quantization=4bit").to_yaml())
    with pytest.raises(ModelSetupError, match="model.quantization=4bit needs a CUDA GPU"):
        doctor.check_ready(None, resume=tmp_path)
    doctor.check_ready(None, resume=tmp_path / "missing")  # train() reports a missing run folder itself


# -- a GPU without bf16 ---------------------------------------------------------------------------


def test_gpu_without_bf16_asked_for_bf16_gets_the_fix(tmp_path, fake_gpu, capsys):
    fake_gpu(name="Tesla T4", capability=(7, 5), bf16=False)
    bf16 = _by_check(doctor.preflight(_cfg(tmp_path, "model.dtype=bf16")))["bf16"]
    assert bf16.status == "error"
    assert "Tesla T4" in bf16.detail and "7.5" in bf16.detail and "8.0+" in bf16.detail
    assert "model.dtype=fp16" in bf16.fix

    assert main(["train", f"model.name_or_path={tmp_path}", "model.dtype=bf16", f"train.output_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n  - ") == 1 and "bf16" in err and "model.dtype=fp16" in err


def test_gpu_without_bf16_on_auto_trains_in_fp16_with_a_warning(tmp_path, fake_gpu):
    fake_gpu(name="Tesla V100", capability=(7, 0), bf16=False)
    bf16 = _by_check(doctor.preflight(_cfg(tmp_path)))["bf16"]
    assert bf16.status == "warning" and "fp16" in bf16.detail


def test_gpu_that_only_emulates_bf16_is_told_to_use_fp16(tmp_path, fake_gpu):
    fake_gpu(name="Tesla T4", capability=(7, 5), bf16=False, emulated_bf16=True)
    bf16 = _by_check(doctor.preflight(_cfg(tmp_path, "model.dtype=bf16")))["bf16"]
    assert bf16.status == "warning" and "emulates" in bf16.detail and bf16.fix == "model.dtype=fp16"


def test_gpu_with_bf16_is_ok(tmp_path, fake_gpu):
    fake_gpu()
    found = _by_check(doctor.preflight(_cfg(tmp_path)))
    assert found["gpu"].status == "ok" and "A100" in found["gpu"].detail and "8.0" in found["gpu"].detail
    assert found["bf16"].status == "ok" and "bfloat16" in found["bf16"].detail


# -- bitsandbytes that cannot load its CUDA library -----------------------------------------------


@pytest.fixture()
def bnb_installed(monkeypatch):
    """Pretend bitsandbytes 0.45.0 is installed (its metadata); the tests decide how its import behaves."""
    real = doctor._installed_version
    monkeypatch.setattr(doctor, "_installed_version", lambda name: "0.45.0" if name == "bitsandbytes" else real(name))


def test_bitsandbytes_whose_import_fails_gets_the_fix(tmp_path, fake_gpu, bnb_installed, monkeypatch):
    fake_gpu()
    real_import = builtins.__import__

    def failing_import(name, *args, **kwargs):  # bitsandbytes < 0.45 failed at import time
        if name == "bitsandbytes":
            raise RuntimeError("CUDA Setup failed despite GPU being available. Please run: python -m bitsandbytes")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)
    monkeypatch.setattr(builtins, "__import__", failing_import)
    bnb = _by_check(doctor.preflight(_cfg(tmp_path, "model.quantization=4bit")))["bitsandbytes"]
    assert bnb.status == "error"
    assert "cannot run on this GPU: RuntimeError: CUDA Setup failed despite GPU being available" in bnb.detail
    assert "pip install -U 'bitsandbytes>=0.45'" in bnb.fix and "python -m bitsandbytes" in bnb.fix
    assert "model.quantization=none" in bnb.fix


def test_bitsandbytes_that_cannot_load_its_cuda_library_gets_one_message(tmp_path, fake_gpu, bnb_installed,
                                                                          monkeypatch):
    fake_gpu()
    fake = types.ModuleType("bitsandbytes")
    fake.__spec__ = ModuleSpec("bitsandbytes", None)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)  # the import works (bitsandbytes >= 0.45 defers the error)

    def roundtrip(bnb, device):
        print("bitsandbytes' multi-line CUDA setup diagnostics")  # must not reach the report
        raise RuntimeError(BNB_CUDA_ERROR)

    monkeypatch.setattr(doctor, "_bnb_roundtrip", roundtrip)
    cfg = _cfg(tmp_path, "model.quantization=4bit", "train.optimizer=adamw_8bit")
    with pytest.raises(ModelSetupError) as e:
        doctor.check_ready(cfg, config_name="my.yaml")
    msg = str(e.value)
    assert msg.startswith("my.yaml cannot run on this machine:") and msg.count("\n  - ") == 1
    assert "bitsandbytes: 0.45.0 is installed but cannot run on this GPU: RuntimeError: Configured CUDA binary" in msg
    assert "libbitsandbytes_cuda128.so" in msg and "diagnostics" not in msg
    assert "model.quantization=none train.optimizer=adamw" in msg

    # allow_fallback does not help: model.py would still hand the model to the broken bitsandbytes
    fallback = _by_check(doctor.preflight(_cfg(tmp_path, "model.quantization=4bit", "model.allow_fallback=true")))
    assert fallback["bitsandbytes"].status == "error" and "does not cover" in fallback["bitsandbytes"].fix


def test_bitsandbytes_missing_on_a_gpu(tmp_path, fake_gpu, monkeypatch):
    fake_gpu()
    real = doctor._installed_version
    monkeypatch.setattr(doctor, "_installed_version", lambda name: None if name == "bitsandbytes" else real(name))
    bnb = _by_check(doctor.preflight(_cfg(tmp_path, "model.quantization=4bit")))["bitsandbytes"]
    assert bnb.status == "error" and bnb.fix == "pip install 'medcot[cuda]'"
    bnb = _by_check(doctor.preflight(_cfg(tmp_path, "model.quantization=4bit", "model.allow_fallback=true")))
    assert bnb["bitsandbytes"].status == "warning" and "unquantized" in bnb["bitsandbytes"].detail


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the real 4-bit/8-bit probe")
def test_real_bitsandbytes_probe_on_the_gpu():
    pytest.importorskip("bitsandbytes", reason="needs bitsandbytes: pip install 'medcot[cuda]'")
    assert doctor._probe_bitsandbytes(torch.device("cuda", 0)) is None


# -- attention ------------------------------------------------------------------------------------


def test_flash_attention_2_without_the_package_is_an_error_with_the_sdpa_fix(tmp_path, monkeypatch):
    real = doctor._installed_version
    monkeypatch.setattr(doctor, "_installed_version", lambda name: None if name == "flash-attn" else real(name))
    att = _by_check(doctor.preflight(_cfg(tmp_path, "model.attn_implementation=flash_attention_2")))["attention"]
    assert att.status == "error" and "flash-attn not installed" in att.detail
    assert "model.attn_implementation=sdpa" in att.fix
    assert _by_check(doctor.preflight(_cfg(tmp_path)))["attention"].status == "ok"


# -- versions against the declared ranges ---------------------------------------------------------


@pytest.mark.parametrize(
    ("installed", "status", "fix"),
    [
        ("5.17.0", "ok", ""),
        ("5.24.0", "ok", ""),
        ("5.10.0", "error", "pip install -U 'transformers>=5.17,<6'"),
        ("6.1.0", "warning", "pip install 'transformers>=5.17,<6'"),
        (None, "error", "pip install 'transformers>=5.17,<6'"),
    ],
)
def test_check_version_against_a_range(installed, status, fix):
    f = doctor.check_version("transformers", installed, SpecifierSet("<6,>=5.17"))
    assert f.status == status
    assert fix in f.fix


def test_a_library_outside_the_range_shows_in_the_report_and_the_exit_code(monkeypatch, capsys):
    real = doctor._installed_version
    monkeypatch.setattr(doctor, "_installed_version", lambda name: "0.17.0" if name == "peft" else real(name))
    assert main(["doctor"]) == 1
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.split()[1:2] == ["peft"])
    assert line.startswith("error") and "0.17.0 is older than medcot supports (>=0.21,<1)" in line
    assert "pip install -U 'peft>=0.21,<1'" in out

    monkeypatch.setattr(doctor, "_installed_version", lambda name: "7.0.0" if name == "datasets" else real(name))
    assert main(["doctor"]) == 0  # newer than tested: a warning, the config still runs
    assert "warning  datasets" in capsys.readouterr().out


def test_ranges_come_from_pyproject_through_the_installed_metadata():
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11+")
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    ranges = doctor.supported_ranges()
    for line in declared:
        req = Requirement(line)
        assert ranges[req.name] == req.specifier, f"installed metadata is stale for {req.name}: pip install -e ."
    assert "bitsandbytes" in ranges  # extras too


def test_lowest_constraints_pin_the_lower_bounds_of_pyproject():
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11+")
    declared = {Requirement(r).name: Requirement(r).specifier
                for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    pins = [Requirement(line) for line in (REPO / "ci" / "constraints-lowest.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert {p.name for p in pins} >= set(doctor.LIBRARIES)
    for pin in pins:
        (version,) = [s.version for s in pin.specifier if s.operator == "=="]
        lower = [s.version for s in declared[pin.name] if s.operator == ">="]
        assert lower and SpecifierSet(f"=={lower[0]}").contains(version), f"{pin} is not the lower bound {lower}"


# -- secrets --------------------------------------------------------------------------------------


def test_credentials_are_reported_as_set_and_never_printed(no_secrets_env, monkeypatch, capsys, caplog):
    monkeypatch.setenv("WANDB_API_KEY", "wandb-SECRET-key-42")
    secrets = [*no_secrets_env.values(), "wandb-SECRET-key-42"]
    assert main(["doctor"]) == 0
    out = capsys.readouterr()
    text = out.out + out.err + caplog.text
    assert "set (HF_TOKEN)" in text and "set (WANDB_API_KEY)" in text and "set (MEDCOT_API_KEY" in text
    for secret in secrets:
        assert secret not in text


def test_no_hf_token_is_a_warning_only_when_the_config_downloads(tmp_path, monkeypatch):
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    local = _by_check(doctor.run_checks(_cfg(tmp_path, f"data.source={REPO / 'tests' / 'assets' / 'tiny_cot.jsonl'}")))
    assert local["hf token"].status == "ok"
    hub = _by_check(doctor.run_checks(load_config(R1)))
    assert hub["hf token"].status == "warning" and "HF_TOKEN" in hub["hf token"].fix


def test_serving_beyond_loopback_without_an_api_key_is_an_error(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDCOT_API_KEY", raising=False)
    api = _by_check(doctor.run_checks(_cfg(tmp_path, "serve.host=0.0.0.0")))["api key"]
    assert api.status == "error" and "MEDCOT_API_KEY" in api.fix


def test_a_gpu_index_that_does_not_exist_is_an_error(tmp_path, fake_gpu):
    fake_gpu()
    gpu = _by_check(doctor.preflight(_cfg(tmp_path, "model.device=cuda:3")))["gpu"]
    assert gpu.status == "error" and "1 GPU(s)" in gpu.detail and "model.device=auto" in gpu.fix


def test_doctor_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["doctor", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out and "section.key=value" in out
