"""Triton kernels of ssg-engine (installed as ``ssg_engine.kernels``), one op per module.

Each module holds the jit kernel, its launcher and the pure-PyTorch reference that
specifies it; the modules import without triton (only the launchers need it). Each
launcher builds a :class:`KernelLaunch` in one function (``*_launch``) that alone
chooses the kernel configuration; ``bench/aot_compile.py`` calls the same function on
meta tensors to compile every configuration ahead of time.

Every launch goes through :meth:`KernelLaunch.run`; inside :func:`record_launches` it also
records the launch's compile configuration (:func:`launch_config`: kernel, constexprs,
warps, argument types and the specialization Triton derives), which is how
``bench/engine_launches.py`` collects what the Engine launches for the AOT gate.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from ssg_engine.backend import triton_interpreting


def jit(**options: Any) -> Callable[[Callable], Any]:
    """``triton.jit(**options)`` as a decorator; the plain function when triton is not installed."""
    try:
        import triton
    except ImportError:  # reference-only install: the launchers raise instead
        return lambda fn: fn
    return lambda fn: triton.jit(fn, **options)


def require_kernel_device(device: torch.device) -> None:
    """Raise ``ValueError`` unless a Triton kernel can run on ``device``."""
    if device.type != "cuda" and not triton_interpreting():
        raise ValueError(
            f"the Triton kernels need CUDA tensors (got {device.type}); set TRITON_INTERPRET=1 before "
            "importing triton to run them on the CPU interpreter"
        )


def interpreter_tiles() -> bool:
    """True when launches run on the CPU interpreter (``TRITON_INTERPRET=1``) and no :func:`record_launches` is
    collecting configurations: a launcher may then take bigger tiles, since the interpreter pays per program, loop
    iteration and op, not per element. The configurations compiled for a GPU (and recorded for the AOT gate) never
    depend on it."""
    return triton_interpreting() and _RECORDER.get() is None


@dataclasses.dataclass(frozen=True)
class KernelLaunch:
    """One launch of a jit kernel: ``kernel[grid](*args, **constexprs, **options)``, where ``options`` is
    ``num_warps`` plus ``num_stages`` when set (None: not passed, Triton's default)."""

    kernel: Any
    grid: Tuple[int, ...]
    args: Tuple[Any, ...]
    constexprs: Dict[str, Any]
    num_warps: int
    num_stages: Optional[int] = None

    @property
    def options(self) -> Dict[str, int]:
        """The compile options of the launch: ``num_warps``, and ``num_stages`` when set."""
        if self.num_stages is None:
            return {"num_warps": self.num_warps}
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}

    def run(self) -> None:
        """Launch; inside :func:`record_launches` record the configuration first (and skip the launch when
        the recorder says ``execute=False``)."""
        recorder = _RECORDER.get()
        if recorder is not None:
            recorder.configs.append(recorder.config(self))
            if not recorder.execute:
                return
        self.kernel[self.grid](*self.args, **self.constexprs, **self.options)


# 16-byte alignment is what Triton specializes pointers on (``tt.divisibility`` 16); a tensor's base
# allocation is at least that aligned (CUDA caching allocator: 512 B), so a view's alignment is its byte offset's.
_ALIGNMENT = 16
_BASE_ADDRESS = 1 << 20


@dataclasses.dataclass(frozen=True)
class _PointerArg:
    """What Triton's specializer reads of a tensor argument: ``dtype`` and ``data_ptr()`` (fake and meta tensors
    have no address; the byte offset of the view decides the alignment)."""

    dtype: torch.dtype
    address: int

    def data_ptr(self) -> int:
        return self.address


def _as_pointer(arg: Any) -> Any:
    if isinstance(arg, torch.Tensor):
        return _PointerArg(arg.dtype, _BASE_ADDRESS + arg.storage_offset() * arg.element_size())
    return arg


@dataclasses.dataclass
class LaunchRecorder:
    """The launches recorded inside one :func:`record_launches` block, as :func:`launch_config` dicts."""

    execute: bool
    configs: List[Dict[str, Any]] = dataclasses.field(default_factory=list)
    _binders: Dict[Any, Tuple[Any, Any]] = dataclasses.field(default_factory=dict)  # kernel -> (JITFunction, binder)

    def config(self, launch: "KernelLaunch") -> Dict[str, Any]:
        if launch.kernel not in self._binders:
            self._binders[launch.kernel] = _binder(launch.kernel)
        return launch_config(launch, self._binders[launch.kernel])


_RECORDER: contextvars.ContextVar[Optional[LaunchRecorder]] = contextvars.ContextVar("ssg_engine_launch_recorder", default=None)


@contextlib.contextmanager
def record_launches(execute: bool = True) -> Iterator[LaunchRecorder]:
    """Record every :class:`KernelLaunch` run in this block (this thread/context only) as a :func:`launch_config`
    in ``recorder.configs``. ``execute=False`` records without launching: the outputs stay unwritten, which lets
    the Engine run on fake or meta tensors (no data) to enumerate its launches."""
    recorder = LaunchRecorder(execute)
    token = _RECORDER.set(recorder)
    try:
        yield recorder
    finally:
        _RECORDER.reset(token)


def _binder(kernel: Any) -> Tuple[Any, Any]:
    """``(JITFunction, binder)`` of a jit kernel: Triton's own argument binder and specializer (internals of triton
    3.x, checked with 3.9.0), for a compiled or an interpreted (``TRITON_INTERPRET=1``) kernel alike."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    if not isinstance(kernel, JITFunction):  # the interpreter's InterpretedFunction keeps the jit options
        kernel = JITFunction(kernel.fn, **kernel.kwargs)
    backend = make_backend(GPUTarget("cuda", 90, 32))  # the specialization rules are the same for every NVIDIA arch
    return kernel, create_function_from_signature(kernel.signature, kernel.params, backend)


def launch_config(launch: "KernelLaunch", binder: Optional[Tuple[Any, Any]] = None) -> Dict[str, Any]:
    """The compile configuration of a launch, as ``JITFunction.run`` derives it: ``{"kernel": "module:name",
    "num_warps", ["num_stages",] "args": [[name, type, specialization], ...]}`` (``num_stages`` only when the launch
    sets it, so the keys of launches that do not are unchanged) where type is ``"*bf16"``, ``"i32"``, ``"fp32"`` or
    ``"constexpr"`` and specialization is ``"D"`` (divisible by 16: pointer alignment, int value), ``""`` (not),
    None (``do_not_specialize``/floats) or the constexpr's value (constexprs and ints equal to 1).
    ``config_key`` of it is equal for launches that compile to the same binary."""
    kernel, bind = binder if binder is not None else _binder(launch.kernel)
    args = [_as_pointer(a) for a in launch.args]
    _, specialization, _ = bind(*args, **launch.constexprs, **launch.options)
    return {
        "kernel": f"{kernel.module}:{kernel.fn.__qualname__}",
        **launch.options,
        "args": [[p.name, ty, spec] for p, (ty, spec) in zip(kernel.params, specialization)],
    }


def config_key(config: Dict[str, Any]) -> str:
    """A canonical string of a :func:`launch_config` (JSON, sorted keys)."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"))
