"""The model repository: which models and versions the models directory holds, which of them are
served, and changing that while serving.

Two layouts, side by side in one directory:

- ``NAME.pt`` (any file name): one version, named and numbered by the file's own metadata;
- Triton's ``NAME/VERSION/model.pt``: the version is the folder's name, and the file's metadata
  must say the same name and version.

Control modes (``--model-control-mode``), as Triton's: ``none`` loads everything at start and never
changes; ``poll`` rescans every ``--repository-poll-seconds``, loading new versions (and files that
changed) and unloading what went away, of the models ``--load-models`` names only (every model by
default), as TensorFlow Serving follows the models of its ``model_config_list``; ``explicit`` loads
``--load-models`` at start, then only what the repository calls ask for. ``--version-policy`` picks
the versions of a model that are served: ``latest:N``, ``all`` or ``specific:V1,V2``.

A version is loaded beside what is serving: its file is checked by the artifact format before any
of its code runs, loaded, warmed at every batch size, and only then takes over, atomically (one
dictionary update on the event loop). A version that leaves stops taking new requests at once, and
its batcher stops once the requests that hold it (their reservations, ``Lease``) are answered. A
load that fails leaves what was serving serving, and the version UNAVAILABLE with the reason.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

from cifar10_serving.protos import artifact
from cifar10_serving.server.batching import Batcher
from cifar10_serving.server.config import VersionPolicy, version_key
from cifar10_serving.server.errors import Code, Rejection, invalid, quote
from cifar10_serving.server.models import LoadedModel, ModelLoadError
from cifar10_serving.server.statistics import Statistics

log = logging.getLogger(__name__)

MODES = ("none", "poll", "explicit")
TRITON_FILE = "model" + artifact.ARTIFACT_SUFFIX  # NAME/VERSION/model.pt
# Names a request may load: no path separators, no "..", nothing a shell or a URL would bend.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"
STATES = (READY, LOADING, UNLOADING, UNAVAILABLE)


@dataclass(frozen=True)
class FileVersion:
    """A version the directory holds."""

    name: str
    version: str
    path: Path
    stamp: tuple[int, ...]  # modification times and sizes (_stamp): a changed file is loaded again
    problem: str = ""  # why it cannot be loaded, found by the scan (unreadable metadata, a clash)


@dataclass
class Version:
    """One version of a model, in whatever state."""

    name: str
    version: str
    path: Path | None = None
    stamp: tuple[int, ...] = (0, 0)
    state: str = ""
    reason: str = ""
    model: LoadedModel | None = None
    batcher: Batcher | None = None
    statistics: Statistics = field(default_factory=Statistics)
    failed_stamp: tuple[int, ...] = (-1, -1)  # the file whose load failed last: not tried again until it changes
    started: float = 0.0  # when its load began (time.perf_counter)
    load_seconds: float = 0.0
    leases: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)


class Lease:
    """A request's hold on the version it was planned on, with its reservation from the answer
    budget: both end at ``release()`` (once the answer is written or the call has ended), and a
    version that is leaving waits for its leases. A request that reached the model (``track``) is
    counted in the version's statistics: a success when its result came, else a failure at release."""

    def __init__(self, entry: Version, reservation, images: int) -> None:
        self.entry = entry
        self.reservation = reservation
        self.images = images
        self.nbytes = reservation.nbytes
        self._start = time.perf_counter_ns()
        self._tracked = self._succeeded = False
        self._held = True
        entry.leases += 1
        entry.idle.clear()

    def track(self) -> None:
        self._tracked = True

    def succeed(self) -> None:
        if not self._succeeded:
            self._succeeded = True
            self.entry.statistics.record_success(self.images, time.perf_counter_ns() - self._start)

    def release(self) -> None:
        self.reservation.release()
        if not self._held:
            return
        self._held = False
        if self._tracked and not self._succeeded:
            self.entry.statistics.record_failure(time.perf_counter_ns() - self._start)
        self.entry.leases -= 1
        if self.entry.leases == 0:
            self.entry.idle.set()


def scan(models_dir: Path) -> dict[str, dict[str, FileVersion]]:
    """Every version the directory holds, by name: reads each file's metadata (no code)."""
    found: dict[str, dict[str, FileVersion]] = {}

    def add(fv: FileVersion) -> None:
        other = found.setdefault(fv.name, {}).get(fv.version)
        if other is not None and other.path != fv.path:
            fv = FileVersion(fv.name, fv.version, fv.path, fv.stamp,
                             f"{fv.path}: model {fv.name!r} version {fv.version!r} is also {other.path}")
        found[fv.name][fv.version] = fv

    for path in sorted(models_dir.glob("*" + artifact.ARTIFACT_SUFFIX)):
        try:
            meta = artifact.read_metadata(path)
            add(FileVersion(str(meta["name"]), str(meta["version"]), path, _stamp(path)))
        except (artifact.ArtifactFormatError, OSError) as exc:
            add(FileVersion(path.stem, "", path, (0, 0), str(exc)))
    for folder in sorted(p for p in models_dir.iterdir() if p.is_dir() and NAME.fullmatch(p.name)):
        for version_dir in sorted(p for p in folder.iterdir() if p.is_dir() and NAME.fullmatch(p.name)):
            path = version_dir / TRITON_FILE
            if path.is_file():
                add(FileVersion(folder.name, version_dir.name, path, _stamp(path)))
    return found


def _stamp(path: Path) -> tuple[int, ...]:
    """The file's modification time and size, and its compiled package's (docs/compiled.md) where it has
    one: poll mode loads a version again when either changes, or a package comes or goes."""
    status = path.stat()
    try:
        package = path.with_suffix(artifact.COMPILED_SUFFIX).stat()
        return (status.st_mtime_ns, status.st_size, package.st_mtime_ns, package.st_size)
    except FileNotFoundError:
        return (status.st_mtime_ns, status.st_size)


Loader = Callable[[FileVersion, Version], Awaitable[None]]


class Repository:
    """The versions of every model and which of them serve; changed one call at a time.

    ``loader(file, entry)`` loads and checks ``file`` into ``entry`` (its ``model`` and ``batcher``)
    and ``warmer(entry)`` warms it before it serves, each raising ``ModelLoadError``; ``on_change(entry, event)`` runs after each change, with
    the event: "state" (LOADING, UNLOADING), "loaded", "failed", "failed beside" (a changed file that
    did not load while the one before serves on), "unloaded", or "replaced" (a retired version whose
    place in the index a newer file of the same version took)."""

    def __init__(self, models_dir: str | Path, mode: str, policy: VersionPolicy, loader: Loader,
                 warmer: Callable[[Version], Awaitable[None]],
                 on_change: Callable[[Version, str], None] = lambda entry, event: None) -> None:
        if mode not in MODES:
            raise ValueError(f"model control mode {mode!r}: use one of {', '.join(MODES)}")
        self.models_dir = Path(models_dir)
        self.mode = mode
        self.policy = policy
        self._loader = loader
        self._warmer = warmer
        self.starting: asyncio.Task | None = None  # the models after the first, warming at start
        self.watched: frozenset[str] | None = None  # the models poll mode follows (None: every one); set by start
        self._on_change = on_change
        self._versions: dict[str, dict[str, Version]] = {}  # every version known, by name
        self._serving: dict[str, dict[str, Version]] = {}  # what requests see: READY versions only
        self._by_model: dict[int, Version] = {}
        self._lock = asyncio.Lock()  # one change at a time
        self._retiring: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ what requests see
    def lookup(self, name: str, version: str = "") -> Version:
        versions = self._serving.get(name)
        if not versions and any(e.state == LOADING for e in self._versions.get(name, {}).values()):
            raise Rejection(Code.UNAVAILABLE, f"model {name!r} is loading; retry shortly")
        if not versions:
            loaded = ", ".join(sorted(self._serving)) or "none"
            raise Rejection(Code.NOT_FOUND, f"model {quote(name)} is not loaded; loaded models: {loaded}")
        if version:
            entry = versions.get(version)
            if entry is None:
                raise Rejection(Code.NOT_FOUND, f"model {name!r} has no ready version {quote(version)}; ready: "
                                                f"{', '.join(sorted(versions, key=version_key))}")
            return entry
        return versions[max(versions, key=version_key)]

    def serving(self) -> list[Version]:
        """Every READY version, by name, then version."""
        return [self._serving[name][v] for name in sorted(self._serving)
                for v in sorted(self._serving[name], key=version_key)]

    def serving_names(self) -> set[str]:
        return set(self._serving)

    def entry(self, model: LoadedModel) -> Version:
        return self._by_model[id(model)]

    def index(self, ready_only: bool = False) -> list[Version]:
        """Every model of the repository and every version known, as Triton's RepositoryIndex: a model
        that was never loaded appears once, without a version or state."""
        on_disk = scan(self.models_dir) if self.models_dir.is_dir() else {}
        entries: list[Version] = []
        for name in sorted(set(on_disk) | set(self._versions)):
            known = self._versions.get(name, {})
            if not known:
                if not ready_only:
                    entries.append(Version(name, ""))
                continue
            entries += [known[v] for v in sorted(known, key=version_key)
                        if not ready_only or known[v].state == READY]
        return entries

    # ------------------------------------------------------------------ changes
    async def start(self, names: list[str] | None, first: str,
                    before_loading: Callable[[int], None] = lambda models: None) -> None:
        """Loads ``names`` (None: every model) at start, and returns once ``first`` serves: every
        version is read, checked and loaded first (in ``none`` mode one that fails fails the start, as
        a server given files it cannot serve should; otherwise it stays UNAVAILABLE with its reason),
        then ``first`` is warmed and serves, and the others are warmed and serve one by one after
        start returns (``starting``), each as soon as it is warm. ``before_loading(n)`` is told how
        many models will load, before the first does."""
        if not self.models_dir.is_dir():
            raise ModelLoadError(f"models directory {self.models_dir} does not exist")
        found = scan(self.models_dir)
        if not found:
            raise ModelLoadError(f"no *{artifact.ARTIFACT_SUFFIX} model artifacts in {self.models_dir}")
        wanted = sorted(found) if names is None else names
        self.watched = None if names is None else frozenset(names)
        unknown = [n for n in wanted if n not in found]
        if unknown:
            raise ModelLoadError(f"models {unknown} are not in the repository {self.models_dir}: {sorted(found)}")
        strict = self.mode == "none"
        before_loading(len(wanted))
        order = sorted(wanted, key=lambda name: name != first)  # the first first, the rest in their order
        await self._lock.acquire()
        try:
            prepared: list[Version] = []
            for name in order:
                unreadable = [fv for fv in found[name].values() if fv.problem]
                if strict and unreadable:
                    raise ModelLoadError(unreadable[0].problem)
                for version in self.policy.choose(v for v in found[name] if v):
                    entry, _ = await self._prepare(found[name][version], strict)
                    if entry is not None:
                        prepared.append(entry)
            for entry in [e for e in prepared if e.name == first]:
                await self._activate(entry, strict)
        except BaseException:
            await _discard(e for e in prepared if e.state == LOADING)
            self._lock.release()
            raise
        self.starting = asyncio.get_running_loop().create_task(
            self._activate_rest([e for e in prepared if e.name != first]), name="repository-start")

    async def _activate_rest(self, entries: list[Version]) -> None:
        """The rest of start-up, holding the lock that ``start`` took: no change interleaves with it."""
        try:
            for entry in entries:
                await self._activate(entry, strict=False)
        finally:
            await _discard(e for e in entries if e.state == LOADING)  # stopped during start-up
            self._lock.release()

    async def load(self, name: str) -> None:
        """Loads (or reloads) ``name``'s versions by the policy: the repository's load call."""
        self._check_name(name)
        async with self._lock:
            found = scan(self.models_dir).get(name)
            if not found:
                raise Rejection(Code.NOT_FOUND, f"model {name!r} is not in the repository")
            failures = await self._converge(name, found, strict=False, reload=True)
            if failures:
                raise invalid(f"load of model {name!r} failed: " + "; ".join(failures))

    async def unload(self, name: str) -> None:
        """Unloads every version of ``name``: the repository's unload call. Returns once no new
        request can reach it; requests in flight finish on it."""
        self._check_name(name)
        async with self._lock:
            if name not in self._versions and name not in scan(self.models_dir):
                raise Rejection(Code.NOT_FOUND, f"model {name!r} is not in the repository")
            for entry in list(self._serving.get(name, {}).values()):
                self._retire(entry, "unloaded")

    async def poll(self) -> None:
        """One rescan (``poll`` mode): new and changed versions load, versions gone unload. Only the
        models started with (``watched``): a folder ``--load-models`` left out stays unloaded, as
        the operator asked, however often the folder is scanned."""
        async with self._lock:
            found = scan(self.models_dir) if self.models_dir.is_dir() else {}
            if self.watched is not None:
                found = {name: versions for name, versions in found.items() if name in self.watched}
            for name in sorted(set(found) | set(self._serving)):
                await self._converge(name, found.get(name, {}), strict=False)

    async def poll_forever(self, seconds: float) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await self.poll()
            except Exception:  # a rescan's failure must not end polling
                log.exception("repository poll failed")

    async def stop(self) -> None:
        """Stops every batcher: the server is stopping and its calls have ended or been cut."""
        if self.starting is not None:
            self.starting.cancel()
            try:
                await self.starting
            except (asyncio.CancelledError, Exception):
                pass
        for task in list(self._retiring):
            task.cancel()
        for entry in self.serving():
            if entry.batcher is not None:
                await entry.batcher.stop()

    # ------------------------------------------------------------------ the work
    async def _converge(self, name: str, found: dict[str, FileVersion], strict: bool,
                        reload: bool = False) -> list[str]:
        """Serves the versions of ``name`` that the policy picks from ``found`` and retires the
        others; the failures, one line each. A version whose file does not load is left out of the
        policy's choice, so a corrupt new version leaves the one before it serving."""
        unreadable = [fv for fv in found.values() if fv.problem]
        if strict and unreadable:
            raise ModelLoadError(unreadable[0].problem)
        failures = [fv.problem for fv in unreadable if reload]
        excluded = {fv.version for fv in unreadable}
        if not reload and not strict:  # failed before, and the file has not changed since: no load loop
            excluded |= {v for v, fv in found.items()
                         if fv.stamp == getattr(self._versions.get(name, {}).get(v), "failed_stamp", None)}
        tried: set[str] = set()
        while True:
            serving = self._serving.get(name, {})
            wanted = self.policy.choose(v for v in found if v and v not in excluded)
            pending = [v for v in wanted if v not in tried
                       and (reload or v not in serving or serving[v].stamp != found[v].stamp)]
            if not pending:
                break
            version = pending[0]
            tried.add(version)
            problem = await self._load_version(found[version], strict)
            if problem:
                failures.append(f"version {version}: {problem}")
                if version not in self._serving.get(name, {}):  # nothing of it serves: choose among the others
                    excluded.add(version)
        for version, entry in list(self._serving.get(name, {}).items()):
            if version not in wanted:
                self._retire(entry, "unloaded" if version in found else "removed from the repository")
        for fv in unreadable:  # files the scan could not read: shown, never loaded
            if fv.version not in self._serving.get(name, {}):
                self._versions.setdefault(fv.name, {})[fv.version] = Version(
                    fv.name, fv.version, fv.path, fv.stamp, UNAVAILABLE, fv.problem, failed_stamp=fv.stamp)
        return failures

    async def _load_version(self, fv: FileVersion, strict: bool) -> str:
        """Loads one version beside what serves, then lets it take over; what went wrong, or ""."""
        entry, problem = await self._prepare(fv, strict)
        return problem if entry is None else await self._activate(entry, strict)

    async def _prepare(self, fv: FileVersion, strict: bool) -> tuple[Version | None, str]:
        """Reads, checks and loads one version (``loader``), not yet warmed nor serving."""
        entry = Version(fv.name, fv.version, fv.path, fv.stamp, LOADING)
        if fv.version not in self._serving.get(fv.name, {}):
            self._versions.setdefault(fv.name, {})[fv.version] = entry  # one serving stays listed until replaced
            self._on_change(entry, "state")
        entry.started = time.perf_counter()
        try:
            if fv.problem:
                raise ModelLoadError(fv.problem)
            await self._loader(fv, entry)
        except ModelLoadError as exc:
            return None, self._failed(entry, exc, strict)
        return entry, ""

    async def _activate(self, entry: Version, strict: bool) -> str:
        """Warms a prepared version (``warmer``), then lets it take over, atomically."""
        try:
            await self._warmer(entry)
        except ModelLoadError as exc:
            return self._failed(entry, exc, strict)
        previous = self._serving.get(entry.name, {}).get(entry.version)
        entry.state, entry.reason = READY, ""
        entry.load_seconds = time.perf_counter() - entry.started
        self._serving.setdefault(entry.name, {})[entry.version] = entry  # the take-over: new requests plan on it now
        self._versions.setdefault(entry.name, {})[entry.version] = entry
        self._by_model[id(entry.model)] = entry
        self._on_change(entry, "loaded")
        if previous is not None:
            self._retire(previous, "replaced by a newer file")
        log.info("model %s version %s ready in %.1f s (%s)", entry.name, entry.version, entry.load_seconds,
                 entry.path)
        return ""

    def _failed(self, entry: Version, exc: ModelLoadError, strict: bool) -> str:
        """Records a version that did not load; what served serves on. Raises in strict mode."""
        log.error("model %s version %s not loaded: %s", entry.name, entry.version, exc)
        entry.state, entry.reason, entry.failed_stamp = UNAVAILABLE, str(exc), entry.stamp
        entry.model = entry.batcher = None
        previous = self._serving.get(entry.name, {}).get(entry.version)
        self._on_change(entry, "failed" if previous is None else "failed beside")
        if previous is not None:  # the file loaded before serves on; the index says why it is not the new one
            previous.failed_stamp = entry.stamp
            previous.reason = f"the changed file failed to load and the one loaded before serves on: {exc}"
        if strict:
            raise exc
        return str(exc)

    def _retire(self, entry: Version, reason: str) -> None:
        """Takes ``entry`` out of service now; its batcher stops once its leases are released."""
        versions = self._serving.get(entry.name, {})
        if versions.get(entry.version) is entry:
            del versions[entry.version]
            if not versions:
                del self._serving[entry.name]
        entry.state, entry.reason = UNLOADING, reason
        if self._versions.get(entry.name, {}).get(entry.version) is entry:
            self._on_change(entry, "state")
        task = asyncio.get_running_loop().create_task(self._finish_retiring(entry, reason))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _finish_retiring(self, entry: Version, reason: str) -> None:
        if entry.leases:
            await entry.idle.wait()
        if entry.batcher is not None:
            await entry.batcher.retire()
        self._by_model.pop(id(entry.model), None)
        entry.model = entry.batcher = None
        entry.state = UNAVAILABLE
        listed = self._versions.get(entry.name, {}).get(entry.version) is entry
        self._on_change(entry, "unloaded" if listed else "replaced")  # replaced: a newer file took its place
        log.info("model %s version %s %s", entry.name, entry.version, reason)
        # The module's objects were frozen out of the collector's reach at start or load
        # (server.main.settle_heap); cycles among them are freed only by a collection that sees them.
        gc.unfreeze()
        gc.collect()
        gc.freeze()

    def _check_name(self, name: str) -> None:
        if not NAME.fullmatch(name) or ".." in name:
            raise invalid(f"model name {quote(name)}: use letters, digits, '.', '_' and '-' (no path), "
                          "as the repository's folder or file names it")


async def _discard(entries) -> None:
    """Stops the batchers of versions loaded but never served (start-up failed or was stopped)."""
    for entry in entries:
        if entry.batcher is not None:
            await entry.batcher.stop()
        entry.model = entry.batcher = None
