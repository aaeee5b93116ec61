"""The streamed backward follows every path between layers (issue 21, item 3).

Gemma 3n's last layers reuse the keys and values layers 0 and 1 computed (one KVSharingDict handed
to every layer): the streamed reverse pass carries their gradient back to the writing layers, so
streamed statistics equal the in-memory oracle (before: up to 60% off in the writing layers). A
shared object the capture cannot follow makes the probe refuse in one line naming the model class.
"""

import pytest
import torch
from torch import nn

from dowser_tool import DowserError, open_checkpoint
from dowser_tool.model.capture import Captured, LayerCall
from dowser_tool.model.carry import CarriedState
from dowser_tool.probe.run import ProbeRun, ProbeSettings

from .families import build
from .oracle import assert_run_matches_oracle, load_in_memory, oracle_for_run, relative_error


@pytest.fixture(scope="module")
def gemma3n(tmp_path_factory):
    return build("gemma3n_text", tmp_path_factory.mktemp("g3n") / "gemma3n_text")


@pytest.mark.parametrize("estimator", ["reference", "hutchinson"])
def test_gemma3n_shared_kv_streamed_equals_oracle(gemma3n, estimator):
    settings = ProbeSettings(probes=4, probe_len=10, batch_size=2, draws=2, include=("lm_head",), resident="never",
                             estimator=estimator)
    run = ProbeRun(open_checkpoint(gemma3n), settings, progress=False)
    rec = run.collect()
    keys = {w.key for w in run.weights}
    assert "model.layers.0.self_attn.v_proj.weight" in keys and "model.layers.1.self_attn.k_proj.weight" in keys
    assert_run_matches_oracle(run, rec, gemma3n, rtol=1e-5)


def test_the_oracle_sees_the_shared_path(gemma3n):
    """Without the carried K/V the writing layers' statistics differ from the oracle by far more than 1e-5:
    the test above would catch a reverse pass that drops the path."""
    settings = ProbeSettings(probes=2, probe_len=8, batch_size=2, draws=1, resident="never", layers="0-1")
    run = ProbeRun(open_checkpoint(gemma3n), settings, progress=False)
    original = CarriedState.restore
    CarriedState.restore = lambda self, i: (original(self, i), self.pending.clear(), [])[2]  # carry nothing
    try:
        rec = run.collect()
    finally:
        CarriedState.restore = original
    want, _ = oracle_for_run(run, model=load_in_memory(run, gemma3n))
    key = "model.layers.0.self_attn.v_proj.weight"
    assert relative_error(torch.stack(rec.psi[key]), want[key][0]) > 1e-2


class _Appender(nn.Module):
    def forward(self, hidden, state=None):
        state.append(hidden.sum())
        return hidden * 2


def test_a_shared_object_the_capture_cannot_follow_is_refused():
    shared = []
    calls = [LayerCall((), {"state": shared}), LayerCall((), {"state": shared})]
    cap = Captured(torch.ones(1, 2, 4), calls, CarriedState.find(calls, "folder: ToyForCausalLM"))
    layer = _Appender()
    h = cap.call(0, layer, cap.hidden, False)
    cap.call(1, layer, h, False)  # the forward alone goes on (probe generation needs no gradient)
    with pytest.raises(DowserError, match=r"ToyForCausalLM passes one list \('state'\) to several decoder layers "
                                          r"and layer 0 changes it.*refuses"):
        cap.recompute(1, layer, h.requires_grad_(True), False)


def test_layers_that_share_nothing_carry_nothing():
    calls = [LayerCall((torch.zeros(1),), {"flag": True}), LayerCall((torch.zeros(1),), {"flag": True})]
    assert CarriedState.find(calls, "x") is None
