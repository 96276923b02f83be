"""Reports Triton kernel compilations, and warns about those that happen while serving.

Triton compiles a kernel the first time it is launched with a new specialization (its
constexpr values, launch options, and which integer arguments are 1 or divisible by 16).
A compilation blocks the launching thread: in the engine, the step loop, so every stream
waits for it (tenths of a second to seconds; less when Triton's on-disk cache has it). The
runtime's warm-up is meant to compile what serving needs; once it has run (mark_warm), each
further compilation is logged as a warning, with the kernel, its specialization and how long
it took, so that a stall seen by clients can be traced to it.
"""

from __future__ import annotations

import logging
import threading
import time

logger = logging.getLogger(__name__)


class CompileWatch:
    """Triton's before- and after-compilation hooks (see install)."""

    def __init__(self):
        self.warm = False
        self.compiled_while_serving = 0
        self._started: dict[tuple[str, str], float] = {}
        self._last: dict[str, dict[str, str]] = {}  # kernel name -> its latest compilation's specialization
        self._lock = threading.Lock()

    # Triton calls both hooks with keyword arguments: key (its cache key, a string), fn
    # (the kernel's name and JITFunction), compile (signature, constants, attributes), and
    # others that are not used here.
    def before(self, *, key, fn, **_):
        with self._lock:
            self._started[(fn.name, str(key))] = time.perf_counter()
        return None  # None: Triton goes on and compiles

    def after(self, *, key, fn, **kwargs):
        spec = specialization(list(getattr(fn.jit_function, "arg_names", [])), str(key), kwargs.get("compile") or {})
        with self._lock:
            began = self._started.pop((fn.name, str(key)), None)
            previous = self._last.get(fn.name)
            self._last[fn.name] = spec
            warm = self.warm
            if warm:
                self.compiled_while_serving += 1
        seconds = time.perf_counter() - began if began is not None else float("nan")
        what = describe_change(previous, spec)
        if warm:
            logger.warning("Triton compiled %s after the warm-up, in %.2f s (the step loop waited for it); %s",
                           fn.name, seconds, what)
        else:
            logger.debug("Triton compiled %s in %.2f s; %s", fn.name, seconds, what)
        return None

    def mark_warm(self) -> None:
        with self._lock:
            self.warm = True


def specialization(names: list[str], key: str, info: dict) -> dict[str, str]:
    """What one compilation of a kernel was specialized on, argument by argument: a
    compile-time constant's value ("=4"), or the argument's type with "/16" where Triton
    assumed it divisible by 16 (a pointer aligned to 16 bytes, an integer multiple of 16);
    and the launch options (the tail of Triton's cache key). info: the hooks' `compile` argument."""
    signature = info.get("signature") or {}
    constants = info.get("constants") or {}
    attrs = (info.get("configs") or [{}])[0] or {}
    spec = {}
    for i, name in enumerate(names):
        if (i,) in constants:
            spec[name] = f"={constants[(i,)]}"
        else:
            aligned = any(a and a[0] == "tt.divisibility" for a in attrs.get((i,), []))
            spec[name] = f"{signature.get(name, '?')}{'/16' if aligned else ''}"
    cut = key.rfind("]{")  # Triton's cache key: str(specialization list) + str(options dict)
    spec["launch options"] = key[cut + 1 :] if cut >= 0 else ""
    return spec


def describe_change(before: dict[str, str] | None, now: dict[str, str]) -> str:
    """Against the kernel's previous compilation, the arguments whose specialization differs
    (name: before -> now); for a first one, its compile-time constants."""
    if not before:
        constants = [f"{name}{value}" for name, value in now.items() if value.startswith("=")]
        return "first compilation: " + (", ".join(constants) or "no constants")
    changed = [f"{name}: {before.get(name)} -> {value}" for name, value in now.items() if before.get(name) != value]
    return "differs from the previous compilation in " + (", ".join(changed) or "nothing Triton reports")


WATCH = CompileWatch()
_installed = False


def install() -> None:
    """Chain WATCH into Triton's compilation hooks (once per process; hooks set before are
    still called)."""
    global _installed
    if _installed:
        return
    from triton import knobs

    runtime = knobs.runtime
    runtime.jit_cache_hook = _chained(WATCH.before, runtime.jit_cache_hook)
    runtime.jit_post_compile_hook = _chained(WATCH.after, runtime.jit_post_compile_hook)
    _installed = True


def _chained(ours, theirs):
    if theirs is None:
        return ours

    def both(**kwargs):
        ours(**kwargs)
        return theirs(**kwargs)  # theirs decides (the before-hook may skip the compilation)

    return both
