"""``ModelSummary``: the layer table printed at the start of ``fit`` (rank 0 only).

Example (``max_depth=1``)::

      | Name    | Type       | Params
    ------------------------------------
    0 | encoder | Sequential | 100 K
    1 | head    | Linear     | 1.3 K
    ------------------------------------
    101 K     Trainable params
    0         Non-trainable params
    101 K     Total params
    0.406     Total estimated model params size (MB)
"""

from __future__ import annotations

import math

import torch
from torch.nn.parameter import UninitializedParameter

_UNITS = [" ", "K", "M", "B", "T"]
_MODES = {"top": 1, "full": -1}


def get_human_readable_count(number: int) -> str:
    """``123`` -> ``"123  "``, ``1234`` -> ``"1.2 K"``, ``2_000_000`` -> ``"2.0 M"``.

    Raises:
        ValueError: ``number`` is negative.
    """
    if number < 0:
        raise ValueError(f"get_human_readable_count({number}): the count must be >= 0.")
    digits = int(math.floor(math.log10(number)) + 1) if number > 0 else 1
    groups = min(int(math.ceil(digits / 3)), len(_UNITS))  # no unit beyond trillions
    scaled = number * 10 ** (-3 * (groups - 1))
    index = groups - 1
    if index < 1 or scaled >= 100:
        return f"{int(scaled):,d} {_UNITS[index]}"
    return f"{scaled:,.1f} {_UNITS[index]}"


def _count(params: list[torch.nn.Parameter]) -> int:
    # lazy modules have no size yet: count them as 0 rather than fail
    return sum(p.numel() for p in params if not isinstance(p, UninitializedParameter))


class ModelSummary:
    """The layers of ``module`` down to ``max_depth`` with their parameter counts.

    Args:
        module: any ``torch.nn.Module`` (a LightningModule included).
        max_depth: 1 = direct children, 2 = their children too (names like ``enc.0``), -1 =
            every submodule, 0 = totals only.
        mode: 0.9's ``"top"`` (= depth 1) or ``"full"`` (= -1); overrides ``max_depth``.

    Raises:
        ValueError: ``max_depth`` below -1 or ``mode`` unknown.
    """

    def __init__(self, module: torch.nn.Module, max_depth: int = 1,
                 mode: str | None = None) -> None:
        if mode is not None:
            if mode not in _MODES:
                raise ValueError(f"ModelSummary(mode={mode!r}): use one of {sorted(_MODES)}.")
            max_depth = _MODES[mode]
        if not isinstance(max_depth, int) or max_depth < -1:
            raise ValueError(f"ModelSummary(max_depth={max_depth!r}): use an int >= -1.")
        self._module = module
        self._max_depth = max_depth

    @property
    def max_depth(self) -> int:
        return self._max_depth

    @property
    def named_modules(self) -> list[tuple[str, torch.nn.Module]]:
        """The submodules listed, in registration order."""
        if self._max_depth == 0:
            return []
        found = list(self._module.named_modules())[1:]  # [0] is the module itself
        if self._max_depth == -1:
            return found
        return [(name, m) for name, m in found if name.count(".") < self._max_depth]

    @property
    def layer_names(self) -> list[str]:
        return [name for name, _ in self.named_modules]

    @property
    def layer_types(self) -> list[str]:
        return [type(m).__name__ for _, m in self.named_modules]

    @property
    def param_nums(self) -> list[int]:
        return [_count(list(m.parameters())) for _, m in self.named_modules]

    @property
    def total_parameters(self) -> int:
        """Every parameter once (shared ones are not double-counted)."""
        return _count(list(self._module.parameters()))

    @property
    def trainable_parameters(self) -> int:
        return _count([p for p in self._module.parameters() if p.requires_grad])

    @property
    def model_size(self) -> float:
        """Parameter storage in MB, at each parameter's own dtype."""
        size = sum(p.numel() * p.element_size() for p in self._module.parameters()
                   if not isinstance(p, UninitializedParameter))
        return size / 1e6

    def __str__(self) -> str:
        columns = [
            (" ", [str(i) for i in range(len(self.named_modules))]),
            ("Name", self.layer_names),
            ("Type", self.layer_types),
            ("Params", [get_human_readable_count(n) for n in self.param_nums]),
        ]
        widths = [max([len(header), *(len(v) for v in values)]) for header, values in columns]
        rule = "-" * (sum(widths) + 3 * len(columns))
        lines = [" | ".join(h.ljust(w) for (h, _), w in zip(columns, widths)), rule]
        for row in zip(*(values for _, values in columns)):
            lines.append(" | ".join(v.ljust(w) for v, w in zip(row, widths)))
        lines.append(rule)
        total, trainable = self.total_parameters, self.trainable_parameters
        for value, label in ((get_human_readable_count(trainable), "Trainable params"),
                             (get_human_readable_count(total - trainable),
                              "Non-trainable params"),
                             (get_human_readable_count(total), "Total params"),
                             (f"{self.model_size:,.3f}", "Total estimated model params size (MB)")):
            lines.append(f"{value:<10}{label}")
        return "\n".join(line.rstrip() for line in lines)

    def __repr__(self) -> str:
        return str(self)


def summarize(module: torch.nn.Module, max_depth: int = 1) -> ModelSummary:
    """``ModelSummary(module, max_depth)``; ``str()`` it for the table."""
    return ModelSummary(module, max_depth=max_depth)
