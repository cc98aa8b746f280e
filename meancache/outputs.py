"""Model outputs: find the velocity tensor in what a model returns, and put another velocity in its place."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from typing import Callable

import torch

__all__ = ["split_output"]


def split_output(out) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    """The velocity tensor in a model output, and a function that puts a new velocity in its place.

    Supported: a tensor; a tuple or list whose first item is the tensor (diffusers' ``return_dict=False``); a
    mapping whose first value is the tensor (diffusers' ``Transformer2DModelOutput``). Other items of a tuple or
    mapping are carried over from the last computed step.

    Example:
        >>> import torch
        >>> v, rebuild = split_output((torch.ones(2), "extra"))
        >>> rebuild(torch.zeros(2))
        (tensor([0., 0.]), 'extra')
    """
    if isinstance(out, torch.Tensor):
        return out, lambda v: v
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        rest = tuple(out[1:])
        kind = type(out)
        if kind in (tuple, list):
            return out[0], lambda v: kind((v, *rest))
        if hasattr(out, "_fields"):  # namedtuple
            return out[0], lambda v: kind(v, *rest)
        return out[0], lambda v: kind((v, *rest))
    if isinstance(out, Mapping) and out:
        key = next(iter(out))
        if isinstance(out[key], torch.Tensor):
            items = dict(out)
            kind = type(out)
            return out[key], lambda v: kind(**{**items, key: v})
    raise ValueError(
        f"the model returned a {type(out).__name__}: meancache needs a tensor, a tuple/list whose first item is "
        "the velocity tensor, or a mapping whose first value is it"
    )
