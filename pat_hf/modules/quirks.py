"""The published PAT code's four departures from its own description, each named (docs/REFERENCE.md, Quirks).

`--pat-mode reference` turns all four on, so that the paper's numbers can be reproduced; `--pat-mode corrected`
turns all four off. The PAT distiller builds one `PATQuirks` and hands each module the fields it needs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PATQuirks:
    # A prompted token map goes back to a sequence by a reshape instead of a permute, scrambling tokens and
    # channels even when the prompt is zero.
    reshape_instead_of_permute: bool
    # A sequence whose length is not a perfect square sets its last token aside as the class token (timm puts
    # class tokens first), and the rest is laid on a square grid.
    last_token_as_class: bool
    # Region attention adds the positional-encoding row of the sample's index in the batch to all its tokens,
    # instead of one row per token.
    batch_indexed_position: bool
    # Squeeze-excitation returns its gate instead of the gated input, so a prompt is constant over space.
    gate_only_excitation: bool

    @classmethod
    def all(cls, enabled: bool) -> PATQuirks:
        return cls(reshape_instead_of_permute=enabled, last_token_as_class=enabled,
                   batch_indexed_position=enabled, gate_only_excitation=enabled)
