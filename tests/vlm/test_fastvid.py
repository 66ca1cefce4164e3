"""FastVID on tiny Qwen2.5-VL / Qwen3-VL video prompts: identity, kept tokens and merges against oracles written here
(segmentation, DPC-kNN density peaks, attention-based selection), multi-axis rotary positions, batching, images."""

import itertools
import math

import pytest
import torch

from mmattn import vlm
from mmattn.vlm.interventions.fastvid import FastVID, density_peak_scores, dynamic_segments
from mmattn.vlm.presets import load_preset

from .test_pruning import cache_lengths, recorder
from .tiny_models import (
    QWEN_VIDEO_ID,
    QWEN_VISION_END,
    QWEN_VISION_START,
    left_padded,
    qwen_inputs,
    tiny_llava,
    tiny_qwen2_5_vl,
    tiny_qwen3_vl,
    tiny_qwen3_vl_moe,
)

FAMILIES = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
BUILD = {"qwen2_5_vl": tiny_qwen2_5_vl, "qwen3_vl": tiny_qwen3_vl, "qwen3_vl_moe": tiny_qwen3_vl_moe}
#: 6 temporal patches (12 raw frames) of 8x8 patches: 6 frames of 16 merged tokens each.
GRID = (6, 8, 8)
FRAMES, PER_FRAME = GRID[0], GRID[1] * GRID[2] // 4


def video_inputs(family, prompts=1, seed=0, videos=None):
    """Left-padded rows [text, video, text]. Qwen2.5-VL: <vision_start> all frames' tokens <vision_end>; Qwen3-VL: per
    frame a timestamp token, <vision_start>, its tokens, <vision_end> (its frames are separate rotary groups).
    `videos[i]`: the seed of row i's pixels (rows with one seed show the same video)."""
    generator = torch.Generator().manual_seed(seed)
    t, h, w = GRID
    rows = []
    for row in range(prompts):
        before = torch.randint(1, 150, (2,), generator=generator)
        after = torch.randint(1, 150, (4 + row,), generator=generator)
        frame = [torch.tensor([QWEN_VISION_START]), torch.full((PER_FRAME,), QWEN_VIDEO_ID),
                 torch.tensor([QWEN_VISION_END])]
        if family.startswith("qwen3"):
            video = torch.cat([part for _ in range(t) for part in (torch.randint(1, 150, (1,), generator=generator),
                                                                      *frame)])
        else:
            video = torch.cat([frame[0], torch.full((t * PER_FRAME,), QWEN_VIDEO_ID), frame[2]])
        rows.append(torch.cat([before, video, after]))
    ids, mask = left_padded(rows)
    videos = videos or list(range(prompts))
    pixels = torch.cat([torch.randn(t * h * w, 3 * 14 * 14 * 2, generator=torch.Generator().manual_seed(100 + s))
                        for s in videos])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values_videos": pixels,
            "video_grid_thw": torch.tensor([list(GRID)] * prompts),
            "mm_token_type_ids": (ids == QWEN_VIDEO_ID).long() * 2}


def one_prompt(inputs, row):
    per_video = inputs["pixel_values_videos"].shape[0] // inputs["input_ids"].shape[0]
    keep = inputs["attention_mask"][row].bool()
    single = {k: inputs[k][row : row + 1, keep] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    single["pixel_values_videos"] = inputs["pixel_values_videos"][row * per_video : (row + 1) * per_video]
    single["video_grid_thw"] = inputs["video_grid_thw"][row : row + 1]
    return single


def generate(model, inputs, tokens=5):
    return model.generate(**inputs, max_new_tokens=tokens, do_sample=False)


# -- oracles -------------------------------------------------------------------------------------------------------
def segments_oracle(features, c, tau):
    """Cut after frame i when cos(f_i, f_i+1) < tau or it is among the c-1 lowest (ties: earlier); loops."""
    f = [v.double() / v.double().norm() for v in features]
    sims = [float(f[i] @ f[i + 1]) for i in range(len(f) - 1)]
    ranked = sorted(range(len(sims)), key=lambda i: (sims[i], i))[: c - 1]
    cuts = sorted({i for i in range(len(sims)) if sims[i] < tau} | set(ranked))
    lengths, start = [], 0
    for i in cuts:
        lengths.append(i + 1 - start)
        start = i + 1
    return [*lengths, len(f) - start]


def dpc_oracle(points, neighbours=4):
    """DPC-kNN by brute force: distance / sqrt(D), density exp(-mean squared distance to the k nearest (self
    included)), delta = distance to the nearest denser point (ties: lower index denser), max distance for the
    densest."""
    n, dim = points.shape
    x = points.double()
    d = [[float((x[i] - x[j]).norm()) / math.sqrt(dim) for j in range(n)] for i in range(n)]
    rho = [math.exp(-sum(v * v for v in sorted(d[i])[: min(neighbours, n)]) / min(neighbours, n)) for i in range(n)]
    far = max(max(row) for row in d)
    scores = []
    for i in range(n):
        denser = [j for j in range(n) if rho[j] > rho[i] or (rho[j] == rho[i] and j < i)]
        scores.append(rho[i] * (min(d[i][j] for j in denser) if denser else far))
    return scores


def fastvid_oracle(features, salience, retention, c, tau, d, p, beta):
    """The kept (frame, token) pairs and each anchor's merged feature, with loops over frames, segments and tokens."""
    frames, tokens, _ = features.shape
    retained = int(tokens * retention)
    contextual = int(retained * d)
    salient = retained - contextual
    x = features.double()
    kept, merged = set(), {}
    rest = {}
    for f in range(frames):
        top = sorted(range(tokens), key=lambda j: (-float(salience[f, j]), j))[:salient]
        kept |= {(f, j) for j in top}
        rest[f] = [j for j in range(tokens) if j not in top]
    start = 0
    for length in segments_oracle(x.mean(1), c, tau):
        anchor_frames = [start + j for j in range(length) if (length - 1 - j) % p == 0]
        count = contextual * length // len(anchor_frames)
        for f in anchor_frames:
            scores = dpc_oracle(x[f, rest[f]])
            order = sorted(range(len(rest[f])), key=lambda i: (-scores[i], i))[:count]
            anchors = [rest[f][i] for i in order]
            scope = [f] if len(anchor_frames) == length else range(start, start + length)
            pool = [x[g, j] for g in scope for j in rest[g]]
            groups = {a: [] for a in anchors}
            for v in pool:
                best = max(anchors, key=lambda a: (float(v @ x[f, a] / (v.norm() * x[f, a].norm())), -anchors.index(a)))
                groups[best].append(v)
            for a, members in groups.items():
                weight = max(1 / (len(members) + 1), beta)
                mean = torch.stack(members).mean(0) if members else torch.zeros_like(x[f, a])
                merged[(f, a)] = weight * x[f, a] + (1 - weight) * mean
                kept.add((f, a))
        start += length
    return kept, merged


def _rotate_half(v):
    half = v.shape[-1] // 2
    return torch.cat([-v[..., half:], v[..., :half]], -1)


def ats_oracle(model, inputs):
    """ATS scores [frames, tokens] in the natural token order: per frame the softmax of the mean query (rotated) over
    the keys averaged per 2x2-merged token, in the last ViT block, averaged over heads. Qwen2.5-VL's blocks see the
    patches grouped into windows: the order is recovered by matching the first block's input rows to the patch
    embeddings."""
    visual = model.model.visual
    seen = {}

    def pre(name):
        def hook(module, args, kwargs):
            seen.setdefault(name, (args[0] if args else kwargs["hidden_states"], kwargs.get("position_embeddings")))

        return hook

    def patches(module, args, out):
        seen.setdefault("patches", out)

    hooks = [visual.patch_embed.register_forward_hook(patches),
             visual.blocks[0].register_forward_pre_hook(pre("first"), with_kwargs=True),
             visual.blocks[-1].register_forward_pre_hook(pre("last"), with_kwargs=True)]
    with torch.no_grad():
        model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
        for h in hooks:
            h.remove()
        hidden, (cos, sin) = seen["last"]
        if hasattr(visual, "window_size"):
            order = torch.cdist(seen["first"][0], seen["patches"]).argmin(1)  # block row i holds patch order[i]
            assert torch.equal(order.sort().values, torch.arange(len(order)))
            natural = order.argsort()
            hidden, cos, sin = hidden[natural], cos[natural], sin[natural]
        block = visual.blocks[-1]
        heads = block.attn.num_heads
        q, k, _ = block.attn.qkv(block.norm1(hidden)).view(hidden.shape[0], 3, heads, -1).unbind(1)
        q = q * cos[:, None] + _rotate_half(q) * sin[:, None]
        k = k * cos[:, None] + _rotate_half(k) * sin[:, None]
        patches = GRID[1] * GRID[2]
        out = torch.zeros(FRAMES, PER_FRAME)
        for f in range(FRAMES):
            frame = slice(f * patches, (f + 1) * patches)
            qbar = q[frame].mean(0)  # [heads, d]
            kbar = k[frame].view(PER_FRAME, 4, heads, -1).mean(1)  # [tokens, heads, d]
            for h in range(heads):
                out[f] += (kbar[:, h] @ qbar[h] / math.sqrt(q.shape[-1])).softmax(0) / heads
    return out


def positions_oracle(family, inputs):
    """Multi-axis rotary positions [3, B, P] and deltas [B] of the prompts, by hand: text tokens count on one axis; a
    video group starting at s (Qwen2.5-VL: the whole video, temporal step tokens_per_second = 4; Qwen3-VL: one frame)
    puts token (t, h, w) at (s + t·step, s + h, s + w), and the text after it resumes at s + max(H, W) / 2."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    out = torch.zeros(3, *ids.shape, dtype=torch.long)
    deltas = []
    side = GRID[1] // 2
    for b in range(ids.shape[0]):
        valid = mask[b].nonzero().flatten().tolist()
        tokens = [(i, int(ids[b, i])) for i in valid]
        pos, k = 0, 0
        while k < len(tokens):
            if tokens[k][1] != QWEN_VIDEO_ID:
                out[:, b, tokens[k][0]] = pos
                pos, k = pos + 1, k + 1
                continue
            frames = FRAMES if family == "qwen2_5_vl" else 1
            step = 4 if family == "qwen2_5_vl" else 0
            for t, h, w in itertools.product(range(frames), range(side), range(side)):
                out[:, b, tokens[k][0]] = torch.tensor([pos + t * step, pos + h, pos + w])
                k += 1
            pos += side
        deltas.append(int(out[:, b, valid].max()) + 1 - len(valid))
    return out, torch.tensor(deltas)


def kept_count(segments, retention, d, p):
    retained = int(PER_FRAME * retention)
    contextual = int(retained * d)
    salient = retained - contextual
    anchors = sum(math.ceil(n / p) * min(contextual * n // math.ceil(n / p), PER_FRAME - salient) for n in segments)
    return FRAMES * salient + anchors


# -- the pieces ----------------------------------------------------------------------------------------------------
def test_dynamic_segments_cut_at_scene_changes_and_the_lowest_transitions():
    """Three scenes of 3, 2 and 4 frames (orthogonal base directions plus small noise)."""
    generator = torch.Generator().manual_seed(0)
    bases = torch.eye(8)[:3] * 4
    frames = torch.stack([bases[s] + 0.3 * torch.randn(8, generator=generator) for s in (0, 0, 0, 1, 1, 2, 2, 2, 2)])
    assert dynamic_segments(frames, c=1, tau=0.5) == [3, 2, 4]
    assert dynamic_segments(frames, c=3, tau=-1.0) == [3, 2, 4]  # the two scene changes are the lowest transitions
    for c, tau in [(5, 0.5), (5, -1.0), (20, 0.9), (1, 0.999), (2, 1.0)]:
        assert dynamic_segments(frames, c=c, tau=tau) == segments_oracle(frames, c, tau)
    assert dynamic_segments(frames, c=20, tau=-1.0) == [1] * 9
    assert dynamic_segments(frames[:1], c=8, tau=0.9) == [1]


def test_density_peak_scores_match_brute_force():
    generator = torch.Generator().manual_seed(3)
    for n, dim in [(7, 3), (12, 5), (3, 4)]:
        points = torch.randn(n, dim, generator=generator)
        expected = torch.tensor(dpc_oracle(points), dtype=torch.double)
        torch.testing.assert_close(density_peak_scores(points).double(), expected, rtol=1e-5, atol=1e-7)
    # two tight clusters and a stray point: the peaks are one point of each cluster, the stray one scores lowest
    clusters = torch.cat([torch.randn(5, 2, generator=generator) * 0.05, torch.randn(5, 2, generator=generator) * 0.05
                          + 5, torch.tensor([[2.5, -3.0]])])
    scores = density_peak_scores(clusters)
    top = scores.argsort(descending=True)[:2].tolist()
    assert sorted(i // 5 for i in top) == [0, 1]
    assert scores.argmin() == 10 or scores[10] < scores[top].min()


# -- on the models -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_retention_one_reproduces_plain_generate_bit_for_bit(family):
    model = BUILD[family](layers=3)
    inputs = video_inputs(family, prompts=2)
    plain = generate(model, inputs)
    with torch.no_grad():
        logits = model(**inputs).logits
    with vlm.apply(model, FastVID(retention=1.0)):
        assert torch.equal(generate(model, inputs), plain)
        with torch.no_grad():
            assert torch.equal(model(**inputs).logits, logits)
    assert "get_video_features" not in vars(model.model)  # removal restores the method
    assert torch.equal(generate(model, inputs), plain)


SETTINGS = {"retention": 0.5, "c": 3, "tau": -1.0, "d": 0.4, "p": 2, "beta": 0.6}


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_tokens_and_merges_match_the_oracle_and_every_layer_holds_them(family):
    """Oracle: ATS scores from the last ViT block by hand, DySeg/DPC-kNN/DTM by loops on the decoder's input features;
    every layer's KV cache holds the prompt minus the pruned video tokens, decoded tokens added."""
    model = BUILD[family](layers=3)
    inputs = video_inputs(family, seed=1)
    salience = ats_oracle(model, inputs)
    video = (inputs["input_ids"][0] == QWEN_VIDEO_ID).nonzero().flatten()
    full, _ = cache_lengths(model, inputs)
    seen = {}
    with torch.no_grad(), vlm.apply(model, FastVID(**SETTINGS)) as handle:
        text_model = model.model.language_model
        embeds = recorder(seen, "embeds", lambda a, kw: kw["inputs_embeds"].clone())
        hooks = [text_model.register_forward_pre_hook(embeds, with_kwargs=True, prepend=True),
                 text_model.layers[0].register_forward_pre_hook(recorder(seen, "layer0", lambda a, kw: a[0]),
                                                                with_kwargs=True)]
        model(**inputs)
        for h in hooks:
            h.remove()
        kept = handle.call.lm_positions[0]
        pruned, _ = cache_lengths(model, inputs)
    features = seen["embeds"][0, video].view(FRAMES, PER_FRAME, -1)
    expected, merged = fastvid_oracle(features, salience, **SETTINGS)
    segments = segments_oracle(features.mean(1), SETTINGS["c"], SETTINGS["tau"])
    assert len(segments) == 3 and max(segments) > 1  # a multi-frame segment merges across its frames
    count = kept_count(segments, SETTINGS["retention"], SETTINGS["d"], SETTINGS["p"])
    assert len(expected) == count
    kept_video = kept[torch.isin(kept, video)]
    assert kept_video.tolist() == sorted(int(video[f * PER_FRAME + j]) for f, j in expected)
    text = ~torch.isin(torch.arange(inputs["input_ids"].shape[1]), video)
    assert torch.equal(kept[~torch.isin(kept, video)], text.nonzero().flatten())  # every other token remains
    for (f, j), value in merged.items():
        at = (kept == video[f * PER_FRAME + j]).nonzero().item()
        torch.testing.assert_close(seen["layer0"][0, at].double(), value, rtol=1e-5, atol=1e-6)
    untouched = [(f, j) for f, j in expected if (f, j) not in merged]
    for f, j in untouched:
        at = (kept == video[f * PER_FRAME + j]).nonzero().item()
        assert torch.equal(seen["layer0"][0, at], features[f, j])
    assert [f - p for f, p in zip(full, pruned)] == [FRAMES * PER_FRAME - count] * 3


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_tokens_keep_their_multi_axis_rotary_positions(family):
    """The positions entering the decoder are the hand-computed ones of the full prompt at the kept tokens; the
    rotary deltas and the decoding positions are those of the full prompt."""
    model = BUILD[family](layers=3)
    inputs = video_inputs(family, prompts=2, videos=[4, 4])
    hand, deltas = positions_oracle(family, inputs)

    def record(store):
        return model.model.language_model.register_forward_pre_hook(
            lambda m, a, kw: store.append(kw["position_ids"].clone()) and None, with_kwargs=True)

    plain_ids, pruned_ids = [], []
    hook = record(plain_ids)
    generate(model, inputs, tokens=3)
    hook.remove()
    assert torch.equal(plain_ids[0][-3:], hand)  # [4, B, P] in transformers 5.x: the text row, then the T/H/W rows
    assert torch.equal(model.model.rope_deltas.flatten(), deltas)
    with vlm.apply(model, FastVID(**SETTINGS)) as handle:
        hook = record(pruned_ids)  # after the pruning hook: the decoder's input
        generate(model, inputs, tokens=3)
        hook.remove()
        kept = handle.call.lm_positions
    assert kept.shape[1] < inputs["input_ids"].shape[1]
    assert torch.equal(pruned_ids[0][-3:], hand.gather(2, kept.expand(3, -1, -1)))
    assert torch.equal(pruned_ids[0][0], plain_ids[0][0].gather(1, kept))  # the text row too
    assert torch.equal(model.model.rope_deltas.flatten(), deltas)
    for plain, pruned in zip(plain_ids[1:], pruned_ids[1:]):  # decoding steps
        assert torch.equal(plain[-3:], pruned[-3:])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("videos", "p"), [((2, 3), 1), ((5, 5), 2)], ids=["two-videos-p1", "one-video-p2"])
def test_left_padded_batch_equals_each_prompt_alone(family, videos, p):
    """Rows must keep equal counts: p = 1 makes the count independent of the segments; one video twice (with other
    text) gives both rows its segments."""
    model = BUILD[family](layers=3)
    inputs = video_inputs(family, prompts=2, videos=list(videos))
    with vlm.apply(model, FastVID(**{**SETTINGS, "p": p})):
        batched = generate(model, inputs)
        for row in range(2):
            single = one_prompt(inputs, row)
            alone = generate(model, single)
            assert torch.equal(alone[0, single["input_ids"].shape[1] :], batched[row, inputs["input_ids"].shape[1] :])


@pytest.mark.parametrize("family", FAMILIES)
def test_image_prompts_are_unaffected(family):
    model = BUILD[family](layers=3)
    inputs = qwen_inputs(prompts=2, grid=(1, 8, 8))
    plain = generate(model, inputs)
    with vlm.apply(model, FastVID(retention=0.1)):
        assert torch.equal(generate(model, inputs), plain)


BAD = [
    ({"retention": 0.0}, ValueError, r"retention: expected the kept fraction r of each frame in \(0.0, 1.0\], got 0.0"),
    ({"retention": 1.5}, ValueError, r"retention: .*got 1.5"),
    ({"c": 0}, ValueError, r"c: expected the minimum segment count in \[1, inf\), got 0"),
    ({"c": 2.0}, TypeError, r"c: expected .*, got 2.0"),
    ({"tau": 1.2}, ValueError, r"tau: expected the similarity threshold τ in \[-1.0, 1.0\], got 1.2"),
    ({"d": -0.1}, ValueError, r"d: expected the contextual share .*, got -0.1"),
    ({"p": 0}, ValueError, r"p: expected the anchor-frame interval in \[1, inf\), got 0"),
    ({"beta": 2}, ValueError, r"beta: expected the merge weight floor β .*, got 2"),
    ({"beta": "x"}, TypeError, r"beta: expected .*, got 'x'"),
]


@pytest.mark.parametrize(("arguments", "error", "message"), BAD,
                         ids=[f"{next(iter(a))}-{i}" for i, (a, *_) in enumerate(BAD)])
def test_settings_are_checked_when_made(arguments, error, message):
    with pytest.raises(error, match=message):
        FastVID(**arguments)


def test_models_without_qwen_video_frames_are_refused():
    with pytest.raises(ValueError, match=r"model: FastVID reads the video frames of .*got LlavaForConditional"):
        vlm.apply(tiny_llava(), FastVID())


def test_preset_and_export(tmp_path):
    path = tmp_path / "video.yaml"
    path.write_text("fastvid: {retention: 0.27, c: 8, tau: 0.84, d: 0.4, p: 4, beta: 0.6}\n")
    assert load_preset(path, "fastvid") == FastVID() == vlm.FastVID()


@pytest.mark.parametrize("family", FAMILIES)
def test_layout_counts_video_tokens_as_visual_tokens(family):
    """Qwen families read the video token id from the config; video tokens join the visual-token mask (so every
    pruning method sees them) and are marked in `video`; image prompts have none."""
    from mmattn.vlm.layout import resolve_family

    model = BUILD[family](layers=1)
    spec, image_id = resolve_family(model)
    assert spec.video_token_id == QWEN_VIDEO_ID and resolve_family(tiny_llava())[0].video_token_id is None
    inputs = video_inputs(family, prompts=2)
    layout = vlm.TokenLayout.from_input_ids(inputs["input_ids"], inputs["attention_mask"], image_id, spec)
    assert torch.equal(layout.video, inputs["input_ids"] == QWEN_VIDEO_ID)
    assert torch.equal(layout.image, layout.video) and layout.image_counts.tolist() == [FRAMES * PER_FRAME] * 2
    images = qwen_inputs(prompts=1)
    layout = vlm.TokenLayout.from_input_ids(images["input_ids"], images["attention_mask"], image_id, spec)
    assert not layout.video.any() and layout.image_counts.tolist() == [4]
    with pytest.raises(ValueError, match=r"no image token \(id 190\) or video token \(id 191\)"):
        vlm.TokenLayout.from_input_ids(torch.ones(1, 5, dtype=torch.long), None, image_id, spec)


def test_fastv_prunes_video_tokens_too():
    """The engine's other methods see video tokens as visual tokens: FastV from layer 1 keeps half of them."""
    model = tiny_qwen2_5_vl(layers=3)
    inputs = video_inputs("qwen2_5_vl", prompts=2)
    full, _ = cache_lengths(model, inputs)
    with vlm.apply(model, vlm.FastV(k=1, ratio=0.5)):
        pruned, _ = cache_lengths(model, inputs)
    assert [f - p for f, p in zip(full, pruned)] == [0] + [FRAMES * PER_FRAME // 2] * 2
