"""An independent oracle of attention split by column sets and of the VAR and GIFT edits (specs/vlm.md sections 1.3
and 2.2), written from their definitions on the explicit float64 attention matrix; nothing here comes from mmattn.

Probabilities are A[b, h, r, t] (batch, head, query row, key); token sets are bool masks [B, T] over the keys.
"""

import torch


def share_kv_heads(states: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, H_kv, T, D] -> [B, heads, T, D]: query head h reads key/value head h // (heads / H_kv)."""
    return states[:, torch.arange(heads) // (heads // states.shape[1])]


def attention_probs(q: torch.Tensor, k: torch.Tensor, visible: torch.Tensor | None, scale: float) -> torch.Tensor:
    """softmax(q k^T scale) over the keys with visible[b, t] (or, per query row, visible[b, r, t]) True, float64 on
    the CPU: [B, H, R, T]; a row that sees no key is all zeros."""
    q = q.detach().cpu().double()
    k = share_kv_heads(k.detach().cpu().double(), q.shape[1])
    logits = torch.einsum("bhrd,bhtd->bhrt", q, k) * scale
    if visible is not None:
        seen = visible.cpu()[:, None, None, :] if visible.dim() == 2 else visible.cpu()[:, None]
        logits = logits.masked_fill(~seen, float("-inf"))
    top = logits.amax(-1, keepdim=True)
    weights = torch.exp(logits - torch.where(top.isfinite(), top, 0.0))
    total = weights.sum(-1, keepdim=True)
    return torch.where(total > 0, weights / total, 0.0)


def attention_output(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sum_t A[b, h, r, t] v[b, h, t]: [B, H, R, D] in float64."""
    return probs @ share_kv_heads(v.detach().cpu().double(), probs.shape[1])


def column_set_statistics(
    probs: torch.Tensor, v: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per set n of `weights` [B, C, N] (weights of the first C keys; later keys weigh 0): its mass
    m_n = sum_t A_t S_tn [B, H, R, N] and its weighted output W_n = sum_t A_t S_tn v_t [B, H, R, N, D]."""
    full = torch.zeros(probs.shape[0], probs.shape[-1], weights.shape[-1], dtype=torch.float64)
    full[:, : weights.shape[1]] = weights.cpu().double()
    masses = torch.einsum("bhrt,btn->bhrn", probs, full)
    values = share_kv_heads(v.detach().cpu().double(), probs.shape[1])
    return masses, torch.einsum("bhrt,btn,bhtd->bhrnd", probs, full, values)


def _mass(probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """sum over the keys in `tokens` [B, T] of each row: [B, H, R]."""
    return (probs * tokens[:, None, None]).sum(-1)


def redistribute_sinks(probs, image, sinks, share: float, rho: float, min_mass: float):
    """VAR on probabilities [B, H, R, T]: a row is image-centric when its non-sink image tokens ("receivers") hold at
    least `rho` of its image mass and some mass, and the image at least `min_mass`. There every sink (image or text)
    keeps 1 - share of its attention, and the removed mass goes to the receivers in proportion to their attention;
    the row sum is unchanged. Returns (edited probabilities, image-centric [B, H, R])."""
    receivers = image & ~sinks
    image_mass, receiver_mass = _mass(probs, image), _mass(probs, receivers)
    centric = (receiver_mass >= rho * image_mass) & (image_mass >= min_mass) & (receiver_mass > 0)
    removed = share * _mass(probs, sinks)
    gain = torch.where(centric, removed / torch.where(centric, receiver_mass, 1.0), 0.0)
    edited = probs * (1 - share * (centric[..., None] & sinks[:, None, None]))
    edited = edited + probs * gain[..., None] * receivers[:, None, None]
    return edited, centric


def _top_half(mass: torch.Tensor) -> torch.Tensor:
    """True on the max(H // 2, 1) heads (dim 1) of largest `mass` [B, H, R]."""
    top = mass.topk(max(mass.shape[1] // 2, 1), dim=1).indices
    return torch.zeros_like(mass, dtype=torch.bool).scatter_(1, top, True)


def enhance_ranked_heads(probs, image, multiplier, query, beta: float = 1.0):
    """GIFT's enhancement of probabilities [B, H, R, T], per query row: the top H//2 heads by image mass ("vision
    heads") multiply image key t by multiplier[b, t]; r = the vision heads' image mass after / before (1 where they
    hold none); the top H//2 heads by query mass multiply the query keys by beta * r; every row is then rescaled to
    its original sum. `image` and `query` are disjoint key masks [B, T]."""
    vision = _top_half(_mass(probs, image))[..., None] & image[:, None, None]
    edited = torch.where(vision, probs * multiplier.cpu().double()[:, None, None], probs)
    before, after = (probs * vision).sum((1, 3)), (edited * vision).sum((1, 3))
    r = torch.where(before > 0, after / torch.where(before > 0, before, 1.0), 1.0)  # [B, R]
    readers = _top_half(_mass(probs, query))[..., None] & query[:, None, None]
    edited = torch.where(readers, edited * beta * r[:, None, :, None], edited)
    total, target = edited.sum(-1, keepdim=True), probs.sum(-1, keepdim=True)
    return torch.where(total > 0, edited * target / torch.where(total > 0, total, 1.0), 0.0)
