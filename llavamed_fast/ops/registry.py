"""Which implementation of an op runs: the backend registry.

Every op has a torch reference and may have Triton and CUDA/C++ implementations. The backend is
chosen per call from, in order of precedence:

1. a per-op override set with :func:`use_backend` (a context manager, scoped to the current context);
2. the environment variable ``LLAVAMED_FAST_BACKEND_<OP>`` (e.g. ``LLAVAMED_FAST_BACKEND_VARLEN_ATTENTION``);
3. the environment variable ``LLAVAMED_FAST_BACKEND``, for every op that has an implementation of that
   backend (``LLAVAMED_FAST_BACKEND=triton`` runs all Triton kernels; an op with no Triton kernel, such as
   the host-side packer, keeps its default);
4. the op's default for the device of its inputs: the first of its preferred backends that is
   implemented and available there.

A backend that was asked for but cannot run (not installed, not built, wrong device, or asked per op
and not implemented) is an error that says why; it never falls back. :func:`OpRegistry.describe` shows
what each op resolves to.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

BACKENDS = ("torch", "triton", "cuda", "flash_attn")
"""``torch``: the reference; ``triton``: kernels/; ``cuda``: the compiled extension (C++/CUDA);
``flash_attn``: the flash-attn package, where it is installed (attention only)."""

ENV_GLOBAL = "LLAVAMED_FAST_BACKEND"


class BackendUnavailableError(RuntimeError):
    """A backend was asked for an op that it cannot run."""


@dataclass(frozen=True)
class Implementation:
    """One backend's implementation of an op.

    ``devices`` lists the tensor device types it accepts. ``unavailable`` returns ``None`` when the
    implementation can run in this process, else the reason it cannot (a missing package, a build
    without CUDA, ...); it is called lazily so that importing the registry imports no optional package.
    ``runs_as`` says what actually runs where the backend's name alone would mislead (the ``cuda``
    backend's packer is C++ on the host); :meth:`OpRegistry.describe` shows it.
    """

    backend: str
    devices: frozenset[str]
    load: Callable[[], Callable]
    unavailable: Callable[[], str | None] = field(default=lambda: None)
    runs_as: str | None = None


@dataclass
class _Op:
    name: str
    preference: Mapping[str, tuple[str, ...]]  # device type -> backends, best first
    implementations: dict[str, Implementation] = field(default_factory=dict)


_OVERRIDES: contextvars.ContextVar[Mapping[str, str]] = contextvars.ContextVar(
    "llavamed_fast_backend_overrides", default=MappingProxyType({})
)


class OpRegistry:
    """Ops by name, each with its implementations and default preference per device type."""

    def __init__(self) -> None:
        self._ops: dict[str, _Op] = {}

    def define(self, name: str, preference: Mapping[str, tuple[str, ...]]) -> None:
        for backends in preference.values():
            unknown = set(backends) - set(BACKENDS)
            if unknown:
                raise ValueError(f"op {name!r}: unknown backends {sorted(unknown)}; known: {BACKENDS}")
        self._ops[name] = _Op(name, dict(preference))

    def register(self, name: str, implementation: Implementation) -> None:
        if implementation.backend not in BACKENDS:
            raise ValueError(f"unknown backend {implementation.backend!r}; known: {BACKENDS}")
        self._op(name).implementations[implementation.backend] = implementation

    def ops(self) -> tuple[str, ...]:
        return tuple(self._ops)

    def implemented(self, name: str) -> tuple[str, ...]:
        return tuple(self._op(name).implementations)

    def requested(self, name: str) -> tuple[str, str] | None:
        """The backend asked for this op, and where it was asked (for error messages), or None."""
        override = _OVERRIDES.get().get(name)
        if override is not None:
            return override, f"use_backend({name}={override!r})"
        per_op = f"{ENV_GLOBAL}_{name.upper()}"
        value = os.environ.get(per_op, "").strip()
        if value:
            return value, f"{per_op}={value}"
        value = os.environ.get(ENV_GLOBAL, "").strip()
        if value and (value not in BACKENDS or value in self._op(name).implementations):
            return value, f"{ENV_GLOBAL}={value}"
        return None

    def describe(self, device_type: str) -> dict[str, str]:
        """``{op: backend}`` for tensors of ``device_type`` (``"backend (what runs)"`` where the
        implementation says), or ``{op: "error: ..."}`` where none can run."""
        table = {}
        for name, op in self._ops.items():
            if device_type not in op.preference and self.requested(name) is None:
                continue
            try:
                backend = self.resolve(name, device_type)
            except BackendUnavailableError as error:
                table[name] = f"error: {error}"
                continue
            runs_as = op.implementations[backend].runs_as
            table[name] = f"{backend} ({runs_as})" if runs_as else backend
        return table

    def resolve(self, name: str, device_type: str) -> str:
        """The backend that runs ``name`` on tensors of ``device_type``; raises if it cannot."""
        op = self._op(name)
        asked = self.requested(name)
        if asked is not None:
            backend, source = asked
            reason = self._why_not(op, backend, device_type)
            if reason is not None:
                raise BackendUnavailableError(
                    f"{source}: op {name!r} cannot use backend {backend!r}: {reason}"
                )
            return backend
        reasons = []
        for backend in op.preference.get(device_type, ()):
            reason = self._why_not(op, backend, device_type)
            if reason is None:
                return backend
            reasons.append(f"{backend}: {reason}")
        raise BackendUnavailableError(
            f"op {name!r} has no usable backend for {device_type} tensors ({'; '.join(reasons) or 'none preferred'})"
        )

    def why_not(self, name: str, backend: str, device_type: str) -> str | None:
        """None when ``backend`` can run ``name`` on ``device_type`` tensors, else the reason it cannot."""
        return self._why_not(self._op(name), backend, device_type)

    def implementation(self, name: str, backend: str) -> Callable:
        return self._op(name).implementations[backend].load()

    def _op(self, name: str) -> _Op:
        if name not in self._ops:
            raise KeyError(f"unknown op {name!r}; ops: {sorted(self._ops)}")
        return self._ops[name]

    @staticmethod
    def _why_not(op: _Op, backend: str, device_type: str) -> str | None:
        if backend not in BACKENDS:
            return f"unknown backend; choose one of {', '.join(BACKENDS)}"
        implementation = op.implementations.get(backend)
        if implementation is None:
            have = ", ".join(op.implementations) or "none"
            return f"no {backend} implementation of this op exists (implemented: {have})"
        if device_type not in implementation.devices:
            hint = (
                " (set TRITON_INTERPRET=1 to run Triton kernels on CPU tensors)"
                if backend == "triton"
                else ""
            )
            return f"it runs on {'/'.join(sorted(implementation.devices))} tensors, not {device_type}{hint}"
        return implementation.unavailable()


REGISTRY = OpRegistry()
"""The process-wide registry. Ops are defined and implementations registered in ``llavamed_fast.ops``."""


@contextlib.contextmanager
def use_backend(**backends: str) -> Iterator[None]:
    """Force backends per op inside a ``with`` block: ``with use_backend(varlen_attention="triton"):``."""
    for name, backend in backends.items():
        REGISTRY._op(name)  # unknown op names fail here, not at the first call
        if backend not in BACKENDS:
            raise ValueError(
                f"unknown backend {backend!r} for op {name!r}; choose one of {', '.join(BACKENDS)}"
            )
    token = _OVERRIDES.set(MappingProxyType({**_OVERRIDES.get(), **backends}))
    try:
        yield
    finally:
        _OVERRIDES.reset(token)
