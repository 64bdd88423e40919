"""A stateful package plugin: async methods, and state that moves across a hot reload."""

import asyncio

from ._state import Counter

VERSION = "1.0.0"
_counter = Counter()


async def increment(by=1):
    await asyncio.sleep(0)
    return _counter.add(by)


def get():
    return _counter.value


def version():
    return VERSION


def export_state():
    return {"count": _counter.value}


def import_state(state, from_version):
    _counter.value = int(state["count"])
