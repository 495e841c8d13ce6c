"""Write a self-contained folder to push as a Hugging Face Space (or to run on any Python host).

    python -m gradio_demo.space DEST

A Space builds from its repository root: it installs `requirements.txt` (before the repository is copied in,
so the file cannot install this checkout with "." or "-e ."), then runs `app_file` from the README's front
matter. The folder written here therefore holds:

    README.md         front matter: sdk gradio (this Gradio's version), app_file app.py
    app.py            the repository's entry point (imports the code below from the folder itself)
    requirements.txt  gradio_demo/requirements.txt: the engine's dependencies, CPU torch, Gradio
    .gitattributes    safetensors and PNG files through Git LFS / Xet, as the Hub requires for binaries
    wallaroo_nodes/   the engine (with any bundled model, e.g. models/tiny/)
    gradio_demo/      this demo

Then: `cd DEST && git init && git remote add space https://huggingface.co/spaces/<user>/<name> && git add .
&& git commit -m demo && git push space main` (or `hf upload <user>/<name> DEST --repo-type space`).
The Space serves the bundled tiny model; set the Space variable WALLAROO_MODEL to a model folder available
at runtime (e.g. on persistent storage under /data) to serve another.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "*.egg-info")

GITATTRIBUTES = """\
*.safetensors filter=lfs diff=lfs merge=lfs -text
*.png filter=lfs diff=lfs merge=lfs -text
"""


def space_readme(gradio_version: str) -> str:
    return f"""\
---
title: Wallaroo
emoji: 🦘
colorFrom: indigo
colorTo: purple
sdk: gradio
sdk_version: {gradio_version}
app_file: app.py
pinned: false
short_description: One model that understands, generates and edits images
---

# Wallaroo

One autoregressive model (Qwen2.5-VL backbone + LlamaGen VQ) that understands, generates and edits images,
in native PyTorch. This Space runs the demo in `gradio_demo/` on the bundled tiny model (trained on a world of
coloured shapes); set the variable `WALLAROO_MODEL` to a model folder to serve another model.

Written by `python -m gradio_demo.space` from the comfyui-wallaroo repository.
"""


def export_space(dest: Path, *, force: bool = False) -> Path:
    """Write the Space folder at `dest` (which must not exist, or be empty, unless `force`)."""
    import gradio

    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        if not force:
            raise FileExistsError(f"{dest} is not empty; choose a new folder (or pass --force to replace it)")
        shutil.rmtree(dest)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(ROOT / "app.py", dest / "app.py")
    shutil.copy2(ROOT / "gradio_demo" / "requirements.txt", dest / "requirements.txt")
    (dest / "README.md").write_text(space_readme(gradio.__version__), encoding="utf-8")
    (dest / ".gitattributes").write_text(GITATTRIBUTES, encoding="utf-8")
    shutil.copytree(ROOT / "wallaroo_nodes", dest / "wallaroo_nodes", ignore=IGNORE)
    shutil.copytree(ROOT / "gradio_demo", dest / "gradio_demo", ignore=IGNORE)
    return dest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gradio_demo.space",
                                 description="Write a folder to push as a Hugging Face Space.")
    ap.add_argument("dest", type=Path, help="folder to write (new or empty)")
    ap.add_argument("--force", action="store_true", help="replace a non-empty folder")
    args = ap.parse_args(argv)
    try:
        out = export_space(args.dest, force=args.force)
    except FileExistsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"Space folder written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
