"""Recompute chosen by a memory budget (`train.memory_budget_gib`): only as much as needed to fit.

Recomputing a decoder layer in backward saves its activations and costs time: the recompute pass was 26%
of a step of the 8B seed recipe on an H200, where no recompute peaked at 47.7 GiB and full recompute at
8.75 GiB (docs/benchmarks.md). A budget turns that trade into a count of recomputing layers, from
measurements of this run rather than a formula for one architecture:

1. The first step of a session runs medcot's lowest-memory setting: every layer recomputes and keeps its
   input in host memory. Its peak (the CUDA allocator's `max_memory_allocated`) and the memory still held
   after it split into `base` (weights, adapters, optimizer state) and `shared` bytes per token (embeddings,
   loss, one layer's backward: what no layer setting changes).
2. In that step every layer's recompute is watched: the tensors it saves for backward, counted once per
   storage, are what the layer keeps when it does not recompute (`layer` bytes per token; its input,
   `layer_input`, is kept besides unless offloaded).
3. Peak memory is then linear in a micro-batch's tokens (varlen/SDPA attention: no tokens² term) and in
   the layers kept (`predicted_peak`). `choose` takes the fewest recomputing layers whose prediction for
   the largest micro-batch the run will see fits the budget less a margin, and host offload only when
   recompute alone cannot fit (it saves just one hidden state per layer, and a round trip per layer).
4. A later step whose peak still goes over the budget raises the recompute, never lowers it.

Every process plans from the largest measurements of any process, so they all recompute the same layers
(FSDP gathers a layer's weights again when it recomputes: the ranks must agree).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import torch
from torch.utils._pytree import tree_leaves

from medcot.data.collate import micro_batches
from medcot.data.prompts import Encoded
from medcot.train import distributed
from medcot.train.distributed import World
from medcot.train.fast import limit_checkpointing, offload_checkpointing

log = logging.getLogger(__name__)

GiB = 2**30
# Kept free below the budget. The prediction is linear in tokens and a step's allocations are not quite:
# the attention and loss workspaces, the allocator's rounding and the optimizer's temporaries move a step's
# peak by a few hundred MiB on the 8B recipe. 5% of 40 GiB (2 GiB) is about one and a half layers kept
# there: a steady cost in speed, against an out-of-memory error in the middle of a run.
MARGIN = 0.05


@dataclass(frozen=True)
class Plan:
    recompute: int  # decoder layers that recompute: the first ones (fast.limit_checkpointing)
    offload: bool  # their inputs wait in host memory (fast.offload_checkpointing)
    fits: bool = field(default=True, compare=False)  # the prediction is within the budget


@dataclass(frozen=True)
class Costs:
    """What one step's measurements say about memory, in bytes (per token where named so)."""

    base: float  # held whatever the batch: weights, adapters, optimizer state
    shared: float  # per token, whatever the layers do: embeddings, loss, the backward of one layer
    layer: float  # per token, saved for backward by a layer that does not recompute, its input aside
    layer_input: float  # per token, a layer's input: kept by a recomputing layer unless offloaded


def predicted_peak(costs: Costs, n_layers: int, plan: Plan, tokens: int) -> float:
    kept = n_layers - plan.recompute
    inputs = 0 if plan.offload else plan.recompute
    return costs.base + tokens * (costs.shared + kept * (costs.layer + costs.layer_input) + inputs * costs.layer_input)


def candidates(n_layers: int) -> list[Plan]:
    """Every setting, fastest first: fewer recomputing layers first, offload only after recompute alone."""
    return [Plan(n, False) for n in range(n_layers + 1)] + [Plan(n, True) for n in range(1, n_layers + 1)]


def choose(budget: float, costs: Costs, n_layers: int, tokens: int, margin: float = MARGIN,
           at_least: Plan | None = None) -> Plan:
    """The fastest setting predicted to fit `budget` (bytes) less `margin` for a micro-batch of `tokens`.

    `at_least`: the setting in use; the answer never recomputes fewer layers, nor drops offload.
    Where nothing fits: every layer recomputing with offload, marked `fits=False`.
    """
    limit = budget * (1 - margin)
    for plan in candidates(n_layers):
        if at_least is not None and (plan.recompute < at_least.recompute or plan.offload < at_least.offload):
            continue
        if predicted_peak(costs, n_layers, plan, tokens) <= limit:
            return plan
    return Plan(n_layers, True, fits=False)


def micro_batch_tokens(rows: list[Encoded], t, packing: bool, world: World) -> list[int]:
    """Tokens of each micro-batch this process runs for one step's rows, grouped as `trainer.train_step`
    groups them (padded micro-batches count their padding: it takes memory too)."""
    hand = distributed.deal_rows(rows, world.size)[world.rank]
    groups = micro_batches(hand, t.per_device_batch_size, packing, t.micro_batch_tokens)
    sizes = [[len(r.input_ids) for r in g] for g in groups]
    return [sum(s) if packing else len(s) * max(s) for s in sizes if s]


class CudaMemory:
    """The CUDA allocator's counters, the numbers the budget bounds. Reset every step (a step's own peak; the
    budget keeps the highest), so the run's highest reserved memory is kept here."""

    def __init__(self, device: torch.device):
        self.device = device
        self.max_reserved = 0

    def capacity(self) -> float:
        return torch.cuda.get_device_properties(self.device).total_memory

    def allocated(self) -> float:
        return torch.cuda.memory_allocated(self.device)

    def peak(self) -> float:
        return torch.cuda.max_memory_allocated(self.device)

    def reset_peak(self) -> None:
        self.max_reserved = max(self.max_reserved, torch.cuda.max_memory_reserved(self.device))
        torch.cuda.reset_peak_memory_stats(self.device)


class LayerMeter:
    """Counts what a layer's recompute saves for backward, per token: what the layer keeps without recompute.

    Wraps a checkpoint function that recomputes under plain autograd in backward (fast's offloaded
    checkpoint does; torch's non-reentrant checkpoint does not: it collects the recomputed tensors with
    saved-tensor hooks of its own, which would stop these). Tensors sharing a storage count once; the
    layer's inputs (kept anyway) and weights count not at all. The step's numbers are unchanged: the
    hook hands every tensor back as it is. Only `save_for_backward` is seen, which PEFT, Liger and the fused
    LoRA use; bitsandbytes keeps just the quantized weight on its context.
    """

    def __init__(self):
        self.layer = 0.0  # the most bytes per token any measured layer saved (besides its input)
        self.layer_input = 0.0

    def wrap(self, checkpoint_func: Callable, layer: torch.nn.Module) -> Callable:
        def measured(run, *args):
            def counted(*a, **k):
                if not torch.is_grad_enabled():  # the forward of a recomputing layer: nothing is saved
                    return run(*a, **k)
                return self._count(run, layer, a, k)

            return checkpoint_func(counted, *args)

        return measured

    def _count(self, run, layer, args, kwargs):
        inputs = tree_leaves((args, kwargs, getattr(run, "keywords", {})))  # HF binds keyword inputs in a partial
        # Weights read now: under FSDP they are the gathered ones while the layer runs.
        seen = {_storage(x)[0] for x in [*inputs, *layer.parameters(), *layer.buffers()] if torch.is_tensor(x)}
        total = 0

        def pack(x):
            nonlocal total
            ptr, nbytes = _storage(x)
            if ptr not in seen:
                seen.add(ptr)
                total += nbytes
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            out = run(*args, **kwargs)
        hidden = args[0]
        tokens = max(hidden.shape[:-1].numel(), 1)
        self.layer = max(self.layer, total / tokens)
        self.layer_input = max(self.layer_input, hidden.numel() * hidden.element_size() / tokens)
        return out


def _storage(x: torch.Tensor) -> tuple[int, int]:
    try:
        s = x.untyped_storage()
        return s.data_ptr(), s.nbytes()
    except (RuntimeError, NotImplementedError):  # a tensor subclass without one storage
        return id(x), x.numel() * x.element_size()


class MemoryBudget:
    """The recompute of one training loop, kept within `budget_gib` (see the module docstring).

    In the loop: `start` before the first step, `after_step` after each optimizer update.
    """

    def __init__(self, model, budget_gib: float, world: World | None = None,
                 on_log: Callable[[str], None] = log.info, memory=None):
        self.model = model
        self.layers = list(model.get_decoder().layers)
        self.world, self.on_log = world or World(), on_log
        self.memory = memory if memory is not None else CudaMemory(next(model.parameters()).device)
        self.budget_gib = budget_gib
        self.budget = min(budget_gib * GiB, self.memory.capacity())
        if self.budget < budget_gib * GiB:
            on_log(f"memory budget: train.memory_budget_gib={budget_gib:g} is more than this GPU's "
                   f"{self.budget / GiB:.1f} GiB; planning for the GPU's memory")
        # The plain checkpoint function of each layer (gradient checkpointing is on): offload replaces it.
        self._plain = [layer._gradient_checkpointing_func for layer in self.layers]
        self.plan = self._apply(Plan(len(self.layers), False))  # until `start`: every layer recomputes
        self.costs: Costs | None = None
        self.meter: LayerMeter | None = None
        self.tokens = 0  # the largest micro-batch the run will see
        self.peak = 0.0  # the highest step peak so far, bytes
        self._t = self._packing = None
        self._base = 0.0  # allocated when the current step began
        self._warned = False

    def start(self, steps: Iterable[list[Encoded]], t, packing: bool) -> None:
        """Before the loop: `steps` are the rows of each step this session will run."""
        self._t, self._packing = t, packing
        sizes = [max(micro_batch_tokens(rows, t, packing, self.world), default=0) for rows in steps]
        if not sizes:  # a finished stage, resumed: nothing to train, nothing to measure
            return
        self.tokens = max(sizes)
        self.meter = LayerMeter()
        self._apply(Plan(len(self.layers), True))
        for layer in self.layers:
            layer._gradient_checkpointing_func = self.meter.wrap(layer._gradient_checkpointing_func, layer)
        self.memory.reset_peak()
        self._base = self.memory.allocated()
        self.on_log(f"memory budget {self.budget / GiB:.1f} GiB (train.memory_budget_gib): the first step recomputes "
                    f"every layer with its input in host memory and measures; the largest micro-batch of this run "
                    f"has {self.tokens:,} tokens")

    def after_step(self, rows: list[Encoded]) -> dict:
        """After a step's update: read its peak, set the recompute of the next steps. Returns the metrics of
        the setting this step ran with."""
        ran = self.plan
        peak, held = self.memory.peak(), self.memory.allocated()
        tokens = max(micro_batch_tokens(rows, self._t, self._packing, self.world), default=1)
        peak, held, tokens = _max_across([peak, held, tokens], self.world, self.memory)
        tokens = int(tokens)
        self.peak = max(self.peak, peak)
        if self.meter is not None:
            self._measured(peak, held, tokens)
        elif self.costs is not None and peak > self.budget:
            self._over(peak, held, tokens, ran)
        self.memory.reset_peak()
        self._base = self.memory.allocated()
        return {"recompute_layers": ran.recompute, "offload_layers": ran.recompute if ran.offload else 0}

    def summary(self) -> dict:
        """For the run's manifest."""
        return {"memory_budget_gib": self.budget_gib, "layers": len(self.layers),
                "recompute_layers": self.plan.recompute, "offload_layers": self.plan.recompute if self.plan.offload else 0,
                "peak_gib": round(self.peak / GiB, 3)}

    # -- inside -------------------------------------------------------------------------------------

    def _shared(self, peak: float, tokens: int, ran: Plan, c: Costs) -> float:
        """The per-token bytes no layer setting changes, from a step's peak under the setting it ran with."""
        layers = predicted_peak(Costs(0, 0, c.layer, c.layer_input), len(self.layers), ran, 1)
        return max((peak - self._base) / tokens - layers, 0.0)

    def _measured(self, peak: float, held: float, tokens: int) -> None:
        layer, layer_input, run_tokens = _max_across([self.meter.layer, self.meter.layer_input, self.tokens],
                                                     self.world, self.memory)
        self.meter = None
        if not layer:
            log.warning("memory budget: no layer recomputed in the first step (is the model in training mode?); "
                        "every layer keeps recomputing, its input in host memory")
            self._apply(Plan(len(self.layers), True, fits=False))
            return
        c = Costs(base=held, shared=0.0, layer=layer, layer_input=layer_input)
        self.costs = c = replace(c, shared=self._shared(peak, tokens, Plan(len(self.layers), True), c))
        self.tokens = int(max(run_tokens, tokens))
        plan = self._apply(choose(self.budget, c, len(self.layers), self.tokens))
        self.on_log(f"memory budget: the first step peaked at {peak / GiB:.2f} GiB with every layer recomputing, inputs "
                    f"in host memory; a layer that does not recompute keeps {c.layer / 1024:,.0f} KiB per token. "
                    f"{self._describe(plan)}")
        self._warn_if_over(plan)

    def _over(self, peak: float, held: float, tokens: int, ran: Plan) -> None:
        """A step went over the budget: trust its numbers where they are larger, recompute more."""
        c = self.costs
        self.costs = replace(c, base=max(c.base, held), shared=max(c.shared, self._shared(peak, tokens, ran, c)))
        self.tokens = max(self.tokens, tokens)
        if self.plan == Plan(len(self.layers), True):  # everything is on already: say so once, go on
            self._warn_if_over(replace(self.plan, fits=False))
            return
        plan = choose(self.budget, self.costs, len(self.layers), self.tokens, at_least=self.plan)
        if plan == self.plan:  # the prediction still says it fits: take one step more anyway
            order = candidates(len(self.layers))
            plan = next((p for p in order[order.index(self.plan) + 1:] if p.recompute >= self.plan.recompute),
                        Plan(len(self.layers), True, fits=False))
        before = self.plan
        self._apply(plan)
        self.on_log(f"memory budget: this step peaked at {peak / GiB:.2f} GiB, over the budget of "
                    f"{self.budget / GiB:.1f} GiB, with recompute in {before.recompute} layers"
                    f"{' (offloaded)' if before.offload else ''}. {self._describe(plan)}")
        self._warn_if_over(plan)

    def _describe(self, plan: Plan) -> str:
        predicted = predicted_peak(self.costs, len(self.layers), plan, self.tokens)
        return (f"From now on: recompute in {plan.recompute} of {len(self.layers)} layers"
                + (", their inputs in host memory" if plan.offload else "")
                + f"; predicted peak {predicted / GiB:.2f} GiB for {self.tokens:,} tokens "
                f"(budget less {MARGIN:.0%}: {self.budget * (1 - MARGIN) / GiB:.2f} GiB)")

    def _warn_if_over(self, plan: Plan) -> None:
        if not plan.fits and self.world.main and not self._warned:
            self._warned = True
            predicted = predicted_peak(self.costs, len(self.layers), plan, self.tokens)
            log.warning("train.memory_budget_gib=%g does not fit: with every layer recomputing and its input in "
                        "host memory the largest micro-batch (%s tokens) is predicted to peak at %.2f GiB (budget "
                        "less %.0f%%: %.2f GiB). Training goes on with everything on; lower train.micro_batch_tokens "
                        "(packed) or train.per_device_batch_size, or raise the budget", self.budget_gib,
                        f"{self.tokens:,}", predicted / GiB, 100 * MARGIN, self.budget * (1 - MARGIN) / GiB)

    def _apply(self, plan: Plan) -> Plan:
        limit_checkpointing(self.model, plan.recompute / len(self.layers))
        for layer, plain in zip(self.layers, self._plain):
            layer._gradient_checkpointing_func = plain
        if plan.offload:
            offload_checkpointing(self.model)
        self.plan = plan
        return plan


def _max_across(values: list[float], world: World, memory) -> list[float]:
    """Each value's maximum over the processes (one all-reduce), so every process plans the same."""
    if world.size == 1:
        return values
    import torch.distributed as dist

    x = torch.tensor(values, dtype=torch.float64, device=getattr(memory, "device", "cpu"))
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x.tolist()
