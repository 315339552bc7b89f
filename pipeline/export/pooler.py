"""The stock pooler of an exported tower, chosen so that ``pooler_output`` carries the [CLS] state.

``VisionTextDualEncoderModel`` projects each tower's ``pooler_output`` and ``AutoModel`` builds a
pooler for ViT and BERT, so every export writes one. A ViT's pooler takes its activation from the
config: ``pooler_act: linear`` with an identity dense layer gives exactly the [CLS] state. BERT's
pooler is ``tanh(W h + b)`` with a fixed tanh; with ``W = εI`` and ``b = 0`` it gives
``tanh(ε h) = ε h (1 − ε² h² / 3 …)``, so ``pooler_output / ε`` is the [CLS] state to a relative
error of ~ε² h² (1e-7 at ε = 1e-4 and |h| ≈ 3, below fp32 rounding of the features). The CLIP
export folds ``1 / ε`` into the text projection; parity.json records the measured difference.
"""

from __future__ import annotations

import torch

#: BERT pooler scale (see the module docstring)
BERT_EPS = 1e-4


def pooler_weights(family: str, hidden: int) -> tuple[dict[str, torch.Tensor], float]:
    """(state-dict entries of the pooler, scale s with ``pooler_output ≈ s · h_cls``)."""
    eye = torch.eye(hidden)
    scale = BERT_EPS if family == "bert" else 1.0
    return {"pooler.dense.weight": eye * scale, "pooler.dense.bias": torch.zeros(hidden)}, scale
