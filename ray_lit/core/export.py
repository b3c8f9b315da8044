"""Export a ``LightningModule`` for inference: TorchScript (script or trace) and ONNX.

Both run on the module as it is in this process (on the driver after ``fit`` it holds rank 0's
weights), in eval mode, and put the module back in the training mode it had.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ray_lit.errors import MisconfigurationException

_METHODS = ("script", "trace")


def to_torchscript(module: nn.Module, file_path: str | os.PathLike | None = None,
                   method: str = "script", example_inputs: Any = None,
                   **kwargs: Any) -> torch.jit.ScriptModule:
    """Compile ``module`` with ``torch.jit.script`` or ``torch.jit.trace``.

    Args:
        module: the module (usually a ``LightningModule``).
        file_path: where to ``torch.jit.save`` the result (local path or storage URI); None
            skips saving.
        method: ``"script"`` or ``"trace"``.
        example_inputs: inputs for tracing; default ``module.example_input_array``. A tuple is
            passed as positional arguments, a dict as keyword arguments.
        **kwargs: passed on to ``torch.jit.script`` / ``torch.jit.trace``.

    Returns:
        The compiled module (in eval mode).

    Raises:
        ValueError: ``method`` is unknown, or tracing without any example inputs.
    """
    if method not in _METHODS:
        raise ValueError(f"to_torchscript(method={method!r}): choose one of {_METHODS}.")
    if method == "trace":
        if example_inputs is None:
            example_inputs = getattr(module, "example_input_array", None)
        if example_inputs is None:
            raise ValueError(
                "to_torchscript(method='trace') needs inputs: pass example_inputs=... or set "
                "module.example_input_array.")
    with _eval_mode(module), _without_trainer(module):
        if method == "script":
            compiled = torch.jit.script(module, **kwargs)
        elif isinstance(example_inputs, dict):
            compiled = torch.jit.trace(module, example_kwarg_inputs=example_inputs, **kwargs)
        else:
            compiled = torch.jit.trace(module, example_inputs, **kwargs)
    if file_path is not None:
        buffer = io.BytesIO()
        torch.jit.save(compiled, buffer)
        _write(os.fspath(file_path), buffer.getvalue())
    return compiled


def to_onnx(module: nn.Module, file_path: str | os.PathLike, input_sample: Any = None,
            **kwargs: Any) -> None:
    """Export ``module`` to ONNX with ``torch.onnx.export``.

    Needs the ``onnx`` package (``pip install 'ray_lit[onnx]'``). Unless ``dynamo`` is given,
    the TorchScript-based exporter is used (``dynamo=False``): it needs no ``onnxscript``.

    Args:
        module: the module (usually a ``LightningModule``).
        file_path: the ``.onnx`` file (local path or storage URI).
        input_sample: example inputs; default ``module.example_input_array``. A tuple is passed
            as positional arguments.
        **kwargs: passed on to ``torch.onnx.export`` (``input_names``, ``dynamic_axes``, ...).

    Raises:
        MisconfigurationException: the ``onnx`` package is not installed.
        ValueError: neither ``input_sample`` nor ``module.example_input_array`` is set.
    """
    try:
        import onnx  # noqa: F401  (torch.onnx imports it lazily; fail here with the fix)
    except ImportError as err:
        raise MisconfigurationException(
            "to_onnx needs the onnx package: pip install 'ray_lit[onnx]'") from err
    if input_sample is None:
        input_sample = getattr(module, "example_input_array", None)
    if input_sample is None:
        raise ValueError(
            "to_onnx needs an input sample: pass input_sample=... or set "
            "module.example_input_array.")
    transfer = getattr(module, "transfer_batch_to_device", None)
    if transfer is not None:
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        input_sample = transfer(input_sample, device)
    args = input_sample if isinstance(input_sample, tuple) else (input_sample,)
    kwargs.setdefault("dynamo", False)
    path = os.fspath(file_path)
    with _eval_mode(module), _without_trainer(module):
        if "://" in path:
            buffer = io.BytesIO()
            torch.onnx.export(module, args, buffer, **kwargs)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            torch.onnx.export(module, args, path, **kwargs)
    if "://" in path:
        _write(path, buffer.getvalue())


# --- internals ---------------------------------------------------------------------------------
@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode for the export; every submodule gets back its own training flag."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


@contextlib.contextmanager
def _without_trainer(module: nn.Module) -> Iterator[None]:
    """Hide the attached trainer from the compiler.

    ``torch.jit.script`` compiles every attribute in a module's ``__dict__`` it can type; a
    trainer (reached through ``module._trainer``) gets compiled into a TorchScript class that
    ``torch.jit.load`` then cannot parse. The trainer is never part of the network, so it is
    set aside while compiling and put back after.
    """
    saved = [(m, m.__dict__["_trainer"]) for m in module.modules()
             if m.__dict__.get("_trainer") is not None]
    for m, _ in saved:
        m.__dict__["_trainer"] = None
    try:
        yield
    finally:
        for m, trainer in saved:
            m.__dict__["_trainer"] = trainer


def _write(path: str, data: bytes) -> None:
    from ray_lit.storage.filesystem import write_file

    write_file(path, data)
