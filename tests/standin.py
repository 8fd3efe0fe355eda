"""A stand-in accelerator for CPU machines: tensors that say they live on another device, whose data
stays in CPU memory, and that refuse to mix with CPU tensors as CUDA tensors do.

    with StandInDevice() as device:        # device == torch.device("meta")
        backend = WanBackend.from_folder(root, device=str(device))
        latents = backend.denoise(noise, ...)   # raises where a CUDA run would raise

Inside the context every aten op passes through `__torch_dispatch__` below: a tensor moved to the
stand-in device (`.to(device)`, a factory with `device=`) becomes an `OnDevice` wrapper that reports
`device.type == "meta"` and holds its real CPU values; an op that mixes an `OnDevice` tensor with a
CPU tensor of one or more dimensions raises the error CUDA raises ("Expected all tensors to be on
the same device"); `.cpu()` gives the plain values back. CUDA's own exceptions are kept: a 0-dim CPU
tensor mixes as a scalar, index tensors may stay on the CPU, and copies cross devices. The numbers
are the CPU's, so a run on the stand-in gives the same bits as the same run on the CPU: a test can
check both the device discipline and the results. `Meter` counts the bytes held on the device.

It claims `meta`, not `cuda` (a CPU build of torch cannot move a tensor to a CUDA device even in name),
so code that branches on `device.type == "cuda"` is not exercised here. Attention runs the CPU's fused
kernel, as a GPU runs its own: no score matrix is held, and the bits are the CPU's.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._pytree import tree_flatten, tree_map
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

STANDIN = torch.device("meta")
aten = torch.ops.aten

# ops where CUDA itself accepts CPU tensors beside device tensors
_MIXING_ALLOWED = {aten._to_copy.default, aten.copy_.default, aten.index.Tensor, aten.index_put_.default,
                   aten._index_put_impl_.default, aten.lift_fresh.default}


class DeviceMismatch(RuntimeError):
    pass


class OnDevice(torch.Tensor):
    """A tensor on the stand-in device; `inner` holds its values on the CPU."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor, requires_grad: bool | None = None):
        if requires_grad is not None:
            # accelerate's loader rebuilds a parameter as type(placeholder)(value, requires_grad=...); the
            # placeholder came from diffusers' init on the real meta device, the value is a CPU tensor
            return torch.nn.Parameter(inner, requires_grad=requires_grad)
        out = torch.Tensor._make_wrapper_subclass(cls, inner.shape, strides=inner.stride(),
                                                  storage_offset=inner.storage_offset(), dtype=inner.dtype,
                                                  device=STANDIN, requires_grad=inner.requires_grad)
        out.inner = inner
        Meter.track(out)
        return out

    def __repr__(self):
        return f"OnDevice({self.inner!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        with StandInDevice():
            return func(*args, **(kwargs or {}))


def _is_standin(device) -> bool:
    return device is not None and torch.device(device).type == STANDIN.type


class _Constructors(TorchFunctionMode):
    """`torch.tensor(data, device=...)` copies its data to the device below the dispatcher, where the
    stand-in cannot see it: make it on the CPU and move it with `.to`, which the stand-in sees."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.tensor, torch.as_tensor) and _is_standin(kwargs.get("device")):
            kwargs.pop("device")
            return func(*args, **kwargs).to(STANDIN)
        if func is torch.nn.functional.scaled_dot_product_attention:
            # On a device of its own, torch's composite would take the math path and materialise the
            # scores, which a GPU's flash / memory-efficient kernels never hold: run the CPU's fused
            # kernel on the values (the same bits as the CPU) and hand the result back on the device.
            tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            if any(isinstance(t, OnDevice) for t in tensors):
                if any(not isinstance(t, OnDevice) and t.dim() > 0 for t in tensors):
                    raise DeviceMismatch(f"Expected all tensors to be on the same device ({func.__name__})")
                unwrap = lambda t: t.inner if isinstance(t, OnDevice) else t  # noqa: E731
                return OnDevice(func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs)))
        return func(*args, **kwargs)


class Meter:
    """Bytes held on the stand-in device, as `torch.cuda.memory_allocated` counts them on a GPU (without
    the allocator's rounding): every storage that an `OnDevice` tensor holds, once however many views
    share it, until the last tensor on it is gone. `peak` is the most held since `reset()`."""

    live = 0
    peak = 0
    _refs: dict[int, list[int]] = {}  # storage address -> [tensors on it, bytes]

    @classmethod
    def reset(cls) -> int:
        cls.peak = cls.live
        return cls.live

    @classmethod
    def track(cls, tensor: "OnDevice") -> None:
        storage = tensor.inner.untyped_storage()
        key = storage.data_ptr()
        if key not in cls._refs:
            cls._refs[key] = [0, storage.nbytes()]
            cls.live += storage.nbytes()
            cls.peak = max(cls.peak, cls.live)
        cls._refs[key][0] += 1
        weakref.finalize(tensor, cls._release, key)

    @classmethod
    def _release(cls, key: int) -> None:
        entry = cls._refs[key]
        entry[0] -= 1
        if entry[0] == 0:
            cls.live -= entry[1]
            del cls._refs[key]


class StandInDevice(TorchDispatchMode):
    """Route every op through the stand-in device's rules while active (see the module's docstring)."""

    def __enter__(self):
        self._constructors = _Constructors()
        self._constructors.__enter__()
        super().__enter__()
        return STANDIN

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            self._constructors.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_device = [t for t in tensors if isinstance(t, OnDevice)]
        on_cpu = [t for t in tensors if not isinstance(t, OnDevice) and t.dim() > 0]
        if on_device and on_cpu and func not in _MIXING_ALLOWED:
            raise DeviceMismatch(f"Expected all tensors to be on the same device, but found at least two devices, "
                                 f"{STANDIN} and cpu! ({func}: {[tuple(t.shape) for t in on_cpu]} on the CPU)")
        to_device = _is_standin(kwargs.get("device"))
        if to_device:
            kwargs["device"] = torch.device("cpu")
        to_cpu = func is aten._to_copy.default and kwargs.get("device") is not None and not to_device
        inners = {id(t.inner): t for t in on_device}
        out = func(*tree_map(lambda t: t.inner if isinstance(t, OnDevice) else t, args),
                   **tree_map(lambda t: t.inner if isinstance(t, OnDevice) else t, kwargs))
        if to_cpu or not (on_device or to_device):
            return out

        def wrap(t):
            if not isinstance(t, torch.Tensor):
                return t
            return inners[id(t)] if id(t) in inners else OnDevice(t)  # an in-place op returns its argument

        return tree_map(wrap, out)
