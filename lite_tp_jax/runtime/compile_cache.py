"""Compile once: JAX's persistent compilation cache, on by default.

XLA compiles a program once per process; this cache keeps the executable on
disk, keyed by the program, the XLA flags, jax's version and the devices it
runs on, so a rerun of the same config, a worker restarted by ``lite-tp
launch --max-restarts``, ``lite-tp generate`` and a spare takeover's step
(where the program is the same: on GPU the key leaves the device assignment
out; on CPU it includes it, so a takeover onto other devices compiles anew)
load it instead of compiling.

Several processes (``lite-tp launch``, a cluster): JAX writes entries from
process 0 only (``jax._src.compiler._cache_write``), and on CPU the key of
the same program differs per process (its compile options and accelerator
fingerprint, as jax's ``cache_key`` debug log shows), so only process 0
loads its programs; the others compile again, and a restarted job waits for
them (``benchmarks/fault_injection.py --kill-cache off,on``). On GPU JAX
leaves the device assignment out of the key for this reason.

Where (``compile`` section of the config): ``compile.cache_dir`` if given, else
``$JAX_COMPILATION_CACHE_DIR`` if set (the test suite points it at the
repository's ``.jax_cache``), else ``$XDG_CACHE_HOME/lite_tp_jax/jax``
(``~/.cache/lite_tp_jax/jax``). ``compile.cache: false`` turns it off. Programs
are cached whatever their compile time unless
``$JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` says otherwise (a restart
recompiles everything, and the small programs add up).

``CacheHits`` counts hits and misses from jax's monitoring events, so a run can
say (and a test check) that it loaded its step instead of compiling it.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax

from lite_tp_jax.core.errors import BadInput

MIN_COMPILE_TIME_ENV = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"
HIT_EVENT, MISS_EVENT = "/jax/compilation_cache/cache_hits", "/jax/compilation_cache/cache_misses"


def default_cache_dir() -> Path:
    """``$JAX_COMPILATION_CACHE_DIR``, else ``$XDG_CACHE_HOME/lite_tp_jax/jax``."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lite_tp_jax" / "jax"


def use_compile_cache(enabled: bool, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """Points jax at the persistent cache (``cache_dir`` or the default) or turns
    it off; returns the directory in use. Call before the first compilation:
    jax opens the cache once per process. BadInput if the directory cannot be made."""
    if not enabled:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BadInput(
            f"the compilation cache directory {str(path)!r} cannot be made ({error.strerror}); set "
            f"compile.cache_dir to a writable directory, or compile.cache=false"
        ) from None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    if MIN_COMPILE_TIME_ENV not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


class CacheHits:
    """Counts persistent-cache hits and misses from now on (jax's monitoring
    events; listeners cannot be removed, so one instance lives per process)."""

    _instance: CacheHits | None = None

    def __init__(self):
        self.hits, self.misses = 0, 0
        jax.monitoring.register_event_listener(self._on_event)

    @classmethod
    def get(cls) -> CacheHits:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def _on_event(self, event: str, **_) -> None:
        if event == HIT_EVENT:
            self.hits += 1
        elif event == MISS_EVENT:
            self.misses += 1

    def counts(self) -> tuple[int, int]:
        """``(hits, misses)`` so far; subtract two readings to count an interval."""
        return self.hits, self.misses
