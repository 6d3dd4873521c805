"""The registry's per-create and per-destroy bookkeeping looks things up; it never walks
every container (a create must not get slower with each container alive, issue 8)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import trio

from gactor import ContainerSpec
from gactor.actors.registry import Registry, _ReleaseImage
from gactor.errors import GardenError
from gactor.kernel import images

from .test_grace import NoCgroups


class CountedName:
    """A fake container whose name counts how often the registry reads it."""

    reads = 0

    def __init__(self, handle: str) -> None:
        self.handle = handle
        self._name = handle
        self.grace_time = 0.0
        self.image_copy = ""
        self.net = None
        self.properties: dict[str, str] = {}

    @property
    def name(self) -> str:
        CountedName.reads += 1
        return self._name

    async def destroy(self) -> None:
        pass


@pytest.fixture
async def registry(tmp_path) -> Any:
    env: Any = SimpleNamespace(depot=str(tmp_path), cgroups=NoCgroups(), image_store=str(tmp_path / "images"),
                               network=None, allow_privileged=True)
    reg = Registry(env, "", 0.0, 0)
    async with trio.open_nursery() as nursery:
        ref = await nursery.start(reg.run)
        yield reg, ref
        nursery.cancel_scope.cancel()


async def test_a_create_checks_the_handle_without_reading_every_container(registry) -> None:
    reg, ref = registry
    for n in range(300):
        await ref.adopt(CountedName(f"c{n}"))
    CountedName.reads = 0
    reg._check_create(ContainerSpec(handle="new"))
    with pytest.raises(GardenError, match="Handle 'c7' already in use"):
        reg._check_create(ContainerSpec(handle="c7"))
    assert CountedName.reads == 0
    await ref.destroy("c7")
    reg._check_create(ContainerSpec(handle="c7"))  # its name is free again


def _copy(path: str) -> images.Image:
    return images.Image(path, (path,), images.ImageConfig(), "", True, 0, 0)


async def test_releasing_an_image_reference_counts_the_copy_users(registry) -> None:
    """A copy is handed back for collecting with its last reference only; references are
    counted per copy, not found by a walk over every container's."""
    reg, _ = registry
    for n in range(300):
        reg._take_image(f"other{n}", _copy(f"/store/other{n}"))
    reg._take_image("a", _copy("/store/shared"))
    reg._take_image("b", _copy("/store/shared"))
    reg._take_image("b", _copy("/store/shared"))  # taken again: still one reference of b's
    assert await reg.mailbox.ask(_ReleaseImage("a")) is None  # b still uses it
    assert await reg.mailbox.ask(_ReleaseImage("a")) is None  # a has none left
    released = await reg.mailbox.ask(_ReleaseImage("b"))
    assert released is not None
    assert released.path == "/store/shared"
    assert "/store/shared" not in reg._image_paths
    assert len(reg._image_paths) == 300
