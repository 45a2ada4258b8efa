"""Where a DDPM pretraining step's time goes: data, corruption, forward, backward, AdamW, EMA.

The same parts as one step of labeldiff's loop (pretrain/loop.py), timed apart; the median of 10
steps after 2 warm-up steps, in fp32. Usage (from the repo root, after `make install`):

    ../.venv/bin/python experiments/step_breakdown.py CHANNELS BATCH THREADS DATA
    ../.venv/bin/python experiments/step_breakdown.py 32,64,128 16 2 labeldiff-demo/data
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 ../.venv/bin/python experiments/step_breakdown.py ...

(the last form holds PyTorch's and oneDNN's kernels to AVX2: the slow path of an AVX2-only CPU).
DATA: a folder of grey 64² slices, e.g. the demo's `labeldiff-demo/data`.
"""
import sys, time, torch
from labeldiff.config import CorruptionConfig, ModelConfig, DataConfig
from labeldiff.corruption import build_corruption
from labeldiff.data.datasets import StepBatches
from labeldiff.data.folders import unlabeled_samples
from labeldiff.models.unet import build_network
from labeldiff.pretrain.loop import EMA
from labeldiff.runtime import generator
chs = tuple(int(c) for c in sys.argv[1].split(",")); bs = int(sys.argv[2]); torch.set_num_threads(int(sys.argv[3]))
data = sys.argv[4]
net = build_network(ModelConfig(in_channels=1, channels=chs, attention_levels=(False,) * len(chs)), 1)
opt = torch.optim.AdamW(net.parameters(), 1e-3); ema = EMA(net, 0.999)
c = build_corruption(CorruptionConfig())
batches = StepBatches(unlabeled_samples(data), DataConfig(path=data, size=64, mode="resize", channels=1), bs, 0, labeled=False)
parts = {k: [] for k in ("data", "corrupt", "forward", "backward", "adamw", "ema")}
for step in range(12):
    t = [time.perf_counter()]
    b = batches[step]; t.append(time.perf_counter())
    cc = c(b["image"], generator(step)); t.append(time.perf_counter())
    loss = c.loss(net(cc.input, cc.t), cc); t.append(time.perf_counter())
    opt.zero_grad(); loss.backward(); t.append(time.perf_counter())
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0); opt.step(); t.append(time.perf_counter())
    ema.update(net, step); t.append(time.perf_counter())
    if step >= 2:
        for k, a, b_ in zip(parts, t, t[1:]): parts[k].append(b_ - a)
med = {k: sorted(v)[len(v) // 2] for k, v in parts.items()}
tot = sum(med.values())
print(f"ch={chs} bs={bs} threads={torch.get_num_threads()} step {tot:.3f} s: " + ", ".join(f"{k} {v*1000:.0f} ms ({100*v/tot:.0f}%)" for k, v in med.items()))
