"""The tiny-model recipe: each stage's training steps lower its loss, and the whole recipe runs end to end."""
from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from wallaroo_nodes.engine import images
from wallaroo_nodes.engine.model import WallarooModel
from wallaroo_nodes.engine.text import TextTokenizer
from wallaroo_nodes.engine.vq import VQModel
from wallaroo_nodes.engine.weights import load_model
from wallaroo_nodes.train.data import READOUT_FIELDS, collate, make_example
from wallaroo_nodes.train.recipe import (Stage, TrainingModel, build_or_resume, copy_generation_into_edit,
                                         default_stages, main,
                                         object_start_cells, region_start_cells,
                                         resolve_run_options, run_stage, step_context, step_examples, tiny_model_config,
                                         train_vq, trainable_parameters)
from wallaroo_nodes.train.tokenizer import train_tokenizer
from wallaroo_nodes.engine.config import ProtocolConfig
from wallaroo_nodes.shapes import CANVAS_SIZES, analyse, random_scene, render


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    table = train_tokenizer(tmp / "tokenizer.json", ProtocolConfig(sizes=[tuple(c) for c in CANVAS_SIZES]),
                            n_lines=3000)
    tok = TextTokenizer(tmp / "tokenizer.json", table)
    vocab = (tok.tokenizer.get_vocab_size() + 63) // 64 * 64
    return tok, tiny_model_config(table, vocab)


def test_tokenizer_carries_the_official_special_tokens_and_both_languages(setup):
    tok, cfg = setup
    for name in ("<|im_start|>", "<|vision_start|>", "<|generate_start|>", "<|end_of_line>|", "<indicator:64>"):
        assert tok.encode(name) == [cfg.tokens[name]]
    for text in ("A large red circle on the left.", "白色背景上，左边有一个红色的大圆形。"):
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("index", range(5))
def test_each_stage_lowers_its_loss(setup, index):
    tok, cfg = setup
    stage = default_stages()[index]
    torch.manual_seed(index)
    model = WallarooModel(cfg)
    params = trainable_parameters(model, stage.trainable)
    tower_before = {k: v.clone() for k, v in model.visual.state_dict().items()}
    trainer = TrainingModel(model).train()
    opt = torch.optim.AdamW(params, lr=2e-3)
    rng = random.Random(index)
    for task in stage.tasks:
        canvas = stage.canvases[-1]
        batch = collate([make_example(task, rng, tok, cfg, [canvas], uncond_prob=0.0) for _ in range(4)], cfg)
        losses = []
        for _ in range(6):
            loss, parts = trainer(batch)
            assert parts and all(v > 0 for v in parts.values())
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < 0.8 * losses[0], f"stage {stage.name}, task {task}: loss {losses}"
    if stage.trainable == "align":
        # Alignment trains only the new generation parts and the token embeddings; the backbone is frozen.
        assert not any(p.requires_grad for p in model.model.layers.parameters())
        assert not any(p.requires_grad for p in model.visual.parameters())
        assert all(p.requires_grad for p in model.gen_image_head.parameters())
    tower_moved = any(not torch.equal(v, model.visual.state_dict()[k]) for k, v in tower_before.items())
    # Stage 0 trains a fresh LLM to read the pretrained tower, which stays as it was (alignment leaves it too);
    # stages 2-4 fine-tune it along with everything else.
    assert tower_moved == (index >= 2), f"stage {stage.name}: tower moved {tower_moved}"


@pytest.mark.parametrize("task", ["generate", "edit", "understand"])
def test_bf16_training_step_computes_the_fp32_loss(setup, task):
    # The stages autocast to bf16 where the CPU has native bf16; the frozen VQ must still pick the same target
    # codes (in bf16 its nearest-code distances tie and flip, and the image loss went from 0.2 to 30).
    tok, cfg = setup
    torch.manual_seed(3)
    model = WallarooModel(cfg)
    trainer = TrainingModel(model).train()
    batch = collate([make_example(task, random.Random(i), tok, cfg, [(64, 64)], uncond_prob=0.0) for i in range(4)],
                    cfg)
    with step_context(torch.device("cpu"), torch.float32):
        full, full_parts = trainer(batch)
    with step_context(torch.device("cpu"), torch.bfloat16):
        half, half_parts = trainer(batch)
    assert half_parts.keys() == full_parts.keys()
    assert half.item() == pytest.approx(full.item(), rel=0.03), (half_parts, full_parts)
    half.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_editing_starts_from_generation_weights_once_and_a_resume_keeps_its_own(setup, tmp_path):
    tok, cfg = setup
    torch.manual_seed(5)
    model = WallarooModel(cfg)
    assert not torch.equal(model.edit_image_head[0].weight, model.gen_image_head[0].weight)
    copy_generation_into_edit(model)
    for edit, gen in ((model.edit_image_head, model.gen_image_head), (model.edit_input_adapter, model.gen_input_adapter),
                      (model.pixel_adapter, model.gen_input_adapter)):
        assert all(torch.equal(a, b) for a, b in zip(edit.state_dict().values(), gen.state_dict().values()))
    # A stage resumed from its checkpoint must keep the edit weights it trained, not copy generation's again.
    stage = Stage("4-unified-finetune", 3, 5e-4, {"edit": 1.0}, [(64, 64)], batch_size=2, edit_from_generation=True)
    with torch.no_grad():
        model.edit_image_head[0].weight.add_(1.0)
    trained = model.edit_image_head[0].weight.clone()
    opt = torch.optim.AdamW(trainable_parameters(model, "all"), lr=1e-3)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 3}, tmp_path / "stage4.pt")
    run_stage(4, stage, model, tok, tmp_path, 0, torch.device("cpu"), 0, 1, log=lambda line: None)
    assert torch.equal(model.edit_image_head[0].weight, trained)
    assert (tmp_path / "stage4.done").exists()


def test_a_stage_seed_offset_draws_the_next_seeds_data(setup, tmp_path):
    # The bundle's stages 2-4 were trained with --seed 1 after stages 0-1 with --seed 0; Stage.seed_offset lets
    # one command (--seed 0) draw exactly that data, and a stage without it draws other data.
    tok, cfg = setup

    def trained(seed: int, offset: int, folder: str) -> dict[str, torch.Tensor]:
        torch.manual_seed(11)
        model = WallarooModel(cfg)
        stage = Stage("2-joint-pretrain", 2, 1e-3, {"generate": 0.5, "understand": 0.5}, [(64, 64)], batch_size=2,
                      seed_offset=offset)
        (tmp_path / folder).mkdir()
        run_stage(2, stage, model, tok, tmp_path / folder, seed, torch.device("cpu"), 0, 1, log=lambda line: None,
                  precision=torch.float32)
        return model.state_dict()

    offset, next_seed, plain = trained(0, 1, "offset"), trained(1, 0, "next"), trained(0, 0, "plain")
    assert all(torch.equal(offset[k], next_seed[k]) for k in offset)
    assert any(not torch.equal(offset[k], plain[k]) for k in offset)
    assert [s.seed_offset for s in default_stages()] == [0, 0, 1, 1, 1]


def test_a_stage_draws_the_same_probes_whatever_the_process_drew_before(setup, tmp_path):
    # A stage resumed in a fresh process must repeat the one a whole run reaches after its earlier stages: its new
    # probes once took torch's global generator as those stages left it (seventy-fifth run, docs/tiny_model_runs.md).
    tok, cfg = setup

    def trained(earlier_draws: int, folder: str) -> dict[str, torch.Tensor]:
        torch.manual_seed(11)
        model = WallarooModel(cfg)
        torch.randn(earlier_draws)  # what a process ran before this stage
        stage = Stage("0-understanding-pretrain", 1, 1e-3, {"understand": 1.0}, [(64, 64)], trainable="reader",
                      batch_size=2, ground_weight=1.0, ground_readout_weight=1.0)
        (tmp_path / folder).mkdir()
        run_stage(0, stage, model, tok, tmp_path / folder, 0, torch.device("cpu"), 0, 1, log=lambda line: None,
                  precision=torch.float32)
        saved = torch.load(tmp_path / folder / "stage0.pt", weights_only=True)
        return {**saved["model"], **{f"readout.{k}": v for k, v in saved["readout"].items()}}

    fresh, after = trained(0, "fresh"), trained(1000, "after")
    assert any(k.startswith("readout.") for k in fresh)
    assert all(torch.equal(fresh[k], after[k]) for k in fresh)


def test_multi_turn_understanding_trains_on_every_answer_and_nothing_else(setup):
    tok, cfg = setup
    single = make_example("understand", random.Random(7), tok, cfg, [(64, 64)], qa_turns=1)
    multi = make_example("understand", random.Random(7), tok, cfg, [(64, 64)], qa_turns=3)
    # The first turn is exactly what inference sees; later turns continue the same chat.
    assert multi.prompt.ids == single.prompt.ids
    assert multi.answer_ids[:len(single.answer_ids)] == single.answer_ids
    batch = collate([multi], cfg)
    im_end = cfg.token_id("<|im_end|>")
    targets = batch.text_targets.tolist()
    assert targets.count(im_end) == 3  # three answers, each closed by <|im_end|>
    text = tok.decode(batch.ids[0].tolist(), skip_special=False)
    assert text.count("<|im_start|>assistant\n") == 3 and text.count("<|vision_start|>") == 1
    # Questions and chat markers of the follow-up turns are context, never targets.
    answers = tok.decode(targets)
    for question_word in ("user", "assistant", "What", "Which", "How", "Describe", "Count", "什么", "几"):
        assert question_word not in answers
    # Every target is predicted from the position just before it.
    for index, token in zip(batch.text_target_index.tolist(), targets):
        assert batch.ids[0, index + 1] == token
    assert batch.position_ids[0, 0, -1] == batch.position_ids[0, 0, len(multi.prompt.ids)] + len(multi.answer_ids) - 1


def _answers(example, tok, cfg) -> list[str]:
    """Each turn's decoded answer of an understanding example."""
    targets = collate([example], cfg).text_targets.tolist()
    im_end = cfg.token_id("<|im_end|>")
    out, turn = [], []
    for token in targets:
        if token == im_end:
            out.append(tok.decode(turn).strip())
            turn = []
        else:
            turn.append(token)
    return out


def test_question_kind_weights_steer_which_questions_understanding_asks(setup):
    tok, cfg = setup
    places = {"left", "centre", "right", "左边", "中间", "右边"}

    def is_place(answer: str) -> bool:
        return all(part.strip() in places for part in answer.replace("和", " and ").split(" and "))

    weighted = [a for seed in range(12) for a in _answers(make_example(
        "understand", random.Random(seed), tok, cfg, [(64, 64)], qa_turns=3, qa_kind_weights={"position": 1e6}),
        tok, cfg)]
    uniform = [a for seed in range(12) for a in _answers(make_example(
        "understand", random.Random(seed), tok, cfg, [(64, 64)], qa_turns=3), tok, cfg)]
    assert len(weighted) == 36 and all(is_place(a) for a in weighted), weighted
    assert sum(is_place(a) for a in uniform) < 18, uniform  # a seventh of uniform questions are positions
    with pytest.raises(ValueError, match="qa_kind_weights names unknown kinds.*'where'"):
        make_example("understand", random.Random(0), tok, cfg, [(64, 64)], qa_kind_weights={"where": 2.0})


def test_edit_kind_weights_steer_which_edits_are_drawn(setup):
    tok, cfg = setup

    def is_recolour(example) -> bool:
        """Read back from the rendered images: one object's colour changed, nothing else."""
        before, after = analyse(example.source_image), analyse(example.target_image)
        if before.background != after.background or len(before.objects) != len(after.objects):
            return False
        changed = [(a, b) for a, b in zip(before.objects, after.objects) if a != b]
        return len(changed) == 1 and changed[0][0].colour != changed[0][1].colour and \
            (changed[0][0].shape, changed[0][0].size, changed[0][0].position) == \
            (changed[0][1].shape, changed[0][1].size, changed[0][1].position)

    def draw(**kw) -> list:
        return [make_example("edit", random.Random(seed), tok, cfg, [(64, 64)], uncond_prob=0.0, **kw)
                for seed in range(20)]

    assert all(is_recolour(e) for e in draw(edit_kind_weights={"recolour": 1e6}))
    assert sum(is_recolour(e) for e in draw()) < 10  # a fifth of uniform edits recolour
    with pytest.raises(ValueError, match="edit_kind_weights names unknown kinds.*'recolor'"):
        make_example("edit", random.Random(0), tok, cfg, [(64, 64)], edit_kind_weights={"recolor": 2.0})


def test_stage_edit_objects_and_uncond_share_shape_its_edit_steps_and_leave_other_tasks_alone(setup):
    """`Stage.edit_objects` fixes how many objects edit sources hold and `edit_uncond_prob` how many edits are
    dropped for CFG (target = source); neither changes what the stage's other tasks draw."""
    import dataclasses
    tok, cfg = setup
    base = dataclasses.replace(default_stages()[4], batch_size=12)
    steps = {task: [s for s in range(60) if step_examples(base, 4, s, 0, 0, 1, tok, cfg)[0] == task][:2]
             for task in ("edit", "generate", "understand")}

    def edits(stage) -> list:
        return [e for s in steps["edit"] for e in step_examples(stage, 4, s, 0, 0, stage.batch_size, tok, cfg)[1]]

    def dropped(example) -> bool:
        return example.target_image.tobytes() == example.source_image.tobytes()

    two = edits(dataclasses.replace(base, edit_objects=(2,), edit_uncond_prob=0.0))
    assert [len(analyse(e.source_image).objects) for e in two] == [2] * len(two)
    assert not any(dropped(e) for e in two)
    assert {len(analyse(e.source_image).objects) for e in edits(base)} == {1, 2}
    assert all(dropped(e) for e in edits(dataclasses.replace(base, edit_uncond_prob=1.0)))
    changed = dataclasses.replace(base, edit_objects=(2,), edit_uncond_prob=0.0)
    for task in ("generate", "understand"):
        for s in steps[task]:
            before = step_examples(base, 4, s, 0, 0, 4, tok, cfg)
            after = step_examples(changed, 4, s, 0, 0, 4, tok, cfg)
            assert before[0] == after[0] == task
            assert [e.prompt.ids for e in before[1]] == [e.prompt.ids for e in after[1]]
            assert [e.answer_ids for e in before[1]] == [e.answer_ids for e in after[1]]


@pytest.mark.parametrize("threads", [1, 2], ids=["vq-before-stage0", "vq-in-side-process"])
def test_recipe_runs_end_to_end_resumes_and_exports(tmp_path, threads, capsys):
    out, export = tmp_path / "run", tmp_path / "model"
    args = ["--out", str(out), "--scale", "0.0001", "--vq-steps", "2", "--vq-warm-steps", "1", "--vq-polish-steps", "1",
            "--batch-size", "2", "--vq-batch-size", "2", "--threads", str(threads), "--export", str(export),
            "--vision-steps", "2"]
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(1)  # the suite's setting (conftest); main() changed it
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert {e.get("stage") for e in log} >= {"vq", "vision", "0-understanding-pretrain", "4-unified-finetune"}
    assert (out / "vision.done").exists()
    quality = next(e for e in log if "vq_round_trip" in e)
    assert 0 <= quality["vq_round_trip"] <= 1 and quality["vq_background_code_entropy"] >= 0
    # Two steps of stage 0 cannot read an image: the check after stage 0 says so before the long stages.
    reading = next(e for e in log if e.get("stage") == "0-check")
    assert all(0 <= reading[k] <= 1 for k in ("position", "shape", "size"))
    assert "warning: stage 0 did not learn to find the object" in capsys.readouterr().out
    assert all((out / f"stage{i}.done").exists() for i in range(5))
    model, tok = load_model(export, dtype="fp32", device="cpu")
    assert model.cfg.name == "wallaroo-tiny-shapes"
    # A rerun finds every stage done and trains nothing more.
    before = (out / "train_log.jsonl").read_text()
    assert main(args) == 0
    after = (out / "train_log.jsonl").read_text()
    assert [json.loads(x).get("event") for x in after[len(before):].splitlines()] == ["started", "finished"]
    # A folder assembled from this run's first four stages (to rerun stage 4 alone) resumes from stage 3's
    # weights, not from random ones, though it has no latest_model.pt.
    assembled = tmp_path / "assembled"
    assembled.mkdir()
    for name in ["tokenizer.json", "tokens.json", "vq.pt", "vision.pt", "vision.done",
                 *[f"stage{i}.{ext}" for i in range(4) for ext in ("pt", "done")]]:
        shutil.copy(out / name, assembled / name)
    resumed, _ = build_or_resume(assembled, 0, torch.device("cpu"), 0)
    stage3 = torch.load(out / "stage3.pt", weights_only=True)["model"]
    assert all(torch.equal(value, stage3[name]) for name, value in resumed.state_dict().items())
    (assembled / "stage3.pt").unlink()
    with pytest.raises(FileNotFoundError, match="marks stage 3 finished but holds neither"):
        build_or_resume(assembled, 0, torch.device("cpu"), 0)


def test_stages_start_while_the_vq_polish_runs_and_the_export_has_the_polished_decoder(tmp_path):
    # Stages 1-4 need the VQ's codes only, final when phase 2 ends; the side process polishes the decoder beside
    # them, and the exported model carries the polished decoder, not the one the stages' checkpoints hold.
    out, export = tmp_path / "run", tmp_path / "model"
    args = ["--out", str(out), "--scale", "0.0001", "--vq-steps", "2", "--vq-warm-steps", "1",
            "--vq-polish-steps", "600", "--batch-size", "2", "--vq-batch-size", "2", "--threads", "2",
            "--export", str(export), "--vision-steps", "2"]
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(1)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    vq_steps = [(i, e["step"]) for i, e in enumerate(log) if e.get("stage") == "vq" and "step" in e]
    codes_final = next(i for i, step in vq_steps if step == 2)
    polished = next(i for i, step in vq_steps if step == 602)
    stage1 = next(i for i, e in enumerate(log) if e.get("stage") == "1-alignment")
    assert codes_final < stage1 < polished, "stage 1 should start when the codes are final, before the polish ends"
    final = torch.load(out / "vq.pt", weights_only=True)
    assert final["step"] == 602
    model, _ = load_model(export, dtype="fp32", device="cpu")
    exported = model.vq.state_dict()
    assert all(torch.equal(exported[k], v) for k, v in final["model"].items())
    stage4 = torch.load(out / "stage4.pt", weights_only=True)["model"]
    assert not all(torch.equal(stage4[f"vq.{k}"], v) for k, v in final["model"].items() if k.startswith("decoder"))


def test_recipe_trains_data_parallel_under_torchrun(tmp_path):
    # The same script on two CPU ranks (gloo): rank 0 trains the VQ and the vision tower, every stage's
    # batches are split across both, and the exported model loads.
    import os
    import subprocess
    import sys
    out, export = tmp_path / "run", tmp_path / "model"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "wallaroo_nodes.train", "--out", str(out), "--scale", "0.0001", "--vq-steps", "2",
           "--vq-warm-steps", "1", "--vq-polish-steps", "1", "--batch-size", "4", "--vq-batch-size", "2",
           "--threads", "1", "--export", str(export), "--vision-steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["world_size"] for e in log if e.get("event") == "started"] == [2]
    # The recipe grounds answers by default, as the bundle was trained (forty-third run), and captions (fifty-fifth).
    options = json.loads((out / "options.json").read_text())
    assert options["ground_two_objects"] == 3.0 and options["ground_captions"] == 1.0
    assert all((out / f"stage{i}.done").exists() for i in range(5))
    assert log[-1].get("event") == "finished"
    model, _ = load_model(export, dtype="fp32", device="cpu")
    assert model.cfg.name == "wallaroo-tiny-shapes"


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads child processes from Linux /proc")
def test_killed_trainer_takes_its_side_vq_process_with_it(tmp_path):
    """SIGKILL skips multiprocessing's cleanup of daemon children; the VQ side process must still stop, not
    go on writing checkpoints into the run folder."""
    import os
    import signal
    import subprocess
    import sys
    import time
    cmd = [sys.executable, "-m", "wallaroo_nodes.train", "--out", str(tmp_path / "run"), "--scale", "0.0001",
           "--vq-steps", "100000", "--vq-warm-steps", "1", "--batch-size", "2", "--vq-batch-size", "2",
           "--threads", "2", "--vision-steps", "100000"]
    trainer = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    side = []
    try:
        deadline = time.time() + 180
        while not side and time.time() < deadline and trainer.poll() is None:
            time.sleep(0.5)
            side = [k for k in _children(trainer.pid) if b"spawn_main" in Path(f"/proc/{k}/cmdline").read_bytes()]
        assert side, "the trainer never started its VQ side process"
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
        deadline = time.time() + 15
        while any(_alive(k) for k in side) and time.time() < deadline:
            time.sleep(0.25)
        assert not any(_alive(k) for k in side), "the VQ side process outlived its killed trainer"
    finally:
        if trainer.poll() is None:
            trainer.kill()
        for k in side:  # never leave a stray trainer behind, even when the test fails
            if _alive(k):
                os.kill(k, signal.SIGKILL)


def test_vq_polish_trains_the_decoder_alone_so_codes_stay_and_resumes_from_the_vq_checkpoint(setup, tmp_path):
    """Phase 3 of train_vq (--vq-polish-steps) moves only the decoder: every code the stages learnt still means
    the same, and a finished VQ run picks the polish up from its checkpoint."""
    _, cfg = setup
    train_vq(cfg.vq, 2, tmp_path, 0, torch.device("cpu"), 0, batch_size=2, log=lambda line: None, warm_steps=1)
    before = torch.load(tmp_path / "vq.pt", weights_only=True)
    assert before["step"] == 2
    vq = train_vq(cfg.vq, 2, tmp_path, 0, torch.device("cpu"), 0, batch_size=2, log=lambda line: None,
                  warm_steps=1, polish_steps=3)
    after = torch.load(tmp_path / "vq.pt", weights_only=True)
    assert after["step"] == 5
    decoder = ("decoder.", "post_quant_conv.")
    moved = {name for name, tensor in before["model"].items() if not torch.equal(tensor, after["model"][name])}
    assert moved and all(name.startswith(decoder) for name in moved), sorted(moved)
    first = VQModel(cfg.vq)
    first.load_state_dict(before["model"])
    for canvas in CANVAS_SIZES:
        x = images.vq_input(render(random_scene(random.Random(1), canvas=tuple(canvas))), tuple(canvas))
        assert torch.equal(first.eval().encode(x), vq.encode(x))
    # A polish stopped part-way resumes with its own (decoder-only) optimizer state.
    train_vq(cfg.vq, 2, tmp_path, 0, torch.device("cpu"), 0, batch_size=2, log=lambda line: None, warm_steps=1,
             polish_steps=4)
    assert torch.load(tmp_path / "vq.pt", weights_only=True)["step"] == 6


def test_vq_training_depends_on_its_seed_alone_not_on_the_callers_torch_generator(setup, tmp_path):
    """The VQ trains in a spawned process whose torch generator starts at random, so the same --seed must give
    the same VQ whatever state torch's generator is in."""
    _, cfg = setup

    def trained_weights(caller_seed: int, vq_seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(caller_seed)
        out = tmp_path / f"caller{caller_seed}-vq{vq_seed}"
        out.mkdir()
        train_vq(cfg.vq, 4, out, vq_seed, torch.device("cpu"), 0, batch_size=2, log=lambda line: None, warm_steps=2)
        return torch.load(out / "vq.pt", weights_only=True)["model"]

    first, second, other_seed = trained_weights(1, 0), trained_weights(2, 0), trained_weights(1, 1)
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not all(torch.equal(first[name], other_seed[name]) for name in first)


def test_vq_loss_weights_outlines_above_object_insides_above_background():
    from wallaroo_nodes.train.recipe import _reconstruction_loss
    # A 4x4 object in the middle of a 16x16 background: its 12 rim pixels are outline, its 4 centre pixels are not.
    x = -torch.ones(1, 3, 16, 16)
    x[:, :, 6:10, 6:10] = 1.0

    def cost(y: int, x_: int) -> float:
        recon = x.clone()
        recon[:, :, y, x_] += 0.5
        return _reconstruction_loss(recon, x).item()

    outline, inside, background = cost(6, 6), cost(7, 7), cost(1, 1)
    assert outline > 2 * inside > 4 * background > 0


class _CodeByColours(torch.nn.Module):
    """A stand-in tokenizer whose top-left code is a function of the image's colours, chosen per test."""

    def __init__(self, use_object_colour: bool):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.use_object_colour = use_object_colour

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        corner = x[0, :, 0, 0]                                    # the background colour
        brightest = x[0].flatten(1).sum(0).argmax()               # some pixel that depends on the object
        key = corner.sum() + (x[0].flatten(1)[:, brightest].sum() if self.use_object_colour else 0.0)
        return torch.full((1, 8, 8), int((key * 1000).round()) % 997)


def test_background_code_entropy_is_zero_for_canonical_codes_and_positive_for_synonyms():
    from wallaroo_nodes.eval.shapes_eval import background_code_entropy
    assert background_code_entropy(_CodeByColours(use_object_colour=False), n=60) == 0.0
    assert background_code_entropy(_CodeByColours(use_object_colour=True), n=60) > 0.5


def test_scene_parse_targets_name_each_slot():
    from wallaroo_nodes.shapes import Obj, Scene
    from wallaroo_nodes.train.vision_pretrain import IGNORE, PARSE_FIELDS, scene_targets
    scene = Scene((64, 64), "gray", (Obj("triangle", "blue", "large", "right"), Obj("circle", "red", "small", "left")))
    got = dict(zip((name for name, _ in PARSE_FIELDS), scene_targets(scene)))
    assert got["background"] == 8  # gray, the last background colour
    assert (got["left.present"], got["left.shape"], got["left.colour"], got["left.size"]) == (1, 0, 0, 0)
    assert (got["centre.present"], got["centre.shape"]) == (0, IGNORE)
    assert (got["right.shape"], got["right.colour"], got["right.size"]) == (2, 2, 1)


def test_scene_descriptions_single_out_their_object_and_targets_read_its_place():
    from wallaroo_nodes.shapes import Obj, Scene
    from wallaroo_nodes.train.vision_pretrain import FIND_ATTRIBUTES, IGNORE, PARSE_FIELDS, scene_descriptions, scene_targets
    big_red_left, big_red_right = Obj("circle", "red", "large", "left"), Obj("circle", "red", "large", "right")
    scene = Scene((64, 64), "gray", (big_red_left, Obj("circle", "blue", "large", "centre"), big_red_right))
    absent = [len(values) for _, values in FIND_ATTRIBUTES]
    seen = set()
    for seed in range(40):
        descriptions = scene_descriptions(scene, random.Random(seed))
        # The two red circles differ only in place: no description can name one of them.
        assert descriptions[0] == absent and descriptions[2] == absent
        # The blue one is named by colour, perhaps with shape and size, never without colour.
        assert descriptions[1][1] == 2 and descriptions[1] != absent
        seen.add(tuple(descriptions[1]))
        got = dict(zip((name for name, _ in PARSE_FIELDS), scene_targets(scene, descriptions)))
        assert (got["find1.position"], got["find1.colour"]) == (1, 2)
        assert got["find0.position"] == got["find2.position"] == IGNORE
    assert len(seen) == 4  # colour alone, with shape, with size, with both

    two = Scene((64, 64), "white", (Obj("square", "green", "small", "right"), Obj("triangle", "green", "large", "left")))
    descriptions = scene_descriptions(two, random.Random(0))
    assert descriptions[2] == absent  # two objects, padded to three queries
    for k, obj in enumerate(two.objects):
        named = {name: values[i] for (name, values), i in zip(FIND_ATTRIBUTES, descriptions[k]) if i < len(values)}
        assert "colour" not in named or len(named) > 1  # green alone names both
        matches = [o for o in two.objects if all(getattr(o, a) == v for a, v in named.items())]
        assert matches == [obj]
    got = dict(zip((name for name, _ in PARSE_FIELDS), scene_targets(two, descriptions)))
    assert (got["find0.position"], got["find0.shape"], got["find1.position"], got["find1.shape"]) == (0, 2, 2, 1)
    # Without descriptions (as before), every find field is ignored.
    assert all(v == IGNORE for name, v in zip((n for n, _ in PARSE_FIELDS), scene_targets(two)) if name.startswith("find"))


@pytest.mark.parametrize("find", [False, True])
def test_vision_pretraining_learns_to_parse_scenes_and_resumes(setup, tmp_path, find):
    from wallaroo_nodes.engine.vision import VisionTower
    from wallaroo_nodes.shapes import POSITIONS
    from wallaroo_nodes.train.vision_pretrain import (FIND_FIELDS, PARSE_FIELDS, SceneParseHead, parse_loss,
                                                      pretrain_vision, scene_batch)
    _, cfg = setup
    torch.manual_seed(0)
    tower = VisionTower(cfg.vision)
    patches, grids, counts, descriptions, targets = scene_batch(random.Random(12345), cfg.vision, 24, find)  # held out
    n_slot_fields = len(PARSE_FIELDS) - len(POSITIONS) * len(FIND_FIELDS)  # background and slots, not finds

    def held_out_loss() -> float:
        head = SceneParseHead(cfg.vision.out_hidden_size, find=find)
        head.load_state_dict(torch.load(tmp_path / "vision.pt", weights_only=True)["head"])
        with torch.no_grad():
            logits = head(tower(patches, grids), counts, descriptions)
            assert len(logits) == (len(PARSE_FIELDS) if find else n_slot_fields)
            return parse_loss(logits[:n_slot_fields], targets[:, :n_slot_fields])[0].item()

    pretrain_vision(tower, 2, tmp_path, 0, torch.device("cpu"), batch_size=8, log=lambda line: None,
                    find_by_description=find)
    early = held_out_loss()
    (tmp_path / "vision.done").unlink()  # let the run go on from its checkpoint, as a longer --vision-steps would
    pretrain_vision(tower, 60, tmp_path, 0, torch.device("cpu"), batch_size=8, log=lambda line: None,
                    find_by_description=find)
    assert torch.load(tmp_path / "vision.pt", weights_only=True)["step"] == 60
    late = held_out_loss()
    # 60 small steps learn the easy fields (background, which slots are full): 1.16 -> 1.01 here. Shapes
    # and places take ~1,000 steps of 32 (README), too long for a test.
    assert late < 0.9 * early, (early, late)
    # Finished: a rerun trains nothing.
    before = {k: v.clone() for k, v in tower.state_dict().items()}
    pretrain_vision(tower, 60, tmp_path, 0, torch.device("cpu"), batch_size=8, log=lambda line: None,
                    find_by_description=find)
    assert all(torch.equal(before[k], v) for k, v in tower.state_dict().items())


def test_edit_copy_gate_scores_each_cells_source_code(setup):
    """Training's edit logits equal the head's plus the gate's score on the source code of the same cell."""
    tok, cfg = setup
    assert cfg.edit_copy_source
    torch.manual_seed(0)
    model = WallarooModel(cfg).eval()
    copy_generation_into_edit(model)
    ex = make_example("edit", random.Random(4), tok, cfg, [(64, 64)], uncond_prob=0.0)
    batch = collate([ex], cfg)
    head_out, losses = [], []
    model.edit_image_head.register_forward_hook(lambda mod, inp, out: head_out.append(out.detach().float()))
    with torch.no_grad():
        source = model.vq.encode(batch.pixel_sources)[0].flatten()
        target = model.vq.encode(batch.target_images)[0].flatten()
        for gate in (0.0, 4.0):
            model.edit_copy_gate.bias.fill_(gate)
            losses.append(TrainingModel(model)(batch)[1]["image"])
    assert (source != target).any() and (source == target).any()
    # Recompute the copy-gated loss from the head's own logits (the gate's weight starts at zero).
    logits = head_out[-1] + 4.0 * torch.nn.functional.one_hot(source, head_out[-1].shape[-1])
    assert losses[1] == pytest.approx(torch.nn.functional.cross_entropy(logits, target).item(), rel=1e-4)
    assert losses[0] == pytest.approx(torch.nn.functional.cross_entropy(head_out[0], target).item(), rel=1e-4)


def test_edit_instruction_first_trains_on_the_prompt_the_pipeline_builds(setup):
    """--edit-instruction-first: the same example with its instruction before the source blocks, trainable."""
    tok, base = setup
    cfg = tiny_model_config(base.tokens, base.llm.vocab_size, edit_instruction_first=True)
    assert cfg.protocol.edit_instruction_first and not base.protocol.edit_instruction_first
    first = make_example("edit", random.Random(4), tok, cfg, [(64, 64)], uncond_prob=0.0)
    plain = make_example("edit", random.Random(4), tok, base, [(64, 64)], uncond_prob=0.0)
    assert sorted(first.prompt.ids) == sorted(plain.prompt.ids) and first.prompt.ids != plain.prompt.ids
    pixel_start = first.prompt.ids.index(cfg.tokens["<|pixel_start|>"])
    assert "Edit the input image" in tok.decode(first.prompt.ids[:pixel_start]) or \
        "根据输入图片" in tok.decode(first.prompt.ids[:pixel_start])
    assert "Edit the input image" not in tok.decode(plain.prompt.ids[:pixel_start])
    torch.manual_seed(0)
    model = WallarooModel(cfg).eval()
    copy_generation_into_edit(model)
    with torch.no_grad():
        losses = [TrainingModel(model)(collate([ex], cfg))[1]["image"] for ex in (first, plain)]
    # Same weights, same target cells: only the order differs, and the loss sees it.
    assert all(torch.isfinite(torch.as_tensor(x)) for x in losses) and losses[0] != losses[1]


def test_object_start_cells_mark_where_each_object_begins_in_raster_order():
    # Hand-made code grids: background code 0, an object of codes 3/4 spanning two rows, and a diagonal
    # continuation (5) that belongs to the same object; a second object (7) starts apart from the first.
    codes = torch.zeros(1, 4, 6, dtype=torch.long)
    codes[0, 1, 2:4] = 3
    codes[0, 2, 1:4] = 4
    codes[0, 3, 4] = 5
    codes[0, 0, 5] = 7
    starts = object_start_cells(codes)[0]
    assert starts.nonzero().tolist() == [[0, 5], [1, 2]]
    assert not object_start_cells(torch.full((2, 3, 3), 9))[0].any()  # a flat background has none


def test_first_cell_weight_scales_only_the_generation_start_cells_loss(setup):
    """With a first-cell weight the image loss is the weighted mean over cells; 1.0 leaves the plain mean."""
    tok, cfg = setup
    torch.manual_seed(0)
    model = WallarooModel(cfg).eval()
    batch = collate([make_example("generate", random.Random(i), tok, cfg, [(64, 64)], uncond_prob=0.0)
                     for i in range(3)], cfg)
    head_out = []
    model.gen_image_head.register_forward_hook(lambda mod, inp, out: head_out.append(out.detach().float()))
    with torch.no_grad():
        grid = model.vq.encode(batch.target_images)
        plain = TrainingModel(model)(batch)[1]["image"]
        weighted = TrainingModel(model, first_cell_weight=5.0)(batch)[1]["image"]
    starts = object_start_cells(grid).flatten()
    assert 3 <= int(starts.sum()) <= 6  # one or two objects per scene
    per_cell = torch.nn.functional.cross_entropy(head_out[-1], grid.flatten(), reduction="none")
    w = 1.0 + 4.0 * starts.float()
    assert plain == pytest.approx(per_cell.mean().item(), rel=1e-4)
    assert weighted == pytest.approx(((w * per_cell).sum() / w.sum()).item(), rel=1e-4)


def test_edit_start_cells_weigh_target_objects_and_where_each_change_begins(setup):
    """Edits weigh each target object's first cell, and with "objects+changes" also the first cell of each
    region whose target code differs from the source's; "none" leaves edits on the plain mean."""
    tok, cfg = setup
    torch.manual_seed(0)
    model = WallarooModel(cfg).eval()
    copy_generation_into_edit(model)
    model.edit_copy_gate.bias.data.fill_(0.0)  # weight starts at zero: logits are the head's own
    batch = collate([make_example("edit", random.Random(i), tok, cfg, [(64, 64)], uncond_prob=0.0)
                     for i in range(4)], cfg)
    head_out = []
    model.edit_image_head.register_forward_hook(lambda mod, inp, out: head_out.append(out.detach().float()))
    losses = {}
    with torch.no_grad():
        source = model.vq.encode(batch.pixel_sources)
        target = model.vq.encode(batch.target_images)
        for mode in ("none", "objects", "objects+changes"):
            losses[mode] = TrainingModel(model, 5.0, mode)(batch)[1]["image"]
    per_cell = torch.nn.functional.cross_entropy(head_out[-1], target.flatten(), reduction="none")
    objects = object_start_cells(target)
    changes = region_start_cells(target != source)
    assert changes.any() and (changes & ~objects).any()  # e.g. where a removed or moved object used to be
    for mode, starts in (("objects", objects), ("objects+changes", objects | changes)):
        w = 1.0 + 4.0 * starts.flatten().float()
        assert losses[mode] == pytest.approx(((w * per_cell).sum() / w.sum()).item(), rel=1e-4)
    assert losses["none"] == pytest.approx(per_cell.mean().item(), rel=1e-4)
    with pytest.raises(ValueError, match="edit_start_cells"):
        TrainingModel(model, 5.0, "changes")


@pytest.mark.parametrize("keep_source", [False, True])
def test_dropped_edit_prompts_lose_the_instruction_and_the_source_or_the_change(setup, keep_source):
    """A CFG-dropped edit has no instruction; the reference's also has a black source, while a model whose
    unconditional branch keeps the source (`edit_uncond_keeps_source`) learns that source unchanged."""
    import dataclasses
    tok, cfg = setup
    cfg = dataclasses.replace(cfg, protocol=dataclasses.replace(cfg.protocol, edit_uncond_keeps_source=keep_source))
    kept = make_example("edit", random.Random(7), tok, cfg, [(64, 64)], uncond_prob=0.0)
    dropped = make_example("edit", random.Random(7), tok, cfg, [(64, 64)], uncond_prob=1.0)
    instruction_len = len(kept.prompt.ids) - len(dropped.prompt.ids)
    assert instruction_len > 0
    assert kept.target_image.tobytes() != kept.source_image.tobytes()  # an edit changes something
    if keep_source:
        assert dropped.source_image.tobytes() == kept.source_image.tobytes()
        assert dropped.target_image.tobytes() == dropped.source_image.tobytes()
    else:
        assert dropped.source_image.getextrema() == ((0, 0), (0, 0), (0, 0))
        assert dropped.target_image.tobytes() == kept.target_image.tobytes()


def test_interleaved_mrope_rotates_image_tokens_across_the_width(setup):
    """Only the interleaved layout lets the tiny LLM's M-RoPE tell a scene's left from its right."""
    from wallaroo_nodes.engine.rope import inverse_frequencies, mrope_axis_of_frequency
    tok, cfg = setup
    assert not cfg.llm.mrope_interleaved  # the bundle's recipe
    cfg = tiny_model_config(cfg.tokens, cfg.llm.vocab_size, mrope_interleaved=True).llm
    assert cfg.mrope_interleaved
    inv_freq = inverse_frequencies(cfg.head_dim, cfg.rope_theta)

    def widest_turn(interleaved: bool) -> float:
        # Largest angle between two image tokens 4 columns apart (a scene is 4 or 6 merged tokens wide).
        axis = mrope_axis_of_frequency(cfg.mrope_section, interleaved=interleaved)
        return float((4 * inv_freq[axis == 2]).max())

    assert widest_turn(interleaved=False) < 0.02  # the width axis gets only the lowest frequencies
    assert widest_turn(interleaved=True) > 1.0


def test_a_resume_must_repeat_the_run_options(tmp_path):
    """A run folder remembers its --mrope-interleaved / --vision-find; a resume without them stops, naming them."""
    from wallaroo_nodes.train.recipe import check_run_options
    check_run_options(tmp_path, {"vision_find": False, "mrope_interleaved": True})
    check_run_options(tmp_path, {"vision_find": False, "mrope_interleaved": True})  # same options: resumes
    with pytest.raises(SystemExit, match="--mrope-interleaved"):
        check_run_options(tmp_path, {"vision_find": False, "mrope_interleaved": False})
    assert json.loads((tmp_path / "options.json").read_text()) == {"vision_find": False, "mrope_interleaved": True}
    # The message gives the flags that repeat the recorded options, against the defaults (grounded since the
    # forty-third run): a folder from before grounding resumes with --no-ground.
    with pytest.raises(SystemExit, match="started with --mrope-interleaved --no-ground --ground-captions 0 "):
        check_run_options(tmp_path, {"vision_find": False, "mrope_interleaved": True, "ground": True})
    weighted = tmp_path / "weighted"
    weighted.mkdir()
    check_run_options(weighted, {"ground": True, "ground_readout": True, "ground_two_objects": 2.0})
    with pytest.raises(SystemExit, match="started with --ground-two-objects 2 --ground-captions 0 "):
        check_run_options(weighted, {"ground": True, "ground_readout": True, "ground_two_objects": 3.0})
    # A folder with stages trained before folders recorded options had them all off: resuming it on the defaults
    # stops instead of grounding its later stages.
    old = tmp_path / "old"
    old.mkdir()
    (old / "stage0.done").write_text("{}")
    with pytest.raises(SystemExit, match="started with --no-ground "):
        check_run_options(old, {"vision_find": False, "ground": True, "ground_readout": True})
    check_run_options(old, {"vision_find": False, "ground": False, "ground_readout": False})
    from wallaroo_nodes.train.recipe import resolve_run_options, run_option_flags
    assert run_option_flags(resolve_run_options({})) == ""
    # A folder from before two-hop edit grounding (seventy-third run) records it off and resumes so.
    assert run_option_flags({"ground": True, "ground_readout": True, "ground_two_objects": 3.0,
                             "ground_captions": 1.0}) == "--no-ground-edit-refs"
    # A folder from before caption grounding (fifty-fifth run) records none and resumes with it off.
    assert run_option_flags({"ground": True, "ground_readout": False, "ground_two_objects": False,
                             "ground_edits": True}) == ("--no-ground-readout --ground-two-objects 1 --ground-edits "
                                                        "--ground-captions 0")


def test_ground_option_weighs_every_stage_that_trains_understanding_and_no_other():
    """--ground (forty-first run) turns the grounding loss on from stage 0 on, where a question can name an object."""
    from wallaroo_nodes.train.recipe import default_stages, with_grounding
    plain = default_stages()
    grounded = with_grounding(plain)
    assert [s.ground_weight for s in plain] == [0.0] * len(plain)  # the bundle's recipe stays without it
    assert [s.ground_weight > 0 for s in grounded] == ["understand" in s.tasks for s in plain]
    assert grounded[0].ground_weight == 1.0 and grounded[1].ground_weight == 0.0  # stage 1 only generates


def grounded_examples(tok: TextTokenizer, cfg, canvas: tuple[int, int], n: int) -> list:
    """Understanding examples from seeds 0..n-1 that record their grounding (three answers each)."""
    return [make_example("understand", random.Random(s), tok, cfg, [canvas], qa_turns=3, ground=True) for s in range(n)]


def test_two_object_answers_count_as_often_as_their_weight_in_grounding_and_readout(setup):
    """ground_two_object_weight 3 gives the losses a batch gives with each two-object answer's grounding thrice."""
    from dataclasses import replace as copy_with
    tok, cfg = setup
    torch.manual_seed(0)
    model = WallarooModel(cfg).eval()
    examples = grounded_examples(tok, cfg, (64, 64), 8)
    assert {g.scene_objects for e in examples for g in e.ground} == {1, 2}
    tripled = [copy_with(e, ground=[g for g in e.ground for _ in range(3 if g.scene_objects > 1 else 1)])
               for e in examples]
    torch.manual_seed(1)
    weighted = TrainingModel(model, ground_weight=1.0, ground_readout_weight=1.0, ground_two_object_weight=3.0)
    plain = TrainingModel(model, ground_weight=1.0, ground_readout_weight=1.0)
    plain.readout.load_state_dict(weighted.readout.state_dict())
    with torch.no_grad():
        _, by_weight = weighted(collate(examples, cfg))
        _, by_copies = plain(collate(tripled, cfg))
        _, unweighted = plain(collate(examples, cfg))
    for part in ("ground", "readout"):
        assert abs(by_weight[part] - by_copies[part]) < 1e-5, (part, by_weight, by_copies)
        assert abs(by_weight[part] - unweighted[part]) > 1e-4  # the weight changes something


def test_ground_readout_without_ground_stops_before_touching_the_run_folder(tmp_path, capsys):
    from wallaroo_nodes.train.recipe import main
    for flags in (["--ground-readout"], ["--ground-two-objects", "3"], ["--ground-edits"]):
        with pytest.raises(SystemExit):
            main(["--out", str(tmp_path / "run"), "--no-ground", *flags])
        assert "drop --no-ground or them" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_grounding_marks_the_named_objects_tokens_and_keeps_the_draws(setup):
    from wallaroo_nodes.shapes import Obj, Scene
    from wallaroo_nodes.train.data import object_token_mask
    tok, cfg = setup
    left, right = Obj("circle", "red", "large", "left"), Obj("square", "blue", "small", "right")
    scene = Scene((64, 64), "white", (left, right))
    grid = (1, 8, 8)  # a 64 px scene's vision grid; 4 x 4 merged tokens
    on_left = object_token_mask(scene, left, grid, 2).view(4, 4)
    on_right = object_token_mask(scene, right, grid, 2).view(4, 4)
    assert on_left.any() and not on_left[:, 2:].any()
    assert on_right.any() and not on_right[:, :2].any()
    for seed in range(6):  # recording the objects draws nothing: same examples with and without it
        plain = make_example("understand", random.Random(seed), tok, cfg, [(64, 64)], qa_turns=3)
        grounded = make_example("understand", random.Random(seed), tok, cfg, [(64, 64)], qa_turns=3, ground=True)
        assert plain.answer_ids == grounded.answer_ids and not plain.ground
        assert all(g.mask.shape == (len(grounded.prompt.vision_slots),) and g.mask.any() for g in grounded.ground)
    from wallaroo_nodes.train.data import READOUT_FIELDS, readout_fields
    assert [values[i] for (_, values), i in zip(READOUT_FIELDS, readout_fields(left))] == ["left", "circle", "red", "large"]


def test_grounded_edits_look_at_the_named_object_from_every_code_and_keep_the_draws(setup):
    """--ground-edits: an edit naming an object of the source grounds the position that predicts its first code on
    that object's vision tokens; the examples are the ones drawn without it."""
    from wallaroo_nodes.shapes import LANGS, random_scene
    from wallaroo_nodes.train.data import object_token_mask, readout_fields
    tok, cfg = setup
    grounded_edits, kinds = [], set()
    for seed in range(24):
        kw = {"edit_kind_weights": {"add": 0.5}} if seed % 2 else {}
        plain = make_example("edit", random.Random(seed), tok, cfg, [(64, 64)], uncond_prob=0.2, **kw)
        edit = make_example("edit", random.Random(seed), tok, cfg, [(64, 64)], uncond_prob=0.2, ground_edits=True,
                            **kw)
        assert plain.prompt.ids == edit.prompt.ids and not plain.ground
        assert (np.asarray(plain.target_image) == np.asarray(edit.target_image)).all()
        # Replay the example's draws (canvas, language, scene, instruction) to learn which object it names.
        rng = random.Random(seed)
        rng.choice([(64, 64)])
        rng.choice(LANGS)
        scene = random_scene(rng, canvas=(64, 64))
        if not edit.ground:  # adds, backgrounds and dropped prompts name no object
            continue
        (g,) = edit.ground
        named = [o for o in scene.objects if readout_fields(o) == g.fields]
        assert len(named) == 1 and g.scene_objects == len(scene.objects)
        expected = object_token_mask(scene, named[0], edit.vision_grid, cfg.vision.spatial_merge_size)
        assert torch.equal(g.mask, expected) and g.mask.any()
        grounded_edits.append(edit)
    assert len(grounded_edits) >= 8
    assert {g.scene_objects for e in grounded_edits for g in e.ground} == {1, 2}
    batch = collate(grounded_edits, cfg)
    # One query per grounded edit: the last prompt position, which predicts the first code.
    length = batch.ids.shape[1]
    first_codes = [b * length + len(e.prompt.ids) - 1 for b, e in enumerate(grounded_edits)]
    assert batch.ground_query_index.tolist() == first_codes
    assert set(first_codes) <= set(batch.code_target_index.tolist())
    for b, e in enumerate(grounded_edits):
        assert torch.equal(batch.ground_target[b], e.ground[0].mask)
        assert batch.ground_key_index[b].tolist() == list(e.prompt.vision_slots)  # positions within the row
    torch.manual_seed(0)
    model = WallarooModel(cfg).eval()
    with torch.no_grad():
        _, parts = TrainingModel(model, ground_weight=1.0, ground_readout_weight=1.0)(batch)
    assert parts["ground"] > 0 and parts["readout"] > 0 and parts["image"] > 0
    mixed = collate(grounded_edits[:2] + [make_example("edit", random.Random(5), tok, cfg, [(64, 64)], uncond_prob=1.0,
                                                       ground_edits=True)], cfg)
    assert len(mixed.ground_query_index) == 2  # a dropped prompt is not grounded


def test_word_grounded_edits_query_from_the_last_token_naming_the_object(setup, tmp_path):
    """--ground-edit-words: the same grounding as --ground-edits (same examples, same vision-token mask), queried
    from the instruction's last token that names the object, which the prompt holds before any code."""
    from wallaroo_nodes.shapes import LANGS
    from wallaroo_nodes.shapes.text import edit_instruction_with_span
    from wallaroo_nodes.train.data import readout_fields, text_token_positions
    tok, cfg = setup
    grounded = []
    for seed in range(24):
        by_code = make_example("edit", random.Random(seed), tok, cfg, [(64, 64)], uncond_prob=0.2, ground_edits=True)
        by_words = make_example("edit", random.Random(seed), tok, cfg, [(64, 64)], uncond_prob=0.2,
                                ground_edit_words=True)
        assert by_code.prompt.ids == by_words.prompt.ids and len(by_code.ground) == len(by_words.ground)
        if not by_words.ground:
            continue
        (gc,), (gw,) = by_code.ground, by_words.ground
        assert torch.equal(gc.mask, gw.mask) and gc.fields == gw.fields and gc.prompt_query is None
        # Replay the draws (canvas, language, scene, instruction): the query is the last token of the naming phrase.
        rng = random.Random(seed)
        rng.choice([(64, 64)])
        lang = rng.choice(LANGS)
        instruction, _, named, (start, end) = edit_instruction_with_span(random_scene(rng, canvas=(64, 64)), lang, rng)
        assert readout_fields(named) == gw.fields
        phrase = text_token_positions(tok, by_words.prompt, instruction, [(start, end)])[0]
        assert gw.prompt_query == phrase[-1]
        words = tok.decode([by_words.prompt.ids[j] for j in phrase], skip_special=False)
        assert instruction[start:end].replace(" ", "") in words.replace(" ", "")
        grounded.append((by_words, gw))
    assert len(grounded) >= 8
    batch = collate([e for e, _ in grounded], cfg)
    length = batch.ids.shape[1]
    assert batch.ground_query_index.tolist() == [b * length + g.prompt_query for b, (_, g) in enumerate(grounded)]
    assert not set(batch.ground_query_index.tolist()) & set(batch.code_target_index.tolist())
    with pytest.raises(ValueError, match="choose one"):
        make_example("edit", random.Random(1), tok, cfg, [(64, 64)], ground_edits=True, ground_edit_words=True)
    with pytest.raises(ValueError, match="ground_edit_words"):
        run_stage(4, Stage("4", 2, 1e-3, {"edit": 1.0}, [(64, 64)], ground_edit_words=True), None, None, tmp_path, 0,
                  torch.device("cpu"), 0, 1)
    from wallaroo_nodes.train.recipe import with_grounding
    stages = with_grounding(default_stages(), edit_words=True)
    assert [s.ground_edit_words for s in stages] == ["edit" in s.tasks for s in stages]
    assert not any(s.ground_edits for s in stages)


def test_ground_edits_option_grounds_the_stages_that_edit(tmp_path):
    from wallaroo_nodes.train.recipe import default_stages, with_grounding
    stages = with_grounding(default_stages(), edits=True)
    assert [s.ground_edits for s in stages] == ["edit" in s.tasks for s in stages]
    assert all(s.ground_weight > 0 for s in stages if s.ground_edits)
    assert not any(s.ground_edits for s in with_grounding(default_stages()))
    with pytest.raises(ValueError, match="needs ground_weight"):
        run_stage(4, Stage("4", 2, 1e-3, {"edit": 1.0}, [(64, 64)], ground_edits=True), None, None, tmp_path, 0,
                  torch.device("cpu"), 0, 1)


def test_grounding_readout_reads_the_grounded_heads_output_learns_it_and_resumes_unexported(setup, tmp_path,
                                                                                            monkeypatch):
    """--ground-readout: probes on the grounded head's output at each answer start (the slice o_proj sees), trained
    with the stage, saved in its checkpoint and never part of the model."""
    import wallaroo_nodes.engine.llm as llm_module
    tok, cfg = setup
    torch.manual_seed(0)
    model = WallarooModel(cfg).train()
    examples = grounded_examples(tok, cfg, (64, 64), 6)
    batch = collate(examples, cfg)
    assert batch.ground_fields.shape == (len(batch.ground_query_index), 4)
    layer, head = 1, 2
    outputs: list[torch.Tensor] = []
    real = llm_module.attention

    def recording(q, k, v, mask, backend="sdpa"):
        out = real(q, k, v, mask, backend)
        outputs.append(out)  # (B, heads, L, head_dim)
        return out

    monkeypatch.setattr(llm_module, "attention", recording)
    trainer = TrainingModel(model, ground_weight=1.0, ground_head=(layer, head), ground_readout_weight=1.0)
    with torch.no_grad():
        _, parts = trainer(batch)
    b, length = batch.ids.shape
    at_head = outputs[layer][:, head].reshape(b * length, -1)[batch.ground_query_index]
    expected = sum(F.cross_entropy(probe(at_head), batch.ground_fields[:, i]) for i, probe in enumerate(trainer.readout))
    assert abs(parts["readout"] - expected.item()) < 1e-4, (parts["readout"], expected.item())
    monkeypatch.setattr(llm_module, "attention", real)
    with pytest.raises(ValueError, match="needs ground_weight"):
        TrainingModel(model, ground_readout_weight=1.0)
    # The probes and the head learn the read-out together.
    opt = torch.optim.AdamW(trainable_parameters(model, "reader") + list(trainer.readout.parameters()), lr=3e-3)
    first = parts["readout"]
    for _ in range(20):
        loss, parts = trainer(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert parts["readout"] < 0.5 * first, (first, parts["readout"])
    # run_stage trains the probes with the stage and keeps them in its checkpoint only; a resume loads them.
    stage = Stage("0-understanding-pretrain", 3, 1e-3, {"understand": 1.0}, [(64, 64)], trainable="reader",
                  batch_size=2, ground_weight=1.0, ground_readout_weight=1.0)
    run_stage(0, stage, model, tok, tmp_path, 0, torch.device("cpu"), 0, 1, log=lambda line: None,
              precision=torch.float32)
    saved = torch.load(tmp_path / "stage0.pt", weights_only=True)
    assert set(saved["readout"]) == set(trainer.readout.state_dict())
    assert not any(k.startswith("readout") for k in model.state_dict())
    (tmp_path / "stage0.done").unlink()
    run_stage(0, stage, model, tok, tmp_path, 0, torch.device("cpu"), 0, 1, log=lambda line: None,
              precision=torch.float32)  # resumes at its last step: loads model, probes and optimizer, trains nothing
    assert (tmp_path / "stage0.done").exists()


def test_grounding_loss_is_minus_log_the_heads_attention_on_the_object(setup, monkeypatch):
    """The loss equals what the engine's own attention gives the named object's tokens from the answer start."""
    import wallaroo_nodes.engine.llm as llm_module
    tok, cfg = setup
    torch.manual_seed(0)
    model = WallarooModel(cfg).train()
    examples = grounded_examples(tok, cfg, (48, 80), 4)
    batch = collate(examples, cfg)
    assert batch.ground_query_index is not None and len(batch.ground_query_index) >= 3
    layer, head = 1, 3
    seen: list[torch.Tensor] = []
    real = llm_module.attention

    def recording(q, k, v, mask, backend="sdpa"):
        k_all = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scores = q @ k_all.transpose(-1, -2) / q.shape[-1] ** 0.5
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        seen.append(scores.softmax(-1))
        return real(q, k, v, mask, backend)

    monkeypatch.setattr(llm_module, "attention", recording)
    with torch.no_grad():
        _, parts = TrainingModel(model, ground_weight=0.5, ground_head=(layer, head))(batch)
    probs = seen[layer][:, head].reshape(-1, seen[layer].shape[-1])  # (B * L, L): row = flat query index
    length = batch.ids.shape[1]
    on_object = [probs[qi][batch.ground_key_index[i] % length][batch.ground_target[i]].sum()
                 for i, qi in enumerate(batch.ground_query_index)]
    expected = -torch.log(torch.stack(on_object)).mean().item()
    assert abs(parts["ground"] - expected) < 1e-4, (parts["ground"], expected)
    # The query is the position just before each grounded answer's first token.
    first_answer_tokens = set(batch.text_target_index.tolist())
    assert set(batch.ground_query_index.tolist()) <= first_answer_tokens
    with pytest.raises(ValueError, match="not a \\(layer, head\\)"):
        TrainingModel(model, ground_head=(cfg.llm.num_layers, 0))


@pytest.fixture(scope="module")
def bundle():
    """The bundled tiny model: a trained VQ draws each object's cells, so first drawn cells are real."""
    return load_model(Path(__file__).resolve().parents[1] / "wallaroo_nodes" / "models" / "tiny", dtype=torch.float32,
                      device="cpu")


def caption_examples(tok, cfg, canvas: tuple[int, int], n: int) -> list:
    """Two-object generation examples from seeds 0..n-1 with their caption grounding, captions never dropped."""
    return [make_example("generate", random.Random(s), tok, cfg, [canvas], uncond_prob=0.0, n_objects=2,
                         ground_captions=True) for s in range(n)]


@pytest.mark.parametrize("canvas", [tuple(c) for c in CANVAS_SIZES])
def test_caption_grounding_queries_each_objects_first_drawn_cell_and_keys_its_phrase(bundle, canvas):
    from wallaroo_nodes.shapes.text import WORDS
    from wallaroo_nodes.train.recipe import first_drawn_cell_queries
    model, tok = bundle
    cfg = model.cfg
    examples = caption_examples(tok, cfg, canvas, 24)
    for seed, e in enumerate(examples):  # recording the grounding draws nothing
        plain = make_example("generate", random.Random(seed), tok, cfg, [canvas], uncond_prob=0.0, n_objects=2)
        assert plain.prompt.ids == e.prompt.ids and not plain.caption_ground and len(e.caption_ground) == 2
        text = tok.decode(e.prompt.ids)
        for g in e.caption_ground:  # the keys are the object's own words: its colour, shape and place
            phrase = tok.decode([e.prompt.ids[j] for j in g.phrase_positions]).strip()
            assert phrase in text and len(phrase) > 8, (phrase, text)
            colour = READOUT_FIELDS[2][1][g.fields[2]]
            assert WORDS["en" if phrase.isascii() else "zh"][colour] in phrase, phrase
    batch = collate(examples, cfg)
    codes = model.vq.encode(batch.target_images)
    queries = first_drawn_cell_queries(batch, codes.flatten())
    rows, cols = codes.shape[1:]
    targets = batch.code_target_index.view(len(examples), rows * cols)
    pad = cfg.token_id("<|generate_image_pad|>")
    agree = 0
    for i, q in enumerate(queries.tolist()):
        b = i // 2
        assert batch.ids.flatten()[q + 1] == pad  # the position that predicts a cell
        cell = targets[b].tolist().index(q)
        own = codes[b].flatten()
        touched = batch.ground_cells[i]
        drawn = touched & (own != own[0])
        assert touched[cell] and drawn[cell] and not drawn[:cell].any()  # the first cell the VQ drew it in
    for b in range(len(examples)):  # where objects stand apart, object_start_cells finds the same two cells
        starts = object_start_cells(codes[b:b + 1])[0].flatten().nonzero().flatten().tolist()
        if len(starts) == 2:
            agree += sorted(targets[b][starts].tolist()) == sorted(queries[2 * b:2 * b + 2].tolist())
            assert sorted(targets[b][starts].tolist()) == sorted(queries[2 * b:2 * b + 2].tolist())
    assert agree >= 3


def test_caption_grounding_trains_its_own_head_and_probes_and_resumes(setup, tmp_path):
    """Generation batches ground the caption head and read its output with probes of their own; understanding
    batches keep the understanding head; run_stage saves and reloads the caption probes."""
    tok, cfg = setup
    torch.manual_seed(0)
    model = WallarooModel(cfg).train()
    trainer = TrainingModel(model, ground_weight=1.0, ground_readout_weight=1.0, caption_ground_weight=1.0,
                            caption_ground_head=(1, 2))
    assert set(trainer.probes()) == {"readout", "caption_readout"}
    generate = collate(caption_examples(tok, cfg, (64, 64), 6), cfg)
    understand = collate(grounded_examples(tok, cfg, (64, 64), 4), cfg)
    with torch.no_grad():
        _, plain = TrainingModel(model)(generate)
        _, parts = trainer(generate)
        _, und_parts = trainer(understand)
    assert "ground" not in plain and parts["ground"] > 0 and parts["readout"] > 0
    assert abs(parts["image"] - plain["image"]) < 1e-6  # the grounding adds losses, it changes no prediction
    assert und_parts["ground"] > 0 and "image" not in und_parts
    params = trainable_parameters(model, "all") + list(trainer.caption_readout.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3)
    first = dict(parts)
    for _ in range(25):
        loss, parts = trainer(generate)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert parts["ground"] < 0.5 * first["ground"] and parts["readout"] < 0.5 * first["readout"], (first, parts)
    stage = Stage("2-joint-pretrain", 3, 1e-3, {"generate": 1.0}, [(64, 64)], batch_size=2,
                  caption_ground_weight=1.0)
    run_stage(2, stage, model, tok, tmp_path, 0, torch.device("cpu"), 0, 1, log=lambda line: None,
              precision=torch.float32)
    saved = torch.load(tmp_path / "stage2.pt", weights_only=True)
    assert set(saved["caption_readout"]) == set(trainer.caption_readout.state_dict()) and "readout" not in saved
    assert not any("readout" in k for k in model.state_dict())  # never exported
    (tmp_path / "stage2.done").unlink()
    run_stage(2, stage, model, tok, tmp_path, 0, torch.device("cpu"), 0, 1, log=lambda line: None,
              precision=torch.float32)  # resumes at its last step: model, probes and optimizer load
    assert (tmp_path / "stage2.done").exists()


@pytest.mark.parametrize("canvas", [(64, 64), (48, 80)])
def test_edit_ref_grounding_queries_the_named_objects_first_changed_cell_and_keys_its_words(bundle, canvas):
    """--ground-edit-refs: an edit naming a source object grounds the position that predicts the first cell of that
    object the edit changes on the instruction's words for it; the draws are the ones made without it."""
    from wallaroo_nodes.shapes import LANGS, SHAPES, OBJECT_COLOURS
    from wallaroo_nodes.shapes.text import WORDS
    from wallaroo_nodes.train.data import object_cell_mask, readout_fields
    from wallaroo_nodes.train.recipe import first_drawn_cell_queries
    model, tok = bundle
    cfg = model.cfg
    draws = {"uncond_prob": 0.1, "edit_kind_weights": {"add": 0.3, "background": 0.3}}
    named, scenes = [], []
    for seed in range(40):
        e = make_example("edit", random.Random(seed), tok, cfg, [canvas], ground_edit_refs=True, **draws)
        plain = make_example("edit", random.Random(seed), tok, cfg, [canvas], **draws)
        assert plain.prompt.ids == e.prompt.ids and not plain.caption_ground and not e.ground
        assert (np.asarray(plain.target_image) == np.asarray(e.target_image)).all()
        rng = random.Random(seed)  # replay the draws to learn the source scene
        rng.choice([canvas])
        lang = rng.choice(LANGS)
        scene = random_scene(rng, canvas=canvas)
        if not e.caption_ground:  # adds, backgrounds and dropped prompts name no object
            continue
        (g,) = e.caption_ground
        (obj,) = [o for o in scene.objects if readout_fields(o) == g.fields]
        phrase = tok.decode([e.prompt.ids[j] for j in g.phrase_positions]).strip()
        # the keys are the reference's words, which name only the object's own colour and shape
        assert phrase and phrase in tok.decode(e.prompt.ids), phrase
        for attr, values in (("colour", OBJECT_COLOURS), ("shape", SHAPES)):
            assert [v for v in values if WORDS[lang][v] in phrase] in ([], [getattr(obj, attr)]), (phrase, obj)
        rows, cols = canvas[0] // cfg.vq.downsample, canvas[1] // cfg.vq.downsample
        assert torch.equal(g.cells, object_cell_mask(scene, obj, rows, cols, min_share=0.0))
        assert g.scene_objects == len(scene.objects)
        named.append(e)
        scenes.append(scene)
    assert len(named) >= 12 and {len(s.objects) for s in scenes} == {1, 2}
    batch = collate(named, cfg)
    target = model.vq.encode(batch.target_images)
    source = model.vq.encode(batch.pixel_sources)
    queries = first_drawn_cell_queries(batch, target.flatten(), source.flatten())
    per_image = target.shape[1] * target.shape[2]
    cell_targets = batch.code_target_index.view(len(named), per_image)
    for i, q in enumerate(queries.tolist()):
        cell = cell_targets[i].tolist().index(q)
        changed = batch.ground_cells[i] & (target[i].flatten() != source[i].flatten())
        assert changed.any() and changed[cell] and not changed[:cell].any()  # the first cell the edit changes
    with torch.no_grad():  # the caption head and its probes ground edits; the image loss is the same
        _, plain_parts = TrainingModel(model)(batch)
        trainer = TrainingModel(model, ground_weight=1.0, ground_readout_weight=1.0, caption_ground_weight=1.0)
        _, parts = trainer(batch)
    assert parts["ground"] > 0 and parts["readout"] > 0
    assert abs(parts["image"] - plain_parts["image"]) < 1e-5
    with pytest.raises(ValueError, match="choose one"):
        make_example("edit", random.Random(0), tok, cfg, [canvas], ground_edits=True, ground_edit_refs=True)


def test_two_hop_edit_grounding_keeps_each_hop_as_it_is_alone(bundle):
    """--ground-edit-words with --ground-edit-refs: one batch grounds the naming words on the vision tokens (head
    (2, 0)) and the first changed cell on the words (head (2, 2)); each hop's queries, keys and losses are those of
    the same batch grounded by that hop alone."""
    model, tok = bundle
    cfg = model.cfg
    draws = {"uncond_prob": 0.1, "edit_kind_weights": {"add": 0.2, "background": 0.2}, "n_objects": 2}
    both, words, refs = [], [], []
    for seed in range(16):
        e = make_example("edit", random.Random(seed), tok, cfg, [(64, 64)], ground_edit_words=True,
                         ground_edit_refs=True, **draws)
        if not e.ground:
            continue
        assert len(e.ground) == len(e.caption_ground) == 1
        both.append(e)
        words.append(make_example("edit", random.Random(seed), tok, cfg, [(64, 64)], ground_edit_words=True, **draws))
        refs.append(make_example("edit", random.Random(seed), tok, cfg, [(64, 64)], ground_edit_refs=True, **draws))
        assert words[-1].prompt.ids == refs[-1].prompt.ids == e.prompt.ids
    assert len(both) >= 6
    mixed, by_words, by_refs = (collate(x, cfg) for x in (both, words, refs))
    # Per example: its words' query (vision keys), then its cell query (word keys).
    assert mixed.ground_by_cell.tolist() == [False, True] * len(both)
    assert mixed.ground_query_index[~mixed.ground_by_cell].tolist() == by_words.ground_query_index.tolist()
    assert mixed.ground_fields[mixed.ground_by_cell].tolist() == by_refs.ground_fields.tolist()
    trainer = TrainingModel(model, ground_weight=1.0, ground_readout_weight=1.0, caption_ground_weight=1.0,
                            ground_two_object_weight=3.0)
    assert [g[0] for g in trainer.grounding_groups(mixed)] == ["ground", "ref_ground"]
    assert [g[3] for g in trainer.grounding_groups(mixed)] == [(2, 0), (2, 2)]
    with torch.no_grad():
        loss, parts = trainer(mixed)
        _, word_parts = trainer(by_words)
        _, ref_parts = trainer(by_refs)
    for mine, alone in (("ground", word_parts["ground"]), ("readout", word_parts["readout"]),
                        ("ref_ground", ref_parts["ground"]), ("ref_readout", ref_parts["readout"])):
        assert parts[mine] > 0 and abs(parts[mine] - alone) < 1e-4 * max(1.0, alone), (mine, parts[mine], alone)
    assert abs(parts["image"] - word_parts["image"]) < 1e-5
    assert abs(loss.item() - sum(parts.values())) < 1e-3 * loss.item()


def test_edit_ref_head_grounds_edit_cells_through_its_own_head_and_probes(bundle, tmp_path):
    """--edit-ref-head moves the edits' cell grounding (the second hop) off the caption head to a head and probes
    of its own; generation keeps the caption head, and the option is recorded so a resume cannot drop it."""
    from wallaroo_nodes.train.recipe import check_run_options, run_option_flags, with_caption_grounding
    model, tok = bundle
    cfg = model.cfg
    draws = {"uncond_prob": 0.1, "edit_kind_weights": {"add": 0.2, "background": 0.2}, "n_objects": 2}
    both = [e for e in (make_example("edit", random.Random(seed), tok, cfg, [(64, 64)], ground_edit_words=True,
                                     ground_edit_refs=True, **draws) for seed in range(16)) if e.ground]
    gens = [make_example("generate", random.Random(seed), tok, cfg, [(64, 64)], ground_captions=True, uncond_prob=0.0)
            for seed in range(4)]
    edits, generation = collate(both, cfg), collate(gens, cfg)
    kw = {"ground_weight": 1.0, "ground_readout_weight": 1.0, "caption_ground_weight": 1.0}
    own = TrainingModel(model, edit_ref_head=(3, 0), **kw)
    shared = TrainingModel(model, **kw)
    assert set(own.probes()) == {"readout", "caption_readout", "edit_ref_readout"}
    assert [(g[0], g[3]) for g in own.grounding_groups(edits)] == [("ground", (2, 0)), ("ref_ground", (3, 0))]
    assert own.grounding_groups(edits)[1][5] is own.edit_ref_readout
    assert [(g[0], g[3]) for g in own.grounding_groups(generation)] == [("ground", (2, 2))]
    assert own.grounding_groups(generation)[0][5] is own.caption_readout
    with torch.no_grad():
        _, own_parts = own(edits)
        _, shared_parts = shared(edits)
    # The first hop is the same; the second attends through another head, so its loss differs.
    assert abs(own_parts["ground"] - shared_parts["ground"]) < 1e-5
    assert abs(own_parts["ref_ground"] - shared_parts["ref_ground"]) > 1e-3
    own.zero_grad()
    loss, _ = own(edits)
    loss.backward()
    assert own.edit_ref_readout[0].weight.grad.abs().sum() > 0
    assert own.caption_readout[0].weight.grad is None
    unprobed = TrainingModel(model, edit_ref_head=(3, 0), edit_ref_readout=False, **kw)
    assert set(unprobed.probes()) == {"readout", "caption_readout"}
    with torch.no_grad():
        _, unprobed_parts = unprobed(edits)
    assert "ref_readout" not in unprobed_parts and abs(unprobed_parts["ref_ground"] - own_parts["ref_ground"]) < 1e-5
    # Probes of one field read that field's column alone: with the full set's other probes zeroed (each then
    # costs log(its classes)), the full read-out is the one-field read-out plus those constants.
    names = [name for name, _ in READOUT_FIELDS]
    for field in ("position", "colour"):
        index = names.index(field)
        single = TrainingModel(model, edit_ref_head=(3, 0), edit_ref_readout_fields=(field,), **kw)
        assert len(single.edit_ref_readout) == 1 and single.edit_ref_readout.field_indices == (index,)
        full = TrainingModel(model, edit_ref_head=(3, 0), **kw)
        with torch.no_grad():
            single.edit_ref_readout[0].load_state_dict(full.edit_ref_readout[index].state_dict())
            for i, probe in enumerate(full.edit_ref_readout):
                if i != index:
                    probe.weight.zero_()
                    probe.bias.zero_()
            _, single_parts = single(edits)
            _, full_parts = full(edits)
        constants = sum(math.log(len(values)) for i, (_, values) in enumerate(READOUT_FIELDS) if i != index)
        assert abs(full_parts["ref_readout"] - (single_parts["ref_readout"] + constants)) < 1e-4
        assert abs(single_parts["ref_ground"] - own_parts["ref_ground"]) < 1e-5
    with pytest.raises(ValueError, match="hue"):
        TrainingModel(model, edit_ref_head=(3, 0), edit_ref_readout_fields=("hue",), **kw)
    with pytest.raises(ValueError, match="edit_ref_head"):
        TrainingModel(model, edit_ref_head=(4, 0), **kw)
    stages = with_caption_grounding(default_stages(), 1.0, edits=True, edit_head=(3, 0))
    assert [s.edit_ref_head for s in stages] == [None, None, None, None, (3, 0)]
    defaults = resolve_run_options({})
    assert defaults["edit_ref_head"] == [3, 0] and defaults["edit_ref_readout_place"] and run_option_flags(defaults) == ""
    recorded = {**defaults, "edit_ref_head": [3, 1]}
    assert run_option_flags(recorded) == "--edit-ref-head 3,1"
    assert run_option_flags({**defaults, "edit_ref_head": False, "edit_ref_readout_place": False}) == \
        "--edit-ref-head caption"
    assert run_option_flags({**defaults, "no_edit_ref_readout": True, "edit_ref_readout_place": False}) == \
        "--no-edit-ref-readout"
    assert run_option_flags({**defaults, "edit_ref_readout_place": False}) == "--no-edit-ref-readout-place"
    placed = with_caption_grounding(default_stages(), 1.0, edits=True, edit_head=(3, 0), edit_readout_fields=("position",))
    assert placed[4].edit_ref_head == (3, 0) and placed[4].edit_ref_readout_fields == ("position",)
    check_run_options(tmp_path, recorded)
    with pytest.raises(SystemExit, match="--edit-ref-head 3,1"):
        check_run_options(tmp_path, defaults)
    for flags in (["--no-ground-edit-refs", "--edit-ref-head", "3,0"], ["--edit-ref-head", "three"],
                  ["--edit-ref-head", "caption", "--no-edit-ref-readout"],
                  ["--edit-ref-head", "caption", "--edit-ref-readout-place"],
                  ["--no-edit-ref-readout", "--edit-ref-readout-place"]):
        with pytest.raises(SystemExit):
            main(["--out", str(tmp_path / "x"), *flags])
    assert not (tmp_path / "x").exists()


def test_ground_edit_adds_grounds_the_added_objects_first_cell_on_the_words_that_describe_it(bundle, tmp_path):
    """--ground-edit-adds: an edit adding an object grounds the position that predicts the new object's first
    drawn cell on the instruction's words for it (its place included); named edits keep their grounding, adds and
    dropped prompts had none before, and the draws are the ones made without it."""
    from collections import Counter
    from wallaroo_nodes.shapes import LANGS, OBJECT_COLOURS, SHAPES, added_object_span, edit_instruction_with_span
    from wallaroo_nodes.shapes.text import WORDS, edit_kinds
    from wallaroo_nodes.train.data import _weighted_kind, object_cell_mask, readout_fields
    from wallaroo_nodes.train.recipe import first_drawn_cell_queries, run_option_flags, with_caption_grounding
    model, tok = bundle
    cfg = model.cfg
    draws = {"uncond_prob": 0.2, "edit_kind_weights": {"add": 3.0}, "n_objects": 1}
    adds, kinds = [], Counter()
    for seed in range(40):
        e = make_example("edit", random.Random(seed), tok, cfg, [(48, 80)], ground_edit_refs=True,
                         ground_edit_adds=True, **draws)
        refs = make_example("edit", random.Random(seed), tok, cfg, [(48, 80)], ground_edit_refs=True, **draws)
        assert e.prompt.ids == refs.prompt.ids and (np.asarray(e.target_image) == np.asarray(refs.target_image)).all()
        if refs.caption_ground:  # a named object: grounded as before
            assert [g.fields for g in e.caption_ground] == [g.fields for g in refs.caption_ground]
            kinds["named"] += 1
            continue
        rng = random.Random(seed)  # replay the draws: the source scene and the instruction
        rng.choice([(48, 80)])
        lang = rng.choice(LANGS)
        scene = random_scene(rng, canvas=(48, 80), n_objects=1)
        text = tok.decode(e.prompt.ids)
        if not e.caption_ground:  # a background edit, or a dropped prompt
            kinds["none"] += 1
            continue
        (g,) = e.caption_ground
        kinds["add"] += 1
        kind = _weighted_kind(rng, edit_kinds(scene), draws["edit_kind_weights"])
        instruction, target, named, _ = edit_instruction_with_span(scene, lang, rng, kind=kind)
        assert named is None and instruction in text
        (added,) = [o for o in target.objects if o not in scene.objects]
        assert g.fields == readout_fields(added) and g.scene_objects == 2
        ds = cfg.vq.downsample
        assert torch.equal(g.cells, object_cell_mask(target, added, 48 // ds, 80 // ds, min_share=0.0))
        start, end = added_object_span(instruction, lang)
        phrase = tok.decode([e.prompt.ids[j] for j in g.phrase_positions]).replace(" ", "")
        assert phrase == instruction[start:end].replace(" ", ""), (phrase, instruction)
        for attr, values in (("colour", OBJECT_COLOURS), ("shape", SHAPES)):
            assert [v for v in values if WORDS[lang][v] in phrase] == [getattr(added, attr)], (phrase, added)
        adds.append(e)
    assert kinds["add"] >= 12 and kinds["none"] >= 3, kinds
    batch = collate(adds, cfg)
    target, source = model.vq.encode(batch.target_images), model.vq.encode(batch.pixel_sources)
    queries = first_drawn_cell_queries(batch, target.flatten(), source.flatten())
    cell_targets = batch.code_target_index.view(len(adds), -1)
    for i, q in enumerate(queries.tolist()):  # the first cell of the new object that the edit changes
        changed = batch.ground_cells[i] & (target[i].flatten() != source[i].flatten())
        cell = cell_targets[i].tolist().index(q)
        assert changed[cell] and not changed[:cell].any()
    with torch.no_grad():
        kw = {"caption_ground_weight": 1.0, "edit_ref_head": (3, 0), "edit_ref_readout_fields": ("position",)}
        by_edit_head = TrainingModel(model, **kw)
        _, parts = by_edit_head(batch)
        # --ground-edit-adds-caption: the same queries through generation's route, the caption head and its probes
        by_caption = TrainingModel(model, adds_via_caption_head=True, **kw)
        by_caption.caption_readout.load_state_dict(by_edit_head.caption_readout.state_dict())
        _, caption_parts = by_caption(batch)
        generation_route = TrainingModel(model, caption_ground_weight=1.0)  # no edit head: every cell query takes it
        generation_route.caption_readout.load_state_dict(by_edit_head.caption_readout.state_dict())
        _, generation_parts = generation_route(batch)
    assert batch.ground_added.all()
    assert parts["ground"] > 0 and parts["readout"] > 0 and "add_ground" not in parts
    assert [(g[0], g[3]) for g in by_caption.grounding_groups(batch)] == [("add_ground", (2, 2))]
    assert abs(caption_parts["add_ground"] - generation_parts["ground"]) < 1e-5
    assert abs(caption_parts["add_readout"] - generation_parts["readout"]) < 1e-4
    assert abs(caption_parts["add_ground"] - parts["ground"]) > 1e-3  # another head
    with pytest.raises(ValueError, match="need ground_edit_refs"):
        make_example("edit", random.Random(0), tok, cfg, [(64, 64)], ground_edit_adds=True)
    with pytest.raises(ValueError, match="fits none of the en add templates"):
        added_object_span("Make the background red.", "en")
    stages = with_caption_grounding(default_stages(), 1.0, edits=True, edit_head=(3, 0), adds=True)
    assert [s.caption_ground_adds for s in stages] == [False, False, False, False, True]
    assert not any(s.adds_via_caption_head for s in stages)
    routed = with_caption_grounding(default_stages(), 1.0, edits=True, edit_head=(3, 0), adds=True, adds_via_caption=True)
    assert [s.adds_via_caption_head for s in routed] == [False, False, False, False, True]
    assert not any(s.caption_ground_adds for s in with_caption_grounding(default_stages(), 1.0, adds=True))
    # On by default through the caption head since the seventy-seventh run (measured in the seventy-sixth); a folder
    # from before records both off.
    defaults = resolve_run_options({})
    assert defaults["ground_edit_adds"] and defaults["ground_edit_adds_caption"] and run_option_flags(defaults) == ""
    assert run_option_flags({**defaults, "ground_edit_adds_caption": False}) == "--no-ground-edit-adds-caption"
    before = {k: v for k, v in defaults.items() if k not in ("ground_edit_adds", "ground_edit_adds_caption")}
    assert run_option_flags(before) == "--no-ground-edit-adds"
    assert resolve_run_options({"ground_edit_adds": False}) == {**defaults, "ground_edit_adds": False,
                                                                 "ground_edit_adds_caption": False}
    assert not resolve_run_options({"ground_edit_refs": False})["ground_edit_adds"]
    for flags in (["--no-ground-edit-refs", "--ground-edit-adds"], ["--no-ground-edit-adds", "--ground-edit-adds-caption"]):
        with pytest.raises(SystemExit):
            main(["--out", str(tmp_path / "x"), *flags])
    with pytest.raises(ValueError, match="needs caption_ground_adds"):
        run_stage(4, Stage("4", 2, 1e-3, {"edit": 1.0}, [(64, 64)], caption_ground_weight=1.0,
                           caption_ground_edits=True, adds_via_caption_head=True), None, None,
                  tmp_path, 0, torch.device("cpu"), 0, 1)
    with pytest.raises(ValueError, match="needs caption_ground_edits"):
        run_stage(4, Stage("4", 2, 1e-3, {"edit": 1.0}, [(64, 64)], caption_ground_adds=True), None, None,
                  tmp_path, 0, torch.device("cpu"), 0, 1)
    assert not (tmp_path / "x").exists()


def test_ground_edit_moves_source_grounds_a_moved_objects_new_place_on_its_source_vision_tokens(bundle):
    """--ground-edit-moves-source: the moved object's new place keeps its query and head but its keys are the vision
    tokens that show the object in the source, not the words; everything else is as with --ground-edit-moves."""
    from wallaroo_nodes.train.recipe import MOVE_REF_HEAD, run_option_flags, with_caption_grounding
    model, tok = bundle
    cfg = model.cfg
    draws = {"uncond_prob": 0.1, "edit_kind_weights": {"move": 4.0}, "n_objects": 2, "ground_edit_words": True,
             "ground_edit_refs": True, "ground_edit_moves": True}
    moves = []
    for seed in range(30):
        e = make_example("edit", random.Random(seed), tok, cfg, [(64, 64)], ground_edit_moves_source=True, **draws)
        words = make_example("edit", random.Random(seed), tok, cfg, [(64, 64)], **draws)
        assert e.prompt.ids == words.prompt.ids and (np.asarray(e.target_image) == np.asarray(words.target_image)).all()
        assert len(e.caption_ground) == len(words.caption_ground)
        if len(e.caption_ground) < 2:
            continue
        (named, new_place), (named_by_words, by_words) = e.caption_ground, words.caption_ground
        assert torch.equal(named.cells, named_by_words.cells) and named[1:] == named_by_words[1:]
        assert new_place.moved and torch.equal(new_place.cells, by_words.cells) and new_place.fields == by_words.fields
        # The keys: the source's vision tokens over the object's old place (the named object), none of the words.
        slots = e.prompt.vision_slots
        assert new_place.phrase_positions and set(new_place.phrase_positions) <= set(slots)
        assert not set(new_place.phrase_positions) & set(by_words.phrase_positions)
        assert e.ground and [slots[i] for i in e.ground[0].mask.nonzero().flatten().tolist()] == \
            new_place.phrase_positions  # the tokens the first hop finds the named object in
        moves.append(e)
    assert len(moves) >= 10
    batch = collate(moves, cfg)
    trainer = TrainingModel(model, ground_weight=1.0, caption_ground_weight=1.0, edit_ref_head=(3, 0),
                            edit_ref_readout_fields=("position",), move_ref_head=MOVE_REF_HEAD)
    with torch.no_grad():
        _, parts = trainer(batch)
    assert 0 < parts["move_ground"] < float("inf") and parts["move_readout"] > 0
    with pytest.raises(ValueError, match="needs ground_edit_moves"):
        make_example("edit", random.Random(0), tok, cfg, [(64, 64)], ground_edit_moves_source=True,
                     ground_edit_refs=True)
    stages = with_caption_grounding(default_stages(), 1.0, edits=True, edit_head=(3, 0), move_head=MOVE_REF_HEAD,
                                    moves_on_source=True)
    assert [s.move_ref_on_source for s in stages] == [False, False, False, False, True]
    defaults = resolve_run_options({})
    assert run_option_flags({**defaults, "ground_edit_moves": True, "ground_edit_moves_source": True}) == \
        "--ground-edit-moves --ground-edit-moves-source"


def test_ground_edit_moves_grounds_a_moved_objects_new_place_through_its_own_head_and_looks_probes(bundle, tmp_path):
    """--ground-edit-moves: a move also grounds the first cell of the object at its new place on the words that
    name it, through a head of its own whose probes read the object's looks; the other queries keep their head,
    probes and losses, and the draws are the ones made without it."""
    from wallaroo_nodes.train.recipe import (MOVE_REF_HEAD, first_drawn_cell_queries, run_option_flags,
                                             with_caption_grounding)
    model, tok = bundle
    cfg = model.cfg
    draws = {"uncond_prob": 0.1, "edit_kind_weights": {"move": 4.0}, "n_objects": 2}
    two_hops = {"ground_edit_words": True, "ground_edit_refs": True}
    moves, plain, others = [], [], 0
    for seed in range(40):
        e = make_example("edit", random.Random(seed), tok, cfg, [(64, 64)], ground_edit_moves=True, **two_hops, **draws)
        refs = make_example("edit", random.Random(seed), tok, cfg, [(64, 64)], **two_hops, **draws)
        assert e.prompt.ids == refs.prompt.ids and (np.asarray(e.target_image) == np.asarray(refs.target_image)).all()
        for mine, theirs in zip(e.caption_ground, refs.caption_ground):  # the named object's grounding as before
            assert torch.equal(mine.cells, theirs.cells) and mine[1:] == theirs[1:]
        assert [(g.mask.tolist(), g[2:]) for g in e.ground] == [(g.mask.tolist(), g[2:]) for g in refs.ground]
        if len(e.caption_ground) == len(refs.caption_ground):  # not a move (or a dropped prompt): nothing added
            others += 1
            continue
        named, new_place = e.caption_ground
        assert not named.moved and new_place.moved and new_place.phrase_positions == named.phrase_positions
        assert new_place.fields[1:] == named.fields[1:] and new_place.fields[0] != named.fields[0]  # looks kept
        assert not (new_place.cells & named.cells).all()
        moves.append(e)
        plain.append(refs)
    assert len(moves) >= 12 and others >= 3
    batch, by_refs = collate(moves, cfg), collate(plain, cfg)
    assert batch.ground_moved.tolist() == [False, False, True] * len(moves)
    assert by_refs.ground_moved is None
    target, source = model.vq.encode(batch.target_images), model.vq.encode(batch.pixel_sources)
    cell_queries = first_drawn_cell_queries(batch, target.flatten(), source.flatten())
    cell_targets = batch.code_target_index.view(len(moves), -1)
    for i, q in enumerate(cell_queries[batch.ground_moved].tolist()):  # the first cell of the object's new place
        changed = batch.ground_cells[3 * i + 2] & (target[i].flatten() != source[i].flatten())
        cell = cell_targets[i].tolist().index(q)
        assert changed[cell] and not changed[:cell].any()
    kw = {"ground_weight": 1.0, "caption_ground_weight": 1.0, "edit_ref_head": (3, 0),
          "edit_ref_readout_fields": ("position",)}
    torch.manual_seed(0)  # the same draws for the probes both trainers have
    trainer = TrainingModel(model, move_ref_head=MOVE_REF_HEAD, **kw)
    torch.manual_seed(0)
    refs_trainer = TrainingModel(model, **kw)
    assert trainer.move_ref_readout.field_indices == (1, 2, 3)  # shape, colour, size: not the new place
    assert [(g[0], g[3]) for g in trainer.grounding_groups(batch)] == \
        [("ground", (2, 0)), ("ref_ground", (3, 0)), ("move_ground", MOVE_REF_HEAD)]
    with torch.no_grad():
        _, parts = trainer(batch)
        _, ref_parts = refs_trainer(by_refs)
    assert parts["move_ground"] > 0 and parts["move_readout"] > 0
    for name in ("ground", "ref_ground", "ref_readout", "image"):
        assert abs(parts[name] - ref_parts[name]) < 1e-4 * max(1.0, ref_parts[name]), name
    with pytest.raises(ValueError, match="no move_ref_head"):
        TrainingModel(model, **kw)(batch)
    with pytest.raises(ValueError, match="need ground_edit_refs"):
        make_example("edit", random.Random(0), tok, cfg, [(64, 64)], ground_edit_moves=True)
    stages = with_caption_grounding(default_stages(), 1.0, edits=True, edit_head=(3, 0), move_head=MOVE_REF_HEAD)
    assert [s.move_ref_head for s in stages] == [None, None, None, None, MOVE_REF_HEAD]
    defaults = resolve_run_options({})
    assert run_option_flags({**defaults, "ground_edit_moves": True}) == "--ground-edit-moves"
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "x"), "--no-ground-edit-refs", "--ground-edit-moves"])
    with pytest.raises(ValueError, match="needs caption_ground_edits"):
        run_stage(4, Stage("4", 2, 1e-3, {"edit": 1.0}, [(64, 64)], move_ref_head=(3, 2)), None, None,
                  tmp_path, 0, torch.device("cpu"), 0, 1)
    assert not (tmp_path / "x").exists()


def test_ground_edit_refs_option_grounds_the_edits_of_caption_grounded_stages(setup, tmp_path):
    from wallaroo_nodes.train.recipe import (check_run_options, run_option_flags, with_caption_grounding,
                                             with_grounding)
    stages = with_caption_grounding(default_stages(), 1.0, edits=True)
    assert [s.caption_ground_edits for s in stages] == [False, False, False, False, True]
    assert not any(s.caption_ground_edits for s in with_caption_grounding(default_stages(), 1.0))
    defaults = resolve_run_options({})
    assert defaults["ground_edit_refs"] and defaults["ground_edit_words"]  # two hops by default (seventy-third run)
    one_hop = {"ground": True, "ground_readout": True, "ground_two_objects": 3.0, "ground_captions": 1.0,
               "ground_edit_refs": True}
    # That folder predates add grounding too (default since the seventy-seventh run), so it resumes with that off.
    assert run_option_flags(one_hop) == "--no-ground-edit-words --no-ground-edit-adds"
    one_hop_now = resolve_run_options({"ground_edit_words": False})  # the second hop's head and probes go with it
    assert run_option_flags(one_hop_now) == "--no-ground-edit-words" and one_hop_now["ground_edit_refs"]
    assert not any(one_hop_now[k] for k in ("edit_ref_head", "edit_ref_readout_place", "ground_readout_until_edits"))
    check_run_options(tmp_path, one_hop)
    with pytest.raises(SystemExit, match="started with --no-ground-edit-words "):
        check_run_options(tmp_path, defaults)
    for flags in (["--ground-captions", "0"], ["--ground-edits"], ["--ground-edit-words", "--ground-edits"]):
        with pytest.raises(SystemExit):
            main(["--out", str(tmp_path / "x"), "--ground-edit-refs", *flags])
    two_hops = with_caption_grounding(with_grounding(default_stages(), edit_words=True), 1.0, edits=True)
    assert [(s.ground_edit_words, s.caption_ground_edits) for s in two_hops][-1] == (True, True)
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="needs caption_ground_weight > 0"):
        run_stage(4, Stage("4", 2, 1e-3, {"edit": 1.0}, [(64, 64)], caption_ground_edits=True), None, None,
                  tmp_path, 0, torch.device("cpu"), 0, 1)
    tok, cfg = setup  # a stage that edits with it trains the caption probes from edit batches
    torch.manual_seed(0)
    model = WallarooModel(cfg).train()
    stage = Stage("4-unified-finetune", 2, 1e-3, {"edit": 1.0}, [(64, 64)], batch_size=4, caption_ground_weight=1.0,
                  caption_ground_edits=True, edit_kind_weights={"add": 0.0, "background": 0.0})
    lines = []
    run_stage(4, stage, model, tok, tmp_path, 0, torch.device("cpu"), 0, 1, log=lines.append, precision=torch.float32)
    saved = torch.load(tmp_path / "stage4.pt", weights_only=True)
    assert "caption_readout" in saved and any('"edit.ground"' in line for line in lines), lines


def test_ground_captions_option_grounds_the_stages_that_train_generation_past_alignment(tmp_path):
    from wallaroo_nodes.train.recipe import check_run_options, run_option_flags, with_caption_grounding
    stages = with_caption_grounding(default_stages(), 1.5)
    assert [s.caption_ground_weight for s in stages] == [0.0, 0.0, 1.5, 1.5, 1.5]
    assert [s.caption_ground_weight for s in default_stages()] == [0.0] * 5
    defaults = resolve_run_options({})
    assert run_option_flags({**defaults, "ground_captions": 0.5}) == "--ground-captions 0.5"
    check_run_options(tmp_path, defaults)
    with pytest.raises(SystemExit, match="started with no option flags "):  # the defaults
        check_run_options(tmp_path, {**defaults, "ground_captions": False})


def _sleep_then_exit(seconds: float, code: int) -> None:
    import sys
    import time
    time.sleep(seconds)
    sys.exit(code)


def test_trainer_takes_the_side_threads_back_at_a_fixed_step_not_when_the_side_ends():
    # A wall-clock handover made two runs of one seed part at stage 2; the step must decide, and a side still
    # running at that step is waited for.
    import multiprocessing as mp
    import time
    from wallaroo_nodes.train.recipe import THREAD_HANDOVER, thread_handover
    before = torch.get_num_threads()
    stage, step = THREAD_HANDOVER
    try:
        torch.set_num_threads(1)
        ended = mp.get_context("spawn").Process(target=_sleep_then_exit, args=(0.0, 0))
        ended.start()
        ended.join()
        thread_handover(ended, 2, stage, RuntimeError)(step - 1)     # side over, but not the step yet
        thread_handover(ended, 2, stage - 1, RuntimeError)(step + 10)  # an earlier stage never hands back
        assert torch.get_num_threads() == 1
        running = mp.get_context("spawn").Process(target=_sleep_then_exit, args=(1.5, 0))
        running.start()
        t0 = time.time()
        thread_handover(running, 2, stage, RuntimeError)(step)
        assert not running.is_alive() and time.time() - t0 > 0.5  # waited for the side to end
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        failed = mp.get_context("spawn").Process(target=_sleep_then_exit, args=(0.0, 3))
        failed.start()
        with pytest.raises(RuntimeError):
            thread_handover(failed, 2, stage + 1, RuntimeError)(0)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_ground_readout_until_edits_drops_the_readout_of_the_editing_stage_only(tmp_path):
    """--ground-readout-until-edits: stages 0-3 keep the read-out probes (as r72b's stages did), the editing stage
    grounds without them (as r73d's stage 4 did, with --no-ground-readout on those stages)."""
    from wallaroo_nodes.train.recipe import resolve_run_options, run_option_flags, with_grounding
    until = with_grounding(default_stages(), readout_weight=1.0, edit_words=True, readout_until_edits=True)
    on = with_grounding(default_stages(), readout_weight=1.0, edit_words=True)
    off = with_grounding(default_stages(), readout_weight=0.0, edit_words=True)
    assert [s.ground_readout_weight for s in until] == [1.0, 0.0, 1.0, 1.0, 0.0]  # stage 1 (alignment) not grounded
    assert until[:4] == on[:4] and until[4] == off[4] and until[4] != on[4]
    defaults = resolve_run_options({})
    assert defaults["ground_readout_until_edits"] and run_option_flags(defaults) == ""
    assert run_option_flags({**defaults, "ground_readout_until_edits": False}) == "--no-ground-readout-until-edits"
    # r73d: its stages 0-3 (r72b's) had the read-out, its stage 4 had none, recorded as --no-ground-readout
    assert resolve_run_options({"ground_readout": False})["ground_readout_until_edits"] is False
    for flags in (["--no-ground-readout"], ["--no-ground"]):
        with pytest.raises(SystemExit):
            main(["--out", str(tmp_path / "x"), "--ground-readout-until-edits", *flags])
    assert not (tmp_path / "x").exists()


def test_object_cell_masks_are_fresh_copies_of_the_cached_mask():
    """object_cell_mask is cached per object and canvas: each caller gets its own tensor."""
    from wallaroo_nodes.shapes import Obj, Scene
    from wallaroo_nodes.train.data import object_cell_mask
    scene = Scene((48, 80), "white", (Obj("square", "blue", "large", "left"), Obj("circle", "red", "small", "right")))
    first = object_cell_mask(scene, scene.objects[0], 3, 5)
    expected = first.clone()
    assert expected.any() and not expected.all()
    first[:] = ~first
    assert torch.equal(object_cell_mask(scene, scene.objects[0], 3, 5), expected)
    assert not torch.equal(object_cell_mask(scene, scene.objects[1], 3, 5), expected)


def test_last_layer_on_targets_gives_the_full_passes_losses_and_gradients(bundle):
    """Stage.last_layer_on_targets: the LLM's last layer computes only the rows from the batch's first target on.
    Every loss part and every gradient equals the full pass's up to float rounding, for each task of stage 4 with
    the recipe's grounding (the edit reference head is in the last layer), and the rows left out are many."""
    from dataclasses import replace
    from wallaroo_nodes.train.recipe import recipe_stages, stage_trainer
    model, tok = bundle
    stage = replace(recipe_stages(resolve_run_options({}))[4], batch_size=6)
    assert stage.edit_ref_head[0] == model.cfg.llm.num_layers - 1
    skipped_rows: dict[str, float] = {}
    full_forward = model.forward
    for step in range(60):
        task, examples = step_examples(stage, 4, step, 1, 0, stage.batch_size, tok, model.cfg)
        if task in skipped_rows:
            continue
        batch = collate(examples, model.cfg)
        results = []
        for on in (False, True):
            torch.manual_seed(0)  # the same probes both times
            trainer, params = stage_trainer(model, replace(stage, last_layer_on_targets=on))
            starts = []
            model.forward = lambda *a, **kw: (starts.append(kw.get("last_layer_from", 0)), full_forward(*a, **kw))[1]
            try:
                loss, parts = trainer(batch)
            finally:
                del model.forward
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            results.append((loss, parts, grads, starts[0]))
        (loss, parts, grads, start_off), (loss_on, parts_on, grads_on, start_on) = results
        assert start_off == 0
        skipped_rows[task] = start_on / batch.ids.shape[1]
        assert parts.keys() == parts_on.keys()
        for key in parts:
            assert parts_on[key] == pytest.approx(parts[key], rel=1e-5, abs=1e-6), (task, key)
        assert loss_on.item() == pytest.approx(loss.item(), rel=1e-5)
        for p, g, g_on in zip(params, grads, grads_on):
            assert (g is None) == (g_on is None)
            if g is not None:
                torch.testing.assert_close(g_on, g, rtol=1e-4, atol=1e-6)
    assert skipped_rows.keys() == {"edit", "understand", "generate"}
    # An edit's prompt (source pixels, vision tokens, instruction) is over half its row; a question's image and
    # text come before its answers; a caption before its image.
    assert skipped_rows["edit"] > 0.5 and skipped_rows["understand"] > 0.2 and skipped_rows["generate"] > 0.15, \
        skipped_rows
