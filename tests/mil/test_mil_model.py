"""Gated-attention MIL forward pass: empty bags, single instances, padding, checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mil.bagio import Bag
from mil.dataset import (
    BagDataset,
    FeatureSpec,
    PatientBag,
    collate_bags,
    fit_normalisation,
    fit_spec,
)
from mil.model import (
    GatedAttentionMIL,
    MILEnsemble,
    ModelParams,
    load_checkpoint,
    save_checkpoint,
)
from mil.synthetic_bags import make_bag

SMALL = ModelParams(embed_dim=8, attention_dim=4, crop_embed_dim=4, feature_hidden=8,
                    classifier_hidden=8, dropout=0.0)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _bags(n: int = 12, seed: int = 0) -> list[PatientBag]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = i % 3
        bag, age = make_bag(rng, ("aSVD", "CAA", "CADASIL")[label], f"P{i}", crop_size=8)
        out.append(PatientBag(f"P{i}", "A", label, age, bag))
    return out


def _empty(pid: str = "E", f: int = 13) -> PatientBag:
    from mil import FEATURE_NAMES

    bag = Bag(pid, np.zeros((0, 3, 8, 8), np.float32), np.zeros((0, f), np.float32),
              FEATURE_NAMES[:f], np.zeros(0, np.int64))
    return PatientBag(pid, "A", -1, float("nan"), bag)


def _model(bags: list[PatientBag], **spec_kw: object) -> GatedAttentionMIL:
    spec = fit_spec(bags, **spec_kw)
    torch.manual_seed(0)
    m = GatedAttentionMIL(spec, SMALL)
    m.set_normalisation(fit_normalisation(bags, spec))
    return m.eval()


def _forward(m: GatedAttentionMIL, bags: list[PatientBag], grad: bool = False):  # noqa: ANN202
    batch = collate_bags([BagDataset(bags, m.spec)[i] for i in range(len(bags))])
    with torch.set_grad_enabled(grad):
        return m(batch["crops"], batch["feats"], batch["mask"], batch["summary"]), batch


def test_empty_bags_forward() -> None:
    bags = _bags()
    m = _model(bags)
    out, batch = _forward(m, [_empty("E1"), bags[0], _empty("E2")])
    assert torch.isfinite(out.logits).all()
    assert out.attention.shape == batch["mask"].shape
    assert (out.attention[0] == 0).all() and (out.attention[2] == 0).all()
    # Two empty bags with the same (missing) age and summary get the same prediction.
    torch.testing.assert_close(out.logits[0], out.logits[2])
    # A batch of only empty bags works too.
    out, batch = _forward(m, [_empty()])
    assert batch["mask"].shape == (1, 1) and torch.isfinite(out.logits).all()
    probs = torch.softmax(out.logits, 1)
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_empty_embedding_is_learned() -> None:
    bags = _bags()
    m = _model(bags)
    m.train()
    out, _ = _forward(m, [_empty()], grad=True)
    out.logits[0, 0].backward()
    assert m.empty_embedding.grad is not None and m.empty_embedding.grad.abs().sum() > 0


def test_single_instance_attention_is_one() -> None:
    bags = _bags()
    singles = []
    for pb in bags:
        if pb.bag.n_instances:
            b = pb.bag
            one = Bag(b.patient_id, b.crops[:1], b.features[:1], b.feature_names, b.lesion_ids[:1])
            singles.append(PatientBag(pb.patient_id, "A", pb.label, pb.age, one))
    out, batch = _forward(_model(bags), singles + [bags[0]])  # padded alongside a bigger bag
    torch.testing.assert_close(out.attention[: len(singles), 0], torch.ones(len(singles)))
    assert (out.attention[: len(singles), 1:] == 0).all()


def test_attention_sums_to_one_and_padding_invariant() -> None:
    bags = [pb for pb in _bags(30) if pb.bag.n_instances >= 2]
    m = _model(bags)
    out, batch = _forward(m, bags)
    torch.testing.assert_close(out.attention.sum(1), torch.ones(len(bags)))
    assert (out.attention[~batch["mask"]] == 0).all()
    for i in range(3):  # same result alone (no padding) as in the padded batch
        alone, _ = _forward(m, [bags[i]])
        torch.testing.assert_close(alone.logits[0], out.logits[i], atol=1e-5, rtol=1e-5)


def test_crop_encoder_sees_real_instances_only() -> None:
    bags = [pb for pb in _bags(30) if pb.bag.n_instances >= 1][:6] + [_empty()]
    m = _model(bags)
    seen: list[int] = []
    m.crop_encoder.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    out, batch = _forward(m, bags)
    n_real = int(batch["mask"].sum())
    assert seen == [n_real] and n_real < batch["mask"].numel()
    # Same logits as encoding every padded position (the encoding before this change).
    b, n = batch["mask"].shape
    crops = (batch["crops"].reshape(b * n, *batch["crops"].shape[2:]) - m.crop_mean) / m.crop_std
    padded = m.crop_encoder(crops).reshape(b, n, -1)
    with torch.no_grad():
        m.embed_crops = lambda c, mask: padded  # type: ignore[method-assign]
        ref = m(batch["crops"], batch["feats"], batch["mask"], batch["summary"])
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.attention, ref.attention, atol=1e-5, rtol=1e-5)
    # The encoder still learns through the masked encoding.
    m.train()
    del m.embed_crops
    out, _ = _forward(m, bags, grad=True)
    out.logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in m.crop_encoder.parameters())


def test_features_only_and_crops_only() -> None:
    bags = _bags()
    for kw in ({"use_crops": False}, {"features": [], "use_summary": False}):
        m = _model(bags, **kw)
        out, _ = _forward(m, bags[:4] + [_empty()])
        assert torch.isfinite(out.logits).all()
    with pytest.raises(ValueError):
        GatedAttentionMIL(FeatureSpec([], use_crops=False), SMALL)


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    bags = _bags()
    m = _model(bags)
    save_checkpoint(m, tmp_path, {"note": "x"})
    state = torch.load(tmp_path / "model.pth", weights_only=True)
    assert "feat_mean" in state and "summary_std" in state and "crop_mean" in state
    m2, info = load_checkpoint(tmp_path)
    assert info["meta"] == {"note": "x"}
    assert m2.spec == m.spec
    a, _ = _forward(m, bags)
    b, _ = _forward(m2, bags)
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(m2.feat_std, m.feat_std)


def _seeded(bags: list[PatientBag], seed: int) -> GatedAttentionMIL:
    spec = fit_spec(bags)
    torch.manual_seed(seed)
    m = GatedAttentionMIL(spec, SMALL)
    m.set_normalisation(fit_normalisation(bags, spec))
    return m.eval()


def test_ensemble_averages_member_probabilities_and_attention(tmp_path: Path) -> None:
    bags = _bags() + [_empty()]
    members = [_seeded(bags, s) for s in (0, 1, 2)]
    ens = MILEnsemble(members).eval()
    out, batch = _forward(ens, bags)
    one = [_forward(m, bags)[0] for m in members]
    mean_p = torch.stack([torch.softmax(o.logits, 1) for o in one]).mean(0)
    # Members differ (else the test proves nothing), the ensemble is their mean.
    assert not torch.allclose(torch.softmax(one[0].logits, 1), torch.softmax(one[1].logits, 1))
    torch.testing.assert_close(torch.softmax(out.logits, 1), mean_p)
    torch.testing.assert_close(out.attention, torch.stack([o.attention for o in one]).mean(0))
    sums = out.attention.sum(1)
    nonempty = batch["mask"].any(1)
    torch.testing.assert_close(sums[nonempty], torch.ones(int(nonempty.sum())))
    assert float(sums[~nonempty].abs().sum()) == 0.0

    # Saved as one checkpoint per member, loaded back as the same ensemble.
    save_checkpoint(ens, tmp_path, {"note": "ens"})
    assert {p.name for p in tmp_path.glob("*.pth")} == {"model.pth", "model_m1.pth",
                                                         "model_m2.pth"}
    back, info = load_checkpoint(tmp_path)
    assert isinstance(back, MILEnsemble) and len(back.members) == 3
    assert info["meta"] == {"note": "ens", "ensemble": ["model", "model_m1", "model_m2"]}
    torch.testing.assert_close(_forward(back, bags)[0].logits, out.logits)

    # A single model saved over it is single again (no stale member list).
    save_checkpoint(members[1], tmp_path, {"note": "one"})
    single, info = load_checkpoint(tmp_path)
    assert isinstance(single, GatedAttentionMIL) and info["meta"] == {"note": "one"}


def test_ensemble_errors(tmp_path: Path) -> None:
    bags = _bags()
    with pytest.raises(ValueError, match="at least one"):
        MILEnsemble([])
    with pytest.raises(ValueError, match="member 1 has a different feature spec"):
        MILEnsemble([_seeded(bags, 0), _model(bags, use_crops=False)])
    save_checkpoint(MILEnsemble([_seeded(bags, 0), _seeded(bags, 1)]), tmp_path)
    (tmp_path / "model_m1.pth").unlink()
    with pytest.raises(FileNotFoundError, match="model_m1.pth"):
        load_checkpoint(tmp_path / "model.pth")


def test_instance_dropout_recomputes_summary_on_kept_lesions() -> None:
    bags = [pb for pb in _bags(9) if pb.bag.n_instances >= 4]
    assert bags
    spec = fit_spec(bags)
    plain = BagDataset(bags, spec)
    dropped = BagDataset(bags, spec, seed=3, instance_dropout=0.9)
    k = spec.summary_names.index("log_n")
    sizes = []
    for i, pb in enumerate(bags):
        n = pb.bag.n_instances
        assert plain[i]["feats"].shape[0] == n  # no dropout: the whole bag
        for _ in range(5):
            item = dropped[i]
            m = item["feats"].shape[0]
            assert 0 <= m <= n
            # the bag-level count follows the lesions that were kept
            assert item["summary"][k].item() == pytest.approx(np.log1p(m), abs=1e-6)
            sizes.append(m / n)
    assert min(sizes) < 1.0  # lesions were dropped at least once
    small = [pb for pb in _bags(30) if pb.bag.n_instances == 1]
    if small:  # a one-lesion bag is sometimes emptied, and then counts zero lesions
        ds = BagDataset(small[:1], fit_spec(small[:1]), seed=0, instance_dropout=0.9)
        items = [ds[0] for _ in range(40)]
        empties = [it for it in items if it["feats"].shape[0] == 0]
        assert empties and all(it["summary"][ds.spec.summary_names.index("log_n")].item() == 0.0
                               for it in empties)
    with pytest.raises(ValueError, match="instance_dropout"):
        BagDataset(bags, spec, instance_dropout=1.0)


def test_instance_injection_adds_lesions_of_other_bags_and_recounts() -> None:
    bags = _bags(9)
    spec = fit_spec(bags)
    plain = BagDataset(bags, spec)
    inj = BagDataset(bags, spec, seed=1, instance_injection=1.0, max_injected=2)
    k = spec.summary_names.index("log_n")
    own = {i: plain[i]["feats"].numpy() for i in range(len(bags))}
    others = {i: np.concatenate([own[j] for j in own if j != i]) for i in own}
    added = []
    for i, pb in enumerate(bags):
        n = pb.bag.n_instances
        for _ in range(4):
            item = inj[i]
            feats = item["feats"].numpy()
            m = feats.shape[0] - n
            assert 1 <= m <= 2
            assert item["label"].item() == pb.label  # the bag keeps its label
            np.testing.assert_array_equal(feats[:n], own[i])  # its own lesions first
            for row in feats[n:]:  # each added lesion is a lesion of another bag
                assert np.isclose(others[i], row).all(axis=1).any()
            assert item["crops"].shape[0] == feats.shape[0]
            assert item["summary"][k].item() == pytest.approx(np.log1p(n + m), abs=1e-6)
            added.append(m)
    assert set(added) == {1, 2}
    # q = 0 leaves the bags alone; a single bag has nothing to borrow from
    off = BagDataset(bags, spec, seed=1, instance_injection=0.0)
    assert all(off[i]["feats"].shape[0] == pb.bag.n_instances for i, pb in enumerate(bags))
    alone = BagDataset(bags[:1], fit_spec(bags[:1]), seed=0, instance_injection=1.0)
    assert alone[0]["feats"].shape[0] == bags[0].bag.n_instances
    with pytest.raises(ValueError, match="instance_injection"):
        BagDataset(bags, spec, instance_injection=1.5)
    with pytest.raises(ValueError, match="max_injected"):
        BagDataset(bags, spec, instance_injection=0.5, max_injected=0)


def test_mean_score_summary_follows_the_score_feature() -> None:
    bags = _bags()
    assert all(pb.bag.has_feature("score") for pb in bags)
    with_score = fit_spec(bags, features=["score", "volume_mm3"])
    assert with_score.feature_names == ["score", "volume_mm3"]
    assert "mean_score" in with_score.summary_names
    # A config that leaves the score out must not get it back through the summary.
    without = fit_spec(bags, features=["volume_mm3"])
    assert "score" not in without.feature_names
    assert "mean_score" not in without.summary_names
    assert "log_n" in without.summary_names and "age" in without.summary_names
