"""Select, flatten and unflatten parameter dicts.

The Hessian operator acts on one flat vector made of the selected parameters in a fixed order (the order of
``module.named_parameters()``), so vectors can be stored, all-reduced and warm-started without caring about shapes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

ParamSelector = str | Sequence[str] | None


def select_parameters(module: nn.Module, params: ParamSelector = None) -> dict[str, nn.Parameter]:
    """Return the trainable parameters of ``module`` picked by ``params``, in ``named_parameters()`` order.

    Args:
        module: the model.
        params: ``None`` for every parameter with ``requires_grad``; a string is a regular expression matched with
            ``re.search`` against parameter names; a sequence of strings lists names, each an exact parameter name
            or a module prefix (``"encoder"`` selects ``encoder.*``).

    Raises:
        TypeError: ``params`` has the wrong type.
        ValueError: the selection is empty, or a listed name matches nothing.
    """
    named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    if params is None:
        selected = named
    elif isinstance(params, str):
        try:
            pattern = re.compile(params)
        except re.error as err:
            raise ValueError(f"`params` must be a valid regular expression, got {params!r} ({err}).") from err
        selected = [(name, p) for name, p in named if pattern.search(name)]
    elif isinstance(params, Sequence) and all(isinstance(s, str) for s in params):
        selected = []
        for wanted in params:
            hits = [(n, p) for n, p in named if n == wanted or n.startswith(wanted + ".")]
            if not hits:
                raise ValueError(
                    f"`params` entry {wanted!r} matches no trainable parameter; names look like "
                    f"{[n for n, _ in named[:5]]}."
                )
            selected.extend(hits)
        seen: set[str] = set()
        selected = [(n, p) for n, p in named if n in {s for s, _ in selected} and not (n in seen or seen.add(n))]
    else:
        raise TypeError(f"`params` must be None, a regex string or a sequence of names, got {params!r}.")
    if not selected:
        raise ValueError(f"`params` must select at least one trainable parameter, got {params!r}.")
    return dict(selected)


def top_level_blocks(names: Iterable[str]) -> dict[str, list[str]]:
    """Group parameter names into the top-level blocks of the model, in order.

    A wrapper module that holds everything (``self.net = nn.Sequential(...)`` in a LightningModule) is looked
    through: the common module prefix of all names is skipped, so ``net.0.weight`` and ``net.2.bias`` give the
    blocks ``net.0`` and ``net.2``, not one block ``net``.
    """
    names = list(names)
    parts = [name.split(".") for name in names]
    depth = 0
    # descend while every parameter lives under the same child module (and is not a direct parameter)
    while all(len(p) > depth + 1 for p in parts) and len({p[depth] for p in parts}) == 1:
        depth += 1
    blocks: dict[str, list[str]] = {}
    for name, p in zip(names, parts, strict=True):
        blocks.setdefault(".".join(p[: depth + 1]), []).append(name)
    return blocks


def flatten(tensors: Iterable[Tensor]) -> Tensor:
    """Concatenate tensors into one 1-D tensor (a copy)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Split a flat vector into views shaped like the tensors of ``like`` (same keys, same order)."""
    sizes = [t.numel() for t in like.values()]
    if vector.numel() != sum(sizes):
        raise ValueError(f"`vector` must have {sum(sizes)} elements to match the parameters, got {vector.numel()}.")
    chunks = torch.split(vector, sizes)
    return {name: chunk.view_as(t) for (name, t), chunk in zip(like.items(), chunks, strict=True)}


def num_elements(tensors: Mapping[str, Tensor]) -> int:
    """Total number of elements of a dict of tensors."""
    return sum(t.numel() for t in tensors.values())
