"""``python -m dynamo_lite.engines.reference.shared_weights --socket PATH [engine flags]``: the weights holder.

Loads the weights exactly as a torch-engine worker with the same flags would (model, dtype, quantization,
``--extra-engine-args`` YAML, e.g. ``load_format: dummy``), serves them at ``--socket`` and prints ``READY`` once
workers may attach. SIGTERM/SIGINT: stop serving (attached workers exit) and remove the socket and the CPU arena.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

log = logging.getLogger("dynamo_lite.weights_holder")


def build_parser() -> argparse.ArgumentParser:
    from dynamo_lite.engines.base import DTYPES, QUANTIZATIONS

    p = argparse.ArgumentParser(
        prog="python -m dynamo_lite.engines.reference.shared_weights", description=__doc__
    )
    p.add_argument("--socket", required=True, help="Unix socket the workers' --shared-weights names")
    p.add_argument("--model-path", "--model", dest="model_path", default=None)
    p.add_argument("--dtype", default=None, choices=DTYPES)
    p.add_argument("--quantization", default=None, choices=QUANTIZATIONS)
    p.add_argument("--device", default=None)
    p.add_argument("--extra-engine-args", default="", help="the workers' YAML (load_format, dtype, ...)")
    p.add_argument("--log-level", default="INFO")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import torch

    from dynamo_lite.engines.base import EngineSettings
    from dynamo_lite.engines.reference.config import from_settings
    from dynamo_lite.engines.reference.loader import model_config
    from dynamo_lite.engines.reference.shared_weights.holder import WeightsHolder
    from dynamo_lite.engines.reference.startup import (
        build_weights,
        resolve_quantization,
        weights_fingerprint_of,
    )
    from dynamo_lite.model_files import resolve_model

    extra: dict = {}
    if args.extra_engine_args:
        from dynamo_lite.engines.engine_args import load_engine_args_yaml

        extra = load_engine_args_yaml(args.extra_engine_args)
    given = {
        k: v for k in ("model_path", "dtype", "quantization", "device") if (v := getattr(args, k)) is not None
    }
    config = from_settings(EngineSettings(extra=extra, extra_source=args.extra_engine_args, **given))
    files = resolve_model(config.model_path)
    cfg = model_config(files.config)
    resolve_quantization(config, files, cfg)
    device = torch.device(config.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    with torch.inference_mode():
        weights = build_weights(config, files, cfg, getattr(torch, config.dtype), device)
    holder = WeightsHolder(Path(args.socket), weights_fingerprint_of(config, files, cfg), weights, device)
    del weights
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    holder.start()
    print(f"READY weights holder socket={args.socket} bytes={holder.nbytes} device={device}", flush=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        holder.close()
        log.info("weights holder stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
