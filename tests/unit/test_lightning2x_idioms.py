"""Issue 15: Lightning 2.x idioms run unchanged in process (``Trainer(num_workers=0)``).

Manual optimisation (two optimizers, ``toggle_optimizer``, ``clip_gradients``,
``self.optimizers()`` / ``self.lr_schedulers()``), the 2.x hook signatures of the module and
of callbacks, ``trainer.estimated_stepping_batches`` and the other 2.x trainer attributes,
``self.all_gather``, monitoring a training-epoch metric, and ``deterministic=True``. The same
manual GAN on 2 Ray workers: ``tests/ray/test_manual_optimization_workers.py``.
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from doubles import DeterministicModel, constant_loader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ray_lit as pl
from ray_lit.callbacks import EarlyStopping, ModelCheckpoint


def _points(n: int = 32, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 2, generator=g) * 0.5 + torch.tensor([2.0, -1.0]))
    return DataLoader(data, batch_size=8)


# --- 1. manual optimisation --------------------------------------------------------------------


class ManualGAN(pl.LightningModule):
    """The 2.x GAN idiom: two optimizers stepped by hand, each with its network toggled."""

    def __init__(self, clip: float | None = None, algorithm: str = "norm") -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        self.discriminator = nn.Sequential(nn.Linear(2, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))
        self.clip, self.algorithm = clip, algorithm
        self.g_losses: list[float] = []
        self.d_losses: list[float] = []
        self.toggled: list[tuple[bool, bool]] = []  # (generator, discriminator) requires_grad
        self.after_untoggle: list[bool] = []
        self.kinds: tuple[Any, Any] | None = None
        self.clipped: list[float] = []

    def training_step(self, batch, batch_idx):
        (real,) = batch
        opts, scheds = self.optimizers(), self.lr_schedulers()
        self.kinds = (opts, scheds)
        g_opt, d_opt = opts
        bce = nn.functional.binary_cross_entropy_with_logits
        fake = None
        self.toggle_optimizer(g_opt)
        self.toggled.append((self.generator[0].weight.requires_grad,
                             self.discriminator[0].weight.requires_grad))
        fake = self.generator(torch.randn(len(real), 4))
        g_loss = bce(self.discriminator(fake), torch.ones(len(real), 1))
        g_opt.zero_grad()
        self.manual_backward(g_loss)
        if self.clip is not None:
            self.clip_gradients(g_opt, gradient_clip_val=self.clip,
                                gradient_clip_algorithm=self.algorithm)
            grads = [p.grad for p in self.generator.parameters()]
            if self.algorithm == "norm":
                self.clipped.append(float(torch.norm(torch.stack([g.norm() for g in grads]))))
            else:
                self.clipped.append(max(float(g.abs().max()) for g in grads))
        g_opt.step()
        self.untoggle_optimizer(g_opt)
        self.after_untoggle.append(self.discriminator[0].weight.requires_grad)

        with self.toggled_optimizer(d_opt):
            d_loss = (bce(self.discriminator(real), torch.ones(len(real), 1))
                      + bce(self.discriminator(fake.detach()), torch.zeros(len(real), 1))) / 2
            d_opt.zero_grad()
            self.manual_backward(d_loss)
            d_opt.step()
        for sched in scheds:
            sched.step()
        self.g_losses.append(float(g_loss))
        self.d_losses.append(float(d_loss))
        self.log_dict({"g_loss": g_loss, "d_loss": d_loss})

    def configure_optimizers(self):
        g_opt = torch.optim.Adam(self.generator.parameters(), lr=0.01)
        d_opt = torch.optim.Adam(self.discriminator.parameters(), lr=0.01)
        return [g_opt, d_opt], [torch.optim.lr_scheduler.StepLR(g_opt, 1, gamma=0.5),
                                torch.optim.lr_scheduler.StepLR(d_opt, 1, gamma=0.9)]


def test_manual_gan_two_optimizers_in_process(make_trainer):
    model = ManualGAN()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = make_trainer(max_epochs=2)
    trainer.fit(model, _points())
    assert len(model.g_losses) == len(model.d_losses) == 8
    assert model.g_losses[0] != model.g_losses[-1] and model.d_losses[0] != model.d_losses[-1]
    assert trainer.global_step == 16  # one per optimizer.step()
    # several optimizers and schedulers: lists, in configure_optimizers' order
    opts, scheds = model.kinds
    assert isinstance(opts, list) and opts == trainer.optimizers
    assert [type(s).__name__ for s in scheds] == ["StepLR", "StepLR"]
    assert opts[0].param_groups[0]["lr"] == pytest.approx(0.01 * 0.5 ** 8)
    # toggle: only the generator trains in its step; untoggle gives the flags back
    assert set(model.toggled) == {(True, False)}
    assert all(model.after_untoggle)
    assert all(p.requires_grad for p in model.parameters())
    for prefix in ("generator", "discriminator"):
        assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items()
                   if k.startswith(prefix))


def _manual_gan_on_rank(rank: int, port: int, prepare: bool, out: dict) -> None:
    """One DDP rank of a manual GAN step loop, driven through ``DDPStrategy`` as the loop
    drives it: the step through ``call_step`` (DDP's forward), each backward after
    ``pre_backward`` (what ``manual_backward`` does)."""
    import torch.distributed as dist

    from ray_lit.strategies import DDPStrategy

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    try:
        torch.manual_seed(0)
        module = ManualGAN()
        module.trainer = None
        strategy = DDPStrategy()
        strategy.connect(global_rank=rank, world_size=2, local_rank=rank, node_rank=0,
                         device=torch.device("cpu"))
        strategy.setup_module(module)
        g_opt = torch.optim.SGD(module.generator.parameters(), lr=0.1)
        d_opt = torch.optim.SGD(module.discriminator.parameters(), lr=0.1)

        def backward(loss: torch.Tensor) -> None:
            if prepare:
                strategy.pre_backward(loss)
            loss.backward()

        def step(real: torch.Tensor) -> torch.Tensor:
            bce = nn.functional.binary_cross_entropy_with_logits
            module.discriminator.requires_grad_(False)
            fake = module.generator(torch.randn(len(real), 4))
            g_opt.zero_grad()
            g_loss = bce(module.discriminator(fake), torch.ones(len(real), 1))
            backward(g_loss)
            g_opt.step()
            module.discriminator.requires_grad_(True)
            module.generator.requires_grad_(False)
            d_opt.zero_grad()
            backward(bce(module.discriminator(fake.detach()), torch.zeros(len(real), 1)))
            d_opt.step()
            module.generator.requires_grad_(True)
            return g_loss.detach()

        module.__dict__["gan_step"] = step
        try:
            for batch in range(4):
                strategy.call_step("gan_step", torch.randn(8, 2) + rank + batch)
            flat = torch.cat([p.detach().flatten() for p in module.parameters()])
            gathered = [torch.zeros_like(flat) for _ in range(2)]
            dist.all_gather(gathered, flat)
            out[rank] = ("ok", bool(torch.allclose(gathered[0], gathered[1])))
        except RuntimeError as err:
            out[rank] = ("error", str(err)[:200])
    finally:
        # leave together: a rank tearing gloo down while its peer is still in the last
        # collective can abort the peer at exit ("terminate called without an active
        # exception"); bounded, so a rank that failed cannot keep the other waiting
        try:
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=30))
        except RuntimeError:
            pass
        dist.destroy_process_group()


def test_ddp_manual_backward_inside_the_step_syncs_gradients():
    """Two gloo ranks with different data run a manual GAN step through DDP's forward, each
    backward after ``DDPStrategy.pre_backward``: their weights stay identical. (Without it
    the real loop fails at the second batch: ``tests/ray/test_manual_optimization_workers``
    shows that end to end.)"""
    import torch.multiprocessing as mp

    from ray_lit.worker.process_group import find_free_port

    with mp.Manager() as manager:
        out = manager.dict()
        # spawn, not fork: a fork after this process ran torch ops can deadlock in gloo
        mp.start_processes(_manual_gan_on_rank, args=(find_free_port(), True, out), nprocs=2,
                           start_method="spawn")
        results = dict(out)
    assert results == {0: ("ok", True), 1: ("ok", True)}


@pytest.mark.parametrize(("algorithm", "limit"), [("norm", 0.01), ("value", 0.001)])
def test_manual_clip_gradients(make_trainer, algorithm, limit):
    model = ManualGAN(clip=limit, algorithm=algorithm)
    make_trainer(max_epochs=1).fit(model, _points())
    assert model.clipped and all(v == pytest.approx(limit, rel=1e-4) for v in model.clipped)


class OneOptimizerManual(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.layer = nn.Linear(2, 1)
        self.seen: list[tuple[Any, Any]] = []
        self.frozen = nn.Linear(2, 1)
        self.frozen.requires_grad_(False)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        opt, sched = self.optimizers(), self.lr_schedulers()
        self.seen.append((opt, sched))
        self.toggle_optimizer(opt)
        loss = self.layer(x).pow(2).mean() + self.frozen(x).sum() * 0
        opt.zero_grad()
        self.manual_backward(loss, opt)  # 0.9 passed the optimizer; it is dropped
        opt.step()
        sched.step()
        self.untoggle_optimizer(opt)

    def configure_optimizers(self):
        opt = torch.optim.SGD(list(self.layer.parameters()) + list(self.frozen.parameters()),
                              lr=0.1)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1)}


def test_single_optimizer_and_scheduler_come_unwrapped(make_trainer):
    model = OneOptimizerManual()
    trainer = make_trainer(max_epochs=1)
    trainer.fit(model, _points())
    opt, sched = model.seen[0]
    assert opt is trainer.optimizers[0]
    assert sched is trainer.lr_scheduler_configs[0].scheduler
    # a parameter frozen before toggle_optimizer stays frozen after untoggle
    assert not model.frozen.weight.requires_grad and model.layer.weight.requires_grad
    assert trainer.global_step == 4


class BackwardHooks(pl.Callback):
    def __init__(self) -> None:
        self.events: list[str] = []

    def on_before_backward(self, trainer, pl_module, loss):
        self.events.append(f"cb_before:{loss.requires_grad}")

    def on_after_backward(self, trainer, pl_module):
        self.events.append("cb_after")


def test_manual_backward_runs_backward_hooks(make_trainer):
    cb = BackwardHooks()
    make_trainer(max_epochs=1, callbacks=[cb]).fit(OneOptimizerManual(), _points(16))
    assert cb.events == ["cb_before:True", "cb_after"] * 2


class ClipHook(DeterministicModel):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, Any, Any]] = []
        self.norms: list[float] = []

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                    gradient_clip_algorithm=None):
        self.calls.append((optimizer, gradient_clip_val, gradient_clip_algorithm))
        self.clip_gradients(optimizer, gradient_clip_val=0.5, gradient_clip_algorithm="norm")

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        self.norms.append(float(self.l1.weight.grad.norm()))
        optimizer.step(closure=optimizer_closure)


def test_configure_gradient_clipping_decides_the_clipping(make_trainer):
    model = ClipHook()
    trainer = make_trainer(limit_train_batches=2, gradient_clip_val=3.0,
                           gradient_clip_algorithm="value")
    trainer.fit(model)
    assert [(o is trainer.optimizers[0], v, a) for o, v, a in model.calls] == \
        [(True, 3.0, "value")] * 2
    assert model.norms == [pytest.approx(0.5)] * 2  # the hook's clipping, not the Trainer's


# --- 2. the 2.x hook signatures ------------------------------------------------------------------

# (hook, owner, 2.x function, what the recorded arguments must satisfy). Each function takes
# exactly the 2.x positional parameters; a wrong argument count raises TypeError.
Check = Callable[[tuple], bool]


def _opt(x: Any) -> bool:
    return isinstance(x, torch.optim.Optimizer)


def _t(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def _rec(self: Any, name: str, *args: Any) -> None:
    owner = self if isinstance(self, pl.LightningModule) else args[1]
    owner.__dict__.setdefault("_hook_calls", []).append((name, args))


MODULE_HOOKS: list[tuple[str, Callable, Check]] = [
    ("on_fit_start", lambda self: _rec(self, "on_fit_start"), lambda a: a == ()),
    ("on_train_start", lambda self: _rec(self, "on_train_start"), lambda a: a == ()),
    ("on_train_epoch_start", lambda self: _rec(self, "on_train_epoch_start"), lambda a: a == ()),
    ("on_train_epoch_end", lambda self: _rec(self, "on_train_epoch_end"), lambda a: a == ()),
    ("on_train_batch_start", lambda self, batch, batch_idx: _rec(
        self, "on_train_batch_start", batch, batch_idx), lambda a: a[1] in (0, 1)),
    ("on_train_batch_end", lambda self, outputs, batch, batch_idx: _rec(
        self, "on_train_batch_end", outputs, batch, batch_idx),
     lambda a: _t(a[0]["loss"]) and a[2] in (0, 1)),
    ("on_validation_batch_start", lambda self, batch, batch_idx, dataloader_idx=0: _rec(
        self, "on_validation_batch_start", batch, batch_idx, dataloader_idx),
     lambda a: a[2] == 0),
    ("on_validation_batch_end", lambda self, outputs, batch, batch_idx, dataloader_idx=0: _rec(
        self, "on_validation_batch_end", outputs, batch, batch_idx, dataloader_idx),
     lambda a: a[3] == 0),
    ("on_validation_epoch_end", lambda self: _rec(self, "on_validation_epoch_end"),
     lambda a: a == ()),
    ("on_before_backward", lambda self, loss: _rec(self, "on_before_backward", loss),
     lambda a: _t(a[0])),
    ("on_after_backward", lambda self: _rec(self, "on_after_backward"), lambda a: a == ()),
    ("on_before_optimizer_step", lambda self, optimizer: _rec(
        self, "on_before_optimizer_step", optimizer), lambda a: _opt(a[0])),
    ("on_before_zero_grad", lambda self, optimizer: _rec(self, "on_before_zero_grad", optimizer),
     lambda a: _opt(a[0])),
    ("optimizer_zero_grad", lambda self, epoch, batch_idx, optimizer: (
        _rec(self, "optimizer_zero_grad", epoch, batch_idx, optimizer), optimizer.zero_grad()),
     lambda a: a[0] == 0 and _opt(a[2])),
    ("optimizer_step", lambda self, epoch, batch_idx, optimizer, optimizer_closure=None: (
        _rec(self, "optimizer_step", epoch, batch_idx, optimizer, optimizer_closure),
        optimizer.step(closure=optimizer_closure)),
     lambda a: _opt(a[2]) and callable(a[3])),
    ("backward", lambda self, loss: (_rec(self, "backward", loss), loss.backward()),
     lambda a: _t(a[0])),
    ("configure_gradient_clipping",
     lambda self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None: _rec(
         self, "configure_gradient_clipping", optimizer, gradient_clip_val,
         gradient_clip_algorithm), lambda a: _opt(a[0]) and a[2] == "norm"),
    ("on_save_checkpoint", lambda self, checkpoint: _rec(self, "on_save_checkpoint", checkpoint),
     lambda a: "state_dict" in a[0]),
    ("on_load_checkpoint", lambda self, checkpoint: _rec(self, "on_load_checkpoint", checkpoint),
     lambda a: "state_dict" in a[0]),
    ("setup", lambda self, stage: _rec(self, "setup", stage), lambda a: a[0] == "fit"),
    ("teardown", lambda self, stage: _rec(self, "teardown", stage), lambda a: a[0] == "fit"),
    ("on_before_batch_transfer", lambda self, batch, dataloader_idx: (
        _rec(self, "on_before_batch_transfer", batch, dataloader_idx), batch)[1],
     lambda a: a[1] == 0),
    ("on_after_batch_transfer", lambda self, batch, dataloader_idx: (
        _rec(self, "on_after_batch_transfer", batch, dataloader_idx), batch)[1],
     lambda a: a[1] == 0),
    ("on_before_optimizer_setup", lambda self: _rec(self, "on_before_optimizer_setup"),
     lambda a: a == ()),
    ("lr_scheduler_step", lambda self, scheduler, metric: (
        _rec(self, "lr_scheduler_step", scheduler, metric), scheduler.step()),
     lambda a: hasattr(a[0], "step") and a[1] is None),
    ("on_validation_model_zero_grad", lambda self: _rec(self, "on_validation_model_zero_grad"),
     lambda a: a == ()),
    ("on_validation_model_eval", lambda self: (_rec(self, "on_validation_model_eval"),
                                               self.eval()), lambda a: a == ()),
    ("on_validation_model_train", lambda self: (_rec(self, "on_validation_model_train"),
                                                self.train()), lambda a: a == ()),
    ("on_test_model_eval", lambda self: (_rec(self, "on_test_model_eval"), self.eval()),
     lambda a: a == ()),
    ("on_test_model_train", lambda self: (_rec(self, "on_test_model_train"), self.train()),
     lambda a: a == ()),
    ("transfer_batch_to_device", lambda self, batch, device, dataloader_idx: (
        _rec(self, "transfer_batch_to_device", batch, device, dataloader_idx), batch)[1],
     lambda a: isinstance(a[1], torch.device) and a[2] == 0),
]

CALLBACK_HOOKS: list[tuple[str, Callable, Check]] = [
    ("setup", lambda self, trainer, pl_module, stage: _rec(self, "setup", trainer, pl_module,
                                                          stage), lambda a: a[2] == "fit"),
    ("teardown", lambda self, trainer, pl_module, stage: _rec(
        self, "teardown", trainer, pl_module, stage), lambda a: a[2] == "fit"),
    ("on_sanity_check_start", lambda self, trainer, pl_module: _rec(
        self, "on_sanity_check_start", trainer, pl_module), lambda a: len(a) == 2),
    ("on_train_batch_start", lambda self, trainer, pl_module, batch, batch_idx: _rec(
        self, "on_train_batch_start", trainer, pl_module, batch, batch_idx),
     lambda a: a[3] in (0, 1)),
    ("on_train_batch_end", lambda self, trainer, pl_module, outputs, batch, batch_idx: _rec(
        self, "on_train_batch_end", trainer, pl_module, outputs, batch, batch_idx),
     lambda a: _t(a[2]["loss"]) and a[4] in (0, 1)),
    ("on_validation_batch_end",
     lambda self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0: _rec(
         self, "on_validation_batch_end", trainer, pl_module, outputs, batch, batch_idx,
         dataloader_idx), lambda a: a[5] == 0),
    ("on_train_epoch_end", lambda self, trainer, pl_module: _rec(
        self, "on_train_epoch_end", trainer, pl_module), lambda a: len(a) == 2),
    ("on_before_backward", lambda self, trainer, pl_module, loss: _rec(
        self, "on_before_backward", trainer, pl_module, loss), lambda a: _t(a[2])),
    ("on_after_backward", lambda self, trainer, pl_module: _rec(
        self, "on_after_backward", trainer, pl_module), lambda a: len(a) == 2),
    ("on_before_optimizer_step", lambda self, trainer, pl_module, optimizer: _rec(
        self, "on_before_optimizer_step", trainer, pl_module, optimizer), lambda a: _opt(a[2])),
    ("on_before_zero_grad", lambda self, trainer, pl_module, optimizer: _rec(
        self, "on_before_zero_grad", trainer, pl_module, optimizer), lambda a: _opt(a[2])),
    ("on_save_checkpoint", lambda self, trainer, pl_module, checkpoint: _rec(
        self, "on_save_checkpoint", trainer, pl_module, checkpoint),
     lambda a: "state_dict" in a[2]),
    ("on_load_checkpoint", lambda self, trainer, pl_module, checkpoint: _rec(
        self, "on_load_checkpoint", trainer, pl_module, checkpoint),
     lambda a: "state_dict" in a[2]),
    ("on_before_optimizer_setup", lambda self, trainer, pl_module: _rec(
        self, "on_before_optimizer_setup", trainer, pl_module), lambda a: len(a) == 2),
    ("on_exception", lambda self, trainer, pl_module, exception: _rec(
        self, "on_exception", trainer, pl_module, exception),
     lambda a: isinstance(a[2], ValueError)),
]


class Hooked(DeterministicModel):
    fail = False

    def training_step(self, batch, batch_idx):
        if self.fail:
            raise ValueError("boom")
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        return self.step(batch)

    def test_step(self, batch, batch_idx):
        return self.step(batch)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.0)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1)}


def _fit_with(tmp_path, module: Hooked, callbacks: list, hook: str) -> None:
    options = dict(max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                   num_sanity_val_steps=1, enable_progress_bar=False,
                   enable_model_summary=False, logger=False, default_root_dir=str(tmp_path),
                   callbacks=callbacks, enable_checkpointing=False)
    if hook == "on_exception":
        module.fail = True
        with pytest.raises(ValueError, match="boom"):
            pl.Trainer(**options).fit(module)
        return
    trainer = pl.Trainer(**options)
    trainer.fit(module)
    if "_test_" in hook:
        trainer.test(module, verbose=False)
    if hook in ("on_save_checkpoint", "on_load_checkpoint"):
        path = os.path.join(str(tmp_path), "x.ckpt")
        trainer.save_checkpoint(path)
        pl.Trainer(**{**options, "max_epochs": 2}).fit(module, ckpt_path=path)


@pytest.mark.parametrize(("hook", "fn", "check"), MODULE_HOOKS, ids=[h[0] for h in MODULE_HOOKS])
def test_module_hook_with_its_2x_signature(tmp_path, hook, fn, check):
    module = type("M", (Hooked,), {hook: fn})()
    _fit_with(tmp_path, module, [], hook)
    calls = [args for name, args in module.__dict__.get("_hook_calls", []) if name == hook]
    assert calls, f"{hook} was not called"
    assert all(check(args) for args in calls), calls


@pytest.mark.parametrize(("hook", "fn", "check"), CALLBACK_HOOKS,
                         ids=[h[0] for h in CALLBACK_HOOKS])
def test_callback_hook_with_its_2x_signature(tmp_path, hook, fn, check):
    callback = type("C", (pl.Callback,), {hook: fn})()
    module = Hooked()
    _fit_with(tmp_path, module, [callback], hook)
    calls = [args for name, args in module.__dict__.get("_hook_calls", []) if name == hook]
    assert calls, f"{hook} was not called"
    assert all(args[0] is not None and args[1] is module for args in calls)
    assert all(check(args) for args in calls), calls


class OldStyleHooks(DeterministicModel):
    """1.x / 0.9 spellings still get what they name."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple] = []

    def on_before_optimizer_step(self, optimizer, optimizer_idx):
        self.seen.append(("step", _opt(optimizer), optimizer_idx))

    def backward(self, loss, optimizer, optimizer_idx):
        self.seen.append(("backward", _opt(optimizer), optimizer_idx))
        loss.backward()


class OldStyleCallback(pl.Callback):
    def __init__(self) -> None:
        self.seen: list[Any] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer, optimizer_idx):
        self.seen.append(optimizer_idx)

    def on_save_checkpoint(self, trainer, pl_module):  # 0.9: returns its state
        return {"mine": 7}

    def on_load_checkpoint(self, checkpointed_state):  # 0.9: gets that state back
        self.seen.append(checkpointed_state)


def test_older_hook_signatures_still_work(make_trainer, tmp_path):
    model, cb = OldStyleHooks(), OldStyleCallback()
    trainer = make_trainer(limit_train_batches=2, callbacks=[cb])
    trainer.fit(model)
    assert model.seen == [("backward", True, 0), ("step", True, 0)] * 2
    assert cb.seen == [0, 0]
    path = str(tmp_path / "old.ckpt")
    trainer.save_checkpoint(path)
    make_trainer(max_epochs=2, limit_train_batches=2, callbacks=[cb]).fit(model, ckpt_path=path)
    assert {"mine": 7} in cb.seen


def test_validation_model_eval_override_keeps_dropout_on(make_trainer):
    """2.x: an overridden ``on_validation_model_eval`` replaces the loop's ``.eval()``."""

    class MCDropout(DeterministicModel):
        def __init__(self) -> None:
            super().__init__()
            self.modes: list[bool] = []

        def validation_step(self, batch, batch_idx):
            self.modes.append(self.training)

        def on_validation_model_eval(self):
            self.train()

    model = MCDropout()
    make_trainer(limit_train_batches=1, limit_val_batches=2, num_sanity_val_steps=0).fit(model)
    assert model.modes == [True, True]


def test_on_before_optimizer_step_sees_unclipped_gradients(make_trainer):
    """2.x order: the hook, then clipping, then the step."""

    class Seen(DeterministicModel):
        def __init__(self) -> None:
            super().__init__()
            self.hook: list[float] = []
            self.step_norms: list[float] = []

        def on_before_optimizer_step(self, optimizer):
            self.hook.append(float(self.l1.weight.grad.norm()))

        def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
            self.step_norms.append(float(self.l1.weight.grad.norm()))
            optimizer.step(closure=optimizer_closure)

    model = Seen()
    make_trainer(limit_train_batches=1, gradient_clip_val=1.0).fit(model)
    assert model.hook == [pytest.approx(6.0)] and model.step_norms == [pytest.approx(1.0)]


# --- 3. trainer attributes of 2.x ----------------------------------------------------------------


class StepsProbe(DeterministicModel):
    def __init__(self) -> None:
        super().__init__()
        self.estimated: Any = None
        self.lrs: list[float] = []

    def configure_optimizers(self):
        self.estimated = self.trainer.estimated_stepping_batches
        opt = torch.optim.SGD(self.parameters(), lr=0.1)
        total = self.estimated if math.isfinite(self.estimated) else 1
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=int(total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_batch_start(self, batch, batch_idx):
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize(("options", "expected"), [
    (dict(max_epochs=3), 12),  # 4 batches of 3 per epoch
    (dict(max_epochs=3, limit_train_batches=3), 9),
    (dict(max_epochs=3, accumulate_grad_batches=3), 6),  # ceil(4 / 3) per epoch
    (dict(max_epochs=3, max_steps=5), 5),
    (dict(max_epochs=2, limit_train_batches=0.5, accumulate_grad_batches=2), 2),
    (dict(max_epochs=None, max_steps=7), 7),  # max_steps alone bounds the run
    (dict(max_epochs=2, accumulate_grad_batches={0: 1, 1: 4}), 5),  # 0.9 schedule: 4 + 1
])
def test_estimated_stepping_batches_in_configure_optimizers(make_trainer, options, expected):
    model = StepsProbe()
    trainer = make_trainer(**options)
    trainer.fit(model, constant_loader(12, 3))
    assert model.estimated == expected
    assert trainer.estimated_stepping_batches == expected
    # OneCycleLR sized by it ran to the end without "stepped too many times"
    assert trainer.global_step == expected


class AttributeProbe(DeterministicModel):
    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, Any] = {}

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if batch_idx == 0:
            trainer = self.trainer
            strategy = trainer.strategy
            strategy.barrier()
            self.seen.update(
                devices=trainer.num_devices, nodes=trainer.num_nodes, fn=trainer.state.fn,
                root=strategy.root_device, broadcast=strategy.broadcast({"a": 1}),
                gathered=self.all_gather(torch.tensor([1.0, 2.0])),
                gathered_dict=self.all_gather({"x": torch.tensor(3.0), "n": 4}),
                graded=self.all_gather(self.l1.weight.sum(), sync_grads=True))
        return loss


def test_strategy_and_trainer_attributes_from_a_module(make_trainer):
    from ray_lit.loop.trainer_state import TrainerFn

    model = AttributeProbe()
    make_trainer(limit_train_batches=1).fit(model)
    seen = model.seen
    assert seen["devices"] == 1 and seen["nodes"] == 1
    assert seen["fn"] == TrainerFn.FITTING == "fit"
    assert seen["root"] == torch.device("cpu")
    assert seen["broadcast"] == {"a": 1}
    # one process: the data unchanged (no new dim), as 2.x on one device
    assert torch.equal(seen["gathered"], torch.tensor([1.0, 2.0]))
    assert torch.equal(seen["gathered_dict"]["x"], torch.tensor(3.0))
    assert torch.equal(seen["gathered_dict"]["n"], torch.tensor(4))
    assert seen["graded"].requires_grad


def test_rank_zero_helpers_are_importable():
    from ray_lit.compat.utilities import rank_zero_info, rank_zero_only

    calls = []
    rank_zero_only(lambda: calls.append(1))()
    rank_zero_info("hello")
    assert calls == [1]


# --- 4. monitoring a training-epoch metric --------------------------------------------------------


class TrainEpochMetric(DeterministicModel):
    """``train_loss`` logged on_epoch only; validation logs ``val_loss``."""

    def __init__(self, values: list[float]) -> None:
        super().__init__()
        self.values = values

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", self.values[self.current_epoch], on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self.step(batch))


def test_model_checkpoint_monitors_a_train_epoch_metric_with_validation(make_trainer, tmp_path):
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ck"), monitor="train_loss", save_top_k=1,
                           filename="{epoch}-{train_loss:.1f}")
    model = TrainEpochMetric([3.0, 1.0, 2.0])
    make_trainer(max_epochs=3, limit_train_batches=2, limit_val_batches=1,
                 callbacks=[ckpt], enable_checkpointing=True).fit(model)
    assert ckpt.best_model_score == pytest.approx(1.0)
    assert os.path.basename(ckpt.best_model_path) == "epoch=1-train_loss=1.0.ckpt"


def test_early_stopping_monitors_a_train_epoch_metric_with_validation(make_trainer):
    stopper = EarlyStopping(monitor="train_loss", patience=1)
    model = TrainEpochMetric([3.0, 1.0, 2.0, 0.5, 0.1])
    trainer = make_trainer(max_epochs=5, limit_train_batches=2, limit_val_batches=1,
                           callbacks=[stopper])
    trainer.fit(model)
    assert stopper.best_score == pytest.approx(1.0)
    assert trainer.current_epoch == 3  # stopped after epoch 2 (index), 3 epochs done


def test_validation_metric_monitor_still_checks_after_validation(make_trainer, tmp_path):
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ck"), monitor="val_loss")
    make_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                 callbacks=[ckpt], enable_checkpointing=True).fit(TrainEpochMetric([1.0]))
    assert ckpt.best_model_score is not None and not ckpt._deferred


# --- 5. deterministic ---------------------------------------------------------------------------


class DeterminismProbe(DeterministicModel):
    def __init__(self) -> None:
        super().__init__()
        self.flags: tuple = ()

    def on_train_start(self):
        self.flags = (torch.are_deterministic_algorithms_enabled(),
                      torch.is_deterministic_algorithms_warn_only_enabled(),
                      torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
                      os.environ.get("CUBLAS_WORKSPACE_CONFIG"))


@pytest.mark.parametrize(("value", "warn_only"), [(True, False), ("warn", True)])
def test_deterministic_sets_and_restores_torch_flags(make_trainer, monkeypatch, value,
                                                     warn_only):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    model = DeterminismProbe()
    make_trainer(limit_train_batches=1, deterministic=value).fit(model)
    assert model.flags == (True, warn_only, True, False, ":4096:8")
    assert torch.are_deterministic_algorithms_enabled() == before
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ


def test_not_deterministic_leaves_torch_flags(make_trainer):
    model = DeterminismProbe()
    make_trainer(limit_train_batches=1).fit(model)
    assert model.flags[0] is False

