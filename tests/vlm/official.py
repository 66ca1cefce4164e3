"""Independent transcriptions of the official code of each LVLM intervention, for the fidelity tests.

Written from specs/vlm.md and the official repositories (MICV-yonsei/VisAttnSink @98e62d6, amazon-science/GIFT
@e20b8a9, pkunlp-icler/FastV @d165972, Cooperx521/PyramidDrop @6444f30, sihany077/VFlowOpt @129eeef), in their
parameter conventions, for one prompt (batch size 1, as the official code); nothing here comes from mmattn. The tiny
model's decoder is run by hand over the whole sequence at every step, without a KV cache: each step recomputes what
the official cached run holds, with the decisions of the prefill (sinks, saliency, kept tokens) reused. Attention is
eager with an fp32 softmax (the official code runs eager attention), edited by `Official.attend` through a function
registered with transformers' AttentionInterface.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from transformers import AttentionInterface

_IMPLEMENTATION = "official_transcription"


class Official:
    """The prompt of `inputs` run through `model` by hand. Subclasses edit attention probabilities (`attend`) or
    shorten the sequence entering a layer (`stage`); `greedy` decodes.

    embeds [1, L, D]: the decoder input (image features in place); positions: its rotary positions, [1, L] or
    Qwen2-VL's [3, 1, L]; image: the prompt's image-token positions (one contiguous image).
    """

    def __init__(self, model, inputs: dict) -> None:
        self.model, self.lm = model, model.model.language_model
        captured = {}
        hook = self.lm.register_forward_pre_hook(lambda m, a, kw: captured.update(kw), with_kwargs=True)
        with torch.no_grad():
            model(**inputs)
        hook.remove()
        self.embeds = captured["inputs_embeds"]
        positions = captured.get("position_ids")
        if positions is None:
            positions = torch.arange(self.embeds.shape[1], device=self.embeds.device)[None]
        self.positions = positions[1:] if positions.dim() == 3 and positions.shape[0] == 4 else positions
        self.image = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
        self.prompt_len = self.embeds.shape[1]
        self.decoding = False
        self.attentions: dict[int, torch.Tensor] = {}  # the prefill's (edited) probabilities per layer
        self.margin = math.inf  # how close a discrete decision came to its threshold (relative), see `decide`

    def decide(self, value: torch.Tensor, threshold: float | torch.Tensor) -> None:
        """Note the relative distance of `value` from `threshold`: a run in lower precision may decide otherwise
        where it is small."""
        distance = ((value - threshold).abs() / torch.as_tensor(threshold).abs().clamp_min(1e-6)).min()
        self.margin = min(self.margin, float(distance))

    def attend(self, layer: int, probs: torch.Tensor) -> None:
        """Edit the fp32 probabilities [1, H, L, L] of `layer` in place."""

    def stage(self, layer: int, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The sequence entering `layer`; positions index tokens on their last dimension."""
        return hidden, positions

    def attention(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        logits = query @ key.transpose(2, 3) * scaling
        length = logits.shape[-1]
        future = torch.ones(length, length, dtype=torch.bool, device=logits.device).triu(1)
        probs = logits.masked_fill(future, float("-inf")).softmax(-1, dtype=torch.float32)
        self.attend(module.layer_idx, probs)
        if not self.decoding:
            self.attentions[module.layer_idx] = probs.clone()
        return (probs.to(value.dtype) @ value).transpose(1, 2).contiguous(), probs

    def last_logits(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = embeds
        for layer, block in enumerate(self.lm.layers):
            hidden, positions = self.stage(layer, hidden, positions)
            hidden = block(hidden, attention_mask=None, position_embeddings=self.lm.rotary_emb(hidden, positions))
        return self.model.lm_head(self.lm.norm(hidden[:, -1:]))[:, -1].float()

    @torch.no_grad()
    def greedy(self, steps: int, forced: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(tokens [1, steps], logits of each step [1, V]): the prefill, then steps - 1 decoding steps, of the
        greedy tokens or of the `forced` ones [1, steps]."""
        embeds, positions, tokens, logits = self.embeds, self.positions, [], []
        with self._attention():
            for step in range(steps):
                self.decoding = step > 0
                logits.append(self.last_logits(embeds, positions))
                tokens.append(logits[-1].argmax(-1, keepdim=True) if forced is None else forced[:, step : step + 1])
                embeds = torch.cat([embeds, self.model.get_input_embeddings()(tokens[-1]).to(embeds.dtype)], 1)
                following = torch.full_like(positions[..., -1:], int(positions.max()) + 1)  # on every axis
                positions = torch.cat([positions, following], -1)
        return torch.cat(tokens, 1), logits

    @contextmanager
    def _attention(self):
        config = self.model.config.get_text_config()
        previous = config._attn_implementation
        AttentionInterface.register(_IMPLEMENTATION, self.attention)
        self.model.set_attn_implementation({"text_config": _IMPLEMENTATION})
        try:
            yield
        finally:
            self.model.set_attn_implementation({"text_config": previous})


class VAROfficial(Official):
    """VisAttnSink (src/logic/logic.py, src/model/llava.py), code conventions: `p` is the share of sink attention
    KEPT, a (head, row) is image-centric iff the visual-sink portion sum_{V∩sink} A / sum_V (A + 1e-6) <= rho and
    sum_V A >= summ. DimProspector: sinks {j : max_d |rmsnorm(h_j)_d| > tau} at layers >= 2, in the prefill only.
    HeadFork selects no head in a layer without a visual sink. VARProcessor: rows after the image (and every decoded
    row); sinks (visual and text) keep p, the image tokens gain (1-p) of the sinks' mass in proportion to their
    non-sink attention. `except_last_layer`: the paper's rule; the released code's flag is dead (False)."""

    def __init__(self, model, inputs, dims, tau=20.0, rho=0.5, summ=0.2, p=0.6, except_last_layer=False) -> None:
        super().__init__(model, inputs)
        self.dims, self.tau, self.rho, self.summ, self.p = list(dims), tau, rho, summ, p
        self.layers = len(self.lm.layers) - (1 if except_last_layer else 0)
        self.sinks: dict[int, torch.Tensor] = {}

    def stage(self, layer, hidden, positions):
        if not self.decoding and layer >= 2:
            x = hidden[0].float()
            phi = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).abs()[:, self.dims].amax(-1)
            self.sinks[layer] = (phi > self.tau).nonzero().flatten()
            self.decide(phi, self.tau)
        return hidden, positions

    def attend(self, layer, probs):
        if layer not in self.sinks or layer >= self.layers:
            return
        im, pa = int(self.image[0]), len(self.image)
        sinks = self.sinks[layer]
        visual = sinks[(sinks >= im) & (sinks < im + pa)]
        if not len(visual):
            return
        text = sinks[~torch.isin(sinks, visual)]
        image_attn = probs[0, :, :, im : im + pa]
        portion = image_attn[..., visual - im].sum(-1) / (image_attn + 1e-6).sum(-1)
        selected = (portion <= self.rho) & (image_attn.sum(-1) >= self.summ)
        selected[:, : im + pa] = False
        self.decide(portion[:, im + pa :], self.rho)
        self.decide(image_attn[:, im + pa :].sum(-1), self.summ)
        for head, row in selected.nonzero().tolist():
            original = probs[0, head, row].clone()
            edited = probs[0, head, row]
            edited[text] *= self.p
            edited[visual] *= self.p
            budget = (1 - self.p) * (original[visual].sum() + original[text].sum())
            receivers = original[im : im + pa].clone()
            receivers[visual - im] = 0
            edited[im : im + pa] += budget * receivers / receivers.sum()


class GIFTOfficial(Official):
    """GIFT (inference.py, patched modeling_llama / modeling_qwen2_vl): the saliency from a plain prefill's attention
    (a separate pass), D = max(A[i] - A[i-1], 0) over query rows [qs, qe] and image columns, rows of the `selected`
    query tokens (offsets from qs), top H//2 heads per layer, mean; clamp at mean ± 3 torch.std (N - 1), min-max,
    exp(alpha ·). Enhancement of the last row of every forward: vision heads (top H//2 by image mass) times the map,
    query heads (top H//2 by query mass) times r, then rows renormalised (LLaMA: every row; Qwen2-VL: the last)."""

    def __init__(self, model, inputs, saliency_layers, enhance_layers, alpha, selected=None) -> None:
        super().__init__(model, inputs)
        qwen = model.config.model_type.startswith("qwen")
        self.vs, self.ve = int(self.image[0]), int(self.image[-1])
        self.qs, self.qe = self.ve + (2 if qwen else 3), self.prompt_len - 6
        self.enhance_layers, self.every_row = set(enhance_layers), not qwen
        plain = Official(model, inputs)
        plain.greedy(1)
        attn = torch.stack([plain.attentions[layer][0] for layer in saliency_layers])
        shifts = (attn[:, :, self.qs : self.qe + 1] - attn[:, :, self.qs - 1 : self.qe])[..., self.vs : self.ve + 1]
        shifts[shifts < 0.0] = 0.0
        if selected is not None:
            shifts = shifts[:, :, selected]
        heads = shifts.sum((2, 3)).topk(shifts.shape[1] // 2, dim=-1).indices
        for layer_shifts in shifts.sum((2, 3)):
            self.decide_ranking(layer_shifts)
        shifts = shifts.gather(1, heads[..., None, None].expand(-1, -1, *shifts.shape[2:]))
        heatmap = shifts.mean((0, 1, 2))
        mean, std = heatmap.mean(), heatmap.std()
        self.clamped = bool(((heatmap < mean - 3 * std) | (heatmap > mean + 3 * std)).any())
        heatmap = heatmap.clamp((mean - 3 * std).item(), (mean + 3 * std).item())
        self.multiplier = torch.exp((heatmap - heatmap.min()) / (heatmap.max() - heatmap.min()) * alpha)

    def decide_ranking(self, masses: torch.Tensor) -> None:
        """The top half of heads by `masses` [H]: the decision hinges on the H//2-th and the next mass."""
        ranked = masses.sort(descending=True).values
        self.decide(ranked[len(ranked) // 2], ranked[len(ranked) // 2 - 1])

    def attend(self, layer, probs):
        if layer not in self.enhance_layers:
            return
        heads = probs.shape[1] // 2
        for row in range(self.prompt_len - 1, probs.shape[2]):  # the last row of each forward of the cached run
            vision = probs[0, :, row, self.vs : self.ve + 1]
            query = probs[0, :, row, self.qs : self.qe + 1]
            vision_heads = vision.sum(-1).topk(heads).indices
            self.decide_ranking(vision.sum(-1))
            self.decide_ranking(query.sum(-1))
            boosted = vision[vision_heads] * self.multiplier
            scale = boosted.sum() / vision[vision_heads].sum()
            vision[vision_heads] = boosted
            query_heads = query.sum(-1).topk(heads).indices
            query[query_heads] *= scale
            if not self.every_row:
                probs[0, :, row] /= probs[0, :, row].sum(-1, keepdim=True)
        if self.every_row:
            probs /= probs.sum(-1, keepdim=True)


class FastVOfficial(Official):
    """FastV, llava-hf fork (modeling_llama.py): at layer K the image tokens are ranked by the head-mean attention of
    the last row of layer K-1, round(N (1 - R)) kept at their original positions. With the cache (KV-cache variant)
    the prefill's choice holds for every step; without it (inplace variant) every forward ranks again."""

    def __init__(self, model, inputs, k, r, cache=True) -> None:
        super().__init__(model, inputs)
        self.k, self.r, self.cache = k, r, cache
        self.kept: torch.Tensor | None = None  # prompt positions layers >= K hold

    def attend(self, layer, probs):
        if layer == self.k - 1 and not (self.decoding and self.cache):
            im, n = int(self.image[0]), len(self.image)
            top = probs[0].mean(0)[-1, im : im + n].topk(round(n * (1 - self.r))).indices + im
            self.kept = torch.cat([torch.arange(im), top, torch.arange(im + n, probs.shape[-1])]).sort().values

    def stage(self, layer, hidden, positions):
        if layer != self.k:
            return hidden, positions
        keep = torch.cat([self.kept, torch.arange(self.kept[-1] + 1, hidden.shape[1])])  # and the decoded tokens
        return hidden[:, keep], positions[..., keep]


class PyramidDropOfficial(Official):
    """PyramidDrop (llava/model/modeling_llama_pdrop.py, pdrop_rank_drop): before each layer of `layer_list`, the
    image tokens are ranked by that layer's own softmax attention (input-normed q/k, rotary at the current positions)
    of the last prompt token, head mean, and int(N · ratio) of the original N kept (`ratios`: the code's
    image_token_ratio_list, one per stage); positions are renumbered 0..n-1 after each drop (decoded tokens follow)."""

    def __init__(self, model, inputs, layer_list, ratios) -> None:
        super().__init__(model, inputs)
        self.stages = dict(zip(layer_list, ratios))
        self.n, self.start = len(self.image), int(self.image[0])
        self.held = torch.arange(self.prompt_len)  # prompt positions of the tokens entering the next stage
        self.kept: dict[int, torch.Tensor] = {}  # per stage layer, the prompt positions it holds
        self.local: dict[int, tuple[torch.Tensor, int]] = {}  # per stage, its kept rows and its prompt rows' count

    def stage(self, layer, hidden, positions):
        if layer not in self.stages:
            return hidden, positions
        if not self.decoding:
            present = len(self.held) - (self.prompt_len - self.n)  # image tokens the sequence holds
            image = self._scores(layer, hidden, positions)[self.start : self.start + present]
            top = image.topk(int(self.n * self.stages[layer])).indices.sort().values + self.start
            rows = torch.cat([torch.arange(self.start), top, torch.arange(self.start + present, len(self.held))])
            self.local[layer] = rows, len(self.held)
            self.held = self.kept[layer] = self.held[rows]
        rows, entering = self.local[layer]
        rows = torch.cat([rows, torch.arange(entering, hidden.shape[1])])  # and the decoded tokens
        return hidden[:, rows], torch.arange(len(rows))[None]

    def _scores(self, layer, hidden, positions):
        block = self.lm.layers[layer]
        attention, config = block.self_attn, self.lm.config
        x = block.input_layernorm(hidden)
        heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, attention.head_dim
        query = attention.q_proj(x).view(1, -1, heads, dim).transpose(1, 2)
        key = attention.k_proj(x).view(1, -1, kv_heads, dim).transpose(1, 2).repeat_interleave(heads // kv_heads, 1)
        cos, sin = (t[:, None] for t in self.lm.rotary_emb(x, positions))

        def rotate(t):
            half = t.shape[-1] // 2
            return t * cos + torch.cat([-t[..., half:], t[..., :half]], -1) * sin

        logits = rotate(query)[:, :, -1:] @ rotate(key).transpose(2, 3) / math.sqrt(dim)
        return logits.softmax(-1, dtype=torch.float32)[0, :, 0].mean(0)


class VFlowOptOfficial(Official):
    """VFlowOpt (siglip_encoder.py, llava_qwen_training_free.py, modeling_qwen2.py forward_illava) on one LLaVA image
    (square grid of `side`², the CLS token of a CLIP tower dropped after the importance map):

    importance I = c + alpha_v softmax(E): c_j = mean over global rows i (received_i > t · mean received) of the
    head-mean attention Ā[i, j] of ViT layer `vit_layer`; E = entropy (bits, log2(p + 1e-10)) of the 256-bin
    histogram of round(sum_c 0.3333 · uint8(255 x_c)) per patch. ViT-output prune: the reduce = round(N (1 - r_v))
    plus int(N / m²) lowest tokens are grouped by (floor(row / m), floor(col / m)); each group becomes its
    importance-weighted mean (weights / their sum) at its most important member. The decoder input holds the kept
    tokens at positions 0..n-1. At each LLM layer of `llm_layers` the round(n (1 - r)) lowest of the n image tokens
    present are removed (positions kept)."""

    def __init__(self, model, inputs, vit_layer, t, alpha_v, m, r_v, llm_layers, llm_ratios) -> None:
        captured = {}
        tower = model.model.vision_tower
        layer = getattr(tower, "vision_model", tower).encoder.layers[vit_layer]
        hook = layer.register_forward_pre_hook(lambda module, args: captured.update(hidden=args[0]))
        super().__init__(model, inputs)
        hook.remove()
        self.importance = self._importance(layer, captured["hidden"], inputs["pixel_values"], t, alpha_v,
                                           model.config.vision_config.patch_size)
        kept, features = self._recycle(self.embeds[0, self.image], self.importance, m, r_v)
        start, end = int(self.image[0]), int(self.image[-1]) + 1
        self.held = torch.cat([torch.arange(start), self.image[kept], torch.arange(end, self.prompt_len)])
        self.kept = {0: self.held}  # per stage layer, the prompt positions it holds
        self.embeds = torch.cat([self.embeds[:, :start], features[kept][None], self.embeds[:, end:]], 1)
        self.positions = torch.arange(self.embeds.shape[1])[None]
        self.prompt_len, self.start, self.combined = self.embeds.shape[1], start, self.importance[kept]
        self.stages = dict(zip(llm_layers, llm_ratios))
        self.survivors: dict[int, torch.Tensor] = {}  # per LLM stage, which prompt tokens entering it survive

    @staticmethod
    def _importance(layer, hidden, pixels, t, alpha_v, patch):
        x = layer.layer_norm1(hidden)[0]
        attention = layer.self_attn
        heads = attention.num_heads

        def split(projection):
            return projection(x).view(x.shape[0], heads, -1).transpose(0, 1).float()

        attn = (split(attention.q_proj) @ split(attention.k_proj).transpose(1, 2) * attention.scale).softmax(-1)
        attn = attn.mean(0)
        received = attn.mean(0)
        combined = attn[torch.nonzero(received > t * received.mean(), as_tuple=True)[0]].mean(0)[1:]
        images = pixels.unfold(2, patch, patch).unfold(3, patch, patch).permute(0, 2, 3, 1, 4, 5)
        patches = (images.reshape(-1, 3, patch, patch) * 255).to(torch.uint8).float()
        gray = (patches * torch.tensor([0.3333, 0.3333, 0.3333]).view(1, 3, 1, 1)).sum(1)
        values = torch.round(gray.view(gray.shape[0], -1)).long()
        hist = torch.zeros(values.shape[0], 256).scatter_add_(1, values, torch.ones_like(values, dtype=torch.float))
        prob = hist / hist.sum(1, keepdim=True)
        entropy = -(prob * torch.log2(prob + 1e-10)).sum(1)
        return combined + alpha_v * entropy.softmax(0)

    @staticmethod
    def _recycle(features, importance, m, r_v):
        n = len(importance)
        side = math.isqrt(n)
        reduce = round(n * (1 - r_v))
        low = torch.sort(importance).indices[: reduce + int(n / (m * m))]
        keep = torch.ones(n, dtype=torch.bool)
        keep[low] = False
        cells = (torch.stack([low // side, low % side], 1).float() / m).floor().long()
        _, group_of = torch.unique(cells, dim=0, return_inverse=True)
        features = features.clone()
        for group in range(int(group_of.max()) + 1 if len(low) else 0):
            members = low[group_of == group]
            weights = importance[members].float()
            weights /= weights.sum()
            target = members[importance[members].argmax()]
            features[target] = (weights[:, None] * features[members]).sum(0)
            keep[target] = True
        return keep, features

    def stage(self, layer, hidden, positions):
        if layer not in self.stages:
            return hidden, positions
        if not self.decoding:
            low = torch.sort(self.combined).indices[: round(len(self.combined) * (1 - self.stages[layer]))]
            survivors = torch.ones(len(self.held), dtype=torch.bool)
            survivors[low + self.start] = False
            self.combined = self.combined[survivors[self.start : self.start + len(self.combined)]]
            self.survivors[layer], self.held = survivors, self.held[survivors]
            self.kept[layer] = self.held
        keep = torch.cat([self.survivors[layer], torch.ones(hidden.shape[1] - len(self.survivors[layer]), dtype=bool)])
        return hidden[:, keep], positions[..., keep]
