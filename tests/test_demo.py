"""The face-recognition demo: its dataset, its verification metrics, the
image-folder path, and `python -m relkd.demo --quick` end to end."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

import relkd
from relkd.data import ImageFolderFaces, SyntheticFaces, split_identities
from relkd.demo.cli import select_runs
from relkd.demo.models import ResNetTeacher, StudentCNN, count_macs
from relkd.demo.report import VerificationProtocol
from relkd.demo.training import QUICK, RUNS, DemoData, pk_batches
from relkd.metrics import (cosine_scores, pair_scores, roc_auc, roc_curve, tpr_at_fpr,
                           verification_metrics, verification_pairs)


# --------------------------------------------------------------- SyntheticFaces
def test_synthetic_faces_shapes_and_labels():
    ds = SyntheticFaces(5, 3, seed=1, size=40)
    assert len(ds) == 15
    image, label = ds[7]
    assert image.shape == (1, 40, 40) and image.dtype == torch.float32
    assert label == 2
    everything = ds.images()
    assert everything.shape == (15, 1, 40, 40)
    assert float(everything.min()) >= 0.0 and float(everything.max()) <= 1.0
    assert float(everything.std()) > 0.05  # not a blank canvas
    assert torch.equal(ds.labels, torch.arange(5).repeat_interleave(3))


def test_synthetic_faces_are_deterministic_and_batch_independent():
    ds = SyntheticFaces(6, 4, seed=3)
    batch = ds.images()
    again = SyntheticFaces(6, 4, seed=3).images(batch_size=5)  # other batch boundaries
    assert torch.equal(batch, again)
    # One at a time, vectorised float math may round differently in the last bit.
    for i in (0, 9, 23):
        torch.testing.assert_close(ds[i][0], batch[i], rtol=0, atol=1e-6)
    # Held-out identities are the same faces as in a larger range.
    held_out = SyntheticFaces(2, 4, seed=3, first_identity=4)
    torch.testing.assert_close(held_out.images(), batch[16:24], rtol=0, atol=1e-6)
    # Another seed, another identity or another sample is another image.
    assert not torch.equal(SyntheticFaces(6, 4, seed=4).images(), batch)
    assert not torch.equal(batch[0], batch[1]) and not torch.equal(batch[0], batch[4])


def test_synthetic_faces_identities_are_distinguishable():
    """On the inner face (eyes to mouth, clear of the background), two
    samples of one identity are nearly equal without nuisance and far apart
    with it, though still closer than two identities."""
    def same_over_other(nuisance):
        x = SyntheticFaces(40, 2, seed=0, nuisance=nuisance).images()
        x = x[:, :, 10:22, 8:24].flatten(1)
        same = (x[0::2] - x[1::2]).norm(dim=1).mean()
        other = (x[0::2] - x[0::2].roll(1, 0)).norm(dim=1).mean()
        return float(same / other)
    assert same_over_other(0.0) < 0.1
    assert 0.3 < same_over_other(0.5) < 0.9


@pytest.mark.parametrize("kwargs, name", [
    (dict(num_identities=0, images_per_identity=2), "num_identities"),
    (dict(num_identities=2, images_per_identity=0), "images_per_identity"),
    (dict(num_identities=2, images_per_identity=2, size=8), "size"),
    (dict(num_identities=2, images_per_identity=2, seed=1.5), "seed"),
    (dict(num_identities=2, images_per_identity=2, nuisance=-1.0), "nuisance"),
    (dict(num_identities=2, images_per_identity=2, first_identity=-1), "first_identity"),
    # 32-bit generator: these would silently alias seed 1 and identity 0.
    (dict(num_identities=2, images_per_identity=2, seed=2**32 + 1), "seed"),
    (dict(num_identities=2, images_per_identity=2, seed=-1), "seed"),
    (dict(num_identities=2, images_per_identity=2, first_identity=2**32 - 1), "first_identity"),
])
def test_synthetic_faces_bad_input(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SyntheticFaces(**kwargs)


def test_synthetic_faces_render_checks_labels():
    ds = SyntheticFaces(3, 2)
    with pytest.raises(ValueError, match="labels"):
        ds.render(torch.tensor([3]), torch.tensor([0]))
    with pytest.raises(ValueError, match="samples"):
        ds.render(torch.tensor([0, 1]), torch.tensor([0]))
    with pytest.raises(IndexError):
        ds[6]
    with pytest.raises(ValueError, match=r"^labels: expected integers"):
        ds.render(torch.tensor([0.7]), torch.tensor([0]))  # would truncate to identity 0
    with pytest.raises(ValueError, match=r"^start, stop: expected"):
        ds.images(0, 100)
    assert ds.images(2, 2).shape == (0, 1, ds.size, ds.size)


# --------------------------------------------------------------------- metrics
def _scores(genuine, impostor):
    scores = torch.tensor(genuine + impostor)
    is_genuine = torch.tensor([True] * len(genuine) + [False] * len(impostor))
    return scores, is_genuine


def test_tpr_at_fpr_hand_computed():
    scores, genuine = _scores([0.9, 0.8, 0.4], [0.85, 0.5, 0.3, 0.2, 0.1])
    tprs = tpr_at_fpr(scores, genuine, [0.1, 0.2, 0.4, 1.0])
    # FPR 0.1 of 5 impostors: none may pass, threshold 0.85 -> only 0.9.
    assert tprs[0.1] == pytest.approx(1 / 3)
    # 0.2: one may pass, threshold 0.5 -> 0.9 and 0.8.
    assert tprs[0.2] == pytest.approx(2 / 3)
    # 0.4: two may pass, threshold 0.3 -> all three.
    assert tprs[0.4] == pytest.approx(1.0)
    assert tprs[1.0] == pytest.approx(1.0)


def test_roc_auc_hand_computed_with_a_tie():
    # 0.9 beats 5 impostors, 0.8 beats 4, 0.4 beats 3: 12 of 15.
    scores, genuine = _scores([0.9, 0.8, 0.4], [0.85, 0.5, 0.3, 0.2, 0.1])
    assert roc_auc(scores, genuine) == pytest.approx(12 / 15)
    # A genuine score equal to an impostor's counts one half: 0.5 beats 3.5 of 5.
    scores, genuine = _scores([0.5], [0.85, 0.5, 0.3, 0.2, 0.1])
    assert roc_auc(scores, genuine) == pytest.approx(3.5 / 5)


def test_verification_metrics_and_curve_agree():
    gen = torch.Generator().manual_seed(0)
    scores = torch.cat([torch.randn(300, generator=gen) + 2, torch.randn(5000, generator=gen)])
    genuine = torch.arange(5300) < 300
    m = verification_metrics(scores, genuine, [1e-2, 1e-3], curve_points=50)
    assert m["genuine_pairs"] == 300 and m["impostor_pairs"] == 5000
    assert m["tpr"] == tpr_at_fpr(scores, genuine, [1e-2, 1e-3])
    assert m["auc"] == roc_auc(scores, genuine)
    fprs, tprs = roc_curve(scores, genuine, points=50)
    assert m["roc"] == {"fpr": fprs, "tpr": tprs}
    assert fprs[0] == pytest.approx(1 / 5000) and fprs[-1] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(tprs, tprs[1:]))  # monotone


def test_metrics_bad_input():
    scores, genuine = _scores([0.9], [0.1])
    with pytest.raises(ValueError, match="genuine"):
        tpr_at_fpr(scores, genuine.long())
    with pytest.raises(ValueError, match="genuine"):
        roc_auc(scores[:1], genuine[:1])  # no impostor
    with pytest.raises(ValueError, match="^fprs: expected a non-empty sequence of false-positive rates"):
        tpr_at_fpr(scores, genuine, [0.0])
    # NaN scores sorted above every impostor: AUC 1.0 for a diverged model.
    nan = torch.full((5,), float("nan"))
    nan_genuine = torch.tensor([True, True, False, False, False])
    for metric in (roc_auc, tpr_at_fpr, verification_metrics, roc_curve):
        with pytest.raises(ValueError, match=r"^scores: 5 of 5 are NaN"):
            metric(nan, nan_genuine)
    with pytest.raises(ValueError, match=r"^min_fpr: expected a false-positive rate in"):
        roc_curve(scores, genuine, min_fpr=2.0)
    emb = torch.randn(4, 3)
    for bad, name in (((torch.zeros(2, 2, dtype=torch.long), torch.zeros(2)), "a"),
                      ((torch.tensor([0.5, 1.0]), torch.tensor([0, 1])), "a"),
                      ((torch.tensor([0, 1], dtype=torch.uint8), torch.tensor([0, 1])), "a"),
                      ((torch.tensor([0, 1]), torch.tensor([0])), "b")):
        with pytest.raises(ValueError, match=rf"^{name}: expected"):
            pair_scores(emb, *bad)


def test_verification_pairs_all_and_sampled():
    labels = torch.tensor([0, 0, 1, 1, 1, 2])
    a, b, genuine = verification_pairs(labels)
    pairs = {(int(i), int(j)) for i, j in zip(a, b)}
    assert len(pairs) == 15 and all(i < j for i, j in pairs)  # every pair once
    assert int(genuine.sum()) == 4
    assert torch.equal(genuine, labels[a] == labels[b])
    a2, b2, g2 = verification_pairs(labels, max_impostors=5, seed=7)
    assert int(g2.sum()) == 4 and int((~g2).sum()) == 5
    assert torch.equal(g2, labels[a2] == labels[b2])
    assert len({(int(i), int(j)) for i, j in zip(a2, b2)}) == 9
    again = verification_pairs(labels, max_impostors=5, seed=7)
    assert torch.equal(again[0], a2) and torch.equal(again[1], b2)


def test_pair_scores_default_and_custom_rule_match():
    emb = torch.randn(40, 8, generator=torch.Generator().manual_seed(1))
    a, b, _ = verification_pairs(torch.arange(40) // 4)
    expected = cosine_scores(emb[a], emb[b])
    torch.testing.assert_close(pair_scores(emb, a, b), expected)
    chunked = pair_scores(emb, a, b, score_fn=cosine_scores, chunk_size=17)
    torch.testing.assert_close(chunked, expected)
    shifted = pair_scores(emb, a, b, score_fn=lambda x, y: cosine_scores(x, y) - 1.0)
    torch.testing.assert_close(shifted, expected - 1.0)


def test_protocol_reports_a_diverged_network_as_nan_not_an_error():
    # The metrics refuse NaN scores; the demo's sweep goes on with NaN rows.
    protocol = VerificationProtocol(torch.arange(12) // 3, max_impostors=None, curve_points=5)
    emb = torch.randn(12, 4)
    emb[2, 0] = float("nan")
    m = protocol.evaluate(emb)
    assert math.isnan(m["auc"]) and all(math.isnan(v) for v in m["tpr"].values())
    assert m["nan_scores"] == 11 and len(m["roc"]["fpr"]) == 5
    assert not math.isnan(protocol.evaluate(torch.randn(12, 4))["auc"])


def test_ida_evaluation_matches_the_reference_scores():
    # The demo's IDA rows score each face's statistics once and align every
    # pair with them; that must equal the reference's per-pair ida_scores.
    g = torch.Generator().manual_seed(3)
    emb = torch.randn(60, 8, generator=g, dtype=torch.float64)
    support = torch.randn(90, 8, generator=g, dtype=torch.float64)
    protocol = VerificationProtocol(torch.arange(60) // 5, max_impostors=400)
    for mode in ("shift", "asnorm"):
        got = protocol.evaluate_ida(emb, relkd.IDAScorer(support, k=7, mode=mode))
        expected = relkd.reference.ida_scores(emb[protocol.a], emb[protocol.b], support, 7,
                                              1.0, mode)
        want = verification_metrics(expected.float(), protocol.genuine, protocol.fprs, 200)
        assert got["tpr"] == want["tpr"] and got["auc"] == pytest.approx(want["auc"], abs=1e-6)
        assert got != protocol.evaluate(emb)  # the alignment changed the scores


# ---------------------------------------------------------------- demo pieces
def test_student_is_at_least_ten_times_cheaper():
    teacher, student = count_macs(ResNetTeacher(), (1, 32, 32)), count_macs(StudentCNN(),
                                                                           (1, 32, 32))
    assert teacher >= 10 * student
    # One hand-checkable layer: a 3x3 conv 1 -> 8 at stride 2 on 32x32 is 16*16*8*9 MACs.
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, 2, 1))
    assert count_macs(conv, (1, 32, 32)) == 16 * 16 * 8 * 9


def test_pk_batches_have_positives():
    labels = torch.arange(10).repeat_interleave(torch.tensor([5, 5, 5, 5, 5, 5, 5, 5, 5, 2]))
    for rows in pk_batches(labels, p=4, k=3, steps=20, seed=0):
        assert rows.shape == (12,)
        ids, counts = labels[rows].unique(return_counts=True)
        assert len(ids) == 4 and bool((counts == 3).all())
        for chunk in rows.view(4, 3):  # k distinct images where the identity has k
            if len(torch.nonzero(labels == labels[chunk[0]])) >= 3:
                assert len(chunk.unique()) == 3


def test_run_selection_and_weight_overrides():
    runs = select_runs("ekd, FCD", ["EKD=7", "CoupleFace=50:1"])
    assert [r.name for r in runs] == ["CosFace (no KD)", "FCD", "EKD"]  # the table's order
    assert runs[2].weight == 7.0 and runs[1].weight == RUNS[1].weight
    coupleface = select_runs(None, ["CoupleFace=20:1"])[2]
    assert (coupleface.name, coupleface.weight, coupleface.inner) == ("CoupleFace", 20.0, 1.0)
    with pytest.raises(ValueError, match="--runs"):
        select_runs("FCD,nope")
    with pytest.raises(ValueError, match="--weight"):
        select_runs(None, ["EKD=heavy"])
    for bad, why in (("EKD=nan", "finite"), ("EKD=inf", "finite"), ("CoupleFace=1:inf", "finite"),
                     ("FCD=5:3", "one term")):  # FCD's inner weight would be printed, unused
        with pytest.raises(ValueError, match=rf"^--weight: .*{why}"):
            select_runs(None, [bad])


def _tiny_folder(root, identities=8, per_identity=3):
    Image = pytest.importorskip("PIL.Image")  # installed with matplotlib by `make test`
    faces = SyntheticFaces(identities, per_identity, seed=5, size=48).images()
    for i in range(identities):
        folder = root / f"person_{i:02d}"
        folder.mkdir(parents=True)
        for j in range(per_identity):
            pixels = (faces[i * per_identity + j, 0] * 255).byte().numpy()
            Image.fromarray(pixels).convert("RGB").save(folder / f"{j}.png")
    (root / "empty_identity").mkdir()
    (root / "README.txt").write_text("not an identity")
    (root / "person_00" / "notes.txt").write_text("not an image")


def test_image_folder_reads_and_splits_by_identity(tmp_path):
    _tiny_folder(tmp_path)
    ds = ImageFolderFaces(str(tmp_path), size=32)
    assert ds.num_identities == 8 and len(ds) == 24
    image, label = ds[4]
    assert image.shape == (1, 32, 32) and label == 1
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0 and float(image.std()) > 0.02
    train_ids, test_ids = split_identities(ds.num_identities, 3, seed=0)
    assert sorted(train_ids + test_ids) == list(range(8)) and len(test_ids) == 3
    test = ds.subset(test_ids)
    assert test.num_identities == 3 and len(test) == 9
    assert torch.equal(test.labels, torch.arange(3).repeat_interleave(3))
    assert {os.path.dirname(f) for f in test.files}.isdisjoint(
        {os.path.dirname(f) for f in ds.subset(train_ids).files})
    assert test.images().shape == (9, 1, 32, 32)
    with pytest.raises(ValueError, match=r"^identities: expected distinct"):
        ds.subset([0, 0])  # the repeat would be a name without images
    with pytest.raises(ValueError, match="root"):
        ImageFolderFaces(str(tmp_path / "person_00"))  # images, but no identity folders
    lonely = tmp_path / "lonely"
    (lonely / "only_one").mkdir(parents=True)
    shutil.copy(ds.files[0], lonely / "only_one" / "0.png")
    with pytest.raises(ValueError, match="data_dir"):
        DemoData(QUICK, str(lonely))


def test_demo_runs_on_an_image_folder(tmp_path):
    _tiny_folder(tmp_path / "faces", identities=10, per_identity=4)
    out = tmp_path / "out"
    _run_demo("--quick", "--data", str(tmp_path / "faces"), "--runs", "FCD",
              "--cache", str(tmp_path / "cache"), "--out", str(out))
    payload = json.loads((out / "results.json").read_text())
    assert "ImageFolder" in payload["data"]
    # Half of the 10 identities are held out (the quick setting asks for 40).
    assert payload["verification"]["pairs"].startswith("30 genuine")
    for scoring in ("cosine", "IDA-shift k=50"):
        assert [s["name"] for s in payload["summary"] if s["scoring"] == scoring] == [
            "teacher", "CosFace (no KD)", "FCD"]
    assert (out / "roc.png").exists()


# ----------------------------------------------------------------- end to end
def _check_sane(payload, scorings=("cosine", "IDA-shift k=50")):
    for scoring in scorings:
        names = [s["name"] for s in payload["summary"] if s["scoring"] == scoring]
        assert names == ["teacher"] + [r.name for r in RUNS]
    assert {s["scoring"] for s in payload["summary"]} == set(scorings)
    for s in payload["summary"]:
        for key in ("tpr@0.01", "tpr@0.001", "tpr@0.0001", "auc"):
            assert 0.0 <= s[key]["mean"] <= 1.0, (s["name"], key)
        assert s["tpr@0.0001"]["mean"] <= s["tpr@0.001"]["mean"] <= s["tpr@0.01"]["mean"]
        assert (s["gap_closed"] is None) == (s["name"] in ("teacher", "CosFace (no KD)"))
    teacher = payload["summary"][0]
    # Even the quick teacher (60 steps) must have learnt something.
    assert teacher["auc"]["mean"] > 0.8
    assert payload["verification"]["pairs"] == "600 genuine and 28,080 impostor pairs"


def _run_demo(*args, set_passive=True):
    """`python -m relkd.demo ARGS` in a subprocess, as `make demo` runs it;
    with set_passive=False OMP_WAIT_POLICY is unset, for the demo to set it
    (relkd/demo/__main__.py). Returns stdout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(relkd.__file__)))
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    if set_passive:
        env["OMP_WAIT_POLICY"] = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    done = subprocess.run([sys.executable, "-m", "relkd.demo", "--no-progress", "--device", "cpu",
                           *args], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_quick_demo_end_to_end(tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "out"
    printed = _run_demo("--quick", "--cache", str(cache), "--out", str(out))
    first = json.loads((out / "results.json").read_text())
    assert not first["teacher"]["cached"]
    _check_sane(first)
    table = printed[printed.index("\nrun "):]
    for name in ["teacher"] + [r.name for r in RUNS]:
        assert f"\n{name} " in table  # one table line per run
    png = (out / "roc.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # Second run: the teacher comes from the cache, and the same seeds give
    # the same numbers (checked on two runs to keep the test short; EKD's
    # fused gradient is not bitwise reproducible with 2 threads, README).
    # It also runs with OMP_WAIT_POLICY unset: the demo sets it and restarts.
    _run_demo("--quick", "--cache", str(cache), "--out", str(out), "--runs", "FCD",
              set_passive=False)
    second = json.loads((out / "results.json").read_text())
    assert second["teacher"]["cached"]
    assert second["machine"]["omp_wait_policy"] == "PASSIVE"
    by_name = lambda p: {(s["name"], s["scoring"]): s for s in p["summary"]}  # noqa: E731
    for name in ("teacher", "CosFace (no KD)", "FCD"):
        for scoring in ("cosine", "IDA-shift k=50"):
            key = (name, scoring)
            assert by_name(second)[key]["tpr@0.001"] == by_name(first)[key]["tpr@0.001"]
            assert by_name(second)[key]["auc"] == by_name(first)[key]["auc"]
