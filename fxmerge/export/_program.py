"""Saving a runnable module as a torch.export program (``.pt2``) and loading it back."""

from __future__ import annotations

import inspect
import os
import zipfile
from pathlib import Path

import torch
from torch import nn

from fxmerge.errors import ExportError, ExportInputError
from fxmerge.export import _diagnose
from fxmerge.export._atomic import check_replaceable, publish, resolve_target, staging_dir
from fxmerge.export._compare import compare_outputs
from fxmerge.export._flat import flatten_outputs
from fxmerge.export._inputs import ExampleInputs, eval_copy, parse_example_inputs

_PROGRAM_TOLERANCE = 1e-5
_MARK = "fxmerge"  # an extra file in the archive: marks the program as written by fxmerge


def save_program(
    model: nn.Module, example_inputs: object, path: str | os.PathLike[str], *, dynamic_batch: bool = True
) -> Path:
    """Capture ``model`` (a deep copy, in eval mode) with ``torch.export`` and save it atomically to ``path``.

    The program is called like the model (same positional and keyword inputs) and returns the same output
    structure. With ``dynamic_batch`` dim 0 of every input whose dim 0 equals the example batch size stays
    dynamic. Before writing, the program's outputs are compared with the model's on the examples.

    Raises:
        ExportError: torch.export cannot capture the model (the message says why and where), or the
            captured program disagrees with the model.
    """
    target = resolve_target(path, (".pt2",))
    check_replaceable({target: is_fxmerge_program})
    inputs = parse_example_inputs(model, example_inputs)
    clone = eval_copy(model)
    capture = _capture_tensors(inputs) if dynamic_batch else inputs.tensors
    capture_args, capture_kwargs = inputs.rebuild(capture)
    shapes = _dynamic_shapes(clone, inputs, capture, capture_args, capture_kwargs) if dynamic_batch else None
    try:
        program = torch.export.export(
            clone, capture_args, capture_kwargs, dynamic_shapes=shapes, strict=False
        )
    except Exception as exc:
        raise _capture_failure(clone, exc) from exc
    args, kwargs = inputs.rebuild(inputs.tensors)
    _verify(program, clone, args, kwargs)
    with staging_dir(target) as stage:
        staged = stage / target.name
        torch.export.save(program, str(staged), extra_files={_MARK: "program"})
        publish(stage, staged, {target.name: target})
    return target


def is_fxmerge_program(path: Path) -> bool:
    """Whether ``path`` is a ``.pt2`` archive written by :func:`save_program`."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.endswith(f"/extra/{_MARK}") for n in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


class ProgramModule(nn.Module):
    """A loaded torch.export program as a module; it always behaves as the model did in eval mode.

    ``.eval()`` is accepted (it changes nothing) and ``.train()`` raises, because the graph was captured in
    eval mode and has no training behaviour (dropout, batch statistics) to switch to.
    """

    def __init__(self, program: nn.Module) -> None:
        super().__init__()
        self.program = program
        self.training = False

    def forward(self, *args: object, **kwargs: object) -> object:
        """Run the program; inputs and outputs have the structure of the original model's."""
        return self.program(*args, **kwargs)

    def train(self, mode: bool = True) -> ProgramModule:
        """Only ``mode=False`` is possible: the program was captured in eval mode."""
        if mode:
            raise ExportError(
                "a loaded program was captured in eval mode and cannot train; rebuild the model with "
                "fxmerge.export.load_state to train it."
            )
        self.training = False
        return self


def load_program(path: str | os.PathLike[str]) -> ProgramModule:
    """Load a program written by :func:`save_program` as a runnable module (eval-mode behaviour baked in)."""
    source = Path(path).expanduser()
    if not source.is_file():
        raise ExportInputError(f"no program file at {source}; write one with fxmerge.export.save_program.")
    try:
        program = torch.export.load(str(source))
    except Exception as exc:
        raise ExportInputError(
            f"{source} is not a torch.export program ({type(exc).__name__}: {exc}). If its outputs are custom "
            "classes, import the package that registers them before loading."
        ) from exc
    return ProgramModule(program.module())


def _capture_tensors(inputs: ExampleInputs) -> tuple[torch.Tensor, ...]:
    """The example tensors, with batched ones doubled along dim 0 when the batch is 1.

    torch.export specialises size-1 dimensions, so a batch of 1 cannot be captured as dynamic.
    """
    if inputs.batch_size() != 1:
        return inputs.tensors
    flags = inputs.batch_flags()
    return tuple(torch.cat([t, t]) if flag else t for t, flag in zip(inputs.tensors, flags, strict=True))


def _dynamic_shapes(
    model: nn.Module,
    inputs: ExampleInputs,
    capture: tuple[torch.Tensor, ...],
    args: tuple[object, ...],
    kwargs: dict[str, object],
) -> dict[str, object] | None:
    batched = {id(t) for t, flag in zip(capture, inputs.batch_flags(), strict=True) if flag}
    if not batched:
        raise ExportInputError(
            "dynamic_batch=True needs an input with a batch dimension (dim 0), but every example input is a "
            "scalar; pass dynamic_batch=False."
        )
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except (TypeError, ValueError) as exc:
        raise ExportInputError(f"the example inputs do not fit {type(model).__name__}.forward: {exc}") from exc
    batch = torch.export.Dim("batch")
    return {name: _spec(value, batched, batch) for name, value in bound.arguments.items()}


def _spec(value: object, batched: set[int], batch: object) -> object:
    if isinstance(value, torch.Tensor):
        return {0: batch} if id(value) in batched else None
    if isinstance(value, tuple):
        return tuple(_spec(v, batched, batch) for v in value)
    if isinstance(value, dict):
        return {k: _spec(v, batched, batch) for k, v in value.items()}
    return None


def _verify(
    program: torch.export.ExportedProgram,
    model: nn.Module,
    args: tuple[object, ...],
    kwargs: dict[str, object],
) -> None:
    with torch.no_grad():
        want = flatten_outputs(model(*args, **kwargs))
        try:
            got = flatten_outputs(program.module()(*args, **kwargs))
        except Exception as exc:
            raise ExportError(
                f"torch.export captured {type(model).__name__}, but the program fails on the example inputs "
                f"({type(exc).__name__}: {exc}). torch.export has known problems with forward(**kwargs) "
                "signatures under dynamic shapes: try dynamic_batch=False. No file was written."
            ) from exc
    names = [".".join(str(p) for p in path) or "output" for path, _ in want]
    result = compare_outputs(
        names,
        [t.detach().to(torch.float64).numpy() for _, t in got],
        [t for _, t in want],
        atol=_PROGRAM_TOLERANCE,
        rtol=_PROGRAM_TOLERANCE,
        label="example inputs",
        batch_size=None,
    )
    if not result.passed:
        raise ExportError(
            f"the torch.export program of {type(model).__name__} disagrees with the model on the example inputs: "
            f"output {result.worst_output!r} max abs diff {result.max_abs_diff:.3g}. No file was written.",
            max_abs_diff=result.max_abs_diff,
            max_rel_diff=result.max_rel_diff,
        )


def _capture_failure(model: nn.Module, exc: BaseException) -> ExportError:
    texts = [str(exc)]
    location = _diagnose.user_code(texts)
    where = f"\n  blamed code: {location}" if location else ""
    return ExportError(
        f"torch.export could not capture {type(model).__name__}: {_diagnose.summary(exc)}{where}\n"
        f"Hint: {_diagnose.hint_for(texts, None)}"
    )
