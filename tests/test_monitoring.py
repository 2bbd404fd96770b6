"""Monitoring (`make test-monitoring`, which installs Debian's Prometheus and Chromium first):
the alert rules' promtool unit tests, then a real Prometheus on loopback scraping
`python -m pipeline serve` and the canary prober, with the rules run 60 times faster (every
duration in them divided by 60; scrapes and evaluations every second):

- the canary against the SFT model passes (exit 0, the eval stage's own accuracy) and
  CanaryBelowBaseline stays inactive;
- `serve` restarted with the base model under the same name: the canary exits 1 and
  CanaryBelowBaseline fires, as Prometheus's /api/v1/alerts says;
- bursts that fill serve's queue (--max-waiting) fire ServeRejecting;
- the console (consoles/wetstone.html) renders in headless Chromium, every graph drawn from data
  and every number of its table filled;
- the prober stopped, CanaryNotReporting fires.

The models: a nano GPT, freshly initialised, is the base; the SFT model is the same after 500
steps of the real SFT stage on one-digit addition (about 10 s on one core; it answers about 60%
of the 30 held-out sums, the base none); the baseline is the real eval stage's eval.json of the
two. Every process is started here, waited on with deadlines and ended by its PID.

Marked `monitoring`: `make test` leaves them out; they skip when promtool, prometheus or chromium
is missing.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from browser import chromium, rendered_dom
from conftest import ROOT, save_chat_model
from test_eval import write_tokens

MONITORING = ROOT / "workflow" / "monitoring"
CONSOLE_LIBRARIES = Path("/usr/share/doc/prometheus/examples/console_libraries")
SPEEDUP = 60  # rule durations are divided by this in the live test
SEQ_LEN = 64
ITEMS = 30    # the one-digit sums held out at test_fraction 0.3: all of them
MAX_TOKENS = 10
TASKS_CONFIG = {"arithmetic": {"digits": [1, 1], "test_fraction": 0.3, "train_problems": 70, "test_problems": ITEMS,
                               "held_out": {"max_new_tokens": MAX_TOKENS}}}
MODEL_NAME = "arith"  # the served name of both models: a bad deploy keeps the name

MISSING = [tool for tool in ("promtool", "prometheus") if shutil.which(tool) is None]
MISSING += [] if chromium() else ["chromium"]
MISSING += [] if CONSOLE_LIBRARIES.is_dir() else [str(CONSOLE_LIBRARIES)]
pytestmark = [pytest.mark.monitoring,
              pytest.mark.skipif(bool(MISSING), reason=f"{', '.join(MISSING)} missing: run "
                                 "workflow/monitoring/install_prometheus.sh and workflow/ci/install_chromium.sh (as "
                                 "root), or `make test-monitoring`")]


# --- the rules, by promtool ------------------------------------------------------------------------

def test_promtool_checks_the_config_and_the_rules():
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "rules.yml"]):
        out = subprocess.run(["promtool", *args], cwd=MONITORING, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_unit_tests_of_the_rules_pass_and_can_fail(tmp_path):
    """rules.test.yml passes; and fails once a threshold is moved (the tests look at the rules)."""
    out = subprocess.run(["promtool", "test", "rules", "rules.test.yml"], cwd=MONITORING, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr
    rules = (MONITORING / "rules.yml").read_text()
    runs = {}
    for threshold, moved in (("> 0.01", "> 0.001"), ("> 0.05", "> 0.005"), ("> 0.9", "> 0.5"), ("3 *", "30 *")):
        assert threshold in rules
        folder = tmp_path / moved.replace(" ", "")
        folder.mkdir()
        shutil.copy(MONITORING / "rules.test.yml", folder)
        (folder / "rules.yml").write_text(rules.replace(threshold, moved))
        runs[threshold, moved] = subprocess.Popen(["promtool", "test", "rules", "rules.test.yml"], cwd=folder,
                                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for (threshold, moved), run in runs.items():
        assert run.wait(timeout=60) != 0, f"the tests pass with {threshold!r} moved to {moved!r}"


# --- processes ------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float, log: Path | None = None, every: float = 0.2):
    """check()'s first truthy value, polled until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s" + (f"\n{log.read_text()[-3000:]}" if log else ""))
        time.sleep(every)


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 15 s: this process only, by its PID."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@contextlib.contextmanager
def process(args: list[str], log: Path, ready_url: str, timeout: float = 90):
    """`args` started with its output in `log`, yielded once `ready_url` answers 200, stopped at the end."""
    with open(log, "w") as out:
        proc = subprocess.Popen(args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(f"{args[:4]} answering {ready_url}", lambda: proc.poll() is not None or answers(ready_url), timeout,
                 log)
        assert proc.poll() is None, f"{args[:4]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        yield proc
    finally:
        stop(proc)


def serve(model: Path, tokenizer: Path, port: int, log: Path):
    return process([sys.executable, "-m", "pipeline", "serve", "--model", str(model), "--tokenizer", str(tokenizer),
                    "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port),
                    "--max-batch-size", "4", "--max-waiting", "4", "--timeout-graceful-shutdown", "1"],
                   log, f"http://127.0.0.1:{port}/health")


def canary_args(port: int, baseline: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "canary", "--endpoint", f"http://127.0.0.1:{port}/v1",
            "--baseline", str(baseline), "--items", str(ITEMS), "--tasks-config", json.dumps(TASKS_CONFIG),
            "--concurrency", "4", *extra]


def run_canary(port: int, baseline: Path, out: Path) -> tuple[int, dict, str]:
    done = subprocess.run(canary_args(port, baseline, "--out", str(out)), cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    return done.returncode, json.loads(out.read_text()) if out.exists() else {}, done.stderr


def scaled_rules(text: str, speedup: int) -> str:
    """rules.yml with every duration (range selectors and `for:`) divided by `speedup`."""
    units = {"s": 1, "m": 60, "h": 3600}

    def seconds(value: str, unit: str) -> str:
        return f"{max(1, int(value) * units[unit] // speedup)}s"

    rules = yaml.safe_load(text)
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule["expr"] = re.sub(r"\[(\d+)([smh])\]", lambda m: f"[{seconds(*m.groups())}]", rule["expr"])
            if "for" in rule:
                rule["for"] = seconds(*re.fullmatch(r"(\d+)([smh])", rule["for"]).groups())
    return yaml.safe_dump(rules, sort_keys=False)


class Prometheus:
    """A Prometheus server on loopback: workflow/monitoring/prometheus.yml with the test's targets,
    1 s scrapes and evaluations, and the rules sped up."""

    def __init__(self, folder: Path, serve_port: int, canary_port: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
        config["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
        (folder / "rules.yml").write_text(scaled_rules((MONITORING / "rules.yml").read_text(), SPEEDUP))
        config["rule_files"] = [str(folder / "rules.yml")]
        targets = {"wetstone-serve": serve_port, "wetstone-canary": canary_port}
        for job in config["scrape_configs"]:
            job["static_configs"] = [{"targets": [f"127.0.0.1:{targets[job['job_name']]}"]}]
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.args = ["prometheus", f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'tsdb'}",
                     f"--web.listen-address=127.0.0.1:{self.port}", f"--web.console.templates={MONITORING / 'consoles'}",
                     f"--web.console.libraries={CONSOLE_LIBRARIES}"]
        self.log = folder / "prometheus.log"

    def start(self):
        return process(self.args, self.log, f"{self.url}/-/ready")

    def query(self, expr: str) -> list[dict]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=5).json()
        assert r["status"] == "success", r
        return r["data"]["result"]

    def alerts(self, name: str) -> list[dict]:
        """The alerts named `name`, pending or firing, from /api/v1/alerts."""
        r = httpx.get(f"{self.url}/api/v1/alerts", timeout=5).json()
        return [a for a in r["data"]["alerts"] if a["labels"]["alertname"] == name]

    def firing(self, name: str) -> list[dict]:
        return [a for a in self.alerts(name) if a["state"] == "firing"]


# --- the models -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(stories, tmp_path_factory) -> dict[str, Path]:
    """base: a fresh nano GPT; sft: it after 500 steps of the SFT stage on one-digit sums; eval:
    the eval stage's eval.json of both (the canary's baseline)."""
    import torch

    from pipeline.config import section_config
    from pipeline.eval.stage import run_eval
    from pipeline.tokenizer.bpe import BPETokenizer
    from pipeline.train.sft import train

    root = tmp_path_factory.mktemp("models")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base, tokenizer = save_chat_model(root / "pretrain", stories, SEQ_LEN, stage="pretrain")
        sft = section_config("sft", dict(
            mixture={"arithmetic": 1, "gsm8k": 0, "instruct": 0, "replay": 0}, global_batch=64, micro_batch=16, max_steps=500,
            lr=0.02, warmup_steps=20, eval_every=500, eval_examples=16, checkpoint_every=500, keep=1, samples=0,
            peak_flops=1e12, wandb_mode="disabled"))
        train(sft, model_path=base, tokenizer_path=tokenizer, out=root / "sft", tasks_config=TASKS_CONFIG)
        tokens = write_tokens(root / "tokens", BPETokenizer.load(tokenizer), stories[:4])
        eval_cfg = section_config("eval", {"val_tokens": 256, "mmlu": {"shots": [0], "max_questions": 4},
                                           "tasks": {"names": ["arithmetic"], "samples": 1, "k": 1}})
        run_eval({"pretrain": base, "sft": root / "sft" / "final.pt"}, tokens=tokens, tokenizer_path=tokenizer,
                 out=root / "eval" / "nano", size="nano", cfg=eval_cfg, tasks_config=TASKS_CONFIG)
    finally:
        torch.set_num_threads(threads)
    return {"base": base, "sft": root / "sft" / "final.pt", "tokenizer": tokenizer,
            "eval": root / "eval" / "nano" / "eval.json"}


# --- the live test --------------------------------------------------------------------------------

def burst(url: str, n: int) -> list[int]:
    """n requests at once, each decoding 40 tokens: the status codes."""
    def one(_):
        try:
            return httpx.post(f"{url}/v1/completions", json={"model": MODEL_NAME, "prompt": "What is", "max_tokens": 40,
                                                             "ignore_eos": True}, timeout=60).status_code
        except httpx.TransportError:
            return 0
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def test_prometheus_alerts_on_a_worse_model_a_full_queue_and_a_silent_canary(models, tmp_path):
    evaluated = json.loads(models["eval"].read_text())["models"]
    sft_accuracy = evaluated["sft"]["tasks"]["arithmetic"]["pass@1"]["value"]
    assert sft_accuracy >= 0.3 and evaluated["pretrain"]["tasks"]["arithmetic"]["pass@1"]["value"] == 0.0, evaluated
    serve_port, canary_port = free_port(), free_port()
    prometheus = Prometheus(tmp_path, serve_port, canary_port)
    serve_url = f"http://127.0.0.1:{serve_port}"
    with contextlib.ExitStack() as running:
        running.enter_context(prometheus.start())

        # the SFT model: the canary passes with the eval stage's own score
        sft = running.enter_context(serve(models["sft"], models["tokenizer"], serve_port, tmp_path / "serve_sft.log"))
        code, result, stderr = run_canary(serve_port, models["eval"], tmp_path / "sft.json")
        assert code == 0 and result["passed"], stderr
        assert result["items"] == ITEMS and result["accuracy"] == sft_accuracy
        prober = running.enter_context(process(
            canary_args(serve_port, models["eval"], "--every", "1", "--metrics-port", str(canary_port),
                        "--out", str(tmp_path / "prober.json")),
            tmp_path / "prober.log", f"http://127.0.0.1:{canary_port}/metrics"))
        wait_for("Prometheus holding the canary's accuracy",
                 lambda: prometheus.query("wetstone_canary_accuracy > 0"), 60, prometheus.log)
        time.sleep(3)  # three rule evaluations with the accuracy scraped
        assert prometheus.alerts("CanaryBelowBaseline") == []

        # the base model in its place, under the same name: the canary fails and the alert fires
        stop(sft)
        running.enter_context(serve(models["base"], models["tokenizer"], serve_port, tmp_path / "serve_base.log"))
        code, result, stderr = run_canary(serve_port, models["eval"], tmp_path / "base.json")
        assert code == 1 and not result["passed"] and result["accuracy"] < result["baseline"]["lower"], stderr
        alert = wait_for("CanaryBelowBaseline firing", lambda: prometheus.firing("CanaryBelowBaseline"), 60,
                         tmp_path / "prober.log")[0]
        assert alert["labels"]["model"] == MODEL_NAME and alert["labels"]["task"] == "arithmetic"
        assert float(alert["value"]) == result["accuracy"]

        # bursts that overfill the queue (4 decoding, 4 waiting): 429s, and the rejection alert
        statuses: list[int] = []

        def rejecting():
            statuses.extend(burst(serve_url, 24))
            return prometheus.firing("ServeRejecting")
        wait_for("ServeRejecting firing", rejecting, 90, prometheus.log, every=0)
        assert 429 in statuses and 200 in statuses and set(statuses) <= {200, 429}, sorted(set(statuses))

        # the console, as a person opens it: every graph drawn, every number of the table there
        dom = rendered_dom(f"{prometheus.url}/consoles/wetstone.html", budget_ms=15_000)
        (tmp_path / "console.html").write_text(dom)
        graphs = re.findall(r'<td class="rickshaw_graph".*?</td>', dom, flags=re.S)
        assert len(graphs) == 7, dom[-3000:]
        for graph in graphs:
            assert "prom_graph_error" not in graph and re.search(r'<path[^>]* d="M[^"]*L', graph), graph[:500]
        for cell in ("up", "running", "waiting", "kv", "ttft", "requests", "rejected", "tokens", "canary", "bar", "last"):
            value = re.search(rf'<td id="{cell}">(.*?)</td>', dom, flags=re.S)
            assert value and re.search(r">\s*[0-9.]+", value.group(1)), f"{cell}: {value and value.group(1)}"
        assert "CanaryBelowBaseline" in re.search(r'<td id="alerts">(.*?)</td>', dom, flags=re.S).group(1)

        # the prober gone: the canary is not reporting
        stop(prober)
        wait_for("CanaryNotReporting firing", lambda: prometheus.firing("CanaryNotReporting"), 60, prometheus.log)
