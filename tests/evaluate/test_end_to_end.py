"""The four official formats evaluate end to end from the fixture annotations.

Images are placeholders written to tmp folders under the names the adapters expect,
embedded by the deterministic ``fake`` backbone. Two kinds of exact checks:

* constant model: every image is solid black, which the fake backbone embeds as the zero
  vector, so every score is exactly 0. Global rankings then follow the gallery order, and
  per-query galleries (GeneCIS) rank the target last: the expected numbers follow from
  the annotation files alone and pin down exclusions, subsets, AP@K and tie rules.
* colour signal: images the query should find share its reference's colour (``image``
  mode), so the metrics are 100 where the protocol says so.

Each test runs per fixture source (``[project]``, and ``[upstream]`` when the real samples are
present); the few literal expectations per source are in ``conftest.FACTS``.
"""

import colorsys
import json

import numpy as np
import pytest

from cirkit.evaluate import EvaluateConfig, run
from cirkit.evaluate.submission import validate_circo_submission, validate_cirr_submission


def evaluate(benchmark, data, images, **kw):
    kw.setdefault("backbone", "fake")
    kw.setdefault("num_workers", 0)
    kw.setdefault("batch_size", 32)
    return run(EvaluateConfig(benchmark=benchmark, data=data, images=images, **kw))


def hues(n):
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / n, 1.0, 1.0)) for i in range(n)]


def recall(positions, k):
    return 100.0 * sum(p < k for p in positions) / len(positions)


# --- FashionIQ ------------------------------------------------------------------------
def test_fashioniq_constant_model(fixtures, tmp_path, solid, load_json):
    names = set()
    for cat in ("dress", "shirt", "toptee"):
        names.update(load_json(f"fashioniq/image_splits/split.{cat}.val.json"))
        names.update(r["candidate"] for r in load_json(f"fashioniq/captions/cap.{cat}.val.json"))
    for n in names:
        solid(tmp_path / "images" / f"{n}.png")
    res = evaluate("fashioniq", fixtures / "fashioniq", tmp_path, output=tmp_path / "metrics.json")
    m = res.metrics
    expect = {}
    for cat in ("dress", "shirt", "toptee"):
        order = load_json(f"fashioniq/image_splits/split.{cat}.val.json")
        pos = [order.index(r["target"]) for r in load_json(f"fashioniq/captions/cap.{cat}.val.json")]
        for k in (10, 50):
            expect[f"composed/val/{cat}/R@{k}"] = recall(pos, k)
    for key, value in expect.items():
        assert m[key] == pytest.approx(value, abs=1e-3), key
    for k in (10, 50):
        mean = np.mean([expect[f"composed/val/{c}/R@{k}"] for c in ("dress", "shirt", "toptee")])
        assert m[f"composed/val/R@{k}"] == pytest.approx(mean, abs=1e-3)
    assert m["composed/val/avg"] == pytest.approx((m["composed/val/R@10"] + m["composed/val/R@50"]) / 2, abs=1e-3)
    assert m["primary_metric"] == "composed/val/avg"
    assert m["protocol/caption_join"] == "and" and m["protocol/exclude_reference"] is False
    assert json.loads((tmp_path / "metrics.json").read_text()) == m


def test_fashioniq_test_split_needs_submission_and_writes_rankings(fixtures, facts, tmp_path, solid, load_json):
    from cirkit.errors import CirkitError

    for cat in ("dress", "shirt", "toptee"):
        for n in load_json(f"fashioniq/image_splits/split.{cat}.test.json"):
            solid(tmp_path / f"{n}.png")
        for r in load_json(f"fashioniq/captions/cap.{cat}.test.json"):
            solid(tmp_path / f"{r['candidate']}.png")
    with pytest.raises(CirkitError, match="no ground truth"):
        evaluate("fashioniq", fixtures / "fashioniq", tmp_path, split=["test"])
    res = evaluate("fashioniq", fixtures / "fashioniq", tmp_path, split=["test"], submission=tmp_path / "sub")
    assert not any("/R@" in k for k in res.metrics)
    lines = (tmp_path / "sub" / "fashioniq-test-dress-rankings.jsonl").read_text().splitlines()
    assert len(lines) == facts.fiq_test_queries[0] and len(json.loads(lines[0])["hits"]) == facts.fiq_test_gallery_dress


# --- CIRR -----------------------------------------------------------------------------
def _cirr_images(fixtures, root, solid, split):
    paths = json.loads((fixtures / "cirr" / "image_splits" / f"split.rc2.{split}.json").read_text())
    for rel in paths.values():
        solid(root / rel)
    return paths


def test_cirr_constant_model(fixtures, facts, tmp_path, solid, load_json):
    paths = _cirr_images(fixtures, tmp_path, solid, "val")
    order = list(paths)
    res = evaluate("cirr", fixtures / "cirr", tmp_path, mode=["composed", "text"])
    m = res.metrics
    recs = load_json("cirr/captions/cap.rc2.val.json")
    pos, spos = [], []
    for r in recs:
        ranking = [n for n in order if n != r["reference"]]  # reference removed
        pos.append(ranking.index(r["target_hard"]))
        subset = [n for n in ranking if n in r["img_set"]["members"]]
        spos.append(subset.index(r["target_hard"]))
    for mode in ("composed", "text"):
        for k in (1, 5, 10, 50):
            assert m[f"{mode}/val/R@{k}"] == pytest.approx(recall(pos, k), abs=1e-3)
        for k in (1, 2, 3):
            assert m[f"{mode}/val/Rs@{k}"] == pytest.approx(recall(spos, k), abs=1e-3)
        assert m[f"{mode}/val/avg"] == pytest.approx((recall(pos, 5) + recall(spos, 1)) / 2, abs=1e-3)
    assert m["primary_metric"] == "composed/val/avg" and m["protocol/exclude_reference"] is True
    assert (m["count/val/queries"], m["count/val/gallery"]) == facts.cirr_val
    # keeping the reference changes the numbers (and is recorded)
    kept = evaluate("cirr", fixtures / "cirr", tmp_path, exclude_reference=False).metrics
    assert kept["protocol/exclude_reference"] is False
    assert kept["composed/val/R@1"] == pytest.approx(recall([order.index(r["target_hard"]) for r in recs], 1), abs=1e-3)


def test_cirr_test1_submission_files(fixtures, facts, tmp_path, solid, load_json):
    _cirr_images(fixtures, tmp_path, solid, "test1")
    res = evaluate("cirr", fixtures / "cirr", tmp_path, split=["test1"], submission=tmp_path / "sub")
    recs = {str(r["pairid"]): r for r in load_json("cirr/captions/cap.rc2.test1.json")}
    rec = json.loads((tmp_path / "sub" / "test1_pred_ranks_recall.json").read_text())
    sub = json.loads((tmp_path / "sub" / "test1_pred_ranks_recall_subset.json").read_text())
    assert validate_cirr_submission(rec, "recall", allow_short=True, pairids=list(recs)) == []
    assert validate_cirr_submission(sub, "recall_subset", pairids=list(recs)) == []
    for pid, r in recs.items():
        assert len(rec[pid]) == facts.cirr_test1[1] - 1 and r["reference"] not in rec[pid]  # all images but the reference
        assert set(sub[pid]) <= set(r["img_set"]["members"]) - {r["reference"]}
    assert res.outputs["submission"] == str(tmp_path / "sub")


# --- CIRCO ----------------------------------------------------------------------------
def _official_ap(pred, gts, k):
    labels = np.isin(np.array(pred), np.array(gts))
    prec = np.cumsum(labels) * labels / np.arange(1, len(labels) + 1)
    return float(np.sum(prec[:k]) / min(len(gts), k))


def test_circo_constant_model(fixtures, tmp_path, solid, load_json):
    recs = load_json("circo/annotations/val.json")
    ids = {r["reference_img_id"] for r in recs} | {g for r in recs for g in r["gt_img_ids"]} | set(range(1, 40))
    for i in ids:
        solid(tmp_path / f"{i:012d}.jpg")
    m = evaluate("circo", fixtures / "circo", tmp_path).metrics
    pred = sorted(ids)[:50]  # all ties: ascending id order, reference kept
    for k in (5, 10, 25, 50):
        ap = np.mean([_official_ap(pred, r["gt_img_ids"], k) for r in recs])
        assert m[f"composed/val/mAP@{k}"] == pytest.approx(100 * ap, abs=1e-3)
        rec = np.mean([r["target_img_id"] in pred[:k] for r in recs])
        assert m[f"composed/val/R@{k}"] == pytest.approx(100 * rec, abs=1e-3)
    assert m["primary_metric"] == "composed/val/mAP@10"


def test_circo_colour_signal(fixtures, tmp_path, solid, load_json):
    recs = load_json("circo/annotations/val.json")
    for r, colour in zip(recs, hues(len(recs)), strict=True):  # each query's reference and gts share a colour
        for i in (r["reference_img_id"], *r["gt_img_ids"]):
            solid(tmp_path / f"{i:012d}.jpg", colour)
    for i in range(1, 30):
        solid(tmp_path / f"{i:012d}.jpg", (0, 0, 0))
    m = evaluate("circo", fixtures / "circo", tmp_path, mode=["image"], exclude_reference=True).metrics
    for k in (5, 10, 25, 50):
        assert m[f"image/val/mAP@{k}"] == pytest.approx(100.0)
    biggest = max(len(r["gt_img_ids"]) for r in recs)
    for k in (5, 10, 25, 50):
        if k >= biggest:
            assert m[f"image/val/R@{k}"] == pytest.approx(100.0)
    assert m["protocol/exclude_reference"] is True


def test_circo_test_submission(fixtures, tmp_path, solid, load_json):
    recs = load_json("circo/annotations/test.json")
    for r in recs:
        solid(tmp_path / f"{r['reference_img_id']:012d}.jpg")
    for i in range(1, 60):
        solid(tmp_path / f"{i:012d}.jpg")
    evaluate("circo", fixtures / "circo", tmp_path, split=["test"], submission=tmp_path / "sub")
    sub = json.loads((tmp_path / "sub" / "circo-test-submission.json").read_text())
    assert validate_circo_submission(sub, num_queries=len(recs)) == []
    example = load_json("circo/submission_examples/submission_test.json")
    assert set(sub) == set(example)


# --- GeneCIS --------------------------------------------------------------------------
def _genecis_images(load_json, root, solid, red=()):
    for task in ("focus_object", "change_object"):
        for r in load_json(f"genecis/genecis/{task}.json"):
            for e in (r["reference"], r["target"], *r["gallery"]):
                i = e["val_image_id"]
                solid(root / f"{i:012d}.jpg", (255, 0, 0) if i in red else (0, 0, 0))


def test_genecis_constant_model_scores_zero(fixtures, tmp_path, solid, load_json):
    _genecis_images(load_json, tmp_path, solid)
    m = evaluate("genecis", fixtures / "genecis", tmp_path).metrics
    for task in ("focus_object", "change_object"):
        for k in (1, 2, 3):
            assert m[f"composed/val/{task}/R@{k}"] == 0.0  # pessimistic ties: not 100
    assert m["composed/val/R@1"] == 0.0 and m["primary_metric"] == "composed/val/R@1"
    assert m["protocol/ties"] == "pessimistic"


def test_genecis_target_copy_in_gallery(fixtures, facts, tmp_path, solid, load_json):
    recs = load_json("genecis/genecis/change_object.json")
    copy = recs[facts.genecis_target_copy[0]]
    red = {copy["reference"]["val_image_id"], copy["target"]["val_image_id"]}
    _genecis_images(load_json, tmp_path, solid, red)
    m = evaluate("genecis", fixtures / "genecis", tmp_path, mode=["image"]).metrics
    expect = {}
    for task in ("focus_object", "change_object"):
        ranks = []
        for r in load_json(f"genecis/genecis/{task}.json"):
            query_red = r["reference"]["val_image_id"] in red
            cands = list(dict.fromkeys(e["val_image_id"] for e in (r["target"], *r["gallery"])))
            score = {c: 1.0 if query_red and c in red else 0.0 for c in cands}
            t = r["target"]["val_image_id"]
            ranks.append(1 + sum(1 for c in cands if c != t and score[c] >= score[t]))
        for k in (1, 2, 3):
            expect[f"image/val/{task}/R@{k}"] = 100.0 * np.mean([x <= k for x in ranks])
    assert expect["image/val/change_object/R@1"] > 0  # that record is found despite its gallery copy
    for key, value in expect.items():
        assert m[key] == pytest.approx(value, abs=1e-3), key


@pytest.mark.slow
def test_cirr_test1_files_do_not_change_with_the_batch_size(fixtures, facts, tmp_path, solid, load_json):
    """A blank caption (" ") is image-only per query (issue 15.7): alone or batched, the same files."""
    import torch
    from safetensors.torch import save_file

    from cirkit.backbones._openclip import create_clip

    paths = json.loads((fixtures / "cirr" / "image_splits" / "split.rc2.test1.json").read_text())
    for rel, rgb in zip(paths.values(), hues(len(paths)), strict=True):
        solid(tmp_path / rel, rgb)
    torch.manual_seed(0)
    clip, _, _ = create_clip("cirkit-tiny", None)
    weights = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(weights))
    assert any(not r["caption"].strip() for r in load_json("cirr/captions/cap.rc2.test1.json"))
    files = {}
    for bs in (1, 4, 64):
        evaluate("cirr", fixtures / "cirr", tmp_path, split=["test1"], submission=tmp_path / f"sub{bs}",
                 backbone="clip", model="cirkit-tiny", pretrained=str(weights), batch_size=bs)
        files[bs] = {p.name: p.read_text() for p in sorted((tmp_path / f"sub{bs}").glob("*.json"))}
    assert files[1] and files[1] == files[4] == files[64]
