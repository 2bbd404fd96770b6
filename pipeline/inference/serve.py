"""serve: the OpenAI-compatible HTTP server (`pipeline/inference/server.py`) over one model.

`python -m pipeline serve --model <final.pt> --tokenizer <tokenizer.json>`, or `--model <folder>`
alone for a transformers folder of GPT2LMHeadModel (what export-hf writes), LlamaForCausalLM or
Qwen2ForCausalLM: its safetensors weights read by pipeline/hf.py's `load_hf`, its tokenizer.json
and chat template by pipeline/tokenizer/hf_tokenizer.py's `load_hf_tokenizer`, generation stopping
at generation_config.json's eos ids. SIGTERM or Ctrl-C lets the requests in flight
finish for --timeout-graceful-shutdown seconds, then aborts the rest with OpenAI's 503 body.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import uvicorn

from pipeline.artifacts import check_inputs
from pipeline.hf import load_hf
from pipeline.inference.engine import Engine
from pipeline.inference.server import AsyncEngine, create_app
from pipeline.model.gpt import GPT, load_final
from pipeline.tokenizer.bpe import BPETokenizer
from pipeline.tokenizer.hf_tokenizer import load_hf_tokenizer

log = logging.getLogger(__name__)


def load_model(path: str | Path, device: str) -> tuple[GPT, dict]:
    """A final.pt (`load_final`) or a transformers folder (`load_hf`): the GPT and its metadata."""
    return load_hf(path, device) if Path(path).is_dir() else load_final(path, device)


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True,
                        help="final.pt (pretrain, sft or grpo), or a transformers folder (GPT2LMHeadModel as "
                             "export-hf writes, LlamaForCausalLM, Qwen2ForCausalLM) with its tokenizer.json")
    parser.add_argument("--tokenizer", help="tokenizer.json (the tokenizer stage's); needed with a final.pt, "
                                            "default with an exported folder: the folder's own")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", help="the model's name in the API (default: the final.pt's folder "
                                                    "name, or the exported folder's)")
    parser.add_argument("--draft-model", help="final.pt or exported folder of a smaller model for speculative decoding")
    parser.add_argument("--num-speculative-tokens", type=int, default=4)
    parser.add_argument("--max-batch-size", type=int, default=32, help="requests decoded together at most")
    parser.add_argument("--block-size", type=int, default=16, help="token slots per KV-cache block")
    parser.add_argument("--num-blocks", type=int, help="KV-cache blocks (default: max-batch-size full contexts)")
    parser.add_argument("--max-model-len", type=int,
                        help="prompt and output tokens at most per request (default: the model's context)")
    parser.add_argument("--chunked-prefill", action="store_true", help="cut long prompts to the step's token budget")
    parser.add_argument("--max-waiting", type=int, default=256, help="queued requests at most; more get 429")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request bodies larger get 413")
    parser.add_argument("--max-prompt-tokens", type=int,
                        help="longer prompts get 400 (default and at most: the model's context)")
    parser.add_argument("--api-key", default=os.environ.get("WETSTONE_API_KEY"),
                        help="require 'Authorization: Bearer <key>' on every request, else 401 (default: "
                             "$WETSTONE_API_KEY, which keeps the key out of the process list; unset: no key)")
    parser.add_argument("--protect-health-metrics", action="store_true",
                        help="with --api-key, /health and /metrics need the key too (default: open to probes "
                             "and Prometheus, as vLLM leaves them)")
    parser.add_argument("--timeout-graceful-shutdown", type=float, default=5.0,
                        help="seconds in-flight requests may run on after SIGTERM before they are aborted")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")


class GracefulServer(uvicorn.Server):
    """uvicorn's server, which on SIGTERM or Ctrl-C stops accepting connections, lets the
    requests in flight run for `grace` seconds, then has the engine abort the rest: each gets
    OpenAI's 503 body (an error event when streaming), so no handler is cancelled mid-way."""

    def __init__(self, config: uvicorn.Config, core: AsyncEngine, grace: float):
        super().__init__(config)
        self.core, self.grace = core, grace

    def handle_exit(self, sig: int, frame) -> None:
        if not self.should_exit:
            timer = threading.Timer(self.grace, self.core.abort_all)
            timer.daemon = True  # a shutdown done sooner does not wait for it
            timer.start()
        super().handle_exit(sig, frame)


def run(args) -> int:
    import torch

    torch.set_num_threads(args.threads)
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    exported = Path(args.model).is_dir()
    if args.protect_health_metrics and not args.api_key:
        raise SystemExit("--protect-health-metrics needs --api-key (or $WETSTONE_API_KEY)")
    if not exported and args.tokenizer is None:
        raise SystemExit(f"--model {args.model} is not a transformers folder: a final.pt needs --tokenizer (tokenizer.json)")
    # a file in a results folder is checked against its stage's manifest; one made by hand is served as is
    for path in check_inputs(args.model, args.tokenizer, args.draft_model, required=False):
        log.info("%s: sha256 matches its manifest", path)
    model, meta = load_model(args.model, device)
    draft = load_model(args.draft_model, device)[0] if args.draft_model else None
    if args.tokenizer is not None:
        tokenizer = BPETokenizer.load(args.tokenizer)
    else:
        tokenizer = load_hf_tokenizer(args.model)
        log.info("%s: tokenizer backend %s", args.model, tokenizer.backend)
    # an HF model's embedding may have more rows than its tokenizer has ids (Qwen2's), never fewer
    if tokenizer.n_vocab > model.config.vocab_size or (not exported and tokenizer.n_vocab != model.config.vocab_size):
        raise ValueError(f"{args.tokenizer or Path(args.model) / 'tokenizer.json'}: {tokenizer.n_vocab} ids, but "
                         f"{args.model} has an embedding of {model.config.vocab_size}: not this model's tokenizer")
    # an HF folder's generation_config.json eos ids; else the final.pt's <|endoftext|> (none: stop at max_tokens)
    stop = meta.get("eos_ids") or ([] if meta["eos_id"] is None else [int(meta["eos_id"])])
    engine = Engine(model, max_batch_size=args.max_batch_size, block_size=args.block_size, num_blocks=args.num_blocks,
                    draft_model=draft, num_speculative_tokens=args.num_speculative_tokens,
                    chunked_prefill=args.chunked_prefill, max_model_len=args.max_model_len, stop_token_ids=stop)
    path = Path(args.model).resolve()
    name = args.served_model_name or (path.name if exported else path.parent.name)
    app = create_app(engine, tokenizer, name, max_waiting=args.max_waiting, max_body_bytes=args.max_body_bytes,
                     max_prompt_tokens=args.max_prompt_tokens, api_key=args.api_key or None,
                     protect_health_metrics=args.protect_health_metrics)
    log.info("serving %s (%s, context %d) on http://%s:%d/v1", name, args.model, model.config.seq_len, args.host,
             args.port)
    # uvicorn's own timeout is a backstop: by then the engine has aborted every request;
    # log_config=None: uvicorn's own logging config would close the --log file's handler
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info", log_config=None,
                            timeout_graceful_shutdown=args.timeout_graceful_shutdown + 2)
    GracefulServer(config, app.state.core, args.timeout_graceful_shutdown).run()
    return 0
