"""Evaluators on synthetic features with known answers: separable clusters score near 1, random
features score chance, small retrieval cases are counted by hand and chance is checked by brute
force; the linear probe never looks at the test split while it chooses C."""

from __future__ import annotations

import itertools
import json
from math import comb

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from pipeline import registry
from pipeline.config import ConfigError, build
from pipeline.evaluators import knn, linear_probe, retrieval, zero_shot
from pipeline.evaluators.base import Features, Metric, bootstrap, topk_hits


@pytest.fixture(autouse=True)
def one_thread():
    # the test machine's cores are shared: BLAS threads contending for them make small fits 20x slower
    with threadpool_limits(limits=1):
        yield


def clusters(n: int, c: int, d: int = 16, spread: float = 0.1, seed: int = 0, prefix: str = "s",
             centres: np.ndarray | None = None) -> Features:
    """``n`` rows around ``c`` unit centres (shared between splits through ``centres``)."""
    rng = np.random.default_rng(seed)
    if centres is None:
        centres = np.linalg.qr(np.random.default_rng(99).normal(size=(d, d)))[0][:c]  # orthonormal
    y = rng.integers(0, c, n)
    x = centres[y] + spread * rng.normal(size=(n, centres.shape[1]))
    return Features(x, [f"{prefix}{i:05d}" for i in range(n)], y)


def noise(n: int, c: int, d: int = 16, seed: int = 0, prefix: str = "s") -> Features:
    rng = np.random.default_rng(seed)
    return Features(rng.normal(size=(n, d)), [f"{prefix}{i:05d}" for i in range(n)], rng.integers(0, c, n))


def by_name(metrics: list[Metric]) -> dict[str, Metric]:
    return {m.name: m for m in metrics}


# --- the contract -------------------------------------------------------------------------------

def test_registry_lists_evaluators_not_base():
    assert registry.names("evaluator") == ("finetune", "knn", "linear_probe", "retrieval", "zero_shot")
    with pytest.raises(ConfigError, match="unknown evaluator 'base'"):
        registry.module("evaluator", "base")


def test_features_check_shapes_and_subset():
    f = Features(np.arange(12).reshape(4, 3), list("abcd"), np.array([0, 1, 0, 1]), ["w", "x", "y", "z"])
    assert f.x.dtype == np.float32 and f.labels.dtype == np.int64
    sub = f.subset(np.array([3, 1]))
    assert sub.keys == ["d", "b"] and sub.texts == ["z", "x"] and sub.labels.tolist() == [1, 1]
    assert f.subset(f.labels == 0).keys == ["a", "c"]
    with pytest.raises(ValueError, match="3 keys for 4 rows"):
        Features(np.zeros((4, 3)), list("abc"))


def test_metric_to_json_is_plain():
    m = Metric("knn", "top1", np.float32(0.5), (np.float64(0.4), 0.6), 0.25, 10,
               {"confusion": np.eye(2, dtype=np.int64), "C": np.float64(1.0)})
    out = json.loads(json.dumps(m.to_json()))
    assert out["interval"] == [0.4, 0.6] and out["extra"]["confusion"] == [[1, 0], [0, 1]]


def test_bootstrap_contains_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (100, 10_000):
        hits = (rng.random(n) < 0.7).astype(float)
        lo, hi = bootstrap(hits, seed=1)
        assert lo <= hits.mean() <= hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 5  # width falls as 1/sqrt(N): 10x here
    assert bootstrap(hits, seed=3) == bootstrap(hits, seed=3)


def test_bootstrap_groups_average_group_means():
    values = np.array([1.0] * 90 + [0.0] * 10)
    groups = np.array([0] * 90 + [1] * 10)  # class 0 always right, class 1 never: balanced mean 0.5
    lo, hi = bootstrap(values, groups=groups)
    assert lo == pytest.approx(0.5) and hi == pytest.approx(0.5)


def test_topk_hits_count_ties_against_the_target():
    scores = np.array([[3.0, 0.0, 0.0, 0.0], [3.0, 2.0, 0.0, 0.0]])
    assert topk_hits(scores, np.array([1, 1]), 2).tolist() == [0.0, 1.0]  # an unvoted class is no hit
    assert topk_hits(scores, np.array([-1, 0]), 1).tolist() == [0.0, 1.0]


# --- kNN ---------------------------------------------------------------------------------------

def test_knn_separable_clusters():
    train, test = clusters(600, 8), clusters(300, 8, seed=1, prefix="t")
    m = by_name(knn.evaluate(knn.Config(), train, test))
    assert m["top1"].value >= 0.98 and m["top5"].value >= 0.98
    assert m["top1"].chance == pytest.approx(1 / 8) and m["top5"].chance == pytest.approx(5 / 8)
    assert m["top1"].n == 300 and m["top1"].interval[0] <= m["top1"].value <= m["top1"].interval[1]


def test_knn_random_features_score_chance():
    m = by_name(knn.evaluate(knn.Config(), noise(1000, 4), noise(2000, 4, seed=1, prefix="t")))
    assert abs(m["top1"].value - 0.25) < 0.04
    assert "top5" not in m  # four classes: top-5 would be 1 whatever the features


def test_knn_matches_brute_force_and_blocking(monkeypatch):
    train, test = noise(60, 6, d=5), noise(25, 6, d=5, seed=1, prefix="t")
    cfg = knn.Config(k=7, temperature=0.1)
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    sim = unit(test.x) @ unit(train.x).T
    expected = []
    for row in sim:  # the DINO vote, one test row at a time
        nn = np.argsort(-row)[:7]
        votes = np.zeros(6)
        np.add.at(votes, train.labels[nn], np.exp(row[nn] / 0.1))
        expected.append(votes.argmax())
    top1 = float(np.mean(np.array(expected) == test.labels))
    assert by_name(knn.evaluate(cfg, train, test))["top1"].value == pytest.approx(top1)
    monkeypatch.setattr(knn, "_BLOCK_CELLS", 100)  # one or two test rows per block
    assert by_name(knn.evaluate(cfg, train, test))["top1"].value == pytest.approx(top1)


def test_knn_guards_k():
    train, test = clusters(12, 6), clusters(30, 6, seed=1, prefix="t")
    m = by_name(knn.evaluate(knn.Config(k=50), train, test))  # k > N_train: every row votes
    assert m["top1"].extra["k"] == 12
    assert "top5" not in by_name(knn.evaluate(knn.Config(k=3), train, test))  # 3 voters name at most 3 classes
    with pytest.raises(ConfigError, match="k"):
        build(knn.Config, {"k": 0}, "evaluators.knn")


# --- linear probe ------------------------------------------------------------------------------

FAST = linear_probe.Config(Cs=[0.01, 1.0], max_iter=200)


def test_linear_probe_separable_clusters():
    train, test = clusters(400, 5, spread=0.15), clusters(200, 5, spread=0.15, seed=1, prefix="t")
    (m,) = linear_probe.evaluate(FAST, train, test)
    assert m.value >= 0.98 and m.chance == pytest.approx(0.2)
    assert m.extra["C"] in FAST.Cs and set(m.extra["val_accuracy"]) == {"0.01", "1.0"}
    assert np.trace(np.array(m.extra["confusion"])) == round(m.value * 200)
    assert set(m.extra["per_class_accuracy"]) == set(range(5))


def test_linear_probe_random_features_score_chance():
    (m,) = linear_probe.evaluate(FAST, noise(600, 3), noise(1500, 3, seed=1, prefix="t"))
    assert abs(m.value - 1 / 3) < 0.05


def test_validation_split_is_stratified_and_order_free():
    keys = [f"k{i}" for i in range(300)]
    labels = np.repeat([0, 1, 2], 100)
    mask = linear_probe.validation_mask(keys, labels, 0.2, seed=0)
    assert [int(mask[labels == c].sum()) for c in range(3)] == [20, 20, 20]
    perm = np.random.default_rng(0).permutation(300)
    shuffled = linear_probe.validation_mask([keys[i] for i in perm], labels[perm], 0.2, seed=0)
    assert {keys[i] for i in perm[shuffled]} == {keys[i] for i in np.flatnonzero(mask)}
    assert not np.array_equal(mask, linear_probe.validation_mask(keys, labels, 0.2, seed=1))


def test_linear_probe_never_sees_test_while_choosing_c(monkeypatch):
    train = clusters(300, 3, spread=1.0)
    test = clusters(37, 3, spread=1.0, seed=1, prefix="t")  # 37 rows: no training subset has that size
    calls = []

    class Spy(linear_probe.LogisticRegression):
        def fit(self, x, y, *a, **kw):
            calls.append(("fit", len(x)))
            return super().fit(x, y, *a, **kw)

        def predict(self, x):
            calls.append(("predict", len(x)))
            return super().predict(x)

    monkeypatch.setattr(linear_probe, "LogisticRegression", Spy)
    cfg = linear_probe.Config(Cs=[1e-3, 1e-1, 10.0], max_iter=100)
    (m,) = linear_probe.evaluate(cfg, train, test)
    assert calls[-2:] == [("fit", 300), ("predict", 37)]  # the refit on all of train, then test once
    assert all(n != 37 for _, n in calls[:-1])
    # test rows that would favour another C if used (their labels shuffled) change nothing in the choice
    flipped = Features(test.x, test.keys, np.random.default_rng(5).permutation(test.labels))
    (other,) = linear_probe.evaluate(cfg, train, flipped)
    assert other.extra["C"] == m.extra["C"] and other.extra["val_accuracy"] == m.extra["val_accuracy"]


def test_linear_probe_config_errors_name_the_setting():
    with pytest.raises(ConfigError, match="Cs"):
        build(linear_probe.Config, {"Cs": []}, "evaluators.linear_probe")
    with pytest.raises(ConfigError, match="val_fraction"):
        build(linear_probe.Config, {"val_fraction": 1.5}, "evaluators.linear_probe")


# --- zero-shot ---------------------------------------------------------------------------------

def test_prompts_and_class_embeddings():
    cfg = zero_shot.Config(templates={"image": ["{}", "a photo of a {}."]})
    assert zero_shot.prompts(["cat", "dog"], "image", cfg) == [["cat", "a photo of a cat."],
                                                               ["dog", "a photo of a dog."]]
    feats = np.array([[[3.0, 0.0], [0.0, 1.0]]])  # one class, two templates of different norms
    assert zero_shot.class_embeddings(feats)[0] == pytest.approx([2 ** -0.5, 2 ** -0.5])  # normalized first
    with pytest.raises(ConfigError, match="no templates for modality 'audio'"):
        zero_shot.prompts(["cat"], "audio", cfg)
    with pytest.raises(ConfigError, match="templates.image"):
        build(zero_shot.Config, {"templates": {"image": ["a photo"]}}, "evaluators.zero_shot")


def test_zero_shot_cluster_centres():
    test = clusters(400, 10)
    centres = np.linalg.qr(np.random.default_rng(99).normal(size=(16, 16)))[0][:10]
    emb = zero_shot.class_embeddings(np.repeat(centres[:, None], 3, axis=1))
    m = by_name(zero_shot.evaluate(zero_shot.Config(), test, emb))
    assert min(m["top1"].value, m["top5"].value, m["mean_per_class_recall"].value) >= 0.98
    assert m["top5"].chance == pytest.approx(0.5)


def test_zero_shot_random_scores_chance():
    test = noise(3000, 4)
    emb = np.random.default_rng(7).normal(size=(4, 16))
    m = by_name(zero_shot.evaluate(zero_shot.Config(), test, emb))
    assert abs(m["top1"].value - 0.25) < 0.1  # four random directions split space unevenly
    assert abs(m["mean_per_class_recall"].value - 0.25) < 0.1 and "top5" not in m
    lo, hi = m["mean_per_class_recall"].interval
    assert lo <= m["mean_per_class_recall"].value <= hi


# --- retrieval ---------------------------------------------------------------------------------

def test_retrieval_aligned_pairs_are_perfect():
    x = np.random.default_rng(0).normal(size=(40, 8))
    texts = [f"caption {i}" for i in range(40)]
    m = by_name(retrieval.evaluate(retrieval.Config(), x, texts, dict(zip(texts, x)), "image"))
    for k in (1, 5, 10):
        assert m[f"text_to_image_R@{k}"].value == 1.0 and m[f"image_to_text_R@{k}"].value == 1.0
        assert m[f"image_to_text_R@{k}"].chance == pytest.approx(k / 40)
    assert m["text_to_image_median_rank"].value == 1.0 and m["image_to_text_median_rank"].value == 1.0


def test_retrieval_shuffled_pairs_score_k_over_n():
    rng = np.random.default_rng(0)
    n = 1000
    x, t = rng.normal(size=(n, 32)), rng.normal(size=(n, 32))
    texts = [f"c{i}" for i in range(n)]
    m = by_name(retrieval.evaluate(retrieval.Config(ks=[10, 100]), x, texts, (texts, t), "audio"))
    for k in (10, 100):
        for name in (f"text_to_audio_R@{k}", f"audio_to_text_R@{k}"):
            assert abs(m[name].value - k / n) < 3 * np.sqrt(k / n / n) + 0.005, name
    assert abs(m["audio_to_text_median_rank"].value - n / 2) < 0.1 * n


def test_retrieval_duplicate_captions_are_all_positives():
    # two items captioned "a": the text "a" hits at 1 through either. Features on a circle.
    angle = np.array([0.0, 1.0, 2.0])  # items
    items = np.stack([np.cos(angle), np.sin(angle)], 1)
    texts = {"a": np.array([np.cos(0.9), np.sin(0.9)]), "b": np.array([np.cos(0.2), np.sin(0.2)])}
    m = by_name(retrieval.evaluate(retrieval.Config(ks=[1, 2]), items, ["a", "b", "a"], texts, "image"))
    # text "a" → items by similarity: 1, 0, 2 (ranks); its positives are items 0 and 2: best rank 2.
    # text "b" → items: 0, 1, 2; its positive is item 1: rank 2.
    assert m["text_to_image_R@1"].value == 0.0 and m["text_to_image_R@2"].value == 1.0
    assert m["text_to_image_R@1"].n == 2 and m["text_to_image_median_rank"].value == 2.0
    # item 0 → texts b, a (its caption a: rank 2); item 1 → a, b (b: rank 2); item 2 → a, b (a: rank 1)
    assert m["image_to_text_R@1"].value == pytest.approx(1 / 3) and m["image_to_text_R@1"].n == 3
    # chance text→image at K=1: (2/3 for "a" with 2 positives + 1/3 for "b") / 2
    assert m["text_to_image_R@1"].chance == pytest.approx(0.5)


def test_retrieval_chance_matches_brute_force():
    n, k = 6, 2
    for p in (1, 2, 3, 5):
        hits = [any(pos < p for pos in order[:k]) for order in itertools.permutations(range(n))]
        assert retrieval.text_to_item_chance(n, np.array([p]), k)[0] == pytest.approx(np.mean(hits))
        assert np.mean(hits) == pytest.approx(1 - comb(n - p, k) / comb(n, k))
        best = sorted(min(order.index(i) for i in range(p)) + 1 for order in itertools.permutations(range(n)))
        cdf = np.searchsorted(best, np.arange(1, n + 1), side="right") / len(best)
        assert retrieval.chance_median_rank(n, np.array([p]))[0] == np.argmax(cdf >= 0.5) + 1


def test_retrieval_errors_name_the_missing_caption():
    with pytest.raises(ValueError, match="first 'b'"):
        retrieval.evaluate(retrieval.Config(), np.ones((2, 3)), ["a", "b"], {"a": np.ones(3)}, "image")
