"""Each paper's own transfer protocol, by name: ``labeldiff finetune --protocol mdm`` fine-tunes the way the
MDM paper does, ``--protocol ct`` the way the CT paper does, and so on. One YAML per paper, shipped with
the package, with two blocks of settings (as a recipe writes them, ``section: {field: value}``):

- ``finetune``: the transfer settings the paper states — strategy, head, optimiser and schedule, loss,
  augmentation, probe features and batch. Scale (``train.steps``, ``data.size``, the network) is left to
  the recipe, so ``--recipe finetune-cpu --protocol ct`` is the CT paper's protocol at CPU scale.
- ``pretrain``: what the protocol needs of the pretraining run (the MDM paper pretrains on the test images
  too; the CT paper's dataset-wide intensity percentiles). ``labeldiff pretrain --protocol NAME`` applies
  it; ``finetune --protocol NAME`` says which of it the pretrained run did not follow.

Layering: recipe < protocol < the command line (a study: recipe < protocol < a protocol's overrides < the
cell's strategy, k and seed). Where a paper is silent the file says which choice was made and why; the
docs' page of each paper lists every setting's source and every deviation that remains.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labeldiff.recipes import lookup, names as shipped_names

FOLDER = Path(__file__).resolve().parent
BLOCKS = ("pretrain", "finetune")


@dataclass(frozen=True)
class Protocol:
    """A paper's protocol: ``{"section.field": value}`` of its pretraining and of its fine-tuning."""

    name: str
    paper: str
    pretrain: dict[str, Any]
    finetune: dict[str, Any]
    sources: dict[str, str]  # setting → where the paper says it, or "(choice: …)" where it is silent

    def values(self, kind: str) -> dict[str, Any]:
        """The settings of a run of ``kind`` (``pretrain`` or ``segmentation``)."""
        return dict(self.pretrain if kind == "pretrain" else self.finetune)

    def unmet(self, pretrained: Any) -> list[str]:
        """The protocol's pretraining settings the run config ``pretrained`` does not have, as
        ``"data.include_test is False (the protocol: True)"``."""
        from labeldiff.config import flatten

        have = flatten(pretrained)
        out = []
        for name, want in self.pretrain.items():
            got = have.get(name)
            if name == "data.intensity":  # a scheme: compare its name (the run stores it fitted)
                got, want = (got or {}).get("scheme"), want.get("scheme")
            if got != want:
                out.append(f"{name} is {got!r} (the protocol: {want!r})")
        return out


def names() -> list[str]:
    return shipped_names(FOLDER)


def load(name: str) -> Protocol:
    """The shipped protocol ``name`` (``ct``, ``mdm``, ``ddep``, ``hybrid``, ``hybrid-ledm``, ``shared``) or a
    YAML file of the same form; every setting name is checked."""
    from labeldiff.config import read_yaml, recipe_values
    from labeldiff.errors import ConfigError

    path = lookup(FOLDER, "protocol", name)
    raw = read_yaml(path) or {}
    where = f"protocol {path}"
    if not isinstance(raw, dict) or set(raw) - {"paper", "sources", *BLOCKS}:
        raise ConfigError(f"{where}: a protocol has the keys paper, pretrain, finetune and sources; "
                          f"got {sorted(raw) if isinstance(raw, dict) else raw!r}")
    blocks = {b: recipe_values(raw.get(b) or {}, f"{where}, {b}") for b in BLOCKS}
    sources = {str(k): str(v) for k, v in (raw.get("sources") or {}).items()}
    return Protocol(path.stem, str(raw.get("paper", "")), blocks["pretrain"], blocks["finetune"], sources)
