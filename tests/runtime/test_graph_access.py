"""runtime/graph_access.py: a save, copy or merge while another thread calls the model. They put
the reference ops back and drop the CPU kernels' buffers for their length: calls running beside
them failed ("no attribute 'qweight_int4pack'") or quietly took the reference op (about 1 call in
8 of an audit's)."""
from __future__ import annotations

import copy
import threading

import torch

import slimfx
from slimfx.models import tiny
from slimfx.runtime.graph_access import reading, writing


def test_calls_beside_saves_copies_and_merges_give_the_lowered_outputs(tmp_path):
    lm = tiny("llama", layers=2)
    cm = slimfx.compile(lm.model, "quantize blocks.*.** : Linear int4 group=32", example_inputs=lm.example_inputs)
    assert cm.lowering.extra_bytes > 0  # the CPU kernels run (their buffers are what went missing)
    with torch.no_grad():
        want = cm(**lm.example_inputs).logits
    stop, errors, wrong, calls = threading.Event(), [], [0], [0]

    def call():
        while not stop.is_set():
            try:
                with torch.no_grad():
                    wrong[0] += not torch.equal(cm(**lm.example_inputs).logits, want)
                calls[0] += 1
            except Exception as e:  # noqa: BLE001 - what the other thread saw is the finding
                errors.append(repr(e))

    thread = threading.Thread(target=call)
    thread.start()
    try:
        for i in range(4):
            copy.deepcopy(cm)
            cm.save(tmp_path / f"a{i}")
            cm.merge_adapters()
    finally:
        stop.set()
        thread.join()
    assert calls[0] and not errors and not wrong[0], (calls, errors[:3], wrong)


def test_the_lock_is_reentrant_within_a_thread_and_holds_other_threads_back():
    gm = torch.nn.Module()
    order = []
    with writing(gm):
        with reading(gm), writing(gm):  # a call under unlowered(); lower() in its `finally`
            order.append("inner")
        other = threading.Thread(target=lambda: (reading(gm).__enter__(), order.append("other")))
        other.start()
        other.join(timeout=0.2)
        assert other.is_alive() and order == ["inner"]  # the other thread's call waits
    other.join(timeout=5)
    assert order == ["inner", "other"]


def test_a_program_with_its_lock_deep_copies():
    """The lock sat in the GraphModule's __dict__: copy.deepcopy(cm.program) raised 'cannot pickle
    _thread.RLock' (the traffic test copies one)."""
    lm = tiny("llama", layers=1)
    cm = slimfx.compile(lm.model, "quantize blocks.*.mlp.* int8", example_inputs=lm.example_inputs)
    with reading(cm.program):
        pass
    program = copy.deepcopy(cm.program)
    with torch.no_grad():
        assert program is not cm.program and len(program.graph.nodes) == len(cm.program.graph.nodes)
