"""What a probe scores: the decoder, head and stem weights that the settings select, the
candidates left out and why (`unscored`), and each scored weight's (out, in) features.

Owns: `WeightSelection`. The call trace of `passes` narrows it further (layers the model does
not call, stem weights that cannot reach the output).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import DowserError
from ..model.anatomy import Weight
from ..model.experts import is_stack, stacked_out_in
from .settings import ProbeSettings, parse_layers

if TYPE_CHECKING:
    from ..model.anatomy import Anatomy


class WeightSelection:
    """The weights one probe scores (anatomy.Weight, by checkpoint key).

    `layers`: the selected decoder layer indices; `by_layer[i]`: layer i's scored weights (empty
    outside `layers`); `head_weights`, `stem_weights`: lm_head, and the vision and projector
    weights, when included; `weights`: all of them, decoder first; `sizes[key]`: (out, in);
    `unscored[key]`: why a candidate tensor is left out. DowserError if nothing is left to score.
    """

    def __init__(self, anatomy: Anatomy, settings: ProbeSettings, n_layers: int, where: str):
        self.anatomy, self.s = anatomy, settings
        self.layers = parse_layers(settings.layers, n_layers)
        self.unscored: dict[str, str] = {}
        self.by_layer = {i: self._decoder_weights(i) if i in self.layers else [] for i in range(n_layers)}
        self.unscored.update(anatomy.unscored_outside())  # other layer stacks (an encoder-decoder's encoder)
        self.head_weights = [anatomy.head_weight()] if "lm_head" in settings.include else []
        if self.head_weights == [None]:
            raise DowserError(f"{where}: --include lm_head, but the model has no output head")
        self.stem_weights = [w for part in ("projector", "vision") if part in settings.include
                             for w in anatomy.stem_weights(part)]
        self.weights: list[Weight] = [w for i in range(n_layers) for w in self.by_layer[i]]
        self.weights += self.head_weights + self.stem_weights
        if not self.weights:
            raise DowserError(f"{where}: nothing to score with --layers {settings.layers} --include {settings.include}")
        self.sizes = {w.key: _out_in(w, anatomy.shapes[w.key]) for w in self.weights}

    def _decoder_weights(self, i: int) -> list[Weight]:
        out = []
        for w in self.anatomy.decoder_weights(i):
            if w.kind == "router" and "router" not in self.s.include:
                self.unscored[w.key] = "router (scored with --include router)"
                continue
            out.append(w)
        self.unscored.update(self.anatomy.unscored(i))  # every other tensor of the layer, with its reason
        return out

    def note_unreached(self, psi: dict, a: dict) -> None:
        """List, in `unscored`, each expert of a stored 3-D stack that no probe token reached (its psi
        and a are zero in every update): its slice of the mask is cut by |W| alone (score.py)."""
        for w in self.weights:
            if not is_stack(w) or w.key not in psi:
                continue
            n = self.anatomy.shapes[w.key][0]
            seen_p = psi[w.key].reshape(psi[w.key].shape[0], n, -1).ne(0).any(-1).any(0)
            seen_a = a[w.key].reshape(a[w.key].shape[0], n, -1).ne(0).any(-1).any(0)
            for e in (~(seen_p | seen_a)).nonzero().flatten().tolist():
                self.unscored[f"{w.key}[{e}]"] = (f"expert {e} of this stack: no probe token was routed to it; its "
                                                  "slice of the mask is cut by |W| alone (magnitude)")

    def drop_uncalled(self, calls) -> None:
        """Decoder layers the model does not call for these probes (Mllama's cross-attention layers
        without images) cannot influence the output: their weights are not scored."""
        for i, call in enumerate(calls):
            if call is None and self.by_layer.get(i):
                for w in self.by_layer[i]:
                    self.unscored[w.key] = "the model does not call this layer for these probes (e.g. cross-attention without images)"
                dropped = {w.key for w in self.by_layer[i]}
                self.by_layer[i] = []
                self.weights = [w for w in self.weights if w.key not in dropped]

    def keep_reaching(self, reached: set[str]) -> None:
        """Keep the stem weights whose modules (in `reached`) can influence the output."""
        kept = []
        for w in self.stem_weights:
            if w.module in reached:
                kept.append(w)
            else:
                self.unscored[w.key] = "cannot influence the output (after the selected vision feature layer, or unused)"
        dropped = {w.key for w in self.stem_weights} - {w.key for w in kept}
        self.stem_weights = kept
        self.weights = [w for w in self.weights if w.key not in dropped]


def _out_in(w: Weight, shape) -> tuple[int, int]:
    """(out features, in features) of a scored weight from its stored shape; for a stored 3-D expert
    stack, its experts' end to end (model/experts.py)."""
    if is_stack(w):
        return stacked_out_in(shape, w.transposed)
    return (shape[1], shape[0]) if w.transposed else (shape[0], shape[1])
