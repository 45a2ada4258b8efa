"""``labeldiff bench``: measurements that are not tests.

- :mod:`labeldiff.bench.probe_memory`: the probe's peak RAM, streamed vs the in-RAM reference;
- :mod:`labeldiff.bench.efficiency`: loop efficiency (bare step / real ``pretrain`` step) and predict
  efficiency (bare batched forward / real ``predict``).
"""
