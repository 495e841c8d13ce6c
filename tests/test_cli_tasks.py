"""`wallaroo understand / generate / edit / eval`: single runs, JSONL batches (resume, bad lines), PNG text
chunks, one-line errors and exit codes, on random-weights tiny model folders (types, sizes, files; not content)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from helpers import make_model_folder, make_tokenizer_and_config, one_line_error, randomize_, run_cli
from wallaroo_nodes.engine.model import WallarooModel
from wallaroo_nodes.engine.weights import save_model
from wallaroo_nodes.shapes import ATTRIBUTES

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    return str(make_model_folder(tmp_path_factory.mktemp("cli-tasks")))


@pytest.fixture(scope="module")
def shapes_model(tmp_path_factory) -> str:
    """A random model whose size table is the shapes world's canvases, so the evaluation can run on it."""
    tmp = tmp_path_factory.mktemp("cli-shapes")
    tok, cfg = make_tokenizer_and_config(tmp, sides=(32, 48, 64, 80))
    cfg = replace(cfg, name="test-tiny-shapes",
                  protocol=replace(cfg.protocol, sizes=[(64, 64), (48, 80), (80, 48)], default_size=(64, 64)))
    net = randomize_(WallarooModel(cfg), seed=2, scale=0.7).eval()
    return str(save_model(net, tmp / "model", tok))


@pytest.fixture
def picture(tmp_path) -> Path:
    path = tmp_path / "pic.png"
    Image.new("RGB", (30, 44), (20, 120, 220)).save(path)
    return path


# --- single runs --------------------------------------------------------------------------------------

def test_generate_writes_pngs_with_text_chunks(model, tmp_path, capsys):
    out = tmp_path / "cat.png"
    code, stdout, err = run_cli(capsys, "generate", "a red circle", "--out", out, "--model", model, "--seed", "5",
                                "--cfg", "1.5", "--size", "48x32", "--top-k", "7", "--quiet")
    assert code == 0, err
    assert stdout.splitlines() == [str(out)] and err == ""
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == (32, 48) and im.mode == "RGB"
        text = dict(im.text)
    assert (text["prompt"], text["seed"], text["model"], text["task"]) == ("a red circle", "5", "test-tiny", "generate")
    settings = json.loads(text["settings"])
    assert settings["cfg"] == 1.5 and settings["size"] == "48x32" and settings["top_k"] == 7
    assert settings["model_path"] == str(Path(model).resolve()) and settings["temperature"] == 1.0

    code, stdout, err = run_cli(capsys, "generate", "两个", "--out", tmp_path / "many.png", "--model", model,
                                "--n", "3", "--seed", "-1")
    assert code == 0, err
    paths = [tmp_path / f"many_{i}.png" for i in range(3)]
    assert stdout.splitlines() == [str(p) for p in paths]
    metas = [json.loads(Image.open(p).text["wallaroo"]) for p in paths]
    assert [m["index"] for m in metas] == [0, 1, 2] and len({m["seed"] for m in metas}) == 1
    assert 0 <= metas[0]["seed"] < 2 ** 31 and metas[0]["prompt"] == "两个"


def test_edit_and_understand(model, picture, tmp_path, capsys):
    out = tmp_path / "edited.png"
    code, stdout, err = run_cli(capsys, "edit", picture, "make it red", "--out", out, "--model", model, "--seed", "2")
    assert code == 0, err
    with Image.open(out) as im:
        assert im.size == (32, 48)  # 30x44 (w x h) maps to 48x32 (h x w)
        meta = json.loads(im.text["wallaroo"])
    assert im.text["instruction"] == "make it red" and meta["source"] == str(picture) and meta["seed"] == 2

    code, stdout, err = run_cli(capsys, "understand", picture, "What colour is the background?", "--model", model,
                                "--max-new-tokens", "5")
    assert code == 0, err
    assert stdout.endswith("\n") and stdout.count("\n") >= 1 and err == ""


@pytest.mark.parametrize("argv, needles", [
    (["generate", "x", "--size", "512x512"], ["unsupported output size '512x512'", "32x32, 32x48, 48x32"]),
    (["generate", "  "], ["the prompt is empty"]),
    (["generate", "x", "--out", "{tmp}/a.jpg"], ["give a .png file name"]),
    (["edit", "{tmp}/missing.png", "make it blue"], ["missing.png: image file not found"]),
    (["edit", "{tmp}/garbage.png", "make it blue"], ["garbage.png: not a readable image"]),
    (["edit", "{pic}", " "], ["the edit instruction is empty"]),
    (["understand", "{tmp}/missing.png", "what?"], ["missing.png: image file not found"]),
    (["understand", "{pic}", ""], ["the question is empty"]),
    (["generate", "x", "--prompts", "{tmp}/p.jsonl"], ["give either PROMPT or --prompts"]),
    (["generate", "--prompts", "{tmp}/absent.jsonl", "--out", "{tmp}/batch"], ["absent.jsonl: prompts file not found"]),
    (["generate", "--prompts", "{tmp}/p.jsonl"], ["--prompts needs --out DIR"]),
    (["generate", "--prompts", "{tmp}/p.jsonl", "--out", "{tmp}/out.png"], ["out.png: exists and is not a folder"]),
    (["generate", "x", "--model", "{tmp}/no-model"], ["no-model", "not found"]),
    (["edit", "{pic}"], ["give IMAGE and INSTRUCTION"]),
])
def test_bad_input_is_one_line_with_exit_code_2(model, picture, tmp_path, capsys, argv, needles):
    (tmp_path / "garbage.png").write_bytes(b"GIF89a but not really")
    (tmp_path / "p.jsonl").write_text('{"prompt": "x"}\n')
    kept = tmp_path / "out.png"
    kept.write_bytes(b"an earlier result")
    argv = [a.format(tmp=tmp_path, pic=picture) for a in argv]
    if "--out" not in argv and argv[0] != "understand" and "--prompts" not in argv:
        argv += ["--out", str(kept)]
    if "--model" not in argv:
        argv += ["--model", model]
    code, stdout, err = run_cli(capsys, *argv)
    assert code == 2 and stdout == ""
    one_line_error(err, *needles)
    assert kept.read_bytes() == b"an earlier result"  # nothing already written is lost


def test_usage_errors_come_from_argparse(model, capsys):
    code, _, err = run_cli(capsys, "generate", "x", "--out", "a.png", "--size", "big")
    assert code == 2 and "argument --size: expected HxW" in err and "Traceback" not in err
    code, _, err = run_cli(capsys, "generate", "x", "--out", "a.png", "--n", "0")
    assert code == 2 and "argument --n: expected a positive integer" in err
    code, _, err = run_cli(capsys, "eval", "--tasks", "dance")
    assert code == 2 and "unknown task 'dance'" in err
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and all(c in out for c in ("understand", "generate", "edit", "convert", "download", "eval", "info"))


def test_errors_from_a_real_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "sdk")])}
    proc = subprocess.run([sys.executable, "-m", "wallaroo_sdk.cli", "edit", str(tmp_path / "nope.png"), "blue",
                           "--out", str(tmp_path / "o.png")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    one_line_error(proc.stderr, "nope.png: image file not found")


# --- batches ------------------------------------------------------------------------------------------

def _write_lines(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _results(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def test_generate_batch_survives_bad_lines_and_resumes(model, tmp_path, capsys):
    prompts = _write_lines(
        tmp_path / "prompts.jsonl",
        '{"prompt": "a red circle", "id": "red"}',
        '"a bare prompt"',
        '{"prompt": "wrong size", "size": "512x512"}',
        '{"prompt": "broken',
        '',
        '{"prompt": "two of them", "n": 2, "seed": 4, "size": [48, 32]}',
        '{"promt": "typo"}',
        '{"prompt": "again", "id": "red"}',
    )
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "generate", "--prompts", prompts, "--out", out, "--model", model,
                                "--cfg", "1.5")
    assert code == 1
    assert "3 done, 0 skipped (already done), 4 failed, of 7 lines" in stdout
    errors = err.strip().splitlines()
    assert len(errors) == 5 and "Traceback" not in err
    assert errors[0] == (f"wallaroo: error: {prompts}:3: unsupported output size '512x512'; supported sizes "
                         "(height x width): 32x32, 32x48, 48x32")
    assert errors[1].startswith(f"wallaroo: error: {prompts}:4: not valid JSON")
    assert errors[2].startswith(f"wallaroo: error: {prompts}:7: unknown field(s) 'promt'")
    assert errors[3] == f"wallaroo: error: {prompts}:8: id 'red' is used by an earlier line"
    assert errors[4] == f"wallaroo: error: 4 of 7 lines failed; see {out / 'errors.jsonl'}"
    logged = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["line"], e["id"]) for e in logged] == [(3, "00003"), (4, None), (7, None), (8, "red")]

    files = sorted(p.name for p in out.glob("*.png"))
    assert files == ["00002.png", "00006_0.png", "00006_1.png", "red.png"]
    assert Image.open(out / "00006_1.png").size == (32, 48)
    meta = json.loads(Image.open(out / "red.png").text["wallaroo"])
    assert meta["prompt"] == "a red circle" and meta["cfg"] == 1.5 and meta["batch_id"] == "red"
    records = _results(out)
    assert [(r["id"], r["line"], r["files"]) for r in records] == [
        ("red", 1, ["red.png"]), ("00002", 2, ["00002.png"]), ("00006", 6, ["00006_0.png", "00006_1.png"])]
    assert records[2]["request"]["n"] == 2 and records[2]["request"]["size"] == "48x32"
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}

    # Rerun: finished lines are skipped, untouched.
    code, stdout, err = run_cli(capsys, "generate", "--prompts", prompts, "--out", out, "--model", model,
                                "--cfg", "1.5")
    assert code == 1 and "0 done, 3 skipped (already done), 4 failed" in stdout
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")} == stamps

    # Fix the bad lines and delete one output: only those lines run; the error log goes away.
    _write_lines(prompts, '{"prompt": "a red circle", "id": "red"}', '"a bare prompt"',
                 '{"prompt": "wrong size", "size": "32x48"}', '', '',
                 '{"prompt": "two of them", "n": 2, "seed": 4, "size": [48, 32]}')
    (out / "00006_1.png").unlink()
    code, stdout, err = run_cli(capsys, "generate", "--prompts", prompts, "--out", out, "--model", model,
                                "--cfg", "1.5")
    assert code == 0, err
    assert "2 done, 2 skipped (already done), 0 failed, of 4 lines" in stdout
    assert not (out / "errors.jsonl").exists() and (out / "00006_1.png").is_file()
    assert (out / "red.png").stat().st_mtime_ns == stamps["red.png"]

    # Changed settings redo the lines they affect.
    code, stdout, _ = run_cli(capsys, "generate", "--prompts", prompts, "--out", out, "--model", model, "--cfg", "2.5")
    assert code == 0 and "4 done, 0 skipped" in stdout
    assert json.loads(Image.open(out / "red.png").text["settings"])["cfg"] == 2.5


def test_edit_and_understand_batches(model, picture, tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (40, 30)).save(tmp_path / "imgs" / "wide.png")
    (tmp_path / "imgs" / "bad.png").write_bytes(b"nope")
    jobs = _write_lines(
        tmp_path / "edits.jsonl",
        '{"image": "imgs/wide.png", "instruction": "make it red", "id": "wide"}',
        json.dumps({"image": str(picture), "prompt": "add a square", "seed": 9}),
        '{"image": "imgs/bad.png", "instruction": "x"}',
        '{"image": "imgs/wide.png", "instruction": ""}',
        '{"image": "imgs/absent.png", "instruction": "x"}',
        '{"instruction": "no image"}',
    )
    out = tmp_path / "edited"
    code, stdout, err = run_cli(capsys, "edit", "--prompts", jobs, "--out", out, "--model", model)
    assert code == 1 and "2 done, 0 skipped (already done), 4 failed, of 6 lines" in stdout
    lines = err.strip().splitlines()
    assert "bad.png: not a readable image" in lines[0] and "'instruction' is missing or empty" in lines[1]
    assert "absent.png: image file not found" in lines[2] and "'image' is missing" in lines[3]
    assert Image.open(out / "wide.png").size == (48, 32) and Image.open(out / "00002.png").size == (32, 48)
    assert json.loads(Image.open(out / "00002.png").text["wallaroo"])["seed"] == 9

    questions = _write_lines(
        tmp_path / "questions.jsonl",
        '{"image": "imgs/wide.png", "question": "What is there?", "max_new_tokens": 4}',
        '{"question": "Only text?", "max_new_tokens": 3, "id": "text-only"}',
        '{"image": "imgs/wide.png", "question": "x", "max_new_tokens": "many"}',
    )
    out = tmp_path / "answers"
    code, stdout, err = run_cli(capsys, "understand", "--prompts", questions, "--out", out, "--model", model)
    assert code == 1 and "2 done" in stdout
    one_line_error(err.strip().splitlines()[0] + "\n", "questions.jsonl:3", "'max_new_tokens' must be an integer")
    records = {r["id"]: r for r in _results(out)}
    assert set(records) == {"00001", "text-only"}
    for key, rec in records.items():
        assert isinstance(rec["answer"], str) and rec["files"] == [f"{key}.txt"]
        assert (out / f"{key}.txt").read_text() == rec["answer"] + "\n"


# --- eval ---------------------------------------------------------------------------------------------

def test_eval_on_a_shapes_sized_model(shapes_model, tmp_path, capsys):
    report_path, grid = tmp_path / "report.json", tmp_path / "grid.png"
    code, stdout, err = run_cli(capsys, "eval", "--model", shapes_model, "--n", "2", "--json", report_path,
                                "--grid", grid, "--cfg", "1.0", "--top-k", "5", "--temperature", "0.7")
    assert code == 0, err
    lines = stdout.splitlines()
    assert lines[0].startswith("model test-tiny-shapes: 2 cases per task, cfg 1, top_k 5, temperature 0.7, seed 0")
    assert "note:" not in stdout  # its name marks it as a shapes-world model
    table = "\n".join(lines)
    for metric in ("understanding.accuracy", "generation.one_object", "generation.two_objects", "editing.success"):
        assert metric in table
    assert "understanding by language:" in table and "editing by size:" in table
    assert "generation.balance (max gap)" in table
    report = json.loads(report_path.read_text())
    assert report["cases_per_task"] == 2 and set(report["bars"]) == {
        "understanding.accuracy", "generation.one_object", "generation.two_objects", "editing.success",
        "understanding.balance", "generation.balance", "editing.balance"}
    assert 0.0 <= report["generation"]["overall"] <= 1.0
    # Which attribute fails: an image right overall is right on every attribute, so none scores below overall.
    assert "generation by attribute: background" in table
    for section, overall in (("generation", "overall"), ("editing", "success")):
        by_attribute = report[section]["by_attribute"]
        assert set(by_attribute) == set(ATTRIBUTES)
        assert min(by_attribute.values()) >= report[section][overall]
    with Image.open(grid) as im:
        assert im.format == "PNG" and im.width > 0

    code, _, err = run_cli(capsys, "eval", "--model", shapes_model, "--n", "1", "--tasks", "understand",
                           "--require-bars", "--quiet")
    assert code in (0, 1)
    if code == 1:
        one_line_error(err, "quality bars missed: understanding.accuracy")


def test_eval_says_why_a_model_cannot_be_scored(model, capsys):
    code, stdout, err = run_cli(capsys, "eval", "--model", model, "--n", "1")
    assert code == 2 and stdout == ""
    one_line_error(err, "cannot be scored on shapes-world generation or editing", "64x64, 48x80, 80x48",
                   "--tasks understand")
    code, stdout, err = run_cli(capsys, "eval", "--model", model, "--n", "2", "--tasks", "understand")
    assert code == 0, err
    assert "understanding.accuracy" in stdout and "generation" not in stdout
    assert "not look like a shapes-world model" in stdout


@pytest.mark.skipif(not (ROOT / "wallaroo_nodes/models/tiny/config.json").is_file(),
                    reason="the bundled tiny model is not there yet")
def test_commands_default_to_the_bundled_tiny_model(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WALLAROO_MODEL", raising=False)
    code, stdout, err = run_cli(capsys, "generate", "a red circle", "--out", tmp_path / "a.png", "--quiet")
    assert code == 0, err
    assert Image.open(tmp_path / "a.png").text["model"] == json.loads(
        (ROOT / "wallaroo_nodes/models/tiny/config.json").read_text())["name"]
    code, stdout, err = run_cli(capsys, "edit", tmp_path / "a.png", "make it blue", "--out", tmp_path / "b.png")
    assert code == 0, err
    code, stdout, err = run_cli(capsys, "understand", tmp_path / "b.png", "What colour is the shape?")
    assert code == 0 and stdout.strip(), err
    code, stdout, err = run_cli(capsys, "eval", "--n", "2", "--quiet")
    assert code == 0 and "understanding.accuracy" in stdout and "note:" not in stdout, err
