"""Config: defaults, YAML < override precedence, errors that name the key, shipped configs, `config show`."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from medcot.cli import main
from medcot.config import LORA_TARGETS, Config, load_config, parse_override
from medcot.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def _write_yaml(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _config_error(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(*args, **kwargs)
    return str(e.value)


# -- defaults and precedence ----------------------------------------------------------------------


def test_defaults_are_the_embedded_demo_and_the_seed_recipe_lora():
    cfg = load_config()
    assert cfg == Config()
    assert cfg.model.name_or_path == "embedded"
    assert cfg.data.source == "embedded"
    assert (cfg.data.question_column, cfg.data.reasoning_column, cfg.data.answer_column) == (
        "Question", "Complex_CoT", "Response",
    )
    assert cfg.prompt.template == "seed" and cfg.prompt.loss_on == "response"
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 16, 0.0)
    assert cfg.lora.target_modules == LORA_TARGETS
    assert cfg.train.learning_rate == 2e-4 and cfg.train.seed == 3407
    # The default list is a fresh object per config: mutating one config never leaks into another.
    cfg.lora.target_modules.append("lm_head")
    assert Config().lora.target_modules == LORA_TARGETS


def test_every_field_has_help_text():
    defaults = Config()
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(getattr(defaults, section.name)):
            assert f.metadata.get("help"), f"{section.name}.{f.name} has no help text"


def test_precedence_default_then_yaml_then_override(tmp_path):
    path = _write_yaml(tmp_path, {"train": {"max_steps": 7, "learning_rate": 1.0e-4}, "lora": {"r": 8}})
    cfg = load_config(path, ["train.max_steps=3", "lora.alpha=32"])
    assert cfg.train.max_steps == 3  # override beats YAML
    assert cfg.train.learning_rate == 1e-4  # YAML beats default
    assert cfg.lora.r == 8 and cfg.lora.alpha == 32
    assert cfg.train.warmup_steps == Config().train.warmup_steps  # untouched: default
    # The last of two overrides of the same key wins.
    assert load_config(path, ["train.max_steps=3", "train.max_steps=4"]).train.max_steps == 4


@pytest.mark.parametrize(
    ("typo", "suggestion"),
    [("train.lerning_rate=1e-4", "did you mean train.learning_rate?"),
     ("model.quantisation=4bit", "did you mean model.quantization?"),
     ("generate.max_new_token=5", "did you mean generate.max_new_tokens?")],
)
def test_a_mistyped_override_is_blamed_on_the_command_line_with_a_suggestion(tmp_path, typo, suggestion):
    msg = _config_error(_write_yaml(tmp_path, {"train": {"max_steps": 3}}), [typo])
    assert suggestion in msg and "(command-line override)" in msg
    assert f"in {tmp_path / 'cfg.yaml'})" not in msg  # the file is not what is wrong


def test_a_mistyped_key_in_the_file_is_blamed_on_the_file(tmp_path):
    msg = _config_error(_write_yaml(tmp_path, {"train": {"warmup_step": 3}}))
    assert f"train.warmup_step: unknown key (in {tmp_path / 'cfg.yaml'}); did you mean train.warmup_steps?" in msg


def test_nothing_is_suggested_for_a_key_like_no_other(tmp_path):
    msg = _config_error(None, ["train.zzzzqqq=1"])
    assert "train.zzzzqqq: unknown key (command-line override); (known:" in msg and "did you mean" not in msg


def test_command_line_options_take_choices_and_help_from_the_config():
    """--stage, --report-to, ... are the config keys: their choices and defaults come from the dataclasses."""
    import typing

    from medcot.cli import build_parser
    from medcot.config import TrainArgs, option_help

    stage = typing.get_args(typing.get_type_hints(TrainArgs)["stage"])
    assert option_help("train.stage")["choices"] == stage
    train = build_parser()._subparsers._group_actions[0].choices["train"]
    by_flag = {a.option_strings[0]: a for a in train._actions if a.option_strings}
    assert tuple(by_flag["--stage"].choices) == stage
    assert tuple(by_flag["--report-to"].choices) == typing.get_args(typing.get_type_hints(TrainArgs)["report_to"])
    assert "(default 'sft')" in by_flag["--stage"].help and "train.stage" in by_flag["--stage"].help


@pytest.mark.parametrize(
    ("override", "section", "key", "expected"),
    [
        ("train.learning_rate=1e-5", "train", "learning_rate", 1e-5),  # YAML 1.1 reads this as a string
        ("train.learning_rate=3.0e-4", "train", "learning_rate", 3e-4),
        ("train.max_grad_norm=1", "train", "max_grad_norm", 1.0),  # an int where a float is expected
        ("lora.target_modules=q_proj,v_proj", "lora", "target_modules", ["q_proj", "v_proj"]),
        ("lora.target_modules=[q_proj, o_proj]", "lora", "target_modules", ["q_proj", "o_proj"]),
        ("data.num_samples=null", "data", "num_samples", None),
        ("data.num_samples=50", "data", "num_samples", 50),
        ("train.gradient_checkpointing=true", "train", "gradient_checkpointing", True),
        ("model.revision=main", "model", "revision", "main"),
        ("train.run_name=2024", "train", "run_name", "2024"),  # a number where a string is expected
        ("prompt.template=my template.txt", "prompt", "template", "my template.txt"),
    ],
)
def test_override_values_are_typed(override, section, key, expected):
    value = getattr(getattr(load_config(None, [override]), section), key)
    assert value == expected
    assert type(value) is type(expected)


def test_parse_override():
    assert parse_override("train.max_steps=20") == (["train", "max_steps"], 20)
    assert parse_override("data.source=a=b.jsonl") == (["data", "source"], "a=b.jsonl")
    assert parse_override("model.revision=") == (["model", "revision"], "")
    for bad in ["train.max_steps", "=3", "train max_steps=3"]:
        with pytest.raises(ConfigError, match="section.key=value"):
            parse_override(bad)


def test_yaml_round_trip(tmp_path):
    """The run folder's config.yaml is what --resume reloads: it must load back to the same config."""
    cfg = load_config(REPO / "configs" / "demo-cpu.yaml", ["train.max_steps=5", "data.num_samples=10"])
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg


# -- errors name the key --------------------------------------------------------------------------


def test_unknown_keys_name_the_key_and_the_known_ones(tmp_path):
    msg = _config_error(None, ["train.max_stepz=3"])
    assert "train.max_stepz: unknown key" in msg
    assert "max_steps" in msg  # the known keys are listed
    msg = _config_error(_write_yaml(tmp_path, {"trian": {"max_steps": 3}}))
    assert "trian: unknown key" in msg and str(tmp_path / "cfg.yaml") in msg


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.max_steps=abc", "train.max_steps: expected an integer, got 'abc'"),
        ("train.max_steps=2.5", "train.max_steps: expected an integer, got 2.5"),
        ("train.max_steps=true", "train.max_steps: expected an integer, got True"),
        ("train.learning_rate=fast", "train.learning_rate: expected a number, got 'fast'"),
        ("train.gradient_checkpointing=maybe", "train.gradient_checkpointing: expected true or false, got 'maybe'"),
        ("train.gradient_checkpointing=1", "train.gradient_checkpointing: expected true or false, got 1"),
        ("prompt.loss_on=everything", "prompt.loss_on: 'everything' is not one of 'response', 'all'"),
        ("model.quantization=3bit", "model.quantization: '3bit' is not one of"),
        ("lora.target_modules=[[q_proj]]", "lora.target_modules[0]: expected a string"),
        ("lora.target_modules={a: 1}", "lora.target_modules: expected a list"),
        ("data.num_samples=many", "data.num_samples: expected an integer, got 'many'"),
        ("train=5", "train: expected a section (mapping), got 5"),
    ],
)
def test_wrong_types_name_the_key(override, needle):
    assert needle in _config_error(None, [override])


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.max_steps=0", "train.max_steps: must be > 0, got 0"),
        ("lora.r=-1", "lora.r: must be > 0, got -1"),
        ("train.warmup_steps=-1", "train.warmup_steps: must be >= 0, got -1"),
        ("train.learning_rate=2.0", "train.learning_rate: must be in (0, 1), got 2.0"),
        ("train.learning_rate=0", "train.learning_rate: must be in (0, 1), got 0.0"),
        ("train.learning_rate=nan", "train.learning_rate: must be in (0, 1), got nan"),
        ("lora.dropout=1.0", "lora.dropout: must be in [0, 1), got 1.0"),
        ("generate.top_p=0", "generate.top_p: must be in (0, 1], got 0.0"),
        ("data.num_samples=0", "data.num_samples: must be > 0 or null, got 0"),
        ("model.device=tpu", "model.device: 'tpu' is not 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ("train.sample_questions=17", "train.sample_questions (17) cannot exceed data.val_size (16)"),
    ],
)
def test_bad_values_name_the_key(override, needle):
    assert needle in _config_error(None, [override])


def test_every_problem_is_reported_at_once(tmp_path):
    path = _write_yaml(tmp_path, {"train": {"max_steps": "many", "bogus": 1}, "model": {"dtype": "fp8"}})
    msg = _config_error(path, ["lora.r=big", "data.nope=1"])
    for needle in [
        "train.max_steps: expected an integer",
        "train.bogus: unknown key",
        "model.dtype: 'fp8' is not one of",
        "lora.r: expected an integer",
        "data.nope: unknown key",
    ]:
        assert needle in msg
    # Value checks are collected together too.
    msg = _config_error(None, ["train.max_steps=0", "lora.r=0", "train.learning_rate=5.0"])
    assert "train.max_steps: must be > 0" in msg and "lora.r: must be > 0" in msg
    assert "train.learning_rate: must be in (0, 1)" in msg


def test_override_below_a_scalar_is_an_error(tmp_path):
    path = _write_yaml(tmp_path, {"train": {"max_steps": 5}})
    assert "train.max_steps.x: max_steps is not a section" in _config_error(path, ["train.max_steps.x=1"])


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    assert "not valid YAML" in _config_error(bad)
    bad.write_text("- a\n- b\n")
    assert "top level must be a mapping" in _config_error(bad)
    bad.write_text("")  # an empty file is the defaults
    assert load_config(bad) == Config()


# -- shipped configs ------------------------------------------------------------------------------


def test_configs_are_shipped():
    names = {p.name for p in SHIPPED}
    assert {"demo-cpu.yaml", "r1-distill-llama-8b.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_loads_and_says_how_to_run_it(path):
    load_config(path)
    head = path.read_text().splitlines()[:8]
    assert any(re.search(rf"medcot (train|eval) --config configs/{re.escape(path.name)}", line) for line in head), "no run command in the header"


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_configs_state_only_what_differs_from_the_defaults(path):
    """Defaults live in config.py alone: a shipped YAML that repeats one would drift when it changes."""
    defaults = Config().to_dict()
    repeated = [f"{section}.{key}" for section, values in yaml.safe_load(path.read_text()).items()
                for key, value in values.items() if defaults[section][key] == value]
    assert not repeated, f"{path.name} repeats built-in defaults: {repeated}"


def test_seed_recipe_config_matches_the_recipe():
    cfg = load_config(REPO / "configs" / "r1-distill-llama-8b.yaml")
    assert cfg.model.name_or_path == "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"
    assert cfg.model.quantization == "4bit" and cfg.model.dtype == "auto"
    assert (cfg.data.source, cfg.data.hub_config, cfg.data.num_samples) == (
        "FreedomIntelligence/medical-o1-reasoning-SFT", "en", 500,
    )
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (16, 16, 0.0)
    assert cfg.lora.target_modules == LORA_TARGETS
    t = cfg.train
    assert (t.max_seq_length, t.per_device_batch_size, t.gradient_accumulation_steps) == (2048, 2, 4)
    assert (t.max_steps, t.warmup_steps, t.learning_rate, t.weight_decay) == (60, 5, 2e-4, 0.01)
    assert (t.lr_scheduler, t.optimizer, t.seed, t.gradient_checkpointing) == ("linear", "adamw_8bit", 3407, True)


def test_demo_config_runs_on_cpu_with_the_embedded_defaults():
    cfg = load_config(REPO / "configs" / "demo-cpu.yaml")
    assert cfg.model.name_or_path == "embedded" and cfg.data.source == "embedded"
    assert cfg.model.device == "cpu" and cfg.model.dtype == "fp32"
    assert cfg.model.quantization == "none" and cfg.train.optimizer == "adamw"


# -- `medcot config` ------------------------------------------------------------------------------


def test_config_show_prints_the_resolved_config(capsys):
    assert main(["config", "show", str(REPO / "configs" / "demo-cpu.yaml"), "train.max_steps=5"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    expected = load_config(REPO / "configs" / "demo-cpu.yaml", ["train.max_steps=5"])
    assert shown == expected.to_dict()
    assert shown["train"]["max_steps"] == 5 and shown["model"]["device"] == "cpu"


def test_config_show_without_a_file_prints_the_defaults(capsys):
    assert main(["config", "show"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == Config().to_dict()


def test_config_show_with_overrides_only(capsys):
    assert main(["config", "show", "train.max_steps=3", "lora.r=4"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown == load_config(None, ["train.max_steps=3", "lora.r=4"]).to_dict()


def test_config_show_error_names_the_key_without_traceback(capsys):
    assert main(["config", "show", str(REPO / "configs" / "demo-cpu.yaml"), "train.max_stepz=5"]) == 2
    out = capsys.readouterr()
    assert "medcot config: error:" in out.err and "train.max_stepz: unknown key" in out.err
    assert "Traceback" not in out.err + out.out and out.out == ""


def test_config_keys_lists_every_key_with_its_help(capsys):
    assert main(["config", "keys"]) == 0
    out = capsys.readouterr().out
    defaults = Config()
    for section in dataclasses.fields(Config):
        assert f"{section.name}:" in out
        for f in dataclasses.fields(getattr(defaults, section.name)):
            assert f"  {f.name}: " in out, f"{section.name}.{f.name} missing from `config keys`"
            assert f.metadata["help"] in out
