"""`WallarooModel`: the LLM, the vision tower, the VQ tokenizer and Wallaroo's image heads and adapters.

The model runs one forward over embeddings; which embeddings (text tokens, vision features, VQ pixel
features, generated-code adapters) is decided by the protocol builders and the decoding loops.
Parameter names are the official checkpoint's without its `wallaroo.` prefix, except that the
reference's misspelt `*_adpater` modules are named `*_adapter` here (the converter renames them).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import WallarooConfig
from .kv_cache import KVCache
from .llm import DecoderBody
from .rope import inverse_frequencies, mrope_axis_of_frequency, mrope_cos_sin
from .vision import VisionTower
from .vq import VQModel

IMAGE_KINDS = ("generate", "edit")


def _mlp(d_in: int, d_hidden: int, d_out: int, last_bias: bool = True) -> nn.Sequential:
    # Linear-GELU-Linear: indices 0 and 2 carry the weights, as in the checkpoint.
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out, bias=last_bias))


class WallarooModel(nn.Module):
    """All weights of one Wallaroo model and the forward passes the decoders need."""

    def __init__(self, cfg: WallarooConfig):
        super().__init__()
        self.cfg = cfg
        d, code_dim, codes = cfg.llm.hidden_size, cfg.vq.codebook_embed_dim, cfg.vq.codebook_size
        self.model = DecoderBody(cfg.llm)
        self.lm_head = nn.Linear(d, cfg.llm.vocab_size, bias=False)
        self.visual = VisionTower(cfg.vision)
        self.vq = VQModel(cfg.vq)
        self.gen_image_head = _mlp(d, d, codes, last_bias=False)
        self.gen_input_adapter = _mlp(code_dim, d, d)
        if cfg.has_edit:
            self.edit_image_head = _mlp(d, d, codes, last_bias=False)
            self.edit_input_adapter = _mlp(code_dim, d, d)
            self.pixel_adapter = _mlp(code_dim, d, d)
            if cfg.edit_copy_source:
                self.edit_copy_gate = nn.Linear(d, 1)
        # Rotary tables are plain attributes, not buffers: `.to(bf16)` would round the frequencies.
        self._rope: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.attention_backend = "sdpa"

    def rope_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 inverse frequencies and the M-RoPE axis of each, cached per device."""
        if device not in self._rope:
            c = self.cfg.llm
            self._rope[device] = (inverse_frequencies(c.head_dim, c.rope_theta, device),
                                  mrope_axis_of_frequency(c.mrope_section, device, c.mrope_interleaved))
        return self._rope[device]

    # --- basic pieces -------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def set_attention_backend(self, backend: str) -> None:
        """Use this (already resolved) backend in the LLM and the vision tower."""
        self.attention_backend = backend
        self.visual.attention_backend = backend

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Text-token embeddings (B, L) -> (B, L, D)."""
        return self.model.embed_tokens(ids)

    def image_head(self, kind: str) -> nn.Module:
        """The code-predicting head for 'generate' or 'edit'."""
        return self._by_kind(kind, self.gen_image_head, "edit_image_head")

    def input_adapter(self, kind: str) -> nn.Module:
        """The adapter that feeds a sampled code back for 'generate' or 'edit'."""
        return self._by_kind(kind, self.gen_input_adapter, "edit_input_adapter")

    def _by_kind(self, kind: str, gen: nn.Module, edit_name: str) -> nn.Module:
        if kind == "generate":
            return gen
        if kind == "edit":
            if not self.cfg.has_edit:
                raise ValueError(f"model {self.cfg.name!r} has no editing heads; it cannot edit images")
            return getattr(self, edit_name)
        raise ValueError(f"unknown image kind {kind!r}; expected one of {IMAGE_KINDS}")

    def code_embeddings(self, codes: torch.Tensor, kind: str) -> torch.Tensor:
        """Embeddings (…, D) that feed sampled VQ codes (…) back into the LLM."""
        entries = self.vq.codebook_entries(codes).to(self.dtype)
        return self.input_adapter(kind)(entries)

    def pixel_embeddings(self, vq_pixels: torch.Tensor) -> torch.Tensor:
        """Edit-source pixel features: (B, 3, H, W) in [-1, 1] -> (B, h*w, D) through the pixel adapter."""
        return self.pixel_embeddings_from_latents(self.vq.encode_features(vq_pixels.to(self.vq_dtype)))

    def pixel_embeddings_from_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Edit-source VQ latents (B, h, w, C) -> (B, h*w, D) through the pixel adapter."""
        return self.pixel_adapter(z.flatten(1, 2).to(self.dtype))

    def add_source_copy(self, logits: torch.Tensor, hidden: torch.Tensor, source_codes: torch.Tensor) -> torch.Tensor:
        """Edit logits (N, codes) plus the copy gate's score (from hidden (N, D)) on each row's source code (N,)."""
        gate = self.edit_copy_gate(hidden.to(self.edit_copy_gate.weight.dtype)).to(logits.dtype)
        return logits.scatter_add(-1, source_codes.unsqueeze(-1), gate)

    @property
    def vq_dtype(self) -> torch.dtype:
        return self.vq.quant_conv.weight.dtype

    def vision_embeddings(self, patches: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """Vision-tower features (N/4, D) for preprocessed patches."""
        return self.visual(patches.to(self.visual_dtype), grid_thw).to(self.dtype)

    @property
    def visual_dtype(self) -> torch.dtype:
        return self.visual.patch_embed.proj.weight.dtype

    # --- the transformer pass -------------------------------------------------------------------
    def forward_hidden(self, embeds: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None,
                       cache: KVCache | None = None, last_layer_from: int = 0) -> torch.Tensor:
        """Final hidden states (B, n, D) for embeddings (B, n, D) at M-RoPE positions (3, B, n) (rows
        `last_layer_from:` only, if given: `DecoderBody.forward`)."""
        inv_freq, axis = self.rope_tables(embeds.device)
        cos, sin = mrope_cos_sin(position_ids, inv_freq, axis, embeds.dtype)
        return self.model(embeds, cos, sin, mask, cache, self.attention_backend, last_layer_from)

    def text_rope(self, start: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary tables (B, count, head_dim) for text-like positions start[b], start[b] + 1, ... (decode steps):
        cos, and sin with its first half negated, so that `rotate_half(x) * sin == x.roll(head_dim // 2) *
        signed_sin` exactly (one roll instead of a split, a negation and a concatenation per step)."""
        inv_freq, axis = self.rope_tables(start.device)
        positions = start[:, None] + torch.arange(count, device=start.device)
        cos, sin = mrope_cos_sin(positions[None].expand(3, -1, -1), inv_freq, axis, self.dtype)
        half = sin.shape[-1] // 2
        return cos, torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)

    def forward(self, embeds: torch.Tensor, position_ids: torch.Tensor, valid: torch.Tensor,
                last_layer_from: int = 0) -> torch.Tensor:
        """Uncached forward over whole sequences (training, tests): causal + padding mask from `valid`; with
        `last_layer_from`, the hidden states of rows from there on only (`DecoderBody.forward`)."""
        n = embeds.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=embeds.device).tril()
        mask = causal[None, None] & valid.bool()[:, None, None, :]
        # A fully masked query row (left padding) would give NaN in SDPA; let it see itself.
        mask = mask | torch.eye(n, dtype=torch.bool, device=embeds.device)[None, None]
        return self.forward_hidden(embeds, position_ids, mask, last_layer_from=last_layer_from)
