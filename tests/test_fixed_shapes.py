"""The fixed-shape training path (`packed=False`): no host syncs, few batch shapes, same model."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from grid.data import SequenceDataModule, history_widths, leave_one_out
from grid.generators import RPG, SASRec, SETRec, SimGR
from grid.generators.layers import Block, Layout
from grid.generators.tiger import TIGER
from grid.profiling import OperatorCounter, StepOperatorCounter
from grid.sids import assign_sids

from .conftest import QUIET
from .test_tiger import SMALL, subset

pytestmark = pytest.mark.usefixtures("one_thread")
ITEMS = 300
# RPG's official GPT-2 options (experiments/rpg_paper.yaml): attention dropout included
GPT2 = dict(activation="gelu_new", bias=True, norm_eps=1e-12, embed_dropout=0.5, attn_dropout=0.5)


@pytest.fixture(scope="module")
def data(beauty):
    """The 300 most popular Beauty items' sequences: histories of 1 to 20 items."""
    return leave_one_out(subset(beauty, ITEMS), max_history=20)


@pytest.fixture(scope="module")
def sids():
    codes = np.random.default_rng(0).integers(0, 16, (ITEMS, 3))
    return assign_sids(codes, (16,) * 3, "dedup")


def generators(sids):
    rng = np.random.default_rng(0)
    text, cf = rng.standard_normal((ITEMS, 24)), rng.standard_normal((ITEMS, 8))
    return {
        "tiger": lambda packed: TIGER(sids, **SMALL, packed=packed),
        "tiger-decoder-only": lambda packed: TIGER(
            sids, **SMALL, architecture="decoder_only", packed=packed
        ),
        "rpg": lambda packed: RPG(sids, hidden=32, heads=2, d_ff=64, packed=packed),
        "rpg-gpt2": lambda packed: RPG(sids, hidden=32, heads=2, d_ff=64, packed=packed, **GPT2),
        "simgr": lambda packed: SimGR(sids, d_model=32, d_ff=64, packed=packed),
        "setrec": lambda packed: SETRec(text, cf, hidden=16, ae_hidden=(32,), packed=packed),
        "setrec-t5": lambda packed: SETRec(
            text, cf, hidden=16, ae_hidden=(32,), architecture="encoder_decoder", packed=packed
        ),
        "sasrec": lambda packed: SASRec(ITEMS, hidden=16, packed=packed),
    }


def train_steps(model, data, packed: bool, steps: int = 4) -> StepOperatorCounter:
    """Train `steps` steps through Lightning's loop, counting operators of all but the first."""
    counter = StepOperatorCounter(skip=1)
    dm = SequenceDataModule(data, batch_size=64, val_users=None, fixed_shapes=not packed)
    trainer = L.Trainer(**QUIET, max_steps=steps, limit_val_batches=0, callbacks=[counter])
    trainer.fit(model, train_dataloaders=dm.train_dataloader())
    return counter


@pytest.mark.parametrize(
    "name",
    ["tiger", "tiger-decoder-only", "rpg", "rpg-gpt2", "simgr", "setrec", "setrec-t5", "sasrec"],
)
def test_fixed_shape_training_steps_never_sync(name, data, sids):
    model = generators(sids)[name](False)
    steps = train_steps(model, data, packed=False).steps
    assert len(steps) == 3 and all(s.total > 50 for s in steps)
    assert [dict(s.syncs) for s in steps] == [{}, {}, {}]
    assert [dict(s.host_copies) for s in steps] == [{}, {}, {}]  # no torch.tensor(data) either


def test_the_counter_sees_the_packed_paths_syncs(data, sids):
    """The control: the packed path reads values back every step (step counts, dropout seeds,
    whether a batch has padding)."""
    steps = train_steps(generators(sids)["tiger"](True), data, packed=True).steps
    assert all(s.syncs["_local_scalar_dense"] >= 1 for s in steps)  # foreach AdamW's step counts


def test_fixed_shape_batches_are_full_and_of_few_widths(data):
    dm = SequenceDataModule(data, batch_size=64, fixed_shapes=True)
    shapes = {tuple(b["history"].shape) for b in dm.train_dataloader()}
    assert {w for _, w in shapes} <= set(history_widths(20)) and len(shapes) > 1
    assert {b for b, _ in shapes} == {64}
    n = len(dm.train_set)
    assert n % 64  # a short last batch exists and was filled up
    packed = SequenceDataModule(data, batch_size=64)
    assert len({tuple(b["history"].shape) for b in packed.train_dataloader()}) > len(shapes)


@pytest.mark.parametrize("causal", [False, True])
def test_unpacked_layout_gives_the_packed_outputs(causal):
    torch.manual_seed(0)
    block = Block(32, 2, 16, 64, 0.0, cross=False).eval()
    length = torch.tensor([1, 5, 3, 7])
    keep = torch.arange(7) < length[:, None]
    x = torch.randn(4, 7, 32)
    outs = []
    for packed in (True, False):
        layout = Layout.of(keep, causal=causal, packed=packed)
        y = layout.pad(block(layout.pack(x), layout)[0])
        outs.append(y[keep])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    packed_rows = Layout.of(keep, causal=True).last_rows(length)
    unpacked_rows = Layout.of(keep, causal=True, packed=False).last_rows(length)
    assert torch.equal(Layout.of(keep).pack(x)[packed_rows], x.flatten(0, 1)[unpacked_rows])


def test_fixed_and_packed_paths_compute_the_same_loss(data, sids):
    """Same weights, same batch: the fixed path's padded grid changes no real token's value."""
    dm = SequenceDataModule(data, batch_size=64, fixed_shapes=True)
    batch = next(iter(dm.train_dataloader()))
    for name, make in generators(sids).items():
        losses = []
        for packed in (True, False):
            torch.manual_seed(0)
            model = make(packed).eval()
            model.bf16 = False
            with torch.no_grad():
                losses.append(model.loss(batch))
        a, b = (torch.stack(x) if isinstance(x, tuple) else x for x in losses)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_operator_counter_flags_host_reads():
    x = torch.randn(8, 4)
    with OperatorCounter() as counter:
        x[x[:, 0] > 0]
        x.sum().item()
        x.view(32)
    assert counter.syncs == {"index": 1, "_local_scalar_dense": 1}
    assert "view" not in counter.ops


@pytest.mark.parametrize("name", ["tiger", "rpg", "rpg-gpt2", "simgr"])
def test_fixed_shape_losses_trace_as_one_graph(name, data, sids):
    """`trainer.compile` compiles the loss with fullgraph=True: it must trace without a break
    (RPG's and SimGR's bf16-input matmul setting included)."""
    dm = SequenceDataModule(data, batch_size=64, fixed_shapes=True)
    batch = next(iter(dm.train_dataloader()))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(generators(sids)[name](False).loss)(batch)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


def test_compile_keeps_the_state_dict_and_falls_back_with_one_warning(
    sids, data, monkeypatch, caplog
):
    model = generators(sids)["sasrec"](False).eval()  # no dropout: the same loss twice
    keys = list(model.state_dict())
    batch = next(iter(SequenceDataModule(data, batch_size=8).train_dataloader()))
    eager = model.loss(batch)

    def broken(fn, **kwargs):
        def fail(*args, **kw):
            raise RuntimeError("no C++ compiler found\ndetails")

        return fail

    monkeypatch.setattr(torch, "compile", broken)
    model.compile_loss()
    assert list(model.state_dict()) == keys  # no `_orig_mod.` prefix: checkpoints still load
    torch.testing.assert_close(model.loss(batch), eager)
    assert model.loss == model.__class__.loss.__get__(model)  # eager from now on
    warnings = [r.getMessage() for r in caplog.records if "trainer.compile" in r.getMessage()]
    assert warnings == ["trainer.compile: compiling the loss failed (no C++ compiler found); eager"]


def test_reduce_overhead_compiles_with_cuda_graphs_and_clones_outputs(sids, data, monkeypatch):
    """`trainer.compile=reduce-overhead`: torch.compile's CUDA-graph mode, each call opening a
    new graph step and returning a copy that the next replay cannot overwrite."""
    model = generators(sids)["sasrec"](False).eval()
    batch = next(iter(SequenceDataModule(data, batch_size=8).train_dataloader()))
    seen, steps, outputs = {}, [], []

    def replaying(fn, **kwargs):
        seen.update(kwargs)

        def replay(*args, **kw):
            outputs.append(fn(*args, **kw))
            return outputs[-1]

        return replay

    monkeypatch.setattr(torch, "compile", replaying)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    model.compile_loss("reduce-overhead")
    first, second = model.loss(batch), model.loss(batch)
    assert seen["mode"] == "reduce-overhead" and seen["fullgraph"] and len(steps) == 2
    assert first is not outputs[0] and torch.equal(first, outputs[0])
    torch.testing.assert_close(second, first)


def test_fixed_shape_samples_stay_on_the_device_and_gather_the_same_batches(data):
    """`setup` moves every sample set to the trainer's device; a batch is then gathered there
    (here the meta device stands in for a GPU), with the same rows and width as on the host."""
    dm = SequenceDataModule(data, batch_size=16, fixed_shapes=True)
    idx = list(range(40, 56))
    host = dm.train_set.collate(idx)
    dm.trainer = type("T", (), {"strategy": type("S", (), {"root_device": "meta"})()})()
    dm.setup("fit")
    for samples in (dm.train_set, dm.valid_set, dm.full_valid_set, dm.test_set):
        assert samples.history.is_meta and all(r.is_meta for r in samples.rows.values())
        assert not samples.lengths.is_meta  # widths are read on the host
    with OperatorCounter() as counter:
        moved = dm.train_set.collate(idx)
    assert counter.total_syncs == 0
    assert moved.keys() == host.keys()
    assert all(moved[k].is_meta and moved[k].shape == host[k].shape for k in host)
