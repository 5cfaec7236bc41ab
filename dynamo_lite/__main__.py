"""``python -m dynamo_lite serve|prepare``

serve    the embedded default: frontend + prefill + decode workers in one process (SmolLM2 on CPU)
prepare  convert the default model once into the local cache (later starts take about a second)
         prepare --tiny-gpt-oss DIR [--metadata-only]: write a small random-weight gpt-oss model folder
         prepare --tiny-llama DIR: write a small random-weight llama folder whose heads divide over 2 and 4 ranks
         prepare --gpt-oss-checkpoint DIR [--shape tiny|20b|120b]: random weights in the published checkpoints'
                 layout (MXFP4 experts, a shard per layer)
"""

from __future__ import annotations

import sys


def prepare(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m dynamo_lite prepare")
    p.add_argument("--tiny-gpt-oss", metavar="DIR", help="write a small random-weight gpt-oss model folder")
    p.add_argument("--tiny-llama", metavar="DIR", help="write a small random-weight llama model folder")
    p.add_argument("--metadata-only", action="store_true", help="with --tiny-gpt-oss: no weights")
    p.add_argument(
        "--gpt-oss-checkpoint", metavar="DIR", help="write random weights in gpt-oss's MXFP4 layout"
    )
    p.add_argument(
        "--shape", choices=["tiny", "20b", "120b"], default="tiny", help="with --gpt-oss-checkpoint"
    )
    args = p.parse_args(argv)
    if args.gpt_oss_checkpoint:
        from dynamo_lite.gpt_oss.tiny import write_model_folder

        folder = write_model_folder(args.gpt_oss_checkpoint, shape=args.shape, mxfp4=True)
        print(f"gpt-oss {args.shape}-shape MXFP4 checkpoint ready in {folder}")
        return 0
    if args.tiny_llama:
        from dynamo_lite.tiny_llama import write_model_folder as write_llama

        print(f"tiny llama model ready in {write_llama(args.tiny_llama)}")
        return 0
    if args.tiny_gpt_oss:
        from dynamo_lite.gpt_oss.tiny import write_model_folder

        folder = write_model_folder(args.tiny_gpt_oss, metadata_only=args.metadata_only)
        print(f"tiny gpt-oss model ready in {folder}")
        return 0
    from dynamo_lite.model_files import resolve_model

    files = resolve_model()
    try:
        from dynamo_lite.engines.reference.loader import ensure_weights
    except ImportError:
        print(f"tokenizer and config ready in {files.folder} (install torch for the weights)")
        return 0
    ensure_weights(files)
    print(f"model ready in {files.folder}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and not argv[0].startswith("-") else "serve"
    if command == "serve":
        from dynamo_lite.serve import main as serve

        return serve(argv)
    if command == "prepare":
        return prepare(argv)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
