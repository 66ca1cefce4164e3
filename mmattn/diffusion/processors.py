"""Radial attention processors for diffusers' video transformers.

Each class follows its stock diffusers processor step for step (projections, QK norms, rotary embedding,
text concatenation, gates, output projections) and differs only in the attention call, which goes through
`SparseAttention.attend` with the stock call as its dense fallback. Which processor serves which modules of
which transformer is said once, in `mmattn.diffusion.models`.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from mmattn.kernels import rotary_embedding

from .attention import SparseAttention

__all__ = [
    "CogVideoXRadialAttnProcessor",
    "HunyuanVideo15RadialAttnProcessor",
    "HunyuanVideoRadialAttnProcessor",
    "Kandinsky5RadialAttnProcessor",
    "LTX2RadialAttnProcessor",
    "LTXRadialAttnProcessor",
    "MochiRadialAttnProcessor",
    "RadialProcessor",
    "WanRadialAttnProcessor",
]


def _dispatch():
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    return dispatch_attention_fn


class RadialProcessor:
    """Base: the handle's `SparseAttention` state and this layer's index (paper: dense layers come first)."""

    _attention_backend = None
    _parallel_config = None

    fused_rotary = True
    """Sparse layers rotate queries and keys with one kernel (`mmattn.kernels.rotary_embedding`, forward and
    backward) in the models whose RoPE turns channel pairs by real (cos, sin) tables (Wan, HunyuanVideo, HunyuanVideo
    1.5, CogVideoX, LTX-Video, LTX-2's "interleaved" and "split" types, Mochi); False: the stock ops everywhere.
    Dense layers stay bitwise stock either way, and so do float64 models (the kernel rotates in float32)."""

    def __init__(self, radial: SparseAttention, layer_index: int, stock=None) -> None:
        self.radial = radial
        self.layer_index = layer_index
        # Keep the backend the user chose for the stock processor: the dense fallback runs on it.
        self._attention_backend = getattr(stock, "_attention_backend", None)
        self._parallel_config = getattr(stock, "_parallel_config", None)

    def _fuses_rotary(self, x: torch.Tensor) -> bool:
        return self.fused_rotary and x.dtype != torch.float64 and not self.radial.is_dense(self.layer_index)

    def _apply_rotary_emb(self, x, freqs, sequence_dim=2):
        """diffusers' `apply_rotary_emb(x, freqs, sequence_dim=...)` with real (cos, sin) tables `[S, D]`, or the
        kernel where `_fuses_rotary(x)`."""
        if not self._fuses_rotary(x):
            from diffusers.models.embeddings import apply_rotary_emb

            return apply_rotary_emb(x, freqs, sequence_dim=sequence_dim)
        cos, sin = (table.to(x.device) for table in freqs)  # like the stock op, which takes tables on any device
        if sequence_dim == 1:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return rotary_embedding(x, cos, sin)

    def _rotate_heads(self, x, freqs, heads, stock):
        """RoPE on `[B, S, heads * D]` before the head split, by real tables (cos, sin) over the same channels:
        `stock(x, freqs)`, the model's own op, or the kernel head by head where `_fuses_rotary(x)`."""
        if not self._fuses_rotary(x):
            return stock(x, freqs)
        cos, sin = (table.unflatten(-1, (heads, -1)) for table in freqs)
        return rotary_embedding(x.unflatten(-1, (heads, -1)), cos, sin).flatten(-2)

    def _rotate_split(self, x, freqs, heads, stock):
        """LTX-2's split RoPE on `[B, S, heads * D]`: each head's halves paired, tables `(B, heads, S, D / 2)`:
        `stock(x, freqs)` or the kernel (`pairing="halves"`) where `_fuses_rotary(x)`."""
        if not self._fuses_rotary(x) or x.dim() != 3 or freqs[0].dim() != 4:
            return stock(x, freqs)
        cos, sin = (table.transpose(1, 2) for table in freqs)
        return rotary_embedding(x.unflatten(-1, (heads, -1)), cos, sin, pairing="halves").flatten(-2)

    def _attend_video(self, query, key, value, attention_mask):
        """Sparse attention of a video-only self-attention call; a call with an attention mask runs the stock call."""
        dense = self._dispatch_dense(query, key, value, attention_mask)
        if attention_mask is not None:
            return dense()
        return self.radial.attend(query, key, value, layer_index=self.layer_index, dense=dense,
                                  parallel_config=self._parallel_config)

    def _dispatch_dense(self, query, key, value, attn_mask=None):
        return lambda: _dispatch()(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=0.0,
            is_causal=False,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )


def _rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding: each (even, odd) channel pair is rotated; cos/sin repeat per pair."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out.type_as(x)


class WanRadialAttnProcessor(RadialProcessor):
    """Wan 2.1/2.2 (T2V, I2V, TI2V, VACE) self-attention (`attn1`): video tokens only.

    Text, and in image-to-video the CLIP image tokens (`add_k_proj` / `add_v_proj`), enter through the
    cross-attention `attn2`, which keeps its stock processor; the stock self-attention has no image branch.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        if encoder_hidden_states is not None or attn.add_k_proj is not None:
            raise ValueError("WanRadialAttnProcessor serves the self-attention attn1 only (no encoder_hidden_states)")
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if rotary_emb is not None:
            rotate = rotary_embedding if self._fuses_rotary(query) else _rotate_interleaved
            query, key = rotate(query, *rotary_emb), rotate(key, *rotary_emb)
        hidden_states = self._attend_video(query, key, value, attention_mask)
        hidden_states = hidden_states.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](hidden_states))


def _valid_prefix_lengths(key_mask: torch.Tensor, video_tokens: int) -> torch.Tensor:
    """Per sample, the count of valid text tokens of a [B, 1, 1, N] key mask over [video | text]."""
    key_mask = key_mask.reshape(key_mask.shape[0], -1).bool()
    text = key_mask[:, video_tokens:]
    counts = text.sum(-1)
    prefix = torch.arange(text.shape[1], device=text.device) < counts.unsqueeze(-1)
    if not bool(key_mask[:, :video_tokens].all()) or not torch.equal(text, prefix):
        raise ValueError("attention_mask: expected all video keys valid and the valid text keys left-aligned (right padding)")
    return counts


def _joint_outputs(attn, hidden_states: torch.Tensor, encoder_hidden_states, text_tokens: int):
    """HunyuanVideo's [video | text] attention output split back into (video, text), each through its own output
    projection (`to_out`, `to_add_out`) where the block has one; text-free calls return (video, None)."""
    if encoder_hidden_states is None:
        return hidden_states, None
    hidden_states, encoder_hidden_states = hidden_states[:, :-text_tokens], hidden_states[:, -text_tokens:]
    if getattr(attn, "to_out", None) is not None:
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    if getattr(attn, "to_add_out", None) is not None:
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
    return hidden_states, encoder_hidden_states


class HunyuanVideoRadialAttnProcessor(RadialProcessor):
    """HunyuanVideo double- and single-stream blocks: joint [video | text] sequence, text right-padded."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        single_stream = attn.add_q_proj is None and encoder_hidden_states is not None
        if single_stream:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            rotate = partial(self._apply_rotary_emb, freqs=image_rotary_emb, sequence_dim=1)
            if single_stream:  # the video part only
                text = encoder_hidden_states.shape[1]
                query, key = (torch.cat([rotate(t[:, :-text]), t[:, -text:]], dim=1) for t in (query, key))
            else:
                query, key = rotate(query), rotate(key)
        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            text_q = attn.add_q_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            text_k = attn.add_k_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            text_v = attn.add_v_proj(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            if attn.norm_added_q is not None:
                text_q = attn.norm_added_q(text_q)
            if attn.norm_added_k is not None:
                text_k = attn.norm_added_k(text_k)
            query, key, value = torch.cat([query, text_q], 1), torch.cat([key, text_k], 1), torch.cat([value, text_v], 1)

        text_tokens = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        dense = self._dispatch_dense(query, key, value, attention_mask)
        valid = None
        if attention_mask is not None and not self.radial.is_dense(self.layer_index):
            valid = _valid_prefix_lengths(attention_mask, query.shape[1] - text_tokens)
        hidden_states = self.radial.attend(
            query, key, value, layer_index=self.layer_index, dense=dense, text_tokens=text_tokens,
            valid_text_tokens=valid, parallel_config=self._parallel_config,
        )
        return _joint_outputs(attn, hidden_states.flatten(2, 3).to(query.dtype), encoder_hidden_states, text_tokens)


class CogVideoXRadialAttnProcessor(RadialProcessor):
    """CogVideoX (2b, 5b, 1.5) joint attention: [text | video], RoPE on the video part (5b, 1.5)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        text_tokens = encoder_hidden_states.size(1)
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch_size, sequence_length, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query[:, :, text_tokens:] = self._apply_rotary_emb(query[:, :, text_tokens:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text_tokens:] = self._apply_rotary_emb(key[:, :, text_tokens:], image_rotary_emb)

        def dense():
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
            return out.transpose(1, 2)

        if attention_mask is None:
            q, k, v = (t.transpose(1, 2) for t in (query, key, value))
            hidden_states = self.radial.attend(
                q, k, v, layer_index=self.layer_index, dense=dense, text_tokens=text_tokens, text_first=True
            )
        else:
            hidden_states = dense()
        hidden_states = hidden_states.reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        encoder_hidden_states, hidden_states = hidden_states.split([text_tokens, hidden_states.size(1) - text_tokens], dim=1)
        return hidden_states, encoder_hidden_states


def _rotate_pairs_fp32(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Mochi's rotary embedding: (even, odd) channel pairs rotated in float32, interleaved back."""
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    rotated_even = (even * cos - odd * sin).to(x.dtype)
    rotated_odd = (even * sin + odd * cos).to(x.dtype)
    return torch.stack([rotated_even, rotated_odd], dim=-1).flatten(-2)


class MochiRadialAttnProcessor(RadialProcessor):
    """Mochi joint attention: per sample [video | valid text] (padded prompt tokens are dropped, output zero)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb=None):
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        text_q, text_k, text_v = (
            t.unflatten(2, (attn.heads, -1))
            for t in (attn.add_q_proj(encoder_hidden_states), attn.add_k_proj(encoder_hidden_states), attn.add_v_proj(encoder_hidden_states))
        )
        if attn.norm_added_q is not None:
            text_q = attn.norm_added_q(text_q)
        if attn.norm_added_k is not None:
            text_k = attn.norm_added_k(text_k)
        if image_rotary_emb is not None:  # tables (S, H, D/2): one entry per pair
            rotate = rotary_embedding if self._fuses_rotary(query) else _rotate_pairs_fp32
            query, key = rotate(query, *image_rotary_emb), rotate(key, *image_rotary_emb)

        video_tokens, text_tokens = query.shape[1], text_q.shape[1]
        outputs = []
        for b in range(query.shape[0]):
            valid = torch.nonzero(attention_mask[b].flatten(), as_tuple=False).flatten()
            q, k, v = (torch.cat([t[b : b + 1], u[b : b + 1, valid]], dim=1) for t, u in ((query, text_q), (key, text_k), (value, text_v)))

            def dense(q=q, k=k, v=v):
                out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=0.0, is_causal=False)
                return out.transpose(1, 2)

            out = self.radial.attend(q, k, v, layer_index=self.layer_index, dense=dense, text_tokens=valid.numel())
            outputs.append(F.pad(out, (0, 0, 0, 0, 0, video_tokens + text_tokens - out.shape[1])))
        hidden_states = torch.cat(outputs, dim=0).flatten(2, 3)
        hidden_states, encoder_hidden_states = hidden_states.split_with_sizes((video_tokens, text_tokens), dim=1)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if hasattr(attn, "to_add_out"):
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


class LTXRadialAttnProcessor(RadialProcessor):
    """LTX-Video self-attention (`attn1`): video tokens only, RoPE before the head split."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.transformers.transformer_ltx import apply_rotary_emb

        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("LTXRadialAttnProcessor serves the self-attention attn1 only (no encoder states or mask)")
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query, key = (self._rotate_heads(t, image_rotary_emb, attn.heads, apply_rotary_emb) for t in (query, key))
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        dense = self._dispatch_dense(query, key, value)
        hidden_states = self.radial.attend(
            query, key, value, layer_index=self.layer_index, dense=dense, parallel_config=self._parallel_config
        )
        hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
        return attn.to_out[1](attn.to_out[0](hidden_states))


def _text_prefix_lengths(text_mask: torch.Tensor) -> torch.Tensor:
    """Per sample, the count of valid text tokens of a [B, T] key mask whose valid tokens come first."""
    text_mask = text_mask.bool()
    counts = text_mask.sum(-1)
    prefix = torch.arange(text_mask.shape[1], device=text_mask.device) < counts.unsqueeze(-1)
    if not torch.equal(text_mask, prefix):
        raise ValueError("attention_mask: expected the valid text tokens left-aligned (valid first, padding last)")
    return counts


class HunyuanVideo15RadialAttnProcessor(RadialProcessor):
    """HunyuanVideo 1.5 double-stream blocks: joint [video | text] sequence, text reordered valid-first.

    The text segment is the model's [image | ByT5 | Qwen] tokens, valid ones first; `attention_mask` `[B, T]`
    marks them. As in the stock processor, padded text tokens neither attend nor are attended to: their
    outputs are zero.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        query, key, value = (attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states))
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if image_rotary_emb is not None:
            query = self._apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = self._apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        text_tokens = 0
        if encoder_hidden_states is not None:
            text_tokens = encoder_hidden_states.shape[1]
            text = (proj(encoder_hidden_states) for proj in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            text_q, text_k, text_v = (t.unflatten(2, (attn.heads, -1)) for t in text)
            if attn.norm_added_q is not None:
                text_q = attn.norm_added_q(text_q)
            if attn.norm_added_k is not None:
                text_k = attn.norm_added_k(text_k)
            query, key, value = (torch.cat(pair, 1) for pair in ((query, text_q), (key, text_k), (value, text_v)))

        def dense():  # the stock call: a [B, 1, S, S] mask, valid query AND valid key
            batch, tokens = query.shape[:2]
            keys = F.pad(attention_mask, (tokens - attention_mask.shape[1], 0), value=True).bool()
            keys = keys.view(batch, 1, 1, tokens).repeat(1, 1, tokens, 1)
            return self._dispatch_dense(query, key, value, keys & keys.transpose(2, 3))()

        if self.radial.is_dense(self.layer_index) or not text_tokens:
            hidden_states = dense()
        else:
            if attention_mask.shape[1] != text_tokens:
                raise ValueError(
                    f"attention_mask: expected a [B, {text_tokens}] text mask, got shape {tuple(attention_mask.shape)}"
                )
            valid = _text_prefix_lengths(attention_mask)
            hidden_states = self.radial.attend(
                query, key, value, layer_index=self.layer_index, dense=dense, text_tokens=text_tokens,
                valid_text_tokens=valid, parallel_config=self._parallel_config,
            )
            video_tokens = query.shape[1] - text_tokens
            padded = torch.arange(text_tokens, device=valid.device) >= valid.unsqueeze(-1)  # [B, T]
            text_out = hidden_states[:, video_tokens:].masked_fill(padded[..., None, None], 0)
            hidden_states = torch.cat([hidden_states[:, :video_tokens], text_out], 1)
        return _joint_outputs(attn, hidden_states.flatten(2, 3).to(query.dtype), encoder_hidden_states, text_tokens)


class LTX2RadialAttnProcessor(RadialProcessor):
    """LTX-2 video self-attention (`attn1`) only: video tokens, RoPE (interleaved or split) before the head split.

    Audio self-attention (`audio_attn1`), the text cross-attentions (`attn2`, `audio_attn2`) and the cross-modal
    audio-to-video / video-to-audio attentions keep their stock processors. Per-head gates (`to_gate_logits`)
    and spatio-temporal guidance (`perturbation_mask`, `all_perturbed` of `LTX2PerturbedAttnProcessor`) are
    reproduced; a call with a `video_self_attention_mask` (IC-LoRA reference tokens) runs dense, since Radial
    has no additive bias.
    """

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, query_rotary_emb=None,
        key_rotary_emb=None, perturbation_mask=None, all_perturbed=None,
    ):
        from diffusers.models.transformers.transformer_ltx2 import apply_interleaved_rotary_emb, apply_split_rotary_emb

        if encoder_hidden_states is not None:
            raise ValueError("LTX2RadialAttnProcessor serves the video self-attention attn1 only (no encoder_hidden_states)")
        batch_size, tokens, _ = hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, tokens, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.to_gate_logits is not None:
            gate_logits = attn.to_gate_logits(hidden_states)
        value = attn.to_v(hidden_states)
        if all_perturbed is None:
            all_perturbed = torch.all(perturbation_mask == 0) if perturbation_mask is not None else False

        if all_perturbed:  # spatio-temporal guidance skips attention: the values pass through
            hidden_states = value
        else:
            query, key = attn.norm_q(attn.to_q(hidden_states)), attn.norm_k(attn.to_k(hidden_states))
            rotate = {
                "interleaved": partial(self._rotate_heads, heads=attn.heads, stock=apply_interleaved_rotary_emb),
                "split": partial(self._rotate_split, heads=attn.heads, stock=apply_split_rotary_emb),
            }.get(attn.rope_type)
            if query_rotary_emb is not None and rotate is not None:
                query = rotate(query, query_rotary_emb)
                key = rotate(key, key_rotary_emb if key_rotary_emb is not None else query_rotary_emb)
            query, key, heads_value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
            hidden_states = self._attend_video(query, key, heads_value, attention_mask)
            hidden_states = hidden_states.flatten(2, 3).to(query.dtype)
            if perturbation_mask is not None:
                hidden_states = torch.lerp(value, hidden_states, perturbation_mask)

        if attn.to_gate_logits is not None:
            gates = 2.0 * torch.sigmoid(gate_logits)  # [B, S, H]; zero logits give gates of 1
            hidden_states = (hidden_states.unflatten(2, (attn.heads, -1)) * gates.unsqueeze(-1)).flatten(2, 3)
        return attn.to_out[1](attn.to_out[0](hidden_states))


def _rotate_kandinsky(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Kandinsky 5's rotary embedding: 2x2 rotation matrices per channel pair in float32, rounded through bfloat16
    as the stock processor does (also for float32 / float64 models)."""
    pairs = x.reshape(*x.shape[:-1], -1, 1, 2).float()
    return (rope * pairs).sum(-1).reshape(x.shape).to(torch.bfloat16).type_as(x)


class Kandinsky5RadialAttnProcessor(RadialProcessor):
    """Kandinsky 5 visual self-attention (`visual_transformer_blocks[i].self_attention`): video tokens only.

    Text enters through the dense `cross_attention`; the text encoder blocks keep their stock processors.
    Dense ("regular") Kandinsky 5 only: with NABLA (`attention_type="nabla"`, `sparse_params` given) the
    tokens are in 8x8 fractal order and the stock processor already runs its own sparse FlexAttention mask.
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, rotary_emb=None, sparse_params=None):
        if encoder_hidden_states is not None:
            raise ValueError("Kandinsky5RadialAttnProcessor serves the visual self-attention only (no encoder_hidden_states)")
        if sparse_params is not None:
            raise ValueError(
                "sparse_params: Radial attention needs Kandinsky 5's raster token order (attention_type='regular'); "
                f"got NABLA parameters with attention_type={sparse_params.get('attention_type')!r}"
            )
        query, key, value = (
            t.unflatten(-1, (attn.num_heads, -1))
            for t in (attn.to_query(hidden_states), attn.to_key(hidden_states), attn.to_value(hidden_states))
        )
        query = attn.query_norm(query.float()).type_as(query)
        key = attn.key_norm(key.float()).type_as(key)
        if rotary_emb is not None:
            query, key = _rotate_kandinsky(query, rotary_emb), _rotate_kandinsky(key, rotary_emb)
        dense = self._dispatch_dense(query, key, value)
        hidden_states = self.radial.attend(
            query, key, value, layer_index=self.layer_index, dense=dense, parallel_config=self._parallel_config
        )
        return attn.out_layer(hidden_states.flatten(-2, -1))
