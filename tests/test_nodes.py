"""The ComfyUI node pack without ComfyUI: loading as ComfyUI does, node contracts, running each node, the
optional ComfyUI integration against stand-in ComfyUI modules, and the shipped workflows.

Runs on the bundled tiny model when it is installed, else on a random-weights model folder (so these tests
check types, shapes, dtypes, ranges, determinism, cancel and caching, never content).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import types
import weakref
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers import make_model_folder
from wallaroo_nodes import comfy_bridge as bridge
from wallaroo_nodes import nodes
from wallaroo_nodes.engine import images as engine_images
from wallaroo_nodes.engine.cache import SHARED_CACHE, bundled_models
from wallaroo_nodes.engine.decode import Cancelled
from wallaroo_nodes.engine.weights import WeightsError

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / "workflows"
TINY_INSTALLED = "tiny" in bundled_models()
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


# --- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("wallaroo-models"))


@pytest.fixture
def label(model_folder, monkeypatch) -> str:
    """The combo label the tests load: 'tiny' once it is installed, else the random-weights folder."""
    monkeypatch.setenv(bridge.PATHS_ENV, str(model_folder.parent))
    return "tiny" if TINY_INSTALLED else model_folder.name


@pytest.fixture
def model(label):
    return nodes.WallarooModelLoader().load(label, "auto", "auto", "auto")[0]


def pictures(n: int, height: int = 40, width: int = 56, seed: int = 0) -> torch.Tensor:
    """A ComfyUI IMAGE batch of simple deterministic pictures."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(n, 1, 1, 3, generator=g).expand(n, height, width, 3).clone()
    base[:, height // 4: 3 * height // 4, width // 4: width // 2] = torch.rand(n, 1, 1, 3, generator=g)
    return base


def assert_image_batch(images: torch.Tensor, n: int, size: tuple[int, int]) -> None:
    assert isinstance(images, torch.Tensor)
    assert images.shape == (n, size[0], size[1], 3)
    assert images.dtype == torch.float32
    assert images.device.type == "cpu"
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert torch.isfinite(images).all()


def load_pack(module_path: Path):
    """Import the pack exactly as ComfyUI's load_custom_node does for a folder."""
    name = str(module_path).replace(".", "_x_")
    spec = importlib.util.spec_from_file_location(name, os.path.join(module_path, "__init__.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module


# --- loading the pack -------------------------------------------------------------------------------------


@pytest.mark.parametrize("folder_name", ["comfyui-wallaroo", "ComfyUI-Wallaroo"])
def test_pack_loads_the_way_comfyui_loads_it(tmp_path, folder_name):
    link = tmp_path / "custom_nodes" / folder_name
    link.parent.mkdir()
    link.symlink_to(ROOT, target_is_directory=True)
    pack = load_pack(link)
    assert set(pack.NODE_CLASS_MAPPINGS) == {"WallarooModelLoader", "WallarooUnderstand", "WallarooGenerate",
                                             "WallarooEdit"}
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(pack.NODE_CLASS_MAPPINGS)
    # the pack's node classes are the shared engine's: one module, so one model cache for nodes and SDK
    assert pack.NODE_CLASS_MAPPINGS["WallarooGenerate"] is nodes.WallarooGenerate
    web = ROOT / pack.WEB_DIRECTORY
    assert (web / "wallaroo.js").is_file()


def test_pack_in_a_fresh_interpreter_shares_its_cache_with_the_sdk(tmp_path, model_folder):
    """ComfyUI's process has neither the repository nor its tests on sys.path: the pack still imports, and the
    SDK in the same process gets the model the nodes loaded without loading it again."""
    link = tmp_path / "ComfyUI-Wallaroo"
    link.symlink_to(ROOT, target_is_directory=True)
    script = textwrap.dedent(f"""
        import importlib.util, os, sys
        sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != {str(ROOT)!r}]
        sys.path.append({str(ROOT / "sdk")!r})
        import torch; torch.set_num_threads(1)
        name = {str(link)!r}.replace(".", "_x_")
        spec = importlib.util.spec_from_file_location(name, os.path.join({str(link)!r}, "__init__.py"))
        pack = importlib.util.module_from_spec(spec); sys.modules[name] = pack; spec.loader.exec_module(pack)
        os.environ["WALLAROO_MODEL_PATHS"] = {str(model_folder.parent)!r}
        loader = pack.NODE_CLASS_MAPPINGS["WallarooModelLoader"]()
        ref = loader.load({model_folder.name!r}, "auto", "cpu", "auto")[0]
        from wallaroo_sdk import Wallaroo
        from wallaroo_nodes.engine.cache import SHARED_CACHE
        wal = Wallaroo.load({str(model_folder)!r}, device="cpu")
        assert wal.pipeline is ref.pipeline(), "SDK and nodes hold different pipelines"
        print("loads", SHARED_CACHE.loads)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loads 1" in done.stdout


# --- node contracts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(nodes.NODE_CLASS_MAPPINGS))
def test_node_contract_is_well_formed(name, label):
    cls = nodes.NODE_CLASS_MAPPINGS[name]
    spec = cls.INPUT_TYPES()
    json.dumps(spec)  # /object_info serialises it
    assert set(spec) <= {"required", "optional", "hidden"} and spec["required"]
    for section in ("required", "optional"):
        for input_name, entry in spec.get(section, {}).items():
            assert isinstance(entry, tuple) and 1 <= len(entry) <= 2, input_name
            kind, opts = entry[0], (entry[1] if len(entry) == 2 else {})
            assert opts.get("tooltip"), f"{name}.{input_name} has no tooltip"
            if isinstance(kind, list):
                assert kind and all(isinstance(v, str) for v in kind), input_name
                assert opts.get("default", kind[0]) in kind, input_name
            else:
                assert isinstance(kind, str) and kind.isupper(), input_name
            if kind in ("INT", "FLOAT"):
                assert opts["min"] <= opts["default"] <= opts["max"], input_name
                assert isinstance(opts["default"], int if kind == "INT" else float), input_name
            if input_name == "seed":
                assert kind == "INT" and opts["control_after_generate"] and opts["max"] == 2 ** 64 - 1
    assert isinstance(cls.RETURN_TYPES, tuple) and all(isinstance(t, str) for t in cls.RETURN_TYPES)
    assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES) == len(cls.OUTPUT_TOOLTIPS)
    assert len(getattr(cls, "OUTPUT_IS_LIST", cls.RETURN_TYPES)) == len(cls.RETURN_TYPES)
    assert callable(getattr(cls, cls.FUNCTION))
    assert cls.CATEGORY == "Wallaroo" and cls.DESCRIPTION
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS[name].startswith("Wallaroo ")


def test_model_combo_lists_tiny_first_then_model_folders(label, model_folder):
    choices = nodes.WallarooModelLoader.INPUT_TYPES()["required"]["model"][0]
    assert choices[0] == "tiny"
    assert model_folder.name in choices
    sizes = nodes.WallarooGenerate.INPUT_TYPES()["required"]["size"][0]
    assert sizes[0] == "default" and "32x48" in sizes  # the test model's sizes are offered


def test_loader_errors_say_what_to_fix(label, model_folder):
    with pytest.raises(WeightsError, match="'no-such-model' not found; available: tiny") as info:
        nodes.WallarooModelLoader().load("no-such-model", "auto", "auto", "auto")
    assert str(model_folder.parent) in str(info.value)  # where model folders are looked for
    if not TINY_INSTALLED:
        with pytest.raises(WeightsError, match="bundled Wallaroo model 'tiny' is missing"):
            nodes.WallarooModelLoader().load("tiny", "auto", "auto", "auto")


def test_loader_with_wrong_weights_fails_on_the_loader(tmp_path, monkeypatch):
    folder = make_model_folder(tmp_path / "broken")
    for shard in folder.glob("*.safetensors"):
        shard.write_bytes(b"not safetensors")
    monkeypatch.setenv(bridge.PATHS_ENV, str(folder.parent))
    with pytest.raises(Exception) as info:
        nodes.WallarooModelLoader().load(folder.name, "auto", "cpu", "auto")
    assert str(folder) in str(info.value) or folder.name in str(info.value)


def test_same_model_from_several_loaders_is_loaded_once(label):
    SHARED_CACHE.release()
    before = SHARED_CACHE.loads
    a = nodes.WallarooModelLoader().load(label, "auto", "auto", "auto")[0]
    b = nodes.WallarooModelLoader().load(label, "fp32", "cpu", "auto")[0]  # what auto means on a CPU
    assert a.pipeline() is b.pipeline()
    assert SHARED_CACHE.loads == before + 1
    assert "Wallaroo model" in str(a)


# --- running the nodes ------------------------------------------------------------------------------------


def test_generate_returns_an_image_batch_and_repeats_with_the_same_seed(model):
    pipe = model.pipeline()
    default = tuple(pipe.config.protocol.default_size)
    gen = nodes.WallarooGenerate()
    args = dict(prompt="A large red circle in the centre on a white background.", cfg=-1.0, temperature=-1.0,
                top_k=-1, top_p=-1.0)
    (first,) = gen.generate(model, size="default", seed=5, batch_size=2, **args)
    assert_image_batch(first, 2, default)
    (again,) = gen.generate(model, size="default", seed=5, batch_size=2, **args)
    assert torch.equal(first, again)
    h, w = max(pipe.sizes, key=lambda s: s[1] / s[0])  # a non-square size
    (wide,) = gen.generate(model, size=f"{h}x{w}", seed=1, batch_size=1, **{**args, "cfg": 1.5, "temperature": 0.7,
                                                                          "top_k": 8, "top_p": 0.9})
    assert_image_batch(wide, 1, (h, w))


def test_generate_rejects_an_unsupported_size_naming_the_supported_ones(model):
    with pytest.raises(engine_images.UnsupportedSizeError, match="supported sizes"):
        nodes.WallarooGenerate().generate(model, "a circle", "1000x1000", -1.0, -1.0, -1, -1.0, 0, 1)


def test_understand_answers_each_image_and_shows_the_answers(model):
    out = nodes.WallarooUnderstand().understand(model, pictures(2), "Describe the image.", 6, -1.0, -1.0, 0)
    answers = out["result"][0]
    assert isinstance(answers, list) and len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert out["ui"]["text"] == answers
    again = nodes.WallarooUnderstand().understand(model, pictures(2), "Describe the image.", 6, -1.0, -1.0, 0)
    assert again["result"][0] == answers
    sampled = nodes.WallarooUnderstand().understand(model, pictures(1), "What shape?", 4, 0.8, 0.9, 3)
    assert len(sampled["result"][0]) == 1
    with pytest.raises(ValueError, match="question is empty"):
        nodes.WallarooUnderstand().understand(model, pictures(1), "  ", 4, -1.0, -1.0, 0)


def test_edit_returns_each_image_at_the_closest_supported_size(model):
    pipe = model.pipeline()
    batch = pictures(2, height=40, width=70)
    expected = engine_images.closest_size(40, 70, pipe.sizes)
    (edited,) = nodes.WallarooEdit().edit(model, batch, "Make the background blue.", -1.0, -1.0, -1, -1.0, 7)
    assert_image_batch(edited, 2, expected)
    (again,) = nodes.WallarooEdit().edit(model, batch, "Make the background blue.", -1.0, -1.0, -1, -1.0, 7)
    assert torch.equal(edited, again)
    with pytest.raises(ValueError, match="instruction is empty"):
        nodes.WallarooEdit().edit(model, batch, "", -1.0, -1.0, -1, -1.0, 7)


def test_image_conversions_round_trip_and_reject_non_images():
    values = torch.arange(2 * 3 * 5 * 3, dtype=torch.float32).reshape(2, 3, 5, 3) % 256 / 255.0
    pils = nodes.image_batch_to_pil(values)
    assert [im.size for im in pils] == [(5, 3), (5, 3)] and pils[0].mode == "RGB"
    assert torch.equal(nodes.pil_to_image_batch(pils), values)
    assert nodes.image_batch_to_pil(torch.rand(1, 4, 4, 4))[0].mode == "RGBA"
    assert nodes.image_batch_to_pil(torch.rand(4, 4, 1))[0].mode == "L"
    for bad in (torch.rand(1, 4, 4, 2), torch.rand(4, 4), "image", torch.rand(0, 4, 4, 3)):
        with pytest.raises(ValueError, match="IMAGE"):
            nodes.image_batch_to_pil(bad)


def test_outside_comfyui_there_is_no_progress_and_cancel_is_never_requested(model):
    assert not bridge.in_comfyui()
    progress = bridge.Progress(3)
    assert progress.bar is None and not progress.should_cancel()
    assert bridge.resolve_device("auto") == "auto"
    err = Cancelled("stop")
    assert bridge.interrupted(err) is err


# --- the ComfyUI integration, against stand-in ComfyUI modules --------------------------------------------


class FakeComfyUI:
    """Stand-ins for the ComfyUI modules the bridge uses, following their protocols: ProgressBar with a global
    hook that (like ComfyUI's server hook) raises on interrupt, the interrupt flag, and the loaded-model list
    with LoadedModel's calls into the model objects. The real thing is exercised by test_comfyui_live.py."""

    @property
    def loaded(self) -> list:
        """The model objects in ComfyUI's loaded-model list."""
        return [m.model for m in self.current]

    def __init__(self, monkeypatch, tmp_path: Path, hook_raises: bool = True):
        self.flag = False
        self.cancel_at: int | None = None
        self.updates: list[tuple] = []
        self.freed: list = []
        self.hook_raises = hook_raises
        fake = self

        mm = types.ModuleType("comfy.model_management")

        class InterruptProcessingException(Exception):
            pass

        def throw_exception_if_processing_interrupted():
            if fake.flag:
                fake.flag = False
                raise InterruptProcessingException()

        current = self.current = []  # ComfyUI's current_loaded_models: LoadedModel objects

        class LoadedModel:  # the calls ComfyUI's LoadedModel makes into a model object, and its finalizer
            def __init__(self, model):
                self._model = weakref.ref(model)
                self.device = model.load_device
                self.real_model = self.model_finalizer = None

            @property
            def model(self):
                return self._model()

            def __eq__(self, other):
                return self.model is other.model

            def model_load(self):
                self.model.model_patches_to(self.device)
                self.model.model_patches_to(self.model.model_dtype())
                self.model.partially_load(self.device, 1e32, force_patch_weights=False)
                assert self.model.parent is None and self.model.model_patches_models() == []
                real = self.model.model
                self.real_model = weakref.ref(real)
                self.model_finalizer = weakref.finalize(real, cleanup_models)

            def model_unload(self, memory_to_free=None):
                if memory_to_free is not None and memory_to_free < self.model.loaded_size():
                    if self.model.partially_unload(self.model.offload_device, memory_to_free) >= memory_to_free:
                        return False
                self.model.detach(True)
                self.model_finalizer.detach()
                self.model_finalizer = self.real_model = None
                return True

        def cleanup_models():
            for i in reversed(range(len(current))):
                if current[i].real_model() is None:
                    current.pop(i)

        def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                            force_full_load=False):
            for m in models:
                loaded = LoadedModel(m)
                if loaded in current:
                    loaded = current[current.index(loaded)]
                for i in reversed(range(len(current))):
                    if loaded.model.is_clone(current[i].model):
                        old = current.pop(i)
                        old.model.detach(unpatch_all=False)
                        old.model_finalizer.detach()
                loaded.model_load()
                current.insert(0, loaded)

        def free_memory(memory_required, device, keep_loaded=()):
            fake.freed.append((memory_required, device))
            unloaded = [i for i in reversed(range(len(current)))
                        if current[i].device == device and current[i] not in keep_loaded
                        and current[i].model_unload(memory_required)]
            for i in sorted(unloaded, reverse=True):
                current.pop(i)  # as ComfyUI does: an index that vanished meanwhile is an IndexError

        mm.InterruptProcessingException = InterruptProcessingException
        mm.processing_interrupted = lambda: fake.flag
        mm.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
        mm.get_torch_device = lambda: torch.device("cpu")
        mm.minimum_inference_memory = lambda: 0
        mm.load_models_gpu = load_models_gpu
        mm.free_memory = free_memory
        mm.current_loaded_models = current
        mm.unload_all_models = lambda: free_memory(1e30, torch.device("cpu"))
        self.mm = mm

        utils = types.ModuleType("comfy.utils")

        def hook(value, total, preview, node_id=None):
            fake.updates.append((value, total, preview))
            if fake.cancel_at is not None and value >= fake.cancel_at:
                fake.flag = True  # the user presses cancel while this row is shown
            if fake.hook_raises:
                throw_exception_if_processing_interrupted()

        class ProgressBar:
            def __init__(self, total, node_id=None):
                self.total, self.current, self.hook = total, 0, hook

            def update_absolute(self, value, total=None, preview=None):
                self.total = total if total is not None else self.total
                self.current = min(value, self.total)
                self.hook(self.current, self.total, preview)

        utils.ProgressBar = ProgressBar
        cli_args = types.ModuleType("comfy.cli_args")
        cli_args.args = types.SimpleNamespace(preview_size=512)

        folder_paths = types.ModuleType("folder_paths")
        folder_paths.models_dir = str(tmp_path / "models")
        folder_paths.paths = {}
        folder_paths.add_model_folder_path = lambda name, path, is_default=False: \
            folder_paths.paths.setdefault(name, []).append(path)
        folder_paths.get_folder_paths = lambda name: list(folder_paths.paths[name])
        self.folder_paths = folder_paths

        comfy = types.ModuleType("comfy")
        comfy.model_management, comfy.utils, comfy.cli_args = mm, utils, cli_args
        for name, module in [("comfy", comfy), ("comfy.model_management", mm), ("comfy.utils", utils),
                             ("comfy.cli_args", cli_args), ("folder_paths", folder_paths)]:
            monkeypatch.setitem(sys.modules, name, module)


@pytest.fixture
def comfy(monkeypatch, tmp_path, model_folder):
    monkeypatch.setattr(SHARED_CACHE, "budget_bytes", SHARED_CACHE.budget_bytes)
    monkeypatch.delenv("WALLAROO_CACHE_BUDGET_GB", raising=False)
    monkeypatch.delenv(bridge.PATHS_ENV, raising=False)
    fake = FakeComfyUI(monkeypatch, tmp_path)
    bridge.setup()
    models_dir = Path(fake.folder_paths.models_dir) / "wallaroo"
    models_dir.mkdir(parents=True)
    (models_dir / "mine").symlink_to(model_folder, target_is_directory=True)
    bridge.release_all()
    yield fake
    bridge.release_all()


@pytest.fixture
def comfy_model(comfy):
    return nodes.WallarooModelLoader().load("tiny" if TINY_INSTALLED else "mine", "auto", "auto", "auto")[0]


def test_setup_registers_models_wallaroo_and_hands_memory_decisions_to_comfyui(comfy, model_folder):
    assert comfy.folder_paths.paths["wallaroo"] == [os.path.join(comfy.folder_paths.models_dir, "wallaroo")]
    assert bridge.model_choices()["mine"] == str(model_folder.resolve())
    assert SHARED_CACHE.budget_bytes == sys.maxsize
    assert bridge.resolve_device("auto") == "cpu"  # ComfyUI's device (as with --cpu)


def test_generate_drives_the_progress_bar_with_a_preview_per_row(comfy, comfy_model):
    pipe = comfy_model.pipeline()
    h, w = max(pipe.sizes, key=lambda s: s[0])
    rows = h // pipe.config.vq.downsample
    (images,) = nodes.WallarooGenerate().generate(comfy_model, "a circle", f"{h}x{w}", -1.0, -1.0, -1, -1.0, 3, 2)
    assert_image_batch(images, 2, (h, w))
    assert [(v, t) for v, t, _ in comfy.updates] == [(r, rows) for r in range(1, rows + 1)]
    for _, _, preview in comfy.updates:
        kind, picture, max_size = preview
        assert kind == "JPEG" and isinstance(picture, Image.Image) and max_size == 512
        assert picture.mode == "RGB" and max_size // 2 < max(picture.size) <= max_size


@pytest.mark.parametrize("hook_raises", [True, False], ids=["hook-raises", "should-cancel"])
def test_cancel_stops_within_one_row_and_leaves_the_model_usable(comfy, comfy_model, hook_raises):
    comfy.hook_raises = hook_raises
    pipe = comfy_model.pipeline()
    h, w = max(pipe.sizes, key=lambda s: s[0])
    args = (comfy_model, "a circle", f"{h}x{w}", -1.0, -1.0, -1, -1.0, 11, 1)
    comfy.cancel_at = 1
    with pytest.raises(comfy.mm.InterruptProcessingException):
        nodes.WallarooGenerate().generate(*args)
    assert [v for v, _, _ in comfy.updates] == [1]  # no row decoded after the cancel
    assert comfy.flag is False  # the interrupt was consumed, as ComfyUI expects
    comfy.cancel_at, comfy.updates = None, []
    (after,) = nodes.WallarooGenerate().generate(*args)
    comfy.updates = []
    (fresh,) = nodes.WallarooGenerate().generate(*args)
    assert torch.equal(after, fresh)


def test_cancel_of_edit_and_understand(comfy, comfy_model):
    comfy.cancel_at = 1
    with pytest.raises(comfy.mm.InterruptProcessingException):
        nodes.WallarooEdit().edit(comfy_model, pictures(1, 48, 32), "Make it blue.", -1.0, -1.0, -1, -1.0, 0)
    comfy.cancel_at, comfy.flag = None, True
    with pytest.raises(comfy.mm.InterruptProcessingException):
        nodes.WallarooUnderstand().understand(comfy_model, pictures(1), "Describe the image.", 8, 1.0, 1.0, 0)
    assert comfy.flag is False
    out = nodes.WallarooUnderstand().understand(comfy_model, pictures(1), "Describe the image.", 4, -1.0, -1.0, 0)
    assert len(out["result"][0]) == 1 and comfy.updates[-1][:2] == (4, 4)


def test_comfyui_unload_releases_the_model_and_the_next_run_reloads_it(comfy, comfy_model):
    run = lambda: nodes.WallarooGenerate().generate(comfy_model, "a circle", "default", -1.0, -1.0, -1, -1.0, 9, 1)[0]
    first = run()
    run()
    assert len(comfy.loaded) == 1  # registered once, however often it is used
    entry = comfy.loaded[0]
    assert isinstance(entry, bridge.ComfyModelEntry) and entry.loaded_size() == entry.model_size() > 0
    weights = weakref.ref(entry.model)
    loads = SHARED_CACHE.loads
    comfy.mm.unload_all_models()  # "Unload models" / POST /free
    assert comfy.loaded == [] and SHARED_CACHE.loaded() == []
    assert weights() is None, "the weights are still in memory after ComfyUI unloaded them"
    again = run()
    assert SHARED_CACHE.loads == loads + 1 and torch.equal(first, again)


def test_loading_on_a_gpu_device_asks_comfyui_for_room_first(comfy, model_folder, monkeypatch):
    """Before a model goes to a non-CPU device, ComfyUI is asked to free about its size (other models go)."""
    monkeypatch.setattr(SHARED_CACHE, "get", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("stop here")))
    monkeypatch.setattr(type(SHARED_CACHE), "key", staticmethod(
        lambda model, dtype="auto", device="auto", attention="auto": (str(model_folder), "torch.bfloat16", "cuda:0",
                                                                      "auto")))
    with pytest.raises(RuntimeError, match="stop here"):
        bridge.acquire(str(model_folder), "bf16", "cuda:0")
    (need, device), = comfy.freed
    stored = sum(p.stat().st_size for p in model_folder.glob("*.safetensors"))
    assert device == torch.device("cuda", 0) and need == pytest.approx(stored / 2 * 1.1)  # fp32 files -> bf16


# --- workflows --------------------------------------------------------------------------------------------

CORE_WIDGETS = {"LoadImage": ["image", "#upload"], "SaveImage": ["filename_prefix"], "PreviewImage": [],
                "StringReplace": ["string", "find", "replace"]}


class FakeLoadImage:
    RETURN_TYPES, FUNCTION, OUTPUT_NODE = ("IMAGE", "MASK"), "load_image", False

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": (["wallaroo_example.png"], {"image_upload": True})}}

    def load_image(self, image):
        return pictures(1, 48, 48), torch.zeros(1, 48, 48)


class FakeSaveImage:
    RETURN_TYPES, FUNCTION, OUTPUT_NODE = (), "save_images", True
    saved: list = []

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})}}

    def save_images(self, images, filename_prefix="ComfyUI"):
        FakeSaveImage.saved.append((filename_prefix, images))
        return {"ui": {"images": []}}


class FakePreviewImage(FakeSaveImage):
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",)}}


class FakeStringReplace:
    RETURN_TYPES, FUNCTION, OUTPUT_NODE = ("STRING",), "execute", False

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {k: ("STRING", {"multiline": True}) for k in ("string", "find", "replace")}}

    def execute(self, string, find, replace):
        return (string.replace(find, replace),)


CLASSES = {**nodes.NODE_CLASS_MAPPINGS, "LoadImage": FakeLoadImage, "SaveImage": FakeSaveImage,
           "PreviewImage": FakePreviewImage, "StringReplace": FakeStringReplace}
NAMES = ["understand", "generate", "edit", "chain"]


def load_json(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def spec_of(cls) -> dict:
    spec = cls.INPUT_TYPES()
    return {**spec.get("required", {}), **spec.get("optional", {})}


def widget_names(class_type: str) -> list[str]:
    if class_type in CORE_WIDGETS:
        return CORE_WIDGETS[class_type]
    names = []
    for name, entry in spec_of(CLASSES[class_type]).items():
        if isinstance(entry[0], list) or entry[0] in WIDGET_TYPES:
            names.append(name)
            if len(entry) > 1 and entry[1].get("control_after_generate"):
                names.append("#control")
    return names


def graph_order(workflow: dict) -> list[str]:
    order, done = [], set()

    def visit(nid, path=()):
        assert nid not in path, f"cycle through node {nid}"
        if nid in done:
            return
        for value in workflow[nid]["inputs"].values():
            if isinstance(value, list):
                visit(value[0], path + (nid,))
        done.add(nid)
        order.append(nid)

    for nid in sorted(workflow, key=int):
        visit(nid)
    return order


def execute(workflow: dict) -> dict:
    """Run an API-format workflow through the node classes in graph order, with ComfyUI's list semantics
    (a list output makes the downstream node run once per item)."""
    results: dict[str, list[list]] = {}
    for nid in graph_order(workflow):
        node = workflow[nid]
        cls = CLASSES[node["class_type"]]
        inputs = {k: (results[v[0]][v[1]] if isinstance(v, list) else [v]) for k, v in node["inputs"].items()}
        runs = max((len(v) for v in inputs.values()), default=1)
        is_list = getattr(cls, "OUTPUT_IS_LIST", (False,) * len(cls.RETURN_TYPES))
        outputs: list[list] = [[] for _ in cls.RETURN_TYPES]
        for i in range(runs):
            out = getattr(cls(), cls.FUNCTION)(**{k: v[min(i, len(v) - 1)] for k, v in inputs.items()})
            if isinstance(out, dict):
                out = out.get("result", ())
            for slot, value in enumerate(out):
                outputs[slot].extend(value) if is_list[slot] else outputs[slot].append(value)
        results[nid] = outputs
    return results


def test_workflow_files_come_in_both_formats_and_examples_are_the_ui_files():
    assert sorted(p.stem for p in (WORKFLOWS / "api").glob("*.json")) == sorted(NAMES)
    assert sorted(p.stem for p in (WORKFLOWS / "ui").glob("*.json")) == sorted(NAMES)
    # ComfyUI's template browser lists <pack>/example_workflows/*.json (and the direct *.json of a few other
    # folder names, workflows/ among them: the formats live in sub-folders so only UI files are offered)
    assert not list(WORKFLOWS.glob("*.json"))
    examples = ROOT / "example_workflows"
    assert sorted(p.stem for p in examples.glob("*.json")) == sorted(NAMES)
    for name in NAMES:
        assert (examples / f"{name}.json").read_bytes() == (WORKFLOWS / "ui" / f"{name}.json").read_bytes()


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_names_existing_nodes_and_legal_values(name, label):
    workflow = load_json(WORKFLOWS / "api" / f"{name}.json")
    for nid, node in workflow.items():
        assert node["class_type"] in CLASSES, f"node {nid}: unknown class {node['class_type']}"
        spec = spec_of(CLASSES[node["class_type"]])
        required = CLASSES[node["class_type"]].INPUT_TYPES()["required"]
        assert set(required) <= set(node["inputs"]), f"node {nid} lacks {set(required) - set(node['inputs'])}"
        for key, value in node["inputs"].items():
            assert key in spec, f"node {nid}: {node['class_type']} has no input {key!r}"
            kind, opts = spec[key][0], (spec[key][1] if len(spec[key]) > 1 else {})
            if isinstance(value, list):  # a link: [node id, output slot] of the right type
                source = CLASSES[workflow[value[0]]["class_type"]]
                assert source.RETURN_TYPES[value[1]] == kind, f"node {nid} input {key}"
            elif isinstance(kind, list):
                assert value in kind, f"node {nid}: {key}={value!r} is not among {kind}"
            elif kind == "INT":
                assert isinstance(value, int) and opts["min"] <= value <= opts["max"], f"node {nid}: {key}"
            elif kind == "FLOAT":
                assert isinstance(value, (int, float)) and opts["min"] <= value <= opts["max"], f"node {nid}: {key}"
            else:
                assert kind == "STRING" and isinstance(value, str), f"node {nid}: {key}"


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_is_the_api_workflow(name):
    """Each UI-format file (what users drag in) describes the same graph and values as its API-format file."""
    ui = load_json(WORKFLOWS / "ui" / f"{name}.json")
    api = load_json(WORKFLOWS / "api" / f"{name}.json")
    links = {link[0]: link for link in ui["links"]}
    assert ui["last_link_id"] == max(links, default=0) and ui["last_node_id"] == max(n["id"] for n in ui["nodes"])
    rebuilt = {}
    for node in ui["nodes"]:
        values = dict(zip(widget_names(node["type"]), node["widgets_values"]))
        assert len(node["widgets_values"]) == len(widget_names(node["type"])), node["type"]
        inputs = {k: v for k, v in values.items() if not k.startswith("#")}
        for slot, entry in enumerate(node["inputs"]):
            link = links[entry["link"]]
            assert link[3:5] == [node["id"], slot] and link[5] == entry["type"]
            origin = next(n for n in ui["nodes"] if n["id"] == link[1])
            assert entry["link"] in origin["outputs"][link[2]]["links"]
            inputs[entry["name"]] = [str(link[1]), link[2]]
        rebuilt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    assert rebuilt == {nid: {"class_type": n["class_type"], "inputs": n["inputs"]} for nid, n in api.items()}


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_executes_through_the_nodes(name, label):
    workflow = load_json(WORKFLOWS / "api" / f"{name}.json")
    for node in workflow.values():
        if node["class_type"] == "WallarooModelLoader":
            node["inputs"]["model"] = label  # 'tiny', or the test model until tiny is installed
    FakeSaveImage.saved = []
    results = execute(workflow)
    saved = FakeSaveImage.saved
    if name == "understand":
        (answers,) = [results[nid][0] for nid, n in workflow.items() if n["class_type"] == "WallarooUnderstand"]
        assert len(answers) == 1 and isinstance(answers[0], str)
    else:
        assert saved, "nothing reached a Save/Preview Image node"
        for _, images in saved:
            assert images.dtype == torch.float32 and images.dim() == 4 and images.shape[-1] == 3
            assert float(images.min()) >= 0 and float(images.max()) <= 1
    if name == "generate":
        assert saved[0][1].shape[0] == workflow["2"]["inputs"]["batch_size"]


# --- packaging --------------------------------------------------------------------------------------------


def test_pyproject_carries_comfy_registry_metadata_and_no_conflicting_dependencies():
    tomllib = pytest.importorskip("tomllib", reason="Python 3.11's tomllib reads pyproject.toml")
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    comfy = meta["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["PublisherId"].replace("-", "").isalnum()
    assert comfy["DisplayName"] == "Wallaroo"
    assert comfy["Icon"].startswith("https://")
    deps = meta["project"]["dependencies"]
    assert not any(d.startswith(("transformers", "xformers", "torchvision", "torchaudio")) for d in deps)
    assert all("==" not in d for d in deps), "a pinned base dependency would fight ComfyUI's own"
