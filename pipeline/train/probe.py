"""Online kNN: a kNN probe of the encoders being trained, on a fixed labelled slice, every N steps.

What solo-learn and lightly users watch during pretraining: whether the features separate classes
at all, long before the run ends. The slice (the first ``samples`` samples of a labelled source,
read once, unaugmented) is held in memory; its even positions are the kNN memory bank, its odd
positions the queries (``pipeline.evaluators.knn``, DINO's k = 20, T = 0.07). The stage refuses a
source it also trains on, so the slice is held out by construction: name a test or validation
split as its own recipe source.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.config import ConfigError


class OnlineKnn:
    """``probe(learner, device) -> {"knn/<modality>/top1": …, ...}``, due every ``every`` steps."""

    def __init__(self, name: str, source, mod_cfgs: dict, samples: int, every: int, base_dir=None, seed: int = 0):
        from pipeline.data.loader import LoaderConfig, StreamingLoader

        if not source.label:
            raise ConfigError(f"eval_source: {name} has no `label` key; the kNN probe needs labelled samples")
        self.every, self.modalities = every, [m for m in source.modalities if m in mod_cfgs]
        if not self.modalities:
            raise ConfigError(f"eval_source: {name} holds {', '.join(source.modalities)}; this stage trains "
                              f"{', '.join(mod_cfgs)}")
        src = source.model_copy(update={"modalities": self.modalities})
        loader = StreamingLoader({name: src}, LoaderConfig(batch_size=64, num_workers=0, epochs=1, augment=False),
                                 {m: mod_cfgs[m] for m in self.modalities}, seed=seed, base_dir=base_dir)
        self.batches, n = [], 0
        for batch in loader:
            self.batches.append(batch)
            n += len(batch["__key__"])
            if n >= samples:
                break
        self.labels = torch.cat([b["cls"] for b in self.batches])[:samples].numpy()
        if len(self.labels) < 4:
            raise ConfigError(f"eval_source: {name} gave {len(self.labels)} samples; the kNN probe needs a few dozen")

    def due(self, step: int) -> bool:
        return step % self.every == 0

    @torch.no_grad()
    def __call__(self, learner, device) -> dict[str, float]:
        from pipeline.data.loader import to_device
        from pipeline.evaluators import knn
        from pipeline.evaluators.base import Features

        out = {}
        n = len(self.labels)
        for m in self.modalities:
            enc = learner.encoders[m]
            was = enc.training
            enc.eval()
            feats = [enc.embed(to_device(b, device)[m]).float().cpu() for b in self.batches]
            enc.train(was)
            x = torch.cat(feats)[:n].numpy()
            keys = [str(i) for i in range(n)]
            bank, query = np.arange(0, n, 2), np.arange(1, n, 2)
            f = Features(x, keys, self.labels)
            for metric in knn.evaluate(knn.Config(), f.subset(bank), f.subset(query)):
                out[f"knn/{m}/{metric.name}"] = metric.value
        return out
