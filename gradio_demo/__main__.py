"""`python -m gradio_demo`: launch the demo locally (or on a host, with --host 0.0.0.0)."""
from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from .app import MODEL_ENV, Limits

    d = Limits()
    ap = argparse.ArgumentParser(prog="python -m gradio_demo", description=__doc__)
    ap.add_argument("--model", default=None,
                    help=f"model folder or bundled model name (default: ${MODEL_ENV}, else 'tiny')")
    ap.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                    help="address to listen on (default: $GRADIO_SERVER_NAME, else 127.0.0.1; 0.0.0.0 to serve "
                         "other machines)")
    ap.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
                    help="port (default: $GRADIO_SERVER_PORT, else 7860)")
    ap.add_argument("--device", default="auto", help="cuda, cpu, ... (default: auto)")
    ap.add_argument("--dtype", default="auto", help="bfloat16, float16, float32 (default: auto)")
    ap.add_argument("--attention", default="auto", help="attention backend (default: auto)")
    ap.add_argument("--queue-size", type=int, default=d.queue_size, help="most requests waiting in line")
    ap.add_argument("--max-images", type=int, default=d.max_images, help="most images per generation")
    ap.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels, help="largest input image")
    ap.add_argument("--max-file-mb", type=float, default=d.max_file_bytes / 2 ** 20,
                    help="largest input image file, in MB")
    ap.add_argument("--max-prompt-chars", type=int, default=d.max_prompt_chars, help="longest prompt")
    ap.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="longest answer, in tokens")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from wallaroo_nodes.engine.weights import WeightsError

    from .app import Limits, build_demo, launch_options

    try:
        limits = Limits(max_image_pixels=args.max_image_pixels, max_file_bytes=int(args.max_file_mb * 2 ** 20),
                        max_prompt_chars=args.max_prompt_chars, max_images=args.max_images,
                        max_new_tokens=args.max_new_tokens, queue_size=args.queue_size)
        demo = build_demo(args.model, limits=limits, dtype=args.dtype, device=args.device,
                          attention=args.attention)
    except (WeightsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    demo.launch(server_name=args.host, server_port=args.port, **launch_options(limits))
    return 0


if __name__ == "__main__":
    sys.exit(main())
