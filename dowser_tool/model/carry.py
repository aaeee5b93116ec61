"""State the model hands from one decoder layer to a later one besides the hidden states, and its
gradient in the streamed reverse pass.

Gemma 3n's later layers reuse the keys and values an earlier layer computed: the model passes
one mutable mapping (`KVSharingDict`) to every layer, a layer writes its K/V into it, a later
layer reads them. In the model's own backward, gradient flows from the reading layer back into
the writing layer's `k_proj`/`v_proj` (and everything below). A streamed reverse pass recomputes
one layer at a time, so that path must be carried explicitly (`CarriedState`):

- forward (each layer once, in order): before layer i runs, what the shared mappings hold is
  kept (references, no copies) with which layer wrote each entry; after it runs, the entries it
  wrote are tagged with i;
- reverse (each layer once, in reverse order): layer i's mappings are restored to what it saw in
  the forward, each entry an earlier layer wrote replaced by a fresh leaf requiring grad;
  after the layer's recomputation, the gradients of those leaves are added to what the writer
  owes (`pending`), and the entries layer i itself wrote join its outputs with the gradients the
  later readers sent back (`outputs`).

A shared object the capture cannot follow (mutable, passed to several layers, not a mapping of
tensors) that a layer changes makes the probe refuse in one line naming the model class: its
statistics would silently miss a path.
"""

from __future__ import annotations

from collections.abc import MutableMapping

import torch

from ..errors import DowserError

_PLAIN = (torch.Tensor, type(None), bool, int, float, str, torch.dtype, torch.device)


def _immutable(value) -> bool:
    if isinstance(value, _PLAIN):
        return True
    return isinstance(value, tuple) and all(_immutable(v) for v in value)


def _tensors(value) -> list[tuple[int | None, torch.Tensor]]:
    """(index, tensor) of an entry: a tensor (index None) or a tuple/list of tensors."""
    if torch.is_tensor(value):
        return [(None, value)]
    if isinstance(value, (tuple, list)) and all(torch.is_tensor(v) or v is None for v in value):
        return [(k, v) for k, v in enumerate(value) if v is not None]
    return []


def _leaf_copy(value, leaves: list, tag: tuple):
    """The entry with each floating tensor replaced by a detached leaf requiring grad (recorded in `leaves`)."""
    def leaf(idx, t):
        if not t.is_floating_point():
            return t
        new = t.detach().requires_grad_(True)
        leaves.append(((*tag[:2], idx, tag[2]), new))
        return new

    if torch.is_tensor(value):
        return leaf(None, value)
    return type(value)(leaf(k, v) if torch.is_tensor(v) else v for k, v in enumerate(value))


def _fingerprint(obj):
    """What identifies the contents of a shared non-mapping object; None when it cannot be followed."""
    if isinstance(obj, list):
        return tuple(id(v) for v in obj)
    if hasattr(obj, "__dict__"):
        return tuple(sorted((k, id(v)) for k, v in vars(obj).items()))
    return None


class CarriedState:
    """The mutable objects one batch's captured calls share across decoder layers (`find`), followed
    through the forward (`before`/`after`) and carried back in the reverse pass (`restore`, `outputs`,
    `carry`). `owner` names the model class in refusals."""

    def __init__(self, shared: dict[int, tuple], owner: str):
        self.owner = owner
        self.maps = {cid: obj for cid, (key, obj) in shared.items() if isinstance(obj, MutableMapping)}
        self.map_keys = {cid: key for cid, (key, obj) in shared.items() if cid in self.maps}
        self.others = {cid: (key, obj) for cid, (key, obj) in shared.items() if cid not in self.maps}
        self.tags: dict[int, dict] = {cid: {k: None for k in m} for cid, m in self.maps.items()}
        self.seen: dict[int, dict[int, dict]] = {}  # layer -> cid -> {entry key: (value, writer)}
        self.pending: dict[tuple, list] = {}  # (cid, entry key, index, writer) -> per-draw gradient
        self._marks: dict = {}
        self.refusal: DowserError | None = None

    @classmethod
    def find(cls, calls, owner: str) -> "CarriedState | None":
        """The non-immutable arguments passed (as one object) to two or more layers; None if there are none."""
        holders: dict[int, tuple] = {}
        for c in calls:
            if c is None:
                continue
            for key, value in list(enumerate(c.args)) + list(c.kwargs.items()):
                if not _immutable(value):
                    holders.setdefault(id(value), (key, value, []))[2].append(c)
        shared = {cid: (key, obj) for cid, (key, obj, users) in holders.items() if len(users) > 1}
        return cls(shared, owner) if shared else None

    def _refuse(self, key, obj, what: str):
        """Note a path the reverse pass cannot follow; raised by `restore` (the forward alone, as in
        generating probes, needs no gradient and goes on)."""
        self.refusal = self.refusal or DowserError(
            f"{self.owner} passes one {type(obj).__name__} ({key!r}) to several decoder layers and {what}; the "
            f"streamed reverse pass cannot carry gradients along it, so the probe refuses rather than write "
            f"statistics that miss that path")

    # ---- forward ---------------------------------------------------------------------------------
    def before(self, i: int) -> None:
        self.seen[i] = {cid: {k: (v, self.tags[cid].get(k)) for k, v in m.items()} for cid, m in self.maps.items()}
        self._marks = {}
        for cid, (key, obj) in self.others.items():
            self._marks[cid] = _fingerprint(obj)
            if self._marks[cid] is None:
                self._refuse(key, obj, "the capture cannot tell whether a layer changes it")

    def after(self, i: int) -> None:
        for cid, m in self.maps.items():
            seen = self.seen[i][cid]
            for k, v in m.items():
                if k not in seen or seen[k][0] is not v:
                    if not _tensors(v):
                        self._refuse(self.map_keys[cid], m, f"layer {i} stores a {type(v).__name__} in it")
                    self.tags[cid][k] = i
        for cid, (key, obj) in self.others.items():
            if _fingerprint(obj) != self._marks.get(cid):
                self._refuse(key, obj, f"layer {i} changes it")

    # ---- reverse ---------------------------------------------------------------------------------
    def restore(self, i: int) -> list[tuple[tuple, torch.Tensor]]:
        """Put back what layer i saw in the forward, entries written by layers as leaves; returns
        [((cid, entry key, index, writer), leaf)]."""
        if self.refusal is not None:
            raise self.refusal
        leaves: list = []
        for cid, m in self.maps.items():
            m.clear()
            for k, (v, writer) in self.seen[i][cid].items():
                m[k] = v if writer is None else _leaf_copy(v, leaves, (cid, k, writer))
        self._restored = {cid: dict(m) for cid, m in self.maps.items()}
        return leaves

    def written(self, i: int) -> list[tuple[tuple, torch.Tensor]]:
        """After layer i's recomputation: [((cid, entry key, index, i), tensor)] of the entries it wrote
        that a later layer read (their gradients are pending)."""
        out = []
        for cid, m in self.maps.items():
            for k, v in m.items():
                if self._restored[cid].get(k) is not v:
                    out += [((cid, k, idx, i), t) for idx, t in _tensors(v) if (cid, k, idx, i) in self.pending]
        return out

    def outputs(self, y: torch.Tensor, g: torch.Tensor, written, d: int) -> tuple[list, list]:
        """([y, written tensors...], [g, their gradients from later layers for draw d])."""
        outs, grads = [y], [g]
        for tag, t in written:
            pg = self.pending[tag][d]
            if pg is not None:
                outs.append(t)
                grads.append(pg)
        return outs, grads

    def carry(self, leaves, grads, d: int, draws: int) -> None:
        """Add draw d's gradients of the restored leaves to what their writers owe."""
        for (tag, _), g in zip(leaves, grads):
            if g is None:
                continue
            slot = self.pending.setdefault(tag, [None] * draws)
            slot[d] = g if slot[d] is None else slot[d] + g

    def done(self, written) -> None:
        """Layer i's pending gradients are delivered: free them."""
        for tag, _ in written:
            self.pending.pop(tag, None)
