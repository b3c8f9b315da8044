"""``LightningModule``: a ``torch.nn.Module`` with the hooks of both Lightning generations.

The loop (``ray_lit.loop``) calls these hooks in the order of spec §3; each one is a no-op here so
a user overrides only what they need. ``self.log`` / ``self.log_dict`` write into the metric store
of the loop that is running the current hook (``ray_lit.core.metric_store``).

Which process runs what: in a distributed fit every hook runs in every worker (one DDP rank
each); ``self.print`` prints on global rank 0 only.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ray_lit.core.hooks import call_adapted


class LightningModule(nn.Module):
    """Subclass this and implement ``training_step`` and ``configure_optimizers``.

    Attributes available inside hooks: ``trainer``, ``device``, ``dtype``, ``current_epoch``,
    ``global_step``, ``global_rank``, ``local_rank``, ``logger``, ``hparams``.
    """

    # torch.jit skips these when scripting (they reach the trainer, not the network).
    __jit_unused_properties__ = [
        "trainer", "device", "dtype", "current_epoch", "global_step", "global_rank",
        "local_rank", "logger", "loggers", "hparams", "hparams_initial", "example_input_array",
        "automatic_optimization", "on_gpu", "precision", "use_ddp", "use_ddp2", "use_dp",
        "use_amp", "testing",
    ]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._trainer: Any = None
        self._current_fx_name: str | None = None
        self._example_input_array: Any = None
        self._automatic_optimization = True

    # --- pickling: the trainer stays behind when the module is shipped ----------------------
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_trainer"] = None
        return state

    # --- properties --------------------------------------------------------------------------
    @property
    def trainer(self) -> Any:
        return self.__dict__.get("_trainer")

    @trainer.setter
    def trainer(self, trainer: Any) -> None:
        self.__dict__["_trainer"] = trainer

    @property
    def device(self) -> torch.device:
        for tensor in self.parameters():
            return tensor.device
        for tensor in self.buffers():
            return tensor.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        for tensor in self.parameters():
            return tensor.dtype
        return torch.get_default_dtype()

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    # 0.9 copied these flags from the trainer onto the module; read them from it here
    @property
    def use_ddp(self) -> bool:
        return bool(getattr(self.trainer, "use_ddp", False))

    @property
    def use_ddp2(self) -> bool:
        return False  # ray_lit has no DDP2; DDP across workers is use_ddp

    @property
    def use_dp(self) -> bool:
        return False  # DataParallel requests become DDP workers

    @property
    def use_amp(self) -> bool:
        return bool(getattr(self.trainer, "use_amp", False))

    @property
    def testing(self) -> bool:
        return bool(getattr(self.trainer, "testing", False))

    @property
    def current_epoch(self) -> int:
        return self.trainer.current_epoch if self.trainer is not None else 0

    @property
    def global_step(self) -> int:
        return self.trainer.global_step if self.trainer is not None else 0

    @property
    def global_rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    @property
    def local_rank(self) -> int:
        return self.trainer.local_rank if self.trainer is not None else 0

    @property
    def precision(self) -> Any:
        return self.trainer.precision if self.trainer is not None else 32

    @property
    def logger(self) -> Any:
        return self.trainer.logger if self.trainer is not None else None

    @property
    def loggers(self) -> list[Any]:
        return self.trainer.loggers if self.trainer is not None else []

    @property
    def example_input_array(self) -> Any:
        return self.__dict__.get("_example_input_array")

    @example_input_array.setter
    def example_input_array(self, value: Any) -> None:
        self.__dict__["_example_input_array"] = value

    @property
    def automatic_optimization(self) -> bool:
        return self.__dict__.get("_automatic_optimization", True)

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:
        self.__dict__["_automatic_optimization"] = bool(value)

    # --- hyperparameters -----------------------------------------------------------------------
    @property
    def hparams(self) -> Any:
        from ray_lit.core.hparams import AttributeDict

        if "_hparams" not in self.__dict__:
            self.__dict__["_hparams"] = AttributeDict()
        return self.__dict__["_hparams"]

    @hparams.setter
    def hparams(self, value: Any) -> None:
        from ray_lit.core.hparams import set_hparams

        set_hparams(self, value)

    @property
    def hparams_initial(self) -> Any:
        from ray_lit.core.hparams import AttributeDict

        return self.__dict__.get("_hparams_initial", AttributeDict())

    def save_hyperparameters(self, *args: Any, ignore: Any = None, frame: Any = None,
                             logger: bool = True) -> None:
        """Store the ``__init__`` arguments (all, the named ones, or one dict/Namespace) as
        ``self.hparams``; they are logged and saved in checkpoints."""
        import inspect

        from ray_lit.core.hparams import save_hyperparameters

        if frame is None:
            frame = inspect.currentframe().f_back
        save_hyperparameters(self, *args, ignore=ignore, frame=frame, logger=logger)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str, map_location: Any = None,
                             hparams_file: str | None = None, strict: bool = True,
                             **kwargs: Any) -> LightningModule:
        """Rebuild the module from a checkpoint: init args from its hparams (``kwargs``
        override), then the weights. Loading never runs code from the file."""
        from ray_lit.core.saving import load_from_checkpoint

        return load_from_checkpoint(cls, checkpoint_path, map_location=map_location,
                                    hparams_file=hparams_file, strict=strict, **kwargs)

    # --- logging -------------------------------------------------------------------------------
    def log(self, name: str, value: Any, prog_bar: bool = False, logger: bool | None = None,
            on_step: bool | None = None, on_epoch: bool | None = None,
            reduce_fx: str | Callable = "mean", enable_graph: bool = False,
            sync_dist: bool = False, sync_dist_group: Any = None,
            add_dataloader_idx: bool = True, batch_size: int | None = None,
            metric_attribute: str | None = None, rank_zero_only: bool = False) -> None:
        """Log a scalar (2.x API); defaults of ``on_step`` / ``on_epoch`` depend on the hook."""
        trainer = self.trainer
        if trainer is None or getattr(trainer, "_metric_store", None) is None:
            warnings.warn(f"self.log({name!r}) was called outside a trainer-run hook; ignored.",
                          stacklevel=2)
            return
        trainer._metric_store.log(
            self._current_fx_name, name, value, prog_bar=prog_bar, logger=logger,
            on_step=on_step, on_epoch=on_epoch, reduce_fx=reduce_fx, enable_graph=enable_graph,
            sync_dist=sync_dist, sync_dist_group=sync_dist_group,
            add_dataloader_idx=add_dataloader_idx, batch_size=batch_size,
            rank_zero_only=rank_zero_only,
        )

    def log_dict(self, dictionary: dict[str, Any], **kwargs: Any) -> None:
        """``self.log`` for every item (each member, prefixed, of a torchmetrics
        ``MetricCollection``)."""
        from ray_lit.core.metric_store import dict_items

        for name, value in dict_items(dictionary):
            self.log(name, value, **kwargs)

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on global rank 0 only."""
        if self.global_rank == 0:
            print(*args, **kwargs)

    # --- the steps -----------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return super().forward(*args, **kwargs)

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def training_step_end(self, output: Any) -> Any:
        return output

    def training_epoch_end(self, outputs: Any) -> Any:
        return None

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return None

    def validation_step_end(self, output: Any) -> Any:
        return output

    def validation_epoch_end(self, outputs: Any) -> Any:
        return None

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return None

    def test_step_end(self, output: Any) -> Any:
        return output

    def test_epoch_end(self, outputs: Any) -> Any:
        return None

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        """One batch of ``trainer.predict`` (every rank, on its shard); 2.x default: the
        module called on the batch."""
        batch = kwargs.get("batch", args[0] if args else None)
        return self(batch)

    def configure_optimizers(self) -> Any:
        return None

    def configure_callbacks(self) -> Any:
        return []

    def configure_model(self) -> None:
        """2.x: build layers here instead of in ``__init__`` (large models, or layers the
        user shards with ``fully_shard``). Called on every rank after ``setup`` and before
        the strategy wraps the module (``self.global_rank`` / ``world_size`` are already
        this rank's), on the driver's module before the run's weights are loaded into it,
        and by ``load_from_checkpoint``. It may run more than once on the same module: make
        it idempotent (``if self.layer is not None: return``)."""

    # --- data ----------------------------------------------------------------------------------
    def prepare_data(self) -> None: ...
    def setup(self, stage: str | None = None) -> None: ...
    def teardown(self, stage: str | None = None) -> None: ...

    def train_dataloader(self) -> Any:
        return None

    def val_dataloader(self) -> Any:
        return None

    def test_dataloader(self) -> Any:
        return None

    def predict_dataloader(self) -> Any:
        return None

    def transfer_batch_to_device(self, batch: Any, device: torch.device,
                                 dataloader_idx: int = 0) -> Any:
        """Move every tensor in ``batch`` (nested lists, tuples, dicts, namedtuples) to
        ``device``; objects with a ``.to`` method are moved too."""
        from ray_lit.core.batch import move_to_device

        return move_to_device(batch, device)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int = 0) -> Any:
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int = 0) -> Any:
        return batch

    # --- optimisation hooks ----------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        loss.backward()

    def manual_backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """Backward for manual optimisation (``automatic_optimization = False``)."""
        self.trainer._ctx.manual_backward(loss, *args, **kwargs)

    def optimizers(self, use_pl_optimizer: bool = True) -> Any:
        opts = self.trainer.optimizers if self.trainer is not None else []
        return opts[0] if len(opts) == 1 else opts

    def lr_schedulers(self) -> Any:
        configs = self.trainer.lr_scheduler_configs if self.trainer is not None else []
        if not configs:
            return None
        scheds = [c.scheduler for c in configs]
        return scheds[0] if len(scheds) == 1 else scheds

    # --- 2.x manual-optimisation helpers (every rank runs them inside its training step) -----
    def toggle_optimizer(self, optimizer: Any) -> None:
        """Only ``optimizer``'s parameters require grad until ``untoggle_optimizer`` (2.x):
        the parameters of the other optimizers are switched off, so a backward leaves them
        alone. A parameter already frozen before the call stays frozen afterwards."""
        trainer = self.trainer
        saved: dict[nn.Parameter, bool] = {}
        for opt in (trainer.optimizers if trainer is not None else []):
            for group in opt.param_groups:
                for param in group["params"]:
                    saved.setdefault(param, param.requires_grad)
                    param.requires_grad = False
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.requires_grad = saved.get(param, param.requires_grad)
        self.__dict__["_param_requires_grad_state"] = saved

    def untoggle_optimizer(self, optimizer: Any) -> None:
        """Give the other optimizers' parameters back the ``requires_grad`` they had before
        ``toggle_optimizer``."""
        saved = self.__dict__.pop("_param_requires_grad_state", {})
        for param, flag in saved.items():
            param.requires_grad = flag

    def toggled_optimizer(self, optimizer: Any) -> Any:
        """``with self.toggled_optimizer(opt):`` toggles on entry and untoggles on exit."""
        import contextlib

        @contextlib.contextmanager
        def toggled() -> Any:
            self.toggle_optimizer(optimizer)
            try:
                yield
            finally:
                self.untoggle_optimizer(optimizer)

        return toggled()

    def clip_gradients(self, optimizer: Any, gradient_clip_val: float | None = None,
                       gradient_clip_algorithm: str | None = None) -> None:
        """Clip the gradients of ``optimizer``'s parameters (2.x): by global 2-norm
        (``"norm"``, the default) or by value (``"value"``). Unset arguments fall back to the
        Trainer's ``gradient_clip_val`` / ``gradient_clip_algorithm``; mixed-precision
        gradients are unscaled first so the threshold applies to the true values."""
        config = getattr(self.trainer, "config", None)
        if gradient_clip_val is None:
            gradient_clip_val = getattr(config, "gradient_clip_val", 0.0)
        if gradient_clip_algorithm is None:
            gradient_clip_algorithm = getattr(config, "gradient_clip_algorithm", "norm") or "norm"
        if gradient_clip_algorithm not in ("norm", "value"):
            from ray_lit.errors import MisconfigurationException

            raise MisconfigurationException(
                f"gradient_clip_algorithm={gradient_clip_algorithm!r}: use 'norm' or 'value'.")
        if not gradient_clip_val:
            return
        precision = getattr(self.trainer, "_precision", None)
        if precision is not None:
            precision.unscale(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]
                  if p.grad is not None]
        if not params:
            return
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Automatic optimisation calls this before each optimizer step (2.x); override it
        to clip differently. The default clips with the Trainer's settings."""
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def all_gather(self, data: Any, group: Any = None, sync_grads: bool = False) -> Any:
        """Every rank's ``data`` (a tensor, or dicts/lists/tuples of tensors; numbers become
        tensors) stacked on a new dim 0, through ``trainer.strategy.all_gather``. COLLECTIVE
        on workers: every rank calls it. In process (one rank, no workers) ``data`` comes back
        with no new dim, as in Lightning 2.x on one device. ``sync_grads=True`` keeps the
        result differentiable."""
        strategy = self.trainer.strategy
        single = getattr(strategy, "strategy_name", "") == "single_device"

        def gather(value: Any) -> Any:
            if isinstance(value, (int, float, bool)):
                value = torch.tensor(value, device=self.device)
            if isinstance(value, torch.Tensor):
                if single:
                    return value
                if not sync_grads:
                    value = value.detach()
                out = strategy.all_gather(value, sync_grads=sync_grads)
                return out if sync_grads else out.detach()
            if isinstance(value, dict):
                return type(value)((k, gather(v)) for k, v in value.items())
            if isinstance(value, (list, tuple)):
                items = [gather(v) for v in value]
                return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
            return value

        return gather(data)

    def optimizer_step(self, epoch: int = None, batch_idx: int = None, optimizer: Any = None,
                       optimizer_idx: int = 0, optimizer_closure: Callable | None = None,
                       on_tpu: bool = False, using_native_amp: bool = False,
                       using_lbfgs: bool = False) -> None:
        """Step ``optimizer``; ``optimizer_closure`` returns the loss (it re-runs the step only
        for optimizers that evaluate it several times, such as LBFGS)."""
        step_optimizer(optimizer, optimizer_closure)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any,
                            optimizer_idx: int = 0) -> None:
        optimizer.zero_grad()

    def on_before_backward(self, loss: torch.Tensor) -> None: ...
    def on_after_backward(self) -> None: ...
    def on_before_optimizer_step(self, optimizer: Any, optimizer_idx: int = 0) -> None: ...
    def on_before_zero_grad(self, optimizer: Any) -> None: ...

    # --- loop hooks (both generations) ---------------------------------------------------------
    def on_fit_start(self) -> None: ...
    def on_fit_end(self) -> None: ...
    def on_pretrain_routine_start(self) -> None: ...
    def on_pretrain_routine_end(self) -> None: ...
    def on_train_start(self) -> None: ...
    def on_train_end(self) -> None: ...
    def on_epoch_start(self) -> None: ...
    def on_epoch_end(self) -> None: ...
    def on_train_epoch_start(self) -> None: ...
    def on_train_epoch_end(self) -> None: ...
    def on_batch_start(self, batch: Any) -> Any: ...
    def on_batch_end(self) -> None: ...
    def on_train_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any: ...
    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int,
                           dataloader_idx: int = 0) -> None: ...
    def on_validation_start(self) -> None: ...
    def on_validation_end(self) -> None: ...
    def on_validation_epoch_start(self) -> None: ...
    def on_validation_epoch_end(self) -> None: ...
    def on_validation_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_validation_batch_end(self, outputs: Any, batch: Any, batch_idx: int,
                                dataloader_idx: int = 0) -> None: ...
    def on_test_start(self) -> None: ...
    def on_test_end(self) -> None: ...
    def on_test_epoch_start(self) -> None: ...
    def on_test_epoch_end(self) -> None: ...
    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_test_batch_end(self, outputs: Any, batch: Any, batch_idx: int,
                          dataloader_idx: int = 0) -> None: ...
    def on_predict_start(self) -> None: ...
    def on_predict_end(self) -> None: ...
    def on_predict_epoch_start(self) -> None: ...
    def on_predict_epoch_end(self) -> None: ...
    def on_predict_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None: ...
    def on_predict_batch_end(self, outputs: Any, batch: Any, batch_idx: int,
                             dataloader_idx: int = 0) -> None: ...
    def on_pre_performance_check(self) -> None: ...
    def on_post_performance_check(self) -> None: ...
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None: ...
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None: ...

    def get_progress_bar_dict(self) -> dict[str, Any]:
        """What the progress bar shows besides the ``prog_bar`` metrics."""
        trainer = self.trainer
        items: dict[str, Any] = {}
        if trainer is not None:
            loss = trainer._ctx.running_loss_value()
            if loss is not None:
                items["loss"] = f"{loss:.3f}"
            version = trainer._ctx.logger_version()
            if version is not None:
                items["v_num"] = str(version)[-4:] if isinstance(version, str) else version
        return items

    # --- freezing and export ---------------------------------------------------------------------
    def freeze(self) -> None:
        """``requires_grad=False`` on every parameter and eval mode."""
        for param in self.parameters():
            param.requires_grad = False
        self.eval()

    def unfreeze(self) -> None:
        for param in self.parameters():
            param.requires_grad = True
        self.train()

    def to_torchscript(self, file_path: str | None = None, method: str = "script",
                       example_inputs: Any = None, **kwargs: Any) -> Any:
        """Export with ``torch.jit.script`` or ``torch.jit.trace`` (the seed's "Inference in
        production")."""
        from ray_lit.core.export import to_torchscript

        return to_torchscript(self, file_path=file_path, method=method,
                              example_inputs=example_inputs, **kwargs)

    def to_onnx(self, file_path: str, input_sample: Any = None, **kwargs: Any) -> None:
        """Export to ONNX (needs the optional ``onnx`` extra)."""
        from ray_lit.core.export import to_onnx

        to_onnx(self, file_path, input_sample=input_sample, **kwargs)

    def summarize(self, mode: str = "top") -> Any:
        from ray_lit.core.summary import summarize

        return summarize(self, max_depth=1 if mode == "top" else -1)


def step_optimizer(optimizer: Any, closure: Callable | None) -> Any:
    """``optimizer.step(closure=closure)``, or ``optimizer.step()`` when ``step`` takes no
    argument.

    Lightning 0.9 called ``optimizer.step()`` for ordinary optimizers, so wrappers written for
    it (bolts' ``LARSWrapper``) define ``step(self)``; the loss was already computed and
    backpropagated, so skipping the closure changes nothing for them.
    """
    import inspect

    try:
        # an LR scheduler replaces ``optimizer.step`` by a function on the instance whose
        # signature is the class's unbound ``step(self, ...)``: ``self`` is not an argument
        params = [p for p in inspect.signature(optimizer.step).parameters.values()
                  if p.name != "self"]
    except (TypeError, ValueError):  # a builtin without a signature: assume torch's
        return optimizer.step(closure=closure)
    if closure is None or any(p.name == "closure" or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
                              for p in params):
        return optimizer.step(closure=closure) if closure is not None else optimizer.step()
    if any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params):
        return optimizer.step(closure)
    return optimizer.step()


def call_module_hook(module: LightningModule, name: str, *args: Any, **kwargs: Any) -> Any:
    """Call hook ``name`` with ``module._current_fx_name`` set so ``self.log`` knows its hook."""
    fn = getattr(module, name, None)
    if fn is None:
        return None
    previous = module._current_fx_name
    module.__dict__["_current_fx_name"] = name
    try:
        return fn(*args, **kwargs)
    finally:
        module.__dict__["_current_fx_name"] = previous


def call_module_hook_adapted(module: LightningModule, name: str, modern: list,
                             legacy: list | None = None) -> Any:
    """``call_module_hook`` for hooks whose signature differs between generations."""
    fn = getattr(module, name, None)
    if fn is None:
        return None
    previous = module._current_fx_name
    module.__dict__["_current_fx_name"] = name
    try:
        return call_adapted(fn, (), modern, legacy)
    finally:
        module.__dict__["_current_fx_name"] = previous
