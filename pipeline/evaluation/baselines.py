"""Raw-input baselines: features computed from the data itself, with no encoder, which the
evaluators score exactly as they score an encoder's features. An encoder that does not beat them
has learned nothing a linear model could not read off the input.

text: tf-idf of word unigrams and bigrams; image: the flattened pixels; audio: per-mel-bin mean and
standard deviation of the log-mel spectrogram over time.
"""

from __future__ import annotations

import numpy as np
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfVectorizer


def tfidf_features(train_texts: list[str], test_texts: list[str], max_dims: int = 512,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """tf-idf fit on ``train_texts`` only → dense float32 ([N_train, D], [N_test, D]); a vocabulary
    wider than ``max_dims`` is reduced to ``max_dims`` by truncated SVD (also fit on train), which
    keeps the linear probe on it fast."""
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    train = vectorizer.fit_transform(train_texts)
    test = vectorizer.transform(test_texts)
    if train.shape[1] > max_dims:
        svd = TruncatedSVD(n_components=min(max_dims, train.shape[0]), random_state=seed)
        return svd.fit_transform(train).astype(np.float32), svd.transform(test).astype(np.float32)
    return train.toarray().astype(np.float32), test.toarray().astype(np.float32)


def pixel_features(images: np.ndarray) -> np.ndarray:
    """images: [N, ...] (any layout; uint8 scaled to [0, 1]) → [N, D] float32 flattened pixels."""
    images = np.asarray(images)
    flat = images.reshape(len(images), -1).astype(np.float32)
    return flat / 255.0 if images.dtype == np.uint8 else flat


def logmel_stats(mels: np.ndarray) -> np.ndarray:
    """mels: [N, 1, M, T] log-mel spectrograms → [N, 2M] float32: each bin's mean, then each bin's
    standard deviation, over time."""
    mels = np.asarray(mels, dtype=np.float32)
    if mels.ndim != 4 or mels.shape[1] != 1:
        raise ValueError(f"logmel_stats: expected [N, 1, mels, frames], got shape {mels.shape}")
    return np.concatenate([mels[:, 0].mean(axis=2), mels[:, 0].std(axis=2)], axis=1)
