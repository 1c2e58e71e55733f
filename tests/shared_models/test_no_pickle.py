"""No file fedsite reads can run code: every loader refuses a pickle that would.

Each durable file (server checkpoint, site-local state, personalised model, the
site's last global model, optimizer state) is replaced by a torch file whose
payload writes a sentinel file when unpickled. Every loader must refuse it, and
the sentinel must not exist. A control load with ``weights_only=False`` proves
the payload really runs. The initial model is not a file: it is built from the
seeded spec (``build_model(spec, seed)``), so there is no loader to feed.
A source scan keeps it that way: ``torch.load`` is called only in
``shared_models/durable.py`` (with ``weights_only=True``) and nothing imports
``pickle`` or loads numpy/YAML with pickling or arbitrary tags.
"""

import ast
import logging
from pathlib import Path

import pytest
import torch

from client.global_store import GlobalStoreError, global_path, load_global, save_global
from client.optim_state import OPTIMIZER_FILE, OptimizerStateStore
from client.site_state import PERSONAL_FILE, STATE_FILE, SiteStateError, SiteStateStore
from server.checkpoint import CheckpointError, CheckpointStore
from shared_models.durable import read_torch

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("server", "client", "shared_models", "simulations")


class Exploit:
    """Unpickling this writes ``path``: proof that a loader ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('ran')",))


def _plant(path: Path, sentinel: Path) -> Path:
    """A file shaped like fedsite's (format, tensors) whose tensors run code when unpickled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": 1, "round": 1, "tensors": Exploit(sentinel), "arrays": Exploit(sentinel)}, path)
    return path


def _load_checkpoint(root):
    _plant(root / "ckpt" / "round-0001.pt", root / "ran")
    CheckpointStore(root / "ckpt").latest(run_name="run", fingerprint="fp", policy="fedbn")


def _load_site_state(root, file_name=STATE_FILE):
    store = SiteStateStore(root / "state", "run", "site-a", file_name)
    _plant(store.path, root / "ran")
    store.load(fingerprint="fp", policy="fedbn", expected_keys={"w"})


def _load_global(root):
    _plant(global_path(root / "state", "run"), root / "ran")
    load_global(root / "state", "run")


# (loader, the error it must raise naming the file)
LOADERS = [
    ("server checkpoint", _load_checkpoint, CheckpointError, "round-0001.pt: unreadable checkpoint (UnpicklingError"),
    ("site-local state", _load_site_state, SiteStateError, f"{STATE_FILE}: unreadable site state (UnpicklingError"),
    ("personalised model", lambda r: _load_site_state(r, PERSONAL_FILE), SiteStateError, f"{PERSONAL_FILE}: unreadable site state"),
    ("last global model", _load_global, GlobalStoreError, "global_shared.pt: unreadable (UnpicklingError"),
]


@pytest.mark.parametrize("name,load,error,message", LOADERS, ids=[c[0] for c in LOADERS])
def test_each_loader_refuses_a_code_running_pickle(tmp_path, name, load, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(")):
        load(tmp_path)
    assert not (tmp_path / "ran").exists(), name


def test_writing_the_global_model_over_a_planted_file_replaces_it_unrun(tmp_path):
    """``save_global`` reads the stored file to keep the newest round: that read must not run it either."""
    from client.global_store import GlobalSnapshot

    path = _plant(global_path(tmp_path / "state", "run"), tmp_path / "ran")
    save_global(tmp_path / "state", GlobalSnapshot("run", 2, {}, "fedbn", {}, "fp", {"w": torch.ones(2)}))
    assert not (tmp_path / "ran").exists()
    assert load_global(tmp_path / "state", "run").round == 2 and path.exists()


def test_the_optimizer_state_is_ignored_with_a_line_naming_the_file(tmp_path, caplog):
    store = OptimizerStateStore(tmp_path / "state", "run", "site-a")
    _plant(store.path, tmp_path / "ran")
    with caplog.at_level(logging.WARNING):
        assert store.load(fingerprint="fp", optimizer="adam", before_round=5) is None
    assert f"{OPTIMIZER_FILE}: unreadable (UnpicklingError)" in caplog.text and "site site-a" in caplog.text
    assert not (tmp_path / "ran").exists()


def test_the_planted_payload_really_runs_without_weights_only(tmp_path):
    """Control: the same file loaded the unsafe way writes the sentinel (so the tests above test something)."""
    path = _plant(tmp_path / "evil.pt", tmp_path / "ran")
    with pytest.raises(Exception):
        read_torch(path)
    assert not (tmp_path / "ran").exists()
    torch.load(path, weights_only=False)
    assert (tmp_path / "ran").read_text() == "ran"


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name):
            yield node, f"{node.func.value.id}.{node.func.attr}", {k.arg: k.value for k in node.keywords}


def test_no_source_file_loads_with_pickle():
    offenders = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            rel, tree = str(path.relative_to(REPO)), ast.parse(path.read_text())
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                offenders += [f"{rel}: imports {n}" for n in names if n.split(".")[0] in {"pickle", "dill", "cloudpickle", "joblib", "marshal"}]
            for call, name, kwargs in _calls(tree):
                safe = isinstance(kwargs.get("weights_only"), ast.Constant) and kwargs["weights_only"].value is True
                if name == "torch.load" and (rel != "shared_models/durable.py" or not safe):
                    offenders.append(f"{rel}:{call.lineno}: torch.load outside durable.read_torch")
                pickles = isinstance(kwargs.get("allow_pickle"), ast.Constant) and kwargs["allow_pickle"].value is True
                if name in {"np.load", "numpy.load"} and pickles:
                    offenders.append(f"{rel}:{call.lineno}: np.load(allow_pickle=True)")
                if name in {"yaml.load", "yaml.unsafe_load", "yaml.full_load", "torch.jit.load"}:
                    offenders.append(f"{rel}:{call.lineno}: {name}")
    assert offenders == []
