"""Framework-free maths of lightning-landscape: torch and the standard library only, never Lightning.

Algorithms take *operators*: anything with ``shape == (n, n)``, ``dtype``, ``device`` and ``op @ v`` for a 1-D
``v``. A dense ``torch.Tensor`` is an operator, so every algorithm is tested exactly against a dense matrix.
"""

from lightning_landscape.core._validation import LandscapeWarning

__all__ = ["LandscapeWarning"]
