"""The Python SDK: `Wallaroo.load/understand/understand_stream/generate/edit`, image inputs, progress, cancel
tokens and PNG metadata, on a random-weights tiny model folder (so types, sizes and behaviour, not content)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import make_model_folder
from wallaroo_nodes.engine import cache
from wallaroo_nodes.engine.images import ImageInputError, UnsupportedSizeError
from wallaroo_sdk import CancelToken, Cancelled, Progress, Wallaroo, read_png_metadata, save_png, to_pil

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("sdk"))


@pytest.fixture(scope="module")
def wal(folder) -> Wallaroo:
    return Wallaroo.load(folder, device="cpu")


@pytest.fixture
def picture(tmp_path) -> Path:
    path = tmp_path / "in.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(path)
    return path


def test_load_uses_the_shared_cache(folder, wal):
    again = Wallaroo.load(str(folder), device="cpu", dtype="fp32")
    assert again.pipeline is wal.pipeline  # the nodes, the SDK and the demo share one loaded copy
    assert (wal.name, wal.device, wal.dtype, wal.can_edit) == ("test-tiny", "cpu", "float32", True)
    assert wal.sizes == [(32, 32), (32, 48), (48, 32)] and wal.default_size == (32, 32)
    assert wal.path == folder.resolve() and "test-tiny" in repr(wal)


def test_load_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="not found"):
        Wallaroo.load(tmp_path / "nowhere")
    monkeypatch.setattr(cache, "BUNDLED_MODELS", tmp_path / "none")
    with pytest.raises(ValueError, match="'tiny' not found"):
        Wallaroo.load("tiny")
    with pytest.raises(ValueError, match="unknown dtype"):
        Wallaroo.load(make_model_folder(tmp_path / "m"), dtype="int3")


def test_generate(wal):
    images = wal.generate("a red circle on the left", size="32x48", n=2, seed=7)
    assert len(images) == 2 and all(isinstance(im, Image.Image) and im.mode == "RGB" for im in images)
    assert all(im.size == (48, 32) for im in images)  # PIL sizes are (width, height)
    meta = images[1].info["wallaroo"]
    assert meta == {"task": "generate", "prompt": "a red circle on the left", "model": "test-tiny",
                    "model_path": str(wal.path), "seed": 7, "n": 2, "index": 1, "size": "32x48", "cfg": 2.0,
                    "temperature": 1.0, "top_k": 0, "top_p": 1.0, "version": meta["version"]}
    # Same seed, same images; the knobs given are recorded instead of the model's defaults.
    again = wal.generate("a red circle on the left", size=(32, 48), n=2, seed=7)
    assert [im.tobytes() for im in again] == [im.tobytes() for im in images]
    one = wal.generate("红色的圆形", cfg=1.0, temperature=0.5, top_k=5, top_p=0.9, seed=None)[0]
    assert one.size == (32, 32)
    m = one.info["wallaroo"]
    assert (m["cfg"], m["temperature"], m["top_k"], m["top_p"], m["n"]) == (1.0, 0.5, 5, 0.9, 1)
    assert isinstance(m["seed"], int) and 0 <= m["seed"] < 2 ** 31  # a random seed, recorded


def test_generate_bad_input(wal):
    with pytest.raises(UnsupportedSizeError, match="32x32, 32x48, 48x32"):
        wal.generate("x", size="512x512")
    with pytest.raises(ValueError, match="n .images per prompt."):
        wal.generate("x", n=0)
    with pytest.raises(ValueError, match="seed"):
        wal.generate("x", seed="1")
    with pytest.raises(ValueError, match="prompt must be text"):
        wal.generate(None)


def test_progress_and_previews(wal):
    seen: list[Progress] = []
    images = wal.generate("x", size="48x32", progress=seen.append)
    assert [(p.task, p.done, p.total) for p in seen] == [("generate", 1, 3), ("generate", 2, 3), ("generate", 3, 3)]
    preview = seen[0].preview()
    assert len(preview) == 1 and preview[0].size == images[0].size
    assert seen[0].fraction == pytest.approx(1 / 3)


def test_cancel_token(wal):
    token = CancelToken()

    def cancel_after_first_row(p: Progress) -> None:
        token.cancel()

    with pytest.raises(Cancelled, match="after 1 of 2 rows"):
        wal.generate("x", progress=cancel_after_first_row, cancel=token)
    assert token.cancelled
    with pytest.raises(Cancelled, match="before starting"):
        wal.edit(Image.new("RGB", (32, 32)), "make it blue", cancel=token)
    token.reset()
    assert not token.cancelled and len(wal.generate("x", cancel=token)) == 1
    event = threading.Event()
    event.set()
    with pytest.raises(Cancelled):
        wal.generate("x", cancel=event)
    with pytest.raises(Cancelled):
        "".join(wal.understand_stream(None, "hello?", max_new_tokens=8, cancel=lambda: True))


def test_edit_inputs(wal, picture):
    source = Image.open(picture)
    array = np.asarray(source)
    for image in (source, array, array.astype(np.float32) / 255, str(picture), picture):
        out = wal.edit(image, "make it blue", seed=3)
        assert len(out) == 1 and out[0].size == (48, 32)  # 40x30 is closest to 32x48 (h x w)
    meta = out[0].info["wallaroo"]
    assert meta["task"] == "edit" and meta["instruction"] == "make it blue" and meta["source"] == str(picture)
    tall = wal.edit(Image.new("L", (20, 31)), "把它变成蓝色", n=2)
    assert [im.size for im in tall] == [(32, 48), (32, 48)] and tall[1].info["wallaroo"]["index"] == 1


def test_edit_bad_input(wal, tmp_path):
    with pytest.raises(ValueError, match="instruction is empty"):
        wal.edit(Image.new("RGB", (32, 32)), "  ")
    with pytest.raises(ImageInputError, match="nope.png: image file not found"):
        wal.edit(tmp_path / "nope.png", "make it blue")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageInputError, match="bad.png: not a readable image"):
        wal.edit(bad, "make it blue")
    truncated = tmp_path / "truncated.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:60])
    with pytest.raises(ImageInputError, match="truncated.png"):
        wal.edit(truncated, "make it blue")


def test_understand_and_stream(wal, picture):
    answer = wal.understand(picture, "What shape is in the picture?", max_new_tokens=6)
    assert isinstance(answer, str)
    pieces = list(wal.understand_stream(picture, "What shape is in the picture?", max_new_tokens=6))
    assert all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces).strip() == answer
    seen: list[Progress] = []
    wal.understand(None, "What shape?", max_new_tokens=4, progress=seen.append)  # text only
    assert all(p.task == "understand" and p.total == 4 and 1 <= p.done <= 4 for p in seen)
    assert [p.done for p in seen] == list(range(1, len(seen) + 1))


def test_understand_checks_inputs_before_streaming(wal, tmp_path):
    with pytest.raises(ValueError, match="question is empty"):
        wal.understand_stream(None, " ")  # raised by the call itself, not by the first next()
    with pytest.raises(ImageInputError, match="missing.png"):
        wal.understand_stream(tmp_path / "missing.png", "what?")
    with pytest.raises(ValueError, match="max_new_tokens"):
        wal.understand(None, "what?", max_new_tokens=0)


@pytest.mark.parametrize("array, mode, size", [
    (np.zeros((5, 7), np.uint8), "L", (7, 5)),
    (np.zeros((5, 7, 1), np.uint8), "L", (7, 5)),
    (np.zeros((5, 7, 4), np.uint8), "RGBA", (7, 5)),
    (np.zeros((3, 5, 7), np.float32), "RGB", (7, 5)),        # channels first
    (np.zeros((1, 5, 7, 3), np.float64), "RGB", (7, 5)),     # a batch of one (ComfyUI IMAGE layout)
    (np.ones((5, 7), bool), "L", (7, 5)),
    (np.full((5, 7), 65535, np.uint16), "L", (7, 5)),
    (np.full((5, 7, 3), 200.0), "RGB", (7, 5)),              # floats already in 0..255
])
def test_to_pil_arrays(array, mode, size):
    im = to_pil(array)
    assert im.mode == mode and im.size == size
    if array.dtype == bool or array.dtype == np.uint16:
        assert np.asarray(im).max() == 255
    if array.dtype == np.float64 and array.max() == 200:
        assert np.asarray(im).max() == 200


def test_to_pil_rejects(tmp_path):
    with pytest.raises(ImageInputError, match="shape"):
        to_pil(np.zeros((2, 3, 4, 5)))
    with pytest.raises(ImageInputError, match="expected an image"):
        to_pil({"not": "an image"})
    with pytest.raises(ImageInputError, match="is a folder"):
        to_pil(tmp_path)


def test_png_metadata_round_trip(wal, tmp_path):
    image = wal.generate("一只红色的圆形 \"quoted\"", seed=11)[0]
    path = save_png(image, tmp_path / "sub" / "out.png")
    with Image.open(path) as im:
        text = im.text
        assert im.size == image.size and np.array_equal(np.asarray(im), np.asarray(image))
    assert text["prompt"] == "一只红色的圆形 \"quoted\"" and text["seed"] == "11" and text["model"] == "test-tiny"
    settings = json.loads(text["settings"])
    assert settings["cfg"] == 2.0 and settings["size"] == "32x32" and text["Software"].startswith("wallaroo ")
    assert read_png_metadata(path) == image.info["wallaroo"]
    Wallaroo.save(image, tmp_path / "b.png", note="hello")
    assert read_png_metadata(tmp_path / "b.png")["note"] == "hello"
    assert not list(tmp_path.rglob("*.part"))
    Image.new("RGB", (2, 2)).save(tmp_path / "plain.png")
    assert read_png_metadata(tmp_path / "plain.png") == {}


def test_import_is_light():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "sdk")])}
    probe = ("import sys, wallaroo_sdk; from wallaroo_sdk import CancelToken, ComfyClient, Wallaroo; "
             "from wallaroo_sdk import download; assert 'torch' not in sys.modules, 'imported torch'")
    proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


BUNDLED = ROOT / "wallaroo_nodes" / "models" / "tiny"


@pytest.mark.skipif(not (BUNDLED / "config.json").is_file(), reason="the bundled tiny model is not there yet")
def test_bundled_tiny_model():
    wal = Wallaroo.load("tiny", device="cpu")
    assert wal.path == BUNDLED.resolve()
    image = wal.generate("a red circle on the left", seed=0)[0]
    assert image.size == (wal.default_size[1], wal.default_size[0])
    assert isinstance(wal.understand(image, "What shape is in the picture?"), str)
    edited = wal.edit(image, "make it blue", seed=0)[0]
    assert (edited.height, edited.width) in wal.sizes
