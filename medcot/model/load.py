"""Model: load the base model → quantize → attach LoRA; or load base + a trained adapter for inference."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

from medcot.config import Config, LoraArgs, ModelArgs, load_config
from medcot.embedded import embedded_model_dir
from medcot.errors import ModelSetupError

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_device(args: ModelArgs) -> torch.device:
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelSetupError(f"model.device={args.device!r} but no CUDA GPU is visible; use model.device=cpu")
    if args.device in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # under a launcher: this process's GPU
    return torch.device("cpu" if args.device == "auto" else args.device)


def resolve_dtype(args: ModelArgs, device: torch.device) -> torch.dtype:
    if args.dtype != "auto":
        dtype = DTYPES[args.dtype]
        if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise ModelSetupError("model.dtype=bf16 but this GPU has no bf16 support; use model.dtype=fp16 (or auto)")
        return dtype
    if device.type == "cuda":
        # Emulated bf16 (e.g. a T4) is slow: 'auto' takes bf16 only where the GPU has it natively.
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return torch.float32  # CPU: fp32 is both the fastest and the safest on most CPUs


def model_path(args: ModelArgs) -> str:
    return str(embedded_model_dir()) if args.name_or_path == "embedded" else args.name_or_path


def resolve_quantization(args: ModelArgs, device: torch.device) -> str:
    """The quantization that will actually be used: 4/8-bit needs CUDA and bitsandbytes."""
    if args.quantization == "none":
        return "none"
    problem = None
    if device.type != "cuda":
        problem = f"model.quantization={args.quantization} needs a CUDA GPU (bitsandbytes), but the device is {device}"
    elif importlib.util.find_spec("bitsandbytes") is None:
        problem = f"model.quantization={args.quantization} needs bitsandbytes: pip install 'medcot[cuda]'"
    if problem is None:
        return args.quantization
    if not args.allow_fallback:
        raise ModelSetupError(
            f"{problem}.\nUse model.quantization=none, or model.allow_fallback=true to load unquantized instead."
        )
    log.warning("%s; loading unquantized instead (model.allow_fallback=true)", problem)
    return "none"


def load_tokenizer(path: str, revision: str | None = None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    if tokenizer.pad_token_id is None:
        # Padding positions never reach the loss or the attention, so any id works; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base(args: ModelArgs):
    """Load the frozen base model and its tokenizer on the resolved device and dtype.

    Returns:
        (model, tokenizer, info) where info records device, dtype and quantization actually used.

    Raises:
        ModelSetupError: a setting this machine cannot honour.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = resolve_device(args)
    dtype = resolve_dtype(args, device)
    quant = resolve_quantization(args, device)
    path = model_path(args)
    kwargs: dict = dict(dtype=dtype, attn_implementation=args.attn_implementation, revision=args.revision)
    if quant == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True,
        )
    elif quant == "8bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if quant != "none":
        kwargs["device_map"] = {"": device.index or 0}  # bitsandbytes quantizes while loading onto the GPU
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quant == "none":
        model.to(device)
    tokenizer = load_tokenizer(path, args.revision)
    info = {"path": path, "device": str(device), "dtype": str(dtype).removeprefix("torch."), "quantization": quant}
    return model, tokenizer, info


def attach_lora(model, args: LoraArgs, gradient_checkpointing: bool, modules_to_save: list[str] | None = None):
    """Freeze the base and wrap it with fresh LoRA adapters (PEFT).

    `modules_to_save`: modules trained in full beside the adapters (pre-training's embed_tokens/lm_head).
    """
    from peft import LoraConfig, get_peft_model

    model.config.use_cache = False  # the KV cache is useless in training and costs memory
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # With a frozen embedding the checkpointed blocks would see inputs without grad and skip backward.
        model.enable_input_require_grads()
    lora = LoraConfig(
        r=args.r,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=list(args.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        modules_to_save=modules_to_save,
    )
    return get_peft_model(model, lora)


def merge_adapter(model, adapter_dir: Path):
    """Fold a trained adapter into the base weights (the pre-training stage before the SFT stage).

    On a 4-bit base PEFT dequantizes, adds the update and quantizes again, which rounds it.
    """
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()


def stage_adapters(run_dir: Path) -> list[Path]:
    """Adapters to merge into the base before a run's own adapter: the pre-training stage's (pretrain+sft)
    or the SFT stage's (sft+grpo), if any."""
    earlier = [run_dir / stage / "adapter" for stage in ("pretrain", "sft")]
    return [a for a in earlier if a.is_dir()] if (run_dir / "adapter").is_dir() else []


def load_for_inference(cfg: Config, adapter: str | Path | None = None):
    """Base model (+ the adapter of a run folder) in eval mode, ready to generate.

    With `adapter`, the base model is the one the run was trained on (from its saved config), so
    `medcot ask --adapter RUN_DIR` needs no other flag.

    Returns:
        (model, tokenizer, cfg) where cfg is the run's config when an adapter is given.
    """
    if adapter is not None:
        run_dir = Path(adapter)
        adapter_dir = run_dir / "adapter" if (run_dir / "adapter").is_dir() else run_dir
        if adapter_dir == run_dir and (run_dir.parent / "config.yaml").is_file():
            run_dir = run_dir.parent  # RUN/adapter was passed: the run's config and earlier stages are beside it
        if not (adapter_dir / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"{run_dir} holds no adapter (no adapter_config.json in {adapter_dir}); "
                "pass a run folder written by 'medcot train'"
            )
        saved = run_dir / "config.yaml"
        if saved.is_file():
            run_cfg = load_config(saved)
            run_cfg.generate = cfg.generate
            run_cfg.model.device = cfg.model.device
            cfg = run_cfg
    model, tokenizer, _ = load_base(cfg.model)
    if adapter is not None:
        from peft import PeftModel

        for earlier in stage_adapters(run_dir):
            model = merge_adapter(model, earlier)
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    return model, tokenizer, cfg
