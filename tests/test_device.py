"""Everything that runs on the model's device stays there.

No GPU here, so the model goes to PyTorch's ``meta`` device: shapes without data. An op that mixes a
meta tensor with a CPU tensor raises ("Tensor on device cpu is not on the expected device meta"),
and so does a copy to the CPU ("Cannot copy out of meta tensor"), which is what a CUDA run would
hit. CUDA also refuses a generator on another device than the tensor it fills, and meta does not,
so :class:`GeneratorDeviceCheck` refuses it here. The tests on a real GPU are in ``test_cuda.py``.
"""
import pytest
import torch
from torch.overrides import TorchFunctionMode

from conftest import tiny_model
from labeldiff.config import CorruptionConfig, ModelConfig, RunConfig
from labeldiff.corruption import build_corruption
from labeldiff.models.probe import FeatureSpec, PixelEnsemble, ProbeSegmenter
from labeldiff.models.unet import DirectSegmenter, SegmentationNet, build_network
from labeldiff.pretrain.run import pretext_loss
from labeldiff.runtime import generator
from labeldiff.sample.diffusion import sample, sample_masks
from labeldiff.transfer.finetune import segmentation_loss
from labeldiff.transfer.probe import predict_probe

META = torch.device("meta")
SMALL_DECODER = (16, 16, 8, 8, 8)


class GeneratorDeviceCheck(TorchFunctionMode):
    """Raise when a random op fills a tensor on one device with a generator on another (as CUDA does)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        g = kwargs.get("generator")
        if isinstance(g, torch.Generator):
            if "device" in kwargs and kwargs["device"] is not None:
                target = torch.device(kwargs["device"])
            elif args and isinstance(args[0], torch.Tensor):
                target = args[0].device
            else:
                target = torch.device("cpu")
            if target.type != g.device.type:
                raise RuntimeError(f"{getattr(func, '__name__', func)}: a {g.device.type} generator "
                                   f"for a {target.type} tensor")
        return func(*args, **kwargs)


def test_the_check_catches_what_cuda_refuses():
    with GeneratorDeviceCheck(), pytest.raises(RuntimeError, match="cpu generator for a meta tensor"):
        torch.randn(2, generator=torch.Generator(), device=META)
    with pytest.raises(RuntimeError, match="expected device"):
        torch.ones(2, device=META) + torch.ones(2)


@pytest.mark.parametrize("method", ["ddpm", "mdm", "mae", "hybrid", "supervised", "ddep", "dep"])
def test_pretext_losses_stay_on_the_device(method):
    """The corruption of a batch happens where the batch is; noise is drawn by the step's generator."""
    corruption = build_corruption(CorruptionConfig(method=method))
    model_cfg = tiny_model(3) if "unet" in corruption.archs else ModelConfig(
        arch="efficientnet-unet", decoder_channels=SMALL_DECODER, encoder="none")
    net = build_network(model_cfg, corruption.out_channels(3, 2)).to(META)
    batch = {"image": torch.empty(2, 3, 32, 32, device=META)}
    if corruption.needs_labels:
        batch["mask"] = torch.zeros(2, 32, 32, dtype=torch.long, device=META)
    with GeneratorDeviceCheck():
        loss = pretext_loss(corruption)(net, batch, generator(0, META))
        loss.backward()
    assert loss.device == META


@pytest.mark.parametrize("method", ["ddpm", "mdm", "hybrid"])
def test_the_ddp_path_stays_on_the_device(method, monkeypatch):
    """What a rank of a torchrun run does on its device: its rows of the global batch (``shard``), the noise
    drawn for the global batch and sliced to them (``sharded``), and the all-reduce of the loss, whose
    tensor must be on the model's device (nccl takes CUDA tensors only)."""
    from labeldiff import distributed

    corruption = build_corruption(CorruptionConfig(method=method))
    net = build_network(tiny_model(3), corruption.out_channels(3, 2)).to(META)
    batch = {"image": torch.empty(4, 3, 16, 16, device=META), "mask": torch.zeros(4, 16, 16, dtype=torch.long,
                                                                                  device=META)}
    reduced = []
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda t, op=None: reduced.append(t.device))
    with GeneratorDeviceCheck():
        for part in distributed.parts(accum=2):  # rank 1 of 2, 2 micro-batches: parts 2 and 3 of 4
            rows = distributed.shard(batch, part)
            assert rows["image"].shape[0] == 1 and rows["image"].device == META
            with distributed.sharded(part):
                loss = pretext_loss(corruption)(net, rows, generator(0, META))
            distributed.mean_over_ranks(loss)
            loss.backward()
    assert reduced == [META, META]  # (any_rank's flag is made on the device the loop passes it)


def test_segmentation_loss_and_segmenters_stay_on_the_device():
    net = SegmentationNet(tiny_model(3), num_classes=3, keep_out_norm=True).to(META)
    batch = {"image": torch.empty(2, 3, 16, 16, device=META), "mask": torch.zeros(2, 16, 16, dtype=torch.long,
                                                                                  device=META)}
    segmentation_loss(0.5)(net, batch, generator(0, META)).backward()
    direct = DirectSegmenter(build_network(tiny_model(3), 5), first_channel=3).to(META)
    assert direct(torch.empty(1, 3, 16, 16, device=META)).shape == (1, 2, 16, 16)


def _probe_parts():
    unet = build_network(tiny_model(3), 3)
    unet.out = torch.nn.Identity()
    spec = FeatureSpec(blocks=(0, 1), timesteps=(0, 50))
    n_features = sum(tuple(reversed(unet.block_out_channels))[b] for b in spec.blocks) * len(spec.timesteps)
    return unet.eval(), PixelEnsemble(n_features, 3, members=2), spec


def test_probe_features_and_ensemble_stay_on_the_device():
    """The probe's features used to be moved to the CPU while its ensemble sat on the device."""
    unet, ensemble, spec = _probe_parts()
    run_cfg = RunConfig(corruption=CorruptionConfig(method="ddpm"))
    seg = ProbeSegmenter(unet, ensemble, run_cfg, spec).to(META)
    out = seg(torch.empty(1, 3, 16, 16, device=META))
    assert out.device == META and out.shape == (1, 3, 16, 16)
    labels, probs, unc = predict_probe(seg.extractor.extractor, seg.ensemble, torch.empty(3, 16, 16, device=META))
    assert labels.device == probs.device == unc.device == META


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling_stays_on_the_device(sampler):
    """``sample --sampler ddpm`` used to hand a CPU generator to the scheduler step of a device tensor."""
    cfg = RunConfig(model=tiny_model(3), corruption=CorruptionConfig(method="hybrid"), num_classes=2)
    cfg.data.size = 16
    net = build_network(cfg.model, 5).to(META).eval()
    with GeneratorDeviceCheck():
        images = sample(net, cfg, n=2, sampler=sampler, steps=3, batch_size=2)
        masks = sample_masks(net, cfg, images)
    assert images.device == masks.device == META and images.shape == (2, 3, 16, 16)
