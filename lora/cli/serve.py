"""Serve every adapter in a folder over HTTP, many adapters on one base, batched together.

    lora-serve --adapters-dir adapters/                  # http://127.0.0.1:8000
    python serve.py --adapters-dir adapters/ --port 8080
    curl -s localhost:8000/v1/classify -d '{"adapter": "news", "texts": ["Stocks rally"]}'

Each sub-folder of --adapters-dir that holds an adapter (adapter.safetensors +
adapter_config.json, as train.py writes them) is served under the sub-folder's name, all on
one base model; POST /v1/adapters/reload picks up new sub-folders and drops removed ones.
Set LORA_API_KEY in the environment to require "Authorization: Bearer KEY" on every route but
/healthz. Ctrl-C (or SIGTERM) stops taking connections, answers the requests in flight, exits.
"""

import argparse
import os
import sys
import warnings

from lora.cli import UsageError, run_command

DEFAULTS_NOTE = "(default: %(default)s)"


def parse_args(argv=None) -> argparse.Namespace:
    from lora.serve.batching import DEFAULT_MAX_ROWS, DEFAULT_MAX_WAIT_S
    from lora.serve.http import ServerLimits

    limits = ServerLimits()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters-dir", required=True, help="folder whose sub-folders are adapters")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind; 0.0.0.0 serves other machines too " + DEFAULTS_NOTE
    )
    parser.add_argument("--port", type=int, default=8000, help=DEFAULTS_NOTE)
    parser.add_argument(
        "--base",
        help="the base model every adapter must be trained on (default: the base of the first adapter, by name)",
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help=DEFAULTS_NOTE)
    parser.add_argument(
        "--max-batch",
        type=int,
        default=DEFAULT_MAX_ROWS,
        help="texts per mixed batch; 1 turns batching across requests off " + DEFAULTS_NOTE,
    )
    parser.add_argument(
        "--batch-wait-ms",
        type=float,
        default=DEFAULT_MAX_WAIT_S * 1000,
        help="how long a request may wait for others to batch with " + DEFAULTS_NOTE,
    )
    parser.add_argument(
        "--max-queued-texts",
        type=int,
        default=limits.max_queued_texts,
        help="texts admitted and not yet answered; a request beyond it gets 429 with Retry-After " + DEFAULTS_NOTE,
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=limits.request_timeout_s,
        help="seconds a request may take; past it 504 and its texts leave the queue " + DEFAULTS_NOTE,
    )
    parser.add_argument("--max-texts", type=int, default=limits.max_texts, help="texts per request " + DEFAULTS_NOTE)
    parser.add_argument(
        "--max-body-bytes", type=int, default=limits.max_body_bytes, help="request body size limit " + DEFAULTS_NOTE
    )
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    return args


def main(argv=None) -> None:
    try:
        import fastapi  # noqa: F401  (the serve extra)
        import uvicorn
    except ImportError as error:
        raise UsageError(f"lora-serve needs {error.name}: pip install -e '.[serve]'") from None
    from lora.serve.adapters import AdapterDirectory
    from lora.serve.http import API_KEY_VARIABLE, ServerLimits, create_app

    args = parse_args(argv)
    limits = ServerLimits(
        max_texts=args.max_texts,
        max_body_bytes=args.max_body_bytes,
        max_batch_rows=args.max_batch,
        max_wait_s=args.batch_wait_ms / 1000,
        max_queued_texts=args.max_queued_texts,
        request_timeout_s=args.request_timeout,
        api_key=os.environ.get(API_KEY_VARIABLE) or None,
    )
    check_limits(limits)
    directory = AdapterDirectory(args.adapters_dir, args.base, args.device)
    for name, reason in directory.refused.items():
        print(f"refused {name}: {reason}", file=sys.stderr)
    print(
        f"serving {len(directory.adapter_set.adapters)} adapter(s) on base {directory.adapter_set.base_model} "
        f"at http://{args.host}:{args.port}{' (API key required)' if limits.api_key else ''}",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(
        create_app(directory, limits), host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=30
    )


def check_limits(limits) -> None:
    """Raise ``UsageError`` for limits that cannot work."""
    flags = {"max_texts": "--max-texts", "max_body_bytes": "--max-body-bytes", "max_batch_rows": "--max-batch"}
    for name, flag in flags.items():
        if getattr(limits, name) < 1:
            raise UsageError(f"{flag} must be at least 1, got {getattr(limits, name)}")
    if limits.max_wait_s < 0:
        raise UsageError(f"--batch-wait-ms must be >= 0, got {limits.max_wait_s * 1000:g}")
    if limits.max_queued_texts < limits.max_texts:
        raise UsageError(
            f"--max-queued-texts ({limits.max_queued_texts}) must be at least --max-texts "
            f"({limits.max_texts}): a full request could never be admitted"
        )
    if not limits.request_timeout_s > 0:
        raise UsageError(f"--request-timeout must be > 0 seconds, got {limits.request_timeout_s:g}")


def run() -> None:
    """The ``lora-serve`` console command and ``python serve.py``."""
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"  # one line, like errors
    run_command(main)


if __name__ == "__main__":
    run()
