"""Dice / IoU from confusion stats, checked by hand and against MONAI, and their reductions."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice, compute_iou
from monai.networks.utils import one_hot

from labeldiff.evaluate.metrics import confusion_stats, dice_from_stats, iou_from_stats, summarize


def test_confusion_stats_by_hand():
    """tp/fp/fn per class of a 2×3 example counted by hand."""
    target = np.array([[0, 0, 1],
                       [1, 2, 2]])
    pred = np.array([[0, 1, 1],
                     [2, 2, 0]])
    stats = confusion_stats(pred, target, 3)
    # class 0: tp (0,0); fp (1,2); fn (0,1)     class 1: tp (0,2); fp (0,1); fn (1,0)
    # class 2: tp (1,1); fp (1,0); fn (1,2)
    assert stats.tolist() == [[1, 1, 1], [1, 1, 1], [1, 1, 1]]
    target2 = np.array([1, 1, 1, 1, 0, 0])
    pred2 = np.array([1, 1, 1, 0, 1, 0])
    s2 = confusion_stats(pred2, target2, 2)
    assert s2.tolist() == [[1, 1, 1], [3, 1, 1]]
    np.testing.assert_allclose(dice_from_stats(s2), [2 / 4, 6 / 8])
    np.testing.assert_allclose(iou_from_stats(s2), [1 / 3, 3 / 5])
    # asymmetric case: fp and fn must not be swapped (under-segmentation = false negatives)
    s3 = confusion_stats(np.array([1, 0, 0, 0]), np.array([1, 1, 1, 0]), 2)
    assert s3.tolist() == [[1, 2, 0], [1, 0, 2]]
    with pytest.raises(ValueError, match="shape"):
        confusion_stats(pred2, target2[:5], 2)


def test_empty_and_absent_classes():
    """Empty vs empty is NaN (counted in n_empty); a class predicted but absent from the truth scores 0."""
    target = np.zeros((4, 4), int)
    target[:2] = 1
    pred = target.copy()
    pred[3, 3] = 2  # class 2 absent from the truth, predicted once
    stats = confusion_stats(pred, target, 4)  # class 3: absent from both
    dice, iou = dice_from_stats(stats), iou_from_stats(stats)
    assert dice[1] == 1.0 and iou[1] == 1.0
    assert dice[2] == 0.0 and iou[2] == 0.0
    assert math.isnan(dice[3]) and math.isnan(iou[3])
    np.testing.assert_allclose(dice[0], 2 * 7 / (2 * 7 + 1))
    s = summarize(stats[None])
    assert s["dice"]["n_empty"] == {"0": 0, "1": 0, "2": 0, "3": 1}
    assert s["dice"]["mean"] == pytest.approx((1 + 0) / 2)  # NaN class left out of the foreground mean
    assert math.isnan(s["dice"]["per_class"]["3"])


def _random_maps(rng, n, k, hw):
    """Integer maps where each image uses a random subset of the classes, so empty classes occur."""
    maps = []
    for _ in range(n):
        present = rng.choice(k, size=rng.integers(1, k + 1), replace=False)
        maps.append(rng.choice(present, size=hw))
    return np.stack(maps)


@pytest.mark.parametrize("seed", range(5))
def test_matches_monai(seed):
    """Where our Dice/IoU is finite it equals MONAI's (ignore_empty=False); where it is NaN MONAI gives 1.

    MONAI (meandice.DiceHelper.compute_channel, meaniou.compute_iou) with ignore_empty=False returns 1
    when ground truth and prediction are both empty, 0 when only the ground truth is empty."""
    rng = np.random.default_rng(seed)
    k, n = 3, 8
    target = _random_maps(rng, n, k, (6, 5))
    pred = _random_maps(rng, n, k, (6, 5))
    ours_stats = np.stack([confusion_stats(p, t, k) for p, t in zip(pred, target)])
    ours_dice, ours_iou = dice_from_stats(ours_stats), iou_from_stats(ours_stats)
    yp = one_hot(torch.from_numpy(pred)[:, None], num_classes=k)
    y = one_hot(torch.from_numpy(target)[:, None], num_classes=k)
    monai_dice = compute_dice(yp, y, include_background=True, ignore_empty=False).numpy()
    monai_iou = compute_iou(yp, y, include_background=True, ignore_empty=False).numpy()
    assert monai_dice.shape == ours_dice.shape == (n, k)
    for ours, theirs in ((ours_dice, monai_dice), (ours_iou, monai_iou)):
        finite = np.isfinite(ours)
        np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-6)
        assert np.all(theirs[~finite] == 1.0)
    # both kinds of case occur across seeds; at least check this seed has finite values and a 0 case
    assert finite.sum() > 0
    both_empty = [(i, c) for i in range(n) for c in range(k) if not (pred[i] == c).any() and not (target[i] == c).any()]
    assert sorted(zip(*np.nonzero(~np.isfinite(ours_dice)))) == both_empty


def test_monai_comparison_covers_empty_cases():
    """The random maps of the MONAI comparison really contain empty-vs-empty and predicted-but-absent cases."""
    n_nan = n_zero_absent = 0
    for seed in range(5):
        rng = np.random.default_rng(seed)
        target, pred = _random_maps(rng, 8, 3, (6, 5)), _random_maps(rng, 8, 3, (6, 5))
        for p, t in zip(pred, target):
            d = dice_from_stats(confusion_stats(p, t, 3))
            n_nan += int(np.isnan(d).sum())
            n_zero_absent += sum(1 for c in range(3) if (p == c).any() and not (t == c).any())
    assert n_nan > 0 and n_zero_absent > 0


def test_summarize_reductions():
    """per_class = nanmean over images; mean = mean over foreground classes; with background includes 0."""
    stats = np.array([
        # image 0: class0 tp=8, class1 dice 2*1/(2+1+1)=0.5, class2 empty
        [[8, 0, 0], [1, 1, 1], [0, 0, 0]],
        # image 1: class0 dice 2*2/(4+2)=2/3, class1 dice 1, class2 dice 0 (predicted, absent)
        [[2, 0, 2], [3, 0, 0], [0, 2, 0]],
    ])
    s = summarize(stats, class_names=["bg", "a", "b"])
    assert s["n_images"] == 2
    d = s["dice"]
    assert d["per_class"]["bg"] == pytest.approx((1 + 2 / 3) / 2)
    assert d["per_class"]["a"] == pytest.approx((0.5 + 1) / 2)
    assert d["per_class"]["b"] == pytest.approx(0.0)  # the NaN image is skipped
    assert d["mean"] == pytest.approx((0.75 + 0.0) / 2)
    assert d["mean_with_background"] == pytest.approx(((1 + 2 / 3) / 2 + 0.75 + 0) / 3)
    assert d["n_empty"] == {"bg": 0, "a": 0, "b": 1}
    i = s["iou"]
    assert i["per_class"]["bg"] == pytest.approx((1 + 0.5) / 2)
    assert i["per_class"]["a"] == pytest.approx((1 / 3 + 1) / 2)
    assert i["mean"] == pytest.approx((2 / 3 + 0) / 2)


def test_summarize_all_empty_class():
    """A class empty in every image has a NaN per-class score and does not poison the mean."""
    stats = np.array([[[4, 0, 0], [2, 0, 0], [0, 0, 0]]] * 3)
    s = summarize(stats)
    assert math.isnan(s["dice"]["per_class"]["2"])
    assert s["dice"]["n_empty"]["2"] == 3
    assert s["dice"]["mean"] == 1.0 and s["iou"]["mean"] == 1.0
    all_nan = summarize(np.zeros((2, 2, 3), int))
    assert math.isnan(all_nan["dice"]["mean"])


def test_plots_and_tables_name_the_classes_present():
    """Overlays carry a legend of the classes shown, named from dataset.json; results.md names them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from labeldiff.evaluate.report import class_legend
    from labeldiff.study.report import results_markdown

    names = ["background", "liver", "spleen", "aorta"]
    fig = plt.figure()
    a, b = np.zeros((4, 4), int), np.zeros((4, 4), int)
    a[0, 0], b[1, 1] = 3, 1
    assert class_legend(fig, [a, None, b], names)
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["liver", "aorta"]
    fig2 = plt.figure()
    assert not class_legend(fig2, [np.zeros((2, 2), int)], names) and not fig2.legends
    class_legend(fig2, [b], None)
    assert [t.get_text() for t in fig2.legends[0].get_texts()] == ["class 1"]
    plt.close("all")
    rows = [{"method": "none", "strategy": "scratch", "k": 1, "seed": 0, "dice": 0.5, "iou": 0.4}]
    assert "Foreground classes: 1 liver, 2 spleen, 3 aorta." in results_markdown(rows, ["dice"], class_names=names)


def test_ignored_pixels_change_no_loss_and_no_metric():
    """--ignore-index: what the image or the prediction holds under ignored pixels changes nothing."""
    from labeldiff.transfer.finetune import segmentation_loss

    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 3, (2, 8, 8), generator=g)
    target[:, :3] = 255  # the top rows are not labeled
    logits = torch.randn(2, 3, 8, 8, generator=g)
    loss = segmentation_loss(0.5, ignore_index=255)
    identity = torch.nn.Identity()  # the "network" passes its input on: the image is the logits
    base = loss(identity, {"image": logits, "mask": target}, g)
    changed = logits.clone()
    changed[:, :, :3] = torch.randn(2, 3, 3, 8, generator=g) * 10
    assert torch.allclose(loss(identity, {"image": changed, "mask": target}, g), base)
    elsewhere = logits.clone()
    elsewhere[:, 0, 5:] += 3.0  # class 0 more likely in labeled rows
    assert not torch.allclose(loss(identity, {"image": elsewhere, "mask": target}, g), base)
    # without ignored pixels the loss is MONAI's DiceCELoss, exactly as before
    full = torch.randint(0, 3, (2, 8, 8), generator=g)
    assert torch.equal(segmentation_loss(0.5, 255)(identity, {"image": logits, "mask": full}, g),
                       segmentation_loss(0.5)(identity, {"image": logits, "mask": full}, g))

    pred = logits.argmax(1).numpy()
    noisy = pred.copy()
    noisy[:, :3] = 2
    t = target.numpy()
    assert np.array_equal(confusion_stats(noisy, t, 3, 255), confusion_stats(pred, t, 3, 255))
    assert confusion_stats(pred, t, 3, 255).sum(0)[0] + confusion_stats(pred, t, 3, 255).sum(0)[2] <= (t != 255).sum()


def test_the_probe_never_samples_an_ignored_pixel(tmp_path):
    from labeldiff.transfer.probe import PixelCache

    mask = torch.zeros(6, 6, dtype=torch.long)
    mask[2:4, 2:4] = 1
    mask[0] = 255
    cache = PixelCache(tmp_path, 4, 8)
    cache.add(torch.randn(4, 6, 6), mask, torch.Generator().manual_seed(0), ignore_index=255)
    assert cache.sizes == [30]
    labels = np.fromfile(cache.paths(0)[1], dtype=np.int16)
    assert len(labels) == 30 and 255 not in labels and (labels == 1).sum() == 4
