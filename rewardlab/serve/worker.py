"""A device worker of ``rewardlab serve --devices``: loads the models on one device, then scores the
batches the server sends as frames on stdin and answers on stdout (see :mod:`rewardlab.serve.protocol`).

Stray prints from libraries go to stderr: the protocol keeps a private copy of the stdout descriptor.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rewardlab.serve.worker")
    parser.add_argument("--device", required=True)
    parser.add_argument("--models", required=True, help="JSON list of model names / checkpoint paths")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU workers)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"worker[{args.device}] %(levelname)s %(name)s: %(message)s")
    protocol_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # anything printed from now on lands on stderr
    sys.stdout = sys.stderr
    protocol_in = sys.stdin.buffer

    from .backend import load_models, model_info, score_batch
    from .protocol import read_frame, unpack_items, write_frame

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    device = f"cuda:{args.device}" if args.device.isdigit() else args.device
    scorers = load_models(json.loads(args.models), device, args.dtype)
    write_frame(protocol_out, {"models": [model_info(label, s) for label, s in scorers.items()]})
    while True:
        try:
            request, payload = read_frame(protocol_in)
        except EOFError:
            return 0
        try:
            result = score_batch(scorers[request["model"]], request["prompts"], unpack_items(request["items"], payload))
            reply = {"scores": [s if math.isfinite(s) else None for s in result.scores],
                     "errors": {str(k): v for k, v in result.errors.items()}}
        except Exception as exc:  # a bug or an out-of-memory: report it, keep serving
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        write_frame(protocol_out, reply)


if __name__ == "__main__":
    sys.exit(main())
