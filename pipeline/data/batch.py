"""The batch: what the loader yields and what objectives read.

A batch is a plain dict (so that ``accelerate`` and ``torch`` utilities move it as they are):

- ``<modality>`` for each modality the source holds: ``[B, C, H, W]`` images, ``{"input_ids",
  "attention_mask"}`` ``[B, L]`` texts, ``[B, 1, n_mels, frames]`` log-mel audio (the modality's
  ``collate``);
- ``"cls"`` ``[B]`` int64 labels, where the source names a ``label`` key;
- ``"__views__"``: ``{modality: {"1": view 1, …}}``, the extra augmented views when the loader
  draws several (``loader.views``; view 0 is ``<modality>``);
- ``"__key__"``: the B sample keys; ``"__source__"``: the recipe source all of them come from;
- ``"__step__"``: the optimizer step the batch is trained at, set by the training loop (it seeds
  the objectives' masks, so a sample is masked the same way in any batch of that step).
"""

from __future__ import annotations

from typing import Any, TypedDict

KEY, SOURCE, STEP = "__key__", "__source__", "__step__"


class Batch(TypedDict, total=False):
    __key__: list[str]
    __source__: str
    __step__: int
    cls: Any


def step_of(batch: dict) -> int:
    """The optimizer step of a batch; a batch the training loop has not stamped is an error."""
    if STEP not in batch:
        raise KeyError(f"batch has no {STEP!r}: the training loop sets it (objectives seed masks by step); "
                       f"set batch[{STEP!r}] when calling an objective directly")
    return batch[STEP]


def modalities_in(batch: dict) -> list[str]:
    """The data keys of a batch: everything but labels and the ``__``-keys."""
    return sorted(k for k in batch if not k.startswith("__") and k != "cls")
