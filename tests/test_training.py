"""relkd inside training loops: AMP (autocast), torch.compile(fullgraph=True)
of a whole training step, memory banks and precomputed neighbours, the RCO
teacher route, and EC-KD over a module's weights."""
import os

import pytest
import torch
from torch import nn

import relkd
from relkd import functional as Fn

from helpers import correlated, embeddings, labels, requires_extension

D_IN, D_EMB = 32, 16


def student_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, 48), nn.ReLU(), nn.Linear(48, D_EMB))


def batch(n=64, seed=1):
    x = embeddings(n, D_IN, seed)
    ft = embeddings(n, D_EMB, seed + 1)
    return x, ft, torch.arange(n) // 4


# name -> (module factory, whether forward takes labels)
LOSSES = {
    "fcd": (lambda: relkd.FCDLoss(), False),
    "rad": (lambda: relkd.RADLoss(k=8), True),
    "coupleface": (lambda: relkd.CoupleFaceLoss(k=8), True),
    "ekd": (lambda: relkd.EKDLoss(topk=200, temperature=0.05), True),
    "cckd": (lambda: relkd.CCKDLoss(), False),
    "sp": (lambda: relkd.SPLoss(), False),
    "rkd": (lambda: relkd.RKDLoss(angle_weight=0.0), False),
    "rkd_angle": (lambda: relkd.RKDLoss(), False),  # the default weights: angles too
}


def call(loss_fn, takes_labels, fs, ft, y):
    return loss_fn(fs, ft, y) if takes_labels else loss_fn(fs, ft)


# ------------------------------------------------------------------ AMP
@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("backend", ["reference", pytest.param("fused", marks=requires_extension)])
def test_autocast_bfloat16_accumulates_in_float32(name, backend):
    make, takes_labels = LOSSES[name]
    net = student_net()
    x, ft, y = batch()
    loss_fn = make()
    loss_fn.backend = backend
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fs = net(x)
        assert fs.dtype == torch.bfloat16
        loss = call(loss_fn, takes_labels, fs, ft.bfloat16(), y)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    # Exactly the float32 computation on the same (bfloat16-rounded) inputs.
    loss_fn32 = make()
    loss_fn32.backend = backend
    want = call(loss_fn32, takes_labels, fs.detach().float(), ft.bfloat16().float(), y)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-6, atol=1e-8)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


@requires_extension
def test_float16_inputs_return_float32():
    fs, ft = embeddings(50, 16, seed=2).half(), embeddings(50, 16, seed=3).half()
    for loss in (Fn.cckd_loss(fs, ft), Fn.rad_loss(fs, ft, k=4), Fn.sp_loss(fs, ft),
                 Fn.rkd_loss(fs, ft, angle_weight=0.0)):
        assert loss.dtype == torch.float32


# --------------------------------------------------------------- compile
@requires_extension
@pytest.mark.parametrize("name", list(LOSSES))
def test_training_step_compiles_fullgraph_and_matches_eager(name):
    make, takes_labels = LOSSES[name]
    x, ft, y = batch()
    results = []
    for compiled in (False, True):
        net, loss_fn = student_net(), make()

        def forward(x_, ft_, y_):
            return call(loss_fn, takes_labels, net(x_), ft_, y_)

        step = torch.compile(forward, fullgraph=True) if compiled else forward
        losses = []
        for _ in range(2):  # two steps: EKD's anchors move in between
            loss = step(x, ft, y)
            loss.backward()
            losses.append(loss.detach())
        grads = [p.grad for p in net.parameters()]
        results.append((losses, grads, [b.clone() for b in loss_fn.buffers()]))
    (l0, g0, b0), (l1, g1, b1) = results
    for a, b in zip(l0 + b0, l1 + b1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # Gradients up to a few float32 ulps of the largest entry: an exactly-zero
    # one (the last bias under RKD, whose distances and angles ignore a shift)
    # is rounding noise that the compiled network's own rounding moves.
    scale = max(float(g.abs().max()) for g in g0)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=max(1e-7, 4e-7 * scale))


@requires_extension
@pytest.mark.parametrize("name", list(LOSSES))
def test_plain_compile_has_no_graph_breaks(name):
    # Without fullgraph a break is silent; EKD's torch.unique made five.
    make, takes_labels = LOSSES[name]
    x, ft, y = batch()
    net, loss_fn = student_net(), make()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(
        lambda x_, ft_, y_: call(loss_fn, takes_labels, net(x_), ft_, y_))(x, ft, y)
    assert explained.graph_break_count == 0, explained.break_reasons


@requires_extension
@pytest.mark.parametrize("with_bank", [False, True])
def test_rad_with_precomputed_indices_compiles_fullgraph(with_bank):
    # indices= is range-checked by the kernel; the host-side check of eager
    # mode would break the graph, so it is skipped while compiling.
    x, ft, y = batch()
    bank = embeddings(50, D_EMB, seed=9) if with_bank else None
    _, idx = relkd.similarity_topk(ft, bank, 6) if with_bank else relkd.similarity_topk(ft, k=6)
    loss_fn = relkd.RADLoss(k=6, metric="l2")
    results = []
    for compiled in (False, True):
        net = student_net()

        def forward(x_, ft_, idx_):
            return loss_fn(net(x_), ft_, bank=bank, indices=idx_)

        step = torch.compile(forward, fullgraph=True) if compiled else forward
        loss = step(x, ft, idx)
        loss.backward()
        results.append([loss.detach()] + [p.grad for p in net.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    bad = idx.clone()
    bad[3, 2] = 10_000
    with pytest.raises(ValueError, match="must lie in"):
        step(x, ft, bad)


# ----------------------------------------------------------------- banks
def test_prototype_bank_ema_by_label():
    bank = relkd.PrototypeBank(5, 3, momentum=0.75, dtype=torch.float64)
    first = torch.tensor([[2.0, 0, 0], [0, 4.0, 0], [0, 0, 1.0]], dtype=torch.float64)
    bank.update(first, torch.tensor([1, 1, 3]))
    torch.testing.assert_close(bank.prototypes[1], torch.tensor([0.5, 0.5, 0],
                                                                dtype=torch.float64)
                               / 0.5 ** 0.5)  # mean of unit rows, normalised
    assert bank.seen.tolist() == [False, True, False, True, False]
    bank.update(torch.tensor([[0, 0, 3.0]], dtype=torch.float64), torch.tensor([1]))
    expected = 0.75 * torch.tensor([1, 1, 0], dtype=torch.float64) / 2 ** 0.5 + 0.25 * torch.tensor(
        [0, 0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(bank.prototypes[1], expected / expected.norm())
    prototypes, ids = bank.active()
    assert ids.tolist() == [1, 3] and prototypes.shape == (2, 3)
    with pytest.raises(ValueError, match=r"y: labels must lie in \[0, 5\)"):
        bank.update(first, torch.tensor([0, 1, 5]))


@requires_extension
def test_rad_with_bank_and_precomputed_hardest_identities(tmp_path):
    torch.manual_seed(0)
    num_ids = 300
    bank = relkd.PrototypeBank(num_ids, D_EMB)
    ft = embeddings(3 * num_ids, D_EMB, seed=4)
    ids = torch.arange(3 * num_ids) % num_ids
    bank.update(ft, ids)
    path = tmp_path / "hard.pt"
    hard = relkd.hardest_identities(bank.prototypes, 10, chunk_size=64, path=str(path))
    assert torch.equal(torch.load(path), hard)
    _, want = relkd.similarity_topk(bank.prototypes, k=10, backend="reference")
    assert torch.equal(hard, want)  # chunked search = one exact search
    fs, y = embeddings(40, D_EMB, seed=5), ids[:40]
    teacher = correlated(fs, seed=6)
    prototypes, proto_labels = bank.active()
    mined = Fn.rad_loss(fs, teacher, y, prototypes, proto_labels, k=10)
    given = Fn.rad_loss(fs, teacher, y, bank.prototypes, indices=hard[y], k=10)
    assert mined.item() > 0 and given.item() > 0  # mined by teacher vs by prototype: both defined
    ref = Fn.rad_loss(fs, teacher, y, bank.prototypes, indices=hard[y], k=10,
                      backend="reference")
    torch.testing.assert_close(given, ref)


@pytest.mark.parametrize("budget", [None, 0])
def test_hardest_identities_symmetric_and_chunked_match_the_reference(budget, monkeypatch):
    # On CPU one symmetric search serves every prototype; with no budget for
    # its candidates the search runs in chunks. Both find the exact
    # neighbours (float64: no near-ties), absent prototypes excluded.
    if budget is not None:
        monkeypatch.setattr(relkd.banks, "SYMMETRIC_SEARCH_MAX_BYTES", budget)
    protos = embeddings(1300, 6, seed=8, dtype=torch.float64)
    protos[[3, 1150]] = 0
    hard = relkd.hardest_identities(protos, 12, chunk_size=500)
    want = relkd.hardest_identities(protos, 12, backend="reference")
    assert torch.equal(hard, want)
    assert (hard[[3, 1150]] == -1).all() and not ({3, 1150} & set(hard.flatten().tolist()))


def test_hardest_identities_ignore_prototypes_not_seen_yet():
    bank = relkd.PrototypeBank(6, 3)
    bank.update(torch.tensor([[1.0, 0, 0], [0.9, -0.5, 0], [0, 1.0, 0], [-1.0, -0.1, 0]]),
                torch.tensor([0, 1, 3, 4]))
    hard = relkd.hardest_identities(bank.prototypes, 4)
    # Identities 2 and 5 have no prototype: never a neighbour, no neighbours.
    assert (hard[[2, 5]] == -1).all()
    assert set(hard[0].tolist()) == {1, 3, 4, -1} and hard[0, 0] == 1
    assert not ({2, 5} & set(hard.flatten().tolist()))


@requires_extension
def test_ekd_state_dict_round_trips():
    x, ft, y = batch()
    fs = student_net()(x).detach()
    trained = relkd.EKDLoss(topk=100, momentum=0.3)
    for _ in range(3):
        trained(fs, ft, y)
    restored = relkd.EKDLoss(topk=100, momentum=0.3)
    restored.load_state_dict(trained.state_dict())
    assert torch.equal(restored.s_anchor, trained.s_anchor) and (trained.s_anchor != 0).all()
    assert torch.equal(restored(fs, ft, y), trained(fs, ft, y))
    assert torch.equal(restored.t_anchor, trained.t_anchor)


# ------------------------------------------------------------------- RCO
def test_route_constrained_teacher_switches_on_schedule(tmp_path):
    teacher = nn.Linear(4, 2, bias=False)
    states = []
    for a in range(3):
        with torch.no_grad():
            teacher.weight.fill_(float(a + 1))
        states.append({k: v.clone() for k, v in teacher.state_dict().items()})
    torch.save(states[2], tmp_path / "last.pt")
    route = relkd.RouteConstrainedTeacher(teacher, [states[0], states[1],
                                                    str(tmp_path / "last.pt")], total_steps=9)
    assert route.switch_steps == [3, 6]
    x = torch.ones(1, 4)
    seen = []
    for _ in range(9):
        seen.append(route(x)[0, 0].item() / 4)  # the anchor's weight value
        route.step()
    assert seen == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert not route(x).requires_grad


def test_route_constrained_teacher_resumes_from_its_state_dict(tmp_path):
    teacher = nn.Linear(4, 2, bias=False)
    states = []
    for a in range(3):
        with torch.no_grad():
            teacher.weight.fill_(float(a + 1))
        states.append({k: v.clone() for k, v in teacher.state_dict().items()})
    route = relkd.RouteConstrainedTeacher(teacher, states, total_steps=9)
    for _ in range(7):  # now in the last stage
        route.step()
    saved = route.state_dict()
    resumed = relkd.RouteConstrainedTeacher(teacher, states, total_steps=9)
    resumed.load_state_dict(saved)
    x = torch.ones(1, 4)
    assert (resumed.step_count, resumed.stage) == (7, 2)
    seen = []
    for _ in range(2):
        seen.append(resumed(x)[0, 0].item() / 4)
        resumed.step()
    assert seen == [3, 3]  # never back to an earlier teacher
    other = relkd.RouteConstrainedTeacher(teacher, states, switch_steps=[1, 2])
    with pytest.raises(ValueError, match=r"^state_dict: saved for a route"):
        other.load_state_dict(saved)


def test_route_constrained_teacher_explicit_schedule_and_errors():
    teacher = nn.Linear(2, 2)
    state = teacher.state_dict()
    route = relkd.RouteConstrainedTeacher(teacher, [state, state], switch_steps=[5])
    assert [route.stage_at(s) for s in (0, 4, 5, 100)] == [0, 0, 1, 1]
    with pytest.raises(ValueError, match="total_steps"):
        relkd.RouteConstrainedTeacher(teacher, [state, state])
    with pytest.raises(ValueError, match="switch_steps"):
        relkd.RouteConstrainedTeacher(teacher, [state, state], switch_steps=[1, 2])
    with pytest.raises(ValueError, match="checkpoints"):
        relkd.RouteConstrainedTeacher(teacher, [])


def test_route_constrained_teacher_checks_its_route_and_schedule(tmp_path):
    teacher = nn.Linear(2, 2)
    state = teacher.state_dict()
    torch.save(state, tmp_path / "a.pt")
    # One path or one state_dict, not a list: list() split it into
    # characters (IsADirectoryError: '/') or keys (FileNotFoundError).
    for single in (str(tmp_path / "a.pt"), tmp_path / "a.pt", state):
        with pytest.raises(ValueError, match=r"^checkpoints: expected a list"):
            relkd.RouteConstrainedTeacher(teacher, single, total_steps=10)
    with pytest.raises(ValueError, match=r"^checkpoints\[1\]: no such file"):
        relkd.RouteConstrainedTeacher(teacher, [state, tmp_path / "missing.pt"], total_steps=4)
    with pytest.raises(ValueError, match=r"^checkpoints\[0\]: expected a state_dict or a path"):
        relkd.RouteConstrainedTeacher(teacher, [3], total_steps=4)
    route = relkd.RouteConstrainedTeacher(teacher, [tmp_path / "a.pt", state], total_steps=4)
    assert route.stage == 0  # an os.PathLike checkpoint loads
    # The documented intervals [a T / A, (a + 1) T / A): step 3 of 10 is
    # anchor 0's (round() gave it to anchor 1).
    route = relkd.RouteConstrainedTeacher(teacher, [state] * 3, total_steps=10)
    assert route.switch_steps == [4, 7]
    assert [route.stage_at(s) for s in (3, 4, 6, 7)] == [0, 1, 1, 2]
    # A schedule switching at step 0 starts at that anchor.
    assert relkd.RouteConstrainedTeacher(teacher, [state] * 3, switch_steps=[0, 5]).stage == 1
    with pytest.raises(ValueError, match=r"^total_steps: the equal-interval schedule"):
        relkd.RouteConstrainedTeacher(teacher, [state] * 2, total_steps=10, switch_steps=[5])
    with pytest.raises(ValueError, match=r"^total_steps: expected an int >= 1"):
        relkd.RouteConstrainedTeacher(teacher, [state], total_steps=-5)


def test_route_constrained_teacher_state_loads_with_plain_ints_and_old_rounding(tmp_path):
    np = pytest.importorskip("numpy")
    teacher = nn.Linear(2, 2)
    state = teacher.state_dict()
    # numpy total_steps: plain ints in the state, which torch.load(weights_only) reads.
    route = relkd.RouteConstrainedTeacher(teacher, [state] * 3, total_steps=np.int64(100000))
    assert route.switch_steps == [33334, 66667]
    assert all(type(s) is int for s in route.switch_steps)
    torch.save(route.state_dict(), tmp_path / "route.pt")
    saved = torch.load(tmp_path / "route.pt", weights_only=True)
    # A state saved by 0.2.0, which rounded a T / A: the run keeps its schedule.
    saved["_extra_state"]["switch_steps"] = [33333, 66667]
    saved["_extra_state"]["step_count"] = 33333
    resumed = relkd.RouteConstrainedTeacher(teacher, [state] * 3, total_steps=100000)
    resumed.load_state_dict(saved)
    assert resumed.switch_steps == [33333, 66667] and resumed.stage_at(33333) == 1
    saved["_extra_state"]["switch_steps"] = [10, 20]  # another route: refused, with the remedy
    with pytest.raises(ValueError, match=r"pass switch_steps=\[10, 20\] \(without total_steps\)"):
        relkd.RouteConstrainedTeacher(teacher, [state] * 3, total_steps=100000).load_state_dict(
            saved)


# ----------------------------------------------------------------- EC-KD
def test_exclusivity_over_a_module_sums_conv_and_linear_weights():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 5),
                        nn.BatchNorm1d(5))
    want = sum(relkd.reference.exclusivity_loss([w]) for w in (net[0].weight, net[3].weight))
    got = relkd.ExclusivityLoss()(net)
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="weights"):
        relkd.ExclusivityLoss()(nn.ReLU())


def test_eckd_loss_trains_a_module():
    net = student_net()
    x, ft, _ = batch()
    loss_fn = relkd.ECKDLoss(lam=0.5)
    loss = loss_fn(net(x), ft, net)
    want = Fn.fcd_loss(net(x), ft) + 0.5 * Fn.exclusivity_loss(net)
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())


# --------------------------------------------------------------- the docs
def test_readme_training_loop_example_runs(tmp_path):
    """The README's "Use in your training loop" example, extracted and run as
    written (2 gloo processes, CPU)."""
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    section = readme.split("## Use in your training loop", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    script = tmp_path / "train_example.py"
    script.write_text(code)
    import subprocess
    import sys
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "step" in done.stdout
