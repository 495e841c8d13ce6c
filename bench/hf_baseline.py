"""The baseline: huggingface `transformers`' Qwen2.5-VL driven the way the Wallaroo reference drives it.

The reference (JiePKU/Wallaroo, `modeling_wallaroo.py`: `mar_t2i_generate`, `mar_i2i_generate`) calls the whole
`Qwen2_5_VLForConditionalGeneration` once per sequence position with `inputs_embeds`, an attention mask,
M-RoPE `position_ids` (3, B, L), a growing `DynamicCache`, `use_cache=True` and `output_hidden_states=True`, and
applies its image head to `hidden_states[-1]` (every position of it; the LM head's logits over the text
vocabulary are computed too, as the full model computes them). After the last code of a row it runs one more
forward with that code alone, then feeds the end-of-line token in the next forward: 1,055 forwards for a
512x512 image. The baseline here follows that structure on *our* weights (the transformers model is built
on the meta device and its parameters are our tensors, so nothing is copied), with our heads, adapters,
guidance and sampling, so only the decoding machinery differs. Two deliberate differences from the
reference, both in its favour or neutral: the attention mask grows with the sequence (the reference passes a
(B, 1) mask per step, which unmasks the CFG branch's left padding after the prefill), and understanding
uses the dynamic cache too (the reference's `mmu_generate` recomputes the whole prompt every token).

transformers is a test dependency of this project, not a runtime one: `require_transformers()` says how to
install it when it is missing.
"""
from __future__ import annotations

import inspect
from typing import Iterator

import torch

from wallaroo_nodes.engine.decode import CancelCheck, Cancelled, PreparedBatch, RowCallback
from wallaroo_nodes.engine.model import WallarooModel
from wallaroo_nodes.engine.sampling import SamplingParams, guide, sample

INSTALL_HINT = "pip install 'transformers>=5,<6' (a test dependency: pip install -e .[test])"


class BaselineUnavailable(RuntimeError):
    """transformers (or a Qwen2.5-VL model class in it) cannot be imported."""


def require_transformers():
    """The transformers module, or BaselineUnavailable naming the install command."""
    try:
        import transformers
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything at import
        raise BaselineUnavailable(f"the transformers baseline needs huggingface transformers with Qwen2.5-VL "
                                  f"({type(exc).__name__}: {exc}); install it with {INSTALL_HINT}") from exc
    return transformers


def hf_config(ours: WallarooModel):
    """A transformers Qwen2.5-VL config with our sizes (also used by tests/test_llm_parity.py)."""
    require_transformers()
    from transformers import Qwen2_5_VLConfig

    c = ours.cfg
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=c.llm.vocab_size, hidden_size=c.llm.hidden_size,
                         intermediate_size=c.llm.intermediate_size, num_hidden_layers=c.llm.num_layers,
                         num_attention_heads=c.llm.num_heads, num_key_value_heads=c.llm.num_kv_heads,
                         rms_norm_eps=c.llm.rms_norm_eps, max_position_embeddings=c.llm.max_position_embeddings,
                         rope_parameters={"rope_type": "default", "rope_theta": c.llm.rope_theta,
                                          "mrope_section": list(c.llm.mrope_section)},
                         bos_token_id=None, eos_token_id=None, pad_token_id=None),
        vision_config=dict(depth=c.vision.depth, hidden_size=c.vision.hidden_size, num_heads=c.vision.num_heads,
                           intermediate_size=c.vision.intermediate_size, out_hidden_size=c.vision.out_hidden_size,
                           fullatt_block_indexes=list(c.vision.fullatt_block_indexes),
                           window_size=c.vision.window_size, patch_size=c.vision.patch_size,
                           spatial_merge_size=c.vision.spatial_merge_size,
                           temporal_patch_size=c.vision.temporal_patch_size),
        image_token_id=c.tokens["<|image_pad|>"], video_token_id=c.tokens["<|video_pad|>"],
        vision_start_token_id=c.tokens["<|vision_start|>"], vision_end_token_id=c.tokens["<|vision_end|>"],
        tie_word_embeddings=False, attn_implementation="sdpa")
    return cfg


def hf_state_dict(ours: WallarooModel) -> dict[str, torch.Tensor]:
    """Our backbone's tensors under transformers 5's Qwen2.5-VL names."""
    theirs = {}
    for name, t in ours.state_dict().items():
        if name.startswith("model."):
            theirs["model.language_model." + name[len("model."):]] = t
        elif name.startswith("visual."):
            theirs["model." + name] = t
        elif name == "lm_head.weight":
            theirs[name] = t
    return theirs


def build_hf_twin(ours: WallarooModel):
    """`Qwen2_5_VLForConditionalGeneration` whose parameters *are* our backbone's tensors (no copy)."""
    require_transformers()
    from transformers import Qwen2_5_VLForConditionalGeneration

    if ours.cfg.vision.abs_position_grid:
        raise BaselineUnavailable("this model's vision tower has an absolute position table "
                                  "(vision.abs_position_grid), which Qwen2.5-VL in transformers does not have; the "
                                  "baseline covers the official architecture (--config mid or 7b)")
    if ours.cfg.llm.mrope_interleaved:
        raise BaselineUnavailable("this model's LLM interleaves its M-RoPE axes (llm.mrope_interleaved, Qwen3-VL's "
                                  "layout), which Qwen2.5-VL in transformers does not; the baseline covers the "
                                  "official architecture (--config mid or 7b)")
    cfg = hf_config(ours)
    with torch.device("meta"):
        hf = Qwen2_5_VLForConditionalGeneration(cfg)
    hf.load_state_dict(hf_state_dict(ours), strict=True, assign=True)
    device = ours.device
    # Non-persistent buffers (rotary inverse frequencies) are not in the state dict: rebuild those modules for real.
    text = hf.model.language_model
    with torch.device(device):
        text.rotary_emb = type(text.rotary_emb)(text.rotary_emb.config)
        # The vision tower's (never run here: vision features come from our tower, as for our engine).
        visual = hf.model.visual
        if hasattr(visual.rotary_pos_emb, "config"):
            visual.rotary_pos_emb = type(visual.rotary_pos_emb)(visual.rotary_pos_emb.config)
        else:  # older transformers: VisionRotaryEmbedding(dim, theta=10000)
            dim = visual.rotary_pos_emb.inv_freq.shape[0] * 2
            visual.rotary_pos_emb = type(visual.rotary_pos_emb)(dim)
    left = [n for n, b in hf.named_buffers() if b.is_meta] + [n for n, p in hf.named_parameters() if p.is_meta]
    if left:
        raise RuntimeError(f"transformers twin still has meta tensors: {left[:5]}")
    return hf.eval().requires_grad_(False)


class _Cache:
    """A DynamicCache, handed over as `cache` (transformers >= 5.x) or `past_key_values` (older: the old name
    warns in 5.x)."""

    def __init__(self, hf):
        from transformers import DynamicCache

        params = inspect.signature(hf.forward).parameters
        self.key = "cache" if "cache" in params else "past_key_values"
        self.value = DynamicCache(config=hf.config)

    def kwargs(self) -> dict:
        return {self.key: self.value, "use_cache": True}

    def update(self, out) -> None:
        new = getattr(out, self.key, None)
        if new is not None:
            self.value = new


def _start_positions(prep: PreparedBatch) -> torch.Tensor:
    # The last prompt token is text (its three axes agree); each row continues from its own maximum + 1.
    return prep.position_ids[:, :, -1].amax(0) + 1


@torch.inference_mode()
def decode_image_codes(hf, model: WallarooModel, prep: PreparedBatch, *, rows: int, cols: int, kind: str,
                       cfg_scale: float, params: SamplingParams, generator: torch.Generator | None,
                       on_row: RowCallback | None = None, should_cancel: CancelCheck | None = None,
                       on_prefill=None, source_codes: torch.Tensor | None = None) -> torch.Tensor:
    """The reference's image loop (`mar_t2i_generate` / `mar_i2i_generate`) on the transformers model.

    Same contract as `wallaroo_nodes.engine.decode.decode_image_codes`: returns (n, rows, cols) codes
    (`source_codes`: the tiny model's edit copy gate, which the reference does not have).
    """
    guided = cfg_scale != 1.0
    total = prep.embeds.shape[0]
    n = total // 2 if guided else total
    head, adapter = model.image_head(kind), model.input_adapter(kind)
    eol_id = model.cfg.token_id("<|end_of_line>|")
    device = prep.embeds.device
    start = _start_positions(prep)
    cache = _Cache(hf)
    codes = torch.empty(n, rows, cols, dtype=torch.long, device=device)
    x, mask, pos = prep.embeds, prep.valid.long(), prep.position_ids
    r = c = 0
    for i in range(rows * cols + rows - 1):
        out = hf(inputs_embeds=x, attention_mask=mask, position_ids=pos, output_hidden_states=True,
                    **cache.kwargs())
        cache.update(out)
        if i == 0 and on_prefill is not None:
            on_prefill()
        if (i + 1) % (cols + 1) != 0:
            # A code position: the head over the whole last hidden state, guidance on the last position.
            logits = head(out.hidden_states[-1])[:, -1].float()
            if source_codes is not None:
                logits = model.add_source_copy(logits, out.hidden_states[-1][:, -1], source_codes[:, r * cols + c])
            if guided:
                logits = guide(logits[:n], logits[n:], cfg_scale)
            code = sample(logits, params, generator)
            codes[:, r, c] = code
            x = adapter(model.vq.codebook_entries(code).to(model.dtype))[:, None]
            if guided:
                x = x.repeat(2, 1, 1)
            c += 1
            if c == cols:
                if on_row is not None:
                    on_row(r + 1, codes[:, :r + 1])
                if should_cancel is not None and r < rows - 1 and should_cancel():
                    raise Cancelled(f"cancelled after {r + 1} of {rows} rows")
                r, c = r + 1, 0
        else:
            # The row's last code went in alone above; the end-of-line token goes in the next forward.
            x = model.embed_tokens(torch.full((total, 1), eol_id, dtype=torch.long, device=device))
        mask = torch.cat([mask, mask.new_ones(total, 1)], dim=1)
        pos = (start + i)[None, :, None].expand(3, -1, 1)
    return codes


@torch.inference_mode()
def decode_text(hf, model: WallarooModel, prep: PreparedBatch, *, max_new_tokens: int, params: SamplingParams,
                generator: torch.Generator | None, stop_ids: set[int], should_cancel: CancelCheck | None = None,
                on_prefill=None) -> Iterator[int]:
    """Token-by-token answer on the transformers model with a dynamic cache (contract of engine decode_text)."""
    if prep.embeds.shape[0] != 1:
        raise ValueError("decode_text answers one prompt at a time")
    start = _start_positions(prep)
    cache = _Cache(hf)
    embed = hf.get_input_embeddings()
    x, mask, pos = prep.embeds, prep.valid.long(), prep.position_ids
    for i in range(max_new_tokens):
        out = hf(inputs_embeds=x, attention_mask=mask, position_ids=pos, **cache.kwargs())
        cache.update(out)
        if i == 0 and on_prefill is not None:
            on_prefill()
        token = sample(out.logits[:, -1].float(), params, generator)
        tid = int(token)
        if tid in stop_ids:
            return
        yield tid
        if i == max_new_tokens - 1:
            return
        if should_cancel is not None and should_cancel():
            raise Cancelled(f"cancelled after {i + 1} tokens")
        x = embed(token[:, None])
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
        pos = (start + i)[None, :, None].expand(3, -1, 1)
