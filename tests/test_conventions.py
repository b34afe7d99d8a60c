"""Conventions of the public API (issue 14): __all__, docstrings that help()
shows (every constructor argument, each loss's paper), type hints, extra_repr,
numpy scalars as options, pickling and copy.deepcopy of every module (also
holding a torch.distributed process group, in spawned gloo ranks),
state_dict round trips of the stateful ones, and one version everywhere."""
import copy
import datetime
import importlib.metadata
import inspect
import os
import pickle
import pydoc
import re
import subprocess
import sys
import tempfile
import tomllib
import typing
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import relkd
from relkd._group_state import WORLD

from helpers import correlated, embeddings, finish_rank, labels, spawn_with_deadline

ROOT = Path(__file__).resolve().parents[1]
N, D = 12, 6
FS = embeddings(N, D, seed=1)
FT = correlated(FS, seed=2)
Y = labels("random", N, seed=3)
WEIGHT = embeddings(5, 7, seed=4)

# Each loss with non-default options and the inputs of its forward.
LOSSES = {
    "FCDLoss": (lambda **kw: relkd.FCDLoss("cosine", normalize=False, **kw), (FS, FT)),
    "RADLoss": (lambda **kw: relkd.RADLoss(k=3, metric="l1", margin=0.1, mine_by="student",
                                           **kw), (FS, FT, Y)),
    "CoupleFaceLoss": (lambda **kw: relkd.CoupleFaceLoss(0.5, 2.0, k=4, metric="l2", **kw),
                       (FS, FT, Y)),
    "EKDLoss": (lambda **kw: relkd.EKDLoss(topk=7, temperature=0.1, fpr_levels=(0.1, 0.05),
                                           **kw), (FS, FT, Y)),
    "CCKDLoss": (lambda **kw: relkd.CCKDLoss(gamma=0.3, order=3, **kw), (FS, FT)),
    "SPLoss": (lambda **kw: relkd.SPLoss(detach_teacher=False, **kw), (FS, FT)),
    "RKDLoss": (lambda **kw: relkd.RKDLoss(distance_weight=2.0, angle_weight=0.0, **kw),
                (FS, FT)),
    "ExclusivityLoss": (lambda **kw: relkd.ExclusivityLoss(**kw), (WEIGHT,)),
    "ECKDLoss": (lambda **kw: relkd.ECKDLoss(lam=0.5, **kw), (FS, FT, WEIGHT)),
}

# Each method's paper: (authors, title, venue and year), checked against the
# publishers' pages (CoupleFace is ECCV 2022, Springer LNCS 13672).
COUPLEFACE = ("Liu et al.", "CoupleFace: Relation Matters for Face Recognition Distillation",
              "ECCV 2022")
ECKD = ("Wang et al.", "Exclusivity-Consistency Regularized Knowledge Distillation for Face "
        "Recognition", "ECCV 2020")
PAPERS = {
    relkd.FCDLoss: COUPLEFACE + ECKD,
    relkd.RADLoss: COUPLEFACE,
    relkd.CoupleFaceLoss: COUPLEFACE,
    relkd.EKDLoss: ("Huang et al.", "Evaluation-oriented Knowledge Distillation for Deep Face "
                    "Recognition", "CVPR 2022"),
    relkd.CCKDLoss: ("Peng et al.", "Correlation Congruence for Knowledge Distillation",
                     "ICCV 2019"),
    relkd.SPLoss: ("Tung & Mori", "Similarity-Preserving Knowledge Distillation", "ICCV 2019"),
    relkd.RKDLoss: ("Park et al.", "Relational Knowledge Distillation", "CVPR 2019"),
    relkd.ExclusivityLoss: ECKD,
    relkd.ECKDLoss: ECKD,
    relkd.RouteConstrainedTeacher: ("Jin et al.", "Knowledge Distillation via Route "
                                    "Constrained Optimization", "ICCV 2019"),
    relkd.IDAScorer: ("Liu et al.", "Inter-class Discrepancy Alignment for Face Recognition",
                      "2021"),
}


def flat(text: str) -> str:
    return " ".join(text.split())


def help_text(cls) -> str:
    """What help(cls) prints, without pydoc's " |  " margins, on one line."""
    text = pydoc.render_doc(cls, renderer=pydoc.plaintext)
    return flat("\n".join(re.sub(r"^[ |]*", "", line) for line in text.splitlines()))


def public_classes():
    return [obj for name in relkd.__all__ if inspect.isclass(obj := getattr(relkd, name))]


def documented_classes():
    """The classes with constructor arguments of their own (not the warnings)."""
    return [c for c in public_classes() if not issubclass(c, Warning)]


def init_parameters(cls):
    return [p for p in inspect.signature(cls.__init__).parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


# ------------------------------------------------------------------ __all__
def test_all_names_exist_and_every_public_class_and_function_is_listed():
    missing = [name for name in relkd.__all__ if not hasattr(relkd, name)]
    assert not missing, f"relkd.__all__ names that do not exist: {missing}"
    unlisted = [name for name, obj in vars(relkd).items()
                if not name.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj))
                and obj.__module__.startswith("relkd") and name not in relkd.__all__]
    assert not unlisted, f"public relkd names missing from __all__: {unlisted}"
    assert len(set(relkd.__all__)) == len(relkd.__all__)


# ---------------------------------------------------------------- docstrings
@pytest.mark.parametrize("cls", documented_classes(), ids=lambda c: c.__name__)
def test_help_lists_every_constructor_argument(cls):
    assert cls.__doc__, f"{cls.__name__} has no docstring"
    args = cls.__doc__.split("Args:", 1)
    assert len(args) == 2, f"{cls.__name__}'s docstring has no Args section"
    for p in init_parameters(cls):
        assert re.search(rf"^\s+{p.name}:", args[1], re.M), (
            f"{cls.__name__}'s Args do not describe {p.name!r}")
    text = help_text(cls)
    assert flat(cls.__doc__.split("\n", 1)[0]) in text
    # The class's own __init__ (and forward) text, not torch's generic one.
    assert "Initialize internal Module state" not in text
    if "forward" in vars(cls):
        assert "Define the computation performed at every call" not in text


@pytest.mark.parametrize("cls", [c for c in documented_classes() if "forward" in vars(c)],
                         ids=lambda c: c.__name__)
def test_forward_arguments_are_documented(cls):
    doc = flat(cls.__doc__ + (cls.forward.__doc__ or ""))
    assert "Forward" in cls.__doc__, f"{cls.__name__}'s docstring has no Forward section"
    for name in inspect.signature(cls.forward).parameters:
        if name not in ("self", "args", "kwargs"):
            assert re.search(rf"\b{name}\b", doc), f"{cls.__name__}.forward: {name} undocumented"


@pytest.mark.parametrize("cls", list(PAPERS), ids=lambda c: c.__name__)
def test_help_cites_the_paper(cls):
    text = help_text(cls)
    for part in PAPERS[cls]:
        assert part in text, f"help({cls.__name__}) does not cite {part!r}"


def test_every_public_class_and_function_has_a_docstring():
    for name in relkd.__all__:
        obj = getattr(relkd, name)
        if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.ismodule(obj):
            assert inspect.getdoc(obj), f"relkd.{name} has no docstring"


# ---------------------------------------------------------------- type hints
def public_callables():
    """(label, function) of every public function and every public method
    (constructor, forward and the rest) of the public classes."""
    out = [(name, obj) for name in relkd.__all__ if inspect.isfunction(obj := getattr(relkd, name))]
    for cls in documented_classes():
        for attr, fn in vars(cls).items():
            if inspect.isfunction(fn) and (attr == "__init__" or not attr.startswith("_")):
                out.append((f"{cls.__name__}.{attr}", fn))
    return out


@pytest.mark.parametrize("label,fn", public_callables(), ids=[c[0] for c in public_callables()])
def test_public_signatures_are_annotated(label, fn):
    signature = inspect.signature(fn)
    for p in signature.parameters.values():
        if p.name not in ("self", "cls"):
            assert p.annotation is not p.empty, f"{label}: parameter {p.name} not annotated"
    if not label.endswith("__init__"):
        assert signature.return_annotation is not signature.empty, f"{label}: no return type"
    # The annotations resolve (no typo hidden in a string annotation).
    names = {"ProcessGroup": dist.ProcessGroup} if dist.is_available() else {}
    typing.get_type_hints(inspect.unwrap(fn), localns=names)


def test_package_ships_py_typed():
    assert (ROOT / "relkd" / "py.typed").is_file()
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in config["tool"]["setuptools"]["package-data"]["relkd"]


# ---------------------------------------------------------------- extra_repr
def test_extra_repr_shows_the_options():
    assert repr(relkd.RADLoss()) == ("RADLoss(k=16, metric='hinge', margin=0.03, mine_by="
                                     "'teacher', detach_teacher=True, backend='auto', "
                                     "gather=False)")
    for name, (make, _) in LOSSES.items():
        loss = make(backend="reference")
        text = repr(loss)
        for option in ("backend='reference'", "gather=False"):
            assert option in text, f"{name}: {option} missing from {text}"
        for p in init_parameters(type(loss)):
            if p.name not in ("process_group",):
                assert f"{p.name}={getattr(loss, p.name)!r}" in text, (
                    f"{name}: option {p.name} missing from {text}")


def test_extra_repr_of_the_other_modules():
    bank = relkd.PrototypeBank(5, 3, momentum=0.5)
    assert repr(bank) == "PrototypeBank(num_classes=5, dim=3, momentum=0.5, gather=False)"
    scorer = relkd.IDAScorer(embeddings(9, 3, seed=5), k=4, mode="asnorm", backend="reference")
    assert "k=4" in repr(scorer) and "mode='asnorm'" in repr(scorer)


# ------------------------------------------------------------------- options
def test_options_accept_numpy_scalars_and_store_python_numbers():
    np = pytest.importorskip("numpy")
    loss = relkd.CoupleFaceLoss(alpha=np.float32(0.5), k=np.int64(4), margin=np.float64(0.1))
    assert (loss.alpha, loss.k, loss.margin) == (0.5, 4, 0.1)
    assert type(loss.k) is int and type(loss.alpha) is float
    ekd = relkd.EKDLoss(topk=np.int32(5), fpr_levels=np.array([0.1, 0.01]))
    assert ekd.topk == 5 and ekd.fpr_levels == (0.1, 0.01)
    bank = relkd.PrototypeBank(np.int64(4), np.int16(3), momentum=np.float32(0.5))
    assert bank.prototypes.shape == (4, 3)


def test_coupleface_names_itself_for_unknown_arguments():
    with pytest.raises(TypeError, match=r"CoupleFaceLoss\.__init__\(\) got an unexpected "
                                        r"keyword argument 'gamma'"):
        relkd.CoupleFaceLoss(gamma=1)
    with pytest.raises(ValueError, match=r"^k: expected an int >= 1"):
        relkd.CoupleFaceLoss(k=0)
    assert relkd.CoupleFaceLoss(k=5, mine_by="student").mine_by == "student"


# ------------------------------------------------------- pickle and deepcopy
def same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", list(LOSSES))
@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_losses_pickle_and_deepcopy(name, how):
    make, inputs = LOSSES[name]
    loss = make(backend="reference")
    clone = pickle.loads(pickle.dumps(loss)) if how == "pickle" else copy.deepcopy(loss)
    assert type(clone) is type(loss) and repr(clone) == repr(loss)
    assert same_state(clone, loss)
    assert torch.equal(clone(*inputs), loss(*inputs))


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_other_modules_pickle_and_deepcopy(how, tmp_path):
    dup = (lambda m: pickle.loads(pickle.dumps(m))) if how == "pickle" else copy.deepcopy
    bank = relkd.PrototypeBank(5, D, momentum=0.5)
    bank.update(FT[:8], Y[:8] % 5)
    bank_copy = dup(bank)
    assert same_state(bank_copy, bank)
    bank.update(FT[8:], Y[8:] % 5)
    bank_copy.update(FT[8:], Y[8:] % 5)
    assert same_state(bank_copy, bank)

    route, x = route_teacher(tmp_path)
    route.step()
    route_copy = dup(route)
    assert (route_copy.stage, route_copy.step_count) == (route.stage, route.step_count)
    assert torch.equal(route_copy(x), route(x))

    scorer = relkd.IDAScorer(embeddings(20, D, seed=5), k=3, backend="reference")
    assert torch.equal(dup(scorer).scores(FS, FT), scorer.scores(FS, FT))


# ---------------------------------------------------------------- state_dict
def route_teacher(tmp_path):
    """A 3-anchor route (the last anchor as a path) and an input for it."""
    teacher = nn.Linear(D, 4)
    states = []
    for scale in (1.0, 2.0, 3.0):
        with torch.no_grad():
            teacher.weight.fill_(scale)
        states.append({k: v.clone() for k, v in teacher.state_dict().items()})
    torch.save(states[2], tmp_path / "anchor2.pt")
    checkpoints = [states[0], states[1], str(tmp_path / "anchor2.pt")]
    return relkd.RouteConstrainedTeacher(teacher, checkpoints, switch_steps=[1, 3]), FS


def test_ekd_state_dict_round_trip():
    make, (fs, ft, y) = LOSSES["EKDLoss"]
    trained = make(backend="reference")
    trained(fs, ft, y)
    assert trained.s_anchor.abs().sum() > 0  # the anchors moved: a state worth saving
    resumed = make(backend="reference")
    resumed.load_state_dict(trained.state_dict())
    assert same_state(resumed, trained)
    assert torch.equal(resumed(fs[:8], ft[:8], y[:8]), trained(fs[:8], ft[:8], y[:8]))
    assert same_state(resumed, trained)


def test_prototype_bank_state_dict_round_trip():
    bank = relkd.PrototypeBank(5, D, momentum=0.5)
    bank.update(FT[:6], Y[:6] % 5)
    resumed = relkd.PrototypeBank(5, D, momentum=0.5)
    resumed.load_state_dict(bank.state_dict())
    assert same_state(resumed, bank)
    bank.update(FT[6:], Y[6:] % 5)
    resumed.update(FT[6:], Y[6:] % 5)
    assert same_state(resumed, bank)
    for a, b in zip(resumed.active(), bank.active()):
        assert torch.equal(a, b)


def test_route_teacher_state_dict_round_trip(tmp_path):
    route, x = route_teacher(tmp_path)
    for _ in range(3):
        route.step()
    resumed, _ = route_teacher(tmp_path)
    resumed.load_state_dict(route.state_dict())
    assert (resumed.stage, resumed.step_count) == (route.stage, route.step_count) == (2, 3)
    assert torch.equal(resumed(x), route(x))


# ------------------------------------------- process groups (spawned gloo ranks)
WORLD_SIZE = 2
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)
RUN_DEADLINE_S = 600


def rank_rows(rank: int) -> slice:
    half = N // WORLD_SIZE
    return slice(rank * half, (rank + 1) * half)


def group_worker(rank, init_file, out_dir):
    """Pickles and deep-copies every module holding a process group, runs
    them in both ranks and records what the tests check."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD_SIZE, timeout=COLLECTIVE_TIMEOUT)
    group = dist.new_group(list(range(WORLD_SIZE)))
    rows = rank_rows(rank)
    results = {}
    for name, (make, inputs) in LOSSES.items():
        inputs = [t[rows] if t.shape[0] == N else t for t in inputs]
        for label, held in (("group", group), ("world", dist.group.WORLD)):
            loss = make(backend="reference", process_group=held)
            pickled = pickle.dumps(loss)
            restored, deep = pickle.loads(pickled), copy.deepcopy(loss)
            results[name, label] = {
                "pickled_name": restored._process_group_name,
                "lazy": restored.__dict__.get("_process_group") is None,
                "deepcopy_shares": deep.__dict__.get("_process_group") is held,
                "values": [m(*inputs) for m in (loss, restored, deep)],
                "restored_resolves": restored.process_group is held,
                "repr": repr(restored),
            }
    bank = relkd.PrototypeBank(5, D, momentum=0.5, process_group=group)
    twin, deep = pickle.loads(pickle.dumps(bank)), copy.deepcopy(bank)
    for m in (bank, twin, deep):
        m.update(FT[rows], Y[rows] % 5)
    results["bank"] = [m.prototypes for m in (bank, twin, deep)]
    results["bank_shares"] = (twin.process_group is group
                              and deep.__dict__.get("_process_group") is group)

    # A group this rank is outside of (rank 1 holds dist's NON_GROUP_MEMBER):
    # a module holds, shows and pickles it; calling with it raises there.
    lonely = relkd.CCKDLoss(process_group=dist.new_group([0]))
    unpickled = pickle.loads(pickle.dumps(lonely))
    results["non_member"] = [repr(lonely), repr(unpickled)]
    for call in (lambda: lonely(FS[rows], FT[rows]),
                 lambda: relkd.functional.cckd_loss(FS[rows], FT[rows], process_group=[0, 1]),
                 lambda: unpickled(FS[rows], FT[rows])):
        try:
            results["non_member"].append(float(call()))
        except ValueError as exc:
            results["non_member"].append(str(exc))

    # A module unpickled where its group does not exist fails loudly.
    doomed = dist.new_group(list(range(WORLD_SIZE)))
    pickled = pickle.dumps(relkd.RADLoss(k=3, backend="reference", process_group=doomed))
    dist.destroy_process_group(doomed)
    try:
        pickle.loads(pickled)(FS[rows], FT[rows], Y[rows])
        results["missing_group"] = None
    except ValueError as exc:
        results["missing_group"] = str(exc)
    if rank == 0:  # for the test process, where torch.distributed is not initialised
        (Path(out_dir) / "pickled_loss.bin").write_bytes(pickled)
    finish_rank(results, out_dir, rank)


@pytest.fixture(scope="module")
def group_results():
    with tempfile.TemporaryDirectory() as tmp:
        results = spawn_with_deadline(group_worker, WORLD_SIZE, tmp, RUN_DEADLINE_S)
        yield results, (Path(tmp) / "pickled_loss.bin").read_bytes()


@pytest.mark.distributed
@pytest.mark.parametrize("label", ["group", "world"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_holding_a_process_group_pickle_by_name_and_deepcopy_share_it(
        group_results, name, label):
    ranks, _ = group_results
    shares = []
    for rank, results in enumerate(ranks):
        r = results[name, label]
        assert r["lazy"], "the group is looked up at the first forward, not at unpickling"
        if label == "world":
            assert r["pickled_name"] == WORLD and "process_group='WORLD'" in r["repr"]
        else:
            assert r["pickled_name"] not in (None, WORLD)
        assert r["restored_resolves"] and r["deepcopy_shares"]
        original, restored, deep = r["values"]
        assert torch.equal(restored, original) and torch.equal(deep, original), (
            f"rank {rank}: {name} gives another loss after pickling or deepcopy")
        shares.append(original)
    # The modules related over both ranks: the shares sum to the loss of the
    # whole batch in one process.
    make, inputs = LOSSES[name]
    whole = make(backend="reference")(*inputs)
    torch.testing.assert_close(sum(shares), whole, rtol=1e-6, atol=1e-7)


@pytest.mark.distributed
def test_a_rank_outside_the_group_holds_it_and_cannot_call_with_it(group_results):
    ranks, _ = group_results
    member, outside = ranks[0]["non_member"], ranks[1]["non_member"]
    assert isinstance(member[2], float)  # a group of one rank: this process alone
    assert outside[0] == outside[1] and "process_group='NON_GROUP_MEMBER')" in outside[0]
    assert outside[2].startswith("process_group: this rank (global rank 1) is not a member")
    for results in (member, outside):
        assert results[3].startswith("process_group: expected a torch.distributed ProcessGroup")
    # The marker names no group another process could look up (a member
    # loading a module saved on a rank outside its group must not be told
    # that it is outside).
    assert "pickled on a rank outside that group" in outside[4]


@pytest.mark.parametrize("bad", [True, 1, [0, 1], "WORLD"])
def test_modules_refuse_a_process_group_that_is_not_one(bad):
    for make in (relkd.CCKDLoss, lambda **kw: relkd.PrototypeBank(3, 4, **kw)):
        with pytest.raises(ValueError, match="process_group: expected a torch.distributed "
                                             "ProcessGroup"):
            make(process_group=bad)


@pytest.mark.distributed
def test_prototype_bank_holding_a_process_group_pickles_and_deepcopies(group_results):
    ranks, _ = group_results
    for results in ranks:
        assert results["bank_shares"]
        bank, twin, deep = results["bank"]
        assert torch.equal(twin, bank) and torch.equal(deep, bank)
    assert torch.equal(ranks[0]["bank"][0], ranks[1]["bank"][0])  # the global batch's bank


@pytest.mark.distributed
def test_unpickled_module_without_its_group_raises_naming_process_group(group_results):
    ranks, pickled = group_results
    for results in ranks:
        assert results["missing_group"] is not None
        assert results["missing_group"].startswith("process_group: ")
        assert "does not exist in this process" in results["missing_group"]
    loss = pickle.loads(pickled)  # unpickling itself needs no group
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match=r"^process_group: .*not initialised"):
        loss(FS, FT, Y)
    loss.process_group = None  # the documented way to run it on one process
    assert torch.isfinite(loss(FS, FT, Y))


def test_python_m_relkd_flags_an_invalid_tensor_core_switch():
    env = dict(os.environ, RELKD_TENSOR_CORES="yes")
    out = subprocess.run([sys.executable, "-m", "relkd"], capture_output=True, text=True,
                         check=True, cwd=ROOT, env=env).stdout
    if "CUDA kernels: compiled" not in out:
        pytest.skip("no CUDA kernels in this build: the switch is reported only where it acts")
    assert "RELKD_TENSOR_CORES='yes' is not 0, 1 or auto" in out
    assert "float32 inputs invalid" in out


# ------------------------------------------------------------------- version
def test_one_version_everywhere():
    out = subprocess.run([sys.executable, "-m", "relkd"], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    assert out.splitlines()[0] == f"relkd {relkd.__version__}"
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert config["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "relkd.__version__"}
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## {re.escape(relkd.__version__)}\b", changelog, re.M)
    try:
        installed = importlib.metadata.version("relkd")
    except importlib.metadata.PackageNotFoundError:
        return  # run from a source tree: no installed metadata to compare
    assert installed == relkd.__version__, (
        f"installed metadata says {installed}, relkd.__version__ {relkd.__version__}: "
        "reinstall (pip install --no-build-isolation -e .)")
