"""The model and optimizer built per flag."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ddptrain.config import FitConfig
from ddptrain.model import ModelSpec, build_model, parameter_count
from ddptrain.optim import build_loss, build_optimizer, build_scheduler


def test_shapes_and_parameter_count():
    model = build_model(ModelSpec(10, 3, (32, 16)))
    assert model(torch.zeros(5, 10)).shape == (5, 3)
    assert parameter_count(model) == (10 * 32 + 32) + (32 * 16 + 16) + (16 * 3 + 3)


def test_linear_model_when_no_hidden_layers():
    model = build_model(ModelSpec(4, 1, ()))
    assert [type(m) for m in model] == [nn.Linear]


@pytest.mark.parametrize("activation, cls", [("relu", nn.ReLU), ("gelu", nn.GELU), ("silu", nn.SiLU), ("tanh", nn.Tanh)])
def test_activation(activation, cls):
    assert any(isinstance(m, cls) for m in build_model(ModelSpec(2, 2, (8,), activation=activation)))


@pytest.mark.parametrize("norm, cls", [("layer", nn.LayerNorm), ("batch", nn.BatchNorm1d)])
def test_norm_and_dropout(norm, cls):
    model = build_model(ModelSpec(2, 2, (8, 8), norm=norm, dropout=0.3))
    assert sum(isinstance(m, cls) for m in model) == 2
    assert sum(isinstance(m, nn.Dropout) and m.p == 0.3 for m in model) == 2


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                       ("adamw", torch.optim.AdamW), ("rmsprop", torch.optim.RMSprop)])
def test_optimizer_from_flags(name, cls):
    cfg = FitConfig(optimizer=name, lr=0.02, weight_decay=0.1, momentum=0.8, betas=(0.8, 0.9))
    opt = build_optimizer(build_model(ModelSpec(2, 2, (4,))).parameters(), cfg)
    group = opt.param_groups[0]
    assert isinstance(opt, cls) and group["lr"] == 0.02 and group["weight_decay"] == 0.1
    if name in ("sgd", "rmsprop"):
        assert group["momentum"] == 0.8
    else:
        assert tuple(group["betas"]) == (0.8, 0.9)


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam),
                                       ("adamw", torch.optim.AdamW)])
def test_fused_optimizer_matches_the_per_parameter_loop(name, cls):
    cfg = FitConfig(optimizer=name, lr=0.05, weight_decay=0.01, momentum=0.9)
    fused_model, loop_model = build_model(ModelSpec(3, 2, (8,))), build_model(ModelSpec(3, 2, (8,)))
    loop_model.load_state_dict(fused_model.state_dict())
    fused = build_optimizer(fused_model.parameters(), cfg)
    extra = dict(momentum=0.9) if name == "sgd" else {}
    loop = cls(loop_model.parameters(), lr=0.05, weight_decay=0.01, foreach=False, **extra)
    assert fused.param_groups[0]["fused"] is True
    x, y = torch.randn(16, 3, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 2
    for _ in range(10):
        for model, opt in ((fused_model, fused), (loop_model, loop)):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for a, b in zip(fused_model.parameters(), loop_model.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def scheduled_rates(cfg: FitConfig, steps: int) -> list[float]:
    """The rate of each of `steps` optimizer steps under cfg's schedule."""
    opt = build_optimizer(build_model(ModelSpec(2, 2, (4,))).parameters(), cfg)
    sched = build_scheduler(opt, cfg, total_steps=steps)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("scheduler", ["constant", "cosine", "linear", "step", "onecycle", "coslog4"])
def test_schedules_with_warmup(scheduler):
    lrs = scheduled_rates(FitConfig(scheduler=scheduler, lr=0.1, warmup_steps=10), 100)
    assert lrs[0] < 0.05  # warming up
    assert max(lrs) == pytest.approx(0.1, rel=1e-3)
    if scheduler in ("cosine", "linear", "onecycle", "coslog4"):
        assert lrs[-1] < 0.01
    if scheduler == "constant":
        assert lrs[-1] == pytest.approx(0.1)


def test_coslog4_is_four_cosine_cycles_evenly_spaced_in_log_time():
    """RealMLP-TD's schedule: the rate rises from 0 to --lr and back four times, at t = (2^k - 1) / 15 back at 0,
    each cycle twice as long as the one before."""
    from ddptrain.optim import coslog

    for k in range(5):
        assert coslog((2**k - 1) / 15) == pytest.approx(0.0, abs=1e-12)
    for k in range(4):
        assert coslog((2 ** (k + 0.5) - 1) / 15) == pytest.approx(1.0)
    lrs = scheduled_rates(FitConfig(scheduler="coslog4", lr=0.1), 1500)
    rises = sum(1 for a, b, c in zip(lrs, lrs[1:], lrs[2:]) if b > a and b >= c)  # local maxima
    assert rises == 4 and max(lrs) == pytest.approx(0.1, rel=1e-4) and lrs[0] == 0.0


def test_loss_by_task_and_override():
    assert isinstance(build_loss(FitConfig(), "classification"), nn.CrossEntropyLoss)
    assert isinstance(build_loss(FitConfig(), "regression"), nn.MSELoss)
    assert isinstance(build_loss(FitConfig(loss="huber"), "regression"), nn.HuberLoss)
    assert isinstance(build_loss(FitConfig(loss="l1"), "regression"), nn.L1Loss)


# -- CUDA graphs: the decision and the flag (the graphed step itself: tests/test_cuda.py) --------------------------
def test_cuda_graphs_are_decided_from_the_config_and_say_why_not():
    from ddptrain import cudagraphs

    assert cudagraphs.resolve(FitConfig(), "cpu", 1) == (False, None)  # auto on a CPU: nothing to say
    use, note = cudagraphs.resolve(FitConfig(cuda_graphs=True), "cpu", 1)
    assert not use and "needs a CUDA device" in note
    assert cudagraphs.resolve(FitConfig(cuda_graphs=True), "cuda", 2) == (True, None)  # cosine: a tensor rate
    assert cudagraphs.resolve(FitConfig(cuda_graphs=True, warmup_steps=10, scheduler="linear"), "cuda", 1) == \
        (True, None)
    assert cudagraphs.resolve(FitConfig(cuda_graphs=False), "cuda", 1) == (False, None)
    assert cudagraphs.resolve(FitConfig(), "cuda", 1) == (cudagraphs.AUTO_ENABLES, None)
    cfg = FitConfig(cuda_graphs=True, nan_policy="skip", precision="fp16", grad_accum=2, batch_size=64,
                    scheduler="onecycle", comm_hook="powersgd", norm="batch")
    use, note = cudagraphs.resolve(cfg, "cuda", 2)
    assert not use and note.startswith("--cuda-graphs: off, the step runs eagerly: ")
    for flag in ("--nan-policy skip", "--precision fp16", "--grad-accum", "--scheduler onecycle", "powersgd",
                 "--norm batch"):
        assert flag in note
    assert cudagraphs.blockers(FitConfig(norm="batch"), 1) == []  # one GPU: plain BatchNorm, nothing to exchange


def test_cuda_graphs_flag_on_a_cpu_says_so_once_and_trains(tmp_path, monkeypatch, capsys):
    import sys

    from ddptrain.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["ddptrain", "fit", "--data", "xor", "--epochs", "1", "--cuda-graphs", "--out",
                                      "run"])
    with pytest.raises(SystemExit) as exited:
        main()
    shown = capsys.readouterr()
    assert exited.value.code == 0, shown.err
    said = (shown.out + shown.err).count("--cuda-graphs needs a CUDA device")
    assert said == 1
    assert FitConfig(cuda_graphs=None).cuda_graphs is None


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop"])
def test_an_optimizer_state_moves_between_graphed_and_eager_runs(name):
    """A graphed run's rate is a device tensor and its optimizers capturable; its checkpoints hold plain floats,
    and a state loads into either kind of run as that run needs it."""
    from ddptrain.optim import load_optimizer, saved_optimizer

    model = nn.Linear(3, 2)
    graphed = build_optimizer(model.parameters(), FitConfig(optimizer=name), graphed=True)
    assert isinstance(graphed.param_groups[0]["lr"], torch.Tensor)
    assert graphed.param_groups[0].get("capturable", True)
    eager = build_optimizer(model.parameters(), FitConfig(optimizer=name))
    model(torch.randn(4, 3)).sum().backward()
    eager.step()
    saved = saved_optimizer(eager)
    load_optimizer(graphed, saved, graphed=True)  # eager -> graphed
    lr = graphed.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and float(lr) == pytest.approx(3e-3)
    assert graphed.param_groups[0].get("capturable", True)
    again = saved_optimizer(graphed)
    assert type(again["param_groups"][0]["lr"]) is float  # checkpoints hold floats however they were trained
    back = build_optimizer(model.parameters(), FitConfig(optimizer=name))
    load_optimizer(back, again, graphed=False)  # graphed -> eager
    assert type(back.param_groups[0]["lr"]) is float and not back.param_groups[0].get("capturable", False)
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict()["state"][0].values(), saved["state"][0].values()))


@pytest.mark.parametrize("scheduler", ["cosine", "linear", "step", "coslog4"])
def test_a_tensor_rate_follows_the_schedule_in_place(scheduler):
    """What a captured step relies on: torch's schedulers fill the rate tensor in place (the graph holds that very
    tensor), with the values a float rate gets; the scheduler's saved state is plain floats."""
    from ddptrain.optim import plain_rates

    cfg = FitConfig(optimizer="sgd", scheduler=scheduler, warmup_steps=3, lr=0.1)
    rates = []
    for graphed in (False, True):
        model = nn.Linear(3, 2)
        opt = build_optimizer(model.parameters(), cfg, graphed=graphed)
        sched = build_scheduler(opt, cfg, 12)
        held = opt.param_groups[0]["lr"]
        seen = []
        for _ in range(12):
            opt.step()
            sched.step()
            seen.append(float(opt.param_groups[0]["lr"]))
        assert not graphed or opt.param_groups[0]["lr"] is held
        state = plain_rates(sched.state_dict())
        assert all(type(v) is float for key in ("base_lrs", "_last_lr") for v in state.get(key, []))
        rates.append(seen)
    assert rates[1] == pytest.approx(rates[0], rel=1e-6)


def test_numeric_pieces_cut_at_the_training_quantiles():
    """--numeric-bins: each number is kept and joined by pieces that are 0 below their quantile, 1 above the next
    and linear between; a value most rows share makes a step (no division by zero); codes pass through behind."""
    import numpy as np

    from ddptrain.model import PiecewiseLinear

    rng = np.random.default_rng(0)
    numbers = np.column_stack([rng.normal(size=1000), np.r_[np.zeros(900), np.ones(100)]]).astype(np.float32)
    pieces = PiecewiseLinear(2, 4)
    pieces.fit(numbers)
    edges = np.quantile(numbers[:, 0], [0, 0.25, 0.5, 0.75, 1])
    assert np.allclose(pieces.low[0].numpy(), edges[:-1], atol=1e-6)
    assert np.allclose(pieces.width[0].numpy(), np.diff(edges), atol=1e-6)
    x = torch.tensor([[edges[0] - 1, 0.0, 7.0], [(edges[1] + edges[2]) / 2, 1.0, 3.0], [edges[4] + 1, 0.0, 5.0]],
                     dtype=torch.float32)
    out = pieces(x)
    assert out.shape == (3, 2 + 2 * 4 + 1) and torch.isfinite(out).all()
    assert torch.equal(out[:, :2], x[:, :2]) and torch.equal(out[:, -1], x[:, 2])  # numbers kept, codes behind
    assert out[0, 2:6].tolist() == [0, 0, 0, 0] and out[2, 2:6].tolist() == [1, 1, 1, 1]
    assert torch.allclose(out[1, 2:6], torch.tensor([1, 0.5, 0, 0]), atol=1e-5)
    assert out[1, 6:10].tolist() == [1, 1, 1, 1] and out[0, 6:10].tolist() == [0, 0, 0, 0]  # 0/1: a step at 0
    # fitted on more rows than it samples: evenly spaced rows, the same edges every time
    tiled, sampled, chosen = np.tile(numbers, (3, 1)), PiecewiseLinear(2, 4), PiecewiseLinear(2, 4)
    sampled.fit(tiled, max_rows=1000)
    chosen.fit(tiled[np.linspace(0, len(tiled) - 1, 1000).astype(np.int64)])
    assert torch.equal(sampled.low, chosen.low) and torch.allclose(sampled.low[:, 1:], pieces.low[:, 1:], atol=0.1)


def test_a_model_with_numeric_pieces_and_embeddings_keeps_its_edges_in_the_state_dict():
    spec = ModelSpec(3, 2, (8,), embeddings=((5, 2),), bins=4)
    model = build_model(spec)
    assert model(torch.tensor([[0.1, 0.2, 0.3, 4.0]])).shape == (1, 2)
    assert model[2].in_features == 3 * (1 + 4) + 2
    assert {"0.low", "0.width"} <= set(model.state_dict())
    assert ModelSpec.from_dict(spec.to_dict()) == spec and ModelSpec.from_dict({**spec.to_dict()} | {"bins": 0}).bins == 0
    for bad in (-1, True, 1000):
        with pytest.raises(ValueError, match="bins"):
            ModelSpec(3, 2, (8,), bins=bad).check()
