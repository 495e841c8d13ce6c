"""The decode step: the LLM over the newly fed positions only, against weights prepared once per model.

The prompt (prefill) goes through the modules (`WallarooModel.forward_hidden`). Every decode step goes
through `forward_step` here: the same arithmetic as `llm.DecoderLayer` with fewer operations per step:

* On the CPU (when the LLM's matrices fit `PACK_BUDGET_BYTES`) the weights are packed once per model and
  weight version: q/k/v concatenated, gate/up concatenated, every matrix stored transposed (in, out) so
  that the BLAS streams it without a transposed-operand kernel (for a batch of 1-2 rows that kernel is the
  slow one). For the tiny model the matrix products of a step take about half the time. The image heads are
  packed the same way.
* Elsewhere (GPUs: a 7B model has no memory to spare for a second copy) the module parameters are used in
  place.
* Queries and keys are rotated together (one set of operations for both), the rotary tables come from the
  caller (precomputed for every decode position, the sine's sign folded in so that rotating half is one
  roll), and the final norm runs on the last position only.
* Fed generated codes come from a table `adapter(normalised codebook)` computed once per weight version,
  so a step looks its input up instead of running the adapter.

`DecodeWeights` is cached on the model and rebuilt when any of its source tensors is replaced or modified in
place (tensor version counters), so training between two decodes never leaves stale copies behind.
"""
from __future__ import annotations

import functools
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention
from .llm import rms_norm

PACK_BUDGET_BYTES = 1 << 30  # pack (copy) the LLM matrices on the CPU only when they take at most this much


class _Layer(nn.Module):
    """One decoder layer's weights: packed copies, or the layer's own modules."""

    def __init__(self, layer: nn.Module, pack: bool):
        super().__init__()
        self.packed = pack
        self.input_norm = layer.input_layernorm
        self.post_norm = layer.post_attention_layernorm
        a, m = layer.self_attn, layer.mlp
        if pack:
            qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
            self.register_buffer("qkv_t", qkv.t().contiguous(), persistent=False)
            self.register_buffer("qkv_b", torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]), persistent=False)
            self.register_buffer("o_t", a.o_proj.weight.t().contiguous(), persistent=False)
            self.register_buffer("gate_up_t", torch.cat([m.gate_proj.weight, m.up_proj.weight]).t().contiguous(),
                                 persistent=False)
            self.register_buffer("down_t", m.down_proj.weight.t().contiguous(), persistent=False)
        else:
            self.attn = a
            self.mlp = m


def _tensors_of(model: nn.Module) -> list[torch.Tensor]:
    """Every tensor DecodeWeights derives from (LLM layers, final norm, image heads, adapters, codebook)."""
    parts = [model.model.layers, model.model.norm, model.gen_image_head, model.gen_input_adapter, model.vq.quantize]
    if model.cfg.has_edit:
        parts += [model.edit_image_head, model.edit_input_adapter]
    return [p for part in parts for p in part.parameters()]


def _signature(tensors: list[torch.Tensor]) -> tuple:
    sig = []
    for t in tensors:
        try:
            version = t._version
        except RuntimeError:  # inference tensors keep no version counter
            version = -1
        sig.append((t.data_ptr(), version, t.dtype))
    return tuple(sig)


class DecodeWeights(nn.Module):
    """Weights laid out for decode steps; get it with `decode_weights(model)`."""

    def __init__(self, model: nn.Module, pack: bool | None = None):
        super().__init__()
        c = model.cfg.llm
        if pack is None:
            matrices = sum(p.numel() * p.element_size() for p in model.model.layers.parameters() if p.dim() == 2)
            pack = model.device.type == "cpu" and matrices <= PACK_BUDGET_BYTES
        self.packed = pack
        self.num_heads, self.num_kv_heads, self.head_dim = c.num_heads, c.num_kv_heads, c.head_dim
        self.intermediate = c.intermediate_size
        self.eps = c.rms_norm_eps
        self.layers = nn.ModuleList(_Layer(layer, pack) for layer in model.model.layers)
        self.final_norm = model.model.norm
        self._model_ref = weakref.ref(model)  # not a submodule, and no reference cycle keeping the model alive
        self._heads: dict[str, object] = {}
        self._tables: dict[str, torch.Tensor] = {}
        self.signature = _signature(_tensors_of(model))

    # --- heads and fed-code embeddings ------------------------------------------------------------
    def image_head(self, kind: str):
        """A callable (B, D) -> (B, codebook_size) logits for 'generate' or 'edit'."""
        if kind not in self._heads:
            head = self._model_ref().image_head(kind)
            if self.packed:
                with torch.inference_mode():
                    w0, w2 = head[0].weight.t().contiguous(), head[2].weight.t().contiguous()
                self._heads[kind] = functools.partial(_packed_head, w0, head[0].bias, w2, head[2].bias)
            else:
                self._heads[kind] = head
        return self._heads[kind]

    def code_table(self, kind: str) -> torch.Tensor:
        """Embeddings (codebook_size, D) fed back for each VQ code: the adapter over the normalised codebook."""
        if kind not in self._tables:
            model = self._model_ref()
            with torch.inference_mode():
                entries = model.vq.quantize.normalized().to(model.dtype)
                self._tables[kind] = model.input_adapter(kind)(entries).contiguous()
        return self._tables[kind]


def _packed_head(w0: torch.Tensor, b0: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor | None,
                 h: torch.Tensor) -> torch.Tensor:
    """Linear-GELU-Linear with transposed weights (the image heads of a packed DecodeWeights)."""
    out = torch.mm(F.gelu(torch.addmm(b0, h, w0)), w2)
    return out if b2 is None else out + b2


# model -> its DecodeWeights; outside the model, so that state dicts, copies and pickles of it are unaffected.
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decode_weights(model: nn.Module, pack: bool | None = None) -> DecodeWeights:
    """The model's DecodeWeights, built on first use and rebuilt when its source tensors changed.

    pack: None chooses (packed copies on the CPU within PACK_BUDGET_BYTES); True/False forces a layout.
    """
    cached = _CACHE.get(model)
    if cached is not None and (pack is None or cached.packed == pack):
        if cached.signature == _signature(_tensors_of(model)):
            return cached
    with torch.inference_mode():
        built = DecodeWeights(model, pack)
    _CACHE[model] = built
    return built


def forward_step(w: DecodeWeights, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor,
                 mask: torch.Tensor | None, cache, backend: str = "sdpa") -> torch.Tensor:
    """Hidden state (B, D) after the last of n new positions: x (B, n, D); cos and signed_sin (B, n, head_dim)
    as `WallarooModel.text_rope` returns them.

    `cache` stores this step's keys/values and returns everything to attend (`write(layer, k, v)`), then
    `advance(n)`; `mask` is the (B, 1, n, keys) attention mask or None.
    """
    b, n, dim = x.shape
    hq, hkv, hd = w.num_heads, w.num_kv_heads, w.head_dim
    qk_width = (hq + hkv) * hd
    x = x.reshape(b * n, dim)  # rows = positions: the matrix products run on 2-D operands directly
    half = hd // 2
    if w.packed:
        cos_h, sin_h = cos[:, :, None], signed_sin[:, :, None]  # (B, n, 1, hd): q and k heads rotate together
    else:
        cos_h, sin_h = cos[:, None], signed_sin[:, None]  # (B, 1, n, hd)
    for i, layer in enumerate(w.layers):
        h = rms_norm(x, layer.input_norm.weight, w.eps)
        if layer.packed:
            qkv = torch.addmm(layer.qkv_b, h, layer.qkv_t)
            qk = qkv[:, :qk_width].view(b, n, hq + hkv, hd)
            qk = qk * cos_h + qk.roll(half, -1) * sin_h  # == rotate_half(qk) * sin, exactly
            q, k = qk[:, :, :hq].transpose(1, 2), qk[:, :, hq:].transpose(1, 2)
            v = qkv[:, qk_width:].view(b, n, hkv, hd).transpose(1, 2)
        else:
            a = layer.attn
            q = a.q_proj(h).view(b, n, hq, hd).transpose(1, 2)
            k = a.k_proj(h).view(b, n, hkv, hd).transpose(1, 2)
            v = a.v_proj(h).view(b, n, hkv, hd).transpose(1, 2)
            q = q * cos_h + q.roll(half, -1) * sin_h
            k = k * cos_h + k.roll(half, -1) * sin_h
        k, v = cache.write(i, k, v)
        out = attention(q, k, v, mask, backend).transpose(1, 2).reshape(b * n, hq * hd)
        if layer.packed:
            x = torch.addmm(x, out, layer.o_t)  # the residual add rides on the product
            gate_up = torch.mm(rms_norm(x, layer.post_norm.weight, w.eps), layer.gate_up_t)
            gate, up = gate_up.split(w.intermediate, dim=-1)
            x = torch.addmm(x, F.silu(gate) * up, layer.down_t)
        else:
            x = x + layer.attn.o_proj(out)
            x = x + layer.mlp(rms_norm(x, layer.post_norm.weight, w.eps))
    cache.advance(n)
    last = x.view(b, n, dim)[:, -1]
    return rms_norm(last, w.final_norm.weight, w.eps)
