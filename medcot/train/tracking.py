"""Tracking: metrics to `metrics.jsonl` always, and to W&B or TensorBoard when asked.

W&B runs online only when `WANDB_API_KEY` is set; otherwise (report_to=auto) it writes offline
files into the run folder, which `wandb sync` can upload later. The key itself is read by wandb
from the environment and never passes through medcot.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
from pathlib import Path

from medcot.errors import SetupError
from medcot.io import write_atomic

log = logging.getLogger(__name__)


class Tracker:
    def __init__(self, run_dir: Path, report_to: str, project: str, run_name: str, config: dict, resume_step: int = 0):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        self._truncate_after(resume_step)
        self._wandb = None
        self._tb = None
        self.backend = "none"
        if report_to in ("auto", "wandb"):
            if importlib.util.find_spec("wandb") is None:
                if report_to == "wandb":
                    raise SetupError("train.report_to=wandb but wandb is not installed: pip install 'medcot[track]'")
                log.warning("wandb is not installed; metrics go to metrics.jsonl only (pip install 'medcot[track]')")
            else:
                import wandb

                mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
                with _wandb_service_logs_in(run_dir):
                    self._wandb = wandb.init(
                        project=project, name=run_name, id=run_name.replace("/", "-"), resume="allow",
                        dir=str(run_dir), mode=mode, config=config,
                        settings=wandb.Settings(silent=True, console="off"),
                    )
                self.backend = f"wandb ({mode})"
        elif report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
            self.backend = "tensorboard"

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint so each step appears once (and a line that a
        kill -9 cut in half, which cannot be read)."""
        if not self.path.exists():
            return
        keep = [l for l in self.path.read_text().splitlines() if (m := _parse(l)) is not None and m["step"] <= step]
        write_atomic(self.path, "".join(l + "\n" for l in keep))

    def log(self, metrics: dict, step: int) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def summary(self, values: dict) -> None:
        if self._wandb is not None:
            self._wandb.summary.update(values)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()


def _parse(line: str) -> dict | None:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


@contextlib.contextmanager
def _wandb_service_logs_in(folder: Path):
    """wandb.init starts a service (wandb-core) that writes its debug logs to $WANDB_CACHE_DIR/wandb/logs
    (~/.cache/wandb/logs by default): outside the run. Point it at the run folder while the service starts
    (once per process; the logs land in <run>/wandb/logs), then restore the user's setting. medcot uses
    no wandb artifacts, the cache's other content."""
    old = os.environ.get("WANDB_CACHE_DIR")
    os.environ["WANDB_CACHE_DIR"] = str(folder)
    try:
        yield
    finally:
        if old is None:
            del os.environ["WANDB_CACHE_DIR"]
        else:
            os.environ["WANDB_CACHE_DIR"] = old


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
