"""`gendr-client IN_DIR OUT_DIR`: upscale a folder through a running gendr-serve (docs/client.md).

Resumable by default: outputs are written atomically, so a rerun skips every file already done.
Exit status: 0 all done, 1 some images failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import os
import sys

from gendr_client._core import DEFAULT_URL
from gendr_client.errors import GendrError
from gendr_client.sync import Client


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gendr-client", description="Upscale every image of a folder.")
    p.add_argument("input", help="folder of .png/.jpg/.jpeg/.webp images (searched recursively)")
    p.add_argument("output", help="folder for the results (same relative paths)")
    p.add_argument("--url", default=os.environ.get("GENDR_URL", DEFAULT_URL), help="server (env GENDR_URL)")
    p.add_argument(
        "--api-key", default=os.environ.get("GENDR_API_KEY"), help="bearer key (env GENDR_API_KEY)"
    )
    p.add_argument("-j", "--concurrency", type=int, default=4, help="images in flight (default 4)")
    p.add_argument("--no-resume", action="store_true", help="redo images whose output already exists")
    p.add_argument("--deadline", type=float, default=600.0, help="seconds per image, retries included")
    p.add_argument("--model")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--scale", type=float)
    size.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--fit", choices=["contain", "cover", "fill"], help="with --width and --height")
    p.add_argument("--format", choices=["png", "jpeg", "webp", "avif"])
    p.add_argument("--quality", type=int)
    p.add_argument("--color-fix", choices=["none", "adain", "wavelet"])
    p.add_argument("--strength", type=float, help="0–1: the model's share against the plain resize")
    p.add_argument("--metadata", choices=["strip", "keep", "keep_all"])
    p.add_argument("--jobs", choices=["auto", "always", "never"], default="auto", help="use /v1/jobs")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.concurrency < 1:
        print("gendr-client: --concurrency must be at least 1", file=sys.stderr)
        return 2
    if args.scale is not None and args.height is not None:
        print("gendr-client: give --scale or --width/--height, not both", file=sys.stderr)
        return 2
    options = {
        k: v
        for k, v in {
            "model": args.model,
            "scale": args.scale,
            "width": args.width,
            "height": args.height,
            "format": args.format,
            "quality": args.quality,
            "color_fix": args.color_fix,
            "fit": args.fit,
            "strength": args.strength,
            "metadata": args.metadata,
        }.items()
        if v is not None
    }
    use_job = {"auto": None, "always": True, "never": False}[args.jobs]
    try:
        with Client(args.url, api_key=args.api_key, deadline_s=args.deadline) as c:
            report = c.upscale_folder(
                args.input,
                args.output,
                concurrency=args.concurrency,
                resume=not args.no_resume,
                progress=not args.quiet,
                use_job=use_job,
                **options,
            )
    except (NotADirectoryError, GendrError) as e:
        print(f"gendr-client: {e}", file=sys.stderr)
        return 2
    for src, err in sorted(report.failed.items()):
        print(f"failed: {src}: {err}", file=sys.stderr)
    print(
        f"{len(report.done)} done, {len(report.skipped)} skipped (already done), {len(report.failed)} failed"
    )
    return 0 if report.ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
