"""Evaluation protocols (`eval.protocol`): how an item becomes a prompt, an answer and a score.

- `medcot` (medcot.py): the training prompt, the thinking budget, strict extraction; base vs adapter.
- `huatuo` (huatuo.py, huatuo_scorer.py): HuatuoGPT-o1's published evaluation, to line up with its table.
- `loglik` (loglik.py): lm-evaluation-harness's log-likelihood of the option labels, no generation.
"""

from __future__ import annotations

from medcot.eval.protocols.base import GenerativeProtocol, Protocol
from medcot.eval.protocols.huatuo import HuatuoProtocol
from medcot.eval.protocols.loglik import LoglikProtocol
from medcot.eval.protocols.medcot import MedcotProtocol

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (MedcotProtocol(), HuatuoProtocol(), LoglikProtocol())}

__all__ = ["GenerativeProtocol", "PROTOCOLS", "Protocol"]
