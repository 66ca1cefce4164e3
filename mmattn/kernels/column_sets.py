"""One-row attention split by column sets: the decode step of attention interventions that rescale columns.

An intervention that multiplies the attention A_j of key j by 1 + sum_n c_n S_jn, for a few weighted column sets S
(image tokens, sinks, query tokens), only needs per set the mass m_n = sum_j A_j S_jn and the set-weighted output
W_n = sum_j A_j S_jn v_j: the edited output is O + sum_n c_n W_n. The Triton path computes them in one pass over the
keys split into chunks (FlashDecoding), combined by the last chunk's program to finish, so a decoding step costs one
kernel launch instead of explicit probabilities and a dozen small ops, eagerly and inside a torch.compile'd decoding
step (custom ops). Inference only (no autograd).

Backends (`backends.REGISTRY["column_sets"]`): `"triton"` (`triton/column_sets.py`; the combine applies the sink
redistribution or the head-ranked enhancement), `"torch"` (the exact reference, `reference.py`) or `"auto"`
(the fastest that runs the case here: Triton on CUDA).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import reference
from .autograd import written_into
from .backends import resolve_backend
from .validation import check_number, check_qkv, resolve_scale

__all__ = ["ColumnSets", "column_set_attention", "ranked_head_attention", "sink_redistribution_attention"]

_MAX_SETS = 8


class ColumnSets(NamedTuple):
    """`column_set_attention`'s statistics, float32: output O `(B, H, 1, D)`, masses `(B, H, N)`, set-weighted
    outputs W `(B, H, N, D)`."""

    output: torch.Tensor
    masses: torch.Tensor
    weighted: torch.Tensor


def _check(query, key, value, columns, visible, sets: int | None, rows: bool = False, selected=None) -> None:
    """The column-set functions' arguments: one query row per head, or several with `rows` (`selected`: the rows
    to edit); `visible` for every row or per row."""
    check_qkv(query, key, value, (4,), "(batch, heads, tokens, head_dim)")
    batch, _, count_rows, _ = query.shape
    if not rows and count_rows != 1:
        raise ValueError(f"query: expected one row per head, (batch, heads, 1, head_dim), got {tuple(query.shape)}")
    if not isinstance(columns, torch.Tensor) or columns.dtype != torch.float32 or columns.dim() != 3:
        raise TypeError(f"columns: expected a float32 (batch, keys, sets) tensor, got "
                        f"{getattr(columns, 'dtype', type(columns).__name__)} {tuple(getattr(columns, 'shape', ()))}")
    _, length, count = columns.shape
    if columns.shape[0] != batch or length > key.shape[2] or not 1 <= count <= _MAX_SETS or columns.stride(2) != 1:
        raise ValueError(f"columns: expected ({batch}, <= {key.shape[2]}, 1..{_MAX_SETS}) with unit last "
                         f"stride, got {tuple(columns.shape)} strides {columns.stride()}")
    if sets is not None and count != sets:
        raise ValueError(f"columns: expected {sets} sets, got {count}")
    if columns.device != query.device:
        raise ValueError(f"columns must be on {query.device}, got {columns.device}")
    _check_flags("visible", visible, [(batch, key.shape[2]), (batch, count_rows, key.shape[2])], query.device)
    _check_flags("selected", selected, [(batch, count_rows)], query.device)


def _check_flags(name: str, flags, shapes: list[tuple[int, ...]], device: torch.device) -> None:
    """A bool tensor of one of `shapes` on `device`, or None."""
    if flags is not None and (not isinstance(flags, torch.Tensor) or flags.dtype != torch.bool
                              or tuple(flags.shape) not in shapes or flags.device != device):
        got = (f"{flags.dtype} {tuple(flags.shape)} on {flags.device}" if isinstance(flags, torch.Tensor)
               else type(flags).__name__)
        raise ValueError(f"{name}: expected a bool {' or '.join(map(str, shapes))} tensor on {device}, got {got}")


def _check_out(out, query: torch.Tensor) -> None:
    """`out`: None, or a tensor to write the result into, laid out as the kernels write it (unit last stride)."""
    if out is not None and (not isinstance(out, torch.Tensor) or out.shape != query.shape
                            or out.dtype != query.dtype or out.device != query.device or out.stride(-1) != 1):
        got = (f"{out.dtype} {tuple(out.shape)} on {out.device}, strides {out.stride()}"
               if isinstance(out, torch.Tensor) else type(out).__name__)
        raise ValueError(f"out: expected a {query.dtype} {tuple(query.shape)} tensor on {query.device} with a unit "
                         f"last stride, got {got}")


def _triton(query, key, value, backend: str) -> bool:
    if key.stride(-1) != 1 or value.stride(-1) != 1 or query.stride(-1) != 1:
        raise ValueError("query, key, value: expected a unit last stride (rows read contiguously)")
    return resolve_backend("column_sets", backend, query) == "triton"


def column_set_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    columns: torch.Tensor,
    *,
    visible: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> ColumnSets:
    """Softmax attention of one query row per head, with each column set's attention mass and set-weighted output.

    query `(B, H, 1, D)`, key/value `(B, H_kv, T, D)` (grouped-query attention allowed); `columns` float32
    `(B, C, N)`: N <= 8 weights of the first C <= T keys (0/1 for a token set; keys past C weigh 0); `visible`
    bool `(B, T)` or `(B, 1, T)` (False: padding, never attended) or None. Rows that see no key give zeros.
    """
    _check(query, key, value, columns, visible, None)
    scale = resolve_scale(scale, query.shape[-1])
    if _triton(query, key, value, backend):
        from .triton.column_sets import column_sets_op

        return ColumnSets(*column_sets_op(query, key, value, columns, visible, scale))
    out, masses, weighted = reference.column_set_attention(query, key, value, columns, visible, scale)
    return ColumnSets(out, masses[:, :, 0], weighted[:, :, 0])


def sink_redistribution_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    columns: torch.Tensor,
    *,
    share: float,
    rho: float,
    min_mass: float,
    visible: torch.Tensor | None = None,
    selected: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of R query rows per head with visual attention sink redistribution (VAR), `(B, H, R, D)` in the
    query's dtype, for query `(B, H, R, D)`; written into `out` where given (e.g. a view of the last rows of a
    model's attention output), which is returned.

    `columns` `(B, C, 3)`: the image tokens, the receivers (image tokens that are not sinks) and the sinks. In
    image-centric rows (receiver mass >= rho * image mass, image mass >= min_mass, receiver mass > 0) the sinks keep
    1 - share of their attention and the receivers gain the rest in proportion to their own; other rows, and rows
    that `selected` `(B, R)` bool leaves out, are plain attention. `visible`: bool `(B, T)` for every row or
    `(B, R, T)` per row (a prompt's causal rows). Other arguments as in `column_set_attention`.
    """
    _check(query, key, value, columns, visible, 3, rows=True, selected=selected)
    _check_out(out, query)
    scale = resolve_scale(scale, query.shape[-1])
    share, rho, min_mass = check_number("share", share), check_number("rho", rho), check_number("min_mass", min_mass)
    if _triton(query, key, value, backend):
        from .triton.column_sets import sink_redistribution_op

        return sink_redistribution_op(query, key, value, columns, visible, selected, scale, share, rho, min_mass,
                                      out=out)
    sets = reference.column_set_attention(query, key, value, columns, visible, scale)
    return written_into(reference.sink_redistribution(*sets, share, rho, min_mass, selected).to(query.dtype), out)


def ranked_head_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    columns: torch.Tensor,
    *,
    beta: float = 1.0,
    visible: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One-row attention with GIFT's head-ranked enhancement, `(B, H, 1, D)` in the query's dtype (written into
    `out` where given, which is returned).

    `columns` `(B, C, 3)`: the image tokens, boost = image * (M - 1) for the saliency multipliers M, and the query
    tokens. The top half of heads by image mass ("vision heads") scale image column j by M_j, the top half by query
    mass scale the query columns by beta * r (r: the vision heads' image-mass gain), and each row keeps its mass.
    Other arguments as in `column_set_attention`.
    """
    _check(query, key, value, columns, visible, 3)
    _check_out(out, query)
    scale = resolve_scale(scale, query.shape[-1])
    beta = check_number("beta", beta)
    if _triton(query, key, value, backend):
        from .triton.column_sets import ranked_heads_op

        return ranked_heads_op(query, key, value, columns, visible, scale, beta, out=out)
    sets = reference.column_set_attention(query, key, value, columns, visible, scale)
    return written_into(reference.ranked_head_enhancement(*sets, beta).to(query.dtype), out)
