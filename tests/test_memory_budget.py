"""train.memory_budget_gib: the fewest recomputing layers that fit, chosen from one measured step.

CPU: the choice (a pure function), the micro-batch sizes it plans for, the per-layer measurement on a tiny
Llama (the allocator's counters stand in: CUDA's cannot be read on CPU), the raise after a step over the
budget, the config key. GPU (run on the device, skipped on CPU with the reason): a small Llama trained a
few steps under three budgets stays within each and recomputes fewer layers with more memory.
"""

from __future__ import annotations

import gc
import json
import logging
import time

import pytest
import torch

from medcot.config import LoraArgs, TrainArgs, load_config
from medcot.data.prompts import IGNORE_INDEX, Encoded
from medcot.errors import ConfigError
from medcot.model.load import attach_lora
from medcot.train import memory as budget_mod
from medcot.train.distributed import World
from medcot.train.fast import use_packed_attention
from medcot.train.memory import (
    MARGIN,
    Costs,
    GiB,
    MemoryBudget,
    Plan,
    choose,
    micro_batch_tokens,
    predicted_peak,
)
from medcot.train.trainer import Trainer, train_step

# The 8B seed recipe on an H200 (docs/benchmarks.md): 32 layers, a step of 6,400 tokens, 8.75 GiB with every
# layer recomputing, 47.7 GiB with none, a layer's input 4096 bf16 values per token.
L, T = 32, 6400
BASE, FULL, NONE = 5.5 * GiB, 8.75 * GiB, 47.7 * GiB
INPUT = 4096 * 2
COSTS = Costs(base=BASE, shared=(FULL - BASE) / T - L * INPUT, layer=(NONE - FULL) / (T * L), layer_input=INPUT)


def _peak(plan: Plan, tokens: int = T) -> float:
    return predicted_peak(COSTS, L, plan, tokens)


def test_the_model_reproduces_the_measured_peaks():
    assert _peak(Plan(L, False)) == pytest.approx(FULL)
    assert _peak(Plan(0, False)) == pytest.approx(NONE)
    assert _peak(Plan(L, True)) == pytest.approx(FULL - L * T * INPUT)  # offload frees every layer's input


def test_a_budget_above_the_no_recompute_peak_recomputes_nothing():
    assert choose(60 * GiB, COSTS, L, T) == Plan(0, False)  # 141 GB GPUs: no recompute at all


def test_a_budget_in_between_recomputes_the_fewest_layers_that_fit():
    plan = choose(40 * GiB, COSTS, L, T)
    limit = 40 * GiB * (1 - MARGIN)
    assert not plan.offload and 0 < plan.recompute < L
    assert _peak(plan) <= limit < _peak(Plan(plan.recompute - 1, False))
    # A run whose largest micro-batch is longer needs more recompute for the same budget.
    assert choose(40 * GiB, COSTS, L, 2 * T).recompute > plan.recompute


def test_below_the_full_recompute_peak_offload_comes_in():
    # Just below full recompute: offloading 31 layers' inputs frees room for one layer to keep its activations.
    budget = 9.0 * GiB
    assert budget * (1 - MARGIN) < FULL
    plan = choose(budget, COSTS, L, T)
    assert plan == Plan(L - 1, True) and plan.fits and _peak(plan) <= budget * (1 - MARGIN)
    # Lower: every layer recomputes, inputs in host memory.
    plan = choose(8.5 * GiB, COSTS, L, T)
    assert plan == Plan(L, True) and plan.fits


def test_below_everything_it_runs_with_everything_on_and_says_so():
    plan = choose(7.0 * GiB, COSTS, L, T)
    assert plan == Plan(L, True) and not plan.fits


def test_the_choice_never_recomputes_less_than_the_setting_in_use():
    assert choose(60 * GiB, COSTS, L, T, at_least=Plan(10, False)) == Plan(10, False)
    assert choose(60 * GiB, COSTS, L, T, at_least=Plan(3, True)) == Plan(3, True)


def _row(n: int, seed: int = 0) -> Encoded:
    ids = torch.randint(5, 1000, (n,), generator=torch.Generator().manual_seed(seed + n)).tolist()
    return Encoded(ids, [IGNORE_INDEX] * (n // 3) + ids[n // 3 :], n // 3)


def test_micro_batch_tokens_as_the_step_groups_them():
    rows = [_row(n) for n in (50, 30, 40, 20)]
    t = TrainArgs(per_device_batch_size=2, micro_batch_tokens=85)
    assert micro_batch_tokens(rows, t, packing=True, world=World()) == [80, 60]
    assert micro_batch_tokens(rows, t, packing=False, world=World()) == [2 * 50, 2 * 40]  # padding takes memory
    # Two processes: each plans for its own hand (longest rows dealt in snake order: 50+20 and 30+40).
    assert micro_batch_tokens(rows, t, True, World(rank=0, size=2)) == [70]
    assert micro_batch_tokens(rows, t, True, World(rank=1, size=2)) == [70]


class FakeMemory:
    """Stands in for the CUDA allocator's counters (CudaMemory) on CPU: the test sets what a step used."""

    def __init__(self):
        self.held, self.step_peak, self.resets = 1000.0, 1000.0, 0

    def capacity(self) -> float:
        return float("inf")

    def allocated(self) -> float:
        return self.held

    def peak(self) -> float:
        return self.step_peak

    def reset_peak(self) -> None:
        self.resets += 1


def _tiny_llama(layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg)


def _lora(layers: int = 2):
    base = _tiny_llama(layers)
    use_packed_attention(base)  # the CUDA default: packed rows, attention row by row
    model = attach_lora(base, LoraArgs(r=8, alpha=16), gradient_checkpointing=True)
    for n, p in model.named_parameters():  # LoRA B starts at zero; perturbed, A's gradient is tested too
        if "lora_B" in n:
            p.data.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.02)
    model.train()
    return model


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_the_measured_step_uses_the_measured_layer_cost_and_leaves_training_unchanged(monkeypatch):
    t = TrainArgs(per_device_batch_size=2, micro_batch_tokens=10_000)
    steps = [[_row(n, s) for n in (60, 45, 80, 30)] for s in range(3)]
    off = torch.autocast("cpu", enabled=False)
    plain = _lora()
    loss_plain = train_step(plain, steps[0], t, 0, True, off)

    model, fake = _lora(), FakeMemory()
    mb = MemoryBudget(model, 1.0, memory=fake, on_log=lambda s: None)
    mb.start(steps, t, packing=True)
    layers = model.get_decoder().layers
    assert all(layer.gradient_checkpointing for layer in layers)  # the safe first step: every layer ...
    assert mb.plan == Plan(len(layers), True)  # ... recomputes, inputs in host memory
    loss = train_step(model, steps[0], t, 0, True, off)
    assert loss == pytest.approx(loss_plain, abs=1e-6)  # measuring hands every saved tensor back unchanged
    for n, g in _grads(plain).items():
        torch.testing.assert_close(_grads(model)[n], g, rtol=1e-5, atol=1e-7, msg=n)

    measured = (mb.meter.layer, mb.meter.layer_input)
    assert measured[1] == 64 * 4  # a layer's input: hidden size x fp32, per token
    # The tensors a layer saves for backward: at least its MLP's gate, up and SiLU outputs (3 x 128 fp32).
    assert 3 * 128 * 4 < measured[0] < 100 * 64 * 4
    seen = {}

    def spy(budget, costs, n_layers, tokens, **kw):
        seen.update(costs=costs, n_layers=n_layers, tokens=tokens)
        return Plan(1, False)

    monkeypatch.setattr(budget_mod, "choose", spy)
    tokens = sum(len(r.input_ids) for r in steps[0])
    fake.step_peak, fake.held = 1000.0 + 500.0 * tokens, 1200.0
    assert mb.after_step(steps[0]) == {"recompute_layers": 2, "offload_layers": 2}  # what step 1 ran with
    c = seen["costs"]
    assert (c.layer, c.layer_input) == measured and c.base == 1200.0 and c.shared == pytest.approx(500.0)
    assert seen["tokens"] == max(sum(len(r.input_ids) for r in s) for s in steps)  # the run's largest micro-batch
    # The plan is applied: the first layer recomputes with plain checkpointing, the last keeps its activations.
    assert [layer.gradient_checkpointing for layer in layers] == [True, False]
    assert layers[0]._gradient_checkpointing_func is mb._plain[0]
    assert train_step(model, steps[1], t, 0, True, off) > 0
    assert mb.after_step(steps[1]) == {"recompute_layers": 1, "offload_layers": 0}


def test_a_step_over_the_budget_raises_the_recompute_never_lowers_it_and_warns_once(caplog):
    t = TrainArgs(per_device_batch_size=4, micro_batch_tokens=10_000)
    steps = [[_row(n, s) for n in (60, 45, 80, 30)] for s in range(8)]
    model, fake, logs = _lora(layers=4), FakeMemory(), []
    fake.held = 10e6
    mb = MemoryBudget(model, 100e6 / GiB, memory=fake, on_log=logs.append)  # 100 MB
    mb.start(steps, t, packing=True)
    assert mb.tokens == 215  # the largest step of the run
    mb.meter.layer, mb.meter.layer_input = 100_000.0, 256.0  # as if step 1 had measured: 21.5 MB a layer kept
    fake.step_peak = 10e6 + 100 * 215
    mb.after_step(steps[0])
    assert mb.plan == Plan(1, False)  # keeping all 4 layers would be 96 MB, over 95% of 100 MB
    seen = [mb.plan]
    with caplog.at_level(logging.WARNING, logger="medcot.train.memory"):
        for s in steps[1:]:
            fake.step_peak = 102e6  # every later step goes 2% over: one more layer each time, then offload
            mb.after_step(s)
            seen.append(mb.plan)
    assert seen == [Plan(1, False), Plan(2, False), Plan(3, False), Plan(4, False)] + [Plan(4, True)] * 4
    assert not seen[-1].fits
    assert sum("does not fit" in r.getMessage() for r in caplog.records) == 1
    assert sum("over the budget" in line for line in logs) == 4  # one line per raise, none once all is on
    assert mb.peak == 102e6 and mb.summary()["recompute_layers"] == 4 and mb.summary()["offload_layers"] == 4


def test_fit_runs_the_budget_every_step_and_records_it(tmp_path):
    """The trainer's loop with a budget (a fake allocator on CPU): measured first step, metrics, result."""
    cfg = load_config(None, ["model.device=cpu", "train.report_to=none", "train.save_steps=0", "train.max_steps=3",
                             "train.per_device_batch_size=2", "train.gradient_accumulation_steps=2"])
    model, fake, logs = _lora(), FakeMemory(), []
    fake.step_peak = 2e6
    run = Trainer(model=model, engine=model, cfg=cfg, world=World(), run_root=tmp_path, device=torch.device("cpu"),
                  packing=True, autocast=torch.autocast("cpu", enabled=False), on_log=logs.append, started=time.time(),
                  memory=MemoryBudget(model, 1.0, memory=fake, on_log=logs.append))
    rows = [_row(n, i) for i, n in enumerate((60, 45, 80, 30, 70, 50, 40, 90))]
    state = run.fit(rows, tmp_path / "stage", 3, 1e-3, 0, before=lambda: {"val_loss_before": 1.0})
    metrics = [json.loads(line) for line in (tmp_path / "stage" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["recompute_layers"], m["offload_layers"]) for m in metrics] == [(2, 2), (0, 0), (0, 0)]
    assert fake.resets == 1 + 3  # before the loop, then after every step
    assert run.peak_gib() >= 2e6 / GiB
    result = run.result(tmp_path, state, 1.0)
    assert result.recompute == {"memory_budget_gib": 1.0, "layers": 2, "recompute_layers": 0, "offload_layers": 0,
                                "peak_gib": round(2e6 / GiB, 3)}
    assert any("the first step peaked" in line for line in logs)


# -- the config key ---------------------------------------------------------------------------------


def test_the_key_round_trips_through_yaml_and_the_command_line(tmp_path):
    cfg = load_config(None, ["train.memory_budget_gib=40"])
    assert cfg.train.memory_budget_gib == 40.0 and type(cfg.train.memory_budget_gib) is float
    assert load_config(None).train.memory_budget_gib is None  # default: today's behaviour
    path = tmp_path / "config.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg
    path.write_text("train:\n  memory_budget_gib: 12.5\n")
    assert load_config(path).train.memory_budget_gib == 12.5
    assert load_config(path, ["train.memory_budget_gib=null"]).train.memory_budget_gib is None


@pytest.mark.parametrize("value", ["0", "-3", "nan", "inf"])
def test_a_bad_budget_names_the_key(value):
    with pytest.raises(ConfigError, match=r"train\.memory_budget_gib: must be > 0 \(GiB of GPU memory\) or null"):
        load_config(None, [f"train.memory_budget_gib={value}"])
    with pytest.raises(ConfigError, match=r"train\.memory_budget_gib: expected a number"):
        load_config(None, ["train.memory_budget_gib=lots"])


def test_on_cpu_the_budget_is_ignored_and_said_so(tmp_path):
    cfg = load_config(None, ["model.device=cpu", "train.memory_budget_gib=40"])
    logs = []
    run = Trainer.build(_tiny_llama(), cfg, World(), tmp_path, logs.append, started=time.time())
    assert run.memory is None and any("memory_budget_gib" in line and "ignored on cpu" in line for line in logs)
    assert run.recompute == {"layers": 2, "recompute_layers": 0, "offload_layers": 0}  # gradient_checkpointing off


# -- on the GPU -------------------------------------------------------------------------------------


def _gpu_fit(path, rows, *overrides):
    """A few steps of a small bf16 Llama through `Trainer.fit`: (fit peak GiB, recompute per step, logs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = load_config(None, ["model.device=cuda", "train.report_to=none", "train.save_steps=0", "train.max_steps=5",
                             "train.per_device_batch_size=2", "train.gradient_accumulation_steps=4",
                             "train.optimizer=adamw", *overrides])
    llama = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=8,
                        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(llama).to(torch.bfloat16)
    logs: list[str] = []
    run = Trainer.build(model, cfg, World(), path, logs.append, started=time.time())
    run.fit(rows, path / "stage", cfg.train.max_steps, 2e-4, 0, before=dict)
    metrics = [json.loads(line) for line in (path / "stage" / "metrics.jsonl").read_text().splitlines()]
    peak = run.memory.peak / GiB if run.memory else run.peak_gib()
    del run, model
    gc.collect()
    torch.cuda.empty_cache()
    return peak, [(m.get("recompute_layers"), m.get("offload_layers")) for m in metrics], logs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: the budget bounds CUDA memory (run on the device)")
def test_budgets_on_gpu_keep_the_peak_and_recompute_less_with_more_memory(tmp_path, caplog):
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(40):  # ~12,800 tokens per step of 8 rows: one packed micro-batch
        n = int(torch.randint(1200, 2000, (1,), generator=g))
        ids = torch.randint(5, 32000, (n,), generator=g).tolist()
        rows.append(Encoded(ids, [IGNORE_INDEX] * (n // 4) + ids[n // 4 :], n // 4))
    full, _, _ = _gpu_fit(tmp_path / "full", rows, "train.gradient_checkpointing=true")
    none, _, _ = _gpu_fit(tmp_path / "none", rows, "train.gradient_checkpointing=false")
    assert none > full + 1.0, (full, none)  # activations dominate this model: a budget has room to choose
    chosen = {}
    for name, budget in (("mid", full + 0.4 * (none - full)), ("large", 2 * none)):
        peak, per_step, logs = _gpu_fit(tmp_path / name, rows, f"train.memory_budget_gib={budget}")
        assert peak <= budget, (name, peak, budget, logs)
        assert per_step[0] == (8, 8), per_step  # the measured first step: every layer, inputs in host memory
        chosen[name] = per_step[-1][0]
        print(f"{name}: budget {budget:.2f} GiB, peak {peak:.2f} GiB, recompute per step {per_step}")
    assert chosen["large"] == 0 and 0 < chosen["mid"] < 8, chosen
    with caplog.at_level(logging.WARNING, logger="medcot.train.memory"):
        peak, per_step, _ = _gpu_fit(tmp_path / "tiny", rows, "train.memory_budget_gib=0.05")
    assert per_step[-1] == (8, 8) and any("does not fit" in r.getMessage() for r in caplog.records)
