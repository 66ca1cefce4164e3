"""Gradients of every named parameter of a module, compared by name."""

import torch


def parameter_gradients(module: torch.nn.Module, out: torch.Tensor, cotangent: torch.Tensor) -> dict[str, torch.Tensor]:
    """d(out . cotangent)/dp for every named parameter p of `module`."""
    names, params = zip(*module.named_parameters())
    return dict(zip(names, torch.autograd.grad((out * cotangent).sum(), params)))


def assert_same_gradients(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], **tolerance) -> None:
    """Each parameter's gradient in `got` (cast to the dtype of `want`'s) is close to its gradient in `want`."""
    assert got.keys() == want.keys()
    for name, expected in want.items():
        torch.testing.assert_close(
            got[name].to(expected.dtype), expected, msg=lambda text, name=name: f"{name}: {text}", **tolerance
        )
