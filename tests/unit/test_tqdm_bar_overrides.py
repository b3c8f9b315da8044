"""Issue 15: a subclass of Lightning's ``TQDMProgressBar`` customising the bar's internals
(``init_*_tqdm``, ``get_metrics``, the ``*_description`` properties) draws, under ray_lit, what
it draws under real Lightning 2.6: the same subclass runs on both and the texts its own tqdm
file received are compared in the parts the overrides control."""

from __future__ import annotations

import io
import re

import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm import tqdm

import ray_lit

L = pytest.importorskip("lightning.pytorch")  # the dev extra installs lightning 2.x
from lightning.pytorch import callbacks as lc  # noqa: E402

# {bar} fills what ncols leaves: equal lines mean the user's ncols was honoured too
TRAIN_FORMAT = "{desc}|{bar}|{n_fmt}/{total_fmt}|{postfix}"
EVAL_FORMAT = "{desc}|{n_fmt}/{total_fmt}"


class Constant(L.LightningModule):
    """Logs constants to the bar, so both frameworks show the same numbers."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.log("speed", 0.5, prog_bar=True)
        return F.mse_loss(self.layer(x).squeeze(-1), y)

    def validation_step(self, batch, batch_idx):
        self.log("score", 2.0, prog_bar=True)

    def test_step(self, batch, batch_idx):
        self.log("score", 2.0)

    def predict_step(self, batch, batch_idx):
        return self.layer(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader() -> DataLoader:
    x = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    return DataLoader(TensorDataset(x, x.sum(1)), batch_size=8)


class CustomBar(lc.TQDMProgressBar):
    """Lightning's documented customisations: own bars into its own file, other titles, a
    postfix without ``v_num`` and with an item of its own."""

    def __init__(self, stream: io.StringIO, **kwargs) -> None:
        super().__init__(**kwargs)
        self.stream = stream

    def init_train_tqdm(self):
        return tqdm(desc="ignored", file=self.stream, ncols=120, bar_format=TRAIN_FORMAT,
                    leave=True)

    def init_validation_tqdm(self):
        return tqdm(file=self.stream, ncols=120, bar_format=EVAL_FORMAT, leave=False)

    def init_sanity_tqdm(self):
        return tqdm(file=self.stream, ncols=120, bar_format=EVAL_FORMAT, leave=False)

    def init_test_tqdm(self):
        bar = super().init_test_tqdm()  # the base's bar, in its own file, reformatted
        bar.bar_format = EVAL_FORMAT
        return bar

    def init_predict_tqdm(self):
        return tqdm(file=self.stream, ncols=120, bar_format=EVAL_FORMAT)

    @property
    def validation_description(self) -> str:
        return "Checking"

    @property
    def sanity_check_description(self) -> str:
        return "Warming"

    @property
    def test_description(self) -> str:
        return "Exam"

    @property
    def predict_description(self) -> str:
        return "Guessing"

    def get_metrics(self, trainer, pl_module):
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        return {"custom": "yes", **{k: items[k] for k in ("speed", "score") if k in items}}


def _segments(text: str) -> list[str]:
    """What tqdm drew, one redraw each (tqdm separates them with carriage returns).

    Lightning titles an evaluation bar per dataloader ("Checking DataLoader 0"); ray_lit's
    bar spans a stage's loaders, so that suffix is not compared."""
    parts = re.split(r"[\r\n]", text.replace("\x1b[A", ""))
    return [re.sub(r" DataLoader \d+", "", p.strip()) for p in parts if p.strip()]


def _finished(text: str, title: str) -> set[str]:
    """The redraws of bars titled ``title`` that reached their total ("4/4")."""
    found = set()
    for seg in _segments(text):
        m = re.match(rf"{title}[^|]*\|(?:[^|]*\|)?(\d+)/(\d+)", seg)
        if m and m.group(1) == m.group(2):
            found.add(seg)
    return found


def _run_both(fit_kwargs):
    ref_stream, ours_stream = io.StringIO(), io.StringIO()
    common = dict(max_epochs=2, enable_model_summary=False, logger=False,
                  enable_checkpointing=False, num_sanity_val_steps=1)
    torch.manual_seed(0)
    ref = L.Trainer(callbacks=[CustomBar(ref_stream)], accelerator="cpu", devices=1, **common)
    ref.fit(Constant(), _loader(), _loader())
    torch.manual_seed(0)
    ours = ray_lit.Trainer(callbacks=[CustomBar(ours_stream)], **common, **fit_kwargs)
    ours.fit(Constant(), _loader(), _loader())
    return ref, ours, ref_stream, ours_stream


def test_custom_bars_titles_and_metrics_print_what_lightning_prints():
    _, _, ref, ours = _run_both({})
    _assert_drew_what_lightning_drew(ref.getvalue(), ours.getvalue())


def _assert_drew_what_lightning_drew(ref_text: str, ours_text: str) -> None:
    # the user's train bar (its format, get_metrics's postfix, before and after validation)
    expected = {"Epoch 0: |4/4|, custom=yes, speed=0.5",
                "Epoch 0: |4/4|, custom=yes, speed=0.5, score=2",
                "Epoch 1: |4/4|, custom=yes, speed=0.5, score=2"}
    theirs = _finished(ref_text, "Epoch")
    assert {re.sub(r"\|#+\|", "|", line) for line in theirs} == expected  # real Lightning's
    assert _finished(ours_text, "Epoch") == theirs  # the same lines, bar width included
    assert {len(line) for line in theirs} == {120}  # the bar's ncols
    assert "v_num" not in ours_text
    # the validation and sanity bars: the user's format, the overridden descriptions
    for title in ("Checking", "Warming"):
        assert _finished(ours_text, title) == _finished(ref_text, title) != set()


def test_a_custom_test_bar_built_on_the_base_bar(capsys):
    common = dict(enable_model_summary=False, logger=False)
    drawn = []
    for trainer in (L.Trainer(callbacks=[CustomBar(io.StringIO())], accelerator="cpu",
                              devices=1, **common),
                    ray_lit.Trainer(callbacks=[CustomBar(io.StringIO())], **common)):
        capsys.readouterr()
        trainer.test(Constant(), _loader(), verbose=False)
        out, err = capsys.readouterr()  # the base bar's file: Lightning's stdout, our stderr
        drawn.append(_finished(out + err, "Exam"))
    assert drawn[0] == drawn[1] == {"Exam: |4/4"}


def test_a_custom_predict_bar():
    drawn = []
    for trainer in (L.Trainer(accelerator="cpu", devices=1, logger=False,
                              callbacks=[CustomBar(io.StringIO())]),
                    ray_lit.Trainer(logger=False, callbacks=[CustomBar(io.StringIO())])):
        trainer.predict(Constant(), _loader())
        drawn.append(_finished(trainer.progress_bar_callback.stream.getvalue(), "Guessing"))
    assert drawn[0] == drawn[1] == {"Guessing: |4/4"}


def test_get_metrics_gets_the_trainer_and_its_module():
    seen = []

    class Spy(lc.TQDMProgressBar):
        def get_metrics(self, trainer, pl_module):
            seen.append((trainer, pl_module))
            return super().get_metrics(trainer, pl_module)

    stream = io.StringIO()

    class Drawn(Spy):
        def init_train_tqdm(self):
            return tqdm(file=stream, bar_format=TRAIN_FORMAT)

    model = Constant()
    trainer = ray_lit.Trainer(max_epochs=1, callbacks=[Drawn()], enable_model_summary=False,
                              logger=False, enable_checkpointing=False)
    trainer.fit(model, _loader())
    assert seen and all(t is trainer for t, _ in seen)
    assert "speed=0.5" in stream.getvalue()  # the base items: the prog_bar metric


def test_the_base_bar_in_plain_mode_uses_the_descriptions(capsys, monkeypatch):
    from ray_lit.callbacks import progress

    monkeypatch.setattr(progress, "_display_mode", lambda: "plain")

    class Titles(lc.TQDMProgressBar):
        @property
        def test_description(self) -> str:
            return "Exam"

        def get_metrics(self, trainer, pl_module):
            return {"only": 1}

    bar = ray_lit.Trainer(callbacks=[Titles()]).progress_bar_callback
    bar.on_run_start("test")
    bar.start_stage("test", 2, 0, None)
    bar.update("test", 2, {})
    bar.end_stage("test")
    bar.on_run_start("fit")
    bar.start_stage("train", 2, 0, 1)
    bar.update("train", 2, {"loss": 0.5})
    bar.end_stage("train")
    out = capsys.readouterr().out
    assert out.startswith("Exam: 2/2") and "only=1" in out and "loss" not in out


def test_overriding_the_loop_hooks_is_refused_naming_them_and_the_fix():
    from ray_lit.errors import MisconfigurationException

    class PostfixInHook(lc.TQDMProgressBar):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            self.train_progress_bar.set_postfix({"batch": batch_idx})

    with pytest.raises(MisconfigurationException,
                       match=r"PostfixInHook .*overrides \['on_train_batch_end'\].*get_metrics"):
        ray_lit.Trainer(callbacks=[PostfixInHook()])
