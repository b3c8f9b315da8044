"""``save_hyperparameters()`` called in a base class's ``__init__`` (docs/lightning_semantics_
decisions.md, DECISION 0.9-1).

Code written for 0.9 (a file that imports ``pytorch_lightning``, resolved to ray_lit by
``ray_lit.compat``) records what 0.9.0 recorded; other code keeps 2.x's answer.

Where the 0.9 expectations come from (pytorch-lightning 0.9.0, read from its wheel):
* ``core/lightning.py`` ``LightningModule.save_hyperparameters``, lines 1659-1678: ``frame =
  inspect.currentframe().f_back`` (the caller only), ``init_args = get_init_args(frame)``, then
  ``hp = init_args`` with ``_hparams_name = 'kwargs'``, or the named subset; ``_set_hparams``
  (lines 1680-1693) ``update``s the existing ``AttributeDict``, so a second call adds keys.
* ``utilities/parsing.py`` ``get_init_args``, lines 64-82: the parameters of ``__class__.__init__``
  (the class whose ``__init__`` is running in that frame), read from that frame's locals at call
  time; the ``**kwargs`` dict merged in; self, ``*args`` and ``**kwargs`` names dropped. The
  subclasses' frames are never read (``collect_init_args`` exists but 0.9.0 calls it nowhere).
The same modules were also run under real 0.9.0 (with import shims for Python 3.11 / numpy 2)
and gave exactly the dicts below.
"""

from __future__ import annotations

import importlib
import sys
import textwrap

import pytest
import torch

import ray_lit.compat
from ray_lit.core.hparams import hparams_for_checkpoint

MODELS = textwrap.dedent('''
    {import_line}
    import torch


    class Base(pl.LightningModule):
        def __init__(self, lr=0.1, **kwargs):
            super().__init__()
            self.save_hyperparameters()
            self.layer = torch.nn.Linear(2, 2)


    class Child(Base):
        def __init__(self, hidden=4, lr=0.5, activation="relu"):
            super().__init__(lr=lr)
            self.hidden = hidden


    class GrandChild(Child):
        def __init__(self, depth=3, **kwargs):
            super().__init__(**kwargs)


    class Forwarding(Base):
        def __init__(self, width=8, lr=0.2):
            super().__init__(lr=lr, width=width, note="kw")


    class Reassigns(pl.LightningModule):
        def __init__(self, scale=1.0, size=2):
            super().__init__()
            scale = scale * 10
            self.save_hyperparameters()


    class ReassignsChild(Reassigns):
        def __init__(self, tag="x", scale=3.0):
            super().__init__(scale=scale)


    class SavesToo(Base):
        def __init__(self, hidden=4, lr=0.5):
            super().__init__(lr=lr)
            self.save_hyperparameters()


    class Chooses(Base):
        def __init__(self, test_arg=1, test_arg2=2):
            super().__init__()
            self.save_hyperparameters("test_arg")
''')


def _load(tmp_path, name: str, import_line: str):
    (tmp_path / f"{name}.py").write_text(MODELS.format(import_line=import_line))
    sys.path.insert(0, str(tmp_path))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)


@pytest.fixture
def models_09(tmp_path):
    """The models as a 0.9 user's file: ``import pytorch_lightning as pl`` through ray_lit."""
    with ray_lit.compat.lightning_on_ray():
        yield _load(tmp_path, "hparams_models_09", "import pytorch_lightning as pl")


@pytest.fixture
def models_ray_lit(tmp_path):
    return _load(tmp_path, "hparams_models_ray_lit", "import ray_lit as pl")


# (constructor call, what 0.9.0 records): each value is derived in the module docstring's terms
CASES_09 = [
    # Base.__init__(self, lr, **kwargs) is the calling frame: lr=0.3 as passed up; the
    # subclass's hidden/activation live in another frame, which 0.9 never reads
    ("Child(hidden=8, lr=0.3)", {"lr": 0.3}),
    ("Child()", {"lr": 0.5}),
    ("GrandChild(depth=5, hidden=2)", {"lr": 0.5}),
    ("GrandChild(lr=0.7)", {"lr": 0.7}),
    # the base's **kwargs dict is merged (parsing.py line 80), so forwarded keywords count
    ("Forwarding(width=16)", {"lr": 0.2, "width": 16, "note": "kw"}),
    # locals read at call time: the base reassigned scale before the call
    ("ReassignsChild(tag='y', scale=2.0)", {"scale": 20.0, "size": 2}),
    # a second call in the subclass updates the dict: the base's keys first, then its own
    ("SavesToo(hidden=6, lr=0.4)", {"lr": 0.4, "hidden": 6}),
    # 0.9.0 tests/models/test_hparams.py::test_explicit_args_hparams: a subclass that names
    # only test_arg; the base saved its own lr (default 0.1), test_arg2 is nowhere
    ("Chooses(test_arg=14, test_arg2=90)", {"lr": 0.1, "test_arg": 14}),
]


@pytest.mark.parametrize(("call", "expected"), CASES_09, ids=[c for c, _ in CASES_09])
def test_code_written_for_09_records_what_09_recorded(models_09, call, expected):
    module = eval(call, vars(models_09))
    assert dict(module.hparams) == expected
    assert list(module.hparams) == list(expected)  # key order too
    assert module._hparams_name == "kwargs"


CASES_2X = [
    # 2.x (utilities/parsing.py collect_init_args over every __init__ frame of the instance,
    # outer frames updating inner ones): the subclasses' arguments are recorded too
    ("Child(hidden=8, lr=0.3)", {"lr": 0.3, "hidden": 8, "activation": "relu"}),
    ("GrandChild(depth=5, hidden=2)",
     {"lr": 0.5, "hidden": 2, "activation": "relu", "depth": 5}),
    ("Chooses(test_arg=14, test_arg2=90)", {"lr": 0.1, "test_arg": 14, "test_arg2": 90}),
]


@pytest.mark.parametrize(("call", "expected"), CASES_2X, ids=[c for c, _ in CASES_2X])
def test_other_code_keeps_the_2x_union(models_ray_lit, call, expected):
    module = eval(call, vars(models_ray_lit))
    assert dict(module.hparams) == expected


def test_a_09_reload_drops_the_unregistered_argument(models_09, tmp_path):
    """0.9.0 ``test_explicit_args_hparams``: ``load_from_checkpoint(path, test_arg2=123)`` passes
    test_arg2 to ``__init__`` but it never becomes a hyperparameter."""
    module = models_09.Chooses(test_arg=14, test_arg2=90)
    path = str(tmp_path / "chooses.ckpt")
    torch.save({"state_dict": module.state_dict(),
                "hyper_parameters": hparams_for_checkpoint(module),
                "hparams_name": module._hparams_name}, path)
    reloaded = models_09.Chooses.load_from_checkpoint(path, test_arg2=123)
    assert reloaded.hparams.test_arg == 14
    assert "test_arg2" not in reloaded.hparams
    assert dict(reloaded.hparams) == {"lr": 0.1, "test_arg": 14}


def test_from_import_counts_as_09_code(tmp_path):
    """``from pytorch_lightning import LightningModule`` marks the file as much as
    ``import pytorch_lightning as pl`` does."""
    line = "from pytorch_lightning import LightningModule\nclass pl:\n    LightningModule = " \
           "LightningModule"
    with ray_lit.compat.lightning_on_ray():
        models = _load(tmp_path, "hparams_models_from_import", line)
        assert dict(models.Child(hidden=8, lr=0.3).hparams) == {"lr": 0.3}
