"""ScaNN index vs its exact twin, manifest verification, atomic publish."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from hm_recsys.index import (
    ExactIndex,
    IndexIntegrityError,
    IndexQualityError,
    ScannConfig,
    ScannIndex,
    build_index,
    load_index,
    recall_vs_exact,
    verify_index,
)


def _clustered(n: int, d: int = 32, clusters: int = 40, seed: int = 0) -> np.ndarray:
    """Unit vectors around cluster centres: the shape real tower embeddings have."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, d))
    x = centres[rng.integers(0, clusters, n)] + 0.35 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _ids(n: int) -> list[str]:
    return [f"{i:010d}" for i in range(100_000_001, 100_000_001 + n)]


def test_exact_index_hand_computed():
    emb = np.array([[1, 0], [0, 1], [0.6, 0.8], [-1, 0]], dtype=np.float32)
    idx = ExactIndex(["a", "b", "c", "d"], emb)
    rows, scores = idx.search(np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32), k=3)
    assert rows.tolist() == [[0, 2, 1], [1, 2, 0]]
    np.testing.assert_allclose(scores, [[1.0, 0.6, 0.0], [1.0, 0.8, 0.0]], atol=1e-6)


def test_exact_index_breaks_ties_by_row():
    emb = np.ones((5, 2), dtype=np.float32)
    rows, _ = ExactIndex(list("abcde"), emb).search(np.array([[1.0, 1.0]]), k=3)
    assert rows.tolist() == [[0, 1, 2]]


def test_scann_brute_force_equals_exact():
    emb = _clustered(500)
    q = _clustered(50, seed=1)
    ids = _ids(500)
    scann_idx = ScannIndex.build(ids, emb, ScannConfig(brute_force=True))
    exact = ExactIndex(ids, emb)
    r1, s1 = scann_idx.search(q, 12)
    r2, s2 = exact.search(q, 12)
    assert r1.tolist() == r2.tolist()
    np.testing.assert_allclose(s1, s2, atol=1e-5)


def test_tree_index_reaches_recall_floor_and_round_trips(tmp_path):
    n = 6000
    emb, ids = _clustered(n), _ids(n)
    queries = _clustered(300, seed=2)
    m = build_index(ids, emb, tmp_path / "index", model_version="7", eval_queries=queries, min_recall=0.98)
    assert m.recall_at_12_vs_exact >= 0.98
    assert not m.scann_config["brute_force"] and m.scann_config["num_leaves"] == int(np.sqrt(n))
    idx, m2 = load_index(tmp_path / "index", expected_model_version="7", expected_dim=32)
    assert m2 == m
    exact, _ = load_index(tmp_path / "index", exact=True)
    # the reloaded ScaNN index still meets the floor measured at build time
    assert recall_vs_exact(idx, exact, queries, k=12) >= 0.98
    assert idx.article_ids == ids


def test_moved_index_still_loads(tmp_path):
    build_index(_ids(3000), _clustered(3000), tmp_path / "a" / "index", model_version="1")
    shutil.move(tmp_path / "a", tmp_path / "b")  # ScaNN assets are serialised with relative paths
    idx, _ = load_index(tmp_path / "b" / "index")
    rows, _ = idx.search(_clustered(3, seed=5), 5)
    assert rows.shape == (3, 5)


def test_refuses_to_publish_below_floor(tmp_path):
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(4000, 64)).astype(np.float32)  # structureless: ANN's worst case
    cfg = ScannConfig(num_leaves=64, leaves_to_search=1, reorder=12, training_sample_size=4000)
    with pytest.raises(IndexQualityError, match="not published"):
        build_index(_ids(4000), emb, tmp_path / "index", model_version="1", config=cfg, max_widenings=0)
    assert not (tmp_path / "index").exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left behind


@pytest.fixture
def built(tmp_path):
    folder = tmp_path / "index"
    build_index(_ids(600), _clustered(600), folder, model_version="3")
    return folder


def test_rejects_other_model_version(built):
    with pytest.raises(IndexIntegrityError, match="model version 3, not 4"):
        load_index(built, expected_model_version="4")


def test_rejects_wrong_dimension(built):
    with pytest.raises(IndexIntegrityError, match="dimension 32 does not match the model's 64"):
        load_index(built, expected_dim=64)


def test_rejects_truncated_file(built):
    victim = next((built / "scann").iterdir())
    victim.write_bytes(victim.read_bytes()[:-7])
    with pytest.raises(IndexIntegrityError, match="checksum mismatch"):
        load_index(built)


def test_rejects_swapped_embeddings(built):
    emb = np.load(built / "embeddings.npy")
    np.save(built / "embeddings.npy", emb[::-1].copy())
    with pytest.raises(IndexIntegrityError, match="embeddings.npy: checksum mismatch"):
        verify_index(built)


def test_rejects_missing_and_extra_files(built, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    (copy / "article_ids.json").unlink()
    with pytest.raises(IndexIntegrityError, match="missing"):
        load_index(copy)
    (built / "stray.bin").write_bytes(b"x")
    with pytest.raises(IndexIntegrityError, match="not in the manifest"):
        load_index(built)


def test_rejects_tampered_manifest(built):
    m = json.loads((built / "manifest.json").read_text())
    m["files"]["embeddings.npy"] = "0" * 64
    (built / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(IndexIntegrityError, match="checksum mismatch"):
        load_index(built)
    (built / "manifest.json").write_text("{not json")
    with pytest.raises(IndexIntegrityError, match="not valid JSON"):
        load_index(built)


def test_rebuild_replaces_atomically(built):
    m = build_index(_ids(600), _clustered(600, seed=9), built, model_version="4")
    assert verify_index(built, expected_model_version="4") == m
    assert [p.name for p in built.parent.iterdir()] == ["index"]


def test_rejects_bad_embeddings(tmp_path):
    emb = _clustered(100)
    emb[3, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        build_index(_ids(100), emb, tmp_path / "i", model_version="1")
    with pytest.raises(ValueError, match="unique"):
        build_index(["a"] * 100, _clustered(100), tmp_path / "i", model_version="1")


def test_exact_index_chunked_equals_unchunked(monkeypatch):
    emb, q = _clustered(700), _clustered(90, seed=4)
    idx = ExactIndex(_ids(700), emb)
    whole = idx.search(q, 12)
    monkeypatch.setattr(ExactIndex, "_CHUNK_FLOATS", 700 * 7)  # 7 queries per chunk
    chunked = idx.search(q, 12)
    assert np.array_equal(whole[0], chunked[0])
    # BLAS blocks a 7-row batch differently from a 90-row one: last-bit rounding only
    np.testing.assert_allclose(whole[1], chunked[1], rtol=0, atol=1e-6)


_BUILD_AND_HASH = """
import hashlib, numpy as np
from hm_recsys.index import ScannConfig, ScannIndex
rng = np.random.default_rng(0)
emb = rng.normal(size=(3000, 64)).astype(np.float32)
emb /= np.linalg.norm(emb, axis=1, keepdims=True)
queries = rng.normal(size=(2000, 64)).astype(np.float32)
cfg = ScannConfig.for_size(len(emb))
assert not cfg.brute_force  # the tree path
rows, _ = ScannIndex.build([f"{i:010d}" for i in range(len(emb))], emb, cfg).search(queries, 12)
print(hashlib.sha256(rows.tobytes()).hexdigest())
"""


def test_a_rebuilt_index_gives_the_same_neighbours():
    """Same embeddings, same searcher, in any process: ScaNN's k-means is seeded (k-means++).

    With ScaNN's random centre initialisation every process built another tree (three processes gave
    three different top-12 answers for these queries; checked by switching it back on), so the same
    seed could give other candidates and other metrics from one run to the next.
    """
    import subprocess
    import sys

    env = {**os.environ, "GLOG_minloglevel": "2"}
    out = [subprocess.run([sys.executable, "-c", _BUILD_AND_HASH], capture_output=True, text=True, env=env,
                          timeout=120) for _ in range(2)]
    assert all(o.returncode == 0 for o in out), out[0].stderr[-2000:]
    assert out[0].stdout.strip() == out[1].stdout.strip()
