"""Serve test helpers: an engine whose tokens follow a script (reasoning/answer splits known in advance),
SSE parsing, and a real `medcot serve` subprocess."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from medcot.config import load_config
from medcot.generate.engine import Engine

REPO = Path(__file__).resolve().parents[2]

# Scripts, picked by a word of the question. The seed template opens <think>, so they start in the reasoning.
SCRIPTS = {
    "croup": "Barking cough and stridor after a cold point to the larynx and trachea.\n</think>\n"
             "Croup, most often caused by parainfluenza virus.",
    "anaphylaxis": "Airway, breathing, circulation; adrenaline acts on all three.\n</think>\n"
                   "Intramuscular adrenaline 0.5 mg (1:1000) into the anterolateral thigh.",
    "unfinished": "Many possibilities to weigh: first the history, then the examination, then the blood tests, "
                  "then the imaging, then the biopsy, then the follow-up visits, then the response to treatment, "
                  "then the differential diagnosis again, then the rarer causes, then the drug history, then the "
                  "family history, and still more to consider before",  # > 64 tokens, never closed
    "plain": "Rest and fluids.",  # with the chat template (no <think> in the prompt): all answer
    "tagged": "<think>\nFever and flank pain.\n</think>\nPyelonephritis.",
    # EOS inside the reasoning (the model never closes it); what follows is the answer after a forced </think>.
    "unclosed": "Rest, fluids and a review in a week<eos>Viral croup.",
}
DEFAULT_SCRIPT = "Thinking it through.\n</think>\nAn answer."


class ScriptedEngine(Engine):
    """The real engine on the tiny model, but each request's tokens follow the script its question names.

    Only token choice is replaced: prefill, decode steps, KV cache, batching and detokenization are real.
    `step_delay_s` slows every step so that tests can act while a request is running.
    """

    step_delay_s = 0.0

    def _script(self, row) -> list[int]:
        if not hasattr(row, "script"):
            prompt = self.tokenizer.decode(row.ticket.prompt_ids).lower()
            found = [key for key in SCRIPTS if key in prompt]  # the key nearest the end: the latest question
            text = SCRIPTS[max(found, key=prompt.rfind)] if found else DEFAULT_SCRIPT
            eos = self.tokenizer.eos_token_id
            row.script = [t for part in text.split("<eos>")
                          for t in [*self.tokenizer(part, add_special_tokens=False)["input_ids"], eos]]
            row.skipped = 0
        return row.script

    def _sample(self, logits, rows):
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        real = super()._sample(logits, rows)  # exercise the sampler too
        out = []
        for i, (r, tok) in enumerate(zip(rows, real)):
            script = self._script(r)
            at = r.n_generated + r.skipped
            if at < len(script) and logits[i, script[at]] == float("-inf"):
                # The sampler masked it (EOS right after a forced </think>): the script goes on past it.
                r.skipped += 1
                at += 1
            out.append(script[at] if at < len(script) else tok)
        return out


def wait_ready(client, timeout: float = 120) -> None:
    """The model loads in the background: wait until /health says the server is ready."""
    deadline = time.monotonic() + timeout
    while (r := client.get("/health")).status_code != 200:
        assert r.json()["status"] == "loading", f"the server did not get ready: {r.json()}"
        assert time.monotonic() < deadline, "the model did not load in time"
        time.sleep(0.02)


def tiny_config(model_dir, *overrides: str):
    return load_config(None, [f"model.name_or_path={model_dir}", "model.device=cpu", "model.dtype=fp32",
                              "generate.max_new_tokens=64", *overrides])


def chat(question: str, **kw) -> dict:
    return {"messages": [{"role": "user", "content": question}], **kw}


def read_sse(lines) -> tuple[list[dict], bool]:
    """Parse `data:` lines of an SSE body into JSON chunks; the bool says whether [DONE] ended it."""
    import json

    chunks, done = [], False
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), f"not an SSE data line: {line!r}"
        assert not done, "data after [DONE]"
        if line == "data: [DONE]":
            done = True
        else:
            chunks.append(json.loads(line[len("data: "):]))
    return chunks, done


def joined(chunks: list[dict], field: str) -> str:
    return "".join(c["choices"][0]["delta"].get(field) or "" for c in chunks if c["choices"])


# -- a real `medcot serve` process ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_in_thread(app, ready: bool = True, listen_timeout: float = 60):
    """The app on uvicorn in a thread; yields its URL once the server listens and, with `ready`, once the
    model has loaded (/health 200)."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + listen_timeout
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start listening"
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.config.port}"
    deadline = time.monotonic() + 120
    while ready and httpx.get(f"{url}/health", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the model did not load"
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(15)


class LiveServer:
    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, ready_timeout: float = 180):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "medcot", "serve", "--port", str(self.port), *args],
            cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"medcot serve exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"medcot serve did not become ready:\n{self.log()}")
            time.sleep(0.3)

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=10).json()

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.log_path.read_text()


def server_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MEDCOT_API_KEY"}
    env.update(TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"), **extra)
    return env
