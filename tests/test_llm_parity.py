"""Parity of our Qwen2.5-VL LLM + vision path with huggingface transformers on random small weights (fp32)."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

transformers = pytest.importorskip("transformers", reason="transformers (test dependency) is not installed")
from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: E402

from bench.hf_baseline import hf_config, hf_state_dict  # noqa: E402
from helpers import make_tokenizer_and_config, randomize_  # noqa: E402
from wallaroo_nodes.engine import images  # noqa: E402
from wallaroo_nodes.engine.model import WallarooModel  # noqa: E402
from wallaroo_nodes.engine.pipeline import Pipeline  # noqa: E402
from wallaroo_nodes.engine.protocol import batch_prompts, build_understand  # noqa: E402
from wallaroo_nodes.engine.rope import text_position_ids  # noqa: E402
from wallaroo_nodes.engine.text import TextTokenizer  # noqa: E402

TOLERANCE = 1e-4


def hf_twin(ours: WallarooModel) -> Qwen2_5_VLForConditionalGeneration:
    """A transformers Qwen2.5-VL with our tiny config and a copy of our weights (the benchmark's mapping)."""
    hf = Qwen2_5_VLForConditionalGeneration(hf_config(ours)).eval()
    hf.load_state_dict({k: v.clone() for k, v in hf_state_dict(ours).items()}, strict=True)
    return hf


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parity")
    tok_path, cfg = make_tokenizer_and_config(tmp)
    torch.manual_seed(0)
    ours = randomize_(WallarooModel(cfg), seed=1).eval()
    return ours, hf_twin(ours), TextTokenizer(tok_path, cfg.tokens)


def test_text_only_logits_and_positions_match(pair):
    ours, hf, tok = pair
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 400, (2, 23), generator=g)
    valid = torch.ones(2, 23, dtype=torch.bool)
    valid[1, :6] = False  # left padding, as in the CFG batch
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=valid.long()).logits
        pos = text_position_ids(valid)
        hidden = ours(ours.embed_tokens(ids), pos, valid)
        got = ours.lm_head(hidden)
        ref_pos, _ = hf.model.get_rope_index(input_ids=ids, mm_token_type_ids=torch.zeros_like(ids),
                                             image_grid_thw=None, attention_mask=valid.long())
    # Padding positions are arbitrary (masked); transformers puts 0 there, the reference 1.
    assert torch.equal(pos[:, valid], ref_pos[:, valid])
    diff = (got - ref)[valid].abs().max().item()
    assert diff <= TOLERANCE, f"text-only logits differ by {diff}"


@pytest.mark.parametrize("size", [(150, 260), (330, 140)])
def test_image_text_logits_and_positions_match(pair, size):
    ours, hf, tok = pair
    h, w = size
    g = torch.Generator().manual_seed(h)
    image = Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy())
    cfg = ours.cfg
    patches, grid = images.vision_inputs(image, cfg.vision)
    # The image must span several attention windows for the window reordering to be exercised.
    window = cfg.vision.window_size // cfg.vision.patch_size
    assert grid[1] > window and grid[2] > window and grid[1] != grid[2]
    prompt = build_understand(tok, cfg, "What is in the picture?", grid)
    pipe = Pipeline(ours, tok)
    with torch.no_grad():
        feats = ours.vision_embeddings(patches, torch.tensor([grid]))
        prep = pipe._prepare([prompt], [feats], [None])
        got = ours.lm_head(ours(prep.embeds, prep.position_ids, prep.valid))
        ids = torch.tensor([prompt.ids])
        # transformers 5 locates image tokens through a modality mask: 1 on the vision-tower slots.
        modality = torch.zeros_like(ids)
        modality[0, prompt.vision_slots] = 1
        ref = hf(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=patches,
                 image_grid_thw=torch.tensor([grid]), mm_token_type_ids=modality).logits
        ref_pos, _ = hf.model.get_rope_index(input_ids=ids, mm_token_type_ids=modality,
                                             image_grid_thw=torch.tensor([grid]),
                                             attention_mask=torch.ones_like(ids))
    assert torch.equal(prep.position_ids, ref_pos)
    diff = (got - ref).abs().max().item()
    assert diff <= TOLERANCE, f"image+text logits differ by {diff}"


@pytest.mark.parametrize("section", [(8, 12, 12), (16, 24, 24)])
def test_interleaved_mrope_matches_qwen3_vl(section):
    """`mrope_interleaved` gives each frequency the axis Qwen3-VL's rotary embedding gives it."""
    qwen3_vl = pytest.importorskip("transformers.models.qwen3_vl.modeling_qwen3_vl",
                                   reason="this transformers has no Qwen3-VL")
    from transformers import Qwen3VLTextConfig
    from wallaroo_nodes.engine.rope import inverse_frequencies, mrope_axis_of_frequency, mrope_cos_sin
    head_dim = 2 * sum(section)
    hf_cfg = Qwen3VLTextConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                "mrope_section": list(section)})
    hf_rope = qwen3_vl.Qwen3VLTextRotaryEmbedding(hf_cfg)
    torch.manual_seed(0)
    positions = torch.randint(0, 40, (3, 2, 17))  # distinct t, h, w per token, as for image tokens
    hf_cos, hf_sin = hf_rope(torch.zeros(1, dtype=torch.float32), positions)
    inv_freq = inverse_frequencies(head_dim, 10000.0)
    cos, sin = mrope_cos_sin(positions, inv_freq, mrope_axis_of_frequency(section, interleaved=True), torch.float32)
    torch.testing.assert_close(cos, hf_cos, rtol=0, atol=1e-6)
    torch.testing.assert_close(sin, hf_sin, rtol=0, atol=1e-6)
    # The sectioned (Qwen2.5-VL) layout is a different table for the same positions.
    cos_sectioned, _ = mrope_cos_sin(positions, inv_freq, mrope_axis_of_frequency(section), torch.float32)
    assert not torch.allclose(cos_sectioned, hf_cos, atol=1e-3)
