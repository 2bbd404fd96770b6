"""canary: the deployed model scored on the eval stage's held-out items through its OpenAI API,
against the eval stage's own score of the model that should be there.

    python -m pipeline canary --endpoint http://127.0.0.1:8000/v1 \\
        --baseline results/sample/eval/tiny/eval.json [--baseline-model sft] [--items 100]

Each item (the first --items of the task's fixed held-out items, `held_out_items`, which the eval
stage scored) is asked as a chat completion at temperature 0, greedy as eval's pass@1, with the
items' token budget as max_tokens, and the reply is scored by the task's reward. The run passes
when its accuracy is at least the lower end of the baseline's 95% interval: the metric
`models.<--baseline-model>.tasks.<--task>.pass@1` of eval.json ({"value", "ci95", "n"}). The items
are checked against eval.json's `held_out_items.<task>` (their sha256): a --tasks-config that
defines other items is refused, not scored.

Writes --out (JSON: accuracy, its interval, the baseline, every answer). Exit status: 0 passed,
1 below the baseline, 2 not scored (the endpoint down or refusing, a model it does not serve, a
malformed baseline: one line says which).

With --every SECONDS it is a prober for Prometheus: a round every SECONDS, the latest result served
as `wetstone_canary_*` metrics on --metrics-port (docs/monitoring.md). A round that cannot score
is logged and counted, and the prober goes on; it stops on SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import openai
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from pipeline.artifacts import atomic_write_json
from pipeline.cli import json_arg
from pipeline.config import ConfigError
from pipeline.stats import wilson_interval
from pipeline.tasks import Example, Task, get_task, held_out_items, held_out_record

log = logging.getLogger(__name__)


class CanaryError(Exception):
    """The canary cannot score: the message names the flag, file or field at fault."""


@dataclass(frozen=True)
class Baseline:
    path: str
    model: str      # the eval.json row
    task: str
    accuracy: float
    n: int
    lower: float    # the lower end of its 95% interval: the canary's bar
    items: dict     # eval.json's record of the held-out items it scored: items, seed, max_new_tokens, sha256


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def read_baseline(path: str | Path, row: str, task: str) -> Baseline:
    """The bar: the lower end of the 95% interval on eval.json's `models.<row>.tasks.<task>.pass@1`."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CanaryError(f"--baseline {path}: no such file (the eval stage writes "
                          f"results/<run>/eval/<size>/eval.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CanaryError(f"--baseline {path}: not a readable JSON file ({e})") from None
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict) or not models:
        raise CanaryError(f"--baseline {path}: no 'models' rows; not an eval.json written by the eval stage")
    if row not in models:
        raise CanaryError(f"--baseline {path}: no model row {row!r} (--baseline-model); its rows: {', '.join(models)}")
    key = f"models.{row}.tasks.{task}"
    tasks = models[row].get("tasks") if isinstance(models[row], dict) else None
    scores = tasks.get(task) if isinstance(tasks, dict) else None
    if not isinstance(scores, dict):
        scored = ", ".join(tasks) if isinstance(tasks, dict) and tasks else "no tasks"
        raise CanaryError(f"--baseline {path}: no {key}; the eval scored {row} on {scored} (eval.tasks.names)")
    metric = scores.get("pass@1")
    accuracy, ci, n = (metric.get("value"), metric.get("ci95"), metric.get("n")) if isinstance(metric, dict) else (None,) * 3
    if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1 and _number(accuracy) and isinstance(ci, list)
            and len(ci) == 2 and all(map(_number, ci)) and 0 <= ci[0] <= accuracy <= ci[1] <= 1):
        raise CanaryError(f"--baseline {path}: {key}.pass@1 must be a metric {{value, ci95: [low, high] around the "
                          f"value, n >= 1}} in [0, 1], as the eval stage writes it; it is {metric!r}")
    records = data.get("held_out_items")
    record = records.get(task) if isinstance(records, dict) else None
    if not (isinstance(record, dict) and {"items", "seed", "max_new_tokens", "sha256"} <= record.keys()):
        raise CanaryError(f"--baseline {path}: no held_out_items.{task} (the record of the items the eval scored: "
                          f"items, seed, max_new_tokens, sha256)")
    return Baseline(str(path), row, task, accuracy, n, float(ci[0]), record)


def canary_items(task: Task, baseline: Baseline, n: int) -> list[Example]:
    """The first n of the held-out items the eval scored: the task's fixed items (--tasks-config
    defines them), refused unless they are the ones eval.json records."""
    record = baseline.items
    if n > record["items"]:
        raise CanaryError(f"--items {n}: the eval scored {record['items']} {task.name} held-out items (--baseline "
                          f"{baseline.path})")
    try:
        ours = held_out_record(task, record["items"])
    except ValueError as e:  # the configured list is shorter than the eval's
        raise CanaryError(f"--tasks-config: {e}") from None
    if ours["sha256"] != record["sha256"]:
        raise CanaryError(f"--tasks-config: its {task.name} held-out items are not the ones the eval scored (sha256 "
                          f"{ours['sha256'][:12]} vs {record['sha256'][:12]} in --baseline {baseline.path}); pass the "
                          f"tasks section the run used")
    return held_out_items(task, n)


class Endpoint:
    """An OpenAI-compatible API (OpenAI's client); each failure becomes a CanaryError saying what
    the endpoint answered."""

    def __init__(self, url: str, timeout: float):
        self.url = url
        # the client retries connection errors, 429 and 5xx twice, with backoff
        self.client = openai.OpenAI(base_url=url, api_key=os.environ.get("OPENAI_API_KEY", "none"), timeout=timeout)

    def _call(self, fn, **kwargs):
        try:
            return fn(**kwargs)
        except openai.APIConnectionError as e:  # refused, unreachable, timed out
            raise CanaryError(f"--endpoint {self.url}: cannot reach it ({e.__cause__ or e})") from None
        except openai.APIStatusError as e:
            body = e.body.get("message", e.body) if isinstance(e.body, dict) else e.body
            hint = "; is --endpoint the API's base URL, ending in /v1?" if e.status_code == 404 else ""
            raise CanaryError(f"--endpoint {self.url}: HTTP {e.status_code}: {body or e.message}{hint}") from None

    def model(self, name: str | None) -> str:
        """`name` when the endpoint serves it; None: the one model it serves."""
        served = [m.id for m in self._call(self.client.models.list)]
        if name is None and len(served) == 1:
            return served[0]
        if name is None or name not in served:
            which = "choose one with --model" if name is None else f"it does not serve --model {name!r}"
            raise CanaryError(f"--endpoint {self.url} serves {', '.join(map(repr, served)) or 'no model'}: {which}")
        return name

    def answer(self, model: str, example: Example, max_tokens: int) -> str:
        reply = self._call(self.client.chat.completions.create, model=model, messages=example.prompt,
                           temperature=0, max_tokens=max_tokens)
        return reply.choices[0].message.content or ""


def score(endpoint: Endpoint, model: str, task: Task, items: list[Example], *, baseline: Baseline, max_tokens: int,
          concurrency: int) -> dict[str, Any]:
    """One canary run: every item asked `concurrency` at a time; the first failure ends it."""
    started = time.monotonic()

    def ask(example: Example) -> dict[str, Any]:
        text = endpoint.answer(model, example, max_tokens)
        return {"question": example.prompt[-1]["content"], "answer": example.answer, "completion": text,
                "correct": task.reward(text, example.answer) > 0}

    with ThreadPoolExecutor(concurrency, thread_name_prefix="canary") as pool:
        futures = [pool.submit(ask, example) for example in items]
        try:
            answers = [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()
    correct = sum(a["correct"] for a in answers)
    accuracy = correct / len(answers)
    return {"endpoint": endpoint.url, "model": model, "task": task.name, "items": len(answers), "correct": correct,
            "accuracy": accuracy, "ci95": list(wilson_interval(correct, len(answers))), "max_tokens": max_tokens,
            "baseline": asdict(baseline), "passed": accuracy >= baseline.lower,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.monotonic() - started, 3), "answers": answers}


def summary(result: dict[str, Any]) -> str:
    b = result["baseline"]
    verdict = "passed" if result["passed"] else "BELOW the baseline"
    return (f"{result['model']} at {result['endpoint']}: {result['correct']}/{result['items']} {result['task']} items "
            f"right ({result['accuracy']:.1%}, 95% CI {result['ci95'][0]:.1%}-{result['ci95'][1]:.1%}); baseline "
            f"{b['model']} {b['accuracy']:.1%} of {b['n']}, lower bound {b['lower']:.1%}: {verdict}")


class ProbeMetrics:
    """The prober's Prometheus metrics (the alert rules in workflow/monitoring/rules.yml read them)."""

    def __init__(self, every: float):
        self.registry = r = CollectorRegistry()
        labels = dict(labelnames=["model", "task"], registry=r)
        self.accuracy = Gauge("wetstone_canary_accuracy", "Accuracy of the last canary run", **labels)
        self.lower = Gauge("wetstone_canary_baseline_lower_bound",
                           "Lower end of the baseline's 95% interval: the canary's bar", **labels)
        self.items = Gauge("wetstone_canary_items", "Items the last canary run scored", **labels)
        self.last_success = Gauge("wetstone_canary_last_success_timestamp_seconds",
                                  "Unix time the last canary run finished scoring (0: none yet)", registry=r)
        self.duration = Gauge("wetstone_canary_duration_seconds", "Wall time of the last scored run", registry=r)
        Gauge("wetstone_canary_interval_seconds", "Seconds between canary runs (--every)", registry=r).set(every)
        self.runs = Counter("wetstone_canary_runs", "Canary runs by result", ["result"], registry=r)
        for result in ("passed", "below_baseline", "error"):
            self.runs.labels(result)  # every series from the start: rate() needs the zero

    def record(self, result: dict[str, Any]) -> None:
        for gauge in (self.accuracy, self.lower, self.items):
            gauge.clear()  # the served model's name may have changed: only the latest run's series
        labels = (result["model"], result["task"])
        self.accuracy.labels(*labels).set(result["accuracy"])
        self.lower.labels(*labels).set(result["baseline"]["lower"])
        self.items.labels(*labels).set(result["items"])
        self.duration.set(result["seconds"])
        self.last_success.set(time.time())
        self.runs.labels("passed" if result["passed"] else "below_baseline").inc()


def probe(endpoint: Endpoint, model_name: str | None, run_once, *, every: float, host: str, port: int, out: Path) -> int:
    """Run forever (until SIGTERM or Ctrl-C): a round every `every` seconds, metrics on host:port."""
    metrics = ProbeMetrics(every)
    try:
        server, _ = start_http_server(port, addr=host, registry=metrics.registry)
    except OSError as e:
        raise CanaryError(f"--metrics-port {port}: cannot listen on {host}:{port} ({e.strerror or e})") from None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("canary prober: a round every %gs, metrics on http://%s:%d/metrics", every, host, port)
    while not stop.is_set():
        began = time.monotonic()
        try:
            result = run_once(endpoint.model(model_name))
        except CanaryError as e:
            metrics.runs.labels("error").inc()
            log.error("canary round not scored: %s", e)
        else:
            metrics.record(result)
            atomic_write_json(out, result)
            (log.info if result["passed"] else log.warning)("canary: %s", summary(result))
        stop.wait(max(0.0, every - (time.monotonic() - began)))
    server.shutdown()
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--endpoint", required=True,
                        help="the OpenAI-compatible API's base URL, as OpenAI clients take it: http://host:port/v1")
    parser.add_argument("--baseline", required=True, type=Path,
                        help="the eval stage's results/<run>/eval/<size>/eval.json")
    parser.add_argument("--baseline-model", default="sft",
                        help="the eval.json row the deployed model should match (pretrain, sft, grpo; default sft)")
    parser.add_argument("--model", help="the served model's name (default: the one model the endpoint serves)")
    parser.add_argument("--task", default="arithmetic", help="the task scored (one the eval scored; default arithmetic)")
    parser.add_argument("--items", type=int, default=100, help="held-out items scored: the eval stage's, in its order")
    parser.add_argument("--tasks-config", type=json_arg, default={},
                        help="the tasks config section the run used, as JSON or @file (default: the schema's "
                             "defaults, which config.yaml keeps); it defines the held-out items")
    parser.add_argument("--max-tokens", type=int,
                        help="answer length (default: the items' token budget the eval used, from the baseline)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    parser.add_argument("--out", type=Path, default=Path("canary.json"), help="the JSON result (the latest round's)")
    parser.add_argument("--every", type=float, help="be a prober: a round every EVERY seconds, metrics on --metrics-port")
    parser.add_argument("--metrics-host", default="127.0.0.1", help="the prober's metrics address")
    parser.add_argument("--metrics-port", type=int, default=9400, help="the prober's metrics port (/metrics)")


def run(args: argparse.Namespace) -> int:
    for name in ("httpx", "httpx2"):  # the OpenAI client's HTTP library logs every request at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    for flag, value in (("--items", args.items), ("--concurrency", args.concurrency), ("--max-tokens", args.max_tokens),
                        ("--timeout", args.timeout), ("--every", args.every)):
        if value is not None and value <= 0:
            log.error("canary: %s must be positive, got %s", flag, value)
            return 2
    try:
        try:
            task = get_task(args.task, args.tasks_config)
        except ValueError as e:  # an unknown task, a ConfigError naming the key
            raise CanaryError(f"{'--tasks-config: ' if isinstance(e, ConfigError) else '--task: '}{e}") from None
        baseline = read_baseline(args.baseline, args.baseline_model, args.task)
        items = canary_items(task, baseline, args.items)
        max_tokens = args.max_tokens or baseline.items["max_new_tokens"]
        endpoint = Endpoint(args.endpoint, args.timeout)

        def run_once(model: str) -> dict[str, Any]:
            return score(endpoint, model, task, items, baseline=baseline, max_tokens=max_tokens,
                         concurrency=args.concurrency)

        if args.every is not None:
            return probe(endpoint, args.model, run_once, every=args.every, host=args.metrics_host,
                         port=args.metrics_port, out=args.out)
        result = run_once(endpoint.model(args.model))
    except CanaryError as e:
        log.error("canary: %s", e)
        return 2
    atomic_write_json(args.out, result)
    (log.info if result["passed"] else log.error)("canary: %s", summary(result))
    return 0 if result["passed"] else 1
