"""The training methods on top of the couplings (sdfm.methods): paths, mean flows, OAT-FM fine-tuning,
learned interpolants and data-to-data sources, against closed forms and brute force; exact resume and
bad input for each through the trainer and the CLI."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from conftest import run_sdfm
from test_train import tiny_config  # tests/ is on sys.path (pytest prepend mode)

from sdfm.couplings.exact import ExactOTCoupling
from sdfm.methods.meanflow import meanflow_loss, meanflow_sample, meanflow_target, meanflow_times
from sdfm.methods.oat import AccelerationCoupling, lift, lower
from sdfm.methods.paths import HermitePath, LinearPath
from sdfm.methods.schedule import MonotoneSchedule, fit_schedule, optimal_field
from sdfm.rundir import prepare_run_dir
from sdfm.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------- paths


def test_hermite_path_meets_its_endpoint_states_and_is_the_line_for_straight_velocities():
    gen = torch.Generator().manual_seed(0)
    x0, x1, v0, v1 = (torch.randn(5, 3, generator=gen) for _ in range(4))
    path = HermitePath()
    ends = path.sample(
        x0.repeat(2, 1),
        x1.repeat(2, 1),
        torch.tensor([0.0] * 5 + [1.0] * 5),
        v0.repeat(2, 1),
        v1.repeat(2, 1),
    )
    assert torch.allclose(ends.x_t[:5], x0) and torch.allclose(ends.x_t[5:], x1)
    assert torch.allclose(ends.dx_t[:5], v0) and torch.allclose(ends.dx_t[5:], v1)
    t = torch.rand(5, generator=gen)
    line, curve = LinearPath().sample(x0, x1, t), path.sample(x0, x1, t, x1 - x0, x1 - x0)
    assert torch.allclose(line.x_t, curve.x_t, atol=1e-6) and torch.allclose(line.dx_t, curve.dx_t, atol=1e-6)
    # Its velocity is the derivative of its position.
    h = 1e-3
    ahead = path.sample(x0, x1, t + h, v0, v1).x_t
    behind = path.sample(x0, x1, t - h, v0, v1).x_t
    assert torch.allclose((ahead - behind) / (2 * h), path.sample(x0, x1, t, v0, v1).dx_t, atol=1e-3)


def test_hermite_acceleration_integral_is_the_oat_cost():
    """∫₀¹ |ẍ|² dt of the Hermite curve = 12 |x1 − x0 − (v0 + v1)/2|² + |v1 − v0|² [derived]."""
    gen = torch.Generator().manual_seed(1)
    x0, x1, v0, v1 = (torch.randn(4, 2, generator=gen, dtype=torch.float64) for _ in range(4))
    path = HermitePath()
    t = torch.linspace(0, 1, 4001, dtype=torch.float64)
    h = t[1] - t[0]
    vel = torch.stack([path.sample(x0, x1, ti.expand(4), v0, v1).dx_t for ti in t])  # (T, 4, 2)
    acc = (vel[2:] - vel[:-2]) / (2 * h)
    integral = (acc.pow(2).sum(-1) * h).sum(0)
    closed = 12 * (x1 - x0 - (v0 + v1) / 2).pow(2).sum(1) + (v1 - v0).pow(2).sum(1)
    assert torch.allclose(integral, closed, rtol=2e-3)


# --------------------------------------------------------------------------------------- mean flows

MU, SIGMA = 2.0, 0.5


def _sigma(tau):
    return torch.sqrt((1 - tau) ** 2 + tau**2 * SIGMA**2)


def gaussian_u(x, s, t):
    """Closed-form mean velocity of N(0, 1) -> N(MU, SIGMA^2), independent coupling [derived]."""
    z = (x - s[:, None] * MU) / _sigma(s)[:, None]
    return (t[:, None] * MU + _sigma(t)[:, None] * z - x) / (t - s)[:, None]


def gaussian_v(s, x):
    sig = _sigma(s)
    dsig = (s * SIGMA**2 - (1 - s)) / sig
    return MU + (dsig / sig)[:, None] * (x - s[:, None] * MU)


def test_meanflow_identity_has_zero_residual_for_the_gaussian_closed_form():
    """u = v + (t − s) D_s u with D_s u from the JVP of ``meanflow_target`` along (v, 1, 0): checks
    the sign convention and the JVP wiring at once."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(64, 1, generator=gen, dtype=torch.float64)
    s = 0.8 * torch.rand(64, generator=gen, dtype=torch.float64)
    t = s + 0.05 + (0.95 - s) * torch.rand(64, generator=gen, dtype=torch.float64)
    target = meanflow_target(gaussian_u, x, s, t, gaussian_v(s, x))
    assert torch.allclose(target, gaussian_u(x, s, t), atol=1e-9)
    wrong = meanflow_target(gaussian_u, x, s, t, -gaussian_v(s, x))  # a wrong tangent is caught
    assert not torch.allclose(wrong, gaussian_u(x, s, t), atol=1e-3)


def test_meanflow_times_follow_the_ratio_and_order():
    z = torch.randn(20000, 3, generator=torch.Generator().manual_seed(3))
    s, t = meanflow_times(z, ratio=0.25, mean=-0.4, std=1.0)
    assert bool((s <= t).all()) and bool(((0 < s) & (t < 1)).all())
    assert abs(float((s < t).float().mean()) - 0.25) < 0.02
    s1, t1 = meanflow_times(z, ratio=1.0, mean=-0.4, std=1.0)
    assert bool((s1 < t1).all())


@pytest.mark.slow
def test_a_trained_mean_flow_one_step_map_is_the_closed_form():
    """A small mean-flow MLP trained on N(0, 1) -> N(2, 0.25) with independent pairs maps noise in
    ONE step onto the closed-form transport x -> MU + SIGMA x."""
    from sdfm.config import ModelConfig
    from sdfm.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="mlp", hidden=64, depth=3, horizon_input=True), (1,), 0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(4)

    def u(m):
        return lambda x, a, b, lab=None: m(a, x, lab, horizon=b - a)

    for _ in range(1500):
        x0 = torch.randn(1024, 1, generator=gen)
        x1 = MU + SIGMA * torch.randn(1024, 1, generator=gen)
        s, t = meanflow_times(torch.randn(1024, 3, generator=gen), ratio=0.75, mean=0.0, std=2.0)
        loss, _ = meanflow_loss(u(model), u(model), x0, x1, s, t, power=1.0, c=1e-3)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x0 = torch.linspace(-2, 2, 41)[:, None]
    one, _ = meanflow_sample(u(model), x0, 1)
    assert (one - (MU + SIGMA * x0)).abs().mean() < 0.1
    two, traj = meanflow_sample(u(model), x0, 2, return_trajectory=True)
    assert traj.shape == (3, 41, 1) and (two - (MU + SIGMA * x0)).abs().mean() < 0.1


# ----------------------------------------------------------------------------------------- OAT


def test_lifted_states_round_trip_and_their_distance_is_the_acceleration_cost():
    gen = torch.Generator().manual_seed(5)
    x0, x1, v0, v1 = (torch.randn(7, 3, generator=gen, dtype=torch.float64) for _ in range(4))
    alpha = 12 / 13
    a, b = lift(x0, v0, alpha, 0), lift(x1, v1, alpha, 1)
    for z, end, (x, v) in ((a, 0, (x0, v0)), (b, 1, (x1, v1))):
        back = lower(z, alpha, end, (3,))
        assert torch.allclose(back[0], x) and torch.allclose(back[1], v)
    cost = alpha * (x1 - x0 - (v0 + v1) / 2).pow(2).sum(1) + (1 - alpha) * (v1 - v0).pow(2).sum(1)
    assert torch.allclose((a - b).pow(2).sum(1), cost)
    # 12/13 : 1/13 is the exact least-acceleration cost up to the factor 13.
    assert torch.allclose(13 * cost, 12 * (x1 - x0 - (v0 + v1) / 2).pow(2).sum(1) + (v1 - v0).pow(2).sum(1))


class _Velocity:
    """A stand-in target model: v(t, x) = (1 + t) sin(x) (any fixed field will do)."""

    version = 0

    def velocity(self, t, x, labels=None):
        return (1 + t) * torch.sin(x)


def test_acceleration_coupling_is_the_brute_force_optimum_of_the_acceleration_cost():
    gen = torch.Generator().manual_seed(6)
    x0, x1 = torch.randn(6, 2, generator=gen), 2 + torch.randn(6, 2, generator=gen)
    target, alpha = _Velocity(), 12 / 13
    coupling = AccelerationCoupling(ExactOTCoupling(), target, alpha)
    pairs = coupling.pair(x0, x1, None, torch.Generator().manual_seed(0))
    v0, v1 = target.velocity(0.0, x0), target.velocity(1.0, x1)
    assert torch.allclose(pairs.x0, x0, atol=1e-5) and torch.allclose(pairs.v0, v0, atol=1e-5)
    assert torch.allclose(pairs.x1, x1[pairs.index], atol=1e-5) and torch.allclose(
        pairs.v1, v1[pairs.index], atol=1e-5
    )

    def cost(perm):
        p = list(perm)
        return float(
            (
                alpha * (x1[p] - x0 - (v0 + v1[p]) / 2).pow(2).sum(1)
                + (1 - alpha) * (v1[p] - v0).pow(2).sum(1)
            ).sum()
        )

    best = min(itertools.permutations(range(6)), key=cost)
    assert cost(pairs.index.tolist()) == pytest.approx(cost(best), rel=1e-5)
    w2 = ExactOTCoupling().pair(x0, x1, None, torch.Generator()).index  # the plain coupling differs here
    assert cost(w2.tolist()) >= cost(best)


# ------------------------------------------------------------------------------ learned interpolants


def test_monotone_schedule_starts_linear_and_stays_monotone_with_exact_derivatives():
    sched = MonotoneSchedule(degree=6, dim=3)
    t = torch.linspace(0, 1, 11)
    a, b, da, db = sched.values(t)
    assert torch.allclose(b, t[:, None].expand(-1, 3), atol=1e-6) and torch.allclose(a, 1 - b, atol=1e-6)
    with torch.no_grad():
        sched.theta_a.normal_(generator=torch.Generator().manual_seed(7))
        sched.theta_b.normal_(generator=torch.Generator().manual_seed(8))
    a, b, da, db = sched.values(torch.linspace(0, 1, 201))
    assert torch.allclose(a[0], torch.ones(3)) and torch.allclose(a[-1], torch.zeros(3), atol=1e-6)
    assert torch.allclose(b[0], torch.zeros(3)) and torch.allclose(b[-1], torch.ones(3))
    assert bool((da <= 1e-6).all()) and bool((db >= -1e-6).all())
    h = 1e-3
    tt = torch.tensor([0.3])
    num = (sched.values(tt + h)[1] - sched.values(tt - h)[1]) / (2 * h)
    assert torch.allclose(num, sched.values(tt)[3], atol=1e-3)


def test_optimal_field_is_the_brute_force_posterior_mean_and_top_k_agrees():
    from sdfm.semidiscrete import MatchIndex

    gen = torch.Generator().manual_seed(9)
    y = torch.randn(300, 2, generator=gen) * 2
    sched = MonotoneSchedule(4, 1)
    t, x = torch.full((20,), 0.6), torch.randn(20, 2, generator=gen)
    v = optimal_field(sched, t, x, y)
    # Brute force: E[x1 − x0 | x_t = x] under x_t = (1 − t) x0 + t y_j, x0 ~ N(0, I), j uniform.
    w = torch.softmax(-((x[:, None] - 0.6 * y[None]) ** 2).sum(-1) / (2 * 0.4**2), 1)
    x0 = (x[:, None] - 0.6 * y[None]) / 0.4
    assert torch.allclose(v, (w[..., None] * (y[None] - x0)).sum(1), atol=1e-5)
    index = MatchIndex(torch.cat([y, y * y], 1), precision="fp32")
    index.set_potential(torch.zeros(300))
    assert torch.allclose(optimal_field(sched, t, x, y, topk=300, index=index), v, atol=1e-4)


def test_fitting_the_schedule_lowers_the_straightness_objective():
    from sdfm.data.synthetic import eight_gaussians

    y = eight_gaussians(400, torch.Generator().manual_seed(10))
    fit = fit_schedule(y, steps=40, batch=64, lr=0.05, seed=0)
    assert fit.after < 0.8 * fit.before


# ------------------------------------------------------------------------- through the trainer


def _train(cfg, run_dir, resume=False, until=None, init_from=None) -> Trainer:
    prepare_run_dir(run_dir, cfg, resume=resume, overwrite=False)
    trainer = Trainer(cfg, run_dir, init_from=None if resume else init_from)
    if resume:
        assert trainer.resume()
    trainer.train(until=until)
    return trainer


def _same_weights(a: Trainer, b: Trainer) -> None:
    for name, p in a.model.state_dict().items():
        assert torch.equal(p, b.model.state_dict()[name]), name


def _meanflow(c):
    c.method.kind, c.model.horizon_input = "meanflow", True
    return c


def _learned(c):
    c.method.path, c.method.schedule_steps, c.method.schedule_batch = "learned", 5, 32
    return c


@pytest.mark.parametrize(
    "configure, kind",
    [(_meanflow, "independent"), (_meanflow, "exact"), (_learned, "exact")],
    ids=["meanflow-independent", "meanflow-exact", "learned-exact"],
)
def test_resume_is_exact_for_each_method(tmp_path, configure, kind):
    def cfg():
        return configure(tiny_config(kind, 30))

    full = _train(cfg(), tmp_path / "a")
    _train(cfg(), tmp_path / "b", until=20)
    _same_weights(full, _train(cfg(), tmp_path / "b", resume=True))


@pytest.fixture(scope="session")  # once per xdist worker, even if its tests of this module come in several runs
def phase1(tmp_path_factory):
    """A phase-1 flow-matching run to fine-tune."""
    run = tmp_path_factory.mktemp("phase1")
    _train(tiny_config("exact", 20), run)
    return run


def _oat(kind="exact", steps=30, every=7):
    c = tiny_config(kind, steps)
    c.method.kind, c.method.path, c.method.oat_target_every = "oat", "hermite", every
    return c


def test_oat_starts_from_the_trained_run_and_resumes_exactly_mid_target_cycle(tmp_path, phase1):
    from sdfm.checkpoint import CheckpointManager

    start = Trainer(_oat(), tmp_path / "peek", init_from=phase1)
    ema = CheckpointManager(phase1, 1).load_latest().tensors("ema")
    assert all(torch.equal(v, ema[k]) for k, v in start.model.state_dict().items())
    assert all(torch.equal(v, ema[k]) for k, v in start.method.target.module.state_dict().items())
    full = _train(_oat(), tmp_path / "a", init_from=phase1)
    assert full.method.target.version == 30 // 7
    _train(_oat(), tmp_path / "b", until=20, init_from=phase1)  # 20: between refreshes at 14 and 21
    resumed = _train(_oat(), tmp_path / "b", resume=True)
    _same_weights(full, resumed)
    assert resumed.method.target.version == full.method.target.version


def test_oat_works_with_the_sinkhorn_and_semidiscrete_couplings(tmp_path, phase1):
    sink = _train(_oat("sinkhorn", steps=6), tmp_path / "s", init_from=phase1)
    sd_cfg = _oat("semidiscrete", steps=6, every=3)
    sd_cfg.potential.max_steps = 30
    sd = _train(sd_cfg, tmp_path / "sd", init_from=phase1)
    for trainer in (sink, sd):
        assert trainer.step == 6
    # Refreshed after steps 3 and 6; the lifted potential is refitted when the next batch is paired,
    # so the last fit is the one after step 3.
    assert sd.method.target.version == 2 and sd.coupling.version == 1


def test_data_to_data_source_is_sampled_with_replacement_and_resumes_exactly(tmp_path):
    from sdfm.data.synthetic import moons

    src = tmp_path / "moons.npy"
    np.save(src, moons(500, torch.Generator().manual_seed(11)).numpy())

    def cfg(kind="exact"):
        c = tiny_config(kind, 30)
        c.data.source, c.data.source_path = "file", str(src)
        return c

    full = _train(cfg(), tmp_path / "a")
    points = torch.from_numpy(np.load(src))
    x0 = full.pairing._pair(3, torch.arange(64)).pairs.x0
    assert all(bool((points == row).all(1).any()) for row in x0)  # every noise row is a source point
    _train(cfg(), tmp_path / "b", until=20)
    _same_weights(full, _train(cfg(), tmp_path / "b", resume=True))
    sd = cfg("semidiscrete")
    sd.potential.max_steps = 50
    assert _train(sd, tmp_path / "sd").step == 30


# ------------------------------------------------------------------------------ bad input (CLI)


sdfm = run_sdfm  # conftest.run_sdfm: the CLI in this process (no interpreter start per command)


def _one_line_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


TINY = [
    "--data.num-points",
    "300",
    "--data.num-eval",
    "50",
    "--train.steps",
    "3",
    "--train.eval-at-end",
    "False",
]


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--method.kind", "oat", "--method.path", "hermite"], ["--init-from RUN"]),
        (["--method.oat-alpha", "1.5"], ["method.oat_alpha", "(0, 1)"]),
        (["--method.oat-alpha", "0"], ["method.oat_alpha"]),
        (["--method.kind", "meanflow"], ["model.horizon_input = True"]),
        (["--method.path", "hermite"], ["method.kind = 'oat'"]),
        (["--method.path", "learned", "--data.num-points", "30000"], ["method.schedule_topk"]),
    ],
    ids=[
        "oat-without-init",
        "alpha-above-1",
        "alpha-0",
        "meanflow-without-horizon",
        "hermite-without-oat",
        "learned-too-large",
    ],
)
@pytest.mark.slow
def test_bad_method_settings_exit_2_in_one_line_and_touch_nothing(tmp_path, args, needles):
    r = sdfm("train", "--run-dir", tmp_path / "run", *TINY, *args)
    _one_line_error(r, *needles)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_init_from_a_run_of_other_data_or_model_is_refused(tmp_path, phase1):
    oat = [
        "--method.kind",
        "oat",
        "--method.path",
        "hermite",
        "--init-from",
        phase1,
        "--model.hidden",
        "32",
        "--model.depth",
        "2",
    ]
    base = [
        "--data.num-points",
        "512",
        "--data.num-eval",
        "64",
        "--train.steps",
        "3",
        "--train.eval-at-end",
        "False",
    ]
    other_data = sdfm("train", "--run-dir", tmp_path / "a", *base, *oat, "--data.seed", "5")
    _one_line_error(other_data, "fingerprint", "[data]")
    other_model = sdfm(
        "train", "--run-dir", tmp_path / "b", *base, *oat[:-4], "--model.hidden", "48", "--model.depth", "2"
    )
    _one_line_error(other_model, "another model shape", "[model]")


def test_source_file_of_another_point_shape_is_refused(tmp_path):
    src = tmp_path / "src.npy"
    np.save(src, np.zeros((100, 3), np.float32))
    r = sdfm(
        "train", "--run-dir", tmp_path / "run", *TINY, "--data.source", "file", "--data.source-path", src
    )
    _one_line_error(r, "data.source_path", "(3,)", "(2,)")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_meanflow_and_velocity_runs_refuse_each_others_samplers(tmp_path):
    mf, fm = tmp_path / "mf", tmp_path / "fm"
    assert (
        sdfm(
            "train", "--run-dir", mf, *TINY, "--method.kind", "meanflow", "--model.horizon-input", "True"
        ).returncode
        == 0
    )
    assert sdfm("train", "--run-dir", fm, *TINY).returncode == 0
    _one_line_error(
        sdfm("sample", "--run-dir", mf, "--out", tmp_path / "a.npy", "--solver", "euler"), "--solver meanflow"
    )
    _one_line_error(
        sdfm("sample", "--run-dir", fm, "--out", tmp_path / "b.npy", "--solver", "meanflow"), "mean-flow run"
    )
    ok = sdfm("sample", "--run-dir", mf, "--out", tmp_path / "c.npy", "--nfe", "2", "--num", "10")
    assert ok.returncode == 0, ok.stderr
    assert np.load(tmp_path / "c.npy").shape == (10, 2) and math.isfinite(
        float(np.load(tmp_path / "c.npy").sum())
    )


def test_meanflow_loss_runs_through_the_unet_with_attention():
    """The JVP goes through GroupNorm, convolutions and (math-kernel) attention of the U-Net, every
    parameter gets a gradient from the loss's own forward pass, and a class-conditional batch
    whose rows are partly apart works (the JVP rows get their own labels)."""
    from sdfm.config import ModelConfig
    from sdfm.models import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(
        kind="unet", channels=8, channel_mult=[1, 2], attention_resolutions=[4], horizon_input=True
    )
    model = build_model(cfg, (1, 8, 8), 0)
    gen = torch.Generator().manual_seed(8)
    x0, x1 = torch.randn(4, 1, 8, 8, generator=gen), torch.randn(4, 1, 8, 8, generator=gen)
    s, t = meanflow_times(torch.randn(4, 3, generator=gen), ratio=1.0, mean=0.0, std=1.0)

    def u(x, a, b, lab):
        return model(a, x, lab, horizon=b - a)

    loss, metrics = meanflow_loss(u, u, x0, x1, s, t, power=1.0, c=1e-3)
    loss.backward()
    assert math.isfinite(float(loss.detach())) and metrics["mf_apart"] == 1.0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # Class-conditional, with only some rows apart: the JVP sees those rows' labels.
    cond = build_model(cfg, (1, 8, 8), 3)
    s, t = meanflow_times(torch.randn(4, 3, generator=gen), ratio=0.5, mean=0.0, std=1.0)
    s[0], t[0], s[1], t[1] = 0.2, 0.7, 0.5, 0.5  # one row apart, one not, whatever the draw

    def uc(x, a, b, lab):
        return cond(a, x, lab, horizon=b - a)

    loss, _ = meanflow_loss(uc, uc, x0, x1, s, t, power=1.0, c=1e-3, labels=torch.tensor([0, 1, 2, 1]))
    assert math.isfinite(float(loss.detach()))
